"""load_model on saved tiny checkpoints of each family: same margins as the in-memory model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, QUESTIONS, make_image
from mechmed import tiny
from mechmed.errors import MechmedError
from mechmed.families import get_family
from mechmed.models import load_model, resolve_dtype
from mechmed.readout import margins


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: tiny.save(m, p, root / name) for name, (m, p) in tiny_models.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_load_saved_checkpoint_matches_in_memory_model(saved, tiny_bundles, name):
    assert (saved[name] / "model.safetensors").is_file()
    loaded = load_model(str(saved[name]), local_files_only=True)
    ref = tiny_bundles[name]
    assert loaded.family.name == name
    assert loaded.answers == ref.answers
    assert loaded.n_layers == ref.n_layers == 3
    images = [make_image(i) for i in range(3)] if ref.multimodal else None
    torch.testing.assert_close(margins(loaded, QUESTIONS[:3], images), margins(ref, QUESTIONS[:3], images),
                               atol=1e-5, rtol=0)


def test_auto_device_and_device_map(saved, tiny_bundles):
    """``auto`` is CUDA where this torch sees a GPU, else the CPU; a model placed by accelerate's
    ``device_map`` (all on the one device here; accelerate dispatches only over several) gives the
    margins of the plain load."""
    from mechmed.runtime import check_device

    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    name = "Gemma3ForConditionalGeneration"
    placed = load_model(str(saved[name]), device="auto", device_map="auto", local_files_only=True, dtype="float32")
    want = check_device("auto")
    assert {p.device.type for p in placed.model.parameters()} == {want}, "not where the device map put it"
    images = [make_image(i) for i in range(3)]
    torch.testing.assert_close(margins(placed, QUESTIONS[:3], images).cpu(),
                               margins(tiny_bundles[name], QUESTIONS[:3], images), atol=1e-5, rtol=0)


def test_unknown_family_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(MechmedError, match="BertModel.*not supported"):
        load_model(str(tmp_path))


def test_missing_local_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(MechmedError, match="no such directory"):
        load_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MechmedError, match="cannot load its config"):
        load_model("google/medgemma-4b-it-not-cached-here")


def test_multi_token_answer_word(saved):
    with pytest.raises(MechmedError, match="not one"):
        load_model(str(saved["Gemma3ForCausalLM"]), answer_words=("yes", "no way"))


def test_dtype_resolution():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(MechmedError, match="--dtype"):
        resolve_dtype("int3", "cpu")


def test_remote_code_is_off_by_default(saved, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoConfig.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    load_model(str(saved["Gemma3ForCausalLM"]))
    assert seen["trust_remote_code"] is False


def test_cpu_threads_follow_the_model_width(saved, tmp_path):
    """One thread for models as narrow as the demo (read from their config), torch's own setting for
    wide models, GPUs, hub ids and paths without a config."""
    from transformers import AutoConfig

    from mechmed.models import cpu_threads_for
    from mechmed.runtime import threads_for_width

    for path in saved.values():
        config = AutoConfig.from_pretrained(path)
        width = get_family(config).d_model(config)
        assert cpu_threads_for(str(path)) == threads_for_width(width) == 1
        assert cpu_threads_for(str(path), "cuda") is None
    wide = AutoConfig.from_pretrained(saved["Gemma3ForCausalLM"])
    wide.hidden_size = 2560
    wide.save_pretrained(tmp_path / "wide")
    assert cpu_threads_for(str(tmp_path / "wide")) is None
    assert cpu_threads_for("demo") == 1
    assert cpu_threads_for("google/medgemma-4b-it") is None
    assert cpu_threads_for(str(tmp_path / "missing")) is None


def test_loading_leaves_the_progress_bar_setting_alone(saved):
    """Loading a local checkpoint draws no bars, and afterwards Hugging Face's progress bars (and so a
    later download's) are as the user had them."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    for enabled in (True, False):
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
        try:
            load_model(str(saved["Gemma3ForCausalLM"]), local_files_only=True)
            assert hf_logging.is_progress_bar_enabled() is enabled
            assert are_progress_bars_disabled() is not enabled
        finally:
            hf_logging.enable_progress_bar()


def test_gguf_without_the_gguf_package_is_one_clear_error(tmp_path, monkeypatch):
    """A .gguf model needs the optional gguf package: without it, one line that says how to get it,
    before any checkpoint is written to the cache (only the file's hash is remembered)."""
    import sys

    monkeypatch.setenv("MECHMED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    path = tmp_path / "medgemma-4b-it-Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(MechmedError, match=r"needs the gguf package; pip install 'mechmed\[gguf\]'"):
        load_model(str(path))
    assert not any(p.is_dir() for p in (tmp_path / "cache" / "gguf").glob("*"))


def test_gguf_file_hash_is_remembered(tmp_path, monkeypatch):
    """The file's SHA-256 keys the cache; it is computed once per (path, size, mtime)."""
    import hashlib

    from mechmed import checkpoints

    monkeypatch.setenv("MECHMED_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 50)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoints.file_sha256(path) == want
    calls = []
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    assert checkpoints.file_sha256(path) == want and not calls
