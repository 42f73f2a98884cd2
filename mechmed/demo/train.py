"""Training the embedded default from scratch on the CPU, and evaluating it.

Recipe (:class:`DemoTrainConfig` holds every number):

1. **Vision pretraining.** The SigLIP tower and the multimodal projector learn to encode the six
   findings: a linear probe on the mean of the projected image tokens predicts each finding
   (binary cross-entropy), on the training images and their mirror images.
2. **Decoder training, vision frozen.** Each step mixes two losses:

   * *answers*: cross-entropy of the answer token (``yes``/``no``) at the answer position (the
     last prompt token, prompts built by :func:`mechmed.readout.build_inputs`, exactly as
     evaluation builds them). Questions are the canonical phrasing most of the time and
     otherwise one of the few training paraphrases; present and absent findings are drawn 50/50,
     so the answers are balanced.
   * *language modelling* on the demo corpus (report-like text that contains every word of every
     paraphrase), so paraphrase words have trained embeddings and the model's sensitivity to
     paraphrases comes from their phrasing, not from untrained embeddings.

Answers are trained on the base phrasings alone (:func:`mechmed.demo.phrasings.base_phrasings`);
no wrapper paraphrase is ever asked in training, which leaves them to the fine-tuning and
evaluation sets. Everything is seeded (``torch.manual_seed`` and a
seeded ``torch.Generator`` for the data order), so one seed gives the same weights on one machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mechmed.errors import MechmedError
from mechmed.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoTrainConfig:
    """Every number of the demo's training recipe."""

    n_images: int = 1200
    """Training images (``make_images(n_images, seed)``)."""
    vision_steps: int = 600
    """Steps of vision pretraining."""
    vision_batch: int = 128
    """Images per vision step."""
    vision_lr: float = 6e-3
    """Peak learning rate of vision pretraining."""
    steps: int = 450
    """Steps of decoder training (answers + language modelling)."""
    batch: int = 64
    """Image-question prompts per decoder step."""
    lm_batch: int = 32
    """Corpus texts per decoder step."""
    lm_weight: float = 0.5
    """Weight of the language-modelling loss."""
    lr: float = 3e-3
    """Peak learning rate of decoder training."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup: float = 0.05
    """Fraction of each stage spent warming the learning rate up (then cosine decay to 10%)."""
    canonical_weight: float = 0.6
    """Probability that an answer example uses the canonical phrasing (else a training paraphrase)."""
    noise: float = 0.5
    """Probability that an answer example's question is a word-noised variant of its phrasing."""
    noise_variants: int = 32
    """Word-noised variants made per training phrasing."""
    noise_corpus_words: bool = True
    """Draw inserted noise words from the corpus too (not only from the training phrasings)."""
    noise_ops: int = 5
    """At most this many noise operations per variant (drop, insert, swap)."""
    verify: float = 0.35
    """Fraction of answer examples that verify a report sentence against the image (yes if true)."""
    precompute_masks: bool = True
    """Build the attention masks once for every prompt instead of per step (same numbers, faster)."""
    n_corpus_reports: int = 300
    """Reports in the language-modelling corpus (besides the definitions)."""

    def to_dict(self) -> dict:
        return asdict(self)



