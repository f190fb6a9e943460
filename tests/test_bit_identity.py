"""Training is bit-identical to the recorded fixture: every method's first 3 losses and a hash of its weights
after 3 steps, on each backbone it supports.

The stored results of bench.py (results/*.json) were trained by this code; a change that moves a single
bit of a training step would make them stale. tests/bit_identity.json was recorded on the CPU named in
it, with one torch thread; float results depend on the CPU's vector instructions, so on another CPU the
losses are compared to 1e-5 instead of bit for bit.

    python tests/test_bit_identity.py --record      # rewrite the fixture (only when training is meant to change)
"""
import hashlib
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bit_identity.json")
TINY = ["--image-size", "16", "--batch-size", "8", "--steps", "3", "--log-every", "1", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "2", "--warmup", "2", "--seed", "3"]
PLAIN = ("ddpm", "minsnr", "minsnr_v", "dtr", "rtr", "dtr_minsnr")
CASES = {
    **{f"{a}/{m}": [*b, "--method", m] for m in PLAIN for a, b in (("unet", []), ("dit", ["--arch", "dit"]))},
    **{f"{a}/mtdiff-{task}": [*b, "--method", "mtdiff", "--task", task]
       for task in ("masked", "label", "translate") for a, b in (("unet", []), ("dit", ["--arch", "dit"]))},
    "unet/mtdiff-label-E-v": ["--method", "mtdiff", "--task", "label", "--mt-head", "E", "--target", "v",
                               "--weighting", "min_snr"],
    "unet/mtdiff-masked-v": ["--method", "mtdiff", "--task", "masked", "--target", "v", "--weighting", "min_snr"],
    "unet/jointnet": ["--method", "jointnet"],
    "unet/direct_extend": ["--method", "direct_extend"],
}
BASE = ["--method", "ddpm"]  # the RGB run that jointnet and direct_extend start from (--init)


def fingerprint():
    return {"torch": torch.__version__.split("+")[0], "cpu": torch.backends.cpu.get_cpu_capability()}


def weights_hash(state):
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_case(name, root):
    """(first 3 losses, sha256 of the trained weights) of one case, trained in root/name."""
    extra = CASES[name]
    if name.startswith("unet/jointnet") or name.startswith("unet/direct"):
        base = os.path.join(root, "base")
        if not os.path.exists(base):
            train.main([*TINY, *BASE, "--out", base])
        extra = [*extra, "--init", os.path.join(base, "checkpoint.pt")]
    out = os.path.join(root, name.replace("/", "_"))
    torch.set_num_threads(1)
    assert train.main([*TINY, *extra, "--out", out]) == 3
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    return losses, weights_hash(state)


@pytest.fixture(scope="module")
def recorded():
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_training_is_bit_identical_to_the_fixture(name, recorded, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp() / "bit_identity")
    os.makedirs(root, exist_ok=True)
    losses, digest = run_case(name, root)
    want = recorded["cases"][name]
    if recorded["fingerprint"] == fingerprint():
        assert [x.hex() for x in losses] == want["losses_hex"], f"{name}: the first 3 losses moved"
        assert digest == want["weights_sha256"], f"{name}: the weights after 3 steps moved"
    else:  # another CPU's vector instructions round differently; the values must still agree closely
        assert losses == pytest.approx([float.fromhex(x) for x in want["losses_hex"]], rel=1e-5)


def record():
    import tempfile
    cases = {}
    with tempfile.TemporaryDirectory() as root:
        for name in CASES:
            losses, digest = run_case(name, root)
            cases[name] = {"losses": losses, "losses_hex": [x.hex() for x in losses], "weights_sha256": digest}
            print(name, losses)
    with open(FIXTURE, "w") as f:
        json.dump({"fingerprint": fingerprint(), "cases": cases}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_bit_identity.py --record")
    record()
