"""
Denoising Task Routing (DTR): fixed, timestep-dependent channel masks in every residual block.

    Park et al., "Denoising Task Routing for Diffusion Models", ICLR 2024   https://arxiv.org/abs/2310.07138

Each timestep t is one denoising task. A (T, C) 0/1 mask m_t switches on a subset of the C channels
of every residual block, so x_{l+1} = B_l(m_t * x_l) + (1 - m_t) * x_l (Eq. 3). With B = x + F this
is x_{l+1} = x_l + F(m_t * x_l): the skip path is untouched and only the residual branch is routed.

What is implemented:
    dtr_masks          Eq. 4: a window of n = floor(alpha C) active channels that slides from [0, n) at
                       t = 0 to [C - n, C) at t = T-1, its start s(t) = round((t/(T-1))^beta (C - n)).
                       beta > 1 moves the window slowly at small t and fast at large t, so high
                       timesteps get more channels of their own ("task weights"); neighbours share
                       most of their channels ("task affinity").
    random_masks       R-TR (Sec. 4.2): n random channels per timestep, drawn independently per block.
    cdtr_masks, ercdt_masks   the clustered alternatives of App. F.
    apply_routing      sets the masks on every block of a UNet (unet.py) or DiT (dit.py):
                       routing "dtr", "random" (R-TR), "cdtr", "ercdt" or "none"; placement below.
    resume_keys        the config keys the masks depend on, which train.py refuses to change on --resume.
    expected_shared_channels, shared_channels   App. B: random masks share n^2/C channels on average
                       for ANY two timesteps; DTR masks share fewer the further apart they are.
    linear_cka, block_features, cka_matrix      Fig. 6: CKA between a block's features at two timesteps.
    Figures            Fig. 2 (the masks as an image) and Fig. 6 (CKA heat-maps), PIL only.

Where the mask sits (the blocks multiply by route_mask[t]; this file only sets the masks). Eq. 3 masks
the block input. App. A says, for ADM, only that the mask sits "right after the group normalization
layer" in both residual block types, so that masking does not disturb the normalisation statistics; it
does not say which of the ResBlock's two GroupNorms, and ADM with DTR is not public. Both readings are
here, `placement` of apply_routing (train.py --dtr-placement):
    UNet ResBlock, "hidden" (default)   right after the second GroupNorm and its timestep scale-shift,
                       before SiLU, dropout and the zero-initialised conv: with h = conv(SiLU(GN(x))),
                       skip(x) + conv0(drop(SiLU(m * (GN(h) (1 + scale) + shift)))). The norm nearest
                       the routed output layer, on unmasked statistics; masking after the scale-shift
                       keeps the adaptive shift out of switched-off channels. It is the default because
                       the runs and figures in this repository were made with it.
    UNet ResBlock, "input"              Eq. 3 on the block input: skip(x) + F(m * x), the mask as wide
                       as the input (the skip conv of a width-changing block takes x unmasked: Eq. 3's
                       (1 - m) x has no counterpart there). The first GroupNorm then sees masked input.
    UNet AttentionBlock   "hidden": right after its only GroupNorm, before qkv, x + proj(attn(m * GN(x)));
                       that GroupNorm is the block's first layer, so App. A and Eq. 3 nearly coincide.
                       "input": x + proj(attn(GN(m * x))).
    DiT block          on the block input, as the official code: x + F(m * x), F the adaLN-modulated
                       attention and MLP branches (App. A, Eq. 5-8); no other placement. adaLN and the
                       final layer are not routed.
    Samplers that skip steps hand the model the original timestep index, so the mask is the one
    the timestep was trained with.

Cost: no parameters (the masks are buffers outside the state_dict) and a few elementwise operations
per block: a (B, C) gather, and either two (B, C) multiplies folded into the ResBlock's scale-shift
("hidden"), or m * x and, in DiT, one extra addition. `python bench.py --only routing` times a routed training step
against the same model unrouted (the README has the figures; the paper's App. E reports 0.6%, 0.4% and
0.3% slower training for DiT-S/2, DiT-B/2 and DiT-L/2).

Naming: alpha is the paper's activation ratio (default 0.8) and beta its shift exponent (default 4).
The official code swaps the two names; this file follows the paper.

Run:
    python dtr.py --channels 64 --out masks.png                 # Fig. 2: DTR and R-TR masks
    python dtr.py --ckpt runs/dtr/checkpoint.pt --cka cka.png   # Fig. 6 for a trained run
    python dtr.py --fresh --arch unet --cka cka.png             # the same on an untrained model

Differences from the paper:
    - App. F does not fix the clustering for CDTR and ERCDT in a form used here; they take `clusters`
      equal timestep intervals, 8 by default (the cluster count the paper uses for ANT-UW, App. C).
    - CKA treats every pixel (UNet) or token (DiT) of every image as one sample of C channel values,
      on the small images the run was trained on; the paper does not say how it arranges features.
"""
import argparse
import math

