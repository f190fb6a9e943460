"""
JointNet's sample.py modes and its demo; the model, the loss and the samplers are in jointnet.py.

    python sample.py --ckpt runs/jn --mode jn-rgb2dense  # or jn-joint, jn-dense2rgb, jn-inpaint, jn-sdedit, jn-tiles
    python jointnet_eval.py                              # output preservation and the joint / base sampling time
    python jointnet_eval.py --ckpt runs/jn/checkpoint.pt # the same timing for a trained run
"""
import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import diffusion
import dtr
import metrics
import runlib
from diffusion import timestep_subset
from jointnet import JointNet, build_model, dense_map, joint_ddim, sample_joint, sdedit, tiled_ddim
from unet import build_unet

SAMPLE_MODES = ("jn-joint", "jn-rgb2dense", "jn-dense2rgb", "jn-inpaint", "jn-sdedit", "jn-tiles")


def add_sample_args(parser):
    g = parser.add_argument_group("jointnet modes")
    g.add_argument("--jn-strength", type=runlib.finite_float, default=0.4, help="jn-sdedit: noise level t0 / T")
    g.add_argument("--jn-lowres", type=int, default=4, help="jn-sdedit: downsampling of the depth to refine")
    g.add_argument("--jn-width", type=int, help="jn-tiles: canvas width (default 3x the training size)")
    g.add_argument("--jn-stride", type=int, help="jn-tiles: tile stride (default half the training size)")


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
        z = sdedit(fn, sched, torch.cat([x0, estimates["low-res input"]], 1), steps, args.jn_strength,
                   cfg["target"], known, g)
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
    np.savez(out + ".npz", images=runlib.to_uint8(rgb), dense=runlib.to_uint8(d))
    print(f"wrote {len(rgb)} {mode} samples to {out}.npz and a grid to {out}.png")


# -----------------------------------------------------------------------------
# Demo: output preservation and the sampling-time ratio

def main(argv=None):
    p = argparse.ArgumentParser(description="JointNet output preservation and joint / base sampling time.")
    p.add_argument("--ckpt", help="a trained jointnet run (default: a randomly perturbed unet-cpu)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.ckpt:
        model, cfg, sched = runlib.load_run(args.ckpt, lambda c: dtr.route(build_model(c), c))
        if not isinstance(model, JointNet):
            sys.exit(f"error: {args.ckpt} is a {cfg['method']} run; pass a jointnet run")
    else:
        cfg = dict(image_size=32, num_classes=4, in_channels=3, dense_channels=1, target="eps")
        base = build_unet("unet-cpu", 3, num_classes=4)
        with torch.no_grad():  # a stand-in for pretrained weights: every zero-initialised layer moved off zero
            for p_ in base.parameters():
                p_.add_(0.05 * torch.randn_like(p_))
        model, sched = JointNet(base, 1).eval(), diffusion.Schedule.make("linear")
    base, S, B = model.base, cfg["image_size"], args.batch
    z, t = torch.randn(B, model.c_x + model.c_d, S, S), torch.randint(0, sched.T, (B,))
    y = torch.arange(B) % cfg["num_classes"] if cfg["num_classes"] else None
    if not args.ckpt:
        with torch.no_grad():
            same = torch.equal(model(z, t, y)[:, :model.c_x], base(z[:, :model.c_x], t, y))
        print(f"at initialisation the RGB output equals the base model's bit for bit: {same}")

    flops = []
    for net, inp in ((base, z[:, :model.c_x]), (model, z)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(inp, t, y)
        flops.append(counter.get_total_flops())
    print(f"FLOPs of one forward: joint / base = {flops[1] / flops[0]:.3f}")

    def sample_time(net, c):
        t0 = time.perf_counter()
        diffusion.ddim_sample(lambda x, t: net(x, t, y), sched, (B, c, S, S), args.steps)
        return time.perf_counter() - t0
    # Interleaved repeats, best of each: a busy machine slows both alike.
    times = [(sample_time(base, model.c_x), sample_time(model, model.c_x + model.c_d)) for _ in range(args.repeats)]
    t_base, t_joint = min(t[0] for t in times), min(t[1] for t in times)
    print(f"DDIM-{args.steps}, batch {B}, {S}px, {torch.get_num_threads()} threads: base {t_base:.3f} s, "
          f"joint {t_joint:.3f} s, ratio {t_joint / t_base:.2f}x (two branches: about 2x)")


if __name__ == "__main__":
    main()
