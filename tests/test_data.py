"""Tests of data.py: the shapes renderer against closed-form geometry, the datasets' contracts, and
image folders / .npz files written to pytest's tmp_path."""
import math
import os
import runpy
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402


def pixel_dirs(size):
    """Ray directions (u, v, 1) through pixel centres, written out independently of data.py."""
    half = math.tan(math.radians(data.FOV_DEG) / 2)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.broadcast_to(c[None, :] * half, (size, size)), np.broadcast_to(-c[:, None] * half, (size, size))


def hit_points(depth):
    u, v = pixel_dirs(depth.shape[0])
    return np.stack([u * depth, v * depth, depth], -1).astype(np.float64)  # (H, W, 3)


def empty_scene():
    return {"light": np.array([0.0, 0.0, -1.0]), "wall_color": np.array([0.8, 0.8, 0.8]),
            "floor_color": np.array([0.4, 0.4, 0.4]), "objects": []}


def solid_margin(o, p):
    """<= 0 inside the closed solid, 0 on its surface (an implicit function, not data.py's code)."""
    if o["kind"] == "sphere":
        return np.linalg.norm(p - o["center"], axis=-1) - o["radius"]
    if o["kind"] == "box":
        q = p - o["center"]
        c, s = math.cos(o["angle"]), math.sin(o["angle"])
        local = np.stack([c * q[..., 0] - s * q[..., 2], q[..., 1], s * q[..., 0] + c * q[..., 2]], -1)
        return (np.abs(local) - o["half"]).max(-1)
    b, r, h = o["base"], o["radius"], o["height"]
    radial = np.hypot(p[..., 0] - b[0], p[..., 2] - b[2])
    below, above = b[1] - p[..., 1], p[..., 1] - b[1] - h
    side = radial - r if o["kind"] == "cylinder" else radial - r * (b[1] + h - p[..., 1]) / h
    return np.maximum(side, np.maximum(below, above))


# -----------------------------------------------------------------------------
# Shapes: geometry

def test_depth_disparity_map_is_fixed_and_invertible():
    z = np.linspace(data.Z_NEAR, data.Z_FAR, 50)
    d = data.depth_to_disparity(z)
    assert d[0] == pytest.approx(1.0) and d[-1] == pytest.approx(-1.0)
    assert np.all(np.diff(d) < 0)  # near is bright
    # disparity is affine in 1/z: the midpoint of 1/z maps to 0
    assert data.depth_to_disparity(np.array(2 / (1 / data.Z_NEAR + 1 / data.Z_FAR))) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(data.disparity_to_depth(d), z, rtol=1e-12)
    t = torch.tensor([-3.0, 0.0, 3.0])  # tensors work, and out-of-range values clip to the ends
    np.testing.assert_allclose(data.disparity_to_depth(t).numpy(),
                               [data.Z_FAR, 2 / (1 / data.Z_NEAR + 1 / data.Z_FAR), data.Z_NEAR], rtol=1e-6)