# ----------------------------------------------------------------------------- helpers


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def _lr_lambda(total: int, warmup: float):
    n_warm = max(1, int(total * warmup))

    def f(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        t = (step - n_warm) / max(1, total - n_warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def pixel_values(processor, images: Sequence, chunk: int = 256):
    """The processor's pixel tensor for ``images`` (arrays or PIL), as evaluation computes it."""
    import torch

    from mechmed.readout import as_rgb

    out = []
    for start in range(0, len(images), chunk):
        ims = [[as_rgb(_to_pil(im))] for im in images[start : start + chunk]]
        out.append(processor.image_processor(images=ims, return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def _no_cache(mask_fn) -> dict:
    """The "no KV cache" argument of a transformers mask builder (``cache`` since 5.2x, ``past_key_values`` before)."""
    import inspect

    return {"cache": None} if "cache" in inspect.signature(mask_fn).parameters else {"past_key_values": None}


@dataclass
class _Prompts:
    """Tokenised prompts for a fixed list of questions, padded to a common (left-padded) length."""

    input_ids: object
    attention_mask: object
    token_type_ids: object
    masks: dict | None = None  # precomputed 4-D attention masks by layer type (see precompute_masks)

    def batch(self, idx, pixels):
        """Rows ``idx`` with ``pixels``, all-padding leading columns dropped."""
        mask = self.attention_mask[idx]
        start = int((mask.sum(0) > 0).nonzero()[0])
        attention = mask[:, start:]
        if self.masks is not None:
            attention = {k: v[idx][:, :, start:, start:] for k, v in self.masks.items()}
        return {
            "input_ids": self.input_ids[idx, start:],
            "attention_mask": attention,
            "token_type_ids": self.token_type_ids[idx, start:],
            "pixel_values": pixels,
        }

    def precompute_masks(self, model) -> None:
        """Build the 4-D attention masks (causal + bidirectional over image tokens) once for every row,
        as ``Gemma3Model.forward`` would build them per batch; rows are then gathered per batch.

        Saves the per-step mask construction. Skipped (masks built per batch, as usual) if this
        transformers version lacks the helpers or builds masks of another form.
        """
        import torch

        try:
            from transformers.models.gemma3.modeling_gemma3 import (
                create_masks_for_vision_model,
                get_block_sequence_ids_for_mask,
            )

            n, width = self.input_ids.shape
            embeds = torch.zeros(n, width, model.config.text_config.hidden_size)
            masks = create_masks_for_vision_model(
                config=model.config.get_text_config(),
                inputs_embeds=embeds,
                attention_mask=self.attention_mask,
                **_no_cache(create_masks_for_vision_model),
                position_ids=None,
                block_sequence_ids=get_block_sequence_ids_for_mask(self.token_type_ids, device=embeds.device),
            )
        except (ImportError, TypeError, ValueError) as e:  # depends on the transformers version
            log.info("attention masks are built per batch (%s)", e)
            return
        if all(isinstance(v, torch.Tensor) and v.shape == (n, 1, width, width) for v in masks.values()):
            self.masks = dict(masks)


def tokenize_prompts(processor, questions: Sequence[str]) -> _Prompts:
    """Prompts for ``questions`` with one image each, built by :func:`mechmed.readout.build_inputs`."""
    from PIL import Image

    from mechmed.readout import build_inputs

    blank = Image.new("RGB", (8, 8))
    enc = build_inputs(processor, list(questions), [blank] * len(questions))
    return _Prompts(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])


def _answer_ids(tokenizer) -> tuple[int, int]:
    yes = tokenizer.convert_tokens_to_ids("yes")
    no = tokenizer.convert_tokens_to_ids("no")
    if yes == tokenizer.unk_token_id or no == tokenizer.unk_token_id:
        raise MechmedError("demo tokenizer: 'yes' or 'no' is not in the vocabulary")
    return yes, no


def _seed_all(seed: int):
    import torch

    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- stage 1: vision


def pretrain_vision(model, pixels, labels, cfg: DemoTrainConfig, generator) -> dict:
    """Train the vision tower + projector with a linear probe on the mean image token."""
    import torch
    from torch import nn

    vlm = model.model
    hidden = model.config.text_config.hidden_size
    proj = vlm.multi_modal_projector
    with torch.no_grad():  # the projector starts at zero in transformers; give it a random start
        if float(proj.mm_input_projection_weight.abs().sum()) == 0.0:
            proj.mm_input_projection_weight.normal_(0.0, model.config.text_config.initializer_range)
    probe = nn.Linear(hidden, labels.shape[1])
    params = [*vlm.vision_tower.parameters(), *proj.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.vision_steps, cfg.warmup))
    vlm.vision_tower.train()
    n = pixels.shape[0]
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for step in progress_bar(range(cfg.vision_steps), desc="demo model: vision tower"):
        idx = torch.randint(0, n, (cfg.vision_batch,), generator=generator)
        flip = torch.rand(cfg.vision_batch, generator=generator) < 0.5
        x = pixels[idx]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        feats = vlm.get_image_features(x).pooler_output  # [B, tokens, hidden]
        loss = loss_fn(probe(feats.mean(1)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == cfg.vision_steps - 1:
            log.info("vision step %d/%d: loss %.4f", step + 1, cfg.vision_steps, float(loss.detach()))
    vlm.vision_tower.eval()
    with torch.no_grad():
        pred = probe(vlm.get_image_features(pixels[:512]).pooler_output.mean(1)) > 0
    acc = float((pred == (labels[:512] > 0.5)).float().mean())
    return {"vision_loss": float(np.mean(losses[-20:])), "vision_probe_train_accuracy": acc}


# ----------------------------------------------------------------------------- stage 2: decoder


def corpus_sentences(seed: int = 0, n_reports: int = 300) -> list[str]:
    """The demo corpus split into sentences, each once (first occurrence order)."""
    import re

    from mechmed.demo.phrasings import corpus

    sentences = (s.strip() for text in corpus(seed, n_reports) for s in re.split(r"(?<=[.!?])\s+", text))
    return list(dict.fromkeys(s for s in sentences if s))


@dataclass
class _Corpus:
    """Token ids of ``<bos> text`` per corpus text, right-padded, with optional precomputed causal masks."""

    input_ids: object
    attention_mask: object
    masks: dict | None = None

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str]) -> _Corpus:
        import torch

        ids = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return cls(input_ids, mask)

    def precompute_masks(self, model) -> None:
        """The text-only causal masks ``Gemma3Model.forward`` builds, once for every row (skipped if
        this transformers version builds them otherwise)."""
        import torch

        try:
            from transformers.models.gemma3.modeling_gemma3 import create_masks_for_generate

            n, width = self.input_ids.shape
            embeds = torch.zeros(n, width, model.config.text_config.hidden_size)
            masks = create_masks_for_generate(
                config=model.config.get_text_config(),
                inputs_embeds=embeds,
                attention_mask=self.attention_mask,
                **_no_cache(create_masks_for_generate),
            )
        except (ImportError, TypeError, ValueError) as e:  # depends on the transformers version
            log.info("attention masks are built per batch (%s)", e)
            return
        if isinstance(masks, dict) and all(
            isinstance(v, torch.Tensor) and v.shape == (n, 1, width, width) for v in masks.values()
        ):
            self.masks = dict(masks)

    def loss(self, model, idx):
        """Mean next-token cross-entropy over the texts ``idx`` (padding columns dropped)."""
        import torch.nn.functional as F

        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max())
        input_ids, mask = self.input_ids[idx, :width], mask[:, :width]
        attention = mask
        if self.masks is not None:
            attention = {k: v[idx][:, :, :width, :width] for k, v in self.masks.items()}
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )


_PROTECTED = {"absent", "?"}
#: Words never used as noise: answers and negation cues (noise must not change a question's meaning).
_NOT_NOISE = {
    "yes",
    "no",
    "not",
    "without",
    "absent",
    "free",
    "excluded",
    "exclude",
    "normal",
    "clear",
    "sharp",
    "expanded",
    "unlikely",
    "?",
}


def noisy_variants(
    phrasings_by_finding: Sequence[Sequence[str]],
    n: int,
    seed: int = 0,
    extra_words: Sequence[str] = (),
    max_ops: int = 2,
) -> list[list[str]]:
    """``n`` word-noised variants of each training phrasing (same order as the input).

    *Frame* words are those shared by the phrasings of two or more findings ("is", "there", "a",
    "does", "the", "image", "show"); a finding's own words are those only its phrasings use. Noise
    (1 to ``max_ops`` operations) drops a frame word, inserts a noise word (a frame word or one of
    ``extra_words`` that is no finding's own word and no negation cue), or swaps two neighbouring
    words; it never touches the negation word. It teaches the model to key on the finding's words
    wherever they stand, while the wrapper paraphrases stay unseen.
    """
    from mechmed.tiny import words

    per_finding = [set(words(texts)) for texts in phrasings_by_finding]
    counts: dict[str, int] = {}
    for ws in per_finding:
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
    frame = sorted(w for w, c in counts.items() if c > 1 and w not in _PROTECTED)
    own = {w for w, c in counts.items() if c == 1}
    noise_words = sorted(
        set(frame)
        | {
            w
            for w in words(extra_words)
            if w not in own and w not in _NOT_NOISE and any(ch.isalpha() for ch in w)
        }
    )
    rng = np.random.default_rng([seed, 7])
    out = []
    for texts in phrasings_by_finding:
        for text in texts:
            toks = words([text])
            variants: list[str] = []
            for _ in range(n):
                t = list(toks)
                for _ in range(1 + int(rng.integers(max_ops))):
                    op = int(rng.integers(3))
                    body = len(t) - 1  # the trailing "?" stays
                    droppable = [i for i in range(body) if t[i] in frame]
                    if op == 0 and droppable:
                        del t[droppable[int(rng.integers(len(droppable)))]]
                    elif op != 2 or body < 2:
                        t.insert(
                            int(rng.integers(body + 1)), noise_words[int(rng.integers(len(noise_words)))]
                        )
                    else:
                        i = int(rng.integers(body - 1))
                        if t[i] not in _PROTECTED and t[i + 1] not in _PROTECTED:
                            t[i], t[i + 1] = t[i + 1], t[i]
                text_v = " ".join(t[:-1]) + t[-1]
                variants.append(text_v[0].upper() + text_v[1:])
            out.append(variants)
    return out


