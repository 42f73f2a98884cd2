"""The yes/no readout: prompts through the chat template (or a plain template for a model without
one), and the answer margin.

margin = logsumexp(logit[yes variants]) − logsumexp(logit[no variants]) at the answer position
(the last prompt token, after the chat template's generation prompt). Variants of an answer word
are its case and leading-space forms that are single tokens in the tokenizer; the word itself
must be a single token. Prompts are left-padded and run with ``logits_to_keep=1``, so no
[batch, seq, vocab] logits are built, and a batched margin equals the one-by-one margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mechmed.data.images import load_image
from mechmed.data.records import ParaphrasePair
from mechmed.errors import MechmedError

GRAY = 128


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids whose logits are combined into the yes and the no score."""

    words: tuple[str, str]
    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"words": list(self.words), "yes_ids": list(self.yes_ids), "no_ids": list(self.no_ids)}


def _variants(word: str) -> list[str]:
    forms = [word, word.lower(), word.capitalize(), word.upper()]
    return list(dict.fromkeys([*forms, *(" " + f for f in forms)]))


def answer_token_ids(tokenizer, words: Sequence[str] = ("yes", "no")) -> AnswerTokens:
    """Resolve the two answer words to single-token ids (with their case/space variants)."""
    if len(words) != 2 or not all(isinstance(w, str) and w.strip() for w in words):
        raise MechmedError(f"--answer-words {','.join(map(str, words))}: give exactly two words, e.g. yes,no")
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    resolved = []
    for word in words:
        base = tokenizer.encode(word, add_special_tokens=False)
        if len(base) != 1 or base[0] == unk:
            pieces = tokenizer.convert_ids_to_tokens(base)
            raise MechmedError(
                f"--answer-words: {word!r} is {len(base)} tokens {pieces} for this tokenizer, not one; "
                "choose an answer word that is a single token"
            )
        ids = []
        for form in _variants(word):
            enc = tokenizer.encode(form, add_special_tokens=False)
            if len(enc) == 1 and enc[0] != unk and enc[0] not in specials:
                ids.append(enc[0])
        resolved.append(tuple(dict.fromkeys(ids)))
    if set(resolved[0]) & set(resolved[1]):
        raise MechmedError(f"--answer-words {words[0]},{words[1]}: the two words share a token; choose distinct words")
    return AnswerTokens(tuple(words), resolved[0], resolved[1])


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _has_images(processor) -> bool:
    return getattr(processor, "image_processor", None) is not None


