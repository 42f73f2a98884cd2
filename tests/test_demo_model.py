"""The embedded default: built once (in the default cache, reused afterwards) and held to its bars.

Bars (benchmarks/demo_build.py measures them for seeds 0, 1, 2): ≥ 6 decoder layers, canonical
accuracy ≥ 0.85 on evaluation images, flip rate on the held-out meaning-preserving pairs in [0.15, 0.40],
yes-rate in [0.3, 0.7], blank-image agreement far from 1 (≤ 0.75 here). The build-time bar (≤ 60 s on
2 cores) is a benchmark's (benchmarks/demo_build.py, benchmarks/determinism.py), not a timed test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SEED = 0


@pytest.fixture(scope="session")
def demo_cache(demo_model_dir) -> Path:
    return demo_model_dir.parent.parent


@pytest.fixture(scope="session")
def demo_dir(demo_model_dir) -> Path:
    return demo_model_dir


@pytest.fixture(scope="session")
def metrics(demo_dir) -> dict:
    return json.loads((demo_dir / "build_metrics.json").read_text())


@pytest.fixture(scope="session")
def data_dir(demo_data_dir) -> Path:
    return demo_data_dir


# ----------------------------------------------------------------------------- bars


def test_architecture(metrics):
    assert metrics["class"] == "Gemma3ForConditionalGeneration"
    assert metrics["decoder_layers"] >= 6
    assert metrics["seed"] == SEED


def test_accuracy_and_flip_rate(metrics):
    assert metrics["canonical_accuracy"] >= 0.85, metrics
    assert 0.15 <= metrics["flip_rate"] <= 0.40, metrics
    assert metrics["flip_rate_negated"] is None  # the main evaluation set is meaning-preserving only
    assert 0.10 <= metrics["flip_rate_unseen"] <= 0.45, metrics
    # flips come from phrasing: the answer-inverting negations, which the model was never taught, flip most
    assert metrics["flip_rate_negation"] > max(0.5, metrics["flip_rate"])


def test_answers_are_balanced_and_use_the_image(metrics):
    assert 0.3 <= metrics["yes_rate"] <= 0.7, metrics
    assert metrics["blank_image_agreement"] <= 0.75, metrics


def test_build_records_its_time(metrics):
    """The build records its time (the 60 s bar is measured by benchmarks/demo_build.py and
    benchmarks/determinism.py, not asserted here: the time depends on the machine's load)."""
    t = metrics["timing"]
    assert 0 < t["train_s"] <= t["build_s"] <= t["total_s"] and t["cpu_s"] > 0, t


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused(demo_cache, demo_dir):
    import time

    from mechmed.demo.build import MARKER, ensure_demo_model

    assert (demo_dir / MARKER).is_file()
    t0 = time.perf_counter()
    assert ensure_demo_model(cache_dir=demo_cache, seed=SEED) == demo_dir
    assert time.perf_counter() - t0 < 1.0
    leftovers = [p.name for p in demo_dir.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_incomplete_directory_is_not_used(tmp_path):
    from mechmed.demo.build import MARKER, _build_into, _complete

    final = tmp_path / "model-x"
    final.mkdir()
    (final / "half.safetensors").write_text("partial")  # a killed build's leftovers, no marker
    assert not _complete(final)

    def build(tmp):
        (tmp / "weights").write_text("full")

    assert _build_into(final, build) == final
    assert (final / MARKER).is_file() and (final / "weights").read_text() == "full"
    assert not (final / "half.safetensors").exists()

    def failing(tmp):
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt

    other = tmp_path / "model-y"
    with pytest.raises(KeyboardInterrupt):
        _build_into(other, failing)
    assert not other.exists() and list(tmp_path.glob(".model-y*")) == []


def test_cache_key_changes_with_seed_and_recipe():
    from mechmed.demo.build import _key, model_recipe
    from mechmed.demo.train import DemoTrainConfig

    assert _key(model_recipe(0)) == _key(model_recipe(0))
    assert _key(model_recipe(0)) != _key(model_recipe(1))
    assert _key(model_recipe(0)) != _key(model_recipe(0, train_config=DemoTrainConfig(steps=1)))


# ----------------------------------------------------------------------------- plain transformers


def test_loads_with_plain_transformers(demo_dir, data_dir):
    # The loading and running below use transformers only (no mechmed).
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert (demo_dir / "model.safetensors").is_file()
    assert not list(demo_dir.glob("*.bin"))
    processor = AutoProcessor.from_pretrained(demo_dir)
    model = AutoModelForImageTextToText.from_pretrained(demo_dir).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    row = json.loads((data_dir / "pairs.jsonl").read_text().splitlines()[0])
    image = Image.open(data_dir / row["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text], images=[[image]], return_tensors="pt", padding=True, add_special_tokens=False
    )
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    assert torch.isfinite(logits).all()
    # the model answers with an answer word
    assert int(logits.argmax()) in (yes, no)
    assert int(generated[0, -1]) in (yes, no)

    # ... and gives the same margin as mechmed's readout
    from mechmed.readout import answer_logits, answer_token_ids, build_inputs

    scores = answer_logits(model, build_inputs(processor, [row["question"]], [image]), answer_token_ids(tok))
    assert float(scores[0, 0] - scores[0, 1]) == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)


# ----------------------------------------------------------------------------- tokenizer and data


def test_tokenizer_covers_every_paraphrase_word():
    from mechmed.demo.images import FINDINGS
    from mechmed.demo.model import demo_tokenizer
    from mechmed.demo.phrasings import base_phrasings, paraphrases, vocabulary
    from mechmed.demo.train import DemoTrainConfig, corpus_sentences

    tok = demo_tokenizer(SEED)
    for word in ("yes", "no"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    asked = [p.text for f in FINDINGS for p in paraphrases(f)]
    ids = [i for t in asked for i in tok.encode(t, add_special_tokens=False)]
    assert tok.unk_token_id not in ids
    trained_text = corpus_sentences(SEED, DemoTrainConfig().n_corpus_reports) + [
        p.text for f in FINDINGS for p in base_phrasings(f)
    ]
    assert vocabulary(asked) <= vocabulary(trained_text)


def test_noisy_variants_keep_the_finding_and_negation():
    from mechmed.demo.images import FINDINGS
    from mechmed.demo.phrasings import base_phrasings
    from mechmed.demo.train import noisy_variants
    from mechmed.tiny import words

    phr = [[p.text for p in base_phrasings(f)] for f in FINDINGS]
    variants = noisy_variants(phr, 8, seed=0, extra_words=["the film shows lungs"], max_ops=4)
    assert variants == noisy_variants(phr, 8, seed=0, extra_words=["the film shows lungs"], max_ops=4)
    flat = [t for texts in phr for t in texts]
    for text, vs in zip(flat, variants):
        for v in vs:
            assert v.endswith("?")
            assert ("absent" in words([v])) == ("absent" in words([text]))


# ----------------------------------------------------------------------------- determinism


def test_a_fresh_build_reproduces_the_recorded_digest(metrics):
    """The suite builds the seed-0 demo model in deterministic CPU mode (from nothing on a new machine):
    its weights are those docs/demo.md records, bit for bit."""
    assert metrics["determinism"]["mode"] == "deterministic", metrics["determinism"]
    from conftest import recorded_digest

    assert metrics["weights_sha256"] == recorded_digest("model weights")


def test_same_seed_same_weights(demo_cache, tmp_path, monkeypatch, capsys):
    """Two short builds with one seed: identical weights and metrics (timing aside); a build shows
    its progress (both training stages) when progress is on."""
    from mechmed.demo.build import build_demo
    from mechmed.demo.train import DemoTrainConfig

    short = DemoTrainConfig(
        n_images=128, vision_steps=10, vision_batch=32, steps=10, batch=16, lm_batch=8, noise_variants=4
    )
    monkeypatch.setenv("MECHMED_PROGRESS", "1")
    a = build_demo(tmp_path / "a", seed=SEED, cache_dir=demo_cache, train_config=short)
    err = capsys.readouterr().err
    assert "demo model: vision tower" in err and "demo model: decoder" in err
    monkeypatch.setenv("MECHMED_PROGRESS", "0")
    b = build_demo(tmp_path / "b", seed=SEED, cache_dir=demo_cache, train_config=short)
    for m in (a, b):
        m.pop("timing")
        m["training"] = {k: v for k, v in m["training"].items() if not k.endswith("_s")}
    assert a == b
    c = build_demo(tmp_path / "c", seed=SEED + 1, cache_dir=demo_cache, train_config=short)
    assert c["weights_sha256"] != a["weights_sha256"]


# ----------------------------------------------------------------------------- pair training


def test_negation_template_learned_on_three_findings_transfers_to_the_others(demo_dir, data_dir, tmp_path):
    """The demo model ignores the negation "Is the image free of X?" (most of its pairs flip).
    ``mechmed train`` on that template for three findings, over the training images, fixes it for the
    other three findings on the evaluation images: a new operator, new images, paired test."""
    from mechmed.config import TrainConfig, demo_defaults
    from mechmed.demo.dataset import EVAL_SEED_OFFSET, expected_answer
    from mechmed.demo.images import FINDINGS, make_images
    from mechmed.demo.phrasings import TERMS, canonical, wrappers
    from mechmed.io import write_jsonl
    from mechmed.train import train

    wrapper = next(w for w in wrappers("negation") if w.template.startswith("Is the image free of"))
    trained, held = FINDINGS[0::2], FINDINGS[1::2]
    n = json.loads((data_dir / "meta.json").read_text())["n_images"]

    def rows(findings, seed, folder):
        return [{"id": f"{folder}{i}-{f}", "question": canonical(f), "paraphrase": wrapper.fill(TERMS[f][0]),
                 "answer": expected_answer(fd[f], False), "paraphrase_answer": expected_answer(fd[f], True),
                 "image": f"{folder}/{i:04d}.png", "phenomenon": "negation_pattern", "question_id": f"{folder}{i}:{f}",
                 "extra": {"finding": f, "negated": True}}
                for i, (_, fd) in enumerate(make_images(n, seed, 32)) for f in findings]

    write_jsonl(tmp_path / "train.jsonl", rows(trained, SEED, "train_images"))
    write_jsonl(tmp_path / "eval.jsonl", rows(held, SEED + EVAL_SEED_OFFSET, "images"))
    cfg = TrainConfig(**{**demo_defaults(), "layers": [2, 3, 4], "train_data": str(tmp_path / "train.jsonl"),
                         "eval_data": str(tmp_path / "eval.jsonl"), "image_root": str(data_dir), "batch_size": 16,
                         "consistency_weight": 0.0, "lr": 1e-3, "epochs": 5.0, "max_steps": 200,
                         "eval_every": 100, "checkpoint_every": 200})
    m = train(cfg, tmp_path / "run").metrics
    before, after = m["before"], m["after"]
    assert before["flip_rate"] >= 0.5  # the base model does not read this negation ...
    assert before["flip_rate"] - after["flip_rate"] >= 0.3, (before["flip_rate"], after["flip_rate"])  # ... now it does
    assert m["comparison"]["paired"]["mcnemar_flips"]["p_value"] < 0.001
    assert after["accuracy"]["original"] >= before["accuracy"]["original"] - 0.1


def _lookup(cells: dict) -> float:
    """The accuracy of predicting a boolean by the majority value of its cell (cells: key -> values)."""
    n = sum(len(v) for v in cells.values())
    return sum(max(sum(v), len(v) - sum(v)) for v in cells.values()) / n


def test_counterfactual_reliance_is_not_the_label_within_a_finding(demo_dir, data_dir):
    """On the demo model, gray-image reliance is mostly the label: knowing the expected answer beside the
    finding predicts it far better than the finding alone (a gray image draws one answer per finding).
    Counterfactual reliance (the same patient with the asked finding toggled) is not: the label adds
    (almost) nothing to the finding. Recomputed here from plain forwards on 40 questions per finding and
    label; on the whole set over seeds 0–2 the label's gain is 0.30–0.36 (gray) and 0.00–0.013 (counterfactual)."""
    from collections import defaultdict

    from PIL import Image

    from mechmed.models import load_model
    from mechmed.readout import gray_like, margins

    rows, seen, per_cell = [], set(), defaultdict(int)
    for line in (data_dir / "pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        finding = r["extra"]["finding"]
        if r["question_id"] in seen or per_cell[(finding, r["answer"])] >= 40:
            continue
        seen.add(r["question_id"])
        per_cell[(finding, r["answer"])] += 1
        rows.append((finding, r["answer"], r["question"], data_dir / r["image"], data_dir / r["counterfactual_image"]))
    assert len(per_cell) == 12 and set(per_cell.values()) == {40}
    b = load_model(str(demo_dir))
    texts = [r[2] for r in rows]
    images = [Image.open(r[3]) for r in rows]
    m = margins(b, texts, images, batch_size=160).numpy() > 0
    m_cf = margins(b, texts, [Image.open(r[4]) for r in rows], batch_size=160).numpy() > 0
    m_gray = margins(b, texts, [gray_like(im) for im in images], batch_size=160).numpy() > 0
    assert ((m == [r[1] == "yes" for r in rows]).mean()) >= 0.8  # the model reads the image
    gain = {}
    for name, other in (("counterfactual", m_cf), ("gray", m_gray)):
        reliant = m != other
        by_finding, by_label = defaultdict(list), defaultdict(list)
        for r, x in zip(rows, reliant):
            by_finding[r[0]].append(bool(x))
            by_label[(r[0], r[1])].append(bool(x))
        gain[name] = _lookup(by_label) - _lookup(by_finding)
    assert gain["gray"] >= 0.2, gain
    assert gain["counterfactual"] <= 0.05, gain
