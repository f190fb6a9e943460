"""
The built-in "shapes" data: procedural RGB-D scenes with an exact depth map, segmentation and label.

No data can be downloaded here, so the default dataset is rendered on the fly: 1-3 primitives
(sphere, box, cylinder, cone) standing on a floor in front of a back wall, seen by a pinhole camera,
ray-traced analytically per pixel. Each scene gives an RGB image, an exact depth map, a per-pixel
segmentation and an image-level label -- the modalities MT-Diffusion and JointNet model jointly.
data.py serves it as `--data shapes`, beside image folders and .npz arrays. This file imports
nothing of the project: only numpy, torch and PIL.

What is here:
    scene(seed, split, index)       the parameters of one scene, a plain dict (deterministic)
    render(scene, size)             numpy image (H,W,3) in [0,1], metric depth z (H,W), seg (H,W)
    depth_to_disparity / disparity_to_depth   the FIXED map between metric z and the [-1,1] depth channel
    label_from_seg(seg)             the image-level label of a seg map
    Shapes(size, split, seed)       torch Dataset of rendered scenes, cached in memory after first use
    preview(ds)                     uint8 grid of image | depth | seg per item, of any dataset
    throughput(size)                the render speed, items per CPU-second

Every item is a dict of tensors (the item format data.py describes for every dataset):
    image  float32 (3,H,W) in [-1,1]
    depth  float32 (1,H,W) in [-1,1]         normalised disparity: near = +1 (bright), the back wall = -1
    seg    int64   (H,W)                     0 = background, 1..4 = primitive type (CLASS_NAMES[k - 1])
    label  int64   ()                        image-level class 0..3

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

Run `python shapes.py --out shapes.png --size 64` for a preview grid (image | depth | seg per item),
`python shapes.py --bench` for the render speed.

Differences from the papers: the papers train on real photographs with depth from a monocular depth
network (JointNet) or on multi-modal benchmarks (MT-Diffusion); here the depth and segmentation are
exact because the scenes are synthetic.
"""
import argparse
import functools
import math
import time

import numpy as np
import torch
from PIL import Image

CLASS_NAMES = ("sphere", "box", "cylinder", "cone")
NUM_CLASSES = len(CLASS_NAMES)  # image-level labels 0..3
SEG_CLASSES = NUM_CLASSES + 1  # seg values 0 (background) .. 4

# Camera and world, in scene units. Depth is normalised with these FIXED constants for every sample.
FOV_DEG = 45.0
CAM_HEIGHT = 1.0  # the floor is the plane y = -CAM_HEIGHT
Z_WALL = 8.0  # the back wall is the plane z = Z_WALL
Z_NEAR, Z_FAR = 2.4, 8.0  # disparity 1/Z_NEAR -> +1, 1/Z_FAR -> -1 (the nearest floor pixel is at z ~ 2.43)
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
    """The parameters of scene `index` of `split`: wall and floor colours, light direction, primitives.

    Sphere: center, radius. Box: center, half (half extents before rotation), angle (about the
    vertical axis). Cylinder and cone: base (centre of the bottom disc), radius, height. Every
    object also has kind (a CLASS_NAMES entry) and color (RGB albedo in [0,1]); `light` is the
    unit vector towards the light, wall_color and floor_color are RGB albedos.
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
                   "angle": u(0.3, math.pi / 2 - 0.3)}  # two faces always visible
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
    return np.where((disc >= 0) & (t > 0), t, np.inf)


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
def _camera(size, aa):
    """Everything about a frame that no scene changes, as read-only arrays of shape (S, size, size),
    S = 1 + aa^2 ray sets (pixel centres, then the aa x aa sub-samples):
    ray directions (x, y, 1), the background's depth t and id (0 wall, 1 floor), and the wall's
    vertical gradient and the floor's fade with distance (each 0 off its own surface)."""
    half = math.tan(math.radians(FOV_DEG) / 2)
    offsets = [(0.5, 0.5)] + [((i + 0.5) / aa, (j + 0.5) / aa) for j in range(aa) for i in range(aa)]
    col = lambda o: ((np.arange(size) + o) / size * 2 - 1) * half  # left to right
    row = lambda o: (1 - (np.arange(size) + o) / size * 2) * half  # top to bottom
    x = np.stack([np.broadcast_to(col(ox)[None, :], (size, size)) for ox, _ in offsets])
    y = np.stack([np.broadcast_to(row(oy)[:, None], (size, size)) for _, oy in offsets])
    with np.errstate(divide="ignore"):
        t_floor = np.where(y < 0, -CAM_HEIGHT / y, np.inf)  # the plane y = -CAM_HEIGHT
    t = np.minimum(t_floor, Z_WALL)  # the wall z = Z_WALL: every ray hits something
    hit = (t_floor < Z_WALL).astype(np.int64)
    wall = np.where(hit == 0, 0.78 + 0.22 * np.clip(y * Z_WALL / 3.5, -1, 1), 0)  # lighter up high
    floor = np.where(hit == 1, 1 - 0.2 * (t - Z_NEAR) / (Z_WALL - Z_NEAR), 0)  # darker far away
    for arr in (x, y, t, hit, wall, floor):
        arr.flags.writeable = False
    return x, y, t, hit, wall, floor


