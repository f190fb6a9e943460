"""Never lose work, never silently change the experiment: exact resume, atomic checkpoints, signals,
non-finite losses, safe loading, mismatched checkpoints, bad arguments, and DDP equivalence."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dtr_eval
import minsnr_eval
import runlib
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--batch-size", "8", "--log-every", "2", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "2", "--warmup", "3"]


def run(out, *extra):
    return train.main([*TINY, "--out", str(out), *extra])


def error_of(*args):
    with pytest.raises(SystemExit) as e:
        run(*args)
    return str(e.value.code)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, exact=True):
    """exact=False: equal up to float summation order (N ranks reduce their gradients in another order).
    Adam turns a gradient that cancels to rounding level (a bias right before a GroupNorm, next to a
    zero-initialised layer) into a step of about lr whose sign is that rounding, so such tensors agree only
    to a fraction of one step: 5e-5 per element, against lr 1e-4..3e-4 here. Other draws on a rank would
    change every tensor; the whole state must agree to 1e-5 in relative norm."""
    for part in ("model", "ema"):
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                assert torch.allclose(a[part][k], b[part][k], atol=5e-5, rtol=1e-4), f"{part}.{k} differs"
        if not exact:
            diff = sum((a[part][k].double() - b[part][k].double()).pow(2).sum() for k in a[part])
            assert diff.sqrt() <= 1e-5 * sum(a[part][k].double().pow(2).sum() for k in a[part]).sqrt(), part
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            same = torch.equal if exact else (lambda x, y: torch.allclose(x, y, atol=1e-6, rtol=1e-4))
            assert same(sa[i][k], sb[i][k]), f"optimiser state {i}.{k} differs"


@pytest.mark.parametrize("method", ["ddpm", "dtr"])
def test_exact_resume_is_bit_identical(tmp_path, method):
    run(tmp_path / "once", "--method", method, "--steps", "8")
    run(tmp_path / "split", "--method", method, "--steps", "4")
    assert load(tmp_path / "split" / "checkpoint.pt")["step"] == 4
    train.main(["--resume", "--out", str(tmp_path / "split"), "--steps", "8"])
    a, b = load(tmp_path / "once" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 8 and a["seen"] == b["seen"] == 8
    assert_same_state(a, b, exact=True)
    # the logs agree too: same losses at the same steps
    la = [json.loads(x) for x in open(tmp_path / "once" / "log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "split" / "log.jsonl")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    config = dict(method="ddpm", arch="unet", model="unet-cpu", image_size=16, in_channels=3, num_classes=0, T=1000,
                  schedule="linear")  # every loader reads these
    runlib.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": config, "step": 1})

    def dying_save(obj, f):  # writes part of the file, then the process "dies"
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        runlib.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": config, "step": 2})
    assert runlib.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no partial file left behind


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_save_a_checkpoint_and_exit_with_the_stopped_status(tmp_path, sig):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "train.py", *TINY, "--steps", "100000", "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    p.send_signal(sig)
    text, _ = p.communicate(timeout=240)
    assert p.returncode == train.EXIT_STOPPED == 75, text  # resumable, unlike a finished run (0)
    assert f"stopped by {sig.name}" in text
    ck = load(out / "checkpoint.pt")
    assert 2 <= ck["step"] < 100000 and ck["seen"] == ck["step"]


def test_stale_checkpoint_temporaries_are_removed_when_a_run_starts_or_resumes(tmp_path):
    """A kill -9 during a checkpoint write leaves checkpoint.pt.tmp.PID behind; the next start or resume
    removes those of processes that no longer run, and keeps a live process's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        out = tmp_path / "r"
        out.mkdir()
        stale, live = out / f"checkpoint.pt.tmp.{dead.pid}", out / f"checkpoint.pt.tmp.{alive.pid}"
        other = out / "notes.tmp.1"
        for f in (stale, live, other):
            f.write_bytes(b"partial")
        run(out, "--steps", "1")
        assert not stale.exists() and live.exists() and other.exists()
        stale.write_bytes(b"partial")
        run(out, "--resume", "--steps", "2")
        assert not stale.exists() and live.exists()
    finally:
        alive.kill()
        alive.wait()


