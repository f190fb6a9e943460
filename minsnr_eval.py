"""
The Pareto analysis of Min-SNR (Sec. 3.2, Eq. 10-13, Figure 4): timestep bins as tasks, their loss
gradients, and the weights that make the bins' gradients least in conflict. The weights themselves
are in minsnr.py.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (ICCV)

What is here:
    bin_gradients         the gradient of the loss of each of K timestep bins: the "tasks" of Sec. 3.2
    pareto_weights        Eq. 10/11 solved by Frank-Wolfe on the simplex, as in MGDA (Sener & Koltun
                          2018), with the exact line search of the two-point problem
    pareto_weights_ugd    the same problem through the softmax re-parameterisation of Eq. 12-13 (UGD)
    the CLI               the paper's Figure 4 as a table (the Eq. 11 objective of each fixed strategy
                          beside the optimum, on one batch), and the weight curves as numbers

Run:
    python minsnr_eval.py --ckpt runs/minsnr/checkpoint.pt
    python minsnr_eval.py --fresh --arch unet --model unet-cpu --image-size 32
A fresh UNet or DiT has a zero-initialised output layer, so only that layer gets a gradient: --fresh
checks the machinery, a trained checkpoint gives the paper's picture. --params 'out.' (UNet) or
'final_layer.' (DiT) restricts the gradients to the last layers when K x P would not fit in memory.

Imports: minsnr.py, the base, and the registry (methods.load_run, to load a run of any method).

Differences from the paper: the tasks are K timestep bins (deciles by default) instead of all T
timesteps; a fixed strategy's weight of a bin is its mean over the bin's timesteps, and the K bin
weights are divided by their sum so that they lie on the simplex of Eq. 10. lambda of Eq. 11 is a flag
(default 0, i.e. Eq. 10) because the paper does not state its value. The gradients come from one batch.
"""
import argparse
import math
import sys
import warnings

import torch

import data
import diffusion
import methods
import runlib
from dit import build_dit
from minsnr import STRATEGIES, TARGETS, loss_weight, snr_of_alpha_bar
from unet import build_unet


# -----------------------------------------------------------------------------
# Timestep bins as tasks (Sec. 3.2) and their gradients

def timestep_bins(T, bins=10):
    """Edges (K+1,) of K bins [e_k, e_{k+1}) of integer timesteps; an int K gives equal widths (10: deciles)."""
    if isinstance(bins, int):
        if not 1 <= bins <= T:
            raise ValueError(f"the number of timestep bins must be in [1, T={T}], got {bins}")
        return torch.linspace(0, T, bins + 1, dtype=torch.float64).round().long()
    edges = torch.as_tensor(bins).long()
    if edges.ndim != 1 or len(edges) < 2 or edges[0] < 0 or edges[-1] > T or (edges.diff() <= 0).any():
        raise ValueError(f"bin edges must be an increasing sequence of at least two integers in [0, {T}]")
    return edges


