"""Tests of minsnr.py: the weight table, the x0/eps/v equivalence, zero-SNR limits and the Pareto solvers."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import diffusion
import minsnr
import minsnr_eval
import train
from minsnr import STRATEGIES, loss_weight

# -----------------------------------------------------------------------------
# Weight table (minsnr.loss_weight's docstring), evaluated by hand at gamma = 5, P2 with k = 1, exponent 1

EXPECTED = {  # SNR -> target -> (none, const, snr, max_snr, min_snr, p2)
    0.5: {"x0": (1, 1, 0.5, 5, 0.5, 1 / 3),
          "eps": (1, 2, 1, 10, 1, 2 / 3),
          "v": (1, 2 / 3, 1 / 3, 10 / 3, 1 / 3, 2 / 9)},
    5.0: {"x0": (1, 1, 5, 5, 5, 5 / 6),
          "eps": (1, 0.2, 1, 1, 1, 1 / 6),
          "v": (1, 1 / 6, 5 / 6, 5 / 6, 5 / 6, 5 / 36)},
    10.0: {"x0": (1, 1, 10, 10, 5, 10 / 11),
           "eps": (1, 0.1, 1, 1, 0.5, 1 / 11),
           "v": (1, 1 / 11, 10 / 11, 10 / 11, 5 / 11, 10 / 121)},
}


@pytest.mark.parametrize("snr_value", sorted(EXPECTED))
@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_weights_match_the_table(snr_value, target):
    for strategy, expected in zip(STRATEGIES, EXPECTED[snr_value][target]):
        w = loss_weight(torch.tensor([snr_value]), target, strategy, gamma=5.0)
        assert w.dtype == torch.float64
        assert w.item() == pytest.approx(expected, rel=1e-12), (strategy, target, snr_value)


def test_other_gamma_and_p2_parameters():
    # min-SNR-1 at SNR 4: x0 min(4, 1) = 1, eps 1/4, v 1/5; max-SNR-1 at SNR 0.25: x0 1, eps 4, v 0.8
    assert loss_weight(4.0, "x0", "min_snr", 1.0).item() == pytest.approx(1.0)
    assert loss_weight(4.0, "eps", "min_snr", 1.0).item() == pytest.approx(0.25)
    assert loss_weight(4.0, "v", "min_snr", 1.0).item() == pytest.approx(0.2)
    assert loss_weight(0.25, "eps", "max_snr", 1.0).item() == pytest.approx(4.0)
    assert loss_weight(0.25, "v", "max_snr", 1.0).item() == pytest.approx(0.8)
    # P2 with k = 1, exponent 0.5 at SNR 3: eps 1/sqrt(4) = 1/2, x0 3/2, v (3/2)/4 = 3/8
    for target, expected in (("eps", 0.5), ("x0", 1.5), ("v", 0.375)):
        assert loss_weight(3.0, target, "p2", p2_k=1.0, p2_gamma=0.5).item() == pytest.approx(expected)


def test_snr_and_shapes():
    ab = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float32)
    s = minsnr.snr_of_alpha_bar(ab)
    assert s.dtype == torch.float64
    assert torch.allclose(s[:4], torch.tensor([0.0, 0.25, 1.0, 4.0], dtype=torch.float64), rtol=1e-6)
    assert math.isinf(s[4].item())
    w = loss_weight(torch.rand(3, 4, dtype=torch.float64) * 10, "v", "min_snr")
    assert w.shape == (3, 4)


# -----------------------------------------------------------------------------
# The equivalence behind the conversion (App. B)

def test_eps_and_v_losses_equal_weighted_x0_loss():
    g = torch.Generator().manual_seed(0)
    sched = diffusion.Schedule(torch.rand(60, generator=g, dtype=torch.float64) * 0.08 + 0.002)  # random alpha_bar
    B = 64
    t = torch.randint(0, sched.T, (B,), generator=g)
    x0, eps, x0_hat = (torch.randn(B, 3, 4, 4, generator=g) for _ in range(3))
    x_t = diffusion.q_sample(sched, x0, t, eps)
    eps_hat = diffusion.eps_from_x0(sched, x_t, t, x0_hat)                # the same prediction, as eps
    v, v_hat = diffusion.v_target(sched, x0, t, eps), diffusion.v_target(sched, x0_hat, t, eps_hat)
    sq = lambda a, b: (a - b).double().pow(2).sum(dim=(1, 2, 3))        # (B,)
    s = diffusion.snr(sched, t)
    assert s.min() < 0.5 < 5 < s.max()                                    # both sides of gamma = 5
    e_x0, e_eps, e_v = sq(x0, x0_hat), sq(eps, eps_hat), sq(v, v_hat)
    assert torch.allclose(e_eps, s * e_x0, rtol=1e-3)                     # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2
    assert torch.allclose(e_v, (s + 1) * e_x0, rtol=1e-3)                 # ||v - v_hat||^2 = (SNR+1) ||x0 - x0_hat||^2
    for strategy in STRATEGIES[1:]:                                       # "none" is plain MSE per target
        ref = loss_weight(s, "x0", strategy) * e_x0
        assert torch.allclose(loss_weight(s, "eps", strategy) * e_eps, ref, rtol=1e-3), strategy
        assert torch.allclose(loss_weight(s, "v", strategy) * e_v, ref, rtol=1e-3), strategy


# -----------------------------------------------------------------------------
# Zero terminal SNR and SNR = inf: finite weights, the right limits

LIMITS = {  # (SNR -> 0, SNR -> inf) per target, in STRATEGIES order; gamma 5, P2 k = 1, exponent 1
    "x0": ((1, 1, 0, 5, 0, 0), (1, 1, minsnr.SNR_MAX, minsnr.SNR_MAX, 5, 1)),
    "eps": ((1, 1 / minsnr.SNR_MIN, 1, 5 / minsnr.SNR_MIN, 1, 1), (1, 0, 1, 1, 0, 0)),
    "v": ((1, 1, 0, 5, 0, 0), (1, 0, 1, 1, 0, 0)),
}


def zero_terminal_snr():
    sched = diffusion.Schedule.make("cosine")
    alpha_bar = sched.alpha_bar.clone()
    alpha_bar[-1] = 0.0
    return minsnr.snr_of_alpha_bar(alpha_bar)


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_zero_terminal_snr_limits(target):
    s = zero_terminal_snr()
    assert s[-1] == 0
    for strategy, at_zero, at_inf in zip(STRATEGIES, *LIMITS[target]):
        w = loss_weight(s, target, strategy)
        assert torch.isfinite(w).all(), (strategy, target)
        assert w[-1].item() == pytest.approx(at_zero, rel=1e-9, abs=1e-9), (strategy, target)
        w_inf = loss_weight(torch.tensor([math.inf]), target, strategy)
        assert torch.isfinite(w_inf).all()
        assert w_inf.item() == pytest.approx(at_inf, rel=1e-9, abs=1e-9), (strategy, target)


def test_min_snr_eps_is_one_at_low_snr():
    # the 0/0 of min(SNR, g)/SNR: every timestep with SNR <= gamma has weight exactly 1
    s = zero_terminal_snr()
    w = loss_weight(s, "eps", "min_snr")
    assert (w[s <= 5] == 1).all() and (w[s > 5] < 1).all()


def test_clamp_leaves_standard_schedules_untouched():
    for name in ("linear", "cosine"):
        s = minsnr.snr_of_alpha_bar(diffusion.Schedule.make(name).alpha_bar)
        assert minsnr.SNR_MIN < s.min() and s.max() < minsnr.SNR_MAX
        assert torch.allclose(loss_weight(s, "eps", "const"), 1 / s, rtol=1e-12)


# -----------------------------------------------------------------------------
# Bad arguments

@pytest.mark.parametrize("call, match", [
    (lambda: loss_weight(1.0, "eps", "minsnr"), "min_snr"),
    (lambda: loss_weight(1.0, "epsilon", "min_snr"), "eps"),
    (lambda: loss_weight(1.0, "eps", "min_snr", gamma=-1.0), "gamma"),
    (lambda: loss_weight(1.0, "eps", "min_snr", gamma=math.nan), "gamma"),
    (lambda: loss_weight(1.0, "eps", "p2", p2_k=0.0), "P2"),
    (lambda: loss_weight(1.0, "eps", "p2", p2_gamma=-0.5), "P2"),
    (lambda: loss_weight(torch.tensor([-1.0]), "eps", "min_snr"), "SNR"),
    (lambda: minsnr_eval.timestep_bins(1000, 0), "bins"),
    (lambda: minsnr_eval.timestep_bins(1000, [5, 5, 10]), "increasing"),
    (lambda: minsnr_eval.pareto_weights(torch.ones(4)), "matrix"),
    (lambda: minsnr_eval.pareto_weights(torch.ones(2, 3), lam=-1.0), "lambda"),
    (lambda: minsnr_eval.pareto_objective(torch.ones(2, 3), torch.ones(3)), "one weight per gradient"),
    (lambda: minsnr_eval.select_params(nn.Linear(2, 2), ["out."]), "top-level names"),
    (lambda: minsnr_eval.strategy_bin_weights(diffusion.Schedule.make(), "x0", "min_snr", 4, gamma=0.0), "gamma"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli_needs_exactly_one_source():
    for argv in ([], ["--fresh", "--ckpt", "run/checkpoint.pt"]):
        with pytest.raises(SystemExit):
            minsnr_eval.main(argv)


# -----------------------------------------------------------------------------
# Pareto solvers (Eq. 10-13)

def random_gradients(K, P, seed, shared=1.0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(1, P, generator=g, dtype=torch.float64)         # a shared direction: not all conflict
    return torch.randn(K, P, generator=g, dtype=torch.float64) + shared * common


def assert_on_simplex(w):
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed, shared", [(0, 0.0), (1, 1.0), (2, 3.0)])
def test_frank_wolfe_satisfies_kkt_and_beats_fixed_weights(seed, shared):
    K = 10
    G = random_gradients(K, 40, seed, shared)
    w, obj = minsnr_eval.pareto_weights(G)
    assert_on_simplex(w)
    assert obj == pytest.approx(minsnr_eval.pareto_objective(G, w), rel=1e-12)
    # KKT of min w^T M w on the simplex: (M w)_k >= w^T M w for all k, with equality where w_k > 0
    Mw = (G @ G.T) @ w
    assert (Mw >= obj - 1e-7 * obj).all()
    assert torch.allclose(Mw[w > 1e-9], torch.full_like(Mw[w > 1e-9], obj), rtol=1e-6)
    sched = diffusion.Schedule.make("linear")
    for strategy in STRATEGIES:
        w_s = minsnr_eval.strategy_bin_weights(sched, "eps", strategy, K)
        assert obj <= minsnr_eval.pareto_objective(G, w_s) + 1e-12
    torch.manual_seed(seed)
    dirichlet = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((500,))
    assert obj <= min(minsnr_eval.pareto_objective(G, d) for d in dirichlet) + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_two_gradients_closed_form(seed):
    G = random_gradients(2, 7, seed, shared=seed * 0.7)
    g1, g2 = G
    w1 = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1).item()
    w, obj = minsnr_eval.pareto_weights(G)
    assert w[0].item() == pytest.approx(w1, abs=1e-8)
    assert obj == pytest.approx((w1 * g1 + (1 - w1) * g2).pow(2).sum().item(), rel=1e-10)


def test_two_gradients_clipped():
    g2 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    w, obj = minsnr_eval.pareto_weights(torch.stack([3 * g2, g2]))             # same direction: the shorter wins
    assert w.tolist() == pytest.approx([0.0, 1.0], abs=1e-12) and obj == pytest.approx(6.0)


@pytest.mark.parametrize("seed, lam", [(0, 0.0), (1, 0.0), (2, 0.5), (3, 2.0)])
def test_three_gradients_match_grid_search(seed, lam):
    G = random_gradients(3, 5, seed, shared=0.5)
    M = G @ G.T + lam * torch.eye(3, dtype=torch.float64)
    n = 400
    grid = torch.tensor([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)],
                        dtype=torch.float64)                              # (N, 3) points of the simplex
    objs = ((grid @ M) * grid).sum(1)
    best = objs.argmin()
    w, obj = minsnr_eval.pareto_weights(G, lam=lam)
    assert_on_simplex(w)
    assert obj <= objs[best].item() + 1e-12                               # never worse than the grid
    assert objs[best].item() - obj <= 1e-3 * objs[best].item()            # and the grid is close
    assert (w - grid[best]).abs().max() < 0.02


def test_ugd_approaches_the_optimum_from_above():
    G = random_gradients(6, 30, 5, shared=1.5)
    w_fw, obj_fw = minsnr_eval.pareto_weights(G)
    w_ugd, obj_ugd = minsnr_eval.pareto_weights_ugd(G)
    assert_on_simplex(w_ugd)
    assert obj_fw - 1e-10 <= obj_ugd <= obj_fw * (1 + 1e-3)
    assert (w_ugd - w_fw).abs().max() < 0.05


def spread_gradients(K, P, seed, decades):
    """K random directions whose norms span `decades` powers of ten: an ill-conditioned Gram matrix."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=g, dtype=torch.float64)
    return G / G.norm(dim=1, keepdim=True) * torch.logspace(0, decades, K, dtype=torch.float64)[:, None]


