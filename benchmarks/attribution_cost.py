"""Attribution cost per pair, in forward-pass equivalents, against exact per-layer patching.

A forward-pass equivalent is the median wall time of one plain forward over the same pair batch
(both phrasings). Attribution patching (one forward + one backward for all layers) should cost
≤ 3 of them whatever the depth; exact activation patching costs L + 1.

Measured at the depth of the demo model (6 layers) and at a 34-layer Gemma 3 model of reduced
width (MedGemma-4B's depth). Alternates the methods, several repetitions after a warm-up, and
reports medians. Prints a table last and writes benchmarks/results/attribution_cost.json.

``python benchmarks/attribution_cost.py --shape medgemma`` measures MedGemma-4B's decoder shape
instead (34 layers, width 2560, 8 query heads of 256, 4 KV heads, MLP 10240; random weights, the
test tokenizer's small vocabulary, a tiny vision tower; about 13 GB in float32): one pair, forward
against attribution only (exact patching costs L + 1 forwards by construction), and a profile of
one attribution call by operator (``attribution_cost_medgemma.json``).
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


def measure(layers: int, hidden: int, n_pairs: int, tmp: Path, *, exact: bool = True, reps: int = REPS,
            profile: bool = False, **shape) -> dict:
    shape = {"intermediate": 4 * hidden, "head_dim": hidden // 2, **shape}
    model, proc = tiny.gemma3_vlm(layers=layers, hidden=hidden, **shape)
    b = bundle(model, proc)
    pairs = pairs_for(tmp, n_pairs)
    from mechmed.data.images import load_image

    imgs = [load_image(p.image) for p in pairs]
    both = _inputs(b, [p.question for p in pairs] + [p.paraphrase for p in pairs], imgs * 2)
    cache: dict = {}
    methods = {
        "forward": lambda: _margin(b, both),
        "attribution": lambda: attribute_batch(b, pairs, image_cache=cache),
    }
    if exact:
        methods["exact"] = lambda: attribute_batch(b, pairs, exact=True, image_cache=cache)
    for fn in methods.values():  # warm-up
        fn()
    times = {k: [] for k in methods}
    for _ in range(reps):
        for k, fn in methods.items():  # alternate
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = med["forward"]
    row = {"layers": layers, "hidden": hidden, "pairs": n_pairs, "shape": shape,
           "tokens_per_prompt": int(both["input_ids"].shape[1]), "median_s": med,
           "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
           "attribution_fwd_equiv": med["attribution"] / fwd}
    if exact:  # exact = attribution + L forwards of the paraphrases alone; report patching's own cost too
        row.update(exact_fwd_equiv=med["exact"] / fwd,
                   exact_patching_only_fwd_equiv=(med["exact"] - med["attribution"]) / fwd + 1)
    if profile:
        row["profile"] = _profile(lambda: attribute_batch(b, pairs, image_cache=cache), fwd)
    return row


def _profile(fn, fwd_s: float, top: int = 12) -> dict:
    """Self CPU time of one call by operator (the top ``top``), in seconds and in forward-equivalents."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    return {"total_self_s": total, "ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                                            "fwd_equiv": e.self_cpu_time_total / 1e6 / fwd_s} for e in ops]}


def main() -> None:
    import tempfile

    torch.set_num_threads(2)
    if "--shape" in sys.argv and sys.argv[sys.argv.index("--shape") + 1] == "medgemma":
        return medgemma()
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


def medgemma() -> None:
    """MedGemma-4B's decoder shape (see the module doc)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        row = measure(34, 2560, 1, Path(d), exact=False, reps=int(os.environ.get("REPS", 3)), profile=True,
                      heads=8, kv_heads=4, head_dim=256, intermediate=10240)
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu"}
    out = Path(__file__).parent / "results" / "attribution_cost_medgemma.json"
    out.write_text(json.dumps({"info": info, "rows": [row]}, indent=2))
    m = row["median_s"]
    print(f"MedGemma-4B decoder shape (34 × 2560), 1 pair, {row['tokens_per_prompt']} tokens per prompt, CPU:")
    print(f"  forward {m['forward']:.2f} s, attribution {m['attribution']:.2f} s: "
          f"{row['attribution_fwd_equiv']:.2f} forward-equivalents per pair (bar ≤ 3)")
    print("  where one attribution call's time goes (self CPU, forward-equivalents):")
    for op in row["profile"]["ops"]:
        print(f"    {op['op']:<40} {op['calls']:>6} calls {op['self_s']:>8.2f} s {op['fwd_equiv']:>6.2f}")


if __name__ == "__main__":
    main()
