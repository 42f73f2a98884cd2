"""Attribution and layer table: which layers (and SAE features) carry the paraphrase flips?

Reproduces the seed paper's attribution step on MedGemma-4B + PSF-Med: for each paraphrase pair,
attribution patching a_L = ∇m_p · (x_L^q − x_L^p) at every decoder layer, exact activation patching
as its check, SAE feature attributions, and the layer window that training then targets (the paper's
layers 15-19). Computed by :func:`mechmed.stages.run_attribute`; the window by
:func:`mechmed.stages.run_select_layers`, which also writes the training config for
``targeted_vs_full.py --config``.

Writes ``attribute/`` (layer_scores.json, features.csv, layer_profile, feature_heatmap),
``train.yaml``, ``layer_table.csv``, ``layer_table.json`` and ``layer_profile_selected.html/.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import add_saes, finish, limit, parser, run_script, save_figures, write_csv

COLUMNS = ("gain_flipped", "attr_flipped", "attr_stable", "attr_all", "patch_flipped", "recovery_flipped", "feature_auc")


def layer_rows(scores: dict, selected) -> list[dict]:
    """One row per layer: each layer score's mean and 95% CI, the top SAE feature, and whether the
    layer is in the selected window."""
    table = scores["scores"]
    top = scores.get("top_feature", {})
    rows = []
    for layer in range(scores["n_layers"]):
        row = {"layer": layer, "selected": layer in selected}
        for key in COLUMNS:
            if key in table:
                row[key] = table[key]["mean"][layer]
                if key != "feature_auc":
                    row[f"{key}_lo"], row[f"{key}_hi"] = table[key]["ci"][layer]
        if top:
            row["top_feature"] = top.get(str(layer))
        rows.append(row)
    return rows


def build_parser():
    p = parser(__doc__, "runs/analyses/attribution_table")
    add_saes(p)
    p.add_argument("--max-pairs", type=int, default=None, help="pairs attributed, a seeded sample "
                   "(default: 32 on the demo, 300 otherwise)")
    p.add_argument("--no-exact", action="store_true", help="skip exact activation patching (L forwards per pair)")
    p.add_argument("--top-features", type=int, default=10, help="SAE features per layer in features.csv")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-root", default=None)
    p.add_argument("--strategy", default="window", choices=["window", "topk", "threshold"])
    p.add_argument("--width", type=int, default=None, help="window width (default: 3 on the demo, 5 otherwise)")
    p.add_argument("--score", default="gain_flipped", help="layer score the window is chosen on")
    return p


def run(args) -> dict:
    from mechmed.figures import layer_profile
    from mechmed.stages import run_attribute, run_select_layers

    out = Path(args.out)
    saes = None if args.saes == "none" else args.saes
    scores = run_attribute(args.model, args.data, saes, str(out / "attribute"),
                           max_pairs=limit(args, "max_pairs", 32, 300), exact=not args.no_exact,
                           top_features=args.top_features, batch_size=args.batch_size, device=args.device,
                           image_root=args.image_root, seed=args.seed)
    scores_file = out / "attribute" / "layer_scores.json"
    _, chosen = run_select_layers(str(scores_file), str(out / "train.yaml"), strategy=args.strategy,
                                    width=limit(args, "width", 3, 5), score=args.score, model=args.model,
                                    data=args.data, saes=args.saes, seed=args.seed)
    rows = layer_rows(scores, chosen.layers)
    write_csv(out / "layer_table.csv", rows)
    figures = save_figures({"layer_profile_selected": layer_profile(scores, list(chosen.layers), key=args.score)}, out)
    print(f"{scores['n_pairs']} pairs ({scores['n_flipped']} flipped); selected layers {list(chosen.layers)}")
    return finish(out, {"model": args.model, "data": args.data, "saes": args.saes, "n_pairs": scores["n_pairs"],
                        "n_flipped": scores["n_flipped"], "spearman_attr_patch": scores.get("spearman_attr_patch"),
                        "selection": chosen.to_dict(), "train_config": str(out / "train.yaml"), "layers": rows,
                        "figures": figures}, "layer_table.json")


def main(argv=None) -> int:
    return run_script(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
