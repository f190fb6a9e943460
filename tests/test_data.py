"""Tests of data.py: the datasets' contracts, image folders / .npz files written to pytest's tmp_path, and
build_dataset's dispatch."""
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import shapes  # noqa: E402


# -----------------------------------------------------------------------------
# ImageFolder

def save(path, im, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, **kw)
    return path


def single(path, size=8):
    """The one image of a folder holding only `path`'s image, as (C, size, size): C = 1 if it is grayscale."""
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
    assert im.shape == (1, 16, 16)  # a grayscale folder has one channel
    np.testing.assert_allclose(im[0].numpy(), a / 65535 * 2 - 1, atol=1e-4)  # exact at the same size
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
    with pytest.warns(UserWarning, match="1 image\\(s\\) lie outside the class subfolders"):
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
    assert isinstance(data.build_dataset("shapes", 16, "test"), shapes.Shapes)
    assert len(data.build_dataset("shapes", 16, "test")) == shapes.DEFAULT_LENGTHS["test"]
    save(str(tmp_path / "imgs/a.png"), Image.new("RGB", (8, 8)))
    assert isinstance(data.build_dataset(str(tmp_path / "imgs"), 8), data.ImageFolder)
    with pytest.raises(ValueError, match="'shapes', an existing folder of images, or a path ending in .npz"):
        data.build_dataset(str(tmp_path / "nowhere"), 16)
    with pytest.raises(ValueError, match="does not exist"):
        data.build_dataset(str(tmp_path / "nowhere.npz"), 16)
    info = data.dataset_info(torch.utils.data.Subset(shapes.Shapes(16, length=3), [1, 2]))
    assert info == {"channels": 3, "num_classes": 4, "has_depth": True, "has_seg": True, "size": 16}


def test_first_items_stacks_the_first_n_items():
    ds = shapes.Shapes(16, "test", seed=3, length=5)
    b = data.first_items(ds, 3)
    assert set(b) == set(ds[0]) and b["image"].shape == (3, 3, 16, 16)
    assert all(torch.equal(b[k][2], ds[2][k]) for k in b)
    assert len(data.first_items(ds, 10)["label"]) == 5  # a shorter dataset gives what it has


# -----------------------------------------------------------------------------
# Channels follow the data

def gray_folder(root, n=3, mode="L"):
    """root/a and root/b, n grayscale images each (mode L, or RGB with R = G = B)."""
    for c in "ab":
        for i in range(n):
            v = 40 * i + (c == "b") * 100
            save(str(root / c / f"{i}.png"), Image.new(mode, (12, 12), v if mode == "L" else (v, v, v)))
    return str(root)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_grayscale_folder_has_one_channel(tmp_path, mode):
    ds = data.build_dataset(gray_folder(tmp_path, mode=mode), 8)
    assert ds.channels == 1 and ds[0]["image"].shape == (1, 8, 8) and data.dataset_info(ds)["channels"] == 1
    assert "grayscale" in ds.channel_reason and ds.num_classes == 2
    save(str(tmp_path / "b" / "red.png"), Image.new("RGB", (12, 12), (200, 10, 10)))  # one colour image
    ds = data.build_dataset(str(tmp_path), 8)
    assert ds.channels == 3 and "1 of 7 images" in ds.channel_reason
    assert ds[0]["image"].shape == (3, 8, 8) and torch.equal(ds[0]["image"][0], ds[0]["image"][2])


def test_channels_override_converts_both_ways(tmp_path):
    gray = data.build_dataset(gray_folder(tmp_path / "g"), 8)
    rgb = data.build_dataset(gray_folder(tmp_path / "g"), 8, channels=3)
    assert isinstance(rgb, data.ChannelView) and rgb.num_classes == 2 and len(rgb) == len(gray)
    assert rgb[4]["image"].shape == (3, 8, 8) and torch.equal(rgb[4]["image"], gray[4]["image"].expand(3, -1, -1))
    assert rgb[4]["label"] == gray[4]["label"] and "repeated" in rgb.channel_reason
    shapes_gray = data.build_dataset("shapes", 16, "test", channels=1)
    item, rgb_item = shapes_gray[0], shapes.Shapes(16, "test")[0]
    assert item["image"].shape == (1, 16, 16) and torch.allclose(item["image"][0], rgb_item["image"].mean(0))
    assert torch.equal(item["depth"], rgb_item["depth"]) and shapes_gray.has_depth
    assert data.build_dataset("shapes", 16, "test", channels=3).__class__ is shapes.Shapes  # nothing to convert
    np.savez(tmp_path / "lat.npz", image=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="4-channel images, which cannot be turned into 3"):
        data.build_dataset(str(tmp_path / "lat.npz"), 8, channels=3)


