"""
DTR's analyses and figures: shared channels (App. B), CKA between timesteps (Fig. 6), the masks as a
picture (Fig. 2), and their command line. The masks and the routing itself are in dtr.py.

    python dtr_eval.py --channels 64 --out masks.png                 # Fig. 2: DTR and R-TR masks
    python dtr_eval.py --ckpt runs/dtr/checkpoint.pt --cka cka.png   # Fig. 6 for a trained run
    python dtr_eval.py --fresh --arch unet --cka cka.png             # the same on an untrained model

What is here:
    expected_shared_channels, shared_channels   App. B: random masks share n^2/C channels on average
                       for ANY two timesteps; DTR masks share fewer the further apart they are.
    linear_cka, block_features, cka_matrix      Fig. 6: CKA between a block's features at two timesteps.
    mask_image, masks_figure, cka_image         Fig. 2 and Fig. 6 as pictures, PIL only.

Imports: dtr.py, the base (diffusion.py, unet.py, dit.py, data.py, runlib.py) and the registry
(methods.load_run, to load a run of any method with its routing).

Differences from the paper: CKA treats every pixel (UNet) or token (DiT) of every image as one sample of
C channel values, on the small images the run was trained on; the paper does not say how it arranges
features.
"""
import argparse
import inspect

import torch
from PIL import Image, ImageDraw

import data
import methods
import runlib
from diffusion import Schedule, q_sample
from dit import build_dit
from dtr import ROUTINGS, apply_routing, check_mask_args, dtr_masks, num_active, random_masks
from unet import build_unet

# -----------------------------------------------------------------------------
# Shared channels (App. B) and CKA between timesteps (Fig. 6)

def expected_shared_channels(C, alpha=0.8):
    """E[#channels shared by two distinct timesteps] under R-TR masks, App. B Eq. 9.

    Fix the n channels of task t1. Task t2 draws n of C channels without replacement, so the number
    k it shares with t1 is hypergeometric, P(k) = binom(n, k) binom(C - n, n - k) / binom(C, n),
    with mean n * (n / C) = n^2 / C: the same for every pair, however close the two timesteps are.
    """
    check_mask_args(1, C, alpha)
    n = num_active(C, alpha)
    return n * n / C


def shared_channels(masks, t1, t2):
    """Number of channels active at both timesteps t1 and t2 in (T, C) masks."""
    return int((masks[t1] * masks[t2]).sum().item())


def linear_cka(X, Y):
    """Linear CKA (Kornblith et al. 2019) between (n, p) and (n, q) features of the same n inputs.

    With centred columns, CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). When n is smaller than the
    feature count the same value comes from the n x n Gram matrices: <X X^T, Y Y^T>_F / (|X X^T| |Y Y^T|).
    Returns nan when one of the two is constant over the inputs.
    """
    if X.shape[0] != Y.shape[0] or X.shape[0] < 2:
        raise ValueError(f"CKA needs the same n >= 2 inputs on both sides, got {X.shape[0]} and {Y.shape[0]}")
    X = X.reshape(X.shape[0], -1).double()
    Y = Y.reshape(Y.shape[0], -1).double()
    X, Y = X - X.mean(0), Y - Y.mean(0)                                       # centre every feature
    if X.shape[0] < max(X.shape[1], Y.shape[1]):
        K, L = X @ X.T, Y @ Y.T                                               # (n, n) each
        hsic, norm = (K * L).sum(), K.norm() * L.norm()
    else:
        hsic, norm = (Y.T @ X).pow(2).sum(), (X.T @ X).norm() * (Y.T @ Y).norm()
    return float(hsic / norm) if norm > 0 else float("nan")


def _rows(out, per_position):
    """A block output as a feature matrix: (N * positions, C) rows, or (N, everything) when not per_position."""
    if not per_position:
        return out.flatten(1)                                                 # (N, C * positions)
    if out.ndim == 4:                                                         # UNet: (N, C, H, W)
        out = out.movedim(1, -1)
    return out.reshape(-1, out.shape[-1])                                     # (N * positions, C)


