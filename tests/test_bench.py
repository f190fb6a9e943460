"""bench.py and its bench_*.py jobs: the tiny profile end to end (a few steps of every row), and its summary
logic by hand."""
import json
import math
import os
import statistics
import sys
import threading
import time

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import bench_common  # noqa: E402
import bench_evidence  # noqa: E402
import bench_recipe  # noqa: E402
import bench_report  # noqa: E402
import bench_timing  # noqa: E402
import train  # noqa: E402



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFUSION_FOUR_PAPERS_CACHE", str(tmp / "cache"))
    try:
        report = bench.main(["--tiny", "--runs", str(tmp / "runs"), "--json", str(tmp / "bench.json"),
                             "--md", str(tmp / "bench.md")])
    finally:
        mp.undo()
    return tmp, report


def test_tiny_profile_writes_json_with_every_section(tiny):
    tmp, report = tiny
    saved = json.load(open(tmp / "bench.json"))
    assert saved["profile_name"] == "tiny" and saved["command"].startswith("python bench.py --tiny")
    steps = [str(s) for s in bench_common.PROFILES["tiny"]["checkpoints"]]
    scored = [r for r in saved["quality"] if "scores" in r]
    groups = {r["group"] for r in scored}
    assert {"methods", "weighting"} <= groups
    for r in scored:
        assert list(r["scores"]) == steps
        for s in r["scores"].values():
            assert math.isfinite(s["fd"]) and s["fd"] >= 0 and 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
        assert len(r["loss_bins"]) == 10
    archs = {(r["arch"], r["method"]) for r in scored}
    assert {("unet", "ddpm"), ("unet", "dtr"), ("dit", "ddpm")} <= archs
    for a in bench_common.PROFILES["tiny"]["arches"]:
        ddpm = [r for r in saved["speed"] if r["arch"] == a and r["method"] == "ddpm"]
        assert len(ddpm) == 1 and ddpm[0]["ratio_to_ddpm"] == 1.0
    assert all(r["img_per_s"] > 0 and r["params"] >= r["trainable"] > 0 for r in saved["speed"])
    assert {r["sampler"].split("-")[0] for r in saved["sampling"]} == {"DDIM", "DDPM"}
    assert all(isinstance(c["holds"], bool) and c["seeds"] == 1 for c in saved["claims"])
    cost = saved["routing_cost"]
    assert [r["model"] for r in cost] == [m for m, *_ in bench_common.PROFILES["tiny"]["routing_cost"]]
    for r in cost:
        for c in (r["dtr_ratio"], r["aa_ratio"]):
            assert 0 < c["lo"] <= c["median"] <= c["hi"]
        assert r["step_ms"] > 0 and r["repeats"] == 3


def test_tiny_profile_writes_well_formed_markdown(tiny):
    tmp, report = tiny
    text = open(tmp / "bench.md").read()
    assert text == bench_report.markdown(report)
    assert text.startswith("# Reproduction table (tiny profile)")
    for title in ("## Claims", "## Methods", "## Loss weighting", "## Training speed", "## Sampling speed", "## DTR cost"):
        assert title in text
    # Every table: a header, a |---| separator with as many columns, and rows with as many cells.
    blocks = [b for b in text.split("\n\n") if b.startswith("|")]
    assert len(blocks) >= 5
    for b in blocks:
        lines = b.strip().split("\n")
        n = lines[0].count("|")
        assert set(lines[1].replace("|", "")) == {"-"} and lines[1].count("|") == n
        assert all(line.count("|") == n for line in lines[2:]), b
        assert len(lines) >= 3


def test_loss_bins_average_the_last_stretch():
    log = [{"step": 2, "loss_bins": [1.0] * 10},
           {"step": 4, "loss_bins": [2.0, None] + [3.0] * 8},
           {"step": 6, "loss_bins": [4.0, None] + [5.0] * 8}]
    assert bench_common.loss_bins(log, after_step=2) == [3.0, None] + [4.0] * 8
    # Nothing after step 6: every record counts; bin 1 only has the first record's value.
    assert bench_common.loss_bins(log, after_step=6) == pytest.approx([7 / 3, 1.0] + [3.0] * 8)


