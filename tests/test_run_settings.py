"""Settings a run cannot silently change or ignore: resumed routing, schedule and JointNet stage, loss
weights that learn nothing, guidance without labels, and the DiT default preset."""
import json

import pytest
import torch

import config
import sample
import train

TINY = ["--image-size", "16", "--batch-size", "8", "--log-every", "2", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "2", "--warmup", "3"]


def run(out, *extra):
    return train.main([*TINY, "--out", str(out), *extra])


def error_of(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return str(e.value.code)


def test_resume_refuses_flags_that_change_the_masks_or_the_schedule(tmp_path):
    out = tmp_path / "rtr"
    run(out, "--method", "rtr", "--seed", "0", "--steps", "2")
    for flags, key in ((["--seed", "7"], "seed=0"), (["--routing", "dtr"], "routing='random'"),
                       (["--dtr-alpha", "0.5"], "dtr_alpha=0.8"), (["--T", "500"], "T=1000"),
                       (["--schedule", "cosine"], "schedule='linear'"),
                       (["--dtr-placement", "input"], "dtr_placement='hidden'")):
        msg = error_of(run, out, "--resume", "--steps", "4", *flags)
        assert key in msg and "\n" not in msg, (flags, msg)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2    # nothing was trained
    assert run(out, "--resume", "--steps", "3") == 3                           # same settings: continues


def test_resume_keeps_beta_for_dtr_but_not_the_seed(tmp_path):
    out = tmp_path / "dtr"
    run(out, "--method", "dtr", "--steps", "2")
    assert "dtr_beta=4.0" in error_of(run, out, "--resume", "--dtr-beta", "2")
    assert run(out, "--resume", "--steps", "3", "--seed", "7") == 3            # DTR masks do not use the seed


def test_placement_is_stored_and_dit_refuses_the_hidden_reading(tmp_path):
    run(tmp_path / "u", "--method", "dtr", "--dtr-placement", "input", "--steps", "1")
    assert json.load(open(tmp_path / "u" / "config.json"))["dtr_placement"] == "input"
    run(tmp_path / "d", "--method", "dtr", "--model", "DiT-T/4", "--steps", "1")
    assert json.load(open(tmp_path / "d" / "config.json"))["dtr_placement"] == "input"   # DiT masks its input
    msg = error_of(run, tmp_path / "h", "--method", "dtr", "--model", "DiT-T/4", "--dtr-placement", "hidden")
    assert "DiT blocks are routed at their input" in msg


@pytest.mark.parametrize("method", ["minsnr", "dtr_minsnr"])
def test_min_snr_with_gamma_zero_is_refused_before_training(tmp_path, method):
    msg = error_of(run, tmp_path / "g", "--method", method, "--snr-gamma", "0", "--steps", "1")
    assert "gamma" in msg and "weight" in msg and not (tmp_path / "g" / "checkpoint.pt").exists()
    assert run(tmp_path / "m", "--weighting", "max_snr", "--snr-gamma", "0", "--steps", "1") == 1  # max(SNR, 0) = SNR


def test_min_snr_gamma_zero_is_refused_on_resume_too(tmp_path):
    run(tmp_path / "r", "--method", "minsnr", "--steps", "1")
    assert "gamma" in error_of(run, tmp_path / "r", "--resume", "--snr-gamma", "0", "--steps", "2")


def test_arch_dit_without_model_takes_the_dit_default():
    parser = config.get_parser()
    cfg = config.resolve_config(parser.parse_args(["--arch", "dit"]), {"arch"})
    assert cfg["model"] == config.DIT_DEFAULT and cfg["arch"] == "dit"
    assert config.DIT_DEFAULT == ("DiT-S/2" if config.ON_GPU else "DiT-T/4")
    config.check_image_size(cfg)                                                # fits the default image size
    cfg = config.resolve_config(parser.parse_args([]), set())
    assert cfg["model"] == ("unet-gpu" if config.ON_GPU else "unet-cpu")       # no --arch: unchanged


def test_guidance_on_an_unconditional_model_is_refused(tmp_path):
    run(tmp_path / "u", "--class-cond", "0", "--steps", "1")
    msg = error_of(sample.main, ["--ckpt", str(tmp_path / "u"), "--n", "1", "--steps", "1", "--cfg-scale", "3"])
    assert "class-conditional" in msg and "--cfg-scale" in msg
    sample.main(["--ckpt", str(tmp_path / "u"), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")])
