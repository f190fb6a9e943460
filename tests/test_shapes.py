"""Tests of shapes.py: the renderer against closed-form geometry, the Shapes dataset's contract, and the
preview CLI."""
import math
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import shapes  # noqa: E402



def pixel_dirs(size):
    """Ray directions (u, v, 1) through pixel centres, written out independently of shapes.py."""
    half = math.tan(math.radians(shapes.FOV_DEG) / 2)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.broadcast_to(c[None, :] * half, (size, size)), np.broadcast_to(-c[:, None] * half, (size, size))


def hit_points(depth):
    u, v = pixel_dirs(depth.shape[0])
    return np.stack([u * depth, v * depth, depth], -1).astype(np.float64)  # (H, W, 3)


def empty_scene():
    return {"light": np.array([0.0, 0.0, -1.0]), "wall_color": np.array([0.8, 0.8, 0.8]),
            "floor_color": np.array([0.4, 0.4, 0.4]), "objects": []}


def solid_margin(o, p):
    """<= 0 inside the closed solid, 0 on its surface (an implicit function, not shapes.py's code)."""
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
    z = np.linspace(shapes.Z_NEAR, shapes.Z_FAR, 50)
    d = shapes.depth_to_disparity(z)
    assert d[0] == pytest.approx(1.0) and d[-1] == pytest.approx(-1.0)
    assert np.all(np.diff(d) < 0)  # near is bright
    # disparity is affine in 1/z: the midpoint of 1/z maps to 0
    assert shapes.depth_to_disparity(np.array(2 / (1 / shapes.Z_NEAR + 1 / shapes.Z_FAR))) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(shapes.disparity_to_depth(d), z, rtol=1e-12)
    t = torch.tensor([-3.0, 0.0, 3.0])  # tensors work, and out-of-range values clip to the ends
    np.testing.assert_allclose(shapes.disparity_to_depth(t).numpy(),
                               [shapes.Z_FAR, 2 / (1 / shapes.Z_NEAR + 1 / shapes.Z_FAR), shapes.Z_NEAR], rtol=1e-6)


