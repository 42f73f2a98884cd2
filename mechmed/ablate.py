"""Layer-range ablations: one grid of training arms, each trained and evaluated the same way.

An arm is a layer range and a loss (see :data:`ARMS`): the mechanistically ``selected`` range (the
training config's ``layers``, from ``mechmed select-layers``), baseline ranges of the same width
(``early``, ``middle``, ``late``, ``random``), ``all`` layers, and two loss controls on the selected
range: ``ce_only`` (cross-entropy, no consistency term) and ``consistency_only`` (the seed paper's
symmetric KL and no cross-entropy, which it found to collapse to one answer). The grid is arms × methods (``lora``,
``spectral_moe``) × seeds; ``base`` (no training) is evaluated once per seed.

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
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mechmed.config import ARMS, CONSISTENCY_ONLY_LOSS, DEFAULT_ARMS, RANGE_ARMS  # noqa: F401  (public here too)
from mechmed.errors import MechmedError
from mechmed.io import read_jsonl

log = logging.getLogger(__name__)

RESULT_KEYS = ("arm", "method", "seed", "layers", "trainable_parameters", "flip_rate", "flip_ci", "margin_diff",
               "margin_diff_ci", "canonical_accuracy", "accuracy_ci", "yes_rate", "collapsed", "p_vs_base",
               "p_vs_ce_only", "n_pairs", "run_dir")


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
        self.arms = [a for a in ARMS if a in self.arms and a != "base"]

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
        for method in cfg.methods:
            for seed in cfg.seeds:
                over: dict = {}
                layers = baseline(arm, n_layers, width, seed=seed).layers if arm in RANGE_ARMS else selected
                if arm == "ce_only":
                    over["consistency_weight"] = 0.0
                elif arm == "consistency_only":  # the paper's pure-consistency control: its symmetric KL
                    over.update(ce_weight=0.0, consistency=CONSISTENCY_ONLY_LOSS)
                if cfg.match_parameters and len(layers) != width:
                    rank = max(1, round(cfg.train["rank"] * width / len(layers)))
                    if method == "spectral_moe":
                        n = cfg.train.get("spectral", {}).get("n_experts", 8)
                        rank = max(n, rank - rank % n)
                    over["rank"] = rank
                out.append(Arm(arm, method, seed, tuple(layers), tuple(sorted(over.items()))))
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
    from mechmed.runtime import torch_threads
    from mechmed.train import train

    out = Path(run_dir)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    cfg = TrainConfig.from_dict(cfg_dict, source=str(out / "config.yaml"))
    with torch_threads(threads):  # restored: in-process arms run in the caller's process
        return train(cfg, out, resume=(out / "checkpoint").exists(), evaluate_before=False, png=False, device=device,
                     dtype=dtype, progress=f"arm {out.name}" if progress else False).metrics


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


def _set_stats(pairs: dict, base: dict | None) -> dict:
    """Flip rate with its Wilson interval over one evaluation set, and McNemar against the base's."""
    from mechmed import stats

    flips = [bool(v["flip"]) for v in pairs.values()]
    if not flips:
        return {"n_pairs": 0, "flip_rate": None, "flip_ci": [None, None], "p_vs_base": None}
    ci = stats.wilson_interval(sum(flips), len(flips))
    return {"n_pairs": len(flips), "flip_rate": sum(flips) / len(flips), "flip_ci": [ci.low, ci.high],
            "p_vs_base": None if base is None else _mcnemar(base, pairs)}


