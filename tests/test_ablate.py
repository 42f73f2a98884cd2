"""Ablation grid: arms, results table (checked against hand-computed statistics), resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from mechmed import stats
from mechmed.ablate import AblationConfig, format_table, plan, run_ablation, run_arms, table_csv
from mechmed.errors import MechmedError


def _train(ws, **kw):
    root, ckpt = ws
    return {"model": str(ckpt), "layers": [1], "rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 5e-3,
            "batch_size": 4, "grad_accum": 1, "epochs": 1.0, "max_steps": 3, "eval_every": 3,
            "checkpoint_every": 1, "guard_pairs": 8, "train_data": str(root / "train_pairs.jsonl"),
            "eval_data": str(root / "pairs.jsonl"), **kw}


def test_plan_places_each_arm(tiny_workspace):
    cfg = AblationConfig(train=_train(tiny_workspace, layers=[2, 3]),
                         arms=["consistency_only", "selected", "early", "late", "middle", "all", "ce_only", "random"],
                         match_parameters=True)
    arms = {a.arm: a for a in plan(cfg, n_layers=6)}
    assert list(arms) == ["selected", "early", "middle", "late", "all", "random", "ce_only", "consistency_only"]
    assert arms["selected"].layers == (2, 3) and arms["ce_only"].layers == (2, 3)
    assert arms["early"].layers == (0, 1) and arms["late"].layers == (4, 5) and arms["middle"].layers == (2, 3)
    assert arms["all"].layers == tuple(range(6)) and len(arms["random"].layers) == 2
    assert dict(arms["ce_only"].overrides) == {"consistency_weight": 0.0}
    # the paper's pure-consistency control: its symmetric KL, whatever the selected arm's loss
    assert dict(arms["consistency_only"].overrides) == {"ce_weight": 0.0, "consistency": "sym_kl"}
    # matching parameters: 6 layers at rank 4·2/6 ≈ 1 train as many LoRA weights as 2 layers at rank 4
    assert dict(arms["all"].overrides) == {"rank": 1}
    assert "rank" not in dict(arms["early"].overrides)
    with pytest.raises(MechmedError, match="reach past the model's 2 layers"):
        plan(cfg, n_layers=2)


def _mcnemar_by_hand(a: dict, b: dict) -> float:
    common = sorted(set(a) & set(b))
    b01 = sum(1 for i in common if not a[i]["flip"] and b[i]["flip"])
    b10 = sum(1 for i in common if a[i]["flip"] and not b[i]["flip"])
    if b01 + b10 == 0:
        return 1.0
    return sps.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue


def _clustered_by_hand(a: dict, b: dict) -> float:
    """McNemar clustered by question over the pairs both share, each labelled by its question_id here
    (the test itself: tests/test_stats.py)."""
    common = sorted(set(a) & set(b))
    return stats.mcnemar_clustered([a[i]["flip"] for i in common], [b[i]["flip"] for i in common],
                                   [a[i]["question_id"] for i in common]).p_value


def _pairs(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def grid(tiny_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    # an extra evaluation set reported beside the main one: the negated training pairs
    rows = [json.loads(x) for x in (tiny_workspace[0] / "train_pairs.jsonl").read_text().splitlines()]
    neg = root / "negation.jsonl"
    neg.write_text("".join(json.dumps({**r, "image": str(tiny_workspace[0] / r["image"])}) + "\n"
                           for r in rows if r["phenomenon"] == "negation_pattern"))
    cfg_file = root / "ablation.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": _train(tiny_workspace, extra_eval={"negation": str(neg)}),
                                        "arms": ["selected", "all", "ce_only"], "seeds": [0]}))
    res = run_ablation(cfg_file, root / "out")
    return cfg_file, root / "out", res


def test_results_table(grid, tiny_workspace):
    _, out, res = grid
    saved = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in saved["rows"]] == ["base", "selected", "all", "ce_only"]
    rows = {r["arm"]: r for r in saved["rows"]}
    base_pairs = _pairs(out / "base-s0" / "pairs.jsonl")
    for arm in ("selected", "all", "ce_only"):
        r = rows[arm]
        run = out / "arms" / f"{arm}-lora-s0"
        m = json.loads((run / "after" / "metrics.json").read_text())
        assert r["flip_rate"] == m["flip_rate"] and r["flip_ci"] == m["flip_rate_ci"]
        flips = [p["flip"] for p in _pairs(run / "after" / "pairs.jsonl").values()]
        assert r["flip_rate"] == pytest.approx(np.mean(flips), abs=1e-12)
        # Wilson interval of the canonical accuracy, by hand
        k, n = m["n_correct"]["original"], m["n_questions"]
        z = sps.norm.ppf(0.975)
        centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n))
        assert r["accuracy_ci"] == pytest.approx([centre - half, centre + half], abs=1e-9)
        assert r["p_vs_base"] == pytest.approx(_mcnemar_by_hand(base_pairs, _pairs(run / "after" / "pairs.jsonl")))
        assert r["flip_ci_clustered"] == m["flip_rate_ci_clustered"]
        after = _pairs(run / "after" / "pairs.jsonl")
        assert r["p_vs_base_clustered"] == pytest.approx(_clustered_by_hand(base_pairs, after))
        # the extra set: its own flips, tested against the base's on the same pairs
        neg, base_neg = _pairs(run / "after" / "negation" / "pairs.jsonl"), _pairs(out / "base-s0" / "negation" / "pairs.jsonl")
        assert len(neg) == 4 and all(p["negation_set"] for p in neg.values())
        assert r["sets"]["negation"]["flip_rate"] == pytest.approx(np.mean([p["flip"] for p in neg.values()]))
        assert r["sets"]["negation"]["p_vs_base"] == pytest.approx(_mcnemar_by_hand(base_neg, neg))
        assert r["by_phenomenon"] == {"lexical_substitution": pytest.approx(np.mean(flips))}
    ce_pairs = _pairs(out / "arms" / "ce_only-lora-s0" / "after" / "pairs.jsonl")
    sel_pairs = _pairs(out / "arms" / "selected-lora-s0" / "after" / "pairs.jsonl")
    assert rows["selected"]["p_vs_ce_only"] == pytest.approx(_mcnemar_by_hand(ce_pairs, sel_pairs))
    assert rows["selected"]["p_vs_ce_only_clustered"] == pytest.approx(_clustered_by_hand(ce_pairs, sel_pairs))
    assert rows["ce_only"]["p_vs_ce_only"] is None and rows["base"]["p_vs_base"] is None
    # LoRA weights scale with the layers: 3 layers (all) train 3× the parameters of 1 (selected)
    assert rows["all"]["trainable_parameters"] == 3 * rows["selected"]["trainable_parameters"]
    assert rows["base"]["trainable_parameters"] == 0
    # the ce_only arm really trained without the consistency term
    log = [json.loads(x) for x in (out / "arms" / "ce_only-lora-s0" / "train_log.jsonl").read_text().splitlines()]
    cfg = yaml.safe_load((out / "arms" / "ce_only-lora-s0" / "config.yaml").read_text())
    assert cfg["consistency_weight"] == 0.0 and all(np.isfinite(h["consistency"]) for h in log)
    # summary of one seed = the row; CSV and terminal table carry every arm
    summary = {r["arm"]: r for r in saved["summary"]}
    assert summary["selected"]["flip_rate"] == pytest.approx(rows["selected"]["flip_rate"])
    assert summary["selected"]["n_seeds"] == 1
    assert summary["selected"]["sets"]["negation"] == pytest.approx(rows["selected"]["sets"]["negation"])
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("arm,method,seed,layers")
    assert table_csv(res.rows) == (out / "results.csv").read_text()
    text = format_table(res.rows)
    assert all(a in text for a in ("base", "selected", "all", "ce_only"))


def test_rerun_reuses_and_interrupted_arm_resumes(grid, tmp_path):
    from mechmed.ablate import arm_config
    from mechmed.train import train

    cfg_file, out, res = grid
    adapter = out / "arms" / "selected-lora-s0" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    again = run_ablation(cfg_file, out)
    assert adapter.stat().st_mtime_ns == before  # finished arms are read back, not retrained
    assert again.rows == res.rows

    # a fresh grid whose 'all' arm was interrupted after one step: it resumes to the same numbers
    fresh = tmp_path / "out"
    cfg = AblationConfig.load(cfg_file)
    arm = next(a for a in plan(cfg, 3) if a.arm == "all")
    train(arm_config(cfg, arm), fresh / "arms" / arm.name, evaluate_before=False, stop_after=1)
    assert not (fresh / "arms" / arm.name / "metrics.json").exists()
    resumed = run_ablation(cfg_file, fresh)
    strip = [{k: v for k, v in r.items() if k != "run_dir"} for r in resumed.rows]
    assert strip == [{k: v for k, v in r.items() if k != "run_dir"} for r in res.rows]


def test_config_errors(tiny_workspace, tmp_path):
    t = _train(tiny_workspace)
    with pytest.raises(MechmedError, match="arms: unknown"):
        AblationConfig(train=t, arms=["selected", "lates"])
    with pytest.raises(MechmedError, match="methods: unknown"):
        AblationConfig(train=t, methods=["qlora"])
    with pytest.raises(MechmedError, match="did you mean 'seeds'"):
        AblationConfig.from_dict({"train": t, "sedes": [0]})
    with pytest.raises(MechmedError, match="missing 'train'"):
        AblationConfig.from_dict({"arms": ["selected"]})
    with pytest.raises(MechmedError, match="option layers: \\[\\] is invalid"):
        AblationConfig.from_dict({"train": {**t, "layers": []}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(MechmedError, match="bad.yaml.*not valid YAML"):
        AblationConfig.load(bad)
    with pytest.raises(MechmedError, match="no such file"):
        AblationConfig.load(tmp_path / "missing.yaml")


def test_cli_ablate(grid, tmp_path, capsys):
    from mechmed.cli import main

    cfg_file, out, _ = grid
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["ablate", "--config", str(cfg_file), "--out", str(copy)]) == 0
    assert "selected" in capsys.readouterr().out
    assert main(["ablate", "--config", str(tmp_path / "nope.yaml"), "--out", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml" in err


def test_negation_pairs_of_a_mixed_main_set_are_their_own_set(tmp_path):
    """PSF-Med mixes negation_pattern pairs into one file: the grid reports them as the negation set,
    beside a headline over the rest; a set of negations alone, or an extra set of that name, is left as is."""
    from mechmed.ablate import evaluation_sets

    def write(d, rows):
        d.mkdir(parents=True, exist_ok=True)
        (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rows = [{"id": str(i), "flip": i % 2 == 0, "negation_set": i < 3, "phenomenon": "x"} for i in range(8)]
    write(tmp_path / "mixed", rows)
    sets = evaluation_sets(tmp_path / "mixed", [])
    assert set(sets) == {"negation"} and sorted(sets["negation"]) == ["0", "1", "2"]
    write(tmp_path / "only", rows[:3])
    assert evaluation_sets(tmp_path / "only", []) == {}
    write(tmp_path / "mixed" / "negation", rows[5:])
    assert sorted(evaluation_sets(tmp_path / "mixed", ["negation"])["negation"]) == ["5", "6", "7"]


def test_each_arm_shows_its_progress(tiny_workspace, tmp_path, monkeypatch, capsys):
    """With progress on, the grid draws a bar over the arms and each arm's training bar, named by the arm."""
    monkeypatch.setenv("MECHMED_PROGRESS", "1")
    cfg_file = tmp_path / "ablation.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": _train(tiny_workspace), "arms": ["selected"], "seeds": [0]}))
    run_ablation(cfg_file, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "ablation arms" in err and "arm selected-lora-s0" in err


def test_seeds_on_the_same_pairs_are_tested_with_the_pair_as_the_unit():
    """A real model on a fixed data set evaluates the same pairs with the same base in every seed:
    the summary then averages each arm's flips over seeds per pair and tests by paired bootstrap
    over pairs (by hand here), instead of counting each pair once per seed. The demo's seeds
    (a model and data each) keep the pooled McNemar test."""
    import numpy as np

    from mechmed.ablate import shared_pairs, summarise

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(80)]
    phen = ["scope" if k % 2 else "lexical_substitution" for k in range(80)]

    def run(p_flip, margins=None):
        flips = rng.random(80) < p_flip
        margins = rng.random(80) if margins is None else margins
        return {i: {"id": i, "question_id": f"q{k // 2}", "flip": bool(f), "margin_diff": float(m),
                    "margin_question": 1.0, "margin_paraphrase": float(m), "phenomenon": ph}
                for k, (i, f, m, ph) in enumerate(zip(ids, flips, margins, phen))}

    def grid(base_runs, own_data=False):
        rows, pairs = [], {}
        for arm, method, runs in (("base", "none", base_runs), ("selected", "lora", [run(0.12) for _ in range(3)]),
                                  ("ce_only", "lora", [run(0.2) for _ in range(3)])):
            for seed, r in enumerate(runs):
                if own_data:  # each seed its own images (the demo builds its data per seed)
                    r = {k: {**v, "image": f"data-s{seed}/{k}.png"} for k, v in r.items()}
                pairs[len(rows)] = r
                rows.append({"arm": arm, "method": method, "seed": seed, "layers": [1], "trainable_parameters": 1,
                             "flip_rate": float(np.mean([v["flip"] for v in r.values()])), "n_pairs": 80,
                             "canonical_accuracy": 0.8, "_n_questions": 40, "yes_rate": 0.5, "collapsed": False})
        return rows, pairs, {s: pairs[s] for s in range(3)}  # the base rows come first

    base = run(0.3)
    rows, pairs, base_pairs = grid([base, base, base])
    assert shared_pairs(base_pairs) == sorted(ids)
    summary = {r["arm"]: r for r in summarise(rows, pairs, base_pairs)}
    sel, ce, b = summary["selected"], summary["ce_only"], summary["base"]
    assert ce["p_vs_ce_only"] is None and ce["p_vs_base"] is not None
    mean = lambda arm: np.mean([[float(pairs[i][k]["flip"]) for k in sorted(ids)]  # noqa: E731
                                for i, r in enumerate(rows) if r["arm"] == arm], axis=0)
    base_f = np.array([float(base[k]["flip"]) for k in sorted(ids)])
    assert sel["unit"] == "pair" and sel["n_pairs"] == b["n_pairs"] == 80
    assert sel["p_vs_base"] == pytest.approx(stats.paired_bootstrap(base_f, mean("selected"), seed=0).p_value)
    assert sel["p_vs_ce_only"] == pytest.approx(stats.paired_bootstrap(mean("ce_only"), mean("selected"),
                                                                       seed=0).p_value)
    # clustered by question: the pairs of every seed pooled, each question one cluster across seeds
    a, bb = ({f"{r['seed']}:{k}": v for i, r in enumerate(rows) if r["arm"] == arm for k, v in pairs[i].items()}
             for arm in ("base", "selected"))
    keys = sorted(a)
    want = stats.mcnemar_clustered([a[k]["flip"] for k in keys], [bb[k]["flip"] for k in keys],
                                   [a[k]["question_id"] for k in keys]).p_value
    assert sel["p_vs_base_clustered"] == pytest.approx(want) and want > sel["p_vs_base"] / 100
    w = stats.wilson_interval(int(base_f.sum()), 80)
    assert b["flip_ci"] == pytest.approx([w.low, w.high]) and sel["flip_rate"] == pytest.approx(mean("selected").mean())
    scope = [k for k, ph in zip(sorted(ids), [base[k]["phenomenon"] for k in sorted(ids)]) if ph == "scope"]
    pos = [sorted(ids).index(k) for k in scope]
    assert sel["phenomena"]["scope"]["p_vs_base"] == pytest.approx(
        stats.paired_bootstrap(base_f[pos], mean("selected")[pos], seed=0).p_value)

    # each seed its own base (the demo): pooled over seeds, exact McNemar on the seed-prefixed pairs
    other = [base, run(0.3), run(0.3)]
    rows, pairs, base_pairs = grid(other, own_data=True)
    assert shared_pairs(base_pairs) is None
    sel = next(r for r in summarise(rows, pairs, base_pairs) if r["arm"] == "selected")
    pooled = lambda arm: {f"{r['seed']}:{k}": v for i, r in enumerate(rows) if r["arm"] == arm  # noqa: E731
                          for k, v in pairs[i].items()}
    a, bb = pooled("base"), pooled("selected")
    want = stats.mcnemar_from_pairs([a[k]["flip"] for k in sorted(a)], [bb[k]["flip"] for k in sorted(a)]).p_value
    assert sel["unit"] == "pair × seed" and sel["p_vs_base"] == pytest.approx(want) and sel["n_pairs"] == 240
    # each seed's questions are its own clusters
    keys = sorted(a)
    labels = [f"{k.split(':')[0]}|{a[k]['question_id']}" for k in keys]
    want = stats.mcnemar_clustered([a[k]["flip"] for k in keys], [bb[k]["flip"] for k in keys], labels).p_value
    assert sel["p_vs_base_clustered"] == pytest.approx(want)
    cl = stats.clustered_wilson_interval([bb[k]["flip"] for k in keys], labels)
    assert sel["flip_ci_clustered"] == pytest.approx([cl.low, cl.high])
    # the same data with other margins in each seed: one question is still one cluster across the seeds
    rows, pairs, base_pairs = grid(other)
    assert shared_pairs(base_pairs) is None
    sel = next(r for r in summarise(rows, pairs, base_pairs) if r["arm"] == "selected")
    a, bb = pooled("base"), pooled("selected")
    want = stats.mcnemar_clustered([a[k]["flip"] for k in keys], [bb[k]["flip"] for k in keys],
                                   [a[k]["question_id"] for k in keys]).p_value
    assert sel["p_vs_base_clustered"] == pytest.approx(want)


