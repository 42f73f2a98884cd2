"""The embedded default's SAEs: one sae-lens SAE per decoder layer of the demo model, trained on first
use with :func:`mechmed.saes.train_saes` on the model's residuals over demo prompts (image + question
prompts over the training images, then the demo corpus), cached beside the model and keyed by its
weights and the recipe (:class:`mechmed.saes.SAETrainConfig`)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from mechmed.io import build_lock, temp_dir
from mechmed.runtime import determinism_state, deterministic, torch_threads
from mechmed.saes import (
    MANIFEST,
    SAETrainConfig,
    _layer_dirs,
    collect_activations,
    save_sae_set,
    text_inputs,
    train_saes,
)

log = logging.getLogger(__name__)


def demo_training_batches(bundle, cfg: SAETrainConfig, seed: int = 0, batch_size: int = 64):
    """Input batches for the demo SAEs: image + question prompts over the demo's training images,
    then the demo corpus."""
    from mechmed.demo.phrasings import corpus
    from mechmed.demo.prompts import image_question_prompts
    from mechmed.readout import build_inputs

    images, questions = image_question_prompts(cfg.n_image_prompts, seed, split="train")
    for s in range(0, len(questions), batch_size):
        yield build_inputs(bundle.processor, questions[s:s + batch_size], images[s:s + batch_size])
    import numpy as np

    texts = corpus(seed, cfg.n_corpus_reports)
    unk = getattr(bundle.tokenizer, "unk_token", None)
    rng = np.random.default_rng([seed, 11])
    for rate in cfg.oov_rates if unk else ():
        texts = texts + [" ".join(unk if rng.random() < rate else w for w in t.split())
                         for t in corpus(seed, cfg.n_corpus_reports)]
    for s in range(0, len(texts), batch_size):
        yield text_inputs(bundle.processor, texts[s:s + batch_size])


def _weights_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def sae_set_digest(saes: dict) -> str:
    """SHA-256 over every SAE's weights ({layer: SAE}, names prefixed ``layer_{L}.``): equal digests mean
    bit-identical SAE sets."""
    from mechmed.demo.build import state_digest

    return state_digest({f"layer_{layer}.{k}": v for layer, sae in saes.items() for k, v in sae.state_dict().items()})


def demo_saes_dir(model_dir: str | os.PathLike, cfg: SAETrainConfig, seed: int = 0) -> Path:
    """Where the demo SAEs for ``model_dir`` and ``cfg`` live: beside the model, keyed by its
    weights and the recipe."""
    model_dir = Path(model_dir)
    return model_dir.parent / f"{model_dir.name}-saes-{_weights_digest(model_dir)}-{cfg.digest()}-s{seed}"


def _valid_sae_dir(path: Path, n_layers: int | None = None) -> bool:
    if not (path / MANIFEST).is_file():
        return False
    layers = _layer_dirs(path)
    return bool(layers) and (n_layers is None or sorted(layers) == list(range(n_layers)))


def ensure_demo_saes(cache_dir: str | None = None, seed: int = 0, kind: str = "batchtopk", d_sae: int = 512,
                     **recipe) -> Path:
    """The demo model's SAEs (one sae-lens directory per layer), trained on first use and cached.

    ``kind``, ``d_sae`` and any other :class:`SAETrainConfig` field (``k``, ``steps``, ...) form
    the recipe; the cache is keyed by the demo model's weights and the recipe's hash, and written
    atomically (temporary directory, then rename). Returns the directory.
    """
    from mechmed.demo.build import ensure_demo_model

    cfg = replace(SAETrainConfig(), kind=kind, d_sae=d_sae, **recipe)
    model_dir = Path(ensure_demo_model(cache_dir=cache_dir, seed=seed))
    final = demo_saes_dir(model_dir, cfg, seed)
    if _valid_sae_dir(final):
        return final
    with build_lock(final):  # a concurrent process training the same set: wait, then reuse it
        if _valid_sae_dir(final):
            return final
        return _train_demo_saes(final, model_dir, cfg, seed)


def _train_demo_saes(final: Path, model_dir: Path, cfg: SAETrainConfig, seed: int) -> Path:
    from mechmed.models import load_model

    t0 = time.perf_counter()
    # the demo model is 64 wide: one thread is fastest, and far faster on shared cores
    with torch_threads(1), deterministic():
        bundle = load_model(str(model_dir), local_files_only=True)
        layers = list(range(bundle.n_layers))
        acts = collect_activations(bundle, demo_training_batches(bundle, cfg, seed), layers)
        collect_s = time.perf_counter() - t0
        log.info("demo SAEs: %d tokens x %d layers collected in %.1fs", acts[0].shape[0], len(layers), collect_s)
        # the layers in two processes where there are two cores: the same SAEs, in half the time
        trained = train_saes(acts, cfg, seed=seed, model_name=f"mechmed-demo:{model_dir.name}", num_threads=1,
                             progress="demo SAEs", workers=min(2, os.cpu_count() or 1))
    manifest = {"recipe": cfg.to_dict(), "seed": seed, "model_dir": str(model_dir),
                "model_weights": _weights_digest(model_dir), "weights_sha256": sae_set_digest(trained.saes),
                "determinism": determinism_state(), "collect_s": collect_s, **trained.stats}
    tmp = temp_dir(final.parent, prefix=f".{final.name}.")
    try:
        save_sae_set(trained.saes, tmp, manifest)
        if final.exists() and not _valid_sae_dir(final):
            shutil.rmtree(final)  # an incomplete directory from an older mechmed
        try:
            os.replace(tmp, final)
        except OSError:
            if not _valid_sae_dir(final):  # not a concurrent build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo SAEs written to %s (%.1fs in all)", final, time.perf_counter() - t0)
    return final
