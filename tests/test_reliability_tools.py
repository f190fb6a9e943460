"""Careless and hostile input to the sampling and analysis tools (sample.py, metrics.py, jointnet_eval.py,
mtdiffusion_eval.py, dtr_eval.py, minsnr_eval.py): each case ends in the right result, or in one sentence
saying what was wrong, before any work it would throw away, with no traceback and no partial output."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dtr_eval
import jointnet_eval
import metrics
import minsnr_eval
import mtdiffusion_eval
import runlib
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--batch-size", "8", "--steps", "2", "--sample-every", "1000", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny 2-step runs: ddpm (class-conditional), an unconditional ddpm, mtdiff (masked) and jointnet."""
    root = tmp_path_factory.mktemp("runs")
    train.main([*TINY, "--method", "ddpm", "--out", str(root / "ddpm")])
    train.main([*TINY, "--method", "ddpm", "--class-cond", "0", "--out", str(root / "uncond")])
    train.main([*TINY, "--method", "mtdiff", "--out", str(root / "mtdiff")])
    train.main([*TINY, "--method", "jointnet", "--init", str(root / "ddpm" / "checkpoint.pt"), "--out",
                str(root / "jointnet")])
    return {name: str(root / name) for name in ("ddpm", "uncond", "mtdiff", "jointnet")}


def refusal(main, argv, capsys):
    """The one-line message a CLI exits with (its sys.exit text, or argparse's error line), no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    msg = e.value.code if isinstance(e.value.code, str) else err.strip().splitlines()[-1]
    assert e.value.code != 0 and "Traceback" not in err and "\n" not in msg, err
    return msg


def sample_args(run, *extra):
    return ["--ckpt", run, "--n", "2", "--steps", "2", *extra]


@pytest.fixture
def no_sampling(monkeypatch):
    """Make any sampling fail loudly: a refusal must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(sample, "generate", fail)


def uint8_images(n=16, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, channels), dtype=np.uint8)


def score(path, tmp_path, *extra):
    return metrics.main(["--samples", str(path), "--features", "random", "--cache", str(tmp_path / "cache"), *extra])


# -----------------------------------------------------------------------------
# Work lost: sample.py checks (or creates) its destination before sampling

