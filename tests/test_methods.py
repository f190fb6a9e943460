"""methods.py: one registry, optional hooks, and a new method as one file plus one registry entry."""
import ast
import json
import os

import pytest

import methods
import runlib
import sample
import toy_method
import train

TINY = ["--image-size", "16", "--batch-size", "8", "--log-every", "2", "--ckpt-every", "1000",
        "--sample-every", "1000", "--sample-steps", "2", "--warmup", "1"]


@pytest.fixture
def toy(monkeypatch):
    # the one registry line a new method needs (plus its import)
    monkeypatch.setitem(methods.METHODS, "toy", methods.Method(dict(target="x0"), toy_method))


def test_a_new_method_trains_resumes_and_samples_through_the_loop(toy, tmp_path, capsys):
    out = tmp_path / "toy"
    assert train.main([*TINY, "--method", "toy", "--toy-scale", "2", "--steps", "4", "--out", str(out)]) == 4
    assert train.main(["--resume", "--out", str(out), "--steps", "6"]) == 6
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(0 < r["toy_weight"] < 2 and r["toy_params"] > 0 and len(r["loss_bins"]) == 10 for r in log)
    model, cfg, _ = methods.load_run(out)
    assert cfg["target"] == "x0" and cfg["toy_scale"] == 2                    # the preset and the method's flag
    sample.main(["--ckpt", str(out), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s")])  # default sampler
    assert (tmp_path / "s.png").exists()


def test_hooks_are_optional_and_fall_back_to_the_defaults(toy):
    assert methods.hook("toy", "training_loss") is toy_method.training_loss
    assert methods.hook("toy", "build_model") is runlib.build_backbone
    assert methods.hook("toy", "sample_rows") is methods.diffusion_sample_rows
    assert methods.hook("toy", "prepare_config") is None and methods.hook("toy", "SHAPE_KEYS") == ()
    assert methods.hook("ddpm", "training_loss") is methods.diffusion_training_loss
    assert methods.hook("mtdiff", "run_sample_mode") is methods.sample_modes()["mt-restore"].run_sample_mode


def test_no_project_module_imports_the_loop_or_imports_inside_functions():
    """Each file's dependencies are its first lines: no function-local import of a project module, and
    no paper or helper file imports train.py or sample.py."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    for name in project:
        tree = ast.parse(open(os.path.join(root, name + ".py")).read())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                if any(m.split(".")[0] in project for m in mods):
                    assert node in top, f"{name}.py imports {mods} inside a function"
                    if name not in ("bench", "bench_common", "bench_evidence", "bench_recipe", "bench_report", "bench_timing"):
                        assert not {"train", "sample"} & {m.split(".")[0] for m in mods}, f"{name}.py imports the loop"


def test_a_misspelt_hook_or_a_wrong_signature_is_refused_in_one_sentence():
    import types
    typo = types.ModuleType("typo_method")
    exec("def training_los(model, batch, sched, cfg, rng):\n    pass\n", typo.__dict__)
    with pytest.raises(TypeError, match=r"^typo_method.training_los is not a hook .* did you mean training_loss\?"):
        methods.check_module(typo)
    short = types.ModuleType("short_method")
    exec("def training_loss(model, batch, sched, cfg):\n    pass\n", short.__dict__)
    with pytest.raises(TypeError, match=r"training_loss\(model, batch, sched, cfg, rng\)"):
        methods.check_module(short)
    const = types.ModuleType("const_method")
    const.SHAPE_KEYS = "task"
    with pytest.raises(TypeError, match="SHAPE_KEYS must be a tuple"):
        methods.check_module(const)
    for module in methods.modules():  # every registered module passes, and so does the toy method
        methods.check_module(module)
    methods.check_module(toy_method)


def test_the_registry_refuses_a_misspelt_hook_before_training(monkeypatch, tmp_path, capsys):
    import types
    typo = types.ModuleType("typo_method")
    exec("def sample_row(model, sched, cfg, n, generator, device):\n    pass\n", typo.__dict__)
    monkeypatch.setitem(methods.METHODS, "typo", methods.Method(dict(), typo))
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--method", "ddpm", "--steps", "1", "--out", str(tmp_path / "r")])
    assert str(e.value.code).startswith("error: typo_method.sample_row is not a hook")
    assert not (tmp_path / "r").exists()


def test_paper_files_import_no_other_paper_file():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    papers = {"minsnr", "dtr", "mtdiffusion", "jointnet"}
    base = {"diffusion", "unet", "dit", "shapes", "data", "runlib"}
    for name in papers:
        tree = ast.parse(open(os.path.join(root, name + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for m in mods:
                    top = m.split(".")[0]
                    assert top not in papers - {name} and not top.endswith("_eval") and top not in (
                        "methods", "config", "train", "sample", "metrics"), f"{name}.py imports {m}"
                    assert top in base or not os.path.exists(os.path.join(root, top + ".py")), f"{name}.py imports {m}"
