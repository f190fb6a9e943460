"""
DiT: a diffusion backbone made of transformer blocks with adaLN-Zero conditioning.

    Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"   https://arxiv.org/abs/2212.09748

What is here, in reading order:
    PatchEmbed, Attention, Mlp   the three ViT pieces DiT borrows, with the same parameter names
    TimestepEmbedder             sinusoidal frequencies (cos, then sin; 256 of them) -> MLP
    LabelEmbedder                class table with one extra "null" row for classifier-free guidance
    DiTBlock                     adaLN-Zero block (paper Sec. 3.2, Fig. 3) with a routing hook for dtr.py
    FinalLayer, DiT              the model; x (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W)
    get_2d_sincos_pos_embed      the fixed 2-D sin-cos position embedding
    DIT_PRESETS, build_dit       DiT-S/B/L/XL at patch 2/4/8 (paper Table 1) and two tiny CPU sizes

Module names, shapes, chunk orders and initialisation follow the authors' code, so a state_dict
saved by it loads here with strict=True and gives the same output.

Routing hook (Park et al., DTR, App. A Eq. 5-8): every block has a non-persistent buffer
`route_mask` of shape (T, D). While it is None the block is exactly DiT's. When set, with
m = route_mask[t] the block computes x_{l+1} = B(m * x) + (1 - m) * x = x + F(m * x),
where B(x) = x + F(x) is the unchanged DiT block. dtr.py sets the masks.

Run `python dit.py` to build the tiny preset and time one training step on 32x32 RGB.

Differences from the paper and its code:
    - pixel-space training on small images by default (no VAE here); any channel count works.
    - num_classes=0 builds an unconditional model with no label table.
    - `out_channels` may be set directly; build_dit defaults to learn_sigma=False.
    - attention through torch's scaled_dot_product_attention instead of timm (same math).
    - no forward_with_cfg: guidance lives in diffusion.py (cfg_model).

Imports: nothing of the project (a base file).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with per-sample (N, D) shift/scale over tokens (N, L, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# -----------------------------------------------------------------------------
# ViT pieces (the names of timm's PatchEmbed / Attention / Mlp, written out)

class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to D channels (a strided conv)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)                     # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, L, D), L tokens in row-major patch order


class Attention(nn.Module):
    """Multi-head self-attention; qkv is one Linear(D, 3D) laid out as (3, heads, head_dim)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        N, L, D = x.shape                                    # L tokens
        qkv = self.qkv(x).reshape(N, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)      # each (N, heads, L, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)          # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(N, L, D))  # (N, L, D)


