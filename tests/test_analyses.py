"""The scripts in analyses/ on the embedded default with small limits, each checked against the
library functions it wraps, recomputed here (or by scipy/statsmodels) rather than read back."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

pytestmark = pytest.mark.slow

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def _script(name: str):
    """analyses/<name>.py as a module. Its folder goes last on sys.path (the scripts import their
    helpers from it), so that analyses/statistics.py never hides the standard library's module."""
    if str(ANALYSES) not in sys.path:
        sys.path.append(str(ANALYSES))
    spec = importlib.util.spec_from_file_location(f"analyses_{name}", ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pairs(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _mcnemar(a: dict, b: dict) -> float:
    """Exact McNemar p of the per-pair flips, by scipy's binomial test."""
    common = sorted(set(a) & set(b))
    b01 = sum(1 for i in common if not a[i]["flip"] and b[i]["flip"])
    b10 = sum(1 for i in common if a[i]["flip"] and not b[i]["flip"])
    return 1.0 if b01 + b10 == 0 else sps.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue


def _ztest(k1: int, n1: int, k2: int, n2: int) -> float:
    from statsmodels.stats.proportion import proportions_ztest

    if k1 + k2 in (0, n1 + n2):
        return 1.0
    return float(proportions_ztest([k1, k2], [n1, n2])[1])


def _threads(bundle):
    """The thread count the scripts run the demo with (see mechmed.runtime.threads_for_width)."""
    from mechmed.runtime import threads_for_width, torch_threads

    return torch_threads(threads_for_width(bundle.d_model))


def _figures(out: Path, *names: str) -> None:
    for name in names:
        assert (out / f"{name}.html").stat().st_size > 1000, name


def test_sae_transfer(demo_model_dir, tmp_path):
    from mechmed.fidelity import evaluate_saes, prompt_set
    from mechmed.models import load_model
    from mechmed.saes import resolve_saes

    out = tmp_path / "sae_transfer"
    assert _script("sae_transfer").main(["--out", str(out)]) == 0
    saved = json.loads((out / "transfer.json").read_text())
    table = {r["layer"]: r for r in saved["layers"]}
    bundle = load_model("demo")
    saes = resolve_saes("demo", bundle, "all")
    assert sorted(table) == list(range(bundle.n_layers))
    for name in ("medical", "general"):
        with _threads(bundle):
            rows = evaluate_saes(bundle, saes, prompt_set(name), ce=False, threshold=0.95).rows
        for r in rows:
            got = table[r["layer"]]
            assert got[f"r2_{name}"] == pytest.approx(r["r2"], rel=1e-6)
            assert [got[f"r2_{name}_lo"], got[f"r2_{name}_hi"]] == pytest.approx(r["r2_ci"], rel=1e-6)
            assert got[f"p_{name}"] == pytest.approx(r["p_value"], rel=1e-4, abs=1e-12)
            assert got[f"exceeds_{name}"] == r["exceeds_threshold"]
        s = saved["summary"][name]
        assert s["mean_r2"] == pytest.approx(np.mean([r["r2"] for r in rows]), rel=1e-6)
        assert s["n_exceeding"] == sum(r["exceeds_threshold"] for r in rows)
    for r in table.values():
        assert r["r2_gap_medical_minus_general"] == pytest.approx(r["r2_medical"] - r["r2_general"])
    assert [int(r["layer"]) for r in _csv(out / "transfer.csv")] == sorted(table)
    _figures(out / "sae_check", "r2_by_layer")


@pytest.fixture(scope="module")
def attribution(demo_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyses") / "attribution_table"
    assert _script("attribution_table").main(["--out", str(out), "--max-pairs", "24"]) == 0
    return out


def test_attribution_table(attribution):
    from mechmed.attribution import attribute_batch
    from mechmed.config import TrainConfig
    from mechmed.consistency import resolve_data
    from mechmed.models import load_model
    from mechmed.saes import resolve_saes
    from mechmed.selection import score_vector, select

    out = attribution
    scores = json.loads((out / "attribute" / "layer_scores.json").read_text())
    table = json.loads((out / "layer_table.json").read_text())
    assert scores["n_pairs"] == table["n_pairs"] == len(scores["pairs"]) <= 24
    # the window is selection.select on the flipped-pair scores, and the training config holds it
    chosen = select(score_vector(scores, "gain_flipped"), "window", width=3)
    assert table["selection"]["layers"] == list(chosen.layers)
    assert TrainConfig.load(out / "train.yaml").layers == list(chosen.layers)
    # each row's score is the mean |a_L| over the flipped (or stable) pairs' per-pair attributions
    per_pair = np.abs(np.array([p["layer_attr"] for p in scores["pairs"]]))
    flipped = np.array([p["flipped"] for p in scores["pairs"]])
    patch = np.abs(np.array([p["patch_effect"] for p in scores["pairs"]]))
    for r in table["layers"]:
        L = r["layer"]
        assert r["selected"] == (L in chosen.layers)
        assert r["attr_flipped"] == pytest.approx(per_pair[flipped, L].mean(), rel=1e-6)
        assert r["attr_stable"] == pytest.approx(per_pair[~flipped, L].mean(), rel=1e-6)
        assert r["patch_flipped"] == pytest.approx(patch[flipped, L].mean(), rel=1e-6)
        assert r["attr_flipped_lo"] <= r["attr_flipped"] <= r["attr_flipped_hi"]
        assert r["top_feature"] == scores["top_feature"][str(L)]
    assert [int(r["layer"]) for r in _csv(out / "layer_table.csv")] == [r["layer"] for r in table["layers"]]
    # the per-pair numbers themselves: the first batch (8 pairs, in file order) attributed again
    bundle = load_model("demo")
    by_id = {p.id: p for p in resolve_data("demo", split=scores["split"])}  # the attributed (training) pairs
    first = scores["pairs"][:8]
    with _threads(bundle):
        again = attribute_batch(bundle, [by_id[p["id"]] for p in first], saes=resolve_saes("demo", bundle, "all"),
                                exact=True)
    for saved, r in zip(first, again):
        assert saved["flipped"] == r.flipped and saved["m_p"] == pytest.approx(r.m_p, abs=1e-4)
        assert saved["layer_attr"] == pytest.approx(r.layer_attr.tolist(), rel=1e-3, abs=1e-5)
        assert saved["patch_effect"] == pytest.approx(r.patch_effect.tolist(), rel=1e-3, abs=1e-5)
    assert (out / "attribute" / "features.csv").is_file()
    _figures(out, "layer_profile_selected")
    _figures(out / "attribute", "layer_profile", "feature_heatmap")


@pytest.fixture(scope="module")
def targeted(attribution):
    out = attribution.parent / "targeted_vs_full"
    argv = ["--config", str(attribution / "train.yaml"), "--out", str(out), "--train-pairs", "64",
            "--eval-pairs", "32", "--max-steps", "4"]
    assert _script("targeted_vs_full").main(argv) == 0
    return out


def test_targeted_vs_full(targeted, attribution):
    from mechmed.config import TrainConfig
    from mechmed.selection import baseline

    out = targeted
    selected = TrainConfig.load(attribution / "train.yaml").layers
    results = json.loads((out / "ablation" / "results.json").read_text())
    rows = {r["arm"]: r for r in results["rows"]}
    assert list(rows) == ["base", "selected", "early", "all"]
    assert rows["selected"]["layers"] == selected
    assert rows["early"]["layers"] == list(baseline("early", 6, len(selected)).layers)
    assert rows["all"]["layers"] == list(range(6))
    assert all(r["n_pairs"] == 32 for r in results["rows"])
    assert len((out / "data" / "train_pairs.jsonl").read_text().splitlines()) == 64
    arm_pairs = {a: _pairs(out / "ablation" / "arms" / f"{a}-lora-s0" / "after" / "pairs.jsonl")
                 for a in ("selected", "early", "all")}
    for a, pairs in arm_pairs.items():
        m = json.loads((out / "ablation" / "arms" / f"{a}-lora-s0" / "metrics.json").read_text())
        assert m["steps"] == 4 and m["layers"] == rows[a]["layers"]
        assert rows[a]["flip_rate"] == pytest.approx(np.mean([p["flip"] for p in pairs.values()]))
    saved = json.loads((out / "targeted_vs_full.json").read_text())
    assert [(c["a"], c["b"]) for c in saved["comparisons"]] == [("selected", "early"), ("selected", "all")]
    for c in saved["comparisons"]:
        a, b = arm_pairs["selected"], arm_pairs[c["b"]]
        assert c["flip_a"] == rows["selected"]["flip_rate"] and c["flip_b"] == rows[c["b"]]["flip_rate"]
        assert c["flip_p_mcnemar"] == pytest.approx(_mcnemar(a, b))
        n = len(a)
        assert c["flip_p_ztest"] == pytest.approx(_ztest(round(c["flip_a"] * n), n, round(c["flip_b"] * n), n))
        diff = np.mean([a[i]["margin_diff"] - b[i]["margin_diff"] for i in a])
        assert c["margin_diff_a_minus_b"] == pytest.approx(diff)
    assert len(_csv(out / "comparison.csv")) == 2
    _figures(out, "flip_by_arm", "tradeoff")


def test_statistics(targeted, tmp_path):
    """Run as a script (as the README says), on the grid targeted_vs_full.py wrote."""
    from statsmodels.stats.proportion import proportions_ztest

    results_dir = targeted / "ablation"
    out = tmp_path / "statistics"
    proc = subprocess.run([sys.executable, str(ANALYSES / "statistics.py"), "--results", str(results_dir),
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((out / "statistics.json").read_text())
    results = json.loads((results_dir / "results.json").read_text())
    rows = {r["arm"]: r for r in results["rows"]}
    base = _pairs(results_dir / "base-s0" / "pairs.jsonl")
    base_m = json.loads((results_dir / "base-s0" / "metrics.json").read_text())
    assert [t["b"] for t in saved["tests"]] == ["selected", "early", "all"]
    for t in saved["tests"]:
        run = results_dir / "arms" / f"{t['b']}-lora-s0" / "after"
        m = json.loads((run / "metrics.json").read_text())
        assert t["a"] == "base" and t["flip_a"] == base_m["flip_rate"] and t["flip_b"] == m["flip_rate"]
        # paired: exact McNemar, as the ablation grid computed it and as scipy does
        assert t["flip_p_mcnemar"] == pytest.approx(rows[t["b"]]["p_vs_base"])
        assert t["flip_p_mcnemar"] == pytest.approx(_mcnemar(base, _pairs(run / "pairs.jsonl")))
        # unpaired, as the paper reports: statsmodels' pooled two-proportion z test
        assert t["flip_p_ztest"] == pytest.approx(_ztest(base_m["n_flips"], base_m["n_pairs"], m["n_flips"],
                                                         m["n_pairs"]))
        assert t["accuracy_p_ztest"] == pytest.approx(_ztest(
            base_m["n_correct"]["original"], base_m["n_questions"], m["n_correct"]["original"], m["n_questions"]))
        lo, hi = t["margin_diff_a_minus_b_ci"]
        assert lo <= t["margin_diff_a_minus_b"] <= hi
    # the paper's counts through the same test: 23/158 -> 7/158
    z, p = proportions_ztest([23, 7], [158, 158])
    assert saved["paper"]["test"]["statistic"] == pytest.approx(z)
    assert saved["paper"]["test"]["p_value"] == pytest.approx(p)
    assert len(_csv(out / "statistics.csv")) == len(saved["tests"])
    _figures(out, "flip_by_arm", "tradeoff")


def test_consistency_losses(tmp_path):
    """Each loss trains its own arm on the same pairs; the table's flip rates are those the per-pair files
    give, and the losses differ only in their consistency term (the configs the arms ran with)."""
    import yaml

    out = tmp_path / "losses"
    argv = ["--out", str(out), "--seeds", "0", "--losses", "teacher_kl:2,sym_kl", "--train-pairs", "64",
            "--eval-pairs", "32", "--max-steps", "3", "--workers", "1"]
    assert _script("consistency_losses").main(argv) == 0
    saved = json.loads((out / "consistency_losses.json").read_text())
    runs = {r["run"]: r for r in saved["rows"]}
    # an item without a weight takes the config's (the demo's 2)
    assert list(runs) == ["base (no training)", "CE + 2 × teacher_kl", "CE only", "sym_kl only (no CE)",
                          "CE + 2 × sym_kl"]
    where = {"CE + 2 × teacher_kl": ("teacher_kl-w2", "selected"), "CE only": ("teacher_kl-w2", "ce_only"),
             "sym_kl only (no CE)": ("teacher_kl-w2", "consistency_only"),
             "CE + 2 × sym_kl": ("sym_kl-w2", "selected")}
    for name, (loss, arm) in where.items():
        run = out / loss / "arms" / f"{arm}-lora-s0"
        flips = [p["flip"] for p in _pairs(run / "after" / "pairs.jsonl").values()]
        assert runs[name]["flip_rate"] == pytest.approx(np.mean(flips))
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        expected = {"selected": (1.0, 2.0, loss.split("-")[0]), "ce_only": (1.0, 0.0, "teacher_kl"),
                    "consistency_only": (0.0, 2.0, "sym_kl")}[arm]
        assert (cfg["ce_weight"], cfg["consistency_weight"], cfg["consistency"]) == expected
        assert cfg["max_steps"] == 3 and cfg["layers"] == [1, 2, 3]
    assert len(_csv(out / "losses.csv")) == 5
    assert (out / "losses.md").read_text().count("\n") == 2 + 5


def test_real_gemma_task_keeps_held_out_phrasings_out_of_training():
    """The real-model study's text task: held-out rewordings never appear in training, answers are
    balanced per finding, every prompt carries its report, and no rewording is negated."""
    mod = _script("real_gemma")
    canon, train = mod.task_pairs("train", 6, seed=1)
    _, held = mod.task_pairs("eval", 6, seed=2)
    question = lambda r: r["paraphrase"].rsplit(". ", 1)[-1]  # noqa: E731  (the question after the report)
    assert {question(r) for r in train}.isdisjoint({question(r) for r in held})
    assert len(canon) == 36 and all(r["question"] == r["paraphrase"] for r in canon)
    assert sum(r["answer"] == "yes" for r in canon) == 18
    for r in train + held:
        assert r["question"].startswith("Report: ") and r["paraphrase"].startswith(r["question"].rsplit(". ", 1)[0])
    import tempfile

    from mechmed.data.loaders import load_pairs  # the rows are a valid text-only pair file

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in held))
        pairs = load_pairs(path)
    assert all(p.image is None and not p.negated for p in pairs)


def test_the_selection_criterion_is_adopted_only_when_confirmed():
    """analyses/selection_audit.py's rule: the lowest regret on the choosing seeds is the candidate (never
    layer index alone), a tie keeps the default, and it is adopted only if the confirming seeds and the
    real model agree."""
    mod = _script("selection_audit")

    def pooled(**regret):
        return {"criteria": {k: {"regret": v} for k, v in regret.items()}}

    base = dict(gain_flipped=0.02, gain_peak_end=0.0, earliest=0.0, all_matched=0.01)
    confirm_yes, confirm_no = pooled(**{**base, "gain_peak_end": 0.01}), pooled(**{**base, "gain_peak_end": 0.03})
    d = mod.decide(pooled(**base), confirm_yes, pooled(**base))
    assert d["candidate"] == "gain_peak_end" and d["new_default"] == "gain_flipped"
    assert d["beats_layer_index"] == {"choose": False, "confirm": False, "real": False}  # a tie is not a win
    assert "no better than layer index" in d["reason"]
    # better than the default and than the first layers where it is confirmed: adopted
    worse = {**base, "earliest": 0.02}
    index_worse = pooled(**worse)
    d = mod.decide(pooled(**base), confirm_yes, index_worse)
    assert d["new_default"] == "gain_peak_end" and d["beats_layer_index"]["real"]
    assert mod.decide(pooled(**base), confirm_no, index_worse)["new_default"] == "gain_flipped"
    assert mod.decide(pooled(**base), confirm_yes, pooled(**{**worse, "gain_peak_end": 0.05}))["new_default"] \
        == "gain_flipped"
    assert mod.decide(pooled(**base), confirm_yes, None)["new_default"] == "gain_flipped"  # nothing real to confirm on
    tie = mod.decide(pooled(**{**base, "gain_flipped": 0.0}), confirm_yes, pooled(**base))
    assert tie["candidate"] == "gain_flipped" and tie["new_default"] == "gain_flipped"
    # layer index alone is a baseline: never the candidate, however low its regret
    assert mod.decide(pooled(**{**base, "earliest": -0.01}), confirm_yes, None)["candidate"] == "gain_peak_end"
