"""
JointNet's command line (its train.py flags, their checks, the config taken from --init), its samplers
and sample.py modes, the held-out RGB loss and the demo; the model and the loss are in jointnet.py.

    python sample.py --ckpt runs/jn --mode jn-rgb2dense  # or jn-joint, jn-dense2rgb, jn-inpaint, jn-sdedit, jn-tiles
    python jointnet_eval.py                              # output preservation and the joint / base sampling time
    python sample.py --ckpt runs/jn --mode jn-speed      # the same timing for a trained run

Its hooks of the method protocol (methods.py): add_args, prepare_config, unused_flags, resume_keys,
RESUME_HINTS, log_values (the held-out RGB loss, the Fig. 8 proxy), sample_rows, the sampling modes.
Imports: jointnet.py, the base (diffusion.py, unet.py, runlib.py) and metrics.py.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import diffusion
import metrics
import runlib
from diffusion import ddim_step, q_sample, split_prediction, timestep_subset
from jointnet import DENSE_CHANNELS, JointNet, dense_map, joint_loss
from unet import build_unet

# -----------------------------------------------------------------------------
# Samplers: joint, inpainting (Sec. 4.1), SDEdit, tiles (Sec. 4.2)

def _randn(like, generator):
    return torch.randn(like.shape, generator=generator, device=like.device)


def _ddim_update(model_fn, sched, z, t, t_prev, target):
    x0, eps = split_prediction(sched, z, t, model_fn(z, t), target, clip=True)
    return ddim_step(sched, z, t, t_prev, x0, eps, 0.0, torch.zeros_like(z))


@torch.no_grad()
def joint_ddim(model_fn, sched, z, ts, target="eps", known=None, mask=None, eta=0.0, generator=None):
    """DDIM from z (at timestep ts[0]) down the descending original indices ts; model_fn(z, t) -> output.

    Inpainting by replacement (Sec. 4.1): where `mask` is True, z is replaced by the known part noised to
    the step's level, sqrt(ab_t) known + sqrt(1 - ab_t) eps_known, before every step and by `known` itself
    at the end, so the known part returns unchanged. eps_known is drawn once and kept for every step, as
    in the authors' inpainting pipeline (a fresh draw per step would make the known channels jump between
    unrelated noisy versions of themselves). A channel mask gives depth -> RGB or RGB -> depth; a spatial
    mask inpaints both modalities.
    """
    ts = list(ts)
    eps_known = None if known is None else _randn(known, generator)           # one noise for all steps
    for i, i_prev in zip(ts, ts[1:] + [-1]):
        t = torch.full((z.shape[0],), i, device=z.device, dtype=torch.long)
        if known is not None:
            z = torch.where(mask, q_sample(sched, known, t, eps_known), z)    # (B, C, H, W)
        x0, eps = split_prediction(sched, z, t, model_fn(z, t), target, clip=True)
        noise = _randn(z, generator) if eta > 0 else torch.zeros_like(z)
        z = ddim_step(sched, z, t, torch.full_like(t, i_prev), x0, eps, eta, noise)
    return z if known is None else torch.where(mask, known, z)


def tile_starts(L, s, stride, offset=0):
    """Tile starts along an axis of length L: the grid offset + k stride clamped into [0, L - s], plus both
    ends. Neighbours are at most stride <= s apart, so every pixel is covered. The tiles at 0 and L - s
    are always there; only the interior grid moves with the offset."""
    if L <= s:
        return [0]
    return sorted({0, L - s, *(min(p, L - s) for p in range(offset, L - s + stride, stride))})


def tile_layout(H, W, s, stride, offset=(0, 0)):
    """(top, left) of every s x s tile of an H x W canvas."""
    return [(a, b) for a in tile_starts(H, s, stride, offset[0]) for b in tile_starts(W, s, stride, offset[1])]


def tile_ramp(s):
    """Aggregation weight of a tile's pixels (s, s): linear in each axis, 1/s at the edge pixels, 0 at the
    tile's outer border (Sec. 4.2's boundary decay; never 0 on a pixel, so edge pixels stay covered)."""
    r = 1 - (2 * torch.arange(s) + 1 - s).abs() / s                          # (s,)
    return r[:, None] * r[None, :]


@torch.no_grad()
def tiled_ddim(model_fn, sched, shape, tile, stride, steps=50, target="eps", whole_weight=5.0, whole_frac=0.4,
               generator=None, device="cpu", x_T=None):
    """Sec. 4.2: DDIM on a canvas larger than the training size (MultiDiffusion-style averaging).

    Each step every tile takes its own DDIM step and the canvas becomes the tile_ramp-weighted mean of
    the results. Each step draws one random offset in [0, stride) per axis that shifts the interior tile
    grid (tile_starts); the tiles at the canvas edges (0 and L - tile) stay where they are. In the first
    whole_frac of the steps the whole canvas (the convolutional net run on all of it) joins as one more
    tile of constant weight.

    Where this differs from the authors' panorama pipeline: there the weight of a tile is a trapezoid
    along x only (a linear ramp over 8 latent pixels at the left and right edges, flat in between and
    in y), and the random offset is a horizontal shift of the tile grid with circular padding (tiles
    wrap around the right edge of the panorama).
    Here the weight is a tent over the whole tile in both axes (tile_ramp) and the canvas does not wrap,
    which suits canvases that grow in either direction and have no left-right continuity; a pointwise
    model gives the same result either way (the weights only decide how overlapping predictions mix).
    """
    B, C, H, W = shape
    if not (1 <= stride <= tile <= min(H, W)):
        raise ValueError(f"tiles need 1 <= stride ({stride}) <= tile ({tile}) <= canvas side ({min(H, W)})")
    z = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ramp = tile_ramp(tile).to(device)
    ts = timestep_subset(sched.T, steps).tolist()
    for k, (i, i_prev) in enumerate(zip(ts, ts[1:] + [-1])):
        t = torch.full((B,), i, device=device, dtype=torch.long)
        t_prev = torch.full_like(t, i_prev)
        offset = torch.randint(stride, (2,), generator=generator, device=device).tolist()
        num, den = torch.zeros_like(z), z.new_zeros(1, 1, H, W)
        for a, b in tile_layout(H, W, tile, stride, offset):
            crop = z[..., a:a + tile, b:b + tile]                             # (B, C, tile, tile)
            num[..., a:a + tile, b:b + tile] += ramp * _ddim_update(model_fn, sched, crop, t, t_prev, target)
            den[..., a:a + tile, b:b + tile] += ramp
        if k < whole_frac * len(ts):
            num += whole_weight * _ddim_update(model_fn, sched, z, t, t_prev, target)
            den += whole_weight
        z = num / den                                                          # (B, C, H, W)
    return z


@torch.no_grad()
def sample_joint(model, sched, cfg, n, steps=50, batch=64, eta=0.0, cfg_scale=1.0, labels=None, generator=None,
                 device="cpu"):
    """n joint samples -> (rgb (n, C_x, S, S), dense (n, C_d, S, S)) in [-1, 1]; labels cycle through the
    classes unless given. bench.py compares the RGB half with the base model's samples (Frechet distance)."""
    c_x, nc, S = cfg["in_channels"], cfg["num_classes"], cfg["image_size"]
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        y = (labels[i:i + b] if labels is not None else torch.arange(i, i + b) % nc) if nc else None
        fn = diffusion.cfg_model(model, None if y is None else y.to(device), cfg_scale, nc)
        shape = (b, c_x + cfg["dense_channels"], S, S)
        out.append(diffusion.ddim_sample(fn, sched, shape, steps, eta, cfg["target"], generator=generator,
                                         device=device).cpu())
    z = torch.cat(out)                                                         # (n, C_x + C_d, S, S)
    return z[:, :c_x], z[:, c_x:]



