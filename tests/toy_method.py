"""A fifth method, as small as the protocol allows (methods.py): x0-prediction with a random per-sample
loss weight, a flag of its own and a logged number. test_methods.py registers it and trains it."""
from diffusion import q_sample
from runlib import ranged


def add_args(parser):
    parser.add_argument("--toy-scale", type=ranged(float, 0), default=1.0, help="toy: the largest loss weight")


def training_loss(model, batch, sched, cfg, rng):
    x_t = q_sample(sched, batch["image"], batch["t"], batch["noise"])               # (B, C, H, W)
    mse = (model(x_t, batch["t"]) - batch["image"]).pow(2).mean((1, 2, 3))          # (B,)
    w = cfg["toy_scale"] * rng.rand(rng.batch_size)                                # (B,), from the step's draws
    return (w * mse).mean(), {"mse": mse.detach(), "toy_weight": w.mean()}


def log_values(model, sched, cfg):
    return {"toy_params": sum(p.numel() for p in model.parameters())}
