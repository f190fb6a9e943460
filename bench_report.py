"""
The whole report of a profile in one run: every row (methods, loss weightings, MT-Diffusion, JointNet)
trained once per seed and scored at each checkpoint, the claims they test, and the timings.

    python bench.py --quick      # a smoke of every row (16px, 400 steps, one seed): checks, not evidence
    python bench.py --full       # one GPU, overnight: 32px, 10k steps, three seeds
    python bench.py --tiny       # a few steps of everything: checks that the pipeline runs (the tests use it)

Writes bench.json (every number) and bench.md (the tables and a verdict per claim with its seed count);
the paired multi-seed verdicts are the evidence profile's (bench_evidence.py, --cpu). May import
bench_common.py, bench_timing.py (its speed and DTR cost sections) and the project's library files.
"""
import datetime
import json
import os
import shutil
import statistics
import time

import bench_common as common
import bench_timing as timing
from bench_common import fmt, mean_std


# -----------------------------------------------------------------------------
# Rows: trained through train.py, scored at every checkpoint

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
        common.call_train(argv, out + ".log")
        results[step] = on_checkpoint(os.path.join(out, "checkpoint.pt"), step)
    return results


def fields(spec):
    """A row spec without its train.py flags: what a row's record says about it."""
    return {k: v for k, v in spec.items() if k != "flags"}


def run_row(prof, scorer, root, spec, seed, extra=()):
    """Train one row with one seed, scored at every checkpoint; returns its record."""
    out = common.run_dir(root, spec["name"], seed)
    t0 = time.time()
    flags = common.row_flags(prof, spec, seed, extra)
    scores = train_in_segments(out, flags, prof["checkpoints"], common.checkpoint_scorer(prof, scorer, seed))
    log = common.read_log(out)
    cks = prof["checkpoints"]
    return {**fields(spec), "seed": seed, "out": out, "wall_s": time.time() - t0,
            "scores": {str(s): v for s, v in scores.items()}, "loss_bins": common.loss_bins(log, cks[-2] if len(cks) > 1 else 0),
            "logged_img_per_s": statistics.median(r["img_per_s"] for r in log), "log": log}


def quality_specs(prof):
    """The methods grid and the weighting grid. Rows whose training would be identical share one run."""
    specs = [dict(group="methods", name=f"{a}/{m}", arch=a, method=m) for a in prof["arches"] for m in prof["methods"]]
    specs += [dict(group="weighting", name=f"unet/{t}/{w}", arch="unet", method="ddpm", target=t, weighting=w,
                   flags=["--target", t, "--weighting", w, *common.gamma_flag(w, 5)])
              for t in prof["targets"] for w in prof["weightings"]]
    return specs


def quality_rows(prof, scorer, root):
    rows, done = [], {}
    for spec in quality_specs(prof):
        for seed in prof["seeds"]:
            key = (common.run_key(spec), seed)
            if key in done:
                rows.append({**done[key], **fields(spec), "shared_with": done[key]["name"]})
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
# MT-Diffusion rows (restoration, label head) and JointNet rows (RGB preservation, RGB -> depth)

def mtdiff_rows(prof, scorer, root, quality):
    """MT-Diffusion-X with restoration against SDEdit from an unconditional model of the same recipe, and
    MT-Diffusion-E with its finetuned label scores (bench_common.mt_restoration, mt_labels)."""
    rows, last = [], prof["checkpoints"][-1:]
    for seed in prof["seeds"]:
        print(f"[bench] {common.MT_X['name']} seed {seed}", flush=True)
        r = run_row(prof, scorer, root, common.MT_X, seed)
        base = common.run_dir(root, common.MT_UNCOND["name"], seed)
        train_in_segments(base, common.row_flags(prof, common.MT_UNCOND, seed), last, lambda p, s: None)
        r["restoration"] = common.mt_restoration(prof, scorer, os.path.join(r["out"], "checkpoint.pt"),
                                                 os.path.join(base, "checkpoint.pt"), seed)
        rows.append(r)
        spec = common.MT_E
        out = common.run_dir(root, spec["name"], seed)
        print(f"[bench] {spec['name']} seed {seed}", flush=True)
        train_in_segments(out, common.row_flags(prof, spec, seed), last, lambda p, s: None)
        rows.append(dict(fields(spec), seed=seed, out=out, labels=common.mt_labels(prof, os.path.join(out, "checkpoint.pt"), seed)))
    return rows


def jointnet_rows(prof, scorer, root, quality):
    rows = []
    for seed in prof["seeds"]:
        base = base_checkpoint(quality, seed)
        if base is None:
            continue
        for spec in common.JOINT:
            print(f"[bench] {spec['name']} seed {seed}", flush=True)
            r = run_row(prof, scorer, root, spec, seed, extra=["--init", base, "--rgb-heldout", str(prof["rgb_heldout"])])
            held = [x["rgb_heldout"] for x in r["log"] if x.get("rgb_heldout") is not None]
            r["rgb_heldout"] = {"first": held[0] if held else None, "last": held[-1] if held else None}
            r["depth"] = common.rgb_to_depth(prof, os.path.join(r["out"], "checkpoint.pt"), seed)
            rows.append(r)
    return rows


