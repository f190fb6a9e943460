"""
What each method costs: training images/s of every method side by side, sampling images/s, DTR's routing
cost per training step, torch.compile against eager training, and the GPU check.

    python bench.py --only routing   # DTR's training cost alone (timing_only -> routing_cost)
    python bench.py --only compile   # torch.compile against eager training steps (timing_only -> compile_cost)
    python bench.py --gpu-check      # every method with bf16 and --compile on CUDA, resumed and sampled

The training and sampling speed and the DTR cost are also sections of the whole report (bench_report.py,
--tiny / --quick / --full). May import bench_common.py and the project's library files (diffusion, dtr,
methods); train.py and sample.py only as commands (the GPU check runs them as a user does).
"""
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

import bench_common as common
import config
import diffusion
import dtr
import methods



# -----------------------------------------------------------------------------
# Speed: side by side in one process

def speed_setups(prof, arch, init):
    names = list(common.METHODS) + (["mtdiff"] if common.has_module("mtdiffusion") else [])
    if arch == "unet" and init and common.has_module("jointnet"):
        names += ["jointnet", "direct_extend"]
    out = []
    for m in [m for m in names if m in prof.get("speed_methods", names)]:
        # --rgb-heldout 0: the held-out RGB loss jointnet.py logs is evaluation, not part of a training step.
        extra = ["--init", init, "--rgb-heldout", "0"] if m in ("jointnet", "direct_extend") else []
        cfg, ds, _ = config.make_config(["--method", m, *common.common_flags(prof, arch, 0), *extra])
        model = common.seeded_model(cfg)
        if methods.hook(m, "init_model"):
            methods.hook(m, "init_model")(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        out.append(dict(method=m, cfg=cfg, model=model, params=params, opt=torch.optim.AdamW(params, lr=1e-5),
                        loss_fn=methods.hook(m, "training_loss"), ds=ds))
    return out


def training_speed(prof, arch, init):
    setups = {s["method"]: s for s in speed_setups(prof, arch, init)}
    B = prof["batch_size"]
    batch = common.fixed_batch(next(iter(setups.values()))["ds"], B)
    sched = diffusion.Schedule.make("linear", 1000).to(common.DEVICE)
    for s in setups.values():
        common.timed_steps(s, batch, sched, 1)  # warm-up
    # Interleaved repeats in rotating order (no method is always first after another), best of each:
    # a busy machine only ever slows a repeat down.
    times = common.interleaved(list(setups), prof["speed_repeats"],
                               lambda m: common.timed_steps(setups[m], batch, sched, prof["speed_steps"]))
    rows = []
    for s in setups.values():
        ips = B * prof["speed_steps"] / min(times[s["method"]])
        rows.append(dict(arch=arch, model=prof["models"][arch], method=s["method"], img_per_s=ips,
                         params=sum(p.numel() for p in s["model"].parameters()),
                         trainable=sum(p.numel() for p in s["params"])))
    ref = next(r["img_per_s"] for r in rows if r["method"] == "ddpm")
    for r in rows:
        r["ratio_to_ddpm"] = r["img_per_s"] / ref
    return rows


@torch.no_grad()
def sampling_speed(prof, arch):
    """Images/s of DDIM-50 for ddpm and dtr models (best of interleaved repeats) and of DDPM with all T
    steps (unless the profile respaces it; timed once: it is the long one)."""
    n, S, k = prof["sample_n"], prof["image_size"], prof["ddpm_steps"] or 1000
    sched = diffusion.Schedule.make("linear", 1000).to(common.DEVICE)
    fns = {}
    for m in ("ddpm", "dtr"):
        cfg, _, _ = config.make_config(["--method", m, *common.common_flags(prof, arch, 0)])
        model = common.seeded_model(cfg).eval()
        fns[m] = diffusion.cfg_model(model, torch.arange(n, device=common.DEVICE) % cfg["num_classes"], 1.0, cfg["num_classes"])
        fns[m](torch.randn(n, 3, S, S, device=common.DEVICE), torch.zeros(n, dtype=torch.long, device=common.DEVICE))  # warm-up
    ddim = common.interleaved(list(fns), prof["speed_repeats"], lambda m: common.timed(
        lambda: diffusion.ddim_sample(fns[m], sched, (n, 3, S, S), prof["ddim_steps"], device=common.DEVICE)))
    rows = [dict(arch=arch, model=prof["models"][arch], method=m, sampler=f"DDIM-{prof['ddim_steps']}",
                 img_per_s=n / min(ts), batch=n) for m, ts in ddim.items()]
    t = common.timed(lambda: diffusion.ddpm_sample(fns["ddpm"], sched, (n, 3, S, S), k, device=common.DEVICE))
    rows.append(dict(arch=arch, model=prof["models"][arch], method="ddpm", sampler=f"DDPM-{k}", img_per_s=n / t, batch=n))
    return rows


# -----------------------------------------------------------------------------
# One-step timings against a control: DTR routing and torch.compile

def median_ci(xs, level=0.95, boots=2000, seed=0):
    """Median of xs and a bootstrap confidence interval for it (percentile method)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(xs, dtype=torch.float64)
    meds = x[torch.randint(len(xs), (boots, len(xs)), generator=g)].quantile(0.5, dim=1).sort().values
    lo, hi = meds[int((1 - level) / 2 * boots)], meds[int((1 + level) / 2 * boots) - 1]
    return dict(median=statistics.median(xs), lo=lo.item(), hi=hi.item())


def fmt_median_ci(c, digits):
    return f"{c['median']:.{digits}f} ({c['lo']:.{digits}f}-{c['hi']:.{digits}f})"


def timing_setup(prof, model_name, size, batch_size):
    """The ddpm config, data and seeded model of one timing row: a model preset at an image size and batch."""
    arch = "dit" if model_name.startswith("DiT") else "unet"
    p = {**prof, "models": {arch: model_name}, "image_size": size, "batch_size": batch_size}
    cfg, ds, _ = config.make_config(["--method", "ddpm", *common.common_flags(p, arch, 0)])
    return cfg, ds, common.seeded_model(cfg)


def aba_ratios(times, x):
    """Timings {"a": [...], x: [...], "b": [...]} of repeats of a / x / b: the ratio t_x / mean(t_a, t_b) of
    each repeat (slow drifts of a shared machine hit the three alike and cancel) and the A/A control
    t_b / t_a, each as a median with a 95% bootstrap interval."""
    ratio = [d / ((a + b) / 2) for a, d, b in zip(times["a"], times[x], times["b"])]
    return median_ci(ratio), median_ci([b / a for a, b in zip(times["a"], times["b"])])


def routing_cost(prof):
    """DTR's cost: training step time with routing over the same model and weights without it.

    Each repeat times one optimiser step (loss, backward, AdamW) of three conditions in rotating order:
    no routing (a), DTR masks, no routing (b). The DTR ratio of a repeat is t_dtr / mean(t_a, t_b): slow
    drifts of a shared machine hit the three alike and cancel. t_b / t_a is an A/A control: its interval
    shows how small a difference the timing can resolve. Reported: medians over repeats with 95%
    bootstrap intervals."""
    rows = []
    for model_name, size, batch_size, repeats in prof["routing_cost"]:
        cfg, ds, model = timing_setup(prof, model_name, size, batch_size)
        s = dict(model=model, cfg=cfg, opt=torch.optim.AdamW(model.parameters(), lr=1e-5), loss_fn=methods.diffusion_training_loss)
        blocks = model.routable_blocks()
        dtr.apply_routing(model, "dtr")
        masks = [b.route_mask for b in blocks]
        batch = common.fixed_batch(ds, batch_size)
        sched = diffusion.Schedule.make("linear", 1000).to(common.DEVICE)

        def step(routed):
            for b, m in zip(blocks, masks):
                b.route_mask = m if routed else None
            return common.timed_steps(s, batch, sched, 1)

        for routed in (False, True, False, True):  # warm-up
            step(routed)
        times = common.interleaved(("a", "dtr", "b"), repeats, lambda k: step(k == "dtr"))
        dtr_ratio, aa_ratio = aba_ratios(times, "dtr")
        rows.append(dict(model=model_name, image_size=size, batch=batch_size, repeats=repeats,
                         params=sum(q.numel() for q in model.parameters()),
                         step_ms=1e3 * statistics.median(times["a"] + times["b"]),
                         dtr_ratio=dtr_ratio, aa_ratio=aa_ratio))
        print(f"[bench] routing cost {model_name} {size}px batch {batch_size}: dtr/none "
              f"{rows[-1]['dtr_ratio']['median']:.4f}, A/A {rows[-1]['aa_ratio']['median']:.4f}", flush=True)
    return rows


def routing_markdown(rows):
    """The DTR cost table: median step-time ratios with their 95% intervals."""
    return ["", "## DTR cost (training step time, DTR / no routing, same model and weights)", "",
            "Medians over repeats of one step each of no routing, DTR, no routing (rotating order), with 95% "
            "bootstrap intervals. A/A: the two no-routing steps against each other, the timing's resolution. "
            "DTR adds no parameters.", "",
            "| model | image | batch | parameters | step (ms) | DTR / none | A/A | repeats |", "|---|---|---|---|---|---|---|---|"] + [
        f"| {r['model']} | {r['image_size']}px | {r['batch']} | {r['params']:,} | {r['step_ms']:.1f} | "
        f"{fmt_median_ci(r['dtr_ratio'], 4)} | {fmt_median_ci(r['aa_ratio'], 4)} | {r['repeats']} |" for r in rows]


# (model, image size, batch, repeats) per profile: one training step each of eager, compiled, eager per repeat.
COMPILE_COST = {"tiny": (("unet-cpu", 16, 4, 3),),
                "quick": (("unet-cpu", 32, 16, 40), ("DiT-T/4", 32, 16, 40)),
                "full": (("unet-cpu", 32, 16, 40), ("DiT-T/4", 32, 16, 40), ("unet-gpu", 64, 128, 40),
                         ("DiT-B/2", 32, 128, 40))}


def compile_cost(prof, name):
    """Training step time of train.py's compiled network over the same model and weights run eagerly.

    The first compiled step is timed alone: it holds the compilation. Then each repeat times one step of
    eager (a), compiled, eager (b) in rotating order, as the DTR cost does; compiled / mean(a, b) per
    repeat, b / a as the A/A control, medians with 95% bootstrap intervals. Break-even: the steps after
    which the compilation has paid for itself."""
    rows = []
    for model_name, size, batch_size, repeats in COMPILE_COST[name]:
        cfg, ds, model = timing_setup(prof, model_name, size, batch_size)
        sched = diffusion.Schedule.make("linear", 1000).to(common.DEVICE)
        eager = dict(model=model, cfg=cfg, opt=torch.optim.AdamW(model.parameters(), lr=1e-5),
                     loss_fn=methods.diffusion_training_loss)
        fast = {**eager, "model": torch.compile(model)}  # as train.py --compile: the network compiled, the loss eager
        batch = common.fixed_batch(ds, batch_size)
        first = common.timed_steps(fast, batch, sched, 1)  # compiles
        for s in (eager, fast, eager, fast):  # warm-up
            common.timed_steps(s, batch, sched, 1)
        times = common.interleaved(("a", "compiled", "b"), repeats,
                                   lambda k: common.timed_steps(fast if k == "compiled" else eager, batch, sched, 1))
        compiled_ratio, aa_ratio = aba_ratios(times, "compiled")
        eager_s, compiled_s = statistics.median(times["a"] + times["b"]), statistics.median(times["compiled"])
        rows.append(dict(model=model_name, image_size=size, batch=batch_size, repeats=repeats,
                         params=sum(q.numel() for q in model.parameters()), eager_ms=1e3 * eager_s,
                         compiled_ms=1e3 * compiled_s, compile_s=first - compiled_s,
                         break_even_steps=(first - compiled_s) / (eager_s - compiled_s) if eager_s > compiled_s else None,
                         compiled_ratio=compiled_ratio, aa_ratio=aa_ratio))
        print(f"[bench] compile {model_name} {size}px batch {batch_size}: compiled/eager "
              f"{rows[-1]['compiled_ratio']['median']:.3f}, compiling took {rows[-1]['compile_s']:.0f} s", flush=True)
    return rows


def compile_markdown(rows):
    even = lambda r: "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"
    return ["", f"## Compile cost (training step time, torch.compile / eager, same model and weights, {common.DEVICE})", "",
            "Medians over repeats of one step each of eager, compiled, eager (rotating order), with 95% bootstrap "
            "intervals; below 1 the compiled step is faster. A/A: the two eager steps against each other. Break-even: "
            "steps until the compilation time is paid back.", "",
            "| model | image | batch | eager (ms) | compiled (ms) | compiled / eager | A/A | compiling (s) | break-even steps | repeats |",
            "|---|---|---|---|---|---|---|---|---|---|"] + [
        f"| {r['model']} | {r['image_size']}px | {r['batch']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
        f"{fmt_median_ci(r['compiled_ratio'], 3)} | {fmt_median_ci(r['aa_ratio'], 3)} | {r['compile_s']:.0f} | "
        f"{even(r)} | {r['repeats']} |" for r in rows]


def speed(prof, root):
    """Training images/s of every method (training_speed; JointNet and Direct Extend extend a 1-step ddpm run,
    whose weights do not change the time) and sampling images/s, on every backbone of the profile."""
    base = os.path.join(root, "speed-base")
    if common.saved_step(base) is None:
        os.makedirs(root, exist_ok=True)
        common.call_train(["--method", "ddpm", *common.common_flags(prof, "unet", 0), "--steps", "1", "--out", base],
                          base + ".log")
    init = os.path.join(base, "checkpoint.pt")
    return dict(training=[r for a in prof["arches"] for r in training_speed(prof, a, init if a == "unet" else None)],
                sampling=[r for a in prof["arches"] for r in sampling_speed(prof, a)])


def speed_markdown(p, rows):
    """The training and sampling speed tables of speed()'s rows."""
    lines = ["", f"## Training speed (batch {p['batch_size']}, {p['image_size']}px, best of {p['speed_repeats']} "
             f"interleaved repeats of {p['speed_steps']} steps)", "",
             "| backbone | method | parameters | trainable | images/s | ratio to ddpm |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['params']:,} | {r['trainable']:,} | {r['img_per_s']:.1f} | "
              f"{r['ratio_to_ddpm']:.3f} |" for r in rows["training"]]
    lines += ["", f"## Sampling speed (batch {p['sample_n']}, untrained weights; DDIM: best of {p['speed_repeats']} "
              "interleaved repeats, DDPM: one run)", "", "| backbone | method | sampler | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['sampler']} | {r['img_per_s']:.2f} |" for r in rows["sampling"]]
    return lines


def timing_only(prof, name, args, command, section):
    """One timing section alone (--only speed / routing / compile): its rows, their table, bench.json and bench.md."""
    rows_fn, markdown_fn, title = {"speed": (lambda p: speed(p, args.runs), lambda rows: speed_markdown(prof, rows), "Speed"),
                                   "routing": (routing_cost, routing_markdown, "DTR cost"),
                                   "compile": (lambda p: compile_cost(p, name), compile_markdown, "Compile cost")}[section]
    t0 = time.time()
    rows = rows_fn(prof)
    report = dict(profile_name=name, command=command, date=datetime.date.today().isoformat(), hardware=common.hardware(),
                  wall_s=time.time() - t0, **{f"{section}_cost": rows})
    text = "\n".join([f"# {title} ({name} profile)", "", f"`{command}` on {report['date']}; {report['hardware']}; "
                      f"{report['wall_s'] / 60:.1f} min."] + markdown_fn(rows)) + "\n"
    common.write_text(args.json, json.dumps(report, indent=1))
    common.write_text(args.md, text)
    print(text)
    return report


# -----------------------------------------------------------------------------
# The GPU check: every method, both backbones, through train.py and sample.py as a user runs them.

GPU_CHECK_CASES = ([(m, b, []) for b in ("unet-cpu", "DiT-T/4") for m in common.METHODS]
                   + [("mtdiff", b, ["--task", t]) for b in ("unet-cpu", "DiT-T/4") for t in ("masked", "label", "translate")]
                   + [(m, "unet-cpu", []) for m in ("jointnet", "direct_extend")]
                   + [("dtr", "unet-gpu", ["--image-size", "64", "--batch-size", "128"])])  # the default GPU run
HERE = os.path.dirname(os.path.abspath(__file__))  # where train.py and sample.py are


def check_case(root, method, model, extra, steps, flags, init=None):
    """Train `steps` steps, resume for 10 more, sample; -> a result dict (ok, loss, img_per_s, seconds, error)."""
    name = " ".join([method, model, *extra])
    out = os.path.join(root, name.replace(" ", "_").replace("/", "-").replace("--", ""))
    argv = [*flags, "--method", method, "--model", model, *extra, "--out", out]
    if init:
        argv += ["--init", init, "--rgb-heldout", "8"]
    t0 = time.time()
    res = dict(name=name, out=out, ok=False)
    for cmd in ([sys.executable, "train.py", *argv, "--steps", str(steps)],
                [sys.executable, "train.py", "--resume", "--out", out, "--steps", str(steps + 10)],
                [sys.executable, "sample.py", "--ckpt", out, "--n", "8", "--steps", "5", "--out", os.path.join(out, "check")]):
        r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        if r.returncode:
            lines = (r.stderr or r.stdout).strip().splitlines() or ["(no output)"]
            return {**res, "error": f"{os.path.basename(cmd[1])} exited {r.returncode}: {lines[-1]}",
                    "seconds": time.time() - t0}
    log = common.read_log(out)
    losses = [rec["loss"] for rec in log]
    ck = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    # images/s of the first run's last log window: after compilation (the resumed run compiles again)
    ips = next((rec["img_per_s"] for rec in log if rec["step"] == steps), log[-1]["img_per_s"])
    res.update(seconds=time.time() - t0, loss=losses[-1], img_per_s=ips, step=ck["step"],
               ok=ck["step"] == steps + 10 and all(math.isfinite(v) for v in losses))
    if not res["ok"]:
        res["error"] = f"step {ck['step']} (expected {steps + 10}) or a non-finite logged loss: {losses}"
    return res


def gpu_check(root="runs/gpu-check", steps=50, cases=GPU_CHECK_CASES, flags=("--precision", "bf16", "--compile"),
              require_cuda=True):
    """Every method for `steps` steps with bf16 and --compile, resumed, sampled, each in its own process; the
    loss, the images/s of the last log window (after compilation) and the time printed per case; a
    2-process torchrun run when two GPUs are present. Returns the results; exits 1 if any failed."""
    if require_cuda and not torch.cuda.is_available():
        print("bench.py --gpu-check: no CUDA device on this machine; nothing to check")
        return []
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    t_start = time.time()
    common_args = ["--image-size", "32", "--batch-size", "64", "--log-every", "10", "--ckpt-every", "100000",
                   "--sample-every", "100000", "--sample-steps", "5", "--warmup", "10", *flags]
    # Compiling is mostly single-threaded host work, so cases run `workers` at a time to fit the check in
    # minutes; the images/s of a case are then a lower bound (the GPU is shared with the other cases).
    workers = max(1, min(6, (os.cpu_count() or 2) // 2)) if require_cuda else 1
    print(f"[gpu-check] {common.hardware()}; {len(cases)} cases of {steps} steps + 10 resumed, flags {' '.join(flags)}, "
          f"{workers} at a time", flush=True)
    init = None
    if any(m in ("jointnet", "direct_extend") for m, *_ in cases):
        init = os.path.join(root, "rgb", "checkpoint.pt")
        r = subprocess.run([sys.executable, "train.py", *common_args, "--model", "unet-cpu", "--steps", "20",
                            "--out", os.path.dirname(init)], cwd=HERE, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the RGB run that JointNet starts from failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    results = []
    with ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(check_case, root, m, b, e, steps, common_args, init if m in ("jointnet", "direct_extend") else None)
                for m, b, e in cases]
        for job in as_completed(jobs):
            r = job.result()
            results.append(r)
            print(f"[gpu-check] {'ok  ' if r['ok'] else 'FAIL'} {r['name']:32s} " + (
                f"loss {r['loss']:.4f}  {r['img_per_s']:8.0f} img/s  {r['seconds']:5.0f} s" if r["ok"] else r["error"]),
                flush=True)
    if torch.cuda.device_count() >= 2:
        out = os.path.join(root, "ddp")
        run = lambda *a: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                         "train.py", *a], cwd=HERE, capture_output=True, text=True)
        t0 = time.time()
        r1 = run(*common_args, "--method", "dtr", "--model", "unet-cpu", "--steps", str(steps), "--out", out)
        r2 = run("--resume", "--out", out, "--steps", str(steps + 10)) if r1.returncode == 0 else r1
        ok = r2.returncode == 0
        res = dict(name="torchrun 2 GPUs dtr unet-cpu", ok=ok, seconds=time.time() - t0)
        if ok:
            log = common.read_log(out)
            res.update(loss=log[-1]["loss"], img_per_s=log[-1]["img_per_s"])
        results.append(res)
        print(f"[gpu-check] {'ok  ' if ok else 'FAIL'} {res['name']:32s} " + (
            f"loss {res['loss']:.4f}  {res['img_per_s']:8.0f} img/s  {res['seconds']:5.0f} s" if ok else
            " ".join((r2.stderr or r2.stdout).strip().splitlines()[-1:])), flush=True)
    else:
        print(f"[gpu-check] {torch.cuda.device_count()} GPU(s): the 2-process torchrun run needs two and is skipped")
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"[gpu-check] {len(results) - len(failed)} of {len(results)} passed in {(time.time() - t_start) / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed and require_cuda:
        sys.exit(1)
    return results
