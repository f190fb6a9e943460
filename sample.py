"""
The one sampling CLI: load a checkpoint written by train.py and draw samples.

    python sample.py --ckpt runs/default/checkpoint.pt                       # 64 DDIM-50 (eta 1) samples, EMA weights
    python sample.py --ckpt RUN/checkpoint.pt --sampler ddpm --steps 1000   # full ancestral DDPM
    python sample.py --ckpt RUN/checkpoint.pt --cfg-scale 3 --class 2       # classifier-free guidance
    torchrun --nproc_per_node=4 sample.py --ckpt RUN/checkpoint.pt --num-samples 50000  # one .npz

    python sample.py --ckpt RUN/checkpoint.pt --n 10000 --png-dir RUN/pngs  # also one PNG per sample

Writes OUT.png (a grid) and OUT.npz, the layout of the ADM evaluation suite and DiT's sampling script:
`arr_0`, uint8 (N, H, W, C) with C = 3, or 1 for a model trained on grayscale data, and `labels` (N,),
the class each sample was generated for, -1 for an unconditional model (a named key: the ADM evaluator
reads arr_0 only). `python metrics.py --samples OUT.npz` scores them; it also reads the older layout
(`images`). `--png-dir DIR` also writes DIR/000000.png, 000001.png, ... (gray PNGs for C = 1) for the
folder-based FID tools (clean-fid, pytorch-fid). Methods with their own sampling tasks
(MT-Diffusion restoration, JointNet inpainting and tiles) add `--mode` choices, implemented in their
evaluation files (mtdiffusion_eval.py, jointnet_eval.py) and found through the registry in methods.py.

Imports: the registry (methods.py) and the base (diffusion.py, runlib.py).
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import diffusion
import methods
import runlib
from runlib import RunError, checkpoint_path, finite_float, labels_for, ranged, save_grid, to_uint8


def autocast_forward(model, device_type):
    """model.forward under bf16 autocast, handing float32 back: the network runs at bf16 speed while the
    samplers' and metrics' math stays float32. Weights are untouched (checkpoints hold float32)."""
    forward = model.forward

    def bf16_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
    model.forward = bf16_forward
    return model


@torch.no_grad()
def generate(model, sched, cfg, args, n, offset, generator, device):
    """n samples in chunks of --batch; returns (images in [-1, 1], labels, -1 where unconditional)."""
    if n == 0:  # a rank whose share is empty (fewer samples than processes) still joins the gather
        shape = (0, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
        return torch.empty(shape), torch.empty(0, dtype=torch.long)
    out, labels = [], []
    for i in range(0, n, args.batch):
        b = min(args.batch, n - i)
        y = labels_for(args, cfg, b, offset + i)
        fn = diffusion.cfg_model(model, None if y is None else y.to(device), args.cfg_scale, cfg["num_classes"])
        shape = (b, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
        common = dict(target=cfg["target"], generator=generator, device=device, progress=args.progress)
        if args.sampler == "ddim":
            x = diffusion.ddim_sample(fn, sched, shape, args.steps or 50, args.eta, **common)
        else:
            x = diffusion.ddpm_sample(fn, sched, shape, args.steps, **common)
        out.append(x.cpu())
        labels.append(y if y is not None else torch.full((b,), -1, dtype=torch.long))  # -1: unconditional
    return torch.cat(out), torch.cat(labels)


def output_stem(out, ckpt, mode):
    """The path that sample.py adds .npz and .png to: RUN/samples/MODE by default; --out FOLDER (an existing
    folder, or one written with a trailing slash) means FOLDER/MODE; --out grid.png means the stem "grid"."""
    if not out:
        return os.path.join(os.path.dirname(os.path.abspath(ckpt)), "samples", mode)
    if os.path.isdir(out) or out.endswith((os.sep, "/")):
        return os.path.join(out, mode)
    if os.path.splitext(out)[1].lower() in (".png", ".npz"):
        return os.path.splitext(out)[0]
    return out


def check_png_dir(folder):
    """--png-dir must be new or empty: the FID tools read every image in it, so older files would be
    scored as samples."""
    if folder and os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ValueError(f"--png-dir {folder} already exists and is not an empty folder, and the FID tools would "
                         "score every image in it; choose a new or empty folder")


def write_pngs(images, folder):
    """uint8 (N, H, W, C) -> folder/000000.png, 000001.png, ...: RGB for C = 3, gray (mode L) for C = 1."""
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(os.path.join(folder, f"{i:06d}.png"))


def get_parser():
    p = methods.checked_parser(__doc__)
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint.pt written by train.py, or its run folder")
    a("--out", help="output path; .png and .npz are added; an existing folder (or one ending in /) gets "
      "FOLDER/MODE (default: RUN/samples/MODE)")
    a("--n", "--num-samples", dest="n", type=int, default=64, help="number of samples (under torchrun write --num-samples: torchrun reads --n as its own)")
    a("--batch", type=int, default=64, help="samples per forward pass")
    a("--sampler", choices=["ddim", "ddpm"], default="ddim")
    a("--steps", type=int, help="sampling steps (default: 50 for DDIM, all T for DDPM)")
    a("--eta", type=ranged(float, 0, 1), default=1.0, help="DDIM eta in [0, 1] (1: ancestral, the respaced DDPM "
      "step; 0: deterministic, which needs a longer-trained model)")
    a("--cfg-scale", type=finite_float, default=1.0, help="classifier-free guidance scale (1: off)")
    a("--class", dest="cls", type=int, help="class label for every sample (default: cycle through classes)")
    a("--seed", type=int, default=0)
    a("--raw", action="store_true", help="use the raw weights instead of the EMA")
    a("--precision", choices=["fp32", "bf16"], help="bf16: the network's forward under bf16 autocast (any checkpoint; "
      "weights stay float32); default bf16 on a GPU, fp32 on a CPU")
    a("--progress", action="store_true", help="show a progress bar per batch")
    a("--png-dir", help="also write one PNG per sample (000000.png, ...) into this new or empty folder, the input "
      "of clean-fid and pytorch-fid")
    methods.add_sample_args(p)
    a("--mode", choices=["generate", *methods.sample_modes()], default="generate",
      help="what to sample; methods add their own modes")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    for name, v in (("--n", args.n), ("--batch", args.batch)):
        if v < 1:
            sys.exit(f"error: {name} must be at least 1, got {v}")
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    path = checkpoint_path(args.ckpt)
    try:
        model, cfg, sched = methods.load_run(path, ema=not args.raw, device=device)
        runlib.check_finite_weights(model, path)
        if (args.precision or ("bf16" if device.startswith("cuda") else "fp32")) == "bf16":
            autocast_forward(model, device.split(":")[0])
        if args.steps is not None and not 1 <= args.steps <= cfg["T"]:
            raise ValueError(f"--steps must be in [1, {cfg['T']}], got {args.steps}")
        if args.cfg_scale != 1 and not cfg["num_classes"]:  # guidance mixes conditional and unconditional outputs
            raise ValueError(f"--cfg-scale {args.cfg_scale:g} needs a class-conditional model, but {path} was trained "
                             "without labels; drop --cfg-scale")
        if args.cls is not None and not cfg["num_classes"]:  # labels_for would ignore it
            raise ValueError(f"--class {args.cls} needs a class-conditional model, but {path} was trained without "
                             "labels; drop --class")
        if args.mode == "generate" and methods.hook(cfg["method"], "SAMPLE_MODES"):  # a method's joint sampler
            args.mode = methods.hook(cfg["method"], "SAMPLE_MODES")[0]
        out = output_stem(args.out, path, args.mode)
        runlib.check_output_path(out)  # before sampling: a failed write would throw the samples away
        if args.mode != "generate":
            if args.png_dir:
                raise ValueError(f"--png-dir writes the samples of plain generation, but --mode {args.mode} writes "
                                 "its own files; drop --png-dir")
            return methods.sample_modes()[args.mode].run_sample_mode(args.mode, model, sched, cfg, args, out, device)
        check_png_dir(args.png_dir)
        # Each rank draws its share with its own seed; rank 0 gathers and writes one file.
        share = [args.n // world + (r < args.n % world) for r in range(world)]
        g = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
        x, y = generate(model, sched, cfg, args, share[rank], sum(share[:rank]), g, device)
    except (RunError, ValueError) as e:
        sys.exit(f"error: {e}")
    if ddp:
        parts = [None] * world
        dist.all_gather_object(parts, (to_uint8(x), y.numpy()))
        dist.destroy_process_group()
        if rank:
            return
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        images, labels = to_uint8(x), y.numpy()
    np.savez(out + ".npz", arr_0=images, labels=labels)
    grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid([grid], out + ".png")
    print(f"wrote {len(images)} sample{'s' * (len(images) != 1)} to {out}.npz (arr_0, labels) and a grid to {out}.png")
    if args.png_dir:
        write_pngs(images, args.png_dir)
        print(f"wrote {len(images)} PNGs to {args.png_dir} (000000.png ...)")


if __name__ == "__main__":
    main()
