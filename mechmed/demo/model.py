"""The embedded default's architecture and tokenizer.

The demo model is a ``transformers.Gemma3ForConditionalGeneration``, the class of MedGemma-4B: a
SigLIP vision tower whose patch grid is average-pooled to ``tokens_per_image`` soft tokens, a
projector, and a Gemma 3 decoder. Only the sizes differ (MedGemma-4B: 34 layers, hidden 2560,
256 image tokens; the demo: 6 layers, hidden 64, 4 image tokens on 32 x 32 images).

The tokenizer is word-level (:func:`mechmed.tiny.gemma_tokenizer`) over every text the model ever
sees: the demo corpus, every phrasing of every finding (paraphrases included, so that no
evaluation word is ``<unk>``) and the answer words, so ``yes`` and ``no`` are single tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mechmed.errors import MechmedError

#: Bumped whenever the recipe (architecture, tokenizer texts, training) changes: it keys the cache.
RECIPE_VERSION = "demo-v3"


@dataclass(frozen=True)
class DemoModelConfig:
    """Sizes of the demo ``Gemma3ForConditionalGeneration``."""

    layers: int = 6
    """Decoder layers (at least 6, so layer-range selection has something to choose from)."""
    hidden: int = 64
    """Decoder hidden size (d_model)."""
    heads: int = 2
    """Attention heads."""
    kv_heads: int = 1
    """Key/value heads (grouped-query attention, as in Gemma 3)."""
    head_dim: int = 32
    """Size of each attention head."""
    intermediate: int = 128
    """MLP hidden size."""
    image_size: int = 32
    """Image side in pixels (grayscale, repeated over RGB by the processor)."""
    patch: int = 8
    """SigLIP patch side: (image_size / patch)² patches."""
    tokens_per_image: int = 4
    """Soft image tokens after pooling the patch grid (a square, at most the number of patches)."""
    vision_hidden: int = 32
    """SigLIP hidden size."""
    vision_layers: int = 2
    """SigLIP encoder layers."""
    initializer_range: float = 0.05
    """Std of the initial weights; larger than HF's 0.02 trains more reliably at this size."""

    def __post_init__(self):
        if self.layers < 1 or self.hidden < 1 or self.heads < 1:
            raise MechmedError(
                f"demo model: layers={self.layers}, hidden={self.hidden}, heads={self.heads}; "
                "all must be positive"
            )
        if self.image_size % self.patch:
            raise MechmedError(
                f"demo model: image_size={self.image_size} is not a multiple of patch={self.patch}"
            )
        n_patches = (self.image_size // self.patch) ** 2
        side = round(self.tokens_per_image**0.5)
        if side * side != self.tokens_per_image or self.tokens_per_image > n_patches:
            raise MechmedError(
                f"demo model: tokens_per_image={self.tokens_per_image}; use a square no larger than "
                f"the {n_patches} patches"
            )

    def to_dict(self) -> dict:
        return asdict(self)



def demo_texts(seed: int = 0) -> list[str]:
    """Every text the demo tokenizer must cover: corpus, all phrasings, answer words."""
    from mechmed.demo.images import FINDINGS
    from mechmed.demo.phrasings import ANSWER_WORDS, corpus, questions

    return [*corpus(seed), *(p.text for f in FINDINGS for p in questions(f)), *ANSWER_WORDS]


def demo_tokenizer(seed: int = 0):
    """The word-level Gemma tokenizer over :func:`demo_texts` (``yes``/``no`` single tokens)."""
    from mechmed.tiny import gemma_tokenizer

    tok = gemma_tokenizer(demo_texts(seed))
    for word in ("yes", "no"):
        ids = tok.encode(word, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise MechmedError(f"demo tokenizer: answer word {word!r} is not a single token ({ids})")
    return tok


def build_demo_model(config: DemoModelConfig | None = None, seed: int = 0):
    """A freshly initialised demo model (``Gemma3ForConditionalGeneration``) and its ``Gemma3Processor``."""
    from mechmed.tiny import gemma3_vlm

    config = config or DemoModelConfig()
    tokenizer = demo_tokenizer(seed)
    return gemma3_vlm(
        tokenizer,
        layers=config.layers,
        hidden=config.hidden,
        image_size=config.image_size,
        patch=config.patch,
        tokens_per_image=config.tokens_per_image,
        vision_hidden=config.vision_hidden,
        vision_layers=config.vision_layers,
        seed=seed,
        initializer_range=config.initializer_range,
        heads=config.heads,
        kv_heads=config.kv_heads,
        head_dim=config.head_dim,
        intermediate=config.intermediate,
    )
