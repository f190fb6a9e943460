"""jointnet.py: output preservation, the dense copy, zero convs, Direct Extend, inpainting, tiles, depth
alignment, and short stage-1 / Direct Extend runs through train.py."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
import jointnet
import jointnet_eval
import metrics
import minsnr
import runlib
import sample
import shapes
import train
from dit import build_dit
from jointnet import JointNet
from unet import UNet


def pretrained_unet(c=3, num_classes=4, seed=0):
    """A tiny UNet with every weight moved off its (partly zero) initialisation, standing in for a trained one."""
    torch.manual_seed(seed)
    net = UNet(c, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_ds=(2,), num_classes=num_classes,
               class_dropout_prob=0.1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


SCHED = diffusion.Schedule.make("linear", 1000)


# -----------------------------------------------------------------------------
# The model

@pytest.mark.parametrize("c_d", [1, 2, 3])
def test_rgb_output_equals_the_base_at_init(c_d):
    base = pretrained_unet()
    jn = JointNet(base, c_d).eval()
    for t_value in (0, 1, 499, 999):
        z = torch.randn(3, 3 + c_d, 16, 16)
        t, y = torch.full((3,), t_value), torch.tensor([0, 3, 4])  # 4 = the null class
        out = jn(z, t, y)
        assert out.shape == z.shape
        assert torch.equal(out[:, :3], base(z[:, :3], t, y))              # bit for bit


def test_dense_branch_is_an_exact_copy_when_channels_match():
    base = pretrained_unet()
    jn = JointNet(base, 3)
    sb, sd = base.state_dict(), jn.dense.state_dict()
    assert sb.keys() == sd.keys()
    assert all(torch.equal(sb[k], sd[k]) for k in sb)


@pytest.mark.parametrize("c_d", [1, 2])
def test_dense_branch_is_the_base_on_the_lifted_map(c_d):
    """C_d != C_x: the copy starts as the base applied to d repeated to 3 channels, its output averaged back."""
    base = pretrained_unet().eval()
    jn = JointNet(base, c_d).eval()
    sb, sd = base.state_dict(), jn.dense.state_dict()
    same = [k for k in sb if not k.startswith(("conv_in.", "out.2."))]
    assert all(torch.equal(sb[k], sd[k]) for k in same)
    d, t, y = torch.randn(4, c_d, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 3])
    lifted = torch.cat([d] * 3, 1)[:, :3] if c_d == 1 else d[:, [0, 1, 0]]  # channel k = d's channel k mod c_d
    eps = base(lifted, t, y)                                                # (4, 3, 16, 16)
    expected = eps.mean(1, keepdim=True) if c_d == 1 else torch.stack([(eps[:, 0] + eps[:, 2]) / 2, eps[:, 1]], 1)
    z = torch.cat([torch.randn(4, 3, 16, 16), d], 1)
    torch.testing.assert_close(jn(z, t, y)[:, 3:], expected, atol=1e-5, rtol=1e-5)


def test_zero_convs_start_at_zero_and_receive_gradient():
    jn = JointNet(pretrained_unet(), 1)
    convs = jn.zero_convs()
    assert len(convs) == 2 + 2 * len(jn.base.skip_channels) + 2
    assert all(p.abs().sum() == 0 for c in convs for p in c.parameters())
    x0, d0 = torch.randn(4, 3, 16, 16), torch.randn(4, 1, 16, 16)
    loss, _, _ = jointnet.joint_loss(jn, SCHED, x0, d0, torch.randint(0, 1000, (4,)), torch.randn_like(x0),
                                     torch.randn_like(d0), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for c in convs:
        assert c.weight.grad is not None and c.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in jn.base.parameters())   # frozen (stage 1)
    assert all(p.grad is not None for p in jn.dense.parameters() if p.requires_grad)


def test_label_drop_is_shared_by_both_branches(monkeypatch):
    jn = JointNet(pretrained_unet(), 1).train()
    jn.class_dropout_prob = 0.5
    seen, embed = [], UNet.embed
    monkeypatch.setattr(UNet, "embed", lambda self, t, y=None: seen.append(y.clone()) or embed(self, t, y))
    torch.manual_seed(1)
    jn(torch.randn(64, 4, 16, 16), torch.randint(0, 1000, (64,)), torch.zeros(64, dtype=torch.long))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])                # base and dense see the same labels
    assert 10 < (seen[0] == 4).sum() < 54                                  # about half dropped to the null class


@pytest.mark.parametrize("method", ["jointnet", "direct_extend"])
def test_training_loss_draws_as_one_process_on_every_rank_count(method, monkeypatch):
    """The dense noise and the label drops come from the step's draws (made for the global batch), so the
    two halves of a batch on two ranks see what one process sees; labels drop exactly where the loop
    drew label_drop."""
    base = pretrained_unet()
    model = (JointNet(base, 1) if method == "jointnet" else runlib.build_backbone(
        dict(arch="unet", model="unet-cpu", in_channels=4, num_classes=4, cfg_drop=0.5), 4, 4)).train()
    g = torch.Generator().manual_seed(0)
    B = 6
    batch = {"image": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1, "depth": torch.rand(B, 1, 16, 16, generator=g),
             "label": torch.randint(0, 4, (B,), generator=g), "t": torch.randint(0, 1000, (B,), generator=g),
             "noise": torch.randn(B, 3, 16, 16, generator=g), "label_drop": torch.tensor([1, 0, 0, 1, 1, 0]).bool()}
    batch["weight"] = minsnr.loss_weight(diffusion.snr(SCHED, batch["t"]), "eps", "min_snr")  # the loop's weight
    cfg = dict(dense_modality="depth", data="shapes", num_classes=4, target="eps", weighting="min_snr")
    seen, embed = [], UNet.embed
    monkeypatch.setattr(UNet, "embed", lambda self, t, y=None, force_drop_ids=None:
                        seen.append((y, force_drop_ids)) or embed(self, t, y, force_drop_ids))
    whole = jointnet.training_loss(model, batch, SCHED, cfg, runlib.StepRandom(torch.Generator().manual_seed(1), B))
    y, drop = seen[0]
    dropped = (y == 4) if drop is None else drop.bool()
    assert torch.equal(dropped, batch["label_drop"])
    halves = [jointnet.training_loss(model, {k: v[r * 3:(r + 1) * 3] for k, v in batch.items()}, SCHED, cfg,
                                     runlib.StepRandom(torch.Generator().manual_seed(1), B, r, 2))[1]["mse"]
              for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), whole[1]["mse"], atol=1e-6, rtol=1e-5)


def test_bad_input_is_a_clear_error():
    jn = JointNet(pretrained_unet(), 1)
    with pytest.raises(ValueError, match="divisible by 2"):
        jn(torch.randn(1, 4, 15, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        jn(torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="1..3 channels"):
        JointNet(pretrained_unet(), 4)
    with pytest.raises(ValueError, match="not a DiT"):
        JointNet(build_dit("DiT-T/4", 16, 3, num_classes=0, class_dropout_prob=0.0), 1)


def test_direct_extend_initialisation():
    base = pretrained_unet().eval()
    net = UNet(4, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_ds=(2,), num_classes=4).eval()
    jointnet.direct_extend(net, base.state_dict(), 3)
    assert net.conv_in.weight[:, 3:].abs().sum() == 0                      # new input weights are zero
    assert torch.equal(net.out[2].weight[:3], base.out[2].weight)         # RGB output weights copied
    torch.testing.assert_close(net.out[2].weight[3], base.out[2].weight.mean(0))
    z, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    out, eps = net(z, t, y), base(z[:, :3], t, y)
    torch.testing.assert_close(out[:, :3], eps, atol=1e-6, rtol=1e-6)     # RGB preserved at the start...
    torch.testing.assert_close(out[:, 3:], eps.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)  # depth = RGB noise
    with pytest.raises(ValueError, match="same preset"):
        jointnet.direct_extend(UNet(4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_ds=(2,), num_classes=4),
                               base.state_dict(), 3)


# -----------------------------------------------------------------------------
# Samplers

def toy_model(z, t):
    """A fixed smooth function of (z, t) that mixes channels and neighbouring pixels."""
    mixed = z.mean(1, keepdim=True) + 0.5 * torch.roll(z, 1, -1)
    return 0.3 * torch.tanh(mixed) + 1e-4 * t.float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("known_channels", [slice(0, 3), slice(3, 4)])
def test_channel_wise_inpainting_returns_the_given_modality(known_channels):
    g = torch.Generator().manual_seed(0)
    z0 = torch.rand(2, 4, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros_like(z0, dtype=torch.bool)
    mask[:, known_channels] = True
    out = jointnet_eval.joint_ddim(toy_model, SCHED, torch.randn(z0.shape, generator=g), diffusion.timestep_subset(1000, 10),
                              known=z0, mask=mask, generator=g)
    assert torch.equal(out[:, known_channels], z0[:, known_channels])
    assert not torch.equal(out, z0) and out.abs().max() <= 1 + 1e-5


def test_spatial_inpainting_keeps_outside_and_fills_the_hole():
    seen = []

    def recording(z, t):
        seen.append(z.clone())
        return toy_model(z, t)
    z0, mask = torch.rand(1, 4, 8, 8) * 2 - 1, torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 2:6] = False
    g = torch.Generator().manual_seed(3)
    out = jointnet_eval.joint_ddim(recording, SCHED, torch.randn(1, 4, 8, 8), [999, 500, 0], known=z0, mask=mask,
                              generator=g)
    assert torch.equal(torch.where(mask, out, z0), z0) and not torch.equal(out, z0)
    # The model saw the known part noised to each step's level with ONE noise for all steps (the authors'
    # pipeline): x_t = sqrt(ab) z0 + sqrt(1 - ab) eps, the same eps at t = 999, 500 and 0.
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    for z_in, i in zip(seen, [999, 500, 0]):
        expected = diffusion.q_sample(SCHED, z0, torch.tensor([i]), eps)
        assert torch.equal(z_in[mask.expand_as(z0)], expected[mask.expand_as(z0)])


def test_joint_ddim_without_mask_is_plain_ddim():
    x_T = torch.randn(2, 4, 8, 8)
    ours = jointnet_eval.joint_ddim(toy_model, SCHED, x_T, diffusion.timestep_subset(1000, 7))
    ref = diffusion.ddim_sample(toy_model, SCHED, x_T.shape, 7, x_T=x_T)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("H,W,s,stride", [(16, 48, 16, 8), (16, 40, 16, 5), (24, 37, 8, 8), (16, 16, 16, 3)])
def test_tiles_cover_every_pixel(H, W, s, stride):
    for offset in [(0, 0), (stride - 1, stride // 2), (1, stride - 1)]:
        tiles = jointnet_eval.tile_layout(H, W, s, stride, offset)
        count = torch.zeros(H, W)
        for a, b in tiles:
            assert 0 <= a <= H - s and 0 <= b <= W - s                     # every tile inside the canvas
            count[a:a + s, b:b + s] += 1
        assert (count >= 1).all()                                          # every pixel covered
        for axis in (0, 1):
            starts = sorted({tile[axis] for tile in tiles})
            assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_edge_tiles_stay_and_the_interior_grid_moves_with_the_offset():
    still, moved = jointnet_eval.tile_starts(48, 16, 8, 0), jointnet_eval.tile_starts(48, 16, 8, 3)
    assert still[0] == moved[0] == 0 and still[-1] == moved[-1] == 32     # the edge tiles never move
    assert set(still[1:-1]).isdisjoint(moved[1:-1])                        # the interior ones all do


@pytest.mark.parametrize("s", [4, 8, 16])
def test_tile_weights_fall_linearly_and_sum_to_one_at_half_overlap(s):
    ramp = jointnet_eval.tile_ramp(s)
    r = torch.tensor([min(i + 0.5, s - i - 0.5) / (s / 2) for i in range(s)])  # 1/s at edge pixels, 0 at the border
    torch.testing.assert_close(ramp, r[:, None] * r[None, :])
    assert (ramp > 0).all()
    # Tiles at stride s/2 (no offset): two linear ramps overlap everywhere inside and add up to exactly 1.
    W = 4 * s
    total = torch.zeros(s, W)
    for a, b in jointnet_eval.tile_layout(s, W, s, s // 2):
        total[a:a + s, b:b + s] += ramp
    torch.testing.assert_close(total[:, s // 2:W - s // 2], r[:, None].expand(s, W - s))


def test_tiled_sampling_of_a_pointwise_model_equals_whole_canvas_ddim():
    """Each tile predicts exactly what the whole canvas predicts at a pixel, so averaging changes nothing."""
    pointwise = lambda z, t: 0.2 * torch.tanh(z) + 1e-4 * t.float().view(-1, 1, 1, 1)
    x_T = torch.randn(2, 4, 8, 28)
    tiled = jointnet_eval.tiled_ddim(pointwise, SCHED, x_T.shape, 8, 4, steps=10, x_T=x_T,
                                generator=torch.Generator().manual_seed(0))
    whole = diffusion.ddim_sample(pointwise, SCHED, x_T.shape, 10, x_T=x_T)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        jointnet_eval.tiled_ddim(pointwise, SCHED, x_T.shape, 8, 9, steps=2)


def test_tiled_sampling_blends_the_whole_canvas_tile_early():
    """With a model that reports its input width, the first 40% of steps see the whole canvas, later ones don't."""
    widths = []

    def probe(z, t):
        widths.append(z.shape[-1])
        return torch.zeros_like(z)
    jointnet_eval.tiled_ddim(probe, SCHED, (1, 4, 8, 24), 8, 4, steps=10, generator=torch.Generator().manual_seed(0))
    assert widths.count(24) == 4                                           # 40% of 10 steps
    assert widths[-1] == 8 and 24 not in widths[len(widths) // 2:]


# -----------------------------------------------------------------------------
# Loss and depth alignment

def test_joint_loss_is_eq1_with_one_t_for_both_modalities():
    jn = JointNet(pretrained_unet(), 1).eval()
    g = torch.Generator().manual_seed(0)
    x0, d0 = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    t, eps_x, eps_d = torch.tensor([5, 400, 990]), torch.randn(3, 3, 16, 16), torch.randn(3, 1, 16, 16)
    loss, mse_x, mse_d = jointnet.joint_loss(jn, SCHED, x0, d0, t, eps_x, eps_d, torch.tensor([0, 1, 2]))
    ab = SCHED.alpha_bar[t].float().view(-1, 1, 1, 1)
    x_t, d_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps_x, ab.sqrt() * d0 + (1 - ab).sqrt() * eps_d
    out = jn(torch.cat([x_t, d_t], 1), t, torch.tensor([0, 1, 2]))
    ref_x = ((eps_x - out[:, :3]) ** 2).mean((1, 2, 3))
    ref_d = ((eps_d - out[:, 3:]) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(mse_x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mse_d, ref_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, (ref_x + ref_d).mean(), atol=1e-5, rtol=1e-5)


def test_scale_shift_alignment_recovers_a_known_scale_and_shift():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    s, b = torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64), torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64)
    pred = (gt - b.view(-1, 1, 1, 1)) / s.view(-1, 1, 1, 1)               # gt = s pred + b exactly
    s_hat, b_hat = metrics.align_scale_shift(pred, gt, generator=g)
    torch.testing.assert_close(s_hat, s, atol=1e-12, rtol=0)
    torch.testing.assert_close(b_hat, b, atol=1e-12, rtol=0)
    m = metrics.depth_metrics(pred, gt)
    assert m["abs_rel"] < 1e-9 and m["rmse"] < 1e-9


