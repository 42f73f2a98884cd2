"""The whole chain on one model and pair set: what ``mechmed demo`` runs.

model + data → ``sae_check/`` (do the SAEs reconstruct the model?) → ``attribute/`` (which layers
carry the flips?) → ``train.yaml`` (the selected range) → ``ablation/`` (train the selected range,
baseline ranges and loss controls; evaluate each against the base) → ``report.html`` /
``report.md``. Each stage writes its own directory under ``out`` and is skipped when its output is
already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Arms the demo ablates: the selected range, early, late and all layers, the two loss controls,
#: activation consistency, and the three training-free fixes (clamp, steer, ensemble).
DEMO_ARMS = ("selected", "early", "late", "all", "ce_only", "consistency_only", "act", "clamp", "steer", "ensemble")


@dataclass
class PipelineResult:
    out: Path
    stages: dict = field(default_factory=dict)
    """Seconds per stage (0 where the stage's output was reused)."""
    selected: list = field(default_factory=list)
    report: dict = field(default_factory=dict)


def _say(msg: str, echo: bool) -> None:
    if echo:
        print(msg, flush=True)
    log.info(msg)


class _ArmWatcher:
    """Says each ablation arm as it finishes (its ``metrics.json`` appears), while ``run_ablation``
    trains the grid in worker processes; a thread polling the run directory."""

    def __init__(self, ablation_dir: Path, total: int, echo: bool, every: float = 2.0):
        import threading

        self.dir, self.total, self.echo, self.every = ablation_dir, total, echo, every
        self.seen = set(self._finished())
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _finished(self) -> list[Path]:
        return sorted(self.dir.glob("base-s*/metrics.json")) + sorted(self.dir.glob("arms/*/metrics.json"))

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        import json

        for path in self._finished():
            if path in self.seen:
                continue
            try:
                m = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # still being written: next poll
                continue
            self.seen.add(path)
            name = path.parent.name
            if name.startswith("base-"):
                _say(f"[ablation] base model evaluated: flip rate {m['flip_rate']:.3f}, "
                     f"accuracy {m['accuracy']['original']:.3f}", self.echo)
                continue
            done = sum(1 for p in self.seen if p.parent.parent.name == "arms")
            after = m.get("after") or {}
            detail = (f": flip rate {after['flip_rate']:.3f}, accuracy {after['accuracy']['original']:.3f}"
                      if "flip_rate" in after else "")
            flag = " (collapsed)" if m.get("collapsed") else ""
            _say(f"[ablation] arm {done}/{self.total} {name} finished at {time.perf_counter() - self.t0:.0f} s"
                 f"{detail}{flag}", self.echo)

    def __enter__(self):
        n = sum(1 for p in self.seen if p.parent.parent.name == "arms")
        if n:
            _say(f"[ablation] reusing {n} finished arm(s)", self.echo)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self.poll()


def run_pipeline(out: str | os.PathLike = "runs/demo", *, model: str = "demo", data: str = "demo",
                 saes: str = "demo", seed: int = 0, width: int = 3, arms=DEMO_ARMS, methods=("lora",),
                 seeds=None, workers: int = 2, max_pairs: int = 200, echo: bool = False, device: str = "cpu",
                 dtype: str | None = None, audit: dict | bool | None = None) -> PipelineResult:
    """Run every stage into ``out`` (see module doc) on ``device`` (or ``auto``) in ``dtype``;
    ``echo`` prints a line per stage and per finished ablation arm; ``audit`` adds the selection audit to
    the grid (:mod:`mechmed.selection_audit`; true or the ablation config's ``audit`` mapping)."""
    from mechmed.figures import png_session, shared_plotly
    from mechmed.io import ensure_dir
    from mechmed.models import cpu_threads_for
    from mechmed.runtime import check_device, deterministic, torch_threads, warn_if_not_deterministic

    device = check_device(device)
    warn_if_not_deterministic(model)
    out = ensure_dir(Path(out))
    # one headless browser for every PNG the stages write; one torch thread for demo-sized models
    with png_session(), shared_plotly(out), torch_threads(cpu_threads_for(model, device)), deterministic(device):
        return _run(out, model=model, data=data, saes=saes, seed=seed, width=width, arms=arms, methods=methods,
                    seeds=seeds, workers=workers, max_pairs=max_pairs, echo=echo, device=device, dtype=dtype,
                    audit=audit)


def _run(out: Path, *, model, data, saes, seed, width, arms, methods, seeds, workers, max_pairs, echo, device,
         dtype, audit) -> PipelineResult:
    from mechmed.ablate import AblationConfig, run_ablation
    from mechmed.config import TrainConfig
    from mechmed.io import ensure_dir
    from mechmed.runtime import cache_root
    from mechmed.selection import P_BEST_THRESHOLD
    from mechmed.sources import get
    from mechmed.stages import run_attribute, run_sae_check, run_select_layers

    res = PipelineResult(out)

    def stage(name: str, done: bool, fn):
        t0 = time.perf_counter()
        if done:
            _say(f"[{name}] reusing {out}", echo)
        else:
            fn()
        res.stages[name] = round(time.perf_counter() - t0, 1)
        if not done:
            _say(f"[{name}] done in {res.stages[name]:.1f} s", echo)

    source = get(model) if ":" not in str(model) else None
    if source is not None:
        _say(f"[model] the {source.name} model and data (cached under {cache_root()}; a first run builds them)", echo)

        def build():
            path = source.model_dir(seed=seed)
            source.data_dir(seed=seed)
            if source.describe is not None:
                _say(f"[model] {source.describe(path)}", echo)

        stage("model", False, build)

    sae_source = get(saes) if saes and ":" not in str(saes) else None
    if sae_source is not None and not (out / "sae_check" / "sae_check.json").is_file():
        _say(f"[sae_check] the {sae_source.name} SAEs, one per layer (trained on first use, about a minute on "
             "2 cores, then cached), against each prompt set", echo)
    stage("sae_check", (out / "sae_check" / "sae_check.json").is_file(),
          lambda: run_sae_check(model, saes, "all", out=str(out / "sae_check"), seed=seed, device=device,
                                dtype=dtype))
    stage("attribute", (out / "attribute" / "layer_scores.json").is_file(),
          lambda: run_attribute(model, data, saes, str(out / "attribute"), max_pairs=max_pairs, seed=seed,
                                progress=echo, device=device, dtype=dtype))
    scores_file = out / "attribute" / "layer_scores.json"
    attributed = json.loads(scores_file.read_text(encoding="utf-8"))
    if attributed.get("split", "eval") in ("eval", "test"):  # no split recorded: an earlier mechmed, held-out pairs
        log.warning("%s was attributed on held-out pairs: the layers and clamp's features are chosen on pairs the "
                    "grid evaluates; delete %s and %s to choose them on training pairs", scores_file,
                    scores_file.parent, out / "train.yaml")
    cfg_path = out / "train.yaml"

    def select():
        import json

        scores = out / "attribute" / "layer_scores.json"
        table = json.loads(scores.read_text(encoding="utf-8"))
        extra = {}  # select-layers' default score, unless no pair flipped
        if not table.get("n_flipped"):
            extra["score"] = next(k for k in ("gain_all", "attr_all") if k in table["scores"])
            _say(f"[select_layers] no attributed pair flipped: selecting on {extra['score']} (all pairs)", echo)
        run_select_layers(str(scores), str(cfg_path), width=width, model=model, data=data, saes=saes, seed=seed,
                          **extra)

    stage("select_layers", cfg_path.is_file(), select)
    train_cfg = TrainConfig.load(cfg_path)
    res.selected = list(train_cfg.layers)
    unc = (train_cfg.provenance or {}).get("uncertainty")
    sure = (f"; the best window in {unc['p_chosen']:.0%} of {unc['n_bootstrap']} resamples of the attributed "
            "questions" + (" (a near-tie)" if unc["p_chosen"] < P_BEST_THRESHOLD else "")) if unc else ""
    _say(f"[select_layers] selected layers {res.selected}{sure} ({cfg_path})", echo)
    ab = AblationConfig(train={k: v for k, v in train_cfg.to_dict().items() if k != "config_version"},
                        arms=list(arms), methods=list(methods), seeds=list(seeds or [seed]), workers=workers,
                        attribution=str(out / "attribute"), saes=saes or None, audit=audit, source=str(cfg_path))
    result = None

    from mechmed.config import TRAINING_FREE_ARMS

    trained = [a for a in ab.arms if a not in TRAINING_FREE_ARMS]
    free = [a for a in ab.arms if a in TRAINING_FREE_ARMS]
    n_arms = (len(trained) * len(ab.methods) + len(free)) * len(ab.seeds)
    what = [f"{', '.join(trained)} × {', '.join(ab.methods)}"] if trained else []
    what += [f"{', '.join(free)} without training"] if free else []
    if ab.audit:
        from mechmed.ablate import plan
        from mechmed.config import ARMS
        from mechmed.models import model_config

        _, config, family, _ = model_config(model, seed=seed)
        n_audit = sum(a.arm not in ARMS for a in plan(ab, family.n_layers(config)))
        n_arms += n_audit
        what.append(f"the selection audit's {n_audit} other layer sets")
    how = (f"{workers} at a time" if workers > 1 else "one at a time")
    _say(f"[ablation] the base model and {n_arms} arms ({'; '.join(what)}; seed {', '.join(map(str, ab.seeds))}), "
         f"{how}", echo)

    def ablate():
        nonlocal result
        with _ArmWatcher(ensure_dir(out / "ablation"), n_arms, echo):
            result = run_ablation(ab, out / "ablation", progress=echo, device=device, dtype=dtype)

    stage("ablation", False, ablate)
    if echo:
        from mechmed.report import summary_table

        print(summary_table(result.summary), flush=True)

    def report():
        from mechmed.report import build_report

        res.report = build_report(out)

    stage("report", False, report)
    skipped = {f["png_skipped"] for f in res.report.get("figures", {}).values() if f.get("png_skipped")}
    if skipped:
        _say(f"[report] figures are HTML only ({'; '.join(sorted(skipped))}): report.html shows every figure; "
             f"`mechmed report {out} --figures` writes the PNGs once a browser is there", echo)
    if res.report.get("notes"):
        _say(f"[report] skipped: {'; '.join(res.report['notes'])}", echo)
    _say(f"report: {out / 'report.html'}", echo)
    return res
