"""
The datasets every training run uses: procedural RGB-D "shapes", image folders and .npz arrays.

No data can be downloaded here, so the default dataset is rendered on the fly: 1-3 primitives
(sphere, box, cylinder, cone) standing on a floor in front of a back wall, seen by a pinhole camera,
ray-traced analytically per pixel. Each scene gives an RGB image, an exact depth map, a per-pixel
segmentation and an image-level label -- the modalities MT-Diffusion and JointNet model jointly.

What is here:
    scene(seed, split, index)       the parameters of one scene, a plain dict (deterministic)
    render(scene, size)             numpy image (H,W,3) in [0,1], metric depth z (H,W), seg (H,W)
    depth_to_disparity / disparity_to_depth   the FIXED map between metric z and the [-1,1] depth channel
    Shapes(size, split, seed)       torch Dataset of rendered scenes, cached in memory after first use
    ImageFolder(root, size)         any folder of images (recursive), optional class subfolders
    NpzDataset(path, size)          arrays in an .npz: `image` plus optional `label`, `depth`, `seg`, ...
    build_dataset / dataset_info    what train.py and sample.py call

Every item is a dict of tensors:
    image  float32 (C,H,W) in [-1,1]         (C = 3, or whatever an .npz holds, e.g. 4 latent channels)
    depth  float32 (1,H,W) in [-1,1]         normalised disparity: near = +1 (bright), the back wall = -1
    seg    int64   (H,W)                     0 = background, 1..K = primitive type (CLASS_NAMES[k - 1])
    label  int64   ()                        image-level class; 0 for unlabeled data

Shapes, precisely:
    camera   pinhole at the origin looking down +z, x right, y up, horizontal and vertical field of
             view FOV_DEG; the ray through a pixel is d = (u, v, 1), so a hit at ray parameter t has
             depth z = t exactly. Depth and seg are taken at pixel centres; the image averages
             2x2 samples per pixel (anti-aliasing).
    world    floor y = -CAM_HEIGHT, back wall z = Z_WALL; every pixel hits something, so depth is
             defined everywhere and lies in [Z_NEAR, Z_FAR].
    objects  1-3 primitives standing on the floor, non-overlapping footprints, one colour each from
             a six-colour palette (colour says nothing about type), Lambertian shading with a random
             light direction plus ambient light; wall with a soft vertical gradient, plain floor.
    label    the primitive type that covers the most pixels of the seg map at the item's size
             (ties go to the lower class id): label = argmax_k #{seg == k + 1}.
    splits   item `index` of split s is drawn from numpy's PCG64 seeded with SeedSequence([seed,
             SPLIT_IDS[s], index]); "train" and "test" use different seed streams, so no scene is
             shared between them. Only Generator.random() is used, so items are identical on every
             machine and process. Default lengths: 50,000 train, 5,000 test.

Run `python data.py --out shapes.png --size 64` for a preview grid (image | depth | seg per item),
`python data.py --bench` for the render speed.

Differences from the papers: the papers train on real photographs with depth from a monocular depth
network (JointNet) or on multi-modal benchmarks (MT-Diffusion); here the depth and segmentation are
exact because the scenes are synthetic. Everything else (folders, .npz) is ordinary data loading.
"""
import argparse
import functools
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLASS_NAMES = ("sphere", "box", "cylinder", "cone")
NUM_CLASSES = len(CLASS_NAMES)  # image-level labels 0..3
SEG_CLASSES = NUM_CLASSES + 1  # seg values 0 (background) .. 4

# Camera and world, in scene units. Depth is normalised with these FIXED constants for every sample.
FOV_DEG = 45.0
CAM_HEIGHT = 1.0  # the floor is the plane y = -CAM_HEIGHT
Z_WALL = 8.0  # the back wall is the plane z = Z_WALL
Z_NEAR, Z_FAR = 2.0, 8.0  # disparity 1/Z_NEAR -> +1, 1/Z_FAR -> -1
AMBIENT = 0.35

SPLIT_IDS = {"train": 0, "test": 1}
DEFAULT_LENGTHS = {"train": 50_000, "test": 5_000}
MIN_SIZE, MAX_SIZE = 16, 128