def ugd_with_warnings(G):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, obj = minsnr_eval.pareto_weights_ugd(G)
    return w, obj, [c for c in caught if issubclass(c.category, RuntimeWarning) and "did not converge" in str(c.message)]


def test_ugd_warns_when_it_has_not_converged():
    """Gradient norms spread over 10^3: UGD's fixed Adam budget ends above the optimum. Either its result is
    within 1% of the Frank-Wolfe optimum, or it says it has not converged."""
    warned = 0
    for seed in range(4):
        G = spread_gradients(10, 40, seed, 3)
        obj_fw = minsnr_eval.pareto_weights(G)[1]
        _, obj_ugd, caught = ugd_with_warnings(G)
        assert caught or obj_ugd <= obj_fw * 1.01, (seed, obj_ugd / obj_fw)
        warned += bool(caught)
    assert warned                                                          # these cases are hard for UGD
    _, obj_ugd, caught = ugd_with_warnings(random_gradients(6, 30, 5, shared=1.5))
    assert not caught                                                      # a well-conditioned one converges


def test_strategy_bin_weights():
    sched = diffusion.Schedule.make("linear")
    for strategy in STRATEGIES:
        assert_on_simplex(minsnr_eval.strategy_bin_weights(sched, "v", strategy, 10))
    for target, strategy in (("eps", "none"), ("x0", "const"), ("eps", "snr")):  # weight 1 on the target's MSE
        assert torch.allclose(minsnr_eval.strategy_bin_weights(sched, target, strategy, 4),
                              torch.full((4,), 0.25, dtype=torch.float64))
    ab = sched.alpha_bar
    inv = (1 - ab) / ab                                                   # eps weight of "const": 1/SNR
    means = torch.stack([inv[i * 250:(i + 1) * 250].mean() for i in range(4)])
    assert torch.allclose(minsnr_eval.strategy_bin_weights(sched, "eps", "const", 4), means / means.sum())