def test_background_depth_is_wall_or_floor_plane():
    size = 24
    out = data.render(empty_scene(), size)
    u, v = pixel_dirs(size)
    expected = np.where(v < 0, np.minimum(data.CAM_HEIGHT / np.maximum(-v, 1e-12), data.Z_WALL), data.Z_WALL)
    np.testing.assert_allclose(out["depth"], expected, rtol=1e-6)
    assert (out["seg"] == 0).all()
    assert (out["depth"][: size // 2] == data.Z_WALL).all()  # the top half is wall
    assert out["depth"][-1].max() < data.Z_WALL  # the bottom row is floor


def test_sphere_on_the_optical_axis():
    # size 33: the centre pixel's ray is exactly (0, 0, 1), so its depth is z_c - r.
    sc = empty_scene()
    sc["objects"] = [{"kind": "sphere", "center": np.array([0.0, 0.0, 5.0]), "radius": 1.0,
                      "color": np.array([1.0, 0.0, 0.0])}]
    out = data.render(sc, 33)
    assert out["depth"][16, 16] == pytest.approx(4.0, abs=1e-6)
    assert out["seg"][16, 16] == 1 + data.CLASS_NAMES.index("sphere")
    # a pixel hits the sphere iff its ray passes within r of the centre: |d x c| / |d| <= r
    u, v = pixel_dirs(33)
    d = np.stack([u, v, np.ones_like(u)], -1)
    dist = np.linalg.norm(np.cross(d, [0.0, 0.0, 5.0]), axis=-1) / np.linalg.norm(d, axis=-1)
    clear = np.abs(dist - 1.0) > 1e-3
    np.testing.assert_array_equal((out["seg"] == 1)[clear], (dist <= 1.0)[clear])
    p = hit_points(out["depth"])[out["seg"] == 1]
    np.testing.assert_allclose(np.linalg.norm(p - [0, 0, 5], axis=-1), 1.0, atol=1e-5)
    # the front of the sphere faces the light: brighter than ambient alone
    assert out["image"][16, 16, 0] > data.AMBIENT + 0.3


def caps_scene():
    """Primitives seen from above and below, so caps, bases and top faces are visible."""
    sc = empty_scene()
    sc["light"] = np.array([0.5, 0.7, -0.5]) / np.linalg.norm([0.5, 0.7, -0.5])
    sc["objects"] = [
        {"kind": "cylinder", "base": np.array([0.0, -1.0, 4.0]), "radius": 0.7, "height": 0.6},
        {"kind": "cone", "base": np.array([0.9, 0.3, 4.5]), "radius": 0.6, "height": 1.0},
        {"kind": "box", "center": np.array([-1.2, -0.7, 4.5]), "half": np.array([0.3, 0.3, 0.3]), "angle": 0.5},
        {"kind": "sphere", "center": np.array([-0.8, 0.9, 5.0]), "radius": 0.5}]
    for o in sc["objects"]:
        o["color"] = np.array([0.5, 0.5, 0.5])
    return sc


@pytest.mark.parametrize("index", [*range(6), "caps"])
def test_every_pixel_is_the_first_surface_along_its_ray(index):
    size = 20 if index != "caps" else 48
    sc = data.scene(3, "train", index) if index != "caps" else caps_scene()
    out = data.render(sc, size)
    if index == "caps":  # the cylinder's top cap and the cone's base disc are in view
        p = hit_points(out["depth"])
        cyl, cone = out["seg"] == 3, out["seg"] == 4
        assert (np.abs(p[cyl][:, 1] + 0.4) < 1e-6).sum() > 20 and (np.abs(p[cone][:, 1] - 0.3) < 1e-6).sum() > 5
    p = hit_points(out["depth"])  # (H, W, 3)
    kinds = np.array([1 + data.CLASS_NAMES.index(o["kind"]) for o in sc["objects"]])
    margins = np.stack([solid_margin(o, p) for o in sc["objects"]])  # (n_obj, H, W)
    on_obj = out["seg"] > 0
    # an object pixel lies on the surface of an object of the labelled type
    on_surface = np.abs(margins) < 1e-5
    typed = (on_surface & (kinds[:, None, None] == out["seg"][None])).any(0)
    assert typed[on_obj].all()
    # a background pixel lies on the floor or the wall
    bg = ~on_obj
    assert np.all(np.isclose(p[bg][:, 1], -data.CAM_HEIGHT, atol=1e-5) | np.isclose(p[bg][:, 2], data.Z_WALL))
    # nothing is in front of the hit: 40 points along each ray before it are outside every solid
    for frac in np.linspace(0.02, 0.999, 40):
        m = np.stack([solid_margin(o, p * frac) for o in sc["objects"]])
        assert (m > -1e-6).all(), f"a solid lies in front of the rendered surface at fraction {frac}"


@pytest.mark.parametrize("index", [0, 1, "caps"])
def test_object_shading_is_lambert_with_the_geometric_normal(index):
    # aa=1 shades exactly at pixel centres; the normal is the numerical gradient of the solid's implicit function
    sc = data.scene(4, "test", index) if index != "caps" else caps_scene()
    out = data.render(sc, 32, aa=1)
    p = hit_points(out["depth"])
    ok = total = 0
    for o in sc["objects"]:
        mine = np.abs(solid_margin(o, p)) < 1e-5
        q = p[mine]  # (M, 3)
        grad = np.stack([(solid_margin(o, q + e) - solid_margin(o, q - e)) / 2e-6 for e in np.eye(3) * 1e-6], -1)
        n = grad / np.linalg.norm(grad, axis=-1, keepdims=True)
        expected = o["color"] * (data.AMBIENT + (1 - data.AMBIENT) * np.maximum(n @ sc["light"], 0))[:, None]
        ok += (np.abs(out["image"][mine] - expected).max(-1) < 1e-3).sum()
        total += mine.sum()
    assert total > 50 and ok >= 0.97 * total  # misses only on edges, where the gradient is ambiguous


def test_windowed_tracing_matches_tracing_every_pixel(monkeypatch):
    scenes = [data.scene(1, "test", i) for i in range(25)]
    edge = empty_scene()  # objects at the left/right/top edges of the view and near the camera
    edge["objects"] = [{"kind": "cone", "base": np.array([-1.6, -1.0, 3.0]), "radius": 0.6, "height": 1.6,
                        "color": np.array([0.2, 0.4, 0.9])},
                       {"kind": "box", "center": np.array([1.5, 0.2, 3.4]), "half": np.array([0.5, 1.2, 0.5]),
                        "angle": 0.4, "color": np.array([0.9, 0.5, 0.1])},
                       {"kind": "cylinder", "base": np.array([0.0, -1.0, 2.5]), "radius": 0.4, "height": 3.0,
                        "color": np.array([0.2, 0.7, 0.3])}]
    scenes.append(edge)
    for size in (16, 33):
        windowed = [data.render(sc, size) for sc in scenes]
        monkeypatch.setattr(data, "_pixel_window", lambda o, s: (0, s, 0, s))
        full = [data.render(sc, size) for sc in scenes]
        monkeypatch.undo()
        for a, b in zip(windowed, full):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert (full[-1]["seg"] > 0).sum() > 0


# -----------------------------------------------------------------------------
# Shapes: the dataset

def test_items_are_deterministic_across_objects_and_cache():
    a, b = data.Shapes(16, seed=5, length=30), data.Shapes(16, seed=5, length=30, cache=False)
    for i in (0, 7, 29):
        x, y, z = a[i], b[i], a[i]  # z comes from a's cache
        for k in x:
            assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k])
    assert torch.equal(a[-1]["image"], a[29]["image"])
    assert data.scene(5, "train", 7)["light"].tolist() == data.scene(5, "train", 7)["light"].tolist()
    c = data.Shapes(16, seed=6, length=30)
    assert not torch.equal(a[0]["image"], c[0]["image"])  # the seed matters
    with pytest.raises(IndexError):
        a[30]


