"""SAE transfer: do SAEs reconstruct the medical model's activations on medical and on general text?

Reproduces the seed paper's check that Gemma Scope 2 SAEs (trained on Gemma 3) transfer to
MedGemma-4B: R² = 1 − Σ‖x − x̂‖² / Σ‖x − μ‖² of the resid_post activations per layer, on medical
and on general text (70 prompts each, shipped with mechmed), with a one-sided t test of the mean
per-prompt R² against a threshold (0.95). The numbers come from :func:`mechmed.stages.run_sae_check`;
this script lays them out per layer, medical beside general.

Writes ``sae_check/`` (sae_check.json, r2_by_layer.html/.png), ``transfer.csv`` and ``transfer.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import add_saes, finish, parser, run_script, write_csv

TEXTS = "medical,general"


def build_parser():
    p = parser(__doc__, "runs/analyses/sae_transfer",
               data_help="not read: the prompts are mechmed's medical and general text sets (see --texts)")
    add_saes(p)
    p.add_argument("--layers", default="all", help="layers to check: all, 15-19, 9,17,22,29")
    p.add_argument("--texts", default=TEXTS, help="prompt sets compared (medical, general, images)")
    p.add_argument("--threshold", type=float, default=0.95, help="R² threshold of the one-sided t test")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--ce", action="store_true", help="also CE loss recovered (two extra forwards per layer)")
    return p


def transfer_rows(rows: list[dict], sets: list[str]) -> list[dict]:
    """One row per layer: each text set's R², its 95% CI, the t test's p and pass, and the gap
    between the first two sets."""
    by = {(r["layer"], r["text_set"]): r for r in rows}
    out = []
    for layer in sorted({r["layer"] for r in rows}):
        row = {"layer": layer}
        for s in sets:
            r = by[(layer, s)]
            row.update({f"r2_{s}": r["r2"], f"r2_{s}_lo": r["r2_ci"][0], f"r2_{s}_hi": r["r2_ci"][1],
                        f"p_{s}": r["p_value"], f"exceeds_{s}": r["exceeds_threshold"]})
        if len(sets) >= 2:
            row[f"r2_gap_{sets[0]}_minus_{sets[1]}"] = row[f"r2_{sets[0]}"] - row[f"r2_{sets[1]}"]
        out.append(row)
    return out


def summary(rows: list[dict], sets: list[str]) -> dict:
    """Per text set: mean and minimum R² over layers, and how many layers pass the test."""
    out = {}
    for s in sets:
        rs = [r for r in rows if r["text_set"] == s]
        out[s] = {"mean_r2": sum(r["r2"] for r in rs) / len(rs), "min_r2": min(r["r2"] for r in rs),
                  "n_layers": len(rs), "n_exceeding": sum(bool(r["exceeds_threshold"]) for r in rs),
                  "max_p_value": max((r["p_value"] for r in rs if r["p_value"] is not None), default=None)}
    return out


def run(args) -> dict:
    from mechmed.fidelity import parse_text_sets
    from mechmed.stages import run_sae_check

    out = Path(args.out)
    sets = parse_text_sets(args.texts)
    res = run_sae_check(args.model, args.saes, args.layers, args.texts, str(out / "sae_check"),
                        threshold=args.threshold, batch_size=args.batch_size, device=args.device, ce=args.ce,
                        seed=args.seed, dtype=args.dtype)
    table = transfer_rows(res.rows, sets)
    write_csv(out / "transfer.csv", table)
    print(res.table())
    return finish(out, {"model": args.model, "saes": args.saes, "threshold": args.threshold, "text_sets": sets,
                        "summary": summary(res.rows, sets), "layers": table,
                        "figures": {"r2_by_layer": res.figures}}, "transfer.json")


def main(argv=None) -> int:
    return run_script(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