def test_rows_with_identical_training_share_a_run():
    prof = {**bench_common.PROFILES["quick"], "arches": ("unet",)}
    keys = [bench_common.run_key(s) for s in bench_report.quality_specs(prof)]
    names = [s["name"] for s in bench_report.quality_specs(prof)]
    # --method minsnr is eps-prediction with min-SNR-5: the same training as the weighting row eps/min_snr;
    # the SNR weight of eps-prediction is 1, the unweighted loss of ddpm.
    assert keys[names.index("unet/minsnr")] == keys[names.index("unet/eps/min_snr")]
    assert keys[names.index("unet/ddpm")] == keys[names.index("unet/eps/snr")]
    assert keys[names.index("unet/ddpm")] != keys[names.index("unet/eps/const")]
    assert len(set(keys)) == len(keys) - 2


def _summary(fd):
    """A summary as summarize() writes it, from {row: [FD per checkpoint]} with one seed."""
    out = {}
    for name, vals in fd.items():
        s = {f"fd@{c}": {"mean": v, "std": 0.0, "n": 1} for c, v in zip((1, 2), vals)}
        s["fd_mean"], s["seeds"] = {"mean": sum(vals) / len(vals), "std": 0.0, "n": 1}, 1
        out[name] = s
    return out


def test_claims_compare_the_right_rows():
    s = _summary({"unet/ddpm": [10, 8], "unet/dtr": [9, 7], "unet/rtr": [11, 9], "unet/minsnr": [9.5, 7.5],
                  "unet/dtr_minsnr": [8, 6.5]})
    c = {x["claim"]: x for x in bench_report.claims(s, [], (1, 2))}
    assert c["DTR lowers FD (unet)"]["holds"] and c["DTR converges faster (unet)"]["holds"]
    assert c["random routing (R-TR) degrades ddpm (unet)"]["holds"]
    assert c["DTR + Min-SNR beats either alone (unet)"]["holds"]
    assert c["DTR lowers FD (unet)"]["margin"] == 1 and not c["DTR lowers FD (unet)"]["within_noise"]
    c = {x["claim"]: x for x in bench_report.claims(s, [], (1, 2), noise=0.75)}  # margins: 1 and 7 - 6.5 = 0.5
    assert not c["DTR lowers FD (unet)"]["within_noise"] and c["DTR + Min-SNR beats either alone (unet)"]["within_noise"]
    s = _summary({"unet/ddpm": [10, 8], "unet/dtr": [11, 9]})
    c = {x["claim"]: x for x in bench_report.claims(s, [], (1, 2))}
    assert not c["DTR lowers FD (unet)"]["holds"] and "9.00 (dtr) vs 8.00 (ddpm)" in c["DTR lowers FD (unet)"]["evidence"]
    w = _summary({f"unet/v/{k}": [v, v] for k, v in zip(bench_common.WEIGHTINGS, (4.0, 3.0, 5.0, 2.0))})
    c = {x["claim"]: x for x in bench_report.claims(w, [], (1, 2))}
    assert c["min-SNR-5 converges fastest (v-prediction)"]["holds"]
    assert c["min-SNR-5 converges fastest (v-prediction)"]["margin"] == 1.0


def test_jointnet_claim_reads_the_held_out_rgb_loss():
    s = _summary({"unet/jointnet": [5, 5], "unet/direct_extend": [6, 6]})
    rows = [dict(method="jointnet", rgb_heldout={"first": 0.10, "last": 0.10}),
            dict(method="direct_extend", rgb_heldout={"first": 0.10, "last": 0.12})]
    c = bench_report.claims(s, rows, (1, 2))[-1]
    assert c["source"] == "JointNet Fig. 8" and c["holds"] and "+20.0% (direct extend)" in c["evidence"]
    rows[1]["rgb_heldout"]["last"] = 0.09  # Direct Extend did not forget
    assert not bench_report.claims(s, rows, (1, 2))[-1]["holds"]