def test_item_matches_a_fresh_render():
    ds = data.Shapes(32, split="test", seed=2, length=10)
    item, ref = ds[4], data.render(data.scene(2, "test", 4), 32)
    np.testing.assert_allclose(item["image"].numpy(), ref["image"].transpose(2, 0, 1) * 2 - 1, atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(item["depth"][0].numpy(), data.depth_to_disparity(ref["depth"]), atol=1e-3)
    assert torch.equal(item["seg"], torch.from_numpy(ref["seg"]))
    z = data.disparity_to_depth(item["depth"][0].double()).numpy()  # metric depth back, to float16 accuracy
    np.testing.assert_allclose(z, ref["depth"], rtol=5e-3)


def test_train_and_test_splits_share_no_image():
    n = 200
    train, test = data.Shapes(16, "train", length=n), data.Shapes(16, "test", length=n)
    hashes = lambda ds: {ds[i]["image"].numpy().tobytes() for i in range(n)}
    h_train, h_test = hashes(train), hashes(test)
    assert len(h_train) == n and len(h_test) == n  # no repeats inside a split either
    assert not h_train & h_test


def test_label_is_the_majority_primitive_and_ranges_hold():
    ds = data.Shapes(16, seed=1, length=120)
    labels, multi = [], 0
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 16, 16)
        assert it["depth"].dtype == torch.float32 and it["depth"].shape == (1, 16, 16)
        assert it["seg"].dtype == torch.int64 and it["seg"].shape == (16, 16)
        assert it["label"].dtype == torch.int64 and it["label"].shape == ()
        assert it["image"].min() >= -1 and it["image"].max() <= 1
        assert it["depth"].min() >= -1 and it["depth"].max() <= 1
        seg = it["seg"].numpy()
        assert seg.min() >= 0 and seg.max() < data.SEG_CLASSES
        counts = [(seg == k + 1).sum() for k in range(data.NUM_CLASSES)]
        assert max(counts) > 0  # at least one primitive is visible
        assert it["label"].item() == counts.index(max(counts))  # first maximum: ties -> lower id
        labels.append(it["label"].item())
        multi += len(np.unique(seg)) > 2
    assert set(labels) == set(range(data.NUM_CLASSES))  # every class occurs
    assert multi > 20  # many scenes show more than one primitive
    assert len(data.CLASS_NAMES) == data.NUM_CLASSES == data.SEG_CLASSES - 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))  # the default collate works
    assert batch["image"].shape == (8, 3, 16, 16) and batch["label"].shape == (8,)


