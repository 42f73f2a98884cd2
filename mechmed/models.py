"""Loading models into a :class:`ModelBundle`: model + processor + family map + answer tokens.

``load_model("demo")`` is the embedded default (built on first use); anything else is a hub id
(``google/medgemma-4b-it``) or a local checkpoint directory. ``trust_remote_code`` is off unless
asked; ``local_files_only`` follows ``HF_HUB_OFFLINE`` unless given.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechmed.errors import MechmedError
from mechmed.families import ArchitectureMap, get_family
from mechmed.readout import AnswerTokens, answer_token_ids

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelBundle:
    """Everything the pipeline needs to run one model."""

    model: Any
    processor: Any
    family: ArchitectureMap
    answers: AnswerTokens
    name: str = ""

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.family.n_layers(self.model.config)

    @property
    def d_model(self) -> int:
        return self.family.d_model(self.model.config)

    @property
    def multimodal(self) -> bool:
        return self.family.multimodal and getattr(self.processor, "image_processor", None) is not None

    @property
    def provenance(self) -> dict:
        """Where the weights came from and how prompts are built: for a run's metadata."""
        from mechmed.readout import prompt_format

        out = {"model": self.name, "prompt_format": prompt_format(self.processor)}
        source = getattr(self.model, "mechmed_source", None)
        if source:
            out["source"] = source
        return out


def bundle(model, processor, *, answer_words=("yes", "no"), name: str = "") -> ModelBundle:
    """Wrap an already-built model and processor (e.g. a tiny model made in a notebook)."""
    family = get_family(model)
    return ModelBundle(model.eval(), processor, family, answer_token_ids(getattr(processor, "tokenizer", processor),
                                                                        answer_words), name)


def resolve_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise MechmedError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _offline(local_files_only: bool | None) -> bool:
    from mechmed.runtime import hub_offline

    return hub_offline() if local_files_only is None else local_files_only


def load_processor(path: str, family: ArchitectureMap, **kw):
    """The family's processor; for Qwen2.5-VL without torchvision, mechmed's image processor."""
    import transformers

    if not family.multimodal:
        return transformers.AutoTokenizer.from_pretrained(path, **kw)
    try:
        return transformers.AutoProcessor.from_pretrained(path, **kw)
    except (ImportError, ValueError, AttributeError, TypeError):
        if family.name != "Qwen2_5_VLForConditionalGeneration":
            raise
        from mechmed.processors import QwenImageProcessor

        return QwenImageProcessor(transformers.AutoImageProcessor.from_pretrained(path, **kw),
                                  transformers.AutoTokenizer.from_pretrained(path, **kw))


