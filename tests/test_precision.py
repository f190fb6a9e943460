"""bf16 autocast on a CPU, the same autocast a GPU run uses: every method on both backbones trains with
finite losses, writes float32 checkpoints, samples, and starts from the float32 run's loss."""
import json
import math

import pytest
import torch

import sample
import train

TINY = ["--image-size", "16", "--batch-size", "4", "--log-every", "1", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "1", "--warmup", "1", "--lr", "3e-3"]
# |loss_bf16 / loss_fp32 - 1| at each of the 3 steps, same seed, measured over the cases below: at most
# 0.13% (mtdiff label on the UNet, step 3), typically 0.01-0.03%. The loss is formed in float32 from the
# bf16 network output; step 1 agrees almost exactly because the output layers start at zero, so the lr
# is raised to move the outputs within 3 steps.
TOLERANCE = 0.01
CASES = [(m, b, []) for b in ("unet-cpu", "DiT-T/4") for m in ("ddpm", "minsnr", "dtr", "rtr", "dtr_minsnr")]
CASES += [("mtdiff", b, ["--task", task]) for b in ("unet-cpu", "DiT-T/4") for task in ("masked", "label", "translate")]
CASES += [(m, "unet-cpu", []) for m in ("jointnet", "direct_extend")]  # JointNet is implemented on the UNet only


@pytest.fixture(scope="module")
def rgb_init(tmp_path_factory):
    out = tmp_path_factory.mktemp("rgb")
    train.main([*TINY, "--steps", "1", "--out", str(out)])
    return str(out / "checkpoint.pt")


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "log.jsonl")]


@pytest.mark.parametrize("method, model, extra", CASES, ids=[" ".join([m, b, *e]) for m, b, e in CASES])
def test_bf16_trains_keeps_float32_checkpoints_samples_and_matches_fp32(tmp_path, rgb_init, method, model, extra):
    flags = [*TINY, "--method", method, "--model", model, *extra]
    if method in ("jointnet", "direct_extend"):
        flags += ["--init", rgb_init, "--rgb-heldout", "2"]
    train.main([*flags, "--precision", "bf16", "--steps", "3", "--out", str(tmp_path / "bf16")])
    train.main([*flags, "--precision", "fp32", "--steps", "3", "--out", str(tmp_path / "fp32")])
    bf, fp = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert len(bf) == 3 and all(math.isfinite(v) for v in bf), bf
    assert all(abs(b / f - 1) < TOLERANCE for b, f in zip(bf, fp)), (bf, fp)
    assert bf != fp  # autocast was on: bf16 rounding moved the loss
    ckpt = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["precision"] == "bf16"
    tensors = [*ckpt["model"].values(), *ckpt["ema"].values(),
               *(v for s in ckpt["opt"]["state"].values() for k, v in s.items() if k != "step")]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    sample.main(["--ckpt", str(tmp_path / "bf16"), "--n", "2", "--steps", "1", "--precision", "bf16",
                 "--out", str(tmp_path / "s")])
    assert list(tmp_path.glob("s*.png"))