def test_depth_channel_is_near_bright():
    ds = data.Shapes(32, length=5)
    for i in range(5):
        it = ds[i]
        wall = (it["seg"] == 0) & (torch.arange(32)[:, None] < 8)  # top rows of background: the wall
        assert torch.all(it["depth"][0][wall] == -1)  # Z_WALL = Z_FAR -> -1
        assert it["depth"][0][it["seg"] > 0].mean() > -0.9


@pytest.mark.parametrize("size", [16, 128])
def test_sizes_at_the_ends_of_the_range_work(size):
    it = data.Shapes(size, length=1)[0]
    assert it["image"].shape == (3, size, size) and (it["seg"] > 0).any()


@pytest.mark.parametrize("bad", [dict(size=8), dict(size=256), dict(size=32.0), dict(size="32"),
                                 dict(split="val"), dict(seed=-1), dict(length=0)])
def test_bad_shapes_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        data.Shapes(**{"size": 32, **bad})


# -----------------------------------------------------------------------------
# ImageFolder

def save(path, im, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, **kw)
    return path


def single(path, size=8):
    """The one image of a folder holding only `path`'s image, as (3, size, size)."""
    return data.ImageFolder(os.path.dirname(path), size)[0]["image"]


def test_folder_modes_convert_to_rgb(tmp_path):
    grey = single(save(str(tmp_path / "l/a.png"), Image.new("L", (12, 12), 64)))
    np.testing.assert_allclose(grey.numpy(), 64 / 127.5 - 1, atol=1e-5)
    # RGBA: red at alpha a over white -> (1, 1 - a, 1 - a) in [0, 1]
    rgba = single(save(str(tmp_path / "rgba/a.png"), Image.new("RGBA", (12, 12), (255, 0, 0, 128))))
    a = 128 / 255
    np.testing.assert_allclose(rgba[:, 4, 4].numpy(), np.array([1, 1 - a, 1 - a]) * 2 - 1, atol=1e-4)
    la = single(save(str(tmp_path / "la/a.png"), Image.new("LA", (12, 12), (30, 0))))  # fully transparent
    np.testing.assert_allclose(la.numpy(), 1.0, atol=1e-5)
    p = Image.new("P", (12, 12), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal = single(save(str(tmp_path / "p/a.png"), p))
    np.testing.assert_allclose(pal[:, 0, 0].numpy(), np.array([10, 200, 30]) / 127.5 - 1, atol=1e-5)
    cmyk = single(save(str(tmp_path / "cmyk/a.jpg"), Image.new("CMYK", (16, 16), (255, 0, 0, 0)), quality=100))
    np.testing.assert_allclose(cmyk[:, 4, 4].numpy(), [-1, 1, 1], atol=0.05)  # pure cyan


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    a = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))  # a horizontal ramp
    path = save(str(tmp_path / "g16/a.png"), Image.fromarray(a))
    assert Image.open(path).mode == "I;16"
    im = single(path, size=16)
    np.testing.assert_allclose(im[0].numpy(), a / 65535 * 2 - 1, atol=1e-4)  # exact at the same size
    assert torch.equal(im[0], im[1]) and torch.equal(im[0], im[2])
    dark = single(save(str(tmp_path / "dark/a.png"), Image.fromarray(np.full((10, 10), 1000, np.uint16))))
    np.testing.assert_allclose(dark.numpy(), 1000 / 65535 * 2 - 1, atol=1e-4)  # near black, not white


