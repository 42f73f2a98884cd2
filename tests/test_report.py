"""The report from a real small run: every stage run by its own function on the tiny Gemma 3 VLM
(random SAEs, a three-arm ablation of a few steps), then checked against the files it came from."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
import yaml

from conftest import suite_threads
from mechmed import figures as F
from mechmed.report import LOSS_LABELS, build_report, layers_phrase, summary_table


def _random_saes(root, d_model: int, n_layers: int):
    """Untrained TopK SAEs per layer, saved as sae-lens directories (a real, poor reconstruction)."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from mechmed.sites import Site

    for layer in range(n_layers):
        torch.manual_seed(layer)
        sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=32, k=4,
                                    metadata=SAEMetadata(hook_name=Site(layer).hook_name))).eval()
        sae.save_model(str(root / f"layer_{layer}"))
    # Neuronpedia's explanation export for half of layer 1's features: labels there, none elsewhere
    (root / "layer_1" / "explanations.json").write_text(json.dumps(
        [{"modelId": "tiny", "layer": "1-res", "index": str(i), "description": f" finding word {i} "} for i in range(16)]))
    return root


@pytest.fixture(scope="module")
def run_dir(tiny_workspace, tmp_path_factory):
    """sae_check/ → attribute/ → train.yaml → ablation/, the way mechmed demo lays them out."""
    import torch

    from mechmed.ablate import AblationConfig, run_ablation
    from mechmed.models import load_model
    from mechmed.stages import run_attribute, run_sae_check, run_select_layers

    torch.set_num_threads(1)
    ws, ckpt = tiny_workspace
    root = tmp_path_factory.mktemp("report_run")
    bundle = load_model(str(ckpt))
    saes = _random_saes(root / "saes", bundle.d_model, bundle.n_layers)
    run = root / "run"
    tiny = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 5e-3, "batch_size": 4, "grad_accum": 1, "epochs": 1.0,
            "max_steps": 3, "eval_every": 3, "checkpoint_every": 3, "guard_pairs": 8,
            "train_data": str(ws / "train_pairs.jsonl"), "eval_data": str(ws / "pairs.jsonl")}
    with F.png_session():  # the stages' own PNGs share one browser
        run_sae_check(model=str(ckpt), saes=str(saes), layers="all", texts="medical,general",
                      out=str(run / "sae_check"), batch_size=16, ce=False)
        run_attribute(str(ckpt), str(ws / "pairs.jsonl"), str(saes), str(run / "attribute"), max_pairs=8,
                      batch_size=4)
        scores = run / "attribute" / "layer_scores.json"
        table = json.loads(scores.read_text())
        extra = {} if table["n_flipped"] else {"score": next(k for k in ("gain_all", "attr_all") if k in table["scores"])}
        cfg, _ = run_select_layers(str(scores), str(run / "train.yaml"), width=1, model=str(ckpt),
                                   data=str(ws / "pairs.jsonl"), saes=None, overrides=tiny, **extra)
        train = {k: v for k, v in cfg.to_dict().items() if k != "config_version"}
        run_ablation(AblationConfig(train=train, arms=["selected", "late", "ce_only", "consistency_only", "act", "clamp",
                                                       "steer", "ensemble"], saes=str(saes),
                                    attribution=str(run / "attribute")), run / "ablation")
    torch.set_num_threads(suite_threads())
    return run


@pytest.fixture(scope="module")
def report(run_dir):
    return build_report(run_dir, png=False)


def _results(run_dir) -> dict:
    return json.loads((run_dir / "ablation" / "results.json").read_text())


def _md(run_dir) -> str:
    return (run_dir / "report.md").read_text(encoding="utf-8")


def _ci(v, ci, d):
    return f"{v:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"


