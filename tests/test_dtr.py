"""dtr.py: mask formulas (Eq. 4), R-TR, App. B, App. F, routing on both backbones, samplers, CKA, figures."""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import hypergeom

import dtr
import dtr_eval
from diffusion import Schedule, ddim_sample, ddpm_sample, timestep_subset
from dit import DiTBlock, build_dit
from unet import AttentionBlock, ResBlock, UNet


def tiny_unet():
    return UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_ds=(2,))


def tiny_dit():
    return build_dit("DiT-T/4", 16, 3, num_classes=0, class_dropout_prob=0.0)


def perturb(model, std=0.05):
    """Move every trainable weight off its (partly zero) initialisation so that routing shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn_like(p))
    return model


def window(C, s, n):
    return [0.0] * s + [1.0] * n + [0.0] * (C - s - n)


# -----------------------------------------------------------------------------
# Masks

@pytest.mark.parametrize("T,C,alpha,beta", [(1000, 64, 0.8, 4.0), (1000, 192, 0.8, 4.0), (250, 37, 0.6, 1.0),
                                            (50, 10, 0.5, 0.5), (1000, 32, 1.0, 4.0)])
def test_dtr_window_positions_match_eq4(T, C, alpha, beta):
    m = dtr.dtr_masks(T, C, alpha, beta)
    n = math.floor(alpha * C)
    assert m.shape == (T, C) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[0].tolist() == window(C, 0, n)                          # t = 0 uses [0, n)
    assert m[T - 1].tolist() == window(C, C - n, n)                  # t = T-1 uses [C-n, C)
    for t in range(T):                                               # every row, middle t included
        s = round((t / (T - 1)) ** beta * (C - n))                   # Python floats, round half to even
        assert m[t].tolist() == window(C, s, n)
    assert (m.sum(1) == n).all()
    start = m.argmax(1)                                              # first active channel
    assert (start[1:] >= start[:-1]).all()


def test_dtr_masks_agree_with_a_linspace_formulation():
    """The authors' code evaluates the same formula on numpy.linspace(0, 1, T); the integers must agree."""
    import numpy as np
    for C in (32, 64, 96, 128, 192, 384, 768, 1152):
        for beta in (0.5, 1.0, 2.0, 4.0, 5.0):
            n = int(C * 0.8)
            s = np.round(np.linspace(0, 1, 1000) ** beta * (C - n)).astype(np.int64)
            assert dtr.window_start(1000, C, 0.8, beta).tolist() == s.tolist()


@pytest.mark.parametrize("T", [999, 500, 4000])
@pytest.mark.parametrize("beta", [1.0, 2.0, 4.0, 8.0])
def test_window_start_follows_the_authors_arithmetic_beyond_t1000(T, beta):
    """The official order of operations: t times the reciprocal 1/(T-1) (last point exactly 1), to the
    power beta, times C - n, rounded half to even; t / (T-1) differs from it in the last bit."""
    reciprocal = 1.0 / (T - 1)
    for alpha in (0.5, 0.8):
        for C in range(2, 72):
            n = int(C * alpha)
            if n < 1:
                continue
            u = [t * reciprocal for t in range(T)]
            u[-1] = 1.0
            expected = [round(v ** beta * (C - n)) for v in u]           # Python's round: half to even
            assert dtr.window_start(T, C, alpha, beta).tolist() == expected, (T, C, alpha, beta)


def test_window_start_where_division_and_reciprocal_round_apart():
    # 499 / 998 is exactly 0.5, 499 * (1 / 998) just below it: 1.5 rounds to 2, the authors' value to 1
    assert 499 / 998 * 3 == 1.5 and 499 * (1 / 998) * 3 < 1.5
    assert dtr.window_start(999, 11, 0.8, 1.0)[499].item() == 1
    assert dtr.dtr_masks(999, 11, 0.8, 1.0)[499].tolist() == window(11, 1, 8)


def test_beta_gives_high_timesteps_more_dedicated_channels():
    s = dtr.window_start(1000, 64, 0.8, 4.0)
    assert (s[:500] <= 1).all() and s[-1] == 13                      # the window moves late
    assert s[999] - s[899] > s[100] - s[0]


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(alpha=1.5), dict(beta=0.0), dict(beta=-1.0),
                                dict(C=0), dict(C=4, alpha=0.2)])
def test_bad_mask_arguments_raise_value_error(kw):
    args = dict(T=100, C=16, alpha=0.8, beta=4.0) | kw
    with pytest.raises(ValueError):
        dtr.dtr_masks(**args)


