"""Image + question prompts over the demo's own images: the ``images`` prompt set of
``mechmed sae-check`` for the embedded default, and the image half of its SAE training prompts."""

from __future__ import annotations

from mechmed.demo.dataset import EVAL_SEED_OFFSET
from mechmed.demo.images import FINDINGS, make_images
from mechmed.demo.phrasings import questions
from mechmed.errors import MechmedError

IMAGE_SPLITS = ("train", "eval")


def image_question_prompts(n: int, seed: int = 0, split: str = "eval"):
    """``n`` image + question prompts from the demo data: (PIL images, questions).

    ``split="eval"`` draws images from the demo's evaluation seed (``seed + 10_000``, never trained
    on); ``"train"`` from its training seed. Image ``i`` is asked about one finding in one phrasing
    (canonical, training or held-out, negations included), chosen with a generator seeded by
    ``seed``, so the set is the same on every run.
    """
    import numpy as np
    from PIL import Image

    if split not in IMAGE_SPLITS:
        raise MechmedError(f"image prompts: split {split!r}; choose one of {', '.join(IMAGE_SPLITS)}")
    if n < 1:
        raise MechmedError(f"image prompts: n={n}; ask for at least one")
    base = seed + (EVAL_SEED_OFFSET if split == "eval" else 0)
    samples = make_images(n, base)
    rng = np.random.default_rng([base, 7])
    images, texts = [], []
    for array, _ in samples:
        finding = FINDINGS[int(rng.integers(len(FINDINGS)))]
        options = questions(finding)
        texts.append(options[int(rng.integers(len(options)))].text)
        images.append(Image.fromarray(array).convert("RGB"))
    return images, texts
