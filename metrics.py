"""
Evaluation: Frechet distance and precision/recall in the feature space of a small reference CNN, and
the restoration, segmentation and depth metrics the paper files report.

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (the FID formula), https://arxiv.org/abs/1706.08500
    Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models",
    https://arxiv.org/abs/1904.06991
    Ranftl et al. 2020, "Towards Robust Monocular Depth Estimation" (MiDaS; scale-and-shift aligned
    depth evaluation, as JointNet Sec. 4.1 uses it), https://arxiv.org/abs/1907.01341

What is implemented:
    frechet_distance      FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between the Gaussian fits
                          of two feature sets, with scipy.linalg.sqrtm and the usual safeguards
    precision_recall      k-NN manifolds (k = 3): precision = share of generated features inside the real
                          manifold, recall = share of real features inside the generated manifold
    FeatureNet            the reference network: a 4-stage CNN (0.1M parameters) trained deterministically on
                          the shapes labels (4,096 train images, 400 Adam steps; held-out accuracy about 0.85,
                          chance 0.25), cached per (data, size, seed), retrained when missing or unreadable;
                          features = its pooled last stage (128-d)
    evaluate_images       FD, precision and recall of generated images against held-out real images
    generated_class_accuracy  share of class-conditional samples the reference net puts in their class;
                          ceiling: the net's held-out accuracy on real images, floor: chance
    channel_stats         per-channel mean and std, and the channel deviation (0 for grayscale images)
    restoration           masked_region_mse, unmasked_change, psnr, perceptual_distance
    segmentation          pixel_accuracy, class_iou, mean_iou
    depth                 align_scale_shift (least squares on random pixel subsets, median over solves),
                          depth_metrics (AbsRel in depth space, RMSE in disparity space)

Run:
    python metrics.py --samples runs/default/samples/generate.npz --data shapes

Differences from the papers, said plainly:
    - Inception-v3 weights cannot be downloaded here, so FD, precision and recall use a 4-stage CNN
      trained on the 4 shape labels, not Inception's pool3. The numbers are NOT comparable to published
      ImageNet/CIFAR FIDs; they only rank models evaluated with the same reference net (same data, image
      size and seed) and the same number of images (FD is biased upwards for small N).
    - Folder or .npz datasets: `--features trained` trains the same CNN on the dataset's labels (it needs
      at least two classes; every 10th item is held out for its accuracy and as the real images);
      `--features random` uses the CNN at a fixed random initialisation, which needs no labels. Random features still separate distributions (FD = 0 only for matching statistics) but
      weigh low-level statistics more than shape semantics; report which one you used.
    - MT-Diffusion reports LPIPS, which needs VGG weights; perceptual_distance is LPIPS's formula
      (unit-normalised channels per stage, squared difference, spatial mean, summed over stages, no
      learned per-channel weights) on the reference net.

Imports: the base (shapes.py, data.py, runlib.py); paper files and the bench may import it.
"""
import argparse
import hashlib
import os
import sys
import time
import warnings
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import shapes
from runlib import RunError, check_output_path, ranged

CACHE_ENV = "DIFFUSION_FOUR_PAPERS_CACHE"  # overrides the cache folder (tests point it at a tmp dir)
DEFAULT_CACHE = os.path.join("~", ".cache", "diffusion-four-papers")
FEATURE_NET_VERSION = 2  # bump when FeatureNet or its training changes: cached weights are then retrained
# (2: folder and .npz data hold out every 10th item, not the last 10%)


# -----------------------------------------------------------------------------
# Frechet distance (the FID formula)

