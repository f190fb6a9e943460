"""
The evidence: does each paper's claim hold at small scale, and what does each method cost?

    python bench.py --recipe     # which shared settings make the plain ddpm baseline learn fastest on a CPU
    python bench.py --default-run    # `python train.py` itself, 3 seeds: its time, its scores with eta 0 and 1
    python bench.py --glyphs         # the same on a small grayscale data set of drawn digits (16 px, one seed)
    python bench.py --cpu        # the evidence profile: every row x 5 seeds, paired verdicts; resumable
    python bench.py --cpu --report   # its tables re-rendered from results/bench_cpu.json; trains nothing
    python bench.py --quick      # a smoke of every row (16px, 400 steps, one seed): checks, not evidence
    python bench.py --full       # one GPU, overnight: 32px, 10k steps, three seeds
    python bench.py --tiny       # a few steps of everything: checks that the pipeline runs (the tests use it)
    python bench.py --only speed     # every method's training images/s and the samplers' (the Cost table)
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
    mtdiff      as the MT-Diffusion paper measures it, with v-prediction + min-SNR-5 for the MT rows and
                their baselines: variant X restores held-out images with m = 5..20 patches hidden by
                Algorithm 1 (ancestral, nothing pasted) against Clean-Masked and SDEdit from an
                unconditional model (Table 1; a perceptual distance in the reference CNN's features
                stands in for LPIPS); MT-Diffusion-E's classifier finetuned by noised cross-entropy
                against a noise-aware classifier finetuned alike (Fig. 6)
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
work of one 2-thread training. Every --cpu row uses the recipe the study chose with gradient clipping
off (the MT-Diffusion rows and their baselines: v-prediction + min-SNR-5); each claim compares two rows seed by seed (same seeds, same evaluation noise): the
mean paired difference with its 95% paired t-interval over seeds and a verdict from that interval,
holds / contradicted / unresolved (the interval spans zero), beside the number of seeds whose difference
lies on the claim's side. Scores: FD, generated-class accuracy (ceiling: the reference CNN on held-out
real images, floor: chance) and colour statistics, each beside its real-data value. `--cpu --report`
reads the stored units (--json) and rewrites only their tables (--md): no row is trained, nothing is
stored.

Differences from the papers: tiny models, 16-32px synthetic images and minutes of training instead of
ImageNet and days; FD and the restoration's perceptual distance in a reference CNN's features (not
Inception, not LPIPS's VGG). A claim that does
not reproduce here says something about this scale, not necessarily about the paper.

The command line is this file; each job is its own module: bench_evidence.py (--cpu), bench_recipe.py
(--recipe, --default-run), bench_figures.py (the evidence's FD plot, restoration and samples figures), bench_timing.py (the timings, --only, --gpu-check), bench_report.py (--tiny, --quick, --full),
and bench_common.py what they share (the profiles, training through train.py, scoring, the store).
This file imports the job modules and bench_common.py only.
"""
import argparse
import copy
import json
import os
import sys

import torch

import bench_common as common
import bench_evidence as evidence
import bench_recipe as recipe
import bench_report as report
import bench_timing as timing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    for name in common.PROFILES:
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
    p.add_argument("--only", choices=["speed", "routing", "compile"], help="run one section: 'speed' times every method's training "
                   "steps and the samplers, 'routing' times DTR's cost (minutes on a CPU), 'compile' times torch.compile "
                   "against eager training (compiling takes minutes on a CPU)")
    p.add_argument("--report", action="store_true", help="--cpu: re-render the tables (--md) of the stored units "
                   "(--json) without training or storing anything")
    p.add_argument("--default-run", action="store_true", help="train `python train.py` (its defaults) with 3 seeds, "
                   "time it and score its samples with eta 0 and eta 1 (results/default_cpu.json and .md; resumable)")
    p.add_argument("--glyphs", action="store_true", help="the same on a small grayscale data set of drawn digits, "
                   "written into the runs folder (results/glyphs_cpu.json and .md; resumable)")
    p.add_argument("--gpu-check", action="store_true", help="every method for a few steps on CUDA with bf16 and "
                   "--compile, resumed and sampled (about 5 minutes on one GPU); without CUDA it says so and exits 0")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            sys.exit(f"error: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = args.profile or "quick"
    prof = copy.deepcopy(common.PROFILES[name])
    if args.worker:
        with open(args.worker) as f:
            prof = json.load(f)
    if args.seeds:
        prof["seeds"] = tuple(args.seeds)
    if name != "cpu" and (args.parallel not in (None, 1) or args.worker):
        sys.exit("error: --parallel applies to --cpu only")
    if args.report and name != "cpu":
        sys.exit("error: --report applies to --cpu only")
    if args.parallel is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.parallel = min(cores, 8) if name == "cpu" else 1
    elif args.parallel < 1:
        sys.exit(f"error: --parallel must be at least 1, got {args.parallel}")
    command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    default_json = "results/default_cpu.json" if args.default_run else "results/glyphs_cpu.json" if args.glyphs else {
        "cpu": "results/bench_cpu.json", "recipe": "results/recipe_cpu.json"}.get(name, "bench.json")
    args.json = args.json or default_json
    args.md = args.md or os.path.splitext(args.json)[0] + ".md"
    args.runs = args.runs or os.path.join("runs", "bench-default" if args.default_run else "bench-glyphs" if args.glyphs
                                          else f"bench-{name}")
    command = command.strip()
    try:
        if args.gpu_check:
            return timing.gpu_check()
        if args.default_run:
            return recipe.default_run(args, command)
        if args.glyphs:
            return recipe.default_run(args, command, recipe.GLYPHS_RUN)
        if name == "cpu" and args.report:
            return evidence.render_evidence(prof, name, args, command)
        if name == "cpu":
            return evidence.run_evidence(prof, name, args, command)
        if name == "recipe":
            return recipe.recipe_study(prof, name, args, command)
        if args.only:
            return timing.timing_only(prof, name, args, command, args.only)
        return report.run_report(prof, name, args, command)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