# -----------------------------------------------------------------------------
# The method's command line: its train.py flags, their checks and the config they resolve (hooks)

# Stage 1 and 2 train different weight sets, so their optimiser states do not fit each other: a resume
# keeps the stage, and stage 2 starts from a stage-1 checkpoint through --init with a fresh optimiser.
RESUME_HINTS = {"unfreeze": "start stage 2 as a new run instead: --method jointnet --init RUN/checkpoint.pt "
                            "--unfreeze --out NEW_DIR"}

def add_args(parser):
    g = parser.add_argument_group("jointnet and direct_extend (--init: the pretrained RGB run, or a JointNet "
                                  "stage-1 run with --unfreeze)")
    g.add_argument("--unfreeze", action="store_true",
                   help="stage 2: train all weights (lr 1e-5, label drop 0.5 unless given)")
    g.add_argument("--dense-modality", choices=list(DENSE_CHANNELS), default="depth")
    g.add_argument("--rgb-heldout", type=runlib.ranged(int, 0), default=16, help="held-out images for the logged RGB loss (0: off)")
    g.add_argument("--heldout-data", help="folder or .npz of held-out items for that loss (default: the shapes "
                   "test split; with --data FOLDER/.npz and no --heldout-data, the training items themselves)")


INHERITED = ("arch", "model", "target", "schedule", "T", "routing", "dtr_alpha", "dtr_beta", "dtr_placement")  # from --init
DATA_KEYS = ("image_size", "in_channels", "num_classes")  # must agree between --init and this run's data


