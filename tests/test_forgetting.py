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


def _correct_and_flips(bundle, pairs):
    """Correct answers over unique (image, question), then each paraphrase, and each pair's flip (the
    answer changes between the phrasings; the demo's held-out set has no negated pairs), from plain
    readout margins."""
    from mechmed.consistency import load_image
    from mechmed.readout import margins

    assert not any(p.negated for p in pairs)
    unique = list({(p.image, p.question): p.answer for p in pairs}.items())
    mq = margins(bundle, [q for (_, q), _ in unique], [load_image(im) for (im, _), _ in unique]).numpy()
    mp = margins(bundle, [p.paraphrase for p in pairs], [load_image(p.image) for p in pairs]).numpy()
    by_key = {k: m for (k, _), m in zip(unique, mq)}
    flips = np.array([(by_key[(p.image, p.question)] > 0) != (m > 0) for p, m in zip(pairs, mp)])
    correct = np.concatenate([(mq > 0) == np.array([a == "yes" for _, a in unique]),
                              (mp > 0) == np.array([p.expected_paraphrase == "yes" for p in pairs])])
    return correct, flips


def _mcnemar_p(a, b):
    from scipy.stats import binomtest

    b_, c_ = int((a & ~b).sum()), int((~a & b).sum())
    return binomtest(b_, b_ + c_, 0.5).pvalue if b_ + c_ else 1.0


def test_tasks_must_be_disjoint_and_arms_known(tmp_path):
    cfg = TrainConfig.from_dict({**demo_defaults(), "layers": [2]})
    with pytest.raises(MechmedError, match="disjoint"):
        sequential_forgetting(cfg, tmp_path, steps=1, task_1=("edema", "nodule"), task_2=("nodule",))
    with pytest.raises(MechmedError, match="lora, spectral_moe, lora_all"):
        sequential_forgetting(cfg, tmp_path, steps=1, arms=("dora",))


@pytest.mark.slow
def test_forgetting_analysis_on_the_demo(demo_model_dir, demo_data_dir, tmp_path):
    """analyses/forgetting.py (and so :func:`sequential_forgetting`) with small limits, one seed."""
    from safetensors.torch import load_file
    from statsmodels.stats.proportion import proportion_confint

    from mechmed.data import load_pairs
    from mechmed.models import attach_adapter, load_model

    steps, n_eval = 3, 24
    if str(ANALYSES) not in sys.path:
        sys.path.append(str(ANALYSES))  # the script imports its helpers from its folder
    main = runpy.run_path(str(ANALYSES / "forgetting.py"))["main"]
    assert main(["--out", str(tmp_path), "--layers", "2-3", "--steps", str(steps), "--eval-pairs", str(n_eval),
                 "--seeds", "0"]) == 0
    out = tmp_path / "seed_0"
    r = json.loads((out / "forgetting.json").read_text())
    assert r["steps_per_task"] == steps and r["layers"] == [2, 3]
    assert r["arms"] == ["lora", "spectral_moe", "lora_all"]
    assert r["summary"]["lora_all"]["layers"] == list(range(load_model(str(demo_model_dir)).n_layers))
    assert "| lora_all | 0 |" in (tmp_path / "forgetting.md").read_text()

    evals = {}
    for name, findings in (("task_1", TASK_1), ("task_2", TASK_2)):
        train = load_pairs(out / "data" / f"{name}_train.jsonl")
        evals[name] = load_pairs(out / "data" / f"{name}_eval.jsonl")
        assert {p.extra["finding"] for p in train} == set(findings)
        assert {p.extra["finding"] for p in evals[name]} <= set(findings) and len(evals[name]) == n_eval

    for arm in ("lora", "spectral_moe"):
        run = out / arm
        # task 2 continued task 1's adapter: one log of 2·steps steps, the first `steps` those of task 1
        log_1 = [json.loads(x) for x in (run / "task_1" / "train_log.jsonl").read_text().splitlines()]
        log_2 = [json.loads(x) for x in (run / "task_2" / "train_log.jsonl").read_text().splitlines()]
        assert [h["step"] for h in log_2] == list(range(1, 2 * steps + 1)) and log_2[:steps] == log_1
        w1, w2 = (load_file(run / s / "adapter" / "adapter_model.safetensors") for s in ("task_1", "task_2"))
        assert w1.keys() == w2.keys() and any(not np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)

        s = r["summary"][arm]
        got = {}
        for stage in ("task_1", "task_2"):
            b = attach_adapter(load_model(str(demo_model_dir)), run / stage / "adapter")
            for task in ("task_1", "task_2"):
                got[stage, task] = _correct_and_flips(b, evals[task])
            correct, flips = got[stage, "task_1"]
            k, n = int(correct.sum()), correct.size
            low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
            cell = s[f"task_1_after_{stage}"]
            assert cell["accuracy"] == pytest.approx(k / n)
            assert cell["accuracy_ci"] == pytest.approx([low, high], abs=1e-9)
            assert cell["flip_rate"] == pytest.approx(flips.mean())
            low, high = proportion_confint(int(flips.sum()), flips.size, alpha=0.05, method="wilson")
            assert cell["flip_ci"] == pytest.approx([low, high], abs=1e-9)
        (c1, f1), (c2, f2) = got["task_1", "task_1"], got["task_2", "task_1"]
        assert s["forgetting"] == pytest.approx(c1.mean() - c2.mean())
        assert s["flip_forgetting"] == pytest.approx(f2.mean() - f1.mean())
        assert s["task_1_kept"]["accuracy_test"]["p_value"] == pytest.approx(_mcnemar_p(c1, c2))
        assert s["task_1_kept"]["flip_test"]["p_value"] == pytest.approx(_mcnemar_p(f1, f2))
        (_, g1), (_, g2) = got["task_1", "task_2"], got["task_2", "task_2"]
        assert s["task_2_learned"]["flip_test"]["p_value"] == pytest.approx(_mcnemar_p(g1, g2))
