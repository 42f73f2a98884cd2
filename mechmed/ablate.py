"""Layer-range ablations: one grid of training arms, each trained and evaluated the same way.

An arm is a layer range and a loss (see :data:`ARMS`): the mechanistically ``selected`` range (the
training config's ``layers``, from ``mechmed select-layers``), baseline ranges of the same width
(``early``, ``middle``, ``late``, ``random``), ``all`` layers, and two loss controls on the selected
range: ``ce_only`` (cross-entropy, no consistency term) and ``consistency_only`` (the seed paper's
symmetric KL and no cross-entropy, which it found to collapse to one answer), and ``act``
(activation consistency at the selected layers instead of the output-level term, weighted
``act_weight``). The grid is arms × methods (``lora``, ``spectral_moe``) × seeds; ``base`` (no
training) is evaluated once per seed.

Three arms train nothing (:data:`TRAINING_FREE_ARMS`, method ``none``, :mod:`mechmed.interventions`):
``clamp`` (the top ``clamp_features`` attributed flip features of the selected layers' SAEs set to
their value on the original question, or to zero), ``steer`` (the mean residual difference between
original and paraphrase after the last selected layer, fitted on the training pairs, added to the
paraphrase) and ``ensemble`` (the mean margin over ``ensemble_k`` phrasings). They are evaluated
on the base model with the same sets and statistics; ``p_vs_best_trained`` tests every arm against
the trained arm with the lowest flip rate that did not collapse (``best_trained`` in results.json).

Every arm is a ``mechmed train`` run directory under ``OUT/arms/<arm>-<method>-s<seed>``, so the
grid resumes: finished arms are read back, interrupted ones continue from their checkpoint.
Arms can run in parallel processes (``workers``). The results table (``results.json``,
``results.csv``) has, per arm and seed, the flip rate, mean |Δmargin| and canonical accuracy with
95% intervals, the yes-rate and the guard's collapse flag, trainable parameters, and exact
McNemar tests of the per-pair flips against the base model and against the cross-entropy-only
control; ``summary`` pools the seeds.

Configuration (YAML, all keys optional except a training config)::

    train: runs/demo/train.yaml     # a training config file (or a mapping of its fields)
    arms: [selected, early, late, all, ce_only, consistency_only]
    methods: [lora]
    seeds: [0]
    match_parameters: false         # scale the LoRA rank so every arm trains ~as many parameters
    workers: 1                      # arms trained in parallel processes
    act_weight: 0.5                 # consistency_weight of the act arm
    attribution: runs/demo/attribute  # features.csv for clamp (default: next to train's scores_file)
    saes: demo                      # SAEs for clamp (default: the attribution's)
    clamp_features: 4
    clamp_to: original              # or zero
    steer_scale: 1.0
    ensemble_k: 3
    audit: false                    # or true, or {random_sets: 8, seed: 0, n_bootstrap: 1000}: the selection audit

With ``audit`` the grid also trains every contiguous window of the selected width, ``random_sets``
random layer sets of that width, all layers at the window's parameter count and all layers at its rank
(arms ``w<a>-<b>``, ``set<i>``, ``all_matched``, ``all_samerank``; a candidate the grid already trains,
such as ``early`` or ``selected``, is taken from it), with the selected arm's loss, data and steps;
``results.json`` then has an ``audit`` (:mod:`mechmed.selection_audit`): what each candidate achieved
against what the attribution predicted for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mechmed.config import (  # noqa: F401  (public here too)
    ARMS,
    CONSISTENCY_ONLY_LOSS,
    DEFAULT_ARMS,
    RANGE_ARMS,
    TRAINING_FREE_ARMS,
    ModelSpec,
)
from mechmed.errors import MechmedError
from mechmed.io import read_jsonl

log = logging.getLogger(__name__)

RESULT_KEYS = ("arm", "method", "seed", "layers", "trainable_parameters", "flip_rate", "flip_ci", "margin_diff",
               "margin_diff_ci", "canonical_accuracy", "accuracy_ci", "yes_rate", "collapsed", "p_vs_base",
               "p_vs_ce_only", "p_vs_best_trained", "near_tie_flip_rate", "quadrants", "n_pairs", "run_dir")


@dataclass
class AblationConfig:
    """The grid: a training config and the arms, methods and seeds to cross it with."""

    train: dict
    """Fields of the training config (mechmed.config.TrainConfig); its ``layers`` are the selected range."""
    arms: list = field(default_factory=lambda: list(DEFAULT_ARMS))
    """Arms to train (see mechmed.ablate.ARMS); ``base`` is always evaluated."""
    methods: list = field(default_factory=lambda: ["lora"])
    """Adapter methods: lora, spectral_moe."""
    seeds: list = field(default_factory=lambda: [0])
    """Seeds (each also picks the demo model and data when the model is 'demo')."""
    match_parameters: bool = False
    """Scale the rank of every arm so it trains about as many parameters as the selected range."""
    workers: int = 1
    """Arms trained in parallel processes (each gets cores / workers torch threads)."""
    act_weight: float = 0.5
    """consistency_weight of the act arm (its normalised L2 is on another scale than the output-level terms)."""
    attribution: str | None = None
    """The attribution (a directory with features.csv) whose features clamp uses; default: beside the
    training config's provenance scores_file."""
    saes: str | None = None
    """SAEs of clamp (an --saes spec); default: the attribution's."""
    clamp_features: int = 4
    """Features clamp sets: the top attributed ones in the selected layers."""
    clamp_to: str = "original"
    """original (the value on the pair's original question, paraphrase prompts only) or zero (every prompt)."""
    steer_scale: float = 1.0
    """Multiple of the steering vector steer adds."""
    ensemble_k: int = 3
    """Phrasings each ensemble answer averages over (the prompt and k − 1 others of its question)."""
    audit: dict | bool | None = None
    """The selection audit (mechmed.selection_audit): true, or a mapping of random_sets, seed and n_bootstrap."""
    null_draws: int = 100
    """Draws of the matched nulls of clamp and steer (mechmed.nulls: random features, random directions of the
    same norm); 0 for none."""
    source: str = "ablation config"

    def __post_init__(self):
        from mechmed.config import METHODS

        src = self.source
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise MechmedError(f"{src}: arms: unknown {unknown}; choose from {', '.join(ARMS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise MechmedError(f"{src}: methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if not self.arms or not self.methods or not self.seeds:
            raise MechmedError(f"{src}: arms, methods and seeds must each name at least one")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise MechmedError(f"{src}: seeds must be integers, got {self.seeds}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise MechmedError(f"{src}: workers must be a positive integer, got {self.workers!r}")
        from mechmed.interventions import CLAMP_TO

        checks = [("act_weight", isinstance(self.act_weight, (int, float)) and self.act_weight > 0, "a positive number"),
                  ("clamp_features", isinstance(self.clamp_features, int) and self.clamp_features >= 1,
                   "a positive integer"),
                  ("clamp_to", self.clamp_to in CLAMP_TO, f"one of {', '.join(CLAMP_TO)}"),
                  ("steer_scale", isinstance(self.steer_scale, (int, float)) and math.isfinite(self.steer_scale),
                   "a number"),
                  ("ensemble_k", isinstance(self.ensemble_k, int) and self.ensemble_k >= 2, "an integer >= 2"),
                  ("null_draws", isinstance(self.null_draws, int) and not isinstance(self.null_draws, bool)
                   and self.null_draws >= 0, "a non-negative integer (0: no null)")]
        for key, ok, what in checks:
            if not ok:
                raise MechmedError(f"{src}: {key} must be {what}, got {getattr(self, key)!r}")
        self.arms = [a for a in ARMS if a in self.arms and a != "base"]
        from mechmed.selection_audit import check_audit

        self.audit = check_audit(self.audit, src)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AblationConfig:
        """Read an ablation YAML (``train`` a config file path, relative to the YAML, or a mapping)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise MechmedError(f"--config {path}: no such file; write an ablation YAML (see docs/ablations.md)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise MechmedError(f"--config {path}:{where}: not valid YAML; fix the syntax") from None
        return cls.from_dict(raw, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw, base_dir: str | os.PathLike = ".", source: str = "ablation config") -> AblationConfig:
        from dataclasses import fields

        from mechmed.config import TrainConfig, known_keys

        if not isinstance(raw, dict):
            raise MechmedError(f"{source}: expected a mapping with a 'train' key")
        known_keys(raw, {f.name for f in fields(cls)} - {"source"}, source)
        if "train" not in raw:
            raise MechmedError(f"{source}: missing 'train': a training config file (from mechmed select-layers) "
                               "or a mapping of its fields")
        train = raw["train"]
        if isinstance(train, str):
            tpath = Path(train) if Path(train).is_absolute() else Path(base_dir) / train
            train = TrainConfig.load(tpath).to_dict()
        elif isinstance(train, dict):
            train = TrainConfig.from_dict(train, source=f"{source}: train").to_dict()
        else:
            raise MechmedError(f"{source}: train: give a config file path or a mapping")
        train.pop("config_version", None)
        return cls(**{**{k: v for k, v in raw.items() if k != "train"}, "train": train, "source": source})

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


@dataclass(frozen=True)
class Arm:
    """One trained cell of the grid."""

    arm: str
    method: str
    seed: int
    layers: tuple
    overrides: tuple = ()

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.method}-s{self.seed}"


def plan(cfg: AblationConfig, n_layers: int) -> list[Arm]:
    """The arms to train, in display order (arm, then method, then seed)."""
    from mechmed.selection import baseline

    selected = tuple(cfg.train["layers"])
    width = len(selected)
    if max(selected) >= n_layers:
        raise MechmedError(f"{cfg.source}: train.layers {list(selected)} reach past the model's {n_layers} layers "
                           f"(0-{n_layers - 1})")
    out = []
    for arm in cfg.arms:
        if arm in TRAINING_FREE_ARMS:  # nothing trained: one arm per seed, method none
            out.extend(Arm(arm, "none", seed, selected) for seed in cfg.seeds)
            continue
        for method in cfg.methods:
            for seed in cfg.seeds:
                over: dict = {}
                layers = baseline(arm, n_layers, width, seed=seed).layers if arm in RANGE_ARMS else selected
                if arm == "ce_only":
                    over["consistency_weight"] = 0.0
                elif arm == "consistency_only":  # the paper's pure-consistency control: its symmetric KL
                    over.update(ce_weight=0.0, consistency=CONSISTENCY_ONLY_LOSS)
                elif arm == "act":  # activation consistency where the attribution found the flip
                    over.update(consistency="activation", consistency_weight=float(cfg.act_weight))
                if cfg.match_parameters and len(layers) != width:
                    rank = max(1, round(cfg.train["rank"] * width / len(layers)))
                    if method == "spectral_moe":
                        n = cfg.train.get("spectral", {}).get("n_experts", 8)
                        rank = max(n, rank - rank % n)
                    over["rank"] = rank
                out.append(Arm(arm, method, seed, tuple(layers), tuple(sorted(over.items()))))
    if cfg.audit:
        out += [arm for cands in audit_plan(cfg, out, n_layers).values() for _, arm, new in cands if new]
    return out


def audit_plan(cfg: AblationConfig, planned: Sequence[Arm], n_layers: int) -> dict:
    """(method, seed) -> the audit's candidates (:func:`mechmed.selection_audit.candidates`), each as
    (candidate, the arm that trains it, whether that arm is the audit's own rather than one of ``planned``)."""
    from mechmed.selection_audit import SAME_LOSS_ARMS, candidates

    rank, width = cfg.train["rank"], len(cfg.train["layers"])
    out = {}
    for method in cfg.methods:
        n_experts = (cfg.train.get("spectral") or {}).get("n_experts", 8) if method == "spectral_moe" else None
        for seed in cfg.seeds:
            have = {(a.layers, dict(a.overrides).get("rank", rank)): a for a in planned
                    if a.arm in SAME_LOSS_ARMS and a.method == method and a.seed == seed}
            cands = []
            for c in candidates(n_layers, width, rank, random_sets_count=cfg.audit["random_sets"],
                                seed=cfg.audit["seed"], n_experts=n_experts):
                key = (c.layers, c.rank or rank)
                new = key not in have
                if new:
                    have[key] = Arm(c.name, method, seed, c.layers, (("rank", c.rank),) if c.rank else ())
                cands.append((c, have[key], new))
            out[(method, seed)] = cands
    return out


def arm_config(cfg: AblationConfig, arm: Arm):
    """The training config of one arm."""
    from mechmed.config import TrainConfig

    d = {**cfg.train, "layers": list(arm.layers), "method": arm.method, "seed": arm.seed, **dict(arm.overrides)}
    d["provenance"] = {**cfg.train.get("provenance", {}), "ablation_arm": arm.name}
    return TrainConfig.from_dict(d, source=f"{cfg.source}: arm {arm.name}")


def _run_arm(cfg_dict: dict, run_dir: str, threads: int | None, device: str = "cpu", dtype: str | None = None,
             progress: bool = False) -> dict:
    """Train (or resume, or read back) one arm; runs in a worker process when ``workers`` > 1.
    ``progress`` draws the arm's own training bar, named by the arm."""
    import json

    from mechmed.config import TrainConfig
    from mechmed.runtime import deterministic, torch_threads
    from mechmed.train import train

    out = Path(run_dir)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    cfg = TrainConfig.from_dict(cfg_dict, source=str(out / "config.yaml"))
    # restored: in-process arms run in the caller's process; a spawned worker starts with torch's defaults
    with torch_threads(threads), deterministic(device):
        return train(cfg, out, resume=(out / "checkpoint").exists(), evaluate_before=False, png=False, device=device,
                     dtype=dtype, progress=f"arm {out.name}" if progress else False).metrics


#: The ablation config's options each training-free arm depends on (a finished arm is reused only with the same).
TRAINING_FREE_SETTINGS = {"clamp": ("clamp_features", "clamp_to", "attribution", "saes"), "steer": ("steer_scale",),
                          "ensemble": ("ensemble_k",)}


def _attribution_dir(cfg: AblationConfig) -> Path:
    """Where clamp's ranked features are: ``attribution``, else beside the training config's scores file."""
    if cfg.attribution:
        return Path(cfg.attribution)
    scores = (cfg.train.get("provenance") or {}).get("scores_file")
    if not scores:
        raise MechmedError(f"{cfg.source}: the clamp arm needs an attribution with features (features.csv): set "
                           "attribution: in the ablation config (the directory mechmed attribute wrote)")
    return Path(scores).parent


def _sae_spec(cfg: AblationConfig) -> str:
    """clamp's SAEs: ``saes``, else the ones the attribution used."""
    if cfg.saes:
        return cfg.saes
    import json

    scores = _attribution_dir(cfg) / "layer_scores.json"
    spec = json.loads(scores.read_text(encoding="utf-8")).get("saes") if scores.is_file() else None
    if not spec:
        raise MechmedError(f"{cfg.source}: the clamp arm needs SAEs: set saes: in the ablation config (an --saes "
                           "spec, e.g. demo)")
    return spec


def load_base(cfg: AblationConfig, seed: int, device: str = "cpu", dtype: str | None = None):
    """The grid's base model for ``seed``, opened as its training config's ``model`` says."""
    from mechmed.models import load_model

    t = cfg.train
    return load_model(ModelSpec.of(t["model"]), dtype, device, answer_words=tuple(t["answer_words"]), seed=seed,
                      prompt_template=t.get("prompt_template"))


def check_training_free(cfg: AblationConfig) -> None:
    """Check what the training-free arms need (features, SAEs) before any model is loaded: the
    features were ranked on the SAEs clamp will load (for a model that is built per seed, as the
    embedded default is, the attribution's seed must be the grid's)."""
    if "clamp" in cfg.arms:
        import json

        from mechmed.interventions import top_features
        from mechmed.sources import get

        top_features(_attribution_dir(cfg), cfg.train["layers"], cfg.clamp_features)
        _sae_spec(cfg)
        scores = _attribution_dir(cfg) / "layer_scores.json"
        seed = json.loads(scores.read_text(encoding="utf-8")).get("seed") if scores.is_file() else None
        other = [s for s in cfg.seeds if seed is not None and s != seed]
        name = ModelSpec.of(cfg.train["model"]).name
        if other and get(name) is not None:
            raise MechmedError(f"{cfg.source}: clamp: the attribution {scores.parent} ranked the features of seed "
                               f"{seed}'s {name} model and SAEs, but seed {other[0]} has its own; run "
                               f"one grid per seed (mechmed demo --seed {other[0]}) with that seed's attribution")


def make_edit(cfg: AblationConfig, arm: Arm, bundle):
    """The training-free fix of ``arm`` (:mod:`mechmed.interventions`) on the base model ``bundle``."""
    from mechmed import interventions as iv
    from mechmed.train import resolve_pairs

    t = cfg.train
    if arm.arm == "steer":
        train_pairs = resolve_pairs(t["train_data"], split="train", image_root=t.get("image_root"), seed=arm.seed)
        return iv.fit_steering(bundle, train_pairs, max(arm.layers), scale=float(cfg.steer_scale), batch_size=64)
    if arm.arm == "clamp":
        from mechmed.saes import resolve_saes

        features = iv.top_features(_attribution_dir(cfg), arm.layers, cfg.clamp_features)
        saes = resolve_saes(_sae_spec(cfg), bundle, sorted(features), seed=arm.seed)
        return iv.Clamp(saes, features, cfg.clamp_to)
    return iv.Ensemble(cfg.ensemble_k)


def evaluate_training_free(cfg: AblationConfig, arm: Arm, out: Path, *, progress: bool = False,
                           device: str = "cpu", dtype: str | None = None, nulls: bool = True) -> dict:
    """Evaluate one training-free arm on the base model into ``out`` (``after/`` as a trained arm's,
    ``metrics.json`` last); reads a finished one back."""
    import json

    from mechmed.io import ensure_dir, write_json
    from mechmed.train import collapse_reasons, evaluate_sets, resolve_pairs

    settings = {k: getattr(cfg, k) for k in TRAINING_FREE_SETTINGS[arm.arm]}
    if (out / "metrics.json").is_file():
        done = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        if done.get("settings", settings) != settings:
            raise MechmedError(f"{out}: was evaluated with {done['settings']}, the config now asks for {settings}; "
                               "delete that directory to evaluate it again, or give another --out")
        return _with_null(cfg, arm, out, done, device=device, dtype=dtype, compute=nulls)
    t = cfg.train
    bundle = load_base(cfg, arm.seed, device, dtype)
    edit = make_edit(cfg, arm, bundle)
    pairs = resolve_pairs(t["eval_data"], split="eval", image_root=t.get("image_root"), seed=arm.seed)
    extra = {name: resolve_pairs(data, split="eval", image_root=t.get("image_root"), seed=arm.seed)
             for name, data in (t.get("extra_eval") or {}).items()}
    after = evaluate_sets(bundle, pairs, extra, ensure_dir(out) / "after", seed=arm.seed, progress=progress,
                          edit=edit)
    m = after["main"]
    n_answers = m["n_questions"] + m["n_pairs"]  # the guard's rule on both phrasings' answers
    accuracy = (m["n_correct"]["original"] + m["n_correct"]["paraphrase"]) / n_answers
    reasons = collapse_reasons(m["yes_rate"], accuracy, m["label_yes_rate"], t.get("collapse_low", 0.05),
                               t.get("collapse_high", 0.95))
    metrics = {"arm": arm.name, "training_free": edit.describe(), "settings": settings,
               "trainable_parameters": 0, "layers": list(arm.layers),
               "collapsed": bool(reasons), "collapse": {"reason": "; ".join(reasons)} if reasons else None,
               "after": m, "after_sets": {k: v for k, v in after.items() if k != "main"}, "seed": arm.seed,
               "model_provenance": bundle.provenance}
    write_json(out / "metrics.json", metrics)
    return _with_null(cfg, arm, out, metrics, bundle, edit, pairs)


def _null_applies(cfg: AblationConfig, arm: Arm) -> bool:
    """Whether ``arm`` gets a matched null (:mod:`mechmed.nulls`): steer, and clamp to the original's values."""
    return cfg.null_draws > 0 and (arm.arm == "steer" or (arm.arm == "clamp" and cfg.clamp_to == "original"))


def _with_null(cfg: AblationConfig, arm: Arm, out: Path, metrics: dict, bundle=None, edit=None, pairs=None, *,
               device: str = "cpu", dtype: str | None = None, compute: bool = True) -> dict:
    """``metrics`` with the arm's matched null (``metrics["null"]``, also written to its metrics.json),
    computed unless it is there with the configured number of draws (``compute=False``: never computed,
    as ``--collect`` runs nothing)."""
    from mechmed.io import write_json
    from mechmed.nulls import null_control

    if not _null_applies(cfg, arm):  # a null drawn by an earlier config is not this grid's
        return {k: v for k, v in metrics.items() if k != "null"}
    if (metrics.get("null") or {}).get("draws") == cfg.null_draws or not compute:
        return metrics
    t = cfg.train
    if bundle is None:
        from mechmed.train import resolve_pairs

        bundle = load_base(cfg, arm.seed, device, dtype)
        edit = make_edit(cfg, arm, bundle)
        pairs = resolve_pairs(t["eval_data"], split="eval", image_root=t.get("image_root"), seed=arm.seed)
    evaluated = {r["id"]: r["margin_paraphrase"] for r in read_jsonl(out / "after" / "pairs.jsonl")}
    try:
        null = null_control(bundle, edit, pairs, draws=cfg.null_draws, seed=arm.seed, reference=evaluated)
    except (MechmedError, RuntimeError) as e:  # too few features fire to draw from, out of memory, a model whose
        # forward takes no key/value cache: the arm stands, without its null, and says why
        log.warning("%s: no matched null (%s)", arm.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        null = {"arm": arm.arm, "draws": cfg.null_draws, "seed": arm.seed,
                "skipped": (str(e).splitlines() or [type(e).__name__])[0]}
    metrics = {**metrics, "null": null}
    write_json(out / "metrics.json", metrics)
    return metrics


def _read_pairs(path: Path) -> dict:
    """Per-pair rows of an evaluation by id: those its headline flip rate is over."""
    from mechmed.consistency import headline_rows

    return {r["id"]: r for r in headline_rows(read_jsonl(path))}


def evaluation_sets(eval_dir: Path, names: Sequence[str]) -> dict:
    """The per-pair rows (by id) of each extra evaluation set written under ``eval_dir/<name>/``, and,
    when the main set mixes negation pairs into meaning-preserving ones (as PSF-Med does) and no extra
    set is called ``negation``, the main set's negation pairs as the ``negation`` set."""
    out = {n: _read_pairs(eval_dir / n / "pairs.jsonl") for n in names if (eval_dir / n / "pairs.jsonl").is_file()}
    main = eval_dir / "pairs.jsonl"
    if "negation" not in out and main.is_file():
        rows = read_jsonl(main)
        neg = {r["id"]: r for r in rows if r.get("negation_set")}
        if neg and len(neg) < len(rows):
            out["negation"] = neg
    return out


def _set_stats(pairs: dict, base: dict | None, by_seed: bool = False) -> dict:
    """Flip rate with its Wilson interval (plain and clustered by question) over one evaluation set,
    and McNemar against the base's (exact, and clustered by question). ``by_seed``: ids are
    ``seed:id`` (pooled over seeds) and each seed's questions are its own."""
    from mechmed import stats
    from mechmed.consistency import pair_clusters

    flips = [bool(v["flip"]) for v in pairs.values()]
    if not flips:
        return {"n_pairs": 0, "flip_rate": None, "flip_ci": [None, None], "flip_ci_clustered": [None, None],
                "p_vs_base": None, "p_vs_base_clustered": None}
    ci = stats.wilson_interval(sum(flips), len(flips))
    cl = stats.clustered_wilson_interval(flips, pair_clusters(pairs, list(pairs), by_seed))
    return {"n_pairs": len(flips), "flip_rate": sum(flips) / len(flips), "flip_ci": [ci.low, ci.high],
            "flip_ci_clustered": [cl.low, cl.high],
            "p_vs_base": None if base is None else _mcnemar(base, pairs),
            "p_vs_base_clustered": None if base is None else _mcnemar(base, pairs, True, by_seed)}


def _by_phenomenon(pairs: dict) -> dict:
    """Flip rate per phenomenon over per-pair rows."""
    groups: dict = {}
    for v in pairs.values():
        groups.setdefault(v.get("phenomenon") or "other", []).append(bool(v["flip"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _phenomenon_stats(pairs: dict, base: dict | None, by_seed: bool = False) -> dict:
    """:func:`_set_stats` of each phenomenon's pairs (flip rate, Wilson interval, McNemar against the
    base's pairs of that phenomenon)."""
    names = sorted({v.get("phenomenon") or "other" for v in pairs.values()})
    return {n: _set_stats(_of_phenomenon(pairs, n), None if base is None else _of_phenomenon(base, n), by_seed)
            for n in names}


def _of_phenomenon(pairs: dict, name: str) -> dict:
    """The per-pair rows of one phenomenon."""
    return {k: v for k, v in pairs.items() if (v.get("phenomenon") or "other") == name}


def _pool(pairs_by_row: dict, rows: Sequence[dict], idx) -> dict:
    """Per-pair rows of several seeds in one dict (ids prefixed by the seed)."""
    return {f"{rows[i]['seed']}:{k}": v for i in idx for k, v in pairs_by_row[i].items()}


def evaluate_base(cfg: AblationConfig, seed: int, out: Path, progress: bool = False, device: str = "cpu",
                  dtype: str | None = None) -> tuple[dict, dict]:
    """Evaluate the untrained model for ``seed`` once (``OUT/base-s<seed>``, the extra evaluation sets in
    its subdirectories); returns (metrics, pairs by id) of the main set."""
    import json

    from mechmed.train import evaluate_sets, resolve_pairs

    d = out / f"base-s{seed}"
    if (d / "metrics.json").is_file() and (d / "pairs.jsonl").is_file():
        return json.loads((d / "metrics.json").read_text(encoding="utf-8")), _read_pairs(d / "pairs.jsonl")
    t = cfg.train
    bundle = load_base(cfg, seed, device, dtype)
    pairs = resolve_pairs(t["eval_data"], split="eval", image_root=t.get("image_root"), seed=seed)
    extra = {name: resolve_pairs(data, split="eval", image_root=t.get("image_root"), seed=seed)
             for name, data in (t.get("extra_eval") or {}).items()}
    # the main set's metrics.json is written last: its presence marks the base as done
    evaluate_sets(bundle, pairs, extra, d, seed=seed, progress=progress)
    return json.loads((d / "metrics.json").read_text(encoding="utf-8")), _read_pairs(d / "pairs.jsonl")


def _mcnemar(a: dict, b: dict, clustered: bool = False, by_seed: bool = False) -> float | None:
    """McNemar p of per-pair flips over the pairs both evaluations share: exact, or clustered by
    question (``by_seed``: ids ``seed:id``, each seed's questions its own)."""
    from mechmed.consistency import paired_flips

    return paired_flips(a, b, clustered=clustered, by_seed=by_seed)


def result_row(arm: str, method: str, seed: int, layers, n_params: int, m: dict, pairs: dict,
               base_pairs: dict | None, ce_pairs: dict | None, collapsed: bool, run_dir: str) -> dict:
    """One row of the results table from an evaluation's metrics and per-pair rows."""
    from mechmed import stats

    n_q = m["n_questions"]
    acc = stats.wilson_interval(m["n_correct"]["original"], n_q)
    return {
        "arm": arm, "method": method, "seed": seed, "layers": list(layers), "trainable_parameters": n_params,
        "flip_rate": m["flip_rate"], "flip_ci": list(m["flip_rate_ci"]),
        "flip_ci_clustered": list(m.get("flip_rate_ci_clustered") or [None, None]),
        "margin_diff": m["margin_diff"], "margin_diff_ci": list(m["margin_diff_ci"]),
        "canonical_accuracy": m["accuracy"]["original"], "accuracy_ci": [acc.low, acc.high],
        "yes_rate": m["yes_rate"], "collapsed": bool(collapsed),
        "p_vs_base": _mcnemar(base_pairs, pairs) if base_pairs is not None else None,
        "p_vs_base_clustered": _mcnemar(base_pairs, pairs, clustered=True) if base_pairs is not None else None,
        "p_vs_ce_only": _mcnemar(ce_pairs, pairs) if ce_pairs is not None else None,
        "p_vs_ce_only_clustered": _mcnemar(ce_pairs, pairs, clustered=True) if ce_pairs is not None else None,
        "p_vs_best_trained": None,
        "near_tie_flip_rate": m.get("near_tie_flip_rate"), "quadrants": m.get("quadrants"),
        "quadrants_gray": m.get("quadrants_gray"), "image_reliance": m.get("image_reliance"),
        "flip_risk": m.get("flip_risk"), "n_pairs": m["n_pairs"], "run_dir": run_dir,
    }


def shared_pairs(base_pairs: dict) -> list | None:
    """The pair ids when every seed's base evaluation is the same (the same pairs with the same
    margins: the model and the data do not change with the seed, as for a real model on a fixed
    data set), else None (the demo: each seed has its own model and data)."""
    runs = list(base_pairs.values())
    if len(runs) < 2:
        return None
    first = runs[0]

    def key(r):
        return r["margin_question"], r["margin_paraphrase"]

    if all(set(r) == set(first) and all(key(r[i]) == key(first[i]) for i in first) for r in runs[1:]):
        return sorted(first)
    return None


def shared_questions(base_pairs: dict) -> bool:
    """Whether every seed evaluated the same pairs of the same questions (the same ids, each with the
    same question id, image and wording), whatever the margins: then one question is one cluster
    across the seeds; else (the demo: each seed its own data) each seed's questions are its own."""
    runs = list(base_pairs.values())

    def key(r):
        return r.get("question_id"), r.get("image"), r.get("question")

    return all(set(r) == set(runs[0]) and all(key(r[i]) == key(runs[0][i]) for i in r) for r in runs[1:])


def _mean_over_seeds(runs: Sequence[dict], ids: Sequence[str], key: str) -> np.ndarray:
    """Per pair (``ids``, in that order), ``key`` of its per-pair rows averaged over ``runs`` (seeds)."""
    return np.mean([[float(run[i][key]) for i in ids] for run in runs], axis=0)


def _pair_unit(runs: Sequence[dict], base: dict | None) -> dict:
    """:func:`_set_stats` with the pair as the unit, for seeds that ran on the same pairs: each pair's
    flip is its mean over the seeds (``runs``, per-pair rows by id); the interval is a bootstrap over
    pairs, and p the paired bootstrap of (base flip − mean flip) over pairs (10,000 resamples). The
    clustered interval and McNemar test are over pair × seed with one question one cluster across
    the seeds (copies within a cluster add no evidence)."""
    from mechmed import stats
    from mechmed.consistency import pair_clusters

    ids = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    if not ids:
        return {"n_pairs": 0, "flip_rate": None, "flip_ci": [None, None], "flip_ci_clustered": [None, None],
                "p_vs_base": None, "p_vs_base_clustered": None}
    f = _mean_over_seeds(runs, ids, "flip")
    ci = stats.bootstrap_ci(f, n_resamples=2000, seed=0)
    pooled = {f"{j}:{i}": run[i] for j, run in enumerate(runs) for i in ids}
    cl = stats.clustered_wilson_interval([v["flip"] for v in pooled.values()], pair_clusters(pooled, list(pooled)))
    p = p_cl = None
    if base is not None:
        b = np.array([float(base[i]["flip"]) for i in ids])
        p = float(stats.paired_bootstrap(b, f, n_resamples=10_000, seed=0).p_value)
        p_cl = _mcnemar({f"{j}:{i}": base[i] for j in range(len(runs)) for i in ids}, pooled, clustered=True)
    return {"n_pairs": len(ids), "flip_rate": float(f.mean()), "flip_ci": [ci.low, ci.high],
            "flip_ci_clustered": [cl.low, cl.high], "p_vs_base": p, "p_vs_base_clustered": p_cl}


def _by_pair(summary: list[dict], pairs_by_row: dict, sets_by_row: dict | None, groups: dict, ids: list) -> None:
    """Redo ``summary``'s tests with the pair as the unit (seeds on the same pairs, see
    :func:`shared_pairs`): pooling them as new pairs would count each pair once per seed."""
    from mechmed import stats

    base_idx = groups[("base", "none")]
    base_run = pairs_by_row[base_idx[0]]
    ce_runs = {m: [pairs_by_row[i] for i in idx] for (a, m), idx in groups.items() if a == "ce_only"}

    def mean_over_seeds(runs: list, key: str) -> np.ndarray:
        return _mean_over_seeds(runs, ids, key)

    for r in summary:
        idx = groups[(r["arm"], r["method"])]
        runs = [pairs_by_row[i] for i in idx]
        is_base = r["arm"] == "base"
        main = _set_stats(base_run, None) if is_base else _pair_unit(runs, base_run)
        md = stats.bootstrap_ci(mean_over_seeds(runs, "margin_diff"), n_resamples=2000, seed=0)
        ce = ce_runs.get(r["method"]) if r["arm"] not in ("ce_only", "base") else None
        p_ce = None if ce is None else float(stats.paired_bootstrap(
            mean_over_seeds(ce, "flip"), mean_over_seeds(runs, "flip"), n_resamples=10_000, seed=0).p_value)
        for name in ("quadrants", "quadrants_gray"):
            if r.get(name):  # McNemar over pair × seed would count each pair once per seed
                r[name]["p_vs_base"] = None
        r.update(unit="pair", test="pair bootstrap", n_pairs=main["n_pairs"], flip_ci=main["flip_ci"],
                 margin_diff_ci=[md.low, md.high], p_vs_base=main["p_vs_base"], p_vs_ce_only=p_ce)
        names = sorted({v.get("phenomenon") or "other" for v in base_run.values()})
        r["phenomena"] = {n: _set_stats(_of_phenomenon(base_run, n), None) if is_base else
                          _pair_unit([_of_phenomenon(run, n) for run in runs], _of_phenomenon(base_run, n))
                          for n in names}
        if sets_by_row:
            for name in list(r.get("sets") or {}):
                set_runs = [sets_by_row[i][name] for i in idx]
                base_set = sets_by_row[base_idx[0]].get(name)
                r["sets"][name] = _set_stats(base_set, None) if is_base else _pair_unit(set_runs, base_set)


def summarise(rows: Sequence[dict], pairs_by_row: dict, base_pairs: dict, sets_by_row: dict | None = None) -> list[dict]:
    """Pool each (arm, method) over seeds: Wilson intervals of pooled counts, bootstrap interval of
    the pooled per-pair |Δmargin|, McNemar over all seeds' pairs (ids prefixed by seed); the same
    flip-rate statistics for each extra evaluation set (``sets_by_row``: row index -> set name ->
    pairs by id), and the pooled flip rate per phenomenon (``unit``: ``pair × seed``).

    Where every seed evaluated the same pairs with the same base model (:func:`shared_pairs`: a
    real model on a fixed data set), a pair is one unit whatever the number of seeds: each arm's
    flip per pair is its mean over seeds, intervals are bootstraps over pairs, and the tests against
    the base and CE only are paired bootstraps over pairs (``unit``: ``pair``)."""
    from mechmed import stats
    from mechmed.consistency import pair_clusters

    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["arm"], r["method"]), []).append(i)
    ce_key = {m: idx for (a, m), idx in groups.items() if a == "ce_only"}
    ids = shared_pairs(base_pairs)
    by_seed = not shared_questions(base_pairs)  # each seed's own data: its questions are its own clusters
    out = []
    # results written before the counterfactual control hold the gray definition in ``quadrants``: an arm
    # pools and is tested against the base only where every seed and the base use the same one
    base_definition = _definition(rows, groups.get(("base", "none"), []), "quadrants")
    for (arm, method), idx in groups.items():
        pooled = _pool(pairs_by_row, rows, idx)
        flips = np.array([v["flip"] for v in pooled.values()])
        deltas = np.array([v["margin_diff"] for v in pooled.values()])
        n_pairs = sum(rows[i]["n_pairs"] for i in idx)
        acc_k = sum(round(rows[i]["canonical_accuracy"] * _n_questions(rows[i])) for i in idx)
        acc_n = sum(_n_questions(rows[i]) for i in idx)
        f_ci = stats.wilson_interval(int(flips.sum()), len(flips))
        f_cl = stats.clustered_wilson_interval(flips, pair_clusters(pooled, list(pooled), by_seed))
        a_ci = stats.wilson_interval(acc_k, acc_n)
        md = stats.bootstrap_ci(deltas, n_resamples=2000, seed=0)
        base_pool = {f"{s}:{k}": v for s, bp in base_pairs.items() for k, v in bp.items()}
        ce = None
        if arm != "ce_only" and method in ce_key:
            ce = _pool(pairs_by_row, rows, ce_key[method])
        sets = {}
        if sets_by_row:
            base_idx = groups.get(("base", "none"), [])
            for name in [n for n in sets_by_row[idx[0]] if all(n in sets_by_row[i] for i in idx)]:
                pooled_set = _pool({i: sets_by_row[i][name] for i in idx}, rows, idx)
                base_set = None
                if arm != "base" and all(name in sets_by_row[i] for i in base_idx):
                    base_set = _pool({i: sets_by_row[i][name] for i in base_idx}, rows, base_idx)
                sets[name] = _set_stats(pooled_set, base_set, by_seed)
        out.append({
            "arm": arm, "method": method, "seed": None, "n_seeds": len(idx),
            "layers": rows[idx[0]]["layers"], "trainable_parameters": rows[idx[0]]["trainable_parameters"],
            "flip_rate": float(flips.mean()), "flip_ci": [f_ci.low, f_ci.high],
            "flip_ci_clustered": [f_cl.low, f_cl.high], "flip_rate_seeds": [rows[i]["flip_rate"] for i in idx],
            "margin_diff": float(deltas.mean()), "margin_diff_ci": [md.low, md.high],
            "canonical_accuracy": acc_k / acc_n, "accuracy_ci": [a_ci.low, a_ci.high],
            "yes_rate": float(np.mean([rows[i]["yes_rate"] for i in idx])),
            "collapsed": any(rows[i]["collapsed"] for i in idx),
            "p_vs_base": None if arm == "base" else _mcnemar(base_pool, pooled),
            "p_vs_base_clustered": None if arm == "base" else _mcnemar(base_pool, pooled, True, by_seed),
            "p_vs_ce_only": _mcnemar(ce, pooled) if ce else None,
            "p_vs_ce_only_clustered": _mcnemar(ce, pooled, True, by_seed) if ce else None,
            "p_vs_best_trained": None, "near_tie_flip_rate": float(np.mean([bool(v.get("near_tie")) for v in
                                                                             pooled.values()])),
            "quadrants": (_pooled_quadrants(pooled, None if arm == "base" else base_pool, by_seed, definition)
                          if (definition := _definition(rows, idx, "quadrants")) == base_definition
                          or ("base", "none") not in groups else None),
            "quadrants_gray": _pooled_quadrants(pooled, None if arm == "base" else base_pool, by_seed, "gray",
                                                "quadrants_gray"),
            "image_reliance": _pooled_reliance(pooled),
            "n_pairs": n_pairs, "run_dir": None, "sets": sets, "by_phenomenon": _by_phenomenon(pooled),
            "phenomena": _phenomenon_stats(pooled, None if arm == "base" else base_pool, by_seed),
            "unit": "pair" if len(base_pairs) == 1 else "pair × seed", "test": "McNemar",
        })
        if any(rows[i].get("null") for i in idx):
            from mechmed.nulls import pool_nulls

            out[-1]["null"] = pool_nulls([rows[i].get("null") for i in idx], shared=ids is not None)
    if ids is not None:  # the same pairs in every seed: test with the pair as the unit
        _by_pair(out, pairs_by_row, sets_by_row, groups, ids)
    return out


def _definition(rows: Sequence[dict], idx: list, name: str) -> str | None:
    """The reliance definition of the seeds' ``name`` quadrants (gray for results written before the
    counterfactual control)."""
    from mechmed.consistency import quadrant_definition

    found = {quadrant_definition(rows[i][name]) for i in idx if rows[i].get(name)}
    return found.pop() if len(found) == 1 else None


def _pooled_quadrants(pairs: dict, base: dict | None = None, by_seed: bool = False, definition: str | None = None,
                      name: str = "quadrants") -> dict | None:
    """:func:`mechmed.consistency.quadrant_counts` over the per-pair rows with a known image reliance
    (the field behind ``name``; None without its control; intervals clustered by question), with
    ``p_vs_base`` and ``p_vs_base_clustered``: per cell, McNemar of membership against ``base``'s
    pairs, exact and clustered by question. ``definition``: the reliance it is over."""
    from mechmed.consistency import QUADRANT_FIELDS, pair_clusters, quadrant_counts, quadrant_mcnemar

    key = QUADRANT_FIELDS[name]
    ids = [i for i, v in pairs.items() if v.get(key) is not None]
    if not ids:
        return None
    out = quadrant_counts([pairs[i]["flip"] for i in ids], [pairs[i][key] for i in ids],
                          pair_clusters(pairs, ids, by_seed))
    if definition:
        out = {"definition": definition, **out}
    out["p_vs_base"] = None if base is None else quadrant_mcnemar(base, pairs, key=key)
    out["p_vs_base_clustered"] = None if base is None else quadrant_mcnemar(base, pairs, True, by_seed, key=key)
    return out


def _pooled_reliance(pairs: dict) -> dict | None:
    """:func:`mechmed.consistency.reliance_comparison` over pooled per-pair rows (None unless they carry
    both definitions)."""
    from mechmed.consistency import reliance_comparison

    rows = list(pairs.values())
    if not any(v.get("image_reliant_gray") is not None for v in rows) or not any(
            v.get("image_reliant") is not None for v in rows):
        return None
    return reliance_comparison(np.array([v.get("image_reliant") for v in rows], dtype=object),
                               np.array([v.get("image_reliant_gray") for v in rows], dtype=object),
                               np.array([v.get("answer") == "yes" for v in rows]), [v.get("question") for v in rows])


def against_best_trained(rows: list[dict], summary: list[dict], pairs_by_row: dict) -> str | None:
    """Set ``p_vs_best_trained`` of every row and summary row: McNemar of its per-pair flips against
    those of the trained arm (same seed; pooled over seeds in the summary) with the lowest summary
    flip rate among those that did not collapse. Returns that arm's ``arm-method`` name."""
    trained = [r for r in summary if r["arm"] not in ("base", *TRAINING_FREE_ARMS) and not r["collapsed"]]
    if not trained:
        return None
    best = min(trained, key=lambda r: r["flip_rate"])
    key = (best["arm"], best["method"])
    best_rows = {r["seed"]: i for i, r in enumerate(rows) if (r["arm"], r["method"]) == key}
    for i, r in enumerate(rows):
        if (r["arm"], r["method"]) != key and r["seed"] in best_rows:
            r["p_vs_best_trained"] = _mcnemar(pairs_by_row[best_rows[r["seed"]]], pairs_by_row[i])
    best_pool = _pool(pairs_by_row, rows, list(best_rows.values()))
    by_seed = not shared_questions({r["seed"]: pairs_by_row[i] for i, r in enumerate(rows) if r["arm"] == "base"})
    for r in summary:
        if (r["arm"], r["method"]) == key:
            continue
        idx = [i for i, x in enumerate(rows) if (x["arm"], x["method"]) == (r["arm"], r["method"])]
        if r.get("test") == "pair bootstrap":  # seeds on the same pairs: paired bootstrap of mean flips per pair
            from mechmed import stats

            ids = sorted(set.intersection(*(set(pairs_by_row[i]) for i in idx + list(best_rows.values()))))

            best_f, arm_f = (_mean_over_seeds([pairs_by_row[j] for j in run], ids, "flip")
                             for run in (list(best_rows.values()), idx))
            r["p_vs_best_trained"] = float(stats.paired_bootstrap(best_f, arm_f, n_resamples=10_000,
                                                                  seed=0).p_value)
        else:
            arm_pool = _pool(pairs_by_row, rows, idx)
            r["p_vs_best_trained"] = _mcnemar(best_pool, arm_pool)
            r["p_vs_best_trained_clustered"] = _mcnemar(best_pool, arm_pool, True, by_seed)
    return f"{best['arm']}-{best['method']}"


def _n_questions(row: dict) -> int:
    return row.get("_n_questions", 0)


def table_csv(rows: Sequence[dict]) -> str:
    """The results as CSV (intervals split into _lo/_hi columns, layers as 'a-b' or 'a,b,c')."""
    from mechmed.sites import format_layers

    buf = io.StringIO()
    cols = ["arm", "method", "seed", "layers", "trainable_parameters", "flip_rate", "flip_lo", "flip_hi",
            "flip_lo_clustered", "flip_hi_clustered", "margin_diff", "margin_diff_lo", "margin_diff_hi",
            "canonical_accuracy", "accuracy_lo", "accuracy_hi", "yes_rate", "collapsed", "p_vs_base",
            "p_vs_base_clustered", "p_vs_ce_only", "p_vs_ce_only_clustered", "n_pairs"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r["arm"], r["method"], "" if r["seed"] is None else r["seed"], format_layers(r["layers"]),
                    r["trainable_parameters"], r["flip_rate"], *r["flip_ci"],
                    *("" if x is None else x for x in r.get("flip_ci_clustered") or [None, None]),
                    r["margin_diff"], *r["margin_diff_ci"], r["canonical_accuracy"], *r["accuracy_ci"], r["yes_rate"],
                    r["collapsed"], *("" if r.get(k) is None else r[k] for k in (
                        "p_vs_base", "p_vs_base_clustered", "p_vs_ce_only", "p_vs_ce_only_clustered")), r["n_pairs"]])
    return buf.getvalue()


def format_table(rows: Sequence[dict]) -> str:
    """The ablation table for the terminal: :func:`mechmed.report.summary_table` of ``rows`` (per-seed
    rows or the summary)."""
    from mechmed.report import summary_table

    return summary_table(list(rows))


@dataclass
class AblationResult:
    out: Path
    rows: list
    summary: list
    base: dict


@dataclass
class _Grid:
    """A checked grid: its config, output directory, planned arms and where they run."""

    cfg: AblationConfig
    out: Path
    arms: list
    device: str
    dtype: str | None
    threads: int | None
    """Torch CPU threads for demo-sized models (1), else None."""
    n_layers: int = 0

    @property
    def trained(self) -> list:
        return [a for a in self.arms if a.arm not in TRAINING_FREE_ARMS]


def _prepare(cfg: AblationConfig | str | os.PathLike, out: str | os.PathLike, device: str,
             dtype: str | None) -> _Grid:
    """Load and check the grid (every arm's layers and target modules on a meta-device skeleton, the
    training-free arms' inputs) before any weights load; write ``ablation_config.json`` and the plan."""
    from mechmed.io import ensure_dir, write_json
    from mechmed.models import cpu_threads_for, model_config
    from mechmed.runtime import check_device
    from mechmed.train import check_against_model

    device = check_device(device)
    if not isinstance(cfg, AblationConfig):
        cfg = AblationConfig.load(cfg)
    out = ensure_dir(Path(out))
    t = cfg.train
    spec = ModelSpec.of(t["model"])
    _, config, family, _ = model_config(spec.name, seed=cfg.seeds[0], **spec.options(placement=False))  # no weights
    n_layers = family.n_layers(config)
    arms = plan(cfg, n_layers)
    grid = _Grid(cfg, out, arms, device, dtype, cpu_threads_for(spec.name, device), n_layers)
    skeletons: dict = {}  # every arm's layers and target modules, before the base model is evaluated
    for a in grid.trained:
        check_against_model(arm_config(cfg, a), skeletons)
    check_training_free(cfg)
    if cfg.audit and audit_scores_path(cfg) is None:
        log.warning("%s: the selection audit finds no layer_scores.json (the training config's provenance "
                    "scores_file, or attribution:): it will compare the candidates with layer index only",
                    cfg.source)
    write_json(out / "ablation_config.json", {**cfg.to_dict(), "plan": [a.name for a in arms if a.arm in ARMS],
                                              "audit_arms": [a.name for a in arms if a.arm not in ARMS],
                                              "device": device, "dtype": dtype})
    _write_plan(grid)
    return grid


#: Where a grid writes its plan: one training config per trained arm, the grid's config, and the commands.
PLAN_DIR = "plan"


def _write_plan(grid: _Grid) -> Path:
    """``OUT/plan/``: ``ablation.yaml`` (the resolved grid), ``<arm>.yaml`` (each trained arm's resolved
    training config, runnable by ``mechmed train``) and ``commands.txt``: one self-contained command per
    base evaluation and per arm (e.g. one job-array task each, run from this directory), then the
    command that collects them into the table."""
    import shlex

    import yaml

    from mechmed.io import ensure_dir, write_text

    d = ensure_dir(grid.out / PLAN_DIR)
    write_text(d / "ablation.yaml", yaml.safe_dump(grid.cfg.to_dict(), sort_keys=False))
    for a in grid.trained:
        arm_config(grid.cfg, a).save(d / f"{a.name}.yaml")
    opts = [f"--device {shlex.quote(grid.device)}"] + ([f"--dtype {shlex.quote(grid.dtype)}"] if grid.dtype else [])
    head = f"mechmed ablate --config {shlex.quote(str(d / 'ablation.yaml'))} --out {shlex.quote(str(grid.out))}"
    names = [f"base-s{s}" for s in grid.cfg.seeds] + [a.name for a in grid.arms]
    lines = [f"{head} --arm {n} {' '.join(opts)}" for n in names]
    write_text(d / "commands.txt", "\n".join(lines) + f"\n# when every line above has run:\n{head} --collect\n")
    return d


def write_plan(cfg: AblationConfig | str | os.PathLike, out: str | os.PathLike, *, device: str = "cpu",
               dtype: str | None = None) -> Path:
    """Check the grid and write its plan (:func:`_write_plan`) without running anything; returns the
    plan directory. Run its ``commands.txt`` anywhere (a job array, other machines), put every
    finished ``arms/<name>`` and ``base-s<seed>`` directory under ``out``, then collect them
    (:func:`run_ablation` with ``collect=True``)."""
    return _prepare(cfg, out, device, dtype).out / PLAN_DIR


def run_arms(cfg: AblationConfig | str | os.PathLike, out: str | os.PathLike, names: Sequence[str], *,
             progress: bool = False, device: str = "cpu", dtype: str | None = None) -> dict:
    """Run only the named parts of the grid (``base-s<seed>`` or an arm's name from the plan), each
    as the whole grid would; returns name -> metrics. Finished ones are read back."""
    from mechmed.runtime import deterministic, torch_threads

    grid = _prepare(cfg, out, device, dtype)
    by_name = {a.name: a for a in grid.arms}
    bases = {f"base-s{s}": s for s in grid.cfg.seeds}
    unknown = [n for n in names if n not in by_name and n not in bases]
    if unknown:
        raise MechmedError(f"--arm {unknown[0]}: not in this grid's plan; choose from "
                           f"{', '.join([*bases, *by_name])}")
    done = {}
    with torch_threads(grid.threads), deterministic(grid.device):
        for n in names:
            if n in bases:
                done[n] = evaluate_base(grid.cfg, bases[n], grid.out, progress=progress, device=grid.device,
                                        dtype=grid.dtype)[0]
            elif by_name[n].arm in TRAINING_FREE_ARMS:
                done[n] = evaluate_training_free(grid.cfg, by_name[n], grid.out / "arms" / n, progress=progress,
                                                 device=grid.device, dtype=grid.dtype)
            else:
                done[n] = _run_arm(arm_config(grid.cfg, by_name[n]).to_dict(), str(grid.out / "arms" / n), None,
                                   grid.device, grid.dtype, progress)
    return done


def _check_collected(grid: _Grid) -> None:
    """Every base and arm of the plan is finished under ``out``, and each trained arm was trained
    with its planned config (layers, method, seed, loss, rank)."""
    import yaml

    missing = [f"base-s{s}" for s in grid.cfg.seeds if not (grid.out / f"base-s{s}" / "metrics.json").is_file()]
    missing += [a.name for a in grid.arms if not (grid.out / "arms" / a.name / "metrics.json").is_file()]
    if missing:
        raise MechmedError(f"--collect {grid.out}: {len(missing)} of the plan's runs are not finished there "
                           f"({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''}); run their lines of "
                           f"{grid.out / PLAN_DIR / 'commands.txt'} and put each directory under {grid.out}")
    keys = ("layers", "method", "seed", "consistency", "consistency_weight", "ce_weight", "rank", "model",
            "target_modules", "train_data", "eval_data")
    for a in grid.trained:
        path = grid.out / "arms" / a.name / "config.yaml"
        if not path.is_file():
            continue
        got = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        want = arm_config(grid.cfg, a).to_dict()
        bad = [k for k in keys if k in got and got[k] != want.get(k)]
        if bad:
            raise MechmedError(f"--collect: {path} was trained with {bad[0]} {got[bad[0]]!r}, the plan has "
                               f"{want.get(bad[0])!r}; re-run arm {a.name} from {grid.out / PLAN_DIR}")


def _distinct(jobs: dict) -> tuple[dict, dict]:
    """Arms whose training configs differ in their name alone (a selected window that is also the
    first layers: ``selected`` and ``early``) are trained once. Returns (the jobs to run, {arm: (the
    arm it is a copy of, its own config dict)}); an arm already finished is never a copy."""
    import json

    first, run, copies = {}, {}, {}
    for name, (d, run_dir) in jobs.items():
        key = json.dumps({**d, "provenance": {k: v for k, v in (d.get("provenance") or {}).items()
                                              if k != "ablation_arm"}}, sort_keys=True, default=str)
        if key in first and not (Path(run_dir) / "metrics.json").is_file():
            copies[name] = (first[key], d)
        else:
            first.setdefault(key, name)
            run[name] = (d, run_dir)
    return run, copies


def copy_arm(source: Path, dest: Path, cfg_dict: dict) -> dict:
    """``dest``: a copy of the finished arm ``source`` (trained with the same config under another
    name), its ``config.yaml`` naming ``dest``'s arm; returns its metrics. Written to a temporary
    directory, then renamed: a copy is there whole or not at all."""
    import json
    import shutil

    import yaml

    from mechmed.io import temp_dir, write_text

    if (dest / "metrics.json").is_file():
        return json.loads((dest / "metrics.json").read_text(encoding="utf-8"))
    tmp = temp_dir(dest.parent, prefix=f".{dest.name}.")
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        resolved = yaml.safe_load((tmp / "config.yaml").read_text(encoding="utf-8"))
        resolved["provenance"] = {**(resolved.get("provenance") or {}),
                                  "ablation_arm": (cfg_dict.get("provenance") or {}).get("ablation_arm", dest.name),
                                  "same_training_as": source.name}
        write_text(tmp / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        if dest.exists():
            shutil.rmtree(dest)  # an unfinished run of this arm
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((dest / "metrics.json").read_text(encoding="utf-8"))


def _parallel(grid: _Grid, jobs: dict, workers: int, devices: Sequence[str] | None, progress: bool) -> dict:
    """Train ``jobs`` (name -> (config dict, run dir)) in worker processes: ``workers`` of them on the
    grid's device, or, with ``devices``, one per device, each training its share of the arms one
    after another there (never two arms on one device)."""
    import multiprocessing as mp

    from mechmed.progress import progress_bar

    metrics: dict = {}
    names = list(jobs)
    if devices:
        lanes = [(dev, names[i::len(devices)]) for i, dev in enumerate(devices)]
        threads = grid.threads or max(1, (os.cpu_count() or 1) // len(devices))
        with cf.ProcessPoolExecutor(len(lanes), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_lane, [jobs[n] for n in lane], dev, threads, grid.dtype)
                       for dev, lane in lanes if lane]
            for fut in progress_bar(cf.as_completed(futures), desc="devices" if progress else None,
                                    total=len(futures)):
                metrics.update(fut.result())
        return metrics
    threads = grid.threads or max(1, (os.cpu_count() or 1) // workers)
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_arm, d, r, threads, grid.device, grid.dtype): name for name, (d, r) in jobs.items()}
        for fut in progress_bar(cf.as_completed(futures), desc="ablation arms" if progress else None,
                                total=len(futures)):
            metrics[futures[fut]] = fut.result()
    return metrics


def _evaluate_in_worker(what: str, cfg: AblationConfig, seed_or_arm, out: str, threads: int | None, device: str,
                        dtype: str | None):
    """The base evaluation (``what="base"``, a seed) or a training-free arm (``"free"``, an
    :class:`Arm`) in a worker process of :func:`_pool_all`."""
    from mechmed.runtime import deterministic, torch_threads

    with torch_threads(threads), deterministic(device):
        if what == "base":
            return evaluate_base(cfg, seed_or_arm, Path(out), device=device, dtype=dtype)
        return evaluate_training_free(cfg, seed_or_arm, Path(out), device=device, dtype=dtype)


def _pool_all(grid: _Grid, jobs: dict, workers: int, progress: bool) -> tuple[dict, dict]:
    """The trained arms (``jobs``), the training-free arms and the base evaluations in one pool of
    ``workers`` processes, longest first; returns (metrics by arm, base (metrics, pairs) by seed)."""
    import multiprocessing as mp

    from mechmed.progress import progress_bar

    cfg, out, device, dtype = grid.cfg, grid.out, grid.device, grid.dtype
    threads = grid.threads or max(1, (os.cpu_count() or 1) // workers)
    free = [a for a in grid.arms if a.arm in TRAINING_FREE_ARMS]
    # longest first, by their cost on the demo: a training-free arm with its null, the trained arms, prompt
    # ensembling (k phrasings per question), the other training-free arms, the base evaluations
    order = ([("free", a) for a in free if _null_applies(cfg, a)] + [("trained", name) for name in jobs]
             + sorted((("free", a) for a in free if not _null_applies(cfg, a)), key=lambda j: j[1].arm != "ensemble")
             + [("base", s) for s in cfg.seeds])
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {}
        for kind, what in order:
            if kind == "trained":
                futures[pool.submit(_run_arm, *jobs[what], threads, device, dtype)] = ("arm", what)
            elif kind == "free":
                futures[pool.submit(_evaluate_in_worker, "free", cfg, what, str(out / "arms" / what.name), threads,
                                    device, dtype)] = ("arm", what.name)
            else:
                futures[pool.submit(_evaluate_in_worker, "base", cfg, what, str(out), threads, device,
                                    dtype)] = ("base", what)
        metrics, base = {}, {}
        try:
            for fut in progress_bar(cf.as_completed(futures), desc="ablation arms" if progress else None,
                                    total=len(futures)):
                kind, key = futures[fut]
                (base if kind == "base" else metrics)[key] = fut.result()
        except BaseException:  # say what failed now, not after every other arm has finished
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return metrics, base


def _run_lane(jobs: list, device: str, threads: int | None, dtype: str | None) -> dict:
    """Arms one after another on one device (a worker process of :func:`_parallel`)."""
    return {Path(run_dir).name: _run_arm(d, run_dir, threads, device, dtype) for d, run_dir in jobs}


def run_ablation(cfg: AblationConfig | str | os.PathLike, out: str | os.PathLike, *, progress: bool = False,
                 workers: int | None = None, device: str = "cpu", dtype: str | None = None,
                 devices: Sequence[str] | None = None, collect: bool = False) -> AblationResult:
    """Train and evaluate every arm of the grid, resuming what is there; write the results table.

    The base evaluation and every arm run on ``device`` (a torch device or ``auto``) with base
    weights in ``dtype``; parallel workers share it, or, with ``devices`` (e.g. ``["cuda:0",
    "cuda:1"]``), each device trains its share of the arms, one at a time. ``collect=True`` runs
    nothing: it checks that every base and arm of the plan is finished under ``out`` (trained here
    or elsewhere, :func:`write_plan`) and writes the table from them."""
    from mechmed.io import write_json, write_text
    from mechmed.progress import progress_bar
    from mechmed.runtime import check_device, deterministic, torch_threads

    grid = _prepare(cfg, out, device, dtype)
    cfg, out, arms, t = grid.cfg, grid.out, grid.arms, grid.cfg.train
    device, small = grid.device, grid.threads
    workers = workers or cfg.workers
    devices = [check_device(d) for d in devices] if devices else None
    if collect:
        _check_collected(grid)
    jobs, copies = _distinct({a.name: (arm_config(cfg, a).to_dict(), str(out / "arms" / a.name))
                              for a in grid.trained})
    if workers > 1 and not devices and not collect:  # one pool for everything: no core waits while another evaluates
        metrics, base = _pool_all(grid, jobs, workers, progress)
    else:
        with torch_threads(small), deterministic(device):
            base = {s: evaluate_base(cfg, s, out, progress=progress, device=device, dtype=dtype) for s in cfg.seeds}
            metrics = {a.name: evaluate_training_free(cfg, a, out / "arms" / a.name, progress=progress, device=device,
                                                      dtype=dtype, nulls=not collect)
                       for a in arms if a.arm in TRAINING_FREE_ARMS}
        if devices:
            metrics.update(_parallel(grid, jobs, workers, devices, progress))
        else:
            for name in progress_bar(list(jobs), desc="ablation arms" if progress else None):
                metrics[name] = _run_arm(*jobs[name], small, device, dtype, progress)
    for name, (source, d) in copies.items():
        metrics[name] = copy_arm(out / "arms" / source, out / "arms" / name, d)

    rows, pairs_by_row = [], {}
    for s in cfg.seeds:
        bm, bp = base[s]
        rows.append({**result_row("base", "none", s, [], 0, bm, bp, None, None, False, str(out / f"base-s{s}")),
                     "_n_questions": bm["n_questions"]})
        pairs_by_row[len(rows) - 1] = bp
    arm_pairs = {a.name: _read_pairs(out / "arms" / a.name / "after" / "pairs.jsonl") for a in arms}
    for a in (a for a in arms if a.arm in ARMS):  # the audit's own candidates are reported in its section
        m = metrics[a.name]
        ce_name = Arm("ce_only", a.method, a.seed, ()).name
        ce = arm_pairs.get(ce_name) if a.arm != "ce_only" else None
        row = result_row(a.arm, a.method, a.seed, a.layers, m["trainable_parameters"], m["after"], arm_pairs[a.name],
                         base[a.seed][1], ce, m["collapsed"], str(out / "arms" / a.name))
        row["_n_questions"] = m["after"]["n_questions"]
        if m.get("null"):
            row["null"] = m["null"]
        rows.append(row)
        pairs_by_row[len(rows) - 1] = arm_pairs[a.name]
    eval_dirs = [Path(r["run_dir"]) / ("" if r["arm"] == "base" else "after") for r in rows]
    names = list(t.get("extra_eval") or {})
    sets_by_row = {i: evaluation_sets(d, names) for i, d in enumerate(eval_dirs)}
    base_row = {r["seed"]: i for i, r in enumerate(rows) if r["arm"] == "base"}
    for i, r in enumerate(rows):
        base_sets = None if r["arm"] == "base" else sets_by_row[base_row[r["seed"]]]
        r["sets"] = {n: _set_stats(p, (base_sets or {}).get(n)) for n, p in sets_by_row[i].items()}
        r["by_phenomenon"] = _by_phenomenon(pairs_by_row[i])
    summary = summarise(rows, pairs_by_row, {s: base[s][1] for s in cfg.seeds}, sets_by_row)
    best = against_best_trained(rows, summary, pairs_by_row)
    for r in rows + summary:
        r.pop("_n_questions", None)
    base_summary = next(r for r in summary if r["arm"] == "base")
    result = {"rows": rows, "summary": summary, "base": base_summary, "best_trained": best, "config": cfg.to_dict()}
    if cfg.audit:
        result["audit"] = selection_audit(grid, {s: base[s][1] for s in cfg.seeds}, arm_pairs)
    write_text(out / "results.csv", table_csv(rows))
    write_text(out / "summary.csv", table_csv(summary))
    write_json(out / "results.json", result)
    log.info("ablation: %d arms in %s\n%s", len(arms), out, format_table(summary))
    if cfg.audit:
        log.info("selection audit: %s", result["audit"]["pooled"]["verdict"])
    return AblationResult(out, rows, summary, base_summary)


def audit_scores_path(cfg: AblationConfig, run_dir: Path | None = None) -> Path | None:
    """The ``layer_scores.json`` the selection was made on: the training config's provenance
    ``scores_file``, else the ``attribution`` directory's; for a run directory that moved, the same
    names under it (``mechmed demo``'s layout: ``<run>/attribute``). None when there is none."""
    prov = cfg.train.get("provenance") or {}
    tries = [Path(prov["scores_file"])] if prov.get("scores_file") else []
    tries += [Path(cfg.attribution) / "layer_scores.json"] if cfg.attribution else []
    if run_dir is not None:
        tries += [run_dir.parent / "attribute" / "layer_scores.json"]
    return next((p for p in tries if p.is_file()), None)


def _audit_scores(cfg: AblationConfig, run_dir: Path | None = None) -> dict:
    from mechmed.io import read_json

    path = audit_scores_path(cfg, run_dir)
    if path is None:
        return {"scores": {}}
    return read_json(path, "the audit's layer scores")


def _select_criterion(cfg: AblationConfig) -> tuple[str, str]:
    """(score key, criterion name) of the selection in the training config's provenance."""
    from mechmed.selection_audit import criterion_of

    prov = cfg.train.get("provenance") or {}
    key = prov.get("score_key") or "gain_flipped"
    return key, criterion_of(key, prov.get("strategy") or "window")


def selection_audit(grid: _Grid, base_pairs: dict, arm_pairs: dict) -> dict:
    """:func:`mechmed.selection_audit.analyse` of an audited grid: one unit per (method, seed), with the
    attribution its selection was made on (:func:`audit_scores_path`); each candidate row names the arm
    that trained it. Seeds of a model built per seed have their own questions; otherwise the units share
    them and are resampled together."""
    from mechmed.selection_audit import AuditUnit, analyse

    cfg = grid.cfg
    scores = _audit_scores(cfg)
    own_data = not shared_questions(base_pairs)
    plan = audit_plan(cfg, grid.arms, grid.n_layers)
    units = [AuditUnit(f"{method} seed {seed}", base_pairs[seed], {c.name: arm_pairs[a.name] for c, a, _ in cands},
                       [c for c, _, _ in cands], scores, tuple(cfg.train["layers"]), f"{seed}|" if own_data else "")
             for (method, seed), cands in plan.items()]
    key, criterion = _select_criterion(cfg)
    res = analyse(units, n_bootstrap=cfg.audit["n_bootstrap"], seed=cfg.audit["seed"], select_key=key,
                  select_criterion=criterion)
    for u, cands in zip(res["units"], plan.values(), strict=True):
        arm_of = {c.name: a.name for c, a, _ in cands}
        for r in u["candidates"]:
            r["arm"] = arm_of[r["name"]]
    return res


def pool_seed_runs(ablation_dirs: Sequence[str | os.PathLike]) -> dict:
    """One summary over ablations of one design that differ in their seed alone (``mechmed demo --seed S``
    writes one per seed, each with its own model and data): every row of every run, and
    :func:`summarise` over all of them. Each seed's questions are their own clusters, so each pooled
    clustered p (``*_clustered``) is an exact sign-flip test over (seed, question) clusters, stratified
    by seed: a claim it supports holds over the seeds, not in one of them. Returns ``{"rows",
    "summary", "best_trained", "runs"}``."""
    from mechmed.io import read_json

    rows: list[dict] = []
    pairs_by_row, sets_by_row, base_pairs, runs = {}, {}, {}, []
    for d in map(Path, ablation_dirs):
        res = read_json(d / "results.json", "ablation results")
        names = list((res.get("config", {}).get("train") or {}).get("extra_eval") or {})
        for r in res["rows"]:
            if r["seed"] in base_pairs and r["arm"] == "base":
                raise MechmedError(f"{d}: seed {r['seed']} is in two of the runs to pool; give one run per seed")
            r = dict(r)
            run_dir = d / Path(r["run_dir"]).name if r["arm"] == "base" else d / "arms" / Path(r["run_dir"]).name
            eval_dir = run_dir if r["arm"] == "base" else run_dir / "after"
            r["run_dir"], r["_n_questions"] = str(run_dir), read_json(eval_dir / "metrics.json", "metrics")["n_questions"]
            pairs_by_row[len(rows)] = _read_pairs(eval_dir / "pairs.jsonl")
            sets_by_row[len(rows)] = evaluation_sets(eval_dir, names)
            if r["arm"] == "base":
                base_pairs[r["seed"]] = pairs_by_row[len(rows)]
            rows.append(r)
        runs.append(str(d))
    if not rows:
        raise MechmedError("pool: no runs given; give the ablation directories of one run per seed")
    summary = summarise(rows, pairs_by_row, base_pairs, sets_by_row)
    best = against_best_trained(rows, summary, pairs_by_row)
    for r in rows + summary:
        r.pop("_n_questions", None)
    return {"rows": rows, "summary": summary, "best_trained": best, "runs": runs}


def pool_audits(ablation_dirs: Sequence[str | os.PathLike]) -> dict:
    """The selection audits of ablations that differ in their seed alone (``mechmed demo --seed S --audit``),
    analysed together (:func:`mechmed.selection_audit.analyse`): one unit per seed with its own questions,
    attribution and selected window; pooled numbers average the seeds."""
    from mechmed.io import read_json
    from mechmed.selection_audit import AuditUnit, Candidate, analyse

    units, cfg = [], None
    for d in map(Path, ablation_dirs):
        res = read_json(d / "results.json", "ablation results")
        if not res.get("audit"):
            raise MechmedError(f"{d}: ran without the selection audit; rerun it with audit (mechmed demo --audit)")
        cfg = AblationConfig.from_dict(res.get("config") or {}, base_dir=d, source=str(d / "results.json"))
        scores = _audit_scores(cfg, d)
        for u in res["audit"]["units"]:
            seed = int(u["label"].rsplit(" ", 1)[1])
            cands = [Candidate(r["name"], r["kind"], tuple(r["layers"]), r["rank"]) for r in u["candidates"]]
            arms = {r["name"]: _read_pairs(d / "arms" / r["arm"] / "after" / "pairs.jsonl") for r in u["candidates"]}
            units.append(AuditUnit(u["label"], _read_pairs(d / f"base-s{seed}" / "pairs.jsonl"), arms, cands, scores,
                                   tuple(u["selected"]), f"{d}|{seed}|"))
    if cfg is None:
        raise MechmedError("pool: no runs given; give the ablation directories of one run per seed")
    key, criterion = _select_criterion(cfg)
    return analyse(units, n_bootstrap=cfg.audit["n_bootstrap"], seed=cfg.audit["seed"], select_key=key,
                   select_criterion=criterion)
