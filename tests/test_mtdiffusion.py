"""mtdiffusion.py: Eq. 3-5 against simulation and Gaussian conditioning, the DDPM limit, the prior KL,
heads, Algorithm 1, and a short training run per task through train.py and sample.py."""
import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffusion
import methods
import metrics
import minsnr
import mtdiffusion as mt
import mtdiffusion_eval
import runlib
import sample
import train
from diffusion import Schedule
from dit import build_dit
from unet import UNet



def make_model(task="masked", variant="U", arch="unet", T=1000, weights="sigma", scale=1.0, head="M", size=16):
    K = 4 if task == "label" else 0
    c_in = 6 if variant == "X" else 3
    if arch == "dit":
        bb = build_dit("DiT-T/4", size, c_in, K, 0.1, out_channels=3)
    else:
        bb = UNet(c_in, 3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_ds=(2,), num_classes=K, class_dropout_prob=0.1)
    return mt.MTDiffusion(bb, task, variant, 3, size, K, head, seg_classes=5, schedule="linear", T=T,
                          weights=weights, scale=scale)


def step_random(B, seed=0):
    """A training step's draws for a batch of B, as the loop makes them (one process)."""
    return runlib.StepRandom(torch.Generator().manual_seed(seed), B)


def perturb(model, std=0.05, seed=0):
    """Move every weight off its (partly zero) initialisation so that outputs and heads are not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def two_modality_weights(T):
    """Non-constant, different weights for two modalities, (2, T) float64."""
    t = torch.arange(T, dtype=torch.float64)
    return torch.stack([0.3 * t / T, 0.2 + 0.1 * torch.sin(t)])


# -----------------------------------------------------------------------------
# Eq. 3-5, Theorem 2

def test_marginal_matches_monte_carlo_forward_chain():
    """Eq. 4 against simulating Eq. 3 step by step, two modalities, non-constant weights."""
    sched, n, D = Schedule.make("linear", 50), 200_000, 3
    w = two_modality_weights(50)
    at = mt.aggregation_coefs(sched.alphas, w)                                    # (2, T)
    g = torch.Generator().manual_seed(0)
    z0, E = torch.tensor([0.8, -0.5, 0.1], dtype=torch.float64), torch.randn(2, D, generator=g, dtype=torch.float64)
    z = z0.expand(n, D).clone()
    for t in range(50):
        a = sched.alphas[t]
        z = a.sqrt() * (z + w[0, t] * E[0] + w[1, t] * E[1]) + (1 - a).sqrt() * torch.randn(n, D, generator=g, dtype=torch.float64)
        if t in (0, 9, 24, 49):
            tt = torch.tensor([t])
            mean = mt.q_sample_mt(sched, at, z0[None], tt, torch.zeros(1, D), E[:, None])[0]
            se = (1 - sched.alpha_bar[t]).sqrt() / math.sqrt(n)
            assert torch.allclose(z.mean(0), mean.double(), atol=5 * se + 1e-6), t
            assert torch.allclose(z.var(0), (1 - sched.alpha_bar[t]).expand(D), rtol=0.02), t
    assert at[:, -1].abs().max() > 0.5  # the modalities really shift z_t


def test_aggregation_coefs_closed_forms():
    """Constant alpha and w = 1: at_t = sum_{k=1}^{t+1} sqrt(a)^k (geometric); ramp and sigma: c sqrt(ab_t) f_t."""
    sched = Schedule(torch.full((20,), 0.1, dtype=torch.float64))
    r = math.sqrt(0.9)
    at = mt.aggregation_coefs(sched.alphas, torch.ones(20, dtype=torch.float64))
    assert torch.allclose(at, torch.tensor([r * (1 - r ** (t + 1)) / (1 - r) for t in range(20)], dtype=torch.float64))
    s = Schedule.make("cosine", 1000)
    ab, t = s.alpha_bar, torch.arange(1000, dtype=torch.float64)
    for name, f in (("ramp", (t + 1) / 1000), ("sigma", (1 - ab).sqrt())):
        at = mt.aggregation_coefs(s.alphas, mt.task_weights(name, s, 2.0))
        assert torch.allclose(at, 2.0 * ab.sqrt() * f, rtol=1e-9, atol=1e-12), name
    paper = mt.task_weights("paper", s)
    assert paper[0] == 0 and paper[999] == 999 and torch.isfinite(paper).all()


def chain_moments(sched, w, z0, E, t):
    """Mean and variance of z_t by propagating Eq. 3 exactly (no Theorem 2), numpy float64."""
    mean, var = z0.copy(), 0.0
    for s in range(t + 1):
        a = sched.alphas[s].item()
        mean = math.sqrt(a) * (mean + (w[:, s:s + 1] * E).sum(0))
        var = a * var + (1 - a)
    return mean, var


@pytest.mark.parametrize("t", [1, 2, 17, 49])
def test_posterior_matches_gaussian_conditioning(t):
    """Eq. 5 against Lemma 4 (Murphy): prior q(z_{t-1} | z_0, X), likelihood Eq. 3, conditioned numerically."""
    sched, D = Schedule.make("linear", 50), 3
    w = two_modality_weights(50)
    at = mt.aggregation_coefs(sched.alphas, w)
    rng = np.random.default_rng(t)
    z0, E, z_t = rng.normal(size=D), rng.normal(size=(2, D)), rng.normal(size=D)
    mu, v = chain_moments(sched, w.numpy(), z0, E, t - 1)                        # prior of z_{t-1}
    a = sched.alphas[t].item()
    Lam, A = np.eye(D) / v, math.sqrt(a) * np.eye(D)
    L, b = np.eye(D) / (1 - a), math.sqrt(a) * (w[:, t, None].numpy() * E).sum(0)
    Sigma = np.linalg.inv(Lam + A.T @ L @ A)
    post_mean = Sigma @ (A.T @ L @ (z_t - b) + Lam @ mu)
    tt = torch.tensor([t])
    mean, var = mt.q_posterior_mt(sched, at, w, torch.tensor(z0)[None], torch.tensor(z_t)[None], tt, torch.tensor(E)[:, None])
    assert np.allclose(mean[0].numpy(), post_mean, atol=1e-10)
    assert np.allclose(var.item() * np.eye(D), Sigma, atol=1e-12)


def test_reverse_mean_with_true_eps_is_posterior_mean():
    sched = Schedule.make("linear", 1000)
    w = torch.stack([mt.task_weights("sigma", sched), mt.task_weights("paper", sched) * 1e-3])
    at = mt.aggregation_coefs(sched.alphas, w)
    g = torch.Generator().manual_seed(1)
    B = 64
    z0, eps, E = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, 3, 4, 4), (B, 3, 4, 4), (2, B, 3, 4, 4)))
    t = torch.randint(0, 1000, (B,), generator=g)
    t[:2] = torch.tensor([0, 999])
    z_t = mt.q_sample_mt(sched, at, z0, t, eps, E)
    mean, _ = mt.q_posterior_mt(sched, at, w, z0, z_t, t, E)
    assert torch.allclose(mt.reverse_mean(sched, w, z_t, t, eps, E), mean, atol=1e-4)
    # t = 0 (the paper's t = 1): the posterior is a point mass at z_0
    assert torch.allclose(mean[t == 0], z0[t == 0], atol=1e-5)


def test_zero_weights_reduce_to_ddpm_exactly():
    sched = Schedule.make("cosine", 1000)
    w = mt.task_weights("sigma", sched, 0.0)
    at = mt.aggregation_coefs(sched.alphas, w)
    assert (at == 0).all()
    g = torch.Generator().manual_seed(2)
    z0, eps, E = (torch.randn(8, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (8,), generator=g)
    z_t = mt.q_sample_mt(sched, at, z0, t, eps, E)
    assert torch.equal(z_t, diffusion.q_sample(sched, z0, t, eps))
    mean, var = mt.q_posterior_mt(sched, at, w, z0, z_t, t, E)
    ref_mean, ref_var = diffusion.q_posterior(sched, z0, z_t, t)
    assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(var, ref_var)
    ddpm_mean, _ = diffusion.q_posterior(sched, diffusion.x0_from_eps(sched, z_t, t, eps), z_t, t)
    assert torch.allclose(mt.reverse_mean(sched, w, z_t, t, eps, E), ddpm_mean, atol=1e-4)


def test_zero_weights_sampler_and_loss_are_ddpm():
    """With w = 0 and variant U, Algorithm 1 is DDIM and the loss (lambda = 0) is diffusion_loss."""
    model = perturb(make_model("masked", "U", scale=0.0))
    sched = Schedule.make("linear", 1000)
    z, x = mt.mt_sample(model, sched, (4, 3, 16, 16), 8, generator=torch.Generator().manual_seed(0))
    ref = diffusion.ddim_sample(lambda a, t: model.backbone(a, t), sched, (4, 3, 16, 16), 8,
                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, ref, atol=1e-6) and x.shape == (4, 3, 16, 16)
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, "t": torch.randint(0, 1000, (4,), generator=g),
             "noise": torch.randn(4, 3, 16, 16, generator=g), "weight": None}
    cfg = dict(task="masked", mt_drop=0.2, target="eps", weighting="none", mt_lambda=0.0)
    loss, stats = mt.training_loss(model, batch, sched, cfg, step_random(4))
    ref_loss, ref_mse = diffusion.diffusion_loss(model.backbone, sched, batch["image"], batch["t"], noise=batch["noise"])
    assert torch.allclose(loss, ref_loss) and torch.allclose(stats["mse"], ref_mse)
    # x unknown on every row (--mt-drop 1): the single-task DDPM loss whatever the task weights
    model = perturb(make_model("translate", "U", scale=1.0))
    batch["seg"] = torch.randint(0, 5, (4, 16, 16), generator=g)
    loss, _ = mt.training_loss(model, batch, sched, {**cfg, "task": "translate", "mt_drop": 1.0}, step_random(4))
    ref_loss, _ = diffusion.diffusion_loss(model.backbone, sched, batch["image"], batch["t"], noise=batch["noise"])
    assert torch.allclose(loss, ref_loss)


def test_prior_kl_matches_monte_carlo():
    sched, n = Schedule.make("linear", 50), 400_000
    w = two_modality_weights(50)
    at = mt.aggregation_coefs(sched.alphas, w)
    z0, E = torch.tensor([[0.5, -1.0, 0.2, 0.0]]), torch.tensor([[[1.0, 0.5, -0.3, 0.2]], [[-0.2, 0.1, 0.4, 1.0]]])
    kl = mt.prior_kl(sched, at, z0, E).item()
    T = torch.tensor([49])
    m, v = mt.q_sample_mt(sched, at, z0, T, torch.zeros_like(z0), E).double(), 1 - sched.alpha_bar[-1]
    zT = m + v.sqrt() * torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_ratio = (-0.5 * (zT - m).pow(2) / v - 0.5 * v.log() + 0.5 * zT.pow(2)).sum(1)   # log q - log N(0, I)
    assert abs(log_ratio.mean().item() - kl) < 4 * log_ratio.std().item() / math.sqrt(n) + 1e-9
    assert kl > 0.05                                              # large enough for the check to mean something


def test_default_schedule_keeps_prior_near_ddpm_and_paper_does_not():
    sched, one = Schedule.make("linear", 1000), torch.ones(1, 1)
    kl = {k: mt.prior_kl(sched, mt.aggregation_coefs(sched.alphas, mt.task_weights(k, sched)), one, one).item()
          for k in mt.WEIGHTS}
    ddpm = mt.prior_kl(sched, torch.zeros(1000, dtype=torch.float64), one, one).item()
    assert kl["sigma"] < 5 * ddpm and kl["ramp"] < 5 * ddpm and kl["paper"] > 1e6 and kl["const"] > 1e3


# -----------------------------------------------------------------------------
# Masks, encoders, heads

def test_patch_mask_squares_counts_and_uniform_corners():
    g = torch.Generator().manual_seed(0)
    assert mt.patch_mask(torch.zeros(3, dtype=torch.long), 16, g).sum() == 0
    one = mt.patch_mask(torch.ones(20_000, dtype=torch.long), 16, g)[:, 0]      # side 16 / 4 = 4
    rows, cols = one.any(2).sum(1), one.any(1).sum(1)
    assert (one.sum((1, 2)) == rows * cols).all() and rows.max() == 4 and rows.min() >= 1   # one clipped square
    # a corner uniform on the 16 x 16 grid covers pixel (r, c) with probability (min(r, 3) + 1)(min(c, 3) + 1) / 256
    freq = one.float().mean(0)
    for r, c in ((0, 0), (0, 9), (2, 1), (8, 8), (15, 15)):
        p = (min(r, 3) + 1) * (min(c, 3) + 1) / 256
        assert abs(freq[r, c].item() - p) < 4 * math.sqrt(p * (1 - p) / 20_000), (r, c)
    many = mt.patch_mask(torch.tensor([10] * 500), 16, g)                      # overlapping squares
    assert 16 <= many.sum((1, 2, 3)).min() and many.sum((1, 2, 3)).max() <= 160
    assert many.sum((1, 2, 3)).float().mean() < 150                              # overlaps do happen


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("task,variant,head", [("masked", "U", "M"), ("masked", "X", "M"), ("label", "U", "M"),
                                               ("label", "U", "E"), ("translate", "X", "M")])
def test_heads_output_shapes(arch, task, variant, head):
    model = perturb(make_model(task, variant, arch, head=head))
    z, t = torch.randn(5, 3, 16, 16), torch.randint(0, 1000, (5,))
    out, h = model(z, t, None)
    assert out.shape == (5, 3, 16, 16)
    assert h.shape == {"masked": (5, 3, 16, 16), "label": (5, 4), "translate": (5, 5, 16, 16)}[task]
    x = {"masked": torch.rand(5, 3, 16, 16), "label": torch.arange(5) % 4, "translate": torch.randint(0, 5, (5, 16, 16))}[task]
    e = model.encode(x)
    assert e.shape == (5, 3, 16, 16)
    if task != "masked":  # a hard label and its one-hot probabilities encode the same
        K = 4 if task == "label" else 5
        assert torch.allclose(model.encode(torch.nn.functional.one_hot(x, K).movedim(-1, 1).float()), e, atol=1e-6)
    if task == "label":
        codes = model.label_codes()
        assert codes.shape == (4, 3, 16, 16) and abs(codes.pow(2).mean().item() - 1) < 1e-4
        assert codes.mean(0).abs().max() < 1e-5


def test_label_codes_are_fixed_while_the_backbone_trains():
    """Eq. 3's forward process must not change during training: the label codes E(y) are a buffer, saved
    with the weights, that no optimiser step and no EMA update moves."""
    model = make_model("label", "U").train()
    ema = copy.deepcopy(model).requires_grad_(False)
    codes = model.label_codes().clone()
    assert "codes" in model.state_dict() and not codes.requires_grad
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x0, y = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (8,), generator=g)
        t, eps = torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 3, 16, 16, generator=g)
        loss = mt.mt_loss(model, sched, x0, y, t, eps, torch.zeros(8))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        runlib.update_ema(ema, model, 0.9)
    assert torch.equal(model.label_codes(), codes) and torch.equal(ema.label_codes(), codes)


def test_training_loss_draws_as_one_process_on_every_rank_count():
    """The masks and the single-task rows come from the step's generator: two ranks' halves of the batch
    see exactly the draws of one process, so their per-sample losses match."""
    model = perturb(make_model("masked", "X"))
    sched = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(6, 3, 16, 16, generator=g) * 2 - 1, "t": torch.randint(0, 1000, (6,), generator=g),
             "noise": torch.randn(6, 3, 16, 16, generator=g)}
    batch["weight"] = minsnr.loss_weight(diffusion.snr(sched, batch["t"]), "eps", "min_snr")  # the loop's weight
    cfg = dict(task="masked", mt_drop=0.5, target="eps", weighting="min_snr", mt_lambda=0.1)
    whole = mt.training_loss(model, batch, sched, cfg, step_random(6))
    halves = [mt.training_loss(model, {k: v[r * 3:(r + 1) * 3] for k, v in batch.items()}, sched, cfg,
                               runlib.StepRandom(torch.Generator().manual_seed(0), 6, r, 2)) for r in (0, 1)]
    assert torch.allclose(torch.cat([h[1]["mse"] for h in halves]), whole[1]["mse"], atol=1e-6)
    # DDP averages the ranks' gradients: the mean of the ranks' losses must be the one process's loss
    assert torch.allclose((halves[0][0] + halves[1][0]) / 2, whole[0], atol=1e-6)


# -----------------------------------------------------------------------------
# Algorithm 1

def test_algorithm1_full_chain_is_line_12():
    """steps = T, eta = 1, no clipping: every step is mu(z_t, eps_theta) - w_t E + sigma_t eps (Alg. 1 line 12)."""
    model = perturb(make_model("translate", "U", T=50), std=0.02)
    sched = Schedule.make("linear", 50)
    z, x = mt.mt_sample(model, sched, (3, 3, 16, 16), 50, eta=1.0, clip=False, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    zz = torch.randn(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        for i in range(49, -1, -1):
            t = torch.full((3,), i)
            eps, head = model(zz, t)
            e = model.encode(head.softmax(1))
            sigma = sched.posterior_var[i].sqrt().float()
            zz = mt.reverse_mean(sched, model.w, zz, t, eps, e) + sigma * torch.randn(3, 3, 16, 16, generator=g)
    assert torch.allclose(z, zz, atol=1e-4, rtol=1e-4)
    assert torch.allclose(x, head.softmax(1))


def test_algorithm1_leaves_given_modalities_untouched():
    """A given modality is never replaced by its head's estimate: the result does not depend on the head."""
    model = perturb(make_model("masked", "X"))
    sched = Schedule.make("linear", 1000)
    xm = torch.rand(2, 3, 16, 16) * 2 - 1
    given = xm.clone()
    z, x = mt.mt_sample(model, sched, (2, 3, 16, 16), 6, x=xm, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, given) and torch.equal(xm, given)
    with torch.no_grad():
        for p in model.head.parameters():
            p.fill_(float("nan"))
    z2, _ = mt.mt_sample(model, sched, (2, 3, 16, 16), 6, x=xm, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z2) and torch.isfinite(z).all()