def test_background_depth_is_wall_or_floor_plane():
    size = 24
    out = shapes.render(empty_scene(), size)
    u, v = pixel_dirs(size)
    expected = np.where(v < 0, np.minimum(shapes.CAM_HEIGHT / np.maximum(-v, 1e-12), shapes.Z_WALL), shapes.Z_WALL)
    np.testing.assert_allclose(out["depth"], expected, rtol=1e-6)
    assert (out["seg"] == 0).all()
    assert (out["depth"][: size // 2] == shapes.Z_WALL).all()  # the top half is wall
    assert out["depth"][-1].max() < shapes.Z_WALL  # the bottom row is floor


def test_sphere_on_the_optical_axis():
    # size 33: the centre pixel's ray is exactly (0, 0, 1), so its depth is z_c - r.
    sc = empty_scene()
    sc["objects"] = [{"kind": "sphere", "center": np.array([0.0, 0.0, 5.0]), "radius": 1.0,
                      "color": np.array([1.0, 0.0, 0.0])}]
    out = shapes.render(sc, 33)
    assert out["depth"][16, 16] == pytest.approx(4.0, abs=1e-6)
    assert out["seg"][16, 16] == 1 + shapes.CLASS_NAMES.index("sphere")
    # a pixel hits the sphere iff its ray passes within r of the centre: |d x c| / |d| <= r
    u, v = pixel_dirs(33)
    d = np.stack([u, v, np.ones_like(u)], -1)
    dist = np.linalg.norm(np.cross(d, [0.0, 0.0, 5.0]), axis=-1) / np.linalg.norm(d, axis=-1)
    clear = np.abs(dist - 1.0) > 1e-3
    np.testing.assert_array_equal((out["seg"] == 1)[clear], (dist <= 1.0)[clear])
    p = hit_points(out["depth"])[out["seg"] == 1]
    np.testing.assert_allclose(np.linalg.norm(p - [0, 0, 5], axis=-1), 1.0, atol=1e-5)
    # the front of the sphere faces the light: brighter than ambient alone
    assert out["image"][16, 16, 0] > shapes.AMBIENT + 0.3


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
    sc = shapes.scene(3, "train", index) if index != "caps" else caps_scene()
    out = shapes.render(sc, size)
    if index == "caps":  # the cylinder's top cap and the cone's base disc are in view
        p = hit_points(out["depth"])
        cyl, cone = out["seg"] == 3, out["seg"] == 4
        assert (np.abs(p[cyl][:, 1] + 0.4) < 1e-6).sum() > 20 and (np.abs(p[cone][:, 1] - 0.3) < 1e-6).sum() > 5
    p = hit_points(out["depth"])  # (H, W, 3)
    kinds = np.array([1 + shapes.CLASS_NAMES.index(o["kind"]) for o in sc["objects"]])
    margins = np.stack([solid_margin(o, p) for o in sc["objects"]])  # (n_obj, H, W)
    on_obj = out["seg"] > 0
    # an object pixel lies on the surface of an object of the labelled type
    on_surface = np.abs(margins) < 1e-5
    typed = (on_surface & (kinds[:, None, None] == out["seg"][None])).any(0)
    assert typed[on_obj].all()
    # a background pixel lies on the floor or the wall
    bg = ~on_obj
    assert np.all(np.isclose(p[bg][:, 1], -shapes.CAM_HEIGHT, atol=1e-5) | np.isclose(p[bg][:, 2], shapes.Z_WALL))
    # nothing is in front of the hit: 40 points along each ray before it are outside every solid
    for frac in np.linspace(0.02, 0.999, 40):
        m = np.stack([solid_margin(o, p * frac) for o in sc["objects"]])
        assert (m > -1e-6).all(), f"a solid lies in front of the rendered surface at fraction {frac}"


@pytest.mark.parametrize("index", [0, 1, "caps"])
def test_object_shading_is_lambert_with_the_geometric_normal(index):
    # aa=1 shades exactly at pixel centres; the normal is the numerical gradient of the solid's implicit function
    sc = shapes.scene(4, "test", index) if index != "caps" else caps_scene()
    out = shapes.render(sc, 32, aa=1)
    p = hit_points(out["depth"])
    ok = total = 0
    for o in sc["objects"]:
        mine = np.abs(solid_margin(o, p)) < 1e-5
        q = p[mine]  # (M, 3)
        grad = np.stack([(solid_margin(o, q + e) - solid_margin(o, q - e)) / 2e-6 for e in np.eye(3) * 1e-6], -1)
        n = grad / np.linalg.norm(grad, axis=-1, keepdims=True)
        expected = o["color"] * (shapes.AMBIENT + (1 - shapes.AMBIENT) * np.maximum(n @ sc["light"], 0))[:, None]
        ok += (np.abs(out["image"][mine] - expected).max(-1) < 1e-3).sum()
        total += mine.sum()
    assert total > 50 and ok >= 0.97 * total  # misses only on edges, where the gradient is ambiguous


def test_windowed_tracing_matches_tracing_every_pixel(monkeypatch):
    scenes = [shapes.scene(1, "test", i) for i in range(25)]
    edge = empty_scene()  # objects at the left/right/top edges of the view and near the camera
    edge["objects"] = [{"kind": "cone", "base": np.array([-1.6, -1.0, 3.0]), "radius": 0.6, "height": 1.6,
                        "color": np.array([0.2, 0.4, 0.9])},
                       {"kind": "box", "center": np.array([1.5, 0.2, 3.4]), "half": np.array([0.5, 1.2, 0.5]),
                        "angle": 0.4, "color": np.array([0.9, 0.5, 0.1])},
                       {"kind": "cylinder", "base": np.array([0.0, -1.0, 2.5]), "radius": 0.4, "height": 3.0,
                        "color": np.array([0.2, 0.7, 0.3])}]
    scenes.append(edge)
    for size in (16, 33):
        windowed = [shapes.render(sc, size) for sc in scenes]
        monkeypatch.setattr(shapes, "_pixel_window", lambda o, s: (0, s, 0, s))
        full = [shapes.render(sc, size) for sc in scenes]
        monkeypatch.undo()
        for a, b in zip(windowed, full):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert (full[-1]["seg"] > 0).sum() > 0


# -----------------------------------------------------------------------------
# Shapes: the dataset

def test_items_are_deterministic_across_objects_and_cache():
    a, b = shapes.Shapes(16, seed=5, length=30), shapes.Shapes(16, seed=5, length=30, cache=False)
    for i in (0, 7, 29):
        x, y, z = a[i], b[i], a[i]  # z comes from a's cache
        for k in x:
            assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k])
    assert torch.equal(a[-1]["image"], a[29]["image"])
    assert shapes.scene(5, "train", 7)["light"].tolist() == shapes.scene(5, "train", 7)["light"].tolist()
    c = shapes.Shapes(16, seed=6, length=30)
    assert not torch.equal(a[0]["image"], c[0]["image"])  # the seed matters
    with pytest.raises(IndexError):
        a[30]


