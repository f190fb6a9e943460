"""
The method registry and the protocol by which a paper file plugs into train.py and sample.py.

Layers (each imports only the layers above it):

    base       diffusion.py  unet.py  dit.py  shapes.py  data.py  runlib.py
    papers     minsnr.py  dtr.py  mtdiffusion.py  jointnet.py        (each imports the base only)
               <paper>_eval.py: its analyses, figures, sampling modes, CLIs (its paper, the base, metrics.py)
    registry   methods.py (this file)                                  (papers and their eval files)
    loop       config.py -> train.py, sample.py                        (the registry and the base)
    evidence   bench.py and bench_*.py                                 (everything)

`--method NAME` looks NAME up in METHODS: a preset over the loop's independent axes (routing, loss
weighting, prediction target; explicit flags win) and the modules that implement the method's hooks.
Two axes apply to every method: the per-timestep loss weight (minsnr.py), which the loop puts in each
batch as batch["weight"], and channel routing (dtr.py), which build_model applies to the network. A
method without modules is the plain diffusion loss with the preset's axes: ddpm, minsnr, dtr, rtr, ...

Adding a method is one new file and one line here:

    # toy.py: x0-prediction with a random per-sample weight
    from diffusion import q_sample
    def training_loss(model, batch, sched, cfg, rng):
        x_t = q_sample(sched, batch["image"], batch["t"], batch["noise"])              # (B, C, H, W)
        mse = (model(x_t, batch["t"]) - batch["image"]).pow(2).mean((1, 2, 3))         # (B,)
        w = rng.rand(rng.batch_size)                                                  # (B,)
        return (w * mse).mean(), {"mse": mse.detach()}

    # methods.py: `import toy` at the top, and in METHODS
    "toy": Method(dict(), toy),

Every other hook falls back to the ddpm family's. tests/toy_method.py is this method with a flag and a
logged number; tests/test_methods.py trains, resumes and samples it through train.py and sample.py.

The protocol
------------
HOOKS names every hook and its parameters; nothing else is looked up. check_module() refuses a module
that defines a public name close to a hook's (a misspelling would otherwise fall back to the default
silently) or a hook whose parameters do not take the protocol's call. Config keys are the flags' dest
names; cfg also holds in_channels and num_classes (from the data), arch, and what prepare_config adds.

Collected from the axes and from every module of the method (all of them are used):
add_args(parser)
    Adds train.py flags (an argparse group). Called for every registered module when the parser is
    built, so flag names must be unique across methods; default None for "not given".
check_config(cfg)
    Refuses settings that cannot train (raise runlib.RunError, one sentence), before any data is read.
resume_keys(cfg) -> tuple
    Config keys that change no tensor shape but the experiment (the masks, the loss, the stage):
    --resume refuses to change them. cfg is the saved config.
unused_flags(cfg) -> {dest: why}
    The module's flags that cfg's other settings leave unread (e.g. --dtr-alpha with --routing none),
    each with the rest of a sentence that starts with the flag: train.py refuses such a flag when the user
    typed it. A module's flags are also refused as a whole under a method that lacks the module.
add_sample_args(parser)
    sample.py flags of the method's sampling modes.
The first module of the method that defines it wins, else the default:
prepare_config(cfg)
    Edits cfg in place for a NEW run, after the data are described, before the image size is checked
    and the model is built (e.g. JointNet takes its backbone from --init). Skipped on resume: the saved
    config already holds its result. Bad input: raise runlib.RunError (one sentence, no traceback).
build_model(cfg) -> nn.Module
    The network, from cfg alone (also called by load_run for sample.py and bench.py). torch's global
    generator is seeded with --seed before the call. Default: runlib.build_backbone. The registry then
    applies cfg's routing to model.routable_blocks() (dtr.route), so a model with routing must have them.
init_model(model, cfg)
    Loads weights into a NEW run's model (e.g. JointNet from --init). Skipped on resume. The EMA is
    copied from the model afterwards. Default: the EMA weights of the --init run, if one is given
    (config.py has checked before that they fit).
training_loss(model, batch, sched, cfg, rng) -> (loss, stats)
    batch holds this rank's rows, on the device: "image" (B, C, H, W) in [-1, 1], "label" (B,) long, any
    other key of the dataset ("depth" (B, 1, H, W), "seg" (B, H, W) on the shapes data), and the loop's
    draws "t" (B,) long, "noise" (B, C, H, W), "label_drop" (B,) bool (at --cfg-drop), and "weight" (B,)
    float64, the --weighting loss weight of each row's timestep (None for --weighting none: take the
    plain mean). rng is runlib.StepRandom: every further random number must come from it (drawn for the
    global batch, this rank's rows kept), so that N DDP ranks train exactly as one process. model is
    the raw module in train mode; the loop wraps the call for DDP and --compile, so it must not call
    collectives. loss: a scalar, averaged over this rank's rows (DDP then averages the ranks'
    gradients); a term averaged over a random subset of rows must divide by the subset's GLOBAL size
    times this rank's share of the batch (mtdiffusion.training_loss does). stats["mse"] (B,) is
    required: the per-sample loss behind log.jsonl's loss-by-timestep bins; every other stat is a
    scalar, averaged over a log window. Default: the diffusion loss for --target.
sample_rows(model, sched, cfg, n, generator, device) -> [tensor (n', C, H, W) in [-1, 1], ...]
    Rows of the sample grid train.py writes every --sample-every steps (master only, EMA, eval mode).
    Default: n DDIM samples, classes cycling across columns.
log_values(model, sched, cfg) -> {name: float}
    Extra numbers for log.jsonl (e.g. JointNet's held-out RGB loss). Called on the master process only
    (the values are of the shared weights, so every rank would measure the same), with the raw model,
    at the start of every log window, before its first update; the values are written with that
    window's record. Must leave the model's train/eval mode as it found it.
run_sample_mode(mode, model, sched, cfg, args, out, device)
    Writes OUT.png (and more) for one of SAMPLE_MODES; bad input: raise ValueError or runlib.RunError.
SHAPE_KEYS (tuple), RESUME_HINTS (dict), SAMPLE_MODES (tuple)
    Config keys beyond config.ARCH_KEYS that change the network (--resume refuses to change them);
    {key: what to do instead} ending a resume refusal's sentence; the method's sample.py --mode choices,
    the first being what the default mode `generate` means for it.
"""
import argparse
import difflib
import inspect