def test_markdown_table_is_results_json(run_dir, report):
    res = _results(run_dir)
    md = _md(run_dir)
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| arm "))
    table = [line for line in lines[start:][: next(i for i, x in enumerate(lines[start:]) if not x.startswith("|"))]
             if line.startswith("| ")]  # the summary table: the first table of the report
    head, body = table[0], table[1:]
    cols = [c.strip() for c in re.split(r"(?<!\\)\|", head)[1:-1]]
    assert len(body) == len(res["summary"])
    for line, row in zip(body, res["summary"]):
        cells = dict(zip(cols, (c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1])))
        assert (cells["arm"], cells["method"]) == (row["arm"], row["method"])
        assert cells["layers"] == F.layer_text(row["layers"])
        assert cells["params"] == str(row["trainable_parameters"])
        assert cells["flip rate [95% CI]"] == _ci(row["flip_rate"], row["flip_ci"], 3)
        assert cells["\\|Δmargin\\| [95% CI]"] == _ci(row["margin_diff"], row["margin_diff_ci"], 2)
        assert cells["accuracy [95% CI]"] == _ci(row["canonical_accuracy"], row["accuracy_ci"], 3)
        assert cells["yes-rate"] == f"{row['yes_rate']:.2f}"
        assert cells["collapsed"] == ("yes" if row["collapsed"] else "")
        for key, col in (("p_vs_base", "p vs base"), ("p_vs_base_clustered", "p vs base, by question"),
                         ("p_vs_ce_only", "p vs CE only"),
                         ("p_vs_best_trained", "p vs best trained")):
            p = row[key]
            if p is None:
                assert cells[col] == ""
            else:
                assert float(cells[col].lstrip("<")) == pytest.approx(p, rel=0.01, abs=1e-3)
    # the terminal table: the same rows, aligned
    lines = summary_table(res).splitlines()
    assert len(lines) == len(res["summary"]) + 2 and len({len(x) for x in lines[:2]}) == 1
    for line, row in zip(lines[2:], res["summary"]):
        assert line.split()[:2] == [row["arm"], row["method"]] and _ci(row["flip_rate"], row["flip_ci"], 3) in line


def _source_numbers(run_dir) -> set[str]:
    """Every number in the run's files, formatted as the report may print it."""
    values: list[float] = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            values.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for p in ("sae_check/sae_check.json", "attribute/layer_scores.json", "ablation/results.json"):
        walk(json.loads((run_dir / p).read_text()))
    # the signed changes the verdicts state: each arm's flip rate against the base's and CE-only's
    summary = json.loads((run_dir / "ablation" / "results.json").read_text())["summary"]
    refs = [r["flip_rate"] for r in summary if r["arm"] in ("base", "ce_only")]
    values += [abs(r["flip_rate"] - ref) for r in summary for ref in refs]
    base_acc = next(r["canonical_accuracy"] for r in summary if r["arm"] == "base")  # accuracy each arm cost
    values += [abs(r["canonical_accuracy"] - base_acc) for r in summary]
    walk(yaml.safe_load((run_dir / "train.yaml").read_text()))
    out = set()
    for v in values:
        out |= {f"{v:.{d}f}" for d in (2, 3, 4)} | {f"{v:g}", f"{v:.2g}", f"{v:.3g}"}
    return out


