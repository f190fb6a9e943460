"""
The evidence profile: does each paper's claim hold at small scale? Every row x 5 seeds, each claim a
paired comparison of two rows seed by seed, with a verdict; resumable, in parallel worker processes.

    python bench.py --cpu        # the evidence profile (results/bench_cpu.json and .md); resumable
    python bench.py --cpu --report   # its tables re-rendered from the stored units; trains nothing

Every finished unit (row, seed, checkpoint) goes to the store at once (bench_common.Store); the jobs (a
row with one seed, or an evaluation with its training) run under file locks in --parallel processes.
May import bench_common.py and the project's library files.
"""
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import scipy.stats

import bench_common as common
import bench_figures
from bench_common import fmt, mean_std

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")  # the command the workers run


# -----------------------------------------------------------------------------
# Paired verdicts and the profile's rows

LEVEL = 0.95  # of the claims' intervals


def interval_name(level=LEVEL):
    return f"{100 * level:g}% paired t-interval"


def paired(a, b, level=LEVEL):
    """Paired differences d_s = a_s - b_s over n seeds s: their mean and the paired t-interval
    mean ± t_{(1+level)/2, n-1} sd(d) / sqrt(n), with sd's denominator n - 1. With 3 seeds t_{0.975, 2} is
    4.30, so three differences of one sign need not exclude zero. With fewer than 2 seeds nothing can be
    concluded: the interval is (-inf, +inf)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = statistics.fmean(d) if n else math.nan
    half = scipy.stats.t.ppf((1 + level) / 2, n - 1) * statistics.stdev(d) / math.sqrt(n) if n >= 2 else math.inf
    return {"mean": mean, "lo": mean - half if n >= 2 else -math.inf, "hi": mean + half if n >= 2 else math.inf,
            "diffs": d, "n": n, "interval": interval_name(level)}


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
                              weighting=w, gamma=gamma, flags=["--target", t, "--weighting", w, *common.gamma_flag(w, gamma)]))
    keys = {}
    for s in specs:
        k = common.run_key(s) + (s.get("gamma", 5.0) if common.run_key(s)[2] in ("min_snr", "max_snr") else None,)
        if k in keys:
            s["shared_with"] = keys[k]
        else:
            keys[k] = s["name"]
    return specs


# -----------------------------------------------------------------------------
# Jobs: what one process runs start to end, under a file lock

class Job:
    """One piece of an evidence profile that one process runs start to end: a row with one seed, or an
    extra evaluation with the training it needs. done(): nothing left to store; ready(): the checkpoints
    it reads from other jobs exist."""

    def __init__(self, name, seed, run, done, ready=lambda: True):
        self.name, self.seed, self.run, self.done, self.ready = name, seed, run, done, ready
        self.id = f"{name}-seed{seed}".replace("/", "_")


def evidence_jobs(prof, store, scorer, root):
    """The profile's jobs in order: per seed, the ddpm row first (JointNet starts from its checkpoint), the
    other rows, then MT-Diffusion (variant X with its unconditional SDEdit baseline and the restoration
    scores, Table 1; MT-Diffusion-E with the finetuned label scores, Fig. 6) and JointNet / Direct Extend
    from the ddpm checkpoint (Sec. 3, Fig. 8). A run whose checkpoint a pending evaluation needs (the ddpm
    base, the MT-Diffusion runs) is retrained when its folder is gone."""
    last, cks = prof["checkpoints"][-1], prof["checkpoints"]
    unit_key, train_row = common.unit_key, common.train_row_resumable
    mt_x, uncond, mt_e = common.MT_X, common.MT_UNCOND, common.MT_E
    ckpt = lambda name, seed: os.path.join(common.run_dir(root, name, seed), "checkpoint.pt")
    has_ckpt = lambda name, seed: common.saved_step(common.run_dir(root, name, seed)) == last
    stored_all = lambda name, seed, steps: all(store.get(unit_key(name, seed, c)) is not None for c in steps) or \
        any((store.get(unit_key(name, seed, c)) or {}).get("diverged") for c in steps)
    trained = lambda path, step: {"trained": True}  # a run that only an evaluation reads: nothing to score
    jobs = []
    for seed in prof["seeds"]:
        score = common.checkpoint_scorer(prof, scorer, seed)
        needs_base = lambda seed=seed: any(store.get(unit_key(j["name"], seed, "extras")) is None for j in common.JOINT)
        for spec in evidence_specs(prof):
            if "shared_with" in spec:
                continue
            base = spec["name"] == "unet/ddpm"
            jobs.append(Job(spec["name"], seed,
                            lambda spec=spec, seed=seed, score=score, base=base: train_row(
                                prof, store, root, spec, seed, score, need_checkpoint=base and needs_base(seed)),
                            lambda spec=spec, seed=seed, base=base: stored_all(spec["name"], seed, cks) and not (
                                base and needs_base(seed) and not has_ckpt(spec["name"], seed))))

        def restoration(seed=seed, score=score, key=unit_key(mt_x["name"], seed, "restoration")):
            train_row(prof, store, root, mt_x, seed, score, need_checkpoint=store.get(key) is None)
            train_row({**prof, "checkpoints": (last,)}, store, root, uncond, seed, trained,
                      need_checkpoint=store.get(key) is None)
            common.stored(store, key, lambda: common.mt_restoration(prof, scorer, ckpt(mt_x["name"], seed),
                                                                    ckpt(uncond["name"], seed), seed))
        key = unit_key(mt_x["name"], seed, "restoration")
        jobs.append(Job(mt_x["name"], seed, restoration,
                        lambda key=key, seed=seed: store.get(key) is not None and stored_all(mt_x["name"], seed, cks)))

        def labels(seed=seed, key=unit_key(mt_e["name"], seed, "labels")):
            train_row({**prof, "checkpoints": (last,)}, store, root, mt_e, seed, trained,
                      need_checkpoint=store.get(key) is None)
            common.stored(store, key, lambda: common.mt_labels(prof, ckpt(mt_e["name"], seed), seed))
        key = unit_key(mt_e["name"], seed, "labels")
        jobs.append(Job(mt_e["name"], seed, labels, lambda key=key: store.get(key) is not None))

        for spec in common.JOINT:
            key = unit_key(spec["name"], seed, "extras")
            def joint(spec=spec, seed=seed, score=score, key=key):
                extra = ["--init", ckpt("unet/ddpm", seed), "--rgb-heldout", str(prof["rgb_heldout"])]
                train_row(prof, store, root, spec, seed, score, extra, need_checkpoint=store.get(key) is None)
                out = common.run_dir(root, spec["name"], seed)
                def extras():
                    held = [x["rgb_heldout"] for x in common.read_log(out) if x.get("rgb_heldout") is not None]
                    return {"rgb_heldout": {"first": held[0], "last": held[-1]},
                            "depth": common.rgb_to_depth(prof, os.path.join(out, "checkpoint.pt"), seed)}
                common.stored(store, key, extras)
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
            with common.file_lock(os.path.join(lock_dir, job.id + ".lock"), wait=False) as mine:
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


# -----------------------------------------------------------------------------
# Rows from the store, and the claims as paired comparisons

def rows_from_store(prof, store):
    """{row name: {seed: {step: scores, plus the row's extras}}} of every stored unit; rows that share a run
    read its units. Extras: "restoration" (MT-Diffusion-X), "labels" (MT-Diffusion-E, and the eps-recipe
    label run of earlier profiles where stored), JointNet's "rgb_heldout" and "depth"."""
    rows, unit_key = {}, common.unit_key
    specs = evidence_specs(prof) + [common.MT_X, *common.JOINT]
    for seed in prof["seeds"]:
        for spec in specs:
            src = spec.get("shared_with", spec["name"])
            r = {c: store.get(unit_key(src, seed, c)) for c in prof["checkpoints"] if store.get(unit_key(src, seed, c))}
            if store.get(unit_key(src, seed, "restoration")):
                r["restoration"] = store.get(unit_key(src, seed, "restoration"))
            r.update(store.get(unit_key(src, seed, "extras")) or {})
            if r:
                rows.setdefault(spec["name"], {})[seed] = r
        for name in (common.MT_E["name"], common.MT_LABEL_EPS):
            if store.get(unit_key(name, seed, "labels")):
                rows.setdefault(name, {})[seed] = {"labels": store.get(unit_key(name, seed, "labels"))}
    return rows, [s["name"] for s in specs] + [common.MT_E["name"]]


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
    """Each claim as a paired comparison over seeds: the mean difference a - b with its 95% paired t-interval
    and a verdict from that interval alone (holds / contradicted / unresolved), beside it sign_count [k, n]:
    the k of n seeds whose difference lies on the claim's side. names: the rows of this profile (a claim
    about rows it does not run is left out; one whose rows have fewer than 2 seeds stored says so)."""
    cks, last = prof["checkpoints"], prof["checkpoints"][-1]
    out = []
    def add(claim, source, what, a, b, sign, va, vb, needs=None, higher_better=False, paper=""):
        if any(n not in names for n in needs or (a, b)):
            return
        seeds = [s for s in va if va[s] is not None and vb.get(s) is not None]
        # A run that diverged is worse than any that did not.
        worst = -math.inf if higher_better else math.inf
        val = lambda v: worst if v == DIVERGED else v
        side = lambda s: (val(va[s]) > val(vb[s])) - (val(va[s]) < val(vb[s]))  # +1: a > b, -1: a < b
        c = dict(claim=claim, source=source, paper=paper, metric=what, a=a, b=b, sign=sign, n=len(seeds),
                 sign_count=[sum(side(s) == sign for s in seeds), len(seeds)])  # seeds on the claim's side, of n
        if len(seeds) < 2:
            out.append({**c, "verdict": "not enough seeds yet"})
            return
        if any(DIVERGED in (va[s], vb[s]) for s in seeds):
            # No difference to average: the verdict needs every seed on one side.
            sides = {side(s) for s in seeds}
            out.append({**c, "diverged": {"a": sum(va[s] == DIVERGED for s in seeds), "b": sum(vb[s] == DIVERGED for s in seeds)},
                        "verdict": "holds" if sides == {sign} else "contradicted" if sides == {-sign} else "unresolved"})
            return
        ci = paired([va[s] for s in seeds], [vb[s] for s in seeds])
        out.append({**c, "verdict": verdict(ci, sign), "mean_a": statistics.fmean(va[s] for s in seeds),
                    "mean_b": statistics.fmean(vb[s] for s in seeds), "ci": ci})
    fd = lambda n: final(rows, n, "fd", last)
    acc = lambda n: final(rows, n, "class_acc", last)
    auc = lambda n: mean_over_checkpoints(rows, n, "fd", cks)
    for a in prof["arches"]:
        p = lambda m: f"{a}/{m}"
        add(f"DTR lowers FD ({a})", "DTR Table 1", f"FD@{last}", p("dtr"), p("ddpm"), -1, fd(p("dtr")), fd(p("ddpm")),
            paper="ADM, ImageNet 64: FID 4.91 vs 6.34")
        add(f"DTR raises generated-class accuracy ({a})", "DTR Table 1", f"class acc@{last}", p("dtr"), p("ddpm"), +1,
            acc(p("dtr")), acc(p("ddpm")), higher_better=True, paper="ADM, ImageNet 64: IS 82.4 vs 72.1")
        add(f"DTR converges faster ({a})", "DTR Fig. 5", "FD mean over checkpoints", p("dtr"), p("ddpm"), -1,
            auc(p("dtr")), auc(p("ddpm")), paper="DiT-S/B/L: lower FID-10K at every iteration")
        add(f"random routing (R-TR) is worse than DTR ({a})", "DTR Table 1", f"FD@{last}", p("rtr"), p("dtr"), +1,
            fd(p("rtr")), fd(p("dtr")), paper="ADM, ImageNet 64: FID 7.34 vs 4.91")
        add(f"DTR + Min-SNR beats DTR ({a})", "DTR Table 2", f"FD@{last}", p("dtr_minsnr"), p("dtr"), -1,
            fd(p("dtr_minsnr")), fd(p("dtr")), paper="DiT-L/2, ImageNet 256: FID 8.24 vs 8.90")
        add(f"DTR + Min-SNR beats Min-SNR ({a})", "DTR Table 2", f"FD@{last}", p("dtr_minsnr"), p("minsnr"), -1,
            fd(p("dtr_minsnr")), fd(p("minsnr")), paper="DiT-L/2, ImageNet 256: FID 8.24 vs 9.58")
    for t in prof["targets"]:
        for w in weightings_for(prof, t):
            if w != "min_snr":
                a, b = f"unet/{t}/min_snr", f"unet/{t}/{w}"
                add(f"min-SNR-{prof['min_snr_gamma']:g} converges faster than {w} ({t}-prediction)", "Min-SNR Fig. 5",
                    "FD mean over checkpoints", a, b, -1, auc(a), auc(b),
                    paper="ViT-B, ImageNet 256: 3.4x faster to FID 10")
    rest = with_key(rows, common.MT_X["name"], "restoration")
    for m in prof.get("restore_patches", ()):
        per = {s: r["restoration"][str(m)] for s, r in rest.items() if str(m) in r["restoration"]}
        col = lambda row, metric: {s: v[row][metric] for s, v in per.items()}
        paper = common.MT_TABLE1.get(m)
        ours = col("Algorithm 1", "perceptual")
        add(f"Algorithm 1 restores closer to the original than the masked input (Mask-{m})", "MT-Diffusion Table 1",
            "perceptual distance", "Algorithm 1", "Clean-Masked", -1, ours, col("Clean-Masked", "perceptual"),
            needs=(common.MT_X["name"],), paper=paper and f"LPIPS {paper[2]} vs {paper[0]}")
        for t0 in ("T/2", "T/4"):
            sd = f"SDEdit (t0 = {t0})"
            add(f"Algorithm 1 restores closer to the original than SDEdit, t0 = {t0} (Mask-{m})", "MT-Diffusion Table 1",
                "perceptual distance", "Algorithm 1", sd, -1, ours, col(sd, "perceptual"), needs=(common.MT_X["name"],),
                paper=paper and f"LPIPS {paper[2]} vs {paper[1]}")
            add(f"Algorithm 1 changes the visible region less than SDEdit, t0 = {t0} (Mask-{m})", "MT-Diffusion Sec. 4.1",
                "unmasked change", "Algorithm 1", sd, -1, col("Algorithm 1", "unmasked_change"),
                col(sd, "unmasked_change"), needs=(common.MT_X["name"],), paper="restores without changing unmasked regions")
    labs = {s: r["labels"] for s, r in rows.get(common.MT_E["name"], {}).items()}
    for k in prof.get("finetune_steps", ()):
        curve = lambda name: {s: v[name][str(k)]["noised"] for s, v in labs.items() if str(k) in v[name]}
        add(f"MT-Diffusion-E's classifier beats a noise-aware classifier after {k} finetuning steps", "MT-Diffusion Fig. 6",
            "held-out accuracy, noised images", common.MT_E["name"], "noise-aware classifier", +1, curve("mt"),
            curve("baseline"), needs=(common.MT_E["name"],), higher_better=True,
            paper="above ADM's finetuned classifier at every step, 1k-6k (top-1, top-5)")
    jn, de = with_key(rows, "unet/jointnet", "rgb_heldout"), with_key(rows, "unet/direct_extend", "rgb_heldout")
    if jn and de:
        rise = lambda rs: {s: r["rgb_heldout"]["last"] / r["rgb_heldout"]["first"] - 1 for s, r in rs.items()}
        add("Direct Extend forgets RGB more than JointNet", "JointNet Sec. 3 (Fig. 8's samples)",
            "relative rise of the held-out RGB loss", "unet/direct_extend", "unet/jointnet", +1, rise(de), rise(jn),
            paper="Direct Extend loses RGB generation early; JointNet keeps it (samples)")
        add("JointNet's RGB samples are better than Direct Extend's", "JointNet Fig. 8", f"RGB FD@{last}",
            "unet/jointnet", "unet/direct_extend", -1, fd("unet/jointnet"), fd("unet/direct_extend"),
            paper="the same samples (no number)")
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


# -----------------------------------------------------------------------------
# Tables, and the profile end to end

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


def invocation_line(report):
    """The tables' first line: this invocation and the ones that trained the stored units."""
    trained = invocations_note(report.get("invocations", []))
    if report.get("rendered_only"):
        return (f"`{report['command']}`: the tables of the {report['units']} stored units, re-rendered on "
                f"{report['hardware']}; this invocation trained nothing{trained}.")
    return (f"`{report['command']}`; {report['hardware']}; " + (f"{report['parallel']} training processes at once, one "
            "torch thread each; " if report.get("parallel", 1) > 1 else "") + f"this invocation {report['wall_s'] / 60:.1f} min "
            f"({report['units']} units stored in all{trained})."
            + (" **Partial: stopped before the end; the same command continues it.**" if report["stopped"] else ""))


def evidence_markdown(report):
    p, cks, rows = report["profile"], report["profile"]["checkpoints"], report["rows"]
    b = report["baseline"]
    lines = [f"# Evidence ({report['profile_name']} profile)", "", invocation_line(report), "",
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
             f"Verdicts compare two rows seed by seed: the mean paired difference a - b over the n seeds with its "
             f"{interval_name()}, mean ± t(0.975, n - 1) · sd / √n (sd over the seeds' differences; with 3 seeds "
             "t = 4.30, so three differences of one sign need not exclude zero). *holds*: the whole interval is on "
             "the claim's side; *contradicted*: on the other side; *unresolved*: it spans zero. Beside it, the seeds "
             "whose difference lies on the claim's side (k of n); the verdict does not use them.", "",
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
             "## Claims", "", "The paper's own figure stands beside each claim: what was measured at scale, next to "
             "what reproduces here.", "",
             "| claim | source | in the paper | metric | a | b | mean a | mean b | "
             f"a - b [{interval_name()}] | seeds on the claim's side | seeds | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        k_of_n = "{} of {}".format(*c["sign_count"])
        head = f"| {c['claim']} | {c['source']} | {c.get('paper') or '-'} | {c['metric']} | {c['a']} | {c['b']} |"
        if "ci" not in c:
            why = "" if "diverged" not in c else f" (diverged: a in {c['diverged']['a']}, b in {c['diverged']['b']} seeds)"
            lines.append(f"{head} - | - | - | {k_of_n} | {c['n']} | {c['verdict']}{why} |")
            continue
        lines.append(f"{head} {c['mean_a']:.3f} | {c['mean_b']:.3f} | {fmt_ci(c['ci'])} | {k_of_n} | {c['n']} | "
                     f"**{c['verdict']}** |")
    cols = " | ".join(f"FD@{c}" for c in cks)
    lines += ["", "## Rows", "", "Mean ± std over the seeds stored at each checkpoint; seeds: those with every "
              "checkpoint stored (+ those still training). Channel deviation: mean |pixel channel - pixel mean| "
              f"(real images: {report['floor']['channel_dev']:.3f}).", "",
              f"| row | {cols} | class acc | channel dev | sample std | seeds | diverged |", "|---" * (len(cks) + 6) + "|"]
    for name, per_seed in rows.items():
        if not any(isinstance(k, int) or str(k).isdigit() for r in per_seed.values() for k in r):
            continue
        v = lambda m, c: mean_std(list(final(rows, name, m, c).values()))
        div = sum(diverged(r) for r in per_seed.values())
        done = sum(all(c in r for c in cks) or diverged(r) for r in per_seed.values())
        seeds = f"{done}" + (f" (+{len(per_seed) - done})" if len(per_seed) > done else "")
        lines.append(f"| {name} | " + " | ".join(fmt(v('fd', c)) for c in cks) + f" | {fmt(v('class_acc', cks[-1]), 3)} | "
                     f"{fmt(v('channel_dev', cks[-1]), 3)} | {fmt(v('std', cks[-1]), 3)} | {seeds} | {div} |")
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
    lines += common.mt_markdown(p, rows)
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


def evidence_tables(prof, name, args, command, store, scorer, **header):
    """The report of every stored unit (rows, claims, baseline, time to target) and its tables in args.md.
    header: what evidence_markdown's first line says of this invocation (wall_s, parallel, stopped, or
    rendered_only)."""
    rows, names = rows_from_store(prof, store)
    report = dict(profile_name=name, profile=prof, command=command, hardware=common.hardware(),
                  invocations=store.doc.get("invocations", []), units=len(store.doc["units"]), stopped=False,
                  floor=scorer.floor, rows=rows, baseline=baseline_check(prof, rows, scorer),
                  claims=evidence_claims(prof, rows, names), time_to_target=time_to_target(prof, rows))
    report.update(header)
    text = evidence_markdown(report)
    common.write_text(args.md, text)
    runs, stem = getattr(args, "runs", None), os.path.splitext(args.md)[0]
    main_rows = [n for n in ("unet/ddpm", "unet/dtr", "unet/rtr", "unet/minsnr", "unet/dtr_minsnr", "unet/eps/const",
                             "unet/v/min_snr", common.MT_X["name"]) if n in names]
    svg = bench_figures.fd_curves_svg(rows, main_rows, prof["checkpoints"], f"FD against training steps ({name} profile; "
                                      "thick: mean over seeds, thin: each seed)")
    if svg:
        common.write_text(stem + "_fd.svg", svg)
    if runs:  # the runs' checkpoints are not stored: a picture only where they exist
        bench_figures.restoration_figure(prof, runs, stem + "_restoration.png")
    if runs and header.get("rendered_only"):  # samples: drawn by --report alone
        source = {s["name"]: s.get("shared_with", s["name"]) for s in evidence_specs(prof)}
        shown = [n for n in bench_figures.SAMPLE_ROWS if n in source]
        seed = bench_figures.samples_figure(prof, runs, stem + "_samples.png", [source[n] for n in shown])
        if seed is not None:
            print(f"[bench] samples figure: rows {', '.join(shown)}, from the seed-{seed} runs")
    print(text)
    return report


def render_evidence(prof, name, args, command):
    """--report: the tables of a stored evidence profile (args.json) re-rendered into args.md. Trains no row
    and stores nothing; the reference net comes from its cache (trained once if missing, as for every
    profile)."""
    if not os.path.isfile(args.json):
        raise ValueError(f"{args.json} does not exist: there is no stored evidence profile to render")
    store = common.Store(args.json, evidence_settings(prof))
    return evidence_tables(prof, name, args, command, store, common.Scorer(prof, args.cache), rendered_only=True)


def run_evidence(prof, name, args, command):
    """The evidence profile end to end; resumable. Writes args.json (every unit, as it finishes) and args.md
    (the tables of whatever is stored, also when stopped early). With args.parallel > 1, that many worker
    processes (one torch thread each) share the jobs; this process waits for them and writes the tables."""
    t0 = time.time()
    store = common.Store(args.json, evidence_settings(prof))
    stored_before = len(store.doc["units"])
    root = args.runs
    os.makedirs(root, exist_ok=True)
    scorer = common.Scorer(prof, args.cache)  # trains and caches the reference net before any worker starts
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
            argv = [sys.executable, BENCH, f"--{name}", "--worker", f.name, "--threads", "1",
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
    report = evidence_tables(prof, name, args, command, store, scorer, wall_s=time.time() - t0, parallel=args.parallel,
                             stopped=stopped)
    if stopped:
        sys.exit(f"stopped; {report['units']} finished units are in {args.json} and their tables in {args.md}: "
                 "run the same command to continue")
    return report
