"""
MT-Diffusion: one diffusion process carries an image and a second modality (a masked copy, a label or
a segmentation map); a shared backbone with one head per modality; a multi-task loss.

    Chen et al., ICLR 2024, "Diffusion Models for Multi-Task Generative Modeling"
    https://arxiv.org/abs/2407.17571   (no public code)

Implemented, with a_t = alpha_t, ab_t = prod a, at_t = alpha_tilde_t, E(X) = sum_i w_t^i E_i(x_i):
    Eq. 3      forward aggregation  q(z_t | z_{t-1}, X) = N(sqrt(a_t) (z_{t-1} + w_t E(X)), (1 - a_t) I)
    Thm. 2     marginal  N(sqrt(ab_t) z_0 + at_t E(X), (1 - ab_t) I), at_t = sqrt(a_t) (w_t + at_{t-1}), at_0 = 0
    Eq. 5      posterior q(z_{t-1} | z_t, z_0, X); App. B: the reverse mean from eps
    Thm. 1     the prior mismatch L_0 = KL(q(z_T | z_0, X) || N(0, I))
    Eq. 6      ||eps - eps_theta||^2 + lambda KL(q(x) || p_theta(x | z_t)), lambda = 0.1 (mt_loss)
    Alg. 1     joint and conditional generation (DDIM-respaced)
    Sec. 2.2.4 identity encoder, fixed label codes (below); an output-block replica (UNet or
               DiT) as image head, a label MLP on the middle block (variant M) or a classifier on the
               output (E); noise predictor eps_theta(z_t, t) (variant U) or eps_theta(z_t, X, t) (X)
    tasks      masked (Sec. 4.1), label (Sec. 4.2), translate (App. E.1), on the shapes data

One identity carries the file: for fixed X, y_t = z_t - at_t E(X) is exactly the DDPM chain
y_t = sqrt(a_t) y_{t-1} + sqrt(1 - a_t) eps (substitute Eq. 3; at_t / sqrt(a_t) - at_{t-1} = w_t). The
sampler takes DDPM/DDIM steps on y and adds the shift back; Algorithm 1's line 12 is one such step.

Task weights (--mt-weights; `python mtdiffusion_eval.py --schedules` prints the table):
    paper  w_t = t / (T - t) (App. E, 0-based t)       const  w_t = c
    ramp   at_t = c sqrt(ab_t) (t + 1) / T             sigma  at_t = c sqrt(ab_t) sqrt(1 - ab_t)   (default)
With |z_0| = |E| = 1 per dimension (linear schedule, T = 1000), L_0 is 1.0e7 nats per dimension for
paper and 6.5e3 for const: z_T is far from the N(0, I) Algorithm 1 starts from. ramp and sigma tie
at_T to sqrt(ab_T) and stay near plain DDPM's 2.0e-5 (8.1e-5). sigma is the default: of the two it gives the
modality the larger SNR in z_t, at_t^2 / (1 - ab_t) (mean over t 0.28 vs 0.03), so heads and
conditioning can see it, while w_t stays small at small t as the paper wants.

    python train.py --method mtdiff --task masked --out runs/mt
    python sample.py --ckpt runs/mt --mode mt-restore        # Table 1 and the Fig. 5 triplets
The sample.py modes (restoration, label accuracy, translation), the grid rows and the schedule table
live in mtdiffusion_eval.py. Imports: the base only (diffusion.py, unet.py, dit.py, shapes.py, runlib.py).

Differences from the paper:
    - label codes E(y) are fixed random codes (one Gaussian image per class, centred over the classes,
      unit RMS), drawn when the model is built and stored in its state_dict, so checkpoints and the EMA
      carry the same ones. The paper reads them from the shared backbone. Here the encoder gets no
      gradient (the noise predictor sees the null label; the codes are stop-gradient), so codes read from
      the training backbone are random embeddings that drift as the backbone trains (cosine ~0 between
      steps 400 and 2,000), and Eq. 3's forward process would change under the model learning to invert
      it. The untrained backbone cannot give them instead: its zero-initialised residual and output
      layers make its output 0 for every label. Soft estimates are encoded as the expected code. Maps
      get a fixed colour per class (not a VQ encoder).
    - variant X reads E(x) as extra input channels, zeros when x is unknown (the paper's "complete mask").
    - a share --mt-drop of training samples has x unknown: E(x) = 0 in Eq. 3 and as variant X's input,
      i.e. the single-task model trained alongside, as in the paper's M*/E* runs (CFG-style). Without
      them a head only learns to decode E(x) from z_t, where Eq. 3 put it (a 300-step label run: 100%
      accuracy with the code in z_t, chance without) and cannot read x from an image. Variant X
      trains its head on those rows only (elsewhere it could copy its input); in Algorithm 1 it
      leaves an unknown x out of z_t, as trained, while variant U aggregates the head's estimate.
    - Algorithm 1 uses the current step's head estimate and clips x0 to [-1, 1] (clip=False with
      --steps T and eta 1 is the paper's chain exactly). Restoration can also paste the
      forward-noised known pixels at every step.
    - no LPIPS (VGG weights cannot be downloaded here): bench.py scores restoration by LPIPS's formula in
      its reference CNN's features; the E label head is a small CNN, not ADM's classifier.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import runlib
from diffusion import Schedule, ddim_step, extract, q_sample, split_prediction, timestep_subset, training_target
from dit import DiT, FinalLayer, build_dit
from unet import norm, zero_module

TASKS = ("masked", "label", "translate")
WEIGHTS = ("paper", "const", "ramp", "sigma")


# -----------------------------------------------------------------------------
# The math, as plain functions (coefficients (T,) for one modality or (N, T) for N)

def task_weights(name, sched, scale=1.0):
    """w_t (T,) float64 for one modality, for the schedules in the docstring."""
    T, ab = sched.T, sched.alpha_bar
    t = torch.arange(T, dtype=torch.float64)
    if name == "paper":
        return scale * t / (T - t)
    if name == "const":
        return torch.full((T,), float(scale), dtype=torch.float64)
    if name in ("ramp", "sigma"):  # at_t = c sqrt(ab_t) f_t  <=>  w_t = c sqrt(ab_{t-1}) (f_t - f_{t-1}), f_{-1} = 0
        f = (t + 1) / T if name == "ramp" else (1 - ab).sqrt()
        return scale * sched.alpha_bar_prev.sqrt() * (f - torch.cat([f.new_zeros(1), f[:-1]]))
    raise ValueError(f"unknown task-weight schedule {name!r}: choose one of {', '.join(WEIGHTS)}")


def aggregation_coefs(alphas, w):
    """at_t = sqrt(a_t) (w_t + at_{t-1}), at_{-1} = 0 (Theorem 2's recursion); w (..., T) -> at (..., T)."""
    at, prev = torch.zeros_like(w), torch.zeros_like(w[..., 0])
    for t in range(w.shape[-1]):
        prev = alphas[t].sqrt() * (w[..., t] + prev)
        at[..., t] = prev
    return at


def aggregate(coef, t, E):
    """sum_i coef^i[t] E_i(x_i): coef (T,) with E (B, ...), or (N, T) with E (N, B, ...) -> (B, ...)."""
    if coef.ndim == 1:
        coef, E = coef[None], E[None]
    c = coef.to(E.device)[:, t]                                              # (N, B) float64
    return (c.view(*c.shape, *[1] * (E.ndim - 2)).to(E.dtype) * E).sum(0)   # (B, ...)


def q_sample_mt(sched, alpha_tilde, z0, t, eps, E):
    """z_t ~ q(z_t | z_0, X) = sqrt(ab_t) z_0 + at_t E(X) + sqrt(1 - ab_t) eps (Theorem 2, Eq. 4)."""
    return q_sample(sched, z0, t, eps) + aggregate(alpha_tilde, t, E)


def q_posterior_mt(sched, alpha_tilde, w, z0, z_t, t, E):
    """Mean and variance of q(z_{t-1} | z_t, z_0, X) (Eq. 5): the mean is
    [sqrt(a_t)(1 - ab_{t-1}) z_t + (1 - a_t) sqrt(ab_{t-1}) z_0
     + ((1 - a_t) at_{t-1} - a_t (1 - ab_{t-1}) w_t) E(X)] / (1 - ab_t).

    Derivation: y_t = z_t - at_t E is the DDPM chain with y_{-1} = z_0 (at_{-1} = 0), so q(y_{t-1} | y_t, z_0)
    is DDPM's posterior, mean [sqrt(a_t)(1 - ab_{t-1}) y_t + sqrt(ab_{t-1})(1 - a_t) z_0] / (1 - ab_t) and
    variance (1 - ab_{t-1})(1 - a_t) / (1 - ab_t). Shift back, z_{t-1} = y_{t-1} + at_{t-1} E: E's coefficient
    is at_{t-1} - sqrt(a_t)(1 - ab_{t-1}) at_t / (1 - ab_t); with at_t = sqrt(a_t)(w_t + at_{t-1}) and
    a_t ab_{t-1} = ab_t it is ((1 - a_t) at_{t-1} - a_t (1 - ab_{t-1}) w_t) / (1 - ab_t)."""
    a, ab, ab_prev = sched.alphas, sched.alpha_bar, sched.alpha_bar_prev     # (T,) float64
    at_prev = torch.cat([torch.zeros_like(alpha_tilde[..., :1]), alpha_tilde[..., :-1]], -1)  # at_{t-1}
    c_z = extract(a.sqrt() * (1 - ab_prev) / (1 - ab), t, z_t).to(z_t.dtype)
    c_0 = extract((1 - a) * ab_prev.sqrt() / (1 - ab), t, z_t).to(z_t.dtype)
    c_E = ((1 - a) * at_prev - a * (1 - ab_prev) * w) / (1 - ab)             # (N, T) or (T,)
    mean = c_z * z_t + c_0 * z0 + aggregate(c_E, t, E)
    return mean, extract(sched.posterior_var, t, z_t).to(z_t.dtype)


def reverse_mean(sched, w, z_t, t, eps, E):
    """mu = (z_t - (1 - a_t) / sqrt(1 - ab_t) eps) / sqrt(a_t) - w_t E(X) (App. B: Eq. 10 into Eq. 9)."""
    a, ab = extract(sched.alphas, t, z_t), extract(sched.alpha_bar, t, z_t)
    k = ((1 - a) / (1 - ab).sqrt()).to(z_t.dtype)
    return (z_t - k * eps) / a.sqrt().to(z_t.dtype) - aggregate(w, t, E)


def prior_kl(sched, alpha_tilde, z0, E):
    """L_0 = KL(q(z_T | z_0, X) || N(0, I)) in nats per sample, summed over dimensions (Theorem 1)."""
    t = torch.full((z0.shape[0],), sched.T - 1, dtype=torch.long, device=z0.device)
    m = q_sample_mt(sched, alpha_tilde, z0, t, torch.zeros_like(z0), E).double()   # mean of z_T
    v = 1 - sched.alpha_bar[-1]                                                  # its variance
    return 0.5 * (v - 1 - v.log() + m.pow(2)).flatten(1).sum(1)


def patch_mask(counts, size, generator=None):
    """(B, 1, S, S) 0/1 mask of counts[b] squares of side S/4 (16 of 64, App. E.2) at uniform corners,
    clipped at the border, possibly overlapping."""
    B, p, m = len(counts), max(1, size // 4), int(counts.max())
    corner = torch.randint(0, size, (B, m, 2), generator=generator)                # (B, m, 2) row, col
    r = torch.arange(size)
    rows = (r >= corner[..., :1]) & (r < corner[..., :1] + p)                      # (B, m, S)
    cols = (r >= corner[..., 1:]) & (r < corner[..., 1:] + p)                      # (B, m, S)
    on = torch.arange(m) < counts[:, None]                                          # (B, m)
    return (rows[..., :, None] & cols[..., None, :] & on[..., None, None]).any(1)[:, None].float()


# -----------------------------------------------------------------------------
# Decoder heads (Sec. 2.2.4); each takes (backbone features, z_t, eps_theta)

class ImageHead(nn.Module):
    """A replica of the backbone's output block: GroupNorm, SiLU, zero conv (UNet) or DiT's final layer."""

    def __init__(self, backbone, out_channels):
        super().__init__()
        self.dit = isinstance(backbone, DiT)
        if self.dit:
            self.p, self.c = backbone.patch_size, out_channels
            self.final = FinalLayer(backbone.pos_embed.shape[-1], self.p, out_channels)
            zero_module(self.final.linear), zero_module(self.final.adaLN_modulation)  # zero, as DiT's own
        else:
            ch = backbone.out[0].num_channels
            self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, feats, z_t, eps):
        if not self.dit:
            return self.out(feats["last"])                                          # (B, C', H, W)
        x = self.final(feats["tokens"], feats["c"])                                 # (B, L, p*p*C')
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(-1, h, w, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)  # (B, C', h, p, w, p)
        return x.reshape(x.shape[0], self.c, h * self.p, w * self.p)


class LabelMLP(nn.Module):
    """Variant M: an MLP on the pooled output of the middle block (UNet) or of the middle DiT block."""

    def __init__(self, width, num_classes):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, feats, z_t, eps):
        mid = feats["mid"]                                            # (B, C, h, w) or (B, L, D)
        return self.mlp(mid.mean((2, 3)) if mid.ndim == 4 else mid.mean(1))         # (B, K)