def test_training_free_arms_and_the_best_trained_arm(tiny_workspace, tmp_path):
    """steer and ensemble are evaluated on the base model (no parameters, method none) into arm
    directories like a trained arm's; act trains with the activation term at the selected layers;
    p_vs_best_trained is McNemar (by hand) against the non-collapsed trained arm with the fewest flips."""
    cfg = AblationConfig.from_dict({"train": _train(tiny_workspace), "arms": ["selected", "act", "steer", "ensemble"]})
    arms = plan(cfg, n_layers=3)
    assert [(a.arm, a.method) for a in arms] == [("selected", "lora"), ("act", "lora"), ("steer", "none"),
                                                 ("ensemble", "none")]
    assert dict(arms[1].overrides) == {"consistency": "activation", "consistency_weight": 0.5}
    res = run_ablation(cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["arm"]: r for r in saved["rows"]}
    for arm in ("steer", "ensemble"):
        d = tmp_path / "out" / "arms" / f"{arm}-none-s0"
        m = json.loads((d / "metrics.json").read_text())
        assert m["trainable_parameters"] == 0 and m["training_free"]["kind"] == arm
        assert rows[arm]["flip_rate"] == m["after"]["flip_rate"] and rows[arm]["method"] == "none"
        assert rows[arm]["quadrants"] == m["after"]["quadrants"] and m["after"]["quadrants"]["n_pairs"] == 8
    # steer has its matched null (100 draws by default) in its metrics, its row and the summary; ensemble none
    null = json.loads((tmp_path / "out" / "arms" / "steer-none-s0" / "metrics.json").read_text())["null"]
    assert null["draws"] == cfg.null_draws == 100 and len(null["draws_reversed"]) == 100
    assert null["reversed"]["arm"] + null["new_flips"]["arm"] <= 8 and rows["steer"]["null"] == null
    assert next(r for r in saved["summary"] if r["arm"] == "steer")["null"] == null and "null" not in rows["ensemble"]
    act_cfg = yaml.safe_load((tmp_path / "out" / "arms" / "act-lora-s0" / "config.yaml").read_text())
    assert act_cfg["consistency"] == "activation" and act_cfg["layers"] == [1]
    # the tiny random model's trained arms answer no better than the majority: the guard calls them collapsed,
    # and a collapsed arm is no reference
    assert all(r["collapsed"] for r in saved["summary"] if r["arm"] in ("selected", "act"))
    assert saved["best_trained"] is None and all(r["p_vs_best_trained"] is None for r in saved["rows"])
    assert "p vs best trained" in format_table(res.summary)


