"""
The one training loop: every method in this repository trains through it.

    python train.py                                   # Min-SNR-5 v-prediction on the built-in shapes data (CPU: ~6 min)
    python train.py --method ddpm                     # the eps-prediction DDPM baseline the papers compare against
    python train.py --method dtr --out runs/dtr       # Denoising Task Routing (dtr.py)
    python train.py --method minsnr --target v        # Min-SNR-5 weighting for v-prediction (minsnr.py)
    python train.py --method dtr --weighting min_snr  # DTR + Min-SNR, the DTR paper's Table 2 combination
    torchrun --nproc_per_node=8 train.py --model unet-gpu --batch-size 256   # DDP on 8 GPUs

`--method NAME` is a preset over independent axes (routing, loss weighting, prediction target, and
the methods that own their own loss: mtdiff, jointnet, direct_extend); explicit flags override it.
This file holds no paper math: losses come from diffusion.py (weighted by minsnr.py) or from the
method's own file, routing from dtr.py. methods.py holds the registry of methods and documents the
hooks through which a method's file plugs into this loop; runlib.py the run helpers (checkpoints,
the one-sentence RunError, argument checks).

Reproducibility: all randomness of step k (timesteps, noise, dropout, label dropout) is seeded from
(seed, rank, k), and the data order from (seed, epoch), so a resumed run continues exactly.
A run directory holds config.json, checkpoint.pt (written atomically), log.jsonl and samples/*.png;
temporary checkpoint files that a killed process left behind are removed when a run starts or resumes.
"""
import argparse
import contextlib
import copy
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import diffusion
import dtr
import methods
import minsnr
import runlib
from dit import DIT_PRESETS
from runlib import RunError, ranged
from unet import UNET_PRESETS

# Config keys that fix the network's shape: a checkpoint must agree on all of them.
ARCH_KEYS = ("method", "arch", "model", "image_size", "in_channels", "num_classes", "learn_sigma")
ON_GPU = torch.cuda.is_available()
CPU_DEFAULTS = dict(model="unet-cpu", image_size=32, batch_size=16, steps=1500, lr=3e-4, ema_decay=0.999,
                    ckpt_every=500, sample_every=1000, log_every=50, workers=0, precision="fp32")
GPU_DEFAULTS = dict(model="unet-gpu", image_size=64, batch_size=128, steps=100_000, lr=1e-4, ema_decay=0.9999,
                    ckpt_every=5000, sample_every=5000, log_every=100, workers=4, precision="bf16")