def model_config(name_or_path: str = "demo", *, local_files_only: bool | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, cache_dir: str | None = None,
                 seed: int = 0):
    """``(path, config, family, load kwargs)`` of a hub id, local path or ``"demo"``, reading only the
    config (so a layer count costs no weights)."""
    import transformers

    from mechmed.checkpoints import gguf_checkpoint, is_gguf
    from mechmed.sources import model_dir

    name = str(name_or_path)
    built = model_dir(name, cache_dir=cache_dir, seed=seed)
    if built is None and is_gguf(name):  # a GGUF file: its dequantised copy under mechmed's cache
        built = gguf_checkpoint(name, cache_dir=cache_dir)
    if built is not None:  # a named source (the embedded default) or a GGUF file: a cached checkpoint
        path, offline = str(built), True
    else:
        path, offline = name, _offline(local_files_only)
        if (name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1) and not Path(name).expanduser().exists():
            raise MechmedError(f"--model {name}: no such directory; give a checkpoint directory, a hub id or 'demo'")
        path = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    kw = dict(local_files_only=offline, trust_remote_code=trust_remote_code, revision=revision)
    if built is None and cache_dir is not None:  # a hub id: cache_dir is Hugging Face's download cache
        kw["cache_dir"] = str(cache_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        hint = ("check the id or path" + (" and --revision" if revision else "")
                + ("" if offline else "; gated models need `hf auth login`"))
        at = f" at revision {revision}" if revision else ""
        raise MechmedError(f"--model {name}{at}: cannot load its config ({str(e).splitlines()[0]}); {hint}") from e
    return path, config, get_family(config), kw


def skeleton(config, family: ArchitectureMap):
    """The model ``config`` describes, built on the meta device: its module tree (names, shapes)
    with no weights read or allocated, to check options against before a load."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, family.auto_class).from_config(config)


def load_model(name_or_path: str = "demo", dtype: str | None = None, device: str = "cpu", *,
               answer_words=("yes", "no"), local_files_only: bool | None = None,
               trust_remote_code: bool = False, revision: str | None = None,
               cache_dir: str | None = None, seed: int = 0, device_map: str | dict | None = None,
               prompt_template: str | None = None) -> ModelBundle:
    """Load a model by hub id, local path, or ``"demo"`` (the embedded default), or by a
    :class:`mechmed.config.ModelSpec` (its loading options replace the keywords of the same names).

    ``device`` is a torch device or ``auto`` (CUDA where present). ``device_map`` (e.g. ``"auto"``)
    spreads a model too large for one card over the visible devices through accelerate, as
    ``from_pretrained`` does; the model then stays where it was placed. ``prompt_template``
    replaces the chat template (:func:`mechmed.readout.set_prompt_template`); a model without a
    chat template gets :data:`mechmed.readout.PLAIN_TEMPLATE`."""
    from mechmed.config import ModelSpec
    from mechmed.readout import check_template, set_prompt_template

    if isinstance(name_or_path, ModelSpec):  # a training config's model: its own loading options
        return load_model(name_or_path.name, dtype, device, answer_words=answer_words, seed=seed,
                          prompt_template=prompt_template, **name_or_path.options())
    if prompt_template is not None:
        check_template(prompt_template)  # before anything loads
    import transformers

    from mechmed.runtime import check_device, hf_progress_bars

    device = check_device(device)
    name = str(name_or_path)
    path, config, family, kw = model_config(name, local_files_only=local_files_only,
                                            trust_remote_code=trust_remote_code, revision=revision,
                                            cache_dir=cache_dir, seed=seed)
    torch_dtype = resolve_dtype(dtype, device)
    auto = getattr(transformers, family.auto_class)
    # a local checkpoint loads without drawing bars; a hub id may download, and its bars show it.
    # Either way the user's own progress-bar setting is what it was before.
    try:
        with hf_progress_bars(enabled=not Path(path).is_dir()):
            processor = set_prompt_template(load_processor(path, family, **kw), prompt_template)
            # answer words are checked before the (possibly large) weights are read
            answers = answer_token_ids(getattr(processor, "tokenizer", processor), answer_words)
            placed = {"device_map": device_map} if device_map is not None else {}
            model = auto.from_pretrained(path, dtype=torch_dtype, **placed, **kw)
    except OSError as e:
        raise MechmedError(f"--model {name}: cannot load weights or processor ({str(e).splitlines()[0]})") from e
    model = (model if device_map is not None else model.to(device)).eval()
    from mechmed.checkpoints import read_source

    model.mechmed_source = read_source(path) if Path(path).is_dir() else None
    return ModelBundle(model, processor, family, answers, name)


def attach_adapter(b: ModelBundle, adapter_dir: str | os.PathLike) -> ModelBundle:
    """Load an adapter directory onto the bundle's model (for evaluation): a peft adapter
    (``adapter_config.json``), or a spectral mixture of experts (``spectral_config.json``,
    :mod:`mechmed.spectral`)."""
    from mechmed.spectral import CONFIG_FILE, is_spectral_adapter, load_spectral_adapter

    adapter_dir = Path(adapter_dir)
    if is_spectral_adapter(adapter_dir):
        model = load_spectral_adapter(b.model, adapter_dir)
        return ModelBundle(model, b.processor, b.family, b.answers, f"{b.name}+{adapter_dir.name}")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MechmedError(f"--adapter {adapter_dir}: neither adapter_config.json (peft) nor {CONFIG_FILE} "
                           "(spectral experts) there; give a directory written by save_pretrained / mechmed train")
    from peft import PeftModel

    with peft_quietly():
        model = PeftModel.from_pretrained(b.model, str(adapter_dir)).eval()
    return ModelBundle(model, b.processor, b.family, b.answers, f"{b.name}+{adapter_dir.name}")


@contextmanager
def peft_quietly():
    """Around wrapping a model in peft: peft asks transformers a deprecated question
    (``is_gradient_checkpointing``) on every adapter, a FutureWarning nobody using mechmed can act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def cpu_threads_for(name_or_path: str, device: str = "cpu") -> int | None:
    """Torch CPU threads to run ``name_or_path`` with: 1 for models as narrow as the demo (their
    matmuls gain nothing from threads and slow down many times on shared cores), else None (leave
    torch's setting). Reads only a local config; hub ids and unreadable paths give None."""
    from mechmed.runtime import threads_for_width
    from mechmed.sources import get

    if str(device) != "cpu":
        return None
    source = get(name_or_path) if ":" not in str(name_or_path) else None
    if source is not None:
        return threads_for_width(source.d_model)
    if not (Path(name_or_path) / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
        return threads_for_width(get_family(config).d_model(config))
    except (OSError, ValueError, MechmedError):  # the command itself reports what is wrong with --model
        return None