def test_a_null_from_an_earlier_config_is_not_this_grids(tiny_workspace, tmp_path):
    """null_draws: 0 drops a null an earlier run drew; a clamp to zero has none; collecting never draws one."""
    from mechmed.ablate import Arm, _with_null

    done = {"after": {}, "null": {"draws": 100}}
    for extra in ({"null_draws": 0}, {"clamp_to": "zero"}):
        cfg = AblationConfig.from_dict({"train": _train(tiny_workspace), "arms": ["clamp", "steer"], **extra})
        arm = "steer" if "null_draws" in extra else "clamp"
        assert "null" not in _with_null(cfg, Arm(arm, "none", 0, (1,)), tmp_path, done)
    cfg = AblationConfig.from_dict({"train": _train(tiny_workspace), "arms": ["steer"], "null_draws": 7})
    assert _with_null(cfg, Arm("steer", "none", 0, (1,)), tmp_path, done, compute=False) == done


def test_training_free_config_errors(tiny_workspace, tmp_path):
    for bad, match in (({"ensemble_k": 1}, "ensemble_k"), ({"clamp_to": "mean"}, "clamp_to"), ({"null_draws": -1},
                                                                                                "null_draws"),
                       ({"act_weight": 0}, "act_weight"), ({"clamp_features": 0}, "clamp_features")):
        with pytest.raises(MechmedError, match=match):
            AblationConfig.from_dict({"train": _train(tiny_workspace), "arms": ["clamp"], **bad})
    # clamp without an attribution to rank features: an error before any model loads
    cfg = AblationConfig.from_dict({"train": _train(tiny_workspace), "arms": ["clamp"]})
    with pytest.raises(MechmedError, match="clamp arm needs an attribution"):
        run_ablation(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "base-s0").exists()


