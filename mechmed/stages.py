"""The command-level stages: each loads a model by name, runs one method on it and writes a run
directory with its figures (``mechmed evaluate``, ``attribute``, ``sae-check``, ``select-layers``).

The methods they call (:mod:`mechmed.consistency`, :mod:`mechmed.attribution`, :mod:`mechmed.fidelity`,
:mod:`mechmed.selection`) take a loaded model and pairs and return results; they never load a model
by name, write a run directory or draw. :mod:`mechmed.train`, :mod:`mechmed.ablate` and
:mod:`mechmed.pipeline` are the other stages.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechmed.attribution import attribute, delta_patch, feature_table, layer_scores
from mechmed.consistency import RISK, Evaluation, check_risk, evaluate, resolve_data
from mechmed.errors import MechmedError
from mechmed.fidelity import (
    ALPHA,
    RESULT_VERSION,
    default_texts,
    evaluate_saes,
    format_table,
    image_prompt_builder,
    parse_text_sets,
    prompt_set,
)
from mechmed.runtime import determinism_state, versions
from mechmed.selection import P_BEST_THRESHOLD, file_sha256, load_scores, score_vector, select

log = logging.getLogger(__name__)


def run_select_layers(scores: str | None = None, out: str = "runs/train.yaml", *, strategy: str = "window",
                      width: int = 5, k: int = 5, threshold: float | None = None, score: str = "gain_flipped",
                      method: str = "lora", model: str | None = None, data: str = "demo",
                      saes: str | None = "demo", attribute_out: str | None = None, seed: int = 0,
                      overrides: dict | None = None, device: str = "cpu", dtype: str | None = None,
                      p_best: float = P_BEST_THRESHOLD, n_bootstrap: int = 1000):
    """Select layers from a scores file (or compute it on ``device`` in ``dtype``), and write a training
    config YAML.

    How sure the selection is (:func:`mechmed.selection.selection_uncertainty`: the attributed questions
    resampled ``n_bootstrap`` times) goes into the config's provenance (``uncertainty``) and into the
    scores file (``selections``, one entry per strategy, parameters and score); a selection that comes
    out in fewer than ``p_best`` of the resamples is logged as a near-tie (None for scores that are not
    per-pair means). Returns (config, range)."""
    from mechmed import __version__
    from mechmed.config import TrainConfig
    from mechmed.sources import get, train_defaults

    if scores is None:
        attribute_out = attribute_out or str(Path(out).with_suffix("")) + "_attribution"
        run_attribute(model or "demo", data, saes, attribute_out, seed=seed, device=device, dtype=dtype)
        scores = str(Path(attribute_out) / "layer_scores.json")
    table = load_scores(scores)
    vec = score_vector(table, score, str(scores))
    chosen = select(vec, strategy, width=width, k=k, threshold=threshold)
    unc = record_uncertainty(table, scores, score, strategy, width=width, k=k, threshold=threshold,
                             n_bootstrap=n_bootstrap, seed=seed, p_best=p_best)
    model = model or table.get("model", "demo")
    base = train_defaults(model)
    provenance = {"scores_file": str(scores), "scores_sha256": file_sha256(scores), "score_key": score,
                  **chosen.to_dict(), "mechmed_version": __version__,
                  "uncertainty": None if unc is None else unc.to_dict()}
    # the prompts the attribution ran with are the prompts to train with
    fmt = (table.get("model_provenance") or {}).get("prompt_format") or {}
    template = {"prompt_template": fmt["template"]} if fmt.get("kind") == "custom" else {}
    cfg = TrainConfig.from_dict({**base, "model": model, "layers": list(chosen.layers), "method": method,
                                 "train_data": data, "eval_data": data, "seed": seed, **template,
                                 **(overrides or {}), "provenance": provenance}, source="select-layers")
    if cfg.train_data == cfg.eval_data and get(cfg.train_data) is None:  # a source splits its own
        log.warning("train_data and eval_data are both %s: pass --train-data (pairs of training phrasings) and "
                    "--eval-data (held-out phrasings) so training is judged on phrasings it never saw",
                    cfg.train_data)
    data_sources = {s.name for s in map(get, (cfg.train_data, cfg.eval_data)) if s is not None}
    if data_sources and get(cfg.model.name) is None:
        log.warning("model %s will train/evaluate on the pairs of %s: pass --train-data and --eval-data for this "
                    "model's data", cfg.model, ", ".join(sorted(data_sources)))
    cfg.save(out)
    return cfg, chosen


def record_uncertainty(table: dict, path, score: str, strategy: str, *, width: int, k: int,
                       threshold: float | None, n_bootstrap: int = 1000, seed: int = 0,
                       p_best: float = P_BEST_THRESHOLD):
    """:func:`mechmed.selection.selection_uncertainty` of a selection from the scores file ``path`` (its
    contents ``table``), written into that file's ``selections`` and returned; None (and nothing
    written) for a score that is not a mean over pairs. A near-tie is logged as one warning line."""
    from mechmed.io import write_json
    from mechmed.selection import RESAMPLABLE, per_pair_values, selection_uncertainty

    if score not in RESAMPLABLE or not table.get("pairs"):
        log.info("select-layers: no uncertainty for --score %s (not a per-pair mean)", score)
        return None
    values, mask, clusters = per_pair_values(table, score)
    unc = selection_uncertainty(values, mask, clusters, strategy, width=width, k=k, threshold=threshold,
                                n_bootstrap=n_bootstrap, seed=seed)
    entry = {"score_key": score, **unc.to_dict(), "p_best_threshold": p_best}
    kept = [e for e in table.get("selections", []) if (e.get("score_key"), e.get("strategy"), e.get("params"))
            != (score, strategy, unc.params)]
    table["selections"] = [*kept, entry]
    try:
        write_json(path, table)
    except OSError as e:
        log.warning("select-layers: could not record the selection's uncertainty in %s (%s)", path, e)
    if (line := unc.warning(p_best)) is not None:
        log.warning("select-layers: %s", line)
    return unc



@dataclass
class SAECheckResult:
    """What :func:`run_sae_check` wrote: the rows, the JSON path, the figure files."""

    rows: list
    json_path: Path
    figures: dict
    payload: dict

    def table(self) -> str:
        return format_table(self.rows)



def run_sae_check(model: str = "demo", saes: str = "demo", layers: str = "all", texts: str | None = None,
                  out: str = "runs/sae_check", threshold: float = 0.95, batch_size: int = 8, device: str = "cpu",
                  ce: bool = True, seed: int = 0, *, dtype: str | None = None, answer_words=("yes", "no"),
                  trust_remote_code: bool = False, revision: str | None = None,
                  local_files_only: bool | None = None, cache_dir: str | None = None,
                  device_map=None, prompt_template: str | None = None) -> SAECheckResult:
    """``mechmed sae-check``: per-layer SAE fidelity on each text set, the t test against
    ``threshold``, ``sae_check.json`` (one row per layer and text set) and ``r2_by_layer.html/.png``
    in ``out``.

    ``model`` / ``device`` / ``dtype`` / ``answer_words`` / ``trust_remote_code`` / ``seed`` are
    :func:`mechmed.models.load_model`'s; ``saes`` and ``layers`` go to
    :func:`mechmed.saes.resolve_saes`; ``texts`` names the prompt sets (``medical``, ``general``,
    ``images``; default :func:`default_texts`); ``ce=False`` skips CE recovered and the margin change (one forward per batch).
    """
    from mechmed.figures import r2_by_layer, save_figure
    from mechmed.io import ensure_dir, write_json
    from mechmed.models import load_model
    from mechmed.runtime import check_device, threads_for_width, torch_threads
    from mechmed.saes import resolve_saes, sae_hook_name

    device = check_device(device)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not math.isfinite(threshold) or not threshold < 1.0:
        raise MechmedError(f"--threshold {threshold}: give a finite number below 1, e.g. 0.95")
    if int(batch_size) < 1:
        raise MechmedError(f"--batch-size {batch_size}: must be at least 1")
    texts = default_texts(model) if texts is None else texts
    names = parse_text_sets(texts)
    if "images" in names:
        image_prompt_builder(model)  # a model without image prompts fails before loading
    out_dir = ensure_dir(out)
    t0 = time.perf_counter()
    bundle = load_model(model, dtype, device, answer_words=tuple(answer_words), trust_remote_code=trust_remote_code,
                        revision=revision, local_files_only=local_files_only, cache_dir=cache_dir, seed=seed,
                        device_map=device_map,
                        prompt_template=prompt_template)
    if "images" in names and not bundle.multimodal:
        raise MechmedError(f"--texts {texts}: the model {model} takes no images; drop images")
    with torch_threads(threads_for_width(bundle.d_model) if str(device) == "cpu" else None):
        sae_map = resolve_saes(saes, bundle, layers, device=device, seed=seed)
        load_s = time.perf_counter() - t0
        rows, cost = [], {}
        for name in names:
            ps = prompt_set(name, seed=seed, model=model)
            ev = evaluate_saes(bundle, sae_map, ps, batch_size=int(batch_size), ce=ce, threshold=threshold,
                               progress=f"sae-check {name}")
            rows.extend(ev.rows)
            cost[name] = {"n_prompts": len(ps), "n_batches": ev.n_batches, "n_forwards": ev.n_forwards,
                          "forwards_per_batch": ev.forwards_per_batch, "n_tokens": ev.n_tokens,
                          "seconds": ev.seconds, "tokens_per_s": ev.n_tokens / ev.seconds if ev.seconds > 0 else None}
            log.info("sae-check %s: %d prompts, %d forwards in %.1fs", name, len(ps), ev.n_forwards, ev.seconds)
    rows.sort(key=lambda r: (names.index(r["text_set"]), r["layer"]))
    payload = {
        "version": RESULT_VERSION,
        "command": "sae-check",
        "options": {"model": model, "saes": saes, "layers": layers, "texts": texts, "out": str(out),
                    "threshold": threshold, "batch_size": int(batch_size), "device": device, "ce": bool(ce),
                    "seed": seed, "dtype": dtype, "answer_words": list(answer_words),
                    "trust_remote_code": trust_remote_code},
        "model": {"name": bundle.name, "family": bundle.family.name, "n_layers": bundle.n_layers,
                  "d_model": bundle.d_model},
        "model_provenance": bundle.provenance,
        "saes": {str(L): {"hook_name": sae_hook_name(s), "d_sae": int(s.cfg.d_sae),
                          "architecture": s.cfg.architecture()} for L, s in sae_map.items()},
        "alpha": ALPHA,
        "rows": rows,
        "cost": cost,
        "load_s": load_s,
        "seconds": time.perf_counter() - t0,
    }
    json_path = write_json(out_dir / "sae_check.json", payload)
    figures = save_figure(r2_by_layer(rows, threshold, detail=True), out_dir / "r2_by_layer")
    return SAECheckResult(rows, json_path, figures, payload)



def _attributed_set(data: str, split: str) -> str | None:
    """Which pairs of ``data`` are attributed: a named source's set (``demo:unseen``, else ``split``),
    a hub dataset's split (``@SPLIT``, else train when ``split`` is; None where the loader chooses);
    None for a file or directory."""
    from mechmed.data.loaders import parse_hub_data
    from mechmed.sources import get

    hub = parse_hub_data(data)
    if hub is not None:  # without @SPLIT the loader reads train for training, else the only split or test
        return hub[2] or ("train" if split == "train" else None)
    if get(data) is not None:
        return str(data).partition(":")[2] or split
    return None


def run_attribute(model: str = "demo", data: str = "demo", saes: str | None = "demo", out: str = "runs/attribute",
                  *, max_pairs: int = 300, exact: bool = True, top_features: int = 10, batch_size: int = 8,
                  split: str = "train", device: str = "cpu", image_root=None, seed: int = 0, progress: bool = False,
                  dtype: str | None = None, answer_words=("yes", "no"), trust_remote_code: bool = False,
                  revision: str | None = None, local_files_only: bool | None = None, cache_dir: str | None = None,
                  device_map=None, prompt_template: str | None = None) -> dict:
    """Attribute flips on ``data`` and write ``layer_scores.json``, ``features.csv`` and figures.

    ``split``: which pairs of a named source (``demo``, a hub dataset) to attribute. ``train`` (the
    default) is what training reads, so the layers select-layers picks from these scores and the
    features the clamp arm edits are chosen without the held-out pairs they are scored on; ``eval``
    attributes the held-out flips themselves. A file or directory is read whole either way."""
    import csv
    import io

    from mechmed.io import ensure_dir, write_json, write_text
    from mechmed.models import load_model

    if max_pairs < 1:
        raise MechmedError(f"--max-pairs {max_pairs}: must be at least 1")
    if split not in ("train", "eval"):
        raise MechmedError(f"--split {split}: use train or eval")
    pairs = [p for p in resolve_data(data, image_root=image_root, seed=seed, split=split) if not p.negated]
    if not pairs:
        raise MechmedError(f"--data {data} (split {split}): has no pairs without negation to attribute")
    rng = np.random.default_rng(seed)
    pairs = [pairs[i] for i in sorted(rng.permutation(len(pairs))[:max_pairs])]
    bundle = load_model(model, device=device, seed=seed, dtype=dtype, answer_words=tuple(answer_words),
                        trust_remote_code=trust_remote_code, revision=revision,
                        local_files_only=local_files_only, cache_dir=cache_dir, device_map=device_map,
                        prompt_template=prompt_template)
    sae_map = None
    if saes:
        from mechmed.saes import resolve_saes

        sae_map = resolve_saes(saes, bundle, "all", seed=seed)
    out_dir = ensure_dir(out)
    results = attribute(bundle, pairs, saes=sae_map, exact=exact, batch_size=batch_size, progress=progress)
    scores = layer_scores(results, seed=seed)
    rows = feature_table(results, top=top_features) if sae_map else []
    labels = {L: getattr(sae, "mechmed_labels", {}) for L, sae in (sae_map or {}).items()}
    if any(labels.values()):  # a label column only where the SAEs ship labels; none are made up
        for row in rows:
            row["label"] = labels[row["layer"]].get(int(row["feature"]), "")
    if sae_map and rows:
        # delta-patch recovery of each top feature, averaged over flipped pairs (or all when none flipped)
        by_id = {p.id: p for p in pairs}
        flipped = [r for r in results if r.flipped] or results
        cache: dict = {}
        for layer in sorted({r["layer"] for r in rows}):
            feats = [r["feature"] for r in rows if r["layer"] == layer]
            rec = np.nanmean(np.stack([delta_patch(bundle, by_id[r.id], layer, sae_map[layer], feats, cache)
                                       for r in flipped[:20]]), axis=0)
            for row, value in zip([r for r in rows if r["layer"] == layer], rec):
                row["recovery"] = None if not np.isfinite(value) else float(value)
    by_question = {p.id: p.group for p in pairs}
    scores.update({"model": model, "model_provenance": bundle.provenance, "data": str(data),
                   "split": _attributed_set(data, split),
                   "saes": saes,
                   "exact": exact, "seed": seed,
                   "pairs": [{"id": r.id, "question": by_question[r.id], "m_q": r.m_q, "m_p": r.m_p, "flipped": r.flipped,
                              "layer_attr": r.layer_attr.tolist(),
                              "patch_effect": None if r.patch_effect is None else r.patch_effect.tolist()}
                             for r in results]})
    write_json(out_dir / "layer_scores.json", scores)
    if rows:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) + (["recovery"] if "recovery" not in rows[0] else []))
        w.writeheader()
        w.writerows(rows)
        write_text(out_dir / "features.csv", buf.getvalue())
    from mechmed import figures

    figures.save_figure(figures.layer_profile(scores), out_dir / "layer_profile")
    if rows:
        figures.save_figure(figures.feature_heatmap(rows), out_dir / "feature_heatmap")
    return scores



def run_evaluate(model: str = "demo", data: str = "demo", out: str = "runs/eval", *, adapter=None,
                 batch_size: int = 16, device: str = "cpu", dtype: str | None = None,
                 answer_words=("yes", "no"), image_root=None, limit: int | None = None, seed: int = 0,
                 controls: bool = True, trust_remote_code: bool = False, progress: bool = False,
                 revision: str | None = None, local_files_only: bool | None = None, cache_dir: str | None = None,
                  device_map=None, prompt_template: str | None = None, risk: float = RISK) -> Evaluation:
    """Load, evaluate, and write ``metrics.json`` and ``pairs.jsonl`` under ``out``."""
    from mechmed.io import ensure_dir, write_json, write_jsonl
    from mechmed.models import attach_adapter, load_model

    check_risk(risk)
    pairs = resolve_data(data, image_root=image_root, seed=seed)
    if limit is not None:
        if limit < 1:
            raise MechmedError(f"--limit {limit}: must be at least 1")
        pairs = pairs[:limit]
    b = load_model(model, dtype=dtype, device=device, answer_words=answer_words,
                   trust_remote_code=trust_remote_code, revision=revision, local_files_only=local_files_only,
                   cache_dir=cache_dir, seed=seed, device_map=device_map,
                        prompt_template=prompt_template)
    if adapter:
        b = attach_adapter(b, adapter)
    out_dir = ensure_dir(out)
    result = evaluate(b, pairs, batch_size=batch_size, seed=seed, controls=controls, progress=progress, risk=risk)
    result.metrics["data"] = str(data)
    result.metrics["adapter"] = None if adapter is None else str(adapter)
    result.metrics["seed"] = seed
    result.metrics["versions"] = versions()
    result.metrics["determinism"] = determinism_state()
    result.metrics["device"], result.metrics["dtype"] = str(b.device), str(b.model.dtype)
    result.metrics["model_provenance"] = b.provenance
    write_jsonl(out_dir / "pairs.jsonl", result.pairs)
    write_json(out_dir / "metrics.json", result.metrics)
    return result


def run_capture(model: str = "demo", data: str = "demo", out: str = "runs/activations", *, layers: str = "all",
                kind: str = "resid_post", positions: str = "last", max_pairs: int | None = None,
                shard_size: int = 1024, batch_size: int = 8, store_dtype: str | None = None, backend: str = "hooks",
                device: str = "cpu", image_root=None, seed: int = 0, progress: bool = False, dtype: str | None = None,
                answer_words=("yes", "no"), trust_remote_code: bool = False, revision: str | None = None,
                local_files_only: bool | None = None, cache_dir: str | None = None,
                  device_map=None, prompt_template: str | None = None):
    """``mechmed capture``: the activations at ``kind`` of ``layers`` for both phrasings of every pair of
    ``data`` (a seeded sample of ``max_pairs``), written to ``out`` as an activation store
    (:func:`mechmed.store.write_activations`: safetensors shards, resumable) that a notebook reads
    with :class:`mechmed.store.ActivationStore`. Returns the :class:`mechmed.store.WriteResult`."""
    from mechmed.capture import BACKENDS
    from mechmed.models import load_model, model_config
    from mechmed.sites import SITE_KINDS, Site, parse_layers
    from mechmed.store import STORE_DTYPES, STORE_POSITIONS, write_activations

    if kind not in SITE_KINDS:
        raise MechmedError(f"--kind {kind}: choose one of {', '.join(SITE_KINDS)}")
    if positions not in STORE_POSITIONS:
        raise MechmedError(f"--positions {positions}: choose one of {', '.join(STORE_POSITIONS)}")
    if store_dtype is not None and store_dtype not in STORE_DTYPES:
        raise MechmedError(f"--store-dtype {store_dtype}: choose one of {', '.join(STORE_DTYPES)}")
    if backend not in BACKENDS:
        raise MechmedError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    for option, value in (("--max-pairs", max_pairs), ("--shard-size", shard_size), ("--batch-size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MechmedError(f"{option} {value}: must be a positive integer")
    _, config, family, _ = model_config(model, seed=seed, trust_remote_code=trust_remote_code, revision=revision,
                                        local_files_only=local_files_only, cache_dir=cache_dir)
    n_layers = family.n_layers(config)
    chosen = parse_layers(layers, n_layers)
    if max(chosen) >= n_layers:
        raise MechmedError(f"--layers {layers}: the model has layers 0-{n_layers - 1}")
    pairs = resolve_data(data, image_root=image_root, seed=seed)
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = [pairs[i] for i in sorted(np.random.default_rng(seed).permutation(len(pairs))[:max_pairs])]
    bundle = load_model(model, device=device, seed=seed, dtype=dtype, answer_words=tuple(answer_words),
                        trust_remote_code=trust_remote_code, revision=revision,
                        local_files_only=local_files_only, cache_dir=cache_dir, device_map=device_map,
                        prompt_template=prompt_template)
    return write_activations(bundle, pairs, [Site(L, kind) for L in chosen], out, positions=positions,
                             shard_size=shard_size, batch_size=batch_size, dtype=store_dtype, backend=backend,
                             progress="capture" if progress else None)


def run_audit(data: str = "demo", out: str | None = None, *, image_root=None, model: str | None = None,
              device: str = "cpu", threshold: float | None = None, seed: int = 0, batch_size: int = 16) -> dict:
    """:func:`mechmed.audit.audit_pairs` on a pair set (and, with ``model``, its accuracy with gray
    images); written to ``out`` (a JSON file) when given."""
    from mechmed.audit import THRESHOLD, audit_pairs, blind_accuracy
    from mechmed.io import write_json

    pairs = resolve_data(data, image_root=image_root, seed=seed)
    result = audit_pairs(pairs, threshold=THRESHOLD if threshold is None else threshold, seed=seed)
    result["data"] = str(data)
    if model:
        from mechmed.models import load_model

        result["model"] = model
        result["model_accuracy"] = blind_accuracy(load_model(model, device=device, seed=seed), pairs, batch_size)
    if out:
        write_json(out, result)
    return result

