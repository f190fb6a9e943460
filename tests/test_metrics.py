"""Tests of metrics.py against closed forms and hand-computed values."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import metrics  # noqa: E402
import shapes  # noqa: E402



def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# -----------------------------------------------------------------------------
# Frechet distance

def test_frechet_diagonal_closed_form():
    # Commuting covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_closed_form():
    # Non-commuting covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed with symmetric eigh only.
    rng = np.random.default_rng(1)
    s1, s2, mu1, mu2 = random_spd(rng, 6), random_spd(rng, 6), rng.normal(size=6), rng.normal(size=6)
    r1 = psd_sqrt(s1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_samples_matches_gaussians():
    # Monte-Carlo: the FD of large samples approaches the FD of the Gaussians they were drawn from.
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 3), random_spd(rng, 3)
    mu1, mu2 = np.zeros(3), np.array([1.0, -0.5, 0.25])
    f1 = rng.multivariate_normal(mu1, s1, size=200_000)
    f2 = rng.multivariate_normal(mu2, s2, size=200_000)
    exact = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert metrics.frechet_distance_features(f1, f2) == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("n, d", [(500, 8), (40, 64)])  # full-rank and rank-deficient covariances
def test_frechet_zero_for_identical_sets(n, d):
    f = np.random.default_rng(3).normal(size=(n, d))
    assert metrics.frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-6)
    # A pure shift by c moves only the mean term: FD = d c^2, even when the covariance is singular.
    assert metrics.frechet_distance_features(f, f + 0.5) == pytest.approx(d * 0.25, rel=1e-4)


def test_frechet_singular_product_is_finite_and_symmetric():
    s1 = np.diag([1.0, 0.0, 2.0])  # PSD, singular: sqrtm of the product needs the eps offset
    s2 = np.diag([0.0, 1.0, 2.0])
    fd = metrics.frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert fd == pytest.approx(2.0, abs=1e-4)  # (1 - 0)^2 + (0 - 1)^2 + 0
    assert fd == pytest.approx(metrics.frechet_distance(np.zeros(3), s2, np.zeros(3), s1), abs=1e-9)


def test_frechet_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="feature dimension"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="2 rows"):
        metrics.feature_stats(np.zeros((1, 4)))


# -----------------------------------------------------------------------------
# Precision / recall

def test_knn_radii_match_brute_force():
    f = np.random.default_rng(4).normal(size=(50, 3))
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(metrics.knn_radii(f, k=3, chunk=7).numpy(), expected, rtol=1e-12)


def test_precision_recall_of_a_set_with_itself_is_one():
    f = np.random.default_rng(5).normal(size=(200, 16))
    assert metrics.precision_recall(f, f) == (1.0, 1.0)


def test_precision_recall_hand_example():
    # Real points 0..4 on a line: with k = 1 every radius is 1, so the real manifold is [-1, 5].
    # Fake points {0.5, 10}: radius |10 - 0.5| = 9.5 each, so the fake manifold covers all of 0..4.
    real = np.arange(5.0)[:, None]
    fake = np.array([[0.5], [10.0]])
    assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)
    far = np.random.default_rng(6).normal(size=(30, 2))
    assert metrics.precision_recall(far, far + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_checks_k_and_shapes():
    with pytest.raises(ValueError, match="k must be"):
        metrics.knn_radii(np.zeros((3, 2)), k=3)
    with pytest.raises(ValueError, match="same D"):
        metrics.precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))


# -----------------------------------------------------------------------------
# Reference network

def test_feature_net_training_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # a learnable label
    nets = [metrics.fit_feature_net(x, y, 2, seed=s, steps=5, batch_size=16) for s in (1, 1, 2)]
    a, b, c = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert metrics.extract_features(nets[0], x).shape == (64, nets[0].dim)


def test_as_images_converts_uint8_nhwc():
    u = np.array([0, 255, 128], np.uint8).reshape(1, 1, 1, 3)
    x = metrics.as_images(u)
    assert x.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(x.flatten().numpy(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)


# -----------------------------------------------------------------------------
# Restoration, segmentation

def test_restoration_metrics_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    x_hat = torch.tensor([[[[1.0, 2.0], [0.0, 0.5]]]])
    mask = torch.tensor([[[1, 1], [0, 0]]])  # top row hidden
    assert metrics.masked_region_mse(x_hat, x, mask).item() == pytest.approx((1 + 4) / 2)
    assert metrics.unmasked_change(x_hat, x, mask).item() == pytest.approx((0 + 0.25) / 2)
    mse = (1 + 4 + 0.25) / 4
    assert metrics.psnr(x_hat, x).item() == pytest.approx(10 * np.log10(4 / mse))


def test_perceptual_distance_zero_for_identical_and_symmetric():
    torch.manual_seed(0)
    net = metrics.FeatureNet(3, 4).eval()
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(metrics.perceptual_distance(net, x, x), torch.zeros(2), atol=1e-6)
    d = metrics.perceptual_distance(net, x, y)
    assert (d > 0).all() and torch.allclose(d, metrics.perceptual_distance(net, y, x), atol=1e-6)


def test_segmentation_metrics_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 2]])
    assert metrics.pixel_accuracy(pred, target) == pytest.approx(6 / 8)
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 3, union 4; class 3 absent.
    iou = metrics.class_iou(pred, target, 4)
    np.testing.assert_allclose(iou[:3].numpy(), [1 / 3, 2 / 3, 3 / 4])
    assert torch.isnan(iou[3])
    assert metrics.mean_iou(pred, target, 4) == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)


# -----------------------------------------------------------------------------
# Depth

def test_least_squares_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    s_true, b_true = torch.tensor([0.5, 2.0, -1.5]), torch.tensor([0.1, -0.3, 0.7])
    pred = (gt - b_true[:, None, None, None]) / s_true[:, None, None, None]
    s, b = metrics.align_scale_shift(pred, gt, generator=g)
    torch.testing.assert_close(s.float(), s_true, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.float(), b_true, atol=1e-5, rtol=0)


def test_depth_metrics_against_hand_formula():
    # gt and h both sum to 0 and are orthogonal, so for pred = gt + e h the least-squares fit of gt on pred
    # is b = 0, s = |gt|^2 / (|gt|^2 + e^2 |h|^2) = 0.5 / 0.54. RMSE and AbsRel then follow by hand, with
    # the fixed disparity -> depth map (1/z affine in d: d = -1 -> 1/Z_FAR, d = +1 -> 1/Z_NEAR).
    d_gt, h, e = np.array([-0.5, 0.0, 0.5, 0.0]), np.array([1.0, -1.0, 1.0, -1.0]), 0.1
    r = metrics.depth_metrics(torch.tensor(d_gt + e * h).reshape(1, 1, 2, 2), torch.tensor(d_gt).reshape(1, 1, 2, 2),
                              solves=3, frac=1.0)
    s = 0.5 / 0.54
    assert r["scale"].item() == pytest.approx(s, rel=1e-9) and r["shift"].item() == pytest.approx(0.0, abs=1e-9)
    d_hat = s * (d_gt + e * h)
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((d_hat - d_gt) ** 2)), rel=1e-9)

    def z(d):
        return 1 / ((d + 1) / 2 * (1 / shapes.Z_NEAR - 1 / shapes.Z_FAR) + 1 / shapes.Z_FAR)
    assert r["abs_rel"] == pytest.approx(np.mean(np.abs(z(d_hat) - z(d_gt)) / z(d_gt)), rel=1e-9)


def test_depth_alignment_is_robust_to_a_subset_outlier():
    # The median over solves on random halves ignores a few corrupted pixels better than one full solve.
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1
    pred = 0.5 * gt + 0.2
    pred.view(-1)[:2] = 5.0  # two wild pixels
    s_med, _ = metrics.align_scale_shift(pred, gt, solves=25, frac=0.1, generator=g)
    s_one, _ = metrics.least_squares_scale_shift(pred.reshape(1, -1).double(), gt.reshape(1, -1).double())
    assert abs(s_med.item() - 2.0) < abs(s_one.item() - 2.0)
    assert abs(s_med.item() - 2.0) < 0.05


# -----------------------------------------------------------------------------
# The reference net on the shapes data, its cache, and the CLI

def test_reference_net_is_cached_and_reloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path))
    kw = dict(n_train=64, n_test=32, steps=3)
    net, info = metrics.load_feature_net("shapes", 16, seed=0, **kw)
    assert "held-out accuracy" in capsys.readouterr().out and 0 <= info["accuracy"] <= 1
    assert os.path.dirname(info["path"]) == str(tmp_path) and os.path.isfile(info["path"])
    again, info2 = metrics.load_feature_net("shapes", 16, seed=0, **kw)
    assert capsys.readouterr().out == ""  # loaded, not retrained
    assert info2["accuracy"] == info["accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    with open(info["path"], "wb") as f:  # a corrupt cache file is retrained, not a crash
        f.write(b"not a checkpoint")
    _, info3 = metrics.load_feature_net("shapes", 16, seed=0, **kw)
    assert "retraining" in capsys.readouterr().out and info3["accuracy"] == info["accuracy"]


def test_random_features_need_no_labels_or_training(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path))
    net, info = metrics.load_feature_net("shapes", 16, features="random")
    assert info["accuracy"] is None and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="trained"):
        metrics.load_feature_net("shapes", 16, features="inception")


def test_cli_scores_real_images_against_held_out_ones(tmp_path, capsys):
    ds = data.build_dataset("shapes", 16, "train", 0)
    images = np.stack([((ds[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8) for i in range(64)])
    path = tmp_path / "samples.npz"
    np.savez(path, images=images)
    r = metrics.main(["--samples", str(path), "--data", "shapes", "--features", "random", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert "FD" in out and "precision" in out and r["n"] == r["n_ref"] == 64
    # Real train images against real test images: same distribution, so FD is small next to a shifted set.
    shifted = metrics.main(["--samples", str(_write(tmp_path / "dark.npz", images // 4)), "--features", "random",
                            "--cache", str(tmp_path)])
    assert r["fd"] < shifted["fd"] and r["recall"] > shifted["recall"]


def _write(path, images):
    np.savez(path, images=images)
    return path


def test_cli_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="no samples at"):
        metrics.main(["--samples", str(tmp_path / "missing.npz")])
    np.savez(tmp_path / "x.npz", other=np.zeros(3))
    with pytest.raises(SystemExit, match="no 'arr_0' \\(or 'images'\\) array"):
        metrics.main(["--samples", str(tmp_path / "x.npz")])


# -----------------------------------------------------------------------------
# Generated-class accuracy and colour statistics

def test_generated_class_accuracy_of_real_images_is_the_reference_accuracy(tmp_path, monkeypatch):
    # Real held-out images "generated" for their true labels score exactly the reference net's held-out
    # accuracy: the ceiling of the score, reached with relative score 1.
    monkeypatch.setenv(metrics.CACHE_ENV, str(tmp_path))
    net, info = metrics.load_feature_net("shapes", 16, seed=0, n_train=256, n_test=64, steps=60)
    _, held, start = metrics.reference_split("shapes", 16)
    x, y = metrics.stack_items(held, 64, start)
    r = metrics.generated_class_accuracy(net, x, y, info["accuracy"])
    assert info["accuracy"] > 0.4  # the net learned something, so the ceiling sits above the floor
    assert r["accuracy"] == info["accuracy"] and r["relative"] == pytest.approx(1.0)
    assert r["floor"] == 0.25 and r["ceiling"] == info["accuracy"]
    # Labels that disagree with the images drop the score; chance-level guessing gives relative ~0.
    shuffled = metrics.generated_class_accuracy(net, x, (y + 1) % 4, info["accuracy"])
    assert shuffled["accuracy"] < r["accuracy"] and shuffled["relative"] < 0.5
    # A uint8 (N, H, W, C) array, as sample.py writes it, scores like the float images it encodes.
    u8 = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert abs(metrics.generated_class_accuracy(net, u8, y)["accuracy"] - r["accuracy"]) <= 2 / 64
    with pytest.raises(ValueError, match="labels"):
        metrics.generated_class_accuracy(net, x, y[:10])


def test_channel_stats_closed_forms():
    g = torch.Generator().manual_seed(0)
    grey = (torch.rand(8, 1, 6, 6, generator=g) * 2 - 1).repeat(1, 3, 1, 1)
    s = metrics.channel_stats(grey)
    assert s["channel_dev"] == pytest.approx(0.0, abs=1e-12)  # grayscale: every pixel's channels agree
    assert s["mean"][0] == pytest.approx(grey[:, 0].double().mean().item())
    assert s["std"][1] == pytest.approx(grey[:, 1].double().std().item())
    # Channels (a, a + d, a - d): deviations |0|, |d|, |d| from the pixel mean a, so the mean is 2|d|/3.
    d = 0.3
    tinted = torch.cat([grey[:, :1], grey[:, :1] + d, grey[:, :1] - d], 1)
    assert metrics.channel_stats(tinted)["channel_dev"] == pytest.approx(2 * d / 3, rel=1e-6)
    assert metrics.channel_stats(tinted)["mean"][1] - metrics.channel_stats(tinted)["mean"][0] == pytest.approx(d, rel=1e-6)


def test_cli_prints_colour_statistics(tmp_path, capsys):
    # Unconditional samples (labels -1, as sample.py writes them) get colour statistics and no class score.
    _, held, start = metrics.reference_split("shapes", 16)
    x, _ = metrics.stack_items(held, 32, start)
    u8 = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "u.npz", images=u8, labels=-np.ones(32, np.int64))
    r = metrics.main(["--samples", str(tmp_path / "u.npz"), "--features", "random", "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert "class" not in r and "channel deviation" in out
    assert r["colour"]["mean"] == pytest.approx(metrics.channel_stats(u8)["mean"])


def test_cli_reads_the_new_and_the_old_samples_layout(tmp_path):
    # sample.py's arr_0 + labels, the older images + labels, and guided-diffusion's arr_0 + arr_1 score alike.
    _, held, start = metrics.reference_split("shapes", 16)
    x, y = metrics.stack_items(held, 24, start)
    u8 = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    layouts = {"new": dict(arr_0=u8, labels=y.numpy()), "old": dict(images=u8, labels=y.numpy()),
               "adm": dict(arr_0=u8, arr_1=y.numpy())}
    fds = []
    for name, arrays in layouts.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with np.load(tmp_path / f"{name}.npz") as f:
            images, labels = metrics.read_samples(f, name)
        assert np.array_equal(images, u8) and np.array_equal(labels, y.numpy())
        fds.append(metrics.main(["--samples", str(tmp_path / f"{name}.npz"), "--features", "random",
                                 "--cache", str(tmp_path)])["fd"])
    assert fds[0] == fds[1] == fds[2]


def test_cifar10_is_scored_against_its_test_batch(tmp_path, capsys):
    from test_data import write_cifar
    folder = write_cifar(tmp_path, n=8)
    train_split, held, start = metrics.reference_split(str(folder), 16)
    assert (len(train_split), len(held), start) == (40, 8, 0) and held.records.tobytes() == (
        folder / "test_batch.bin").read_bytes()
    net, info = metrics.load_feature_net(str(folder), 16, n_train=40, n_test=8, steps=2, cache=str(tmp_path))
    assert info["features"] == "trained" and net.head.out_features == 10
    u8 = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=u8, labels=np.arange(10))
    r = metrics.main(["--samples", str(tmp_path / "s.npz"), "--data", str(folder), "--features", "random",
                      "--cache", str(tmp_path)])
    assert r["n"] == 10 and r["n_ref"] == 8  # all 8 records of test_batch.bin


def test_a_folder_read_class_by_class_holds_out_every_class(tmp_path):
    data.make_glyphs(str(tmp_path / "g"), per_class=10)  # files sorted by class: 0/..., 1/..., ..., 9/...
    train, held, start = metrics.reference_split(str(tmp_path / "g"), 16)
    labels = lambda ds: {ds[i]["label"].item() for i in range(len(ds))}
    assert (len(train), len(held), start) == (90, 10, 0) and labels(held) == labels(train) == set(range(10))
    assert not set(train.indices) & set(held.indices)
