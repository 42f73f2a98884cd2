"""Registers the embedded default as the source ``demo`` (:mod:`mechmed.sources`): its model, its pair
sets, its SAEs, its image prompts and the training settings that suit it."""

from __future__ import annotations

from pathlib import Path

from mechmed import sources
from mechmed.demo.build import ensure_demo_data, ensure_demo_model, read_build_metrics
from mechmed.demo.dataset import PAIR_FILES
from mechmed.demo.model import DemoModelConfig
from mechmed.demo.prompts import image_question_prompts
from mechmed.demo.saes import ensure_demo_saes

#: Training values that suit the embedded default (64-wide, trained on CPU in seconds): one epoch of
#: its training pairs, and the consistency weight under which every measured seed lowered its flip
#: rate by at least 40% (docs/training.md).
TRAIN_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "lr": 3e-3, "batch_size": 32, "grad_accum": 1,
                  "epochs": 1.0, "max_steps": None, "consistency_weight": 2.0, "eval_every": 40,
                  "checkpoint_every": 40, "guard_pairs": 200}


def describe(model_dir: Path) -> str:
    m = read_build_metrics(model_dir)
    return (f"demo model {Path(model_dir).name}: canonical accuracy {m['canonical_accuracy']:.3f}, "
            f"held-out flip rate {m['flip_rate']:.3f}")


SOURCE = sources.register(sources.Source(
    name="demo",
    d_model=DemoModelConfig().hidden,
    model_dir=ensure_demo_model,
    data_dir=ensure_demo_data,
    pair_files=PAIR_FILES,
    extra_eval={"unseen": "demo:unseen", "negation": "demo:negation"},
    train_defaults=TRAIN_DEFAULTS,
    saes_dir=ensure_demo_saes,
    image_prompts=image_question_prompts,
    describe=describe,
))
