"""
The evidence profile's pictures, drawn without plotting libraries: FD against training steps as an SVG
(a small line-plot writer), MT-Diffusion's restorations and a few rows' samples as PNG grids
(runlib.save_grid).

    python bench.py --cpu --report    # rewrites results/bench_cpu_fd.svg with the tables, and the
                                      # restoration and samples figures when their runs are in the runs folder

Imports: bench_common.py and the project's library files.
"""
import math
import os
from xml.sax.saxutils import escape

import torch
from PIL import Image

import bench_common as common
import methods
import mtdiffusion_eval
import runlib

# A colour-blind-safe palette (Okabe & Ito), one colour per row.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    start = math.floor(lo / step) * step
    return [round(start + i * step, 10) for i in range(int(math.ceil((hi - start) / step)) + 1)]


def line_plot_svg(series, title, xlabel, ylabel, width=780, height=440):
    """An SVG line plot. series: [(label, [(x, y), ...], style)] with style {"colour", "width", "dash",
    "opacity", "legend"}; the legend lists the series whose style has legend=True."""
    pts = [p for _, xy, _ in series for p in xy]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(0.0, max(ys))
    left, right, top, bottom = 64, 250, 40, 52
    pw, ph = width - left - right, height - top - bottom
    X = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0] or 1) * pw
    Y = lambda y: top + ph - (y - yt[0]) / (yt[-1] - yt[0] or 1) * ph
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>']
    for t in xt:
        out.append(f'<line x1="{X(t):.1f}" y1="{top}" x2="{X(t):.1f}" y2="{top + ph}" stroke="#ddd"/>'
                   f'<text x="{X(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    for t in yt:
        out.append(f'<line x1="{left}" y1="{Y(t):.1f}" x2="{left + pw}" y2="{Y(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>'
               f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>'
               f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    legend = 0
    for label, xy, st in series:
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in xy)
        dash = f' stroke-dasharray="{st["dash"]}"' if st.get("dash") else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{st["colour"]}" stroke-width="{st.get("width", 2)}" '
                   f'stroke-opacity="{st.get("opacity", 1)}"{dash}/>')
        if st.get("legend"):
            y = top + 10 + 18 * legend
            out.append(f'<line x1="{left + pw + 12}" y1="{y}" x2="{left + pw + 36}" y2="{y}" stroke="{st["colour"]}" '
                       f'stroke-width="{st.get("width", 2)}"{dash}/><text x="{left + pw + 42}" y="{y + 4}">{escape(label)}</text>')
            legend += 1
    return "\n".join(out + ["</svg>"]) + "\n"


def fd_curves_svg(rows, names, checkpoints, title):
    """FD against training steps for the rows `names` of an evidence profile's rows ({name: {seed: {step:
    scores}}}): the mean over seeds as a thick line, every seed as a thin one; rows without all
    checkpoints stored for a seed leave that seed out."""
    series = []
    for i, name in enumerate(n for n in names if n in rows):
        colour = COLOURS[i % len(COLOURS)]
        per_seed = {s: [(c, r[c]["fd"]) for c in checkpoints] for s, r in rows[name].items()
                    if all(isinstance(r.get(c), dict) and r[c].get("fd") is not None for c in checkpoints)}
        for s, xy in sorted(per_seed.items()):
            series.append((f"{name} seed {s}", xy, dict(colour=colour, width=1, opacity=0.35)))
        if per_seed:
            mean = [(c, sum(xy[j][1] for xy in per_seed.values()) / len(per_seed)) for j, c in enumerate(checkpoints)]
            series.append((f"{name} ({len(per_seed)} seeds)", mean, dict(colour=colour, width=3, legend=True)))
    return line_plot_svg(series, title, "training steps", "FD (reference CNN features)") if series else None


def save_enlarged(rows, path, ncol, scale=4):
    """runlib.save_grid, then enlarged scale x pixel for pixel: 16 px images are too small to be seen."""
    runlib.save_grid(rows, path, ncol=ncol)
    with Image.open(path) as im:
        im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


@torch.no_grad()
def restoration_figure(prof, runs, path, seed=0, m=10, n=6):
    """Table 1 as a picture: for n held-out images with m patches hidden, rows original / masked / SDEdit
    (t0 = T/2, the unconditional model) / Algorithm 1 (MT-Diffusion-X), from the seed's runs of the evidence
    profile; written to path. Returns False (and writes nothing) when those runs are not in `runs`."""
    ckpt = lambda spec: os.path.join(common.run_dir(runs, spec["name"], seed), "checkpoint.pt")
    if not all(os.path.isfile(ckpt(s)) for s in (common.MT_X, common.MT_UNCOND)):
        return False
    model, cfg, sched = methods.load_run(ckpt(common.MT_X), device=common.DEVICE)
    base, bcfg, _ = methods.load_run(ckpt(common.MT_UNCOND), device=common.DEVICE)
    x0 = common.held_out(prof["image_size"], n)["image"]
    M = mtdiffusion_eval.table1_mask(n, x0.shape[-1], m).to(x0)                 # as restoration_scores masks them
    xm, keep = x0 * (1 - M), (M == 0).expand_as(x0)
    restore = mtdiffusion_eval.table1_restorers(model, cfg, base, bcfg, sched, prof["eval_steps"])
    rows = [restore[r](xm, keep, torch.Generator(common.DEVICE).manual_seed(seed)).clamp(-1, 1)
            for r in ("SDEdit (t0 = T/2)", "Algorithm 1")]
    save_enlarged([x0, xm, *rows], path, ncol=n)
    return True


# The samples figure's rows, by weighting: eps with SNR weight (the ddpm loss), eps constant, eps min-SNR-5,
# v min-SNR-5 (a profile draws those it has, each from the run it shares).
SAMPLE_ROWS = ("unet/eps/snr", "unet/eps/const", "unet/eps/min_snr", "unet/v/min_snr")


@torch.no_grad()
def samples_figure(prof, runs, path, names, n=8):
    """Held-out images and the final checkpoint's samples of the runs `names`, one row of the picture each:
    the lowest seed whose runs are all in `runs` at the profile's last checkpoint, DDIM with the profile's
    evaluation steps and eta, the same noise for every row (bench_common.generate), classes cycling across
    the columns; the held-out row shows a held-out image of each column's class. Returns that seed, or None
    (and writes nothing) when no seed has all the runs."""
    last = prof["checkpoints"][-1]
    have = lambda seed: all(common.saved_step(common.run_dir(runs, r, seed)) == last for r in names)
    seed = next((s for s in prof["seeds"] if have(s)), None)
    if seed is None:
        return None
    grid = []
    for r in names:
        model, cfg, sched = methods.load_run(os.path.join(common.run_dir(runs, r, seed), "checkpoint.pt"), device=common.DEVICE)
        x, labels = common.generate(model, sched, cfg, n, prof["eval_steps"], seed, prof["eval_eta"])
        grid.append(x.clamp(-1, 1))
    real = common.held_out(prof["image_size"], 16 * n)
    pick = list(range(n))                      # unconditional rows: the first n held-out images
    if labels is not None:                     # else the first unused held-out image of each column's class
        held = real["label"].tolist()
        pick = []
        for c in labels.tolist():
            pick.append(next(i for i, y in enumerate(held) if y == c and i not in pick))
    save_enlarged([real["image"][pick].cpu(), *grid], path, ncol=n)
    return seed
