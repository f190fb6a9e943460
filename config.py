"""
train.py's flags and the one function that turns them into a run's config: make_config(argv).

A config is a plain dict (saved as config.json and inside every checkpoint), resolved in this order:
the flags the user typed, else the --method preset (methods.py), else the defaults for this machine
(CPU_DEFAULTS or GPU_DEFAULTS). With --resume the saved config is the base and typed flags override
it, unless they would change the network or the experiment (check_compatible). Then the data are
described (channels, classes), the method's prepare_config runs, and every setting is checked, so that
a mistake is one sentence before any step is trained: a flag the user typed is never ignored (one that
this run would not read is refused), and an --init run must fit the network. bench.py builds its
configs through the same function; check_out (the run folder) is train.py's alone.

Imports: the registry (methods.py) and the base (data.py, diffusion.py, runlib.py, unet.py, dit.py).
"""
import argparse
import os

import torch

import data
import diffusion
import methods
import runlib
from dit import DIT_PRESETS
from runlib import RunError, ranged
from unet import UNET_PRESETS

# Config keys that fix the network's shape: a checkpoint must agree on all of them.
ARCH_KEYS = ("method", "arch", "model", "image_size", "in_channels", "num_classes", "learn_sigma")
ON_GPU = torch.cuda.is_available()
CPU_DEFAULTS = dict(model="unet-cpu", image_size=32, batch_size=16, steps=1500, lr=3e-4, ema_decay=0.999,
                    ckpt_every=500, sample_every=1000, log_every=50, workers=0, precision="fp32")
GPU_DEFAULTS = dict(model="unet-gpu", image_size=64, batch_size=128, steps=100_000, lr=1e-4, ema_decay=0.9999,
                    ckpt_every=5000, sample_every=5000, log_every=100, workers=4, precision="bf16")
AXIS_DEFAULTS = dict(target="eps", weighting="none", snr_gamma=5.0, routing="none")
DIT_DEFAULT = "DiT-S/2" if ON_GPU else "DiT-T/4"  # --arch dit without --model: 33M (GPU), 4.2M (CPU)
# The linear schedule's last beta is 0.02 * 1000 / T (diffusion.make_betas), which must not pass 1.
LINEAR_MIN_T = 20
# The end of a --resume refusal's sentence for keys of every method (a method adds its own RESUME_HINTS).
RESUME_HINTS = {"init": "--init starts a new run from other weights; drop it when resuming, or use another --out"}


class FlagError(RunError):
    """Flags that do not fit together, or that this run would not read: reported with the usage line."""