def feature_stats(feats):
    """(N, D) features -> mean (D,) and covariance (D, D), float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be a 2-D array with at least 2 rows, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def sqrtm_product(sigma1, sigma2, eps=1e-6, tol=1e-4):
    """(S_1 S_2)^(1/2), real. A near-singular product gets eps on both diagonals; tiny imaginary parts
    (round-off on PSD inputs) are dropped, large ones raise."""
    def root(a, b):
        ab = a @ b
        with warnings.catch_warnings():  # singular products are expected; the checks below handle them
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            s = scipy.linalg.sqrtm(ab)
        err = np.linalg.norm(s @ s - ab) / max(np.linalg.norm(ab), 1e-30)
        return s, np.isfinite(s).all() and err < tol
    covmean, ok = root(sigma1, sigma2)
    if not ok:
        offset = eps * np.eye(len(sigma1))
        covmean, ok = root(sigma1 + offset, sigma2 + offset)
        if not np.isfinite(covmean).all():
            raise ValueError("the covariance product has no finite square root even after the eps offset; "
                             "check the features for NaN or inf")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"the square root of the covariance product has a large imaginary part ({imag:.3g}); "
                             "the covariances are not positive semi-definite")
        covmean = covmean.real
    return covmean


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)): the 2-Wasserstein distance^2 between Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances "
                         f"{sigma1.shape} and {sigma2.shape}; both sets need the same feature dimension")
    covmean = sqrtm_product(sigma1, sigma2, eps)
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(max(fd, 0.0))  # round-off can leave -1e-12 for identical sets


def frechet_distance_features(feats1, feats2, eps=1e-6):
    """FD between the Gaussian fits of two (N, D) feature sets."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2), eps=eps)


# -----------------------------------------------------------------------------
# Precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019, Sec. 3)

