"""The notebooks: committed without outputs, and each runs top to bottom on the embedded default
(in a kernel whose working directory is a temporary folder, so nothing is written in the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_capture_and_sae_check", "02_paraphrase_attribution", "03_select_train_ablate")
PLOTLY = "application/vnd.plotly.v1+json"


def _read(name: str):
    import nbformat

    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        nb = _read(name)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {i} has outputs"
        assert any(c.cell_type == "markdown" for c in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, demo_data_dir, tmp_path):
    from nbclient import NotebookClient

    nb = _read(name)
    before = (NOTEBOOKS / f"{name}.ipynb").read_bytes()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every cell that ends with a figure shows it inline
    figure_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.splitlines()[-1].split("(")[0]
                    in ("r2_by_layer", "layer_profile", "feature_heatmap", "training_curves", "flip_by_arm",
                        "tradeoff")]
    assert figure_cells
    for c in figure_cells:
        assert any(PLOTLY in o.get("data", {}) for o in c.outputs), c.source.splitlines()[-1]
    assert (NOTEBOOKS / f"{name}.ipynb").read_bytes() == before
    if name == "03_select_train_ablate":
        assert (tmp_path / "runs" / "notebook_03" / "ablation" / "results.json").is_file()