# -----------------------------------------------------------------------------
# Summary: means over seeds, the claims, the markdown

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
        names = [f"unet/{t}/{w}" for w in common.WEIGHTINGS]
        if all(x in summary for x in names):
            auc = {w: summary[x]["fd_mean"]["mean"] for w, x in zip(common.WEIGHTINGS, names)}
            others = min(v for w, v in auc.items() if w != "min_snr")
            add(f"min-SNR-5 converges fastest ({t}-prediction)", "Min-SNR Fig. 5", auc["min_snr"] < others,
                "mean FD over checkpoints: " + ", ".join(f"{w} {v:.2f}" for w, v in auc.items()),
                summary[names[0]]["seeds"], others - auc["min_snr"])
    rest = [r["restoration"] for r in rows if r.get("restoration")]
    if rest:
        per = lambda row: statistics.fmean(x[m][row]["perceptual"] for x in rest for m in x)  # over seeds and m
        ours, sd = per("Algorithm 1"), per("SDEdit (t0 = T/2)")
        add("Algorithm 1 restores closer to the original than SDEdit", "MT-Diffusion Table 1", ours < sd,
            f"perceptual distance, mean over m: {ours:.4f} (Algorithm 1) vs {sd:.4f} (SDEdit, t0 = T/2)", len(rest))
    labs = [r["labels"] for r in rows if r.get("labels")]
    if labs:
        k = str(max(int(k) for k in labs[0]["mt"]))  # the longest finetuning
        a, b = (statistics.fmean(x[n][k]["noised"] for x in labs) for n in ("mt", "baseline"))
        add("MT-Diffusion-E's classifier beats a noise-aware classifier", "MT-Diffusion Fig. 6", a > b,
            f"noised held-out accuracy after {k} finetuning steps: {a:.3f} vs {b:.3f}", len(labs))
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
    again = common.sample_scores(scorer, os.path.join(base["out"], "checkpoint.pt"), prof["n_eval"], prof["eval_steps"],
                                 base["seed"] + 1, prof["eval_eta"])["fd"]
    resample = abs(again - base["scores"][str(prof["checkpoints"][-1])]["fd"])
    seed_std = max((v[f"fd@{prof['checkpoints'][-1]}"]["std"] for v in summary.values()), default=0.0)
    return {"fd": max(resample, seed_std), "resample": resample, "seed_std": seed_std}


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
    mt = {}
    for r in report["quality"]:
        for key in ("restoration", "labels"):
            if r.get(key):
                mt.setdefault(r["name"], {})[r["seed"]] = {key: r[key]}
    lines += common.mt_markdown(p, mt)
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
    lines += timing.speed_markdown(p, dict(training=report["speed"], sampling=report["sampling"]))
    return "\n".join(lines + timing.routing_markdown(report["routing_cost"])) + "\n"


# -----------------------------------------------------------------------------

def run(prof, name, runs, cache=None, command=""):
    t0 = time.time()
    os.makedirs(runs, exist_ok=True)
    scorer = common.Scorer(prof, cache)
    quality = quality_rows(prof, scorer, runs)
    if common.has_module("mtdiffusion"):
        quality += mtdiff_rows(prof, scorer, runs, quality)
    if common.has_module("jointnet"):
        quality += jointnet_rows(prof, scorer, runs, quality)
    print("[bench] speed", flush=True)
    speed = [r for a in prof["arches"]
             for r in timing.training_speed(prof, a, base_checkpoint(quality, prof["seeds"][0]) if a == "unet" else None)]
    sampling = [r for a in prof["arches"] for r in timing.sampling_speed(prof, a)]
    routing = timing.routing_cost(prof)
    summary = summarize(quality, prof["checkpoints"])
    noise = fd_noise(prof, scorer, quality, summary)
    return dict(profile_name=name, profile=prof, command=command, date=datetime.date.today().isoformat(),
                hardware=common.hardware(), wall_s=time.time() - t0, reference_accuracy=scorer.info["accuracy"],
                fd_floor=scorer.floor, fd_noise=noise, summary=summary, speed=speed, sampling=sampling, routing_cost=routing,
                quality=[{k: v for k, v in r.items() if k != "log"} for r in quality],
                claims=claims(summary, quality, prof["checkpoints"], noise["fd"]))


def run_report(prof, name, args, command):
    """The whole report of a profile (run): writes args.json (every number) and args.md (markdown)."""
    report = run(prof, name, args.runs, args.cache, command)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    common.write_text(args.md, text)
    print(text)
    print(f"wrote {args.json} and {args.md} in {report['wall_s'] / 60:.1f} min")
    return report