import torch
from PIL import Image, ImageDraw

import data
import runlib
from diffusion import Schedule, q_sample
from dit import build_dit
from unet import build_unet

ROUTINGS = ("none", "dtr", "random", "cdtr", "ercdt")
PLACEMENTS = ("hidden", "input")  # where a UNet block applies the mask (unet.py); DiT: always the input


# -----------------------------------------------------------------------------
# Mask math

def _check(T, C, alpha=1.0, beta=1.0):
    if not (isinstance(T, int) and T >= 1 and isinstance(C, int) and C >= 1):
        raise ValueError(f"T and C must be positive integers, got T={T!r}, C={C!r}")
    if not 0 < alpha <= 1:
        raise ValueError(f"the activation ratio alpha must lie in (0, 1], got {alpha}")
    if not beta > 0:
        raise ValueError(f"the shift exponent beta must be > 0, got {beta}")
    if math.floor(alpha * C) < 1:
        raise ValueError(f"alpha * C = {alpha * C:g} leaves no active channel; raise alpha or C")


def num_active(C, alpha):
    """n = floor(alpha C), the number of channels every task keeps (Sec. 4.2)."""
    return math.floor(alpha * C)


def window_start(T, C, alpha=0.8, beta=4.0):
    """s(t) = round((t / (T-1))^beta (C - n)) for t = 0..T-1 (Eq. 4), a (T,) long tensor.

    The arithmetic is the official code's, step by step, in float64: the fraction is t times the
    reciprocal 1 / (T-1) (an evenly spaced grid whose last point is exactly 1), raised to beta by the C
    library's pow, times C - n, rounded half to even. t / (T-1) can differ from t * (1 / (T-1)) in the
    last bit; where the exact value ends in .5 that moves the window by one channel (T = 999, beta = 1,
    t = 499 and C - n = 3, for instance: 1.5 exactly rounds to 2, just below it to 1), so the masks follow the authors' order of operations.
    """
    _check(T, C, alpha, beta)
    n = num_active(C, alpha)
    step = 1.0 / max(T - 1, 1)
    u = [t * step for t in range(T - 1)] + [1.0] if T > 1 else [0.0]         # t / (T-1) in [0, 1]
    return torch.tensor([round(u_t ** beta * (C - n)) for u_t in u], dtype=torch.long)  # (T,), half to even


def dtr_masks(T, C, alpha=0.8, beta=4.0):
    """DTR routing masks (Eq. 4): mask[t, s(t) : s(t) + n] = 1, a (T, C) float tensor of 0/1."""
    s, n = window_start(T, C, alpha, beta), num_active(C, alpha)
    c = torch.arange(C)
    return ((c >= s[:, None]) & (c < s[:, None] + n)).float()                # (T, C)


def random_masks(T, C, alpha=0.8, generator=None):
    """R-TR masks: each timestep keeps n channels chosen uniformly at random, a (T, C) 0/1 tensor."""
    _check(T, C, alpha)
    idx = torch.rand(T, C, generator=generator).argsort(dim=1)[:, : num_active(C, alpha)]  # (T, n)
    return torch.zeros(T, C).scatter_(1, idx, 1.0)                           # (T, C)


def timestep_clusters(T, clusters=8):
    """Cluster id of every timestep: `clusters` equal, consecutive intervals of [0, T)."""
    if not (isinstance(clusters, int) and 1 <= clusters <= T):
        raise ValueError(f"the number of timestep clusters must be an integer in [1, T={T}], got {clusters!r}")
    return torch.arange(T) * clusters // T                                    # (T,)