def _bounding_sphere(o):
    if o["kind"] == "sphere":
        return o["center"], o["radius"]
    if o["kind"] == "box":
        return o["center"], float(np.linalg.norm(o["half"]))
    return o["base"] + [0.0, o["height"] / 2, 0.0], math.hypot(o["radius"], o["height"] / 2)


def _pixel_window(o, size):
    """Rows r0:r1 and columns c0:c1 that can see object o: its bounding sphere's box, projected."""
    c, R = _bounding_sphere(o)
    z0, z1 = c[2] - R, c[2] + R
    if z0 <= 1e-6:  # reaches the camera plane: test every pixel
        return 0, size, 0, size
    lo = lambda a: a / z0 if a < 0 else a / z1  # the smallest a / z over z in [z0, z1]
    hi = lambda a: a / z0 if a > 0 else a / z1  # the largest
    scale = size / (2 * math.tan(math.radians(FOV_DEG) / 2))  # image-plane units -> pixels
    clamp = lambda i: min(max(i, 0), size)
    r0, r1 = size / 2 - hi(c[1] + R) * scale, size / 2 - lo(c[1] - R) * scale  # rows grow downwards
    c0, c1 = size / 2 + lo(c[0] - R) * scale, size / 2 + hi(c[0] + R) * scale
    return clamp(math.floor(r0) - 1), clamp(math.ceil(r1) + 1), clamp(math.floor(c0) - 1), clamp(math.ceil(c1) + 1)


def render(scene, size, aa=2):
    """Ray-trace a scene: image (H,W,3) float32 in [0,1], depth z (H,W) float32, seg (H,W) int64.

    The image averages aa x aa samples per pixel (aa=1 shades exactly at pixel centres); depth
    and seg are exact at pixel centres.
    """
    x, y, t_bg, hit_bg, wall, floor = _camera(size, aa)  # (S, size, size) each, S = 1 + aa^2
    objects = scene["objects"]
    t, hit = t_bg.copy(), hit_bg.copy()  # 0 = wall, 1 = floor, 2 + i = object i
    for i, o in enumerate(objects):
        r0, r1, c0, c1 = _pixel_window(o, size)  # only rays that can reach the object are traced
        t_o = HIT[o["kind"]](o, x[:, r0:r1, c0:c1], y[:, r0:r1, c0:c1])
        t_win, hit_win = t[:, r0:r1, c0:c1], hit[:, r0:r1, c0:c1]  # views into t and hit
        closer = t_o < t_win
        hit_win[closer], t_win[closer] = 2 + i, t_o[closer]
    x, y, t, hit = x.reshape(-1), y.reshape(-1), t.reshape(-1), hit.reshape(-1)  # (P,)

    light = scene["light"]
    lambert = lambda n: AMBIENT + (1 - AMBIENT) * np.maximum(n @ light, 0)  # Lambertian shading
    shade = lambert(np.array([0.0, 0.0, -1.0])) * wall + lambert(np.array([0.0, 1.0, 0.0])) * floor
    shade = shade.reshape(-1)  # (P,), background only; object pixels are shaded next
    for i, o in enumerate(objects):
        idx = np.flatnonzero(hit == 2 + i)
        if idx.size:
            p = np.stack([x[idx] * t[idx], y[idx] * t[idx], t[idx]], -1)  # (M, 3) hit points
            shade[idx] = lambert(NORMAL[o["kind"]](o, p))
    albedo = np.stack([scene["wall_color"], scene["floor_color"]] + [o["color"] for o in objects])
    rgb = (albedo[hit] * shade[:, None]).reshape(1 + aa * aa, size, size, 3)

    seg_of_hit = np.array([0, 0] + [1 + CLASS_NAMES.index(o["kind"]) for o in objects])
    centre = slice(0, size * size)  # the first ray set holds the pixel centres
    return {"image": np.clip(rgb[1:].sum(0) / (aa * aa), 0, 1).astype(np.float32),
            "depth": t[centre].reshape(size, size).astype(np.float32),
            "seg": seg_of_hit[hit[centre]].reshape(size, size).astype(np.int64)}


def label_from_seg(seg):
    """The image-level class: the primitive type covering the most pixels (ties -> lower id)."""
    counts = np.bincount(np.asarray(seg).reshape(-1), minlength=SEG_CLASSES)[1:]
    return int(counts.argmax())


