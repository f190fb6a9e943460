"""
Min-SNR-gamma loss weighting: a per-timestep weight for the eps-, x0- and v-prediction losses.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (ICCV)
    https://arxiv.org/abs/2303.09556
    Choi et al. 2022, "Perception Prioritized Training of Diffusion Models" (the P2 weighting)
    https://arxiv.org/abs/2204.00227

What is implemented:
    snr_of_alpha_bar, loss_weight   the per-timestep loss weights of Sec. 3.4 (constant, SNR, max-SNR-gamma,
                          min-SNR-gamma) and P2, for eps-, x0- and v-prediction. The paper states its
                          weights for x0-prediction. Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
                          ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2 (App. B), the eps weight is the x0
                          weight / SNR and the v weight is the x0 weight / (SNR + 1) (Sec. 4.2).
    config_weight         a run's weight from its flags; the loop puts it in every batch as
                          batch["weight"] (methods.loss_weight), so `--weighting min_snr --snr-gamma 5`
                          multiplies each sample's MSE by loss_weight(SNR(t), target, "min_snr", 5),
                          whatever method computes the MSE
    the hooks             the weighting is an axis of every method (methods.py): its flags, their
                          check, and the config keys a resumed run must keep
minsnr_eval.py holds the Pareto analysis of Sec. 3.2 (Eq. 10-13, Figure 4) and its command line.
Imports: diffusion.py and runlib.py only.

Run:
    python train.py --method minsnr            # eps-prediction with min-SNR-5
    python train.py --method minsnr_v          # v-prediction with min-SNR-5 (train.py's default)

Differences from the paper:
    - "none" is weight 1 on the MSE of whatever the network predicts (the DDPM baseline): it equals
      "snr" for eps-prediction and "const" for x0-prediction.
    - SNR is clamped to [SNR_MIN, SNR_MAX] = [1e-10, 1e10] before weighting, so that no weight is NaN
      or inf. This leaves the linear and cosine schedules untouched (their SNR lies in [2.4e-9, 2.4e4])
      and matters only at SNR exactly 0 (zero terminal SNR) or inf, where every finite limit comes out
      to within 1e-10 and the four weights whose limit is +inf are capped (listed in loss_weight).
"""
import math

import torch

import diffusion
import runlib

STRATEGIES = ("none", "const", "snr", "max_snr", "min_snr", "p2")
TARGETS = diffusion.TARGETS
SNR_MIN, SNR_MAX = 1e-10, 1e10


# -----------------------------------------------------------------------------
# Loss weights (Sec. 3.4 and 4.2)

