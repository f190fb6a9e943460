"""
The method registry and the protocol by which a paper file plugs into train.py and sample.py.

`--method NAME` looks NAME up in METHODS: a preset over the loop's independent axes (routing, loss
weighting, prediction target; explicit flags win) and the modules that implement the method's hooks.
A method without modules is the plain diffusion loss (diffusion.py) with the preset's weighting
(minsnr.py) and routing (dtr.py): ddpm, minsnr, dtr, rtr, dtr_minsnr.

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
Every hook is optional: `hook(method, name)` returns the first module of the method that defines it,
else the default below (or None where there is none). Config keys are the flags' dest names; cfg also
holds in_channels and num_classes (from the data), arch, and everything prepare_config adds.

add_args(parser)
    Adds the method's train.py flags (an argparse group). Called for every registered module when the
    parser is built, so flag names must be unique across methods; default None for "not given".
prepare_config(cfg)
    Edits cfg in place for a NEW run, after the data are described, before the image size is checked
    and the model is built (e.g. JointNet takes its backbone from --init). Skipped on resume: the saved
    config already holds its result. Bad input: raise runlib.RunError (one sentence, no traceback).
build_model(cfg) -> nn.Module
    The network, from cfg alone (also called by load_run for sample.py and bench.py). torch's global
    generator is seeded with --seed before the call. Default: runlib.build_backbone. The registry then
    applies cfg's routing to model.routable_blocks() (dtr.route), so a model with routing must have them.
init_model(model, cfg)
    Loads pretrained weights into a NEW run's model (e.g. JointNet from --init). Skipped on resume. The
    EMA is copied from the model afterwards.
training_loss(model, batch, sched, cfg, rng) -> (loss, stats)
    batch holds this rank's rows, on the device: "image" (B, C, H, W) in [-1, 1], "label" (B,) long, any
    other key of the dataset ("depth" (B, 1, H, W), "seg" (B, H, W) on the shapes data), and the loop's
    draws "t" (B,) long, "noise" (B, C, H, W), "label_drop" (B,) bool (at --cfg-drop). rng is
    runlib.StepRandom: every further random number must come from it (drawn for the global batch,
    this rank's rows kept), so that N DDP ranks train exactly as one process. model is the raw module
    in train mode; the loop wraps the call for DDP and --compile, so it must not call collectives.
    loss: a scalar, averaged over this rank's rows (DDP then averages the ranks' gradients); a term
    averaged over a random subset of rows must divide by the subset's GLOBAL size times this rank's share
    of the batch (mtdiffusion.training_loss does). stats["mse"] (B,) is required: the per-sample loss
    behind log.jsonl's loss-by-timestep bins; every other stat is a scalar, averaged over a log window.
    Default: the diffusion loss for --target, weighted by minsnr.config_weight.
sample_rows(model, sched, cfg, n, generator, device) -> [tensor (n', C, H, W) in [-1, 1], ...]
    Rows of the sample grid train.py writes every --sample-every steps (master only, EMA, eval mode).
    Default: n DDIM samples, classes cycling across columns.
log_values(model, sched, cfg) -> {name: float}
    Extra numbers for log.jsonl (e.g. JointNet's held-out RGB loss). Called on the master process only
    (the values are of the shared weights, so every rank would measure the same), with the raw model,
    at the start of every log window, before its first update; the values are written with that
    window's record. Must leave the model's train/eval mode as it found it.
SHAPE_KEYS
    Config keys beyond train.ARCH_KEYS that change the network: --resume refuses to change them.
RESUME_KEYS, RESUME_HINTS
    Config keys that change no shape but the experiment (e.g. JointNet's training stage): --resume
    refuses to change them too; RESUME_HINTS {key: what to do instead} ends the refusal's sentence.
SAMPLE_MODES, add_sample_args(parser), run_sample_mode(mode, model, sched, cfg, args, out, device)
    sample.py --mode choices of the method; the first is what the default mode `generate` means for
    it. run_sample_mode writes OUT.png (and more); bad input: raise ValueError or runlib.RunError.
"""
import torch

import dtr
import jointnet
import jointnet_eval
import minsnr
import mtdiffusion
import mtdiffusion_eval
import runlib
from diffusion import cfg_model, ddim_sample, diffusion_loss


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
    """Diffusion loss for the ddpm family: --target, weighted by --weighting (minsnr.py)."""
    w = minsnr.config_weight(sched, batch["t"], cfg)
    # Labels drop to the null class where the loop drew label_drop (classifier-free guidance training).
    kw = dict(y=batch["label"], force_drop_ids=batch["label_drop"]) if cfg["num_classes"] else {}
    loss, mse = diffusion_loss(model, sched, batch["image"], batch["t"], cfg["target"], w, batch["noise"], kw)
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


DEFAULTS = dict(build_model=runlib.build_backbone, training_loss=diffusion_training_loss,
                sample_rows=diffusion_sample_rows, SHAPE_KEYS=(), RESUME_KEYS=(), RESUME_HINTS={}, SAMPLE_MODES=())


def hook(method, name):
    """The method's hook `name`: from the first of its modules that defines it, else the default (or None)."""
    for module in METHODS[method].modules:
        if hasattr(module, name):
            return getattr(module, name)
    return DEFAULTS.get(name)


def modules():
    """Every module of every method, once each, in registry order."""
    return list(dict.fromkeys(m for method in METHODS.values() for m in method.modules))


def add_args(parser):
    """Every method's train.py flags."""
    for module in modules():
        if hasattr(module, "add_args"):
            module.add_args(parser)


def add_sample_args(parser):
    """Every method's sample.py flags."""
    for module in modules():
        if hasattr(module, "add_sample_args"):
            module.add_sample_args(parser)


def sample_modes():
    """{sample.py mode: the module whose run_sample_mode implements it}."""
    return {mode: m for m in modules() for mode in getattr(m, "SAMPLE_MODES", ())}


def build_model(cfg):
    """The network of a config: the method's build_model (default: the backbone), then cfg's routing."""
    return dtr.route(hook(cfg["method"], "build_model")(cfg), cfg)


def load_run(path, ema=True, device="cpu"):
    """(model, config, schedule) from a checkpoint or run folder of any method; EMA weights by default."""
    return runlib.load_run(path, build_model, ema, device)