def test_every_headline_number_comes_from_the_run(run_dir, report):
    known = _source_numbers(run_dir)
    md = _md(run_dir)
    key = md.split("## Key results", 1)[1].split("\n## ", 1)[0]
    numbers = re.findall(r"(?<![\w.#])-?\d+\.\d+", key)
    assert numbers, key
    stray = [n for n in numbers if n not in known]
    assert not stray, f"numbers in the key results that no run file holds: {stray}"
    # and the headline sentences say what the files say
    res, scores = _results(run_dir), json.loads((run_dir / "attribute" / "layer_scores.json").read_text())
    base, sel = res["base"], next(r for r in res["summary"] if r["arm"] == "selected")
    before, after = _ci(base["flip_rate"], base["flip_ci"], 3), _ci(sel["flip_rate"], sel["flip_ci"], 3)
    assert (f"from {before} to {after}" if before != after else f"left the flip rate at {after}") in key
    if before != after:  # the signed change and the relative change, by hand
        diff = sel["flip_rate"] - base["flip_rate"]
        rel = f", {100 * diff / base['flip_rate']:+.0f}% relative" if base["flip_rate"] else ""
        assert f"({diff:+.3f}{rel}; McNemar".replace("-", "−") in key
    assert f"{scores['n_flipped']} of {scores['n_pairs']} attributed pairs flipped" in key  # a file: no split named
    rows = json.loads((run_dir / "sae_check" / "sae_check.json").read_text())["rows"]
    assert f"R² from {min(r['r2'] for r in rows):.4f}" in key and f"to {max(r['r2'] for r in rows):.4f}" in key
    cons = next(r for r in res["summary"] if r["arm"] == "consistency_only")
    assert (f"Consistency-only training ({LOSS_LABELS['sym_kl']}; no cross-entropy) "
            + ("collapsed" if cons["collapsed"] else "did not collapse")) in key
    late = next(r for r in res["summary"] if r["arm"] == "late")
    assert ("The late range is the selected layers" in key) == (late["layers"] == sel["layers"])
    selected = yaml.safe_load((run_dir / "train.yaml").read_text())["layers"]
    assert f"select-layers chose {layers_phrase(selected)}" in md
    # the training-free arms and activation consistency, each with its test against the base and the best trained arm
    best = res["best_trained"]
    for arm, words in (("clamp", "Clamping the top 4 attributed SAE features"), ("steer", "Adding the steering vector"),
                       ("ensemble", "Prompt ensembling")):
        r = next(x for x in res["summary"] if x["arm"] == arm)
        sentence = next(h for h in report["headlines"] if h.startswith(words))
        assert _ci(r["flip_rate"], r["flip_ci"], 3) in sentence and "without training" in sentence
        if best and r["p_vs_best_trained"] is not None:
            assert "the best trained arm" in sentence
    assert any(h.startswith("Activation consistency at the selected") for h in report["headlines"])
    assert report["sections"] == ["sae_check", "attribute", "select", "ablation", "training"]
    assert report["headlines"] and all(h in md for h in report["headlines"])


def test_html_is_one_offline_file(run_dir, report):
    from plotly.offline import get_plotlyjs

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count(get_plotlyjs()) == 1
    assert not re.search(r"<script[^>]*\bsrc=", page) and not re.search(r"<link[^>]*\bhref=", page)
    names = list(report["figures"])
    assert {"r2_by_layer", "layer_profile", "feature_heatmap", "flip_by_arm", "tradeoff"} <= set(names)
    for name in names:
        assert f'id="fig-{name}"' in page
    assert page.split(get_plotlyjs(), 1)[1].count("Plotly.newPlot(") == len(names)
    for h in report["headlines"]:
        assert html.escape(h) in page
    # training curves follow the grid's order, titled from each arm's config
    plan = json.loads((run_dir / "ablation" / "ablation_config.json").read_text())["plan"]
    trained = [a for a in plan if "-none-" not in a]  # the training-free arms have no training curves
    assert [n for n in names if n.startswith("training_")] == [f"training_{a}" for a in trained]
    cons = yaml.safe_load((run_dir / "ablation" / "arms" / "consistency_only-lora-s0" / "config.yaml").read_text())
    assert cons["ce_weight"] == 0
    assert "cross-entropy × 0 + consistency × 1" in page


def test_missing_stages_are_skipped_with_a_note(run_dir, tmp_path):
    only_ablation = tmp_path / "a"
    shutil.copytree(run_dir / "ablation", only_ablation / "ablation")
    r = build_report(only_ablation, png=False)
    assert r["sections"] == ["ablation", "training"]
    md = _md(only_ablation)
    skipped = md.split("## Skipped", 1)[1]
    for note in ("SAE check: no sae_check/sae_check.json", "layer attribution: no attribute/layer_scores.json",
                 "layer selection: no train.yaml"):
        assert note in skipped and note in r["notes"]
    assert "Skipped" in (only_ablation / "report.html").read_text(encoding="utf-8")
    # the selected range is read from the results when train.yaml is missing
    sel = next(r for r in _results(run_dir)["summary"] if r["arm"] == "selected")
    assert f"Training the selected {layers_phrase(sel['layers'])}" in md

    no_ablation = tmp_path / "b"
    for part in ("sae_check", "attribute"):
        shutil.copytree(run_dir / part, no_ablation / part)
    (no_ablation / "attribute" / "features.csv").unlink()
    r = build_report(no_ablation, png=False)
    assert r["sections"] == ["sae_check", "attribute"]
    assert "ablation: no ablation/results.json" in r["notes"]
    assert any(n.startswith("feature attribution: no attribute/features.csv") for n in r["notes"])
    assert "feature_heatmap" not in r["figures"]
    assert not any(line.startswith("| arm") for line in _md(no_ablation).splitlines())

    damaged = tmp_path / "c"
    shutil.copytree(run_dir / "ablation", damaged / "ablation")
    (damaged / "ablation" / "results.json").write_text("{not json")
    r = build_report(damaged, png=False)
    assert any(n.startswith("ablation: could not be read") for n in r["notes"])
    assert "ablation" not in r["sections"]


