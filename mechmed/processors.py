"""A processor for Qwen2.5-VL images where transformers' own cannot be built.

``Qwen2_5_VLProcessor`` insists on a video processor, and video processors need torchvision,
which has no CPU wheel on some machines. Images need none of it: this class does what the
released processor does for images (one ``<|image_pad|>`` per merged patch) and nothing else.
"""

from __future__ import annotations

from pathlib import Path


class QwenImageProcessor:
    image_token = "<|image_pad|>"

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template

    def apply_chat_template(self, messages, **kwargs):
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        out: dict = {}
        if images is not None:
            flat = [im for group in images for im in (group if isinstance(group, (list, tuple)) else [group])]
            vision = self.image_processor(images=flat, return_tensors=return_tensors)
            out.update(vision)
            merge = self.image_processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                rebuilt = pieces[0]
                for piece in pieces[1:]:
                    rebuilt += self.image_token * int(next(counts)) + piece
                expanded.append(rebuilt)
            texts = expanded
        out.update(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        return BatchFeature(out, tensor_type=return_tensors)

    def save_pretrained(self, path: str | Path) -> None:
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