def test_random_masks_row_sums_and_seed():
    g = lambda s: torch.Generator().manual_seed(s)
    a, b, c = (dtr.random_masks(500, 40, 0.8, g(s)) for s in (3, 3, 4))
    assert (a.sum(1) == 32).all() and set(a.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != a[0]).any(1).sum() > 490                            # rows are not one repeated mask


def test_cdtr_and_ercdt_follow_the_clusters():
    T, C, K = 1000, 64, 8
    k = dtr.timestep_clusters(T, K)
    assert k[0] == 0 and k[-1] == K - 1 and torch.equal(k.bincount(), torch.full((K,), T // K))
    cd = dtr.cdtr_masks(T, C, 0.8, 4.0, K)
    assert torch.equal(cd, dtr.dtr_masks(K, C, 0.8, 4.0)[k])          # one DTR task per cluster
    assert torch.equal(cd[124], cd[0]) and not torch.equal(cd[999], cd[0])
    er = dtr.ercdt_masks(T, C, K)
    assert (er[:, : C // 2] == 1).all()                              # half shared by every task
    own = er[:, C // 2:]
    assert (own.sum(1) == (C - C // 2) // K).all()
    per_cluster = torch.stack([own[k == i][0] for i in range(K)])    # (K, C/2)
    assert (per_cluster.sum(0) == 1).all()                           # the segments tile the rest
    with pytest.raises(ValueError):
        dtr.ercdt_masks(T, 8, clusters=8)


# -----------------------------------------------------------------------------
# App. B: shared channels

def test_expected_shared_channels_is_the_hypergeometric_mean():
    for C, alpha in [(64, 0.8), (20, 0.5), (1152, 0.8), (7, 0.3)]:
        n = math.floor(alpha * C)
        pmf_mean = sum(k * math.comb(n, k) * math.comb(C - n, n - k) for k in range(n + 1)) / math.comb(C, n)
        assert dtr_eval.expected_shared_channels(C, alpha) == pytest.approx(pmf_mean, rel=1e-12)
        assert dtr_eval.expected_shared_channels(C, alpha) == pytest.approx(hypergeom(C, n, n).mean(), rel=1e-12)


def test_expected_shared_channels_against_monte_carlo():
    C, alpha, pairs = 20, 0.5, 4000
    m = dtr.random_masks(2 * pairs, C, alpha, torch.Generator().manual_seed(0))
    shared = (m[0::2] * m[1::2]).sum(1)                              # (pairs,) independent draws
    var = hypergeom(C, 10, 10).var()
    assert abs(shared.mean().item() - dtr_eval.expected_shared_channels(C, alpha)) < 4 * math.sqrt(var / pairs)
    assert shared.var().item() == pytest.approx(var, rel=0.1)


def test_dtr_shared_channels_fall_with_the_gap():
    T, C, alpha = 1000, 64, 0.8
    m, s, n = dtr.dtr_masks(T, C, alpha), dtr.window_start(T, C, alpha), 51
    for t1, t2 in [(0, 0), (0, 999), (500, 900), (990, 999), (700, 701)]:
        assert dtr_eval.shared_channels(m, t1, t2) == max(0, n - abs(s[t1] - s[t2]).item())
    from_end = [dtr_eval.shared_channels(m, 999 - g, 999) for g in range(0, 1000, 50)]
    assert from_end == sorted(from_end, reverse=True) and from_end[0] == n and from_end[-1] < n
    assert dtr_eval.shared_channels(m, 0, 999) < dtr_eval.expected_shared_channels(C, alpha)


# -----------------------------------------------------------------------------
# Routing on the two backbones

@pytest.mark.parametrize("build", [tiny_unet, tiny_dit])
def test_alpha_one_is_vanilla_and_alpha_below_one_is_not(build):
    torch.manual_seed(0)
    model = perturb(build()).eval()
    keys, n_params = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 998])
    vanilla = model(x, t)
    dtr.apply_routing(model, "dtr", alpha=1.0)
    assert all(b.route_mask is not None for b in model.routable_blocks())
    assert torch.equal(model(x, t), vanilla)
    for routing in ("dtr", "random"):
        dtr.apply_routing(model, routing, alpha=0.8, beta=4.0)
        assert not torch.allclose(model(x, t), vanilla, atol=1e-4)
        assert list(model.state_dict()) == keys                      # masks are non-persistent buffers
        assert sum(p.numel() for p in model.parameters()) == n_params
    dtr.apply_routing(model, "none")
    assert all(b.route_mask is None for b in model.routable_blocks())
    assert torch.equal(model(x, t), vanilla)


def test_dtr_shares_masks_by_width_and_random_is_per_block():
    model = tiny_unet()
    dtr.apply_routing(model, "dtr", T=100)
    for b in model.routable_blocks():
        assert torch.equal(b.route_mask, dtr.dtr_masks(100, b.route_channels))
    dtr.apply_routing(model, "random", T=100, seed=7)
    same_width = [b.route_mask for b in model.routable_blocks() if b.route_channels == 16]
    assert len(same_width) >= 2 and not torch.equal(same_width[0], same_width[1])
    again = dtr.apply_routing(tiny_unet(), "random", T=100, seed=7)
    other = dtr.apply_routing(tiny_unet(), "random", T=100, seed=8)
    for a, b, c in zip(model.routable_blocks(), again.routable_blocks(), other.routable_blocks()):
        assert torch.equal(a.route_mask, b.route_mask) and not torch.equal(a.route_mask, c.route_mask)


def test_apply_routing_rejects_bad_input():
    with pytest.raises(ValueError):
        dtr.apply_routing(tiny_unet(), "sliding")
    with pytest.raises(ValueError):
        dtr.apply_routing(torch.nn.Linear(2, 2), "dtr")


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit])
def test_respaced_samplers_use_the_masks_of_the_original_timesteps(build):
    torch.manual_seed(0)
    model = dtr.apply_routing(perturb(build()).eval(), "random", seed=1)  # rows differ, so a row names its t
    block = model.routable_blocks()[0]
    seen = []
    block.register_forward_pre_hook(lambda m, args: seen.append((args[2].clone(), m.route_mask[args[2]].clone())))
    sched = Schedule.make("linear", 1000)
    ddim_sample(lambda x, t: model(x, t), sched, (2, 3, 16, 16), steps=5, generator=torch.Generator().manual_seed(0))
    ts = timestep_subset(1000, 5)
    assert [t[0].item() for t, _ in seen] == ts.tolist()
    for (t, rows), orig in zip(seen, ts):
        assert torch.equal(rows, block.route_mask[orig].expand(2, -1))
    assert not torch.equal(seen[1][1][0], block.route_mask[1])       # not the position in the short chain
    seen.clear()
    ddpm_sample(lambda x, t: model(x, t), sched, (1, 3, 16, 16), steps=4, generator=torch.Generator().manual_seed(0))
    assert sorted(t.item() for t, _ in seen) == timestep_subset(1000, 4).sort().values.tolist()


def test_resblock_with_a_mask_is_x_plus_f_of_masked_h():
    torch.manual_seed(0)
    block = perturb(ResBlock(8, 16, emb_dim=12), std=0.2).eval()
    m = dtr.dtr_masks(10, 16, alpha=0.5, beta=2.0)
    block.route_mask = m
    x, emb, t = torch.randn(2, 8, 4, 4), torch.randn(2, 12), torch.tensor([0, 9])
    h = block.in_layers[2](F.silu(block.in_layers[0](x)))
    scale, shift = (block.emb_layers[1](F.silu(emb)))[:, :, None, None].chunk(2, dim=1)
    h = block.out_norm(h) * (1 + scale) + shift
    h = h * m[t][:, :, None, None]                                   # the routing mask
    expected = block.skip(x) + block.out_layers[2](F.silu(h))
    assert torch.allclose(block(x, emb, t), expected, atol=1e-6)
    block.route_mask = None
    assert not torch.allclose(block(x, emb, t), expected, atol=1e-3)


def test_attention_block_with_a_mask_is_x_plus_f_of_masked_h():
    torch.manual_seed(0)
    block = perturb(AttentionBlock(64, head_channels=32), std=0.2).eval()
    m = dtr.dtr_masks(10, 64)
    block.route_mask = m
    x, t = torch.randn(2, 64, 3, 3), torch.tensor([2, 9])
    h = block.norm(x).reshape(2, 64, 9) * m[t][:, :, None]           # (B, C, L)
    q, k, v = block.qkv(h).reshape(2, 3, 2, 32, 9).unbind(1)         # (B, heads, d, L) each
    w = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(32), dim=-1)  # (B, heads, L, L)
    a = (w @ v.transpose(-1, -2)).transpose(-1, -2).reshape(2, 64, 9)
    assert torch.allclose(block(x, None, t), x + block.proj(a).reshape(2, 64, 3, 3), atol=1e-5)


def test_dit_block_with_a_mask_is_x_plus_f_of_masked_x():
    torch.manual_seed(0)
    block = perturb(DiTBlock(32, num_heads=2), std=0.2).eval()
    m = dtr.random_masks(10, 32, 0.5, torch.Generator().manual_seed(0))
    block.route_mask = m
    x, c, t = torch.randn(2, 5, 32), torch.randn(2, 32), torch.tensor([1, 8])
    z = x * m[t][:, None, :]                                         # m * x
    sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
    z1 = z + g1[:, None] * block.attn(block.norm1(z) * (1 + sc1[:, None]) + sh1[:, None])
    z2 = z1 + g2[:, None] * block.mlp(block.norm2(z1) * (1 + sc2[:, None]) + sh2[:, None])
    assert torch.allclose(block(x, c, t), x + (z2 - z), atol=1e-5)  # x + F(m * x)


def test_resblock_input_placement_masks_the_residual_branch_input():
    """Eq. 3 read on the block input: skip(x) + F(m * x), with the mask as wide as the input."""
    torch.manual_seed(0)
    block = perturb(ResBlock(8, 16, emb_dim=12), std=0.2).eval()
    block.route_placement = "input"
    assert block.route_channels == 8
    m = dtr.dtr_masks(10, 8, alpha=0.5, beta=2.0)
    x, emb, t = torch.randn(2, 8, 4, 4), torch.randn(2, 12), torch.tensor([0, 9])
    xm = x * m[t][:, :, None, None]
    unrouted = block(xm, emb, t)                                     # skip(m x) + F(m x), no mask set
    block.route_mask = m
    assert torch.allclose(block(x, emb, t), block.skip(x) + unrouted - block.skip(xm), atol=1e-6)
    block.route_placement = "hidden"                                 # the other reading: another function
    block.route_mask = dtr.dtr_masks(10, 16, alpha=0.5, beta=2.0)
    assert not torch.allclose(block(x, emb, t), block.skip(x) + unrouted - block.skip(xm), atol=1e-3)


def test_attention_input_placement_normalises_the_masked_input():
    torch.manual_seed(0)
    block = perturb(AttentionBlock(64, head_channels=32), std=0.2).eval()
    m = dtr.dtr_masks(10, 64)
    x, t = torch.randn(2, 64, 3, 3), torch.tensor([2, 9])
    xm = x * m[t][:, :, None, None]
    expected = x + (block(xm, None, t) - xm)                         # x + F(m * x)
    block.route_placement, block.route_mask = "input", m
    assert torch.allclose(block(x, None, t), expected, atol=1e-5)


def test_apply_routing_placement_on_both_backbones():
    torch.manual_seed(0)
    net = perturb(tiny_unet()).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    hidden = net(x, t)                                               # unrouted
    dtr.apply_routing(net, "dtr", placement="input")
    blocks = net.routable_blocks()
    assert all(b.route_placement == "input" and b.route_mask.shape == (1000, b.route_channels) for b in blocks)
    assert any(isinstance(b, ResBlock) and b.route_channels != b.route_hidden_channels for b in blocks)
    out_input = net(x, t)
    dtr.apply_routing(net, "dtr")                                    # default: hidden
    assert all(b.route_placement == "hidden" for b in blocks)
    out_hidden = net(x, t)
    assert not torch.allclose(out_input, out_hidden, atol=1e-4) and not torch.allclose(out_hidden, hidden, atol=1e-4)
    dtr.apply_routing(tiny_dit(), "dtr", placement="input")          # DiT: its only placement
    with pytest.raises(ValueError, match="UNet reading"):
        dtr.apply_routing(tiny_dit(), "dtr", placement="hidden")
    with pytest.raises(ValueError, match="placement"):
        dtr.apply_routing(tiny_unet(), "dtr", placement="output")


def test_resume_keys_follow_what_the_masks_depend_on():
    assert dtr.resume_keys({"routing": "none"}) == ("routing",)
    assert set(dtr.resume_keys({"routing": "dtr"})) == {"routing", "dtr_alpha", "dtr_beta", "dtr_placement"}
    assert "seed" in dtr.resume_keys({"routing": "random"}) and "dtr_beta" not in dtr.resume_keys({"routing": "random"})
    assert set(dtr.resume_keys({"routing": "ercdt"})) == {"routing", "dtr_placement"}    # no alpha, beta or seed


# -----------------------------------------------------------------------------
# CKA (Fig. 6)

def test_linear_cka_properties():
    torch.manual_seed(0)
    X = torch.randn(40, 12)
    Q, _ = torch.linalg.qr(torch.randn(12, 12))
    assert dtr_eval.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert dtr_eval.linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-10)  # orthogonal invariance
    assert dtr_eval.linear_cka(X, 3.7 * X + 2.0) == pytest.approx(1.0, abs=1e-10)  # isotropic scale, shift
    Y = torch.randn(40, 7)
    assert dtr_eval.linear_cka(X, Y) < 0.5
    assert dtr_eval.linear_cka(X, X * torch.linspace(0.1, 5, 12)) < 0.99   # not invariant to any linear map
    with pytest.raises(ValueError):
        dtr_eval.linear_cka(X, Y[:30])


def test_linear_cka_feature_and_gram_forms_agree_with_the_definition():
    torch.manual_seed(0)
    for n, p, q in [(50, 6, 9), (8, 300, 40)]:                       # feature form, then Gram form
        X, Y = torch.randn(n, p).double(), torch.randn(n, p).double() @ torch.randn(p, q).double()
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        ref = (Yc.T @ Xc).norm() ** 2 / ((Xc.T @ Xc).norm() * (Yc.T @ Yc).norm())
        assert dtr_eval.linear_cka(X, Y) == pytest.approx(ref.item(), rel=1e-9)


def test_few_rows_of_many_features_bias_cka_towards_one():
    """Why block_features makes one row per pixel/token by default: unrelated (8, 4096) matrices score ~1."""
    torch.manual_seed(0)
    assert dtr_eval.linear_cka(torch.randn(8, 4096), torch.randn(8, 4096)) > 0.95
    assert dtr_eval.linear_cka(torch.randn(4096, 8), torch.randn(4096, 8)) < 0.05


def test_block_features_and_cka_matrix():
    torch.manual_seed(0)
    model = dtr.apply_routing(perturb(tiny_unet()), "dtr")
    sched, x0 = Schedule.make("linear", 1000), torch.randn(6, 3, 16, 16)
    nb = len(model.routable_blocks())
    kw = dict(noise=torch.randn(6, 3, 16, 16))
    f = dtr_eval.block_features(model, x0, [0, 500, 500, 999], [0, nb - 1], sched, **kw)
    assert f[0].shape == (4, 6 * 16 * 16, 16) and model.training      # one row per pixel, C columns
    assert torch.equal(f[0][1], f[0][2]) and not torch.equal(f[0][0], f[0][3])
    flat = dtr_eval.block_features(model, x0, [0, 999], [0], sched, per_position=False, **kw)[0]
    assert flat.shape == (2, 6, 16 * 16 * 16)
    assert torch.equal(flat[1].reshape(6, 16, 256).transpose(1, 2).reshape(-1, 16), f[0][3])
    m = dtr_eval.cka_matrix(f[nb - 1])
    assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(4, dtype=torch.float64))
    assert m[1, 2] == pytest.approx(1.0) and m[0, 3] < 0.9
    with pytest.raises(ValueError):
        dtr_eval.block_features(model, x0, [0], [nb], sched)
    with pytest.raises(ValueError):
        dtr_eval.block_features(model, x0, [1000], [0], sched)


