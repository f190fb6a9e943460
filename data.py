"""
The datasets every training run uses, chosen by `--data`: the built-in procedural "shapes" (shapes.py),
image folders, the CIFAR-10 binary distribution and .npz arrays. This file imports only shapes.py of the
project.

What is here:
    build_dataset(data, size, split, seed, channels)   "shapes" -> shapes.Shapes, the CIFAR-10 folder ->
                                    Cifar10, another folder -> ImageFolder, a path ending in .npz ->
                                    NpzDataset; `channels` 1 or 3 converts the images (ChannelView);
                                    what train.py, sample.py and metrics.py call
    dataset_info(ds)                what a model needs to know: channels, num_classes, has_depth, has_seg, size
    first_items(ds, n)              the first n items stacked into one batch dict
    ImageFolder(root, size)         any folder of images (recursive), optional class subfolders; 1 channel
                                    when every image is grayscale, else 3
    Cifar10(folder, size, split)    cifar-10-batches-bin as distributed: data_batch_1..5.bin (train),
                                    test_batch.bin (test), read as raw bytes (no pickle)
    NpzDataset(path, size)          arrays in an .npz: `image` plus optional `label`, `depth`, `seg`, ...
    ChannelView(ds, channels)       ds with its images turned gray (3 -> 1: the mean of R, G, B) or RGB
                                    (1 -> 3: the gray plane repeated)
    load_image(path, size, channels)  one image file -> float32 (channels, size, size) in [-1,1]
    make_glyphs(root)               a small grayscale data set of jittered hand-drawn digits (a stand-in for
                                    a user's own data): python data.py --make-glyphs DIR

Every item is a dict of tensors:
    image  float32 (C,H,W) in [-1,1]         (C = 3, 1 for grayscale data, or whatever an .npz holds,
                                             e.g. 4 latent channels)
    depth  float32 (1,H,W) in [-1,1]         normalised disparity: near = +1 (bright), the back wall = -1
                                             (shapes.depth_to_disparity of metric depth z)
    seg    int64   (H,W)                     0 = background, 1..K = primitive type (shapes.CLASS_NAMES[k - 1])
    label  int64   ()                        image-level class; 0 for unlabeled data
depth and seg are present only where the data has them: always for shapes, for an .npz when it stores them.
Every dataset has `channels` (its images' C) and `channel_reason` (why, in words; train.py prints it).
"""
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import shapes


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _to_float(im):
    """Any PIL mode -> float32 (H,W,1) for the grayscale modes (1, L, LA, I;16, I, F), (H,W,3) for the
    others, in [0,1]. Transparency is composited over white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit greyscale: 65535 is white
        return np.clip(np.asarray(im, dtype=np.float32) / 65535, 0, 1)[..., None]
    if im.mode == "F":  # float greyscale, taken to be in [0, 1]
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None]
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    gray = im.mode in ("1", "L", "LA", "La")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        a = np.asarray(im.convert("LA" if gray else "RGBA"), dtype=np.float32) / 255
        return a[..., :-1] * a[..., -1:] + (1 - a[..., -1:])  # over a white background
    a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) / 255
    return a[..., None] if gray else a


def _center_crop_resize(a, size):
    """float32 (H,W,C) -> (size,size,C): crop the central square, then resize (bicubic, antialiased)."""
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top:top + s, left:left + s]
    if s == size:
        return a
    channels = [Image.fromarray(np.ascontiguousarray(a[..., c])).resize((size, size), Image.BICUBIC)
                for c in range(a.shape[-1])]  # mode F keeps 16-bit precision
    return np.clip(np.stack([np.asarray(c) for c in channels], -1), 0, 1)


def decode_image(path, size):
    """One image file -> float32 (size, size, C) in [0,1]: C = 1 for a grayscale mode or an RGB image
    whose pixels all have R = G = B, else 3."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))  # decode at a reduced scale that is still >= size
        a = _center_crop_resize(_to_float(im), size)
    if a.shape[-1] == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        return a[..., :1]
    return a


def to_channels(x, channels):
    """An image (C,H,W) -> (channels,H,W): 3 -> 1 averages R, G and B, 1 -> 3 repeats the gray plane."""
    if x.shape[0] == channels:
        return x
    if (x.shape[0], channels) == (3, 1):
        return x.mean(0, keepdim=True)
    if (x.shape[0], channels) == (1, 3):
        return x.expand(3, -1, -1).contiguous()
    raise ValueError(f"{x.shape[0]}-channel images cannot be turned into {channels} channels; "
                     "only gray (1) and RGB (3) convert into each other")