@torch.no_grad()
def block_features(model, x0, timesteps, blocks, sched, y=None, noise=None, generator=None, per_position=True):
    """Outputs of chosen routable blocks for the batch x0 noised (with the same eps) at each timestep.

    blocks: indices into model.routable_blocks(). Returns {index: (len(timesteps), rows, features)}.
    per_position=True makes every pixel (UNet) or token (DiT) of every image one row of C channel
    values, the space the masks act on. Flattening whole maps instead gives few rows of very many
    features, where linear CKA is biased towards 1 even for unrelated features.
    """
    routable = model.routable_blocks()
    bad = [b for b in blocks if not 0 <= b < len(routable)]
    if bad:
        raise ValueError(f"block indices {bad} out of range: this model has {len(routable)} routable blocks")
    if any(not 0 <= int(s) < sched.T for s in timesteps):
        raise ValueError(f"timesteps must be integer indices in [0, {sched.T - 1}], got {list(timesteps)}")
    eps = torch.randn(x0.shape, generator=generator) if noise is None else noise
    eps, was_training, current = eps.to(x0.device), model.training, {}
    hooks = [routable[b].register_forward_hook(lambda m, i, out, b=b: current.__setitem__(b, out))
             for b in blocks]
    feats = {b: [] for b in blocks}
    try:
        model.eval()
        for step in timesteps:
            t = torch.full((x0.shape[0],), int(step), dtype=torch.long, device=x0.device)
            # y only when conditional: MT-Diffusion's network takes no labels
            model(q_sample(sched, x0, t, eps), t, **({} if y is None else {"y": y}))  # hooks fill `current`
            for b in blocks:
                feats[b].append(_rows(current[b], per_position).float().cpu())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {b: torch.stack(f) for b, f in feats.items()}                      # (K, rows, features) each


def cka_matrix(feats):
    """(K, K) linear CKA between the K timesteps of one block's features (K, N, features)."""
    K = feats.shape[0]
    out = torch.ones(K, K, dtype=torch.float64)
    for i in range(K):
        for j in range(i + 1, K):
            out[i, j] = out[j, i] = linear_cka(feats[i], feats[j])
    return out


# -----------------------------------------------------------------------------
# Figures (PIL only)

# A few points of a perceptually ordered dark-blue -> yellow colour map, linearly interpolated.
_ANCHORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colour(v):
    """RGB for v in [0, 1]; nan is grey."""
    if v != v:
        return (128, 128, 128)
    x = min(max(v, 0.0), 1.0) * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    f = x - i
    return tuple(round(a + f * (b - a)) for a, b in zip(_ANCHORS[i], _ANCHORS[i + 1]))


def _panel(image, title, labels):
    """Put a title above a panel and row labels to its left; labels = [(row_px, text)]."""
    left, top = 44, 16
    out = Image.new("RGB", (image.width + left + 4, image.height + top + 4), "white")
    out.paste(image, (left, top))
    draw = ImageDraw.Draw(out)
    draw.text((left, 2), title, fill="black")
    for y, text in labels:
        draw.text((2, top + y - 5), text, fill="black")
    return out


def _side_by_side(panels):
    out = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    return out