def test_non_finite_numbers_in_float_flags_are_one_sentence(tmp_path, capsys):
    for argv in (["--lr", "nan"], ["--lr", "inf"], ["--cfg-drop", "nan"], ["--p2-k", "inf"], ["--mt-scale", "nan"]):
        with pytest.raises(SystemExit) as e:
            run(tmp_path / "r", *argv)
        assert e.value.code == 2 and "is not a finite number" in capsys.readouterr().err
    run(tmp_path / "s", "--steps", "1")
    for argv in (["--eta", "nan"], ["--cfg-scale", "inf"], ["--mt-sdedit", "nan"], ["--jn-strength=-inf"]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(tmp_path / "s"), *argv])
        assert e.value.code == 2 and "is not a finite number" in capsys.readouterr().err
    for main, argv in ((dtr_eval.main, ["--alpha", "nan"]), (minsnr_eval.main, ["--fresh", "--lam", "inf"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "is not a finite number" in capsys.readouterr().err


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    run(tmp_path / "r", "--steps", "4")
    npz = tmp_path / "nan.npz"
    # finite but huge pixels (non-finite ones are refused when the data is loaded) overflow the network
    np.savez(npz, image=np.full((16, 3, 16, 16), 3e38, np.float32), label=np.arange(16) % 4)
    msg = error_of(tmp_path / "r", "--resume", "--data", str(npz), "--steps", "10", "--max-nonfinite", "3")
    assert "not finite for 3 steps in a row (last at step 4)" in msg
    assert load(tmp_path / "r" / "checkpoint.pt")["step"] == 4


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "config": {}, "x": Payload()}, bad)
    with pytest.raises(runlib.RunError, match="refusing to load"):
        runlib.load_checkpoint(str(bad))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(bad)])
    assert "refusing to load" in str(e.value.code)


def test_mismatched_checkpoints_name_the_difference(tmp_path):
    run(tmp_path / "r", "--steps", "2")
    assert "image_size=16 but this run has image_size=32" in error_of(tmp_path / "r", "--resume", "--image-size", "32")
    assert "model='unet-cpu' but this run has model='unet-small'" in error_of(tmp_path / "r", "--resume", "--model", "unet-small")
    npz = tmp_path / "four.npz"
    np.savez(npz, image=np.zeros((16, 4, 16, 16), np.float32), label=np.arange(16) % 4)
    assert "in_channels=3 but this run has in_channels=4" in error_of(tmp_path / "r", "--resume", "--data", str(npz))


@pytest.mark.parametrize("flags, message", [
    (["--dtr-alpha", "0"], "outside (0"), (["--dtr-alpha", "1.01"], "outside (0"),
    (["--dtr-beta", "0"], "outside (0"), (["--snr-gamma", "-1"], "outside [0"),
    (["--batch-size", "0"], "outside [1"), (["--image-size", "18"], "divisible by 4"),
])
def test_out_of_range_arguments_are_rejected_by_argparse(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "r", *flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_batch_size_must_divide_across_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        run(tmp_path / "r", "--batch-size", "8")
    assert "not divisible by the 3 processes" in capsys.readouterr().err


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("method", ["ddpm", "dtr", "mtdiff", "jointnet"])
def test_ddp_on_two_processes_matches_one_process(tmp_path, method):
    """Every draw of a step, the loop's and the method's own (MT-Diffusion's masks and single-task rows,
    JointNet's dense noise and label drops), is made for the global batch: 2 ranks train as 1 process."""
    extra = ["--method", method]
    if method == "jointnet":
        run(tmp_path / "rgb", "--steps", "2")
        extra += ["--init", str(tmp_path / "rgb" / "checkpoint.pt")]
    run(tmp_path / "one", *extra, "--steps", "6")
    torchrun("train.py", *TINY, *extra, "--steps", "3", "--out", str(tmp_path / "two"))
    # only rank 0 writes files
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint.pt", "config.json", "log.jsonl", "samples", "train.lock"]
    torchrun("train.py", "--resume", "--out", str(tmp_path / "two"), "--steps", "6")  # resume under DDP
    a, b = load(tmp_path / "one" / "checkpoint.pt"), load(tmp_path / "two" / "checkpoint.pt")
    assert b["step"] == 6
    assert_same_state(a, b, exact=False)


def test_sample_splits_n_across_ranks_into_one_file(tmp_path):
    run(tmp_path / "r", "--steps", "2")
    torchrun("sample.py", "--ckpt", str(tmp_path / "r"), "--num-samples", "5", "--steps", "2", "--out", str(tmp_path / "s"))
    arr = np.load(tmp_path / "s.npz")
    assert arr["arr_0"].shape == (5, 16, 16, 3)
    assert sorted(arr["labels"].tolist()) == [0, 0, 1, 2, 3]  # classes cycle over the global index
