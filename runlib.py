"""
Run helpers shared by the loop (train.py), the sampling CLI (sample.py) and the papers' own CLIs.

This module sits below every other project file but shapes.py, data.py, diffusion.py, unet.py and
dit.py: paper files import it, it imports no paper file, and nothing here knows about a particular method.

    RunError                 a problem with the user's input, printed as one sentence without a traceback
    ranged, finite_float     argparse types: range checks, and no nan or inf in any float flag
    checkpoint_path          a run folder or a checkpoint file -> the checkpoint file
    load_checkpoint          torch.load(weights_only=True), every failure one sentence
    save_checkpoint          atomic write (temporary file + rename); remove_stale_temporaries cleans up
                             the temporaries that killed processes left behind
    RunLock                  one writer per run folder (train.lock, held with flock while a run writes)
    drop_log_records_after   a resumed run's log.jsonl loses the records past its checkpoint
    load_run                 (model, config, schedule) from a checkpoint, the model built by a given function
    build_backbone           the UNet or DiT of a config
    held_out_items           the first n items of a run's held-out split
    ResumableBatches, update_ema, StepRandom    the loop's data order, EMA and per-step random draws
    cpu_threads, set_cpu_threads                 torch threads per process on a CPU, and the oversubscription note
    to_uint8, save_grid, labels_for             images out
    check_output_path, check_finite_weights     refusals before the work: an unwritable destination, a
                                                diverged checkpoint
"""
import argparse
import fcntl
import glob
import json
import math
import os
import pickle
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image

import data
import diffusion
from dit import build_dit
from unet import build_unet


class RunError(Exception):
    """A problem with the user's input: printed as one sentence, no traceback."""


def ranged(cast, lo=None, hi=None, lo_open=False):
    """An argparse type: cast the string, refuse nan and inf, and values outside [lo, hi] ((lo, hi] with lo_open)."""
    def parse(s):
        v = cast(s)
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s} is not a finite number")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            lo_s = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}"
            raise argparse.ArgumentTypeError(f"{v} is outside {lo_s}, {hi if hi is not None else 'inf'}]")
        return v
    return parse


finite_float = ranged(float)  # for float flags without a range of their own