def cdtr_masks(T, C, alpha=0.8, beta=4.0, clusters=8):
    """CDTR (App. F): each timestep cluster is one task with its own DTR window."""
    _check(T, C, alpha, beta)
    return dtr_masks(clusters, C, alpha, beta)[timestep_clusters(T, clusters)]  # (T, C)


def ercdt_masks(T, C, clusters=8):
    """ERCDT (App. F): channels [0, C/2) shared by every task, the rest cut into one segment per cluster."""
    _check(T, C)
    k, shared = timestep_clusters(T, clusters), C // 2                      # (T,) cluster ids
    if C - shared < clusters:
        raise ValueError(f"ERCDT needs at least {clusters} unshared channels (one per cluster), "
                         f"but C={C} leaves {C - shared}; use fewer clusters")
    masks = torch.zeros(T, C)
    masks[:, :shared] = 1
    segments = torch.arange(shared, C).tensor_split(clusters)                 # `clusters` channel ranges
    for t, k_t in enumerate(k.tolist()):
        masks[t, segments[k_t]] = 1
    return masks                                                              # (T, C)


# -----------------------------------------------------------------------------
# Routing: put the masks into a model's blocks

def build_masks(routing, T, C, alpha=0.8, beta=4.0, generator=None, clusters=8):
    """(T, C) masks for one block under `routing` (one of ROUTINGS except "none")."""
    if routing == "dtr":
        return dtr_masks(T, C, alpha, beta)
    if routing == "random":
        return random_masks(T, C, alpha, generator)
    if routing == "cdtr":
        return cdtr_masks(T, C, alpha, beta, clusters)
    if routing == "ercdt":
        return ercdt_masks(T, C, clusters)
    raise ValueError(f"unknown routing {routing!r}: choose one of {', '.join(ROUTINGS)}")


