"""What the README and docstrings say about the papers matches the papers."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_jointnet_fig8_is_a_grid_of_samples_not_a_curve():
    for name in ("README.md", "jointnet.py", "bench.py"):
        text = read(name)
        assert "forgetting curve" not in text, name
        assert "proxy" in text and "Fig. 8" in text, name


def test_dtr_app_e_costs_per_model_size():
    for name in ("README.md", "dtr.py"):
        text = " ".join(read(name).split())
        assert "0.6%, 0.4% and 0.3%" in text and "about 0.6%" not in text, name

