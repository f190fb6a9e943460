"""
train.py's flags and the one function that turns them into a run's config: make_config(argv).

A config is a plain dict (saved as config.json and inside every checkpoint), resolved in this order:
the flags the user typed, else the --method preset (methods.py), else the defaults for this machine
(CPU_DEFAULTS or GPU_DEFAULTS). With --resume the saved config is the base and typed flags override
it, unless they would change the network or the experiment (check_compatible). Then the data are
described (channels, classes), the method's prepare_config runs, and every setting is checked, so that
a mistake is one sentence before any step is trained. bench.py builds its configs through the same
function.

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


class FlagError(RunError):
    """Flags that do not fit together, found before any file is read: reported with the usage line."""


def get_parser(description=None):
    try:  # a misspelt hook is refused here, before any flag is read
        methods.check_registry()
    except TypeError as e:
        raise SystemExit(f"error: {e}") from None
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    a("--out", default="runs/default")
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


def check_compatible(saved, cfg, what="the checkpoint"):
    """Refuse a resumed config that changes the network's shape or the experiment (schedule, target, the
    axes' and the method's resume_keys)."""
    hook = lambda name: methods.hook(cfg["method"], name)
    kept = ("T", "schedule", "target", *methods.resume_keys(saved))
    hints = hook("RESUME_HINTS")
    for k in ARCH_KEYS + tuple(hook("SHAPE_KEYS")) + kept:
        if saved.get(k) != cfg.get(k):
            hint = hints.get(k, "use matching settings or another --out")
            raise RunError(f"{what} was trained with {k}={saved.get(k)!r} but this run has {k}={cfg.get(k)!r}; {hint}")


def make_config(argv, parser=None):
    """(cfg, dataset, resume) for train.py's argv: the resolved config, the training set, and the checkpoint
    being continued (None for a new run). Every check runs here; bad input raises RunError (FlagError for
flags that do not fit together, found before any file is read)."""
    parser = parser or get_parser()
    args = parser.parse_args(argv)
    cfg = resolve_config(args, typed_flags(parser, argv))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world:
        raise FlagError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} processes; "
                        f"use a multiple of {world}")
    if methods.hook(cfg["method"], "prepare_config") is None and not cfg["resume"]:
        check_image_size(cfg)  # (a prepare_config may still change the model, e.g. JointNet's --init)
    resume = None
    ckpt_path = f"{cfg['out']}/checkpoint.pt"
    if cfg["resume"]:
        resume = runlib.load_checkpoint(ckpt_path if cfg["resume"] == "auto" else cfg["resume"])
        # Continue the saved experiment; flags given now override it (checked below for shape changes).
        cfg = {**resume["config"], **{k: cfg[k] for k in cfg["explicit"]}, "resume": cfg["resume"], "out": cfg["out"]}
        cfg["arch"] = "dit" if cfg["model"].startswith("DiT") else "unet"
        cfg.setdefault("precision", (GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS)["precision"])  # older checkpoints
    try:
        dataset = data.build_dataset(cfg["data"], cfg["image_size"], "train", cfg["seed"], cfg.get("channels"))
        kept = resume["config"]["in_channels"] if resume is not None else None
        if kept in (1, 3) and dataset.channels in (1, 3) and cfg.get("channels") is None:
            dataset = data.with_channels(dataset, kept)  # a resumed run keeps the channels it was trained with
    except ValueError as e:
        raise RunError(str(e)) from None
    describe_data(cfg, dataset)
    prepare = methods.hook(cfg["method"], "prepare_config")
    if prepare is not None and resume is None:
        prepare(cfg)  # e.g. JointNet takes its backbone from --init
    check_image_size(cfg)
    methods.check_config(cfg)
    if resume is not None:
        check_compatible(resume["config"], cfg)
    return cfg, dataset, resume
