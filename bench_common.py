"""
What every bench_*.py job shares: the profiles, training through train.py, scoring a checkpoint, the
MT-Diffusion and JointNet evaluations, the timing primitives, and the store of finished units.

Not a command of its own: `python bench.py` reaches it through the job modules bench_evidence.py (--cpu),
bench_recipe.py (--recipe), bench_timing.py (the timings, --only, --gpu-check) and bench_report.py (--tiny,
--quick, --full). May import the project's library files (data, diffusion, jointnet, methods, metrics,
mtdiffusion, mtdiffusion_eval, runlib) and train.py; never a bench_*.py file.

The job modules import it as `import bench_common as common` and call `common.call_train(...)`,
`common.generate(...)`: these names are looked up here when called, so a test that replaces one of them
in this module replaces it for every job.
"""
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import time

import torch

import data
import diffusion
import jointnet_eval
import methods
import metrics
import mtdiffusion
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
#   n_restore        held-out images for restoration and depth scores; restore_patches: Table 1's m values
#   n_label, finetune_steps, finetune_lr   held-out images of the label scores; Fig. 6's finetuning steps, lr
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
                               ddpm_steps=4, n_restore=4, restore_patches=(2, 4), n_label=8,
                               finetune_steps=(1, 2), finetune_lr=3e-4,
                               routing_cost=(("unet-cpu", 16, 4, 3), ("DiT-T/4", 16, 4, 3)))},
    # About 20 minutes on 2 CPU cores: 16px, 400 steps of batch 16, one seed.
    "quick": {**_COMMON, **dict(image_size=16, batch_size=16, lr=1e-3, warmup=50, checkpoints=(100, 200, 400),
                                seeds=(0,), log_every=50, n_eval=256, n_ref=1024, eval_steps=10, grid_steps=10,
                                rgb_heldout=16, speed_steps=3, speed_repeats=7, sample_n=16, n_restore=64,
                                restore_patches=(5, 10), n_label=256, finetune_steps=(100, 200), finetune_lr=3e-4, routing_cost=(("unet-cpu", 32, 16, 150), ("DiT-T/4", 32, 16, 150),
                                                            ("DiT-S/2", 32, 8, 90)))},
    # The recipe study (--recipe): variants of the plain ddpm baseline's settings, one seed; see bench_recipe.py.
    "recipe": {**_COMMON, **dict(image_size=16, batch_size=16, lr=1e-3, warmup=50, grad_clip=1.0, ema_decay=0.999,
                                 schedule="linear", checkpoints=(4000,), seeds=(0,), log_every=50, n_eval=256, n_ref=1024,
                                 eval_steps=50, eval_eta=1.0, grid_steps=10, speed_steps=3, speed_repeats=5)},
    # Evidence on 2 CPU cores (--cpu): the base recipe of the study (results/recipe_cpu.md) with gradient clipping
    # off (no measurable effect on the baseline; the Min-SNR authors' code does not clip), long enough for the
    # eps baseline to learn (4,000 steps), every row x 5 seeds. The UNet only: DiT-T/4 at 16 px sees 16 tokens.
    # All four weightings for eps (where the Min-SNR paper reports divergence), constant and min-SNR for v.
    # The MT-Diffusion rows are measured as their paper measures them (MT_X, MT_E below). mt_patches is the
    # hidden-patch count of the earlier restoration protocol: unused now, kept because the stored units'
    # settings name it.
    "cpu": {**_COMMON, **dict(arches=("unet",), targets=("eps", "v"), image_size=16, batch_size=16, lr=1e-3, warmup=50,
                              grad_clip=0.0, ema_decay=0.999, schedule="linear", checkpoints=(1000, 2000, 4000),
                              seeds=(0, 1, 2, 3, 4), log_every=50, n_eval=256, n_ref=1024, eval_steps=100, eval_eta=1.0,
                              grid_steps=10, rgb_heldout=16, n_restore=64, mt_patches=3, min_snr_gamma=5.0,
                              max_snr_gamma=1.0, target_weightings={"v": ("const", "min_snr")},
                              restore_patches=(5, 10, 15, 20), n_label=512, finetune_steps=(250, 500, 1000, 2000),
                              finetune_lr=3e-4)},
    # One GPU: 32px, 10k steps of batch 128, three seeds (an overnight run).
    "full": {**_COMMON, **dict(image_size=32, batch_size=128, lr=3e-4, warmup=500, checkpoints=(1000, 2500, 5000, 10000),
                               seeds=(0, 1, 2), log_every=250, n_eval=2000, n_ref=5000, eval_steps=50, grid_steps=50,
                               rgb_heldout=64, speed_steps=10, speed_repeats=7, sample_n=64, n_restore=500,
                               restore_patches=(5, 10, 15, 20), n_label=512, finetune_steps=(250, 500, 1000, 2000),
                               finetune_lr=3e-4, workers=4,
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


def gamma_flag(weighting, gamma):
    """--snr-gamma for the weightings that read it (train.py refuses a flag its run does not read)."""
    return ["--snr-gamma", str(gamma)] if weighting in ("min_snr", "max_snr") else []


def row_flags(prof, spec, seed, extra=()):
    """train.py's arguments for one row ({name, arch, method, flags}) with one seed under a profile."""
    return ["--method", spec["method"], *spec.get("flags", ()), *common_flags(prof, spec["arch"], seed), *extra]


def run_dir(root, name, seed):
    """A row's run folder for one seed ('unet/ddpm', 0 -> ROOT/unet_ddpm-seed0)."""
    return os.path.join(root, f"{name}-seed{seed}".replace("/", "_"))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def loss_bins(log, after_step):
    """Mean unweighted loss per timestep decile over the log records after `after_step`."""
    recs = [r for r in log if r["step"] > after_step] or log
    return [None if not vals else sum(vals) / len(vals)
            for vals in ([r["loss_bins"][i] for r in recs if r["loss_bins"][i] is not None] for i in range(10))]


def run_key(spec):
    """What a row's training depends on. Weighting 'snr' for eps and 'const' for x0 are weight 1, i.e. the
    unweighted loss (minsnr.py), so those rows share the run of weighting 'none'."""
    axes = {"target": "eps", "weighting": "none", "routing": "none", **methods.METHODS[spec["method"]].preset}
    axes.update({k: spec[k] for k in ("target", "weighting") if k in spec})
    if (axes["target"], axes["weighting"]) in (("eps", "snr"), ("x0", "const")):
        axes["weighting"] = "none"
    return (spec["arch"], axes["target"], axes["weighting"], axes["routing"])


# -----------------------------------------------------------------------------
# Scoring

class Scorer:
    """The reference net and the features of n_ref held-out real images, computed once per profile. FD uses
    all n_ref; precision/recall the first n_eval, since both depend on the sizes of the two sets (as equal
    sizes in Kynkaanniemi et al.). Also the generated-class accuracy of class-conditional samples and the
    colour statistics (metrics.py). `floor` scores n_eval further held-out real images with their true
    labels: FD's noise floor and the class accuracy's ceiling at this N."""

    def __init__(self, prof, cache=None, floor=True):
        S, name = prof["image_size"], prof.get("data", "shapes")
        self.net, self.info = metrics.load_feature_net(name, S, 0, "trained", cache, **prof["featnet"])
        self.net = self.net.to(DEVICE)
        self.ref = metrics.extract_features(self.net, metrics.reference_images(name, S, prof["n_ref"]), device=DEVICE)
        _, held, _ = metrics.reference_split(name, S)
        self.floor = self(*metrics.stack_items(held, prof["n_eval"], prof["n_ref"])) if floor else None

    def __call__(self, images, labels=None):
        feats = metrics.extract_features(self.net, images, device=DEVICE)
        p, r = metrics.precision_recall(self.ref[:len(feats)], feats)
        colour = metrics.channel_stats(images)
        out = {"fd": metrics.frechet_distance_features(self.ref, feats), "precision": p, "recall": r,
               "channel_dev": colour["channel_dev"], "mean": statistics.fmean(colour["mean"]),
               "std": statistics.fmean(colour["std"])}
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
            x = mtdiffusion.mt_sample(model, sched, shape, steps, eta, target=cfg["target"], generator=g, device=DEVICE)[0]
        elif cfg["method"] in ("jointnet", "direct_extend"):
            x = jointnet_eval.sample_joint(model, sched, cfg, b, steps, batch=b, eta=eta, labels=y, generator=g, device=DEVICE)[0]
        else:
            fn = diffusion.cfg_model(model, y, 1.0, K)
            x = diffusion.ddim_sample(fn, sched, shape, steps, eta, cfg["target"], generator=g, device=DEVICE)
        out.append(x.float().cpu())                                                  # (b, C, S, S)
    return torch.cat(out), labels


def sample_scores(scorer, path, n, steps, seed, eta, ema=True):
    """The scores of n DDIM(steps, eta) samples (generate) of the checkpoint at path, EMA weights unless
    ema=False."""
    model, cfg, sched = methods.load_run(path, ema=ema, device=DEVICE)
    return scorer(*generate(model, sched, cfg, n, steps, seed, eta))


def checkpoint_scorer(prof, scorer, seed):
    """score(checkpoint path, step): the profile's scores of one checkpoint of a run of this seed."""
    def score(path, step):
        return sample_scores(scorer, path, prof["n_eval"], prof["eval_steps"], seed, prof["eval_eta"])
    return score


# -----------------------------------------------------------------------------
# The rows' extra evaluations, for the evidence profile and the whole-report profiles alike.
# MT-Diffusion (mtdiffusion.py): masked-image restoration (Table 1) and the label head (Fig. 6).
# JointNet (jointnet.py): RGB preservation (proxy for Fig. 8) and RGB -> depth (Table 2's metrics).

# MT-Diffusion is measured as its paper measures it. Restoration (Table 1): variant X trained with masked
# images (m ~ U{0..10} patches of side S/4), restoring held-out images by Algorithm 1 (ancestral, nothing
# pasted) against SDEdit from a single-task unconditional model of the same recipe. The label head
# (Fig. 6): MT-Diffusion-E trained with single-task rows (E*), then finetuned by noised cross-entropy,
# against a noise-aware classifier pretrained as long and finetuned alike. These rows and their
# baselines train with v-prediction and min-SNR-5 (train.py's default recipe): with the eps recipe the
# variant-X network ignores its masked-image input at 4,000 steps (its loss at the noisiest tenth of t is
# worse than unconditional ddpm's); the paper trained ADM's eps recipe for far longer. The masked task
# models images without labels: --class-cond 0 says so up front, so a resume agrees with the saved config.
MT_RECIPE = ["--target", "v", "--weighting", "min_snr", "--snr-gamma", "5"]
MT_X = dict(group="mtdiff", name="unet/mtdiff-X", arch="unet", method="mtdiff",
            flags=["--task", "masked", "--class-cond", "0", *MT_RECIPE])
MT_UNCOND = dict(group="mtdiff", name="unet/uncond", arch="unet", method="ddpm", flags=["--class-cond", "0", *MT_RECIPE])
MT_E = dict(group="mtdiff", name="unet/mtdiff-E", arch="unet", method="mtdiff",
            flags=["--task", "label", "--mt-head", "E", *MT_RECIPE])
# The eps-recipe label run of earlier profiles: its stored head and clean-classifier accuracies are shown
# as reference rows (not claims) where they exist.
MT_LABEL_EPS = "unet/mtdiff-label"
JOINT = [dict(group="jointnet", name=f"unet/{m}", arch="unet", method=m) for m in ("jointnet", "direct_extend")]


# MT-Diffusion Table 1 (ImageNet 64, LPIPS): {m: (Clean-Masked, SDEdit, MT-Diffusion)}
MT_TABLE1 = {5: (0.311, 0.400, 0.035), 10: (0.414, 0.466, 0.068), 15: (0.461, 0.497, 0.099), 20: (0.491, 0.513, 0.133)}


def mt_markdown(p, rows):
    """The MT-Diffusion tables: restoration at every m (Table 1's rows and the extras), and the label
    accuracies over finetuning steps (Fig. 6), with the eps-recipe label run's reference numbers."""
    lines = []
    rest = {s: r for s, r in rows.get(MT_X["name"], {}).items() if "restoration" in r}
    if rest:
        ms = [m for m in p.get("restore_patches", ()) if all(str(m) in r["restoration"] for r in rest.values())]
        names = list(next(iter(rest.values()))["restoration"][str(ms[0])]) if ms else []
        lines += ["", f"## MT-Diffusion restoration ({p['n_restore']} held-out images, {len(rest)} seeds)", "",
                  "Perceptual distance to the original (LPIPS's formula in the reference CNN's features, standing in for "
                  "LPIPS), with masked-region MSE and the change of the visible region in brackets; mean ± std over "
                  "seeds. Clean-Masked, SDEdit and Algorithm 1 are Table 1's rows; '+ paste' and replacement are extras. "
                  "The paper's LPIPS (ImageNet 64) at m = 5 / 10 / 15 / 20: Clean-Masked "
                  + " / ".join(f"{MT_TABLE1[m][0]}" for m in sorted(MT_TABLE1)) + ", SDEdit "
                  + " / ".join(f"{MT_TABLE1[m][1]}" for m in sorted(MT_TABLE1)) + ", MT-Diffusion "
                  + " / ".join(f"{MT_TABLE1[m][2]}" for m in sorted(MT_TABLE1)) + ".", "",
                  "| row | " + " | ".join(f"Mask-{m}" for m in ms) + " |", "|---" * (len(ms) + 1) + "|"]
        for name in names:
            cell = lambda m, f: mean_std([r["restoration"][str(m)][name][f] for r in rest.values()])
            lines.append(f"| {name} | " + " | ".join(
                f"{fmt(cell(m, 'perceptual'), 3)} ({fmt(cell(m, 'masked_mse'), 3)}; {fmt(cell(m, 'unmasked_change'), 3)})"
                for m in ms) + " |")
    labs = [r["labels"] for r in rows.get(MT_E["name"], {}).values()]
    if labs:
        ks = sorted({int(k) for x in labs for k in x["mt"]})
        lines += ["", f"## MT-Diffusion-E's classifier against a noise-aware classifier ({p.get('n_label')} held-out "
                  f"images, {len(labs)} seeds)", "",
                  "Accuracy on held-out images noised at fixed shared draws of t ~ U{0..T-1} (Fig. 6's metric), and on "
                  "the clean images (t = 0), after K steps of finetuning by noised cross-entropy (K = 0: as trained). "
                  "Mean ± std over seeds; chance is 0.25.", "",
                  "| model | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for name, title in (("mt", "MT-Diffusion-E, noised"), ("baseline", "noise-aware classifier, noised"),
                            ("mt", "MT-Diffusion-E, t = 0"), ("baseline", "noise-aware classifier, t = 0")):
            f = "noised" if title.endswith("noised") else "clean"
            lines.append(f"| {title} | " + " | ".join(
                fmt(mean_std([x[name][str(k)][f] for x in labs if str(k) in x[name]]), 3) for k in ks) + " |")
    ref = [r["labels"] for r in rows.get(MT_LABEL_EPS, {}).values()]
    if ref:
        lines += ["", f"Reference rows (not claims), from the eps-recipe label run of earlier profiles ({len(ref)} seeds): "
                  f"held-out accuracy at t = 0 of its raw M head {fmt(mean_std([x['mt_head'] for x in ref]), 3)}, of the "
                  f"same network trained by cross-entropy on clean images {fmt(mean_std([x['supervised'] for x in ref]), 3)}."]
    return lines


def held_out(S, n):
    return data.first_items(data.build_dataset("shapes", S, "test", 0), n, DEVICE)


def mt_restoration(prof, scorer, mt_ckpt, base_ckpt, seed):
    """Table 1's rows at every m of prof["restore_patches"] (mtdiffusion_eval.restoration_scores), on the
    first n_restore held-out images; {str(m): {row: scores}}."""
    model, cfg, sched = methods.load_run(mt_ckpt, device=DEVICE)
    base, bcfg, _ = methods.load_run(base_ckpt, device=DEVICE)
    x0 = held_out(prof["image_size"], prof["n_restore"])["image"]
    scores = mtdiffusion_eval.restoration_scores(model, cfg, base, bcfg, sched, x0, scorer.net,
                                                 prof["restore_patches"], prof["eval_steps"], seed)
    return {str(m): rows for m, rows in scores.items()}


def mt_labels(prof, ckpt, seed):
    """Fig. 6's curves (mtdiffusion_eval.label_scores) on the first n_label held-out images; K as str keys."""
    model, cfg, sched = methods.load_run(ckpt, device=DEVICE)
    b = held_out(prof["image_size"], prof["n_label"])
    scores = mtdiffusion_eval.label_scores(model, cfg, sched, b["image"], b["label"], prof["finetune_steps"], seed,
                                           prof["finetune_lr"])
    return {name: {str(k): v for k, v in curve.items()} for name, curve in scores.items()}


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
    z = jointnet_eval.joint_ddim(fn, sched, torch.randn(z0.shape, generator=g, device=DEVICE),
                      diffusion.timestep_subset(sched.T, prof["eval_steps"]).tolist(), cfg["target"], z0, known, 0.0, g)
    m = metrics.depth_metrics(z[:, x0.shape[1]:].cpu(), d0.cpu())
    other = metrics.depth_metrics(d0.roll(1, 0).cpu(), d0.cpu())  # another image's depth: the uninformed level
    return {"abs_rel": m["abs_rel"], "rmse": m["rmse"], "other_image_abs_rel": other["abs_rel"],
            "other_image_rmse": other["rmse"]}


# -----------------------------------------------------------------------------
# Timing: training steps of a fixed batch, side by side in one process

def seeded_model(cfg):
    """cfg's network built from torch seed 0, on DEVICE: every timing of a config starts from the same weights."""
    torch.manual_seed(0)
    return methods.build_model(cfg).to(DEVICE)


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
    batch = {**batch, "weight": methods.loss_weight(sched, batch["t"], s["cfg"])}  # as train.py adds it
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


def interleaved(keys, repeats, run):
    """{key: [run(key) of each repeat]}: every repeat runs every key once, in rotating order (rotated), so
    that no key always runs right after another and a slow spell of a shared machine hits them alike."""
    times = {k: [] for k in keys}
    for r in range(repeats):
        for k in rotated(list(keys), r):
            times[k].append(run(k))
    return times


def fixed_batch(ds, B):
    """The first B items of ds with timesteps, noise and label dropout drawn as train.py draws them (the
    per-row loss weight is added per config: methods.loss_weight)."""
    batch = data.first_items(ds, B, DEVICE)
    g = torch.Generator().manual_seed(0)
    batch["t"] = diffusion.sample_timesteps(B, 1000, generator=g).to(DEVICE)
    batch["noise"] = torch.randn(batch["image"].shape, generator=g).to(DEVICE)
    batch["label_drop"] = (torch.rand(B, generator=g) < 0.1).to(DEVICE)  # --cfg-drop 0.1
    return batch


# -----------------------------------------------------------------------------
# Tables

def mean_std(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]  # not None (missing) or DIVERGED
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def fmt(ms, digits=2):
    if ms is None:
        return "-"
    return f"{ms['mean']:.{digits}f}" + (f" ± {ms['std']:.{digits}f}" if ms["n"] > 1 else "")


def hardware():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}, torch {torch.__version__}"


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


# -----------------------------------------------------------------------------
# The store of finished units (--cpu, --recipe): resumable profiles
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
        # A setting the file predates cannot have shaped its units (a new evaluation's parameters): it is added.
        ours = {k: v for k, v in self.doc["settings"].items() if k in (old.get("settings") or {})}
        if json.dumps(old.get("settings"), sort_keys=True) != json.dumps(ours, sort_keys=True):
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
    flags = row_flags(prof, spec, seed, extra)
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


def stored(store, key, compute):
    """store[key], computed and stored first if missing."""
    if store.get(key) is None:
        store.put(key, compute())
    return store.get(key)
