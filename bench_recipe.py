"""
The recipe study: which shared settings make the plain ddpm baseline learn fastest per CPU-minute.

    python bench.py --recipe       # results/recipe_cpu.json and .md; resumable
    python bench.py --default-run  # what `python train.py` gives, 3 seeds, eta 0 against eta 1 (results/default_cpu.*)
    python bench.py --glyphs       # the same on a small grayscale data set of drawn digits (results/glyphs_cpu.*)

Each variant changes one setting of the base recipe (the recipe profile in bench_common.PROFILES); the
evidence profile (--cpu) trains every row with the recipe this study chose. May import bench_common.py
and the project's library files.
"""
import json
import os
import shutil
import sys
import time

import torch

import bench_common as common
import bench_evidence as evidence
import config
import data
import diffusion
import methods
import metrics


# Each variant changes one setting of the base recipe; the EMA model is scored at each
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
    store = common.Store(args.json, json.loads(json.dumps({"profile": prof, "variants": RECIPE_VARIANTS, "samplers": RECIPE_SAMPLERS})))
    root = args.runs
    os.makedirs(root, exist_ok=True)
    scorers = {}
    def scorer_for(size):
        if size not in scorers:
            scorers[size] = common.Scorer({**prof, "image_size": size}, args.cache)
        return scorers[size]
    seed = prof["seeds"][0]
    try:
        for vname, flags, cks in RECIPE_VARIANTS:
            size = int(flags[flags.index("--image-size") + 1]) if "--image-size" in flags else prof["image_size"]
            sc = scorer_for(size)
            def score(path, step, base=vname == "base", last=cks[-1]):
                out = {}
                for label, steps, eta, ema in ((f"DDIM-{prof['eval_steps']}, eta {prof['eval_eta']:g}", prof["eval_steps"], prof["eval_eta"], True),) + (RECIPE_SAMPLERS if base and step == last else ()):
                    out[label] = common.sample_scores(sc, path, prof["n_eval"], steps, seed, eta, ema)
                return {"samplers": out}
            spec = dict(name=f"recipe/{vname}", arch="unet", method="ddpm")
            common.train_row_resumable({**prof, "checkpoints": cks}, store, root, spec, seed, score, extra=flags)
        cost = common.stored(store, "cost", lambda: recipe_cost(prof))
    except KeyboardInterrupt:
        sys.exit(f"stopped; {len(store.doc['units'])} finished units are in {args.json}: run the same command to continue")
    text = recipe_markdown(prof, store, cost, command, time.time() - t0, scorers)
    common.write_text(args.md, text)
    print(text)
    return store.doc


def recipe_cost(prof):
    """Seconds per optimiser step of each variant: interleaved repeats in rotating order, best of each."""
    setups = {}
    for vname, flags, _ in RECIPE_VARIANTS:
        cfg, ds, _ = config.make_config(["--method", "ddpm", *common.common_flags(prof, "unet", 0), *flags])
        model = common.seeded_model(cfg)
        setups[vname] = dict(model=model, cfg=cfg, loss_fn=methods.diffusion_training_loss,
                             opt=torch.optim.AdamW(model.parameters(), lr=1e-5),
                             batch=common.fixed_batch(ds, cfg["batch_size"]),
                             sched=diffusion.Schedule.make(cfg["schedule"], cfg["T"]).to(common.DEVICE))
    for s in setups.values():
        common.timed_steps(s, s["batch"], s["sched"], 1)  # warm-up
    n = prof["speed_steps"]
    times = common.interleaved(list(setups), prof["speed_repeats"],
                               lambda v: common.timed_steps(setups[v], setups[v]["batch"], setups[v]["sched"], n) / n)
    return {"sec_per_step": {k: min(v) for k, v in times.items()}, "hardware": common.hardware()}


