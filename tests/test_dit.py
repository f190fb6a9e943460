"""Tests for dit.py: official names and shapes, formulas, label dropout, routing, presets."""
import math

import pytest
import torch
import torch.nn.functional as F

from dit import DIT_PRESETS, Attention, DiT, TimestepEmbedder, build_dit, get_2d_sincos_pos_embed, modulate

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
             num_classes=10, class_dropout_prob=0.1, learn_sigma=True)


def small_dit(**overrides):
    torch.manual_seed(0)
    return DiT(**{**SMALL, **overrides})


def randomize(model, std=0.1):
    """Give every weight (not the fixed pos_embed) a random value, so no branch is zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, std)
    return model


def inputs(model, N=3):
    torch.manual_seed(2)
    S, C = model.input_size, model.in_channels
    return torch.randn(N, C, S, S), torch.randint(0, 1000, (N,)), torch.randint(0, max(model.num_classes, 1), (N,))


# -----------------------------------------------------------------------------
# Names and shapes of the authors' state_dict

def test_state_dict_matches_official_table():
    # Written out from the authors' models.py for SMALL: D = 64, p = 2, 16 tokens, 10 classes + null,
    # out_channels = 2 * 4 (learn_sigma), mlp hidden = 4 D, frequency embedding size 256.
    expected = {
        "pos_embed": (1, 16, 64),
        "x_embedder.proj.weight": (64, 4, 2, 2), "x_embedder.proj.bias": (64,),
        "t_embedder.mlp.0.weight": (64, 256), "t_embedder.mlp.0.bias": (64,),
        "t_embedder.mlp.2.weight": (64, 64), "t_embedder.mlp.2.bias": (64,),
        "y_embedder.embedding_table.weight": (11, 64),
        "blocks.0.attn.qkv.weight": (192, 64), "blocks.0.attn.qkv.bias": (192,),
        "blocks.0.attn.proj.weight": (64, 64), "blocks.0.attn.proj.bias": (64,),
        "blocks.0.mlp.fc1.weight": (256, 64), "blocks.0.mlp.fc1.bias": (256,),
        "blocks.0.mlp.fc2.weight": (64, 256), "blocks.0.mlp.fc2.bias": (64,),
        "blocks.0.adaLN_modulation.1.weight": (384, 64), "blocks.0.adaLN_modulation.1.bias": (384,),
        "blocks.1.attn.qkv.weight": (192, 64), "blocks.1.attn.qkv.bias": (192,),
        "blocks.1.attn.proj.weight": (64, 64), "blocks.1.attn.proj.bias": (64,),
        "blocks.1.mlp.fc1.weight": (256, 64), "blocks.1.mlp.fc1.bias": (256,),
        "blocks.1.mlp.fc2.weight": (64, 256), "blocks.1.mlp.fc2.bias": (64,),
        "blocks.1.adaLN_modulation.1.weight": (384, 64), "blocks.1.adaLN_modulation.1.bias": (384,),
        "final_layer.linear.weight": (32, 64), "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (128, 64), "final_layer.adaLN_modulation.1.bias": (128,),
    }
    model = small_dit()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert not model.pos_embed.requires_grad
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-6 and not m.elementwise_affine for m in norms)


def reference_forward(sd, x, t, y, p, heads):
    """DiT's forward written again from its equations, with nothing but the state_dict tensors."""
    N, D = x.shape[0], sd["pos_embed"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]                   # (N, T, D)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    t_freq = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    c = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                 sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = c + sd["y_embedder.embedding_table.weight"][y]                  # (N, D)
    lin = lambda v, name: F.linear(v, sd[name + ".weight"], sd[name + ".bias"])
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1")[:, None].chunk(6, dim=-1)
        q, k, v = lin(ln(h) * (1 + sc1) + sh1, b + "attn.qkv").reshape(N, -1, 3, heads, D // heads).unbind(2)
        a = torch.softmax(torch.einsum("nshd,nthd->nhst", q, k) / math.sqrt(D // heads), dim=-1)
        h = h + g1 * lin(torch.einsum("nhst,nthd->nshd", a, v).reshape(N, -1, D), b + "attn.proj")
        mlp_in = ln(h) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(mlp_in, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        i += 1
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    return lin(ln(h) * (1 + scale) + shift, "final_layer.linear")        # (N, T, p * p * C_out)


def test_forward_matches_reference_equations():
    model = randomize(small_dit()).eval()
    x, t, y = inputs(model)
    tokens = reference_forward(model.state_dict(), x, t, y, p=2, heads=4)
    torch.testing.assert_close(model(x, t, y), model.unpatchify(tokens), atol=1e-5, rtol=1e-5)


def test_unconditional_has_no_label_table_and_ignores_y():
    model = randomize(small_dit(num_classes=0))
    assert not any(k.startswith("y_embedder") for k in model.state_dict())
    x, t, _ = inputs(model)
    assert torch.equal(model(x, t), model(x, t, torch.tensor([5, 6, 7])))


def test_no_null_row_without_dropout():
    model = small_dit(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match="labels must lie"):
        model(*inputs(model)[:2], torch.tensor([0, 1, 10]))


# -----------------------------------------------------------------------------
# Output shape and adaLN-Zero initialisation

@pytest.mark.parametrize("kwargs, channels", [({"learn_sigma": True}, 8), ({"learn_sigma": False}, 4),
                                              ({"learn_sigma": True, "out_channels": 5}, 5)])
def test_output_shape(kwargs, channels):
    model = small_dit(**kwargs)
    x, t, y = inputs(model)
    assert model(x, t, y).shape == (3, channels, 8, 8)


def test_zero_output_at_init_then_nonzero():
    model = small_dit()
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros(3, 8, 8, 8))
    for block in model.blocks:  # adaLN-Zero: every block is the identity at init
        assert torch.equal(block.adaLN_modulation[-1].weight, torch.zeros(384, 64))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    assert model(x, t, y).abs().max() > 1e-3


def test_unpatchify_puts_each_value_back_in_its_pixel():
    model = small_dit(learn_sigma=False)
    p, C, S = 2, 4, 8
    img = torch.randn(1, C, S, S)
    tokens = torch.zeros(1, (S // p) ** 2, p * p * C)
    for i in range(S // p):
        for j in range(S // p):
            for a in range(p):
                for b in range(p):
                    for ch in range(C):  # token (i, j) stores its pixels in (row, col, channel) order
                        tokens[0, i * (S // p) + j, (a * p + b) * C + ch] = img[0, ch, i * p + a, j * p + b]
    assert torch.equal(model.unpatchify(tokens), img)


# -----------------------------------------------------------------------------
# Fixed embeddings against their formulas

def test_pos_embed_formula():
    D, G = 16, 4
    table = torch.from_numpy(get_2d_sincos_pos_embed(D, G))
    assert table.shape == (G * G, D)
    quarter = D // 4
    for row, col in [(0, 0), (0, 3), (2, 1), (3, 3)]:
        for c in range(D):
            pos = col if c < D // 2 else row       # first half: column, second half: row
            k = c % (D // 2)
            w = 10000 ** (-(k % quarter) / quarter)
            expected = math.sin(pos * w) if k < quarter else math.cos(pos * w)
            assert table[row * G + col, c].item() == pytest.approx(expected, abs=1e-12)
    model = small_dit()
    assert torch.equal(model.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(64, 4)).float())


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 999])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    for n, tn in enumerate(t.tolist()):
        for k in [0, 1, 5, 64, 127]:
            f = math.exp(-math.log(10000) * k / 128)  # float32 arguments up to 999: ~1e-4 error
            assert emb[n, k].item() == pytest.approx(math.cos(tn * f), abs=2e-4)
            assert emb[n, 128 + k].item() == pytest.approx(math.sin(tn * f), abs=2e-4)
    odd = TimestepEmbedder.timestep_embedding(torch.tensor([2.5]), 7)
    assert odd.shape == (1, 7) and odd[0, 6] == 0
    assert odd[0, 0].item() == pytest.approx(math.cos(2.5), abs=1e-6)


# -----------------------------------------------------------------------------
# Label dropout for classifier-free guidance

def test_train_mode_with_p1_drops_every_label():
    model = randomize(small_dit(class_dropout_prob=1.0))
    x, t, y = inputs(model)
    null = torch.full_like(y, 10)
    model.train()
    dropped = model(x, t, y)
    model.eval()
    assert torch.equal(dropped, model(x, t, null))
    assert not torch.allclose(model(x, t, y), model(x, t, null))  # no dropout in eval


def test_force_drop_ids():
    model = randomize(small_dit()).eval()
    x, t, y = inputs(model)
    forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
    null = model(x, t, torch.full_like(y, 10))
    plain = model(x, t, y)
    assert torch.equal(forced[[0, 2]], null[[0, 2]]) and torch.equal(forced[1], plain[1])


def test_dropout_rate_matches_probability():
    model = small_dit(class_dropout_prob=0.3)
    labels = torch.zeros(20000, dtype=torch.long)
    torch.manual_seed(3)
    rate = (model.y_embedder.token_drop(labels) == 10).float().mean().item()
    assert rate == pytest.approx(0.3, abs=0.01)  # 3 standard deviations of a Bernoulli(0.3) mean


# -----------------------------------------------------------------------------
# Attention

def test_sdpa_attention_equals_naive_softmax():
    torch.manual_seed(4)
    attn = Attention(32, num_heads=4)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).unbind(2)               # each (N, T, heads, head_dim)
    scores = torch.einsum("nshd,nthd->nhst", q, k) / math.sqrt(8)          # (N, heads, T, T)
    out = torch.einsum("nhst,nthd->nshd", scores.softmax(-1), v).reshape(2, 5, 32)
    torch.testing.assert_close(attn(x), attn.proj(out), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Routing hook for DTR

def block_and_inputs():
    model = randomize(small_dit())
    block = model.blocks[0]
    torch.manual_seed(5)
    return model, block, torch.randn(3, 16, 64), torch.randn(3, 64), torch.tensor([0, 4, 9])


def test_all_ones_mask_is_the_plain_block():
    _, block, x, c, t = block_and_inputs()
    plain = block(x, c, t)
    block.route_mask = torch.ones(10, 64)
    assert torch.equal(block(x, c, t), plain)


def test_routed_block_equals_hand_formula():
    _, block, x, c, t = block_and_inputs()
    torch.manual_seed(6)
    mask = (torch.rand(10, 64) < 0.5).float()
    block.route_mask = mask
    m = mask[t][:, None, :]                                              # (N, 1, D)
    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
    y = m * x
    y = y + gate1[:, None] * block.attn(modulate(block.norm1(y), shift1, scale1))
    y = y + gate2[:, None] * block.mlp(modulate(block.norm2(y), shift2, scale2))
    expected = y + (1 - m) * x                                           # x + F(m x)
    torch.testing.assert_close(block(x, c, t), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected, block.residual(x, c), atol=1e-3)


def test_routing_adds_no_state_and_uses_each_sample_timestep():
    model, _, _, _, _ = block_and_inputs()
    n_params = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    x, _, y = inputs(model, N=2)
    t = torch.tensor([3, 7])
    plain = model(x, t, y)
    blocks = model.routable_blocks()
    assert len(blocks) == 2 and all(b.route_channels == 64 for b in blocks)
    torch.manual_seed(7)
    mask = (torch.rand(10, 64) < 0.5).float()
    mask[3] = 1                                     # timestep 3 keeps every channel
    for block in blocks:
        block.route_mask = mask
    routed = model(x, t, y)
    assert torch.equal(routed[0], plain[0]) and not torch.allclose(routed[1], plain[1])
    assert set(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_routing_errors():
    _, block, x, c, t = block_and_inputs()
    block.route_mask = torch.ones(10, 64)
    with pytest.raises(ValueError, match="timestep"):
        block(x, c)
    block.route_mask = torch.ones(10, 32)
    with pytest.raises(ValueError, match="route_channels"):
        block(x, c, t)


# -----------------------------------------------------------------------------
# Feature taps

def test_return_features():
    model = randomize(small_dit())
    x, t, y = inputs(model)
    out, feats = model(x, t, y, return_features=True)
    assert torch.equal(out, model(x, t, y))
    assert feats["tokens"].shape == feats["mid"].shape == (3, 16, 64) and feats["c"].shape == (3, 64)
    torch.testing.assert_close(model.unpatchify(model.final_layer(feats["tokens"], feats["c"])), out)


# -----------------------------------------------------------------------------
# Presets and argument checks

PAPER_TABLE_1 = {"S": (12, 384, 6, 33e6), "B": (12, 768, 12, 130e6), "L": (24, 1024, 16, 458e6),
                 "XL": (28, 1152, 16, 675e6)}


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_presets_build_the_paper_sizes(name):
    size, patch = name[len("DiT-"):].split("/")
    with torch.device("meta"):  # shapes only, no memory: even DiT-XL builds instantly
        model = build_dit(name, 32, 4, 1000, 0.1, learn_sigma=True)
    assert model.patch_size == int(patch)
    if size in PAPER_TABLE_1:
        depth, hidden, heads, params = PAPER_TABLE_1[size]
        assert (len(model.blocks), model.pos_embed.shape[-1], model.num_heads) == (depth, hidden, heads)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


def test_dit_s2_exact_parameter_count():
    model = build_dit("DiT-S/2", 32, 4, 1000, 0.1, learn_sigma=True)
    D, p, C_out, T = 384, 2, 8, 256
    per_block = (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + (D * 6 * D + 6 * D)
    count = (4 * p * p * D + D) + (256 * D + D + D * D + D) + 1001 * D + T * D + 12 * per_block \
        + (D * p * p * C_out + p * p * C_out) + (D * 2 * D + 2 * D)
    assert sum(q.numel() for q in model.parameters()) == count == 32_963_360


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(input_size=30, patch_size=4, hidden_size=64, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiT(input_size=8, patch_size=2, hidden_size=66, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="DiT-S/2"):
        build_dit("DiT-M/2", 32, 3, 0, 0.1)
    model = small_dit()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="x must"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="labels must lie"):
        model(x, t, torch.tensor([0, 11, 2]))
