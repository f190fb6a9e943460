"""train.py under careless or hostile input: every case ends in correct behaviour or one sentence (exit 1,
or 2 with the usage line for flags) before any work that it would throw away, and no checkpoint is lost.

Groups: settings checked before the first step, damaged or foreign checkpoints, run folders that cannot
be written or that another process writes, flags typed at their default value on --resume, flags a run
does not read, --init for every method, log.jsonl after a resume, the exit status of a stopped run, and
failed checkpoint writes."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import bench_common
import methods
import runlib
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "2", "--warmup", "1"]


def run(out, *extra):
    return train.main([*TINY, "--out", str(out), *map(str, extra)])


def sentence(capsys, fn, *argv):
    """The one sentence with which fn(argv) refuses: exit 1 with `error: ...`, or 2 with argparse's usage."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn([*map(str, argv)])
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    if isinstance(e.value.code, str):
        msg = e.value.code
    else:
        assert e.value.code == 2, printed.err
        msg = printed.err.strip().splitlines()[-1]
    assert msg.count("error: ") == 1 and "\n" not in msg, msg
    return msg


def refused(capsys, out, *extra):
    return sentence(capsys, train.main, *TINY, "--out", out, *extra)


def step_of(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"]


def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step ddpm run: copied, resumed from and started from by the tests below."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert run(out, "--method", "ddpm", "--steps", 2) == 2
    return out


def copy_run(base, dest):
    shutil.copytree(base, dest)
    return dest


# -----------------------------------------------------------------------------
# Settings checked before the first step (the last sample grid is drawn after the last step)

def test_sampling_steps_and_T_are_checked_before_the_first_step(tmp_path, base, capsys):
    msg = refused(capsys, tmp_path / "a", "--sample-steps", 5000)
    assert "--sample-steps 5000 is more than the 1000 timesteps" in msg
    msg = sentence(capsys, train.main, "--image-size", 16, "--T", 30, "--out", tmp_path / "a")  # default 50
    assert "--sample-steps 50 (the default)" in msg and "--sample-steps 30 or fewer" in msg
    for T in (2, 19):
        msg = refused(capsys, tmp_path / "a", "--T", T)
        assert f"--T {T} is too few timesteps for the linear schedule" in msg and "--T 20 or more" in msg
    assert not (tmp_path / "a").exists()                                     # refused before any file
    resumed = copy_run(base, tmp_path / "r")
    assert "--sample-steps 5000" in refused(capsys, resumed, "--resume", "--steps", 3, "--sample-steps", 5000)
    assert step_of(resumed) == 2
    # The smallest T of each schedule trains and draws its grid.
    assert run(tmp_path / "t20", "--T", 20, "--sample-steps", 20, "--steps", 1) == 1
    assert run(tmp_path / "t2", "--T", 2, "--schedule", "cosine", "--steps", 1) == 1
    assert os.listdir(tmp_path / "t2" / "samples") == ["step_0000001.png"]


# -----------------------------------------------------------------------------
# Damaged or foreign checkpoints

def test_damaged_and_foreign_checkpoints_are_one_sentence(tmp_path, base, capsys):
    ckpt = torch.load(base / "checkpoint.pt", weights_only=True)
    files = {"empty": (b"", "is empty (0 bytes)"), "random": (os.urandom(4096), "is not a checkpoint (not a file"),
             "text": (b"hello\nworld\n", "is not a checkpoint (not a file")}
    for name, (content, _) in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    for name, config in (("nothing", {}), ("bogus", {**ckpt["config"], "method": "bogus"}),
                         ("no_T", {k: v for k, v in ckpt["config"].items() if k != "T"}),
                         ("text_T", {**ckpt["config"], "T": "1000"}), ("list_method", {**ckpt["config"], "method": [1]})):
        torch.save({**ckpt, "config": config}, tmp_path / f"{name}.pt")
    files["nothing"] = (None, "its config lacks method, arch")
    files["text_T"] = (None, "its config holds T='1000', which is not a whole number")
    files["list_method"] = (None, "its config holds method=[1], which is not a string")
    files["bogus"] = (None, "is a run of --method 'bogus', which this code does not have")
    files["no_T"] = (None, "its config lacks T")
    for name, (_, want) in files.items():
        path = tmp_path / f"{name}.pt"
        for argv in (["--resume", path], ["--method", "ddpm", "--init", path]):
            msg = refused(capsys, tmp_path / "out", *argv)
            assert want in msg and "could run code" not in msg, (name, argv, msg)
        assert want in sentence(capsys, sample.main, "--ckpt", path, "--n", 1, "--steps", 1), name
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Run folders: writable, one writer, one run

def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path, base, capsys, monkeypatch):
    assert "--out is empty" in refused(capsys, "")
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in refused(capsys, tmp_path / "file", "--steps", 1)
    msg = refused(capsys, tmp_path / ("x" * 300), "--steps", 1)
    assert "cannot write into --out" in msg and os.strerror(errno.ENAMETOOLONG) in msg
    # A read-only filesystem, for a new run and for a resume: nothing is written there.
    ro = tmp_path / "ro"
    copy_run(base, ro / "old")
    real_makedirs, real_open = os.makedirs, open
    def read_only(path):
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(os, "makedirs", lambda p, *a, **k: read_only(p) or real_makedirs(p, *a, **k))
    monkeypatch.setattr(runlib, "open", lambda p, mode="r", *a, **k: (read_only(p) if set(mode) & set("wa+") else None)
                        or real_open(p, mode, *a, **k), raising=False)
    for out, extra in ((ro / "new", ["--steps", 1]), (ro / "old", ["--resume", "--steps", 3])):
        msg = refused(capsys, out, *extra)
        assert "cannot write into --out" in msg and os.strerror(errno.EROFS) in msg
    assert step_of(ro / "old") == 2 and not (ro / "new").exists()