import torch

import dtr
import jointnet
import jointnet_eval
import minsnr
import mtdiffusion
import mtdiffusion_eval
import runlib
from diffusion import cfg_model, ddim_sample, diffusion_loss

# Every hook of the protocol: (name, parameters). Upper-case names are constants.
HOOKS = (
    ("add_args", ("parser",)), ("check_config", ("cfg",)), ("resume_keys", ("cfg",)), ("unused_flags", ("cfg",)),
    ("add_sample_args", ("parser",)), ("prepare_config", ("cfg",)), ("build_model", ("cfg",)),
    ("init_model", ("model", "cfg")), ("training_loss", ("model", "batch", "sched", "cfg", "rng")),
    ("sample_rows", ("model", "sched", "cfg", "n", "generator", "device")), ("log_values", ("model", "sched", "cfg")),
    ("run_sample_mode", ("mode", "model", "sched", "cfg", "args", "out", "device")),
    ("SHAPE_KEYS", tuple), ("RESUME_HINTS", dict), ("SAMPLE_MODES", tuple),
)
# Hooks collected from the axes and every module of a method (the others: the first module that defines it)
COLLECTED = ("add_args", "check_config", "resume_keys", "unused_flags", "add_sample_args")
AXES = (minsnr, dtr)  # the loss weight and the routing: every method has them


class Method:
    """A --method: its preset over the loop's axes and the modules holding its hooks (searched in order)."""

    def __init__(self, preset, *modules):
        self.preset, self.modules = dict(preset), modules


METHODS = {
    "ddpm": Method(dict()),
    "minsnr": Method(dict(weighting="min_snr", snr_gamma=5.0, target="eps")),
    # train.py's default: on a CPU in minutes its samples look like the data where the eps baseline's still
    # carry colour washes (README, "Choosing the default"); the weight is min(SNR, 5) / (SNR + 1).
    "minsnr_v": Method(dict(weighting="min_snr", snr_gamma=5.0, target="v")),
    "dtr": Method(dict(routing="dtr")),
    "rtr": Method(dict(routing="random")),
    "dtr_minsnr": Method(dict(routing="dtr", weighting="min_snr", snr_gamma=5.0)),
    "mtdiff": Method(dict(), mtdiffusion, mtdiffusion_eval),
    "jointnet": Method(dict(), jointnet, jointnet_eval),
    "direct_extend": Method(dict(), jointnet, jointnet_eval),
}


def diffusion_training_loss(model, batch, sched, cfg, rng):
    """Diffusion loss for the ddpm family: --target, each row weighted by the loop's batch["weight"]."""
    # Labels drop to the null class where the loop drew label_drop (classifier-free guidance training).
    kw = dict(y=batch["label"], force_drop_ids=batch["label_drop"]) if cfg["num_classes"] else {}
    loss, mse = diffusion_loss(model, sched, batch["image"], batch["t"], cfg["target"], batch["weight"],
                               batch["noise"], kw)
    return loss, {"mse": mse}