def test_mean_std_and_format():
    assert bench_common.mean_std([1.0, 3.0, None]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    assert bench_common.fmt(bench_common.mean_std([1.0, 3.0])) == "2.00 ± 1.41"
    assert bench_common.fmt(bench_common.mean_std([2.5])) == "2.50" and bench_common.fmt(None) == "-"


def test_routing_only_writes_the_dtr_cost_table(tmp_path):
    prof = {**bench_common.PROFILES["tiny"], "routing_cost": (("DiT-T/4", 16, 2, 2),)}
    mp = pytest.MonkeyPatch()
    mp.setitem(bench_common.PROFILES, "tiny", prof)
    try:
        report = bench.main(["--tiny", "--only", "routing", "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md")])
    finally:
        mp.undo()
    assert [r["model"] for r in report["routing_cost"]] == ["DiT-T/4"]
    assert json.load(open(tmp_path / "r.json"))["routing_cost"][0]["batch"] == 2
    text = open(tmp_path / "r.md").read()
    assert text.startswith("# DTR cost (tiny profile)") and "| DiT-T/4 | 16px | 2 |" in text


def test_speed_only_times_every_method_and_the_samplers(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_FOUR_PAPERS_CACHE", str(tmp_path / "cache"))
    report = bench.main(["--tiny", "--only", "speed", "--json", str(tmp_path / "s.json"), "--runs", str(tmp_path / "runs")])
    methods = {(r["model"], r["method"]) for r in report["speed_cost"]["training"]}
    assert {("unet-cpu", "ddpm"), ("unet-cpu", "jointnet"), ("DiT-T/4", "ddpm")} <= methods
    assert all(r["img_per_s"] > 0 for r in report["speed_cost"]["training"] + report["speed_cost"]["sampling"])
    text = open(tmp_path / "s.md").read()
    assert text.startswith("# Speed (tiny profile)") and "## Training speed" in text and "## Sampling speed" in text


def test_compile_only_writes_its_table_through_the_same_path(tmp_path, monkeypatch):
    c = {"median": 0.9, "lo": 0.85, "hi": 0.95}
    row = dict(model="unet-cpu", image_size=16, batch=2, eager_ms=10.0, compiled_ms=9.0, compiled_ratio=c,
               aa_ratio={"median": 1.0, "lo": 0.99, "hi": 1.01}, compile_s=3.0, break_even_steps=3000.0, repeats=4)
    monkeypatch.setattr(bench_timing, "compile_cost", lambda prof, name: [row])
    report = bench.main(["--tiny", "--only", "compile", "--json", str(tmp_path / "c.json"), "--md", str(tmp_path / "c.md")])
    assert report["compile_cost"] == [row] and json.load(open(tmp_path / "c.json"))["compile_cost"][0]["batch"] == 2
    text = open(tmp_path / "c.md").read()
    assert text.startswith("# Compile cost (tiny profile)") and "| unet-cpu | 16px | 2 | 10.0 | 9.0 | 0.900" in text


def test_median_interval_matches_the_normal_theory():
    # The sample median of n normal draws has standard error sqrt(pi / 2) sigma / sqrt(n) (asymptotically).
    g = torch.Generator().manual_seed(1)
    x = (1.0 + 0.1 * torch.randn(400, generator=g)).tolist()
    c = bench_timing.median_ci(x)
    half = 1.96 * math.sqrt(math.pi / 2) * 0.1 / math.sqrt(400)
    assert c["lo"] < c["median"] < c["hi"] and c["median"] == pytest.approx(statistics.median(x))
    assert (c["hi"] - c["lo"]) / 2 == pytest.approx(half, rel=0.35)
    assert c["lo"] < 1.0 < c["hi"]
    assert bench_timing.median_ci([2.0] * 5) == {"median": 2.0, "lo": 2.0, "hi": 2.0}


# -----------------------------------------------------------------------------
# The evidence profile (--cpu): paired verdicts and resumption

def test_paired_t_interval_by_hand():
    # a - b = -1.0, -0.5, -3.0: mean -1.5; deviations +0.5, +1.0, -1.5, so sd = sqrt((0.25 + 1 + 2.25) / 2)
    # = sqrt(1.75) = 1.3228757 and se = sd / sqrt(3) = 0.7637626; t_{0.975, 2} = 4.3026527 (scipy.stats.t.ppf),
    # half-width 4.3026527 x 0.7637626 = 3.2862053: the interval is [-4.7862053, +1.7862053].
    c = bench_evidence.paired([0.0, 1.5, -1.0], [1.0, 2.0, 2.0])
    assert c["diffs"] == [-1.0, -0.5, -3.0] and c["n"] == 3 and c["interval"] == "95% paired t-interval"
    assert c["mean"] == pytest.approx(-1.5)
    assert c["lo"] == pytest.approx(-4.7862053038642145) and c["hi"] == pytest.approx(1.786205303864214)
    sd = math.sqrt(((-1.0 + 1.5) ** 2 + (-0.5 + 1.5) ** 2 + (-3.0 + 1.5) ** 2) / 2)
    assert c["hi"] - c["mean"] == pytest.approx(4.302652729749462 * sd / math.sqrt(3))
    # All three differences say a < b, yet with 3 seeds the interval spans zero: not "holds" by construction.
    assert bench_evidence.verdict(c, -1) == "unresolved" and bench_evidence.verdict(c, +1) == "unresolved"
    # A tight example: -1.0, -1.1, -0.9 (sd 0.1, half-width 4.3026527 x 0.1 / sqrt(3) = 0.2484138).
    tight = bench_evidence.paired([0.0, -0.1, 0.1], [1.0, 1.0, 1.0])
    assert tight["lo"] == pytest.approx(-1.2484137711750332) and tight["hi"] == pytest.approx(-0.7515862288249668)
    assert bench_evidence.verdict(tight, -1) == "holds" and bench_evidence.verdict(tight, +1) == "contradicted"
    same = bench_evidence.paired([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])  # every paired difference is 2: sd 0
    assert same["mean"] == same["lo"] == same["hi"] == 2.0 and same["diffs"] == [2.0, 2.0, 2.0]
    assert bench_evidence.verdict(same, +1) == "holds" and bench_evidence.verdict(same, -1) == "contradicted"
    # One seed (or none): nothing can be concluded.
    for a, b in (([1.0], [0.0]), ([], [])):
        one = bench_evidence.paired(a, b)
        assert (one["lo"], one["hi"], one["n"]) == (-math.inf, math.inf, len(a))
        assert bench_evidence.verdict(one, +1) == bench_evidence.verdict(one, -1) == "unresolved"


def test_claims_count_the_seeds_on_the_claims_side():
    # min-SNR's claim is a < b (lower mean FD). Differences a - b per seed: -1.0, -0.5, +0.25: 2 of 3 on its side.
    prof = {**bench_common.PROFILES["cpu"], "arches": (), "targets": ("eps",), "weightings": ("const", "min_snr"),
            "checkpoints": (1, 2), "seeds": (0, 1, 2)}
    fd = lambda v: {1: {"fd": v}, 2: {"fd": v}}
    rows = {"unet/eps/min_snr": {0: fd(2.0), 1: fd(2.5), 2: fd(3.25)}, "unet/eps/const": {0: fd(3.0), 1: fd(3.0), 2: fd(3.0)}}
    (c,) = bench_evidence.evidence_claims(prof, rows, list(rows))
    assert c["sign"] == -1 and c["sign_count"] == [2, 3] and c["n"] == 3
    assert c["ci"]["diffs"] == [-1.0, -0.5, 0.25] and c["verdict"] == "unresolved"
    rows["unet/eps/min_snr"][2] = fd(0.0)  # now -1.0, -0.5, -3.0: 3 of 3, and still unresolved at 3 seeds
    (c,) = bench_evidence.evidence_claims(prof, rows, list(rows))
    assert c["sign_count"] == [3, 3] and c["verdict"] == "unresolved" and c["ci"]["hi"] > 0
    text = bench_evidence.evidence_markdown(dict(
        profile_name="cpu", profile={**prof, "models": {"unet": "unet-cpu"}}, command="python bench.py --cpu --report",
        hardware="here", units=12, rendered_only=True, stopped=False, claims=[c], rows={}, time_to_target=[],
        invocations=[dict(date="2026-12-03", wall_s=600.0, units=12, parallel=2)],
        floor={"class_acc": 0.8, "fd": 0.5, "channel_dev": 0.1},
        baseline=dict(row="unet/ddpm", fd=[None, None], falls=False, class_acc=None, ceiling=0.85, floor=0.25,
                      of_ceiling=None, relative=None)))
    assert "| a - b [95% paired t-interval] | seeds on the claim's side | seeds | verdict |" in text
    assert f"| {bench_evidence.fmt_ci(c['ci'])} | 3 of 3 | 3 | **unresolved** |" in text
    assert "with its 95% paired t-interval" in text and "bootstrap" not in text
    assert text.split("\n")[2] == ("`python bench.py --cpu --report`: the tables of the 12 stored units, re-rendered on "
                                   "here; this invocation trained nothing; the invocations that trained them took 10 min "
                                   "of wall time (12 units on 2026-12-03 with 2 processes: 10 min).")


def test_steps_to_reach_interpolates_linearly():
    curve = [(100, 10.0), (200, 6.0), (400, 4.0)]
    assert bench_evidence.steps_to_reach(curve, 8.0) == pytest.approx(150.0)
    assert bench_evidence.steps_to_reach(curve, 5.0) == pytest.approx(300.0)
    assert bench_evidence.steps_to_reach(curve, 12.0) == 100.0 and bench_evidence.steps_to_reach(curve, 3.0) is None


def test_baseline_check_names_the_seeds_whose_fd_rises():
    from types import SimpleNamespace
    scorer = SimpleNamespace(info={"accuracy": 0.8}, net=SimpleNamespace(head=SimpleNamespace(out_features=4)))
    fds = {0: (8.0, 5.0, 1.0), 1: (7.0, 9.0, 2.0)}  # seed 1 rises at the middle checkpoint; the mean still falls
    rows = {"unet/ddpm": {s: {c: {"fd": f, "class_acc": 0.5} for c, f in zip((1, 2, 4), v)} for s, v in fds.items()}}
    b = bench_evidence.baseline_check({"checkpoints": (1, 2, 4)}, rows, scorer)
    assert b["falls"] and b["seeds_complete"] == 2 and b["seeds_rising"] == {1: [7.0, 9.0, 2.0]}
    assert b["of_ceiling"] == pytest.approx(0.5 / 0.8) and b["relative"] == pytest.approx((0.5 - 0.25) / (0.8 - 0.25))


def test_store_refuses_other_settings(tmp_path):
    s = bench_common.Store(str(tmp_path / "r.json"), {"lr": 1e-3})
    s.put("a|seed0|step1", {"fd": 1.0})
    assert bench_common.Store(str(tmp_path / "r.json"), {"lr": 1e-3}).get("a|seed0|step1") == {"fd": 1.0}
    with pytest.raises(ValueError, match="other settings"):
        bench_common.Store(str(tmp_path / "r.json"), {"lr": 3e-4})
    # A setting the file predates (a new evaluation's parameter) cannot have shaped its units: it is added;
    # one the file has and the profile lacks is still a change.
    grown = bench_common.Store(str(tmp_path / "r.json"), {"lr": 1e-3, "n_label": 512})
    assert grown.get("a|seed0|step1") == {"fd": 1.0}
    grown.put("b|seed0|step1", {"fd": 2.0})
    assert json.load(open(tmp_path / "r.json"))["settings"] == {"lr": 1e-3, "n_label": 512}
    with pytest.raises(ValueError, match="other settings"):
        bench_common.Store(str(tmp_path / "r.json"), {"lr": 1e-3})


def test_default_run_scores_both_etas_per_seed_and_pairs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_FOUR_PAPERS_CACHE", str(tmp_path / "cache"))
    spec = dict(bench_recipe.DEFAULT_RUN, seeds=(0, 1), n_eval=8, n_ref=16, eval_steps=2, image_size=16,
                featnet=dict(n_train=64, n_test=32, steps=5))
    calls = []
    real = bench_common.call_train
    def tiny_train(argv, log):  # train.py's defaults, shortened for the test
        calls.append(argv)
        return real([*argv, "--steps", "2", "--image-size", "16", "--sample-steps", "2"], log)
    monkeypatch.setattr(bench_common, "call_train", tiny_train)
    monkeypatch.setattr(bench_recipe, "DEFAULT_RUN", spec)
    out = bench.main(["--default-run", "--json", str(tmp_path / "d.json"), "--runs", str(tmp_path / "runs")])
    assert set(out) == {0, 1} and [a[:2] for a in calls] == [["--seed", "0"], ["--seed", "1"]]
    assert all(set(u) >= {"eta 0", "eta 1", "train_wall_s"} and u["eta 0"]["fd"] > 0 for u in out.values())
    text = open(tmp_path / "d.md").read()
    assert "paired t-interval" in text and "- fd:" in text
    assert bench.main(["--default-run", "--json", str(tmp_path / "d.json"), "--runs", str(tmp_path / "runs")]) == out
    assert len(calls) == 2  # stored seeds are not trained again


TINY_EVIDENCE = dict(arches=("unet",), methods=("ddpm", "dtr"), targets=("eps",), weightings=("const", "min_snr"),
                     checkpoints=(1, 2), seeds=(0, 1), image_size=16, batch_size=8, warmup=1, log_every=1,
                     n_eval=8, n_ref=16, eval_steps=2, grid_steps=1, featnet=dict(n_train=64, n_test=32, steps=5),
                     rgb_heldout=4, n_restore=4, restore_patches=(2,), n_label=8, finetune_steps=(1, 2))


def test_evidence_profile_resumes_and_skips_finished_units(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_FOUR_PAPERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(bench_common.PROFILES, "cpu", {**bench_common.PROFILES["cpu"], **TINY_EVIDENCE})
    args = ["--cpu", "--runs", str(tmp_path / "runs"), "--json", str(tmp_path / "e.json"), "--parallel", "1"]
    first = bench.main(args + ["--parallel", "2"])  # two worker processes share the jobs
    units = json.load(open(tmp_path / "e.json"))["units"]
    for name in ("unet/ddpm", "unet/dtr", "unet/eps/const", "unet/mtdiff-X", "unet/jointnet", "unet/direct_extend"):
        for seed in (0, 1):
            for step in (1, 2):
                assert bench_common.unit_key(name, seed, step) in units
    for seed in (0, 1):  # MT-Diffusion as its paper measures it: Table 1's rows at every m, Fig. 6's curves
        rest = units[bench_common.unit_key("unet/mtdiff-X", seed, "restoration")]["2"]
        assert {"Clean-Masked", "SDEdit (t0 = T/2)", "SDEdit (t0 = T/4)", "Algorithm 1", "Algorithm 1 + paste",
                "replacement"} == set(rest) and rest["Clean-Masked"]["unmasked_change"] == 0
        labels = units[bench_common.unit_key("unet/mtdiff-E", seed, "labels")]
        assert set(labels) == {"mt", "baseline"} and set(labels["mt"]) == {"0", "1", "2"}
        assert 0 <= labels["baseline"]["2"]["noised"] <= 1
    mt_claims = [c["claim"] for c in first["claims"] if c["source"].startswith("MT-Diffusion")]
    assert any("SDEdit, t0 = T/4 (Mask-2)" in c for c in mt_claims) and any("after 2 finetuning" in c for c in mt_claims)
    assert "unet/eps/min_snr" in first["rows"] and "unet/minsnr" not in first["rows"]  # not a row of this profile
    assert all(c["verdict"] in ("holds", "contradicted", "unresolved", "not enough seeds") for c in first["claims"])
    assert len(first["baseline"]["fd"]) == 2
    assert first["baseline"]["seeds_complete"] == 2
    ran = json.load(open(tmp_path / "e.json"))["invocations"]  # the invocation that trained is logged with its cost
    assert len(ran) == 1 and ran[0]["units"] == len(units) and ran[0]["parallel"] == 2 and ran[0]["wall_s"] > 0
    tables = open(tmp_path / "e.md").read().split("## Does the baseline learn?")[1]
    # Everything is stored: a second run trains and samples nothing and reports the same numbers.
    def refuse(*a, **k):
        raise AssertionError("finished work was redone")
    with monkeypatch.context() as m:
        m.setattr(bench_common, "call_train", refuse)
        m.setattr(bench_common, "generate", refuse)
        again = bench.main(args)
        assert open(tmp_path / "e.md").read().split("## Does the baseline learn?")[1] == tables
        # Rows and seeds may change between invocations (units are keyed by them): a subset trains nothing.
        one_seed = bench.main(args + ["--seeds", "0"])
    with monkeypatch.context() as m:
        # --report re-renders the same tables from the store alone, and says that it trained nothing; it
        # samples only for the figures, from the runs' final checkpoints.
        m.setattr(bench_common, "call_train", refuse)
        rendered = bench.main(["--cpu", "--report", "--json", str(tmp_path / "e.json"), "--runs", str(tmp_path / "runs")])
        text = open(tmp_path / "e.md").read()
        assert (tmp_path / "e_fd.svg").read_text().startswith("<svg") and (tmp_path / "e_restoration.png").is_file()
        with Image.open(tmp_path / "e_samples.png") as im:  # held-out row + eps/const + eps/min_snr, 8 columns
            assert im.size[0] > im.size[1] and round(im.size[0] / im.size[1]) == round(8 / 3)
        assert text.split("## Does the baseline learn?")[1] == tables and rendered["claims"] == first["claims"]
        assert "this invocation trained nothing" in text and "this invocation 0" not in text
    assert again["claims"] == first["claims"] and list(one_seed["rows"]["unet/ddpm"]) == [0]
    assert json.load(open(tmp_path / "e.json"))["invocations"] == ran  # invocations that train nothing are not
    # A longer run continues each row from its last checkpoint to the new one, and matches a run trained
    # straight to it (training to step s does not depend on where the run ends).
    calls = []
    real = bench_common.call_train
    with monkeypatch.context() as m:
        m.setitem(bench_common.PROFILES["cpu"], "checkpoints", (1, 2, 3))
        m.setitem(bench_common.PROFILES["cpu"], "methods", ("ddpm",))
        m.setattr(bench_common, "call_train", lambda argv, log: (calls.append(argv), real(argv, log)))
        bench.main(args + ["--seeds", "0"])
    assert ["--resume", "--out", str(tmp_path / "runs" / "unet_ddpm-seed0"), "--steps", "3"] in calls
    straight = tmp_path / "straight"
    train.main(["--method", "ddpm", *bench_common.common_flags({**bench_common.PROFILES["cpu"], "checkpoints": (3,)}, "unet", 0),
                "--steps", "3", "--out", str(straight)])
    a = torch.load(tmp_path / "runs" / "unet_ddpm-seed0" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # One lost unit (and its run folder): only that row and seed retrain, and training is deterministic.
    doc = json.load(open(tmp_path / "e.json"))
    key = bench_common.unit_key("unet/dtr", 1, 2)
    lost = doc["units"].pop(key)
    json.dump(doc, open(tmp_path / "e.json", "w"))
    import shutil
    shutil.rmtree(tmp_path / "runs" / "unet_dtr-seed1")
    calls = []
    real = bench_common.call_train
    monkeypatch.setattr(bench_common, "call_train", lambda argv, log: (calls.append(argv), real(argv, log)))
    bench.main(args)
    redone = json.load(open(tmp_path / "e.json"))["units"][key]
    assert len(calls) == 2 and all("unet_dtr-seed1" in " ".join(a) for a in calls)
    assert redone["fd"] == lost["fd"] and redone["class_acc"] == lost["class_acc"]


def test_parallel_jobs_run_once_each_and_wait_for_their_inputs(tmp_path):
    # Two runners (threads here; their file locks are separate open files, as in two processes) share one
    # list: every job runs exactly once, and a job whose input another job makes waits for it.
    store = bench_common.Store(str(tmp_path / "s.json"), {})
    ran, lock = [], threading.Lock()
    def job(name, needs=None):
        def run():
            with lock:
                ran.append(name)
            time.sleep(0.05)
            store.put(name, {"done": True})
        return bench_evidence.Job(name, 0, run, lambda: store.get(name) is not None,
                         (lambda: store.get(needs) is not None) if needs else (lambda: True))
    jobs = [job("late", needs="base"), job("base"), *[job(f"row{i}") for i in range(6)]]
    runners = [threading.Thread(target=bench_evidence.run_jobs, args=(jobs, str(tmp_path / "locks"), 0.01, lambda s: None))
               for _ in range(2)]
    for r in runners:
        r.start()
    for r in runners:
        r.join(timeout=60)
    assert sorted(ran) == sorted(j.name for j in jobs) and ran.index("late") > ran.index("base")
    assert all(bench_common.Store(str(tmp_path / "s.json"), {}).get(j.name) for j in jobs)  # no put lost another's
    # A job whose input nothing will make: a clear error, not a wait forever.
    with pytest.raises(RuntimeError, match="wait on checkpoints no job makes: never"):
        bench_evidence.run_jobs([job("never", needs="missing")], str(tmp_path / "locks"), 0.01, lambda s: None)


def test_a_diverged_row_loses_its_claims_and_is_stored_as_such(tmp_path, monkeypatch):
    # By hand: min-SNR finite in both seeds, constant weighting diverged in both -> min-SNR converges faster.
    prof = {**bench_common.PROFILES["cpu"], "arches": (), "targets": ("eps",), "weightings": ("const", "min_snr"),
            "checkpoints": (1, 2), "seeds": (0, 1)}
    ok = {c: {"fd": 5.0 - c} for c in (1, 2)}
    rows = {"unet/eps/min_snr": {0: ok, 1: ok}, "unet/eps/const": {0: {1: {"diverged": True}}, 1: {1: {"diverged": True}}}}
    (c,) = [c for c in bench_evidence.evidence_claims(prof, rows, list(rows)) if "const" in c["claim"]]
    assert c["verdict"] == "holds" and c["diverged"] == {"a": 0, "b": 2} and "ci" not in c
    rows["unet/eps/const"][1] = {1: {"fd": 1.0}, 2: {"fd": 0.5}}  # one seed finite and better: no verdict
    (c,) = [c for c in bench_evidence.evidence_claims(prof, rows, list(rows)) if "const" in c["claim"]]
    assert c["verdict"] == "unresolved"
    # Through train_row_resumable: train.py's non-finite stop is stored as diverged, and the row is not retried.
    def nonfinite(argv, log):
        raise RuntimeError("python train.py failed (error: the loss was not finite for 10 steps in a row)")
    monkeypatch.setattr(bench_common, "call_train", nonfinite)
    store = bench_common.Store(str(tmp_path / "s.json"), {})
    spec = dict(name="unet/eps/const", arch="unet", method="ddpm")
    assert bench_common.train_row_resumable(prof, store, str(tmp_path), spec, 0, None) == {1: store.get("unet/eps/const|seed0|step1")}
    assert store.get("unet/eps/const|seed0|step1")["diverged"]
    monkeypatch.setattr(bench_common, "call_train", lambda *a: pytest.fail("a diverged row was retrained"))
    bench_common.train_row_resumable(prof, store, str(tmp_path), spec, 0, None)


def test_glyphs_run_writes_its_data_once_and_scores_a_fresh_set_as_the_floor(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_FOUR_PAPERS_CACHE", str(tmp_path / "cache"))
    spec = dict(bench_recipe.GLYPHS_RUN, n_eval=8, n_ref=4, eval_steps=2, featnet=dict(n_train=32, n_test=8, steps=5),
                glyphs=dict(per_class=4, seed=0), fresh=dict(per_class=1, seed=1))
    real = bench_common.call_train
    monkeypatch.setattr(bench_common, "call_train", lambda argv, log: real([*argv, "--steps", "2", "--sample-steps", "2"], log))
    monkeypatch.setattr(bench_recipe, "GLYPHS_RUN", spec)
    out = bench.main(["--glyphs", "--json", str(tmp_path / "g.json"), "--runs", str(tmp_path / "runs")])
    cfg = torch.load(tmp_path / "runs" / "seed0" / "checkpoint.pt", weights_only=True)["config"]
    assert cfg["in_channels"] == 1 and cfg["num_classes"] == 10 and cfg["image_size"] == 16  # grayscale digits
    assert set(out[0]) >= {"eta 1", "train_wall_s"} and "floor: a freshly drawn glyph set" in open(tmp_path / "g.md").read()
    assert len(os.listdir(tmp_path / "runs" / "glyphs-fresh")) == 10