def select_params(model, prefixes=None):
    """The trainable parameters whose names start with one of `prefixes` (None or empty: all of them)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if prefixes:
        chosen = [p for n, p in named if n.startswith(tuple(prefixes))]
        if not chosen:
            tops = sorted({n.split(".")[0] + "." for n, _ in named})
            raise ValueError(f"no trainable parameter name starts with {list(prefixes)}; top-level names: "
                             f"{', '.join(tops)}")
        return chosen
    return [p for _, p in named]


def bin_gradients(model, sched, batch_x0, target, bins=10, params=None, noise=None, model_kwargs=None,
                  generator=None, model_target=None):
    """Rows g_k of Eq. 10-11: the gradient of the unweighted loss of timestep bin k, a (K, P) tensor.

    Each image of the batch gets its own timestep, uniform inside the bin; every bin reuses one noise
    draw (`noise`, or drawn from `generator`), so the rows differ by timestep only. params: the tensors
    to differentiate (default every trainable parameter; a subset such as the last layers keeps K x P
    small); P is their total size. The model is used in the mode it is in (eval(): no dropout).
    model_target: what the network predicts, when it is not `target`. Its output is then converted
    (diffusion.split_prediction) into `target` before the MSE, so an eps-prediction model's loss "in x0"
    is its real x0 error ||x0 - x0_hat||^2, not its raw output compared with x0.
    """
    for name in (target, model_target or target):
        if name not in TARGETS:
            raise ValueError(f"unknown prediction target {name!r}: choose one of {', '.join(TARGETS)}")
    params = select_params(model) if params is None else list(params)
    edges = timestep_bins(sched.T, bins).tolist()
    x0 = batch_x0.float()                                                       # (B, C, H, W)
    eps = torch.randn(x0.shape, generator=generator).to(x0) if noise is None else noise.to(x0)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = torch.randint(lo, hi, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
        with torch.enable_grad():
            if model_target in (None, target):
                loss, _ = diffusion.diffusion_loss(model, sched, x0, t, target, noise=eps, model_kwargs=model_kwargs)
            else:
                loss = converted_loss(model, sched, x0, t, eps, target, model_target, model_kwargs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                               for g, p in zip(grads, params)]))                # (P,)
    return torch.stack(rows)                                                    # (K, P)


def converted_loss(model, sched, x0, t, eps, target, model_target, model_kwargs=None):
    """MSE in `target` space of a network that predicts `model_target`: its output goes through
    (x0_hat, eps_hat) = split_prediction and is re-expressed as the target (x0, eps or v)."""
    x_t = diffusion.q_sample(sched, x0, t, eps)                                 # (B, C, H, W)
    out = model(x_t, t, **(model_kwargs or {}))[:, : x0.shape[1]]
    x0_hat, eps_hat = diffusion.split_prediction(sched, x_t, t, out, model_target)
    pred = diffusion.training_target(sched, x0_hat, t, eps_hat, target)
    return (pred - diffusion.training_target(sched, x0, t, eps, target)).pow(2).mean()


def strategy_bin_weights(sched, target, strategy, bins=10, gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """A fixed strategy on the simplex of Eq. 10: its mean weight over each bin's timesteps, divided by the sum (K,)."""
    edges = timestep_bins(sched.T, bins).tolist()
    w = loss_weight(snr_of_alpha_bar(sched.alpha_bar.cpu()), target, strategy, gamma, p2_k, p2_gamma)   # (T,)
    w_bin = torch.stack([w[lo:hi].mean() for lo, hi in zip(edges[:-1], edges[1:])])         # (K,)
    if w_bin.sum() <= 0:
        raise ValueError(f"{strategy} gives weight 0 to every timestep (gamma = {gamma}); use gamma > 0")
    return w_bin / w_bin.sum()


# -----------------------------------------------------------------------------
# The Pareto problem (Eq. 10-13)

def gram(G, lam=0.0):
    """M = G G^T + lam I in float64, so that Eq. 11's objective is w^T M w."""
    G = torch.as_tensor(G)
    if G.ndim != 2 or G.shape[0] < 1 or not torch.isfinite(G).all():
        raise ValueError(f"G must be a finite (K, P) matrix of K gradients, got shape {tuple(G.shape)}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda of Eq. 11 must be >= 0, got {lam}")
    G = G.detach().double().cpu()
    return G @ G.T + lam * torch.eye(G.shape[0], dtype=torch.float64)          # (K, K)


def pareto_objective(G, w, lam=0.0):
    """Eq. 11: ||sum_k w_k g_k||^2 + lam ||w||^2 (Eq. 10 at lam = 0)."""
    M = gram(G, lam)
    w = torch.as_tensor(w, dtype=torch.float64).cpu()
    if w.shape != (M.shape[0],):
        raise ValueError(f"w must hold one weight per gradient, shape ({M.shape[0]},), got {tuple(w.shape)}")
    return float(w @ M @ w)


def two_point_weight(aa, ab, bb, lo=0.0, hi=1.0):
    """argmin over s in [lo, hi] of ||s a + (1 - s) b||^2, given a.a, a.b and b.b.

    On [0, 1] this is the two-point problem of MGDA: s = clip((b - a).b / ||a - b||^2, 0, 1).
    """
    den = aa - 2 * ab + bb                                                     # ||a - b||^2
    s = (bb - ab) / den if den > 0 else 0.0                                    # a = b: any s, stay put
    return min(max(s, lo), hi)