PALETTE = np.array([  # object albedos: red, orange, yellow, green, blue, purple
    [0.86, 0.16, 0.14], [0.96, 0.55, 0.10], [0.95, 0.85, 0.20],
    [0.20, 0.68, 0.26], [0.18, 0.38, 0.90], [0.58, 0.24, 0.78]])
WALL_COLORS = np.array([[0.80, 0.80, 0.82], [0.84, 0.78, 0.66], [0.66, 0.76, 0.86]])
FLOOR_COLORS = np.array([[0.46, 0.43, 0.40], [0.34, 0.38, 0.44], [0.52, 0.46, 0.34]])


# -----------------------------------------------------------------------------
# Depth <-> normalised disparity (the `depth` channel)

def depth_to_disparity(z):
    """Metric depth z (array or tensor) -> normalised disparity in [-1,1]; near = +1."""
    d = 2 * (1 / z - 1 / Z_FAR) / (1 / Z_NEAR - 1 / Z_FAR) - 1
    return d.clip(-1, 1)


def disparity_to_depth(d):
    """Normalised disparity in [-1,1] (array or tensor, clipped) -> metric depth z in [Z_NEAR, Z_FAR]."""
    inv_z = (d.clip(-1, 1) + 1) / 2 * (1 / Z_NEAR - 1 / Z_FAR) + 1 / Z_FAR
    return 1 / inv_z


# -----------------------------------------------------------------------------
# Scenes: plain dicts of primitive parameters

def _check_split(split):
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}: choose one of {sorted(SPLIT_IDS)}")


def scene(seed, split, index):
    """The parameters of scene `index` of `split`: walls, light and a list of primitives.

    Sphere: center, radius. Box: center, half (half extents before rotation), angle (about the
    vertical axis). Cylinder and cone: base (centre of the bottom disc), radius, height. Every
    object also has kind (a CLASS_NAMES entry) and color (RGB albedo in [0,1]).
    """
    _check_split(split)
    if min(seed, index) < 0:
        raise ValueError(f"seed and index must be non-negative integers, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)]))
    u = lambda lo, hi: lo + (hi - lo) * rng.random()  # only random(): the same stream on every numpy
    pick = lambda n: min(int(rng.random() * n), n - 1)

    light = np.array([u(-1.0, 1.0), u(0.6, 1.4), -1.0])
    out = {"light": light / np.linalg.norm(light),
           "wall_color": WALL_COLORS[pick(len(WALL_COLORS))],
           "floor_color": FLOOR_COLORS[pick(len(FLOOR_COLORS))], "objects": []}
    colors = list(range(len(PALETTE)))
    footprints = []  # (x, z, radius) of placed objects, to keep them from intersecting
    for _ in range(1 + pick(3)):
        kind, s = CLASS_NAMES[pick(NUM_CLASSES)], u(0.55, 0.85)
        foot = {"sphere": s, "box": 0.8 * s * math.sqrt(2), "cylinder": 0.8 * s, "cone": s}[kind]
        for _attempt in range(20):
            z = u(3.4, 5.6)
            x_max = z * math.tan(math.radians(FOV_DEG) / 2) * 0.92 - foot  # stay inside the view
            x = u(-x_max, x_max)
            if all(math.hypot(x - x2, z - z2) > foot + r2 + 0.1 for x2, z2, r2 in footprints):
                break
        else:
            continue  # no free spot: leave the object out
        footprints.append((x, z, foot))
        color = PALETTE[colors.pop(pick(len(colors)))]
        floor = -CAM_HEIGHT
        if kind == "sphere":
            obj = {"center": np.array([x, floor + s, z]), "radius": s}
        elif kind == "box":
            w = 0.8 * s
            h = w * u(0.8, 1.3)
            obj = {"center": np.array([x, floor + h, z]), "half": np.array([w, h, w]),
                   "angle": u(0.0, math.pi / 2)}
        elif kind == "cylinder":
            obj = {"base": np.array([x, floor, z]), "radius": 0.8 * s, "height": s * u(1.5, 2.4)}
        else:
            obj = {"base": np.array([x, floor, z]), "radius": s, "height": s * u(1.8, 2.6)}
        out["objects"].append({"kind": kind, "color": color, **obj})
    return out


# -----------------------------------------------------------------------------
# Ray intersection. A ray from the origin has direction d = (x, y, 1): its parameter t is depth z.
# Each *_hit returns t (P,) with inf where the ray misses; each *_normal the unit normal at p (M,3).

def _smallest_positive(*ts):
    """Element-wise smallest candidate t > 0 (inf when none is)."""
    best = np.full_like(ts[0], np.inf)
    for t in ts:
        best = np.where((t > 1e-9) & (t < best), t, best)
    return best


def sphere_hit(o, x, y):
    c, r = o["center"], o["radius"]
    a = x * x + y * y + 1  # |d|^2
    b = x * c[0] + y * c[1] + c[2]  # d . c
    disc = b * b - a * (c @ c - r * r)
    with np.errstate(invalid="ignore"):
        t = (b - np.sqrt(disc)) / a  # the nearer root of |t d - c|^2 = r^2
    return np.where(disc >= 0, t, np.inf)


def sphere_normal(o, p):
    return (p - o["center"]) / o["radius"]


def _to_box_frame(o, v):
    """Rotate vectors (..., 3) by -angle about y, into the box's own axes."""
    cos, sin = math.cos(o["angle"]), math.sin(o["angle"])
    return np.stack([cos * v[..., 0] - sin * v[..., 2], v[..., 1], sin * v[..., 0] + cos * v[..., 2]], -1)


def box_hit(o, x, y):
    cos, sin = math.cos(o["angle"]), math.sin(o["angle"])
    origin = _to_box_frame(o, -o["center"])  # the camera in box coordinates
    d = (cos * x - sin, y, sin * x + cos)  # the ray direction in box coordinates
    t_near, t_far = np.full_like(x, -np.inf), np.full_like(x, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):  # slab method: intersect the three pairs of parallel planes
            t1 = (-o["half"][k] - origin[k]) / d[k]
            t2 = (o["half"][k] - origin[k]) / d[k]
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
    return np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)


