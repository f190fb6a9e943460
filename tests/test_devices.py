"""The paths a GPU run takes, exercised on a CPU: a compiled run resumes bit-identically, CPU threads
are shared between torchrun processes, and bench.py's GPU check runs (and says so without CUDA)."""
import os
import subprocess
import sys

import pytest
import torch

import bench_timing
import runlib
import train
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_compiled_run_trains_and_resumes_bit_identically(tmp_path, monkeypatch):
    # Inductor's C++ code generation takes minutes on a small CPU, so the suite compiles with the
    # aot_eager backend: the same graph capture and autograd graphs, the kernels left eager.
    # `python bench.py --only compile` runs the default backend.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    monkeypatch.setitem(unet.UNET_PRESETS, "unet-tiny", dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_ds=(), dropout=0.0))
    flags = ["--model", "unet-tiny", "--image-size", "16", "--batch-size", "4", "--log-every", "1",
             "--sample-every", "1000", "--sample-steps", "1", "--compile"]
    torch._dynamo.reset()
    train.main([*flags, "--steps", "4", "--out", str(tmp_path / "once")])
    train.main([*flags, "--steps", "2", "--out", str(tmp_path / "split")])
    train.main(["--resume", "--out", str(tmp_path / "split"), "--steps", "4"])
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("once", "split"))
    assert a["config"]["compile"] and b["step"] == 4
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and not any("_orig_mod" in k for k in a[part])  # the unwrapped module
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for i, s in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][i][k]) for k, v in s.items())


@pytest.mark.parametrize("cores, local_world, omp, threads", [
    (16, 1, None, 16), (16, 4, None, 4), (16, 3, None, 5), (2, 4, None, 1), (1, 1, None, 1),
    (16, 4, "2", 2), (16, 4, "0", 1)])
def test_each_local_process_takes_its_share_of_the_cores(cores, local_world, omp, threads):
    assert runlib.cpu_threads(cores, local_world, omp) == threads


def test_an_oversubscribed_machine_is_named_with_what_to_set():
    assert runlib.oversubscribed(8, 2, 4, load=0.1) is None
    assert "OMP_NUM_THREADS=4" in runlib.oversubscribed(8, 2, 8, load=0.1)     # 2 x 8 threads on 8 cores
    assert "OMP_NUM_THREADS=2" in runlib.oversubscribed(8, 2, 4, load=4.0)     # other jobs hold half the machine
    assert "load average 3.0" in runlib.oversubscribed(2, 1, 1, load=3.0)
    assert runlib.oversubscribed(2, 2, 1, load=0.0) is None


def test_omp_num_threads_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runlib.user_omp_threads() == "3" and runlib.cpu_threads(16, 2, runlib.user_omp_threads()) == 3


def test_torchrun_workers_tell_its_default_omp_num_threads_from_the_users(tmp_path):
    # torchrun sets OMP_NUM_THREADS=1 for its workers when the user did not: that 1 is not the user's choice.
    script = tmp_path / "threads.py"
    script.write_text("import os, sys\nsys.path.insert(0, %r)\nimport runlib\n"
                      "print('THREADS', runlib.user_omp_threads(), os.environ.get('OMP_NUM_THREADS'))\n" % ROOT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.stdout.count("THREADS None 1") == 2, r.stdout + r.stderr


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    r = subprocess.run([sys.executable, "bench.py", "--gpu-check"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no CUDA device" in r.stdout, r.stdout + r.stderr


def test_the_gpu_check_runs_a_case_end_to_end_on_a_cpu(tmp_path):
    # The check's own machinery (train, resume, sample, read the log) on one tiny case, without CUDA.
    results = bench_timing.gpu_check(root=str(tmp_path / "check"), steps=1, cases=[("dtr", "unet-cpu", [])],
                                     flags=("--precision", "bf16", "--image-size", "16", "--batch-size", "4"), require_cuda=False)
    assert len(results) == 1 and results[0]["ok"], results
    assert results[0]["img_per_s"] > 0 and results[0]["loss"] > 0
