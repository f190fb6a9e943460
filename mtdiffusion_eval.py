"""
MT-Diffusion's sample.py modes: joint generation, restoration (Table 1, Fig. 5), label accuracy (Fig. 6)
and translation (Table 4). The math, the model and the loss are in mtdiffusion.py.

    python sample.py --ckpt runs/mt --mode mt-restore     # masked: restoration against SDEdit
    python sample.py --ckpt runs/mtl --mode mt-label      # label: the head against a supervised classifier
    python sample.py --ckpt runs/mtt --mode mt-translate  # translate: map from image, image from map
    python sample.py --ckpt runs/mt --mode mt-joint       # generation from scratch (Algorithm 1)
    python mtdiffusion_eval.py --schedules                # the prior mismatch of every task-weight schedule

Also the method's command line (add_args, prepare_config, unused_flags, resume_keys: hooks of methods.py),
its grid rows (sample_rows) and the two measurements bench.py runs over seeds (restoration_scores, Table
1; label_scores, Fig. 6). Imports: mtdiffusion.py, the base and metrics.py.
"""
import argparse
import copy

import torch

import data
import diffusion
import metrics
import runlib
import shapes
from diffusion import Schedule, q_sample, sdedit_timesteps
from mtdiffusion import (TASKS, WEIGHTS, aggregation_coefs, build_model, mt_sample, patch_mask, prior_kl, q_sample_mt,
                         task_weights)

SAMPLE_MODES = ("mt-joint", "mt-restore", "mt-label", "mt-translate")


# -----------------------------------------------------------------------------
# The method's command line: its train.py flags, their checks and the config they resolve (hooks)

def resume_keys(cfg):
    """The forward process (task weights) and the loss: changing one on --resume would change the experiment."""
    return ("mt_weights", "mt_scale", "mt_lambda", "mt_drop")


def unused_flags(cfg):
    """--mt-head chooses the label head, which only --task label has."""
    if cfg.get("task") == "label":
        return {}
    return {"mt_head": f"chooses the label head of --task label, which --task {cfg.get('task')} does not have; drop it"}


def add_args(p):
    g = p.add_argument_group("MT-Diffusion (--method mtdiff, mtdiffusion.py)")
    g.add_argument("--task", choices=TASKS, default="masked", help="the second modality: a masked copy (Sec. 4.1), "
                   "the label (Sec. 4.2) or the segmentation map (App. E.1)")
    g.add_argument("--mt-variant", choices=["U", "X"],
                   help="noise predictor eps(z_t, t) or eps(z_t, X, t); default X, U for labels")
    g.add_argument("--mt-head", choices=["M", "E"], default="M",
                   help="label head: MLP on the middle block, or classifier on the output")
    g.add_argument("--mt-weights", choices=WEIGHTS, default="sigma", help="task-weight schedule w_t (mtdiffusion.py)")
    g.add_argument("--mt-scale", type=runlib.ranged(float, 0), default=1.0, help="the constant c of the task-weight schedule")
    g.add_argument("--mt-lambda", type=runlib.ranged(float, 0), default=0.1, help="weight lambda of the modality loss (Eq. 6)")
    g.add_argument("--mt-drop", type=runlib.ranged(float, 0, 1), default=0.2,
                   help="share of samples trained with x unknown (the single-task model)")


def prepare_config(cfg):
    if cfg["mt_variant"] is None:
        cfg["mt_variant"] = "U" if cfg["task"] == "label" else "X"
    if cfg["task"] == "label":
        if cfg["num_classes"] < 2:
            raise runlib.RunError("--task label needs labelled data with at least 2 classes and --class-cond 1")
        if cfg["mt_variant"] == "X":
            raise runlib.RunError("--task label needs --mt-variant U: with X the head could read the label from the input")
    else:  # masked and translate model the image without class conditioning; through class_cond, so that
        cfg["class_cond"], cfg["num_classes"] = 0, 0  # a resume, which re-reads the data, agrees
    if cfg["task"] == "translate":
        if cfg["data"] != "shapes":
            raise runlib.RunError("--task translate needs segmentation maps: use --data shapes")
        cfg["seg_classes"] = shapes.SEG_CLASSES


def add_sample_args(p):
    p.add_argument("--mt-patches", type=int, nargs="+", default=[5, 10, 15, 20], help="mt-restore: patches per image")
    p.add_argument("--mt-sdedit", type=runlib.finite_float, default=0.5,
                   help="mt-restore: SDEdit starts at the first sampling step at or below this fraction of T")