DIT_DEFAULT = "DiT-S/2" if ON_GPU else "DiT-T/4"  # --arch dit without --model: 33M (GPU), 4.2M (CPU)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="minsnr_v", choices=list(methods.METHODS), help="a preset of methods.py's registry; "
      "default minsnr_v (Min-SNR-5, v-prediction); ddpm is the eps-prediction baseline the papers compare against")
    a("--arch", choices=["unet", "dit"], help="default: inferred from --model")
    a("--model", choices=list(UNET_PRESETS) + list(DIT_PRESETS), help="preset; default unet-cpu on CPU, unet-gpu on GPU "
      f"({DIT_DEFAULT} with --arch dit)")
    a("--data", default="shapes", help="'shapes', a folder of images, or an .npz file")
    a("--image-size", type=ranged(int, 8, 512))
    a("--class-cond", type=int, choices=[0, 1], default=1, help="condition on labels when the data has several classes")
    a("--cfg-drop", type=ranged(float, 0, 1), default=0.1, help="label dropout for classifier-free guidance")
    a("--batch-size", type=ranged(int, 1), help="global batch size (split across DDP ranks)")
    a("--lr", type=ranged(float, 0, lo_open=True))
    a("--warmup", type=ranged(int, 0), default=100, help="linear learning-rate warm-up steps")
    a("--weight-decay", type=ranged(float, 0), default=0.0)
    a("--grad-clip", type=ranged(float, 0), default=1.0, help="max gradient norm (0: off)")
    a("--ema-decay", type=ranged(float, 0, 1))
    a("--steps", type=ranged(int, 1))
    a("--schedule", default="linear", choices=["linear", "cosine"])
    a("--T", type=ranged(int, 2), default=1000)
    a("--target", choices=diffusion.TARGETS, help="prediction target (default eps)")
    a("--weighting", choices=minsnr.STRATEGIES, help="per-timestep loss weight (minsnr.py); default none")
    a("--snr-gamma", type=ranged(float, 0), help="gamma of min/max-SNR weighting (default 5)")
    a("--p2-k", type=ranged(float, 0, lo_open=True), default=1.0)
    a("--p2-gamma", type=ranged(float, 0), default=1.0)
    a("--routing", choices=dtr.ROUTINGS, help="channel routing in residual blocks (dtr.py): random is R-TR, "
      "cdtr/ercdt the clustered variants of the DTR paper's App. F")
    a("--dtr-alpha", type=ranged(float, 0, 1, lo_open=True), default=0.8, help="activation ratio alpha")
    a("--dtr-beta", type=ranged(float, 0, lo_open=True), default=4.0, help="shift exponent beta")
    a("--dtr-placement", choices=dtr.PLACEMENTS, help="where UNet blocks apply the mask: after the GroupNorm "
      "before the output layer (hidden, default) or on the block input (input, Eq. 3); DiT: always input")
    a("--out", default="runs/default")
    a("--seed", type=int, default=0)
    a("--resume", nargs="?", const="auto", help="continue OUT/checkpoint.pt (or the given checkpoint)")
    a("--log-every", type=ranged(int, 1))
    a("--ckpt-every", type=ranged(int, 1))
    a("--sample-every", type=ranged(int, 1))
    a("--sample-steps", type=ranged(int, 1), default=50, help="DDIM steps for the sample grids")
    a("--workers", type=ranged(int, 0))
    a("--compile", action="store_true", help="torch.compile the network; the loss stays eager (needs a C++ compiler on a CPU)")
    a("--precision", choices=["fp32", "bf16"], help="bf16: autocast the forward pass (weights, optimiser state and "
      "checkpoints stay float32); default bf16 on a GPU, fp32 on a CPU")
    a("--max-nonfinite", type=ranged(int, 1), default=10, help="stop after this many non-finite losses in a row")
    methods.add_args(p)
    return p


def resolve_config(args, explicit=()):
    """argparse Namespace -> plain config dict: explicit flags, else the method preset, else the defaults."""
    preset = methods.METHODS[args.method].preset
    defaults = {**(GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS),
                **dict(target="eps", weighting="none", snr_gamma=5.0, routing="none"), **preset}
    cfg = dict(vars(args))
    if cfg.get("model") is None and cfg.get("arch") == "dit":
        cfg["model"] = DIT_DEFAULT
    for k, v in defaults.items():
        if cfg.get(k) is None or (k in preset and k not in explicit):
            cfg[k] = v
    inferred = "dit" if cfg["model"].startswith("DiT") else "unet"
    if cfg["arch"] is not None and cfg["arch"] != inferred:
        raise RunError(f"--model {cfg['model']} is a {inferred} preset but --arch is {cfg['arch']}; drop --arch or pick a matching preset")
    cfg["arch"], cfg["learn_sigma"], cfg["explicit"] = inferred, False, sorted(explicit)
    cfg["dtr_placement"] = cfg.get("dtr_placement") or ("input" if inferred == "dit" else "hidden")
    return cfg


def describe_data(cfg, dataset):
    info = data.dataset_info(dataset)
    cfg["in_channels"] = info["channels"]
    cfg["num_classes"] = info["num_classes"] if cfg["class_cond"] and info["num_classes"] > 1 else 0
    return info


def check_image_size(cfg):
    s = cfg["image_size"]
    if cfg["arch"] == "dit":
        patch = DIT_PRESETS[cfg["model"]]["patch_size"]
        if s % patch:
            raise RunError(f"--image-size {s} is not divisible by the patch size {patch} of {cfg['model']}; use a multiple of {patch}")
    else:
        f = 2 ** (len(UNET_PRESETS[cfg["model"]]["ch_mult"]) - 1)
        if s % f:
            raise RunError(f"--image-size {s} is not divisible by {f}, the downsampling factor of {cfg['model']}; use a multiple of {f}")


def check_settings(cfg):
    """Loss-weight and routing settings, checked once before training rather than at the first step."""
    try:
        minsnr.check_weight_args(cfg["weighting"], cfg["target"], cfg["snr_gamma"], cfg["p2_k"], cfg["p2_gamma"])
        dtr.check_routing(cfg)
    except ValueError as e:
        raise RunError(str(e)) from None