def prepare_config(cfg):
    """Take the backbone, schedule and target from the --init run; check it against this run's data."""
    RunError, m = runlib.RunError, cfg["method"]
    if not cfg.get("init"):
        raise RunError(f"--method {m} extends a trained RGB model: pass --init RGB_RUN/checkpoint.pt")
    base = runlib.load_checkpoint(cfg["init"])["config"]
    if base["arch"] != "unet" or cfg["arch"] != "unet":  # cfg["arch"] is dit only when asked for
        raise RunError(f"--method {m} is implemented on the UNet only (it needs unet.py's encode/decode taps); "
                       "drop --arch dit and --init a UNet run")
    stage2 = base["method"] == "jointnet"
    if base["method"] in ("mtdiff", "direct_extend") or (stage2 and not (m == "jointnet" and cfg["unfreeze"])):
        raise RunError(f"--init {cfg['init']} is a {base['method']} run; --method {m} needs a plain RGB run "
                       "(or a jointnet run together with --method jointnet --unfreeze)")
    if m == "direct_extend" and cfg["unfreeze"]:
        raise RunError("--unfreeze is JointNet's stage 2; direct_extend trains all weights already, drop it")
    if cfg["unfreeze"] and not stage2:  # all weights from step 0 would skip stage 1 (Sec. 3.4)
        raise RunError(f"--unfreeze starts stage 2 from a JointNet stage-1 run, but --init {cfg['init']} is a plain "
                       "RGB run; train stage 1 first (drop --unfreeze), then --init its checkpoint with --unfreeze")
    for k in INHERITED:  # .get: runs saved before a key existed used its default (None)
        if k in cfg["explicit"] and cfg[k] != base.get(k):
            raise RunError(f"--init was trained with {k}={base.get(k)!r} but this run asks for {cfg[k]!r}; "
                           f"drop the flag or use a matching --init")
        cfg[k] = base.get(k)
    for k in DATA_KEYS:
        if cfg[k] != base[k]:
            raise RunError(f"--init was trained with {k}={base[k]} but this run's data gives {k}={cfg[k]}; "
                           f"pass the matching --image-size / --class-cond / --data, or another --init")
    if stage2 and cfg["dense_modality"] != base["dense_modality"]:
        raise RunError(f"--init models {base['dense_modality']}; pass --dense-modality {base['dense_modality']}")
    if cfg["routing"] == "random":
        raise RunError("--init uses random routing, whose masks the dense copy would not share; use dtr or none")
    cfg["dense_channels"] = DENSE_CHANNELS[cfg["dense_modality"]]
    if cfg.get("heldout_data"):
        try:
            item = runlib.held_out_items(cfg, 1, source=cfg["heldout_data"])
        except (OSError, ValueError) as e:
            raise RunError(f"--heldout-data: {e}") from None
        has_dense, channels = cfg["dense_modality"] in item, item["image"].shape[1]
        if not has_dense or channels != cfg["in_channels"]:
            raise RunError(f"--heldout-data {cfg['heldout_data']} must hold {cfg['in_channels']}-channel images "
                           f"with {cfg['dense_modality']} like the training data; it has {channels} channels"
                           f"{'' if has_dense else ' and no ' + cfg['dense_modality']}")
    elif cfg["rgb_heldout"] and cfg["data"] != "shapes":
        print(f"note: {cfg['data']} has no held-out split, so the logged rgb_heldout loss uses training items "
              "(it shows fitting, not forgetting); pass --heldout-data HELD_OUT_FOLDER_OR_NPZ")
    if cfg["unfreeze"]:  # stage 2 (Sec. 3.4): lr 1e-5, condition drop raised to 50%
        cfg["lr"] = cfg["lr"] if "lr" in cfg["explicit"] else 1e-5
        cfg["cfg_drop"] = cfg["cfg_drop"] if "cfg_drop" in cfg["explicit"] else 0.5


