"""diffusion.py against independent derivations: Monte-Carlo chains, Gaussian conditioning, oracles."""
import math

import numpy as np
import pytest
import torch

import diffusion as D


@pytest.fixture(scope="module")
def sched():
    return D.Schedule.make("linear", 1000)


def test_betas_endpoints_and_cosine_clip():
    lin = D.make_betas("linear", 1000)
    assert lin.dtype == torch.float64 and len(lin) == 1000
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = D.make_betas("cosine", 1000)
    assert cos.max().item() == pytest.approx(0.999)  # the last beta hits the clip
    # alpha_bar of the cosine schedule follows f(t)/f(0) where it is not clipped (Nichol & Dhariwal Eq. 17)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    ab = torch.cumprod(1 - cos, 0)
    for i in (0, 100, 500, 900):
        assert ab[i].item() == pytest.approx(f((i + 1) / 1000) / f(0), rel=1e-9)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        D.make_betas("sigmoid", 10)


def test_q_sample_matches_iterated_one_step_chain(sched):
    # Run x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z step by step and compare moments to Eq. 4.
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.3], dtype=torch.float64)
    n, t_end = 200_000, 300
    x = x0.expand(n, 2).clone()
    for i in range(t_end + 1):
        x = (1 - sched.betas[i]).sqrt() * x + sched.betas[i].sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)
    ab = sched.alpha_bar[t_end].item()
    assert torch.allclose(x.mean(0), math.sqrt(ab) * x0, atol=5 * math.sqrt((1 - ab) / n))  # 5 sigma
    assert torch.allclose(x.var(0), torch.full((2,), 1 - ab, dtype=torch.float64), rtol=1e-2)
    # and q_sample itself has those moments
    t = torch.full((n,), t_end)
    xs = D.q_sample(sched, x0.float().view(1, 2, 1, 1).expand(n, 2, 1, 1), t, torch.randn(n, 2, 1, 1, generator=g))
    assert torch.allclose(xs.mean(0).flatten(), math.sqrt(ab) * x0.float(), atol=5 * math.sqrt((1 - ab) / n))
    assert torch.allclose(xs.var(0).flatten(), torch.full((2,), 1 - ab), rtol=1e-2)


def test_parameterisation_round_trips(sched):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    x_t = D.q_sample(sched, x0, t, eps)
    assert torch.allclose(D.x0_from_eps(sched, x_t, t, eps), x0, atol=2e-3)
    assert torch.allclose(D.eps_from_x0(sched, x_t, t, x0), eps, atol=2e-3)
    v = D.v_target(sched, x0, t, eps)
    x0_v, eps_v = D.x0_eps_from_v(sched, x_t, t, v)
    assert torch.allclose(x0_v, x0, atol=1e-5) and torch.allclose(eps_v, eps, atol=1e-5)
    for target in D.TARGETS:
        out = D.training_target(sched, x0, t, eps, target)
        x0_hat, eps_hat = D.split_prediction(sched, x_t, t, out, target)
        assert torch.allclose(x0_hat, x0, atol=2e-3) and torch.allclose(eps_hat, eps, atol=2e-3)
    # v = sqrt(ab) eps - sqrt(1 - ab) x0: for x0 = 0, ||v||^2 = ab ||eps||^2
    assert torch.allclose(D.v_target(sched, torch.zeros_like(x0), t, eps).pow(2).sum((1, 2, 3)),
                          (sched.alpha_bar[t].float() * eps.pow(2).sum((1, 2, 3))), rtol=1e-5)


@pytest.mark.parametrize("i", [1, 10, 500, 999])
def test_posterior_matches_numerical_gaussian_conditioning(sched, i):
    # Joint of (x_{t-1}, x_t) given x0 for a scalar, then condition on x_t with the usual Schur formulas.
    ab_prev, a = sched.alpha_bar[i - 1].item(), sched.alphas[i].item()
    x0, x_t = 0.4, -1.3
    mu = np.array([math.sqrt(ab_prev) * x0, math.sqrt(a * ab_prev) * x0])
    S = np.array([[1 - ab_prev, math.sqrt(a) * (1 - ab_prev)],
                  [math.sqrt(a) * (1 - ab_prev), a * (1 - ab_prev) + (1 - a)]])
    mean_ref = mu[0] + S[0, 1] / S[1, 1] * (x_t - mu[1])
    var_ref = S[0, 0] - S[0, 1] ** 2 / S[1, 1]
    t = torch.tensor([i])
    mean, var = D.q_posterior(sched, torch.full((1, 1, 1, 1), x0), torch.full((1, 1, 1, 1), x_t), t)
    assert mean.item() == pytest.approx(mean_ref, rel=1e-5, abs=1e-6)
    assert var.item() == pytest.approx(var_ref, rel=1e-5)