# -----------------------------------------------------------------------------
# Through train.py and sample.py

TINY = ["--image-size", "16", "--batch-size", "8", "--log-every", "4", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "2", "--warmup", "1"]


def train_run(out, *extra):
    return train.main([*TINY, "--out", str(out), *extra])


def error_of(*extra):
    with pytest.raises(SystemExit) as e:
        train_run(*extra)
    return str(e.value.code)


def read_log(run):
    return [json.loads(line) for line in open(run / "log.jsonl")]


def ckpt_cfg(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["config"]


def base_heldout_loss(state, cfg):
    """The RGB loss of the plain pretrained UNet on the fixed held-out batch, computed by hand."""
    base = runlib.build_backbone(cfg).eval()
    base.load_state_dict(state)
    b = jointnet_eval.rgb_heldout_batch(cfg, "cpu")
    ab = SCHED.alpha_bar[b["t"]].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * b["x0"] + (1 - ab).sqrt() * b["eps_x"]
    with torch.no_grad():
        return ((base(x_t, b["t"], b["y"]) - b["eps_x"]) ** 2).mean().item()


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rgb")
    assert train_run(out, "--method", "ddpm", "--steps", "3", "--lr", "1e-3") == 3  # an eps-prediction RGB model
    return out


@pytest.fixture(scope="module")
def jn_run(rgb_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("jn")
    assert train_run(out, "--method", "jointnet", "--init", str(rgb_run / "checkpoint.pt"), "--steps", "12",
                     "--lr", "3e-3", "--rgb-heldout", "8") == 12
    return out


def test_stage1_trains_the_dense_branch_and_keeps_the_rgb_branch_bit_identical(rgb_run, jn_run):
    log = read_log(jn_run)
    assert [r["step"] for r in log] == [4, 8, 12]
    assert all({"mse_rgb", "mse_dense", "rgb_heldout"} <= set(r) for r in log)
    dense = [r["mse_dense"] for r in log]
    assert dense[-1] < 0.6 * dense[0]                                      # the dense loss falls
    init = torch.load(rgb_run / "checkpoint.pt", weights_only=True)["ema"]
    # The first held-out RGB loss is measured before any update: exactly the pretrained model's loss.
    assert log[0]["rgb_heldout"] == pytest.approx(base_heldout_loss(init, ckpt_cfg(jn_run)), rel=1e-5)
    ckpt = torch.load(jn_run / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"]["base." + k], v) for k, v in init.items())  # frozen: bit-identical
    zero_convs = [k for k in ckpt["model"] if k.startswith(("skip_from", "mid_from", "in_from"))]
    assert all(ckpt["model"][k].abs().sum() > 0 for k in zero_convs if k.endswith("weight"))  # moved off zero
    cfg = ckpt["config"]
    assert cfg["model"] == "unet-cpu" and cfg["dense_channels"] == 1 and cfg["image_size"] == 16


def test_heldout_data_feeds_the_logged_rgb_loss(rgb_run, tmp_path):
    items = [shapes.Shapes(16, "test", seed=7)[i] for i in range(6)]
    arrays = {k: torch.stack([it[k] for it in items]).numpy() for k in ("image", "depth", "label")}
    np.savez(tmp_path / "held.npz", **arrays)
    run = tmp_path / "de"
    assert train_run(run, "--method", "direct_extend", "--init", str(rgb_run / "checkpoint.pt"), "--steps", "1",
                     "--heldout-data", str(tmp_path / "held.npz"), "--rgb-heldout", "6") == 1
    cfg = ckpt_cfg(run)
    assert torch.equal(jointnet_eval.rgb_heldout_batch(cfg, "cpu")["x0"], torch.from_numpy(arrays["image"]))
    init = torch.load(rgb_run / "checkpoint.pt", weights_only=True)["ema"]
    assert read_log(run)[0]["rgb_heldout"] == pytest.approx(base_heldout_loss(init, cfg), rel=1e-4)
    np.savez(tmp_path / "rgb_only.npz", image=arrays["image"])
    msg = error_of(tmp_path / "bad", "--method", "jointnet", "--init", str(rgb_run / "checkpoint.pt"),
                   "--heldout-data", str(tmp_path / "rgb_only.npz"))
    assert "--heldout-data" in msg and "no depth" in msg
    assert "--heldout-data" in error_of(tmp_path / "bad2", "--method", "jointnet", "--init",
                                        str(rgb_run / "checkpoint.pt"), "--heldout-data", str(tmp_path / "missing"))


def test_direct_extend_and_stage2_runs(rgb_run, jn_run, tmp_path):
    de = tmp_path / "de"
    assert train_run(de, "--method", "direct_extend", "--init", str(rgb_run / "checkpoint.pt"), "--steps", "3") == 3
    init = torch.load(rgb_run / "checkpoint.pt", weights_only=True)["ema"]
    assert read_log(de)[0]["rgb_heldout"] == pytest.approx(base_heldout_loss(init, ckpt_cfg(de)), rel=1e-4)
    s2 = tmp_path / "s2"
    assert train_run(s2, "--method", "jointnet", "--unfreeze", "--init", str(jn_run / "checkpoint.pt"),
                     "--steps", "2", "--lr", "1e-3") == 2
    ckpt = torch.load(s2 / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["cfg_drop"] == 0.5 and ckpt["config"]["lr"] == 1e-3
    start = torch.load(jn_run / "checkpoint.pt", weights_only=True)["ema"]
    assert not all(torch.equal(start[k], ckpt["model"][k]) for k in start if k.startswith("base."))  # unfrozen


def test_bad_jointnet_inputs_give_one_clear_sentence(rgb_run, jn_run, tmp_path):
    init = str(rgb_run / "checkpoint.pt")
    assert "pass --init" in error_of(tmp_path / "a", "--method", "jointnet", "--steps", "1")
    assert "image_size=16" in error_of(tmp_path / "b", "--method", "jointnet", "--init", init, "--steps", "1",
                                       "--image-size", "32")
    assert "UNet only" in error_of(tmp_path / "c", "--method", "jointnet", "--init", init, "--steps", "1",
                                   "--model", "DiT-T/4")
    assert "drop it" in error_of(tmp_path / "d", "--method", "direct_extend", "--init", init, "--unfreeze")
    assert "--unfreeze" in error_of(tmp_path / "e", "--method", "jointnet", "--init", str(jn_run / "checkpoint.pt"))
    assert "no checkpoint" in error_of(tmp_path / "f", "--method", "jointnet", "--init", str(tmp_path / "none.pt"))


def test_stage_two_is_a_new_run_from_a_stage_one_checkpoint(rgb_run, jn_run, tmp_path):
    """--resume --unfreeze would load a stage-1 optimiser over a different weight set: refused in one
    sentence. --init STAGE1 --unfreeze starts stage 2 with a fresh optimiser over every weight."""
    import shutil
    s1 = tmp_path / "s1"
    shutil.copytree(jn_run, s1)
    msg = error_of(s1, "--resume", "--unfreeze", "--steps", "14")
    assert "unfreeze=False" in msg and "--init" in msg and "\n" not in msg
    assert torch.load(s1 / "checkpoint.pt", weights_only=True)["step"] == 12
    assert train_run(s1, "--resume", "--steps", "13") == 13                  # stage 1 continues
    s2 = tmp_path / "s2"
    assert train_run(s2, "--method", "jointnet", "--unfreeze", "--init", str(jn_run / "checkpoint.pt"),
                     "--steps", "1") == 1
    ckpt = torch.load(s2 / "checkpoint.pt", weights_only=True)
    n_weights = len(ckpt["model"])                                            # no buffers: all parameters
    assert len(ckpt["opt"]["state"]) == len(ckpt["opt"]["param_groups"][0]["params"]) == n_weights
    stage1 = torch.load(jn_run / "checkpoint.pt", weights_only=True)["opt"]["param_groups"][0]["params"]
    assert len(stage1) < n_weights                                            # stage 1: the base was frozen
    assert train_run(s2, "--resume", "--steps", "2") == 2                    # stage 2 resumes as stage 2


def test_unfreeze_over_a_plain_rgb_run_is_refused(rgb_run, tmp_path):
    msg = error_of(tmp_path / "u", "--method", "jointnet", "--unfreeze", "--init", str(rgb_run / "checkpoint.pt"),
                   "--steps", "1")
    assert "plain RGB run" in msg and "stage 1" in msg
    assert not (tmp_path / "u" / "checkpoint.pt").exists()


@pytest.mark.parametrize("mode", jointnet_eval.SAMPLE_MODES)
def test_sample_modes_write_their_files(jn_run, tmp_path, mode, capsys):
    out = tmp_path / mode
    sample.main(["--ckpt", str(jn_run), "--mode", mode, "--n", "2", "--steps", "2", "--out", str(out),
                 "--jn-width", "32"])
    printed = capsys.readouterr().out
    if mode == "jn-speed":
        assert "FLOPs of one forward: joint / base" in printed and "ratio" in printed
        return
    if mode == "jn-tiles":
        assert Image.open(f"{out}_rgb.png").size[0] >= 32 and os.path.exists(f"{out}_dense.png")
    else:
        assert os.path.exists(f"{out}.png") and os.path.exists(f"{out}.npz")
    if mode in ("jn-rgb2dense", "jn-sdedit"):
        assert "AbsRel" in printed and "RMSE" in printed
