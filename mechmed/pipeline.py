"""The whole chain on one model and pair set: what ``mechmed demo`` runs.

model + data → ``sae_check/`` (do the SAEs reconstruct the model?) → ``attribute/`` (which layers
carry the flips?) → ``train.yaml`` (the selected range) → ``ablation/`` (train the selected range,
baseline ranges and loss controls; evaluate each against the base) → ``report.html`` /
``report.md``. Each stage writes its own directory under ``out`` and is skipped when its output is
already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Arms the demo ablates (the issue's minimum set plus the random range of the same width).
DEMO_ARMS = ("selected", "early", "late", "all", "ce_only", "consistency_only")


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


def run_pipeline(out: str | os.PathLike = "runs/demo", *, model: str = "demo", data: str = "demo",
                 saes: str = "demo", seed: int = 0, width: int = 3, arms=DEMO_ARMS, methods=("lora",),
                 seeds=None, workers: int = 2, max_pairs: int = 200, echo: bool = False) -> PipelineResult:
    """Run every stage into ``out`` (see module doc); ``echo`` prints one line per stage."""
    from mechmed.ablate import AblationConfig, run_ablation
    from mechmed.attribution import run_attribute
    from mechmed.config import TrainConfig
    from mechmed.fidelity import run_sae_check
    from mechmed.io import ensure_dir
    from mechmed.selection import run_select_layers

    out = ensure_dir(Path(out))
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

    if model == "demo":
        from mechmed.demo.build import ensure_demo_data, ensure_demo_model, read_build_metrics

        def build():
            path = ensure_demo_model(seed=seed)
            ensure_demo_data(seed=seed)
            m = read_build_metrics(path)
            _say(f"[model] demo model {path.name}: canonical accuracy {m['canonical_accuracy']:.3f}, "
                 f"held-out flip rate {m['flip_rate']:.3f}", echo)

        stage("model", False, build)

    stage("sae_check", (out / "sae_check" / "sae_check.json").is_file(),
          lambda: run_sae_check(model, saes, "all", out=str(out / "sae_check"), seed=seed))
    stage("attribute", (out / "attribute" / "layer_scores.json").is_file(),
          lambda: run_attribute(model, data, saes, str(out / "attribute"), max_pairs=max_pairs, seed=seed,
                                progress=echo))
    cfg_path = out / "train.yaml"
    stage("select_layers", cfg_path.is_file(),
          lambda: run_select_layers(str(out / "attribute" / "layer_scores.json"), str(cfg_path), width=width,
                                    model=model, data=data, saes=saes, seed=seed))
    train_cfg = TrainConfig.load(cfg_path)
    res.selected = list(train_cfg.layers)
    _say(f"[select_layers] selected layers {res.selected} ({cfg_path})", echo)
    ab = AblationConfig(train={k: v for k, v in train_cfg.to_dict().items() if k != "config_version"},
                        arms=list(arms), methods=list(methods), seeds=list(seeds or [seed]), workers=workers,
                        source=str(cfg_path))
    result = None

    def ablate():
        nonlocal result
        result = run_ablation(ab, out / "ablation", progress=echo)

    stage("ablation", False, ablate)
    if echo:
        from mechmed.ablate import format_table

        print(format_table(result.summary), flush=True)

    def report():
        from mechmed.report import build_report

        res.report = build_report(out)

    stage("report", False, report)
    _say(f"report: {out / 'report.html'}", echo)
    return res
