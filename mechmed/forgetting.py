"""Forgetting under sequential tasks: train an adapter on task 1, go on training the same adapter on
task 2, and measure what task 1's accuracy lost.

A task is the set of pairs whose ``extra["finding"]`` is one of its findings (the embedded default's
six findings split three and three: :data:`TASK_1`, :data:`TASK_2`). Per method (lora, spectral_moe):

1. ``task_1``: :func:`mechmed.train.train` on task 1's training pairs for ``steps`` optimiser steps;
2. ``task_2``: the same run resumed from task 1's checkpoint (adapter weights, optimiser and RNG
   state) on task 2's training pairs for ``steps`` more steps: one adapter trained sequentially.

Accuracy on a task's held-out pairs counts every distinct prompt once: each unique (image, question)
and each pair's paraphrase, correct when sign(margin) agrees with the expected answer. Reported for
the base model and after each stage, with Wilson 95% intervals; ``forgetting`` = accuracy on task 1
after task 1 − after task 2, with an exact McNemar test on the same prompts. The methods are compared
on task 1 after task 2 with an exact McNemar test (same prompts, paired).
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
METHODS = ("lora", "spectral_moe")


@dataclass
class ForgettingResult:
    """``results``: method -> stage -> task -> accuracy (see :func:`sequential_forgetting`)."""

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


def task_accuracy(bundle, pairs, *, batch_size: int = 64) -> dict:
    """Accuracy over distinct prompts (unique questions, then each paraphrase), with a Wilson 95% interval.

    Returns ``{"k", "n", "accuracy", "ci": [low, high], "correct": [bool per prompt]}``.
    """
    from mechmed import stats
    from mechmed.consistency import pair_margins

    _, m_p, keys, m_unique, _ = pair_margins(bundle, pairs, batch_size=batch_size)
    answer = {}
    for p in pairs:
        answer.setdefault((p.image, p.question), p.answer)
    correct = np.concatenate([(m_unique > 0) == np.array([answer[k] == "yes" for k in keys]),
                              (m_p > 0) == np.array([p.expected_paraphrase == "yes" for p in pairs])])
    k, n = int(correct.sum()), int(correct.size)
    ci = stats.wilson_interval(k, n)
    return {"k": k, "n": n, "accuracy": k / n, "ci": [ci.low, ci.high], "correct": correct.tolist()}


def _stage_config(base: TrainConfig, method: str, train_file: str, eval_file: str, steps: int,
                  n_train: int) -> TrainConfig:
    d = base.to_dict()
    d.pop("config_version")
    per_step = d["batch_size"] * d["grad_accum"]
    # exactly `steps` optimiser steps whatever the task's size (max_steps binds, epochs never does);
    # the written task files hold resolved image paths
    d.update(method=method, train_data=train_file, eval_data=eval_file, image_root=None, max_steps=steps,
             epochs=float(math.ceil(steps / max(1, n_train // per_step)) + 1))
    return TrainConfig.from_dict(d, source="forgetting")


def sequential_forgetting(base: TrainConfig, out: str | os.PathLike, *, steps: int,
                          methods: Sequence[str] = METHODS, task_1: Sequence[str] = TASK_1,
                          task_2: Sequence[str] = TASK_2, n_eval: int | None = None, device: str = "cpu",
                          progress: bool = False) -> ForgettingResult:
    """Run the sequential two-task experiment for each method; writes ``out/forgetting.json``.

    ``base`` gives everything but the method and the data (its ``train_data`` / ``eval_data`` are
    split by finding); ``steps`` optimiser steps per task; ``n_eval`` held-out pairs per task (a
    seeded sample; all when None); ``device`` as for :func:`mechmed.train.train`.
    """
    from mechmed import stats
    from mechmed.data import write_pairs
    from mechmed.io import ensure_dir, write_json
    from mechmed.models import attach_adapter, load_model
    from mechmed.progress import progress_bar
    from mechmed.train import resolve_pairs, train

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

    def accuracies(adapter=None) -> dict:
        b = load_model(base.model, device=device, answer_words=tuple(base.answer_words), seed=base.seed)
        b = b if adapter is None else attach_adapter(b, adapter)
        return {t: task_accuracy(b, ev) for t, (_, ev) in tasks.items()}

    results: dict = {"base": accuracies()}
    for method in progress_bar(list(methods), desc="forgetting" if progress else None):
        run = out / method
        stage_1 = _stage_config(base, method, *files["task_1"], steps, len(tasks["task_1"][0]))
        train(stage_1, run / "task_1", evaluate_before_after=False, device=device)
        # task 2 goes on from task 1's checkpoint: same adapter, optimiser and RNG state
        ensure_dir(run / "task_2")
        shutil.copytree(run / "task_1" / "checkpoint", run / "task_2" / "checkpoint", dirs_exist_ok=True)
        shutil.copy(run / "task_1" / "train_log.jsonl", run / "task_2" / "train_log.jsonl")
        stage_2 = _stage_config(base, method, *files["task_2"], 2 * steps, len(tasks["task_2"][0]))
        train(stage_2, run / "task_2", resume=True, evaluate_before_after=False, device=device)
        results[method] = {"after_" + stage: accuracies(run / stage / "adapter") for stage in ("task_1", "task_2")}

    summary = {}
    for method in methods:
        r = results[method]
        before, after = r["after_task_1"]["task_1"], r["after_task_2"]["task_1"]
        summary[method] = {
            "task_1_after_task_1": before["accuracy"], "task_1_after_task_1_ci": before["ci"],
            "task_1_after_task_2": after["accuracy"], "task_1_after_task_2_ci": after["ci"],
            "task_2_after_task_2": r["after_task_2"]["task_2"]["accuracy"],
            "task_2_after_task_2_ci": r["after_task_2"]["task_2"]["ci"],
            "forgetting": before["accuracy"] - after["accuracy"],
            "forgetting_test": stats.mcnemar_from_pairs(before["correct"], after["correct"]).to_dict()}
    if len(methods) == 2:
        a, b = (results[m]["after_task_2"]["task_1"]["correct"] for m in methods)
        summary["methods_task_1_after_task_2"] = stats.mcnemar_from_pairs(a, b).to_dict()
    report = {"steps_per_task": steps, "task_1": list(task_1), "task_2": list(task_2), "methods": list(methods),
              "layers": base.layers, "rank": base.rank, "n_train": {t: len(v[0]) for t, v in tasks.items()},
              "n_eval_pairs": {t: len(v[1]) for t, v in tasks.items()}, "summary": summary, "results": results}
    write_json(out / "forgetting.json", report)
    return ForgettingResult(out, report)
