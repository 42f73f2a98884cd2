"""Shared fixtures: tiny real models of each supported class, built from configs (no downloads).

Session-scoped and read-only: tests must not train or modify them.
"""

from __future__ import annotations

import os
from pathlib import Path

from mechmed.runtime import deterministic_env

# The suite runs in deterministic CPU mode, as mechmed's commands do on the embedded default: the
# settings must be in the environment before numpy and torch load (they read them once).
for _k, _v in deterministic_env({}).items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MECHMED_PROGRESS", "0")

def suite_threads(at_most: int = 2) -> int:
    """Torch threads for a test process: the machine's cores shared among pytest-xdist's workers (the
    suite runs one worker per core), at most ``at_most``."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(at_most, (os.cpu_count() or 1) // workers))


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

    torch.set_num_threads(suite_threads())
    return {name: _build(name) for name in FAMILIES}


@pytest.fixture(scope="session")
def demo_model_dir():
    """The embedded default model directory, from the default cache (built there on first use)."""
    import torch

    from mechmed.demo.build import ensure_demo_model

    torch.set_num_threads(suite_threads())
    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_data_dir(demo_model_dir):
    """The embedded default's evaluation data directory (``pairs.jsonl``, ``train_pairs.jsonl``, images)."""
    from mechmed.demo.build import ensure_demo_data

    return ensure_demo_data()


@pytest.fixture(scope="session")
def demo_eval_subset(demo_data_dir, tmp_path_factory):
    """The embedded default's first 120 held-out pairs (whole questions, images by absolute path), for
    tests of plumbing on the demo model whose point is not the size of the evaluation set."""
    import json

    rows = [json.loads(x) for x in (demo_data_dir / "pairs.jsonl").read_text().splitlines() if x.strip()][:120]
    rows = [r for r in rows if r["question_id"] != rows[-1]["question_id"]]  # no question cut in half
    path = tmp_path_factory.mktemp("demo_subset") / "pairs.jsonl"
    path.write_text("".join(json.dumps({**r, "image": str(demo_data_dir / r["image"]),
                                        "counterfactual_image": str(demo_data_dir / r["counterfactual_image"])})
                            + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models):
    from mechmed.models import bundle

    return {name: bundle(m, p, name=name) for name, (m, p) in tiny_models.items()}


def load_script(path: Path):
    """A repository script (not a package module) imported as a module, for its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recorded_digest(what: str) -> str:
    """The SHA-256 docs/demo.md records for the seed-0 ``what`` (``model weights`` or ``SAE set``)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "demo.md").read_text(encoding="utf-8")
    found = re.search(rf"\| {what} \| `([0-9a-f]{{64}})` \|", text)
    assert found, f"docs/demo.md records no {what} digest"
    return found.group(1)


def make_image(seed: int, size: int = 32):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8))


QUESTIONS = ["Is there a pleural effusion?", "Does this image show cardiomegaly?",
             "Is there any evidence of edema in the left lung?", "Is the heart normal?"]


TRAIN_PARAPHRASES = ["Does this image show a pleural effusion?", "Is there any effusion?",
                     "Is there no pleural effusion?"]


#: The files that take longest (a minute or more on 2 cores), run first so that pytest-xdist's workers
#: finish together instead of one of them starting a long file last.
LONGEST_FIRST = ("test_saes.py", "test_runtime.py", "test_demo_e2e.py", "test_ablate.py", "test_train.py",
                 "test_reliability.py", "test_demo_model.py", "test_analyses.py", "test_forgetting.py",
                 "test_notebooks.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (:data:`LONGEST_FIRST`, the order within a file kept). The real tier runs
    only when asked (``-m real``): elsewhere its tests are skipped, saying how."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if "real" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the real tier: pip install -e '.[real]', then python -m pytest -m real")
    for item in items:
        if item.get_closest_marker("real") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, tiny_models):
    """A saved tiny Gemma 3 VLM checkpoint and a pairs file over 4 images (8 pairs, one negated
    rewording per image); returns (root, checkpoint dir). Read-only."""
    import json

    from mechmed import tiny

    root = tmp_path_factory.mktemp("workspace")
    model, proc = tiny_models["Gemma3ForConditionalGeneration"]
    ckpt = tiny.save(model, proc, root / "ckpt")
    (root / "images").mkdir()
    rows = []
    for i in range(4):
        make_image(200 + i).save(root / "images" / f"{i}.png")
        ans = "yes" if i % 2 else "no"
        for j, para in enumerate(TRAIN_PARAPHRASES[:2]):
            rows.append({"id": f"{i}-{j}", "image": f"images/{i}.png", "question": "Is there a pleural effusion?",
                         "paraphrase": para, "answer": ans, "phenomenon": "lexical_substitution",
                         "question_id": f"q{i}"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rows = []
    for i in range(4):
        ans = "yes" if i % 2 else "no"
        flip = {"yes": "no", "no": "yes"}[ans]
        for j, para in enumerate(TRAIN_PARAPHRASES):
            neg = j == 2
            train_rows.append({"id": f"t{i}-{j}", "image": f"images/{i}.png",
                               "question": "Is there a pleural effusion?", "paraphrase": para, "answer": ans,
                               "paraphrase_answer": flip if neg else ans,
                               "phenomenon": "negation_pattern" if neg else "syntactic_restructuring",
                               "question_id": f"q{i}"})
    (root / "train_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    return root, ckpt


@pytest.fixture
def one_thread():
    """The tiny models' matmuls are too small to gain from threads, and lose badly on shared cores
    (function-scoped, so that it applies after the session fixtures set their thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vlm(tiny_bundles):
    return tiny_bundles["Gemma3ForConditionalGeneration"]
