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
    route              apply_routing with a run's config (methods.build_model calls it for every method).
    the hooks          routing is an axis of every method (methods.py): its flags, their check, and
                       resume_keys, the config keys the masks depend on, which --resume refuses to change.
dtr_eval.py holds the analyses: shared channels (App. B), CKA between timesteps (Fig. 6), the figures.
Imports: runlib.py only (the backbones expose routable_blocks(); this file only sets their masks).

Where the mask sits (the blocks multiply by route_mask[t]; this file only sets the masks). Eq. 3 masks
the block input. App. A says, for ADM, only that the mask sits "right after the group normalization
layer" in both residual block types, so that masking does not disturb the normalisation statistics; it
does not say which of the ResBlock's two GroupNorms, and ADM with DTR is not public. Both readings are
here, `placement` of apply_routing (train.py --dtr-placement). In a reply on the official repository
(github.com/byeongjun-park/DTR, issue 1, 2025-07-22) the first author writes that for ADM they inserted
the routing module between every GroupNorm and the subsequent zero_module, which is "hidden" below:
    UNet ResBlock, "hidden" (default)   right after the second GroupNorm and its timestep scale-shift,
                       before SiLU, dropout and the zero-initialised conv: with h = conv(SiLU(GN(x))),
                       skip(x) + conv0(drop(SiLU(m * (GN(h) (1 + scale) + shift)))). The norm nearest
                       the routed output layer, on unmasked statistics; masking after the scale-shift
                       keeps the adaptive shift out of switched-off channels. The default: the authors'
                       description of their ADM code, and the reading every run here was made with.
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
    python train.py --method dtr                                 # DTR on the default recipe
    python dtr_eval.py --channels 64 --out masks.png             # Fig. 2: DTR and R-TR masks

Differences from the paper:
    - App. F does not fix the clustering for CDTR and ERCDT in a form used here; they take `clusters`
      equal timestep intervals, 8 by default (the cluster count the paper uses for ANT-UW, App. C).
"""
import math

import torch

import runlib

ROUTINGS = ("none", "dtr", "random", "cdtr", "ercdt")
PLACEMENTS = ("hidden", "input")  # where a UNet block applies the mask (unet.py); DiT: always the input


# -----------------------------------------------------------------------------
# Mask math

def check_mask_args(T, C, alpha=1.0, beta=1.0):
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
    check_mask_args(T, C, alpha, beta)
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
    check_mask_args(T, C, alpha)
    idx = torch.rand(T, C, generator=generator).argsort(dim=1)[:, : num_active(C, alpha)]  # (T, n)
    return torch.zeros(T, C).scatter_(1, idx, 1.0)                           # (T, C)


def timestep_clusters(T, clusters=8):
    """Cluster id of every timestep: `clusters` equal, consecutive intervals of [0, T)."""
    if not (isinstance(clusters, int) and 1 <= clusters <= T):
        raise ValueError(f"the number of timestep clusters must be an integer in [1, T={T}], got {clusters!r}")
    return torch.arange(T) * clusters // T                                    # (T,)


def cdtr_masks(T, C, alpha=0.8, beta=4.0, clusters=8):
    """CDTR (App. F): each timestep cluster is one task with its own DTR window."""
    check_mask_args(T, C, alpha, beta)
    return dtr_masks(clusters, C, alpha, beta)[timestep_clusters(T, clusters)]  # (T, C)


def ercdt_masks(T, C, clusters=8):
    """ERCDT (App. F): channels [0, C/2) shared by every task, the rest cut into one segment per cluster."""
    check_mask_args(T, C)
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


def unused_flags(cfg):
    """The routing flags that cfg's --routing does not read: all of them without routing, --dtr-beta for
    R-TR (its masks are drawn from alpha and the seed), --dtr-alpha and --dtr-beta for ERC-DT."""
    routing, read = cfg.get("routing", "none"), resume_keys(cfg)
    hint = " or pass --routing dtr" if routing == "none" else ""
    return {k: f"does nothing with --routing {routing}; drop it{hint}"
            for k in ("dtr_alpha", "dtr_beta", "dtr_placement") if k not in read}


def check_config(cfg):
    """Refuse routing settings the backbone cannot apply (RunError, one sentence)."""
    if cfg.get("routing", "none") != "none" and cfg.get("dtr_placement") == "hidden" and cfg.get("arch") == "dit":
        raise runlib.RunError("--dtr-placement hidden is a reading for the UNet's blocks; DiT blocks are routed at "
                         "their input (App. A, Eq. 7-8), so drop the flag or pass input")


def route(model, cfg):
    """apply_routing with a run config's --routing, --dtr-alpha, --dtr-beta, --dtr-placement, --T and --seed;
    returns the model."""
    if cfg.get("routing", "none") == "none":
        return model
    return apply_routing(model, cfg["routing"], cfg["dtr_alpha"], cfg["dtr_beta"], cfg["T"], cfg["seed"],
                         placement=cfg.get("dtr_placement"))


# -----------------------------------------------------------------------------
# Hooks of the method protocol (methods.py): routing is an axis of every method

def add_args(parser):
    g = parser.add_argument_group("channel routing (dtr.py)")
    g.add_argument("--routing", choices=ROUTINGS, help="channel routing in residual blocks: dtr (Eq. 4), random "
                   "(R-TR), cdtr/ercdt the clustered variants of App. F; default none")
    g.add_argument("--dtr-alpha", type=runlib.ranged(float, 0, 1, lo_open=True), default=0.8,
                   help="activation ratio alpha")
    g.add_argument("--dtr-beta", type=runlib.ranged(float, 0, lo_open=True), default=4.0, help="shift exponent beta")
    g.add_argument("--dtr-placement", choices=PLACEMENTS, help="where UNet blocks apply the mask: after the GroupNorm "
                   "before the output layer (hidden, default) or on the block input (input, Eq. 3); DiT: always input")