class LabelCNN(nn.Module):
    """Variant E: a small classifier on the backbone output, read together with z_t."""

    def __init__(self, channels, num_classes, width=32):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.GroupNorm(8, o), nn.SiLU())
        self.net = nn.Sequential(conv(2 * channels, width), conv(width, 2 * width), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, feats, z_t, eps):
        return self.net(torch.cat([z_t, eps], 1))                                    # (B, K)


def palette(K):
    """A fixed colour per segmentation class, corners of the RGB cube in [-1, 1] (class 0 black)."""
    if K > 8:
        raise ValueError(f"the map encoder has 8 colours but the data has {K} classes")
    return torch.tensor([[(k >> b) & 1 for b in range(3)] for k in range(K)], dtype=torch.float32) * 2 - 1


# -----------------------------------------------------------------------------
# The model: shared backbone, one modality head, the fixed forward-process coefficients

def random_label_codes(K, C, size, generator=None):
    """K fixed codes E(y) (K, C, S, S): Gaussian images centred over the classes, scaled to unit RMS."""
    o = torch.randn(K, C, size, size, generator=generator)
    o = o - o.mean(0)                                                          # centred over classes
    return o / o.pow(2).mean().sqrt().clamp(min=1e-8)                          # unit RMS


class MTDiffusion(nn.Module):
    """The reverse model: eps_theta and one modality head on a shared backbone, plus E and the w_t, at_t of q.

    backbone      a UNet or DiT with C outputs, 2C inputs for variant X (it reads E(x) beside z_t)
    task          "masked", "label" or "translate"; variant "U" or "X"; head "M" or "E" (labels only)
    channels, image_size      C and S of the images; num_classes K (labels), seg_classes (maps)
    schedule, T, weights, scale   the noise schedule and the task-weight schedule w_t = scale * ...
    Label codes are drawn from torch's global generator (seeded by the caller) and saved with the weights.
    """

    def __init__(self, backbone, task, variant, channels, image_size, num_classes=0, head="M", seg_classes=None,
                 schedule="linear", T=1000, weights="sigma", scale=1.0):
        super().__init__()
        self.backbone, self.task, self.variant = backbone, task, variant
        self.C, self.size, self.num_classes = channels, image_size, num_classes
        K = self.num_classes
        if self.task == "label":
            width = getattr(backbone, "mid_channels", None) or backbone.pos_embed.shape[-1]
            self.head = LabelMLP(width, K) if head == "M" else LabelCNN(self.C, K)
            self.register_buffer("codes", random_label_codes(K, self.C, self.size))  # (K, C, S, S), saved
        else:
            self.head = ImageHead(backbone, self.C if self.task == "masked" else seg_classes)
        if self.task == "translate":
            self.register_buffer("palette", palette(seg_classes), persistent=False)
        sched = Schedule.make(schedule, T)
        w = task_weights(weights, sched, scale)
        self.register_buffer("w", w, persistent=False)                                       # (T,) float64
        self.register_buffer("alpha_tilde", aggregation_coefs(sched.alphas, w), persistent=False)

    def routable_blocks(self):
        return self.backbone.routable_blocks()

    def forward(self, z_t, t, e_in=None):
        """(eps_theta, head output). Variant X also reads E(x): e_in, zeros (or None) where x is unknown."""
        x = z_t
        if self.variant == "X":
            x = torch.cat([z_t, torch.zeros_like(z_t) if e_in is None else e_in.to(z_t)], 1)  # (B, 2C, H, W)
        y = torch.full_like(t, self.num_classes) if self.num_classes else None  # the noise predictor gets no label
        out, feats = self.backbone(x, t, y, return_features=True)                  # (B, C, H, W)
        return out, self.head(feats, z_t, out)

    def label_codes(self):
        """E(y) for every class (K, C, H, W): fixed since construction (the docstring says why)."""
        return self.codes

    def encode(self, x, codes=None):
        """E(x) (B, C, H, W): data (masked image, long labels or maps) or soft estimates (probabilities)."""
        if self.task == "masked":
            return x                                                               # identity encoder
        K = self.num_classes if self.task == "label" else len(self.palette)
        p = x if x.is_floating_point() else F.one_hot(x, K).movedim(-1, 1).float()  # (B, K) or (B, K, H, W)
        if self.task == "translate":
            return torch.einsum("bkhw,kc->bchw", p, self.palette)
        return torch.einsum("bk,kchw->bchw", p, self.label_codes() if codes is None else codes)

    def estimate(self, head):
        """The head's estimate of the modality (Alg. 1 line 10): an image, or class probabilities."""
        return head.float().clamp(-1, 1) if self.task == "masked" else head.float().softmax(1)