def snr_of_alpha_bar(alpha_bar):
    """SNR = alpha_bar / (1 - alpha_bar), float64 (0 at alpha_bar = 0, inf at alpha_bar = 1); diffusion.snr
    gives the same for a schedule and timesteps."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return alpha_bar / (1 - alpha_bar)


def check_weight_args(strategy, target, gamma, p2_k, p2_gamma):
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown weighting strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}: choose one of {', '.join(TARGETS)}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0 (the paper uses 5), got {gamma}")
    if strategy == "min_snr" and gamma <= 0:  # max_snr is fine: max(SNR, 0) = SNR
        raise ValueError(f"min-SNR with gamma {gamma:g} gives every timestep weight min(SNR, {gamma:g}) = 0, so "
                         "nothing would be learned; use gamma > 0 (the paper uses 5)")
    if not (math.isfinite(p2_k) and p2_k > 0 and math.isfinite(p2_gamma) and p2_gamma >= 0):
        raise ValueError(f"P2 needs k > 0 and gamma >= 0 (Choi et al. use k = 1, gamma = 1), got k={p2_k}, "
                         f"gamma={p2_gamma}")


def x0_weight(snr, strategy, gamma, p2_k, p2_gamma):
    """The weight on ||x0 - x0_hat||^2, the space in which Sec. 3.4 states every strategy."""
    if strategy == "const":
        return torch.ones_like(snr)                    # w_t = 1
    if strategy == "snr":
        return snr                                     # w_t = SNR(t)
    if strategy == "max_snr":
        return snr.clamp(min=gamma)                    # w_t = max(SNR(t), gamma)
    if strategy == "min_snr":
        return snr.clamp(max=gamma)                    # w_t = min(SNR(t), gamma), the paper's proposal
    return snr / (p2_k + snr) ** p2_gamma              # P2: 1 / (k + SNR)^gamma on the eps-MSE, times SNR


def loss_weight(snr, target, strategy="min_snr", gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """Per-sample weight on the MSE of the network's own target (eps, x0 or v), float64, shape of snr.

    The weight follows `target`: the same strategy gives different numbers for different targets, so
    that the weighted losses agree in x0 space:
        strategy    x0            eps                 v
        const       1             1/SNR               1/(SNR+1)
        snr         SNR           1                   SNR/(SNR+1)
        max_snr     max(SNR, g)   max(SNR, g)/SNR     max(SNR, g)/(SNR+1)
        min_snr     min(SNR, g)   min(SNR, g)/SNR     min(SNR, g)/(SNR+1)
        p2          SNR/(k+SNR)^p 1/(k+SNR)^p         SNR/((SNR+1)(k+SNR)^p)
    and "none" is 1 for every target. const and max_snr grow like 1/SNR for eps-prediction: already
    2.5e4 at t = 999 of the linear schedule.

    Limits, which the clamp of SNR to [SNR_MIN, SNR_MAX] reproduces to within 1e-10:
        SNR -> 0   x0:  const 1, snr 0, max_snr g, min_snr 0, p2 0
                   eps: const +inf (capped at 1/SNR_MIN), snr 1, max_snr +inf (capped at g/SNR_MIN),
                        min_snr 1 (= min(SNR, g)/SNR, not 0/0), p2 1/k^p
                   v:   const 1, snr 0, max_snr g, min_snr 0, p2 0
        SNR -> inf x0:  const 1, snr +inf (capped at SNR_MAX), max_snr +inf (capped at SNR_MAX),
                        min_snr g, p2 SNR^(1-p): 1 at p = 1, 0 for p > 1, capped for p < 1
                   eps: const 0, snr 1, max_snr 1, min_snr 0, p2 0 (1 at p = 0)
                   v:   const 0, snr 1, max_snr 1, min_snr 0, p2 0 (1 at p = 0)
    """
    check_weight_args(strategy, target, gamma, p2_k, p2_gamma)
    snr = torch.as_tensor(snr, dtype=torch.float64)
    if snr.device.type == "cpu" and (snr.isnan() | (snr < 0)).any():  # a GPU check would stall the step
        raise ValueError("SNR values must be >= 0 (inf allowed), got a negative value or NaN")
    snr = snr.clamp(SNR_MIN, SNR_MAX)
    if strategy == "none":
        return torch.ones_like(snr)
    w = x0_weight(snr, strategy, gamma, p2_k, p2_gamma)
    if target == "x0":
        return w
    if target == "eps":
        return w / snr                                 # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
    return w / (snr + 1)                               # ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2


def config_weight(sched, t, cfg):
    """A run's per-sample loss weight at timesteps t (B,) from its --weighting, --target, --snr-gamma and
    --p2-k/--p2-gamma; None for --weighting none (every method's loss then takes the plain mean)."""
    if cfg["weighting"] == "none":
        return None
    return loss_weight(diffusion.snr(sched, t), cfg["target"], cfg["weighting"], cfg["snr_gamma"],
                       p2_k=cfg["p2_k"], p2_gamma=cfg["p2_gamma"])


# -----------------------------------------------------------------------------
# Hooks of the method protocol (methods.py): the loss weight is an axis of every method

def add_args(parser):
    g = parser.add_argument_group("per-timestep loss weight (minsnr.py)")
    g.add_argument("--weighting", choices=STRATEGIES, help="per-timestep loss weight; default none")
    g.add_argument("--snr-gamma", type=runlib.ranged(float, 0), help="gamma of min/max-SNR weighting (default 5)")
    g.add_argument("--p2-k", type=runlib.ranged(float, 0, lo_open=True), default=1.0)
    g.add_argument("--p2-gamma", type=runlib.ranged(float, 0), default=1.0)


def check_config(cfg):
    try:
        check_weight_args(cfg["weighting"], cfg["target"], cfg["snr_gamma"], cfg["p2_k"], cfg["p2_gamma"])
    except ValueError as e:
        raise runlib.RunError(str(e)) from None


def unused_flags(cfg):
    """The weight's settings that cfg's --weighting does not read: gamma without min_snr or max_snr, P2's
    k and gamma without p2."""
    w, read = cfg.get("weighting", "none"), resume_keys(cfg)
    users = {"snr_gamma": "min_snr or max_snr", "p2_k": "p2", "p2_gamma": "p2"}
    return {k: f"does nothing with --weighting {w}; drop it or pass --weighting {users[k]}"
            for k in users if k not in read}


def resume_keys(cfg):
    """The weight's settings: changing one on --resume would change the loss mid-run."""
    w = cfg.get("weighting", "none")
    return ("weighting",) + {"min_snr": ("snr_gamma",), "max_snr": ("snr_gamma",), "p2": ("p2_k", "p2_gamma")}.get(w, ())