def test_center_crop_then_resize(tmp_path):
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20], a[:, 20:40], a[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    im = single(save(str(tmp_path / "wide/a.png"), Image.fromarray(a)), size=16)
    assert im.shape == (3, 16, 16)
    np.testing.assert_allclose(im[:, 2:-2, 2:-2].numpy(), np.array([-1, 1, -1])[:, None, None] * np.ones((1, 12, 12)),
                               atol=0.02)


def test_bad_files_skipped_with_one_warning(tmp_path):
    for i, ext in enumerate(["png", "jpg", "webp", "bmp"]):
        save(str(tmp_path / f"ok{i}.{ext}"), Image.new("RGB", (24, 24), (10 * i, 50, 90)))
    buf = tmp_path / "ok0.png"
    (tmp_path / "truncated.png").write_bytes(buf.read_bytes()[:-40])
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    (tmp_path / "truncated.jpg").write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.ImageFolder(str(tmp_path), 16)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "3 unreadable" in msg and "notes.jpg" in msg and "truncated" in msg
    assert len(ds) == 4 and ds.num_classes == 0
    assert all(ds[i]["image"].shape == (3, 16, 16) and ds[i]["label"].item() == 0 for i in range(4))


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images found in"):
        data.ImageFolder(str(tmp_path), 16)
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(ValueError, match="expected .png"):
        data.ImageFolder(str(tmp_path), 16)
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolder(str(tmp_path / "missing"), 16)
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable images"):
        data.ImageFolder(str(tmp_path), 16)


def test_subfolders_are_classes(tmp_path):
    for name, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            save(str(tmp_path / name / "deeper" / f"{i}.png"), Image.new("RGB", (8, 8), (i, 0, 0)))
    ds = data.ImageFolder(str(tmp_path), 8)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    labels = sorted(ds[i]["label"].item() for i in range(len(ds)))
    assert labels == [0, 0, 0, 1, 1]
    assert data.dataset_info(ds) == {"channels": 3, "num_classes": 2, "has_depth": False, "has_seg": False,
                                     "size": 8}
    save(str(tmp_path / "loose.png"), Image.new("RGB", (8, 8)))  # a loose file: no classes any more
    ds = data.ImageFolder(str(tmp_path), 8)
    assert ds.num_classes == 0 and {ds[i]["label"].item() for i in range(len(ds))} == {0}


# -----------------------------------------------------------------------------
# NpzDataset

def test_npz_uint8_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    seg = rng.integers(0, 5, (5, 8, 8))
    depth = rng.uniform(-1, 1, (5, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", image=img, label=np.array([0, 2, 1, 2, 0]), seg=seg, depth=depth,
             extra=np.arange(5.0))
    ds = data.NpzDataset(str(tmp_path / "d.npz"))
    it = ds[3]
    np.testing.assert_allclose(it["image"].numpy(), img[3].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert it["label"].item() == 2 and it["label"].dtype == torch.int64
    assert torch.equal(it["seg"], torch.from_numpy(seg[3])) and it["depth"].shape == (1, 8, 8)
    assert it["extra"].item() == 3.0
    assert data.dataset_info(ds) == {"channels": 3, "num_classes": 3, "has_depth": True, "has_seg": True,
                                     "size": 8}
    small = data.NpzDataset(str(tmp_path / "d.npz"), size=4)[3]
    assert small["image"].shape == (3, 4, 4) and small["depth"].shape == (1, 4, 4) and small["seg"].shape == (4, 4)
    assert set(small["seg"].unique().tolist()) <= set(seg[3].reshape(-1).tolist())  # ids are not blended
    np.testing.assert_allclose(small["image"].mean().item(), it["image"].mean().item(), atol=0.05)


def test_npz_float_channels_first_any_channels(tmp_path):
    lat = np.random.default_rng(1).normal(0, 0.3, (4, 4, 6, 6)).clip(-1, 1).astype(np.float32)
    np.savez(tmp_path / "lat.npz", image=lat)
    ds = data.build_dataset(str(tmp_path / "lat.npz"), None)
    assert torch.equal(ds[2]["image"], torch.from_numpy(lat[2])) and ds[2]["label"].item() == 0
    assert data.dataset_info(ds)["channels"] == 4 and data.dataset_info(ds)["num_classes"] == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 4, 6, 6)


@pytest.mark.parametrize("arrays, match", [
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), "no 'image' array"),
    (dict(image=np.zeros((2, 8, 8), np.uint8)), "must be 4-D"),
    (dict(image=np.zeros((2, 3, 8, 8), np.uint8)), "channels last"),
    (dict(image=np.zeros((2, 8, 8, 3), np.float32)), "channels first"),
    (dict(image=np.zeros((2, 8, 8, 3), np.int16)), "uint8 or float"),
    (dict(image=np.zeros((2, 8, 8, 3), np.uint8), label=np.zeros(3, int)), "same first dimension"),
    (dict(image=np.zeros((2, 8, 8, 3), np.uint8), seg=np.zeros((2, 4, 4), int)), "to match 'image'"),
    (dict(image=np.zeros((2, 8, 8, 3), np.uint8), label=np.zeros(2)), "must hold integers"),
])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        data.NpzDataset(str(tmp_path / "bad.npz"))