def load_image(path, size, channels=3):
    """One image file -> float32 tensor (channels, size, size) in [-1,1]."""
    a = decode_image(path, size)                                              # (size, size, 1 or 3)
    return to_channels(torch.from_numpy(a.transpose(2, 0, 1).copy()) * 2 - 1, channels)


def _image_files(folder):
    """Image files under folder, recursive, sorted; hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursive), centre-cropped to a square and resized to `size`.

    Labels: when the files all sit in immediate subfolders of root and every subfolder holds
    images, the sorted subfolder names are the classes; otherwise every label is 0 and
    num_classes is 0 (unlabeled). Every file is decoded once here, so a truncated or unreadable
    file is skipped now, with one warning, rather than crashing a run later; the same pass finds
    the channels: 1 when every image is grayscale (decode_image), else 3 (gray images repeated).
    """
    has_depth, has_seg = False, False

    def __init__(self, root, size=32):
        self.size = shapes._check_size(size)
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist or is not a folder")
        files = _image_files(root)
        if not files:
            raise ValueError(f"no images found in {root!r}: expected {'/'.join(IMAGE_EXTENSIONS)} "
                             f"files in it or in its subfolders")
        subfolders = sorted(d for d in os.listdir(root)
                            if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        top = [os.path.relpath(f, root).split(os.sep)[0] for f in files]
        labeled = bool(subfolders) and set(top) == set(subfolders)  # no loose files, no empty class
        if subfolders and not labeled:  # the folder looks labelled but is not: say why classes are off
            empty = [d for d in subfolders if d not in top]
            why = (f"class subfolder(s) {', '.join(empty[:5])} hold no images" if empty else
                   f"{sum(t not in subfolders for t in top)} image(s) lie outside the class subfolders")
            warnings.warn(f"{root!r} is read without labels (class conditioning off): {why}; remove them to train "
                          "with one class per subfolder", stacklevel=2)
        self.classes = subfolders if labeled else []
        self.num_classes = len(self.classes)
        labels = [self.classes.index(d) if labeled else 0 for d in top]
        found = [self._channels_of(f) for f in files]  # 1, 3, or None for an unreadable file
        bad = [f for f, c in zip(files, found) if c is None]
        if bad:
            names = ", ".join(os.path.relpath(f, root) for f in bad[:5])
            warnings.warn(f"skipping {len(bad)} unreadable image file(s) in {root!r}: {names}"
                          + (", ..." if len(bad) > 5 else ""), stacklevel=2)
        self.files = [f for f, c in zip(files, found) if c is not None]
        self.labels = [y for y, c in zip(labels, found) if c is not None]
        if not self.files:
            raise ValueError(f"no readable images in {root!r}: all {len(bad)} image files failed to load")
        colour = sum(c == 3 for c in found)
        self.channels = 3 if colour else 1
        self.channel_reason = (f"{colour} of {len(self.files)} images in {root!r} have colour" if colour else
                               f"every image in {root!r} is grayscale (mode L/LA, or R = G = B in every pixel)")

    def _channels_of(self, path):
        try:
            return decode_image(path, self.size).shape[-1]
        except Exception:  # any decoder or conversion failure marks the file as unusable
            return None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return {"image": load_image(self.files[index], self.size, self.channels),  # (C, size, size)
                "label": torch.tensor(self.labels[index])}  # ()


def square_resize(x, size, mode):
    """(C,H,W) tensor -> (C,size,size): centre square crop, then resize (antialiased; "nearest" keeps
    class ids unblended). size None: unchanged."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s == size:
        return x
    if mode == "nearest":  # class ids must not be blended
        return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode=mode, antialias=True, align_corners=False)[0]


MAX_CLASSES = 100_000  # more class ids than any labelled image set has (ImageNet-21k: 21,841)


class NpzDataset(torch.utils.data.Dataset):
    """Arrays in an .npz file, one item per entry along the first axis.

    image  (N,H,W,C) uint8 in 0..255 (channels last), or (N,C,H,W) float in [-1,1] (channels first,
           used as stored, so precomputed latents with any C work too)
    label  (N,) integers, optional (label 0 and num_classes 0 when absent)
    depth  (N,H,W) or (N,1,H,W) float normalised disparity in [-1,1], optional
    seg    (N,H,W) integers, optional
    Any other array with N entries is passed through unchanged under its own name. With `size`,
    image, depth and seg are centre-cropped to a square and resized (seg by nearest neighbour).
    """
    def __init__(self, path, size=None):
        self.size = None if size is None else shapes._check_size(size)
        if not os.path.isfile(path):
            raise ValueError(f"npz file {path!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception:  # numpy's own message may suggest allow_pickle, which a file of unknown origin must never get
            raise ValueError(f"{path!r} is not an .npz archive of numeric arrays (it is empty, truncated, another "
                             "format, or holds Python objects); write one with numpy.savez(path, image=...)") from None
        if "image" not in arrays:
            raise ValueError(f"{path!r} has no 'image' array (it has {sorted(arrays)}); "
                             f"store images under the key 'image'")
        arrays["image"] = self._check_image(arrays["image"], path)  # (N, C, H, W)
        n, h, w = len(arrays["image"]), *arrays["image"].shape[2:]
        if "depth" in arrays and arrays["depth"].ndim == 3:
            arrays["depth"] = arrays["depth"][:, None]  # (N, 1, H, W)
        expected = {"label": (n,), "depth": (n, 1, h, w), "seg": (n, h, w)}
        for k, a in arrays.items():
            if a.ndim == 0 or len(a) != n:
                raise ValueError(f"array {k!r} in {path!r} has shape {a.shape} but 'image' has {n} "
                                 f"entries; every array needs the same first dimension")
            if k in expected and a.shape != expected[k]:
                raise ValueError(f"{k!r} in {path!r} must have shape {expected[k]} to match 'image', got {a.shape}")
            if k in ("label", "seg") and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{k!r} in {path!r} must hold integers, got {a.dtype}")
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
                raise ValueError(f"array {k!r} in {path!r} has dtype {a.dtype}; only numeric arrays can be batched")
        if "label" in arrays and arrays["label"].min() < 0:
            raise ValueError(f"'label' in {path!r} must be class ids 0, 1, 2, ..., got a negative value")
        if "label" in arrays and arrays["label"].max() >= MAX_CLASSES:  # the label embedding has max + 1 rows
            raise ValueError(f"'label' in {path!r} holds class id {int(arrays['label'].max())}; class ids must be "
                             f"0 .. K-1 with K at most {MAX_CLASSES:,} (renumber the classes)")
        for k in ("image", "depth"):  # a non-finite pixel would make every batch holding it skip its step
            if k in arrays and np.issubdtype(arrays[k].dtype, np.floating):
                bad = np.flatnonzero(~np.isfinite(arrays[k]).reshape(n, -1).all(1))
                if len(bad):
                    raise ValueError(f"{k!r} in {path!r} holds NaN or inf in item {bad[0]}" + (
                        f" and {len(bad) - 1} more" if len(bad) > 1 else "") + "; repair or drop those items")
        self.arrays, self.length = arrays, n
        self.channels = arrays["image"].shape[1]
        self.channel_reason = f"'image' in {path!r} has {self.channels} channel(s)"
        self.num_classes = int(arrays["label"].max()) + 1 if "label" in arrays else 0
        self.has_depth, self.has_seg = "depth" in arrays, "seg" in arrays

    @staticmethod
    def _check_image(image, path):
        """uint8 (N,H,W,C) or float (N,C,H,W) -> a (N,C,H,W) view; anything else is a clear error."""
        if image.ndim != 4 or len(image) == 0:
            raise ValueError(f"'image' in {path!r} must be 4-D and non-empty, (N,H,W,C) uint8 or (N,C,H,W) "
                             f"float; got shape {image.shape}")
        if image.dtype == np.uint8:
            if image.shape[1] <= 4 < image.shape[-1]:
                raise ValueError(f"uint8 'image' in {path!r} must be channels last (N,H,W,C); shape "
                                 f"{image.shape} looks channels first")
            return image.transpose(0, 3, 1, 2)
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"'image' in {path!r} must be uint8 or float, got {image.dtype}")
        if image.shape[-1] <= 4 < image.shape[1]:
            raise ValueError(f"float 'image' in {path!r} must be channels first (N,C,H,W); shape "
                             f"{image.shape} looks channels last")
        if np.abs(image).max() > 1.01:
            warnings.warn(f"float 'image' in {path!r} has values outside [-1,1] (max |x| = "
                          f"{np.abs(image).max():.3g}); they are used unchanged", stacklevel=3)
        return image

    def __len__(self):
        return self.length

    def _resize(self, x, mode):
        return square_resize(x, self.size, mode)

    def __getitem__(self, index):
        a = self.arrays
        item = {k: torch.from_numpy(np.asarray(v[index])) for k, v in a.items()
                if k not in ("image", "depth", "seg", "label")}  # extra arrays, unchanged
        image = torch.from_numpy(np.ascontiguousarray(a["image"][index]))  # (C, H, W)
        if image.dtype == torch.uint8:
            item["image"] = self._resize(image.float() / 127.5 - 1, "bicubic").clamp(-1, 1)
        else:
            item["image"] = self._resize(image.float(), "bicubic")  # (C, size, size), values as stored
        item["label"] = torch.tensor(int(a["label"][index]) if "label" in a else 0)  # ()
        if self.has_depth:
            item["depth"] = self._resize(torch.from_numpy(a["depth"][index]).float(), "bilinear")  # (1, H, W)
        if self.has_seg:
            item["seg"] = self._resize(torch.from_numpy(a["seg"][index]).long()[None], "nearest")[0]  # (H, W)
        return item


CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_RECORD = 1 + 3 * 32 * 32  # a label byte, then the R, G and B planes of a 32x32 image, each row-major


def cifar10_folder(path):
    """The CIFAR-10 binary folder (holding data_batch_*.bin / test_batch.bin) at `path` or at
    path/cifar-10-batches-bin, or None when `path` is not one."""
    names = CIFAR10_FILES["train"] + CIFAR10_FILES["test"]
    for folder in (path, os.path.join(path, "cifar-10-batches-bin")):
        if any(os.path.isfile(os.path.join(folder, n)) for n in names):
            return folder
    return None


def check_cifar10(folder):
    """The number of records per file, after checking that all six files are there, that each holds whole
    3,073-byte records, and that all hold the same number (10,000 in the distribution; tests write
    fewer): a file cut short, even at a record boundary, is refused in one sentence."""
    names = CIFAR10_FILES["train"] + CIFAR10_FILES["test"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"the CIFAR-10 folder {folder!r} lacks {', '.join(missing)}; extract "
                         "cifar-10-binary.tar.gz again so that it holds data_batch_1..5.bin and test_batch.bin")
    counts = {}
    for n in names:
        size = os.path.getsize(os.path.join(folder, n))
        if size == 0 or size % CIFAR10_RECORD:
            raise ValueError(f"{os.path.join(folder, n)!r} is truncated or not a CIFAR-10 binary batch: its "
                             f"{size} bytes are not a whole number of {CIFAR10_RECORD}-byte records; extract "
                             "cifar-10-binary.tar.gz again")
        counts[n] = size // CIFAR10_RECORD
    if len(set(counts.values())) > 1:
        short = min(counts, key=counts.get)
        raise ValueError(f"{os.path.join(folder, short)!r} holds {counts[short]} records but "
                         f"{max(counts, key=counts.get)} holds {max(counts.values())} (every file of the "
                         "distribution holds 10,000), so it is truncated; extract cifar-10-binary.tar.gz again")
    return counts[names[0]]


class Cifar10(torch.utils.data.Dataset):
    """CIFAR-10 as distributed (cifar-10-binary.tar.gz -> cifar-10-batches-bin): split "train" is
    data_batch_1..5.bin, "test" is test_batch.bin. Each record is 1 label byte (0..9, CIFAR10_CLASSES)
    and 3,072 pixel bytes, the R plane, then G, then B, 32x32 row-major. The bytes are read as they are
    (np.fromfile, no pickle); images are resized to `size` like an .npz."""
    channels, num_classes, classes, has_depth, has_seg = 3, 10, CIFAR10_CLASSES, False, False
    channel_reason = "CIFAR-10 is RGB"

    def __init__(self, folder, size=32, split="train"):
        self.size = shapes._check_size(size)
        check_cifar10(folder)
        paths = [os.path.join(folder, n) for n in CIFAR10_FILES[split]]
        self.records = np.concatenate([np.fromfile(p, np.uint8).reshape(-1, CIFAR10_RECORD) for p in paths])
        labels = self.records[:, 0]
        if labels.max() > 9:
            i = int(np.argmax(labels > 9))
            raise ValueError(f"record {i} of the CIFAR-10 {split} split has label byte {labels[i]}, but CIFAR-10 "
                             "labels are 0..9; is this CIFAR-100 (whose records have two label bytes)?")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        r = self.records[index]
        x = torch.from_numpy(r[1:].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1     # (3, 32, 32)
        return {"image": square_resize(x, self.size, "bicubic").clamp(-1, 1),          # (3, size, size)
                "label": torch.tensor(int(r[0]))}


class ChannelView(torch.utils.data.Dataset):
    """Another dataset with its images turned into `channels` channels (to_channels): an RGB data set
    trained gray (3 -> 1, the mean of R, G and B) or a gray one trained as RGB (1 -> 3)."""

    def __init__(self, ds, channels):
        if {ds.channels, channels} - {1, 3}:
            raise ValueError(f"the data has {ds.channels}-channel images, which cannot be turned into {channels} "
                             "channels; only gray (1) and RGB (3) convert into each other")
        self.dataset, self.channels = ds, channels
        self.num_classes, self.classes = getattr(ds, "num_classes", 0), getattr(ds, "classes", [])
        self.has_depth, self.has_seg = getattr(ds, "has_depth", False), getattr(ds, "has_seg", False)
        how = "R, G and B averaged" if channels == 1 else "the gray plane repeated in R, G and B"
        self.channel_reason = f"{getattr(ds, 'channel_reason', f'{ds.channels}-channel data')}; {how}"

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        item["image"] = to_channels(item["image"], self.channels)                # (channels, H, W)
        return item


def with_channels(ds, channels):
    """ds itself when its images have `channels` channels (or channels is None), else a ChannelView."""
    return ds if channels is None or channels == ds.channels else ChannelView(ds, channels)


def build_dataset(data, size, split="train", seed=0, channels=None):
    """`data` is "shapes", a folder of images, the CIFAR-10 binary folder, or a path ending in .npz.

    `split` and `seed` choose the Shapes stream; `split` chooses CIFAR-10's (train: the five data
    batches, test: test_batch); a folder or .npz is one split (point `data` at another folder or file
    for held-out data). `channels` (1 or 3) converts the images; None keeps the data's own.
    """
    shapes._check_split(split)
    path = isinstance(data, (str, os.PathLike))
    if data == "shapes":
        ds = shapes.Shapes(size, split, seed)
        ds.channel_reason = "the shapes data is RGB"
    elif path and str(data).lower().endswith(".npz"):
        ds = NpzDataset(data, size)
    elif path and os.path.isdir(data):
        folder = cifar10_folder(data)
        ds = Cifar10(folder, size, split) if folder else ImageFolder(data, size)
    else:
        raise ValueError(f"unknown data {data!r}: expected 'shapes', an existing folder of images, "
                         f"or a path ending in .npz")
    return with_channels(ds, channels)


def has_test_split(data):
    """Whether `data` has its own held-out split (shapes, CIFAR-10); a folder or an .npz has one split."""
    return data == "shapes" or (isinstance(data, (str, os.PathLike)) and os.path.isdir(data)
                                and cifar10_folder(data) is not None)


def dataset_info(ds):
    """What a model needs to know: channels, num_classes (0 = unlabeled), has_depth, has_seg, size."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    item = ds[0]
    return {"channels": item["image"].shape[0], "num_classes": getattr(ds, "num_classes", 0),
            "has_depth": "depth" in item, "has_seg": "seg" in item, "size": item["image"].shape[-1]}