def get_parser(description=None):
    p = methods.checked_parser(description)
    a = p.add_argument
    a("--method", default="minsnr_v", choices=list(methods.METHODS), help="a preset of methods.py's registry; "
      "default minsnr_v (Min-SNR-5, v-prediction); ddpm is the eps-prediction baseline the papers compare against")
    a("--arch", choices=["unet", "dit"], help="default: inferred from --model")
    a("--model", choices=list(UNET_PRESETS) + list(DIT_PRESETS), help="preset; default unet-cpu on CPU, unet-gpu on GPU "
      f"({DIT_DEFAULT} with --arch dit)")
    a("--data", default="shapes", help="'shapes', a folder of images, the CIFAR-10 binary folder "
      "(cifar-10-batches-bin), or an .npz file")
    a("--channels", type=int, choices=[1, 3], help="image channels: 1 averages RGB data to gray, 3 trains gray data "
      "as RGB; default: the data's own (1 for a folder whose images are all grayscale)")
    a("--image-size", type=ranged(int, 8, 512))
    a("--class-cond", type=int, choices=[0, 1], default=1, help="condition on labels when the data has several classes")
    a("--cfg-drop", type=ranged(float, 0, 1), default=0.1, help="label dropout for classifier-free guidance")
    a("--batch-size", type=ranged(int, 1), help="global batch size (split across DDP ranks)")
    a("--lr", type=ranged(float, 0, lo_open=True))
    a("--warmup", type=ranged(int, 0), default=100, help="linear learning-rate warm-up steps")
    a("--weight-decay", type=ranged(float, 0), default=0.0)
    a("--grad-clip", type=ranged(float, 0), default=1.0, help="max gradient norm (0: off)")
    a("--ema-decay", type=ranged(float, 0, 1))
    a("--steps", type=ranged(int, 1))
    a("--schedule", default="linear", choices=["linear", "cosine"])
    a("--T", type=ranged(int, 2), default=1000)
    a("--target", choices=diffusion.TARGETS, help="prediction target (default eps)")
    a("--out", default="runs/default", help="the run folder (one train.py writes into it at a time)")
    a("--init", help="start a new run from the EMA weights of this run (a checkpoint.pt or its folder); "
      "jointnet and direct_extend: the pretrained RGB run they extend (jointnet --unfreeze: its stage-1 run)")
    a("--seed", type=int, default=0)
    a("--resume", nargs="?", const="auto", help="continue OUT/checkpoint.pt (or the given checkpoint)")
    a("--log-every", type=ranged(int, 1))
    a("--ckpt-every", type=ranged(int, 1))
    a("--sample-every", type=ranged(int, 1))
    a("--sample-steps", type=ranged(int, 1), default=50, help="DDIM steps for the sample grids")
    a("--workers", type=ranged(int, 0))
    a("--compile", action="store_true", help="torch.compile the network; the loss stays eager (needs a C++ compiler on a CPU)")
    a("--precision", choices=["fp32", "bf16"], help="bf16: autocast the forward pass (weights, optimiser state and "
      "checkpoints stay float32); default bf16 on a GPU, fp32 on a CPU")
    a("--max-nonfinite", type=ranged(int, 1), default=10, help="stop after this many non-finite losses in a row")
    methods.add_args(p)
    return p


def typed_flags(parser, argv):
    """The dest names of the flags typed in argv, also those typed with their default value."""
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = defaults[a.dest]


def resolve_config(args, explicit=()):
    """argparse Namespace -> plain config dict: explicit flags, else the method preset, else the defaults."""
    preset = methods.METHODS[args.method].preset
    defaults = {**(GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS), **AXIS_DEFAULTS, **preset}
    cfg = dict(vars(args))
    if cfg.get("model") is None and cfg.get("arch") == "dit":
        cfg["model"] = DIT_DEFAULT
    for k, v in defaults.items():
        if cfg.get(k) is None or (k in preset and k not in explicit):
            cfg[k] = v
    inferred = "dit" if cfg["model"].startswith("DiT") else "unet"
    if cfg["arch"] is not None and cfg["arch"] != inferred:
        raise FlagError(f"--model {cfg['model']} is a {inferred} preset but --arch is {cfg['arch']}; drop --arch or pick a matching preset")
    cfg["arch"], cfg["learn_sigma"], cfg["explicit"] = inferred, False, sorted(explicit)
    cfg["dtr_placement"] = cfg.get("dtr_placement") or ("input" if inferred == "dit" else "hidden")
    return cfg


def describe_data(cfg, dataset):
    info = data.dataset_info(dataset)
    cfg["in_channels"] = info["channels"]
    cfg["num_classes"] = info["num_classes"] if cfg["class_cond"] and info["num_classes"] > 1 else 0
    return info


def channel_line(cfg, dataset):
    """One line saying how many image channels the run trains and why: --channels, the checkpoint's
    choice kept on resume, or the data (with the flag that overrides it)."""
    c, why = cfg["in_channels"], getattr(dataset, "channel_reason", "the data has them")
    if cfg.get("channels"):
        return f"channels: {c}, as --channels {c} asks: {why}"
    if isinstance(dataset, data.ChannelView):
        return f"channels: {c}, kept from the checkpoint: {why}"
    other = {1: "; --channels 3 trains it as RGB", 3: "; --channels 1 averages it to gray"}.get(c, "")
    return f"channels: {c}, because {why}{other}"