def test_ddim_eta1_equals_ddpm_posterior_step(sched):
    g = torch.Generator().manual_seed(2)
    x_t, x0, z = (torch.randn(6, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([1, 5, 100, 400, 800, 999])
    eps = D.eps_from_x0(sched, x_t, t, x0)
    step = D.ddim_step(sched, x_t, t, t - 1, x0, eps, 1.0, z)
    mean, var = D.q_posterior(sched, x0, x_t, t)
    assert torch.allclose(step, mean + var.sqrt() * z, atol=1e-5)
    # the final step (t_prev = -1) returns x0 exactly
    last = D.ddim_step(sched, x_t, torch.zeros(6, dtype=torch.long), torch.full((6,), -1), x0, eps, 0.0, z)
    assert torch.allclose(last, x0, atol=1e-6)


def test_respaced_samplers_give_the_model_original_indices(sched):
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)
    D.ddim_sample(model, sched, (2, 1, 2, 2), steps=10)
    expected = D.timestep_subset(1000, 10).tolist()
    assert seen == expected and expected[0] == 999 and expected[-1] == 0
    seen.clear()
    D.ddpm_sample(model, sched, (2, 1, 2, 2), steps=10)
    assert seen == expected
    # the respaced chain keeps alpha_bar at the kept indices
    sub, idx = D.respaced_schedule(sched, 10)
    assert torch.allclose(sub.alpha_bar, sched.alpha_bar[idx])


@pytest.mark.parametrize("target", D.TARGETS)
def test_samplers_with_an_oracle_recover_a_point_mass(sched, target):
    # Data is the single image c: the ideal network output is known in closed form for every target.
    c = torch.tensor([0.5, -0.25, 0.0]).view(1, 3, 1, 1)

    def oracle(x, t):
        eps = D.eps_from_x0(sched, x, t, c.expand_as(x))
        return D.training_target(sched, c.expand_as(x), t, eps, target)
    g = torch.Generator().manual_seed(0)
    for x in (D.ddim_sample(oracle, sched, (4, 3, 2, 2), 20, target=target, generator=g),
              D.ddim_sample(oracle, sched, (4, 3, 2, 2), 20, eta=1.0, target=target, generator=g),
              D.ddpm_sample(oracle, sched, (4, 3, 2, 2), 50, target=target, generator=g)):
        assert torch.allclose(x, c.expand_as(x), atol=1e-4)


def test_ddpm_with_exact_gaussian_score_reproduces_the_data_variance(sched):
    # x0 ~ N(0, s^2): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab). The sampler must return N(0, s^2).
    s2 = 0.25

    def model(x, t):
        ab = D.extract(sched.alpha_bar, t, x)
        return (1 - ab).sqrt() * x / (ab * s2 + 1 - ab)
    g = torch.Generator().manual_seed(3)
    x = D.ddpm_sample(model, sched, (20_000, 1, 1, 1), clip=False, generator=g)
    assert x.var().item() == pytest.approx(s2, rel=0.04) and abs(x.mean().item()) < 0.01
    x = D.ddim_sample(model, sched, (20_000, 1, 1, 1), steps=200, clip=False, generator=g)
    assert x.var().item() == pytest.approx(s2, rel=0.04)


def test_classifier_free_guidance_combination():
    def model(x, t, y):
        return x * 0 + y.float().view(-1, 1, 1, 1)  # output = label value (null class = 10)
    x, t, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    out = D.cfg_model(model, y, 3.0, null_class=10)(x, t)
    assert torch.allclose(out, (10 + 3.0 * (y - 10)).float().view(-1, 1, 1, 1).expand_as(out))
    assert torch.equal(D.cfg_model(model, y, 1.0, 10)(x, t), model(x, t, y))


def test_diffusion_loss_weights_and_targets(sched):
    model = lambda x, t, y=None: torch.zeros_like(x)
    x0, eps = torch.ones(4, 1, 2, 2), torch.full((4, 1, 2, 2), 2.0)
    t = torch.tensor([0, 10, 20, 30])
    loss, mse = D.diffusion_loss(model, sched, x0, t, "eps", noise=eps)
    assert torch.allclose(mse, torch.full((4,), 4.0)) and loss.item() == pytest.approx(4.0)
    loss, mse = D.diffusion_loss(model, sched, x0, t, "x0", weight=torch.tensor([1.0, 0, 0, 0]), noise=eps)
    assert torch.allclose(mse, torch.ones(4)) and loss.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="prediction target"):
        D.diffusion_loss(model, sched, x0, t, "score", noise=eps)
    with pytest.raises(ValueError, match="sampling steps"):
        D.timestep_subset(1000, 0)


def test_sdedit_starts_at_the_respaced_step_below_t0_and_keeps_the_known_part(sched):
    # A 10-step sampler visits 999, 888, ..., 444, ...: SDEdit at t0 = 499 noises to 444 and continues from there.
    assert D.sdedit_timesteps(1000, 10, 499) == [444, 333, 222, 111, 0] and D.sdedit_timesteps(1000, 50, 999)[0] == 999
    with pytest.raises(ValueError, match="no sampling step"):
        D.sdedit_timesteps(1000, 2, -1)
    seen = []
    def record(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)
    x_in = torch.rand(2, 3, 4, 4) * 2 - 1
    D.sdedit(record, sched, x_in, 499, 10, generator=torch.Generator().manual_seed(0))
    assert seen == [444, 333, 222, 111, 0]
    # The oracle eps of a point mass at x_ref: DDIM from any noised copy of x_ref returns x_ref (DDIM Eq. 12
    # with the exact eps is exact), and the known part equals x_in wherever it is kept.
    x_ref = x_in.clone()
    oracle = lambda x, t: (x - D.extract(sched.alpha_bar, t, x).sqrt().float() * x_ref) / \
        (1 - D.extract(sched.alpha_bar, t, x)).sqrt().float()
    out = D.sdedit(oracle, sched, x_in, 700, 20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x_ref, atol=1e-4)
    known = torch.zeros_like(x_in, dtype=torch.bool)
    known[:, :1] = True
    edited = D.sdedit(lambda x, t: torch.zeros_like(x), sched, x_in, 999, 5, known=known,
                      generator=torch.Generator().manual_seed(2))
    assert torch.equal(edited[:, :1], x_in[:, :1]) and not torch.equal(edited[:, 1:], x_in[:, 1:])
