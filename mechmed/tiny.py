"""Tiny models of the real classes, built offline from configs.

The same code paths that run MedGemma-4B (``Gemma3ForConditionalGeneration``), MedGemma-27B text
(``Gemma3ForCausalLM``) and MedQwen's base (``Qwen2_5_VLForConditionalGeneration``) run on these:
the tests, the benchmarks and the embedded default's builder all make their models and
processors here. A word-level tokenizer is built offline with ``tokenizers`` and carries the
family's special tokens and chat template; the processor is the family's own processor class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# Special tokens, spelled as the real checkpoints spell them.
GEMMA_SPECIALS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
GEMMA_MULTIMODAL = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
GEMMA_TURNS = ["<start_of_turn>", "<end_of_turn>"]

# The Gemma 3 chat template, reduced to what the yes/no readout needs (same token layout as the
# released checkpoints: <bos><start_of_turn>user\n<start_of_image>question<end_of_turn>\n<start_of_turn>model\n).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_WORDS = (
    "is there a an the pleural effusion cardiomegaly pneumothorax nodule consolidation edema "
    "does this image show any evidence of in on at lung heart chest radiograph x-ray yes no "
    "present absent normal finding findings left right base apex ? . , model user"
).split()

_WORD_RE = re.compile(r"[A-Za-z0-9\-']+|[^\sA-Za-z0-9]")


def words(texts: Iterable[str]) -> list[str]:
    """Split texts into the word-level tokens the tiny tokenizers use (lower-cased)."""
    out: list[str] = []
    for t in texts:
        out.extend(w.lower() for w in _WORD_RE.findall(t))
    return out


def _word_level(vocab_words: Iterable[str], specials: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in [*specials, *sorted(set(vocab_words))]:
        vocab.setdefault(tok, len(vocab))
    unk = "<unk>" if "<unk>" in vocab else specials[0]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[A-Za-z0-9\-']+|[^\sA-Za-z0-9]"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Special tokens must never be split or lower-cased.
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return tok


def gemma_tokenizer(texts: Iterable[str] = (), extra_words: Iterable[str] = DEFAULT_WORDS):
    """A word-level tokenizer over the words of ``texts`` (+ ``extra_words``), with Gemma 3's
    special and multimodal tokens and its chat template.

    It is a plain fast tokenizer (saved with ``tokenizer_class: TokenizersBackend``), because
    transformers' ``GemmaTokenizer`` rebuilds a BPE from the vocabulary when it is reloaded and
    would lose the word-level model; ``AutoTokenizer`` / ``AutoProcessor`` reload this one as is.
    """
    from transformers import PreTrainedTokenizerFast

    specials = [*GEMMA_SPECIALS.values(), *GEMMA_TURNS, *GEMMA_MULTIMODAL.values()]
    backend = _word_level([*words(texts), *extra_words], specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **GEMMA_SPECIALS,
        extra_special_tokens=dict(GEMMA_MULTIMODAL),
        padding_side="left",
    )
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    return tok


def gemma3_processor(tokenizer, image_size: int = 32, tokens_per_image: int = 4):
    """A ``Gemma3Processor`` (PIL image processor, grayscale images converted to RGB)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tokenizer, chat_template=GEMMA_CHAT_TEMPLATE,
                           image_seq_length=tokens_per_image)


def gemma3_text_config(vocab_size: int, *, hidden: int = 64, layers: int = 4, heads: int = 2, kv_heads: int = 1,
                       head_dim: int = 32, intermediate: int = 128, **kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, sliding_window=64,
        max_position_embeddings=512, query_pre_attn_scalar=head_dim, **kw,
    )


def gemma3_vlm(tokenizer=None, *, layers: int = 4, hidden: int = 64, image_size: int = 32, patch: int = 8,
               tokens_per_image: int = 4, vision_hidden: int = 32, vision_layers: int = 2, seed: int = 0,
               initializer_range: float = 0.02, **text_kw):
    """A tiny ``Gemma3ForConditionalGeneration`` and its processor.

    ``tokens_per_image`` must be a square no larger than (image_size/patch)²: the projector
    average-pools the vision tower's patch grid down to it, as MedGemma does (4096 -> 256).
    """
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    tokenizer = tokenizer or gemma_tokenizer()
    processor = gemma3_processor(tokenizer, image_size, tokens_per_image)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in GEMMA_MULTIMODAL.items()}
    text = gemma3_text_config(len(tokenizer), layers=layers, hidden=hidden, initializer_range=initializer_range,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, **text_kw)
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch, vision_use_head=False)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=tokens_per_image, image_token_index=ids["image_token"],
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          initializer_range=initializer_range)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    return model, processor


def gemma3_causal_lm(tokenizer=None, *, layers: int = 4, hidden: int = 64, seed: int = 0, **text_kw):
    """A tiny text-only ``Gemma3ForCausalLM`` (the MedGemma-27B text class) and its tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM

    tokenizer = tokenizer or gemma_tokenizer()
    cfg = gemma3_text_config(len(tokenizer), layers=layers, hidden=hidden, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **text_kw)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).eval(), tokenizer


def qwen_tokenizer(texts: Iterable[str] = (), extra_words: Iterable[str] = DEFAULT_WORDS):
    from transformers import PreTrainedTokenizerFast

    backend = _word_level([*words(texts), *extra_words], ["<unk>", *QWEN_SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", padding_side="left")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def qwen2_5_vl(tokenizer=None, *, layers: int = 4, hidden: int = 64, seed: int = 0, image_size: int = 56):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` and its processor (images resized to
    ``image_size`` pixels a side: 2×2 merged 14-pixel patches per 28 pixels)."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tokenizer = tokenizer or qwen_tokenizer()
    pixels = image_size * image_size
    ip = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    processor = qwen_processor(ip, tokenizer)
    heads, head_dim = 2, hidden // 2
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [head_dim // 8, 3 * head_dim // 16,
                                                                 3 * head_dim // 16]},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                  window_size=56, in_chans=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                              video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                              vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                              vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


def qwen_processor(image_processor, tokenizer):
    """``Qwen2_5_VLProcessor`` where torchvision (for its video processor) is installed, else
    :class:`mechmed.processors.QwenImageProcessor`, which does the same for images."""
    try:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    except (ImportError, ValueError, AttributeError, TypeError):
        from mechmed.processors import QwenImageProcessor

        return QwenImageProcessor(image_processor, tokenizer)


def save(model, processor, path: str | Path) -> Path:
    """``save_pretrained`` both (safetensors), so plain ``from_pretrained`` reloads them."""
    from mechmed.runtime import hf_progress_bars

    path = Path(path)
    from mechmed.io import follow_umask

    with hf_progress_bars(enabled=False):  # a local write: no bars on the user's terminal
        model.save_pretrained(path)
        processor.save_pretrained(path)
    follow_umask(path)
    return path