def head_loss(task, head, x):
    """Per-sample KL(q(x) || p_theta(x | z_t)) of Eq. 6 up to a constant: cross-entropy for labels and
    maps (per pixel), MSE for images (a Gaussian head)."""
    if task == "masked":
        return (head.float() - x).pow(2).mean((1, 2, 3))
    ce = F.cross_entropy(head.float(), x, reduction="none")
    return ce if task == "label" else ce.mean((1, 2))


def modality(task, batch, rng):
    """The task's second modality from a batch: a masked copy (m ~ U{0..10} patches), the label or the map.
    The patches come from the step's draws (runlib.StepRandom): made for the global batch, this rank's rows kept."""
    if task == "masked":
        x0 = batch["image"]
        counts = torch.randint(0, 11, (rng.batch_size,), generator=rng.generator)  # (B_global,)
        M = rng.local(patch_mask(counts, x0.shape[-1], rng.generator)).to(x0)    # (B, 1, S, S)
        return x0 * (1 - M)
    return batch["label" if task == "label" else "seg"]


def mt_loss(model, sched, x0, x, t, eps, unknown, target="eps", lam=0.1, weight=None, head_rows=None):
    """Eq. 6 (Algorithm 2): the diffusion loss on z_t ~ q(z_t | z_0, X) plus lambda times the head's loss.

    x0 (B, C, H, W) images; x the second modality (masked image, labels (B,) or maps (B, H, W));
    t (B,), eps (B, C, H, W); unknown (B,) 0/1: rows trained with x unknown (E(x) = 0, the single-task
    model); weight (B,) an optional per-sample weight of the diffusion term (the loop's batch["weight"]).
    head_rows: the count the head loss is averaged over, by default the rows here that train the head.
    A batch split over ranks passes (global count) x (this rank's share of the batch), so that the mean
    of the ranks' losses, which DDP's gradient averaging takes, is the whole batch's loss.
    Returns (scalar loss, per-sample diffusion mse (B,), head loss l_x, head output).
    """
    e = model.encode(x) * (1 - unknown).view(-1, 1, 1, 1)                          # (B, C, H, W), no gradient
    z_t = q_sample_mt(sched, model.alpha_tilde, x0, t, eps, e)                      # (B, C, H, W)
    out, head = model(z_t, t, e)
    mse = (out.float() - training_target(sched, x0, t, eps, target)).pow(2).mean((1, 2, 3))  # (B,)
    w = torch.ones_like(mse) if weight is None else weight.to(mse)
    rows = unknown if model.variant == "X" else torch.ones_like(unknown)           # (B,) rows that train the head
    n = rows.sum().clamp(min=1) if head_rows is None else head_rows
    l_x = (head_loss(model.task, head, x) * rows).sum() / n
    return (w * mse).mean() + lam * l_x, mse, l_x, head