def test_block_features_on_dit_tokens():
    torch.manual_seed(0)
    model = dtr.apply_routing(perturb(tiny_dit()), "random")
    f = dtr_eval.block_features(model, torch.randn(3, 3, 16, 16), [10, 900], [5], Schedule.make("linear", 1000),
                           generator=torch.Generator().manual_seed(0))
    assert f[5].shape == (2, 3 * 16, 192)                            # 16 tokens of 192 channels per image


# -----------------------------------------------------------------------------
# Figures

def test_mask_figure_cli(tmp_path, capsys):
    out = tmp_path / "masks.png"
    dtr_eval.main(["--channels", "16", "--T", "50", "--out", str(out)])
    from PIL import Image
    image = Image.open(out)
    assert image.height >= 50 and image.width >= 2 * 16
    assert "n = 12 active channels" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dtr_eval.main(["--alpha", "0", "--out", str(out)])
    assert "alpha must lie in (0, 1]" in capsys.readouterr().err


def test_cka_image_has_one_cell_per_pair():
    image = dtr_eval.cka_image(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), [0, 999], "block 0", cell=10)
    assert image.width >= 20 and image.height >= 20
    assert dtr_eval.colour(0.0) != dtr_eval.colour(1.0) and dtr_eval.colour(float("nan")) == (128, 128, 128)