def test_a_second_writer_is_refused_and_a_crashed_writer_leaves_no_lock(tmp_path, base, capsys):
    out = copy_run(base, tmp_path / "run")
    with runlib.RunLock(str(out)), runlib.RunLock(str(tmp_path / "new")):  # other writers (a lock is per open file)
        assert f"is being written by another train.py (process {os.getpid()})" in refused(
            capsys, out, "--resume", "--steps", 3)
        assert "is being written by another train.py" in refused(capsys, tmp_path / "new", "--steps", 1)
    assert step_of(out) == 2 and os.listdir(tmp_path / "new") == ["train.lock"]
    holder = subprocess.Popen([sys.executable, "-c", "import runlib, sys, time; lock = runlib.RunLock(sys.argv[1]); lock.__enter__(); "
                               "print('locked', flush=True); time.sleep(600)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert f"process {holder.pid}" in refused(capsys, out, "--resume", "--steps", 3)
    finally:
        holder.kill()  # kill -9: the OS releases the lock with the process
        holder.wait()
    assert run(out, "--resume", "--steps", 3) == 3


def test_a_run_folder_takes_no_other_runs_checkpoint(tmp_path, base, capsys):
    other = copy_run(base, tmp_path / "other")
    mine = copy_run(base, tmp_path / "mine")
    msg = refused(capsys, mine, "--resume", other / "checkpoint.pt", "--steps", 3)
    assert "holds a run of its own" in msg and step_of(mine) == 2
    assert run(mine, "--resume", mine / "checkpoint.pt", "--steps", 3) == 3   # its own checkpoint, named
    assert run(tmp_path / "new", "--resume", other, "--steps", 3) == 3        # another run into a new folder
    assert step_of(tmp_path / "new") == 3 and step_of(other) == 2


# -----------------------------------------------------------------------------
# --resume honours flags typed at their default value; flags that change the experiment are refused

def test_resume_honours_flags_typed_at_their_default_value(tmp_path, base, capsys):
    cases = [(["--method", "dtr", "--dtr-alpha", 0.5], ["--dtr-alpha", 0.8], "dtr_alpha=0.5"),
             (["--method", "rtr", "--seed", 3], ["--seed", 0], "seed=3"),
             ([], ["--method", "minsnr_v"], "method='ddpm'"),
             (["--class-cond", 0], ["--class-cond", 1], "num_classes=0"),
             (["--method", "minsnr_v"], ["--target", "eps"], "target='v'"),
             (["--method", "mtdiff"], ["--mt-weights", "paper"], "mt_weights='sigma'")]
    for i, (first, again, want) in enumerate(cases):
        out = tmp_path / str(i)
        run(out, *(first or ["--method", "ddpm"]), "--steps", 1)
        msg = refused(capsys, out, "--resume", "--steps", 2, *again)
        assert want in msg, (again, msg)
        assert step_of(out) == 1


def test_jointnet_stage_two_trains_with_a_typed_default_label_drop(tmp_path, base):
    jn = tmp_path / "jn"
    assert run(jn, "--method", "jointnet", "--init", base, "--rgb-heldout", 0, "--steps", 1) == 1
    s2 = tmp_path / "s2"
    assert run(s2, "--method", "jointnet", "--unfreeze", "--init", jn, "--cfg-drop", 0.1, "--rgb-heldout", 0,
               "--steps", 1) == 1
    cfg = json.load(open(s2 / "config.json"))
    assert cfg["cfg_drop"] == 0.1 and cfg["lr"] == 1e-5  # typed: kept; not typed: stage 2's own default


# -----------------------------------------------------------------------------
# Flags a run does not read

@pytest.mark.parametrize("flags, want", [
    (["--method", "ddpm", "--unfreeze"], "--unfreeze is a flag of --method jointnet / direct_extend"),
    (["--method", "ddpm", "--task", "label"], "--task is a flag of --method mtdiff"),
    (["--method", "minsnr_v", "--mt-lambda", 0.2], "--mt-lambda is a flag of --method mtdiff"),
    (["--method", "ddpm", "--dense-modality", "depth"], "--dense-modality is a flag of --method jointnet"),
    (["--method", "ddpm", "--dtr-alpha", 0.8], "--dtr-alpha does nothing with --routing none"),
    (["--method", "rtr", "--dtr-beta", 4], "--dtr-beta does nothing with --routing random"),
    (["--method", "ddpm", "--snr-gamma", 5], "--snr-gamma does nothing with --weighting none"),
    (["--method", "minsnr", "--p2-k", 2], "--p2-k does nothing with --weighting min_snr"),
    (["--method", "mtdiff", "--mt-head", "E"], "--mt-head chooses the label head of --task label"),
    (["--class-cond", 0, "--cfg-drop", 0.2], "--cfg-drop is label dropout for guidance, but this run is unconditional"),
    (["--method", "mtdiff", "--class-cond", 1], "--class-cond asks for class conditioning"),
])
def test_a_flag_the_run_does_not_read_is_refused(tmp_path, capsys, flags, want):
    assert want in refused(capsys, tmp_path / "r", *flags, "--steps", 1)
    assert not (tmp_path / "r").exists()


def test_a_flag_the_resumed_run_does_not_read_is_refused(tmp_path, base, capsys):
    out = copy_run(base, tmp_path / "r")
    assert "--task is a flag of --method mtdiff" in refused(capsys, out, "--resume", "--steps", 3, "--task", "label")
    assert "--dtr-alpha does nothing" in refused(capsys, out, "--resume", "--steps", 3, "--dtr-alpha", 0.5)
    assert step_of(out) == 2


# -----------------------------------------------------------------------------
# --init for every method

def test_init_starts_any_method_from_a_runs_ema_weights(tmp_path, base, capsys):
    start = torch.load(base / "checkpoint.pt", weights_only=True)["ema"]
    out = tmp_path / "dtr"
    # A run folder is taken like sample.py --ckpt takes one; an lr of 1e-30 leaves the weights in place.
    assert run(out, "--method", "dtr", "--init", base, "--lr", 1e-30, "--steps", 1) == 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["init"] == str(base / "checkpoint.pt")
    assert all(torch.allclose(ckpt[part][k], start[k], atol=1e-20) for part in ("model", "ema") for k in start)
    fresh = torch.load(base / "checkpoint.pt", weights_only=True)["model"]
    assert not all(torch.equal(ckpt["model"][k], fresh[k]) for k in fresh)  # EMA weights, not the raw ones
    assert "image_size=16 but this run has image_size=32" in refused(
        capsys, tmp_path / "a", "--method", "ddpm", "--init", base, "--image-size", 32)
    assert "model='unet-cpu' but this run has model='unet-small'" in refused(
        capsys, tmp_path / "a", "--method", "ddpm", "--init", base, "--model", "unet-small")
    assert "is a ddpm run, whose network --method mtdiff does not build" in refused(
        capsys, tmp_path / "a", "--method", "mtdiff", "--init", base)
    assert "no checkpoint at" in refused(capsys, tmp_path / "a", "--method", "ddpm", "--init", tmp_path / "none")
    assert not (tmp_path / "a").exists()
    # --init belongs to a run's start: a resume keeps the weights it continues.
    msg = refused(capsys, out, "--resume", "--steps", 2, "--init", tmp_path / "dtr")
    assert "--init starts a new run" in msg and step_of(out) == 1
    assert run(out, "--resume", "--steps", 2, "--init", base) == 2           # the same --init: continues


# -----------------------------------------------------------------------------
# log.jsonl after a resume, the exit status of a stopped run, failed writes, what is printed last

def test_a_resume_drops_the_log_records_past_its_checkpoint(tmp_path, base):
    once = tmp_path / "once"
    run(once, "--method", "ddpm", "--steps", 4)
    out = copy_run(base, tmp_path / "r")
    kept = (out / "checkpoint.pt").read_bytes()
    assert run(out, "--resume", "--steps", 4) == 4
    # As if killed after logging steps 3 and 4 but before their checkpoint, mid-way through a line.
    (out / "checkpoint.pt").write_bytes(kept)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert run(out, "--resume", "--steps", 4) == 4
    assert [r["step"] for r in log_of(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log_of(once)]


def stop_after_first_step(monkeypatch):
    """SIGTERM this process during the first step: train.py saves and stops, as under a scheduler."""
    real = runlib.update_ema
    def update_then_signal(*a):
        real(*a)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(runlib, "update_ema", update_then_signal)


def test_a_stopped_run_exits_with_the_stopped_status_and_bench_continues_it(tmp_path, monkeypatch):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with monkeypatch.context() as m:
            stop_after_first_step(m)
            with pytest.raises(SystemExit) as e:
                run(tmp_path / "r", "--steps", 5)
            assert e.value.code == train.EXIT_STOPPED == 75 and step_of(tmp_path / "r") == 1
            bench_common.call_train([*TINY, "--steps", "5", "--out", str(tmp_path / "b")], str(tmp_path / "b.log"))
            assert bench_common.saved_step(str(tmp_path / "b")) == 1                 # bench sees the stop by the step
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert run(tmp_path / "r", "--resume", "--steps", 5) == 5                # finished: the step is returned


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    real, calls = torch.save, []
    def disk_full_on_the_second_save(obj, f):
        calls.append(f)
        if len(calls) == 2:
            open(f, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f)
    monkeypatch.setattr(torch, "save", disk_full_on_the_second_save)
    msg = refused(capsys, tmp_path / "r", "--ckpt-every", 1, "--steps", 3)
    assert f"({os.strerror(errno.ENOSPC)}); the checkpoint already there is kept" in msg
    assert step_of(tmp_path / "r") == 1 and not [f for f in os.listdir(tmp_path / "r") if ".tmp." in f]
    calls.clear()
    calls.append(None)  # the next save fails: the first one of a new run
    assert "no checkpoint was written" in refused(capsys, tmp_path / "n", "--steps", 1)


def test_non_finite_losses_before_any_checkpoint_say_that_none_was_written(tmp_path, capsys, monkeypatch):
    real = methods.DEFAULTS["training_loss"]
    def nan_loss(*a):
        loss, stats = real(*a)
        return loss * float("nan"), stats
    monkeypatch.setitem(methods.DEFAULTS, "training_loss", nan_loss)
    msg = refused(capsys, tmp_path / "r", "--method", "ddpm", "--max-nonfinite", 2, "--steps", 50)
    assert "not finite for 2 steps in a row" in msg and "no checkpoint was written" in msg
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_refusal_is_the_last_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runlib, "oversubscribed", lambda *a: "note: the cores are oversubscribed")
    with pytest.raises(SystemExit):
        run(tmp_path / "r", "--sample-steps", 5000)
    printed = capsys.readouterr()
    assert "note:" not in printed.out + printed.err and "--sample-steps 5000" in printed.err.splitlines()[-1]
    run(tmp_path / "r", "--steps", 1)
    assert "note: the cores are oversubscribed" in capsys.readouterr().out   # printed once the run starts


def test_torchrun_reports_a_refusal_once_and_as_one_failure(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, "--batch-size", "5", "--steps", "1", "--out", str(tmp_path / "r")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = r.stdout + r.stderr
    assert r.returncode != 0 and text.count("--batch-size 5 is not divisible by the 2 processes") == 1, text
    # Rank 0 fails with status 2; the other rank leaves with 0 (or, still starting, is stopped by torchrun).
    assert len(re.findall(r"exitcode\s*:\s*[0-9]+ ", text)) == 1 and re.search(r"exitcode\s*:\s*2 ", text), text
    assert not (tmp_path / "r").exists()