# -----------------------------------------------------------------------------
# Bin gradients

class AffineModel(nn.Module):
    """out = a x_t + b: a model whose loss gradient has a closed form."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.3)), nn.Parameter(torch.tensor(-0.1))

    def forward(self, x, t):
        return self.a * x + self.b


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_bin_gradients_closed_form(target):
    sched = diffusion.Schedule.make("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    model = AffineModel()
    G = minsnr_eval.bin_gradients(model, sched, x0, target, bins=[10, 11, 600, 601], noise=eps, generator=g)
    assert G.shape == (3, 2)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)          # Ho et al.'s schedule, by hand
    for row, t in ((0, 10), (2, 600)):                                     # single-timestep bins
        ab = torch.prod(1 - betas[: t + 1])
        x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
        e, x = eps.double(), x0.double()
        y = {"eps": e, "x0": x, "v": ab.sqrt() * e - (1 - ab).sqrt() * x}[target]
        r = model.a.item() * x_t + model.b.item() - y                        # residual of the MSE
        expected = torch.stack([2 * (r * x_t).mean(), 2 * r.mean()]).float()  # d/da, d/db of mean(r^2)
        assert torch.allclose(G[row], expected, rtol=1e-4, atol=1e-6), (target, t)


@pytest.mark.parametrize("model_target, target", [("eps", "x0"), ("x0", "v"), ("v", "eps"), ("eps", "v")])
def test_bin_gradients_convert_another_targets_output(model_target, target):
    """A model trained for model_target, measured in target space: its output is converted first, so an
    eps model's x0 loss is ||x0 - (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)||^2."""
    sched = diffusion.Schedule.make("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    model = AffineModel()
    G = minsnr_eval.bin_gradients(model, sched, x0, target, bins=[10, 11, 600, 601], noise=eps, generator=g,
                             model_target=model_target)
    raw = minsnr_eval.bin_gradients(model, sched, x0, target, bins=[10, 11, 600, 601], noise=eps,
                               generator=torch.Generator().manual_seed(0))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for row, t in ((0, 10), (2, 600)):
        ab = torch.prod(1 - betas[: t + 1])
        s0, s1 = ab.sqrt(), (1 - ab).sqrt()
        e, x = eps.double(), x0.double()
        x_t = s0 * x + s1 * e
        a, b = torch.tensor(model.a.item(), dtype=torch.float64, requires_grad=True), \
            torch.tensor(model.b.item(), dtype=torch.float64, requires_grad=True)
        out = a * x_t + b
        x0_hat, eps_hat = {"eps": ((x_t - s1 * out) / s0, out), "x0": (out, (x_t - s0 * out) / s1),
                           "v": (s0 * x_t - s1 * out, s1 * x_t + s0 * out)}[model_target]
        v = lambda x_, e_: s0 * e_ - s1 * x_
        pred, y = {"eps": (eps_hat, e), "x0": (x0_hat, x), "v": (v(x0_hat, eps_hat), v(x, e))}[target]
        expected = torch.stack(torch.autograd.grad((pred - y).pow(2).mean(), [a, b])).float()
        assert torch.allclose(G[row], expected, rtol=1e-4, atol=1e-6), (model_target, target, t)
    assert not torch.allclose(G, raw, rtol=1e-2)                            # the raw comparison is another number


@pytest.fixture(scope="module")
def tiny_unet():
    from unet import build_unet
    torch.manual_seed(0)
    model = build_unet("unet-cpu", ch=16)
    for p in model.parameters():                                           # undo the zero init so every layer
        if p.ndim > 1 and p.abs().max() == 0:                              # gets a gradient
            nn.init.normal_(p, std=0.05)
    return model.eval()


def test_pareto_on_a_tiny_model(tiny_unet):
    sched = diffusion.Schedule.make("cosine")
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    G = minsnr_eval.bin_gradients(tiny_unet, sched, x0, "v", bins=5, generator=torch.Generator().manual_seed(2))
    P = sum(p.numel() for p in tiny_unet.parameters())
    assert G.shape == (5, P) and torch.isfinite(G).all()
    assert (G.norm(dim=1) > 0).all()
    w, obj = minsnr_eval.pareto_weights(G)
    assert_on_simplex(w)
    for strategy in STRATEGIES:
        w_s = minsnr_eval.strategy_bin_weights(sched, "v", strategy, 5)
        assert obj <= minsnr_eval.pareto_objective(G, w_s) * (1 + 1e-9)
    # a subset of parameters: the gradient of the output block alone is the matching slice of G
    out = minsnr_eval.select_params(tiny_unet, ["out."])
    G_out = minsnr_eval.bin_gradients(tiny_unet, sched, x0, "v", bins=5, params=out,
                                 generator=torch.Generator().manual_seed(2))
    n_out = sum(p.numel() for p in out)
    assert torch.allclose(G_out, G[:, P - n_out:], rtol=1e-4, atol=1e-7)


def test_cli_fresh_prints_the_tables(monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(minsnr_eval, "load_batch", lambda data, size, n, seed: (
        torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.zeros(n, dtype=torch.long)))
    minsnr_eval.main(["--fresh", "--image-size", "16", "--bins", "4", "--batch-size", "2", "--target", "eps"])
    text = capsys.readouterr().out
    for name in STRATEGIES + ("pareto-FW", "pareto-UGD", "Figure 4"):
        assert name in text
    fw_row = [line for line in text.splitlines() if line.strip().startswith("pareto-FW") and " x" in line]
    assert fw_row and "x    1.000" in fw_row[0]
    # eps-prediction, min-SNR: weight exactly 1 at t = 999 (SNR ~ 4e-5 < gamma)
    row = [line for line in text.splitlines() if line.strip().startswith("min_snr")][0]   # eps block first
    assert row.split()[-1] == "1"


def test_cli_converts_a_runs_output_to_another_target(tmp_path, capsys):
    train.main(["--method", "ddpm", "--image-size", "16", "--batch-size", "4", "--steps", "1", "--sample-every",
                "1000", "--sample-steps", "1", "--out", str(tmp_path / "eps")])
    capsys.readouterr()
    argv = ["--ckpt", str(tmp_path / "eps"), "--bins", "2", "--batch-size", "2", "--params", "out."]
    minsnr_eval.main(argv + ["--target", "x0"])
    assert "the model predicts eps; its output is converted to x0" in capsys.readouterr().out
    minsnr_eval.main(argv)
    assert "converted" not in capsys.readouterr().out
