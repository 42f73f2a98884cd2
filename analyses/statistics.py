"""The statistics: 95% CIs and paired and unpaired tests on an ablation's results.

Reproduces the seed paper's statistics for every trained arm against the untrained model (and
against the cross-entropy-only control when the grid has one), on the same held-out pairs:

- flip rate and canonical accuracy with Wilson 95% intervals and the two-proportion z test the
  paper reports (flip rate 14.6% -> 4.4%, 23/158 vs 7/158, p = 0.002);
- the exact McNemar test of the per-pair flips (paired: the same pairs before and after);
- the paired bootstrap of mean |Δmargin| (the paper's 1.63 -> 0.33 logits).

Every test is :func:`mechmed.consistency.compare_runs` (formulas in :mod:`mechmed.stats`). The
paper's own counts (``--paper-counts``) go through the same z test, so its p-value can be checked.

``--results`` is an ablation directory (``mechmed ablate`` or ``targeted_vs_full.py``'s
``ablation/``); without it, ``targeted_vs_full.py``'s grid is run first with the same options.
Writes ``statistics.csv``, ``statistics.json`` and ``flip_by_arm`` / ``tradeoff`` figures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where the file's name would hide the
# standard library's statistics module (torch imports it): search the folder last instead.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))

import targeted_vs_full  # noqa: E402
from _common import ablation_figures, compare, finish, parser, run_script, write_csv  # noqa: E402

PAPER_COUNTS = "23/158,7/158"


def build_parser():
    p = parser(__doc__, "runs/analyses/statistics")
    p.add_argument("--results", default=None, help="ablation directory holding results.json (or that file); "
                   "default: run targeted_vs_full.py's grid into OUT/ablation first")
    p.add_argument("--paper-counts", default=PAPER_COUNTS, help="flips/pairs before and after, as the paper "
                   "reports them, tested with the same z test ('' to skip)")
    return targeted_vs_full.add_options(p)


def paper_check(counts: str) -> dict | None:
    """The two-proportion z test and Wilson intervals of published counts ``k1/n1,k2/n2``."""
    from mechmed.errors import MechmedError
    from mechmed.stats import compare_proportions

    if not counts:
        return None
    try:
        (k1, n1), (k2, n2) = (map(int, part.split("/")) for part in counts.split(","))
    except ValueError:
        raise MechmedError(f"--paper-counts {counts!r}: write k1/n1,k2/n2, e.g. {PAPER_COUNTS}") from None
    return compare_proportions("flip_rate", k1, n1, k2, n2)


def arm_tests(results_dir: Path, rows: list[dict]) -> list[dict]:
    """Each trained arm against the base model of its seed and against ce_only (same method and seed)."""
    from mechmed.ablate import Arm

    have = {(r["arm"], r["method"], r["seed"]) for r in rows}
    out = []
    for r in rows:
        if r["arm"] == "base":
            continue
        after = results_dir / "arms" / Arm(r["arm"], r["method"], r["seed"], ()).name / "after"
        labels = {"b": r["arm"], "method": r["method"], "seed": r["seed"], "layers": r["layers"],
                  "collapsed": r["collapsed"]}
        out.append(compare(results_dir / f"base-s{r['seed']}", after, a="base", **labels))
        if r["arm"] != "ce_only" and ("ce_only", r["method"], r["seed"]) in have:
            ce = results_dir / "arms" / Arm("ce_only", r["method"], r["seed"], ()).name / "after"
            out.append(compare(ce, after, a="ce_only", **labels))
    return out


def run(args) -> dict:
    from mechmed.io import read_json

    out = Path(args.out)
    if args.results:
        results_dir = Path(args.results)
        results_dir = results_dir.parent if results_dir.suffix == ".json" else results_dir
    else:
        results_dir = Path(targeted_vs_full.run(args)["results"]).parent
    results = read_json(results_dir / "results.json", "--results")
    tests = arm_tests(results_dir, results["rows"])
    write_csv(out / "statistics.csv", tests)
    for t in tests:
        print(f"{t['a']:>8} -> {t['b']:<17} {t['method']:<12} flip {t['flip_a']:.3f} -> {t['flip_b']:.3f} "
              f"(z p = {t['flip_p_ztest']:.3g}, McNemar p = {t['flip_p_mcnemar']:.3g}); |Δmargin| "
              f"{t['margin_diff_a']:.3f} -> {t['margin_diff_b']:.3f} (bootstrap p = {t['margin_diff_p_bootstrap']:.3g})")
    paper = paper_check(args.paper_counts)
    if paper:
        print(f"paper's counts {args.paper_counts}: z = {paper['test']['statistic']:.2f}, "
              f"p = {paper['test']['p_value']:.4f}")
    return finish(out, {"results": str(results_dir / "results.json"), "tests": tests,
                        "pooled": results["summary"], "paper": paper,
                        "figures": ablation_figures(results["summary"], out)}, "statistics.json")


def main(argv=None) -> int:
    return run_script(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