def test_sample_out_into_missing_folders_creates_them(runs, tmp_path):
    sample.main(sample_args(runs["ddpm"], "--out", str(tmp_path / "a" / "b" / "s")))
    assert np.load(tmp_path / "a" / "b" / "s.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_sample_out_an_existing_folder_writes_inside_it(runs, tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    sample.main(sample_args(runs["ddpm"], "--out", str(folder)))
    assert sorted(os.listdir(folder)) == ["generate.npz", "generate.png"]
    assert not (tmp_path / "samples.npz").exists()


def test_sample_out_under_a_file_is_refused_before_sampling(runs, tmp_path, capsys, no_sampling):
    (tmp_path / "f").write_text("x")
    msg = refusal(sample.main, sample_args(runs["ddpm"], "--out", str(tmp_path / "f" / "s")), capsys)
    assert "is a file, not a folder" in msg and "--out" in msg
    assert os.listdir(tmp_path) == ["f"]


def test_sample_out_on_a_read_only_filesystem_is_refused_before_sampling(runs, tmp_path, capsys, monkeypatch,
                                                                        no_sampling):
    def read_only(*args, **kwargs):  # what a read-only mount answers, for root too
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(runlib.tempfile, "mkstemp", read_only)
    msg = refusal(sample.main, sample_args(runs["ddpm"], "--out", str(tmp_path / "s")), capsys)
    assert "Read-only file system" in msg and "--out" in msg
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# Tracebacks that are now a result or one sentence

@pytest.mark.parametrize("mode", ["mt-restore", "mt-joint", "mt-label"])
@pytest.mark.parametrize("run", ["ddpm", "jointnet"])
def test_mtdiffusion_modes_on_another_method_name_the_method(runs, tmp_path, capsys, mode, run):
    msg = refusal(sample.main, sample_args(runs[run], "--mode", mode, "--out", str(tmp_path / "s")), capsys)
    assert f"needs a run of --method mtdiff, but this one is --method {run}" in msg
    assert "--task" not in msg  # not the misleading "this one has --task masked"
    assert not any(p.suffix for p in tmp_path.iterdir())


@pytest.mark.parametrize("run", ["ddpm", "mtdiff"])
def test_jointnet_speed_mode_on_another_method_is_one_sentence(runs, tmp_path, capsys, run):
    msg = refusal(sample.main, sample_args(runs[run], "--mode", "jn-speed", "--out", str(tmp_path / "s")), capsys)
    assert f"needs a jointnet or direct_extend run, not a {run} run" in msg


@pytest.mark.parametrize("flag", ["--batch", "--steps", "--repeats"])
def test_jointnet_demo_refuses_zero_sizes(capsys, flag):
    assert f"argument {flag}: 0 is outside [1" in refusal(jointnet_eval.main, [flag, "0"], capsys)


def test_sample_one_image_on_two_processes_writes_one_sample(runs, tmp_path):
    """The second rank's share is empty: it joins the gather with no images instead of failing."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py",
           "--ckpt", runs["ddpm"], "--num-samples", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    arr = np.load(tmp_path / "s.npz")
    assert arr["arr_0"].shape == (1, 16, 16, 3) and arr["labels"].tolist() == [0]


def test_metrics_scores_grey_samples_against_the_data_in_grey(tmp_path):
    # sample.py writes 1-channel files for 1-channel models (--channels 1 on RGB data averages R, G and B):
    # they are scored against the real images turned grey the same way, so grey copies of real images
    # score near the real-vs-real floor and far better than grey noise.
    real = metrics.reference_images("shapes", 16, 64, 0)                       # (64, 3, 16, 16) in [-1, 1]
    grey = ((real.mean(1, keepdim=True) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "grey.npz", arr_0=grey)
    np.savez(tmp_path / "noise.npz", arr_0=uint8_images(n=64, channels=1))
    assert score(tmp_path / "grey.npz", tmp_path)["fd"] < 0.2 * score(tmp_path / "noise.npz", tmp_path)["fd"]


def test_metrics_reads_uint8_channels_first_as_channels_last(tmp_path):
    images = uint8_images()
    np.savez(tmp_path / "last.npz", images=images)
    np.savez(tmp_path / "first.npz", images=images.transpose(0, 3, 1, 2))
    assert score(tmp_path / "first.npz", tmp_path)["fd"] == pytest.approx(score(tmp_path / "last.npz", tmp_path)["fd"])


def test_metrics_refuses_unreadable_or_unscorable_samples(tmp_path, capsys):
    cases = {
        "five.npz": ("cannot be turned into 5 channels", uint8_images(channels=5)),
        "empty.npz": ("is not an .npz archive", None),
        "random.npz": ("is not an .npz archive", np.random.default_rng(0).bytes(500)),
    }
    for name, (expected, content) in cases.items():
        path = tmp_path / name
        if isinstance(content, np.ndarray):
            np.savez(path, images=content)
        else:
            path.write_bytes(content or b"")
        assert expected in refusal(metrics.main, ["--samples", str(path), "--features", "random"], capsys)


def test_metrics_cache_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "fit_feature_net", lambda *a, **k: pytest.fail("trained before refusing"))
    np.savez(tmp_path / "s.npz", images=uint8_images())
    (tmp_path / "cache").write_text("x")
    msg = refusal(metrics.main, ["--samples", str(tmp_path / "s.npz"), "--cache", str(tmp_path / "cache")], capsys)
    assert "is a file, not a folder; pass --cache another path" in msg


def test_dtr_eval_creates_the_output_folder_and_refuses_zero_images(tmp_path, capsys):
    out = tmp_path / "figs" / "masks.png"
    dtr_eval.main(["--T", "50", "--channels", "16", "--out", str(out)])
    assert out.is_file()
    msg = refusal(dtr_eval.main, ["--fresh", "--cka", str(tmp_path / "c.png"), "--num-images", "0"], capsys)
    assert "argument --num-images: 0 is outside [1" in msg


@pytest.mark.parametrize("T, expected", [("0", "0 is outside [2"), ("-5", "-5 is outside [2"),
                                         ("2", "--T 2 is too short for the linear noise schedule")])
def test_mtdiffusion_schedules_refuse_too_few_timesteps(capsys, T, expected):
    assert expected in refusal(mtdiffusion_eval.main, ["--schedules", "--T", T], capsys)


def test_mtdiffusion_schedules_take_two_timesteps_with_the_cosine_schedule(capsys):
    mtdiffusion_eval.main(["--schedules", "--T", "2", "--noise", "cosine"])
    assert "cosine noise schedule, T = 2" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Silently wrong: now refused

def test_class_on_an_unconditional_model_is_refused(runs, tmp_path, capsys, no_sampling):
    msg = refusal(sample.main, sample_args(runs["uncond"], "--class", "2", "--out", str(tmp_path / "s")), capsys)
    assert "--class 2 needs a class-conditional model" in msg and "drop --class" in msg


@pytest.mark.parametrize("argv, expected", [
    (["--eta", "-1"], "argument --eta: -1.0 is outside [0, 1]"), (["--eta", "5"], "argument --eta: 5.0 is outside [0, 1]"),
    (["--mode", "jn-tiles", "--jn-stride", "0"], "argument --jn-stride: 0 is outside [1"),
    (["--mode", "jn-tiles", "--jn-width", "-3"], "argument --jn-width: -3 is outside [1"),
])
def test_out_of_range_sampler_settings_are_refused(runs, capsys, argv, expected):
    assert expected in refusal(sample.main, sample_args(runs["jointnet"], *argv), capsys)


def test_generated_labels_outside_the_reference_classes_are_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "fit_feature_net", lambda *a, **k: pytest.fail("trained before refusing"))
    np.savez(tmp_path / "s.npz", images=uint8_images(), labels=np.full(16, 7))
    msg = refusal(metrics.main, ["--samples", str(tmp_path / "s.npz"), "--cache", str(tmp_path / "c")], capsys)
    assert "carry label 7 but shapes has 4 classes (0..3)" in msg


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_run(runs, tmp_path, capsys, no_sampling):
    ckpt = torch.load(os.path.join(runs["ddpm"], "checkpoint.pt"), map_location="cpu", weights_only=True)
    for part in ("model", "ema"):
        ckpt[part]["out.2.bias"] = torch.full_like(ckpt[part]["out.2.bias"], float("nan"))
    bad = tmp_path / "diverged"
    bad.mkdir()
    torch.save(ckpt, bad / "checkpoint.pt")
    msg = refusal(sample.main, sample_args(str(bad), "--out", str(tmp_path / "s")), capsys)
    assert f"{bad / 'checkpoint.pt'} holds NaN or inf weights (out.2.bias)" in msg
    assert sorted(os.listdir(tmp_path)) == ["diverged"]


# -----------------------------------------------------------------------------
# Misleading sentences: now the right cause, or the tool just works

def test_dtr_cka_analyses_an_mtdiff_run_and_names_what_it_supports_for_jointnet(runs, tmp_path, capsys):
    out = tmp_path / "cka.png"
    dtr_eval.main(["--ckpt", runs["mtdiff"], "--cka", str(out), "--num-images", "2", "--timesteps", "0", "999"])
    assert out.is_file()
    msg = refusal(dtr_eval.main, ["--ckpt", runs["jointnet"], "--cka", str(tmp_path / "j.png")], capsys)
    assert "is a run of --method jointnet" in msg and "--cka analyses runs of ddpm" in msg and "mtdiff" in msg


@pytest.mark.parametrize("run", ["mtdiff", "jointnet"])
def test_minsnr_analysis_names_the_methods_it_reads(runs, capsys, run):
    msg = refusal(minsnr_eval.main, ["--ckpt", runs[run], "--batch-size", "2", "--bins", "2"], capsys)
    assert f"is a run of --method {run}, trained with a loss of its own" in msg
    assert "plain diffusion loss: ddpm, minsnr" in msg and "network that this tool does not build" not in msg


def test_metrics_scores_float_samples_and_names_what_is_wrong_with_bad_ones(tmp_path, capsys):
    x = np.random.default_rng(0).uniform(-1, 1, (16, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "nchw.npz", images=x)
    np.savez(tmp_path / "nhwc.npz", images=x.transpose(0, 2, 3, 1))  # was "size must be ... got 3"
    assert score(tmp_path / "nhwc.npz", tmp_path)["fd"] == pytest.approx(score(tmp_path / "nchw.npz", tmp_path)["fd"])
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", images=x)
    np.savez(tmp_path / "255.npz", images=np.full((16, 3, 16, 16), 200.0, np.float32))
    for name, expected in (("nan", "hold 1 NaN or inf values"), ("255", "not in [-1, 1]")):
        assert expected in refusal(metrics.main, ["--samples", str(tmp_path / f"{name}.npz")], capsys)


def test_metrics_against_too_small_reference_data_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", image=rng.uniform(-1, 1, (12, 1, 16, 16)).astype(np.float32),
             label=np.arange(12) % 2)
    np.savez(tmp_path / "s.npz", images=uint8_images(channels=1))
    msg = refusal(metrics.main, ["--samples", str(tmp_path / "s.npz"), "--data", str(tmp_path / "data.npz"),
                                 "--features", "random"], capsys)
    assert "holds out 1 image to compare with, fewer than the k + 1 = 4" in msg  # was "k must be in [1, 0]"