def first_items(ds, n, device="cpu"):
    """The first n items of ds (fewer if it is shorter) stacked into one batch dict, on device."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


# -----------------------------------------------------------------------------
# A small grayscale data set that is not shapes: jittered hand-drawn digits

def _arc(cx, cy, rx, ry, n=16):
    """A closed ellipse as n + 1 points, starting at the top."""
    a = np.linspace(0, 2 * np.pi, n + 1)
    return list(zip(cx + rx * np.sin(a), cy - ry * np.cos(a)))


# digit -> strokes, each a polyline of (x, y) in the unit square, y pointing down
GLYPH_STROKES = {
    0: [_arc(0.5, 0.5, 0.25, 0.38)],
    1: [[(0.36, 0.28), (0.54, 0.12), (0.54, 0.88)]],
    2: [[(0.26, 0.3), (0.36, 0.15), (0.54, 0.1), (0.7, 0.2), (0.7, 0.38), (0.26, 0.88), (0.76, 0.88)]],
    3: [[(0.27, 0.18), (0.5, 0.1), (0.7, 0.2), (0.68, 0.38), (0.46, 0.48), (0.7, 0.6), (0.72, 0.8), (0.5, 0.9),
         (0.26, 0.82)]],
    4: [[(0.62, 0.9), (0.62, 0.1), (0.22, 0.64), (0.8, 0.64)]],
    5: [[(0.72, 0.12), (0.34, 0.12), (0.3, 0.46), (0.56, 0.42), (0.72, 0.56), (0.7, 0.8), (0.5, 0.9), (0.28, 0.84)]],
    6: [[(0.68, 0.12), (0.44, 0.26), (0.3, 0.56), (0.34, 0.84), (0.54, 0.9), (0.7, 0.76), (0.66, 0.56), (0.48, 0.5),
         (0.32, 0.6)]],
    7: [[(0.24, 0.12), (0.76, 0.12), (0.42, 0.9)]],
    8: [_arc(0.5, 0.3, 0.17, 0.18), _arc(0.5, 0.7, 0.21, 0.2)],
    9: [_arc(0.48, 0.32, 0.2, 0.2), [(0.68, 0.32), (0.62, 0.9)]],
}


def _smooth(points, rounds=2):
    """Chaikin's corner cutting: each round replaces a corner by two points at 1/4 and 3/4 of its edges."""
    p = np.asarray(points)
    for _ in range(rounds):
        q, r = 0.75 * p[:-1] + 0.25 * p[1:], 0.25 * p[:-1] + 0.75 * p[1:]
        p = np.concatenate([p[:1], np.stack([q, r], 1).reshape(-1, 2), p[-1:]])
    return p


