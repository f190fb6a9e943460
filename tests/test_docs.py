"""What the README and docstrings say matches the papers and the results files."""
import os
import re

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



def numbers(text):
    """The numbers in a text, normalised: unicode minus to '-', thousands separators dropped, '+' dropped."""
    text = text.replace("\u2212", "-").replace("\u00d7", "x").replace("\u2013", " ")
    text = re.sub(r"(\d)-(\d)", r"\1 \2", text)  # a range 0.99-1.01 is two numbers, not a negative one
    return {m.replace(",", "").lstrip("+") for m in re.findall(r"[-+]?\d[\d,]*(?:\.\d+)?", text)}


def test_every_readme_table_with_a_source_matches_its_results_file():
    """A README table introduced by `<!-- numbers: results/FILE -->` quotes only numbers that FILE holds:
    the tables are copied from bench.py's output, never typed by hand."""
    readme = read("README.md")
    marked = re.findall(r"[ \t]*<!-- numbers: (\S+) -->\n((?:[ \t]*\|.*\n)+)", readme)
    assert len(marked) >= 3, "the README's result tables name their source files"
    for source, table in marked:
        held = numbers(read(source))
        body = "\n".join(table.splitlines()[2:])  # the rows, not the header
        missing = sorted(numbers(body) - held)
        assert not missing, f"README table from {source} quotes numbers {source} does not hold: {missing[:10]}"
