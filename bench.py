"""
The evidence: does each paper's claim hold at small scale, and what does each method cost?

    python bench.py --recipe     # which shared settings make the plain ddpm baseline learn fastest on a CPU
    python bench.py --cpu        # the evidence profile: every row x 3 seeds, paired verdicts; resumable
    python bench.py --quick      # a smoke of every row (16px, 400 steps, one seed): checks, not evidence
    python bench.py --full       # one GPU, overnight: 32px, 10k steps, three seeds
    python bench.py --tiny       # a few steps of everything: checks that the pipeline runs (the tests use it)
    python bench.py --only routing   # DTR's training cost alone (the profile's models; 12 minutes with --quick)
    python bench.py --only compile   # torch.compile against eager training steps (compiling takes minutes on a CPU)
    python bench.py --gpu-check      # every method with bf16 and --compile on CUDA, resumed and sampled (~5 min)

Every row of a profile trains through train.py with the same data, image size, batch, steps, learning
rate and seeds, and is scored at several checkpoints (training resumes exactly between them) with
metrics.py: Frechet distance (FD), precision and recall of DDIM samples against held-out shapes images,
in the feature space of the small reference CNN (not Inception; not comparable to published FIDs).

Rows and the claims they test:
    methods     ddpm, minsnr, dtr, rtr, dtr_minsnr on the UNet and DiT presets: DTR lowers FD and
                converges faster, random routing (R-TR) hurts, DTR + Min-SNR is better still
                (DTR Tables 1-2, Fig. 5)
    weighting   constant / SNR / max-SNR-5 / min-SNR-5 weighting for x0-, eps- and v-prediction:
                min-SNR-5 converges fastest for every target (Min-SNR Fig. 5, Table 1)
    loss bins   the unweighted training loss per timestep decile over the last stretch of each run
    mtdiff      masked-image training: restoration of held-out masked images against SDEdit and
                replacement with the ddpm model (MT-Diffusion Table 1, MSE instead of LPIPS), and
                the label head against the same network trained as a supervised classifier (Fig. 6)
    jointnet    JointNet vs Direct Extend from the ddpm UNet: RGB FD and held-out RGB loss (a quantitative
                proxy for Fig. 8, a grid of samples), RGB -> depth AbsRel / RMSE (Table 2's metrics)
    speed       training images/s of every method side by side in one process (interleaved repeats in
                rotating order, best of each), its ratio to ddpm on the same backbone, parameter counts;
                sampling images/s of DDPM and DDIM-50
    DTR cost    training step time with DTR routing over the same model and weights without it, at the
                CPU presets and DiT-S/2 (DTR App. E: 0.6%, 0.4%, 0.3% for DiT-S/B/L), against an A/A
                control of the timing
                (`python bench.py --only routing` runs this section alone)
Writes bench.json (every number) and bench.md (the tables and a verdict per claim with its seed count).

--cpu and --recipe store every finished unit (row, seed, checkpoint) in results/bench_cpu.json or
results/recipe_cpu.json at once; running the same command again continues where it stopped (Ctrl-C,
SIGTERM or a lost machine), and writes the .md beside it. --cpu runs its jobs (a row with one seed, or
an evaluation with its training) in --parallel worker processes of one torch thread each (default: one
per core, at most 8), which take jobs under file locks; on 2 cores two 1-thread trainings do 1.85x the
work of one 2-thread training. Every --cpu row uses the recipe the study
chose, unchanged; each claim compares two rows seed by seed (same seeds, same evaluation noise): the
mean paired difference with a 95% bootstrap interval over seeds and a verdict, holds / contradicted /
unresolved (the interval spans zero). Scores: FD, generated-class accuracy (ceiling: the reference CNN
on held-out real images, floor: chance) and colour statistics, each beside its real-data value.

Differences from the papers: tiny models, 16-32px synthetic images and minutes of training instead of
ImageNet and days; FD in a reference CNN's features; restoration by MSE, not LPIPS. A claim that does
not reproduce here says something about this scale, not necessarily about the paper.
"""
import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

import data
import diffusion
import dtr
import jointnet as jn
import methods
import metrics
import mtdiffusion as mt
import mtdiffusion_eval
import runlib
import train

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ("ddpm", "minsnr", "dtr", "rtr", "dtr_minsnr")
WEIGHTINGS = ("const", "snr", "max_snr", "min_snr")
# What every profile sets. Rows share all of it: same data, image size, batch, steps, lr and seeds.
#   checkpoints      steps at which each run is scored (FD / precision / recall); the last is the run length
#   n_eval, n_ref    generated and held-out real images per score; eval_steps, eval_eta: their DDIM sampler
#                    (eta 0: deterministic, so every row maps the same noise to its samples)
#   grid_steps       DDIM steps of the sample grid train.py writes; rgb_heldout: jointnet.py's logged RGB batch
#   speed_*          optimiser steps per timing and interleaved repeats; sample_n: batch of the sampling timings
#   n_restore        held-out images for restoration, label and depth scores; mt_patches: hidden patches
#   workers          data-loader processes of train.py (0: render in the training process)
#   routing_cost     (model, image size, batch, repeats) of the DTR cost timings: one training step each
#                    of none / dtr / none per repeat, in rotating order
_COMMON = dict(models={"unet": "unet-cpu", "dit": "DiT-T/4"}, arches=("unet", "dit"), methods=METHODS,
               targets=("x0", "eps", "v"), weightings=WEIGHTINGS, featnet=dict(), ddim_steps=50, ddpm_steps=None,
               workers=0, eval_eta=0.0)
PROFILES = {
    # Seconds of CPU: one or two steps of every row, for the test suite.
    "tiny": {**_COMMON, **dict(image_size=16, batch_size=8, lr=1e-3, warmup=1, checkpoints=(1, 2), seeds=(0,),
                               log_every=1, methods=("ddpm", "dtr"), targets=("eps",), weightings=("const", "min_snr"),
                               n_eval=8, n_ref=16, eval_steps=2, grid_steps=1, rgb_heldout=4,
                               featnet=dict(n_train=64, n_test=32, steps=5), speed_steps=1, speed_repeats=1,
                               speed_methods=("ddpm", "dtr", "mtdiff", "jointnet"), sample_n=2, ddim_steps=2,
                               ddpm_steps=4, n_restore=4, mt_patches=2,
                               routing_cost=(("unet-cpu", 16, 4, 3), ("DiT-T/4", 16, 4, 3)))},
    # About 30 minutes on 2 CPU cores: 16px, 400 steps of batch 16, one seed.
    "quick": {**_COMMON, **dict(image_size=16, batch_size=16, lr=1e-3, warmup=50, checkpoints=(100, 200, 400),
                                seeds=(0,), log_every=50, n_eval=256, n_ref=1024, eval_steps=10, grid_steps=10,
                                rgb_heldout=16, speed_steps=3, speed_repeats=7, sample_n=16, n_restore=64,
                                mt_patches=3, routing_cost=(("unet-cpu", 32, 16, 150), ("DiT-T/4", 32, 16, 150),
                                                            ("DiT-S/2", 32, 8, 90)))},
    # The recipe study (--recipe): variants of the plain ddpm baseline's settings, one seed; see RECIPE_VARIANTS.
    "recipe": {**_COMMON, **dict(image_size=16, batch_size=16, lr=1e-3, warmup=50, grad_clip=1.0, ema_decay=0.999,
                                 schedule="linear", checkpoints=(4000,), seeds=(0,), log_every=50, n_eval=256, n_ref=1024,
                                 eval_steps=50, eval_eta=1.0, grid_steps=10, speed_steps=3, speed_repeats=5)},
    # Evidence on 2 CPU cores (--cpu): the base recipe of the study (results/recipe_cpu.md) with gradient clipping
    # off (no measurable effect on the baseline; the Min-SNR authors' code does not clip), long enough for the
    # eps baseline to learn (4,000 steps), every row x 3 seeds. The UNet only: DiT-T/4 at 16 px sees 16 tokens.
    # All four weightings for eps (where the Min-SNR paper reports divergence), constant and min-SNR for v:
    # the whole profile then fits 3 hours on 2 cores (two 1-thread workers).
    "cpu": {**_COMMON, **dict(arches=("unet",), targets=("eps", "v"), image_size=16, batch_size=16, lr=1e-3, warmup=50,
                              grad_clip=0.0, ema_decay=0.999, schedule="linear", checkpoints=(1000, 2000, 4000),
                              seeds=(0, 1, 2), log_every=50, n_eval=256, n_ref=1024, eval_steps=100, eval_eta=1.0,
                              grid_steps=10, rgb_heldout=16, n_restore=64, mt_patches=3, min_snr_gamma=5.0,
                              max_snr_gamma=1.0, target_weightings={"v": ("const", "min_snr")})},
    # One GPU: 32px, 10k steps of batch 128, three seeds (an overnight run).
    "full": {**_COMMON, **dict(image_size=32, batch_size=128, lr=3e-4, warmup=500, checkpoints=(1000, 2500, 5000, 10000),
                               seeds=(0, 1, 2), log_every=250, n_eval=2000, n_ref=5000, eval_steps=50, grid_steps=50,
                               rgb_heldout=64, speed_steps=10, speed_repeats=7, sample_n=64, n_restore=500,
                               mt_patches=5, workers=4,
                               routing_cost=(("unet-cpu", 32, 16, 200), ("DiT-T/4", 32, 16, 200), ("DiT-S/2", 32, 128, 100),
                                             ("unet-gpu", 64, 128, 100), ("DiT-B/2", 32, 128, 100)))},
}


def has_module(name):
    return importlib.util.find_spec(name) is not None


# -----------------------------------------------------------------------------
# Training runs through train.py

def call_train(argv, log_path):
    """train.main in this process, its output appended to log_path; its signal handlers are undone
    afterwards so Ctrl-C still stops bench. A run stopped by a signal returns (its checkpoint is saved:
    the caller sees the saved step)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            train.main(argv)
    except SystemExit as e:
        if e.code == train.EXIT_STOPPED:
            return
        raise RuntimeError(f"python train.py {' '.join(argv)} failed ({e.code}); its output is in {log_path}") from None
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def common_flags(prof, arch, seed):
    p = prof
    flags = ["--model", p["models"][arch], "--image-size", str(p["image_size"]), "--batch-size", str(p["batch_size"]),
             "--lr", str(p["lr"]), "--warmup", str(p["warmup"]), "--log-every", str(p["log_every"]),
             "--ckpt-every", str(p["checkpoints"][-1]), "--sample-every", str(p["checkpoints"][-1]),
             "--sample-steps", str(p["grid_steps"]), "--seed", str(seed), "--workers", str(p["workers"])]
    for k in ("grad_clip", "ema_decay", "schedule"):  # recipe settings, where a profile fixes them
        if k in p:
            flags += [f"--{k.replace('_', '-')}", str(p[k])]
    return flags


def run_dir(root, name, seed):
    """A row's run folder for one seed ('unet/ddpm', 0 -> ROOT/unet_ddpm-seed0)."""
    return os.path.join(root, f"{name}-seed{seed}".replace("/", "_"))


def train_in_segments(out, flags, checkpoints, on_checkpoint):
    """Train to each checkpoint in turn (resuming in between, which continues exactly) and call
    on_checkpoint(checkpoint path, step) at each; returns {step: its result}."""
    if os.path.isfile(os.path.join(out, "config.json")):
        shutil.rmtree(out)  # a stale run of an earlier bench in bench's own folder
    if os.path.exists(out + ".log"):
        os.remove(out + ".log")
    results = {}
    for i, step in enumerate(checkpoints):
        argv = flags + ["--steps", str(step), "--out", out] if i == 0 else ["--resume", "--out", out, "--steps", str(step)]
        call_train(argv, out + ".log")
        results[step] = on_checkpoint(os.path.join(out, "checkpoint.pt"), step)
    return results


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def loss_bins(log, after_step):
    """Mean unweighted loss per timestep decile over the log records after `after_step`."""
    recs = [r for r in log if r["step"] > after_step] or log
    return [None if not vals else sum(vals) / len(vals)
            for vals in ([r["loss_bins"][i] for r in recs if r["loss_bins"][i] is not None] for i in range(10))]


# -----------------------------------------------------------------------------
# Scoring

class Scorer:
    """The reference net and the features of n_ref held-out real images, computed once per profile. FD uses
    all n_ref; precision/recall the first n_eval, since both depend on the sizes of the two sets (as equal
    sizes in Kynkaanniemi et al.). Also the generated-class accuracy of class-conditional samples and the
    colour statistics (metrics.py). `floor` scores n_eval further held-out real images with their true
    labels: FD's noise floor and the class accuracy's ceiling at this N."""

    def __init__(self, prof, cache=None):
        S = prof["image_size"]
        self.net, self.info = metrics.load_feature_net("shapes", S, 0, "trained", cache, **prof["featnet"])
        self.net = self.net.to(DEVICE)
        self.ref = metrics.extract_features(self.net, metrics.reference_images("shapes", S, prof["n_ref"]), device=DEVICE)
        _, held, _ = metrics.reference_split("shapes", S)
        self.floor = self(*metrics.stack_items(held, prof["n_eval"], prof["n_ref"]))

    def __call__(self, images, labels=None):
        feats = metrics.extract_features(self.net, images, device=DEVICE)
        p, r = metrics.precision_recall(self.ref[:len(feats)], feats)
        colour = metrics.channel_stats(images)
        out = {"fd": metrics.frechet_distance_features(self.ref, feats), "precision": p, "recall": r,
               "channel_dev": colour["channel_dev"], "std": statistics.fmean(colour["std"])}
        if labels is not None:
            out["class_acc"] = metrics.generated_class_accuracy(self.net.cpu(), images, labels)["accuracy"]
            self.net.to(DEVICE)
        return out