def test_p_vs_best_trained_by_hand():
    """Against the non-collapsed trained arm with the lowest pooled flip rate, per seed and pooled over
    seeds (McNemar by hand); collapsed and training-free arms are never the reference."""
    from mechmed.ablate import against_best_trained

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(40)]
    spec = [("base", "none", 0.4, False), ("selected", "lora", 0.2, False), ("all", "lora", 0.1, False),
            ("consistency_only", "lora", 0.0, True), ("ensemble", "none", 0.05, False)]
    rows, pairs_by_row = [], {}
    for seed in (0, 1):
        for arm, method, rate, collapsed in spec:
            pairs_by_row[len(rows)] = {i: {"flip": bool(rng.random() < rate)} for i in ids}
            rows.append({"arm": arm, "method": method, "seed": seed, "collapsed": collapsed,
                         "p_vs_best_trained": None})
    summary = []
    for arm, method, _, collapsed in spec:
        idx = [i for i, r in enumerate(rows) if r["arm"] == arm]
        flips = [v["flip"] for i in idx for v in pairs_by_row[i].values()]
        summary.append({"arm": arm, "method": method, "collapsed": collapsed, "flip_rate": float(np.mean(flips)),
                        "unit": "pair × seed", "test": "McNemar"})
    assert against_best_trained(rows, summary, pairs_by_row) == "all-lora"
    best = {r["seed"]: i for i, r in enumerate(rows) if r["arm"] == "all"}
    for i, r in enumerate(rows):
        want = None if r["arm"] == "all" else _mcnemar_by_hand(pairs_by_row[best[r["seed"]]], pairs_by_row[i])
        assert r["p_vs_best_trained"] == (None if want is None else pytest.approx(want))
    pooled = {f"{r['seed']}:{k}": v for i, r in enumerate(rows) if r["arm"] == "all" for k, v in pairs_by_row[i].items()}
    ens = {f"{r['seed']}:{k}": v for i, r in enumerate(rows) if r["arm"] == "ensemble" for k, v in pairs_by_row[i].items()}
    assert next(r for r in summary if r["arm"] == "ensemble")["p_vs_best_trained"] == pytest.approx(
        _mcnemar_by_hand(pooled, ens))