def check_image_size(cfg):
    s = cfg["image_size"]
    if cfg["arch"] == "dit":
        patch = DIT_PRESETS[cfg["model"]]["patch_size"]
        if s % patch:
            raise FlagError(f"--image-size {s} is not divisible by the patch size {patch} of {cfg['model']}; use a multiple of {patch}")
    else:
        f = 2 ** (len(UNET_PRESETS[cfg["model"]]["ch_mult"]) - 1)
        if s % f:
            raise FlagError(f"--image-size {s} is not divisible by {f}, the downsampling factor of {cfg['model']}; use a multiple of {f}")


def check_timesteps(cfg, typed):
    """Refuse a --T the schedule cannot take, and sample grids the run's T cannot give: the last grid is
    drawn after the last step, so this is checked before the first."""
    T = cfg["T"]
    if cfg["schedule"] == "linear" and T < LINEAR_MIN_T:
        raise FlagError(f"--T {T} is too few timesteps for the linear schedule, whose betas pass 1 below "
                        f"T={LINEAR_MIN_T}; use --T {LINEAR_MIN_T} or more, or --schedule cosine")
    if cfg["sample_steps"] > T:
        default = "" if "sample_steps" in typed else " (the default)"
        raise FlagError(f"--sample-steps {cfg['sample_steps']}{default} is more than the {T} timesteps of --T {T}; "
                        f"pass --sample-steps {T} or fewer")


def refuse_difference(saved, cfg, keys, what, hints):
    """RunError naming the first of keys on which saved and cfg differ, ending with its hint."""
    for k in keys:
        if saved.get(k) != cfg.get(k):
            hint = hints.get(k, "use matching settings or another --out")
            raise RunError(f"{what} was trained with {k}={saved.get(k)!r} but this run has {k}={cfg.get(k)!r}; {hint}")


def check_compatible(saved, cfg, what="the checkpoint"):
    """Refuse a resumed config that changes the network's shape or the experiment (schedule, target, the
    starting weights, the axes' and the method's resume_keys)."""
    hook = lambda name: methods.hook(cfg["method"], name)
    kept = ("T", "schedule", "target", "init", *methods.resume_keys(saved))
    refuse_difference(saved, cfg, ARCH_KEYS + tuple(hook("SHAPE_KEYS")) + kept, what,
                      {**RESUME_HINTS, **hook("RESUME_HINTS")})


def check_init(cfg, base):
    """Refuse an --init run (config `base`) whose weights would not fit this run's network: another network
    builder, backbone, image size, channels or classes. For methods that start from --init by default;
    JointNet's prepare_config checks its own."""
    build = lambda method: methods.hook(method, "build_model")
    if build(base["method"]) is not build(cfg["method"]):
        same = [m for m in methods.METHODS if build(m) is build(cfg["method"])]
        raise RunError(f"--init {cfg['init']} is a {base['method']} run, whose network --method {cfg['method']} "
                       f"does not build; pass --init a run of {' / '.join(same)}")
    keys = ARCH_KEYS[1:] + tuple(methods.hook(cfg["method"], "SHAPE_KEYS"))
    refuse_difference(base, cfg, keys, f"--init {cfg['init']}", {k: "pass matching flags (--model, --image-size, "
                      "--data, --class-cond) or another --init" for k in keys})


def check_flags_read(cfg, given, parser):
    """Refuse a typed flag that this run would not read: a flag of another method, one that the run's other
    settings leave unused, or labels asked for where there are none. given: {dest: value} of the typed
    flags. A flag the user typed is never ignored."""
    unread = methods.unread_flags(cfg)
    if not cfg["num_classes"]:  # no labels: the data has fewer than 2 classes, or the method models images alone
        unread["cfg_drop"] = "is label dropout for guidance, but this run is unconditional; drop it"
        if given.get("class_cond") == 1:
            unread["class_cond"] = "asks for class conditioning, but this run is unconditional; drop it"
    for action in parser._actions:
        if action.dest in given and action.dest in unread:
            raise FlagError(f"{action.option_strings[0]} {unread[action.dest]}")


