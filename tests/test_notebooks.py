"""The notebooks: committed with their outputs (figures as PNG too, so a forge shows them), the outputs
made by the committed code, and each runs top to bottom on the embedded default (in a kernel whose
working directory is a temporary folder, so nothing is written in the repo)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from conftest import load_script

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
FIGURES = ("r2_by_layer", "layer_profile", "feature_heatmap", "training_curves", "flip_by_arm", "tradeoff")


REGEN = load_script(NOTEBOOKS / "regenerate.py")
NAMES = REGEN.NAMES


def _read(name: str):
    import nbformat

    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _figure_cells(nb):
    return [c for c in _code(nb) if c.source.splitlines()[-1].split("(")[0] in FIGURES]


def _shape(cell, drop=()) -> list:
    """What a cell showed, without the values: (output type, stream name or mime types) per output,
    consecutive writes to one stream counted once (how a stream is cut into outputs depends on timing)."""
    shape = [(o.output_type, o.get("name") or tuple(sorted(set(o.get("data", {})) - set(drop)))) for o in cell.outputs]
    return [s for i, s in enumerate(shape) if not (i and s[0] == "stream" and shape[i - 1] == s)]


def test_notebooks_are_committed_with_the_outputs_of_their_code():
    import nbformat

    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        nb = _read(name)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        assert any(c.cell_type == "markdown" for c in nb.cells)
        # the outputs came from this code, run top to bottom once
        assert nb.metadata["mechmed"]["code_sha256"] == REGEN.code_sha256(nb), \
            f"{name}: code changed since its outputs were made; run python notebooks/regenerate.py"
        assert [c.execution_count for c in _code(nb)] == list(range(1, len(_code(nb)) + 1)), name
        assert not [o for c in _code(nb) for o in c.outputs if o.output_type == "error"], name
        assert all(c.outputs for c in _code(nb) if c.source.rstrip().splitlines()[-1].startswith("print")), name
        # every figure is there both interactive and as a PNG a forge can show without running anything
        figures = _figure_cells(nb)
        assert figures, name
        for c in figures:
            shown = [o for o in c.outputs if PLOTLY in o.get("data", {})]
            assert shown, (name, c.source.splitlines()[-1])
            assert base64.b64decode(shown[-1]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_shows_what_was_committed(name, demo_data_dir, tmp_path):
    before = (NOTEBOOKS / f"{name}.ipynb").read_bytes()
    # the interactive figures only: the committed PNGs are checked above, and drawing them again
    # would start a browser per figure
    nb = REGEN.run(name, tmp_path, renderer="plotly_mimetype")
    assert not [o for c in _code(nb) for o in c.outputs if o.output_type == "error"]
    committed = _read(name)
    assert [c.source for c in _code(nb)] == [c.source for c in _code(committed)]
    drop = ("image/png",)
    for ran, kept in zip(_code(nb), _code(committed)):
        assert _shape(ran, drop) == _shape(kept, drop), ran.source.splitlines()[-1]
    assert all(any(PLOTLY in o.get("data", {}) for o in c.outputs) for c in _figure_cells(nb))
    assert (NOTEBOOKS / f"{name}.ipynb").read_bytes() == before
    if name == "03_select_train_ablate":
        assert (tmp_path / "runs" / "notebook_03" / "ablation" / "results.json").is_file()
