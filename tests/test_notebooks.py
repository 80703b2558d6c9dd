"""The notebooks stay thin and in step with the package."""

import ast
import json
from pathlib import Path

import nbformat
import papermill
import pytest

from pneumo.config import TrainConfig

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: exactly one cell tagged parameters"
    return cells[0]


def test_train_notebook_parameters_are_exactly_trainconfig():
    params = papermill.inspect_notebook(str(NOTEBOOKS / "02-train.ipynb"))
    assert set(params) == set(TrainConfig.names()) | {"run_dir"}


def test_train_notebook_defaults_match_trainconfig():
    cell = _parameters_cell(NOTEBOOKS / "02-train.ipynb")
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds plain assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    defaults = TrainConfig().to_dict()
    assert {k: v for k, v in values.items() if k not in ("run_dir", "data_dir")} == \
        {k: v for k, v in defaults.items() if k != "data_dir"}
    TrainConfig.from_dict({k: v for k, v in values.items() if k != "run_dir"})


@pytest.mark.parametrize("name", ["01-explore.ipynb", "02-train.ipynb", "03-predict.ipynb"])
def test_committed_without_outputs_and_thin(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None
            assert "def " not in "".join(cell["source"]), "functions belong in src/pneumo"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.slow
def test_explore_notebook_runs_headless(synth_dir, tmp_path):
    out = tmp_path / "explore.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "01-explore.ipynb"), str(out), kernel_name="python3",
                               parameters={"data_dir": str(synth_dir), "image_size": 64}, progress_bar=False,
                               cwd=str(tmp_path), start_timeout=300)
    nb = nbformat.read(out, as_version=4)
    nbformat.validate(nb)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # overview figure, samples grid, viewer still


@pytest.mark.slow
def test_predict_notebook_runs_headless(tiny_run, synth_dir, tmp_path):
    out = tmp_path / "predict.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "03-predict.ipynb"), str(out), kernel_name="python3", progress_bar=False,
        cwd=str(tmp_path), start_timeout=300,
        parameters={"model": str(tiny_run), "images_dir": str(synth_dir / "stage_2_test_images"),
                    "out_dir": str(tmp_path / "pred"), "labels": str(synth_dir / "stage_2_test_labels.csv")})
    nb = nbformat.read(out, as_version=4)
    nbformat.validate(nb)
    assert (tmp_path / "pred" / "submission.csv").is_file()
    texts = [o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("PredictionString" in t for t in texts)  # the submission table is shown
