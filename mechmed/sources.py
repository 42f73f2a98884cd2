"""Named sources: the one place where a name such as ``demo`` becomes a model directory, pair files,
SAEs, image prompts and training defaults.

A source is a :class:`Source` registered under its name by the package that provides it (the
embedded default registers ``demo`` from :mod:`mechmed.demo.source`, imported here on first use);
the rest of mechmed asks this module and never imports that package. Every resolver takes the same
``cache_dir`` and ``seed`` and hands them to the source, so a model, its data and its SAEs come from
one cache. Names: ``NAME`` for a model, SAEs or data; ``NAME:SET`` for one of a source's pair sets
(``demo:unseen``). A name that is not a source is a path or hub id, left to the caller.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechmed.errors import MechmedError


@dataclass(frozen=True)
class Source:
    """A named model with its data. Callables take ``cache_dir=`` and ``seed=`` keywords."""

    name: str
    d_model: int
    """Residual width, known without building the model (the CPU thread policy reads it)."""
    model_dir: Callable[..., Path]
    """A checkpoint directory that :func:`mechmed.models.load_model` opens (built on first use)."""
    data_dir: Callable[..., Path]
    """The directory holding :attr:`pair_files` and their images."""
    pair_files: Mapping[str, str]
    """Pair set -> file name in :attr:`data_dir`; ``train`` and ``eval`` are what ``NAME`` means
    for training and for evaluation."""
    extra_eval: Mapping[str, str] = field(default_factory=dict)
    """Sets reported beside ``eval`` by default (set name -> data name such as ``demo:unseen``)."""
    train_defaults: Mapping[str, Any] = field(default_factory=dict)
    """Training config values that suit this model (:class:`mechmed.config.TrainConfig` fields)."""
    saes_dir: Callable[..., Path] | None = None
    """A directory of per-layer sae-lens SAEs for this model, or None."""
    image_prompts: Callable[..., tuple[list, list]] | None = None
    """``(n, seed=, split=)`` -> (PIL images, questions) over the source's own images, or None."""
    describe: Callable[[Path], str] | None = None
    """One line about a built model directory (what it was trained to, how it scores)."""


_SOURCES: dict[str, Source] = {}
#: Source name -> module that registers it, imported the first time the name is asked for.
PROVIDERS = {"demo": "mechmed.demo.source"}


def register(source: Source) -> Source:
    """Make ``source`` available by its name (replacing one of the same name)."""
    _SOURCES[source.name] = source
    return source


def get(name: str | None) -> Source | None:
    """The source ``name`` (or ``name:set``) refers to, or None when it is not one."""
    if name is None:
        return None
    base = str(name).partition(":")[0]
    if base not in _SOURCES and base in PROVIDERS:
        importlib.import_module(PROVIDERS[base])
    return _SOURCES.get(base)


def names() -> list[str]:
    return sorted({*PROVIDERS, *_SOURCES})


def model_dir(name: str, *, cache_dir=None, seed: int = 0) -> Path | None:
    """The checkpoint directory of source ``name``; None when ``name`` is not a source."""
    src = get(name) if ":" not in str(name) else None
    return None if src is None else Path(src.model_dir(cache_dir=cache_dir, seed=seed))


def pairs_file(data: str, *, split: str = "eval", cache_dir=None, seed: int = 0) -> Path | None:
    """The pairs file ``data`` names: ``NAME`` is the source's ``split`` set (train or eval),
    ``NAME:SET`` its set ``SET``; None when ``data`` is not a source."""
    src = get(data)
    if src is None:
        return None
    name = str(data).partition(":")[2] or split
    if name not in src.pair_files:
        raise MechmedError(f"--data {data}: the {src.name} has no set {name!r}; use "
                           + ", ".join(f"{src.name}:{k}" for k in src.pair_files))
    return Path(src.data_dir(cache_dir=cache_dir, seed=seed)) / src.pair_files[name]


def saes_dir(spec: str, *, cache_dir=None, seed: int = 0) -> Path | None:
    """The SAE directory of source ``spec``; None when ``spec`` is not a source."""
    src = get(spec) if ":" not in str(spec) else None
    if src is None:
        return None
    if src.saes_dir is None:
        raise MechmedError(f"--saes {spec}: the {src.name} source has no SAEs; give a directory or RELEASE:ID_TEMPLATE")
    return Path(src.saes_dir(cache_dir=cache_dir, seed=seed))


def train_defaults(model: str | None) -> dict:
    """Training config values that suit ``model`` (empty unless it is a source)."""
    src = get(model) if model is not None and ":" not in str(model) else None
    return dict(src.train_defaults) if src else {}


def extra_eval(eval_data: str | None) -> dict:
    """The sets reported beside ``eval_data`` by default: a source's extra sets when ``eval_data``
    is its evaluation set (``NAME`` or ``NAME:eval``), else none."""
    src = get(eval_data)
    if src is None or str(eval_data).partition(":")[2] not in ("", "eval"):
        return {}
    return dict(src.extra_eval)


def image_prompts(model: str | None) -> Callable[..., tuple[list, list]] | None:
    """The image + question prompt builder of source ``model``, or None (not a source, or none shipped)."""
    src = get(model) if model is not None and ":" not in str(model) else None
    return src.image_prompts if src else None
