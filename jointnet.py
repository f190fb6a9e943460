"""
JointNet: joint RGB + dense-modality diffusion grown out of a pretrained RGB model.

    Zhang et al., "JointNet: Extending Text-to-Image Diffusion for Dense Distribution Modeling",
    ICLR 2024, https://arxiv.org/abs/2310.06347

What is implemented (the authors released inference code only; this is a training implementation):
    JointNet       Fig. 2c: the pretrained network (RGB branch, frozen in stage 1) plus a trainable copy for
                   the dense map d (the paper's y; y is the class label here, as in unet.py). Each branch adds
                   a zero-initialised 3x3 conv of the OTHER branch's input to its conv_in output; zero-
                   initialised 1x1 convs carry every down-stage skip and the middle output of each branch into
                   the other's, before the up stages. At initialisation the RGB output is the pretrained
                   output bit for bit (the output preserving principle, Sec. 3.1).
    C_d != C_x     a 1-channel depth enters the copy through the lift R (C_x x C_d; lifted channel k is
                   d's channel k mod C_d): conv_in weight W R, output weights R^+ W. The copy starts as "the
                   pretrained net on d repeated to RGB, its output averaged back"; C_d = C_x is an exact
                   copy. Only the copy's first and last conv change, so the RGB output is not affected.
    Direct Extend  Fig. 2a: one network with C_x + C_d input and output channels, new input weights zero,
                   new output weights copied (R^+ W); all weights train.
    loss           Eq. 1, ||eps_x - eps_theta||^2 + ||eps_d - eps_phi||^2, one t for both modalities. Stage 1
                   trains the copy and the zero convs; --unfreeze is stage 2 (all weights, lr 1e-5, label
                   drop 0.5 unless given), a new run that --init's a stage-1 checkpoint and starts a fresh
                   optimiser over every weight. A stage-1 run cannot be resumed as stage 2 (its optimiser
                   holds the trainable half only), and --unfreeze over a plain RGB --init is refused (it
                   would skip stage 1).
In jointnet_eval.py (its sample.py modes, the log_values hook and the demo):
    rgb_heldout    log.jsonl's RGB loss on a fixed held-out batch (fixed t and noise): a quantitative proxy
                   for Fig. 8, which shows validation samples of JointNet and Direct Extend side by side as
                   training goes on (a grid of samples, not a curve). It uses the shapes test split, or
                   --heldout-data for a folder / .npz (which have no split of their own).
    samplers       joint DDIM; channel-wise (depth -> RGB, RGB -> depth) and spatial inpainting by replacing
                   the known part with its noised version at every step, one noise draw kept for all steps as
                   in the authors' pipeline (Sec. 4.1); SDEdit refinement of a nearest-upsampled
                   low-resolution depth (strength 0.4); tiles for wide canvases (Sec. 4.2), MultiDiffusion-
                   style, with a tent weight over each tile in both axes and a shifted interior tile grid
                   where the authors' panorama code uses an x-only trapezoid (8-pixel ramps) and a circular
                   horizontal shift (tiled_ddim says more).
    metrics        RGB -> depth against the exact depth of held-out shapes, with metrics.depth_metrics (least-
                   squares scale and shift, median over solves; AbsRel in depth, RMSE in disparity).

Run:
    python train.py --steps 3000 --out runs/rgb                                       # the pretrained RGB model
    python train.py --method jointnet --init runs/rgb/checkpoint.pt --out runs/jn     # stage 1
    python train.py --method jointnet --init runs/jn/checkpoint.pt --unfreeze --out runs/jn2   # stage 2
    python train.py --method direct_extend --init runs/rgb/checkpoint.pt --out runs/de         # Fig. 2a
    python sample.py --ckpt runs/jn --mode jn-rgb2dense  # or jn-joint, jn-dense2rgb, jn-inpaint, jn-sdedit, jn-tiles
    python jointnet_eval.py                              # output preservation and the joint / base sampling time
Imports: the base only (diffusion.py, unet.py, shapes.py, runlib.py).

Differences from the paper:
    - pixel space, class labels instead of text, the shapes data with exact depth (or its seg map) instead of
      COYO images with MiDaS depth; no noise offset (0.05 in the paper).
    - each term of Eq. 1 is a per-element mean, so 1-channel depth weighs as much as 3-channel RGB (the
      paper's two latents have equal sizes, where this is the same up to a constant).
    - one label drop is shared by both branches; channel-wise inpainting uses replacement, without the
      paper's extra fine-tuning on masked inputs.
    - UNet only: the wiring needs unet.py's encode/decode taps, so --arch dit is rejected.
"""
import copy

