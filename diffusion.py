"""
The DDPM baseline that every paper in this repository modifies.

    Ho et al. 2020, "Denoising Diffusion Probabilistic Models"        https://arxiv.org/abs/2006.11239
    Song et al. 2021, "Denoising Diffusion Implicit Models"            https://arxiv.org/abs/2010.02502
    Nichol & Dhariwal 2021, "Improved DDPM" (cosine schedule)          https://arxiv.org/abs/2102.09672
    Salimans & Ho 2022, "Progressive Distillation" (v-prediction)      https://arxiv.org/abs/2202.00512
    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"           https://arxiv.org/abs/2207.12598

What is here, as small functions over a `Schedule` of float64 tensors:
    make_betas        linear (Ho et al.) and cosine (Nichol & Dhariwal Eq. 17, beta clipped at 0.999)
    q_sample          x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps        (DDPM Eq. 4)
    snr               alpha_bar_t / (1 - alpha_bar_t)
    eps / x0 / v      conversions, with v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
    q_posterior       mean and variance of q(x_{t-1} | x_t, x0)                     (DDPM Eq. 6-7)
    ddpm_sample       ancestral sampling, full or respaced
    ddim_sample       DDIM with any eta and any number of steps                     (DDIM Eq. 12)
    sdedit            SDEdit (Meng et al. 2022): noise an image to t0 and denoise it; with a known
                      part kept, inpainting by replacement
    cfg_model         classifier-free guidance around any model
    diffusion_loss    the training loss for the target chosen by --target eps|x0|v

Conventions: timesteps are integer indices 0..T-1. A sampler that skips steps still hands the
model the ORIGINAL index, so timestep embeddings and DTR masks see the timestep they were trained
on. Schedules live in float64; coefficients are cast to the data's dtype only where they are used,
and the noising math runs in float32 even under autocast.

Imports: nothing of the project (the bottom of the base).

Run `python diffusion.py` to print the schedule at a few timesteps.

Differences from the papers: none in the math. Learned variances (Improved DDPM) are not trained;
DiT's learn_sigma output is accepted and its second half ignored.
"""
import math

import torch

TARGETS = ("eps", "x0", "v")


# -----------------------------------------------------------------------------
# Schedules

def make_betas(name, T=1000):
    """beta_1..beta_T as a float64 tensor of length T."""
    if name == "linear":  # Ho et al. 2020, scaled so that any T keeps the same end points
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":  # Nichol & Dhariwal 2021, Eq. 17, s = 0.008
        s = 0.008
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {name!r}: choose 'linear' or 'cosine'")


class Schedule:
    """Every per-timestep coefficient the samplers and losses need, in float64."""

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1 - betas                                   # alpha_t
        self.alpha_bar = torch.cumprod(self.alphas, 0)            # alpha_bar_t = prod_{s<=t} alpha_s
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # q(x_{t-1} | x_t, x0) variance, DDPM Eq. 7: beta_tilde = (1 - ab_{t-1}) / (1 - ab_t) * beta_t
        self.posterior_var = betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)

    @classmethod
    def make(cls, name="linear", T=1000):
        return cls(make_betas(name, T))

    def to(self, device):
        for k, v in vars(self).items():
            if torch.is_tensor(v):
                setattr(self, k, v.to(device))
        return self


def extract(coef, t, x):
    """coef[t] in float64 for integer timesteps t (B,), shaped to broadcast against x (B, ...).

    Callers combine coefficients in float64 and cast once (`.float()`) before touching the data:
    near t = 0, 1 - alpha_bar formed in float32 loses three digits.
    """
    out = coef.to(x.device)[t.to(x.device)]                                  # (B,) float64
    return out.view(-1, *([1] * (x.ndim - 1)))


def snr(sched, t):
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps, float64."""
    ab = sched.alpha_bar.to(t.device)[t]
    return ab / (1 - ab)


# -----------------------------------------------------------------------------
# Forward process and the three parameterisations

def q_sample(sched, x0, t, eps):
    """x_t ~ q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (DDPM Eq. 4)."""
    ab = extract(sched.alpha_bar, t, x0)
    return ab.sqrt().float() * x0.float() + (1 - ab).sqrt().float() * eps.float()


def x0_from_eps(sched, x_t, t, eps):
    ab = extract(sched.alpha_bar, t, x_t)
    return (1 / ab.sqrt()).float() * x_t - ((1 - ab) / ab).sqrt().float() * eps


def eps_from_x0(sched, x_t, t, x0):
    ab = extract(sched.alpha_bar, t, x_t)
    return (1 / (1 - ab).sqrt()).float() * x_t - (ab / (1 - ab)).sqrt().float() * x0


def v_target(sched, x0, t, eps):
    """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans & Ho 2022, Sec. 4)."""
    ab = extract(sched.alpha_bar, t, x0)
    return ab.sqrt().float() * eps - (1 - ab).sqrt().float() * x0


def x0_eps_from_v(sched, x_t, t, v):
    """Invert v: x0 = sqrt(ab) x_t - sqrt(1-ab) v, eps = sqrt(1-ab) x_t + sqrt(ab) v."""
    a, s = extract(sched.alpha_bar, t, x_t).sqrt().float(), (1 - extract(sched.alpha_bar, t, x_t)).sqrt().float()
    return a * x_t - s * v, s * x_t + a * v


def training_target(sched, x0, t, eps, target):
    """What the network regresses for --target eps|x0|v."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return v_target(sched, x0, t, eps)
    raise ValueError(f"unknown prediction target {target!r}: choose one of {TARGETS}")