def report_statements(seed: int = 0, n_reports: int = 400) -> dict[tuple[int, bool], list[str]]:
    """Report sentences by (finding index, present): ``report()`` writes one sentence per finding,
    in :data:`~mechmed.demo.images.FINDINGS` order, after a header."""
    import re

    from mechmed.demo.images import FINDINGS
    from mechmed.demo.phrasings import report

    rng = np.random.default_rng([seed, 13])
    pool: dict[tuple[int, bool], dict[str, None]] = {
        (i, s): {} for i in range(len(FINDINGS)) for s in (False, True)
    }
    for _ in range(n_reports):
        findings = {f: bool(rng.random() < 0.5) for f in FINDINGS}
        sentences = [x for x in re.split(r"(?<=[.!?])\s+", report(findings, rng)) if x]
        if len(sentences) < 1 + len(FINDINGS):
            raise MechmedError(f"demo report {sentences!r}: expected a header and one sentence per finding")
        for i, f in enumerate(FINDINGS):
            pool[(i, findings[f])][sentences[1 + i]] = None
    return {k: list(v) for k, v in pool.items()}


@dataclass
class _AnswerTable:
    """Every prompt the answer loss uses, tokenised once, and how to draw from them."""

    prompts: _Prompts
    questions: list  # per finding: list (one per training phrasing) of [prompt index, *noisy variant indices]
    negated: list  # per prompt: whether its expected answer is the opposite of "finding present"
    statements: dict  # (finding, present) -> prompt indices of report sentences

    @classmethod
    def build(cls, processor, cfg: DemoTrainConfig, seed: int, corpus_texts: Sequence[str]) -> _AnswerTable:
        from mechmed.demo.images import FINDINGS
        from mechmed.demo.phrasings import base_phrasings

        phr = [base_phrasings(f) for f in FINDINGS]
        variants = noisy_variants(
            [[p.text for p in ps] for ps in phr],
            cfg.noise_variants,
            seed,
            extra_words=corpus_texts if cfg.noise_corpus_words else (),
            max_ops=cfg.noise_ops,
        )
        texts: list[str] = []
        negated: list[bool] = []
        questions = []
        k = 0
        for ps in phr:
            per = []
            for p in ps:
                group = [p.text, *variants[k]]
                k += 1
                per.append(list(range(len(texts), len(texts) + len(group))))
                texts.extend(group)
                negated.extend([p.negated] * len(group))
            questions.append(per)
        statements = {}
        if cfg.verify > 0:
            for key, sentences in report_statements(seed).items():
                statements[key] = list(range(len(texts), len(texts) + len(sentences)))
                texts.extend(sentences)
                negated.extend([False] * len(sentences))
        return cls(tokenize_prompts(processor, texts), questions, negated, statements)

    def draw(
        self, rng: np.random.Generator, finding: int, present: bool, cfg: DemoTrainConfig
    ) -> tuple[int, bool]:
        """One prompt about ``finding`` for an image where it is (not) ``present``: (index, answer is yes)."""
        if self.statements and rng.random() < cfg.verify:
            true = bool(rng.random() < 0.5)
            options = self.statements[(finding, present if true else not present)]
            return options[int(rng.integers(len(options)))], true
        per = self.questions[finding]
        j = 0 if rng.random() < cfg.canonical_weight or len(per) == 1 else 1 + int(rng.integers(len(per) - 1))
        group = per[j]
        q = (
            group[0]
            if len(group) == 1 or rng.random() >= cfg.noise
            else group[1 + int(rng.integers(len(group) - 1))]
        )
        return q, present != self.negated[q]


