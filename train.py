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
This file holds no paper math and no method name: config.py turns the flags into a config,
methods.py (the registry) builds the network and hands over the method's loss, and the loop below
draws each step's randomness, steps the optimiser, updates the EMA, logs and checkpoints.

Reproducibility: all randomness of step k (timesteps, noise, dropout, label dropout) is seeded from
(seed, rank, k), and the data order from (seed, epoch), so a resumed run continues exactly.
A run directory holds config.json, checkpoint.pt (written atomically), log.jsonl, samples/*.png and
train.lock (one train.py writes into a run folder at a time); temporary checkpoint files that a killed
process left behind are removed when a run starts or resumes, and a resumed run's log.jsonl loses the
records past the checkpoint it continues.

Exit status: 0 when the run reached --steps; 75 (EX_TEMPFAIL) when SIGINT or SIGTERM stopped it after
saving a checkpoint, so that a scheduler can requeue the same command with --resume; 1 (2 for flags)
with one sentence when the input is refused. Under torchrun only rank 0 prints the sentence.

Imports: config.py, the registry (methods.py) and the base (diffusion.py, runlib.py).
"""
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

import config
import diffusion
import methods
import runlib
from runlib import RunError

ON_GPU = config.ON_GPU
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal, checkpoint saved; the same command with --resume continues


class Objective(torch.nn.Module):
    """Model + loss in one forward, so DDP sees every parameter use whatever the method's loss does."""

    def __init__(self, model, loss_fn, sched, cfg):
        super().__init__()
        self.model, self.loss_fn, self.sched, self.cfg = model, loss_fn, sched, cfg

    def forward(self, batch, rng):
        return self.loss_fn(self.model, batch, self.sched, self.cfg, rng)


class LogWindow:
    """Running sums of one log window. They stay on the device and are read at log steps only, so the
    bookkeeping never makes the loop wait for the GPU; float64 sums equal Python float sums."""

    def __init__(self, T, device):
        self.T, self.device, self.t0, self.n = T, device, time.time(), 0
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.bins = torch.zeros(2, 10, device=device)                          # loss sum and count per decile of t
        self.extra, self.logged = {}, None  # the method's scalar stats; its log_values at the window's start

    def add(self, loss, t, stats):
        self.loss += loss.detach().double()
        self.n += 1
        bins = t * 10 // self.T                                                 # (B,) timestep decile
        self.bins[0].index_add_(0, bins, stats["mse"].detach().float())
        self.bins[1].index_add_(0, bins, torch.ones_like(bins, dtype=torch.float))
        for k, v in stats.items():
            if k != "mse":
                self.extra[k] = self.extra.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64, device=self.device)

    def record(self, step, lr, batch_size):
        s, c = self.bins.cpu()  # the window's one read of the device
        return {"step": step, "loss": (self.loss / self.n).item(), "lr": lr,
                "img_per_s": self.n * batch_size / (time.time() - self.t0),
                "loss_bins": [None if c[i] == 0 else (s[i] / c[i]).item() for i in range(10)],
                **{k: (v / self.n).item() for k, v in self.extra.items()}, **(self.logged or {})}


def build(cfg, resume, device):
    """(model, EMA copy, trainable params, optimiser, steps taken, batches consumed) of a new or resumed run."""
    torch.manual_seed(cfg["seed"])
    model = methods.build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    init = methods.hook(cfg["method"], "init_model")
    if resume is None:
        if init is not None:
            init(model, cfg)  # e.g. JointNet copies the pretrained weights into both branches
            ema.load_state_dict(model.state_dict())
        return model, ema, params, opt, 0, 0
    model.load_state_dict(resume["model"])
    ema.load_state_dict(resume["ema"])
    opt.load_state_dict(resume["opt"])
    return model, ema, params, opt, resume["step"], resume["seen"]


def train(cfg, dataset, resume=None):
    """Train a config from config.make_config to cfg["steps"]; returns the step reached (earlier if stopped)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if ON_GPU else "cpu"
    if ddp:
        if ON_GPU:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if ON_GPU else "gloo")
    cpu_note = None if ON_GPU else runlib.set_cpu_threads(ddp)  # printed with the run's first lines
    master, out, B = rank == 0, cfg["out"], cfg["batch_size"]
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if master:  # a kill -9 during a checkpoint write leaves checkpoint.pt.tmp.PID behind
        for tmp in runlib.remove_stale_temporaries(ckpt_path):
            print(f"removed {tmp}, a partial checkpoint of a process that no longer runs")
        if resume is not None and runlib.drop_log_records_after(os.path.join(out, "log.jsonl"), resume["step"]):
            print(f"log.jsonl: dropped the records past step {resume['step']}, which this run logs again")

    model, ema, params, opt, step, seen = build(cfg, resume, device)  # seen: batches consumed (>= step)
    sched = diffusion.Schedule.make(cfg["schedule"], cfg["T"]).to(device)
    hook = lambda name: methods.hook(cfg["method"], name)
    sample_fn, log_fn = hook("sample_rows"), hook("log_values")
    # --compile compiles the network; the method's loss around it stays eager, since a loss may run any
    # Python (JointNet renders its held-out batch on first use) and the network holds nearly all the work.
    objective = Objective(torch.compile(model) if cfg["compile"] else model, hook("training_loss"), sched, cfg)
    if ddp:  # no buffer needs syncing (GroupNorm/LayerNorm keep no running stats; routing masks are fixed)
        objective = DDP(objective, device_ids=[device] if ON_GPU else None, broadcast_buffers=False)
    # bf16 autocast, the same on a GPU and a CPU: matmuls and convolutions run in bf16, weights, gradients,
    # optimiser state and checkpoints stay float32, and bf16's float32 exponent range needs no GradScaler.
    amp = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if cfg["precision"] == "bf16"
           else contextlib.nullcontext())
    sampler = runlib.ResumableBatches(len(dataset), B, cfg["seed"], rank, world, start=seen)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg["workers"],
                                              pin_memory=ON_GPU, persistent_workers=cfg["workers"] > 0))
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if cpu_note:
            print(cpu_note)
        print(f"{'GPU' if ON_GPU else 'CPU'} run, {world} process(es): {cfg['method']} on {cfg['arch']} {cfg['model']} "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {cfg['image_size']}px "
              f"{cfg['data']}, batch {B}, {cfg['steps']} steps -> {out}")
        print(config.channel_line(cfg, dataset))
        print(json.dumps({k: v for k, v in cfg.items() if v is not None}))

    # The step of the checkpoint in OUT (a resume from another run's checkpoint into a new OUT has none yet).
    saved = {"step": step if resume is not None and os.path.isfile(ckpt_path) else None}
    def checkpoint():
        if master:
            runlib.save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                               "step": step, "seen": seen, "config": cfg, "method": cfg["method"]})
        saved["step"] = step

    def to_device(x):  # a pinned source copies without waiting for the GPU's queue (a pageable one syncs)
        return x.pin_memory().to(device, non_blocking=True) if ON_GPU else x.to(device)

    stop = {"signal": None}
    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    window, nonfinite, rows = LogWindow(cfg["T"], device), 0, slice(rank * (B // world), (rank + 1) * (B // world))
    # The bar closes before an error's sentence is printed, so that the sentence is the last line.
    with tqdm(total=cfg["steps"], initial=step, disable=not master, dynamic_ncols=True) as bar:
        while step < cfg["steps"] and stop["signal"] is None:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            seen += 1
            # Step-k randomness is a function of (seed, rank, k): exact resume, same draws on every rank count.
            # Every draw is made for the global batch and this rank keeps its rows.
            torch.manual_seed(cfg["seed"] * 1_000_003 + step * 7919 + rank)
            g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
            rng = runlib.StepRandom(g, B, rank, world, device)  # the method's own draws continue from g
            batch["t"] = to_device(diffusion.sample_timesteps(B, cfg["T"], generator=g)[rows])
            batch["noise"] = to_device(torch.randn((B, *batch["image"].shape[1:]), generator=g)[rows])
            batch["label_drop"] = to_device((torch.rand(B, generator=g) < cfg["cfg_drop"])[rows])  # for CFG
            batch["weight"] = methods.loss_weight(sched, batch["t"], cfg)  # --weighting (minsnr.py); None: plain mean
            lr = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))
            for group in opt.param_groups:
                group["lr"] = lr
            if log_fn is not None and master and window.logged is None:
                window.logged = log_fn(model, sched, cfg)

            with amp:
                loss, stats = objective(batch, rng)
            opt.zero_grad(set_to_none=True)
            # Backward is queued before the finiteness check reads the loss: the GPU works through it while
            # the host waits, so the step's one sync costs no GPU time. A non-finite loss gives non-finite
            # gradients, which are dropped unused.
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
                    kept = (f"the checkpoint of step {saved['step']} in {out} is kept" if saved["step"] is not None
                            else "no checkpoint was written")
                    raise RunError(f"the loss was not finite for {nonfinite} steps in a row (last at step {step}); "
                                   f"{kept}; lower --lr or check the data")
                continue  # the batch is consumed but the step is not applied
            nonfinite = 0
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            step += 1
            runlib.update_ema(ema, model, min(cfg["ema_decay"], (1 + step) / (10 + step)))

            window.add(loss, batch["t"], stats)
            if step % cfg["log_every"] == 0 or step == cfg["steps"]:
                rec = window.record(step, lr, B)
                if master:
                    with open(os.path.join(out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                window = LogWindow(cfg["T"], device)
            bar.update(1)
            if step % cfg["ckpt_every"] == 0 or step == cfg["steps"]:
                checkpoint()  # before the sample grid: the final save never waits on sampling
            if master and (step % cfg["sample_every"] == 0 or step == cfg["steps"]):
                with amp:
                    grid = sample_fn(ema, sched, cfg, 16, torch.Generator(device).manual_seed(cfg["seed"]), device)
                runlib.save_grid(grid, os.path.join(out, "samples", f"step_{step:07d}.png"))
    if saved["step"] != step:
        checkpoint()
    if master:
        why = f"stopped by {stop['signal']}" if stop["signal"] else "done"
        print(f"{why} at step {step}: checkpoint {ckpt_path}, samples in {os.path.join(out, 'samples')}")
    if ddp:
        dist.destroy_process_group()
    return step


def refuse(parser, error, quiet_status):
    """Exit with the one sentence of a RunError: status 2 with the usage line for flags, else 1. Under
    torchrun only rank 0 prints it; the other ranks exit with quiet_status, silently."""
    if os.environ.get("RANK", "0") != "0":
        sys.exit(quiet_status)
    sys.stdout.flush()  # what the run printed comes before the sentence, which ends the output
    if isinstance(error, config.FlagError):
        parser.error(str(error))
    sys.exit(f"error: {error}")


def main(argv=None):
    """Train as the command line says; returns the step reached, or exits with EXIT_STOPPED when a signal
    stopped the run (its checkpoint saved) and with one sentence when the input is refused."""
    parser = config.get_parser(__doc__)
    master = os.environ.get("RANK", "0") == "0"
    if not master:  # under torchrun rank 0 alone reports a bad flag, which every rank finds
        parser.error = lambda message: sys.exit(0)
    try:  # every setting is checked before any process group is joined or any step is taken
        cfg, dataset, resume = config.make_config(argv, parser)
        config.check_out(cfg)
    except RunError as e:
        # Every rank finds the same: the others exit 0, so that torchrun reports rank 0's one failure.
        refuse(parser, e, 0)
    try:
        with runlib.RunLock(cfg["out"]) if master else contextlib.nullcontext():
            step = train(cfg, dataset, resume)
    except RunError as e:
        refuse(parser, e, 1)
    if step < cfg["steps"]:
        sys.exit(EXIT_STOPPED)
    return step


if __name__ == "__main__":
    main()
