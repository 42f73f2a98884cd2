"""Attribution cost per pair, in forward-pass equivalents, against exact per-layer patching.

A forward-pass equivalent is the median wall time of one plain forward over the same pair batch
(both phrasings). Attribution patching (one forward + one backward for all layers) should cost
≤ 3 of them whatever the depth; exact activation patching costs L + 1.

Measured at the depth of the demo model (6 layers) and at a 34-layer Gemma 3 model of reduced
width (MedGemma-4B's depth). Alternates the methods, several repetitions after a warm-up, and
reports medians. Prints a table last and writes benchmarks/results/attribution_cost.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechmed import tiny  # noqa: E402
from mechmed.attribution import _inputs, _margin, attribute_batch  # noqa: E402
from mechmed.data.records import ParaphrasePair  # noqa: E402
from mechmed.models import bundle  # noqa: E402

REPS = int(os.environ.get("REPS", 7))


def pairs_for(tmp: Path, n: int):
    from PIL import Image

    out = []
    for i in range(n):
        path = tmp / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
        out.append(ParaphrasePair(f"p{i}", "Is there a pleural effusion?", "Does this image show effusion?",
                                  "yes", image=path))
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(layers: int, hidden: int, n_pairs: int, tmp: Path) -> dict:
    model, proc = tiny.gemma3_vlm(layers=layers, hidden=hidden, intermediate=4 * hidden, head_dim=hidden // 2)
    b = bundle(model, proc)
    pairs = pairs_for(tmp, n_pairs)
    from mechmed.data.images import load_image

    imgs = [load_image(p.image) for p in pairs]
    both = _inputs(b, [p.question for p in pairs] + [p.paraphrase for p in pairs], imgs * 2)
    cache: dict = {}
    methods = {
        "forward": lambda: _margin(b, both),
        "attribution": lambda: attribute_batch(b, pairs, image_cache=cache),
        "exact": lambda: attribute_batch(b, pairs, exact=True, image_cache=cache),
    }
    for fn in methods.values():  # warm-up
        fn()
    times = {k: [] for k in methods}
    for _ in range(REPS):
        for k, fn in methods.items():  # alternate
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = med["forward"]
    # exact = attribution + L forwards of the paraphrases alone; report patching's own cost too
    return {"layers": layers, "hidden": hidden, "pairs": n_pairs, "median_s": med,
            "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
            "attribution_fwd_equiv": med["attribution"] / fwd,
            "exact_fwd_equiv": med["exact"] / fwd,
            "exact_patching_only_fwd_equiv": (med["exact"] - med["attribution"]) / fwd + 1}


def main() -> None:
    import tempfile

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for layers, hidden in ((6, 64), (34, 128)):
            rows.append(measure(layers, hidden, 8, Path(d)))
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "reps": REPS}
    out = Path(__file__).parent / "results" / "attribution_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(f"{'layers':>6} {'width':>5} {'attribution (fwd-eq)':>21} {'exact patching (fwd-eq)':>24} {'L+1':>4}")
    for r in rows:
        print(f"{r['layers']:>6} {r['hidden']:>5} {r['attribution_fwd_equiv']:>21.2f} "
              f"{r['exact_patching_only_fwd_equiv']:>24.2f} {r['layers'] + 1:>4}")


if __name__ == "__main__":
    main()
