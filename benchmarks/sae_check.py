"""sae-check cost: forward passes per batch against the number of layers, and throughput and peak
memory against the number of prompts (the check must stream).

Model: the embedded default (``--model demo``, built or read from the cache) or an untrained
model of the same shape and tokenizer (``--model untrained``: no build needed). SAEs: TopK SAEs of
the demo recipe's size on every layer (d_sae 512, k 24), randomly initialised (``--saes random``,
the default: cost does not depend on what they learned) or the demo's trained ones (``--saes demo``).
Prompts: demo corpus reports (about 40 tokens each, the same length distribution for every n).

1. **Forwards per batch.** ``mechmed.fidelity.evaluate_saes`` on 40 prompts, batch 8, with SAEs on
   1, 3 and all layers, ``ce=False``, counted with a forward pre-hook on the model: must be 1
   whatever the number of layers. With ``ce=True``: 1 + layers·(2 + 2T), the recon and zero-ablation
   splices and, per token type T that holds some but not all of a batch's positions, the same at
   that type's positions (``mechmed.fidelity`` module doc), counted against what the evaluator reports.
   The demo corpus reports are written in the demo tokenizer's own words, so every evaluated token is
   text (T = 0: 1 + 2·layers); image + question prompts, with image tokens and ``<unk>``, reach 1 + 7·layers.
2. **Memory and throughput.** For n = 100 and 1000 prompts, each in a fresh process: all layers,
   ``ce=False``; peak RSS of the process (``resource.getrusage``), its growth over the RSS after
   loading and one warm-up batch, the tracemalloc peak (Python and numpy allocations) during the
   evaluation, and tokens/s. Bar: peak RSS at 1000 prompts within 10% of that at 100.

Torch runs on one thread (the demo model is 64 wide; threads only add contention on shared cores).
Run: ``python benchmarks/sae_check.py`` (about a minute on 2 cores once the demo model is cached);
writes ``benchmarks/results/sae_check.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_PROMPTS = (100, 1000)
BATCH = 16


def setup(model: str, saes: str, seed: int = 0):
    import torch

    torch.set_num_threads(1)
    from mechmed.models import bundle, load_model

    if model == "demo":
        b = load_model("demo", seed=seed)
    else:
        from mechmed.demo.model import build_demo_model

        m, p = build_demo_model(seed=seed)
        b = bundle(m, p, name="untrained-demo-shape")
    if saes == "demo":
        from mechmed.saes import resolve_saes

        sae_map = resolve_saes("demo", b, seed=seed)
    else:
        from sae_lens import TopKSAE, TopKSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        from mechmed.sites import Site

        sae_map = {}
        for L in range(b.n_layers):
            torch.manual_seed(L)
            sae_map[L] = TopKSAE(TopKSAEConfig(d_in=b.d_model, d_sae=512, k=24,
                                               metadata=SAEMetadata(hook_name=Site(L).hook_name))).eval()
    return b, sae_map


def prompts(n: int, seed: int = 0):
    from mechmed.demo.phrasings import corpus, definitions
    from mechmed.fidelity import PromptSet

    texts = corpus(seed, n_reports=n)[len(definitions()):]  # reports only: one length distribution
    return PromptSet(f"corpus{n}", tuple(texts))


def forwards_part(model: str, saes: str) -> list[dict]:
    from mechmed.fidelity import evaluate_saes

    b, sae_map = setup(model, saes)
    ps = prompts(40)
    calls = []
    handle = b.model.register_forward_pre_hook(lambda *a: calls.append(1))
    rows = []
    try:
        n = b.n_layers
        for layers in ([n // 2], [0, n // 2, n - 1], list(range(n))):
            for ce in (False, True):
                calls.clear()
                t0 = time.perf_counter()
                ev = evaluate_saes(b, {L: sae_map[L] for L in layers}, ps, batch_size=8, ce=ce)
                rows.append({"layers": len(layers), "ce": ce, "batches": ev.n_batches, "forwards": len(calls),
                             "forwards_per_batch": len(calls) / ev.n_batches,
                             "expected": ev.n_forwards / ev.n_batches if ce else 1,
                             "reported_forwards": ev.n_forwards, "seconds": time.perf_counter() - t0})
    finally:
        handle.remove()
    return rows


def child(n: int, model: str, saes: str) -> dict:
    """One memory/throughput measurement (run in a fresh process)."""
    from mechmed.fidelity import PromptSet, evaluate_saes

    b, sae_map = setup(model, saes)
    ps = prompts(n)
    evaluate_saes(b, sae_map, PromptSet("warmup", ps.texts[:BATCH]), batch_size=BATCH, ce=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    ev = evaluate_saes(b, sae_map, ps, batch_size=BATCH, ce=False)
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n_prompts": len(ps), "n_tokens": ev.n_tokens, "layers": len(sae_map), "batches": ev.n_batches,
            "forwards": ev.n_forwards, "seconds": seconds, "tokens_per_s": ev.n_tokens / seconds,
            "peak_rss_mb": peak, "rss_after_warmup_mb": base, "rss_growth_mb": peak - base,
            "tracemalloc_peak_mb": py_peak / 2**20, "r2_layer0": ev.rows[0]["r2"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("demo", "untrained"), default="demo")
    ap.add_argument("--saes", choices=("random", "demo"), default="random")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "sae_check.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("MECHMED_PROGRESS", "0")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.saes)))
        return 0
    t0 = time.perf_counter()
    fw = forwards_part(args.model, args.saes)
    mem = []
    for n in N_PROMPTS:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--model", args.model, "--saes", args.saes],
                             capture_output=True, text=True, check=True)
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratio = mem[-1]["peak_rss_mb"] / mem[0]["peak_rss_mb"]
    result = {
        "benchmark": "sae_check", "model": args.model, "saes": args.saes,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "forwards": fw, "memory": mem, "peak_rss_ratio_1000_vs_100": ratio,
        "bars": {"one_forward_per_batch_without_ce": all(r["forwards_per_batch"] == 1 for r in fw if not r["ce"]),
                 "forwards_match_expected": all(r["forwards_per_batch"] == r["expected"] for r in fw),
                 "peak_rss_flat_within_10pct": ratio <= 1.10},
        "seconds": time.perf_counter() - t0,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'layers':>6} {'ce':>5} {'batches':>7} {'forwards':>8} {'fwd/batch':>9} {'expected':>8}")
    for r in fw:
        print(f"{r['layers']:>6} {str(r['ce']):>5} {r['batches']:>7} {r['forwards']:>8} "
              f"{r['forwards_per_batch']:>9.1f} {r['expected']:>8}")
    print()
    print(f"{'prompts':>7} {'tokens':>7} {'tok/s':>7} {'peak RSS MB':>11} {'growth MB':>9} {'tracemalloc MB':>14}")
    for r in mem:
        print(f"{r['n_prompts']:>7} {r['n_tokens']:>7} {r['tokens_per_s']:>7.0f} {r['peak_rss_mb']:>11.1f} "
              f"{r['rss_growth_mb']:>9.1f} {r['tracemalloc_peak_mb']:>14.2f}")
    print(f"\npeak RSS 1000 vs 100 prompts: x{ratio:.3f}; bars: {result['bars']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
