"""Shared fixtures: tiny real models of each supported class, built from configs (no downloads).

Session-scoped and read-only: tests must not train or modify them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MECHMED_PROGRESS", "0")

FAMILIES = ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM", "Qwen2_5_VLForConditionalGeneration")


def _build(name: str):
    from mechmed import tiny

    if name == "Gemma3ForConditionalGeneration":
        return tiny.gemma3_vlm(layers=3, seed=1)
    if name == "Gemma3ForCausalLM":
        return tiny.gemma3_causal_lm(layers=3, seed=2)
    return tiny.qwen2_5_vl(layers=3, seed=3)


@pytest.fixture(scope="session")
def tiny_models():
    """{class name: (model, processor)} for every supported family."""
    import torch

    torch.set_num_threads(2)
    return {name: _build(name) for name in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models):
    from mechmed.models import bundle

    return {name: bundle(m, p, name=name) for name, (m, p) in tiny_models.items()}


def make_image(seed: int, size: int = 32):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


QUESTIONS = ["Is there a pleural effusion?", "Does this image show cardiomegaly?",
             "Is there any evidence of edema in the left lung?", "Is the heart normal?"]