def apply_routing(model, routing="dtr", alpha=0.8, beta=4.0, T=1000, seed=0, clusters=8, placement=None):
    """Set `route_mask` on every block of model.routable_blocks(); returns the model.

    Deterministic schemes give every block of the same width the same masks. "random" (R-TR) draws
    each block's masks independently from one generator seeded with `seed`, so the same seed gives
    the same masks again (store it with the run). "none" removes the masks. The masks are
    non-persistent buffers: no parameters are added and the state_dict is unchanged.
    placement: where UNet blocks apply the mask, "hidden" (None: the default) or "input" (PLACEMENTS);
    DiT blocks always mask their input, so only None or "input" is accepted for them.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
    if placement not in (None, *PLACEMENTS):
        raise ValueError(f"unknown routing placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if not hasattr(model, "routable_blocks"):
        raise ValueError(f"{type(model).__name__} has no routable_blocks(); use a UNet (unet.py) or DiT (dit.py)")
    generator = torch.Generator().manual_seed(seed)
    by_width = {}
    for block in model.routable_blocks():
        if hasattr(block, "route_placement"):                                # UNet blocks: either reading
            block.route_placement = placement or "hidden"
        elif placement == "hidden":
            raise ValueError(f"{type(block).__name__} masks its input (App. A, Eq. 7-8); placement 'hidden' "
                             "is a UNet reading only")
        if routing == "none":
            block.route_mask = None
            continue
        C = block.route_channels
        if routing == "random":
            masks = random_masks(T, C, alpha, generator)
        else:
            masks = by_width.setdefault(C, build_masks(routing, T, C, alpha, beta, clusters=clusters))
        device = next(block.parameters()).device
        block.route_mask = masks.to(device)                                   # (T, C) buffer
    return model


def resume_keys(cfg):
    """Config keys that fix a run's masks, which a resumed run must therefore keep.

    None of them changes a tensor shape, so a checkpoint loads under any of them; changing one would
    silently train on other masks. The seed counts only for R-TR, whose masks are drawn from it.
    """
    routing = cfg.get("routing", "none")
    keys = {"none": (), "dtr": ("dtr_alpha", "dtr_beta"), "cdtr": ("dtr_alpha", "dtr_beta"),
            "random": ("dtr_alpha", "seed"), "ercdt": ()}.get(routing, ())
    return ("routing", *keys) + (("dtr_placement",) if routing != "none" else ())


def check_routing(cfg):
    """Refuse routing settings the backbone cannot apply (ValueError, one sentence)."""
    if cfg.get("routing", "none") != "none" and cfg.get("dtr_placement") == "hidden" and cfg.get("arch") == "dit":
        raise ValueError("--dtr-placement hidden is a reading for the UNet's blocks; DiT blocks are routed at "
                         "their input (App. A, Eq. 7-8), so drop the flag or pass input")


def route(model, cfg):
    """apply_routing with a run config's --routing, --dtr-alpha, --dtr-beta, --dtr-placement, --T and --seed;
    returns the model."""
    if cfg.get("routing", "none") == "none":
        return model
    return apply_routing(model, cfg["routing"], cfg["dtr_alpha"], cfg["dtr_beta"], cfg["T"], cfg["seed"],
                         placement=cfg.get("dtr_placement"))


def routed_backbone(cfg):
    """The network of a run whose method has no model of its own (ddpm, minsnr, dtr, rtr, ...)."""
    return route(runlib.build_backbone(cfg), cfg)


# -----------------------------------------------------------------------------
# Analysis: shared channels (App. B) and CKA between timesteps (Fig. 6)

def expected_shared_channels(C, alpha=0.8):
    """E[#channels shared by two distinct timesteps] under R-TR masks, App. B Eq. 9.

    Fix the n channels of task t1. Task t2 draws n of C channels without replacement, so the number
    k it shares with t1 is hypergeometric, P(k) = binom(n, k) binom(C - n, n - k) / binom(C, n),
    with mean n * (n / C) = n^2 / C: the same for every pair, however close the two timesteps are.
    """
    _check(1, C, alpha)
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
            model(q_sample(sched, x0, t, eps), t, y=y)                        # hooks fill `current`
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

def _cka_inputs(model, dataset, image_size, n, device):
    """The first n test items of a dataset (data.py) and their labels when the model is conditional."""
    ds = data.build_dataset(dataset, image_size, split="test", seed=0)
    items = [ds[i] for i in range(min(n, len(ds)))]
    x0 = torch.stack([it["image"] for it in items]).to(device)                # (n, C, S, S)
    y = torch.stack([it["label"] for it in items]).to(device)                 # (n,)
    if x0.shape[1] != getattr(model, "in_channels", x0.shape[1]):
        raise ValueError(f"the model takes {model.in_channels} input channels but {dataset!r} images have "
                         f"{x0.shape[1]}; CKA here needs a model over the data's images")
    return x0, (y if getattr(model, "num_classes", 0) > 0 else None)


def run_cka(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.ckpt:
        model, cfg, sched = runlib.load_run(args.ckpt, routed_backbone, ema=not args.no_ema, device=device)
        dataset, image_size = cfg.get("data", "shapes"), cfg.get("image_size", args.image_size)
    else:
        torch.manual_seed(args.seed)
        if args.arch == "unet":
            model = build_unet("unet-cpu", num_classes=0)
        else:
            model = build_dit("DiT-T/4", args.image_size, 3, num_classes=0, class_dropout_prob=0.0)
        apply_routing(model.to(device), args.routing, args.alpha, args.beta, T=1000, seed=args.seed)
        sched, dataset, image_size = Schedule.make("linear", 1000), "shapes", args.image_size
    T = sched.T
    timesteps = args.timesteps or torch.linspace(0, T - 1, 8).round().long().tolist()
    n_blocks = len(model.routable_blocks())
    blocks = args.blocks if args.blocks is not None else sorted({0, n_blocks // 2, n_blocks - 1})
    x0, y = _cka_inputs(model, dataset, image_size, args.num_images, device)
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
    p.add_argument("--num-images", type=int, default=32, help="inputs per timestep for CKA")
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
        if args.cka:
            return run_cka(args)
        masks_figure(args.T, args.channels, args.alpha, args.beta, args.seed).save(args.out)
        print_shared(args.T, args.channels, args.alpha, args.beta, args.seed)
        print(f"wrote {args.out}")
    except (ValueError, runlib.RunError) as e:  # bad input: one line, no traceback
        p.error(str(e))


if __name__ == "__main__":
    main()