# -----------------------------------------------------------------------------
# The dataset

def _check_size(size, lo=1, hi=None):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < lo or (hi and size > hi):
        bounds = f"between {lo} and {hi}" if hi else f"at least {lo}"
        raise ValueError(f"size must be an integer {bounds}, got {size!r}")
    return int(size)


class Shapes(torch.utils.data.Dataset):
    """Procedural RGB-D scenes: item i of (seed, split) is always the same image, depth, seg and label.

    Items are stored after their first render (image uint8, depth float16, seg uint8) and every
    item, first or cached, is returned from that stored form, so the two never differ. A full
    cache takes about 6.5 KB per item at 32 px (330 MB for the 50,000 train items; 4x that at
    64 px), and with DataLoader workers each worker keeps its own; pass cache=False to keep none.
    """
    channels, num_classes, has_depth, has_seg = 3, NUM_CLASSES, True, True

    def __init__(self, size=32, split="train", seed=0, length=None, cache=True):
        self.size = _check_size(size, MIN_SIZE, MAX_SIZE)
        _check_split(split)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split, self.seed = split, int(seed)
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        self.cache = {} if cache else None

    def __len__(self):
        return self.length

    def _stored(self, index):
        """Render item `index` and quantise it to the form kept in memory."""
        out = render(scene(self.seed, self.split, index), self.size)
        image = np.round(out["image"].transpose(2, 0, 1) * 255).astype(np.uint8)  # (3, H, W)
        depth = depth_to_disparity(out["depth"]).astype(np.float16)[None]  # (1, H, W)
        return image, depth, out["seg"].astype(np.uint8), label_from_seg(out["seg"])

    def __getitem__(self, index):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for a Shapes dataset of length {self.length}")
        index = int(index) % self.length
        stored = self.cache.get(index) if self.cache is not None else None
        if stored is None:
            stored = self._stored(index)
            if self.cache is not None:
                self.cache[index] = stored
        image, depth, seg, label = stored
        return {"image": torch.from_numpy(image).float() / 127.5 - 1,  # (3, H, W) in [-1, 1]
                "depth": torch.from_numpy(depth).float(),  # (1, H, W) in [-1, 1]
                "seg": torch.from_numpy(seg).long(),  # (H, W)
                "label": torch.tensor(label)}  # ()


# -----------------------------------------------------------------------------
# Preview grid and speed

SEG_COLORS = np.array([[0, 0, 0], [230, 80, 60], [70, 140, 230], [90, 200, 90], [240, 200, 50]], np.uint8)


def preview(ds, n=8, cols=4):
    """uint8 (H,W,3) grid: per item, image | depth | seg side by side (depth and seg when present)."""
    cells = []
    for i in range(min(n, len(ds))):
        item = ds[i]
        to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        parts = [to_u8(item["image"][:3]).transpose(1, 2, 0)]  # (H, W, 3); first 3 channels of latents
        if parts[0].shape[-1] == 1:
            parts[0] = np.repeat(parts[0], 3, -1)
        if "depth" in item:
            parts.append(np.repeat(to_u8(item["depth"]).transpose(1, 2, 0), 3, -1))
        if "seg" in item:
            parts.append(SEG_COLORS[item["seg"].numpy() % len(SEG_COLORS)])
        cells.append(np.concatenate(parts, 1))
    while len(cells) % cols:
        cells.append(np.zeros_like(cells[0]))
    pad = lambda c: np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255)
    rows = [np.concatenate([pad(c) for c in cells[r:r + cols]], 1) for r in range(0, len(cells), cols)]
    return np.concatenate(rows, 0)


def throughput(size=32, n=1000):
    """Items per CPU-second of a fresh Shapes dataset (first render), then of the cached second pass."""
    ds = Shapes(size, length=n)
    speeds = []
    for _ in range(2):
        t0 = time.process_time()  # CPU time of this process: fair on a busy machine
        for i in range(n):
            ds[i]
        speeds.append(n / (time.process_time() - t0))
    return speeds


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Preview the shapes data as a PNG grid, or time its renderer.")
    p.add_argument("--out", default="shapes.png", help="where to write the preview grid")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--split", default="train", choices=sorted(SPLIT_IDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=16, help="number of items in the grid")
    p.add_argument("--bench", action="store_true", help="print render speed at --size instead")
    args = p.parse_args()
    if args.bench:
        first, cached = throughput(args.size)
        print(f"Shapes at {args.size}px, one process: {first:.0f} items/s first pass, {cached:.0f} items/s cached")
    else:
        ds = Shapes(args.size, args.split, args.seed)
        Image.fromarray(preview(ds, args.n)).save(args.out)
        print(f"wrote {args.out}: {min(args.n, len(ds))} items of shapes ({args.split} split, seed {args.seed}, "
              f"{args.size} px)")