import torch
import torch.nn as nn

import diffusion
import runlib
import shapes
from diffusion import q_sample
from unet import UNet

SHAPE_KEYS = ("dense_modality",)  # config keys beyond config.ARCH_KEYS that a resume must keep
DENSE_CHANNELS = {"depth": 1, "seg": 1}  # dense modality -> channels; seg is drawn as one grey-level map


# -----------------------------------------------------------------------------
# Zero convolutions and the channel lift

def zero_conv(c_in, c_out, k):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def lift_matrix(c_x, c_d):
    """R (c_x, c_d): the lifted map R d repeats d's channels cyclically to c_x channels."""
    return (torch.arange(c_x)[:, None] % c_d == torch.arange(c_d)[None]).float()


@torch.no_grad()
def lift_convs(conv_in, out_conv, w_in, b_in, w_out, b_out):
    """Set a c_d-channel conv_in / output conv from the pretrained c_x-channel ones: W R and R^+ W."""
    R = lift_matrix(w_in.shape[1], conv_in.in_channels)                       # (C_x, C_d)
    R_pinv = torch.linalg.pinv(R)                                             # (C_d, C_x): channel means
    conv_in.weight.copy_(torch.einsum("oihw,id->odhw", w_in, R))
    conv_in.bias.copy_(b_in)
    out_conv.weight.copy_(torch.einsum("di,iohw->dohw", R_pinv, w_out))
    out_conv.bias.copy_(R_pinv @ b_out)


# -----------------------------------------------------------------------------
# The model

