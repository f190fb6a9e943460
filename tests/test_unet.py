"""unet.py: shapes, the zero-output initialisation, class dropout, feature taps, routing hook, errors."""
import pytest
import torch

from unet import UNET_PRESETS, UNet, build_unet, timestep_embedding


def tiny(**kw):
    return UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_ds=(2,), **kw)


def test_shapes_any_channel_count_and_zero_init():
    torch.manual_seed(0)
    m = tiny(in_channels=4, out_channels=2, num_classes=5)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 4])
    out = m(x, t, y)
    assert out.shape == (3, 2, 8, 8)
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    torch.nn.init.normal_(m.out[-1].weight)
    assert m(x, t, y).abs().sum() > 0


def test_features_and_encode_decode_equal_forward():
    torch.manual_seed(0)
    m = tiny(num_classes=3)
    torch.nn.init.normal_(m.out[-1].weight, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    out, f = m(x, t, y, return_features=True)
    emb = m.embed(t, y)
    hs, mid = m.encode(m.conv_in(x), emb, t)
    assert len(hs) == len(m.skip_channels) and [h.shape[1] for h in hs] == m.skip_channels
    assert torch.allclose(m.out(m.decode(hs, mid, emb, t)), out, atol=1e-6)
    assert f["mid"].shape == (2, m.mid_channels, 4, 4) and f["last"].shape == (2, 16, 8, 8)


def test_class_dropout_uses_the_null_class():
    torch.manual_seed(0)
    m = tiny(num_classes=4, class_dropout_prob=1.0)
    t, y = torch.tensor([10, 20]), torch.tensor([1, 3])
    m.train()
    dropped = m.embed(t, y)
    m.eval()
    assert torch.allclose(dropped, m.embed(t, torch.tensor([4, 4])))  # null id = num_classes
    assert not torch.allclose(m.embed(t, y), dropped)                 # eval: labels kept
    assert torch.allclose(m.embed(t, None), dropped)                   # no labels = null class


def test_timestep_embedding_formula():
    e = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    assert torch.allclose(e[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]), atol=1e-6)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_routing_hook_masks_the_normalised_hidden_state():
    torch.manual_seed(0)
    m = tiny()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    ref = m(x, t)
    blocks = m.routable_blocks()
    assert blocks and all(b.route_mask is None for b in blocks)
    for b in blocks:
        b.route_mask = torch.ones(1000, b.route_channels)
    assert torch.equal(m(x, t), ref)  # all-ones masks change nothing
    for b in blocks:
        b.route_mask = torch.zeros(1000, b.route_channels)
    assert not torch.allclose(m(x, t), ref)
    assert all("route_mask" not in k for k in m.state_dict())  # masks are not parameters or saved state


def test_routing_errors_name_the_problem():
    m = tiny()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    block = m.routable_blocks()[0]
    block.route_mask = torch.ones(1000, block.route_channels + 1)
    with pytest.raises(ValueError, match="route_channels"):
        m(x, t)
    block.route_mask = torch.ones(1000, block.route_channels)
    with pytest.raises(ValueError, match="timestep"):
        block(torch.randn(2, block.route_channels, 8, 8), torch.randn(2, 4 * 16), None)


def test_presets_and_bad_sizes():
    for name in UNET_PRESETS:
        assert isinstance(build_unet(name), UNet)
    with pytest.raises(ValueError, match="unknown UNet preset"):
        build_unet("unet-huge")
    m = build_unet("unet-cpu")
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 3, 30, 30), torch.tensor([0]))