# -----------------------------------------------------------------------------
# Entry points

def test_build_dataset_dispatch(tmp_path):
    assert isinstance(data.build_dataset("shapes", 16, "test"), data.Shapes)
    assert len(data.build_dataset("shapes", 16, "test")) == data.DEFAULT_LENGTHS["test"]
    save(str(tmp_path / "imgs/a.png"), Image.new("RGB", (8, 8)))
    assert isinstance(data.build_dataset(str(tmp_path / "imgs"), 8), data.ImageFolder)
    with pytest.raises(ValueError, match="'shapes', an existing folder of images, or a path ending in .npz"):
        data.build_dataset(str(tmp_path / "nowhere"), 16)
    with pytest.raises(ValueError, match="does not exist"):
        data.build_dataset(str(tmp_path / "nowhere.npz"), 16)
    info = data.dataset_info(torch.utils.data.Subset(data.Shapes(16, length=3), [1, 2]))
    assert info == {"channels": 3, "num_classes": 4, "has_depth": True, "has_seg": True, "size": 16}


def test_preview_cli_writes_a_grid(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid.png"
    monkeypatch.setattr(sys, "argv", ["data.py", "--out", str(out), "--size", "16", "--n", "4"])
    runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
    assert "wrote" in capsys.readouterr().out
    im = np.asarray(Image.open(out))
    assert im.shape == (18, 4 * (3 * 16 + 2), 3)  # one row of 4 cells: image | depth | seg, 1 px border
    assert im.std() > 10


def test_first_items_stacks_the_first_n_items():
    ds = data.Shapes(16, "test", seed=3, length=5)
    b = data.first_items(ds, 3)
    assert set(b) == set(ds[0]) and b["image"].shape == (3, 3, 16, 16)
    assert all(torch.equal(b[k][2], ds[2][k]) for k in b)
    assert len(data.first_items(ds, 10)["label"]) == 5  # a shorter dataset gives what it has