def pareto_weights(G, lam=0.0, iters=10000, tol=1e-10):
    """Eq. 11 over the simplex by Frank-Wolfe (MGDA): returns (w (K,) on the simplex, objective).

    Each step moves w towards the vertex e_i that minimises the linearised objective, by the exact
    step of the two-point problem between the current combination sum_k w_k g_k and g_i. Away steps
    (Lacoste-Julien & Jaggi 2015) move w away from the worst vertex in use instead, when that descends
    faster; they let a bin's weight reach exactly 0 and make the convergence linear. The Frank-Wolfe
    gap 2 (w - e_i).M w bounds objective - optimum; the loop stops when (w - e_i).M w is below
    tol x objective (or tol x 1e-3 max_k ||g_k||^2 when the objective is ~0: the hull holds the origin).
    """
    M = gram(G, lam)
    K, floor = M.shape[0], 1e-3 * float(M.diagonal().max())
    w = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for _ in range(iters):
        Mw = M @ w                                                             # (K,) half the gradient
        a = float(w @ Mw)                                                      # the objective
        i = int(Mw.argmin())                                                   # Frank-Wolfe vertex
        j = int(torch.where(w > 0, Mw, -math.inf).argmax())                    # away vertex (in use)
        gap_fw, gap_away = a - float(Mw[i]), float(Mw[j]) - a
        if gap_fw <= tol * max(a, floor):
            break
        if gap_fw >= gap_away or w[j] >= 1:                                    # towards e_i, s in [0, 1]
            k, s = i, two_point_weight(float(M[i, i]), float(Mw[i]), a)
        else:                                                                  # away from e_j: s <= 0
            k, s = j, two_point_weight(float(M[j, j]), float(Mw[j]), a, lo=-float(w[j] / (1 - w[j])), hi=0.0)
        w = (1 - s) * w
        w[k] += s
        w.clamp_(min=0)                                                        # a drop step leaves -1e-17
    return w, max(float(w @ M @ w), 0.0)


def pareto_weights_ugd(G, lam=0.0, steps=5000, lr=0.1, tol=1e-2):
    """Eq. 11 by unconstrained gradient descent (UGD): w = softmax(beta) (Eq. 12), Adam on beta.

    Eq. 13's objective is f(beta) = w^T M w; its gradient is df/dbeta_k = 2 w_k ((M w)_k - w^T M w).
    Softmax weights are never exactly 0, so UGD approaches an optimum with empty bins only from above.
    A fixed number of Adam steps need not be enough: with gradient norms spread over orders of
    magnitude the objective can stay far above the optimum. The result is therefore checked with the
    Frank-Wolfe gap 2 (w^T M w - min_k (M w)_k), which bounds objective - optimum on the simplex
    (convexity); a RuntimeWarning says so when it exceeds tol x the objective (tol x 1e-6 max_k ||g_k||^2
    when the objective is ~0). pareto_weights solves the same problem to convergence.
    """
    M = gram(G, lam)
    M_n = M / M.diagonal().mean().clamp(min=1e-300)                           # Adam is scale-free; keeps M ~ 1
    beta = torch.zeros(M.shape[0], dtype=torch.float64)
    m, v = torch.zeros_like(beta), torch.zeros_like(beta)                     # Adam's moments, betas (0.9, 0.999)
    for k in range(1, steps + 1):
        w = beta.softmax(0)                                                   # Eq. 12: w_t = e^beta_t / Z
        Mw = M_n @ w
        grad = 2 * w * (Mw - w @ Mw)                                          # gradient of Eq. 13
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        beta = beta - lr * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + 1e-8)
    w = beta.softmax(0)
    Mw, floor = M @ w, 1e-6 * float(M.diagonal().max())
    obj = float(w @ Mw)
    gap = 2 * (obj - float(Mw.min()))                                          # >= objective - optimum
    if gap > tol * max(obj, floor):
        warnings.warn(f"UGD did not converge in {steps} Adam steps: the Frank-Wolfe gap allows its objective "
                      f"{obj:.4g} to lie up to {gap:.3g} above the optimum (tolerance {tol:g} x the objective); "
                      "raise steps, or use pareto_weights", RuntimeWarning, stacklevel=2)
    return w, obj


