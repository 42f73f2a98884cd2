"""Architecture maps: the one place that spells module paths.

One declarative :class:`ArchitectureMap` per model family turns a :class:`~mechmed.sites.Site`
into a module path (for hooks, nnsight and peft) and into a TransformerLens hook name. Families
are registered by their transformers class name; registering a name twice is an error.

What each Site kind means, per family (the tensor the block adds to the residual stream):

- Gemma 3: ``attn_out`` = output of ``post_attention_layernorm`` (Gemma normalises the attention
  output before adding it), ``mlp_out`` = output of ``post_feedforward_layernorm``.
- Qwen2.5-VL: ``attn_out`` = output of ``self_attn`` (first element), ``mlp_out`` = output of ``mlp``.
- ``resid_post`` = output of the decoder layer itself, in every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechmed.errors import MechmedError
from mechmed.sites import SITE_KINDS, Site


@dataclass(frozen=True)
class ArchitectureMap:
    """Where things live in one transformers model class."""

    name: str
    """The transformers class name (``config.architectures[0]``)."""
    layers: str
    """Path of the decoder's ``ModuleList`` of layers, from the top-level model."""
    final_norm: str
    """Path of the norm applied after the last decoder layer."""
    lm_head: str = "lm_head"
    embed_tokens: str = ""
    vision_tower: str | None = None
    projector: str | None = None
    site_modules: dict = field(default_factory=dict)
    """Site kind -> path relative to one decoder layer ('' is the layer itself)."""
    text_config: str | None = None
    """Attribute of the config holding the language model's config (None: the config itself)."""
    multimodal: bool = False
    auto_class: str = "AutoModelForCausalLM"
    """The transformers auto class that loads this family."""
    peft_layers_pattern: str = "layers"
    """peft's ``layers_pattern`` restricting LoRA to the language model's decoder layers."""
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        missing = set(SITE_KINDS) - set(self.site_modules)
        if missing:
            raise ValueError(f"family {self.name}: no module for site kinds {sorted(missing)}")

    def layer_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def module_path(self, site: Site) -> str:
        """The module whose output is ``site``'s activation."""
        rel = self.site_modules[site.kind]
        return self.layer_path(site.layer) + (f".{rel}" if rel else "")

    @staticmethod
    def hook_name(site: Site) -> str:
        """The TransformerLens hook name of ``site``."""
        return site.hook_name

    def text_config_of(self, config):
        return getattr(config, self.text_config) if self.text_config else config

    def n_layers(self, config) -> int:
        """Decoder layer count, read from the (nested) text config."""
        return int(self.text_config_of(config).num_hidden_layers)

    def d_model(self, config) -> int:
        return int(self.text_config_of(config).hidden_size)

    def vocab_size(self, config) -> int:
        return int(self.text_config_of(config).vocab_size)

    def get_module(self, model, path: str):
        try:
            return model.get_submodule(path)
        except AttributeError as e:
            raise MechmedError(f"family {self.name}: model has no module {path!r} ({e})") from e

    def layer_modules(self, model) -> list:
        return list(self.get_module(model, self.layers))

    def sites(self, config, kinds=("resid_post",)) -> list[Site]:
        return [Site(layer, kind) for kind in kinds for layer in range(self.n_layers(config))]


_REGISTRY: dict[str, ArchitectureMap] = {}


def register_family(family: ArchitectureMap) -> ArchitectureMap:
    """Register ``family`` under its class name; a second registration of a name is an error."""
    if family.name in _REGISTRY:
        raise ValueError(f"family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def registered_families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name_or_config) -> ArchitectureMap:
    """The map for a class name, a config (its ``architectures``) or a model instance."""
    name = name_or_config
    if not isinstance(name, str):
        obj = name_or_config
        config = getattr(obj, "config", obj)
        archs = list(getattr(config, "architectures", None) or [])
        if not isinstance(obj, type) and hasattr(obj, "forward") and type(obj).__name__ in _REGISTRY:
            archs.insert(0, type(obj).__name__)
        name = next((a for a in archs if a in _REGISTRY), archs[0] if archs else type(obj).__name__)
    if name not in _REGISTRY:
        raise MechmedError(
            f"model family {name!r} is not supported; supported: {', '.join(registered_families())} "
            "(register a mechmed.families.ArchitectureMap for it)"
        )
    return _REGISTRY[name]


_GEMMA_SITES = {"resid_post": "", "attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}
_QWEN_SITES = {"resid_post": "", "attn_out": "self_attn", "mlp_out": "mlp"}

GEMMA3_VLM = register_family(ArchitectureMap(
    name="Gemma3ForConditionalGeneration",
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    embed_tokens="model.language_model.embed_tokens",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    site_modules=_GEMMA_SITES,
    text_config="text_config",
    multimodal=True,
    auto_class="AutoModelForImageTextToText",
    peft_layers_pattern="language_model.layers",
))

GEMMA3_TEXT = register_family(ArchitectureMap(
    name="Gemma3ForCausalLM",
    layers="model.layers",
    final_norm="model.norm",
    embed_tokens="model.embed_tokens",
    site_modules=_GEMMA_SITES,
    auto_class="AutoModelForCausalLM",
    peft_layers_pattern="layers",
))

QWEN2_5_VL = register_family(ArchitectureMap(
    name="Qwen2_5_VLForConditionalGeneration",
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    embed_tokens="model.language_model.embed_tokens",
    vision_tower="model.visual",
    projector="model.visual.merger",
    site_modules=_QWEN_SITES,
    text_config="text_config",
    multimodal=True,
    auto_class="AutoModelForImageTextToText",
    peft_layers_pattern="language_model.layers",
))
