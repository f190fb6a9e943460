"""
A small ADM-style UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
https://arxiv.org/abs/2105.05233), the convolutional backbone of this repository.

What is implemented (ADM's design, sized down):
    - ResBlock: GroupNorm, SiLU, conv; timestep (+ class) embedding as scale-shift on the second
      GroupNorm ("adaptive group norm", ADM Sec. 3); dropout; a zero-initialised last conv, so each
      block starts as the identity.
    - self-attention blocks at chosen downsampling factors (multi-head, zero-initialised projection).
    - optional class embedding with one extra "null" class for classifier-free guidance; labels are
      dropped to the null class with `class_dropout_prob` during training.
    - any input/output channel counts.

Hooks other files use:
    - routing (dtr.py): every ResBlock and AttentionBlock has a non-persistent buffer `route_mask`
      (None by default) and a `route_placement`, "hidden" (default) or "input". With a (T, C) 0/1
      mask m = route_mask[t] the skip path is always untouched and only the residual branch F sees it:
        "hidden"  m multiplies the normalised hidden state right after the GroupNorm that precedes the
                  zero-initialised output layer. ResBlock: the second GroupNorm, after the timestep
                  scale-shift and before SiLU / dropout / zero conv, skip(x) + conv0(SiLU(m * GN(h)));
                  the 0/1 mask is folded into the per-channel scale-shift (same numbers, a fraction of
                  the cost). AttentionBlock: its only GroupNorm, x + proj(attn(m * GN(x))).
        "input"   m multiplies the block input, Eq. 3 of the DTR paper and what the official DiT code
                  does: skip(x) + F(m * x), C = the block's input width. Where the ResBlock changes
                  the width, Eq. 3's (1 - m) x term has no counterpart, so the skip conv takes x unmasked.
      The DTR paper's App. A says only that the mask sits "right after the group normalization layer"
      in both ADM block types, to spare the normalisation statistics, and its ADM code is not public.
      In a reply on the official repository (github.com/byeongjun-park/DTR, issue 1, 2025-07-22) the
      first author describes it: for ADM the routing module sits between every GroupNorm and the
      subsequent zero_module, i.e. "hidden" (the norm before the zero-initialised output layer, on the
      statistics of the unmasked features). The attention block's only GroupNorm is its first layer,
      which makes it there nearly Eq. 3's input masking. "input" follows Eq. 3 literally (the first
      GroupNorm then sees masked input).
    - features (mtdiffusion.py, jointnet.py): `embed`, `conv_in`, `encode` (down stages and middle ->
      the skip tensors and the middle output), `decode` (up stages), `out`; `forward(...,
      return_features=True)` also returns {"mid": middle output, "last": the features before `out`}.

Run `python unet.py` to print the presets' parameter counts.

Differences from ADM: no learned variance output, no BigGAN up/down ResBlocks, no fp16 tricks; the
UNet attention uses torch's scaled_dot_product_attention.

Imports: nothing of the project (a base file).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> constructor arguments. "unet-cpu" trains on a laptop CPU at 32x32 in minutes.
UNET_PRESETS = {
    "unet-cpu": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_ds=(4,), dropout=0.0),
    "unet-small": dict(ch=96, ch_mult=(1, 2, 2), num_res_blocks=2, attn_ds=(2, 4), dropout=0.1),
    "unet-gpu": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_ds=(2, 4), dropout=0.1),
}


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                                   # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)               # (B, 2*half)
    return F.pad(emb, (0, dim % 2))


def zero_module(m):
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups as ADM when the width allows


ROUTE_PLACEMENTS = ("hidden", "input")  # where a block applies its routing mask (module docstring)


class Routed(nn.Module):
    """Base of blocks that accept a timestep-dependent channel mask (see dtr.py)."""

    def __init__(self, channels, in_channels=None):
        super().__init__()
        self.route_hidden_channels, self.route_in_channels = channels, in_channels or channels
        self.route_placement = "hidden"
        self.register_buffer("route_mask", None, persistent=False)  # (T, C) or None

    @property
    def route_channels(self):
        """C, the width the mask must have: the block input's or the masked hidden state's."""
        return self.route_in_channels if self.route_placement == "input" else self.route_hidden_channels

    def mask(self, t, dtype):
        """route_mask[t], (B, C): each sample's mask for its timestep index."""
        if t is None:
            raise ValueError("this block has a route_mask, so forward needs the timestep indices t of shape (B,)")
        if self.route_mask.shape[-1] != self.route_channels:
            raise ValueError(f"route_mask has {self.route_mask.shape[-1]} channels but the block has "
                             f"{self.route_channels}; build masks of width block.route_channels")
        return self.route_mask[t.long()].to(dtype)