def box_normal(o, p):
    q = _to_box_frame(o, p - o["center"]) / o["half"]  # in [-1,1]^3, one coordinate at +-1
    axis = np.abs(q).argmax(-1)
    n = np.zeros_like(q)
    n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
    cos, sin = math.cos(o["angle"]), math.sin(o["angle"])  # back to world axes (rotate by +angle)
    return np.stack([cos * n[:, 0] + sin * n[:, 2], n[:, 1], -sin * n[:, 0] + cos * n[:, 2]], -1)


def _disc_hit(x, y, base, radius, y_plane):
    """A horizontal disc of `radius` centred above `base` at height y_plane."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = y_plane / y
    inside = (x * t - base[0]) ** 2 + (t - base[2]) ** 2 <= radius * radius
    return np.where(inside, t, np.inf)


def cylinder_hit(o, x, y):
    b, r, h = o["base"], o["radius"], o["height"]
    a = x * x + 1  # the side, (t x - bx)^2 + (t - bz)^2 = r^2, a quadratic in t
    half_b = x * b[0] + b[2]
    disc = half_b * half_b - a * (b[0] ** 2 + b[2] ** 2 - r * r)
    with np.errstate(invalid="ignore"):
        t = (half_b - np.sqrt(disc)) / a
    side = np.where((disc >= 0) & (y * t >= b[1]) & (y * t <= b[1] + h), t, np.inf)
    return _smallest_positive(side, _disc_hit(x, y, b, r, b[1]), _disc_hit(x, y, b, r, b[1] + h))


def cylinder_normal(o, p):
    b, r, h = o["base"], o["radius"], o["height"]
    radial = np.stack([p[:, 0] - b[0], np.zeros(len(p)), p[:, 2] - b[2]], -1) / r
    vertical = (p[:, 1] - b[1] - h / 2) / (h / 2)  # +-1 on the caps
    on_cap = np.abs(vertical) > np.linalg.norm(radial, axis=-1)
    cap = np.stack([np.zeros(len(p)), np.sign(vertical), np.zeros(len(p))], -1)
    return np.where(on_cap[:, None], cap, radial)


def cone_hit(o, x, y):
    b, r, h = o["base"], o["radius"], o["height"]
    k2, apex = (r / h) ** 2, b[1] + h
    # the side: (t x - bx)^2 + (t - bz)^2 = k^2 (apex - t y)^2, written as A t^2 + B t + C = 0
    A = x * x + 1 - k2 * y * y
    B = -2 * (x * b[0] + b[2]) + 2 * k2 * apex * y
    C = b[0] ** 2 + b[2] ** 2 - k2 * apex * apex
    disc = B * B - 4 * A * C
    with np.errstate(divide="ignore", invalid="ignore"):
        q = -0.5 * (B + np.copysign(np.sqrt(disc), B))  # numerically stable pair of roots
        roots = [q / A, C / q]
    sides = [np.where((disc >= 0) & (y * t >= b[1]) & (y * t <= apex), t, np.inf) for t in roots]
    return _smallest_positive(*sides, _disc_hit(x, y, b, r, b[1]))


def cone_normal(o, p):
    b, r, h = o["base"], o["radius"], o["height"]
    k2 = (r / h) ** 2
    side = np.stack([p[:, 0] - b[0], k2 * (b[1] + h - p[:, 1]), p[:, 2] - b[2]], -1)  # gradient
    side /= np.linalg.norm(side, axis=-1, keepdims=True) + 1e-12
    on_base = np.abs(p[:, 1] - b[1]) < 1e-6 * max(1.0, abs(b[1]))
    return np.where(on_base[:, None], np.array([0.0, -1.0, 0.0]), side)


HIT = {"sphere": sphere_hit, "box": box_hit, "cylinder": cylinder_hit, "cone": cone_hit}
NORMAL = {"sphere": sphere_normal, "box": box_normal, "cylinder": cylinder_normal, "cone": cone_normal}


# -----------------------------------------------------------------------------
# Rendering

@functools.lru_cache(maxsize=16)
def _rays(size, aa):
    """Ray directions (x, y) of shape (1 + aa^2, size, size): pixel centres, then aa x aa sub-samples."""
    half = math.tan(math.radians(FOV_DEG) / 2)
    offsets = [0.5] + [(i + 0.5) / aa for i in range(aa)]  # pixel centre, then the sub-sample grid
    xs, ys = [], []
    for k in range(1 + aa * aa):
        ox, oy = (0.5, 0.5) if k == 0 else (offsets[1 + (k - 1) % aa], offsets[1 + (k - 1) // aa])
        col = (np.arange(size) + ox) / size * 2 - 1  # in (-1, 1), left to right
        row = 1 - (np.arange(size) + oy) / size * 2  # in (-1, 1), top to bottom
        xs.append(np.broadcast_to(col[None, :] * half, (size, size)))
        ys.append(np.broadcast_to(row[:, None] * half, (size, size)))
    x, y = np.stack(xs), np.stack(ys)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def render(scene, size, aa=2):
    """Ray-trace a scene: image (H,W,3) float32 in [0,1], depth z (H,W) float32, seg (H,W) int64.

    The image averages aa x aa samples per pixel; depth and seg are exact at pixel centres.
    """
    x, y = _rays(size, aa)  # (S, size, size) each, S = 1 + aa^2
    x, y = x.reshape(-1), y.reshape(-1)  # (P,)
    objects = scene["objects"]
    with np.errstate(divide="ignore"):
        t_floor = np.where(y < 0, -CAM_HEIGHT / y, np.inf)
    t = np.minimum(t_floor, Z_WALL)  # (P,) the background is everywhere
    hit = np.where(t_floor < Z_WALL, 1, 0)  # 0 = wall, 1 = floor, 2 + i = object i
    for i, o in enumerate(objects):
        t_o = HIT[o["kind"]](o, x, y)
        hit = np.where(t_o < t, 2 + i, hit)
        t = np.minimum(t, t_o)

    p = np.stack([x * t, y * t, t], -1)  # (P, 3) hit points
    n = np.where((hit == 1)[:, None], np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))  # (P, 3)
    for i, o in enumerate(objects):
        mask = hit == 2 + i
        if mask.any():
            n[mask] = NORMAL[o["kind"]](o, p[mask])
    shade = AMBIENT + (1 - AMBIENT) * np.maximum(n @ scene["light"], 0)  # Lambert, (P,)
    wall_gradient = 0.8 + 0.25 * np.clip(p[:, 1] / 3.5, -1, 1)  # brighter towards the top
    floor_fade = 1.05 - 0.2 * (t - 2.4) / (Z_WALL - 2.4)  # slightly darker towards the wall
    shade = shade * np.where(hit == 0, wall_gradient, np.where(hit == 1, floor_fade, 1.0))
    albedo = np.stack([scene["wall_color"], scene["floor_color"]] + [o["color"] for o in objects])
    rgb = np.clip(albedo[hit] * shade[:, None], 0, 1).reshape(1 + aa * aa, size, size, 3)

    seg_of_hit = np.array([0, 0] + [1 + CLASS_NAMES.index(o["kind"]) for o in objects])
    centre = slice(0, size * size)  # the first ray set holds the pixel centres
    return {"image": rgb[1:].mean(0).astype(np.float32),
            "depth": t[centre].reshape(size, size).astype(np.float32),
            "seg": seg_of_hit[hit[centre]].reshape(size, size).astype(np.int64)}


def label_from_seg(seg):
    """The image-level class: the primitive type covering the most pixels (ties -> lower id)."""
    counts = np.bincount(np.asarray(seg).reshape(-1), minlength=SEG_CLASSES)[1:]
    return int(counts.argmax())


# -----------------------------------------------------------------------------
# Datasets

def check_size(size):
    if not (isinstance(size, int) and MIN_SIZE <= size <= MAX_SIZE):
        raise ValueError(f"the shapes data renders at {MIN_SIZE}..{MAX_SIZE} px, got size={size}")


class Shapes(torch.utils.data.Dataset):
    """The procedural RGB-D scenes; item i of a split is the same everywhere. Rendered items are kept in
    memory (uint8 image, float16 disparity, uint8 seg), so every epoch after the first is cheap."""

    def __init__(self, size=32, split="train", seed=0, length=None):
        check_size(size)
        _check_split(split)
        self.size, self.split, self.seed = size, split, seed
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.cache = {}

    def __len__(self):
        return self.length

    def raw(self, index):
        """(image uint8 (H,W,3), disparity float16 (H,W), seg uint8 (H,W)), rendered once."""
        if index not in self.cache:
            r = render(scene(self.seed, self.split, index), self.size)
            self.cache[index] = (np.round(r["image"] * 255).astype(np.uint8),
                                 depth_to_disparity(r["depth"]).astype(np.float16), r["seg"].astype(np.uint8))
        return self.cache[index]

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside the {self.split} split of {self.length} items")
        img, disp, seg = self.raw(index)
        return {"image": torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1,   # (3, H, W)
                "depth": torch.from_numpy(disp.astype(np.float32))[None],              # (1, H, W)
                "seg": torch.from_numpy(seg.astype(np.int64)),                         # (H, W)
                "label": torch.tensor(label_from_seg(seg), dtype=torch.long)}


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image(path, size):
    """Any PIL mode -> float32 (3, size, size) in [-1,1]: centre crop to a square, then resize."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth greyscale: scale, don't clip
            a = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / peak * 255, 0, 255).round().astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)  # transparent pixels become white
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC if s < size else Image.BOX)
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursive). Unreadable files are found once, here, and skipped with one
    warning, so nothing fails mid-run. If the images all sit in immediate subfolders, the sorted
    subfolder names are the classes; otherwise every label is 0."""

    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise ValueError(f"data folder {root} does not exist: pass 'shapes', a folder of images or an .npz file")
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(IMAGE_EXTS))
        if not paths:
            raise ValueError(f"no images found in {root}: expected {', '.join(IMAGE_EXTS)} files (searched recursively)")
        good, bad = [], []
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()  # decodes the whole file: truncated or corrupt files fail here
                good.append(p)
            except Exception:
                bad.append(p)
        if bad:
            names = ", ".join(os.path.basename(p) for p in bad[:3])
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root} (e.g. {names})")
        if not good:
            raise ValueError(f"none of the {len(paths)} image files in {root} could be read")
        first = [os.path.relpath(p, root).split(os.sep) for p in good]
        self.classes = sorted({f[0] for f in first}) if all(len(f) > 1 for f in first) else []
        self.labels = [self.classes.index(f[0]) if self.classes else 0 for f in first]
        self.paths, self.size, self.skipped = good, size, len(bad)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return {"image": load_image(self.paths[index], self.size),
                "label": torch.tensor(self.labels[index], dtype=torch.long)}


class NpzDataset(torch.utils.data.Dataset):
    """Arrays in an .npz: `image` as uint8 (N, H, W, C) in [0, 255] or float (N, C, H, W) in [-1, 1] (any
    C, e.g. precomputed latents), optional `label` (N,), `depth` (N, 1, H, W) or (N, H, W) in [-1, 1],
    `seg` (N, H, W). `size` resizes images (bilinear) when given and different."""

    def __init__(self, path, size=None):
        if not os.path.isfile(path):
            raise ValueError(f"npz file {path} does not exist")
        arrays = dict(np.load(path))
        if "image" not in arrays:
            raise ValueError(f"{path} has no 'image' array (it has: {', '.join(arrays) or 'nothing'})")
        img = arrays["image"]
        if img.ndim != 4:
            raise ValueError(f"'image' in {path} must be 4-D, (N, H, W, C) uint8 or (N, C, H, W) float; got shape {img.shape}")
        if img.dtype == np.uint8:
            img = img.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
        self.image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))  # (N, C, H, W)
        if size is not None and self.image.shape[-1] != size:
            self.image = F.interpolate(self.image, size=(size, size), mode="bilinear", align_corners=False)
        n = len(self.image)
        self.extra = {}
        for k in ("label", "depth", "seg"):
            if k in arrays:
                if len(arrays[k]) != n:
                    raise ValueError(f"'{k}' in {path} has {len(arrays[k])} entries but 'image' has {n}")
                a = torch.from_numpy(arrays[k])
                self.extra[k] = a.long() if k in ("label", "seg") else (a[:, None] if a.ndim == 3 else a).float()
        self.extra.setdefault("label", torch.zeros(n, dtype=torch.long))

    def __len__(self):
        return len(self.image)

    def __getitem__(self, index):
        return {"image": self.image[index], **{k: v[index] for k, v in self.extra.items()}}


def build_dataset(data, size, split="train", seed=0):
    """"shapes", a folder of images, or an .npz file -> a Dataset of dicts (see the module docstring)."""
    if data == "shapes":
        return Shapes(size, split, seed)
    if str(data).endswith(".npz"):
        return NpzDataset(data, size)
    if os.path.isdir(data):
        return ImageFolder(data, size)
    raise ValueError(f"--data {data!r} does not exist: pass 'shapes', a folder of images, or an .npz file")


def dataset_info(ds):
    """What train.py needs to size a model: channels, number of classes, and which modalities exist."""
    item = ds[0]
    if isinstance(ds, Shapes):
        num_classes = NUM_CLASSES
    elif isinstance(ds, ImageFolder):
        num_classes = len(ds.classes)
    else:
        num_classes = int(ds.extra["label"].max()) + 1
    return {"channels": item["image"].shape[0], "num_classes": num_classes,
            "has_depth": "depth" in item, "has_seg": "seg" in item}


def preview(size, n, seed, split):
    """A grid: one item per row, image | depth | seg, as uint8 (H, W, 3)."""
    ds = Shapes(size, split, seed)
    seg_colors = np.array([[0, 0, 0], [230, 80, 80], [80, 200, 90], [80, 120, 230], [230, 200, 60]], np.uint8)
    rows = []
    for i in range(n):
        img, disp, seg = ds.raw(i)
        d = np.repeat(((disp.astype(np.float32) + 1) * 127.5).astype(np.uint8)[..., None], 3, -1)
        rows.append(np.concatenate([img, d, seg_colors[seg]], 1))
    return np.concatenate(rows, 0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Preview or time the shapes data.")
    p.add_argument("--out", default="shapes.png")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=sorted(SPLIT_IDS))
    p.add_argument("--bench", action="store_true", help="print render and cached throughput")
    a = p.parse_args()
    if a.bench:
        ds = Shapes(a.size, a.split, a.seed)
        t0 = time.time()
        for i in range(500):
            ds[i]
        t1 = time.time()
        for i in range(500):
            ds[i]
        print(f"{a.size}px: {500 / (t1 - t0):.0f} items/s rendered, {500 / (time.time() - t1):.0f} items/s cached")
    else:
        Image.fromarray(preview(a.size, a.n, a.seed, a.split)).save(a.out)
        print(f"wrote {a.out}: image | depth | seg for {a.n} {a.split} items at {a.size}px")