def diffusion_sample_rows(model, sched, cfg, n, generator, device):
    """Rows of a sample grid: n EMA samples (DDIM), classes cycling across columns when conditional."""
    y = torch.arange(n, device=device) % cfg["num_classes"] if cfg["num_classes"] else None
    fn = cfg_model(model, y, 1.0, cfg["num_classes"])
    shape = (n, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    # eta = 1 (the respaced ancestral sampler): after minutes of CPU training it gives clean samples where
    # deterministic DDIM (eta = 0) still leaves visible noise.
    return [ddim_sample(fn, sched, shape, cfg["sample_steps"], eta=1.0, target=cfg["target"],
                        generator=generator, device=device)]


def init_from_run(model, cfg):
    """Start a new run from the EMA weights of the --init run (a no-op without --init)."""
    if not cfg.get("init"):
        return
    ckpt = runlib.load_checkpoint(cfg["init"], METHODS)
    try:
        model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    except RuntimeError:  # config.check_init compares the configs first; this catches what they do not say
        raise runlib.RunError(f"--init {cfg['init']} holds weights that do not fit this run's network; "
                              "pass --init a run of the same method, model and data") from None


DEFAULTS = dict(build_model=runlib.build_backbone, init_model=init_from_run, training_loss=diffusion_training_loss,
                sample_rows=diffusion_sample_rows, SHAPE_KEYS=(), RESUME_HINTS={}, SAMPLE_MODES=())


def check_module(module):
    """Refuse (TypeError, one sentence) a module whose public names look like a misspelt hook, or whose hooks
    do not take the protocol's parameters."""
    names = [n for n, _ in HOOKS]
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", module.__name__) != module.__name__:
            continue  # private, or imported from elsewhere
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
            if close:
                raise TypeError(f"{module.__name__}.{name} is not a hook of the method protocol; did you mean "
                                f"{close[0]}? (methods.HOOKS lists them)")
            continue
        spec = dict(HOOKS)[name]
        if isinstance(spec, type):
            if not isinstance(value, spec):
                raise TypeError(f"{module.__name__}.{name} must be a {spec.__name__}, got {type(value).__name__}")
            continue
        try:
            inspect.signature(value).bind(*spec)
        except TypeError:
            raise TypeError(f"{module.__name__}.{name} takes {inspect.signature(value)} but the protocol calls "
                            f"{name}({', '.join(spec)})") from None


def modules():
    """Every module of the axes and of every method, once each, in registry order."""
    return list(dict.fromkeys([*AXES, *(m for method in METHODS.values() for m in method.modules)]))


def check_registry():
    """check_module for every registered module; train.py and sample.py call it as they build their parsers."""
    for module in modules():
        check_module(module)


def checked_parser(description):
    """The argparse parser of a command that reads the registry (train.py, sample.py), made after
    check_registry: a misspelt hook is refused in one sentence before any flag is read."""
    try:
        check_registry()
    except TypeError as e:
        raise SystemExit(f"error: {e}") from None
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def hook(method, name):
    """The method's hook `name`: from the first of its modules that defines it, else the default (or None)."""
    if name not in dict(HOOKS) or name in COLLECTED:
        raise KeyError(f"{name} is not a first-found hook of the protocol")
    for module in METHODS[method].modules:
        if name in vars(module):
            return vars(module)[name]
    return DEFAULTS.get(name)


def collected(method, name):
    """Hook `name` of the axes and of every module of the method (or of all methods: method None), in order."""
    mods = modules() if method is None else [*AXES, *METHODS[method].modules]
    return [vars(m)[name] for m in dict.fromkeys(mods) if name in vars(m)]


def add_args(parser):
    """Every axis' and method's train.py flags."""
    for fn in collected(None, "add_args"):
        fn(parser)


def add_sample_args(parser):
    """Every method's sample.py flags."""
    for fn in collected(None, "add_sample_args"):
        fn(parser)


def check_config(cfg):
    for fn in collected(cfg["method"], "check_config"):
        fn(cfg)


def resume_keys(cfg):
    """The config keys a resumed run must keep beyond the shape: the axes' and the method's."""
    return tuple(k for fn in collected(cfg["method"], "resume_keys") for k in fn(cfg))


def module_flags(module):
    """The dest names of the train.py flags a module adds (none without add_args)."""
    if "add_args" not in vars(module):
        return set()
    parser = argparse.ArgumentParser(add_help=False)
    vars(module)["add_args"](parser)
    return {a.dest for a in parser._actions}


def unread_flags(cfg):
    """{dest: why} for the train.py flags that cfg's run does not read: those of modules its method lacks
    (--task under --method ddpm), and those its own modules' unused_flags name (--dtr-alpha without routing)."""
    own = [*AXES, *METHODS[cfg["method"]].modules]
    unread = {}
    for module in modules():
        if module not in own:
            users = [name for name, m in METHODS.items() if module in m.modules]
            for dest in module_flags(module):
                unread[dest] = (f"is a flag of --method {' / '.join(users)}, which this run's --method "
                                f"{cfg['method']} does not read; drop it or pass --method {users[0]}")
    for fn in collected(cfg["method"], "unused_flags"):
        unread.update(fn(cfg))
    return unread


def sample_modes():
    """{sample.py mode: the module whose run_sample_mode implements it}."""
    return {mode: m for m in modules() for mode in vars(m).get("SAMPLE_MODES", ())}


def loss_weight(sched, t, cfg):
    """batch["weight"]: the --weighting loss weight of timesteps t (B,), float64; None for --weighting none."""
    return minsnr.config_weight(sched, t, cfg)


def build_model(cfg):
    """The network of a config: the method's build_model (default: the backbone), then cfg's routing."""
    return dtr.route(hook(cfg["method"], "build_model")(cfg), cfg)


def load_run(path, ema=True, device="cpu"):
    """(model, config, schedule) from a checkpoint or run folder of any method; EMA weights by default."""
    return runlib.load_run(path, build_model, ema, device, METHODS)