def _by_phenomenon(pairs: dict) -> dict:
    """Flip rate per phenomenon over per-pair rows."""
    groups: dict = {}
    for v in pairs.values():
        groups.setdefault(v.get("phenomenon") or "other", []).append(bool(v["flip"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _phenomenon_stats(pairs: dict, base: dict | None) -> dict:
    """:func:`_set_stats` of each phenomenon's pairs (flip rate, Wilson interval, McNemar against the
    base's pairs of that phenomenon)."""
    names = sorted({v.get("phenomenon") or "other" for v in pairs.values()})
    return {n: _set_stats(_of_phenomenon(pairs, n), None if base is None else _of_phenomenon(base, n))
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

    from mechmed.models import load_model
    from mechmed.train import evaluate_sets, resolve_pairs

    d = out / f"base-s{seed}"
    if (d / "metrics.json").is_file() and (d / "pairs.jsonl").is_file():
        return json.loads((d / "metrics.json").read_text(encoding="utf-8")), _read_pairs(d / "pairs.jsonl")
    t = cfg.train
    bundle = load_model(t["model"], answer_words=tuple(t["answer_words"]), seed=seed, device=device, dtype=dtype,
                        prompt_template=t.get("prompt_template"))
    pairs = resolve_pairs(t["eval_data"], split="eval", image_root=t.get("image_root"), seed=seed)
    extra = {name: resolve_pairs(data, split="eval", image_root=t.get("image_root"), seed=seed)
             for name, data in (t.get("extra_eval") or {}).items()}
    # the main set's metrics.json is written last: its presence marks the base as done
    evaluate_sets(bundle, pairs, extra, d, seed=seed, progress=progress)
    return json.loads((d / "metrics.json").read_text(encoding="utf-8")), _read_pairs(d / "pairs.jsonl")


def _mcnemar(a: dict, b: dict) -> float | None:
    """Exact McNemar p of per-pair flips, over the pairs both evaluations share."""
    from mechmed import stats

    common = sorted(set(a) & set(b))
    if not common:
        return None
    return float(stats.mcnemar_from_pairs([a[i]["flip"] for i in common], [b[i]["flip"] for i in common]).p_value)


def result_row(arm: str, method: str, seed: int, layers, n_params: int, m: dict, pairs: dict,
               base_pairs: dict | None, ce_pairs: dict | None, collapsed: bool, run_dir: str) -> dict:
    """One row of the results table from an evaluation's metrics and per-pair rows."""
    from mechmed import stats

    n_q = m["n_questions"]
    acc = stats.wilson_interval(m["n_correct"]["original"], n_q)
    return {
        "arm": arm, "method": method, "seed": seed, "layers": list(layers), "trainable_parameters": n_params,
        "flip_rate": m["flip_rate"], "flip_ci": list(m["flip_rate_ci"]),
        "margin_diff": m["margin_diff"], "margin_diff_ci": list(m["margin_diff_ci"]),
        "canonical_accuracy": m["accuracy"]["original"], "accuracy_ci": [acc.low, acc.high],
        "yes_rate": m["yes_rate"], "collapsed": bool(collapsed),
        "p_vs_base": _mcnemar(base_pairs, pairs) if base_pairs is not None else None,
        "p_vs_ce_only": _mcnemar(ce_pairs, pairs) if ce_pairs is not None else None,
        "n_pairs": m["n_pairs"], "run_dir": run_dir,
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


def _pair_unit(runs: Sequence[dict], base: dict | None) -> dict:
    """:func:`_set_stats` with the pair as the unit, for seeds that ran on the same pairs: each pair's
    flip is its mean over the seeds (``runs``, per-pair rows by id); the interval is a bootstrap over
    pairs, and p the paired bootstrap of (base flip − mean flip) over pairs (10,000 resamples)."""
    from mechmed import stats

    ids = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    if not ids:
        return {"n_pairs": 0, "flip_rate": None, "flip_ci": [None, None], "p_vs_base": None}
    f = np.mean([[float(r[i]["flip"]) for i in ids] for r in runs], axis=0)
    ci = stats.bootstrap_ci(f, n_resamples=2000, seed=0)
    p = None
    if base is not None:
        b = np.array([float(base[i]["flip"]) for i in ids])
        p = float(stats.paired_bootstrap(b, f, n_resamples=10_000, seed=0).p_value)
    return {"n_pairs": len(ids), "flip_rate": float(f.mean()), "flip_ci": [ci.low, ci.high], "p_vs_base": p}


def _by_pair(summary: list[dict], pairs_by_row: dict, sets_by_row: dict | None, groups: dict, ids: list) -> None:
    """Redo ``summary``'s tests with the pair as the unit (seeds on the same pairs, see
    :func:`shared_pairs`): pooling them as new pairs would count each pair once per seed."""
    from mechmed import stats

    base_idx = groups[("base", "none")]
    base_run = pairs_by_row[base_idx[0]]
    ce_runs = {m: [pairs_by_row[i] for i in idx] for (a, m), idx in groups.items() if a == "ce_only"}

    def mean_over_seeds(runs: list, key: str) -> np.ndarray:
        return np.mean([[float(run[i][key]) for i in ids] for run in runs], axis=0)

    for r in summary:
        idx = groups[(r["arm"], r["method"])]
        runs = [pairs_by_row[i] for i in idx]
        is_base = r["arm"] == "base"
        main = _set_stats(base_run, None) if is_base else _pair_unit(runs, base_run)
        md = stats.bootstrap_ci(mean_over_seeds(runs, "margin_diff"), n_resamples=2000, seed=0)
        ce = ce_runs.get(r["method"]) if r["arm"] not in ("ce_only", "base") else None
        p_ce = None if ce is None else float(stats.paired_bootstrap(
            mean_over_seeds(ce, "flip"), mean_over_seeds(runs, "flip"), n_resamples=10_000, seed=0).p_value)
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

    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["arm"], r["method"]), []).append(i)
    ce_key = {m: idx for (a, m), idx in groups.items() if a == "ce_only"}
    out = []
    for (arm, method), idx in groups.items():
        pooled = _pool(pairs_by_row, rows, idx)
        flips = np.array([v["flip"] for v in pooled.values()])
        deltas = np.array([v["margin_diff"] for v in pooled.values()])
        n_pairs = sum(rows[i]["n_pairs"] for i in idx)
        acc_k = sum(round(rows[i]["canonical_accuracy"] * _n_questions(rows[i])) for i in idx)
        acc_n = sum(_n_questions(rows[i]) for i in idx)
        f_ci = stats.wilson_interval(int(flips.sum()), len(flips))
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
                sets[name] = _set_stats(pooled_set, base_set)
        out.append({
            "arm": arm, "method": method, "seed": None, "n_seeds": len(idx),
            "layers": rows[idx[0]]["layers"], "trainable_parameters": rows[idx[0]]["trainable_parameters"],
            "flip_rate": float(flips.mean()), "flip_ci": [f_ci.low, f_ci.high],
            "flip_rate_seeds": [rows[i]["flip_rate"] for i in idx],
            "margin_diff": float(deltas.mean()), "margin_diff_ci": [md.low, md.high],
            "canonical_accuracy": acc_k / acc_n, "accuracy_ci": [a_ci.low, a_ci.high],
            "yes_rate": float(np.mean([rows[i]["yes_rate"] for i in idx])),
            "collapsed": any(rows[i]["collapsed"] for i in idx),
            "p_vs_base": None if arm == "base" else _mcnemar(base_pool, pooled),
            "p_vs_ce_only": _mcnemar(ce, pooled) if ce else None,
            "n_pairs": n_pairs, "run_dir": None, "sets": sets, "by_phenomenon": _by_phenomenon(pooled),
            "phenomena": _phenomenon_stats(pooled, None if arm == "base" else base_pool),
            "unit": "pair" if len(base_pairs) == 1 else "pair × seed", "test": "McNemar",
        })
    ids = shared_pairs(base_pairs)
    if ids is not None:  # the same pairs in every seed: test with the pair as the unit
        _by_pair(out, pairs_by_row, sets_by_row, groups, ids)
    return out


def _n_questions(row: dict) -> int:
    return row.get("_n_questions", 0)


def table_csv(rows: Sequence[dict]) -> str:
    """The results as CSV (intervals split into _lo/_hi columns, layers as 'a-b' or 'a,b,c')."""
    from mechmed.sites import format_layers

    buf = io.StringIO()
    cols = ["arm", "method", "seed", "layers", "trainable_parameters", "flip_rate", "flip_lo", "flip_hi",
            "margin_diff", "margin_diff_lo", "margin_diff_hi", "canonical_accuracy", "accuracy_lo", "accuracy_hi",
            "yes_rate", "collapsed", "p_vs_base", "p_vs_ce_only", "n_pairs"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r["arm"], r["method"], "" if r["seed"] is None else r["seed"], format_layers(r["layers"]),
                    r["trainable_parameters"], r["flip_rate"], *r["flip_ci"], r["margin_diff"], *r["margin_diff_ci"],
                    r["canonical_accuracy"], *r["accuracy_ci"], r["yes_rate"], r["collapsed"],
                    "" if r["p_vs_base"] is None else r["p_vs_base"],
                    "" if r["p_vs_ce_only"] is None else r["p_vs_ce_only"], r["n_pairs"]])
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


def run_ablation(cfg: AblationConfig | str | os.PathLike, out: str | os.PathLike, *, progress: bool = False,
                 workers: int | None = None, device: str = "cpu", dtype: str | None = None) -> AblationResult:
    """Train and evaluate every arm of the grid, resuming what is there; write the results table.

    The base evaluation and every arm run on ``device`` (a torch device or ``auto``) with base
    weights in ``dtype``; parallel workers share it."""
    from mechmed.io import ensure_dir, write_json, write_text
    from mechmed.models import cpu_threads_for, model_config
    from mechmed.progress import progress_bar
    from mechmed.runtime import check_device, torch_threads

    device = check_device(device)
    if not isinstance(cfg, AblationConfig):
        cfg = AblationConfig.load(cfg)
    out = ensure_dir(Path(out))
    workers = workers or cfg.workers
    t = cfg.train
    _, config, family, _ = model_config(t["model"], seed=cfg.seeds[0])  # the layer count needs no weights
    n_layers = family.n_layers(config)
    arms = plan(cfg, n_layers)
    from mechmed.train import check_against_model

    skeletons: dict = {}  # every arm's layers and target modules, before the base model is evaluated
    for a in arms:
        check_against_model(arm_config(cfg, a), skeletons)
    write_json(out / "ablation_config.json", {**cfg.to_dict(), "plan": [a.name for a in arms], "device": device,
                                              "dtype": dtype})

    small = cpu_threads_for(t["model"], device)  # 1 for demo-sized models on the CPU, else None
    with torch_threads(small):
        base = {s: evaluate_base(cfg, s, out, progress=progress, device=device, dtype=dtype) for s in cfg.seeds}
    jobs = {a.name: (arm_config(cfg, a).to_dict(), str(out / "arms" / a.name)) for a in arms}
    metrics: dict = {}
    if workers > 1:
        import multiprocessing as mp

        threads = small or max(1, (os.cpu_count() or 1) // workers)
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_arm, d, r, threads, device, dtype): name for name, (d, r) in jobs.items()}
            for fut in progress_bar(cf.as_completed(futures), desc="ablation arms" if progress else None,
                                    total=len(futures)):
                metrics[futures[fut]] = fut.result()
    else:
        for name in progress_bar(list(jobs), desc="ablation arms" if progress else None):
            metrics[name] = _run_arm(*jobs[name], small, device, dtype, progress)

    rows, pairs_by_row = [], {}
    for s in cfg.seeds:
        bm, bp = base[s]
        rows.append({**result_row("base", "none", s, [], 0, bm, bp, None, None, False, str(out / f"base-s{s}")),
                     "_n_questions": bm["n_questions"]})
        pairs_by_row[len(rows) - 1] = bp
    arm_pairs = {a.name: _read_pairs(out / "arms" / a.name / "after" / "pairs.jsonl") for a in arms}
    for a in arms:
        m = metrics[a.name]
        ce_name = Arm("ce_only", a.method, a.seed, ()).name
        ce = arm_pairs.get(ce_name) if a.arm != "ce_only" else None
        row = result_row(a.arm, a.method, a.seed, a.layers, m["trainable_parameters"], m["after"], arm_pairs[a.name],
                         base[a.seed][1], ce, m["collapsed"], str(out / "arms" / a.name))
        row["_n_questions"] = m["after"]["n_questions"]
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
    for r in rows + summary:
        r.pop("_n_questions", None)
    base_summary = next(r for r in summary if r["arm"] == "base")
    result = {"rows": rows, "summary": summary, "base": base_summary, "config": cfg.to_dict()}
    write_text(out / "results.csv", table_csv(rows))
    write_text(out / "summary.csv", table_csv(summary))
    write_json(out / "results.json", result)
    log.info("ablation: %d arms in %s\n%s", len(arms), out, format_table(summary))
    return AblationResult(out, rows, summary, base_summary)