def check_compatible(saved, cfg, what="the checkpoint"):
    hook = lambda name: methods.hook(cfg["method"], name)
    # Beyond the shape: keys that change the experiment (the schedule, the routing masks, the method's stage).
    kept = ("T", "schedule", *dtr.resume_keys(saved), *hook("RESUME_KEYS"))
    hints = hook("RESUME_HINTS")
    for k in ARCH_KEYS + tuple(hook("SHAPE_KEYS")) + kept:
        if saved.get(k) != cfg.get(k):
            hint = hints.get(k, "use matching settings or another --out")
            raise RunError(f"{what} was trained with {k}={saved.get(k)!r} but this run has {k}={cfg.get(k)!r}; {hint}")


class Objective(torch.nn.Module):
    """Model + loss in one forward, so DDP sees every parameter use whatever the method's loss does."""

    def __init__(self, model, loss_fn, sched, cfg):
        super().__init__()
        self.model, self.loss_fn, self.sched, self.cfg = model, loss_fn, sched, cfg

    def forward(self, batch, rng):
        return self.loss_fn(self.model, batch, self.sched, self.cfg, rng)


def cpu_threads(cores, local_world, omp_num_threads=None):
    """Torch threads for each of local_world processes sharing `cores` CPU cores: OMP_NUM_THREADS when the
    user set it, else an equal share. torch's default, every core in every process, oversubscribes the
    cores local_world times over, and a step then runs many times slower than with its share."""
    if omp_num_threads:
        return max(1, int(omp_num_threads))
    return max(1, cores // max(1, local_world))


def oversubscribed(cores, local_world, threads, load):
    """One line saying that the cores are oversubscribed and what to set, or None when they are not.
    load: the 1-minute load average before training starts (other jobs on the machine)."""
    if local_world * threads > cores:
        return (f"note: {local_world} process(es) x {threads} torch thread(s) oversubscribe the {cores} CPU cores; "
                f"set OMP_NUM_THREADS={max(1, cores // local_world)}")
    if load + local_world * threads > cores + 1:  # at least one other busy process (the load decays slowly)
        free = max(1, int(cores - load) // local_world)
        what = f"set OMP_NUM_THREADS={free}" if free < threads else "steps run slower until the other jobs finish"
        return (f"note: the load average {load:.1f} of other jobs plus {local_world} x {threads} torch thread(s) "
                f"oversubscribe the {cores} CPU cores; {what}")
    return None


def user_omp_threads():
    """OMP_NUM_THREADS as the user set it, or None. torchrun sets it to 1 for its workers when the user did
    not; its own starting environment, which that assignment does not change, tells the two apart."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value and "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            with open(f"/proc/{os.getppid()}/environ", "rb") as f:
                if not any(e.startswith(b"OMP_NUM_THREADS=") for e in f.read().split(b"\0")):
                    return None
        except OSError:  # not Linux: trust the variable
            pass
    return value


def set_cpu_threads(ddp, master):
    """Under torchrun on a CPU, each process takes its share of the cores; warn once when they are oversubscribed."""
    cores, local_world = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ddp:
        torch.set_num_threads(cpu_threads(cores, local_world, user_omp_threads()))
    note = oversubscribed(cores, local_world, torch.get_num_threads(), os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    if note and master:
        print(note)


def train(cfg):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if ON_GPU else "cpu"
    if ddp:
        if ON_GPU:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if ON_GPU else "gloo")
    if not ON_GPU:
        set_cpu_threads(ddp, int(os.environ.get("LOCAL_RANK", "0")) == 0)
    if cfg["batch_size"] % world:
        raise RunError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} processes; use a multiple of {world}")
    master = rank == 0
    out, ckpt_path = cfg["out"], os.path.join(cfg["out"], "checkpoint.pt")

    resume = None
    if cfg["resume"]:
        resume = runlib.load_checkpoint(ckpt_path if cfg["resume"] == "auto" else cfg["resume"])
        # Continue the saved experiment; flags given now override it (checked below for shape changes).
        cfg = {**resume["config"], **{k: cfg[k] for k in cfg["explicit"]}, "resume": cfg["resume"], "out": out}
        cfg["arch"] = "dit" if cfg["model"].startswith("DiT") else "unet"
        cfg.setdefault("precision", (GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS)["precision"])  # older checkpoints
    elif os.path.exists(ckpt_path):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if master:  # a kill -9 during a checkpoint write leaves checkpoint.pt.tmp.PID behind
        for tmp in runlib.remove_stale_temporaries(ckpt_path):
            print(f"removed {tmp}, a partial checkpoint of a process that no longer runs")
    def hook(name):  # the method's hook (methods.py documents each); cfg's method is final here
        return methods.hook(cfg["method"], name)
    try:
        dataset = data.build_dataset(cfg["data"], cfg["image_size"], "train", cfg["seed"])
    except ValueError as e:
        raise RunError(str(e)) from None
    describe_data(cfg, dataset)
    if hook("prepare_config") is not None and resume is None:
        hook("prepare_config")(cfg)  # e.g. JointNet takes its backbone from --init
    check_image_size(cfg)
    check_settings(cfg)
    if resume is not None:
        check_compatible(resume["config"], cfg)

    torch.manual_seed(cfg["seed"])
    model = methods.build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step = seen = 0  # optimiser steps taken, batches consumed (more when non-finite steps were skipped)
    if hook("init_model") is not None and resume is None:
        hook("init_model")(model, cfg)  # e.g. JointNet copies the pretrained weights into both branches
        ema.load_state_dict(model.state_dict())
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        step, seen = resume["step"], resume["seen"]
    sched = diffusion.Schedule.make(cfg["schedule"], cfg["T"]).to(device)
    loss_fn, sample_fn, log_fn = hook("training_loss"), hook("sample_rows"), hook("log_values")
    # --compile compiles the network; the method's loss around it stays eager, since a loss may run any
    # Python (JointNet renders its held-out batch on first use) and the network holds nearly all the work.
    objective = Objective(torch.compile(model) if cfg["compile"] else model, loss_fn, sched, cfg)
    if ddp:
        # No buffer needs syncing (GroupNorm/LayerNorm keep no running stats; routing masks are fixed).
        objective = DDP(objective, device_ids=[device] if ON_GPU else None, broadcast_buffers=False)
    # bf16 autocast, the same on a GPU and a CPU: matmuls and convolutions run in bf16, weights, gradients,
    # optimiser state and checkpoints stay float32, and bf16's float32 exponent range needs no GradScaler.
    amp = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if cfg["precision"] == "bf16"
           else contextlib.nullcontext())

    sampler = runlib.ResumableBatches(len(dataset), cfg["batch_size"], cfg["seed"], rank, world, start=seen)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg["workers"],
                                              pin_memory=ON_GPU, persistent_workers=cfg["workers"] > 0))
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{'GPU' if ON_GPU else 'CPU'} run, {world} process(es): {cfg['method']} on {cfg['arch']} {cfg['model']} "
              f"({n_params / 1e6:.2f}M parameters), {cfg['image_size']}px {cfg['data']}, batch {cfg['batch_size']}, "
              f"{cfg['steps']} steps -> {out}")
        print(json.dumps({k: v for k, v in cfg.items() if v is not None}))

    stop = {"signal": None}
    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def checkpoint():
        if master:
            runlib.save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                        "step": step, "seen": seen, "config": cfg, "method": cfg["method"]})

    def sample_grid():
        if master:
            g = torch.Generator(device).manual_seed(cfg["seed"])
            with amp:
                rows = sample_fn(ema, sched, cfg, 16, g, device)
            runlib.save_grid(rows, os.path.join(out, "samples", f"step_{step:07d}.png"))

    bar = tqdm(total=cfg["steps"], initial=step, disable=not master, dynamic_ncols=True)

    def to_device(x):  # a pinned source copies without waiting for the GPU's queue (a pageable one syncs)
        return x.pin_memory().to(device, non_blocking=True) if ON_GPU else x.to(device)

    # The log window's running sums stay on the device and are read at log steps only, so bookkeeping
    # never makes the loop wait for the GPU. float64 sums equal the Python float sums they replace.
    def new_window():
        return {"loss": torch.zeros((), dtype=torch.float64, device=device), "n": 0, "t0": time.time(), "images": 0,
                "bins": torch.zeros(2, 10, device=device), "extra": {}}
    window = new_window()
    logged = None  # the log_values hook's numbers for the current window, measured at its start
    nonfinite = 0
    B = cfg["batch_size"]
    while step < cfg["steps"] and stop["signal"] is None:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
        seen += 1
        # Step-k randomness is a function of (seed, rank, k): exact resume, same draws on every rank count.
        torch.manual_seed(cfg["seed"] * 1_000_003 + step * 7919 + rank)
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        rng = runlib.StepRandom(g, B, rank, world, device)  # the method's own draws continue from g
        x_shape = (B, *batch["image"].shape[1:])
        sl = slice(rank * (B // world), (rank + 1) * (B // world))
        batch["t"] = to_device(diffusion.sample_timesteps(B, cfg["T"], generator=g)[sl])
        batch["noise"] = to_device(torch.randn(x_shape, generator=g)[sl])
        # Label dropout is drawn here, globally, so that one process and N DDP ranks drop the same labels.
        batch["label_drop"] = to_device((torch.rand(B, generator=g) < cfg["cfg_drop"])[sl])
        lr = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))
        for group in opt.param_groups:
            group["lr"] = lr
        if log_fn is not None and master and logged is None:
            logged = log_fn(model, sched, cfg)
        with amp:
            loss, stats = objective(batch, rng)
        opt.zero_grad(set_to_none=True)
        # Backward is queued before the finiteness check below reads the loss: the GPU works through it
        # while the host waits, so the one sync of the step costs no GPU time. A non-finite loss gives
        # non-finite gradients, which are dropped unused.
        loss.backward()
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(stop["signal"] is not None))])
        if ddp:  # every rank must skip, or stop, together
            dist.all_reduce(flags)
        skip, halt = flags.tolist()
        if halt > 0:
            stop["signal"] = stop["signal"] or "a signal on another rank"
            seen -= 1  # this batch was not trained on: a resumed run takes it again
            break
        if skip > 0:
            nonfinite += 1
            opt.zero_grad(set_to_none=True)
            if nonfinite >= cfg["max_nonfinite"]:
                raise RunError(f"the loss was not finite for {nonfinite} steps in a row (last at step {step}); "
                               f"the last good checkpoint in {out} is kept; lower --lr or check the data")
            continue  # the batch is consumed but the step is not applied
        nonfinite = 0
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        step += 1
        runlib.update_ema(ema, model, min(cfg["ema_decay"], (1 + step) / (10 + step)))

        window["loss"] += loss.detach().double(); window["n"] += 1; window["images"] += B
        bins = batch["t"] * 10 // cfg["T"]                                         # (B,) timestep decile
        window["bins"][0].index_add_(0, bins, stats["mse"].detach().float())
        window["bins"][1].index_add_(0, bins, torch.ones_like(bins, dtype=torch.float))
        for k, v in stats.items():
            if k != "mse":
                window["extra"][k] = window["extra"].get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64, device=device)
        if step % cfg["log_every"] == 0 or step == cfg["steps"]:
            s, c = window["bins"].cpu()  # the window's one read of the device
            dt = time.time() - window["t0"]
            rec = {"step": step, "loss": (window["loss"] / window["n"]).item(), "lr": lr,
                   "img_per_s": window["images"] / dt,
                   "loss_bins": [None if c[i] == 0 else (s[i] / c[i]).item() for i in range(10)],
                   **{k: (v / window["n"]).item() for k, v in window["extra"].items()}, **(logged or {})}
            if master:
                with open(os.path.join(out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            window, logged = new_window(), None
        bar.update(1)
        if step % cfg["ckpt_every"] == 0:
            checkpoint()
        if step % cfg["sample_every"] == 0 or step == cfg["steps"]:
            sample_grid()
    bar.close()
    checkpoint()
    if master:
        why = f"stopped by {stop['signal']}" if stop["signal"] else "done"
        print(f"{why} at step {step}: checkpoint {ckpt_path}, samples in {os.path.join(out, 'samples')}")
    if ddp:
        dist.destroy_process_group()
    return step


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    explicit = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    try:  # what can be checked before any data or process group is touched is an argument error
        cfg = resolve_config(args, explicit)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg["batch_size"] % world:
            raise RunError(f"--batch-size {cfg['batch_size']} is not divisible by the {world} processes; use a multiple of {world}")
        if methods.hook(cfg["method"], "prepare_config") is None and not cfg["resume"]:
            check_image_size(cfg)  # (a prepare_config may still change the model, e.g. JointNet's --init)
    except RunError as e:
        parser.error(str(e))
    try:
        return train(cfg)
    except RunError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