@pytest.mark.slow
def test_plan_separate_runs_and_collect_give_the_one_process_table(demo_eval_subset, tmp_path):
    """On the embedded default (evaluated on a subset of its held-out pairs): the one-process grid; its
    plan run line by line (mechmed train on each planned config, mechmed ablate --arm for the base) and
    collected; and the grid spread over two device lanes: the same results table, byte for byte. The
    selected layers are the first ones: the grid trains them once for ``selected`` and ``early`` (a
    copy), the plan trains each, and the tables agree."""
    import shlex

    from mechmed.cli import main
    from mechmed.config import demo_defaults

    train = {**demo_defaults(), "model": "demo", "layers": [0, 1], "max_steps": 6, "eval_every": 6,
             "checkpoint_every": 6, "extra_eval": {}, "eval_data": str(demo_eval_subset)}
    cfg_file = tmp_path / "ablation.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": train, "arms": ["selected", "early", "ce_only"], "seeds": [0]}))
    one = run_ablation(cfg_file, tmp_path / "one", device="cpu")
    early = yaml.safe_load((tmp_path / "one" / "arms" / "early-lora-s0" / "config.yaml").read_text())["provenance"]
    assert (early["ablation_arm"], early["same_training_as"]) == ("early-lora-s0", "selected-lora-s0")

    two = tmp_path / "two"
    assert main(["ablate", "--config", str(cfg_file), "--out", str(two), "--plan", "--device", "cpu"]) == 0
    text = (two / "plan" / "commands.txt").read_text()
    lines = [x for x in text.splitlines() if " --arm " in x]
    assert text.rstrip().endswith(f"--out {two} --collect")
    assert [shlex.split(x)[shlex.split(x).index("--arm") + 1] for x in lines] == \
        ["base-s0", "selected-lora-s0", "early-lora-s0", "ce_only-lora-s0"]
    with pytest.raises(MechmedError, match="4 of the plan's runs are not finished"):
        run_ablation(two / "plan" / "ablation.yaml", two, collect=True)
    assert main(shlex.split(lines[0])[1:]) == 0  # the base, as its plan line says
    for name in ("selected-lora-s0", "early-lora-s0", "ce_only-lora-s0"):  # each by mechmed train on its config
        assert main(["train", "--config", str(two / "plan" / f"{name}.yaml"), "--out", str(two / "arms" / name),
                     "--device", "cpu"]) == 0
    assert main(["ablate", "--config", str(two / "plan" / "ablation.yaml"), "--out", str(two), "--collect"]) == 0
    assert (two / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()
    assert (two / "summary.csv").read_text() == (tmp_path / "one" / "summary.csv").read_text()

    three = run_ablation(cfg_file, tmp_path / "three", device="cpu", devices=["cpu", "cpu"])
    assert table_csv(three.rows) == table_csv(one.rows)


def test_collect_refuses_an_arm_trained_with_another_config(tiny_workspace, tmp_path):
    cfg = AblationConfig.from_dict({"train": _train(tiny_workspace), "arms": ["selected", "ensemble"]})
    done = run_arms(
        cfg, tmp_path, ["base-s0", "ensemble-none-s0", "selected-lora-s0"])
    assert set(done) == {"base-s0", "ensemble-none-s0", "selected-lora-s0"}
    assert run_ablation(cfg, tmp_path, collect=True).rows[2]["arm"] == "ensemble"
    path = tmp_path / "arms" / "selected-lora-s0" / "config.yaml"
    path.write_text(path.read_text().replace("rank: 4", "rank: 8"))
    with pytest.raises(MechmedError, match="trained with rank 8, the plan has 4"):
        run_ablation(cfg, tmp_path, collect=True)
    with pytest.raises(MechmedError, match="--arm late-lora-s0: not in this grid's plan"):
        run_arms(cfg, tmp_path, ["late-lora-s0"])


def test_p_vs_best_trained_with_the_pair_as_the_unit():
    """Seeds on the same pairs: the paired bootstrap of each pair's flip averaged over seeds, best arm
    against the other (10,000 resamples, as the other pair-unit tests)."""
    from mechmed.ablate import against_best_trained

    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(30)]
    rows, pairs_by_row = [], {}
    for seed in (0, 1):
        for arm, rate in (("base", 0.4), ("selected", 0.1), ("steer", 0.35)):
            pairs_by_row[len(rows)] = {i: {"flip": bool(rng.random() < rate)} for i in ids}
            rows.append({"arm": arm, "method": "none" if arm != "selected" else "lora", "seed": seed,
                         "collapsed": False, "p_vs_best_trained": None})
    summary = [{"arm": a, "method": m, "collapsed": False, "test": "pair bootstrap", "unit": "pair",
                "flip_rate": float(np.mean([v["flip"] for i, r in enumerate(rows) if r["arm"] == a
                                            for v in pairs_by_row[i].values()]))}
               for a, m in (("base", "none"), ("selected", "lora"), ("steer", "none"))]
    assert against_best_trained(rows, summary, pairs_by_row) == "selected-lora"

    def mean_flips(arm):
        return np.mean([[float(pairs_by_row[i][k]["flip"]) for k in sorted(ids)] for i, r in enumerate(rows)
                        if r["arm"] == arm], axis=0)  # pairs in sorted id order, as the summary resamples them

    want = stats.paired_bootstrap(mean_flips("selected"), mean_flips("steer"), n_resamples=10_000, seed=0).p_value
    assert summary[2]["p_vs_best_trained"] == pytest.approx(float(want))
    assert summary[1].get("p_vs_best_trained") is None