def mask_image(masks, title, width=256):
    """One (T, C) mask as a picture: timestep down (t = 0 at the top), channel across; active = yellow."""
    T, C = masks.shape
    scale = max(1, width // C)
    pixels = masks.repeat_interleave(scale, dim=1)                            # (T, C * scale)
    rgb = torch.tensor(_ANCHORS[0]) + pixels[..., None] * (torch.tensor(_ANCHORS[-1]) - torch.tensor(_ANCHORS[0]))
    image = Image.fromarray(rgb.to(torch.uint8).numpy())
    ticks = sorted({0, T // 4, T // 2, 3 * T // 4, T - 1})
    return _panel(image, title, [(t, f"t={t}") for t in ticks])


def masks_figure(T=1000, C=64, alpha=0.8, beta=4.0, seed=0):
    """Fig. 2: DTR masks with one block's R-TR masks beside them."""
    rand = random_masks(T, C, alpha, torch.Generator().manual_seed(seed))
    return _side_by_side([mask_image(dtr_masks(T, C, alpha, beta), f"DTR alpha={alpha} beta={beta}"),
                          mask_image(rand, "R-TR (one block)")])


def cka_image(matrix, timesteps, title, lo=0.0, cell=24):
    """A (K, K) CKA matrix as a heat-map over [lo, 1], rows and columns labelled with their timesteps."""
    K = matrix.shape[0]
    image = Image.new("RGB", (K * cell, K * cell + 14), "white")
    draw = ImageDraw.Draw(image)
    for i in range(K):
        for j in range(K):
            v = (float(matrix[i, j]) - lo) / max(1.0 - lo, 1e-12)
            draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], fill=colour(v))
        draw.text((i * cell + 1, K * cell + 2), str(timesteps[i]), fill="black")
    return _panel(image, title, [(i * cell + cell // 2, str(t)) for i, t in enumerate(timesteps)])


def print_shared(T, C, alpha, beta, seed, gaps=(1, 10, 100, 500, 999)):
    """Active channels and shared-channel counts for a few timestep gaps (App. B vs DTR)."""
    d = dtr_masks(T, C, alpha, beta)
    r = random_masks(T, C, alpha, torch.Generator().manual_seed(seed))
    print(f"C={C}, alpha={alpha}, beta={beta}: n = {num_active(C, alpha)} active channels per timestep; "
          f"R-TR expects n^2/C = {expected_shared_channels(C, alpha):.2f} shared for any two timesteps")
    print(f"{'gap':>5} {'DTR (0,gap)':>12} {'DTR (T-1-gap,T-1)':>18} {'R-TR mean':>10}")
    for g in (g for g in gaps if g < T):
        mean = (r[:-g] * r[g:]).sum(1).mean().item()                          # over all pairs (t, t+g)
        print(f"{g:>5} {shared_channels(d, 0, g):>12} {shared_channels(d, T - 1 - g, T - 1):>18} {mean:>10.2f}")


# -----------------------------------------------------------------------------
# Command line

# JointNet's network denoises an image and its dense map together; CKA here feeds it the data's images alone.
JOINT_INPUT_METHODS = ("jointnet", "direct_extend")


def check_cka_method(method, path):
    """One sentence (ValueError) for a run whose network this CKA cannot feed, naming the methods it can."""
    if method in JOINT_INPUT_METHODS:
        supported = ", ".join(m for m in methods.METHODS if m not in JOINT_INPUT_METHODS)
        raise ValueError(f"{path} is a run of --method {method}, whose network takes an image and its dense map "
                         f"together; --cka analyses runs of {supported}")


def _cka_inputs(model, dataset, image_size, n, device, conditional):
    """The first n test items of a dataset (data.py), and their labels when the model is conditional."""
    batch = data.first_items(data.build_dataset(dataset, image_size, split="test", seed=0), n, device)
    x0, y = batch["image"], batch["label"]                                    # (n, C, S, S), (n,)
    if x0.shape[1] != getattr(model, "in_channels", x0.shape[1]):
        raise ValueError(f"the model takes {model.in_channels} input channels but {dataset!r} images have "
                         f"{x0.shape[1]}; CKA here needs a model over the data's images")
    return x0, (y if conditional else None)


def run_cka(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ckpt:
        model, cfg, sched = methods.load_run(args.ckpt, ema=not args.no_ema, device=device)
        check_cka_method(cfg["method"], args.ckpt)
        runlib.check_finite_weights(model, args.ckpt)
        dataset, image_size = cfg.get("data", "shapes"), cfg.get("image_size", args.image_size)
        # Labels go in where the network takes them: MT-Diffusion's does not (a label run's classes are its modality).
        conditional = cfg["num_classes"] > 0 and "y" in inspect.signature(model.forward).parameters
    else:
        torch.manual_seed(args.seed)
        if args.arch == "unet":
            model = build_unet("unet-cpu", num_classes=0)
        else:
            model = build_dit("DiT-T/4", args.image_size, 3, num_classes=0, class_dropout_prob=0.0)
        apply_routing(model.to(device), args.routing, args.alpha, args.beta, T=1000, seed=args.seed)
        sched, dataset, image_size, conditional = Schedule.make("linear", 1000), "shapes", args.image_size, False
    T = sched.T
    timesteps = args.timesteps or torch.linspace(0, T - 1, 8).round().long().tolist()
    n_blocks = len(model.routable_blocks())
    blocks = args.blocks if args.blocks is not None else sorted({0, n_blocks // 2, n_blocks - 1})
    x0, y = _cka_inputs(model, dataset, image_size, args.num_images, device, conditional)
    feats = block_features(model, x0, timesteps, blocks, sched, y=y, per_position=not args.flatten,
                           generator=torch.Generator().manual_seed(args.seed))
    mats = {b: cka_matrix(feats[b]) for b in blocks}
    lo = args.cka_min if args.cka_min is not None else min(float(m.nan_to_num(1.0).min()) for m in mats.values())
    panels = []
    for b, m in mats.items():
        print(f"block {b} of {n_blocks} ({type(model.routable_blocks()[b]).__name__}), CKA between timesteps")
        print("       " + " ".join(f"{t:>6}" for t in timesteps))
        for t, row in zip(timesteps, m.tolist()):
            print(f"{t:>6} " + " ".join(f"{v:6.3f}" for v in row))
        panels.append(cka_image(m, timesteps, f"block {b}, colour {lo:.3f}..1", lo))
    _side_by_side(panels).save(args.cka)
    print(f"wrote {args.cka} (dark = CKA {lo:.3f}, yellow = 1)")


def main(argv=None):
    p = argparse.ArgumentParser(description="DTR masks (Fig. 2), shared channels (App. B) and CKA (Fig. 6).")
    p.add_argument("--channels", type=int, default=64, help="C, the block width to draw")
    p.add_argument("--T", type=int, default=1000, help="number of timesteps (tasks)")
    p.add_argument("--alpha", type=runlib.finite_float, default=0.8, help="activation ratio (paper's alpha)")
    p.add_argument("--beta", type=runlib.finite_float, default=4.0, help="window shift exponent (paper's beta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="masks.png", help="where to write the mask picture")
    p.add_argument("--cka", help="write CKA heat-maps to this PNG (needs --ckpt or --fresh)")
    p.add_argument("--ckpt", help="a run's checkpoint.pt (or run directory) for --cka")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--fresh", action="store_true", help="--cka on an untrained model instead of a run")
    p.add_argument("--arch", choices=("unet", "dit"), default="unet", help="backbone for --fresh")
    p.add_argument("--routing", choices=ROUTINGS, default="dtr", help="routing for --fresh")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-images", type=runlib.ranged(int, 1), default=32, help="inputs per timestep for CKA")
    p.add_argument("--cka-min", type=runlib.finite_float, help="CKA at the dark end of the colours (default: the smallest "
                   "value shown; fix it, e.g. 0, to compare runs)")
    p.add_argument("--flatten", action="store_true", help="one CKA row per image (whole feature map) "
                   "instead of one per pixel/token")
    p.add_argument("--blocks", type=int, nargs="+", help="routable block indices (default: first, middle, last)")
    p.add_argument("--timesteps", type=int, nargs="+", help="timesteps to compare (default: 8 from 0 to T-1)")
    args = p.parse_args(argv)
    if args.cka and not (args.ckpt or args.fresh):
        p.error("--cka needs --ckpt RUN/checkpoint.pt or --fresh")
    try:
        runlib.check_output_path(args.cka or args.out, "--cka" if args.cka else "--out")  # before the work
        if args.cka:
            return run_cka(args)
        masks_figure(args.T, args.channels, args.alpha, args.beta, args.seed).save(args.out)
        print_shared(args.T, args.channels, args.alpha, args.beta, args.seed)
        print(f"wrote {args.out}")
    except (ValueError, runlib.RunError) as e:  # bad input: one line, no traceback
        p.error(str(e))


if __name__ == "__main__":
    main()