class Mlp(nn.Module):
    """Pointwise feed-forward: Linear, GELU (tanh approximation, as DiT), Linear."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# -----------------------------------------------------------------------------
# Embedders for the timestep and the class label

class TimestepEmbedder(nn.Module):
    """t -> [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / half) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps, integer or fractional -> (N, dim) sinusoids, cosines first."""
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)     # (half,)
        args = t[:, None].float() * freqs[None]                  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:                                              # odd dim: pad one zero column
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb                                               # (N, dim)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class table; with dropout_prob > 0 it holds one more row, the null class `num_classes`."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null id, at random (rate dropout_prob) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# -----------------------------------------------------------------------------
# The DiT block (adaLN-Zero) and the final layer

class DiTBlock(nn.Module):
    """x + gate_msa * attn(modulate(norm1(x))), then the same with the MLP (paper Fig. 3)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        # Routing hook for dtr.py: a (T, D) 0/1 mask per timestep, never saved in the state_dict.
        self.route_channels = hidden_size
        self.register_buffer("route_mask", None, persistent=False)

    def residual(self, x, c, skip=None):
        """The unchanged DiT block B(x) = x + F(x), F = the attention branch a plus the MLP branch at
        x + a; c (N, D) is the conditioning vector. With `skip`, returns skip + F(x) instead (routing)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        a = gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, L, D)
        h = x + a
        out = h if skip is None else skip + a
        return out + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))

    def forward(self, x, c, t=None):
        if self.route_mask is None:
            return self.residual(x, c)
        if t is None:
            raise ValueError("this block has a route_mask, so forward needs the timestep indices t of shape (N,)")
        if self.route_mask.shape[-1] != x.shape[-1]:
            raise ValueError(f"route_mask has {self.route_mask.shape[-1]} channels but the block has "
                             f"{x.shape[-1]}; build masks of width block.route_channels")
        m = self.route_mask[t.long()].to(x.dtype).unsqueeze(1)  # (N, 1, D)
        # DTR Eq. 8, B(m x) + (1 - m) x = x + F(m x): the block on the masked input with the unmasked
        # input as its skip. Two elementwise ops more than the plain block (m * x and skip + a).
        return self.residual(m * x, c, skip=x)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear to p * p * out_channels values per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, L, p * p * out_channels)


# -----------------------------------------------------------------------------
# The model

class DiT(nn.Module):
    """Diffusion transformer: patchify, add position, N DiT blocks, final layer, unpatchify."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, out_channels=None):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}; "
                             "pick a patch size that divides the image side")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 (the 2-D sin-cos position "
                             "embedding splits it into four sin/cos quarters)")
        if num_classes < 0 or not 0 <= class_dropout_prob <= 1:
            raise ValueError("num_classes must be >= 0 (0 = unconditional) and class_dropout_prob in [0, 1]")
        self.learn_sigma = learn_sigma
        self.in_channels, self.input_size = in_channels, input_size
        if out_channels is None:
            out_channels = in_channels * 2 if learn_sigma else in_channels
        self.out_channels = out_channels
        self.patch_size, self.num_heads, self.num_classes = patch_size, num_heads, num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        # Fixed sin-cos position embedding: a frozen Parameter, so it is part of the state_dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier Linears, patch conv as a Linear, N(0, 0.02) embeddings, zero adaLN and output (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.input_size // self.patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float()[None])  # (1, L, D)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # fan_in = C p p, fan_out = D, as a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zero:  # every block starts as the identity, the output as zero
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def routable_blocks(self):
        """The blocks that carry a `route_mask` buffer: every DiTBlock (the final layer is not routed)."""
        return list(self.blocks)

    def unpatchify(self, x):
        """(N, L, p * p * C) tokens -> (N, C, H, W); each token's values are ordered (p_row, p_col, C)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)   # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)            # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def check_inputs(self, x, t, y):
        N = x.shape[0] if torch.is_tensor(x) else None
        S, C = self.input_size, self.in_channels
        if N is None or x.ndim != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ValueError(f"x must be a tensor of shape (N, {C}, {S}, {S}), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if not torch.is_tensor(t) or tuple(t.shape) != (N,):
            raise ValueError(f"t must be a tensor of N = {N} timestep indices, shape ({N},)")
        if self.y_embedder is None:
            return
        rows = self.y_embedder.embedding_table.num_embeddings
        if not torch.is_tensor(y) or tuple(y.shape) != (N,) or y.is_floating_point():
            raise ValueError(f"this DiT is class-conditional (num_classes={self.num_classes}): pass integer "
                             f"labels y of shape ({N},) with values in [0, {rows - 1}]")
        # The range check reads values, which would stall a GPU; there the embedding asserts itself.
        if y.device.type == "cpu" and ((y < 0) | (y >= rows)).any():
            raise ValueError(f"labels must lie in [0, {rows - 1}], got values in "
                             f"[{int(y.min())}, {int(y.max())}]")

    def forward(self, x, t, y=None, *, force_drop_ids=None, return_features=False):
        """x (N, C, H, W), t (N,) timestep indices, y (N,) labels or None -> (N, out_channels, H, W).

        With return_features=True also returns {"tokens": (N, L, D) before the final layer,
        "mid": (N, L, D) after the first half of the blocks, "c": (N, D) conditioning}.
        """
        self.check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed   # (N, L, D), L = H * W / p^2 tokens
        c = self.t_embedder(t)                    # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        mid = x
        for i, block in enumerate(self.blocks):
            x = block(x, c, t)                    # (N, L, D)
            if i == len(self.blocks) // 2 - 1:
                mid = x
        out = self.unpatchify(self.final_layer(x, c))  # (N, out_channels, H, W)
        if return_features:
            return out, {"tokens": x, "mid": mid, "c": c}
        return out


# -----------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (as in MAE and DiT)

def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M,) positions -> (M, embed_dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (embed_dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))  # (D/2,)
    args = np.outer(pos.reshape(-1).astype(np.float64), omega)                              # (M, D/2)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size^2, embed_dim) for a square grid, tokens in row-major order.

    The first half of the channels encodes the column (x) of a token, the second half its row (y).
    """
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")  # (G, G) each
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols)  # (G*G, D/2)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows)  # (G*G, D/2)
    return np.concatenate([emb_col, emb_row], axis=1)        # (G*G, D)


# -----------------------------------------------------------------------------
# Presets (paper Table 1) and a builder

DIT_PRESETS = {
    f"DiT-{name}/{p}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
    for name, depth, hidden, heads in [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16),
                                        ("XL", 28, 1152, 16)]
    for p in (8, 4, 2)
}
# Tiny sizes for CPU runs on 32x32 images (not in the paper).
DIT_PRESETS["DiT-T/4"] = dict(depth=6, hidden_size=192, num_heads=3, patch_size=4)
DIT_PRESETS["DiT-T/2"] = dict(depth=6, hidden_size=192, num_heads=3, patch_size=2)


def build_dit(preset, input_size, in_channels, num_classes, class_dropout_prob, learn_sigma=False,
              out_channels=None):
    """DiT from a preset name such as 'DiT-S/2'; num_classes=0 gives an unconditional model."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}")
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
               class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma, out_channels=out_channels,
               **DIT_PRESETS[preset])


if __name__ == "__main__":
    import argparse
    import time
    parser = argparse.ArgumentParser(description="Build a DiT and time a training step on random data.")
    parser.add_argument("--model", default="DiT-T/4", choices=list(DIT_PRESETS))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = build_dit(args.model, args.image_size, 3, num_classes=10, class_dropout_prob=0.1)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    for step in range(args.steps + 3):  # three warm-up steps, then time
        if step == 3:
            start = time.perf_counter()
        t = torch.randint(0, 1000, (args.batch_size,))
        loss = (model(x, t, y) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - start) / args.steps
    size = f"{args.image_size}x{args.image_size}"
    print(f"batch {args.batch_size} at {size}: {1000 * dt:.1f} ms/step, {1 / dt:.1f} steps/s")