class ResBlock(Routed):
    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0):
        super().__init__(out_ch, in_ch)
        self.in_layers = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))  # scale and shift
        self.out_norm = norm(out_ch)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb, t):
        routed = self.route_mask is not None
        if routed and self.route_placement == "input":
            h = self.in_layers(x * self.mask(t, x.dtype)[:, :, None, None])  # F(m * x); skip(x) below
        else:
            h = self.in_layers(x)                                             # (B, C_out, H, W)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        gain = 1 + scale
        if routed and self.route_placement == "hidden":
            # Routing: m * (GN(h) gain + shift) = GN(h) (m gain) + m shift for a 0/1 mask, so the mask
            # is folded into the per-channel gain and shift, (B, C) multiplies instead of (B, C, H, W).
            m = self.mask(t, gain.dtype)[:, :, None, None]                    # (B, C_out, 1, 1)
            gain, shift = gain * m, shift * m
        h = self.out_layers(self.out_norm(h) * gain + shift)
        return self.skip(x) + h


class AttentionBlock(Routed):
    def __init__(self, channels, head_channels=32):
        super().__init__(channels)
        self.heads = max(1, channels // head_channels)
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x, emb, t):
        B, C, H, W = x.shape
        if self.route_mask is not None and self.route_placement == "input":
            h = self.norm(x * self.mask(t, x.dtype)[:, :, None, None]).reshape(B, C, H * W)  # GN(m * x)
        else:
            h = self.norm(x).reshape(B, C, H * W)                             # (B, C, L)
        if self.route_mask is not None and self.route_placement == "hidden":
            h = h * self.mask(t, h.dtype)[:, :, None]                         # routing: m * GN(x)
        q, k, v = self.qkv(h).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(B, C, H * W)                          # (B, C, L)
        return x + self.proj(h).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb, t):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb, t):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of blocks that all take (h, emb, t)."""

    def forward(self, h, emb, t):
        for block in self:
            h = block(h, emb, t)
        return h


class UNet(nn.Module):
    def __init__(self, in_channels=3, out_channels=None, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1,
                 attn_ds=(4,), dropout=0.0, num_classes=0, class_dropout_prob=0.0, head_channels=32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.ch = ch
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # One extra row: the null class used for classifier-free guidance.
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, cur, ds = [ch], ch, 1
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks = Stage([ResBlock(cur, mult * ch, emb_dim, dropout)])
                cur = mult * ch
                if ds in attn_ds:
                    blocks.append(AttentionBlock(cur, head_channels))
                self.down.append(blocks)
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Stage([Downsample(cur)]))
                skip_chs.append(cur)
                ds *= 2
        self.mid = Stage([ResBlock(cur, cur, emb_dim, dropout), AttentionBlock(cur, head_channels),
                          ResBlock(cur, cur, emb_dim, dropout)])
        self.skip_channels = list(skip_chs)
        self.mid_channels = cur
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                blocks = Stage([ResBlock(cur + skip_chs.pop(), mult * ch, emb_dim, dropout)])
                cur = mult * ch
                if ds in attn_ds:
                    blocks.append(AttentionBlock(cur, head_channels))
                if level and i == num_res_blocks:
                    blocks.append(Upsample(cur))
                    ds //= 2
                self.up.append(blocks)
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero_module(nn.Conv2d(cur, self.out_channels, 3, padding=1)))

    def routable_blocks(self):
        return [m for m in self.modules() if isinstance(m, Routed)]

    def embed(self, t, y=None, force_drop_ids=None):
        """Timestep (+ class) embedding (B, 4ch). In training, labels drop to the null class with
        probability class_dropout_prob, or exactly where force_drop_ids is true (as DiT's LabelEmbedder)."""
        emb = self.time_embed(timestep_embedding(t, self.ch))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            if force_drop_ids is not None:
                drop = force_drop_ids.bool()
            else:
                drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
                drop = drop & self.training
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            emb = emb + self.label_emb(y)
        return emb

    def encode(self, h, emb, t):
        """Down stages and middle: h = conv_in(x) -> (skip tensors, middle output)."""
        hs = [h]
        for stage in self.down:
            h = stage(h, emb, t)
            hs.append(h)
        return hs, self.mid(h, emb, t)

    def decode(self, hs, h, emb, t):
        """Up stages: consume the skips in reverse; returns the features before the output block."""
        hs = list(hs)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, t)
        return h

    def forward(self, x, t, y=None, force_drop_ids=None, return_features=False):
        """x (B, C_in, H, W), t (B,) integer timestep indices, y (B,) labels or None -> (B, C_out, H, W)."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the UNet's "
                             f"downsampling factor {self.downsample_factor}")
        emb = self.embed(t, y, force_drop_ids)                                # (B, 4ch)
        hs, mid = self.encode(self.conv_in(x), emb, t)                        # skips, (B, C_mid, h, w)
        last = self.decode(hs, mid, emb, t)                                   # (B, ch, H, W)
        out = self.out(last)                                                  # (B, C_out, H, W)
        return (out, {"mid": mid, "last": last, "emb": emb}) if return_features else out


def build_unet(preset, in_channels=3, out_channels=None, num_classes=0, class_dropout_prob=0.0, **overrides):
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}: choose one of {', '.join(UNET_PRESETS)}")
    kw = {**UNET_PRESETS[preset], **overrides}
    return UNet(in_channels, out_channels, num_classes=num_classes, class_dropout_prob=class_dropout_prob, **kw)


if __name__ == "__main__":
    for name in UNET_PRESETS:
        n = sum(p.numel() for p in build_unet(name, num_classes=10).parameters())
        print(f"{name:12s} {n / 1e6:6.2f}M parameters")