def checkpoint_path(path):
    """A run folder (holding checkpoint.pt) or a checkpoint file -> the checkpoint file."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


# Config keys that every run of train.py saves and every loader reads, with their types.
RUN_KEYS = dict(method=str, arch=str, model=str, image_size=int, in_channels=int, num_classes=int, T=int, schedule=str)


def load_checkpoint(path, methods=None):
    """torch.load with weights_only=True, turning every failure into one clear sentence. methods: the
    registry's method names, to refuse a checkpoint of a method this code does not have."""
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at {path}: train first (python train.py --out DIR) or check the path")
    if os.path.getsize(path) == 0:
        raise RunError(f"{path} is empty (0 bytes), not a checkpoint; pass a checkpoint.pt that train.py wrote")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if not magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip file (older torch: a pickle)
        raise RunError(f"{path} is not a checkpoint (not a file that torch.save wrote); pass a checkpoint.pt that "
                       "train.py wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a pickled Python object: unpickling it would import and call code
            raise RunError(f"refusing to load {path}: it holds Python objects beyond tensors and plain values, "
                           "which could run code when unpickled; only checkpoints written by train.py load") from None
        raise RunError(f"{path} is not a checkpoint (not a file that torch.save wrote); pass a checkpoint.pt that "
                       "train.py wrote") from None
    except Exception as e:  # torch's zip reader and unpickler fail in many ways on a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise RunError(f"{path} is not a readable checkpoint (corrupt or truncated): {first}") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise RunError(f"{path} is not a checkpoint written by train.py (it lacks 'model' and 'config')")
    cfg = ckpt["config"]
    missing = [k for k in RUN_KEYS if k not in cfg] if isinstance(cfg, dict) else list(RUN_KEYS)
    if missing:
        raise RunError(f"{path} is not a checkpoint written by train.py: its config lacks {', '.join(missing)}")
    for k, kind in RUN_KEYS.items():
        if not isinstance(cfg[k], kind) or isinstance(cfg[k], bool):
            raise RunError(f"{path} is not a checkpoint written by train.py: its config holds {k}={cfg[k]!r}, "
                           f"which is not a {'string' if kind is str else 'whole number'}")
    if methods is not None and cfg["method"] not in methods:
        raise RunError(f"{path} is a run of --method {cfg['method']!r}, which this code does not have "
                       f"(it has {', '.join(methods)}); pass a checkpoint of one of those")
    return ckpt


def write_failure(path, error):
    """Why a write of path failed, in words. torch's zip writer reports a full disk as an internal
    RuntimeError, so the free space is looked at (the partial file still fills the disk here)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2 ** 20:
            return "no space left on the disk"
    except OSError:
        pass
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a partial checkpoint,
    and a failed write (a full disk) keeps the checkpoint already there and says so in one sentence."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        kept = "the checkpoint already there is kept" if os.path.isfile(path) else "no checkpoint was written"
        raise RunError(f"could not write {path} ({write_failure(path, e)}); {kept}: free disk space or fix "
                       "the folder, then run again") from None
    finally:
        if os.path.exists(tmp):  # an interrupted write leaves no partial file behind
            os.remove(tmp)


def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(path):
    """Delete PATH.tmp.PID files whose process is gone (a kill -9 mid-write leaves one); returns their names.
    A temporary of a live process is kept: it may be another run writing into the same folder."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = tmp.rsplit(".", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            os.remove(tmp)
            removed.append(tmp)
    return removed


class RunLock:
    """The one-writer rule of a run folder: OUT/train.lock is held with flock while a train.py writes into OUT.

    A second writer is refused in one sentence naming the first one's process id. The OS releases a flock
    when its process ends, however it ends, so a crashed run leaves no stale lock; the file itself stays
    (deleting it would let two processes lock two different files of the same name). Entering also makes
    the folder, so an --out that cannot be written (a file, a read-only filesystem, a name too long) is
    refused before any work is done.
    """

    def __init__(self, out):
        self.out, self.path, self.file = out, os.path.join(out, "train.lock"), None

    def __enter__(self):
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise RunError(f"--out {self.out} is a file, not a folder; choose another --out")
        try:
            os.makedirs(self.out, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise RunError(f"cannot write into --out {self.out} ({e.strerror}); choose a folder you can write to") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunError(f"{self.out} is being written by another train.py (process {holder}); wait for it to "
                           "finish or choose another --out") from None
        except OSError as e:  # a filesystem without locks
            self.file.close()
            raise RunError(f"cannot lock {self.path} ({e.strerror}); choose an --out on a local disk") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def drop_log_records_after(path, step):
    """Rewrite a log.jsonl without the records past `step` (a resumed run logs those steps again), and
    without a last line that a killed process left half-written; returns how many records were dropped."""
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if rec.get("step", 0) > step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def load_run(path, build_model, ema=True, device="cpu", methods=None):
    """(model, config, schedule) from a checkpoint or run folder, the network made by build_model(config);
    EMA weights by default. methods: the method names build_model knows (see load_checkpoint)."""
    path = checkpoint_path(path)
    ckpt = load_checkpoint(path, methods)
    cfg = ckpt["config"]
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["ema" if ema and "ema" in ckpt else "model"])
    except RuntimeError:  # missing, unexpected or mis-shaped weights
        raise RunError(f"{path} holds a {cfg.get('method')} network that this tool does not build; "
                       "pass a run of a method it supports") from None
    return model.to(device).eval(), cfg, diffusion.Schedule.make(cfg["schedule"], cfg["T"]).to(device)


def build_backbone(cfg, in_channels=None, out_channels=None):
    """The config's UNet or DiT, with label dropout --cfg-drop when it is class-conditional."""
    c_in = in_channels or cfg["in_channels"]
    kw = dict(num_classes=cfg["num_classes"], class_dropout_prob=cfg["cfg_drop"] if cfg["num_classes"] else 0.0)
    if cfg["arch"] == "dit":
        return build_dit(cfg["model"], cfg["image_size"], c_in, learn_sigma=cfg.get("learn_sigma", False),
                         out_channels=out_channels, **kw)
    return build_unet(cfg["model"], c_in, out_channels, **kw)


def held_out_items(cfg, n, device=None, source=None):
    """The first n items of the held-out split of the run's data (or of `source`), stacked into a batch, with
    the images in the channels the run was trained on (a gray folder trained as RGB gives RGB items)."""
    ds = data.build_dataset(source or cfg["data"], cfg["image_size"], "test", cfg["seed"], cfg["in_channels"])
    return data.first_items(ds, n, device)


class ResumableBatches(torch.utils.data.Sampler):
    """Infinite batches of indices; epoch e is a permutation seeded by (seed, e). Rank r takes its slice
    of each global batch, so one process and N ranks see the same global batches. `start` skips batches."""

    def __init__(self, n, global_batch, seed, rank=0, world=1, start=0):
        if n < global_batch:
            raise RunError(f"the dataset has {n} items, fewer than one batch of {global_batch}; lower --batch-size")
        self.n, self.B, self.seed, self.rank, self.world, self.start = n, global_batch, seed, rank, world, start

    def __iter__(self):
        per_epoch, b = self.n // self.B, self.B // self.world
        k = self.start
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + k // per_epoch)
            perm = torch.randperm(self.n, generator=g)
            for j in range(k % per_epoch, per_epoch):
                batch = perm[j * self.B:(j + 1) * self.B]
                yield batch[self.rank * b:(self.rank + 1) * b].tolist()
                k += 1


# -----------------------------------------------------------------------------
# CPU threads: each process takes its share of the cores

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


def set_cpu_threads(ddp):
    """Under torchrun on a CPU, each process takes its share of the cores. Returns a note when the cores are
    oversubscribed (else None), for the caller to print once its settings are known to be good."""
    cores, local_world = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ddp:
        torch.set_num_threads(cpu_threads(cores, local_world, user_omp_threads()))
    return oversubscribed(cores, local_world, torch.get_num_threads(),
                          os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:  # frozen weights (JointNet's base) stay bit-identical in the EMA
            e.copy_(p)


class StepRandom:
    """The random draws of one training step, shared by the loop and the methods' losses.

    `generator` is seeded from (seed, step) alone. Every draw is made for the GLOBAL batch of size B and
    this rank keeps its rows `rows`, so N DDP ranks draw exactly what one process draws. A method that
    needs per-sample randomness beyond batch["noise"], ["t"] and ["label_drop"] draws it here:

        unknown = rng.rand(B) < p           # (B_global,) drawn, (B_local,) returned, on the device
        eps_d = rng.randn(B, 1, H, W)       # the first size must be the global batch B
    """

    def __init__(self, generator, batch_size, rank=0, world=1, device="cpu"):
        self.generator, self.batch_size, self.device = generator, batch_size, device
        self.rows = slice(rank * (batch_size // world), (rank + 1) * (batch_size // world))

    def local(self, x):
        """This rank's rows of a global-batch tensor, on the device."""
        return x[self.rows].to(self.device)

    def randn(self, *shape):
        return self.local(torch.randn(shape, generator=self.generator))

    def rand(self, *shape):
        return self.local(torch.rand(shape, generator=self.generator))

    def randint(self, low, high, *shape):
        return self.local(torch.randint(low, high, shape, generator=self.generator))


def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C); 1 channel stays 1, more than 3 keep the first 3."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, :3].permute(0, 2, 3, 1).numpy()


def save_grid(rows, path, ncol=None):
    """Save a list of (N, C, H, W) tensors in [-1, 1] as one PNG: each tensor fills whole rows of the grid."""
    tiles = []
    for r in rows:
        u = to_uint8(r)
        tiles.append(np.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u)
    ncol = ncol or min(8, max(len(t) for t in tiles))
    pad = 2
    lines = []
    for t in tiles:
        for i in range(0, len(t), ncol):
            chunk = list(t[i:i + ncol]) + [np.zeros_like(t[0])] * (ncol - len(t[i:i + ncol]))
            lines.append(np.concatenate([np.pad(c, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for c in chunk], 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.concatenate(lines, 0)).save(path)


def labels_for(args, cfg, n, offset=0):
    """Labels of n samples for sample.py's --class (or cycling through the classes); None if unconditional."""
    if not cfg["num_classes"]:
        return None
    if args.cls is None:  # cycle through the classes
        return (torch.arange(offset, offset + n) % cfg["num_classes"]).long()
    if not 0 <= args.cls < cfg["num_classes"]:
        raise ValueError(f"--class {args.cls} is outside the model's classes 0..{cfg['num_classes'] - 1}")
    return torch.full((n,), args.cls, dtype=torch.long)


def check_output_path(path, flag="--out"):
    """Make sure a file can be written at `path` before the work that produces it: create its missing
    folders, and raise RunError (one sentence) when a file blocks a folder, `path` is a folder, or the
    folder cannot be written (permissions, a read-only or full filesystem). The folder is probed by
    creating and removing a temporary file, the only test that also holds for root and read-only mounts."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise RunError(f"{flag} {path} is a folder; name a file inside it")
    folder = os.path.dirname(path)
    blocker = folder
    while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
        blocker = os.path.dirname(blocker)
    if not os.path.isdir(blocker):
        raise RunError(f"cannot write {path}: {blocker} is a file, not a folder; pass {flag} another path")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e}): pass {flag} a path in a folder you can "
                       "write to") from None
    return path


def check_finite_weights(model, path):
    """Raise RunError (one sentence naming the run) when any weight of the loaded model is NaN or inf: a run
    that diverged would otherwise sample black or noise images without a word."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise RunError(f"{path} holds NaN or inf weights ({bad[0]}{more}): the run diverged; use an earlier "
                       "checkpoint or train it again, e.g. with a lower --lr")