def unused_flags(cfg):
    """--heldout-data feeds the logged held-out RGB loss, which --rgb-heldout 0 turns off."""
    if cfg.get("rgb_heldout"):
        return {}
    return {"heldout_data": "feeds the held-out RGB loss, which --rgb-heldout 0 turns off; drop one of them"}


def resume_keys(cfg):
    """The training stage: stage 2 (--unfreeze) is a new run from a stage-1 checkpoint, not a resume."""
    return ("unfreeze",)


SAMPLE_MODES = ("jn-joint", "jn-rgb2dense", "jn-dense2rgb", "jn-inpaint", "jn-sdedit", "jn-tiles", "jn-speed")


def add_sample_args(parser):
    g = parser.add_argument_group("jointnet modes")
    g.add_argument("--jn-strength", type=runlib.finite_float, default=0.4, help="jn-sdedit: noise level t0 / T")
    g.add_argument("--jn-lowres", type=int, default=4, help="jn-sdedit: downsampling of the depth to refine")
    # ranged: 0 would otherwise read as "not given" and silently become the default
    g.add_argument("--jn-width", type=runlib.ranged(int, 1),
                   help="jn-tiles: canvas width (default 3x the training size)")
    g.add_argument("--jn-stride", type=runlib.ranged(int, 1),
                   help="jn-tiles: tile stride (default half the training size)")


def sample_tiles(model, sched, cfg, args, out, g, device):
    """jn-tiles: one canvas of --jn-width (default 3x the training size) -> OUT_rgb.png and OUT_dense.png."""
    S, c_x = cfg["image_size"], cfg["in_channels"]
    width, stride, y = args.jn_width or 3 * S, args.jn_stride or S // 2, runlib.labels_for(args, cfg, 1)
    fn = diffusion.cfg_model(model, None if y is None else y.to(device), args.cfg_scale, cfg["num_classes"])
    z = tiled_ddim(fn, sched, (1, c_x + cfg["dense_channels"], S, width), S, stride, args.steps or 50,
                   cfg["target"], generator=g, device=device).cpu()                 # (1, C_x + C_d, S, width)
    runlib.save_grid([z[:, :c_x]], out + "_rgb.png", ncol=1)
    runlib.save_grid([z[:, c_x:]], out + "_dense.png", ncol=1)
    print(f"wrote a {S}x{width} RGB canvas to {out}_rgb.png and its {cfg['dense_modality']} to {out}_dense.png")