# -----------------------------------------------------------------------------
# Algorithm 1

@torch.no_grad()
def mt_sample(model, sched, shape, steps=50, eta=0.0, x=None, z0=None, known=None, z_start=None, t_start=None,
              target="eps", clip=True, generator=None, device="cpu"):
    """Algorithm 1 on `steps` respaced timesteps (DDIM eta; steps = T, eta = 1, clip off is line 12 exactly).

    x: the given modality, or None to estimate it from its head at every step (joint generation).
    z0, known: a given image and the 0/1 region of it that is known (B, 1, H, W); that region is replaced
    by its forward sample every step (restoration with the known pixels pasted).
    z_start, t_start: start from z_{t_start} instead of noise (SDEdit). Returns (z_0, x_hat).
    """
    codes = model.label_codes() if model.task == "label" else None
    e = torch.zeros(shape, device=device) if x is None else model.encode(x, codes)  # (B, C, H, W)
    x_hat = x
    z = torch.randn(shape, generator=generator, device=device) if z_start is None else z_start
    ts = [i for i in timestep_subset(sched.T, steps).tolist() if t_start is None or i <= t_start]
    at = torch.cat([model.alpha_tilde, model.alpha_tilde.new_zeros(1)])           # at[-1] = 0: the clean end
    for i, i_prev in zip(ts, ts[1:] + [-1]):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        t_prev = torch.full_like(t, i_prev)
        out, head = model(z, t, e)
        if x is None:  # lines 9-10: the missing modality, estimated by its head
            x_hat = model.estimate(head)
            if model.variant == "U":  # variant X leaves an unknown x out of z_t, as in training
                e = model.encode(x_hat, codes)
        y = z - aggregate(at, t, e)                                                 # the DDPM chain
        x0_hat, eps = split_prediction(sched, y, t, out[:, :shape[1]], target, clip)
        noise = torch.randn(shape, generator=generator, device=device) if eta > 0 else torch.zeros_like(z)
        z = ddim_step(sched, y, t, t_prev, x0_hat, eps, eta, noise) + aggregate(at, t_prev, e)  # line 12
        if known is not None:
            n = torch.randn(shape, generator=generator, device=device)
            z_known = z0 if i_prev < 0 else q_sample_mt(sched, model.alpha_tilde, z0, t_prev, n, e)
            z = known * z_known + (1 - known) * z                                   # (B, C, H, W)
    return z, x_hat


