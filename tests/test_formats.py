"""Users' own data end to end through train.py, sample.py and metrics.py: grayscale data trains a 1-channel
model and samples gray (--channels overrides, a resumed run keeps the choice), 1-channel .npz data in every
sample mode that applies, and CIFAR-10's binary batches."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
import metrics
import sample
import train
from test_data import write_cifar

TINY = ["--image-size", "16", "--batch-size", "8", "--steps", "2", "--sample-every", "1000", "--sample-steps", "2",
        "--warmup", "1", "--log-every", "1"]


def run(out, *extra):
    return train.main([*TINY, "--out", str(out), *extra])


def config_of(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["config"]


def error_of(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return str(e.value.code)


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs")
    data.make_glyphs(str(root), per_class=5)  # 50 grayscale digits in 10 class folders
    return root


@pytest.fixture(scope="module")
def gray_run(glyphs, tmp_path_factory):
    out = tmp_path_factory.mktemp("gray") / "run"
    run(out, "--data", str(glyphs))
    return out


# -----------------------------------------------------------------------------
# Channels follow the data

def test_a_grayscale_folder_trains_one_channel_and_samples_gray(glyphs, tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--data", str(glyphs))
    printed = capsys.readouterr().out
    assert "channels: 1, because every image in" in printed and "--channels 3 trains it as RGB" in printed
    cfg = config_of(out)
    assert cfg["in_channels"] == 1 and cfg["channels"] is None and cfg["num_classes"] == 10
    sample.main(["--ckpt", str(out), "--n", "12", "--steps", "2", "--out", str(tmp_path / "s"),
                 "--png-dir", str(tmp_path / "pngs")])
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
    assert Image.open(tmp_path / "pngs" / "000011.png").mode == "L"
    r = metrics.main(["--samples", str(tmp_path / "s.npz"), "--data", str(glyphs), "--features", "random",
                      "--cache", str(tmp_path)])
    assert r["colour"]["channel_dev"] == 0 and len(r["colour"]["mean"]) == 1 and r["n_ref"] == 5


def test_channels_flag_overrides_and_a_resumed_run_keeps_the_choice(glyphs, gray_run, tmp_path, capsys):
    rgb = tmp_path / "rgb"
    run(rgb, "--data", str(glyphs), "--channels", "3")
    assert "channels: 3, as --channels 3 asks: every image in" in capsys.readouterr().out
    assert config_of(rgb)["in_channels"] == 3 and config_of(rgb)["channels"] == 3
    train.main(["--resume", "--out", str(rgb), "--steps", "3"])  # the saved flag is reused
    assert config_of(rgb)["in_channels"] == 3
    # A run saved without a choice (channels None) but trained as RGB keeps its 3 channels on resume.
    ckpt = torch.load(rgb / "checkpoint.pt", weights_only=True)
    ckpt["config"]["channels"] = None
    torch.save(ckpt, rgb / "checkpoint.pt")
    train.main(["--resume", "--out", str(rgb), "--steps", "4"])
    assert "channels: 3, kept from the checkpoint" in capsys.readouterr().out
    assert "in_channels=1 but this run has in_channels=3" in error_of(
        train.main, ["--resume", "--out", str(gray_run), "--channels", "3", "--steps", "3"])
    # RGB samples of a gray folder are scored against the folder's images made RGB the same way.
    sample.main(["--ckpt", str(rgb), "--n", "6", "--steps", "2", "--out", str(tmp_path / "s")])
    r = metrics.main(["--samples", str(tmp_path / "s.npz"), "--data", str(glyphs), "--features", "random",
                      "--cache", str(tmp_path)])
    assert len(r["colour"]["mean"]) == 3 and r["colour_real"]["channel_dev"] == 0
    # --channels 1 averages RGB data
    run(tmp_path / "avg", "--channels", "1", "--steps", "1")
    assert config_of(tmp_path / "avg")["in_channels"] == 1
    assert "R, G and B averaged" in capsys.readouterr().out


@pytest.fixture(scope="module")
def gray_npz(tmp_path_factory):
    """16 one-channel uint8 images with labels and depth: every sample mode but mt-translate (shapes only)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "g.npz"
    np.savez(path, image=rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8), label=np.arange(16) % 2,
             depth=rng.uniform(-1, 1, (16, 16, 16)).astype(np.float32))
    return str(path)


@pytest.mark.parametrize("task, modes", [("masked", ["mt-restore", "mt-joint"]), ("label", ["mt-label"])])
def test_one_channel_npz_in_mt_diffusion_modes(gray_npz, tmp_path, capsys, task, modes):
    out = tmp_path / task
    run(out, "--data", gray_npz, "--method", "mtdiff", "--task", task)
    assert config_of(out)["in_channels"] == 1
    for mode in modes:
        sample.main(["--ckpt", str(out), "--mode", mode, "--n", "4", "--steps", "2", "--mt-patches", "3",
                     "--out", str(tmp_path / mode)])
    printed = capsys.readouterr().out
    assert ("MT-Diffusion + paste" in printed) == (task == "masked") and ("label accuracy" in printed) == (task == "label")
    if task == "masked":
        assert torch.load(tmp_path / "mt-joint.pt")["images"].shape == (4, 16, 16, 1)
        assert "--png-dir writes the samples of plain generation" in error_of(
            sample.main, ["--ckpt", str(out), "--mode", "mt-joint", "--png-dir", str(tmp_path / "p")])


def test_one_channel_npz_in_plain_and_jointnet_modes(gray_npz, tmp_path):
    run(tmp_path / "base", "--data", gray_npz, "--method", "ddpm")
    sample.main(["--ckpt", str(tmp_path / "base"), "--n", "4", "--steps", "2", "--out", str(tmp_path / "gen")])
    assert np.load(tmp_path / "gen.npz")["arr_0"].shape == (4, 16, 16, 1)
    run(tmp_path / "jn", "--data", gray_npz, "--method", "jointnet", "--init", str(tmp_path / "base" / "checkpoint.pt"))
    for mode in ("jn-joint", "jn-rgb2dense", "jn-tiles"):
        sample.main(["--ckpt", str(tmp_path / "jn"), "--mode", mode, "--n", "2", "--steps", "2", "--jn-width", "32",
                     "--out", str(tmp_path / mode)])
    f = np.load(tmp_path / "jn-rgb2dense.npz")
    assert f["arr_0"].shape == (2, 16, 16, 1) and f["dense"].shape == (2, 16, 16, 1)
    assert (tmp_path / "jn-tiles_rgb.png").exists()


# -----------------------------------------------------------------------------
# CIFAR-10 as distributed

def test_cifar10_trains_class_conditionally_and_scores_against_the_test_batch(tmp_path, capsys):
    folder = write_cifar(tmp_path, n=8)
    out = tmp_path / "run"
    run(out, "--data", str(folder))
    assert "channels: 3, because CIFAR-10 is RGB" in capsys.readouterr().out
    cfg = config_of(out)
    assert cfg["num_classes"] == 10 and cfg["in_channels"] == 3
    sample.main(["--ckpt", str(out), "--n", "10", "--steps", "2", "--out", str(tmp_path / "s")])
    r = metrics.main(["--samples", str(tmp_path / "s.npz"), "--data", str(folder), "--features", "random",
                      "--cache", str(tmp_path)])
    assert r["n"] == 10 and r["n_ref"] == 8  # the held-out reference is test_batch.bin, all 8 of its records
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-5])
    assert "test_batch.bin' is truncated" in error_of(run, tmp_path / "bad", "--data", str(folder))
