"""Forgetting under sequential tasks: train an adapter on task 1, go on training the same adapter on
task 2, and measure what task 1 lost.

A task is the set of pairs whose ``extra["finding"]`` is one of its findings (the embedded default's
six findings split three and three: :data:`TASK_1`, :data:`TASK_2`). Per arm (:data:`ARMS`: an
adapter method on the config's layers, or on every decoder layer for ``*_all``):

1. ``task_1``: :func:`mechmed.train.train` on task 1's training pairs for ``steps`` optimiser steps;
2. ``task_2``: the same run resumed from task 1's checkpoint (adapter weights, optimiser and RNG
   state) on task 2's training pairs for ``steps`` more steps: one adapter trained sequentially.

Each task's held-out pairs are measured for the base model and after each stage (:func:`task_metrics`):
accuracy over distinct prompts (each unique (image, question) and each pair's paraphrase, correct when
sign(margin) agrees with the expected answer) and the flip rate over the meaning-preserving pairs
(:func:`mechmed.consistency.evaluate`'s headline), each with a Wilson 95% interval. Paired exact
McNemar tests on the same prompts and pairs answer three questions per arm: did task 1's training
change task 1 (base → after task 1), did task 2's training change task 2 (after task 1 → after task
2; if not, there was nothing to forget), and did it cost task 1 (after task 1 → after task 2:
``forgetting`` = the accuracy lost, ``flip_forgetting`` = the flip rate gained). Every other arm is
compared with the first on task 1 after task 2.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechmed.config import TrainConfig
from mechmed.errors import MechmedError

log = logging.getLogger(__name__)

TASK_1 = ("effusion", "cardiomegaly", "pneumothorax")
TASK_2 = ("nodule", "consolidation", "edema")
#: arm -> (adapter method, every decoder layer instead of the config's)
ARMS = {"lora": ("lora", False), "spectral_moe": ("spectral_moe", False), "lora_all": ("lora", True)}
STAGES = ("base", "after_task_1", "after_task_2")


@dataclass
class ForgettingResult:
    """``results``: arm -> stage -> task -> metrics (see :func:`sequential_forgetting`)."""

    out: Path
    results: dict


def finding_of(pair) -> str:
    finding = pair.extra.get("finding")
    if finding is None:
        raise MechmedError(f"pair {pair.id}: no 'finding' field; forgetting splits tasks by finding")
    return finding


def task_pairs(pairs, findings: Sequence[str]) -> list:
    """The pairs about one of ``findings``."""
    return [p for p in pairs if finding_of(p) in findings]


def task_metrics(bundle, pairs, *, batch_size: int = 64, seed: int = 0) -> dict:
    """Accuracy over distinct prompts (unique questions, then each paraphrase) and flip rate over the
    headline pairs of :func:`mechmed.consistency.evaluate`, each with a Wilson 95% interval.

    Returns ``{"k", "n", "accuracy", "ci", "correct": [bool per prompt], "n_flips", "n_pairs",
    "flip_rate", "flip_ci", "flips": [bool per headline pair], "yes_rate", "label_yes_rate"}`` (the
    share of yes answers, and of yes labels, as :func:`mechmed.consistency.evaluate` counts them).
    """
    from mechmed import stats
    from mechmed.consistency import evaluate, headline_rows

    questions: dict = {}
    ev = evaluate(bundle, pairs, batch_size=batch_size, seed=seed, controls=False, n_bootstrap=200,
                  question_margins=questions)
    answer = {}
    for p in pairs:
        answer.setdefault((p.image, p.question), p.answer)
    correct = np.concatenate([np.array([(questions[k] > 0) == (a == "yes") for k, a in answer.items()], dtype=bool),
                              np.array([r["correct_paraphrase"] for r in ev.pairs], dtype=bool)])
    flips = np.array([r["flip"] for r in headline_rows(ev.pairs)], dtype=bool)
    k, n = int(correct.sum()), int(correct.size)
    ci, fci = stats.wilson_interval(k, n), stats.wilson_interval(int(flips.sum()), flips.size)
    return {"k": k, "n": n, "accuracy": k / n, "ci": [ci.low, ci.high], "correct": correct.tolist(),
            "n_flips": int(flips.sum()), "n_pairs": int(flips.size), "flip_rate": float(flips.mean()),
            "flip_ci": [fci.low, fci.high], "flips": flips.tolist(), "yes_rate": ev.metrics["yes_rate"],
            "label_yes_rate": ev.metrics["label_yes_rate"]}


def _stage_config(base: TrainConfig, method: str, layers: list[int], train_file: str, eval_file: str, steps: int,
                  n_train: int) -> TrainConfig:
    d = base.to_dict()
    d.pop("config_version")
    per_step = d["batch_size"] * d["grad_accum"]
    # exactly `steps` optimiser steps whatever the task's size (max_steps binds, epochs never does);
    # the written task files hold resolved image paths; no extra evaluation sets (the tasks are the sets)
    d.update(method=method, layers=layers, train_data=train_file, eval_data=eval_file, image_root=None,
             max_steps=steps, extra_eval={}, epochs=float(math.ceil(steps / max(1, n_train // per_step)) + 1))
    return TrainConfig.from_dict(d, source="forgetting")


def _change(before: dict, after: dict) -> dict:
    """Paired exact McNemar tests of accuracy and flips between two stages on the same task."""
    from mechmed import stats

    return {"accuracy": after["accuracy"] - before["accuracy"], "flip_rate": after["flip_rate"] - before["flip_rate"],
            "accuracy_test": stats.mcnemar_from_pairs(before["correct"], after["correct"]).to_dict(),
            "flip_test": stats.mcnemar_from_pairs(before["flips"], after["flips"]).to_dict()}


def sequential_forgetting(base: TrainConfig, out: str | os.PathLike, *, steps: int | None = None,
                          arms: Sequence[str] = ("lora", "spectral_moe"), task_1: Sequence[str] = TASK_1,
                          task_2: Sequence[str] = TASK_2, n_eval: int | None = None, device: str = "cpu",
                          progress: bool = False) -> ForgettingResult:
    """Run the sequential two-task experiment for each arm (:data:`ARMS`); writes ``out/forgetting.json``.

    ``base`` gives everything but the method, the layers of ``*_all`` arms and the data (its
    ``train_data`` / ``eval_data`` are split by finding); ``steps`` optimiser steps per task (None:
    one epoch of the larger task's training pairs); ``n_eval`` held-out pairs per task (a seeded
    sample; all when None); ``device`` as for :func:`mechmed.train.train`.
    """
    from mechmed import stats
    from mechmed.data import write_pairs
    from mechmed.io import ensure_dir, write_json
    from mechmed.models import attach_adapter, load_model
    from mechmed.progress import progress_bar
    from mechmed.train import resolve_pairs, train

    arms = list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise MechmedError(f"forgetting arms {unknown or arms}: use some of {', '.join(ARMS)}")
    if set(task_1) & set(task_2):
        raise MechmedError(f"tasks share findings {sorted(set(task_1) & set(task_2))}: give disjoint tasks")
    out = ensure_dir(out)
    train_all = resolve_pairs(base.train_data, split="train", image_root=base.image_root, seed=base.seed)
    eval_all = resolve_pairs(base.eval_data, split="eval", image_root=base.image_root, seed=base.seed)
    rng = np.random.default_rng(base.seed)
    tasks, files = {}, {}
    for name, findings in (("task_1", task_1), ("task_2", task_2)):
        tr, ev = task_pairs(train_all, findings), task_pairs(eval_all, findings)
        if not tr or not ev:
            raise MechmedError(f"{name} ({', '.join(findings)}): no training or held-out pairs about these findings")
        if n_eval is not None and n_eval < len(ev):
            ev = [ev[i] for i in sorted(rng.permutation(len(ev))[:n_eval])]
        tasks[name] = (tr, ev)
        files[name] = tuple(str(write_pairs(pairs, out / "data" / f"{name}_{split}.jsonl"))
                            for pairs, split in ((tr, "train"), (ev, "eval")))
    per_step = base.batch_size * base.grad_accum
    if steps is None:
        steps = math.ceil(max(len(tasks["task_1"][0]), len(tasks["task_2"][0])) / per_step)

    def measure(adapter=None) -> tuple[dict, int]:
        b = load_model(base.model, device=device, answer_words=tuple(base.answer_words), seed=base.seed)
        b = b if adapter is None else attach_adapter(b, adapter)
        return {t: task_metrics(b, ev, seed=base.seed) for t, (_, ev) in tasks.items()}, b.n_layers

    base_metrics, n_layers = measure()
    results: dict = {}
    layers_of = {}
    for arm in progress_bar(arms, desc="forgetting" if progress else None):
        method, every_layer = ARMS[arm]
        layers_of[arm] = list(range(n_layers)) if every_layer else list(base.layers)
        run = out / arm
        stage_1 = _stage_config(base, method, layers_of[arm], *files["task_1"], steps, len(tasks["task_1"][0]))
        train(stage_1, run / "task_1", evaluate_before_after=False, device=device)
        # task 2 goes on from task 1's checkpoint: same adapter, optimiser and RNG state
        ensure_dir(run / "task_2")
        shutil.copytree(run / "task_1" / "checkpoint", run / "task_2" / "checkpoint", dirs_exist_ok=True)
        shutil.copy(run / "task_1" / "train_log.jsonl", run / "task_2" / "train_log.jsonl")
        stage_2 = _stage_config(base, method, layers_of[arm], *files["task_2"], 2 * steps, len(tasks["task_2"][0]))
        train(stage_2, run / "task_2", resume=True, evaluate_before_after=False, device=device)
        results[arm] = {"base": base_metrics, **{"after_" + stage: measure(run / stage / "adapter")[0]
                                                 for stage in ("task_1", "task_2")}}

    summary = {}
    for arm in arms:
        r = results[arm]
        row = {"layers": layers_of[arm]}
        for task in ("task_1", "task_2"):
            for stage in STAGES:
                m = r[stage][task]
                row[f"{task}_{stage}"] = {"accuracy": m["accuracy"], "accuracy_ci": m["ci"],
                                          "flip_rate": m["flip_rate"], "flip_ci": m["flip_ci"],
                                          "yes_rate": m["yes_rate"], "label_yes_rate": m["label_yes_rate"]}
        row["task_1_learned"] = _change(r["base"]["task_1"], r["after_task_1"]["task_1"])
        row["task_2_learned"] = _change(r["after_task_1"]["task_2"], r["after_task_2"]["task_2"])
        row["task_1_kept"] = _change(r["after_task_1"]["task_1"], r["after_task_2"]["task_1"])
        row["forgetting"] = -row["task_1_kept"]["accuracy"]
        row["flip_forgetting"] = row["task_1_kept"]["flip_rate"]
        summary[arm] = row
    versus = {}
    for arm in arms[1:]:
        a, b = (results[x]["after_task_2"]["task_1"] for x in (arms[0], arm))
        versus[f"{arm}_vs_{arms[0]}"] = {"accuracy_test": stats.mcnemar_from_pairs(a["correct"], b["correct"]).to_dict(),
                                         "flip_test": stats.mcnemar_from_pairs(a["flips"], b["flips"]).to_dict()}
    report = {"steps_per_task": steps, "task_1": list(task_1), "task_2": list(task_2), "arms": arms,
              "layers": base.layers, "rank": base.rank, "seed": base.seed,
              "n_train": {t: len(v[0]) for t, v in tasks.items()},
              "n_eval_pairs": {t: len(v[1]) for t, v in tasks.items()}, "summary": summary,
              "task_1_after_task_2": versus, "results": results}
    write_json(out / "forgetting.json", report)
    return ForgettingResult(out, report)