@torch.no_grad()
def generate(model, sched, cfg, n, steps, seed, eta=0.0, batch=256):
    """n images from a run's model by DDIM(steps, eta) with the same noise for every row (bench fixes the
    sampler itself, whatever train.py's sample grids use): the plain sampler for the ddpm family,
    Algorithm 1's jointly generated image for MT-Diffusion, the RGB half of joint samples for JointNet and
    Direct Extend. Labels cycle through the classes. Returns (images, labels or None when unconditional)."""
    g = torch.Generator(DEVICE).manual_seed(10_000 + seed)
    K = cfg["num_classes"]
    out, labels = [], torch.arange(n) % K if K else None
    for i in range(0, n, batch):
        b = min(batch, n - i)
        shape = (b, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
        y = labels[i:i + b].to(DEVICE) if K else None
        if cfg["method"] == "mtdiff":
            x = mt.mt_sample(model, sched, shape, steps, eta, target=cfg["target"], generator=g, device=DEVICE)[0]
        elif cfg["method"] in ("jointnet", "direct_extend"):
            x = jn.sample_joint(model, sched, cfg, b, steps, batch=b, eta=eta, labels=y, generator=g, device=DEVICE)[0]
        else:
            fn = diffusion.cfg_model(model, y, 1.0, K)
            x = diffusion.ddim_sample(fn, sched, shape, steps, eta, cfg["target"], generator=g, device=DEVICE)
        out.append(x.float().cpu())                                                  # (b, C, S, S)
    return torch.cat(out), labels


def score_checkpoint(prof, scorer, seed):
    def on_checkpoint(path, step):
        model, cfg, sched = methods.load_run(path, device=DEVICE)
        return scorer(*generate(model, sched, cfg, prof["n_eval"], prof["eval_steps"], seed, prof["eval_eta"]))
    return on_checkpoint


def run_row(prof, scorer, root, spec, seed, extra=()):
    """Train one row with one seed, scored at every checkpoint; returns its record."""
    out = run_dir(root, spec["name"], seed)
    t0 = time.time()
    flags = ["--method", spec["method"], *spec.get("flags", ()), *common_flags(prof, spec["arch"], seed), *extra]
    scores = train_in_segments(out, flags, prof["checkpoints"], score_checkpoint(prof, scorer, seed))
    log = read_log(out)
    cks = prof["checkpoints"]
    return {**{k: v for k, v in spec.items() if k != "flags"}, "seed": seed, "out": out, "wall_s": time.time() - t0,
            "scores": {str(s): v for s, v in scores.items()}, "loss_bins": loss_bins(log, cks[-2] if len(cks) > 1 else 0),
            "logged_img_per_s": statistics.median(r["img_per_s"] for r in log), "log": log}


def gamma_flag(weighting, gamma):
    """--snr-gamma for the weightings that read it (train.py refuses a flag its run does not read)."""
    return ["--snr-gamma", str(gamma)] if weighting in ("min_snr", "max_snr") else []


def quality_specs(prof):
    """The methods grid and the weighting grid. Rows whose training would be identical share one run."""
    specs = [dict(group="methods", name=f"{a}/{m}", arch=a, method=m) for a in prof["arches"] for m in prof["methods"]]
    specs += [dict(group="weighting", name=f"unet/{t}/{w}", arch="unet", method="ddpm", target=t, weighting=w,
                   flags=["--target", t, "--weighting", w, *gamma_flag(w, 5)])
              for t in prof["targets"] for w in prof["weightings"]]
    return specs


def run_key(spec):
    """What a row's training depends on. Weighting 'snr' for eps and 'const' for x0 are weight 1, i.e. the
    unweighted loss (minsnr.py), so those rows share the run of weighting 'none'."""
    axes = {"target": "eps", "weighting": "none", "routing": "none", **methods.METHODS[spec["method"]].preset}
    axes.update({k: spec[k] for k in ("target", "weighting") if k in spec})
    if (axes["target"], axes["weighting"]) in (("eps", "snr"), ("x0", "const")):
        axes["weighting"] = "none"
    return (spec["arch"], axes["target"], axes["weighting"], axes["routing"])


def quality_rows(prof, scorer, root):
    rows, done = [], {}
    for spec in quality_specs(prof):
        for seed in prof["seeds"]:
            key = (run_key(spec), seed)
            if key in done:
                rows.append({**done[key], **{k: v for k, v in spec.items() if k != "flags"}, "shared_with": done[key]["name"]})
                continue
            print(f"[bench] {spec['name']} seed {seed}", flush=True)
            done[key] = run_row(prof, scorer, root, spec, seed)
            rows.append(done[key])
    return rows


def base_checkpoint(rows, seed):
    """The ddpm UNet run of this seed (JointNet's pretrained model and the restoration baseline)."""
    for r in rows:
        if r["arch"] == "unet" and r["method"] == "ddpm" and r["seed"] == seed and "target" not in r:
            return os.path.join(r["out"], "checkpoint.pt")
    return None


# -----------------------------------------------------------------------------
# MT-Diffusion rows (mtdiffusion.py): masked-image restoration (Table 1) and the label head (Fig. 6)

@torch.no_grad()
def sdedit(model_fn, sched, x_in, t0, steps, target, generator, known=None):
    """SDEdit (Meng et al. 2022): noise x_in to t0 and run DDIM down to 0; with `known`, the known region
    is replaced by its forward-noised copy before every step and by x_in at the end (replacement inpainting)."""
    ts = [i for i in diffusion.timestep_subset(sched.T, steps).tolist() if i <= t0]
    def noised(i):
        t = torch.full((len(x_in),), i, device=x_in.device, dtype=torch.long)
        return diffusion.q_sample(sched, x_in, t, torch.randn(x_in.shape, generator=generator, device=x_in.device))
    x = noised(ts[0])
    for i, i_prev in zip(ts, ts[1:] + [-1]):
        if known is not None:
            x = known * noised(i) + (1 - known) * x
        t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
        x0, eps = diffusion.split_prediction(sched, x, t, model_fn(x, t), target, clip=True)
        x = diffusion.ddim_step(sched, x, t, torch.full_like(t, i_prev), x0, eps, 0.0, torch.zeros_like(x))
    return x if known is None else known * x_in + (1 - known) * x


def held_out(S, n):
    return data.first_items(data.build_dataset("shapes", S, "test", 0), n, DEVICE)


@torch.no_grad()
def restoration(prof, scorer, mt_ckpt, base_ckpt, seed):
    """Restore n_restore held-out images with mt_patches square patches hidden: masked-region MSE,
    change of the visible region, and LPIPS-style distance to the clean image."""
    S, steps, n = prof["image_size"], prof["eval_steps"], prof["n_restore"]
    b = held_out(S, n)
    x0 = b["image"]
    M = mt.patch_mask(torch.full((n,), prof["mt_patches"]), S, torch.Generator().manual_seed(seed)).to(DEVICE)
    xm, keep = x0 * (1 - M), 1 - M                                                 # (n, 3, S, S), (n, 1, S, S)
    g = torch.Generator(DEVICE).manual_seed(seed)
    model, cfg, sched = methods.load_run(mt_ckpt, device=DEVICE)
    base, bcfg, _ = methods.load_run(base_ckpt, device=DEVICE)
    fn = diffusion.cfg_model(base, b["label"] if bcfg["num_classes"] else None, 1.0, bcfg["num_classes"])
    t0 = sched.T // 2
    outs = {"masked input": xm,
            f"ddpm + SDEdit (t0 = {t0})": sdedit(fn, sched, xm, t0, steps, bcfg["target"], g),
            "ddpm + replacement": sdedit(fn, sched, xm, sched.T - 1, steps, bcfg["target"], g, keep),
            "MT-Diffusion (Alg. 1)": mt.mt_sample(model, sched, xm.shape, steps, x=xm, target=cfg["target"],
                                                  generator=g, device=DEVICE)[0],
            "MT-Diffusion + paste": mt.mt_sample(model, sched, xm.shape, steps, x=xm, z0=xm, known=keep,
                                                 target=cfg["target"], generator=g, device=DEVICE)[0]}
    net = scorer.net
    return {name: {"masked_mse": metrics.masked_region_mse(r, x0, M).mean().item(),
                   "unmasked_change": metrics.unmasked_change(r, xm, M).mean().item(),
                   "perceptual": metrics.perceptual_distance(net, r.clamp(-1, 1), x0).mean().item()}
            for name, r in outs.items()}


def label_accuracy(prof, ckpt):
    """Held-out accuracy of the MT-Diffusion label head (t = 0, clean image) and of the same network
    trained by cross-entropy for the same steps, on clean images and on x_t over uniform t
    (mtdiffusion_eval.train_classifier)."""
    model, cfg, _ = methods.load_run(ckpt, device=DEVICE)
    b = held_out(prof["image_size"], prof["n_restore"])
    def acc(net):
        with torch.no_grad():
            return (mt.read_modality(net, b["image"]).argmax(1) == b["label"]).float().mean().item()
    return {"mt_head": acc(model), "supervised": acc(mtdiffusion_eval.train_classifier(cfg, DEVICE).eval()),
            "supervised_noisy": acc(mtdiffusion_eval.train_classifier(cfg, DEVICE, noised=True).eval())}


def mtdiff_rows(prof, scorer, root, quality):
    rows = []
    for seed in prof["seeds"]:
        base = base_checkpoint(quality, seed)
        # The masked task models images without labels (prepare_config sets num_classes 0); --class-cond 0
        # says so up front, so that --resume (which skips prepare_config) agrees with the saved config.
        spec = dict(group="mtdiff", name="unet/mtdiff-masked", arch="unet", method="mtdiff",
                    flags=["--task", "masked", "--class-cond", "0"])
        print(f"[bench] {spec['name']} seed {seed}", flush=True)
        r = run_row(prof, scorer, root, spec, seed)
        r["restoration"] = restoration(prof, scorer, os.path.join(r["out"], "checkpoint.pt"), base, seed) if base else None
        rows.append(r)
        out = run_dir(root, "unet/mtdiff-label", seed)
        print(f"[bench] unet/mtdiff-label seed {seed}", flush=True)
        flags = ["--method", "mtdiff", "--task", "label", *common_flags(prof, "unet", seed)]
        train_in_segments(out, flags, prof["checkpoints"][-1:], lambda p, s: None)
        rows.append(dict(group="mtdiff", name="unet/mtdiff-label", arch="unet", method="mtdiff", seed=seed,
                         out=out, labels=label_accuracy(prof, os.path.join(out, "checkpoint.pt"))))
    return rows


# -----------------------------------------------------------------------------
# JointNet rows (jointnet.py): RGB preservation (proxy for Fig. 8) and RGB -> depth (Table 2's metrics)

@torch.no_grad()
def rgb_to_depth(prof, ckpt, seed):
    model, cfg, sched = methods.load_run(ckpt, device=DEVICE)
    b = held_out(prof["image_size"], prof["n_restore"])
    x0, d0 = b["image"], b["depth"]
    z0 = torch.cat([x0, d0], 1)                                                     # (n, 4, S, S)
    known = torch.zeros_like(z0, dtype=torch.bool)
    known[:, :x0.shape[1]] = True
    g = torch.Generator(DEVICE).manual_seed(seed)
    y = b["label"] if cfg["num_classes"] else None
    fn = diffusion.cfg_model(model, y, 1.0, cfg["num_classes"])
    z = jn.joint_ddim(fn, sched, torch.randn(z0.shape, generator=g, device=DEVICE),
                      diffusion.timestep_subset(sched.T, prof["eval_steps"]).tolist(), cfg["target"], z0, known, 0.0, g)
    m = metrics.depth_metrics(z[:, x0.shape[1]:].cpu(), d0.cpu())
    other = metrics.depth_metrics(d0.roll(1, 0).cpu(), d0.cpu())  # another image's depth: the uninformed level
    return {"abs_rel": m["abs_rel"], "rmse": m["rmse"], "other_image_abs_rel": other["abs_rel"],
            "other_image_rmse": other["rmse"]}


def jointnet_rows(prof, scorer, root, quality):
    rows = []
    for seed in prof["seeds"]:
        base = base_checkpoint(quality, seed)
        if base is None:
            continue
        for method in ("jointnet", "direct_extend"):
            spec = dict(group="jointnet", name=f"unet/{method}", arch="unet", method=method)
            print(f"[bench] {spec['name']} seed {seed}", flush=True)
            r = run_row(prof, scorer, root, spec, seed, extra=["--init", base, "--rgb-heldout", str(prof["rgb_heldout"])])
            held = [x["rgb_heldout"] for x in r["log"] if x.get("rgb_heldout") is not None]
            r["rgb_heldout"] = {"first": held[0] if held else None, "last": held[-1] if held else None}
            r["depth"] = rgb_to_depth(prof, os.path.join(r["out"], "checkpoint.pt"), seed)
            rows.append(r)
    return rows


# -----------------------------------------------------------------------------
# Speed: side by side in one process

def make_config(argv):
    """train.py's config for argv, with its data and method checks (what train.train does before training)."""
    parser = train.get_parser()
    args = parser.parse_args(argv)
    cfg = train.resolve_config(args, {k for k, v in vars(args).items() if v != parser.get_default(k)})
    ds = data.build_dataset(cfg["data"], cfg["image_size"], "train", cfg["seed"])
    train.describe_data(cfg, ds)
    if methods.hook(cfg["method"], "prepare_config"):
        methods.hook(cfg["method"], "prepare_config")(cfg)
    train.check_image_size(cfg)
    return cfg, ds, cfg["method"]


def speed_setups(prof, arch, init):
    names = list(METHODS) + (["mtdiff"] if has_module("mtdiffusion") else [])
    if arch == "unet" and init and has_module("jointnet"):
        names += ["jointnet", "direct_extend"]
    out = []
    for m in [m for m in names if m in prof.get("speed_methods", names)]:
        # --rgb-heldout 0: the held-out RGB loss jointnet.py logs is evaluation, not part of a training step.
        extra = ["--init", init, "--rgb-heldout", "0"] if m in ("jointnet", "direct_extend") else []
        cfg, ds, _ = make_config(["--method", m, *common_flags(prof, arch, 0), *extra])
        torch.manual_seed(0)
        model = methods.build_model(cfg).to(DEVICE)
        if methods.hook(m, "init_model"):
            methods.hook(m, "init_model")(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        out.append(dict(method=m, cfg=cfg, model=model, params=params, opt=torch.optim.AdamW(params, lr=1e-5),
                        loss_fn=methods.hook(m, "training_loss"), ds=ds))
    return out


def timed(run):
    """Wall-clock seconds of run(), with the GPU's queued work included."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_steps(s, batch, sched, k):
    """Seconds for k optimiser steps of a setup on a fixed batch."""
    s["model"].train()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()  # as train.py
    def steps():
        for i in range(k):
            torch.manual_seed(i)
            rng = runlib.StepRandom(torch.Generator().manual_seed(i), len(batch["t"]), device=DEVICE)
            with amp:
                loss, _ = s["loss_fn"](s["model"], batch, sched, s["cfg"], rng)
            s["opt"].zero_grad(set_to_none=True)
            loss.backward()
            s["opt"].step()
    return timed(steps)


def rotated(xs, r):
    """xs started at position r mod len(xs): repeat r of an interleaved timing, so no item is always first."""
    r %= len(xs)
    return list(xs[r:]) + list(xs[:r])


def fixed_batch(ds, B):
    """The first B items of ds with timesteps, noise and label dropout drawn as train.py draws them."""
    batch = data.first_items(ds, B, DEVICE)
    g = torch.Generator().manual_seed(0)
    batch["t"] = diffusion.sample_timesteps(B, 1000, generator=g).to(DEVICE)
    batch["noise"] = torch.randn(batch["image"].shape, generator=g).to(DEVICE)
    batch["label_drop"] = (torch.rand(B, generator=g) < 0.1).to(DEVICE)  # --cfg-drop 0.1
    return batch


def training_speed(prof, arch, init):
    setups = speed_setups(prof, arch, init)
    B = prof["batch_size"]
    batch = fixed_batch(setups[0]["ds"], B)
    sched = diffusion.Schedule.make("linear", 1000).to(DEVICE)
    times = {s["method"]: [] for s in setups}
    for s in setups:
        timed_steps(s, batch, sched, 1)  # warm-up
    # Interleaved repeats in rotating order (no method is always first after another), best of each:
    # a busy machine only ever slows a repeat down.
    for r in range(prof["speed_repeats"]):
        for s in rotated(setups, r):
            times[s["method"]].append(timed_steps(s, batch, sched, prof["speed_steps"]))
    rows = []
    for s in setups:
        ips = B * prof["speed_steps"] / min(times[s["method"]])
        rows.append(dict(arch=arch, model=prof["models"][arch], method=s["method"], img_per_s=ips,
                         params=sum(p.numel() for p in s["model"].parameters()),
                         trainable=sum(p.numel() for p in s["params"])))
    ref = next(r["img_per_s"] for r in rows if r["method"] == "ddpm")
    for r in rows:
        r["ratio_to_ddpm"] = r["img_per_s"] / ref
    return rows


def median_ci(xs, level=0.95, boots=2000, seed=0):
    """Median of xs and a bootstrap confidence interval for it (percentile method)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(xs, dtype=torch.float64)
    meds = x[torch.randint(len(xs), (boots, len(xs)), generator=g)].quantile(0.5, dim=1).sort().values
    lo, hi = meds[int((1 - level) / 2 * boots)], meds[int((1 + level) / 2 * boots) - 1]
    return dict(median=statistics.median(xs), lo=lo.item(), hi=hi.item())


def routing_cost(prof):
    """DTR's cost: training step time with routing over the same model and weights without it.

    Each repeat times one optimiser step (loss, backward, AdamW) of three conditions in rotating order:
    no routing (a), DTR masks, no routing (b). The DTR ratio of a repeat is t_dtr / mean(t_a, t_b): slow
    drifts of a shared machine hit the three alike and cancel. t_b / t_a is an A/A control: its interval
    shows how small a difference the timing can resolve. Reported: medians over repeats with 95%
    bootstrap intervals."""
    rows = []
    for model_name, size, batch_size, repeats in prof["routing_cost"]:
        arch = "dit" if model_name.startswith("DiT") else "unet"
        p = {**prof, "models": {arch: model_name}, "image_size": size, "batch_size": batch_size}
        cfg, ds, _ = make_config(["--method", "ddpm", *common_flags(p, arch, 0)])
        torch.manual_seed(0)
        model = methods.build_model(cfg).to(DEVICE)
        s = dict(model=model, cfg=cfg, opt=torch.optim.AdamW(model.parameters(), lr=1e-5), loss_fn=methods.diffusion_training_loss)
        blocks = model.routable_blocks()
        dtr.apply_routing(model, "dtr")
        masks = [b.route_mask for b in blocks]
        batch = fixed_batch(ds, batch_size)
        sched = diffusion.Schedule.make("linear", 1000).to(DEVICE)

        def step(routed):
            for b, m in zip(blocks, masks):
                b.route_mask = m if routed else None
            return timed_steps(s, batch, sched, 1)

        for routed in (False, True, False, True):  # warm-up
            step(routed)
        order = ("a", "dtr", "b")
        times = {k: [] for k in order}
        for r in range(repeats):
            for k in rotated(order, r):
                times[k].append(step(k == "dtr"))
        ratio = [d / ((a + b) / 2) for a, d, b in zip(times["a"], times["dtr"], times["b"])]
        aa = [b / a for a, b in zip(times["a"], times["b"])]
        rows.append(dict(model=model_name, image_size=size, batch=batch_size, repeats=repeats,
                         params=sum(q.numel() for q in model.parameters()),
                         step_ms=1e3 * statistics.median(times["a"] + times["b"]),
                         dtr_ratio=median_ci(ratio), aa_ratio=median_ci(aa)))
        print(f"[bench] routing cost {model_name} {size}px batch {batch_size}: dtr/none "
              f"{rows[-1]['dtr_ratio']['median']:.4f}, A/A {rows[-1]['aa_ratio']['median']:.4f}", flush=True)
    return rows


@torch.no_grad()
def sampling_speed(prof, arch):
    """Images/s of DDIM-50 for ddpm and dtr models (best of interleaved repeats) and of DDPM with all T
    steps (unless the profile respaces it; timed once: it is the long one)."""
    n, S, k = prof["sample_n"], prof["image_size"], prof["ddpm_steps"] or 1000
    sched = diffusion.Schedule.make("linear", 1000).to(DEVICE)
    fns = {}
    for m in ("ddpm", "dtr"):
        cfg, _, _ = make_config(["--method", m, *common_flags(prof, arch, 0)])
        torch.manual_seed(0)
        model = methods.build_model(cfg).to(DEVICE).eval()
        fns[m] = diffusion.cfg_model(model, torch.arange(n, device=DEVICE) % cfg["num_classes"], 1.0, cfg["num_classes"])
        fns[m](torch.randn(n, 3, S, S, device=DEVICE), torch.zeros(n, dtype=torch.long, device=DEVICE))  # warm-up
    ddim = {m: [] for m in fns}
    for r in range(prof["speed_repeats"]):
        for m, fn in rotated(list(fns.items()), r):
            ddim[m].append(timed(lambda: diffusion.ddim_sample(fn, sched, (n, 3, S, S), prof["ddim_steps"], device=DEVICE)))
    rows = [dict(arch=arch, model=prof["models"][arch], method=m, sampler=f"DDIM-{prof['ddim_steps']}",
                 img_per_s=n / min(ts), batch=n) for m, ts in ddim.items()]
    t = timed(lambda: diffusion.ddpm_sample(fns["ddpm"], sched, (n, 3, S, S), k, device=DEVICE))
    rows.append(dict(arch=arch, model=prof["models"][arch], method="ddpm", sampler=f"DDPM-{k}", img_per_s=n / t, batch=n))
    return rows


# -----------------------------------------------------------------------------
# Summary: means over seeds, the claims, the markdown

def mean_std(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]  # not None (missing) or DIVERGED
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def summarize(rows, checkpoints):
    """{row name: {"fd@step": mean_std, ..., "precision", "recall" at the last step, "loss_bins"}} over seeds."""
    out = {}
    for name in dict.fromkeys(r["name"] for r in rows if "scores" in r):
        rs = [r for r in rows if r["name"] == name and "scores" in r]
        s = {f"fd@{c}": mean_std([r["scores"][str(c)]["fd"] for r in rs]) for c in checkpoints}
        last = str(checkpoints[-1])
        s.update(precision=mean_std([r["scores"][last]["precision"] for r in rs]),
                 recall=mean_std([r["scores"][last]["recall"] for r in rs]),
                 fd_mean=mean_std([statistics.fmean(r["scores"][str(c)]["fd"] for c in checkpoints) for r in rs]),
                 loss_bins=[mean_std([r["loss_bins"][i] for r in rs]) for i in range(10)], seeds=len(rs))
        out[name] = s
    return out


def fmt(ms, digits=2):
    if ms is None:
        return "-"
    return f"{ms['mean']:.{digits}f}" + (f" ± {ms['std']:.{digits}f}" if ms["n"] > 1 else "")


def claims(summary, rows, checkpoints, noise=None):
    """Each paper claim this profile's rows can test: claim, source, holds, evidence, seeds, and for FD
    claims the deciding margin; `within_noise` marks margins smaller than `noise` (the FD change from
    re-sampling one checkpoint, or the std over seeds), where one seed cannot tell the rows apart."""
    last, out = f"fd@{checkpoints[-1]}", []
    def fd(name, key=last):
        return summary[name][key]["mean"] if name in summary and summary[name][key] else None
    def add(claim, source, holds, evidence, seeds, margin=None):
        c = dict(claim=claim, source=source, holds=bool(holds), evidence=evidence, seeds=seeds)
        if margin is not None:
            c.update(margin=margin, within_noise=noise is not None and abs(margin) < noise)
        out.append(c)
    for a in ("unet", "dit"):
        d, r, b, dm, ms = (fd(f"{a}/{m}") for m in ("dtr", "rtr", "ddpm", "dtr_minsnr", "minsnr"))
        n = summary.get(f"{a}/ddpm", {}).get("seeds", 0)
        if d is not None and b is not None:
            add(f"DTR lowers FD ({a})", "DTR Table 1", d < b, f"FD {d:.2f} (dtr) vs {b:.2f} (ddpm)", n, b - d)
            early = [(fd(f"{a}/dtr", f"fd@{c}"), fd(f"{a}/ddpm", f"fd@{c}")) for c in checkpoints[:-1]]
            if early:
                wins = sum(x < y for x, y in early)
                add(f"DTR converges faster ({a})", "DTR Fig. 5", wins == len(early),
                    f"DTR below ddpm at {wins} of {len(early)} earlier checkpoints (FD " +
                    ", ".join(f"{x:.2f} vs {y:.2f}" for x, y in early) + ")", n, min(y - x for x, y in early))
        if r is not None and d is not None and b is not None:
            add(f"random routing (R-TR) degrades ddpm ({a})", "DTR Table 1", r > b,
                f"FD {r:.2f} (rtr) vs {b:.2f} (ddpm), {d:.2f} (dtr)", n, r - b)
        if dm is not None and d is not None and ms is not None:
            add(f"DTR + Min-SNR beats either alone ({a})", "DTR Table 2", dm < min(d, ms),
                f"FD {dm:.2f} (dtr_minsnr) vs {d:.2f} (dtr), {ms:.2f} (minsnr)", n, min(d, ms) - dm)
    for t in ("x0", "eps", "v"):
        names = [f"unet/{t}/{w}" for w in WEIGHTINGS]
        if all(x in summary for x in names):
            auc = {w: summary[x]["fd_mean"]["mean"] for w, x in zip(WEIGHTINGS, names)}
            others = min(v for w, v in auc.items() if w != "min_snr")
            add(f"min-SNR-5 converges fastest ({t}-prediction)", "Min-SNR Fig. 5", auc["min_snr"] < others,
                "mean FD over checkpoints: " + ", ".join(f"{w} {v:.2f}" for w, v in auc.items()),
                summary[names[0]]["seeds"], others - auc["min_snr"])
    rest = [r["restoration"] for r in rows if r.get("restoration")]
    if rest:
        mse = {k: statistics.fmean(x[k]["masked_mse"] for x in rest) for k in rest[0]}
        ours = min(mse["MT-Diffusion (Alg. 1)"], mse["MT-Diffusion + paste"])
        base = min(v for k, v in mse.items() if k.startswith("ddpm"))
        add("masked-image training restores better than the baselines", "MT-Diffusion Table 1", ours < base,
            f"masked-region MSE {ours:.4f} (MT-Diffusion) vs {base:.4f} (best ddpm baseline)", len(rest))
    labs = [r["labels"] for r in rows if r.get("labels")]
    if labs:
        a, s = statistics.fmean(x["mt_head"] for x in labs), statistics.fmean(x["supervised"] for x in labs)
        add("the MT-Diffusion label head beats supervised training", "MT-Diffusion Fig. 6", a > s,
            f"held-out accuracy {a:.3f} (head) vs {s:.3f} (supervised)", len(labs))
    jn = {m: [r for r in rows if r.get("method") == m and r.get("rgb_heldout", {}).get("first") is not None]
          for m in ("jointnet", "direct_extend")}
    if all(jn.values()):
        rise = {m: statistics.fmean(r["rgb_heldout"]["last"] / r["rgb_heldout"]["first"] - 1 for r in rs)
                for m, rs in jn.items()}
        j, de = fd("unet/jointnet"), fd("unet/direct_extend")
        add("JointNet keeps RGB quality, Direct Extend loses it", "JointNet Fig. 8",
            rise["direct_extend"] > max(rise["jointnet"], 0),
            f"held-out RGB loss {100 * rise['jointnet']:+.1f}% (jointnet) vs {100 * rise['direct_extend']:+.1f}% "
            f"(direct extend) over training; RGB FD {j:.2f} vs {de:.2f}", len(jn["jointnet"]))
    return out


def fd_noise(prof, scorer, rows, summary):
    """How much FD moves without any change to training: the final unet/ddpm checkpoint re-sampled with
    other noise, and (with several seeds) the largest std over seeds of a row's final FD."""
    base = next((r for r in rows if r["name"] == "unet/ddpm"), None)
    if base is None:
        return {"fd": None}
    model, cfg, sched = methods.load_run(os.path.join(base["out"], "checkpoint.pt"), device=DEVICE)
    again = scorer(*generate(model, sched, cfg, prof["n_eval"], prof["eval_steps"], base["seed"] + 1, prof["eval_eta"]))["fd"]
    resample = abs(again - base["scores"][str(prof["checkpoints"][-1])]["fd"])
    seed_std = max((v[f"fd@{prof['checkpoints'][-1]}"]["std"] for v in summary.values()), default=0.0)
    return {"fd": max(resample, seed_std), "resample": resample, "seed_std": seed_std}


def hardware():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}, torch {torch.__version__}"


def markdown(report):
    p, cks, s = report["profile"], report["profile"]["checkpoints"], report["summary"]
    lines = [f"# Reproduction table ({report['profile_name']} profile)", "",
             f"`{report['command']}` on {report['date']}; {report['hardware']}; {report['wall_s'] / 60:.1f} min.",
             f"Seeds {list(p['seeds'])}; {p['image_size']}px shapes, batch {p['batch_size']}, lr {p['lr']}, "
             f"checkpoints at {list(cks)} steps. FD / precision / recall: {p['n_eval']} DDIM-{p['eval_steps']} (eta {p['eval_eta']:g}) samples "
             f"against {p['n_ref']} held-out images (precision/recall: the first {p['n_eval']}) in the reference CNN's "
             f"features (held-out accuracy "
             f"{report['reference_accuracy']:.3f}); not comparable to Inception FIDs. ± is the std over seeds.",
             f"Noise: {p['n_eval']} more held-out real images score FD {report['fd_floor']['fd']:.2f} (precision "
             f"{report['fd_floor']['precision']:.3f}, recall {report['fd_floor']['recall']:.3f}): the floor at this N. " +
             (f"Re-sampling the final unet/ddpm checkpoint with other noise moves its FD by {report['fd_noise']['resample']:.2f}"
              f"; FD differences below {report['fd_noise']['fd']:.2f} are marked 'within noise'." if report["fd_noise"]["fd"] is not None else ""),
             ""]
    lines += ["## Claims", "", "| claim | paper | holds here? | evidence | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['source']} | {'yes' if c['holds'] else 'no'}{' (within noise)' if c.get('within_noise') else ''}"
              f" | {c['evidence']} | {c['seeds']} |" for c in report["claims"]]
    fd_cols = " | ".join(f"FD@{c}" for c in cks)
    for group, title in (("methods", "Methods"), ("weighting", "Loss weighting (UNet)"), ("mtdiff", "MT-Diffusion generation"),
                         ("jointnet", "JointNet vs Direct Extend (RGB of joint samples)")):
        names = list(dict.fromkeys(r["name"] for r in report["quality"] if r["group"] == group and r["name"] in s))
        if not names:
            continue
        lines += ["", f"## {title}", "", f"| row | {fd_cols} | precision | recall | seeds |", "|---" * (len(cks) + 4) + "|"]
        lines += [f"| {n} | " + " | ".join(fmt(s[n][f'fd@{c}']) for c in cks) +
                  f" | {fmt(s[n]['precision'], 3)} | {fmt(s[n]['recall'], 3)} | {s[n]['seeds']} |" for n in names]
    lines += ["", "## Unweighted training loss per timestep decile (last stretch of training)", "",
              "Each row is the MSE of its own target (x0, eps or v), so compare within a target.", "",
              "| row | " + " | ".join(f"t{i}" for i in range(10)) + " |", "|---" * 11 + "|"]
    lines += [f"| {n} | " + " | ".join(fmt(b, 3) for b in v["loss_bins"]) + " |" for n, v in s.items()]
    rest = [r for r in report["quality"] if r.get("restoration")]
    if rest:
        lines += ["", f"## MT-Diffusion restoration ({p['n_restore']} held-out images, {p['mt_patches']} hidden patches)", "",
                  "| method | masked-region MSE | unmasked change | perceptual distance | seeds |", "|---|---|---|---|---|"]
        for k in rest[0]["restoration"]:
            v = {m: mean_std([r["restoration"][k][m] for r in rest]) for m in ("masked_mse", "unmasked_change", "perceptual")}
            lines.append(f"| {k} | {fmt(v['masked_mse'], 4)} | {fmt(v['unmasked_change'], 4)} | {fmt(v['perceptual'], 4)} | {len(rest)} |")
    labs = [r["labels"] for r in report["quality"] if r.get("labels")]
    if labs:
        lines += ["", "## MT-Diffusion label head (held-out accuracy)", "", "| model | accuracy | seeds |", "|---|---|---|",
                  f"| MT-Diffusion head (t = 0) | {fmt(mean_std([x['mt_head'] for x in labs]), 3)} | {len(labs)} |",
                  f"| supervised, same network and steps | {fmt(mean_std([x['supervised'] for x in labs]), 3)} | {len(labs)} |"]
    jn = [r for r in report["quality"] if r.get("depth")]
    if jn:
        lines += ["", "## JointNet: RGB forgetting and RGB -> depth", "",
                  "| row | held-out RGB loss, first log | last log | AbsRel | RMSE (disparity) | another image's depth: AbsRel / RMSE | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for n in dict.fromkeys(r["name"] for r in jn):
            rs = [r for r in jn if r["name"] == n]
            v = lambda f: mean_std([f(r) for r in rs])
            lines.append(f"| {n} | {fmt(v(lambda r: r['rgb_heldout']['first']), 4)} | {fmt(v(lambda r: r['rgb_heldout']['last']), 4)} | "
                         f"{fmt(v(lambda r: r['depth']['abs_rel']), 4)} | {fmt(v(lambda r: r['depth']['rmse']), 4)} | "
                         f"{fmt(v(lambda r: r['depth']['other_image_abs_rel']), 4)} / {fmt(v(lambda r: r['depth']['other_image_rmse']), 4)} | {len(rs)} |")
    lines += ["", f"## Training speed (batch {p['batch_size']}, {p['image_size']}px, best of {p['speed_repeats']} interleaved "
              f"repeats of {p['speed_steps']} steps)", "", "| backbone | method | parameters | trainable | images/s | ratio to ddpm |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['params']:,} | {r['trainable']:,} | {r['img_per_s']:.1f} | {r['ratio_to_ddpm']:.3f} |"
              for r in report["speed"]]
    lines += ["", f"## Sampling speed (batch {p['sample_n']}, untrained weights; DDIM: best of {p['speed_repeats']} interleaved "
              "repeats, DDPM: one run)", "", "| backbone | method | sampler | images/s |",
              "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['sampler']} | {r['img_per_s']:.2f} |" for r in report["sampling"]]
    return "\n".join(lines + routing_markdown(report["routing_cost"])) + "\n"


def routing_markdown(rows):
    """The DTR cost table: median step-time ratios with their 95% intervals."""
    ci = lambda c: f"{c['median']:.4f} ({c['lo']:.4f}-{c['hi']:.4f})"
    return ["", "## DTR cost (training step time, DTR / no routing, same model and weights)", "",
            "Medians over repeats of one step each of no routing, DTR, no routing (rotating order), with 95% "
            "bootstrap intervals. A/A: the two no-routing steps against each other, the timing's resolution. "
            "DTR adds no parameters.", "",
            "| model | image | batch | parameters | step (ms) | DTR / none | A/A | repeats |", "|---|---|---|---|---|---|---|---|"] + [
        f"| {r['model']} | {r['image_size']}px | {r['batch']} | {r['params']:,} | {r['step_ms']:.1f} | {ci(r['dtr_ratio'])} | "
        f"{ci(r['aa_ratio'])} | {r['repeats']} |" for r in rows]


# -----------------------------------------------------------------------------
# Evidence profiles (--cpu, --recipe): several seeds, paired differences, resumable
#
# Every finished unit (one row, one seed, one checkpoint) is written to the results file at once; the
# same command run again skips what is stored and continues a half-trained run from its checkpoint
# (train.py resumes exactly), or retrains it from step 0 when the run folder is gone (training is
# deterministic, so the stored scores stay valid).

class Store:
    """Finished units {key: result} in one JSON file, rewritten atomically after every unit. `settings` is
    what the results depend on: a file written with other settings is refused, not mixed in. Several
    processes may share one store: put() merges under a file lock, get() sees what others have stored."""

    def __init__(self, path, settings):
        self.path, self.doc, self.seen = path, {"settings": settings, "units": {}}, None
        self.refresh()

    def refresh(self):
        """Re-read the file if another process rewrote it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_mtime_ns, st.st_size) == self.seen:
            return
        with open(self.path) as f:
            old = json.load(f)
        if json.dumps(old.get("settings"), sort_keys=True) != json.dumps(self.doc["settings"], sort_keys=True):
            raise ValueError(f"{self.path} holds results of other settings; pass another --json or move it away "
                             "to start over")
        self.doc["units"], self.seen = old["units"], (st.st_mtime_ns, st.st_size)
        if "invocations" in old:
            self.doc["invocations"] = old["invocations"]

    def get(self, key):
        self.refresh()
        return self.doc["units"].get(key)

    def put(self, key, value):
        self._update(lambda doc: doc["units"].__setitem__(key, value))

    def log_invocation(self, record):
        """Append one invocation that trained something ({date, wall_s, units, parallel}): the profile's
        cost in all is the sum over them, however many times it was stopped and continued."""
        self._update(lambda doc: doc.setdefault("invocations", []).append(record))

    def _update(self, change):
        with file_lock(self.path + ".lock"):
            self.refresh()
            change(self.doc)
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1)
            os.replace(tmp, self.path)
            st = os.stat(self.path)
            self.seen = (st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def file_lock(path, wait=True):
    """An exclusive lock on a file (created if missing) while the block runs; the OS drops it when the
    process dies, so a killed worker never leaves a stale lock. wait=False yields None if another process
    holds it. Without fcntl (Windows) there is no locking: one process at a time (--parallel 1)."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def unit_key(name, seed, step):
    return f"{name}|seed{seed}|step{step}"


def saved_step(out):
    """The step of the checkpoint in a run folder, or None."""
    path = os.path.join(out, "checkpoint.pt")
    return runlib.load_checkpoint(path)["step"] if os.path.isfile(path) else None


def train_row_resumable(prof, store, root, spec, seed, score, extra=(), need_checkpoint=False):
    """Train one row with one seed to each checkpoint in turn and store score(checkpoint path, step) for
    each; finished checkpoints are skipped. A run that stops on non-finite losses is stored as diverged.
    need_checkpoint: retrain a finished row whose final checkpoint is gone (its scores are kept).
    Returns {step: score} for every checkpoint reached."""
    name, cks = spec["name"], prof["checkpoints"]
    out = run_dir(root, name, seed)
    keys = {c: unit_key(name, seed, c) for c in cks}
    if any((store.get(k) or {}).get("diverged") for k in keys.values()) or (
            all(store.get(k) is not None for k in keys.values()) and not (need_checkpoint and saved_step(out) != cks[-1])):
        return {c: store.get(k) for c, k in keys.items() if store.get(k) is not None}
    flags = ["--method", spec["method"], *spec.get("flags", ()), *common_flags(prof, spec["arch"], seed), *extra]
    at = saved_step(out)
    if at is None or any(store.get(keys[c]) is None for c in cks if c < at):
        at = None  # nothing to continue from: train from step 0 (deterministic, so stored scores stay valid)
        if os.path.exists(out):
            shutil.rmtree(out)
    for c in cks:
        if at is not None and c < at:
            continue
        t0 = time.time()
        if at is None or c > at:
            argv = flags + ["--steps", str(c), "--out", out] if at is None else ["--resume", "--out", out, "--steps", str(c)]
            try:
                call_train(argv, out + ".log")
            except RuntimeError as e:
                if "not finite" not in str(e):  # train.py's one sentence for --max-nonfinite
                    raise
                store.put(keys[c], {"diverged": True, "message": str(e)})
                print(f"[bench] {name} seed {seed} diverged before step {c}", flush=True)
                break
            if saved_step(out) != c:  # train.py saved and returned early: Ctrl-C or SIGTERM
                raise KeyboardInterrupt
        at = c
        if store.get(keys[c]) is None:
            result = score(os.path.join(out, "checkpoint.pt"), c)
            result.update(train_s=time.time() - t0, loss_bins=loss_bins(read_log(out), max([0] + [x for x in cks if x < c])))
            store.put(keys[c], result)
            print(f"[bench] {name} seed {seed} step {c}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)), flush=True)
    return {c: store.get(k) for c, k in keys.items() if store.get(k) is not None}


def paired(a, b, boots=10_000, level=0.95, seed=0):
    """Paired differences a_s - b_s over seeds s: their mean and a percentile-bootstrap interval of the mean
    (seeds resampled with replacement)."""
    d = torch.tensor([x - y for x, y in zip(a, b)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (boots, len(d)), generator=g)].mean(1).sort().values
    return {"mean": d.mean().item(), "lo": means[int((1 - level) / 2 * boots)].item(),
            "hi": means[int((1 + level) / 2 * boots) - 1].item(), "diffs": d.tolist(), "n": len(d)}


def verdict(ci, sign):
    """'holds' when the whole interval is on the claim's side (sign +1: the claim says a > b, -1: a < b),
    'contradicted' when the whole interval is on the other side, else 'unresolved'."""
    lo, hi = sorted((sign * ci["lo"], sign * ci["hi"]))
    return "holds" if lo > 0 else "contradicted" if hi < 0 else "unresolved"


def weightings_for(prof, target):
    """The loss weightings a profile runs for one prediction target (target_weightings may narrow them)."""
    return prof.get("target_weightings", {}).get(target, prof["weightings"])


def evidence_specs(prof):
    """The rows of an evidence profile. Rows whose training is identical share one run (run_key), e.g.
    eps-prediction with SNR weighting is weight 1 on the eps loss, i.e. the ddpm row."""
    per_arch = prof.get("arch_methods", {})  # a profile may run fewer methods on one backbone
    specs = [dict(group="methods", name=f"{a}/{m}", arch=a, method=m)
             for a in prof["arches"] for m in per_arch.get(a, prof["methods"])]
    for t in prof["targets"]:
        for w in weightings_for(prof, t):
            gamma = prof["max_snr_gamma"] if w == "max_snr" else prof["min_snr_gamma"]
            specs.append(dict(group="weighting", name=f"unet/{t}/{w}", arch="unet", method="ddpm", target=t,
                              weighting=w, gamma=gamma, flags=["--target", t, "--weighting", w, *gamma_flag(w, gamma)]))
    keys = {}
    for s in specs:
        k = run_key(s) + (s.get("gamma", 5.0) if run_key(s)[2] in ("min_snr", "max_snr") else None,)
        if k in keys:
            s["shared_with"] = keys[k]
        else:
            keys[k] = s["name"]
    return specs


def checkpoint_scorer(prof, scorer, seed):
    def score(path, step):
        model, cfg, sched = methods.load_run(path, device=DEVICE)
        return scorer(*generate(model, sched, cfg, prof["n_eval"], prof["eval_steps"], seed, prof["eval_eta"]))
    return score


def stored(store, key, compute):
    """store[key], computed and stored first if missing."""
    if store.get(key) is None:
        store.put(key, compute())
    return store.get(key)


MT_MASKED = dict(group="mtdiff", name="unet/mtdiff-masked", arch="unet", method="mtdiff",
                 flags=["--task", "masked", "--class-cond", "0"])
MT_LABEL = dict(group="mtdiff", name="unet/mtdiff-label", arch="unet", method="mtdiff", flags=["--task", "label"])
JOINT = [dict(group="jointnet", name=f"unet/{m}", arch="unet", method=m) for m in ("jointnet", "direct_extend")]


class Job:
    """One piece of an evidence profile that one process runs start to end: a row with one seed, or an
    extra evaluation with the training it needs. done(): nothing left to store; ready(): the checkpoints
    it reads from other jobs exist."""

    def __init__(self, name, seed, run, done, ready=lambda: True):
        self.name, self.seed, self.run, self.done, self.ready = name, seed, run, done, ready
        self.id = f"{name}-seed{seed}".replace("/", "_")


def evidence_jobs(prof, store, scorer, root):
    """The profile's jobs in order: per seed, the ddpm row first (restoration and JointNet start from its
    checkpoint), the other rows, then MT-Diffusion (masked-image training with restoration, Sec. 4.1; the
    label head, Sec. 4.2) and JointNet / Direct Extend from the ddpm checkpoint (Sec. 3, Fig. 8). A run
    whose checkpoint a pending evaluation needs (the ddpm base, the MT-Diffusion runs) is retrained when
    its folder is gone."""
    last, cks = prof["checkpoints"][-1], prof["checkpoints"]
    ckpt = lambda name, seed: os.path.join(run_dir(root, name, seed), "checkpoint.pt")
    has_ckpt = lambda name, seed: saved_step(run_dir(root, name, seed)) == last
    stored_all = lambda name, seed, steps: all(store.get(unit_key(name, seed, c)) is not None for c in steps) or \
        any((store.get(unit_key(name, seed, c)) or {}).get("diverged") for c in steps)
    jobs = []
    for seed in prof["seeds"]:
        score = checkpoint_scorer(prof, scorer, seed)
        pending = lambda seed=seed: [unit_key(MT_MASKED["name"], seed, "restoration")] + \
            [unit_key(j["name"], seed, "extras") for j in JOINT]
        needs_base = lambda seed=seed: any(store.get(k) is None for k in pending(seed))
        for spec in evidence_specs(prof):
            if "shared_with" in spec:
                continue
            base = spec["name"] == "unet/ddpm"
            jobs.append(Job(spec["name"], seed,
                            lambda spec=spec, seed=seed, score=score, base=base: train_row_resumable(
                                prof, store, root, spec, seed, score, need_checkpoint=base and needs_base(seed)),
                            lambda spec=spec, seed=seed, base=base: stored_all(spec["name"], seed, cks) and not (
                                base and needs_base(seed) and not has_ckpt(spec["name"], seed))))

        def mt_masked(seed=seed, score=score, key=unit_key(MT_MASKED["name"], seed, "restoration")):
            train_row_resumable(prof, store, root, MT_MASKED, seed, score, need_checkpoint=store.get(key) is None)
            stored(store, key, lambda: restoration(prof, scorer, ckpt(MT_MASKED["name"], seed), ckpt("unet/ddpm", seed), seed))
        key = unit_key(MT_MASKED["name"], seed, "restoration")
        jobs.append(Job(MT_MASKED["name"], seed, mt_masked,
                        lambda key=key, seed=seed: store.get(key) is not None and stored_all(MT_MASKED["name"], seed, cks),
                        lambda key=key, seed=seed: store.get(key) is not None or has_ckpt("unet/ddpm", seed)))

        def mt_label(seed=seed, key=unit_key(MT_LABEL["name"], seed, "labels")):
            train_row_resumable({**prof, "checkpoints": (last,)}, store, root, MT_LABEL, seed, lambda p, s: {"trained": True},
                                need_checkpoint=store.get(key) is None)
            stored(store, key, lambda: label_accuracy(prof, ckpt(MT_LABEL["name"], seed)))
        key = unit_key(MT_LABEL["name"], seed, "labels")
        jobs.append(Job(MT_LABEL["name"], seed, mt_label, lambda key=key: store.get(key) is not None))

        for spec in JOINT:
            key = unit_key(spec["name"], seed, "extras")
            def joint(spec=spec, seed=seed, score=score, key=key):
                extra = ["--init", ckpt("unet/ddpm", seed), "--rgb-heldout", str(prof["rgb_heldout"])]
                train_row_resumable(prof, store, root, spec, seed, score, extra, need_checkpoint=store.get(key) is None)
                out = run_dir(root, spec["name"], seed)
                def extras():
                    held = [x["rgb_heldout"] for x in read_log(out) if x.get("rgb_heldout") is not None]
                    return {"rgb_heldout": {"first": held[0], "last": held[-1]},
                            "depth": rgb_to_depth(prof, os.path.join(out, "checkpoint.pt"), seed)}
                stored(store, key, extras)
            jobs.append(Job(spec["name"], seed, joint,
                            lambda key=key, spec=spec, seed=seed: store.get(key) is not None and stored_all(spec["name"], seed, cks),
                            lambda key=key, seed=seed: store.get(key) is not None or has_ckpt("unet/ddpm", seed)))
    return jobs


def run_jobs(jobs, lock_dir, poll=10.0, log=print):
    """Run every job that is not done, taking each under its own file lock so that several processes
    (bench.py --parallel N) share the list: a job another process holds, or whose inputs are not there
    yet, is passed over and looked at again. Returns when every job is done; raises RuntimeError when
    the jobs left wait on each other with no process holding any."""
    os.makedirs(lock_dir, exist_ok=True)
    while True:
        left = [j for j in jobs if not j.done()]
        if not left:
            return
        ran = held_elsewhere = False
        for job in left:
            with file_lock(os.path.join(lock_dir, job.id + ".lock"), wait=False) as mine:
                if not mine:
                    held_elsewhere = True
                    continue
                if job.done() or not job.ready():  # another process may have finished it meanwhile
                    continue
                log(f"[bench] {job.name} seed {job.seed}: start (pid {os.getpid()})")
                job.run()
                ran = True
                break  # look at the list again from the top: earlier jobs may have become ready
        if not ran:
            if not held_elsewhere:
                raise RuntimeError("jobs left that wait on checkpoints no job makes: " + ", ".join(j.id for j in left))
            time.sleep(poll)


def rows_from_store(prof, store):
    """{row name: {seed: {step: scores, plus the row's extras}}} of every stored unit; rows that share a run
    read its units."""
    rows = {}
    specs = evidence_specs(prof) + [MT_MASKED, MT_LABEL, *JOINT]
    for seed in prof["seeds"]:
        for spec in specs:
            src = spec.get("shared_with", spec["name"])
            r = {c: store.get(unit_key(src, seed, c)) for c in prof["checkpoints"] if store.get(unit_key(src, seed, c))}
            if spec is MT_LABEL:
                r = {"labels": store.get(unit_key(src, seed, "labels"))} if store.get(unit_key(src, seed, "labels")) else {}
            if store.get(unit_key(src, seed, "restoration")):
                r["restoration"] = store.get(unit_key(src, seed, "restoration"))
            r.update(store.get(unit_key(src, seed, "extras")) or {})
            if r:
                rows.setdefault(spec["name"], {})[seed] = r
    return rows, [s["name"] for s in specs]


DIVERGED = "diverged"


def diverged(r):
    """Did this row-seed stop on non-finite losses (at any checkpoint)?"""
    return any(isinstance(v, dict) and v.get("diverged") for v in r.values())


def final(rows, name, metric, step):
    """Per-seed values of metric at step: DIVERGED for a run that stopped on non-finite losses, None where
    the unit is not stored yet."""
    return {seed: DIVERGED if diverged(r) else (r.get(step) or {}).get(metric) for seed, r in rows.get(name, {}).items()}


def mean_over_checkpoints(rows, name, metric, cks):
    out = {}
    for seed, r in rows.get(name, {}).items():
        vals = [(r.get(c) or {}).get(metric) for c in cks]
        out[seed] = DIVERGED if diverged(r) else None if None in vals else statistics.fmean(vals)
    return out


def with_key(rows, name, key):
    """{seed: row} of the seeds whose row has `key` stored (an extra evaluation), for tables and claims."""
    return {seed: r for seed, r in rows.get(name, {}).items() if key in r}


def steps_to_reach(curve, target):
    """First step at which a falling FD curve [(step, fd)] reaches target, linearly interpolated; None if never."""
    prev = None
    for step, fd in curve:
        if fd <= target:
            if prev is None:
                return float(step)
            (s0, f0) = prev
            return s0 + (f0 - target) / (f0 - fd) * (step - s0)
        prev = (step, fd)
    return None


def evidence_claims(prof, rows, names):
    """Each claim as a paired comparison over seeds: the mean difference a - b with its 95% bootstrap
    interval and a verdict (holds / contradicted / unresolved). names: the rows of this profile (a claim
    about rows it does not run is left out; one whose rows have fewer than 2 seeds stored says so)."""
    cks, last = prof["checkpoints"], prof["checkpoints"][-1]
    out = []
    def add(claim, source, what, a, b, sign, va, vb, needs=None, higher_better=False):
        if any(n not in names for n in needs or (a, b)):
            return
        seeds = [s for s in va if va[s] is not None and vb.get(s) is not None]
        c = dict(claim=claim, source=source, metric=what, a=a, b=b, sign=sign, n=len(seeds))
        if len(seeds) < 2:
            out.append({**c, "verdict": "not enough seeds yet"})
            return
        if any(DIVERGED in (va[s], vb[s]) for s in seeds):
            # A run that diverged is worse than any that did not: the verdict needs every seed on one side.
            worst = -math.inf if higher_better else math.inf
            val = lambda v: worst if v == DIVERGED else v
            sides = {(val(va[s]) > val(vb[s])) - (val(va[s]) < val(vb[s])) for s in seeds}
            out.append({**c, "diverged": {"a": sum(va[s] == DIVERGED for s in seeds), "b": sum(vb[s] == DIVERGED for s in seeds)},
                        "verdict": "holds" if sides == {sign} else "contradicted" if sides == {-sign} else "unresolved"})
            return
        ci = paired([va[s] for s in seeds], [vb[s] for s in seeds])
        out.append(dict(claim=claim, source=source, metric=what, a=a, b=b, sign=sign, verdict=verdict(ci, sign),
                        mean_a=statistics.fmean(va[s] for s in seeds), mean_b=statistics.fmean(vb[s] for s in seeds),
                        ci=ci, n=len(seeds)))
    fd = lambda n: final(rows, n, "fd", last)
    acc = lambda n: final(rows, n, "class_acc", last)
    auc = lambda n: mean_over_checkpoints(rows, n, "fd", cks)
    for a in prof["arches"]:
        p = lambda m: f"{a}/{m}"
        add(f"DTR lowers FD ({a})", "DTR Table 1", f"FD@{last}", p("dtr"), p("ddpm"), -1, fd(p("dtr")), fd(p("ddpm")))
        add(f"DTR raises generated-class accuracy ({a})", "DTR Table 1", f"class acc@{last}", p("dtr"), p("ddpm"), +1,
            acc(p("dtr")), acc(p("ddpm")), higher_better=True)
        add(f"DTR converges faster ({a})", "DTR Fig. 5", "FD mean over checkpoints", p("dtr"), p("ddpm"), -1,
            auc(p("dtr")), auc(p("ddpm")))
        add(f"random routing (R-TR) is worse than DTR ({a})", "DTR Table 1", f"FD@{last}", p("rtr"), p("dtr"), +1,
            fd(p("rtr")), fd(p("dtr")))
        add(f"DTR + Min-SNR beats DTR ({a})", "DTR Table 2", f"FD@{last}", p("dtr_minsnr"), p("dtr"), -1,
            fd(p("dtr_minsnr")), fd(p("dtr")))
        add(f"DTR + Min-SNR beats Min-SNR ({a})", "DTR Table 2", f"FD@{last}", p("dtr_minsnr"), p("minsnr"), -1,
            fd(p("dtr_minsnr")), fd(p("minsnr")))
    for t in prof["targets"]:
        for w in weightings_for(prof, t):
            if w != "min_snr":
                a, b = f"unet/{t}/min_snr", f"unet/{t}/{w}"
                add(f"min-SNR-{prof['min_snr_gamma']:g} converges faster than {w} ({t}-prediction)", "Min-SNR Fig. 5",
                    "FD mean over checkpoints", a, b, -1, auc(a), auc(b))
    rest = with_key(rows, "unet/mtdiff-masked", "restoration")
    if rest:
        ours = {s: min(r["restoration"][k]["masked_mse"] for k in ("MT-Diffusion (Alg. 1)", "MT-Diffusion + paste"))
                for s, r in rest.items()}
        base = {s: min(v["masked_mse"] for k, v in r["restoration"].items() if k.startswith("ddpm")) for s, r in rest.items()}
        add("masked-image training restores better than SDEdit / replacement", "MT-Diffusion Table 1", "masked-region MSE",
            "MT-Diffusion (better of Alg. 1 and + paste)", "ddpm (better of SDEdit and replacement)", -1, ours, base,
            needs=("unet/mtdiff-masked",))
    labs = {s: r["labels"] for s, r in rows.get("unet/mtdiff-label", {}).items()}
    if labs:
        head = {s: v["mt_head"] for s, v in labs.items()}
        add("the label head beats the same network trained by cross-entropy over uniform t", "MT-Diffusion Fig. 6",
            "held-out accuracy (t = 0)", "MT-Diffusion head", "cross-entropy, uniform t", +1, head,
            {s: v["supervised_noisy"] for s, v in labs.items()}, needs=("unet/mtdiff-label",), higher_better=True)
        add("the label head beats a classifier trained on clean images", "MT-Diffusion Fig. 6",
            "held-out accuracy (t = 0)", "MT-Diffusion head", "cross-entropy, clean images", +1, head,
            {s: v["supervised"] for s, v in labs.items()}, needs=("unet/mtdiff-label",), higher_better=True)
    jn, de = with_key(rows, "unet/jointnet", "rgb_heldout"), with_key(rows, "unet/direct_extend", "rgb_heldout")
    if jn and de:
        rise = lambda rs: {s: r["rgb_heldout"]["last"] / r["rgb_heldout"]["first"] - 1 for s, r in rs.items()}
        add("Direct Extend forgets RGB more than JointNet", "JointNet Sec. 3 (Fig. 8's samples)",
            "relative rise of the held-out RGB loss", "unet/direct_extend", "unet/jointnet", +1, rise(de), rise(jn))
        add("JointNet's RGB samples are better than Direct Extend's", "JointNet Fig. 8", f"RGB FD@{last}",
            "unet/jointnet", "unet/direct_extend", -1, fd("unet/jointnet"), fd("unet/direct_extend"))
    return out


def time_to_target(prof, rows):
    """Min-SNR's speed-up: steps min-SNR needs to reach each other weighting's final FD (same target, same
    seed), as a ratio final steps / needed steps (the Min-SNR paper reports 3.4x)."""
    cks, last, out = prof["checkpoints"], prof["checkpoints"][-1], []
    for t in prof["targets"]:
        for w in weightings_for(prof, t):
            if w == "min_snr":
                continue
            per_seed = {}
            for seed, r in rows.get(f"unet/{t}/min_snr", {}).items():
                other = (rows.get(f"unet/{t}/{w}", {}).get(seed) or {}).get(last) or {}
                if other.get("diverged") or other.get("fd") is None or any(r.get(c) is None for c in cks):
                    continue
                need = steps_to_reach([(c, r[c]["fd"]) for c in cks], other["fd"])
                per_seed[seed] = None if need is None else last / need
            out.append(dict(target=t, weighting=w, speedup=per_seed))
    return out


def baseline_check(prof, rows, scorer, name="unet/ddpm"):
    """Does the baseline learn? Its mean FD at each checkpoint (falling?) and its generated-class accuracy at
    the end relative to the ceiling (the reference net on real images) and the floor (chance)."""
    cks = prof["checkpoints"]
    fds = [mean_std(list(final(rows, name, "fd", c).values())) for c in cks]
    acc = mean_std(list(final(rows, name, "class_acc", cks[-1]).values()))
    ceiling, floor = scorer.info["accuracy"], 1 / scorer.net.head.out_features
    rel = None if acc is None else (acc["mean"] - floor) / (ceiling - floor)
    per_seed = {seed: [final(rows, name, "fd", c).get(seed) for c in cks] for seed in rows.get(name, {})}
    per_seed = {seed: v for seed, v in per_seed.items() if all(isinstance(x, float) for x in v)}
    rises = {seed: v for seed, v in per_seed.items() if any(b >= a for a, b in zip(v, v[1:]))}
    return dict(row=name, fd=fds, falls=all(a is not None and b is not None and b["mean"] < a["mean"] for a, b in zip(fds, fds[1:])),
                seeds_complete=len(per_seed), seeds_rising=rises,
                class_acc=acc, ceiling=ceiling, floor=floor, relative=rel,
                of_ceiling=None if acc is None else acc["mean"] / ceiling)


def invocations_note(invocations):
    """The profile's wall time in all, summed over the invocations that trained units."""
    if not invocations:
        return ""
    def one(r):
        took = (f"{r['wall_s'] / 60:.0f} min" if r.get("wall_s") is not None else
                f"{r['train_s'] / 60:.0f} min of training, scoring not recorded")
        return f"{r['units']} units on {r['date']} with {r['parallel']} process{'es' if r['parallel'] > 1 else ''}: {took}"
    known = [r["wall_s"] for r in invocations if r.get("wall_s") is not None]
    total = f"{sum(known) / 60:.0f} min" + ("" if len(known) == len(invocations) else " plus an unrecorded part")
    return (f"; the invocations that trained them took {total} of wall time (" + "; ".join(map(one, invocations)) + ")")


def fmt_ci(c, digits=3):
    return f"{c['mean']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}]"


def evidence_markdown(report):
    p, cks, rows = report["profile"], report["profile"]["checkpoints"], report["rows"]
    b = report["baseline"]
    lines = [f"# Evidence ({report['profile_name']} profile)", "",
             f"`{report['command']}`; {report['hardware']}; " + (f"{report['parallel']} training processes at once, one "
             "torch thread each; " if report.get("parallel", 1) > 1 else "") + f"this invocation {report['wall_s'] / 60:.1f} min "
             f"({report['units']} units stored in all" + invocations_note(report.get("invocations", [])) + ")."
             + (" **Partial: stopped before the end; the same command continues it.**" if report["stopped"] else ""), "",
             f"Every row trains with the same recipe: {p['image_size']}px shapes, "
             f"{' / '.join(p['models'][a] for a in p['arches'])}, batch {p['batch_size']}, lr {p['lr']} (warm-up "
             f"{p['warmup']}), gradient clipping {p.get('grad_clip', 1.0) or 'off'}, "
             f"EMA {p.get('ema_decay', 0.999)}, {p.get('schedule', 'linear')} schedule, checkpoints at {list(cks)} steps, "
             f"seeds {list(p['seeds'])}. Scores: {p['n_eval']} DDIM-{p['eval_steps']} (eta {p['eval_eta']:g}) samples per "
             f"checkpoint, the same noise for every row of a seed; FD against {p['n_ref']} held-out images in the reference "
             f"CNN's features; generated-class accuracy = the share of class-conditional samples the reference CNN puts "
             f"in their class (ceiling {b['ceiling']:.3f}: the CNN's accuracy on held-out real images; "
             f"{report['floor']['class_acc']:.3f} on the {p['n_eval']} used as FD's floor; floor {b['floor']:.3f}: "
             f"chance); real-vs-real FD at this N: {report['floor']['fd']:.2f}.", "",
             "Verdicts compare two rows seed by seed: the mean paired difference a - b with a 95% bootstrap interval "
             "over seeds. *holds*: the whole interval is on the claim's side; *contradicted*: on the other side; "
             "*unresolved*: it spans zero.", "",
             "## Does the baseline learn?", "",
             f"{b['row']}: FD " + " -> ".join(fmt(x) for x in b["fd"]) + f" at steps {list(cks)} "
             f"(the mean {'falls at every checkpoint' if b['falls'] else 'does NOT fall at every checkpoint'}"
             + ("" if not b.get("seeds_complete") else f"; per seed it falls in {b['seeds_complete'] - len(b['seeds_rising'])} "
                f"of {b['seeds_complete']}" + "".join(f", seed {s}: " + " -> ".join(f"{x:.2f}" for x in v)
                                                     for s, v in sorted(b["seeds_rising"].items())))
             + f"); generated-class "
             f"accuracy {fmt(b['class_acc'], 3)}: " + ("-" if b["of_ceiling"] is None else
             f"{b['of_ceiling']:.2f} of the ceiling (the profile's target: at least 0.6), {b['relative']:.2f} of the way "
             "from chance to the ceiling") + ".", "",
             "## Claims", "", "| claim | paper | metric | a | b | mean a | mean b | a - b [95% CI] | seeds | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        if "ci" not in c:
            why = "" if "diverged" not in c else f" (diverged: a in {c['diverged']['a']}, b in {c['diverged']['b']} seeds)"
            lines.append(f"| {c['claim']} | {c['source']} | {c['metric']} | {c['a']} | {c['b']} | - | - | - | {c['n']} | "
                         f"{c['verdict']}{why} |")
            continue
        lines.append(f"| {c['claim']} | {c['source']} | {c['metric']} | {c['a']} | {c['b']} | {c['mean_a']:.3f} | "
                     f"{c['mean_b']:.3f} | {fmt_ci(c['ci'])} | {c['n']} | **{c['verdict']}** |")
    cols = " | ".join(f"FD@{c}" for c in cks)
    lines += ["", "## Rows", "", "Mean ± std over seeds. Channel deviation: mean |pixel channel - pixel mean| "
              f"(real images: {report['floor']['channel_dev']:.3f}).", "",
              f"| row | {cols} | class acc | channel dev | sample std | seeds | diverged |", "|---" * (len(cks) + 6) + "|"]
    for name, per_seed in rows.items():
        if not any(isinstance(k, int) or str(k).isdigit() for r in per_seed.values() for k in r):
            continue
        v = lambda m, c: mean_std(list(final(rows, name, m, c).values()))
        div = sum(diverged(r) for r in per_seed.values())
        lines.append(f"| {name} | " + " | ".join(fmt(v('fd', c)) for c in cks) + f" | {fmt(v('class_acc', cks[-1]), 3)} | "
                     f"{fmt(v('channel_dev', cks[-1]), 3)} | {fmt(v('std', cks[-1]), 3)} | {len(per_seed)} | {div} |")
    tt = [r for r in report["time_to_target"] if r["speedup"]]
    if tt:
        lines += ["", "## Min-SNR time to target", "", "Steps min-SNR needs to reach the other weighting's final FD, as final "
                  "steps / needed steps per seed (>1: min-SNR gets there sooner; '-': never within the run; '≥': already "
                  "there at the first checkpoint).", "",
                  "| target | other weighting | speed-up per seed |", "|---|---|---|"]
        # A target already reached at the first checkpoint gives only a lower bound on the speed-up.
        top = p["checkpoints"][-1] / p["checkpoints"][0]
        lines += [f"| {r['target']} | {r['weighting']} | " + ", ".join(
            "-" if x is None else f"{'≥ ' if x >= top else ''}{x:.2f}x" for x in r["speedup"].values()) + " |" for r in tt]
    rest = with_key(rows, "unet/mtdiff-masked", "restoration")
    if rest:
        lines += ["", f"## MT-Diffusion restoration ({p['n_restore']} held-out images, {p['mt_patches']} hidden patches)", "",
                  "| method | masked-region MSE | unmasked change | seeds |", "|---|---|---|---|"]
        for k in next(iter(rest.values()))["restoration"]:
            m = lambda f: mean_std([r["restoration"][k][f] for r in rest.values()])
            lines.append(f"| {k} | {fmt(m('masked_mse'), 4)} | {fmt(m('unmasked_change'), 4)} | {len(rest)} |")
    labs = [r["labels"] for r in rows.get("unet/mtdiff-label", {}).values()]
    if labs:
        lines += ["", "## MT-Diffusion label head (held-out accuracy at t = 0)", "", "| model | accuracy | seeds |", "|---|---|---|"]
        for k, title in (("mt_head", "MT-Diffusion head"), ("supervised_noisy", "same network, cross-entropy over uniform t"),
                         ("supervised", "same network, cross-entropy on clean images")):
            lines.append(f"| {title} | {fmt(mean_std([x[k] for x in labs]), 3)} | {len(labs)} |")
    jn = {n: with_key(rows, n, "rgb_heldout") for n in ("unet/jointnet", "unet/direct_extend")}
    if all(jn.values()):
        lines += ["", "## JointNet and Direct Extend", "", "RGB -> depth is the replacement-only setting (known RGB pasted at "
                  "every step), which the JointNet paper itself calls weak; it is reported, not claimed.", "",
                  "| row | held-out RGB loss, first log | last log | RGB -> depth AbsRel | RMSE (disparity) | seeds |", "|---|---|---|---|---|---|"]
        for n, rs in jn.items():
            m = lambda f: mean_std([f(r) for r in rs.values()])
            lines.append(f"| {n} | {fmt(m(lambda r: r['rgb_heldout']['first']), 4)} | {fmt(m(lambda r: r['rgb_heldout']['last']), 4)} | "
                         f"{fmt(m(lambda r: r['depth']['abs_rel']), 4)} | {fmt(m(lambda r: r['depth']['rmse']), 4)} | {len(rs)} |")
    return "\n".join(lines) + "\n"


# Which rows, seeds and checkpoints a profile runs: these may change between invocations, since a unit is
# keyed by its row, seed and step, and training to step s does not depend on the run's length (the learning
# rate has a warm-up and no decay; checkpoints and sample grids draw nothing from the training's random
# streams). Every other setting decides what a unit's numbers mean, so the store refuses a change of it.
VARIABLE_KEYS = ("seeds", "arches", "methods", "arch_methods", "targets", "weightings", "target_weightings", "checkpoints")


def evidence_settings(prof):
    return json.loads(json.dumps({k: v for k, v in prof.items() if k not in VARIABLE_KEYS}))


def run_evidence(prof, name, args, command):
    """The evidence profile end to end; resumable. Writes args.json (every unit, as it finishes) and args.md
    (the tables of whatever is stored, also when stopped early). With args.parallel > 1, that many worker
    processes (one torch thread each) share the jobs; this process waits for them and writes the tables."""
    t0 = time.time()
    store = Store(args.json, evidence_settings(prof))
    stored_before = len(store.doc["units"])
    root = args.runs or os.path.join("runs", f"bench-{name}")
    os.makedirs(root, exist_ok=True)
    scorer = Scorer(prof, args.cache)  # trains and caches the reference net before any worker starts
    lock_dir = os.path.join(root, "locks")
    stopped, workers = False, []
    def on_sigterm(signum, frame):  # outside train.py (which saves and returns), stop like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.worker or args.parallel == 1:
            run_jobs(evidence_jobs(prof, store, scorer, root), lock_dir)
        else:
            with open(os.path.join(root, "profile.json"), "w") as f:  # the workers run exactly this profile
                json.dump(prof, f)
            argv = [sys.executable, os.path.abspath(__file__), f"--{name}", "--worker", f.name, "--threads", "1",
                    "--json", args.json, "--runs", root, *(["--cache", args.cache] if args.cache else [])]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            workers = [subprocess.Popen(argv, env=env) for _ in range(args.parallel)]
            codes = [w.wait() for w in workers]
            if any(codes):
                raise RuntimeError(f"a worker process failed (exit codes {codes}); its error is printed above")
    except KeyboardInterrupt:
        stopped = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.worker:
        if stopped:
            sys.exit(1)
        return None
    store.refresh()
    if len(store.doc["units"]) > stored_before:
        store.log_invocation(dict(date=time.strftime("%Y-%m-%d"), wall_s=round(time.time() - t0, 1),
                                  units=len(store.doc["units"]) - stored_before, parallel=args.parallel))
    rows, names = rows_from_store(prof, store)
    report = dict(profile_name=name, profile=prof, command=command, hardware=hardware(), wall_s=time.time() - t0,
                  invocations=store.doc.get("invocations", []),
                  parallel=args.parallel, units=len(store.doc["units"]), stopped=stopped, floor=scorer.floor, rows=rows,
                  baseline=baseline_check(prof, rows, scorer), claims=evidence_claims(prof, rows, names),
                  time_to_target=time_to_target(prof, rows))
    text = evidence_markdown(report)
    with open(args.md, "w") as f:
        f.write(text)
    print(text)
    if stopped:
        sys.exit(f"stopped; {report['units']} finished units are in {args.json} and their tables in {args.md}: "
                 "run the same command to continue")
    return report


# The recipe study (--recipe): which shared settings make the plain ddpm baseline learn fastest per
# CPU-minute. Each variant changes one setting of the base recipe; the EMA model is scored at each
# checkpoint with the profile's sampler; the base variant's last checkpoint is also scored with raw
# weights and other samplers (evaluation only). Cost: seconds per training step of each variant,
# timed side by side in one process (interleaved repeats in rotating order, best of each).
RECIPE_VARIANTS = (
    ("base", [], (500, 1000, 2000, 4000)),
    ("lr 3e-4", ["--lr", "3e-4"], (500, 1000, 2000)),
    ("lr 2e-3", ["--lr", "2e-3"], (500, 1000, 2000)),
    ("no gradient clipping", ["--grad-clip", "0"], (500, 1000, 2000)),
    ("EMA 0.99", ["--ema-decay", "0.99"], (500, 1000, 2000)),
    ("cosine schedule", ["--schedule", "cosine"], (500, 1000, 2000)),
    ("batch 64", ["--batch-size", "64"], (250, 500)),
    ("32px", ["--image-size", "32"], (250, 500)),
    # Not the baseline: the Min-SNR paper's recommended setting, as the candidate default of train.py.
    ("v-prediction + min-SNR-5", ["--target", "v", "--weighting", "min_snr"], (500, 1000, 2000)),
)
RECIPE_SAMPLERS = (("DDIM-50, eta 0", 50, 0.0, True), ("DDIM-100, eta 1", 100, 1.0, True),
                   ("DDIM-50, eta 1, raw weights", 50, 1.0, False))


def recipe_study(prof, name, args, command):
    t0 = time.time()
    store = Store(args.json, json.loads(json.dumps({"profile": prof, "variants": RECIPE_VARIANTS, "samplers": RECIPE_SAMPLERS})))
    root = args.runs or os.path.join("runs", f"bench-{name}")
    os.makedirs(root, exist_ok=True)
    scorers = {}
    def scorer_for(size):
        if size not in scorers:
            scorers[size] = Scorer({**prof, "image_size": size}, args.cache)
        return scorers[size]
    seed = prof["seeds"][0]
    try:
        for vname, flags, cks in RECIPE_VARIANTS:
            size = int(flags[flags.index("--image-size") + 1]) if "--image-size" in flags else prof["image_size"]
            sc = scorer_for(size)
            def score(path, step, base=vname == "base", last=cks[-1]):
                out = {}
                for label, steps, eta, ema in ((f"DDIM-{prof['eval_steps']}, eta {prof['eval_eta']:g}", prof["eval_steps"], prof["eval_eta"], True),) + (RECIPE_SAMPLERS if base and step == last else ()):
                    model, cfg, sched = methods.load_run(path, ema=ema, device=DEVICE)
                    out[label] = sc(*generate(model, sched, cfg, prof["n_eval"], steps, seed, eta))
                return {"samplers": out}
            spec = dict(name=f"recipe/{vname}", arch="unet", method="ddpm")
            train_row_resumable({**prof, "checkpoints": cks}, store, root, spec, seed, score, extra=flags)
        cost = stored(store, "cost", lambda: recipe_cost(prof))
    except KeyboardInterrupt:
        sys.exit(f"stopped; {len(store.doc['units'])} finished units are in {args.json}: run the same command to continue")
    text = recipe_markdown(prof, store, cost, command, time.time() - t0, scorers)
    with open(args.md, "w") as f:
        f.write(text)
    print(text)
    return store.doc


def recipe_cost(prof):
    """Seconds per optimiser step of each variant: interleaved repeats in rotating order, best of each."""
    setups = []
    for vname, flags, _ in RECIPE_VARIANTS:
        cfg, ds, _ = make_config(["--method", "ddpm", *common_flags(prof, "unet", 0), *flags])
        torch.manual_seed(0)
        model = methods.build_model(cfg).to(DEVICE)
        setups.append(dict(name=vname, model=model, cfg=cfg, loss_fn=methods.diffusion_training_loss,
                           opt=torch.optim.AdamW(model.parameters(), lr=1e-5),
                           batch=fixed_batch(ds, cfg["batch_size"]),
                           sched=diffusion.Schedule.make(cfg["schedule"], cfg["T"]).to(DEVICE)))
    times = {s["name"]: [] for s in setups}
    for s in setups:
        timed_steps(s, s["batch"], s["sched"], 1)  # warm-up
    for r in range(prof["speed_repeats"]):
        for s in rotated(setups, r):
            times[s["name"]].append(timed_steps(s, s["batch"], s["sched"], prof["speed_steps"]) / prof["speed_steps"])
    return {"sec_per_step": {k: min(v) for k, v in times.items()}, "hardware": hardware()}


def recipe_markdown(prof, store, cost, command, wall_s, scorers):
    main_label = f"DDIM-{prof['eval_steps']}, eta {prof['eval_eta']:g}"
    lines = ["# Recipe study: the plain ddpm baseline (eps-prediction, no weighting) on shapes", "",
             f"`{command}`; {hardware()}; this invocation {wall_s / 60:.1f} min, all stored units "
             f"{sum(u.get('train_s', 0) for u in store.doc['units'].values() if isinstance(u, dict)) / 60:.1f} min of "
             f"training and scoring. One seed ({prof['seeds'][0]}). Base recipe: "
             f"{prof['image_size']}px, {prof['models']['unet']}, batch {prof['batch_size']}, lr {prof['lr']}, warm-up "
             f"{prof['warmup']}, gradient clipping {prof.get('grad_clip', 1.0)}, EMA {prof.get('ema_decay', 0.999)}, "
             f"{prof.get('schedule', 'linear')} schedule; each variant changes one setting. Scores of {prof['n_eval']} "
             f"EMA samples ({main_label}) per checkpoint: FD, generated-class accuracy (ceiling: held-out real images "
             + ", ".join(f"{s}px {sc.info['accuracy']:.3f}" for s, sc in scorers.items()) + "; chance 0.25) and channel "
             "deviation (real: " + ", ".join(f"{sc.floor['channel_dev']:.3f}" for sc in scorers.values()) + "). "
             f"CPU-minutes = steps x the variant's timed seconds per step ({cost['hardware']}).", "",
             "| variant | s/step | step | CPU-min | FD | class acc | channel dev | sample std |", "|---|---|---|---|---|---|---|---|"]
    for vname, _, cks in RECIPE_VARIANTS:
        sps = cost["sec_per_step"][vname]
        for c in cks:
            u = store.get(unit_key(f"recipe/{vname}", prof["seeds"][0], c))
            if u is None or u.get("diverged"):
                lines.append(f"| {vname} | {sps:.3f} | {c} | {c * sps / 60:.1f} | {'diverged' if u else 'not run'} | | | |")
                continue
            s = u["samplers"][main_label]
            lines.append(f"| {vname} | {sps:.3f} | {c} | {c * sps / 60:.1f} | {s['fd']:.2f} | {s['class_acc']:.3f} | "
                         f"{s['channel_dev']:.3f} | {s['std']:.3f} |")
    lines += ["", "## Samplers and EMA (base variant, same checkpoints)", "", "| sampler | step | FD | class acc | channel dev |",
              "|---|---|---|---|---|"]
    _, _, cks = RECIPE_VARIANTS[0]
    for label in [main_label] + [s[0] for s in RECIPE_SAMPLERS]:
        for c in cks:
            u = store.get(unit_key("recipe/base", prof["seeds"][0], c))
            if u and not u.get("diverged") and label in u["samplers"]:
                s = u["samplers"][label]
                lines.append(f"| {label} | {c} | {s['fd']:.2f} | {s['class_acc']:.3f} | {s['channel_dev']:.3f} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------

def run(prof, name, runs, cache=None, command=""):
    t0 = time.time()
    os.makedirs(runs, exist_ok=True)
    scorer = Scorer(prof, cache)
    quality = quality_rows(prof, scorer, runs)
    if has_module("mtdiffusion"):
        quality += mtdiff_rows(prof, scorer, runs, quality)
    if has_module("jointnet"):
        quality += jointnet_rows(prof, scorer, runs, quality)
    print("[bench] speed", flush=True)
    speed = [r for a in prof["arches"] for r in training_speed(prof, a, base_checkpoint(quality, prof["seeds"][0]) if a == "unet" else None)]
    sampling = [r for a in prof["arches"] for r in sampling_speed(prof, a)]
    routing = routing_cost(prof)
    summary = summarize(quality, prof["checkpoints"])
    noise = fd_noise(prof, scorer, quality, summary)
    return dict(profile_name=name, profile=prof, command=command, date=datetime.date.today().isoformat(),
                hardware=hardware(), wall_s=time.time() - t0, reference_accuracy=scorer.info["accuracy"],
                fd_floor=scorer.floor, fd_noise=noise, summary=summary, speed=speed, sampling=sampling, routing_cost=routing,
                quality=[{k: v for k, v in r.items() if k != "log"} for r in quality],
                claims=claims(summary, quality, prof["checkpoints"], noise["fd"]))


def timing_only(prof, name, args, command, section):
    """One timing section alone (--only routing / compile): its rows, their table, bench.json and bench.md."""
    rows_fn, markdown_fn, title = {"routing": (routing_cost, routing_markdown, "DTR cost"),
                                   "compile": (lambda p: compile_cost(p, name), compile_markdown, "Compile cost")}[section]
    t0 = time.time()
    rows = rows_fn(prof)
    report = dict(profile_name=name, command=command, date=datetime.date.today().isoformat(), hardware=hardware(),
                  wall_s=time.time() - t0, **{f"{section}_cost": rows})
    text = "\n".join([f"# {title} ({name} profile)", "", f"`{command}` on {report['date']}; {report['hardware']}; "
                      f"{report['wall_s'] / 60:.1f} min."] + markdown_fn(rows)) + "\n"
    for path, content in ((args.json, json.dumps(report, indent=1)), (args.md, text)):
        with open(path, "w") as f:
            f.write(content)
    print(text)
    return report


# -----------------------------------------------------------------------------
# Compile cost: torch.compile against eager training, and the GPU check

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
        arch = "dit" if model_name.startswith("DiT") else "unet"
        p = {**prof, "models": {arch: model_name}, "image_size": size, "batch_size": batch_size}
        cfg, ds, _ = make_config(["--method", "ddpm", *common_flags(p, arch, 0)])
        torch.manual_seed(0)
        model = methods.build_model(cfg).to(DEVICE)
        sched = diffusion.Schedule.make("linear", 1000).to(DEVICE)
        eager = dict(model=model, cfg=cfg, opt=torch.optim.AdamW(model.parameters(), lr=1e-5),
                     loss_fn=methods.diffusion_training_loss)
        fast = {**eager, "model": torch.compile(model)}  # as train.py --compile: the network compiled, the loss eager
        batch = fixed_batch(ds, batch_size)
        first = timed_steps(fast, batch, sched, 1)  # compiles
        for s in (eager, fast, eager, fast):  # warm-up
            timed_steps(s, batch, sched, 1)
        order = ("a", "compiled", "b")
        times = {k: [] for k in order}
        for r in range(repeats):
            for k in rotated(order, r):
                times[k].append(timed_steps(fast if k == "compiled" else eager, batch, sched, 1))
        ratio = [c / ((a + b) / 2) for a, c, b in zip(times["a"], times["compiled"], times["b"])]
        eager_s, compiled_s = statistics.median(times["a"] + times["b"]), statistics.median(times["compiled"])
        rows.append(dict(model=model_name, image_size=size, batch=batch_size, repeats=repeats,
                         params=sum(q.numel() for q in model.parameters()), eager_ms=1e3 * eager_s,
                         compiled_ms=1e3 * compiled_s, compile_s=first - compiled_s,
                         break_even_steps=(first - compiled_s) / (eager_s - compiled_s) if eager_s > compiled_s else None,
                         compiled_ratio=median_ci(ratio), aa_ratio=median_ci([b / a for a, b in zip(times["a"], times["b"])])))
        print(f"[bench] compile {model_name} {size}px batch {batch_size}: compiled/eager "
              f"{rows[-1]['compiled_ratio']['median']:.3f}, compiling took {rows[-1]['compile_s']:.0f} s", flush=True)
    return rows


def compile_markdown(rows):
    ci = lambda c: f"{c['median']:.3f} ({c['lo']:.3f}-{c['hi']:.3f})"
    even = lambda r: "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"
    return ["", f"## Compile cost (training step time, torch.compile / eager, same model and weights, {DEVICE})", "",
            "Medians over repeats of one step each of eager, compiled, eager (rotating order), with 95% bootstrap "
            "intervals; below 1 the compiled step is faster. A/A: the two eager steps against each other. Break-even: "
            "steps until the compilation time is paid back.", "",
            "| model | image | batch | eager (ms) | compiled (ms) | compiled / eager | A/A | compiling (s) | break-even steps | repeats |",
            "|---|---|---|---|---|---|---|---|---|---|"] + [
        f"| {r['model']} | {r['image_size']}px | {r['batch']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
        f"{ci(r['compiled_ratio'])} | {ci(r['aa_ratio'])} | {r['compile_s']:.0f} | "
        f"{even(r)} | {r['repeats']} |" for r in rows]


# The GPU check: every method, both backbones, through train.py and sample.py as a user runs them.
GPU_CHECK_CASES = ([(m, b, []) for b in ("unet-cpu", "DiT-T/4") for m in METHODS]
                   + [("mtdiff", b, ["--task", t]) for b in ("unet-cpu", "DiT-T/4") for t in ("masked", "label", "translate")]
                   + [(m, "unet-cpu", []) for m in ("jointnet", "direct_extend")]
                   + [("dtr", "unet-gpu", ["--image-size", "64", "--batch-size", "128"])])  # the default GPU run


def check_case(root, method, model, extra, steps, flags, init=None):
    """Train `steps` steps, resume for 10 more, sample; -> a result dict (ok, loss, img_per_s, seconds, error)."""
    import subprocess
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
        r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
        if r.returncode:
            lines = (r.stderr or r.stdout).strip().splitlines() or ["(no output)"]
            return {**res, "error": f"{os.path.basename(cmd[1])} exited {r.returncode}: {lines[-1]}",
                    "seconds": time.time() - t0}
    log = read_log(out)
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
    import subprocess
    from concurrent.futures import ThreadPoolExecutor, as_completed
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    t_start = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    common = ["--image-size", "32", "--batch-size", "64", "--log-every", "10", "--ckpt-every", "100000",
              "--sample-every", "100000", "--sample-steps", "5", "--warmup", "10", *flags]
    # Compiling is mostly single-threaded host work, so cases run `workers` at a time to fit the check in
    # minutes; the images/s of a case are then a lower bound (the GPU is shared with the other cases).
    workers = max(1, min(6, (os.cpu_count() or 2) // 2)) if require_cuda else 1
    print(f"[gpu-check] {hardware()}; {len(cases)} cases of {steps} steps + 10 resumed, flags {' '.join(flags)}, "
          f"{workers} at a time", flush=True)
    init = None
    if any(m in ("jointnet", "direct_extend") for m, *_ in cases):
        init = os.path.join(root, "rgb", "checkpoint.pt")
        r = subprocess.run([sys.executable, "train.py", *common, "--model", "unet-cpu", "--steps", "20",
                            "--out", os.path.dirname(init)], cwd=here, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"the RGB run that JointNet starts from failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    results = []
    with ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(check_case, root, m, b, e, steps, common, init if m in ("jointnet", "direct_extend") else None)
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
                                         "train.py", *a], cwd=here, capture_output=True, text=True)
        t0 = time.time()
        r1 = run(*common, "--method", "dtr", "--model", "unet-cpu", "--steps", str(steps), "--out", out)
        r2 = run("--resume", "--out", out, "--steps", str(steps + 10)) if r1.returncode == 0 else r1
        ok = r2.returncode == 0
        res = dict(name="torchrun 2 GPUs dtr unet-cpu", ok=ok, seconds=time.time() - t0)
        if ok:
            log = read_log(out)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    for name in PROFILES:
        g.add_argument(f"--{name}", dest="profile", action="store_const", const=name, help=f"the {name} profile")
    p.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    p.add_argument("--runs", help="folder for the training runs (default runs/bench-PROFILE; its runs are overwritten)")
    p.add_argument("--json", help="where to write every number (default bench.json; --cpu and --recipe: "
                   "results/bench_cpu.json and results/recipe_cpu.json, which they continue when run again)")
    p.add_argument("--md", help="where to write the markdown tables (default: beside --json, .md)")
    p.add_argument("--cache", help="folder for the reference net (metrics.py)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--parallel", type=int, help="--cpu: training processes at once, one torch thread each (default: "
                   "the CPU count, at most 8; on 2 cores two 1-thread trainings do 1.85x the work of one 2-thread one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one of --parallel's processes: the profile's JSON file
    p.add_argument("--only", choices=["routing", "compile"], help="run one section: 'routing' times DTR's cost (minutes "
                   "on a CPU), 'compile' times torch.compile against eager training (compiling takes minutes on a CPU)")
    p.add_argument("--gpu-check", action="store_true", help="every method for a few steps on CUDA with bf16 and "
                   "--compile, resumed and sampled (about 5 minutes on one GPU); without CUDA it says so and exits 0")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            sys.exit(f"error: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = args.profile or "quick"
    prof = copy.deepcopy(PROFILES[name])
    if args.worker:
        with open(args.worker) as f:
            prof = json.load(f)
    if args.seeds:
        prof["seeds"] = tuple(args.seeds)
    if name != "cpu" and (args.parallel not in (None, 1) or args.worker):
        sys.exit("error: --parallel applies to --cpu only")
    if args.parallel is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.parallel = min(cores, 8) if name == "cpu" else 1
    elif args.parallel < 1:
        sys.exit(f"error: --parallel must be at least 1, got {args.parallel}")
    command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.json = args.json or {"cpu": "results/bench_cpu.json", "recipe": "results/recipe_cpu.json"}.get(name, "bench.json")
    args.md = args.md or os.path.splitext(args.json)[0] + ".md"
    try:
        if args.gpu_check:
            return gpu_check()
        if name == "cpu":
            return run_evidence(prof, name, args, command.strip())
        if name == "recipe":
            return recipe_study(prof, name, args, command.strip())
        if args.only:
            return timing_only(prof, name, args, command.strip(), args.only)
        report = run(prof, name, args.runs or os.path.join("runs", f"bench-{name}"), args.cache, command.strip())
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(args.md, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.json} and {args.md} in {report['wall_s'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