# -----------------------------------------------------------------------------
# The analysis: weight curves and Figure 4 as tables

def weight_table(sched, gamma=5.0, p2_k=1.0, p2_gamma=1.0, ts=(0, 100, 250, 500, 750, 999)):
    """Each strategy's weight at a few timesteps, one block per target, as text."""
    ts = [t for t in ts if t < sched.T]
    s = snr_of_alpha_bar(sched.alpha_bar.cpu()[ts])
    lines = ["t          " + "".join(f"{t:>11d}" for t in ts), "SNR        " + "".join(f"{v:11.4g}" for v in s)]
    for target in TARGETS:
        lines.append(f"{target}-prediction")
        for strategy in STRATEGIES:
            w = loss_weight(s, target, strategy, gamma, p2_k, p2_gamma)
            lines.append(f"  {strategy:9s}" + "".join(f"{v:11.4g}" for v in w))
    return "\n".join(lines)


def pareto_table(G, sched, target, bins=10, lam=0.0, gamma=5.0, p2_k=1.0, p2_gamma=1.0):
    """Figure 4 as text: the weights of each bin and the Eq. 11 objective, optimum vs fixed strategies."""
    edges = timestep_bins(sched.T, bins).tolist()
    with warnings.catch_warnings(record=True) as unconverged:                  # shown under the table instead
        warnings.simplefilter("always", RuntimeWarning)
        rows = {"pareto-FW": pareto_weights(G, lam)[0], "pareto-UGD": pareto_weights_ugd(G, lam)[0]}
    for strategy in STRATEGIES:
        rows[strategy] = strategy_bin_weights(sched, target, strategy, bins, gamma, p2_k, p2_gamma)
    opt = pareto_objective(G, rows["pareto-FW"], lam)
    g_norm = G.double().norm(dim=1)                                            # (K,)
    cos = (G.double() @ G.double().T) / (g_norm[:, None] * g_norm[None]).clamp(min=1e-300)
    lines = ["bin t      " + "".join(f"{f'{lo}-{hi - 1}':>9s}" for lo, hi in zip(edges[:-1], edges[1:])),
             "||g_k||    " + "".join(f"{v:9.2e}" for v in g_norm),
             f"weights on the simplex ({target}-prediction; a strategy's bin weight = its mean over the bin, "
             "normalised to sum 1):"]
    lines += [f"  {name:11s}" + "".join(f"{v:9.4f}" for v in w) for name, w in rows.items()]
    lines.append(f"smallest cosine between two bins' gradients: {cos.min().item():+.3f}")
    lines.append(f"Eq. 11 objective ||sum_k w_k g_k||^2 + {lam:g} ||w||^2 (the paper's Figure 4):")
    for name, w in rows.items():
        obj = pareto_objective(G, w, lam)
        lines.append(f"  {name:11s} {obj:12.5e}   x{obj / opt if opt > 0 else float('nan'):9.3f} the optimum")
    lines += [f"note: pareto-{w.message}" for w in unconverged if issubclass(w.category, RuntimeWarning)]
    return "\n".join(lines)


def load_batch(data_name, image_size, n, seed):
    """n items of the training split, drawn at random: images (n, C, H, W) and labels (n,)."""
    ds = data.build_dataset(data_name, image_size, split="train", seed=seed)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    b = data.first_items(torch.utils.data.Subset(ds, idx), n)
    return b["image"], b["label"]


def pareto_methods():
    """The methods whose runs this analysis reads: those trained with the plain diffusion loss (no modules of
    their own). A method with its own modules brings its own network and loss (MT-Diffusion's heads,
    JointNet's joint input), whose gradients are not the bins' diffusion losses computed here."""
    return [name for name, m in methods.METHODS.items() if not m.modules]


