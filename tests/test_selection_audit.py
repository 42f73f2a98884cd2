"""The selection audit: its candidates, its statistics checked against the same resamples written out by
hand and against scipy, and a grid that trains the audit on a tiny model (plan, run, collect, report)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from mechmed.errors import MechmedError
from mechmed.selection_audit import AuditUnit, analyse, candidates, check_audit, matched_rank, random_sets


def test_candidates_are_every_window_distinct_random_sets_and_all_layers():
    c = candidates(8, 3, 16, random_sets_count=10, seed=4)
    windows = [x for x in c if x.kind == "window"]
    assert [x.layers for x in windows] == [tuple(range(a, a + 3)) for a in range(6)]
    assert [x.name for x in windows][:2] == ["w0-2", "w1-3"]
    rand = [x.layers for x in c if x.kind == "random"]
    assert len(rand) == 10 and len(set(rand)) == 10
    assert all(len(s) == 3 and list(s) == sorted(s) and s[-1] - s[0] != 2 for s in rand)  # none contiguous
    assert rand == [x.layers for x in candidates(8, 3, 16, random_sets_count=10, seed=4) if x.kind == "random"]
    assert rand != [x.layers for x in candidates(8, 3, 16, random_sets_count=10, seed=5) if x.kind == "random"]
    matched = next(x for x in c if x.kind == "all_matched")
    # 8 layers at rank 6 train as many LoRA weights as 3 layers at rank 16
    assert matched.layers == tuple(range(8)) and matched.rank == 6 == round(16 * 3 / 8)
    assert next(x for x in c if x.kind == "all").rank is None
    # 6 layers, width 3: C(6, 3) = 20 sets of which 4 are windows; asking for more gives the 16 others
    assert len(random_sets(6, 3, 50)) == math.comb(6, 3) - 4
    assert matched_rank(32, 5, 34, n_experts=8) == 8 and matched_rank(16, 2, 4) == 8
    assert check_audit(True) == {"random_sets": 8, "seed": 0, "n_bootstrap": 1000}
    assert check_audit(None) is None and check_audit({"random_sets": 2})["random_sets"] == 2
    with pytest.raises(MechmedError, match="audit: unknown key 'sets'"):
        check_audit({"sets": 2})
    with pytest.raises(MechmedError, match="random_sets must be a non-negative integer"):
        check_audit({"random_sets": -1})


def _unit(rng, n_layers=5, width=2, n_questions=30, per_q=3, base_rate=0.4, effects=None, label="u", prefix="",
          cands=None):
    """A synthetic audit unit: each candidate removes flips with its own probability."""
    cands = cands or candidates(n_layers, width, 8, random_sets_count=3, seed=1)
    base, arms = {}, {c.name: {} for c in cands}
    effects = effects or {c.name: rng.uniform(0, 0.8) for c in cands}
    for q in range(n_questions):
        for k in range(per_q):
            pid = f"q{q}-{k}"
            flip = bool(rng.random() < base_rate)
            md = float(rng.gamma(2.0))
            base[pid] = {"question_id": f"q{q}", "flip": flip, "margin_diff": md}
            for c in cands:
                fixed = flip and rng.random() < effects[c.name]
                arms[c.name][pid] = {"question_id": f"q{q}", "flip": flip and not fixed,
                                     "margin_diff": md * (1 - effects[c.name] * rng.random())}
    gain = rng.normal(1, 0.5, n_layers)
    patch = np.cumsum(np.abs(rng.normal(1, 0.5, n_layers)))
    scores = {"scores": {"gain_flipped": {"mean": gain.tolist()}, "patch_flipped": {"mean": patch.tolist()}}}
    return AuditUnit(label, base, arms, cands, scores, (1, 2), prefix)


def test_analysis_matches_the_resamples_written_out():
    rng = np.random.default_rng(0)
    u = _unit(rng)
    res = analyse([u], n_bootstrap=300, seed=7)
    one = res["units"][0]
    names = [c.name for c in u.candidates]
    ids = sorted(u.base)
    qs = sorted({u.base[i]["question_id"] for i in ids})
    # the point estimates: base flip rate minus each candidate's, over the same pairs
    red = {n: np.mean([u.base[i]["flip"] for i in ids]) - np.mean([u.arms[n][i]["flip"] for i in ids])
           for n in names}
    md = {n: np.mean([u.base[i]["margin_diff"] - u.arms[n][i]["margin_diff"] for i in ids]) for n in names}
    for r in one["candidates"]:
        assert r["flip_reduction"] == pytest.approx(red[r["name"]], abs=1e-12)
        assert r["margin_diff_reduction"] == pytest.approx(md[r["name"]], abs=1e-12)
    # the same question resamples, one loop per draw
    draws = np.random.default_rng(7).integers(0, len(qs), size=(300, len(qs)))
    boot = np.empty((300, len(names)))
    for b, d in enumerate(draws):
        chosen = np.array(qs)[d]
        pick = [i for q in chosen for i in ids if u.base[i]["question_id"] == q]
        for j, n in enumerate(names):
            boot[b, j] = np.mean([u.base[i]["flip"] for i in pick]) - np.mean([u.arms[n][i]["flip"] for i in pick])
    for j, r in enumerate(one["candidates"]):
        assert r["flip_reduction_ci"] == pytest.approx(list(np.percentile(boot[:, j], [2.5, 97.5])), abs=1e-12)
    # Spearman of the predicted score (Σ over each same-size set's layers) against the achieved reduction
    same = [c for c in u.candidates if c.kind in ("window", "random")]
    gain = np.array(u.scores["scores"]["gain_flipped"]["mean"])
    rho = sps.spearmanr([gain[list(c.layers)].sum() for c in same], [red[c.name] for c in same]).statistic
    assert one["spearman"]["gain_flipped"]["rho"] == pytest.approx(rho, abs=1e-12)
    idx = sps.spearmanr([np.mean(c.layers) for c in same], [red[c.name] for c in same]).statistic
    assert one["spearman"]["layer_index"]["rho"] == pytest.approx(idx, abs=1e-12)
    sj = [names.index(c.name) for c in same]
    rho_boot = [sps.spearmanr([gain[list(c.layers)].sum() for c in same], boot[b, sj]).statistic for b in range(300)]
    assert one["spearman"]["gain_flipped"]["ci"] == pytest.approx(list(np.percentile(rho_boot, [2.5, 97.5])), abs=1e-9)
    # the selected window (1, 2): its rank, regret and the random sets at least as good
    windows = [c.name for c in u.candidates if c.kind == "window"]
    best = max(red[n] for n in windows)
    assert one["regret"]["value"] == pytest.approx(best - red["w1-2"], abs=1e-12)
    assert one["selected_rank"] == 1 + sum(red[n] > red["w1-2"] for n in windows)
    wj = [names.index(n) for n in windows]
    top = max(windows, key=lambda n: red[n])
    regret_boot = boot[:, names.index(top)] - boot[:, names.index("w1-2")]  # paired, to the window that did best
    assert one["regret"]["ci"] == pytest.approx(list(np.percentile(regret_boot, [2.5, 97.5])), abs=1e-12)
    # the max-type test: the regret statistic's resamples centred at the point estimates
    point = np.array([red[n] for n in windows])
    null = (boot[:, wj] - point).max(axis=1) - (boot[:, names.index("w1-2")] - red["w1-2"])
    assert one["regret"]["p"] == pytest.approx(np.mean(null >= best - red["w1-2"]), abs=1e-12)
    rand = [c.name for c in u.candidates if c.kind == "random"]
    assert one["random_at_least_as_good"] == [sum(red[n] >= red["w1-2"] for n in rand), len(rand)]
    assert one["all_matched_minus_selected"]["value"] == pytest.approx(red["all_matched"] - red["w1-2"], abs=1e-12)
    # criteria: the window of largest Σ gain, and the one ending at the gain's peak
    start = int(np.argmax(np.convolve(gain, np.ones(2), mode="valid")))
    assert one["criteria"]["gain_flipped"]["layers"] == [start, start + 1]
    peak = int(np.argmax(gain))
    assert one["criteria"]["gain_peak_end"]["layers"] == [max(peak - 1, 0), max(peak - 1, 0) + 1]
    assert one["criteria"]["earliest"]["regret"] == pytest.approx(best - red["w0-1"], abs=1e-12)
    assert "ranked" in res["pooled"]["verdict"] and "Verdict:" in res["pooled"]["verdict"]


def test_pooled_over_units_averages_their_own_selections():
    rng = np.random.default_rng(3)
    units = [_unit(rng, label=f"seed {s}", prefix=f"{s}|") for s in range(3)]
    res = analyse(units, n_bootstrap=200, seed=0)
    p = res["pooled"]
    alone = [analyse([u], n_bootstrap=200, seed=0)["units"][0] for u in units]
    assert p["n_units"] == 3 and p["selected_rank"] == [a["selected_rank"] for a in alone]
    assert p["regret"]["value"] == pytest.approx(np.mean([a["regret"]["value"] for a in alone]), abs=1e-12)
    assert p["spearman"]["gain_flipped"]["rho"] == pytest.approx(
        np.mean([a["spearman"]["gain_flipped"]["rho"] for a in alone]), abs=1e-12)
    assert p["random_at_least_as_good"] == [sum(a["random_at_least_as_good"][0] for a in alone), 9]
    assert "over 3 seeds" in p["verdict"]


def test_a_score_that_knows_the_outcome_beats_layer_index():
    """Scores built from each layer's true effect rank the sets right, and the verdict says so; scores
    built against it are caught."""
    rng = np.random.default_rng(11)
    n_layers, width = 6, 2
    per_layer = np.array([0.05, 0.3, 0.1, 0.35, 0.05, 0.15])  # not monotone in depth
    cands = candidates(n_layers, width, 8, random_sets_count=11, seed=2)
    effects = {c.name: min(0.95, per_layer[list(c.layers)].sum()) for c in cands}
    u = _unit(rng, n_layers=n_layers, width=width, n_questions=120, per_q=4, effects=effects, cands=cands)
    u = AuditUnit(u.label, u.base, u.arms, u.candidates, {"scores": {"gain_flipped": {"mean": per_layer.tolist()}}},
                  (2, 3))
    good = analyse([u], n_bootstrap=300, seed=0)["pooled"]
    assert good["spearman"]["gain_flipped"]["rho"] > 0.8 and good["score_vs_index"]["ci"][0] > 0
    assert "predicts the outcome better than layer index" in good["verdict"]
    bad = AuditUnit(u.label, u.base, u.arms, u.candidates, {"scores": {"gain_flipped": {"mean": (-per_layer).tolist()}}},
                    (2, 3))
    worse = analyse([bad], n_bootstrap=300, seed=0)["pooled"]
    assert worse["spearman"]["gain_flipped"]["rho"] < -0.8
    assert "does not predict the outcome measurably better" in worse["verdict"]


def test_plan_adds_only_what_the_grid_does_not_train(tiny_workspace):
    from test_ablate import _train

    from mechmed.ablate import AblationConfig, audit_plan, plan

    cfg = AblationConfig(train=_train(tiny_workspace, layers=[1, 2]), arms=["selected", "early", "all"],
                         audit={"random_sets": 2, "seed": 0})
    arms = plan(cfg, n_layers=4)
    names = [a.name for a in arms]
    assert names[:3] == ["selected-lora-s0", "early-lora-s0", "all-lora-s0"]
    # w0-1 is early, w1-2 the selected window, all layers at the window's rank is "all": not trained again
    assert names[3:] == ["w2-3-lora-s0", "set0-lora-s0", "set1-lora-s0", "all_matched-lora-s0"]
    assert dict(arms[-1].overrides) == {"rank": 2} and arms[-1].layers == (0, 1, 2, 3)  # rank 4 · 2 / 4
    mapping = {c.name: a.name for c, a, _ in audit_plan(cfg, arms, 4)[("lora", 0)]}
    assert mapping["w0-1"] == "early-lora-s0" and mapping["w1-2"] == "selected-lora-s0"
    assert mapping["all_samerank"] == "all-lora-s0"
    with pytest.raises(MechmedError, match="audit: unknown key"):
        AblationConfig(train=_train(tiny_workspace), audit={"windows": 3})
    # MedGemma-4B's 34 layers at width 5 (the paper's 15-19): 30 windows, of which the selected one is
    # the grid's own; with the grid's early and late, 27 more windows to train
    big = AblationConfig(train=_train(tiny_workspace, layers=[15, 16, 17, 18, 19], rank=16),
                         arms=["selected", "early", "late"], audit=True)
    audit = [a for a in plan(big, n_layers=34) if a.arm not in ("selected", "early", "late")]
    assert sum(a.arm.startswith("w") for a in audit) == 27 and sum(a.arm.startswith("set") for a in audit) == 8
    assert {a.arm: dict(a.overrides).get("rank") for a in audit if a.arm.startswith("all")} == \
        {"all_matched": 2, "all_samerank": None}  # round(16 · 5 / 34) = 2


@pytest.mark.slow
def test_an_audited_grid_runs_split_or_whole_and_reports(tiny_workspace, tmp_path):
    """The audit's arms run from the plan's commands like any arm, collect into results.json's audit, and
    the report gets its section and figure without their training curves."""
    from mechmed.ablate import run_ablation, run_arms, write_plan
    from mechmed.report import build_report

    att = tmp_path / "attribute"
    att.mkdir()
    (att / "layer_scores.json").write_text(json.dumps({"n_layers": 4, "scores": {
        "gain_flipped": {"mean": [0.1, 0.5, 0.4, 0.2]}, "attr_flipped": {"mean": [0.1, 0.6, 1.0, 1.2]}}}))
    cfg = tmp_path / "ablation.yaml"
    cfg.write_text(yaml.safe_dump({"train": _train_cfg(tiny_workspace), "arms": ["selected", "all"],
                                   "attribution": str(att), "audit": {"random_sets": 2, "n_bootstrap": 200}}))
    out = tmp_path / "grid"
    plan_dir = write_plan(cfg, out)
    lines = [x for x in (plan_dir / "commands.txt").read_text().splitlines() if " --arm " in x]
    # the tiny model has 3 layers: base, selected (1-2) and all, then w0-1, set0 (0 and 2: the one
    # non-contiguous pair) and all_matched (rank 4 · 2 / 3 ≈ 3)
    assert len(lines) == 1 + 2 + 3
    run_arms(cfg, out, [x.split(" --arm ")[1].split()[0] for x in lines])
    res = json.loads((run_ablation(cfg, out, collect=True).out / "results.json").read_text())
    audit = res["audit"]
    assert {r["arm"] for r in res["rows"]} == {"base", "selected", "all"}  # the audit's arms are in its section
    unit = audit["units"][0]
    assert [r["name"] for r in unit["candidates"]] == ["w0-1", "w1-2", "set0", "all_matched", "all_samerank"]
    assert next(r for r in unit["candidates"] if r["name"] == "w1-2")["arm"] == "selected-lora-s0"
    assert unit["candidates"][1]["selected"] and unit["candidates"][1]["predicted"] == pytest.approx(0.9)
    base = _flip_rate(out / "base-s0" / "pairs.jsonl")
    for r in unit["candidates"]:
        assert r["flip_reduction"] == pytest.approx(base - _flip_rate(out / "arms" / r["arm"] / "after" / "pairs.jsonl"),
                                                    abs=1e-12)
    report = build_report(tmp_path / "grid")
    md = (tmp_path / "grid" / "report.md").read_text()
    assert "Is the selected window where training helps?" in md and "The selection audit compared 5 layer sets" in md
    assert "Training curves" in md and "set0" not in md.split("Training curves")[-1]  # the audit's arms: no curves
    assert "selection_audit" in report["figures"]


def _train_cfg(ws):
    from test_ablate import _train

    return _train(ws, layers=[1, 2])


def _flip_rate(path) -> float:
    from mechmed.consistency import headline_rows

    rows = headline_rows([json.loads(x) for x in path.read_text().splitlines()])
    return float(np.mean([r["flip"] for r in rows]))


def test_the_regret_test_holds_its_level_when_every_window_is_as_good():
    """Under the null (every candidate removes flips alike), p < 0.05 for "the selected window misses the
    best one" comes out about 5% of the time, for one unit and pooled over five; the maximum over windows
    alone would reject nearly always pooled (it is never below zero)."""
    rejections = {1: 0, 5: 0}
    n_sims = 80
    for sim in range(n_sims):
        rng = np.random.default_rng(1000 + sim)
        cands = candidates(5, 2, 8, random_sets_count=1, seed=1)
        units = [_unit(rng, n_questions=40, effects={c.name: 0.4 for c in cands}, label=f"seed {k}",
                       prefix=f"{k}|", cands=cands) for k in range(5)]
        for n in rejections:
            rejections[n] += analyse(units[:n], n_bootstrap=200, seed=sim)["pooled"]["regret"]["p"] < 0.05
    assert rejections[1] / n_sims <= 0.12 and rejections[5] / n_sims <= 0.12, rejections


def test_units_that_share_questions_are_resampled_together():
    """Two units on the same questions (one model's data) are one stratum: pooled, their intervals are the
    single unit's, not narrower as if the questions were new."""
    rng = np.random.default_rng(5)
    u = _unit(rng, n_questions=40)
    twin = AuditUnit("lora seed 1", u.base, u.arms, u.candidates, u.scores, u.selected, u.cluster_prefix)
    one = analyse([u], n_bootstrap=300, seed=2)["pooled"]
    shared = analyse([u, twin], n_bootstrap=300, seed=2)["pooled"]
    assert shared["regret"]["ci"] == pytest.approx(one["regret"]["ci"], abs=1e-12)
    assert shared["spearman"]["gain_flipped"]["ci"] == pytest.approx(one["spearman"]["gain_flipped"]["ci"], abs=1e-12)
    apart = AuditUnit("lora seed 1", u.base, u.arms, u.candidates, u.scores, u.selected, "other|")
    independent = analyse([u, apart], n_bootstrap=300, seed=2)["pooled"]["regret"]["ci"]
    assert independent[1] - independent[0] < one["regret"]["ci"][1] - one["regret"]["ci"][0]