def check_out(cfg):
    """Refuse an --out that would mix two runs: a new run into a folder that holds one, or a resume from
    another run's checkpoint into it. (train.py's RunLock keeps two processes from writing into one.)"""
    out, resume = cfg["out"], cfg["resume"]
    ckpt = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        return
    if not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume != "auto" and not os.path.samefile(runlib.checkpoint_path(resume), ckpt):
        raise RunError(f"--out {out} holds a run of its own and --resume {resume} is another run's checkpoint; "
                       f"continue that run into a new --out, or pass --resume alone to continue {out}")


def make_config(argv, parser=None):
    """(cfg, dataset, resume) for train.py's argv: the resolved config, the training set, and the checkpoint
    being continued (None for a new run). Every check of the settings runs here; bad input raises RunError
    (FlagError for flags that do not fit together)."""
    parser = parser or get_parser()
    args = parser.parse_args(argv)
    given = {k: getattr(args, k) for k in typed_flags(parser, argv)}
    cfg = resolve_config(args, given)
    if not cfg["out"]:
        raise FlagError("--out is empty; name the run folder, e.g. --out runs/NAME")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world:
        raise FlagError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} processes; "
                        f"use a multiple of {world}")
    if not cfg["resume"]:
        check_timesteps(cfg, given)
        if methods.hook(cfg["method"], "prepare_config") is None:
            check_image_size(cfg)  # (a prepare_config may still change the model, e.g. JointNet's --init)
    if cfg["init"]:
        cfg["init"] = runlib.checkpoint_path(cfg["init"])  # a run folder, as sample.py --ckpt takes
    resume = init = None
    if cfg["resume"]:
        auto = cfg["resume"] == "auto"
        path = os.path.join(cfg["out"], "checkpoint.pt") if auto else runlib.checkpoint_path(cfg["resume"])
        resume = runlib.load_checkpoint(path, methods.METHODS)
        # Continue the saved experiment; flags given now override it (checked below for shape changes).
        cfg = {**resume["config"], **{k: cfg[k] for k in given}, "resume": cfg["resume"], "out": cfg["out"]}
        cfg["arch"] = "dit" if cfg["model"].startswith("DiT") else "unet"
        cfg.setdefault("precision", (GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS)["precision"])  # older checkpoints
    elif cfg["init"]:
        init = runlib.load_checkpoint(cfg["init"], methods.METHODS)["config"]
    try:
        dataset = data.build_dataset(cfg["data"], cfg["image_size"], "train", cfg["seed"], cfg.get("channels"))
        kept = resume["config"]["in_channels"] if resume is not None else None
        if kept in (1, 3) and dataset.channels in (1, 3) and cfg.get("channels") is None:
            dataset = data.with_channels(dataset, kept)  # a resumed run keeps the channels it was trained with
    except ValueError as e:
        raise RunError(str(e)) from None
    describe_data(cfg, dataset)
    if len(dataset) < cfg["batch_size"]:
        raise RunError(f"the dataset has {len(dataset)} items, fewer than one batch of {cfg['batch_size']}; "
                       "lower --batch-size")
    prepare = methods.hook(cfg["method"], "prepare_config")
    if prepare is not None and resume is None:
        prepare(cfg)  # e.g. JointNet takes its backbone from --init
    check_image_size(cfg)
    check_timesteps(cfg, given)  # again: a resume or JointNet's --init brings its own T
    methods.check_config(cfg)
    if resume is not None:
        check_compatible(resume["config"], cfg)
    elif init is not None and methods.hook(cfg["method"], "init_model") is methods.init_from_run:
        check_init(cfg, init)
    check_flags_read(cfg, given, parser)
    return cfg, dataset, resume