def test_report_of_an_ablation_directory(run_dir, tmp_path):
    """``mechmed ablate --report``: the ablation directory itself is the run."""
    r = build_report(run_dir / "ablation", out=tmp_path, png=False)
    assert "ablation" in r["sections"] and (tmp_path / "report.html").is_file()
    assert (tmp_path / "figures" / "flip_by_arm.html").is_file()


def test_png_figures_linked_from_markdown(run_dir, tmp_path):
    if F.browser_path() is None:
        pytest.skip("no Chrome/Chromium for kaleido")
    r = build_report(run_dir, out=tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    figures = [link for link in links if not link.startswith("figures/examples/")]  # the rest: example thumbnails
    assert len(figures) == len(r["figures"])
    for f in r["figures"].values():
        assert f["svg"].endswith(".svg") and (tmp_path / f["svg"]).read_text().lstrip().startswith("<svg")
        assert (tmp_path / f["pdf"]).read_bytes()[:5] == b"%PDF-"
    for link in links:
        assert (tmp_path / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_config_names_the_score_the_window_was_chosen_on(run_dir):
    from mechmed.config import TrainConfig
    from mechmed.selection import score_vector, select

    cfg = TrainConfig.load(run_dir / "train.yaml")
    key = cfg.provenance["score_key"]
    scores = json.loads((run_dir / "attribute" / "layer_scores.json").read_text())
    assert key in scores["scores"]
    assert list(select(score_vector(scores, key), "window", width=1).layers) == cfg.layers


def test_expert_utilisation_of_a_spectral_arm_is_drawn(run_dir, tmp_path):
    """An arm directory with ``expert_utilisation.json`` (as mechmed train writes for spectral experts)
    gets its layer × expert heatmap in the report, with the shares it was given."""
    run = tmp_path / "r"
    shutil.copytree(run_dir / "ablation", run / "ablation")
    arm = next(d for d in sorted((run / "ablation" / "arms").iterdir()) if d.is_dir())
    stats = {"n_experts": 4, "top_k": 2, "tokens": 40, "modules": {}, "layers": {"1": [0.4, 0.3, 0.2, 0.1]}}
    (arm / "expert_utilisation.json").write_text(json.dumps(stats))
    r = build_report(run, png=False)
    assert "experts" in r["sections"] and f"experts_{arm.name}" in r["figures"]
    html = (run / "figures" / f"experts_{arm.name}.html").read_text(encoding="utf-8")
    assert "0.4" in html and "expert" in html


def test_attribution_sentence_and_caption_match_the_figure_under_them(run_dir, tmp_path):
    """The layer the attribution sentence names is the peak of the bars the layer profile draws, and
    its caption speaks of grey bars only when grey bars are drawn."""
    import re

    from mechmed.report import _profile_key

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    build_report(run, png=False)
    md = (run / "report.md").read_text(encoding="utf-8")
    scores = json.loads((run / "attribute" / "layer_scores.json").read_text())
    train_cfg = yaml.safe_load((run / "train.yaml").read_text()) if (run / "train.yaml").is_file() else None
    key = _profile_key(scores, train_cfg)
    fig = F.layer_profile(scores, key=key)
    bars = [t for t in fig.data if t.type == "bar"]
    y = [v if v is not None else float("-inf") for v in bars[0].y]
    named = int(re.search(r"peaks at layer (\d+)", md).group(1))
    assert named == max(range(len(y)), key=lambda i: y[i])
    caption = next(line for line in md.splitlines() if line.startswith("Blue bars") or "Blue bars:" in line)
    grey = any(getattr(t.marker, "color", None) == "#999999" for t in bars)
    assert ("grey" in caption) == grey


def test_each_caption_claims_what_its_figure_draws(run_dir, tmp_path):
    """Every figure's caption against the figure and the data under it: the R² markers filled exactly
    where the test passes and the dashed threshold; the flip-rate bars' dashed base line and grey CI
    band at the base's numbers; the base star of the trade-off; the base as the top row of the
    phenomenon map, with the line before the extra sets; the red collapse bands of the training curves."""
    from mechmed.report import _load, _sections

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    loaded = _load(run)
    figs = {name: (fig, caption) for sec in _sections(loaded, run) for name, fig, caption in sec.figures}
    results = loaded.ablation
    base = results["base"]

    fig, caption = figs["r2_by_layer"]
    assert "filled markers pass the test" in caption and "dashed threshold" in caption
    threshold = loaded.sae_check["options"]["threshold"]
    assert any(s.type == "line" and s.line.dash == "dash" and s.y0 == s.y1 == threshold for s in fig.layout.shapes)
    rows = loaded.sae_check["rows"]
    drawn = [t for t in fig.data if t.x and t.x[0] is not None]  # one trace per text set (legend entries aside)
    assert sum(len(t.x) for t in drawn) == len(rows)
    for t in drawn:
        mine = sorted((r for r in rows if r["text_set"] == t.legendgroup), key=lambda r: r["layer"])
        assert list(t.y) == [r["r2"] for r in mine]
        assert [c != "white" for c in t.marker.color] == [bool(r["exceeds_threshold"]) for r in mine]

    fig, caption = figs["flip_by_arm"]
    assert "dashed base line" in caption and "grey CI band" in caption
    assert any(s.type == "line" and s.line.dash == "dash" and abs(s.y0 - base["flip_rate"]) < 1e-12
               for s in fig.layout.shapes)
    assert any(s.type == "rect" and abs(s.y0 - base["flip_ci"][0]) < 1e-12 and abs(s.y1 - base["flip_ci"][1]) < 1e-12
               for s in fig.layout.shapes)

    fig, caption = figs["tradeoff"]
    assert "base star" in caption
    (star,) = [t for t in fig.data if t.marker.symbol == "star"]
    assert (star.x[0], star.y[0]) == (base["flip_rate"], base["canonical_accuracy"])

    fig, caption = figs["flip_heatmap"]
    assert "base model (top row)" in caption
    heat = fig.data[0]
    assert heat.y[0].startswith("base") and fig.layout.yaxis.autorange == "reversed"
    summary = {F.ARM_LABELS[r["arm"]]: r for r in results["summary"]}
    for label, z in zip(heat.y, heat.z):
        r = summary[label.split(" ·")[0].split(" (")[0]]
        assert list(z[1:1 + len(r["by_phenomenon"])]) == list(r["by_phenomenon"].values())
    if results["base"].get("sets"):
        assert "right:" in caption and any(s.type == "line" for s in fig.layout.shapes)

    fig, caption = figs["quadrants"]
    with_q = sorted((r for r in results["summary"] if r.get("quadrants")), key=F._arm_key)
    # the caption names the definition of reliance the bars are over: the counterfactual image here
    assert {r["quadrants"]["definition"] for r in with_q} == {"counterfactual"}
    assert "consistent or flipped × image-reliant or not" in caption and "asked finding toggled" in caption
    assert "uniform gray" not in caption and "asked finding toggled" in fig.layout.title.text
    assert with_q[0]["arm"] == "base" and len(with_q) == len(results["summary"])
    for trace, name in zip(fig.data, ("consistent_reliant", "consistent_blind", "flipped_reliant", "flipped_blind")):
        assert trace.name == F.QUADRANT_LABELS[name]
        assert list(trace.x) == [r["quadrants"][name]["share"] for r in with_q]
        assert list(trace.y) == [F.ARM_LABELS[r["arm"]] for r in with_q]
    assert fig.layout.barmode == "stack"
    assert all(sum(t.x[i] for t in fig.data) == pytest.approx(1.0) for i in range(len(with_q)))

    lo, hi = results["config"]["train"]["collapse_low"], results["config"]["train"]["collapse_high"]
    curves = [name for name in figs if name.startswith("training_")]
    assert curves
    for name in curves:
        fig, _ = figs[name]
        bands = {(s.y0, s.y1) for s in fig.layout.shapes if s.type == "rect" and s.fillcolor == F.COLLAPSE_COLOUR}
        assert (0, lo) in bands and (hi, 1) in bands, (name, bands)


def test_phenomenon_table_and_examples_are_the_run_files(run_dir, tmp_path):
    """The per-phenomenon table's cells are results.json's pooled statistics; each example pair's
    phrasings and margins are those of the base evaluation's pairs.jsonl, and only flipped pairs are shown."""
    from mechmed.io import read_jsonl
    from mechmed.report import example_pairs, fmt, phenomenon_table

    results = _results(run_dir)
    cols, body = phenomenon_table(results)
    base = results["base"]
    assert cols[:3] == ["phenomenon", "pairs", "base [95% CI]"]
    for line, stats in zip(body, base["phenomena"].values()):
        assert line[1] == str(stats["n_pairs"]) and line[2] == _ci(stats["flip_rate"], stats["flip_ci"], 3)
    assert sum(s["n_pairs"] for s in base["phenomena"].values()) == base["n_pairs"]
    selected = next(r for r in results["summary"] if r["arm"] == "selected")
    for line, stats in zip(body, selected["phenomena"].values()):
        assert line[3] == _ci(stats["flip_rate"], stats["flip_ci"], 3)
    late = next(r for r in results["summary"] if r["arm"] == "late")
    col = cols.index("late")
    for line, stats in zip(body, late["phenomena"].values()):
        assert line[col] == fmt(stats["flip_rate"])

    # the tiny base model flips few pairs: mark three flipped in a copy of the run (one per question
    # first, the largest |Δmargin| first), one of them fixed by the selected arm
    from mechmed.io import write_jsonl

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    base_file = run / "ablation" / "base-s0" / "pairs.jsonl"
    after_file = run / "ablation" / "arms" / "selected-lora-s0" / "after" / "pairs.jsonl"
    base_rows, after_rows = read_jsonl(base_file), read_jsonl(after_file)
    chosen = [r["id"] for r in base_rows if not r["negation_set"]][:3]
    for r in base_rows:
        r["flip"] = r["id"] in chosen
    for r in after_rows:
        r["flip"] = r["id"] in chosen[1:]  # the first is fixed by training the selected layers
    write_jsonl(base_file, base_rows)
    write_jsonl(after_file, after_rows)
    rows = {r["id"]: r for r in base_rows}
    examples = example_pairs(run / "ablation", results)
    assert sorted(e["id"] for e in examples) == sorted(chosen)
    assert [rows[e["id"]]["margin_diff"] for e in examples] == sorted((rows[i]["margin_diff"] for i in chosen),
                                                                     reverse=True)
    for e in examples:
        r = rows[e["id"]]
        assert (e["question"], e["paraphrase"]) == (r["question"], r["paraphrase"])
        assert (e["margin_question"], e["margin_paraphrase"]) == (r["margin_question"], r["margin_paraphrase"])
        assert e["after"]["flip"] == (e["id"] != chosen[0])
    build_report(run, out=tmp_path / "report", png=False)
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "### Flip rate by phenomenon" in md and "### Example flipped pairs" in md
    assert f"{examples[0]['question']} ({examples[0]['margin_question']:+.2f})" in md
    assert "consistent" in md and "still flips" in md
    assert 'src="data:image/png;base64,' in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert (tmp_path / "report" / "figures" / "examples" / "0.png").read_bytes()[:4] == b"\x89PNG"


def test_feature_labels_come_from_the_saes_explanations_only(run_dir, tmp_path, monkeypatch):
    """features.csv carries each feature's label where the SAE directory's explanations.json has one,
    and an empty label elsewhere (none made up); the heatmap writes the label under the index; an SAE
    whose metadata names a Neuronpedia id finds its export in mechmed's cache."""
    import csv

    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from mechmed.saes import feature_labels

    rows = list(csv.DictReader((run_dir / "attribute" / "features.csv").read_text().splitlines()))
    assert rows and "label" in rows[0]
    for r in rows:
        want = f"finding word {r['feature']}" if r["layer"] == "1" and int(r["feature"]) < 16 else ""
        assert r["label"] == want, r
    fig = F.feature_heatmap(rows)
    labelled = [r for r in rows if r["label"] and int(r["rank"]) < 10]
    assert labelled, "no top feature of layer 1 has a label: the fixture no longer exercises labels"
    if labelled:
        assert any(f"#{labelled[0]['feature']}<br>{labelled[0]['label']}" in t for line in fig.data[0].text for t in line)

    monkeypatch.setenv("MECHMED_CACHE", str(tmp_path / "cache"))
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=4, k=2, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post",
                                                                            neuronpedia_id="tiny-it/0-res-4")))
    torch.manual_seed(0)
    sae.save_model(str(tmp_path / "sae"))
    assert feature_labels(str(tmp_path / "sae"), sae) == {}
    target = tmp_path / "cache" / "neuronpedia" / "tiny-it" / "0-res-4.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"2": "pleural fluid", "3": "  "}))
    assert feature_labels(str(tmp_path / "sae"), sae) == {2: "pleural fluid"}