# -----------------------------------------------------------------------------
# Hooks of the method protocol (methods.py) that build and train the model; the method's command line
# (its flags, their checks, the config they resolve: add_args, prepare_config, ...) is in mtdiffusion_eval.py

SHAPE_KEYS = ("task", "mt_variant", "mt_head")  # config keys that change the network: a resume must keep them


def build_model(cfg):
    C = cfg["in_channels"]
    c_in = 2 * C if cfg["mt_variant"] == "X" else C
    if cfg["arch"] == "dit" and cfg["task"] == "label":  # a DiT has the null label row only with label dropout
        backbone = build_dit(cfg["model"], cfg["image_size"], c_in, cfg["num_classes"], 0.1, out_channels=C)
    else:                                                  # (which never acts: the noise predictor gets the null label)
        backbone = runlib.build_backbone(cfg, c_in, C)
    return MTDiffusion(backbone, cfg["task"], cfg["mt_variant"], C, cfg["image_size"], cfg["num_classes"],
                       cfg["mt_head"], cfg.get("seg_classes"), cfg["schedule"], cfg["T"], cfg["mt_weights"],
                       cfg["mt_scale"])


def training_loss(model, batch, sched, cfg, rng):
    """Eq. 6 through mt_loss, with the modality and the single-task rows drawn from the step's draws."""
    x0 = batch["image"]
    x = modality(cfg["task"], batch, rng)
    u = torch.rand(rng.batch_size, generator=rng.generator) < cfg["mt_drop"]      # (B_global,) single-task rows
    unknown = rng.local(u).float()                                                # (B,) this rank's
    head_rows = (int(u.sum()) if model.variant == "X" else rng.batch_size) * len(x0) / rng.batch_size
    loss, mse, l_x, head = mt_loss(model, sched, x0, x, batch["t"], batch["noise"], unknown, cfg["target"],
                                   cfg["mt_lambda"], batch["weight"],
                                   max(head_rows, len(x0) / rng.batch_size))
    stats = {"mse": mse.detach(), "head": l_x.detach()}
    if cfg["task"] != "masked":  # on the rows without E(x) in z_t: reading x from the image
        hit = (head.argmax(1) == x).float().view(len(x), -1).mean(1)
        stats["acc"] = (hit * unknown).sum() / unknown.sum().clamp(min=1)
    return loss, stats