def chunked(fn, size, *xs):
    """fn over slices of `size` rows of every x; returns each of fn's outputs concatenated."""
    outs = [fn(*(x[i:i + size] for x in xs)) for i in range(0, len(xs[0]), size)]
    return [torch.cat(o) for o in zip(*outs)]


def train_classifier(cfg, device, noised=False):
    """Fig. 6's baselines: the same backbone and label head trained by cross-entropy, with the run's steps,
    batch, learning rate, warm-up, gradient clipping and EMA; on clean images (t = 0), or with noised=True
    on x_t = q_sample(x_0, t) at t ~ U{0..T-1}, the timesteps the label head sees in training (the matched
    baseline: the same inputs, no diffusion loss, no label code in z_t)."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(device).train()
    ema = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = Schedule.make(cfg["schedule"], cfg["T"]).to(device)
    ds = data.build_dataset(cfg["data"], cfg["image_size"], "train", cfg["seed"], cfg["in_channels"])
    batches = runlib.ResumableBatches(len(ds), cfg["batch_size"], cfg["seed"])
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=batches))
    for step in range(cfg["steps"]):
        b = next(loader)
        x0, y = b["image"].to(device), b["label"].to(device)
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))
        t = torch.randint(0, sched.T, (len(x0),), device=device) if noised else torch.zeros_like(y)
        x_t = q_sample(sched, x0, t, torch.randn_like(x0)) if noised else x0           # (B, C, H, W)
        metrics.supervised_step(opt, model(x_t, t)[1], y, params, cfg["grad_clip"])
        runlib.update_ema(ema, model, min(cfg["ema_decay"], (2 + step) / (11 + step)))
    return ema


def restore_table(model, sched, sample, x0, args, out):
    """Table 1 without LPIPS: restoration of held-out images with m patches masked, against the masked
    input itself and an SDEdit baseline run with the same model (noised to t0, then Algorithm 1).
    t0 is the first step of the --steps sampler at or below --mt-sdedit (T - 1): the input is noised to
    exactly the level the sampler starts from."""
    B, g = args.batch, torch.Generator().manual_seed(args.seed)
    t0 = sdedit_timesteps(sched.T, args.steps or 50, int(args.mt_sdedit * (sched.T - 1)))[0]
    print(f"restoration of {len(x0)} held-out images: MSE in the masked region / change in the unmasked region")
    for m in args.mt_patches:
        M = patch_mask(torch.full((len(x0),), m), x0.shape[-1], g).to(x0)              # (N, 1, S, S)
        xm = x0 * (1 - M)                                                                # the masked input
        t = torch.full((len(x0),), t0, device=x0.device)
        z_sd = q_sample_mt(sched, model.alpha_tilde, xm, t, torch.randn(xm.shape, generator=g).to(x0), xm)
        rows = {"clean vs masked": xm,
                f"SDEdit from t={t0}": chunked(lambda a, z: sample(len(a), x=a, z_start=z, t_start=t0), B, xm, z_sd)[0],
                "MT-Diffusion (Alg. 1)": chunked(lambda a: sample(len(a), x=a), B, xm)[0],
                "MT-Diffusion + paste": chunked(lambda a, k: sample(len(a), x=a, z0=a, known=k), B, xm, 1 - M)[0]}
        for name, r in rows.items():
            err, chg = metrics.masked_region_mse(r, x0, M).mean().item(), metrics.unmasked_change(r, x0, M).mean().item()
            print(f"  m={m:2d}  {name:24s} {err:.4f} / {chg:.4f}")
        runlib.save_grid([x0[:8], xm[:8], rows["MT-Diffusion (Alg. 1)"][:8]], f"{out}_m{m}.png")
    print(f"wrote original / masked / restored rows to {out}_m*.png")


def label_accuracy(model, cfg, x0, y, args, device):
    """Fig. 6: the label head's accuracy on held-out images (read_modality) against two supervised
    classifiers of the same backbone and head trained for the same steps (train_classifier)."""
    def acc(net):
        return (chunked(lambda a: [read_modality(net, a)], args.batch, x0)[0].argmax(1) == y).float().mean().item()
    ours = acc(model)
    print(f"training the two supervised baselines for {cfg['steps']} steps each ...")
    with torch.enable_grad():
        noised, clean = acc(train_classifier(cfg, device, noised=True)), acc(train_classifier(cfg, device))
    print(f"label accuracy on {len(y)} held-out images: MT-Diffusion-{cfg['mt_head']} {ours:.4f}; the same network "
          f"trained by cross-entropy over uniform t {noised:.4f}, on clean images {clean:.4f}")


def translate_table(model, sample, x0, seg, K, args, out):
    """Table 4: per-pixel accuracy and class IoU of the maps read from held-out images (the head at t = 0);
    and images generated from the given maps (Algorithm 1)."""
    B = args.batch
    pred = chunked(lambda a: [read_modality(model, a)], B, x0)[0].argmax(1)
    z = chunked(lambda s: sample(len(s), x=s)[:1], B, seg)[0]                       # the image from the map
    print(f"map from image, {len(x0)} held-out images: per-pixel accuracy {metrics.pixel_accuracy(pred, seg):.4f}, "
          f"class IoU {metrics.mean_iou(pred, seg, K):.4f} (all background: {metrics.pixel_accuracy(torch.zeros_like(seg), seg):.4f})")
    runlib.save_grid([show(model, seg[:8])[0], z[:8], x0[:8], show(model, pred[:8])[0]], out + ".png")
    print(f"wrote rows map / image from the map / true image / map from the image to {out}.png")


@torch.no_grad()
def run_sample_mode(mode, model, sched, cfg, args, out, device):
    if cfg["method"] != "mtdiff":  # another method's network has no modality head to sample or read
        raise ValueError(f"--mode {mode} needs a run of --method mtdiff, but this one is --method {cfg['method']}; "
                         "sample it with the default --mode generate")
    need = {"mt-restore": "masked", "mt-label": "label", "mt-translate": "translate"}.get(mode, cfg["task"])
    if cfg["task"] != need:
        raise ValueError(f"--mode {mode} needs a run trained with --task {need}; this one has --task {cfg['task']}")
    if min(args.mt_patches) < 0 or not 0 < args.mt_sdedit <= 1:
        raise ValueError("--mt-patches must be >= 0 and --mt-sdedit in (0, 1]")
    g = torch.Generator(device).manual_seed(args.seed)
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    def sample(n, **kw):
        return mt_sample(model, sched, (n, *shape), args.steps or 50, args.eta, target=cfg["target"], generator=g,
                         device=device, **kw)
    if mode == "mt-joint":  # generation from scratch
        z, x = chunked(lambda i: sample(len(i)), args.batch, torch.arange(args.n))
        runlib.save_grid([z[:8], *show(model, x[:8])], out + ".png")
        torch.save({"images": torch.from_numpy(runlib.to_uint8(z)), "modality": x.cpu()}, out + ".pt")
        print(f"wrote {len(z)} joint samples to {out}.pt and a grid to {out}.png")
        return
    b = runlib.held_out_items(cfg, args.n, device)
    if mode == "mt-restore":
        restore_table(model, sched, sample, b["image"], args, out)
    elif mode == "mt-label":
        label_accuracy(model, cfg, b["image"], b["label"], args, device)
    else:
        translate_table(model, sample, b["image"], b["seg"], cfg["seg_classes"], args, out)


# -----------------------------------------------------------------------------
# The paper's two measurements as functions of trained models (bench_evidence.py runs them over seeds)

RESTORE_PATCHES = (5, 10, 15, 20)  # Table 1's Mask-m


def table1_mask(n, size, m):
    """(n, 1, S, S) masks of m patches of side S/4, the same for every row and seed (a fixed generator per m)."""
    return patch_mask(torch.full((n,), m), size, torch.Generator().manual_seed(1000 + m))


def table1_restorers(model, cfg, base, bcfg, sched, steps):
    """{row: restore(masked images, known (bool, like them), generator)} of restoration_scores' rows:
    Algorithm 1 with the MT-Diffusion model, SDEdit and replacement with the unconditional `base`, all
    ancestral (eta 1) on `steps` respaced timesteps."""
    T = sched.T
    def alg1(xm, keep, g, paste=False):
        kw = dict(z0=xm, known=keep[:, :1].float()) if paste else {}
        return mt_sample(model, sched, xm.shape, steps, 1.0, x=xm, target=cfg["target"], generator=g,
                         device=xm.device, **kw)[0]
    def sdedit(xm, keep, g, t0, replace=False):
        return diffusion.sdedit(lambda x, t: base(x, t), sched, xm, t0, steps, bcfg["target"], 1.0,
                                keep if replace else None, g)
    return {"Clean-Masked": lambda xm, keep, g: xm,
            "SDEdit (t0 = T/2)": lambda xm, keep, g: sdedit(xm, keep, g, T // 2),
            "SDEdit (t0 = T/4)": lambda xm, keep, g: sdedit(xm, keep, g, T // 4),
            "Algorithm 1": alg1,
            "Algorithm 1 + paste": lambda xm, keep, g: alg1(xm, keep, g, paste=True),
            "replacement": lambda xm, keep, g: sdedit(xm, keep, g, T - 1, replace=True)}


@torch.no_grad()
def restoration_scores(model, cfg, base, bcfg, sched, x0, net, patches=RESTORE_PATCHES, steps=100, seed=0,
                       batch=64):
    """Table 1 as the paper measures it: held-out images x0 (N, C, S, S) with m patches of side S/4 hidden
    (the same masks for every row and seed: drawn from a fixed generator per m), restored by

        Clean-Masked          the masked input itself (the paper's reference row)
        SDEdit (t0 = T/2), SDEdit (t0 = T/4)   SDEdit (Meng et al. 2022) with `base`, a single-task
                              unconditional model of the same recipe: the masked image noised to t0, then
                              ancestral steps (eta 1) down to 0
        Algorithm 1           MT-Diffusion given the masked image as its modality, ancestral steps (eta 1)
                              from z_T ~ N(0, I), nothing pasted
        Algorithm 1 + paste, replacement      extra rows: the known pixels forward-noised into z_t at every
                              step (MT-Diffusion), and replacement inpainting with `base` (not in Table 1)

    Scores per image, averaged: perceptual (LPIPS's formula in the reference CNN `net`'s features, the
    stand-in for LPIPS), masked_mse (the hidden region against the original) and unmasked_change (the
    visible region against the input). Every row draws its noise from a generator seeded with `seed`.
    Returns {m: {row: {perceptual, masked_mse, unmasked_change}}}.
    """
    methods = table1_restorers(model, cfg, base, bcfg, sched, steps)
    scores = {}
    for m in patches:
        M = table1_mask(len(x0), x0.shape[-1], m).to(x0)                        # (N, 1, S, S)
        xm, keep = x0 * (1 - M), (M == 0).expand_as(x0)                          # the masked input, known pixels
        rows = {}
        for name, restore in methods.items():
            g = torch.Generator(x0.device).manual_seed(seed)
            r = chunked(lambda a, k: [restore(a, k, g)], batch, xm, keep)[0].clamp(-1, 1)   # (N, C, S, S)
            rows[name] = {"perceptual": metrics.perceptual_distance(net, r, x0).mean().item(),
                          "masked_mse": metrics.masked_region_mse(r, x0, M).mean().item(),
                          "unmasked_change": metrics.unmasked_change(r, xm, M).mean().item()}
        scores[m] = rows
    return scores


def noised_accuracy(model, x0, y, t, eps, sched, batch=256):
    """Held-out accuracy of a label head on x_t = q_sample(x0, t, eps) at given (t, eps) (Fig. 6's noised
    validation images; t = 0: the clean images)."""
    model.eval()
    with torch.no_grad():
        logits = chunked(lambda a, b, c: [model(q_sample(sched, a, b, c), b)[1]], batch, x0, t, eps)[0]
    return (logits.argmax(1) == y).float().mean().item()


def finetune_accuracies(model, cfg, sched, steps_at, evaluate, lr=3e-4, seed=0):
    """Fig. 6's finetuning: continue training a copy of `model` (its backbone and label head) by noised
    cross-entropy, x_t = q_sample(x0, t, eps) with t ~ U{0..T-1}, the guided-diffusion classifier recipe
    (AdamW at lr, the run's batch size and gradient clipping, no EMA); returns {K: evaluate(copy)} after K
    steps for every K in steps_at. Batches and draws come from `seed`, the same for every model."""
    model = copy.deepcopy(model).requires_grad_(True).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    ds = data.build_dataset(cfg["data"], cfg["image_size"], "train", seed)
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=runlib.ResumableBatches(len(ds), cfg["batch_size"], seed)))
    g, device, scores = torch.Generator().manual_seed(seed), next(model.parameters()).device, {}
    for k in range(1, max(steps_at) + 1):
        b = next(loader)
        x0, y = b["image"].to(device), b["label"].to(device)
        t = torch.randint(0, sched.T, (len(x0),), generator=g).to(device)
        x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=g).to(device))   # (B, C, H, W)
        metrics.supervised_step(opt, model(x_t, t)[1], y, params, cfg["grad_clip"])
        if k in steps_at:
            scores[k] = evaluate(model)
            model.train()
    return scores


def label_scores(model, cfg, sched, x0, y, finetune_steps=(250, 500, 1000, 2000), seed=0, lr=3e-4):
    """Fig. 6 as the paper measures it: the MT-Diffusion-E run's classifier and a noise-aware classifier
    (the same network trained by noised cross-entropy alone, for as many steps as the MT run: the
    stand-in for ADM's pretrained classifier), each finetuned by noised cross-entropy for K steps (the
    same batches and draws), scored on held-out images x0, y at fixed shared draws of (t, eps), and at
    t = 0. Returns {"mt": {K: {"noised", "clean"}}, "baseline": {...}}, K = 0 the models before finetuning."""
    device = x0.device
    g = torch.Generator().manual_seed(12345)  # the same held-out draws for every model, seed and K
    t = torch.randint(0, sched.T, (len(x0),), generator=g).to(device)
    eps = torch.randn(x0.shape, generator=g).to(x0)
    def evaluate(net):
        return {"noised": noised_accuracy(net, x0, y, t, eps, sched),
                "clean": noised_accuracy(net, x0, y, torch.zeros_like(t), eps, sched)}
    with torch.enable_grad():
        baseline = train_classifier(cfg, device, noised=True)
    out = {}
    for name, net in (("mt", model), ("baseline", baseline)):
        out[name] = {0: evaluate(net)}
        with torch.enable_grad():
            out[name].update(finetune_accuracies(net, cfg, sched, finetune_steps, evaluate, lr, seed))
    return out


def read_modality(model, x0):
    """p_theta(x | z_0) on a given clean image at t = 0 with x unknown: the head as classifier or segmenter."""
    return model(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device))[1]


def show(model, x):
    """Grid rows that draw a modality: the masked image, a map in its class colours; labels draw nothing."""
    if model.task == "label":
        return []
    return [x if model.task == "masked" else model.encode(x.argmax(1) if x.is_floating_point() else x)]


def sample_rows(model, sched, cfg, n, generator, device):
    """Joint generation from scratch (Algorithm 1): images, and the estimated modality where it is drawable."""
    shape = (n, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    z, x = mt_sample(model, sched, shape, cfg["sample_steps"], target=cfg["target"], generator=generator, device=device)
    return [z] + show(model, x)


def schedule_for_table(noise, T):
    """The noise schedule of --schedules, or one sentence (ValueError) when T is too short for it: the
    linear schedule keeps its end points for any T by scaling every beta by 1000 / T, so its last beta,
    0.02 x 1000 / T, passes 1 below T = 20."""
    try:
        return Schedule.make(noise, T)
    except ValueError:
        raise ValueError(f"--T {T} is too short for the {noise} noise schedule (its betas would pass 1); "
                         "use --T 20 or more, or --noise cosine") from None


def print_schedules(noise="linear", T=1000, scale=1.0):
    """The prior mismatch L_0 of every task-weight schedule, with |z_0| = |E| = 1 per dimension."""
    sched, one = schedule_for_table(noise, T), torch.ones(1, 1)
    print(f"{noise} noise schedule, T = {T}, c = {scale}, |z_0| = |E| = 1 per dimension")
    print(f"{'weights':8s} {'max w_t':>10s} {'at_T':>10s} {'L_0 / dim':>10s} {'L_0 3x32x32':>12s} {'mean SNR_E':>11s}")
    for name in WEIGHTS:
        w = task_weights(name, sched, scale)
        at = aggregation_coefs(sched.alphas, w)
        kl = prior_kl(sched, at, one, one).item()
        snr_e = (at.pow(2) / (1 - sched.alpha_bar)).mean().item()   # the modality's SNR in z_t, mean over t
        print(f"{name:8s} {w.max().item():10.3g} {at[-1].item():10.3g} {kl:10.3g} {3072 * kl:12.3g} {snr_e:11.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", action="store_true", help="print the prior mismatch of the task weights")
    parser.add_argument("--noise", choices=["linear", "cosine"], default="linear")
    parser.add_argument("--T", type=runlib.ranged(int, 2), default=1000, help="number of timesteps (at least 2)")
    parser.add_argument("--scale", type=runlib.ranged(float, 0), default=1.0)
    args = parser.parse_args(argv)
    if not args.schedules:
        parser.print_help()
    else:
        try:
            print_schedules(args.noise, args.T, args.scale)
        except ValueError as e:  # bad input: one line, no traceback
            parser.error(str(e))


if __name__ == "__main__":
    main()
