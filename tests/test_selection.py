"""Selection strategies against brute force, and the baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mechmed.errors import MechmedError
from mechmed.selection import baseline, select


@pytest.mark.parametrize("seed", range(5))
def test_window_and_topk_match_brute_force(seed):
    s = np.random.default_rng(seed).normal(size=12)
    for w in (1, 3, 5, 12):
        best = max(range(12 - w + 1), key=lambda i: (s[i:i + w].sum(), -i))
        r = select(s, "window", width=w)
        assert r.layers == tuple(range(best, best + w))
        assert r.score == pytest.approx(s[best:best + w].sum())
    for k in (1, 4):
        best = max(itertools.combinations(range(12), k), key=lambda c: s[list(c)].sum())
        assert select(s, "topk", k=k).layers == best


@pytest.mark.parametrize("seed", range(5))
def test_peak_end_is_the_window_whose_last_layer_is_the_peak(seed):
    s = np.random.default_rng(seed).normal(size=12)
    peak = int(np.argmax(s))
    for w in (1, 3, 5, 12):
        ending = [i for i in range(12 - w + 1) if i + w - 1 == peak]
        # no window ends at an early peak: the first w layers, which contain it
        want = ending[0] if ending else (0 if peak < w - 1 else None)
        r = select(s, "peak_end", width=w)
        assert r.layers == tuple(range(want, want + w)) and peak in r.layers
        assert r.score == pytest.approx(s[want:want + w].sum())


def test_threshold_and_errors():
    s = [0.1, 0.5, 0.9, 0.2]
    assert select(s, "threshold", threshold=0.5).layers == (1, 2)
    with pytest.raises(MechmedError, match="lower it"):
        select(s, "threshold", threshold=2)
    with pytest.raises(MechmedError, match="--width 5"):
        select(s, "window", width=5)
    with pytest.raises(MechmedError, match="unknown"):
        select(s, "best")
    with pytest.raises(MechmedError, match="layer 1"):
        select([0.1, float("nan")], "window", width=1)


def test_baselines():
    assert baseline("early", 34, 5).layers == (0, 1, 2, 3, 4)
    assert baseline("late", 34, 5).layers == (29, 30, 31, 32, 33)
    assert baseline("middle", 34, 5).layers == (14, 15, 16, 17, 18)
    assert baseline("all", 6, 3).layers == tuple(range(6))
    r1, r2 = baseline("random", 34, 5, seed=1), baseline("random", 34, 5, seed=1)
    assert r1 == r2 and len(set(r1.layers)) == 5
    with pytest.raises(MechmedError):
        baseline("late", 4, 5)


# ---------------------------------------------------------------- how sure the selection is


def _by_hand(values, mask, clusters, width, n_bootstrap, seed):
    """The question bootstrap written out: draw questions, gather their pairs, average, pick the window."""
    names = sorted(set(clusters))
    members = {c: [i for i, x in enumerate(clusters) if x == c] for c in names}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(n_bootstrap, len(names)))
    best, sums = [], []
    for d in draws:
        rows = [i for g in d for i in members[names[g]] if mask[i]]
        if not rows:
            continue
        s = np.nanmean(values[rows], axis=0)
        w = np.convolve(s, np.ones(width), mode="valid")
        best.append(int(np.argmax(w)))
        sums.append(w)
    return np.array(best), np.array(sums)


def test_selection_uncertainty_matches_the_bootstrap_written_out():
    from mechmed.selection import selection_uncertainty

    rng = np.random.default_rng(5)
    n, L = 60, 6
    values = rng.gamma(2.0, 1.0, size=(n, L)) + np.array([0.1, 1.0, 0.9, 0.2, 0.3, 0.1])
    values[3, 2] = np.nan  # undefined values are left out, as layer_scores leaves them out
    mask = rng.random(n) < 0.6
    clusters = [f"q{i // 3}" for i in range(n)]  # three pairs per question
    got = selection_uncertainty(values, mask, clusters, "window", width=2, n_bootstrap=300, seed=7)
    best, sums = _by_hand(values, mask, clusters, 2, 300, 7)
    assert got.n_bootstrap == len(best) and got.n_questions == 20
    for j, c in enumerate(got.candidates):
        assert c["layers"] == [j, j + 1]
        assert c["p_best"] == pytest.approx(np.mean(best == j), abs=1e-12)
        assert c["ci"] == pytest.approx(list(np.percentile(sums[:, j], [2.5, 97.5])), abs=1e-9)
    point = np.convolve(np.nanmean(values[mask], axis=0), np.ones(2), mode="valid")
    assert [c["score"] for c in got.candidates] == pytest.approx(list(point))
    assert got.chosen == select(np.nanmean(values[mask], axis=0), "window", width=2).layers
    assert sum(c["p_best"] for c in got.candidates) == pytest.approx(1.0)
    assert sum(got.inclusion) == pytest.approx(2.0)  # each resample's window holds two layers


def test_questions_are_the_unit_and_near_ties_are_named():
    """Copying every pair within its question changes nothing (the question is resampled, not the pair);
    a clear winner comes out nearly always, two equal windows do not and are named in the warning."""
    from mechmed.selection import selection_uncertainty

    rng = np.random.default_rng(0)
    clear = rng.normal(0, 0.3, size=(40, 5)) + np.array([0, 0, 3, 3, 0])
    clusters = [f"q{i}" for i in range(40)]
    mask = np.ones(40, bool)
    a = selection_uncertainty(clear, mask, clusters, width=2, n_bootstrap=200, seed=1)
    b = selection_uncertainty(np.repeat(clear, 3, axis=0), np.ones(120, bool), np.repeat(clusters, 3), width=2,
                              n_bootstrap=200, seed=1)
    assert [c["p_best"] for c in a.candidates] == \
        [c["p_best"] for c in b.candidates]
    assert a.chosen == (2, 3) and a.p_chosen > 0.99 and a.warning() is None
    tie = rng.normal(0, 1.0, size=(40, 5)) + np.array([2, 0, 0, 2, 0])  # windows 0-1 and 2-3 (3-4) alike
    t = selection_uncertainty(tie, mask, clusters, width=2, n_bootstrap=500, seed=1)
    assert t.near_tie() and 0.05 < t.p_chosen < 0.8
    line = t.warning()
    assert line.count("\n") == 0 and f"{t.p_chosen:.0%}" in line and "near-tie" in line
    assert t.runner_up()["p_best"] > 0.05 and "next most often" in line
    with pytest.raises(MechmedError, match="no pairs in the score's set"):
        selection_uncertainty(clear, np.zeros(40, bool), clusters, width=2)


def test_topk_and_threshold_list_the_selections_the_resamples_make():
    from mechmed.selection import selection_uncertainty

    rng = np.random.default_rng(2)
    values = rng.normal(0, 1.0, size=(30, 6)) + np.array([0, 2.0, 1.9, 0, 3, 0])
    clusters, mask = [f"q{i}" for i in range(30)], np.ones(30, bool)
    top = selection_uncertainty(values, mask, clusters, "topk", k=2, n_bootstrap=400, seed=3)
    assert top.chosen == select(values.mean(0), "topk", k=2).layers
    assert sum(c["p_best"] for c in top.candidates) == pytest.approx(1.0, abs=0.05)
    assert top.inclusion[4] > 0.95 and top.inclusion[0] < 0.05
    thr = selection_uncertainty(values, mask, clusters, "threshold", threshold=1.5, n_bootstrap=400, seed=3)
    assert thr.chosen == select(values.mean(0), "threshold", threshold=1.5).layers
    assert all(set(c["layers"]) <= {1, 2, 4} or c["p_best"] < 0.05 for c in thr.candidates)


def test_select_layers_records_and_prints_how_sure_it_is(tmp_path, capsys, caplog):
    """select-layers on a scores file: the table of windows on stdout, the uncertainty in the config's
    provenance and in the scores file, and one warning line for a near-tie."""
    import json

    import yaml

    from mechmed.cli import main
    from mechmed.selection import per_pair_values

    rng = np.random.default_rng(4)
    attr = np.cumsum(np.abs(rng.normal(0, 1, size=(30, 6))) + np.array([0, 2, 0, 2, 0, 0]), axis=1)
    pairs = [{"id": f"p{i}", "question": f"q{i // 2}", "m_q": 1.0, "m_p": -1.0, "flipped": i % 3 > 0,
              "layer_attr": list(map(float, attr[i])), "patch_effect": None} for i in range(30)]
    gain = np.diff(attr, axis=1, prepend=0.0)[[p["flipped"] for p in pairs]].mean(0)
    path = tmp_path / "layer_scores.json"
    path.write_text(json.dumps({"n_layers": 6, "n_pairs": 30, "n_flipped": 20, "model": "demo",
                                "scores": {"gain_flipped": {"mean": list(map(float, gain))}}, "pairs": pairs}))
    values, mask, clusters = per_pair_values(json.loads(path.read_text()), "gain_flipped")
    assert values[mask].mean(0) == pytest.approx(gain) and clusters[:3] == ["q0", "q0", "q1"]
    assert main(["select-layers", "--scores", str(path), "--width", "2", "--out", str(tmp_path / "t.yaml")]) == 0
    out = capsys.readouterr().out
    assert "P(best)" in out and "<- selected" in out and "resamples of the 15 attributed questions" in out
    unc = yaml.safe_load((tmp_path / "t.yaml").read_text())["provenance"]["uncertainty"]
    assert len(unc["candidates"]) == 5 and unc["n_questions"] == 15 and unc["unit"] == "question"
    recorded = json.loads(path.read_text())["selections"]
    assert len(recorded) == 1 and recorded[0]["p_chosen"] == unc["p_chosen"] and recorded[0]["score_key"] == "gain_flipped"
    near = [r for r in caplog.records if "near-tie" in r.getMessage()]
    assert (unc["p_chosen"] < 0.8) == bool(near)
    # a stricter threshold turns the same selection into a warned near-tie, recorded once per selection
    caplog.clear()
    assert main(["select-layers", "--scores", str(path), "--width", "2", "--p-best", "1.01",
                 "--out", str(tmp_path / "t.yaml")]) == 0
    assert [r.getMessage().count("\n") for r in caplog.records if "near-tie" in r.getMessage()] == [0]
    assert len(json.loads(path.read_text())["selections"]) == 1
