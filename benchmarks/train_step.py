"""Training step cost: spectral mixture of LoRA experts vs LoRA at the same total rank, on the demo model.

Conditions (each on its own copy of the embedded default, adapters built by ``mechmed.train.apply_adapter``
with the demo defaults of ``mechmed.config.demo_defaults``, all seven projections per layer):

- ``lora_selected``: LoRA on the selected range (``--layers``, default 2-4);
- ``lora_all``: LoRA on every decoder layer;
- ``spectral_selected``: spectral experts (8 experts, top-2) on the selected range, same total rank.

A step is what one optimiser step of ``mechmed.train.train`` does with ``grad_accum=1``: one forward
over both phrasings of ``--batch`` demo training pairs (with images, tokenised once before timing),
the pair loss (+ the balance loss for spectral experts), backward, AdamW step, zero_grad.

Timing: after warm-up, each round times every condition once, in an order rotated round by round
(reversed on odd rounds), so drift and background load hit all conditions alike; a sample is the
mean of ``--calls`` consecutive steps. Reported per condition: median, quartiles, min, max;
``ratio`` = median over rounds of (condition / lora_selected in the same round), plus the ratio of
medians and of minima. Bar: spectral_selected / lora_selected <= 1.5.

Memory (deterministic, CPU has no allocator statistics): ``saved_bytes`` = bytes of the distinct
tensors autograd saves for backward during the forward (the activation memory held at the step's
peak) and ``trainable_bytes`` = trainable parameters × 4 (weight, gradient, two AdamW moments);
``peak_bytes`` is their sum.

Run: ``python benchmarks/train_step.py`` (about 1-2 minutes on 2 cores); writes
``benchmarks/results/train_step.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from capture_overhead import interleaved, machine, summary  # noqa: E402

REFERENCE = "lora_selected"
BAR = 1.5


def conditions(selected: list[int], n_layers: int, rank: int) -> dict:
    """Condition name -> training config overrides."""
    return {"lora_selected": {"method": "lora", "layers": selected, "rank": rank},
            "lora_all": {"method": "lora", "layers": list(range(n_layers)), "rank": rank},
            "spectral_selected": {"method": "spectral_moe", "layers": selected, "rank": rank}}


def make_step(overrides: dict, batch: int, seed: int = 0):
    """A closure running one training step of a fresh adapter on its own demo model; and its memory."""
    import torch

    from mechmed.config import TrainConfig, demo_defaults
    from mechmed.data.images import load_image
    from mechmed.models import load_model
    from mechmed.readout import answer_logits, build_inputs
    from mechmed.spectral import balance_loss
    from mechmed.train import apply_adapter, pair_loss, resolve_pairs

    cfg = TrainConfig.from_dict({**demo_defaults(), **overrides, "seed": seed})
    b = load_model("demo", seed=seed)
    pairs = resolve_pairs("demo", split="train", seed=seed)[:batch]
    images = [load_image(p.image) for p in pairs] * 2
    inputs = build_inputs(b.processor, [p.question for p in pairs] + [p.paraphrase for p in pairs], images)
    yes_q = torch.tensor([p.answer == "yes" for p in pairs])
    yes_p = torch.tensor([p.expected_paraphrase == "yes" for p in pairs])
    neg = torch.tensor([p.negated for p in pairs])
    torch.manual_seed(seed)
    model, adapted = apply_adapter(b, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    spectral = cfg.method == "spectral_moe"

    def loss():
        scores = answer_logits(model, inputs, b.answers)
        total = pair_loss(scores[:batch].float(), scores[batch:].float(), yes_q, yes_p, neg, cfg).total
        return total + cfg.spectral.balance_coef * balance_loss(model) if spectral else total

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saved: dict = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss().backward()
    optimizer.zero_grad(set_to_none=True)
    n_trainable = sum(p.numel() for p in trainable)
    memory = {"saved_bytes": sum(saved.values()), "trainable_parameters": n_trainable,
              "trainable_bytes": 4 * 4 * n_trainable, "adapted_modules": len(adapted),
              "tokens": list(inputs["input_ids"].shape)}
    memory["peak_bytes"] = memory["saved_bytes"] + memory["trainable_bytes"]
    return step, memory


def measure(rank: int, selected: list[int], batch: int, rounds: int, warmup: int, calls: int) -> dict:
    from mechmed.models import load_model

    n_layers = load_model("demo").n_layers
    conds = conditions(selected, n_layers, rank)
    steps, memory = {}, {}
    for name, overrides in conds.items():
        steps[name], memory[name] = make_step(overrides, batch)
    times = interleaved(steps, rounds, warmup, calls)
    return {"rank": rank, "selected_layers": selected, "n_layers": n_layers, "batch_pairs": batch,
            "conditions": summary(times, REFERENCE), "memory": memory, "configs": conds,
            "rounds": rounds, "warmup": warmup, "calls_per_sample": calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--ranks", default="8,32", help="total ranks to compare at (default 8 = demo default, 32)")
    ap.add_argument("--layers", default="2,3,4", help="the selected range (default 2,3,4)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step (demo default 16)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2, help="steps per timed sample")
    ap.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    args = ap.parse_args(argv)

    import torch

    from mechmed.io import write_json

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MECHMED_PROGRESS", "0")
    info = machine()
    t0 = time.perf_counter()
    selected = [int(x) for x in args.layers.split(",")]
    results = []
    for rank in (int(x) for x in args.ranks.split(",")):
        print(f"[rank {rank}] {args.rounds} rounds ...", file=sys.stderr, flush=True)
        results.append(measure(rank, selected, args.batch, args.rounds, args.warmup, args.calls))
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["total_s"] = time.perf_counter() - t0
    bars = {f"rank_{r['rank']}": {"spectral_over_lora_le_1.5": r["conditions"]["spectral_selected"]["ratio"] <= BAR,
                                  "ratio": round(r["conditions"]["spectral_selected"]["ratio"], 4)}
            for r in results}
    out = write_json(args.out, {"benchmark": "train_step", "machine": info, "results": results, "bars": bars})

    load = info["loadavg_start"][0]
    lines = [f"training step on the demo model ({args.batch} pairs, both phrasings); {info['torch_threads']} torch "
             f"threads, {info['cpu_count']} CPUs, load {load:.1f}, torch {info['torch']}",
             f"{'rank':>4} {'condition':<18} {'median ms':>10} {'IQR ms':>13} {'min ms':>7} {'ratio':>6} "
             f"{'ratio IQR':>11} {'r(min)':>6} {'peak MiB':>9} {'params':>7}"]
    for r in results:
        for name, c in r["conditions"].items():
            m = r["memory"][name]
            iqr = f"{1e3 * c['p25_s']:.1f}-{1e3 * c['p75_s']:.1f}"
            riqr = f"{c['ratio_p25']:.2f}-{c['ratio_p75']:.2f}"
            lines.append(f"{r['rank']:>4} {name:<18} {1e3 * c['median_s']:>10.1f} {iqr:>13} {1e3 * c['min_s']:>7.1f} "
                         f"{c['ratio']:>6.3f} {riqr:>11} {c['ratio_of_mins']:>6.3f} "
                         f"{m['peak_bytes'] / 2 ** 20:>9.2f} {m['trainable_parameters']:>7}")
        bar = bars[f"rank_{r['rank']}"]
        lines.append(f"{r['rank']:>4} bar spectral/lora <= {BAR}: "
                     f"{'PASS' if bar['spectral_over_lora_le_1.5'] else 'FAIL'} ({bar['ratio']:.3f})")
    lines.append(f"written {out} in {info['total_s']:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
