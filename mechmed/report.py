"""One report for a ``mechmed demo`` run (or an ablation directory): ``report.html`` and ``report.md``.

:func:`build_report` reads whatever stages of the run exist (``sae_check/``, ``attribute/``,
``train.yaml``, ``ablation/``), draws their figures, and writes

- ``report.html``: one self-contained file (plotly.js inlined once) with a section per stage, the
  headline numbers, every figure and the ablation summary table;
- ``report.md``: the headline numbers with 95% CIs and p-values, the summary table, and links to
  the figure files (``figures/*.png`` with ``.svg`` and ``.pdf`` beside them for a paper, or ``.html``
  where no browser could draw them).

Missing stages are skipped with a note in both files. Every sentence with a number is computed from
the run's files.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from mechmed.config import ARMS, CONSISTENCY_ONLY_LOSS
from mechmed.config import RANGE_ARMS as _BASELINE_ARMS
from mechmed.consistency import NEAR_TIE
from mechmed.io import read_jsonl

log = logging.getLogger(__name__)

#: The layer-range arms, selected first, in display order.
RANGE_ARMS = tuple(a for a in ARMS if a == "selected" or a in _BASELINE_ARMS)


# ---------------------------------------------------------------- formatting

def fmt(v, digits: int = 3) -> str:
    """A number with ``digits`` decimals, or "n/a"."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def fmt_ci(ci, digits: int = 3) -> str:
    """``[lo, hi]`` with ``digits`` decimals ("" when there is no interval)."""
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_p(p) -> str:
    """``p = 0.053`` / ``p < 0.001`` / ``p n/a``."""
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.01 else f"p = {p:.3f}"


def p_cell(v) -> str:
    """A p-value in a table cell: empty when absent, <0.001, two significant digits below 0.01."""
    return "" if v is None else ("<0.001" if v < 0.001 else f"{v:.2g}" if v < 0.01 else f"{v:.3f}")


def _value_ci(row: dict, key: str, ci_key: str, digits: int = 3) -> str:
    ci = fmt_ci(row.get(ci_key), digits)
    return fmt(row.get(key), digits) + (f" {ci}" if ci else "")


# ---------------------------------------------------------------- the summary table

COLUMNS = ("arm", "method", "layers", "params", "seeds", "flip rate [95% CI]", "|Δmargin| [95% CI]",
           "accuracy [95% CI]", "yes-rate", "p vs base", "p vs base, by question", "p vs CE only",
           "p vs best trained", "collapsed")


def _table_rows(results) -> tuple[list[str], list[list[str]]]:
    """(column names, cells): :data:`COLUMNS`, then a flip-rate column per extra evaluation set."""
    from mechmed.figures import SET_LABELS, layer_text

    rows = results
    if isinstance(results, dict):
        rows = results.get("summary") or results.get("rows") or []
    sets = list(dict.fromkeys(k for r in rows for k in (r.get("sets") or {})))

    out = []
    for r in rows:
        seeds = r.get("n_seeds") or (1 if r.get("seed") is not None else "")
        out.append([r["arm"], r["method"], layer_text(r.get("layers") or []), str(r.get("trainable_parameters", "")),
                    str(seeds), _value_ci(r, "flip_rate", "flip_ci"), _value_ci(r, "margin_diff", "margin_diff_ci", 2),
                    _value_ci(r, "canonical_accuracy", "accuracy_ci"), fmt(r.get("yes_rate"), 2),
                    p_cell(r.get("p_vs_base")), p_cell(r.get("p_vs_base_clustered")), p_cell(r.get("p_vs_ce_only")),
                    p_cell(r.get("p_vs_best_trained")),
                    "yes" if r.get("collapsed") else ""]
                   + [fmt(((r.get("sets") or {}).get(k) or {}).get("flip_rate")) for k in sets])
    return [*COLUMNS, *(f"flip: {SET_LABELS.get(k, k)}" for k in sets)], out


def summary_table(results) -> str:
    """The ablation summary as an aligned plain-text table. ``results`` is ``results.json``'s dict
    (its ``summary``, else its ``rows``) or a list of rows."""
    cols, body = _table_rows(results)
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(cols)]
    numeric = {3, 4, 8}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    head = line(cols)
    return "\n".join([head, "-" * len(head)] + [line(r) for r in body])


def _md_grid(cols, body) -> str:
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


def _html_grid(cols, body, raw_columns: tuple = ()) -> str:
    """An HTML table; cells of ``raw_columns`` are HTML already (thumbnails), the rest are escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f"<td>{c if i in raw_columns else html.escape(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in body)
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _markdown_table(results) -> str:
    return _md_grid(*_table_rows(results))


def _html_table(results) -> str:
    return _html_grid(*_table_rows(results))


# ---------------------------------------------------------------- per phenomenon, and examples

def phenomenon_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """(columns, cells) of the flip rate per phenomenon of the main set and per extra set (rows):
    pairs, the base model and the selected arm with 95% CIs, McNemar p between them, then every
    other arm's flip rate. None when the results hold no per-phenomenon statistics."""
    from mechmed.figures import PHENOMENON_LABELS, SET_LABELS, arm_label

    summary = [r for r in results.get("summary") or [] if r.get("phenomena")]
    base = next((r for r in summary if r["arm"] == "base"), None)
    if base is None:
        return None
    arms = [r for r in summary if r["arm"] != "base"]
    selected = next((r for r in arms if r["arm"] == "selected"), None)
    others = [r for r in arms if r is not selected]
    cols = ["phenomenon", "pairs", "base [95% CI]"]
    if selected is not None:
        cols += [f"{arm_label(selected, summary)} [95% CI]",
                 "p (pair bootstrap)" if selected.get("test") == "pair bootstrap" else "p (McNemar)"]
    cols += [arm_label(r, summary) for r in others]

    def stats(r: dict, kind: str, name: str) -> dict:
        return ((r.get("phenomena") if kind == "phenomenon" else r.get("sets")) or {}).get(name) or {}

    keys = [("phenomenon", k) for k in base["phenomena"]] + [("set", k) for k in base.get("sets") or {}]
    body = []
    for kind, name in keys:
        b = stats(base, kind, name)
        label = PHENOMENON_LABELS.get(name, name) if kind == "phenomenon" else f"{SET_LABELS.get(name, name)} (set)"
        line = [label, str(b.get("n_pairs", "")), _value_ci(b, "flip_rate", "flip_ci")]
        if selected is not None:
            sel = stats(selected, kind, name)
            line += [_value_ci(sel, "flip_rate", "flip_ci"), p_cell(sel.get("p_vs_base"))]
        line += [fmt(stats(r, kind, name).get("flip_rate")) for r in others]
        body.append(line)
    return cols, body