class JointNet(nn.Module):
    """RGB branch `base` (a UNet) + its trainable copy `dense` for a c_d-channel map, densely connected.

    forward(z, t, y) takes z = [x_t, d_t] (B, C_x + C_d, H, W) and returns [eps_x, eps_d] with the same
    shape, so every sampler of diffusion.py runs on it unchanged.

    Label dropout moves from `base` to the JointNet: base.class_dropout_prob is set to 0 and the JointNet
    drops labels itself, once for both branches, so that the RGB and the dense branch always see the same
    (dropped or kept) label. Each branch dropping on its own would train joint samples whose two halves
    were conditioned on different labels, which classifier-free guidance never asks for.
    """

    def __init__(self, base, dense_channels=1, freeze_base=True):
        super().__init__()
        if not isinstance(base, UNet):
            raise ValueError(f"JointNet wires unet.py's UNet (encode/decode taps), not a {type(base).__name__}")
        c_x, c_d, ch = base.in_channels, dense_channels, base.ch
        if not 1 <= c_d <= c_x:
            raise ValueError(f"the dense map needs 1..{c_x} channels (as many as the RGB branch at most), got {c_d}")
        self.c_x, self.c_d = c_x, c_d
        self.class_dropout_prob = base.class_dropout_prob  # one label drop, shared by both branches
        base.class_dropout_prob = 0.0  # (the class docstring says why)
        dense = copy.deepcopy(base).requires_grad_(True)
        dense.conv_in = nn.Conv2d(c_d, ch, 3, padding=1)
        dense.out[-1] = nn.Conv2d(base.out[-1].in_channels, c_d, 3, padding=1)
        dense.in_channels = dense.out_channels = c_d
        self.base, self.dense = base.requires_grad_(not freeze_base), dense
        self.in_from_dense, self.in_from_rgb = zero_conv(c_d, ch, 3), zero_conv(c_x, ch, 3)
        self.skip_from_dense = nn.ModuleList(zero_conv(c, c, 1) for c in base.skip_channels)
        self.skip_from_rgb = nn.ModuleList(zero_conv(c, c, 1) for c in base.skip_channels)
        c = base.mid_channels
        self.mid_from_dense, self.mid_from_rgb = zero_conv(c, c, 1), zero_conv(c, c, 1)
        self.copy_base_to_dense()

    def zero_convs(self):
        return [self.in_from_dense, self.in_from_rgb, *self.skip_from_dense, *self.skip_from_rgb,
                self.mid_from_dense, self.mid_from_rgb]

    @torch.no_grad()
    def copy_base_to_dense(self):
        """dense <- base: the same weights, except the lifted first and last conv."""
        last = f"out.{len(self.base.out) - 1}."
        state = {k: v for k, v in self.base.state_dict().items() if not k.startswith(("conv_in.", last))}
        self.dense.load_state_dict(state, strict=False)
        lift_convs(self.dense.conv_in, self.dense.out[-1], self.base.conv_in.weight, self.base.conv_in.bias,
                   self.base.out[-1].weight, self.base.out[-1].bias)

    def load_base(self, state):
        """Load pretrained RGB weights into the RGB branch and start the dense branch as their copy."""
        self.base.load_state_dict(state)
        self.copy_base_to_dense()

    def routable_blocks(self):
        return self.base.routable_blocks() + self.dense.routable_blocks()

    def drop_labels(self, y, force_drop_ids=None):
        """Labels to the null class where force_drop_ids is true, else (training only) at random."""
        if y is None:
            return y
        if force_drop_ids is not None:
            drop = force_drop_ids.bool()
        elif not self.training or self.class_dropout_prob == 0:
            return y
        else:
            drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
        return torch.where(drop, torch.full_like(y, self.base.num_classes), y)

    def forward(self, z, t, y=None, force_drop_ids=None):
        f = self.base.downsample_factor
        if z.ndim != 4 or z.shape[1] != self.c_x + self.c_d or z.shape[-1] % f or z.shape[-2] % f:
            raise ValueError(f"JointNet takes (B, {self.c_x + self.c_d}, H, W) with H and W divisible by {f} "
                             f"(RGB and dense channels concatenated), got {tuple(z.shape)}")
        x, d = z[:, :self.c_x], z[:, self.c_x:]                               # (B, C_x, H, W), (B, C_d, H, W)
        y = self.drop_labels(y, force_drop_ids)
        emb_x, emb_d = self.base.embed(t, y), self.dense.embed(t, y)         # (B, 4ch) each
        h_x = self.base.conv_in(x) + self.in_from_dense(d)                    # (B, ch, H, W)
        h_d = self.dense.conv_in(d) + self.in_from_rgb(x)                     # (B, ch, H, W)
        hs_x, mid_x = self.base.encode(h_x, emb_x, t)
        hs_d, mid_d = self.dense.encode(h_d, emb_d, t)
        # Each skip and middle output also goes, through a zero conv, into the other branch's up stages.
        skips_x = [a + zc(b) for a, b, zc in zip(hs_x, hs_d, self.skip_from_dense)]
        skips_d = [b + zc(a) for a, b, zc in zip(hs_x, hs_d, self.skip_from_rgb)]
        eps_x = self.base.out(self.base.decode(skips_x, mid_x + self.mid_from_dense(mid_d), emb_x, t))
        eps_d = self.dense.out(self.dense.decode(skips_d, mid_d + self.mid_from_rgb(mid_x), emb_d, t))
        return torch.cat([eps_x, eps_d], 1)                                   # (B, C_x + C_d, H, W)


# -----------------------------------------------------------------------------
# The "Direct Extend" baseline (Fig. 2a)

@torch.no_grad()
def direct_extend(net, base_state, c_x):
    """Load a c_x-channel UNet's weights into `net`, a UNet with c_x + c_d input and output channels:
    the new input weights are zero, the new output weights a copy (R^+ W: the RGB prediction averaged)."""
    last = f"out.{len(net.out) - 1}."
    skipped = ("conv_in.", last)
    try:
        res = net.load_state_dict({k: v for k, v in base_state.items() if not k.startswith(skipped)}, strict=False)
        ok = not res.unexpected_keys and all(k.startswith(skipped) for k in res.missing_keys)
    except RuntimeError:  # shape mismatches
        ok = False
    if not ok:
        raise ValueError("the pretrained weights do not match the extended network's backbone; use the same preset")
    w_out, b_out = base_state[last + "weight"], base_state[last + "bias"]     # (C_x, ch, 3, 3), (C_x,)
    R_pinv = torch.linalg.pinv(lift_matrix(c_x, net.in_channels - c_x))       # (C_d, C_x)
    net.conv_in.weight.zero_()[:, :c_x] = base_state["conv_in.weight"]
    net.conv_in.bias.copy_(base_state["conv_in.bias"])
    net.out[-1].weight.copy_(torch.cat([w_out, torch.einsum("di,iohw->dohw", R_pinv, w_out)]))
    net.out[-1].bias.copy_(torch.cat([b_out, R_pinv @ b_out]))
    return net