def recipe_markdown(prof, store, cost, command, wall_s, scorers):
    main_label = f"DDIM-{prof['eval_steps']}, eta {prof['eval_eta']:g}"
    lines = ["# Recipe study: the plain ddpm baseline (eps-prediction, no weighting) on shapes", "",
             f"`{command}`; {common.hardware()}; this invocation {wall_s / 60:.1f} min, all stored units "
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
            u = store.get(common.unit_key(f"recipe/{vname}", prof["seeds"][0], c))
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
            u = store.get(common.unit_key("recipe/base", prof["seeds"][0], c))
            if u and not u.get("diverged") and label in u["samplers"]:
                s = u["samplers"][label]
                lines.append(f"| {label} | {c} | {s['fd']:.2f} | {s['class_acc']:.3f} | {s['channel_dev']:.3f} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The default run (--default-run, --glyphs): what `python train.py` with no flags but the data gives, over
# seeds, and which DDIM eta samples it best. Each seed is one unit: train.py's own defaults (only --seed,
# --out and the spec's flags given), the wall time of the training, then n_eval samples of the EMA weights
# with each eta, scored by the reference CNN of the data (FD, precision, recall, generated-class accuracy,
# colour statistics). --glyphs runs it on the grayscale glyphs set (data.make_glyphs, written into the runs
# folder), at the data's 16 px, and scores a freshly drawn glyph set as the floor.

DEFAULT_RUN = dict(name="the default run", seeds=(0, 1, 2), n_eval=512, n_ref=1024, eval_steps=50, etas=(0.0, 1.0),
                   image_size=32, featnet={}, flags=())
GLYPHS_RUN = dict(name="the default run on the glyphs", seeds=(0,), n_eval=1000, n_ref=150, eval_steps=50, etas=(1.0,),
                  image_size=16, featnet={}, flags=("--image-size", "16"), glyphs=dict(per_class=150, seed=0),
                  fresh=dict(per_class=100, seed=1))


def default_run(args, command, base=None):
    t0, base = time.time(), base or DEFAULT_RUN
    spec = dict(base, seeds=tuple(args.seeds or base["seeds"]))
    store = common.Store(args.json, json.loads(json.dumps({k: v for k, v in spec.items() if k != "seeds"})))
    flags, fresh = list(spec["flags"]), None
    if "glyphs" in spec:  # the data set and a freshly drawn one, written once into the runs folder
        folder, fresh = os.path.join(args.runs, "glyphs"), os.path.join(args.runs, "glyphs-fresh")
        for path, kw in ((folder, spec["glyphs"]), (fresh, spec["fresh"])):
            if not os.path.isdir(path):
                data.make_glyphs(path, **kw)
        spec["data"], flags = folder, flags + ["--data", folder]
    scorer = common.Scorer(spec, args.cache, floor=fresh is None)
    if fresh is not None:
        scorer.floor = scorer(*metrics.stack_items(data.build_dataset(fresh, spec["image_size"]), spec["n_eval"]))
    for seed in spec["seeds"]:
        key = f"default|seed{seed}"
        if store.get(key) is not None:
            continue
        out = os.path.join(args.runs, f"seed{seed}")
        if os.path.exists(out):  # a run stopped part-way: train it again (the wall time must be one run's)
            shutil.rmtree(out)
        os.makedirs(args.runs, exist_ok=True)
        started = time.time()
        common.call_train([*flags, "--seed", str(seed), "--out", out], out + ".log")
        wall = time.time() - started
        path = os.path.join(out, "checkpoint.pt")
        scores = {f"eta {eta:g}": common.sample_scores(scorer, path, spec["n_eval"], spec["eval_steps"], seed, eta)
                  for eta in spec["etas"]}
        store.put(key, dict(train_wall_s=wall, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                            **scores))
        print(f"[bench] {spec['name']}, seed {seed}: trained in {wall / 60:.1f} min; " + "; ".join(
            f"{k}: FD {v['fd']:.3f}" for k, v in scores.items()), flush=True)
    units = {s: store.get(f"default|seed{s}") for s in spec["seeds"] if store.get(f"default|seed{s}")}
    text = default_markdown(spec, units, command, scorer.floor, time.time() - t0, flags)
    common.write_text(args.md, text)
    print(text)
    return units


def default_markdown(spec, units, command, floor, wall_s, flags):
    etas = [f"eta {e:g}" for e in spec["etas"]]
    cmd = " ".join(["python train.py", *flags])
    what = "a freshly drawn glyph set" if "glyphs" in spec else "held-out real images"
    lines = [f"# {spec['name'].capitalize()}: `{cmd}` ({len(units)} seed{'s' * (len(units) != 1)})", "",
             f"`{command}`; {common.hardware()}; this invocation {wall_s / 60:.1f} min. Each seed: `{cmd} --seed S` "
             f"(train.py's CPU defaults otherwise), then {spec['n_eval']} DDIM-"
             f"{spec['eval_steps']} samples of the EMA weights with each eta (the same noise for each); FD against "
             f"{spec['n_ref']} held-out images in the reference CNN's features. The floor: {what} scored as if they "
             f"were samples: FD {floor['fd']:.3f}, precision {floor['precision']:.3f}, recall {floor['recall']:.3f}, "
             f"class accuracy {floor['class_acc']:.3f}, mean {floor['mean']:.3f}, std {floor['std']:.3f}.", "",
             "| seed | training wall time | torch threads | " + " | ".join(
                 f"{e}: FD | precision | recall | class acc | mean | std" for e in etas) + " |",
             "|---" * (3 + 6 * len(etas)) + "|"]
    for s, u in sorted(units.items()):
        lines.append(f"| {s} | {u['train_wall_s'] / 60:.1f} min ({u['date']}) | {u['threads']} | " + " | ".join(
            f"{u[e]['fd']:.3f} | {u[e]['precision']:.3f} | {u[e]['recall']:.3f} | {u[e]['class_acc']:.3f} | "
            f"{u[e]['mean']:.3f} | {u[e]['std']:.3f}" for e in etas) + " |")
    if len(units) >= 2 and len(etas) == 2:
        lines += ["", f"Paired over seeds, {etas[0]} minus {etas[1]} ({evidence.interval_name()}; negative FD and "
                  "positive precision, recall, accuracy favour the first):", ""]
        for metric in ("fd", "precision", "recall", "class_acc"):
            ci = evidence.paired([u[etas[0]][metric] for u in units.values()], [u[etas[1]][metric] for u in units.values()])
            lines.append(f"- {metric}: {evidence.fmt_ci(ci)} ({len(units)} seeds)")
    return "\n".join(lines) + "\n"