def draw_glyph(digit, rng, size=16, canvas=64):
    """One digit as a PIL image (mode L, size x size): its strokes under a random rotation, shear, scale
    and shift, every point jittered, drawn with a random pen width on a canvas, then downsampled."""
    from PIL import ImageDraw
    angle, shear = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)
    A = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array([[1, shear], [0, 1]])
    A = A * rng.uniform(0.8, 1.05, 2)[None]                                   # (2, 2)
    shift = 0.5 + rng.uniform(-0.07, 0.07, 2)
    im = Image.new("L", (canvas, canvas), 0)
    draw, width, ink = ImageDraw.Draw(im), int(canvas * rng.uniform(0.08, 0.14)), int(rng.uniform(190, 255))
    for stroke in GLYPH_STROKES[digit]:
        p = np.asarray(stroke) + rng.normal(0, 0.02, (len(stroke), 2))       # (n, 2) jittered points
        p = (_smooth(p) - 0.5) @ A.T + shift
        xy = [tuple(v) for v in p * canvas]
        draw.line(xy, fill=ink, width=width, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round pen ends
            draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=ink)
    return im.resize((size, size), Image.LANCZOS)


def make_glyphs(root, per_class=150, size=16, seed=0):
    """Write root/0 .. root/9, per_class grayscale PNGs each (light strokes on black, like MNIST): a small
    labelled data set in a user's layout, for trying the default recipe on data other than shapes."""
    rng = np.random.default_rng(seed)
    for digit in GLYPH_STROKES:
        os.makedirs(os.path.join(root, str(digit)), exist_ok=True)
        for i in range(per_class):
            draw_glyph(digit, rng, size).save(os.path.join(root, str(digit), f"{i:05d}.png"))
    return 10 * per_class


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write the glyphs data set: python data.py --make-glyphs DIR")
    p.add_argument("--make-glyphs", metavar="DIR", required=True, help="folder to write DIR/0 .. DIR/9 into")
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.per_class < 1 or a.size < 4:
        p.error("--per-class must be at least 1 and --size at least 4")
    try:
        n = make_glyphs(a.make_glyphs, a.per_class, a.size, a.seed)
    except OSError as e:
        p.exit(1, f"error: cannot write the glyphs into {a.make_glyphs}: {e.strerror or e}\n")
    print(f"wrote {n} {a.size}px grayscale digits to {a.make_glyphs}/0 .. {a.make_glyphs}/9")