# -----------------------------------------------------------------------------
# Loss (Eq. 1)

def dense_map(batch, name):
    """The dense modality of a data batch as a (B, C_d, H, W) map in [-1, 1]."""
    if name == "depth":
        return batch["depth"]
    return batch["seg"][:, None].float() / (shapes.SEG_CLASSES - 1) * 2 - 1  # seg ids spread over [-1, 1]


def joint_loss(model, sched, x0, d0, t, eps_x, eps_d, y=None, target="eps", weight=None, drop=None):
    """Eq. 1 with one t for both modalities -> (weighted scalar loss, per-sample mse_x (B,), mse_d (B,)).
    drop (B,) bool: labels dropped to the null class (classifier-free guidance training)."""
    z0, eps = torch.cat([x0, d0], 1), torch.cat([eps_x, eps_d], 1)           # (B, C_x + C_d, H, W)
    z_t = q_sample(sched, z0, t, eps)
    err = (model(z_t, t, y=y, force_drop_ids=drop).float() - diffusion.training_target(sched, z0, t, eps, target)).pow(2)
    mse_x, mse_d = err[:, :x0.shape[1]].mean((1, 2, 3)), err[:, x0.shape[1]:].mean((1, 2, 3))  # (B,) each
    w = torch.ones_like(mse_x) if weight is None else weight.to(mse_x)
    return (w * (mse_x + mse_d)).mean(), mse_x, mse_d


# -----------------------------------------------------------------------------
# Hooks of the method protocol (methods.py) that build and train the model; the method's command line
# (its flags, their checks, the config they resolve from --init: add_args, prepare_config, ...) is in
# jointnet_eval.py

def build_model(cfg):
    c_x, c_d = cfg["in_channels"], cfg["dense_channels"]
    if cfg["method"] == "direct_extend":
        return runlib.build_backbone(cfg, in_channels=c_x + c_d, out_channels=c_x + c_d)
    return JointNet(runlib.build_backbone(cfg), c_d, freeze_base=not cfg["unfreeze"])


def init_model(model, cfg):
    """Copy the --init weights (its EMA) in: RGB branch + dense copy, the extended net, or a whole JointNet."""
    ckpt = runlib.load_checkpoint(cfg["init"])
    state = ckpt["ema"] if "ema" in ckpt else ckpt["model"]
    if ckpt["config"]["method"] == "jointnet":
        model.load_state_dict(state)
    elif isinstance(model, JointNet):
        model.load_base(state)
    else:
        direct_extend(model, state, cfg["in_channels"])


def training_loss(model, batch, sched, cfg, rng):
    key = "depth" if cfg["dense_modality"] == "depth" else "seg"
    if key not in batch:
        raise runlib.RunError(f"--data {cfg['data']} has no {key} maps; use the shapes data or an .npz with '{key}'")
    x0, d0, t = batch["image"], dense_map(batch, cfg["dense_modality"]), batch["t"]
    eps_d = rng.randn(rng.batch_size, *d0.shape[1:])  # (B, C_d, H, W); the loop's noise covers the image
    y = batch["label"] if cfg["num_classes"] else None
    drop = batch["label_drop"] if cfg["num_classes"] else None  # drawn by the loop at --cfg-drop
    loss, mse_x, mse_d = joint_loss(model, sched, x0, d0, t, batch["noise"], eps_d, y, cfg["target"],
                                    batch["weight"], drop)
    stats = {"mse": (mse_x + mse_d).detach(), "mse_rgb": mse_x.detach().mean(), "mse_dense": mse_d.detach().mean()}
    return loss, stats