def as_rgb(image):
    """A PIL image in RGB (grayscale X-rays are repeated over the three channels)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def gray_like(image):
    """A uniform gray image of the same size (the blank-image control)."""
    from PIL import Image

    return Image.new("RGB", image.size, (GRAY, GRAY, GRAY))


#: The prompt of a model without a chat template (a base, pretrained checkpoint), and with an image.
PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
PLAIN_IMAGE_TEMPLATE = "{image}\nQuestion: {question}\nAnswer:"
_TEMPLATE_ATTR = "mechmed_prompt_template"


def check_template(template: str, option: str = "--prompt-template") -> str:
    """``template`` if it is a prompt template mechmed can fill: ``{question}`` once, ``{image}`` at
    most once, no other placeholders (write ``{{`` / ``}}`` for literal braces). ``option`` names
    where it came from in the error."""
    import string

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise MechmedError(f"{option} {template!r}: {e}; write {{{{ and }}}} for literal braces") from None
    bad = [n for n in names if n not in ("question", "image")]
    if bad or names.count("question") != 1 or names.count("image") > 1:
        raise MechmedError(f"{option} {template!r}: use {{question}} once and {{image}} at most once "
                           f"(found {', '.join('{' + n + '}' for n in names) or 'no placeholder'})")
    return template


def set_prompt_template(processor, template: str | None):
    """Make ``processor``'s prompts ``template`` (:func:`check_template`) instead of its chat template;
    ``None`` restores the default choice (the chat template where there is one, else
    :data:`PLAIN_TEMPLATE`). Returns the processor."""
    setattr(processor, _TEMPLATE_ATTR, None if template is None else check_template(template))
    return processor


def _chat_template(processor) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)


def prompt_format(processor) -> dict:
    """How prompts are built: ``{"kind": "chat"}`` (the processor's chat template), ``"plain"`` (no
    chat template: :data:`PLAIN_TEMPLATE`) or ``"custom"`` (``--prompt-template``), with the template."""
    custom = getattr(processor, _TEMPLATE_ATTR, None)
    if custom is not None:
        return {"kind": "custom", "template": custom}
    if _chat_template(processor):
        return {"kind": "chat", "template": None}
    return {"kind": "plain", "template": PLAIN_TEMPLATE}


def image_placeholder(processor) -> str:
    """The text that stands for one image in a prompt of this processor (expanded by it)."""
    boi = getattr(processor, "boi_token", None)  # Gemma 3: <start_of_image>
    if boi:
        return boi
    token = getattr(processor, "image_token", None)  # Qwen2.5-VL: <|image_pad|> inside vision markers
    if token:
        vocab = _tokenizer(processor).get_vocab()
        return f"<|vision_start|>{token}<|vision_end|>" if "<|vision_start|>" in vocab else token
    raise MechmedError("this processor names no image token; the model cannot take an image in a prompt template")


def prompt_texts(processor, questions: Sequence[str], with_image: bool) -> list[str]:
    """The prompt of each question: through the chat template, or (a model without one, or
    ``--prompt-template``) by filling a template (see :func:`prompt_format`)."""
    fmt = prompt_format(processor)
    if fmt["kind"] == "chat":
        texts = []
        for q in questions:
            content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": q}]
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                       add_generation_prompt=True, tokenize=False))
        return texts
    template = fmt["template"]
    if with_image:
        if fmt["kind"] == "plain":
            template = PLAIN_IMAGE_TEMPLATE
        elif "{image}" not in template:
            raise MechmedError(f"--prompt-template {template!r} has no {{image}}, but the pairs have images; "
                               "put {image} where the image goes")
    image = image_placeholder(processor) if with_image else ""
    bos = getattr(_tokenizer(processor), "bos_token", None) or ""  # as a chat template starts: one BOS
    return [bos + template.format(question=q, image=image) for q in questions]


def build_inputs(processor, questions: Sequence[str], images: Sequence | None = None):
    """Tokenise ``questions`` (with one image each, or none) into a left-padded batch."""
    questions = list(questions)
    if not questions:
        raise MechmedError("no questions to run: the dataset is empty")
    tok = _tokenizer(processor)
    tok.padding_side = "left"
    with_image = images is not None
    if with_image and len(images) != len(questions):
        raise MechmedError(f"{len(images)} images for {len(questions)} questions: give one image per question")
    if with_image and not _has_images(processor):
        raise MechmedError("this model takes no images: run it without --image-root / image paths")
    texts = prompt_texts(processor, questions, with_image)
    bos = getattr(tok, "bos_token", None)
    add_special = not (bos and texts[0].startswith(bos))
    if not with_image:
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    return processor(text=texts, images=[[as_rgb(im)] for im in images], return_tensors="pt", padding=True,
                     add_special_tokens=add_special)


def yes_no_logits(logits, answers: AnswerTokens):
    """[batch, vocab] logits at the answer position -> [batch, 2] (yes score, no score)."""
    import torch

    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    yes = torch.logsumexp(logits[:, list(answers.yes_ids)], dim=-1)
    no = torch.logsumexp(logits[:, list(answers.no_ids)], dim=-1)
    return torch.stack([yes, no], dim=-1)


def answer_logits(model, inputs, answers: AnswerTokens):
    """One forward with ``logits_to_keep=1``; returns [batch, 2] yes/no scores (with grad if enabled)."""
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    return yes_no_logits(out.logits[:, -1], answers)


def margins(bundle, questions: Sequence[str], images: Sequence | None = None, *, batch_size: int = 16,
            progress: str | None = None):
    """Margins logit(yes) − logit(no) for each question (float32 tensor on the CPU)."""
    import torch

    from mechmed.progress import progress_bar

    questions = list(questions)
    out = []
    starts = range(0, len(questions), batch_size)
    with torch.inference_mode():
        for start in progress_bar(starts, desc=progress, total=len(starts)):
            sl = slice(start, start + batch_size)
            inputs = build_inputs(bundle.processor, questions[sl], None if images is None else list(images[sl]))
            scores = answer_logits(bundle.model, inputs.to(bundle.device), bundle.answers)
            out.append((scores[:, 0] - scores[:, 1]).cpu())
    result = torch.cat(out) if out else torch.zeros(0)
    if not torch.isfinite(result).all():
        bad = int((~torch.isfinite(result)).nonzero()[0])
        raise MechmedError(f"--model {bundle.name}: the margin of prompt {bad} is not finite (NaN/inf); "
                           "check the model weights and --dtype")
    return result


def pair_images(pairs: Sequence[ParaphrasePair], cache: dict | None = None) -> list | None:
    """Each pair's image, each file loaded once (``cache``: path -> image, shared between calls); None
    when a pair has no image."""
    cache = {} if cache is None else cache
    out = []
    for p in pairs:
        if p.image is None:
            return None
        if p.image not in cache:
            cache[p.image] = load_image(p.image)
        out.append(cache[p.image])
    return out


def warn_text_only(bundle, pairs: Sequence[ParaphrasePair]) -> bool:
    """Warn (once per call) when a model that takes images is given pairs without any: a pair file
    whose image column has a name mechmed does not know reads as text-only pairs. True if warned."""
    if not (bundle.multimodal and pairs and all(p.image is None for p in pairs)):
        return False
    import logging

    from mechmed.data.loaders import ALIASES

    logging.getLogger(__name__).warning(
        "%s takes images but none of the %d pairs has one: it answers from the text alone. If the pair file "
        "has an image column, name it image (or one of %s) or map it with columns={'image': ...}",
        bundle.name or "the model", len(pairs), ", ".join(ALIASES.get("image", ())[:4]))
    return True


def pair_margins(bundle, pairs: Sequence[ParaphrasePair], *, batch_size: int = 16, progress: bool = False,
                 question_margins: dict | None = None, edit=None):
    """Margins of each unique (image, question) and of each pair's paraphrase.

    ``question_margins`` ((image, question) -> margin) holds margins already computed with this
    model, e.g. by another pair set over the same images and questions: those are not run again, and
    the new ones are added to it.

    ``edit`` (a :class:`mechmed.interventions.PromptEdit`) computes the margins instead of a plain
    forward: its ``margins(bundle, texts, images, role=, rows=, ...)`` gets the question prompts
    (``role="question"``, ``rows`` their (image, question) keys) and the paraphrases
    (``role="paraphrase"``, ``rows`` the pairs).

    Returns (m_q per pair, m_p per pair, unique keys, unique margins, images by key).
    """
    import numpy as np

    use_images = bundle.multimodal and all(p.image is not None for p in pairs)
    if bundle.multimodal and not use_images and any(p.image is not None for p in pairs):
        raise MechmedError("some rows have an image and some do not: give every row an image, or none")
    warn_text_only(bundle, pairs)
    images = {}
    if use_images:
        for p in pairs:
            if p.image not in images:
                images[p.image] = load_image(p.image)
    keys = list(dict.fromkeys((p.image, p.question) for p in pairs))
    index = {k: i for i, k in enumerate(keys)}
    known = {} if question_margins is None else question_margins
    todo = [k for k in keys if k not in known]

    def run(texts, imgs, role, rows):
        desc = (role + "s") if progress else None
        if edit is None:
            return margins(bundle, texts, imgs, batch_size=batch_size, progress=desc).numpy()
        return edit.margins(bundle, texts, imgs, role=role, rows=rows, batch_size=batch_size, progress=desc).numpy()

    if todo:
        q_imgs = [images[k[0]] for k in todo] if use_images else None
        new = run([k[1] for k in todo], q_imgs, "question", todo)
        known.update(zip(todo, new.tolist()))
    m_unique = np.array([known[k] for k in keys], dtype=np.float32)
    p_imgs = [images[p.image] for p in pairs] if use_images else None
    m_p = run([p.paraphrase for p in pairs], p_imgs, "paraphrase", list(pairs))
    m_q = m_unique[[index[(p.image, p.question)] for p in pairs]]
    if edit is not None:  # a fix whose question answer depends on the pair (prompt ensembling)
        per_pair = edit.pair_question_margins(bundle, pairs, p_imgs, batch_size=batch_size)
        if per_pair is not None:
            m_q = np.asarray(per_pair, dtype=np.float32)
    return m_q, m_p, keys, m_unique, images