def load_model(args, device):
    """(model in eval mode, schedule, target, gamma, num_classes, the model's own target) from --ckpt or --fresh."""
    if args.ckpt:
        try:
            model, cfg, sched = methods.load_run(args.ckpt, ema=not args.no_ema, device=device)
            runlib.check_finite_weights(model, args.ckpt)
        except runlib.RunError as e:
            raise ValueError(str(e)) from None
        if cfg["method"] not in pareto_methods():
            raise ValueError(f"{args.ckpt} is a run of --method {cfg['method']}, trained with a loss of its own; the "
                             f"Pareto analysis reads runs of the plain diffusion loss: {', '.join(pareto_methods())}")
        args.image_size, args.data = cfg["image_size"], cfg.get("data", args.data)
        gamma = cfg.get("snr_gamma", 5.0) if args.gamma is None else args.gamma
        return model, sched, args.target or cfg["target"], gamma, cfg.get("num_classes", 0), cfg["target"]
    if args.arch == "unet":
        model = build_unet(args.model or "unet-cpu")
    else:
        model = build_dit(args.model or "DiT-T/4", args.image_size, 3, num_classes=0, class_dropout_prob=0.0)
    sched = diffusion.Schedule.make(args.schedule).to(device)
    target = args.target or "eps"  # an untrained model predicts nothing yet: take it as a --target model
    return model.to(device).eval(), sched, target, 5.0 if args.gamma is None else args.gamma, 0, target


def main(argv=None):
    p = argparse.ArgumentParser(description="Min-SNR-gamma: weight curves and the Pareto analysis of "
                                "Figure 4 (Hang et al. 2023) on one batch.")
    p.add_argument("--ckpt", help="a run's checkpoint.pt (or its run directory)")
    p.add_argument("--fresh", action="store_true", help="analyse a freshly initialised model instead")
    p.add_argument("--no-ema", action="store_true", help="with --ckpt: the raw weights, not the EMA")
    p.add_argument("--arch", choices=["unet", "dit"], default="unet", help="with --fresh")
    p.add_argument("--model", help="with --fresh: a preset (default unet-cpu or DiT-T/4)")
    p.add_argument("--image-size", type=int, default=32, help="with --fresh")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="with --fresh")
    p.add_argument("--data", default="shapes", help="with --fresh (--ckpt uses the run's data)")
    p.add_argument("--target", choices=TARGETS, help="the loss space of the analysis (default: the run's "
                   "target, eps with --fresh); another target converts the run's output to it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bins", type=int, default=10, help="K, the number of timestep bins (tasks)")
    p.add_argument("--params", default="", help="comma-separated parameter-name prefixes to differentiate, "
                   "e.g. 'out.,up.5.' (UNet) or 'final_layer.,blocks.5.' (DiT); default: all parameters")
    p.add_argument("--lam", type=runlib.finite_float, default=0.0, help="lambda of Eq. 11 (0: Eq. 10)")
    p.add_argument("--gamma", type=runlib.finite_float, help="gamma of min/max-SNR (default: the run's, else 5)")
    p.add_argument("--p2-k", type=runlib.finite_float, default=1.0)
    p.add_argument("--p2-gamma", type=runlib.finite_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.ckpt) == args.fresh:
        p.error("pass exactly one of --ckpt RUN/checkpoint.pt and --fresh")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, sched, target, gamma, num_classes, model_target = load_model(args, device)
        x0, y = load_batch(args.data, args.image_size, args.batch_size, args.seed)
        if x0.shape[1] != model.in_channels:
            raise ValueError(f"the data has {x0.shape[1]} channels but the model takes {model.in_channels}")
        kwargs = dict(y=y.to(device)) if num_classes else None
        params = select_params(model, [s for s in args.params.split(",") if s])
        P = sum(q.numel() for q in params)
        print(f"target {target}, {sched.T} timesteps in {args.bins} bins, batch {len(x0)}, gamma {gamma}, "
              f"P = {P:,} parameters ({args.params or 'all'})\n")
        if model_target != target:
            print(f"the model predicts {model_target}; its output is converted to {target} for the losses\n")
        print("loss weight of each strategy (weight on the MSE of the network's own target):")
        print(weight_table(sched, gamma, args.p2_k, args.p2_gamma), "\n")
        g = torch.Generator().manual_seed(args.seed)
        G = bin_gradients(model, sched, x0.to(device), target, args.bins, params, model_kwargs=kwargs, generator=g,
                          model_target=model_target)
        print(pareto_table(G, sched, target, args.bins, args.lam, gamma, args.p2_k, args.p2_gamma))
    except ValueError as e:
        sys.exit(f"minsnr_eval.py: {e}")


if __name__ == "__main__":
    main()