def test_item_matches_a_fresh_render():
    ds = shapes.Shapes(32, split="test", seed=2, length=10)
    item, ref = ds[4], shapes.render(shapes.scene(2, "test", 4), 32)
    np.testing.assert_allclose(item["image"].numpy(), ref["image"].transpose(2, 0, 1) * 2 - 1, atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(item["depth"][0].numpy(), shapes.depth_to_disparity(ref["depth"]), atol=1e-3)
    assert torch.equal(item["seg"], torch.from_numpy(ref["seg"]))
    z = shapes.disparity_to_depth(item["depth"][0].double()).numpy()  # metric depth back, to float16 accuracy
    np.testing.assert_allclose(z, ref["depth"], rtol=5e-3)


def test_train_and_test_splits_share_no_image():
    n = 200
    train, test = shapes.Shapes(16, "train", length=n), shapes.Shapes(16, "test", length=n)
    hashes = lambda ds: {ds[i]["image"].numpy().tobytes() for i in range(n)}
    h_train, h_test = hashes(train), hashes(test)
    assert len(h_train) == n and len(h_test) == n  # no repeats inside a split either
    assert not h_train & h_test


def test_label_is_the_majority_primitive_and_ranges_hold():
    ds = shapes.Shapes(16, seed=1, length=120)
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
        assert seg.min() >= 0 and seg.max() < shapes.SEG_CLASSES
        counts = [(seg == k + 1).sum() for k in range(shapes.NUM_CLASSES)]
        assert max(counts) > 0  # at least one primitive is visible
        assert it["label"].item() == counts.index(max(counts))  # first maximum: ties -> lower id
        labels.append(it["label"].item())
        multi += len(np.unique(seg)) > 2
    assert set(labels) == set(range(shapes.NUM_CLASSES))  # every class occurs
    assert multi > 20  # many scenes show more than one primitive
    assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES == shapes.SEG_CLASSES - 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))  # the default collate works
    assert batch["image"].shape == (8, 3, 16, 16) and batch["label"].shape == (8,)


def test_depth_channel_is_near_bright():
    ds = shapes.Shapes(32, length=5)
    for i in range(5):
        it = ds[i]
        wall = (it["seg"] == 0) & (torch.arange(32)[:, None] < 8)  # top rows of background: the wall
        assert torch.all(it["depth"][0][wall] == -1)  # Z_WALL = Z_FAR -> -1
        assert it["depth"][0][it["seg"] > 0].mean() > -0.9


@pytest.mark.parametrize("size", [16, 128])
def test_sizes_at_the_ends_of_the_range_work(size):
    it = shapes.Shapes(size, length=1)[0]
    assert it["image"].shape == (3, size, size) and (it["seg"] > 0).any()


@pytest.mark.parametrize("bad", [dict(size=8), dict(size=256), dict(size=32.0), dict(size="32"),
                                 dict(split="val"), dict(seed=-1), dict(length=0)])
def test_bad_shapes_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        shapes.Shapes(**{"size": 32, **bad})


# -----------------------------------------------------------------------------
# The preview CLI

def test_preview_cli_writes_a_grid(tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid.png"
    monkeypatch.setattr(sys, "argv", ["shapes.py", "--out", str(out), "--size", "16", "--n", "4"])
    runpy.run_path(os.path.join(ROOT, "shapes.py"), run_name="__main__")
    assert "wrote" in capsys.readouterr().out
    im = np.asarray(Image.open(out))
    assert im.shape == (18, 4 * (3 * 16 + 2), 3)  # one row of 4 cells: image | depth | seg, 1 px border
    assert im.std() > 10