def sample_conditional(mode, model, sched, cfg, args, g, device):
    """The inpainting modes and SDEdit on held-out items -> (samples (n, C_x + C_d, S, S), grid rows)."""
    b, c_x, S, steps = runlib.held_out_items(cfg, args.n, source=cfg.get("heldout_data")), cfg["in_channels"], cfg["image_size"], args.steps or 50
    x0, d0 = b["image"].to(device), dense_map(b, cfg["dense_modality"]).to(device)
    z0 = torch.cat([x0, d0], 1)                                               # (n, C_x + C_d, S, S)
    fn = diffusion.cfg_model(model, b["label"].to(device) if cfg["num_classes"] else None, args.cfg_scale,
                             cfg["num_classes"])
    known = torch.zeros_like(z0, dtype=torch.bool)
    known[:, :c_x] = mode in ("jn-rgb2dense", "jn-sdedit")                   # RGB given
    known[:, c_x:] = mode == "jn-dense2rgb"                                   # dense map given
    if mode == "jn-inpaint":                                                  # both known outside a centre square
        known[...] = True
        known[..., S // 4:3 * S // 4, S // 4:3 * S // 4] = False
    estimates = {}
    if mode == "jn-sdedit":  # refine a nearest-upsampled low-resolution map
        f = args.jn_lowres
        if f < 1 or S % f:
            raise ValueError(f"--jn-lowres {f} must be a positive divisor of the image size {S}")
        estimates["low-res input"] = F.interpolate(F.avg_pool2d(d0, f), scale_factor=f, mode="nearest")
        if not 0 < args.jn_strength <= 1:
            raise ValueError(f"--jn-strength must be in (0, 1], got {args.jn_strength}")
        z = diffusion.sdedit(fn, sched, torch.cat([x0, estimates["low-res input"]], 1),
                             round(args.jn_strength * (sched.T - 1)), steps, cfg["target"], known=known, generator=g)
        rows = [x0, estimates["low-res input"], z[:, c_x:], d0]
    else:
        z = joint_ddim(fn, sched, torch.randn(z0.shape, generator=g, device=device),
                       timestep_subset(sched.T, steps).tolist(), cfg["target"], z0, known, args.eta, g)
        hole = torch.where(known, z0, torch.zeros_like(z0))
        rows = {"jn-rgb2dense": [x0, z[:, c_x:], d0], "jn-dense2rgb": [d0, z[:, :c_x], x0]}.get(
            mode, [hole[:, :c_x], z[:, :c_x], hole[:, c_x:], z[:, c_x:]])   # given, generated, ground truth
    if cfg["dense_modality"] == "depth" and mode in ("jn-rgb2dense", "jn-sdedit"):
        for name, d_hat in {**estimates, "JointNet": z[:, c_x:]}.items():
            m = metrics.depth_metrics(d_hat.cpu(), d0.cpu())
            print(f"{mode} {name}: AbsRel {m['abs_rel']:.4f}, RMSE (disparity) {m['rmse']:.4f} "
                  f"on {len(d0)} held-out images")
    return z, rows


def run_sample_mode(mode, model, sched, cfg, args, out, device):
    """Write OUT.png and OUT.npz for one of SAMPLE_MODES (jn-tiles: two PNGs); print depth metrics."""
    if cfg["method"] not in ("jointnet", "direct_extend"):
        raise ValueError(f"--mode {mode} needs a jointnet or direct_extend run, not a {cfg['method']} run")
    g = torch.Generator(device).manual_seed(args.seed)
    if mode == "jn-speed":
        if not isinstance(model, JointNet):
            raise ValueError(f"--mode jn-speed compares JointNet's two branches with its base; {cfg['method']} has one")
        return speed_report(model, sched, cfg, args.batch, args.steps or 20, 3)
    if mode == "jn-tiles":
        return sample_tiles(model, sched, cfg, args, out, g, device)
    if mode == "jn-joint":
        rgb, d = sample_joint(model, sched, cfg, args.n, args.steps or 50, args.batch, args.eta, args.cfg_scale,
                              None, g, device)
        rows = [rgb, d]
    else:
        z, rows = sample_conditional(mode, model, sched, cfg, args, g, device)
        rgb, d = z[:, :cfg["in_channels"]], z[:, cfg["in_channels"]:]
    runlib.save_grid(rows, out + ".png")
    np.savez(out + ".npz", arr_0=runlib.to_uint8(rgb), dense=runlib.to_uint8(d))  # arr_0: as sample.py's
    print(f"wrote {len(rgb)} {mode} samples to {out}.npz and a grid to {out}.png")


def sample_rows(model, sched, cfg, n, generator, device):
    return list(sample_joint(model, sched, cfg, n, cfg["sample_steps"], generator=generator, device=device))


# -----------------------------------------------------------------------------
# The held-out RGB loss: a quantitative proxy for Fig. 8 (log_values, a hook of methods.py)

_HELDOUT = {}


def rgb_heldout_batch(cfg, device):
    """cfg["rgb_heldout"] test items with fixed t (spread over [0, T)) and fixed noise, built once."""
    key = tuple(cfg.get(k) for k in ("data", "heldout_data", "image_size", "seed", "rgb_heldout", "T", "dense_modality")) + (str(device),)
    if key not in _HELDOUT:
        b = runlib.held_out_items(cfg, cfg["rgb_heldout"], source=cfg.get("heldout_data"))
        x0, d0, g = b["image"], dense_map(b, cfg["dense_modality"]), torch.Generator().manual_seed(0)
        _HELDOUT[key] = {k: v.to(device) for k, v in dict(
            x0=x0, d0=d0, y=b["label"], t=torch.linspace(0, cfg["T"] - 1, len(x0)).round().long(),
            eps_x=torch.randn(x0.shape, generator=g), eps_d=torch.randn(d0.shape, generator=g)).items()}
    return _HELDOUT[key]


@torch.no_grad()
def rgb_heldout_loss(model, sched, cfg):
    """The RGB term of Eq. 1 on the fixed held-out batch, in eval mode: a number for what Fig. 8 shows as
    a grid of validation samples (whether the RGB branch keeps its generation ability)."""
    b, was_training = rgb_heldout_batch(cfg, next(model.parameters()).device), model.training
    y = b["y"] if cfg["num_classes"] else None
    model.eval()
    value = joint_loss(model, sched, b["x0"], b["d0"], b["t"], b["eps_x"], b["eps_d"], y, cfg["target"])[1].mean()
    model.train(was_training)
    return value.item()


def log_values(model, sched, cfg):
    """rgb_heldout for log.jsonl (--rgb-heldout items; 0: off)."""
    return {"rgb_heldout": rgb_heldout_loss(model, sched, cfg)} if cfg["rgb_heldout"] else {}


# -----------------------------------------------------------------------------
# Output preservation and the sampling-time ratio

def speed_report(model, sched, cfg, B, steps, repeats):
    """Print FLOPs of one forward and DDIM sampling time of the joint model against its base branch."""
    base, S = model.base, cfg["image_size"]
    z, t = torch.randn(B, model.c_x + model.c_d, S, S), torch.randint(0, sched.T, (B,))
    y = torch.arange(B) % cfg["num_classes"] if cfg["num_classes"] else None
    flops = []
    for net, inp in ((base, z[:, :model.c_x]), (model, z)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(inp, t, y)
        flops.append(counter.get_total_flops())
    print(f"FLOPs of one forward: joint / base = {flops[1] / flops[0]:.3f}")

    def sample_time(net, c):
        t0 = time.perf_counter()
        diffusion.ddim_sample(lambda x, t: net(x, t, y), sched, (B, c, S, S), steps)
        return time.perf_counter() - t0
    # Interleaved repeats, best of each: a busy machine slows both alike.
    times = [(sample_time(base, model.c_x), sample_time(model, model.c_x + model.c_d)) for _ in range(repeats)]
    t_base, t_joint = min(t[0] for t in times), min(t[1] for t in times)
    print(f"DDIM-{steps}, batch {B}, {S}px, {torch.get_num_threads()} threads: base {t_base:.3f} s, "
          f"joint {t_joint:.3f} s, ratio {t_joint / t_base:.2f}x (two branches: about 2x)")


def main(argv=None):
    p = argparse.ArgumentParser(description="JointNet output preservation and joint / base sampling time on a "
                                "randomly perturbed unet-cpu; for a trained run: sample.py --ckpt RUN --mode jn-speed")
    p.add_argument("--batch", type=runlib.ranged(int, 1), default=16)
    p.add_argument("--steps", type=runlib.ranged(int, 1, 1000), default=20)
    p.add_argument("--repeats", type=runlib.ranged(int, 1), default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = dict(image_size=32, num_classes=4, in_channels=3, dense_channels=1, target="eps")
    base = build_unet("unet-cpu", 3, num_classes=4)
    with torch.no_grad():  # a stand-in for pretrained weights: every zero-initialised layer moved off zero
        for p_ in base.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
    model, sched, B, S = JointNet(base, 1).eval(), diffusion.Schedule.make("linear"), args.batch, cfg["image_size"]
    z, t, y = torch.randn(B, 4, S, S), torch.randint(0, sched.T, (B,)), torch.arange(B) % 4
    with torch.no_grad():
        same = torch.equal(model(z, t, y)[:, :model.c_x], base(z[:, :model.c_x], t, y))
    print(f"at initialisation the RGB output equals the base model's bit for bit: {same}")
    speed_report(model, sched, cfg, B, args.steps, args.repeats)


if __name__ == "__main__":
    main()