@pytest.mark.slow
def test_runs_of_one_seed_each_pool_into_the_two_seed_summary(grid, tiny_workspace, tmp_path):
    """Two ablations of one design, one per seed (as ``mechmed demo --seed S`` writes them), pooled by
    :func:`pool_seed_runs`, give the summary that one grid over both seeds writes from the same finished
    runs; pooled clustered p-values are stratified by seed (each seed's questions its own clusters)."""
    from mechmed.ablate import pool_seed_runs

    cfg_file, seed0, _ = grid
    cfg = yaml.safe_load(cfg_file.read_text())
    one = tmp_path / "seed1.yaml"
    one.write_text(yaml.safe_dump({**cfg, "seeds": [1]}))
    seed1 = tmp_path / "seed1"
    run_ablation(one, seed1)
    # one grid over both seeds that reuses every finished run: it trains nothing
    both = tmp_path / "both"
    for src in (seed0, seed1):
        for d in [*src.glob("base-s*"), *(src / "arms").iterdir()]:
            shutil.copytree(d, both / d.relative_to(src))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**cfg, "seeds": [0, 1]}))
    want = run_ablation(two, both)
    pooled = pool_seed_runs([seed0, seed1])
    assert [(r["arm"], r["seed"]) for r in pooled["rows"]] == [(r["arm"], r["seed"]) for r in
                                                               sorted(want.rows, key=lambda r: r["seed"])]
    assert pooled["summary"] == want.summary
    assert pooled["best_trained"] == json.loads((both / "results.json").read_text())["best_trained"]
    sel = next(r for r in pooled["summary"] if r["arm"] == "selected")
    assert sel["n_seeds"] == 2 and sel["p_vs_base_clustered"] is not None
    with pytest.raises(MechmedError, match="seed 0 is in two of the runs"):
        pool_seed_runs([seed0, seed0])
