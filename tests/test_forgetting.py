"""Sequential two-task forgetting on the embedded default: the task split, the continued adapter, and
accuracies, intervals and tests recomputed independently (readout margins, statsmodels, scipy)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from mechmed.config import TrainConfig, demo_defaults
from mechmed.errors import MechmedError
from mechmed.forgetting import TASK_1, TASK_2, sequential_forgetting

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def _correct(bundle, pairs):
    """Correct answers over unique (image, question), then each paraphrase, from plain readout margins."""
    from mechmed.consistency import load_image
    from mechmed.readout import margins

    unique = list({(p.image, p.question): p.answer for p in pairs}.items())
    mq = margins(bundle, [q for (_, q), _ in unique], [load_image(im) for (im, _), _ in unique]).numpy()
    mp = margins(bundle, [p.paraphrase for p in pairs], [load_image(p.image) for p in pairs]).numpy()
    return np.concatenate([(mq > 0) == np.array([a == "yes" for _, a in unique]),
                           (mp > 0) == np.array([p.expected_paraphrase == "yes" for p in pairs])])


def test_tasks_must_be_disjoint(tmp_path):
    with pytest.raises(MechmedError, match="disjoint"):
        sequential_forgetting(TrainConfig.from_dict({**demo_defaults(), "layers": [2]}), tmp_path, steps=1,
                              task_1=("edema", "nodule"), task_2=("nodule",))


@pytest.mark.slow
def test_forgetting_analysis_on_the_demo(demo_model_dir, demo_data_dir, tmp_path):
    """analyses/forgetting.py (and so :func:`sequential_forgetting`) with small limits."""
    from safetensors.torch import load_file
    from scipy.stats import binomtest
    from statsmodels.stats.proportion import proportion_confint

    from mechmed.data import load_pairs
    from mechmed.models import attach_adapter, load_model

    steps, n_eval = 3, 24
    if str(ANALYSES) not in sys.path:
        sys.path.append(str(ANALYSES))  # the script imports its helpers from its folder
    main = runpy.run_path(str(ANALYSES / "forgetting.py"))["main"]
    assert main(["--out", str(tmp_path), "--layers", "2-3", "--steps", str(steps), "--eval-pairs", str(n_eval)]) == 0
    r = json.loads((tmp_path / "forgetting.json").read_text())
    assert r["steps_per_task"] == steps and r["layers"] == [2, 3] and r["methods"] == ["lora", "spectral_moe"]

    evals = {}
    for name, findings in (("task_1", TASK_1), ("task_2", TASK_2)):
        train = load_pairs(tmp_path / "data" / f"{name}_train.jsonl")
        evals[name] = load_pairs(tmp_path / "data" / f"{name}_eval.jsonl")
        assert {p.extra["finding"] for p in train} == set(findings)
        assert {p.extra["finding"] for p in evals[name]} <= set(findings) and len(evals[name]) == n_eval

    for method in ("lora", "spectral_moe"):
        run = tmp_path / method
        # task 2 continued task 1's adapter: one log of 2·steps steps, the first `steps` those of task 1
        log_1 = [json.loads(x) for x in (run / "task_1" / "train_log.jsonl").read_text().splitlines()]
        log_2 = [json.loads(x) for x in (run / "task_2" / "train_log.jsonl").read_text().splitlines()]
        assert [h["step"] for h in log_2] == list(range(1, 2 * steps + 1)) and log_2[:steps] == log_1
        w1, w2 = (load_file(run / s / "adapter" / "adapter_model.safetensors") for s in ("task_1", "task_2"))
        assert w1.keys() == w2.keys() and any(not np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)

        s = r["summary"][method]
        correct = {}
        for stage in ("task_1", "task_2"):
            b = attach_adapter(load_model(str(demo_model_dir)), run / stage / "adapter")
            correct[stage] = _correct(b, evals["task_1"])
            k, n = int(correct[stage].sum()), correct[stage].size
            low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
            assert s[f"task_1_after_{stage}"] == pytest.approx(k / n)
            assert s[f"task_1_after_{stage}_ci"] == pytest.approx([low, high], abs=1e-9)
        assert s["forgetting"] == pytest.approx(correct["task_1"].mean() - correct["task_2"].mean())
        b_, c_ = int((correct["task_1"] & ~correct["task_2"]).sum()), int((~correct["task_1"] & correct["task_2"]).sum())
        p = binomtest(b_, b_ + c_, 0.5).pvalue if b_ + c_ else 1.0
        assert s["forgetting_test"]["p_value"] == pytest.approx(p)