@pytest.mark.parametrize("variant", ["U", "X"])
def test_unknown_modality_is_estimated_and_enters_z_only_for_variant_u(variant):
    """Joint generation reads the head every step; U aggregates the estimate into z_t (lines 10-12), X
    leaves the unknown x out of z_t, as its training does."""
    model = perturb(make_model("masked", variant))
    with torch.no_grad():
        for p in model.head.parameters():
            p.fill_(float("nan"))
    z, x = mt.mt_sample(model, Schedule.make("linear", 1000), (2, 3, 16, 16), 6, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(x).all() and torch.isnan(z).all() == (variant == "U") and torch.isnan(z).any() == (variant == "U")


def test_restoration_keeps_the_unmasked_region():
    """Conditional generation with the known pixels pasted: the unmasked region comes back exactly (MSE < 1e-12)."""
    model = perturb(make_model("masked", "X"))
    sched = Schedule.make("linear", 1000)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    M = mt.patch_mask(torch.tensor([5, 10, 15, 20]), 16, torch.Generator().manual_seed(0))
    xm = x0 * (1 - M)
    z, _ = mt.mt_sample(model, sched, x0.shape, 10, x=xm, z0=xm, known=1 - M, generator=torch.Generator().manual_seed(0))
    assert metrics.unmasked_change(z, x0, M).max() < 1e-12
    assert metrics.masked_region_mse(z, x0, M).min() > 1e-4                         # the masked region was generated


# -----------------------------------------------------------------------------
# Through train.py and sample.py

TINY = ["--image-size", "16", "--batch-size", "8", "--log-every", "10", "--sample-every", "1000", "--ckpt-every", "1000",
        "--sample-steps", "3", "--warmup", "5", "--lr", "1e-3"]


@pytest.mark.parametrize("task,mode", [("masked", "mt-restore"), ("label", "mt-label"), ("translate", "mt-translate")])
def test_short_training_run_per_task_and_its_sample_mode(task, mode, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--method", "mtdiff", "--task", task, "--steps", "30", "--out", str(out)] + TINY)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 3 and log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert "head" in log[-1] and ("acc" in log[-1]) == (task != "masked")
    assert (out / "samples" / "step_0000030.png").exists()
    sample.main(["--ckpt", str(out), "--mode", mode, "--n", "4", "--steps", "3", "--mt-patches", "5", "--out", str(tmp_path / "s")])
    text = capsys.readouterr().out
    if task == "masked":
        assert "MT-Diffusion + paste" in text and (tmp_path / "s_m5.png").exists()
        paste = [line for line in text.splitlines() if "paste" in line][0]
        assert paste.endswith("/ 0.0000")                                  # the unmasked region is kept
        sample.main(["--ckpt", str(out), "--mode", "mt-joint", "--n", "3", "--steps", "3", "--out", str(tmp_path / "j")])
        assert torch.load(tmp_path / "j.pt")["modality"].shape == (3, 3, 16, 16)
    elif task == "label":
        assert "cross-entropy over uniform t" in text and "on clean images" in text
    else:
        assert "per-pixel accuracy" in text and (tmp_path / "s.png").exists()


def test_dit_label_run_with_routing(tmp_path):
    out = tmp_path / "dit"
    train.main(["--method", "mtdiff", "--task", "label", "--model", "DiT-T/4", "--routing", "dtr", "--steps", "3",
                "--mt-head", "E", "--out", str(out)] + TINY)
    model, cfg, sched = methods.load_run(str(out / "checkpoint.pt"))
    assert cfg["mt_variant"] == "U" and all(b.route_mask is not None for b in model.routable_blocks())
    # the label codes after 3 steps, raw and EMA, are those the model was built with at step 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.manual_seed(cfg["seed"])
    assert torch.equal(ckpt["model"]["codes"], methods.build_model(cfg).codes)
    assert torch.equal(ckpt["ema"]["codes"], ckpt["model"]["codes"])
    z, x = mt.mt_sample(model, sched, (2, 3, 16, 16), 3)
    assert x.shape == (2, 4) and torch.allclose(x.sum(1), torch.ones(2))


def test_bad_input_is_one_clear_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--mt-variant U"):
        train.main(["--method", "mtdiff", "--task", "label", "--mt-variant", "X", "--steps", "1", "--out", str(tmp_path / "a")] + TINY)
    with pytest.raises(SystemExit):
        train.main(["--method", "mtdiff", "--mt-drop", "1.5", "--out", str(tmp_path / "b")])
    assert "1.5 is outside [0, 1]" in capsys.readouterr().err
    train.main(["--method", "mtdiff", "--task", "translate", "--steps", "1", "--out", str(tmp_path / "c")] + TINY)
    with pytest.raises(SystemExit, match="needs a run trained with --task masked"):
        sample.main(["--ckpt", str(tmp_path / "c"), "--mode", "mt-restore", "--n", "2"])


def test_sdedit_noises_its_input_to_the_step_where_sampling_starts(tmp_path, monkeypatch):
    """mt-restore's SDEdit row: --mt-sdedit 0.5 asks for t0 = 499; a 10-step sampler starts at t = 444, so
    the input must be noised to 444, not 499."""
    assert diffusion.sdedit_timesteps(1000, 10, 499)[0] == 444 and diffusion.sdedit_timesteps(1000, 50, 999)[0] == 999
    model = perturb(make_model("masked", "X"))
    sched = Schedule.make("linear", 1000)
    noised_to, started_at = [], []
    q_sample_mt = mtdiffusion_eval.q_sample_mt
    def spy(sched, at, z0, t, eps, E):
        noised_to.append(int(t[0]))
        return q_sample_mt(sched, at, z0, t, eps, E)
    monkeypatch.setattr(mtdiffusion_eval, "q_sample_mt", spy)
    def sample_fn(n, **kw):
        if "t_start" in kw:
            started_at.append(kw["t_start"])
        return mt.mt_sample(model, sched, (n, 3, 16, 16), 10, **kw)
    args = SimpleNamespace(batch=4, seed=0, steps=10, mt_sdedit=0.5, mt_patches=[5])
    mtdiffusion_eval.restore_table(model, sched, sample_fn, torch.rand(2, 3, 16, 16) * 2 - 1, args, str(tmp_path / "r"))
    assert noised_to == [444] and started_at == [444]


@pytest.mark.parametrize("noised", [False, True])
def test_classifier_baselines_see_clean_or_noised_inputs(noised, monkeypatch, tmp_path):
    # The clean baseline reads x_0 at t = 0; the matched one reads x_t at uniform t, as the label head does.
    train.main(["--method", "mtdiff", "--task", "label", "--steps", "1", "--out", str(tmp_path)] + TINY)
    cfg = {**json.load(open(tmp_path / "config.json")), "steps": 3}
    seen = []
    real_build = mtdiffusion_eval.build_model
    def recording_build(cfg):
        model = real_build(cfg)
        forward = model.forward
        def spy(x, t, *a, **k):
            seen.append((x.detach().clone(), t.clone()))
            return forward(x, t, *a, **k)
        model.forward = spy
        return model
    monkeypatch.setattr(mtdiffusion_eval, "build_model", recording_build)
    mtdiffusion_eval.train_classifier(cfg, "cpu", noised=noised)
    ts = torch.cat([t for _, t in seen])
    assert len(seen) == 3 and (ts.max() > 0) == noised
    # Clean inputs stay in the data's range; noised ones reach beyond it.
    assert (max(x.abs().max().item() for x, _ in seen) > 1.0) == noised