def example_pairs(ablation_dir: Path, results: dict, k: int = 4) -> list[dict]:
    """Up to ``k`` held-out pairs the base model flipped (largest |Δmargin| first; those the selected
    arm fixed, then those it did not), each with both phrasings, the image path, and the margins of
    the base model and of the selected arm (first method, first seed)."""
    summary = results.get("summary") or []
    seeds = [r["seed"] for r in results.get("rows") or [] if r["arm"] == "base"]
    sel = next((r for r in summary if r["arm"] == "selected"), None)
    if not seeds or not (ablation_dir / f"base-s{seeds[0]}" / "pairs.jsonl").is_file():
        return []
    base = {r["id"]: r for r in read_jsonl(ablation_dir / f"base-s{seeds[0]}" / "pairs.jsonl")
            if not r.get("negation_set") and r.get("flip") and r.get("question")}
    after = {}
    if sel is not None:
        path = ablation_dir / "arms" / f"selected-{sel['method']}-s{seeds[0]}" / "after" / "pairs.jsonl"
        if path.is_file():
            after = {r["id"]: r for r in read_jsonl(path)}
    ranked = sorted(base.values(), key=lambda r: -r["margin_diff"])
    firsts, rest, seen = [], [], set()  # one pair per question first, so the examples show several findings
    for r in ranked:
        (rest if r["question"] in seen else firsts).append(r)
        seen.add(r["question"])
    ranked = firsts + rest
    fixed = [r for r in ranked if r["id"] in after and not after[r["id"]]["flip"]]
    fixed_ids = {r["id"] for r in fixed}
    kept = [r for r in ranked if r["id"] not in fixed_ids]
    chosen = fixed[: max(k - min(len(kept), k // 2), 0)]
    chosen += kept[: k - len(chosen)]
    out = []
    for r in sorted(chosen, key=lambda r: -r["margin_diff"]):
        a = after.get(r["id"])
        out.append({**{key: r.get(key) for key in ("id", "question", "paraphrase", "image", "answer",
                                                   "phenomenon", "margin_question", "margin_paraphrase")},
                    "after": None if a is None else {key: a[key] for key in ("margin_question", "margin_paraphrase",
                                                                             "flip")}})
    return out


def _thumbnail(path: str | None, size: int = 96) -> bytes | None:
    """A PNG thumbnail of the image at ``path`` (None when it cannot be read)."""
    import io

    from PIL import Image

    if not path:
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if max(im.size) < size:  # small images are enlarged, pixels kept sharp
                scale = size // max(im.size)
                im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ValueError):
        return None


def _examples_block(examples: list[dict], out: Path) -> tuple[str, str]:
    """(HTML with the thumbnails inlined, Markdown linking thumbnails written under ``figures/examples``)."""
    import base64

    from mechmed.io import atomic_path

    cols = ["image", "question (margin)", "paraphrase (margin)", "answer", "after training the selected layers"]
    html_rows, md_rows = [], []
    for i, e in enumerate(examples):
        thumb = _thumbnail(e.get("image"))
        img_html, img_md = "", ""
        if thumb is not None:
            img_html = f'<img alt="{html.escape(e["id"])}" src="data:image/png;base64,{base64.b64encode(thumb).decode()}">'
            target = out / "figures" / "examples" / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_bytes(thumb)
            img_md = f"![{e['id']}]({os.path.relpath(target, out)})"
        a = e.get("after")
        after = ("" if a is None else f"{a['margin_question']:+.2f} / {a['margin_paraphrase']:+.2f}: "
                 + ("still flips" if a["flip"] else "consistent"))
        cells = [f"{e['question']} ({e['margin_question']:+.2f})", f"{e['paraphrase']} ({e['margin_paraphrase']:+.2f})",
                 str(e.get("answer", "")), after]
        html_rows.append([img_html, *cells])
        md_rows.append([img_md, *cells])
    return _html_grid(cols, html_rows, raw_columns=(0,)), _md_grid(cols, md_rows)


# ---------------------------------------------------------------- reading the run

@dataclass
class _Run:
    root: Path
    sae_check: dict | None = None
    layer_scores: dict | None = None
    features: list = field(default_factory=list)
    train_cfg: dict | None = None
    ablation_dir: Path | None = None
    ablation: dict | None = None
    logs: dict = field(default_factory=dict)
    arm_cfgs: dict = field(default_factory=dict)
    """Each trained arm's training config (``arms/<name>/config.yaml``), by arm directory name."""
    experts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def skip(self, what: str, why: str) -> None:
        self.notes.append(f"{what}: {why}")
        log.info("report: %s skipped (%s)", what, why)


def _try(run: _Run, what: str, fn):
    """Read one part; a missing or unreadable part becomes a note, never an exception."""
    try:
        return fn()
    except Exception as e:  # a damaged part must not lose the rest of the report
        run.skip(what, f"could not be read ({(str(e).splitlines() or [type(e).__name__])[0]})")
        return None


def _arm_dirs(ablation_dir: Path) -> list[Path]:
    """The arm directories in the grid's display order (``ablation_config.json``'s plan), others after."""
    dirs = {d.name: d for d in (ablation_dir / "arms").iterdir() if d.is_dir()}
    written: dict = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        written = json.loads((ablation_dir / "ablation_config.json").read_text(encoding="utf-8"))
    written = written if isinstance(written, dict) else {}
    plan, audit = written.get("plan") or [], written.get("audit_arms") or []
    order = [n for n in plan if n in dirs] + sorted(n for n in dirs if n not in plan and n not in audit)
    return [dirs[n] for n in order]


def _load(run_dir: Path) -> _Run:
    import yaml

    from mechmed.io import read_json

    run = _Run(run_dir)
    p = run_dir / "sae_check" / "sae_check.json"
    if p.is_file():
        run.sae_check = _try(run, "SAE check", lambda: read_json(p, "SAE check"))
    else:
        run.skip("SAE check", f"no {p.relative_to(run_dir)}")
    p = run_dir / "attribute" / "layer_scores.json"
    if p.is_file():
        run.layer_scores = _try(run, "layer attribution", lambda: read_json(p, "layer scores"))
    else:
        run.skip("layer attribution", f"no {p.relative_to(run_dir)}")
    p = run_dir / "attribute" / "features.csv"
    if p.is_file():
        run.features = _try(run, "feature attribution",
                            lambda: list(csv.DictReader(p.read_text(encoding="utf-8").splitlines()))) or []
    elif run.layer_scores is not None:
        run.skip("feature attribution", "no attribute/features.csv (attribution ran without SAEs)")
    p = run_dir / "train.yaml"
    if p.is_file():
        run.train_cfg = _try(run, "layer selection", lambda: yaml.safe_load(p.read_text(encoding="utf-8")))
    else:
        run.skip("layer selection", "no train.yaml")
    for d in (run_dir / "ablation", run_dir):
        if (d / "results.json").is_file():
            run.ablation_dir = d
            run.ablation = _try(run, "ablation", lambda d=d: read_json(d / "results.json", "ablation results"))
            break
    else:
        run.skip("ablation", "no ablation/results.json")
    if run.ablation_dir is not None and (run.ablation_dir / "arms").is_dir():
        for arm_dir in _arm_dirs(run.ablation_dir):
            if (arm_dir / "config.yaml").is_file():
                run.arm_cfgs[arm_dir.name] = _try(run, f"training config of {arm_dir.name}",
                                                  lambda a=arm_dir: yaml.safe_load((a / "config.yaml").read_text(
                                                      encoding="utf-8"))) or {}
            if (arm_dir / "train_log.jsonl").is_file():
                hist = _try(run, f"training log of {arm_dir.name}", lambda a=arm_dir: read_jsonl(a / "train_log.jsonl"))
                if hist:
                    run.logs[arm_dir.name] = hist
            if (arm_dir / "expert_utilisation.json").is_file():
                data = _try(run, f"expert utilisation of {arm_dir.name}",
                            lambda a=arm_dir: read_json(a / "expert_utilisation.json", "expert utilisation"))
                if data is not None:
                    run.experts[arm_dir.name] = data
    elif run.ablation is not None:
        run.skip("training curves", "no ablation/arms/*/train_log.jsonl")
    return run


def _mode_sentence(run: _Run) -> str:
    """Which CPU mode computed the run (``determinism`` of its base evaluation, else of its first trained
    arm), as a sentence; empty for runs that did not record it."""
    state = None
    if run.ablation_dir is not None:
        for p in [*sorted(run.ablation_dir.glob("base-s*/metrics.json")), *sorted(run.ablation_dir.glob(
                "arms/*/metrics.json"))]:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(p.read_text(encoding="utf-8")).get("determinism")
            if state:
                break
    if not state:
        return ""
    if state.get("mode") == "deterministic":
        return (f"Computed in deterministic CPU mode (ATen {state.get('aten_cpu_capability')} kernels, MKL_CBWR="
                f"{(state.get('env') or {}).get('MKL_CBWR')}, fixed threads): the same seed gives these numbers "
                "on any x86-64 CPU with AVX2. ")
    return "Computed in the default CPU mode: on another CPU the same seed can give other numbers. "


# ---------------------------------------------------------------- headlines

def _selected_layers(run: _Run) -> list[int]:
    if run.train_cfg and run.train_cfg.get("layers"):
        return [int(x) for x in run.train_cfg["layers"]]
    if run.ablation:
        sel = next((r for r in run.ablation.get("summary", []) if r["arm"] == "selected"), None)
        if sel:
            return list(sel["layers"])
    return []


def _sae_headline(payload: dict) -> str:
    rows = [r for r in payload.get("rows", []) if r.get("r2") is not None]
    if not rows:
        return "The SAE check has no R² values."
    thr = payload.get("options", {}).get("threshold")
    lo = min(rows, key=lambda r: r["r2"])
    hi = max(rows, key=lambda r: r["r2"])
    from mechmed.figures import TEXT_SET_LABELS

    names = [TEXT_SET_LABELS.get(t, t) for t in dict.fromkeys(r["text_set"] for r in rows)]
    sets = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    n_layers = len({r["layer"] for r in rows})
    passed = sum(bool(r.get("exceeds_threshold")) for r in rows)
    text = (f"The SAEs reconstruct the residual stream with R² from {lo['r2']:.4f} (layer {lo['layer']}, "
            f"{lo['text_set']}) to {hi['r2']:.4f} (layer {hi['layer']}, {hi['text_set']}) over {n_layers} layers "
            f"and {sets} prompts")
    if thr is not None:
        text += f"; {passed} of {len(rows)} layer × text-set rows are shown to be above R² = {thr:g} (one-sided t test)"
    text += "."
    md = [r["massive_dims"] for r in rows if r.get("massive_dims") and r["massive_dims"].get("r2_without") is not None]
    if md:  # does a handful of high-variance dimensions carry it?
        k = md[0]["k"]
        share = [m["variance_share"] for m in md]
        without = [m["r2_without"] for m in md]
        std = [m["r2_standardised"] for m in md]
        text += (f" The top {k} residual dimensions carry {min(share):.3f}–{max(share):.3f} of the variance; pooled "
                 f"R² without them is {min(without):.4f}–{max(without):.4f}, and with every dimension standardised "
                 f"{min(std):.4f}–{max(std):.4f} (sae_check/r2_by_layer draws these and R² by token type).")
    return text


def _profile_key(scores: dict, train_cfg: dict | None) -> str:
    """The score the layer profile draws: the one the window was chosen on, else attribution on
    flipped pairs (on all pairs when none flipped)."""
    table = scores.get("scores", {})
    chosen_on = ((train_cfg or {}).get("provenance") or {}).get("score_key")
    if chosen_on in table and any(v is not None for v in table[chosen_on]["mean"]):
        return chosen_on
    return "attr_flipped" if scores.get("n_flipped") else "attr_all"


def _attr_headline(scores: dict, selected: list[int], key: str = "attr_flipped") -> str:
    """What the layer profile under it shows: where its score ``key`` peaks."""
    from mechmed.figures import SCORE_LABELS

    n_f, n = scores.get("n_flipped"), scores.get("n_pairs")
    which = {"train": " training", "eval": " held-out", "test": " held-out"}.get(scores.get("split"), "")
    table = scores["scores"]
    s = table.get(key) or {"mean": [], "ci": []}
    means = s["mean"]
    ok = [i for i, v in enumerate(means) if v is not None]
    if not ok:
        return f"{n_f} of {n} attributed{which} pairs flipped, too few to score layers."
    peak = max(ok, key=lambda i: means[i])
    text = (f"{n_f} of {n} attributed{which} pairs flipped; the {SCORE_LABELS.get(key, key)} peaks at layer {peak} "
            f"({means[peak]:.2f} {fmt_ci(s['ci'][peak], 2)} logits")
    stable = table.get("attr_stable", {}).get("mean") or []
    if key == "attr_flipped" and peak < len(stable) and stable[peak] is not None:
        text += f", against {stable[peak]:.2f} on stable pairs"
    text += ")"
    rho, null = scores.get("spearman_gain_patch"), scores.get("spearman_index_patch")
    if rho is not None and null is not None:
        how = "alike" if rho >= 0.8 else "similarly" if rho >= 0.5 else "differently"
        text += (f"; the gain and exact patching's gain (what enters at each layer) rank the layers {how} "
                 f"(Spearman ρ = {rho:.2f}; layer index alone: ρ = {null:.2f})")
    if selected:
        text += f". The selected window is {layers_phrase(selected)}"
    return text + "."


def _selection_headline(cfg: dict) -> str:

    prov = cfg.get("provenance") or {}
    text = f"select-layers chose {layers_phrase(cfg.get('layers') or [])}"
    details = []
    if prov.get("strategy"):
        details.append(f"strategy {prov['strategy']}")
    for k, v in (prov.get("params") or {}).items():
        details.append(f"{k} {v}")
    if isinstance(prov.get("score"), (int, float)):
        details.append(f"summed score {prov['score']:.3g}")
    if details:
        text += " (" + ", ".join(details) + ")"
    from mechmed.figures import METHOD_LABELS

    method = cfg.get("method", "lora")
    text += f" for {METHOD_LABELS.get(method, method)} training"
    return text + "." + _uncertainty_sentence(prov.get("uncertainty"))


def _uncertainty_sentence(unc: dict | None) -> str:
    """How often the chosen selection wins when the attributed questions are resampled, and the runner-up
    when it is a near-tie."""
    if not unc:
        return ""
    from mechmed.selection import P_BEST_THRESHOLD, SelectionUncertainty

    u = SelectionUncertainty.from_dict(unc)
    text = (f" Resampling the {u.n_questions} attributed questions {u.n_bootstrap} times, it comes out in "
            f"{u.p_chosen:.0%} of them")
    r = u.runner_up()
    if u.near_tie(unc.get("p_best_threshold", P_BEST_THRESHOLD)) and r is not None:
        text += (f": a near-tie with {layers_phrase(r['layers'])} ({r['p_best']:.0%}; summed score "
                 f"{r['score']:.3g} {fmt_ci(r['ci'], 3)} against "
                 f"{next(c['score'] for c in u.candidates if tuple(c['layers']) == u.chosen):.3g}), which the "
                 "data do not decide")
    return text + "."


def layers_phrase(layers) -> str:
    """``[3, 4, 5]`` → ``"layers 3–5"``, ``[2]`` → ``"layer 2"``."""
    from mechmed.figures import layer_text

    return f"layer{'s' if len(layers) > 1 else ''} {layer_text(layers)}"


def _change(before: float, after: float) -> str:
    return "lowered" if after < before else "raised" if after > before else "left unchanged"


def signed_change(before: float, after: float) -> str:
    """``"−0.108, −45% relative"``: the signed difference and the relative change."""
    diff = after - before
    text = f"{diff:+.3f}".replace("-", "−")
    if before:
        text += f", {100 * diff / before:+.0f}% relative".replace("-", "−")
    return text


def _loss_name(train: dict, arm: str) -> str:
    name = CONSISTENCY_ONLY_LOSS if arm == "consistency_only" else train.get("consistency", "")
    return LOSS_LABELS.get(name, name)


#: How each consistency loss is named in sentences.
LOSS_LABELS = {"teacher_kl": "teacher_kl, a KL toward the original question's stop-gradient answer",
               "sym_kl": "sym_kl, the seed paper's symmetric KL", "js": "js, the Jensen-Shannon divergence",
               "margin_mse": "margin_mse, the squared margin difference"}


def _test_phrase(results: dict, plural: bool = False) -> str:
    """How the ablation's p-values were computed: exact McNemar tests, or, where every seed evaluated
    the same pairs (a fixed model and data set), paired bootstraps over pairs."""
    boot = any(r.get("test") == "pair bootstrap" for r in results.get("summary") or [])
    if boot:
        return ("paired bootstraps over pairs (each arm's flips averaged over its seeds, which shared the pairs)"
                if plural else "paired bootstrap over pairs (flips averaged over the seeds)")
    return "exact McNemar tests" if plural else "exact McNemar test"


def _verdict(what: str, base: dict, arm: dict, p_key: str = "p_vs_base") -> str:
    """"<what> lowered the <…> flip rate from A [CI] to B [CI] (−x, −y% relative; McNemar p = …)"."""
    test = arm.get("test", "McNemar")  # a pair bootstrap when the seeds shared their pairs
    p = f"{test} {fmt_p(arm.get(p_key))}"
    if arm.get(f"{p_key}_clustered") is not None:
        p += f"; McNemar clustered by question {fmt_p(arm[f'{p_key}_clustered'])}"
    if base["flip_rate"] == arm["flip_rate"]:
        return f"{what} left the flip rate at {_value_ci(arm, 'flip_rate', 'flip_ci')} ({p})"
    return (f"{what} {_change(base['flip_rate'], arm['flip_rate'])} the flip rate from "
            f"{_value_ci(base, 'flip_rate', 'flip_ci')} to {_value_ci(arm, 'flip_rate', 'flip_ci')} "
            f"({signed_change(base['flip_rate'], arm['flip_rate'])}; {p})")


def _per_seed(results: dict, arm: str, method: str) -> dict:
    return {r["seed"]: r for r in results.get("rows") or [] if r["arm"] == arm and r["method"] == method}


def _ablation_headlines(results: dict) -> list[str]:
    from mechmed import figures as F
    from mechmed.figures import METHOD_LABELS, layer_text, trained_methods

    summary = results.get("summary") or results.get("rows") or []
    base = results.get("base") or next((r for r in summary if r["arm"] == "base"), None)
    train = (results.get("config") or {}).get("train") or {}
    out = []
    for method in trained_methods(summary):
        label = METHOD_LABELS.get(method, method)
        rows = {r["arm"]: r for r in summary if r["method"] == method}
        sel = rows.get("selected")
        seeds = (sel or {}).get("n_seeds")
        seed_text = f", pooled over {seeds} seeds" if seeds and seeds > 1 else ""
        weight = train.get("consistency_weight", 1)
        loss = (f"CE + {'' if weight == 1 else f'{weight:g} × '}{_loss_name(train, 'selected')}" if weight
                else "CE only")
        if sel and base:
            text = (_verdict(f"Training the selected {layers_phrase(sel['layers'])} ({label}{seed_text}; {loss})",
                             base, sel) + " on the held-out meaning-preserving pairs")
            per_seed, base_seed = _per_seed(results, "selected", method), _per_seed(results, "base", "none")
            if len(per_seed) > 1:
                text += "; per seed " + ", ".join(
                    f"{base_seed[s]['flip_rate']:.3f} → {r['flip_rate']:.3f}" for s, r in sorted(per_seed.items())
                    if s in base_seed)
            out.append(text + f". Mean |Δmargin| went from {_value_ci(base, 'margin_diff', 'margin_diff_ci', 2)} to "
                       f"{_value_ci(sel, 'margin_diff', 'margin_diff_ci', 2)} logits and canonical accuracy from "
                       f"{_value_ci(base, 'canonical_accuracy', 'accuracy_ci')} to "
                       f"{_value_ci(sel, 'canonical_accuracy', 'accuracy_ci')}.")
        ce, cons = rows.get("ce_only"), rows.get("consistency_only")
        if ce and sel:
            out.append(_verdict(f"Against CE-only training of the same layers, adding the consistency term "
                                f"({_loss_name(train, 'selected')})", ce, sel, "p_vs_ce_only") + ".")
        ranges = [rows[a] for a in RANGE_ARMS if a in rows]
        if len(ranges) > 1:
            best_f = min(ranges, key=lambda r: r["flip_rate"])
            best_m = min(ranges, key=lambda r: r["margin_diff"])

            def name(r):
                return f"{F.ARM_LABELS.get(r['arm'], r['arm'])} range ({layers_phrase(r['layers'])})"

            text = (f"Among the layer ranges ({label}), the {name(best_f)} had the lowest flip rate, "
                    f"{_value_ci(best_f, 'flip_rate', 'flip_ci')}")
            text += (", and also the lowest mean |Δmargin|" if best_m is best_f else
                     f"; the {name(best_m)} had the lowest mean |Δmargin|, "
                     f"{_value_ci(best_m, 'margin_diff', 'margin_diff_ci', 2)} logits")
            out.append(text + ".")
        repeats = [a for a in RANGE_ARMS if a in rows and F.same_as_selected(a, list(rows.values()))]
        if repeats and sel:
            many = len(repeats) > 1
            out.append(f"The {' and '.join(repeats)} range{'s are' if many else ' is'} the selected layers "
                       f"{layer_text(sel['layers'])} themselves ({label}), so {'those rows repeat' if many else 'its row repeats'} "
                       "the selected arm; only the other ranges test whether the selection matters.")
        if cons:
            seeds = _per_seed(results, "consistency_only", method)
            what = f"Consistency-only training ({_loss_name(train, 'consistency_only')}; no cross-entropy)"
            if len(seeds) > 1:
                fell = [f"{s} (yes-rate {r['yes_rate']:.2f})" for s, r in sorted(seeds.items()) if r.get("collapsed")]
                held = [str(s) for s, r in sorted(seeds.items()) if not r.get("collapsed")]
                parts = ([f"collapsed in seed{'s' if len(fell) > 1 else ''} {', '.join(fell)}"] if fell else []) + \
                        ([f"did not collapse in seed{'s' if len(held) > 1 else ''} {', '.join(held)}"] if held else [])
                state = " and ".join(parts)
            else:
                state = "collapsed" if cons.get("collapsed") else "did not collapse"
            out.append(f"{what} {state} (held-out yes-rate {fmt(cons.get('yes_rate'), 2)}, canonical accuracy "
                       f"{_value_ci(cons, 'canonical_accuracy', 'accuracy_ci')}, flip rate "
                       f"{_value_ci(cons, 'flip_rate', 'flip_ci')}).")
        if sel and base and sel.get("sets"):
            parts = []
            for name, st in sel["sets"].items():
                b = (base.get("sets") or {}).get(name)
                if b:
                    parts.append(f"on the {F.SET_LABELS.get(name, name)} from {_value_ci(b, 'flip_rate', 'flip_ci')} "
                                 f"to {_value_ci(st, 'flip_rate', 'flip_ci')} ({signed_change(b['flip_rate'], st['flip_rate'])}; "
                                 f"{sel.get('test', 'McNemar')} {fmt_p(st.get('p_vs_base'))})")
            if parts:
                out.append(f"Beside the main set, training the selected layers ({label}) moved the flip rate "
                           + "; ".join(parts) + ".")
    out += _training_free_headlines(results)
    collapsed = [f"{r['arm']} ({r['method']})" for r in summary if r.get("collapsed") and r["arm"] != "consistency_only"]
    if collapsed:
        out.append("The collapse guard fired for " + ", ".join(collapsed) + ".")
    return out


#: How each training-free arm works, for the report's sentences.
TRAINING_FREE_TEXT = {
    "clamp": "Clamping the top {n} attributed SAE features of the selected layers {to}",
    "steer": "Adding the steering vector (the mean original − paraphrase residual over the training pairs) to "
             "the paraphrase",
    "ensemble": "Prompt ensembling (each answer the mean margin over up to {k} phrasings of its question, the "
                "two sides of a pair sharing none)",
}
#: What each training-free arm needs at inference that a deployed model does not have.
NEEDS = {
    "clamp": lambda cfg: ("It reads the original phrasing's features at inference: a bound on a fix at these "
                          "features, not a deployable one" if cfg.get("clamp_to", "original") == "original" else None),
    "steer": lambda cfg: "It needs to know which prompt is the rewording of a canonical question",
    "ensemble": lambda cfg: ("Its rewordings are the evaluated set's own (an oracle paraphraser); deployed, it needs "
                             "a paraphraser"),
}


def _training_free_headlines(results: dict) -> list[str]:
    """Sentences on activation consistency against the output-level loss, on each training-free arm
    (its flip rate against the base and the best trained arm, and what it cost in accuracy), and on
    how the selected arm and the fixes moved pairs between consistency × image reliance."""
    from mechmed.config import TRAINING_FREE_ARMS
    from mechmed.figures import ARM_LABELS, METHOD_LABELS

    summary = results.get("summary") or []
    base = results.get("base") or next((r for r in summary if r["arm"] == "base"), None)
    if base is None:
        return []
    cfg = results.get("config") or {}
    train = cfg.get("train") or {}
    out = []
    for method in dict.fromkeys(r["method"] for r in summary if r["arm"] == "act"):
        rows = {r["arm"]: r for r in summary if r["method"] == method}
        act, sel = rows["act"], rows.get("selected")
        text = _verdict(f"Activation consistency at the selected {layers_phrase(act['layers'])} "
                        f"({METHOD_LABELS.get(method, method)}; CE + the residual L2 at the answer position)", base, act)
        if sel:
            text += (f"; the output-level loss ({_loss_name(train, 'selected')}) on the same layers reached "
                     f"{_value_ci(sel, 'flip_rate', 'flip_ci')}; canonical accuracy "
                     f"{_value_ci(act, 'canonical_accuracy', 'accuracy_ci')} against "
                     f"{_value_ci(sel, 'canonical_accuracy', 'accuracy_ci')}")
        out.append(text + ".")
    best_name = results.get("best_trained")
    best = next((x for x in summary if f"{x['arm']}-{x['method']}" == best_name), None)
    for arm in TRAINING_FREE_ARMS:
        r = next((x for x in summary if x["arm"] == arm), None)
        if r is None:
            continue
        how = TRAINING_FREE_TEXT[arm].format(
            n=cfg.get("clamp_features", 4), k=cfg.get("ensemble_k", 3),
            to="to their value on the original question, in the paraphrase" if cfg.get("clamp_to", "original")
            == "original" else "to zero, in every prompt")
        text = _verdict(how + ", without training,", base, r)
        if r["canonical_accuracy"] == base["canonical_accuracy"]:
            text += f"; canonical accuracy stayed {fmt(base['canonical_accuracy'])}"
        else:
            text += (f"; canonical accuracy went from {fmt(base['canonical_accuracy'])} to "
                     f"{_value_ci(r, 'canonical_accuracy', 'accuracy_ci')} "
                     f"({signed_change(base['canonical_accuracy'], r['canonical_accuracy'])})")
        if best and r.get("p_vs_best_trained") is not None:
            side = "lower than" if r["flip_rate"] < best["flip_rate"] else "higher than" \
                if r["flip_rate"] > best["flip_rate"] else "equal to"
            text += (f"; {side} the best trained arm ({ARM_LABELS.get(best['arm'], best['arm'])}, "
                     f"{fmt(best['flip_rate'])}, chosen as the lowest on these pairs; {r.get('test', 'McNemar')} "
                     f"{fmt_p(r['p_vs_best_trained'])})")
        need = NEEDS[arm](cfg)
        out.append(text + "." + (f" {need}." if need else "") + (f" {null_sentence(r['null'])}" if r.get("null")
                                                                else ""))
    out += _quadrant_headline(summary, base)
    return out


def null_sentence(null: dict) -> str:
    """What a training-free arm did against its matched null (:mod:`mechmed.nulls`), in one sentence."""
    if null.get("skipped"):
        return f"Its matched null was not drawn: {null['skipped']}."
    r, net = null["reversed"], null["net"]
    seeds = f", {len(null['seeds'])} seeds summed" if null.get("seeds") else ""
    beat = ("more than any draw" if r["arm"] > r["best"] else "as many as the best draw" if r["arm"] == r["best"]
            else "fewer than the best draw")
    return (f"Against {null['draws']} matched null edits ({null['null']}{seeds}) it reversed {r['arm']} of "
            f"{null['n_base_flips']} base flips, {beat}: the draws reversed {r['mean']:.2f} on average and {r['best']} "
            f"at best (permutation {fmt_p(r['p'])}); net of the {null['new_flips']['arm']} new flips it made, "
            f"{net['arm']:+d} against the draws' {net['mean']:+.2f} (best {net['best']:+d}; {fmt_p(net['p'])})"
            + (f"; with each draw's change rescaled to the clamp's at every prompt and layer, the draws reversed "
               f"{null['scaled']['reversed']['mean']:.2f} on average and {null['scaled']['reversed']['best']} at best "
               f"({fmt_p(null['scaled']['reversed']['p'])})" if null.get("scaled") else "") + ".")


def _quadrant_headline(summary: list[dict], base: dict) -> list[str]:
    """How the selected arm, and the arm whose gain in consistency leaned most on answers that are not
    image-reliant (the largest rise of the consistent, not image-reliant share over that of the
    consistent, image-reliant one), moved those two shares."""
    from mechmed.figures import ARM_LABELS

    if not base.get("quadrants"):
        return []
    arms = [r for r in summary if r["arm"] != "base" and r.get("quadrants") and not r.get("collapsed")]
    sel = next((r for r in arms if r["arm"] == "selected"), None)
    bq = base["quadrants"]

    def leaning(r):
        q = r["quadrants"]
        return ((q["consistent_blind"]["share"] - bq["consistent_blind"]["share"])
                - (q["consistent_reliant"]["share"] - bq["consistent_reliant"]["share"]))

    blind = max(arms, key=leaning, default=None)

    def move(r):
        # a question's pairs share its image reliance: the test is clustered by question (results
        # written before it existed have the pair-level one only)
        q = r["quadrants"]
        clustered = q.get("p_vs_base_clustered") is not None
        ps = q.get("p_vs_base_clustered") or q.get("p_vs_base") or {}
        test = "McNemar clustered by question" if clustered else r.get("test", "McNemar")

        def cell(name, words):
            p = f" ({test} {fmt_p(ps[name])})" if ps.get(name) is not None else ""
            return f"{words} {fmt(bq[name]['share'])} → {_value_ci(q[name], 'share', 'ci')}{p}"

        return (cell("consistent_reliant", "consistent and image-reliant") + ", "
                + cell("consistent_blind", "consistent and not image-reliant"))

    parts = []
    for r in [x for i, x in enumerate((sel, blind)) if x is not None and (i == 0 or x is not sel)]:
        parts.append(f"{ARM_LABELS.get(r['arm'], r['arm'])}: {move(r)}")
    if not parts:
        return []
    from mechmed.consistency import RELIANCE_WORDS, quadrant_definition

    return [f"Image reliance (a pair is image-reliant when {RELIANCE_WORDS[quadrant_definition(bq)]}), shares of "
            "the held-out pairs against the base's: " + "; ".join(parts) + "."]


def _risk_rows(results: dict) -> list[dict]:
    """The rows of the results table (the base model's and every arm's, one per seed) that carry
    ``flip_risk``."""
    return [r for r in results.get("rows") or [] if r.get("flip_risk")]


def flip_risk_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per arm (and seed): how well |margin| on the original question foresees which pairs flip (AUROC,
    95% interval by question), the calibration of P(yes) (ECE) and the coverage at the evaluation's risk."""
    rows = _risk_rows(results)
    if not rows:
        return None
    risk = rows[0]["flip_risk"]["coverage"]["risk"]
    seeds = len({r.get("seed") for r in rows if r["arm"] != "base"}) > 1
    cols = ["arm", *(["seed"] if seeds else []), "flips", "AUROC of |margin| [95% CI]", "ECE",
            f"coverage at {risk:.0%} risk"]
    body = []
    for r in rows:
        f = r["flip_risk"]
        body.append([r["arm"] + (f" ({r['method']})" if r.get("method") not in (None, "none", "lora") else ""),
                     *([str(r.get("seed", ""))] if seeds else []), f"{f['n_flips']}/{f['n_pairs']}",
                     _value_ci(f, "auroc_margin", "auroc_margin_ci"), fmt(f["ece"]), fmt(f["coverage"]["coverage"])])
    return cols, body


def flip_risk_text(results: dict) -> str:
    """What the flip-risk table says, with the base model's numbers in the sentence."""
    rows = _risk_rows(results)
    base = next((r["flip_risk"] for r in rows if r["arm"] == "base"), None)
    lead = ("A flip is foreseeable when the original question's answer is already unsure: the AUROC says how "
            "well a small |margin| on the original question ranks the pairs that flip above those that do not "
            "(0.5: no better than chance; over the two answer tokens the predictive entropy ranks them the same "
            "way). ECE is the calibration of P(yes) on the canonical questions; coverage is the share of "
            "canonical questions a user could answer, most confident first, at that error rate.")
    if base and base["auroc_margin"] is not None:
        lo, hi = base["auroc_margin_ci"]
        lead += (f" The base model's flips are foreseen at AUROC {fmt(base['auroc_margin'])} "
                 f"[{fmt(lo)}, {fmt(hi)}]; an arm whose AUROC drops flips where its answers looked sure.")
    return lead


def _reliance_words(summary: list[dict]) -> str:
    """What "image-reliant" means in the summary's quadrants."""
    from mechmed.consistency import RELIANCE_WORDS, quadrant_definition

    q = next(r["quadrants"] for r in summary if r.get("quadrants"))
    return "image-reliant: " + RELIANCE_WORDS[quadrant_definition(q)]


def reliance_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """(columns, cells): per summary row, the share of held-out pairs that are image-reliant under the
    counterfactual and the gray-image definitions, the label's gain in predicting each, and how often
    they agree."""
    from mechmed.figures import arm_label

    summary = [r for r in results.get("summary") or [] if r.get("image_reliance")]
    if not summary:
        return None
    body = []
    for r in summary:
        ir = r["image_reliance"]
        gain = ir.get("label_gain") or {}
        body.append([arm_label(r, summary), str(ir["n_pairs"]), fmt(ir["counterfactual"]), fmt(ir["gray"]),
                     fmt(gain.get("counterfactual")), fmt(gain.get("gray")), fmt(ir["agreement"])])
    return ["arm", "pairs", "reliant: counterfactual", "reliant: gray image", "label's gain: counterfactual",
            "label's gain: gray image", "agreement"], body


def reliance_text(results: dict) -> str:
    """What the two-definitions table says, with the base model's numbers in the sentence."""
    from mechmed.consistency import RELIANCE_WORDS

    base = next((r["image_reliance"] for r in results.get("summary") or []
                 if r["arm"] == "base" and r.get("image_reliance")), None)
    lead = (f"A pair is image-reliant under the counterfactual definition when {RELIANCE_WORDS['counterfactual']}, "
            f"and under the gray-image definition when {RELIANCE_WORDS['gray']}. A gray image draws one answer per question (per finding), so the gray definition mostly "
            "asks whether the label differs from that answer. The label's gain says how much better the expected "
            "answer and the question together predict whether a pair is reliant than the question alone: near 0, "
            "reliance is not the label; large, it mostly is.")
    if base is None or not base.get("label_gain"):
        return lead
    gain = base["label_gain"]
    return lead + (f" For the base model the label adds {fmt(gain['counterfactual'])} to the counterfactual "
                   f"definition and {fmt(gain['gray'])} to the gray one, and the two definitions agree on "
                   f"{fmt(base['agreement'])} of pairs.")


def quadrant_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """(columns, cells): per summary row, the share of held-out pairs in each cell of consistency ×
    image reliance with its Wilson 95% interval, and the near-tie flips; None without an image-reliance
    control."""
    from mechmed.consistency import QUADRANTS
    from mechmed.figures import QUADRANT_LABELS, arm_label

    summary = [r for r in results.get("summary") or [] if r.get("quadrants")]
    if not summary:
        return None
    body = []
    for r in summary:
        q = r["quadrants"]
        body.append([arm_label(r, summary), str(q["n_pairs"]),
                     *(f"{fmt(q[k]['share'])} {fmt_ci(q[k]['ci'])}" for k in QUADRANTS),
                     fmt(r.get("near_tie_flip_rate"))])
    return ["arm", "pairs", *(QUADRANT_LABELS[k] for k in QUADRANTS), "near-tie flips (share of pairs)"], body


# ---------------------------------------------------------------- building

@dataclass
class _Section:
    key: str
    title: str
    text: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    """(name, figure, caption)"""
    table: str | None = None
    blocks: list = field(default_factory=list)
    """(heading, text, HTML, Markdown) after the figures"""


def _sections(run: _Run, out_dir: Path) -> list[_Section]:
    from mechmed import figures as F

    selected = _selected_layers(run)
    out = []

    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as e:  # one bad figure must not lose the report
            run.skip(what, f"could not be drawn ({(str(e).splitlines() or [type(e).__name__])[0]})")
            log.warning("report: %s failed", what, exc_info=True)
            return None

    def figure(sec, name: str, what: str, draw, caption: str) -> None:
        fig = attempt(what, draw)
        if fig is not None:
            sec.figures.append((name, fig, caption))

    if run.sae_check is not None:
        sec = _Section("sae_check", "Do the SAEs reconstruct the model?")
        sec.text.append(attempt("SAE headline", lambda: _sae_headline(run.sae_check)) or "")
        figure(sec, "r2_by_layer", "R² figure",
               lambda: F.r2_by_layer(run.sae_check.get("rows", []), run.sae_check.get("options", {}).get("threshold", 0.95)),
               "Mean R² per layer and text set with 95% CIs; look for every point above the dashed threshold "
               "(filled markers pass the test).")
        out.append(sec)
    if run.layer_scores is not None:
        sec = _Section("attribute", "Which layers carry the flips?")
        # the figure draws the score the window was chosen on, so the window sits on its peak; the
        # sentence above it names the peak of that same score
        key = _profile_key(run.layer_scores, run.train_cfg)
        sec.text.append(attempt("attribution headline", lambda: _attr_headline(run.layer_scores, selected, key)) or "")
        grey = key == "attr_flipped" and "attr_stable" in run.layer_scores.get("scores", {})
        figure(sec, "layer_profile", "layer profile",
               lambda: F.layer_profile(run.layer_scores, window=selected or None, key=key),
               f"Blue bars: the {F.SCORE_LABELS.get(key, key)}"
               + (" (grey: the same on stable pairs)" if grey else "")
               + "; the orange line is exact patching. The shaded band is the window chosen for training: it "
               "should sit where the blue bars peak" + (" and rise above grey." if grey else "."))
        if run.features:
            labelled = any(r.get("label") for r in run.features)
            figure(sec, "feature_heatmap", "feature heatmap", lambda: F.feature_heatmap(run.features),
                   "The SAE features with the largest attribution on flipped pairs, per layer"
                   + (", each with its label from the SAEs' explanations" if labelled else "")
                   + "; strongly coloured cells name the features worth inspecting.")
        out.append(sec)
    if run.train_cfg is not None:
        sec = _Section("select", "The selected layers")
        sec.text.append(attempt("selection headline", lambda: _selection_headline(run.train_cfg)) or "")
        out.append(sec)
    if run.ablation is not None:
        sec = _Section("ablation", "Does training those layers fix the flips?")
        sec.text += attempt("ablation headlines", lambda: _ablation_headlines(run.ablation)) or []
        summary = run.ablation.get("summary") or run.ablation.get("rows") or []
        base = run.ablation.get("base")
        sec.table = attempt("summary table", lambda: _html_table(run.ablation))
        figure(sec, "flip_by_arm", "flip-rate figure", lambda: F.flip_by_arm(summary, base),
               "Flip rate and mean |Δmargin| after training each arm; bars below the dashed base line (outside its "
               "grey CI band) are real improvements.")
        if any(r.get("by_phenomenon") for r in summary):
            figure(sec, "flip_heatmap", "phenomenon figure", lambda: F.flip_heatmap(summary),
                   "Flip rate of the base model (top row) and of each trained arm, by phenomenon of the held-out "
                   "pairs (left of the line) and on the sets reported beside them (right: wrappers never "
                   "fine-tuned, and answer-inverting negations). Read each column down from the base row: "
                   "lighter cells mean fewer flips.")
        figure(sec, "tradeoff", "trade-off figure", lambda: F.tradeoff(summary, base),
               "Each arm's accuracy against its flip rate: arms up and to the left of the base star reduce flips "
               "without costing accuracy.")
        if any(r.get("quadrants") for r in summary):
            figure(sec, "quadrants", "quadrant figure", lambda: F.quadrant_bars(summary),
                   "Each bar splits the held-out pairs of one arm into consistent or flipped × image-reliant or not ("
                   + _reliance_words(summary) + "). Green growing means fewer flips with the answer still "
                   "following the image; yellow growing means pairs made consistent by an answer the image "
                   "does not move.")
        quads = attempt("quadrant table", lambda: quadrant_table(run.ablation))
        if quads:
            clustered = all(r["quadrants"].get("clustered") for r in run.ablation.get("summary") or []
                            if r.get("quadrants"))  # results written before the intervals were clustered: not
            how = ("clustered by question (pooled over seeds; a question's pairs share its image reliance)"
                   if clustered else "(pooled over seeds)")
            sec.blocks.append(("Consistency × image reliance",
                               f"Shares of the held-out pairs in each cell ({_reliance_words(run.ablation['summary'])}), with Wilson "
                               f"95% intervals {how}; near-tie "
                               "flips are flips whose two margins are both within "
                               f"{NEAR_TIE} logits of 0 (the evaluation's default).", _html_grid(*quads), _md_grid(*quads)))
        both = attempt("reliance table", lambda: reliance_table(run.ablation))
        if both:
            sec.blocks.append(("Two definitions of image reliance", reliance_text(run.ablation),
                               _html_grid(*both), _md_grid(*both)))
        risk = attempt("flip-risk table", lambda: flip_risk_table(run.ablation))
        if risk:
            sec.blocks.append(("Can the flips be foreseen?", flip_risk_text(run.ablation), _html_grid(*risk),
                               _md_grid(*risk)))
        table = attempt("phenomenon table", lambda: phenomenon_table(run.ablation))
        if table:
            sec.blocks.append(("Flip rate by phenomenon",
                               "The held-out flip rate of each phenomenon (and of each set reported beside the main "
                               "one) with its number of pairs, for the base model and every arm; p is the "
                               + _test_phrase(run.ablation) + " of the selected arm against the base on those pairs.",
                               _html_grid(*table), _md_grid(*table)))
        examples = attempt("example pairs", lambda: example_pairs(run.ablation_dir, run.ablation))
        if examples:
            blocks = attempt("example pairs", lambda: _examples_block(examples, out_dir))
            if blocks:
                sec.blocks.append(("Example flipped pairs",
                                   "Held-out pairs whose answer the base model flips (one per question where there are enough, largest "
                                   "|Δmargin| first), with "
                                   "the yes−no margin of each phrasing (positive: yes) before training and after "
                                   "training the selected layers.", *blocks))
        out.append(sec)
    audit = (run.ablation or {}).get("audit")
    if audit:
        sec = _Section("audit", "Is the selected window where training helps?")
        sec.text.append(attempt("audit headline", lambda: audit_text(audit)) or "")
        figure(sec, "selection_audit", "selection-audit figure", lambda: F.audit_scatter(audit),
               "Each point is one layer set of the selected width, trained with the selected arm's loss, data and "
               "steps: across, what the attribution predicted for it; up, how much of the flip rate its training "
               "removed (base − trained, in points of the flip rate; 95% CI by question). The star is the selected window; dashed lines are all "
               "layers at the window's parameter count and at its rank. If the score predicted where training "
               "helps, the points would rise to the right and the star would sit on top.")
        table = attempt("audit table", lambda: audit_table(audit))
        if table:
            sec.blocks.append(("Selection criteria", "The window each criterion picks from the attribution, and its "
                               "regret: the flip-rate reduction of the window that did best minus its own (0 is the "
                               "best window" + ("; mean over seeds" if len(audit["units"]) > 1 else "")
                               + "; 95% CI by question, paired against the window that did best on these same pairs, "
                               "so optimistic for it).", _html_grid(*table),
                               _md_grid(*table)))
        out.append(sec)
    if run.logs:
        train = (run.ablation or {}).get("config", {}).get("train", {})
        lo, hi = train.get("collapse_low", 0.05), train.get("collapse_high", 0.95)
        sec = _Section("training", "Training curves")
        sec.text.append("One panel per trained arm: the loss components (top) and the guard's held-out yes-rate "
                        "(bottom). A yes-rate entering a red band means the adapter answers one word for everything.")
        for name, hist in run.logs.items():
            cfg = run.arm_cfgs.get(name) or {}
            title, caption = _arm_title(name, cfg)
            weights = {k: cfg.get(f"{k}_weight") for k in ("ce", "consistency")}
            figure(sec, f"training_{name}", f"training curves of {name}",
                   lambda h=hist, t=title, w=weights: F.training_curves(h, collapse_low=lo, collapse_high=hi, title=t,
                                                                        weights=w), caption)
        out.append(sec)
    if run.experts:
        sec = _Section("experts", "Expert utilisation")
        for name, data in run.experts.items():
            figure(sec, f"experts_{name}", f"expert utilisation of {name}", lambda d=data: F.expert_heatmap(d),
                   f"Arm {name}: how often the router picks each expert; a flat profile means no expert is unused.")
        if sec.figures:
            out.append(sec)
    for i, sec in enumerate(out, start=1):
        sec.title = f"{i}. {sec.title}"
    return out


def audit_text(audit: dict) -> str:
    """The audit's verdict (:func:`mechmed.selection_audit.verdict`), led by how many layer sets it trained."""
    units = audit["units"]
    n = len(units[0]["candidates"]) if units else 0
    seeds = f" in each of {len(units)} seeds" if len(units) > 1 else ""
    return (f"The selection audit compared {n} layer sets{seeds}, each trained with the selected arm's loss, data "
            "and steps. "
            + audit["pooled"]["verdict"])


def audit_table(audit: dict) -> tuple[list, list] | None:
    """(header, rows) of the selection criteria: the window each picks per seed and its regret."""
    from mechmed.figures import layer_text

    crit = audit["pooled"].get("criteria") or {}
    if not crit:
        return None
    key = audit["pooled"].get("select_criterion") or audit["pooled"].get("select_key")
    header = ["criterion", "windows picked", "regret [95% CI]", "Spearman ρ of its score [95% CI]"]
    rows = []
    for name, c in sorted(crit.items(), key=lambda kv: kv[1]["regret"]):
        rho = audit["pooled"]["spearman"].get({"earliest": "layer_index"}.get(name, name))
        label = name + (" (the selection's)" if name == key else "")
        rows.append([label, ", ".join(layer_text(w) for w in c["windows"]),
                     f"{c['regret']:.3f} {fmt_ci(c['regret_ci'], 3)}",
                     f"{rho['rho']:+.2f} {fmt_ci(rho['ci'], 2)}" if rho else "–"])
    return header, rows


def _arm_title(name: str, cfg: dict) -> tuple[str, str]:
    """(figure title, caption) for one trained arm from its directory name and training config."""
    from mechmed.figures import ARM_LABELS, METHOD_LABELS, layer_text

    arm = (cfg.get("provenance") or {}).get("ablation_arm", name).rsplit("-", 2)[0]
    label = ARM_LABELS.get(arm, arm)
    method = METHOD_LABELS.get(cfg.get("method"), cfg.get("method") or "")
    layers = layer_text(cfg.get("layers") or [])
    bits = [b for b in (method, f"layers {layers}" if layers else "",
                        f"seed {cfg['seed']}" if cfg.get("seed") is not None else "") if b]
    title = f"Training: {label}" + (f" ({', '.join(bits)})" if bits else "")
    loss = []
    for key, what in (("ce_weight", "cross-entropy"), ("consistency_weight", "consistency")):
        if cfg.get(key) is not None:
            loss.append(f"{what} × {cfg[key]:g}")
    caption = f"Arm {name}" + (f": loss = {' + '.join(loss)}" if loss else "") + "."
    return title, caption


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}.headline li{margin:.4em 0}
figure{margin:1.5em 0}figcaption{color:#444;font-size:.92em;max-width:900px}
table.summary{border-collapse:collapse;font-size:.85em;margin:1em 0}
table.summary th,table.summary td{border:1px solid #ccc;padding:.25em .5em;text-align:left;white-space:nowrap}
table.summary th{background:#f3f3f3}.notes{color:#8a5a00}
"""


def _html(title: str, meta: str, headlines: list[str], sections: list[_Section], notes: list[str],
          files: dict | None = None) -> str:
    from plotly.offline import get_plotlyjs

    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>{_CSS}</style>", f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head><body>",
             f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(meta)}</p>']
    if headlines:
        parts.append('<h2>Key results</h2><ul class="headline">' + "".join(f"<li>{esc(h)}</li>" for h in headlines)
                     + "</ul>")
    for sec in sections:
        parts.append(f'<section id="{sec.key}"><h2>{esc(sec.title)}</h2>')
        parts += [f"<p>{esc(t)}</p>" for t in sec.text if t]
        if sec.table:
            parts.append(sec.table)
        for name, fig, caption in sec.figures:
            div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                              config={"displaylogo": False})
            f = (files or {}).get(name) or {}
            links = " ".join(f'<a href="{esc(f[k])}">{k.upper()}</a>' for k in ("png", "svg", "pdf") if f.get(k))
            parts.append(f'<figure id="{esc(name)}">{div}<figcaption>{esc(caption)}'
                         + (f' <span class="files">{links}</span>' if links else "") + "</figcaption></figure>")
        for heading, text, block, _ in sec.blocks:
            parts.append(f"<h3>{esc(heading)}</h3><p>{esc(text)}</p>{block}")
        parts.append("</section>")
    if notes:
        parts.append('<h2>Skipped</h2><ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _markdown(title: str, meta: str, headlines: list[str], sections: list[_Section], notes: list[str],
              files: dict, ablation: dict | None) -> str:
    lines = [f"# {title}", "", meta, ""]
    if any(not f.get("png") for f in files.values()):
        lines += ["**Figures:** no Chrome/Chromium was there to draw them as images, so each figure below is a "
                  "link to its interactive HTML, and report.html shows them all inline. Once a browser is "
                  "installed (`plotly_get_chrome`), `mechmed report RUN_DIR --figures` embeds them here "
                  "without rerunning anything.", ""]
    if headlines:
        lines += ["## Key results", ""] + [f"- {h}" for h in headlines] + [""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        extra = [t for t in sec.text if t and t not in headlines]
        if extra:
            lines += extra + [""]
        if sec.key == "ablation" and ablation is not None:
            lines += [_markdown_table(ablation), ""]
        for name, _, caption in sec.figures:
            f = files.get(name) or {}
            link = f.get("png") or f.get("html")
            if link:
                lines.append(f"![{name}]({link})" if f.get("png") else f"[{name}]({link})")
                other = [f"[{k.upper()}]({f[k]})" for k in ("svg", "pdf") if f.get(k)]
                lines += [f"*{caption}*" + (f" ({', '.join(other)})" if other else ""), ""]
        for heading, text, _, block in sec.blocks:
            lines += [f"### {heading}", "", text, "", block, ""]
    if notes:
        lines += ["## Skipped", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, png: bool = True,
                 title: str | None = None) -> dict:
    """Write ``report.html``, ``report.md`` and ``figures/`` into ``out`` (default ``run_dir``) from
    whatever parts of the run exist (see the module doc).

    Returns ``{"html", "md", "figures": {name: save_figure's result}, "headlines", "notes",
    "sections"}``. ``png=False`` writes the figures as HTML only (faster; no browser needed).
    """
    from contextlib import nullcontext

    from mechmed import __version__
    from mechmed.errors import MechmedError
    from mechmed.figures import png_session, save_figure
    from mechmed.io import ensure_dir, write_text

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MechmedError(f"report: run directory {run_dir} not found; give the --out of mechmed demo or ablate")
    out = ensure_dir(Path(out) if out is not None else run_dir)
    run = _load(run_dir)
    sections = _sections(run, out)
    headlines: list[str] = []
    for sec in sections:
        if sec.key in ("sae_check", "attribute", "ablation"):
            headlines += [t for t in sec.text if t]
    files: dict = {}
    with png_session() if png else nullcontext():
        for sec in sections:
            for name, fig, _ in sec.figures:
                try:
                    res = save_figure(fig, out / "figures" / name, png=png, shared_js=True, vector=png)
                except OSError as e:
                    run.skip(f"figure file {name}", f"not written ({e})")
                    continue
                files[name] = {k: (os.path.relpath(v, out) if k in ("html", "png", "svg", "pdf") and v else v)
                               for k, v in res.items()}
    title = title or f"mechmed report: {run_dir.resolve().name}"
    model = ((run.ablation or {}).get("config", {}).get("train", {}).get("model")
             or (run.train_cfg or {}).get("model") or (run.layer_scores or {}).get("model"))
    model = model.get("name") if isinstance(model, dict) else model  # a model with loading options
    meta = (f"Run directory {run_dir}" + (f"; model {model}" if model else "")
            + f"; mechmed {__version__}; written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. "
            + _mode_sentence(run) +
            f"Intervals are 95% CIs; p-values are {_test_phrase(run.ablation or {}, plural=True)} on the same "
            "held-out pairs, and, where marked “by question”, McNemar tests clustered by question (a question's "
            "pairs share its image and answer, so they are not independent).")
    html_path = write_text(out / "report.html", _html(title, meta, headlines, sections, run.notes, files))
    md_path = write_text(out / "report.md", _markdown(title, meta, headlines, sections, run.notes, files,
                                                      run.ablation))
    return {"html": str(html_path), "md": str(md_path), "figures": files, "headlines": headlines,
            "notes": list(run.notes), "sections": [s.key for s in sections]}