def split_prediction(sched, x_t, t, out, target, clip=False):
    """Turn a network output for `target` into (x0_hat, eps_hat). clip: clamp x0_hat to [-1, 1]."""
    out = out.float()
    if target == "eps":
        x0, eps = x0_from_eps(sched, x_t, t, out), out
    elif target == "x0":
        x0, eps = out, eps_from_x0(sched, x_t, t, out)
    elif target == "v":
        x0, eps = x0_eps_from_v(sched, x_t, t, out)
    else:
        raise ValueError(f"unknown prediction target {target!r}: choose one of {TARGETS}")
    if clip:  # keep eps consistent with the clipped x0, as ADM does
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(sched, x_t, t, x0)
    return x0, eps


def q_posterior(sched, x0, x_t, t):
    """Mean and variance of q(x_{t-1} | x_t, x0), DDPM Eq. 6-7 (t >= 1; t = 0 gives variance 0)."""
    ab, ab_prev = extract(sched.alpha_bar, t, x_t), extract(sched.alpha_bar_prev, t, x_t)
    beta, alpha = extract(sched.betas, t, x_t), extract(sched.alphas, t, x_t)
    mean = (ab_prev.sqrt() * beta / (1 - ab)).float() * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)).float() * x_t
    return mean, extract(sched.posterior_var, t, x_t).float()


# -----------------------------------------------------------------------------
# Training loss

def sample_timesteps(n, T, device="cpu", generator=None):
    """Uniform integer timesteps in [0, T)."""
    return torch.randint(0, T, (n,), device=device, generator=generator)


def diffusion_loss(model, sched, x0, t, target="eps", weight=None, noise=None, model_kwargs=None):
    """Per-sample MSE between the network output and the target, and its weighted mean.

    weight: optional (B,) loss weight per sample (see minsnr.py). Returns (loss, mse) where loss is the
    scalar to minimise and mse the unweighted per-sample error (B,) for logging per timestep bin.
    """
    eps = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(sched, x0, t, eps)                                   # (B, C, H, W)
    out = model(x_t, t, **(model_kwargs or {}))                         # (B, C', H, W)
    out = out[:, : x0.shape[1]]                                         # learn_sigma: keep the mean half
    mse = (out.float() - training_target(sched, x0, t, eps, target)).pow(2).mean(dim=(1, 2, 3))  # (B,)
    w = torch.ones_like(mse) if weight is None else weight.to(mse)
    return (w * mse).mean(), mse.detach()


# -----------------------------------------------------------------------------
# Sampling

def cfg_model(model, y, scale, null_class):
    """Classifier-free guidance: eps = eps_uncond + s (eps_cond - eps_uncond) (Ho & Salimans Eq. 6).

    Returns a function (x, t) -> output. scale 1 (or y None) is the plain conditional model.
    Guidance is applied to the whole output, which is linear in eps for every target.
    """
    if y is None or scale == 1.0:
        return lambda x, t: model(x, t, y=y)

    def guided(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)
    return guided


def timestep_subset(T, steps):
    """`steps` original indices, evenly spaced from T-1 down to 0 (the respacing of DDIM / ADM)."""
    if not 1 <= steps <= T:
        raise ValueError(f"the number of sampling steps must be in [1, {T}], got {steps}")
    return torch.linspace(T - 1, 0, steps).round().long().unique_consecutive()


def ddim_step(sched, x_t, t, t_prev, x0, eps, eta, noise):
    """One DDIM update from t to t_prev (t_prev = -1 means the clean end), DDIM Eq. 12 and 16.

    sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev); eta = 1 is DDPM's
    ancestral step for the (respaced) chain, eta = 0 is deterministic.
    """
    ab = extract(sched.alpha_bar, t, x_t)
    ab_ext = torch.cat([sched.alpha_bar, sched.alpha_bar.new_ones(1)])   # index -1 -> alpha_bar = 1
    ab_prev = extract(ab_ext, torch.where(t_prev < 0, sched.T, t_prev), x_t)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
    dir_xt = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt().float() * eps
    return ab_prev.sqrt().float() * x0 + dir_xt + sigma.float() * noise