def freeze_vision(model) -> None:
    """Freeze the vision tower and the projector (and put the tower in eval mode)."""
    for p in [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]:
        p.requires_grad_(False)
    model.model.vision_tower.eval()


def train_decoder(
    model,
    processor,
    pixels,
    present,
    corpus_texts: Sequence[str],
    cfg: DemoTrainConfig,
    seed: int = 0,
    callback=None,
) -> dict:
    """Answer cross-entropy mixed with corpus language modelling, vision frozen (see module doc)."""
    import torch
    import torch.nn.functional as F

    tok = processor.tokenizer
    yes_id, no_id = _answer_ids(tok)
    table = _AnswerTable.build(processor, cfg, seed, corpus_texts)
    corpus = _Corpus.build(tok, corpus_texts)
    if cfg.precompute_masks:
        table.prompts.precompute_masks(model)
        corpus.precompute_masks(model)
    rng = np.random.default_rng([seed, 3])

    freeze_vision(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.steps, cfg.warmup))
    model.model.language_model.train()

    present_np = present.numpy().astype(bool)
    pos = np.argwhere(present_np)  # (image, finding) where the finding is present
    neg = np.argwhere(~present_np)
    hist: dict[str, list[float]] = {"answer": [], "lm": []}
    for step in progress_bar(range(cfg.steps), desc="demo model: decoder"):
        half = cfg.batch // 2
        items = np.concatenate(
            [pos[rng.integers(len(pos), size=half)], neg[rng.integers(len(neg), size=cfg.batch - half)]]
        )
        drawn = [table.draw(rng, int(f), bool(present_np[i, f]), cfg) for i, f in items]
        q = torch.tensor([d[0] for d in drawn])
        target = torch.tensor([yes_id if d[1] else no_id for d in drawn])
        inputs = table.prompts.batch(q, pixels[torch.from_numpy(items[:, 0])])
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        answer_loss = F.cross_entropy(logits, target)
        loss = answer_loss
        if cfg.lm_weight > 0 and cfg.lm_batch > 0:
            lm_loss = corpus.loss(
                model, torch.from_numpy(rng.integers(corpus.input_ids.shape[0], size=cfg.lm_batch))
            )
            loss = loss + cfg.lm_weight * lm_loss
            hist["lm"].append(float(lm_loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist["answer"].append(float(answer_loss.detach()))
        if callback is not None:
            callback(step, model)
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info(
                "decoder step %d/%d: answer loss %.4f, lm loss %.4f",
                step + 1,
                cfg.steps,
                hist["answer"][-1],
                hist["lm"][-1] if hist["lm"] else float("nan"),
            )
    model.eval()
    return {
        "answer_loss": float(np.mean(hist["answer"][-20:])),
        "lm_loss": float(np.mean(hist["lm"][-20:])) if hist["lm"] else None,
    }


def train_demo(model, processor, cfg: DemoTrainConfig | None = None, seed: int = 0, callback=None) -> dict:
    """Train a freshly built demo model in place (both stages); returns training statistics."""
    import torch

    from mechmed.demo.images import FINDINGS, make_images

    cfg = cfg or DemoTrainConfig()
    t0 = time.perf_counter()
    generator = _seed_all(seed)
    samples = make_images(cfg.n_images, seed, model.config.vision_config.image_size)
    pixels = pixel_values(processor, [im for im, _ in samples])
    present = torch.tensor([[bool(f[k]) for k in FINDINGS] for _, f in samples])
    stats = {"train_images_s": time.perf_counter() - t0}
    log.info("rendered %d training images in %.1fs", cfg.n_images, stats["train_images_s"])
    t1 = time.perf_counter()
    stats.update(pretrain_vision(model, pixels, present.float(), cfg, generator))
    stats["vision_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    stats.update(
        train_decoder(
            model,
            processor,
            pixels,
            present,
            corpus_sentences(seed, cfg.n_corpus_reports),
            cfg,
            seed,
            callback=callback,
        )
    )
    stats["decoder_s"] = time.perf_counter() - t2
    return stats


# ----------------------------------------------------------------------------- evaluation