def knn_radii(feats, k=3, chunk=1024):
    """Distance of each feature to its k-th nearest neighbour in the same set (itself excluded). (N,)"""
    f = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if not 1 <= k < len(f):
        raise ValueError(f"k must be in [1, {len(f) - 1}] for {len(f)} features, got {k}")
    out = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)                                    # (n, N)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def manifold_coverage(query, ref, radii, chunk=1024):
    """Share of query features that lie in some ball B(ref_j, radii_j) of the reference manifold."""
    q = torch.as_tensor(np.asarray(query), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    inside = []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i:i + chunk], r)                                    # (n, N_ref)
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3):
    """(precision, recall): share of fake in the real manifold, share of real in the fake manifold."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D, got {real.shape} and {fake.shape}")
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


# -----------------------------------------------------------------------------
# The reference network

class FeatureNet(nn.Module):
    """4 stages of conv3x3 -> GroupNorm -> SiLU (strides 2, 2, 2, 1: a 32px input ends at 4x4), global
    average pool, linear classifier. Downsampling first keeps training under a minute on a laptop CPU."""

    def __init__(self, in_channels=3, num_classes=4, widths=(16, 32, 64, 128)):
        super().__init__()
        c = in_channels
        self.stages = nn.ModuleList()
        for i, w in enumerate(widths):
            self.stages.append(nn.Sequential(nn.Conv2d(c, w, 3, 1 if i == len(widths) - 1 else 2, 1),
                                             nn.GroupNorm(8, w), nn.SiLU()))
            c = w
        self.head = nn.Linear(c, max(num_classes, 1))
        self.dim = c

    def stage_outputs(self, x):
        hs = []
        for stage in self.stages:
            x = stage(x)
            hs.append(x)                                                      # (B, w_i, h_i, w_i)
        return hs

    def features(self, x):
        return self.stage_outputs(x)[-1].mean((2, 3))                         # (B, 128)

    def forward(self, x):
        return self.head(self.features(x))                                    # (B, num_classes)


def as_images(images):
    """uint8 (N, H, W, C) array (sample.py's .npz) or float (N, C, H, W) in [-1, 1] -> float32 tensor (N, C, H, W).
    An array in the other layout is read as such when its shape says so unambiguously (at most 4 channels on
    one side, more than 4 on the other), as data.py tells them apart."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise ValueError(f"uint8 images must be (N, H, W, C), got shape {images.shape}")
        x = torch.from_numpy(images)
        channels_first = images.shape[1] <= 4 < images.shape[-1]
        return (x if channels_first else x.permute(0, 3, 1, 2)).float() / 127.5 - 1
    x = torch.as_tensor(images).float()
    if x.ndim != 4:
        raise ValueError(f"float images must be (N, C, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    if isinstance(images, np.ndarray) and x.shape[-1] <= 4 < x.shape[1]:  # a file's channels-last floats
        x = x.permute(0, 3, 1, 2)
    return x


def check_labels(labels, num_classes, data_name):
    """Refuse generated-for labels outside the reference data's classes (they would score 0 without a word)."""
    y = torch.as_tensor(labels)
    bad = y[(y < 0) | (y >= num_classes)]
    if len(bad):
        raise ValueError(f"the samples carry label {bad[0].item()} but {data_name} has {num_classes} classes "
                         f"(0..{num_classes - 1}); score them against the data their model was trained on (--data), "
                         "or with --features random for no class score")


@torch.no_grad()
def extract_features(net, images, batch=256, device="cpu"):
    """Penultimate features of the reference net, (N, D) float64 numpy."""
    x = as_images(images)
    net = net.to(device).eval()
    return np.concatenate([net.features(x[i:i + batch].to(device)).double().cpu().numpy() for i in range(0, len(x), batch)])


def stack_items(dataset, n, start=0):
    """The first n items of a dataset as (images (n, C, H, W), labels (n,))."""
    n = min(n, len(dataset) - start)
    if n <= 0:
        raise ValueError(f"the dataset has {len(dataset)} items, none left after the first {start}")
    b = data.first_items(torch.utils.data.Subset(dataset, range(start, start + n)), n)
    return b["image"], b["label"].long()


def fit_feature_net(x, y, num_classes, seed=0, steps=400, batch_size=64, lr=2e-3):
    """Train a FeatureNet on (x, y) with Adam, cosine decay and random horizontal flips; every random
    draw comes from `seed`, so the same inputs give the same weights."""
    torch.manual_seed(seed)
    net = FeatureNet(x.shape[1], num_classes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        xb, yb = x[idx], y[idx]                                               # (B, C, H, W), (B,)
        flip = torch.rand(batch_size, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        supervised_step(opt, net(xb), yb)
        sched.step()
    return net.eval()


def supervised_step(opt, logits, y, params=(), grad_clip=0.0):
    """One classifier training step: cross-entropy of logits (B, K) against y (B,), backward, the gradient
    norm clipped at grad_clip (0: off), the optimiser's step. Returns the loss."""
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss.detach()


@torch.no_grad()
def accuracy(net, x, y, batch=256):
    correct = sum((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def cache_dir(cache=None):
    return os.path.expanduser(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def data_key(data_name):
    """A file-name-safe key for a dataset: 'shapes', or the base name + a hash of a folder/.npz path."""
    if data_name == "shapes":
        return "shapes"
    path = os.path.abspath(data_name)
    return f"{os.path.basename(path.rstrip(os.sep)) or 'data'}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def reference_split(data_name, size, seed=0, channels=None):
    """(train_dataset, held_out_dataset, held_out_start = 0): shapes and CIFAR-10 have a test split; other
    data holds out every 10th item and the feature net trains on the rest, so that a folder read class by
    class holds out every class. `channels`: the images as 1 or 3 channels (a gray folder scored against
    samples of a run trained with --channels 3)."""
    train = data.build_dataset(data_name, size, "train", seed, channels)
    if data.has_test_split(data_name):
        return train, data.build_dataset(data_name, size, "test", seed, channels), 0
    held = list(range(9, len(train), 10)) or [len(train) - 1]
    rest = sorted(set(range(len(train))) - set(held))
    return torch.utils.data.Subset(train, rest), torch.utils.data.Subset(train, held), 0


def load_feature_net(data_name="shapes", size=32, seed=0, features="trained", cache=None,
                     n_train=4096, n_test=1024, steps=400, verbose=True, channels=None):
    """The reference net for a dataset and image size: trained once per (data, size, seed) and cached as
    a weights-only checkpoint; `features="random"` is the seeded random initialisation (never cached).
    Returns (net, info) with info["accuracy"] the held-out accuracy (None for random features)."""
    if features not in ("trained", "random"):
        raise ValueError(f"features must be 'trained' or 'random', got {features!r}")
    train, held, start = reference_split(data_name, size, seed, channels)
    info = data.dataset_info(train)
    channels, classes = info["channels"], info["num_classes"]
    if features == "random":
        torch.manual_seed(seed)
        return FeatureNet(channels, classes).eval(), {"features": "random", "accuracy": None}
    if classes < 2:
        raise ValueError(f"{data_name} has no class labels, so a reference net cannot be trained on it; "
                         "use --features random")
    key = dict(version=FEATURE_NET_VERSION, data=data_key(data_name), size=size, seed=seed, channels=channels,
               classes=classes, n_train=n_train, steps=steps)
    path = os.path.join(cache_dir(cache), f"featnet-{key['data']}-{size}px-seed{seed}-n{n_train}-s{steps}-v{FEATURE_NET_VERSION}.pt")
    if os.path.isfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt["key"] == key:
                net = FeatureNet(channels, classes)
                net.load_state_dict(ckpt["model"])
                return net.eval(), {"features": "trained", "accuracy": ckpt["accuracy"], "path": path}
        except Exception as e:  # a corrupt or foreign file: retrain and overwrite it
            if verbose:
                print(f"retraining the reference net: {path} is unreadable ({type(e).__name__})")
    check_output_path(path, "--cache")  # before training: the net is kept only if the cache takes it
    t0 = time.time()
    x, y = stack_items(train, n_train)
    net = fit_feature_net(x, y, classes, seed, steps)
    acc = accuracy(net, *stack_items(held, n_test, start))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save({"model": net.state_dict(), "key": key, "accuracy": acc}, tmp)
    os.replace(tmp, path)
    if verbose:
        print(f"trained the reference net on {len(x)} {data_name} images at {size}px in {time.time() - t0:.0f}s: "
              f"held-out accuracy {acc:.3f} (chance {1 / classes:.3f}); cached at {path}")
    return net, {"features": "trained", "accuracy": acc, "path": path}


def reference_images(data_name, size, n, seed=0, channels=None):
    """n real images the reference net did not train on (shapes, CIFAR-10: the test split), float (n, C, H, W)."""
    _, held, start = reference_split(data_name, size, seed, channels)
    return stack_items(held, n, start)[0]


def evaluate_images(images, data_name="shapes", n_ref=None, k=3, seed=0, features="trained", cache=None,
                    net=None, ref_feats=None, verbose=True, labels=None):
    """FD, precision and recall of generated images (uint8 (N, H, W, C) or float (N, C, H, W)) against
    n_ref held-out real images (default: as many as generated), and the colour statistics of both. With
    the `labels` the images were generated for (and a trained net), also the generated-class accuracy
    with its ceiling and floor. Pass `net` / `ref_feats` to reuse them."""
    x = as_images(images)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} images for precision/recall, got {len(x)}")
    size, channels = x.shape[-1], x.shape[1]
    info = {}
    if net is None:  # check the samples against the data before the reference net is trained
        if labels is not None and features == "trained":
            check_labels(labels, data.dataset_info(reference_split(data_name, size, seed)[0])["num_classes"], data_name)
        net, info = load_feature_net(data_name, size, seed, features, cache, verbose=verbose, channels=channels)
    real = reference_images(data_name, size, n_ref or len(x), seed, channels)
    if len(real) <= k:
        raise ValueError(f"{data_name} holds out {len(real)} image{'s' * (len(real) != 1)} to compare with, fewer "
                         f"than the k + 1 = {k + 1} precision and recall need: use more data (a folder or .npz holds "
                         "out every 10th item) or a smaller --k")
    if ref_feats is None:
        ref_feats = extract_features(net, real)
    fake = extract_features(net, x)
    if fake.shape[1] != ref_feats.shape[1]:
        raise ValueError("the samples and the reference images give features of different sizes")
    p, r = precision_recall(ref_feats, fake, k)
    out = {"fd": frechet_distance_features(ref_feats, fake), "precision": p, "recall": r,
           "n": len(x), "n_ref": len(ref_feats), "k": k, "ref_accuracy": info.get("accuracy"),
           "colour": channel_stats(x), "colour_real": channel_stats(real)}
    if labels is not None and info.get("features", "trained") == "trained":
        out["class"] = generated_class_accuracy(net, x, labels, info.get("accuracy"))
    return out


# -----------------------------------------------------------------------------
# Scores a person can check: does a class-conditional sample show its class, do the colours match?

def generated_class_accuracy(net, images, labels, ref_accuracy=None, num_classes=None, batch=256):
    """Share of class-conditional samples that the reference net assigns to the class they were generated
    for. Its ceiling is the net's accuracy on held-out real images (`ref_accuracy`: a model that samples
    the data exactly scores it, up to sampling noise), its floor is chance, 1 / num_classes. `relative`
    places the score between the two: (acc - floor) / (ceiling - floor)."""
    x, y = as_images(images), torch.as_tensor(labels).long()
    if len(x) != len(y):
        raise ValueError(f"got {len(x)} images but {len(y)} labels")
    k = num_classes or net.head.out_features
    check_labels(y, k, "the reference net")
    acc = accuracy(net.eval(), x, y, batch)
    out = {"accuracy": acc, "ceiling": ref_accuracy, "floor": 1.0 / k, "relative": None}
    if ref_accuracy is not None and ref_accuracy > out["floor"]:
        out["relative"] = (acc - out["floor"]) / (ref_accuracy - out["floor"])
    return out


def channel_stats(images):
    """Colour statistics of a set of images in [-1, 1]: the per-channel mean and std over all pixels, and
    the channel deviation, the mean absolute difference between a pixel's channels and their mean (0 for
    grayscale data; a sampler that paints colour washes onto grey data raises it)."""
    x = as_images(images).double()                                            # (N, C, H, W)
    dev = (x - x.mean(1, keepdim=True)).abs().mean().item()
    return {"mean": x.mean((0, 2, 3)).tolist(), "std": x.std((0, 2, 3)).tolist(), "channel_dev": dev}


# -----------------------------------------------------------------------------
# Restoration (masked images; MT-Diffusion Sec. 4.1)

def _masked_mean(err, m):
    """Mean of err (B, C, H, W) over the pixels where m (B, 1 or C, H, W) is 1, per sample. (B,)"""
    m = m.expand_as(err).float()
    return (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def _mask4(mask):
    return mask[:, None] if mask.ndim == 3 else mask                         # (B, 1, H, W)


def masked_region_mse(x_hat, x, mask):
    """MSE between restored and clean images inside the mask (mask = 1 where pixels were hidden). (B,)"""
    return _masked_mean((x_hat - x) ** 2, _mask4(mask))


def unmasked_change(x_hat, x_in, mask):
    """MSE between the output and the given image outside the mask: how much the visible part moved. (B,)"""
    return _masked_mean((x_hat - x_in) ** 2, 1 - _mask4(mask).float())


def psnr(x_hat, x, data_range=2.0):
    """Peak signal-to-noise ratio in dB per sample; data_range 2 for images in [-1, 1]. (B,)"""
    mse = ((x_hat - x) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


@torch.no_grad()
def perceptual_distance(net, x, y):
    """LPIPS's formula on the reference net: sum over stages of the spatial mean of
    ||h_x / |h_x| - h_y / |h_y|||^2 (channel-wise unit normalisation), without learned weights. (B,)"""
    d = 0
    for hx, hy in zip(net.stage_outputs(x), net.stage_outputs(y)):
        hx, hy = F.normalize(hx, dim=1), F.normalize(hy, dim=1)               # (B, w, h, w)
        d = d + ((hx - hy) ** 2).sum(1).mean((1, 2))
    return d


# -----------------------------------------------------------------------------
# Segmentation

def pixel_accuracy(pred, target):
    """Share of pixels whose predicted class equals the target."""
    return (pred == target).double().mean().item()


def class_iou(pred, target, num_classes):
    """IoU of each class over the whole set, (num_classes,) float64; NaN where a class is in neither."""
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes].double()
    union = (torch.bincount(p, minlength=num_classes)[:num_classes] + torch.bincount(t, minlength=num_classes)[:num_classes]).double() - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def mean_iou(pred, target, num_classes):
    iou = class_iou(pred, target, num_classes)
    return iou[~iou.isnan()].mean().item()


# -----------------------------------------------------------------------------
# Depth (JointNet Sec. 4.1, following MiDaS): align in disparity space, AbsRel in depth, RMSE in disparity

def least_squares_scale_shift(p, g):
    """argmin_{s, b} sum (s p + b - g)^2 over the last dimension: s = cov(p, g) / var(p), b = mean(g) - s mean(p)."""
    pm, gm = p.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    s = ((p - pm) * (g - gm)).sum(-1) / ((p - pm) ** 2).sum(-1).clamp_min(1e-12)
    return s, gm[..., 0] - s * pm[..., 0]


def align_scale_shift(pred, gt, valid=None, solves=10, frac=0.5, generator=None):
    """Per-image scale and shift aligning pred to gt: least squares on `solves` random subsets of
    frac of the valid pixels, the median of each parameter over the solves. Returns (s, b), each (B,)."""
    B = len(pred)
    p, g = pred.reshape(B, -1).double(), gt.reshape(B, -1).double()           # (B, P)
    v = torch.ones_like(p, dtype=torch.bool) if valid is None else valid.reshape(B, -1).bool()
    s_all, b_all = [], []
    for i in range(B):
        pi, gi = p[i][v[i]], g[i][v[i]]                                       # (P_valid,)
        if len(pi) < 2:
            raise ValueError(f"image {i} has fewer than 2 valid depth pixels; cannot align scale and shift")
        m = max(2, int(frac * len(pi)))
        idx = torch.stack([torch.randperm(len(pi), generator=generator)[:m] for _ in range(solves)])  # (solves, m)
        s, b = least_squares_scale_shift(pi[idx], gi[idx])                  # (solves,), (solves,)
        s_all.append(s.median())
        b_all.append(b.median())
    return torch.stack(s_all), torch.stack(b_all)


def depth_metrics(pred, gt, valid=None, solves=10, frac=0.5, seed=0):
    """pred, gt: (B, 1, H, W) normalised disparity (data.py's depth channel, near = +1). Aligns pred to gt,
    then AbsRel = mean |z_hat - z| / z in metric depth and RMSE in the normalised disparity. Returns means
    over the batch and the per-image values."""
    g = torch.Generator().manual_seed(seed)
    s, b = align_scale_shift(pred, gt, valid, solves, frac, generator=g)
    d_hat = (s[:, None, None, None] * pred.double() + b[:, None, None, None]).clamp(-1, 1)  # (B, 1, H, W)
    gt = gt.double()
    m = torch.ones_like(gt) if valid is None else valid.reshape(gt.shape).double()
    z_hat, z = shapes.disparity_to_depth(d_hat), shapes.disparity_to_depth(gt)
    abs_rel = _masked_mean((z_hat - z).abs() / z, m)                          # (B,)
    rmse = _masked_mean((d_hat - gt) ** 2, m).sqrt()                          # (B,)
    return {"abs_rel": abs_rel.mean().item(), "rmse": rmse.mean().item(), "abs_rel_per_image": abs_rel,
            "rmse_per_image": rmse, "scale": s, "shift": b}


# -----------------------------------------------------------------------------
# CLI

def load_npz(path):
    """np.load of an .npz, every failure one sentence (numpy's own hint for a foreign file is to allow
    pickles, which must never be followed for a file of unknown origin)."""
    try:
        f = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        f = None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive (empty, truncated or another format); write samples "
                         "with python sample.py --ckpt RUN")
    return f


def check_sample_images(images, path):
    """One sentence for sample arrays metrics cannot score: not 4-D, not uint8 or float, non-finite, or float
    values outside [-1, 1] (a [0, 255] float array would be scored as wildly saturated images)."""
    if images.ndim != 4 or not len(images):
        raise ValueError(f"the samples in {path} must be a non-empty 4-D array, uint8 (N, H, W, C) as sample.py writes "
                         f"it; got shape {images.shape}")
    if images.dtype == np.uint8:
        return
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"the samples in {path} are {images.dtype}; metrics.py scores uint8 (N, H, W, C) in [0, 255] "
                         "as sample.py writes them, or float (N, C, H, W) in [-1, 1]")
    bad = int((~np.isfinite(images)).sum())
    if bad:
        raise ValueError(f"the samples in {path} hold {bad} NaN or inf values; sample again from a checkpoint "
                         "with finite weights")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"the float samples in {path} lie in [{lo:.3g}, {hi:.3g}], not in [-1, 1]; scale them to "
                         "[-1, 1], or save uint8 in [0, 255] as sample.py does")


def read_samples(f, path):
    """(images, labels or None) of an opened samples .npz: sample.py's `arr_0` (uint8 (N, H, W, C), the
    ADM evaluation suite's key) and `labels`, or the older layout's `images`; `arr_1` is read as labels
    when there is no `labels` (guided-diffusion's class-conditional sample files)."""
    key = "arr_0" if "arr_0" in f else "images" if "images" in f else None
    if key is None:
        raise ValueError(f"{path} has no 'arr_0' (or 'images') array; use an .npz written by sample.py")
    labels = f["labels"] if "labels" in f else f["arr_1"] if "arr_1" in f and f["arr_1"].ndim == 1 else None
    return f[key], labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help=".npz written by sample.py (`arr_0`, or `images` in older "
                   "files: uint8 (N, H, W, C))")
    p.add_argument("--data", default="shapes", help="'shapes', a folder of images, the CIFAR-10 binary folder or an "
                   ".npz: the real distribution")
    p.add_argument("--n-ref", type=ranged(int, 2), help="held-out real images to compare with (default: as many as samples)")
    p.add_argument("--k", type=ranged(int, 1), default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--features", choices=["trained", "random"], default="trained",
                   help="reference net trained on the data's labels, or a fixed random init (folders without labels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference net and of the real data")
    p.add_argument("--cache", help=f"folder for the reference net (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    try:
        if not os.path.isfile(args.samples):
            raise ValueError(f"no samples at {args.samples}: write them with python sample.py --ckpt RUN --n 1000")
        with load_npz(args.samples) as f:
            images, labels = read_samples(f, args.samples)
            labels = labels if args.features == "trained" else None
            if labels is not None and (labels < 0).any():  # sample.py writes -1 for unconditional samples
                labels = None
        check_sample_images(images, args.samples)
        r = evaluate_images(images, args.data, args.n_ref, args.k, args.seed, args.features, args.cache,
                            labels=labels)
    except (ValueError, RunError) as e:
        sys.exit(f"error: {e}")
    acc = "" if r["ref_accuracy"] is None else f", reference net held-out accuracy {r['ref_accuracy']:.3f}"
    print(f"{r['n']} samples vs {r['n_ref']} held-out {args.data} images ({args.features} features{acc})")
    print(f"FD {r['fd']:.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  (k={r['k']})")
    if "class" in r and r["class"]["ceiling"] is not None:
        c = r["class"]
        print(f"generated-class accuracy {c['accuracy']:.3f} (ceiling {c['ceiling']:.3f}: the reference net on real "
              f"images; floor {c['floor']:.3f}: chance; relative {c['relative']:.2f})")
    fmt = lambda v: "[" + ", ".join(f"{u:+.3f}" for u in v) + "]"
    for name, s in (("samples", r["colour"]), ("real", r["colour_real"])):
        print(f"{name:>7}: channel mean {fmt(s['mean'])}  std {fmt(s['std'])}  channel deviation {s['channel_dev']:.3f}")
    return r


if __name__ == "__main__":
    main()