def test_npz_with_one_channel(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", image=img, label=np.arange(4) % 2)
    ds = data.build_dataset(str(tmp_path / "g.npz"), 8)
    assert ds.channels == 1 and "1 channel" in ds.channel_reason
    np.testing.assert_allclose(ds[1]["image"].numpy(), img[1].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


# -----------------------------------------------------------------------------
# CIFAR-10 as distributed

def write_cifar(root, n=4, names=None):
    """The six files of cifar-10-batches-bin with n records each: label (i + file) % 10, then the R, G and
    B planes; pixel (y, x) of plane c is (c * 80 + y * 2 + x + i) % 256. Returns the folder."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    names = names or data.CIFAR10_FILES["train"] + data.CIFAR10_FILES["test"]
    yx = np.add.outer(np.arange(32) * 2, np.arange(32))
    for f, name in enumerate(names):
        recs = [np.concatenate([[(i + f) % 10], *[((c * 80 + yx + i) % 256).ravel() for c in range(3)]])
                for i in range(n)]
        (folder / name).write_bytes(np.array(recs, np.uint8).tobytes())
    return folder


def test_cifar10_records_and_splits(tmp_path):
    folder = write_cifar(tmp_path)
    for path in (str(folder), str(tmp_path)):  # the folder itself, or the one it was extracted into
        train = data.build_dataset(path, 32, "train")
        assert isinstance(train, data.Cifar10) and len(train) == 5 * 4 and train.num_classes == 10
    item = train[5]  # file 2 (data_batch_2.bin), record 1
    assert item["label"].item() == (1 + 1) % 10 and item["image"].shape == (3, 32, 32)
    expected = (np.arange(3)[:, None, None] * 80 + np.add.outer(np.arange(32) * 2, np.arange(32)) + 1) % 256
    np.testing.assert_allclose(item["image"].numpy(), expected / 127.5 - 1, atol=1e-6)  # R, G, B planes, row-major
    test = data.build_dataset(str(folder), 16, "test")
    assert len(test) == 4 and test[0]["label"].item() == 5 and test[0]["image"].shape == (3, 16, 16)
    assert data.has_test_split(str(folder)) and not data.has_test_split(str(tmp_path / "elsewhere"))
    assert data.dataset_info(test)["channels"] == 3 and data.build_dataset(str(folder), 16, channels=1).channels == 1


def test_cifar10_truncated_or_incomplete_is_one_sentence(tmp_path):
    folder = write_cifar(tmp_path)
    whole = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(whole[:-100])
    with pytest.raises(ValueError, match=r"data_batch_3.bin' is truncated.*not a whole number of 3073-byte"):
        data.build_dataset(str(folder), 32)
    (folder / "data_batch_3.bin").write_bytes(whole[:2 * data.CIFAR10_RECORD])  # cut at a record boundary
    with pytest.raises(ValueError, match="holds 2 records but .* holds 4 .* so it is truncated"):
        data.build_dataset(str(folder), 32, "test")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(ValueError, match="lacks data_batch_3.bin"):
        data.build_dataset(str(folder), 32)
    bad = write_cifar(tmp_path / "c100")
    (bad / "test_batch.bin").write_bytes(bytes([37]) + bytes(3072))
    for name in data.CIFAR10_FILES["train"]:
        (bad / name).write_bytes(bytes([1]) + bytes(3072))
    with pytest.raises(ValueError, match="label byte 37.*CIFAR-100"):
        data.build_dataset(str(bad), 32, "test")


# -----------------------------------------------------------------------------
# The glyphs data set

def test_make_glyphs_writes_a_grayscale_class_tree(tmp_path):
    assert data.make_glyphs(str(tmp_path), per_class=2) == 20
    assert sorted(os.listdir(tmp_path)) == [str(d) for d in range(10)]
    ds = data.build_dataset(str(tmp_path), 16)
    assert len(ds) == 20 and ds.num_classes == 10 and ds.channels == 1
    x = torch.stack([ds[i]["image"] for i in range(20)])                      # (20, 1, 16, 16)
    assert x.min() == -1 and x.max() > 0.3  # light strokes on black
    again = tmp_path / "again"
    data.make_glyphs(str(again), per_class=2)
    assert (again / "7" / "00001.png").read_bytes() == (tmp_path / "7" / "00001.png").read_bytes()  # seeded


def test_npz_non_finite_items_huge_labels_and_foreign_files_are_one_sentence(tmp_path):
    image = np.zeros((6, 3, 8, 8), np.float32)
    image[4, 1, 2, 3] = np.nan                                          # one bad pixel in item 4
    np.savez(tmp_path / "nan.npz", image=image)
    with pytest.raises(ValueError, match=r"'image' .* holds NaN or inf in item 4; repair or drop"):
        data.NpzDataset(str(tmp_path / "nan.npz"))
    depth = np.zeros((6, 8, 8), np.float32)
    depth[[1, 5]] = np.inf
    np.savez(tmp_path / "inf.npz", image=np.zeros((6, 3, 8, 8), np.float32), depth=depth)
    with pytest.raises(ValueError, match=r"'depth' .* item 1 and 1 more"):
        data.NpzDataset(str(tmp_path / "inf.npz"))
    np.savez(tmp_path / "big.npz", image=np.zeros((2, 8, 8, 3), np.uint8), label=np.array([0, 2 ** 40]))
    with pytest.raises(ValueError, match="class id 1099511627776; class ids must be 0 .. K-1"):
        data.NpzDataset(str(tmp_path / "big.npz"))               # (its label table would need 2**40 rows)
    for name, content in (("random.npz", np.random.default_rng(0).bytes(300)), ("text.npz", b"image,label\n1,2\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as e:
            data.NpzDataset(str(tmp_path / name))
        assert "is not an .npz archive" in str(e.value) and "allow_pickle" not in str(e.value)


def test_a_folder_that_looks_labelled_but_is_not_says_why(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    (tmp_path / "empty").mkdir()
    for i, cls in enumerate(("a", "b", "a", "b")):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    with pytest.warns(UserWarning, match=r"without labels \(class conditioning off\): class subfolder\(s\) empty "
                                         r"hold no images"):
        ds = data.ImageFolder(str(tmp_path), 8)
    assert ds.num_classes == 0
    (tmp_path / "empty").rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.ImageFolder(str(tmp_path), 8).num_classes == 2   # a clean class tree: no warning
