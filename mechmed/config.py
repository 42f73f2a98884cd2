"""The training config: written by ``mechmed select-layers``, run unchanged by ``mechmed train``.

A YAML file with a version stamp. Every field is documented here once (the docstring under it),
and that text is what ``mechmed train --help`` and docs/config.md show. Loading validates:
an unknown key is an error naming the closest known key, unless the file was written by a newer
config version, in which case unknown keys are warned about and dropped.

Defaults are those of the seed paper's MedGemma-4B cards (LoRA r 16, alpha 32, dropout 0.05,
lr 2e-4, batch 1 × accumulation 8, 3 epochs, q/k/v/o/gate/up/down). :func:`demo_defaults` gives
the values that suit the embedded default (a 64-wide model trained on CPU).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mechmed.errors import MechmedError

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
#: Layer-selection strategies (mechmed.selection.select).
STRATEGIES = ("window", "peak_end", "topk", "threshold")
METHODS = ("lora", "spectral_moe")
CONSISTENCY_LOSSES = ("teacher_kl", "sym_kl", "js", "margin_mse", "activation")
LR_SCHEDULES = ("constant", "linear", "cosine")
SPECTRAL_INITS = ("spectral", "principal", "minor", "random", "zero_b")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SpectralConfig:
    """Options of the spectral mixture of LoRA experts (``method: spectral_moe``)."""

    n_experts: int = 8
    """Number of experts per adapted linear layer."""
    top_k: int = 2
    """Experts routed per token."""
    init: str = "spectral"
    """Expert initialisation: spectral (non-overlapping SVD segments), principal, minor, random, zero_b."""
    scaling: str | float = "rule"
    """'rule' for s = sqrt(3·n·η/(r/N)) (r/N the rank of one expert), or a number for a fixed scale."""
    damping: float = 10.0
    """Damping ρ of the SVD initialisations: the initial experts hold 1/ρ of their singular directions."""
    lr_ratio: float = 1.0
    """η in the scaling rule: the ratio of the adapter's learning rate to full fine-tuning's."""
    balance_coef: float = 1e-3
    """Coefficient of the load-balancing auxiliary loss N·Σ f_i·P_i."""

    def __post_init__(self) -> None:
        _check(self.n_experts >= 1, "spectral.n_experts", self.n_experts, "a positive integer")
        _check(self.top_k >= 1, "spectral.top_k", self.top_k, f"between 1 and n_experts={self.n_experts}")
        _check(self.init in SPECTRAL_INITS, "spectral.init", self.init, f"one of {', '.join(SPECTRAL_INITS)}")
        parse_scaling(self.scaling)
        _check(self.damping > 0, "spectral.damping", self.damping, "a positive number")
        _check(self.lr_ratio > 0, "spectral.lr_ratio", self.lr_ratio, "a positive number")
        _check(self.balance_coef >= 0, "spectral.balance_coef", self.balance_coef, "a non-negative number")


def parse_scaling(scaling) -> float | None:
    """spectral.scaling: 'rule' -> None; a positive number (or its string) -> that number."""
    if isinstance(scaling, str) and scaling.strip().lower() == "rule":
        return None
    try:
        value = float(scaling)
    except (TypeError, ValueError):
        value = float("nan")
    _check(not isinstance(scaling, bool) and math.isfinite(value) and value > 0, "spectral.scaling", scaling,
           "'rule' or a positive number")
    return value




# ---------------------------------------------------------------- ablation arms (mechmed.ablate)

#: Arms in their display order. ``base`` is evaluated, not trained.
ARMS = ("base", "selected", "early", "middle", "late", "all", "random", "ce_only", "consistency_only", "act",
        "clamp", "steer", "ensemble")
#: Arms whose layers are a baseline range of the selected width (mechmed.selection.baseline).
RANGE_ARMS = ("early", "middle", "late", "random", "all")
#: The consistency loss of the ``consistency_only`` arm, whatever the training config's: the seed
#: paper's symmetric KL, whose collapse without cross-entropy is the finding this arm tests.
CONSISTENCY_ONLY_LOSS = "sym_kl"
#: Arms that train nothing: a fix applied to the base model at inference (mechmed.interventions).
TRAINING_FREE_ARMS = ("clamp", "steer", "ensemble")
DEFAULT_ARMS = ("selected", "early", "middle", "late", "all", "random", "ce_only", "consistency_only")

#: Rank when the config gives none: LoRA's per layer, spectral experts' total over the experts.
DEFAULT_RANK = {"lora": 16, "spectral_moe": 32}


#: How a model is opened, besides its name: :class:`ModelSpec`'s fields after ``name``.
LOAD_OPTIONS = ("revision", "trust_remote_code", "cache_dir", "local_files_only", "device_map")


@dataclass(frozen=True)
class ModelSpec:
    """A model and every option that opens it (:func:`mechmed.models.load_model`'s): what a training
    config's ``model:`` holds. In YAML a bare name (``model: demo``) when no option is set, else a
    mapping (``model: {name: google/medgemma-4b-it, revision: 8ab1c0e}``)."""

    name: str = "demo"
    """'demo', a hub id (google/medgemma-4b-it) or a local checkpoint directory."""
    revision: str | None = None
    """Hub revision: a branch, tag or commit (default main)."""
    trust_remote_code: bool = False
    """Let the checkpoint's own Python code run (off by default)."""
    cache_dir: str | None = None
    """Download cache of a hub model (default Hugging Face's); for 'demo', where it is built."""
    local_files_only: bool | None = None
    """Never download (default: as HF_HUB_OFFLINE says)."""
    device_map: str | None = None
    """Spread a model too large for one card over the visible GPUs (accelerate's device_map)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name.strip()), "model", self.name,
               "a model name: demo, a hub id or a checkpoint directory")
        _check(isinstance(self.trust_remote_code, bool), "model.trust_remote_code", self.trust_remote_code,
               "true or false")
        for key in ("revision", "cache_dir", "device_map"):
            value = getattr(self, key)
            _check(value is None or isinstance(value, str), f"model.{key}", value,
                   "a string, or null (quote a commit made of digits in YAML: '1234567')")
        _check(self.local_files_only is None or isinstance(self.local_files_only, bool), "model.local_files_only",
               self.local_files_only, "true, false or null")

    def __str__(self) -> str:
        return self.name

    @classmethod
    def of(cls, value, source: str = "config") -> ModelSpec:
        """A spec from a name, a mapping (``name`` and any of :data:`LOAD_OPTIONS`) or a spec."""
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict):
            d = known_keys(value, ("name", *LOAD_OPTIONS), f"{source}: model")
            if "name" not in d:
                raise MechmedError(f"{source}: model: a mapping needs name: (demo, a hub id or a checkpoint directory)")
            return cls(**d)
        raise MechmedError(f"{source}: model = {value!r}: give a name (demo, a hub id, a directory) or a mapping "
                           "with name: and loading options")

    @classmethod
    def from_args(cls, args, base: ModelSpec | str | None = None) -> ModelSpec:
        """``base`` with what the command line gives (``--model``, ``--revision``, ``--trust-remote-code``,
        ``--cache-dir``, ``--local-files-only``, ``--device-map``; None or absent = not given)."""
        spec = cls.of(base if base is not None else "demo")
        given = {k: getattr(args, k, None) for k in ("name", *LOAD_OPTIONS)}
        given["name"] = getattr(args, "model", None)
        if given["name"] not in (None, spec.name):  # another model: the config's options were that model's
            spec = cls(name=given["name"])
        if not given["trust_remote_code"]:
            given["trust_remote_code"] = None  # a flag left off keeps the config's
        return cls(**{**asdict(spec), **{k: v for k, v in given.items() if v is not None}})

    def options(self, placement: bool = True) -> dict:
        """The loading options as keywords of :func:`mechmed.models.load_model` (``placement=False``:
        without ``device_map``, as :func:`mechmed.models.model_config` takes them)."""
        return {k: getattr(self, k) for k in LOAD_OPTIONS if placement or k != "device_map"}

    def to_value(self) -> str | dict:
        """The YAML form: the bare name when no option is set."""
        set_ = {k: v for k, v in self.options().items() if v not in (None, False)}
        return {"name": self.name, **set_} if set_ else self.name


@dataclass
class TrainConfig:
    """Everything ``mechmed train`` needs; select-layers writes it, train runs it unchanged."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """Base model: 'demo', a hub id (google/medgemma-4b-it) or a local checkpoint directory; in a
    config file also a mapping of the name and its loading options (revision, trust_remote_code,
    cache_dir, local_files_only, device_map), which the command line sets with their own flags."""
    layers: list = field(default_factory=list)
    """Decoder layers to adapt (e.g. [15, 16, 17, 18, 19]); never the vision tower."""
    method: str = "lora"
    """Adapter: lora or spectral_moe."""
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linear modules inside each selected decoder layer to adapt."""
    rank: int | None = None
    """LoRA rank (default 16); for spectral_moe the total rank over all experts (default 32, r/N each)."""
    alpha: float = 32.0
    """LoRA alpha (scale alpha/rank)."""
    dropout: float = 0.05
    """LoRA dropout."""
    train_data: str = "demo"
    """Training pairs (two phrasings of one question on one image): a pairs file, a hub dataset
    (hf:OWNER/NAME[:CONFIG][@SPLIT]), or 'demo'."""
    eval_data: str = "demo"
    """Held-out pairs for the guard and the before/after evaluation: a pairs file, a hub dataset
    (hf:OWNER/NAME[:CONFIG][@SPLIT]), or 'demo'."""
    extra_eval: dict | None = None
    """Further evaluation sets reported beside eval_data, as name: pairs file or demo set (e.g. unseen:
    demo:unseen); default: the demo's unseen and negation sets when eval_data is 'demo', else none."""
    image_root: str | None = None
    """Directory under which image paths of both data files are resolved."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy on the answer token (both phrasings); 0 = pure consistency."""
    consistency_weight: float = 1.0
    """λ, the weight of the consistency term."""
    consistency: str = "teacher_kl"
    """Consistency between the two phrasings: of their yes/no distributions, teacher_kl (the paraphrase's
    pulled toward the original question's, stop-gradient), sym_kl (the seed paper's symmetric KL), js or
    margin_mse; or of their residuals, activation (the paraphrase's residual at the answer position pulled
    toward the original's, stop-gradient, at activation_layers)."""
    activation_layers: list | None = None
    """Layers whose residual (after the layer, at the answer position) consistency: activation compares;
    default: layers. Each must be at or after the first adapted layer (an earlier one gets no gradient)."""
    activation_norm: bool = True
    """consistency: activation divides each pair's squared distance by the original residual's squared norm
    (scale-free across layers and models); false: the mean squared difference per dimension."""
    lr: float = 2e-4
    """Learning rate (AdamW)."""
    lr_schedule: str = "constant"
    """Learning rate over the run: constant, linear (lr·(1 − step/total), as transformers' Trainer) or cosine."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 1
    """Pairs per optimiser micro-batch (each pair is two prompts in one forward)."""
    grad_accum: int = 8
    """Micro-batches per optimiser step."""
    epochs: float = 3.0
    """Passes over the training pairs."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides epochs when smaller)."""
    eval_every: int = 50
    """Optimiser steps between guard evaluations on the held-out split (0 = only at the end)."""
    guard_pairs: int = 200
    """Held-out pairs used by the collapse guard during training."""
    collapse_low: float = 0.05
    """The guard reports collapse when the held-out yes-rate falls below this ..."""
    collapse_high: float = 0.95
    """... or rises above this."""
    stop_on_collapse: bool = False
    """Stop training when the guard reports collapse (else record it and go on)."""
    checkpoint_every: int = 50
    """Optimiser steps between checkpoints (for --resume)."""
    bf16: bool = False
    """bf16 autocast (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    answer_words: list = field(default_factory=lambda: ["yes", "no"])
    """The two answer words (each one token)."""
    prompt_template: str | None = None
    """Prompts from this text with {question} (and {image}) instead of the chat template; default: the
    chat template, or 'Question: {question}\\nAnswer:' for a model without one."""
    seed: int = 0
    """Random seed (data order, adapter init)."""
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    """Options of method spectral_moe."""
    provenance: dict = field(default_factory=dict)
    """Where this config came from (scores file hash, strategy, mechmed version); informational."""

    def __post_init__(self) -> None:
        self.model = ModelSpec.of(self.model)
        if isinstance(self.spectral, dict):
            self.spectral = _build(SpectralConfig, self.spectral, "spectral")
        if self.rank is None:
            self.rank = DEFAULT_RANK.get(self.method, DEFAULT_RANK["lora"])
        try:
            self.layers = [int(x) for x in self.layers]
        except (TypeError, ValueError):
            _check(False, "layers", self.layers, "a list of decoder layer indices (integers)")
        if self.extra_eval is None:
            from mechmed.sources import extra_eval

            self.extra_eval = extra_eval(self.eval_data)
        _check(isinstance(self.extra_eval, dict) and all(isinstance(v, str) and v.strip()
                                                         for v in self.extra_eval.values()),
               "extra_eval", self.extra_eval, "a mapping of set name: pairs file (or demo:unseen)")
        self.extra_eval = {str(k).strip(): v.strip() for k, v in self.extra_eval.items()}
        bad = [k for k in self.extra_eval if not re.fullmatch(r"[A-Za-z0-9_-]+", k) or k == "main"]
        _check(not bad, "extra_eval", bad, "set names of letters, digits, - and _ (each names a directory; "
               "'main' is the main set's)")
        self.target_modules = list(self.target_modules)
        self.answer_words = list(self.answer_words)
        _check(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        _check(self.consistency in CONSISTENCY_LOSSES, "consistency", self.consistency,
               f"one of {', '.join(CONSISTENCY_LOSSES)}")
        _check(bool(self.layers), "layers", self.layers, "a non-empty list of decoder layer indices")
        if self.activation_layers is not None:
            try:
                self.activation_layers = [int(x) for x in self.activation_layers]
            except (TypeError, ValueError):
                _check(False, "activation_layers", self.activation_layers, "a list of decoder layer indices")
            _check(bool(self.activation_layers) and all(x >= 0 for x in self.activation_layers), "activation_layers",
                   self.activation_layers, "a non-empty list of non-negative layer indices (or null for layers)")
        if self.consistency == "activation" and self.consistency_weight > 0:
            early = [x for x in self.act_layers if x < min(self.layers)]
            _check(not early, "activation_layers", self.act_layers, f"layers at or after the first adapted layer "
                   f"{min(self.layers)} (the residual of layer {early[0] if early else ''} does not depend on the "
                   "adapter)")
        _check(all(x >= 0 for x in self.layers), "layers", self.layers, "non-negative layer indices")
        _check(len(set(self.layers)) == len(self.layers), "layers", self.layers, "distinct layers")
        _check(bool(self.target_modules), "target_modules", self.target_modules, "at least one module name")
        _check(self.rank >= 1, "rank", self.rank, "at least 1")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        _check(self.ce_weight >= 0 and self.consistency_weight >= 0, "ce_weight/consistency_weight",
               (self.ce_weight, self.consistency_weight), "non-negative")
        _check(self.ce_weight + self.consistency_weight > 0, "ce_weight/consistency_weight",
               (self.ce_weight, self.consistency_weight), "not both zero")
        _check(self.lr > 0, "lr", self.lr, "positive")
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"one of {', '.join(LR_SCHEDULES)}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size/grad_accum",
               (self.batch_size, self.grad_accum), "at least 1")
        _check(self.epochs > 0 or (self.max_steps or 0) > 0, "epochs", self.epochs, "positive")
        _check(0 <= self.collapse_low < self.collapse_high <= 1, "collapse_low/collapse_high",
               (self.collapse_low, self.collapse_high), "0 <= low < high <= 1")
        _check(len(self.answer_words) == 2, "answer_words", self.answer_words, "exactly two words")
        if self.method == "spectral_moe":
            s = self.spectral
            _check(1 <= s.top_k <= s.n_experts, "spectral.top_k", s.top_k, f"between 1 and n_experts={s.n_experts}")
            _check(self.rank % s.n_experts == 0, "rank", self.rank,
                   f"a multiple of spectral.n_experts={s.n_experts} (each expert gets rank/n_experts)")

    @property
    def act_layers(self) -> list:
        """The layers consistency: activation compares (activation_layers, default layers)."""
        return list(self.activation_layers if self.activation_layers is not None else self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_value()
        return {"config_version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        if not isinstance(d, dict):
            raise MechmedError(f"{source}: the top level must be a mapping of option: value")
        d = dict(d)
        d.pop("versions", None)  # recorded by mechmed train in a run's config.yaml: a record, not an option
        version = d.pop("config_version", CONFIG_VERSION)
        if not isinstance(version, int):
            raise MechmedError(f"{source}: config_version {version!r} must be an integer")
        newer = version > CONFIG_VERSION
        return _build(cls, d, source, newer=newer)

    def save(self, path: str | Path) -> Path:
        import yaml

        from mechmed.io import write_text

        header = "# mechmed training config: run with `mechmed train --config THIS_FILE`\n"
        return write_text(path, header + yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise MechmedError(f"--config {path}: not found; write one with mechmed select-layers")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            line = f", line {where.line + 1}" if where else ""
            raise MechmedError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
        return cls.from_dict(data or {}, source=str(path))


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise MechmedError(f"config option {key}: {value!r} is invalid; use {expected}")


def known_keys(d: dict, known, source: str, *, newer: bool = False,
               version: str = "a newer config version") -> dict:
    """mechmed's one rule for keys of a config mapping: the known ones are kept; an unknown one is an
    error that names it (with the closest known key), unless the mapping was written by another
    version (``newer``; ``version`` says which), whose options are warned about and dropped."""
    known = set(known)
    for key in d:
        if key in known:
            continue
        if newer:
            log.warning("%s: option %r comes from %s and is ignored", source, key, version)
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(sorted(known))}"
        raise MechmedError(f"{source}: unknown option {key!r}; {hint}")
    return {k: v for k, v in d.items() if k in known}


def _build(cls, d: dict, source: str, newer: bool = False):
    known = {f.name: f for f in fields(cls)}
    kwargs = {key: _coerce(known[key], value, source) for key, value in known_keys(d, known, source, newer=newer).items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise MechmedError(f"{source}: {e}") from None


def _coerce(f, value, source: str):
    """Check a value against the type of its field's default (YAML gives ints for floats, etc.)."""
    from dataclasses import MISSING

    default = f.default if f.default is not MISSING else f.default_factory()
    want = type(default)
    if want is ModelSpec:
        return ModelSpec.of(value, source)
    if str(f.type) == "str | float" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    if value is None and (default is None or "None" in str(f.type)):
        return None
    if default is None:
        want = {"int | None": int, "str | None": str}.get(str(f.type), type(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(want, isinstance(value, (dict, want)))
    if not ok:
        raise MechmedError(f"{source}: option {f.name} = {value!r} should be of type {want.__name__}")
    return float(value) if want is float else value


def field_docs(cls=TrainConfig) -> dict[str, str]:
    """Field name -> the docstring written under it (used for --help and docs)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def demo_defaults() -> dict:
    """Training values that suit the embedded default (:data:`mechmed.demo.source.TRAIN_DEFAULTS`)."""
    from mechmed.sources import train_defaults

    return train_defaults("demo")