def test_quadrant_sentence_reads_results_with_or_without_clustered_tests(run_dir):
    """The image-reliance sentence gives the clustered McNemar p of each cell; over results written
    before the clustered tests existed it falls back to the pair-level p and says so."""
    import copy

    from mechmed.report import _quadrant_headline, fmt_p

    summary = copy.deepcopy(_results(run_dir)["summary"])
    for r in summary:
        r["collapsed"] = False  # the tiny model's arms may collapse; the sentence leaves those out
    base = next(r for r in summary if r["arm"] == "base")
    (now,) = _quadrant_headline(summary, base)
    sel = next(r for r in summary if r["arm"] == "selected")
    p = sel["quadrants"]["p_vs_base_clustered"]["consistent_reliant"]
    assert f"(McNemar clustered by question {fmt_p(p)})" in now
    old = copy.deepcopy(summary)
    for r in old:
        if r.get("quadrants"):
            r["quadrants"].pop("p_vs_base_clustered", None)
            r["quadrants"].pop("clustered", None)
    (then,) = _quadrant_headline(old, next(r for r in old if r["arm"] == "base"))
    p = sel["quadrants"]["p_vs_base"]["consistent_reliant"]
    assert "clustered" not in then and f"(McNemar {fmt_p(p)})" in then


def test_the_selection_sentence_says_how_sure_it_is():
    """The report's selection sentence gives how often the window wins over resampled questions, and names
    the runner-up with both score sums when it is a near-tie."""
    import numpy as np

    from mechmed.report import _selection_headline
    from mechmed.selection import selection_uncertainty

    rng = np.random.default_rng(1)
    clusters, mask = [f"q{i}" for i in range(40)], np.ones(40, bool)
    clear = selection_uncertainty(rng.normal(0, 0.2, (40, 5)) + [0, 3, 3, 0, 0], mask, clusters, width=2, seed=0)
    text = _selection_headline({"layers": [1, 2], "provenance": {"strategy": "window", "uncertainty": clear.to_dict()}})
    assert f"comes out in {clear.p_chosen:.0%} of them." in text and "near-tie" not in text
    tie = selection_uncertainty(rng.normal(0, 1, (40, 5)) + [2, 0, 0, 2, 0], mask, clusters, width=2, seed=0)
    text = _selection_headline({"layers": list(tie.chosen), "provenance": {"uncertainty": tie.to_dict()}})
    r = tie.runner_up()
    assert "a near-tie with layers" in text and f"({r['p_best']:.0%}; summed score {r['score']:.3g}" in text