@torch.no_grad()
def ddim_sample(model_fn, sched, shape, steps=50, eta=0.0, target="eps", clip=True, generator=None,
                device="cpu", x_T=None, progress=False):
    """DDIM (Song et al. 2021) over `steps` original timestep indices; model_fn(x, t) -> network output."""
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ts = timestep_subset(sched.T, steps).tolist()
    it = zip(ts, ts[1:] + [-1])
    if progress:
        from tqdm import tqdm
        it = tqdm(list(it), desc=f"DDIM-{len(ts)}", leave=False)
    for i, i_prev in it:
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        t_prev = torch.full_like(t, i_prev)
        x0, eps = split_prediction(sched, x, t, model_fn(x, t)[:, : shape[1]], target, clip)
        noise = torch.randn(shape, generator=generator, device=device) if eta > 0 else torch.zeros_like(x)
        x = ddim_step(sched, x, t, t_prev, x0, eps, eta, noise)        # (B, C, H, W)
    return x


def sdedit_timesteps(T, steps, t0):
    """The descending timesteps at or below t0 of a `steps`-step respaced sampler: SDEdit noises its input to
    the first of them and denoises down the rest."""
    ts = [i for i in timestep_subset(T, steps).tolist() if i <= t0]
    if not ts:
        raise ValueError(f"no sampling step at or below t0 = {t0} with {steps} steps; raise t0 or the steps")
    return ts


@torch.no_grad()
def sdedit(model_fn, sched, x_in, t0, steps=50, target="eps", eta=0.0, known=None, generator=None):
    """SDEdit (Meng et al. 2022): noise x_in to t0 and denoise with DDIM (eta) to 0; model_fn(x, t) -> output.

    known (bool, broadcastable to x_in), optional: that part of x_in is kept, replaced before every step by
    x_in noised to the step's level (one noise draw for all steps) and by x_in itself at the end:
    inpainting by replacement when t0 = T - 1, a partial edit of the rest otherwise.
    """
    ts = sdedit_timesteps(sched.T, steps, t0)
    randn = lambda: torch.randn(x_in.shape, generator=generator, device=x_in.device)
    x = q_sample(sched, x_in, torch.full((len(x_in),), ts[0], device=x_in.device, dtype=torch.long), randn())
    eps_known = randn() if known is not None else None
    for i, i_prev in zip(ts, ts[1:] + [-1]):
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        if known is not None:
            x = torch.where(known, q_sample(sched, x_in, t, eps_known), x)     # (B, C, H, W)
        x0, eps = split_prediction(sched, x, t, model_fn(x, t), target, clip=True)
        noise = randn() if eta > 0 else torch.zeros_like(x)
        x = ddim_step(sched, x, t, torch.full_like(t, i_prev), x0, eps, eta, noise)
    return x if known is None else torch.where(known, x_in, x)


def respaced_schedule(sched, steps):
    """The DDPM chain on a subset of timesteps (Improved DDPM Sec. 4): betas from consecutive alpha_bar.

    Returns (Schedule over `steps` positions, the original index of each position).
    """
    idx = timestep_subset(sched.T, steps).flip(0)                       # ascending original indices
    ab = sched.alpha_bar[idx]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return Schedule(1 - ab / ab_prev), idx


@torch.no_grad()
def ddpm_sample(model_fn, sched, shape, steps=None, target="eps", clip=True, generator=None, device="cpu",
                x_T=None, progress=False):
    """Ancestral sampling with the posterior q(x_{t-1} | x_t, x0_hat) (DDPM Algorithm 2).

    steps=None runs all T steps; fewer steps respace the chain and still give the model original indices.
    """
    sub, orig = (sched, torch.arange(sched.T)) if steps in (None, sched.T) else respaced_schedule(sched, steps)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    it = range(sub.T - 1, -1, -1)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"DDPM-{sub.T}", leave=False)
    for i in it:
        k = torch.full((shape[0],), i, device=device, dtype=torch.long)   # position in the sub-chain
        t = orig.to(device)[k]                                            # original index for the model
        out = model_fn(x, t)[:, : shape[1]]
        # Convert with the ORIGINAL schedule (alpha_bar is the same at matching positions).
        x0, _ = split_prediction(sched, x, t, out, target, clip)
        mean, var = q_posterior(sub, x0, x, k)
        noise = torch.randn(shape, generator=generator, device=device) if i > 0 else torch.zeros_like(x)
        x = mean + var.sqrt() * noise                                     # (B, C, H, W)
    return x


if __name__ == "__main__":
    for name in ("linear", "cosine"):
        s = Schedule.make(name)
        print(f"{name} schedule, T = {s.T}")
        for i in (0, 99, 249, 499, 749, 999):
            ab = s.alpha_bar[i].item()
            print(f"  t={i:4d}  beta={s.betas[i].item():.5f}  alpha_bar={ab:.5f}  SNR={ab / (1 - ab):.4g}")