def test_the_attribution_sentence_checks_the_gain_against_patching_beside_the_layer_index_null():
    """The agreement the report states is the one that can fail (what enters at each layer, by attribution
    and by exact patching), with layer index beside it; not |a_L| against |e_L|, which both grow with depth."""
    from mechmed.report import _attr_headline

    scores = {"n_flipped": 5, "n_pairs": 20, "split": "train", "spearman_attr_patch": 1.0,
              "spearman_gain_patch": 0.6, "spearman_index_patch": -0.09,
              "scores": {"gain_flipped": {"mean": [0.1, 0.9, 0.3], "ci": [[0, 0.2], [0.5, 1.2], [0.1, 0.5]]}}}
    text = _attr_headline(scores, [1], "gain_flipped")
    assert "(Spearman ρ = 0.60; layer index alone: ρ = -0.09)" in text and "rank the layers similarly" in text
    assert "1.00" not in text


def test_without_a_browser_one_warning_and_report_figures_draws_them_later(run_dir, tmp_path, monkeypatch, caplog,
                                                                           capsys):
    """A machine without Chrome: one warning for the whole run (naming the fix), report.md says where the
    figures are, and `mechmed report RUN --figures` writes the missing files later (exit 2 while there is
    still no browser, with nothing changed)."""
    import logging
    import shutil

    import plotly.graph_objects as go

    from mechmed.cli import main

    run = shutil.copytree(run_dir, tmp_path / "run")
    for stale in [*run.rglob("*.png"), *run.rglob("*.svg"), *run.rglob("*.pdf")]:
        stale.unlink()
    before = [p.relative_to(run).as_posix() for p in run.rglob("*" + F.FIGURE_JSON)]  # stages run without a browser
    monkeypatch.setenv(F.BROWSER_ENV, "none")
    monkeypatch.delenv(F._WARNED_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="mechmed"):
        assert main(["report", str(run)]) == 0
        F.save_figure(go.Figure(go.Bar(x=[1, 2], y=[3, 4])), run / "sae_check" / "extra")  # a stage's figure
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "plotly_get_chrome" in said[0] and "mechmed report RUN_DIR --figures" in said[0]
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "**Figures:** no Chrome/Chromium" in md and "![" not in md.split("## Skipped")[0].replace(
        "](figures/examples/", "")
    figures = sorted(p.name[: -len(".html")] for p in (run / "figures").glob("*.html"))
    assert figures and all(f"[{name}](figures/{name}.html)" in md for name in figures)
    pending = sorted(p.relative_to(run).as_posix() for p in run.rglob("*" + F.FIGURE_JSON))
    assert pending == sorted({*before, *(f"figures/{n}{F.FIGURE_JSON}" for n in figures),
                              f"sae_check/extra{F.FIGURE_JSON}"})

    capsys.readouterr()
    assert main(["report", str(run), "--figures"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--figures" in err and "plotly_get_chrome" in err
    assert (run / "report.md").read_text(encoding="utf-8") == md

    monkeypatch.delenv(F.BROWSER_ENV)
    if F.browser_path() is None:
        pytest.skip("no Chrome/Chromium on this machine to draw them with")
    assert main(["report", str(run), "--figures"]) == 0
    assert not list(run.rglob("*" + F.FIGURE_JSON))
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "**Figures:**" not in md
    for name in figures:
        assert f"![{name}](figures/{name}.png)" in md
        assert (run / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert (run / "sae_check" / "extra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flip_risk_block_is_the_results_rows(run_dir, report):
    """The report's flip-risk table shows each row of results.json: AUROC of |margin| with its interval,
    ECE and coverage, and the sentence gives the base model's AUROC."""
    md = _md(run_dir)
    results = _results(run_dir)
    block = md.split("### Can the flips be foreseen?")[1].split("\n### ")[0]
    rows = [r for r in results["rows"] if r.get("flip_risk")]
    assert rows and rows[0]["arm"] == "base"
    for r in rows:
        f = r["flip_risk"]
        cells = f"| {r['arm']} | {f['n_flips']}/{f['n_pairs']} | "
        auroc = "n/a" if f["auroc_margin"] is None else _ci(f["auroc_margin"], f["auroc_margin_ci"], 3)
        assert cells + auroc in block, (cells, auroc)
        assert f"| {f['ece']:.3f} | {f['coverage']['coverage']:.3f} |" in block
    base = rows[0]["flip_risk"]
    if base["auroc_margin"] is not None:
        assert f"foreseen at AUROC {base['auroc_margin']:.3f}" in block
