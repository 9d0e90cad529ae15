"""notebooks/guidelines.ipynb runs top to bottom on a results directory the test writes."""

from __future__ import annotations

import ast
import os

import nbclient
import nbformat
from benchmark_fakes import write_fake_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "notebooks", "guidelines.ipynb")


def test_notebook_holds_no_library_code():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines()
                           if not line.startswith("%"))  # IPython magics
        tree = ast.parse(source)
        # only a tiny display helper may be defined; no classes, no plotting code of its own
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        assert [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] in ([], ["show"])
        assert "matplotlib.pyplot" not in cell.source and "add_subplot" not in cell.source


def test_notebook_draws_the_guideline_curves_from_a_results_dir(tmp_path, monkeypatch):
    rows = write_fake_sweep(str(tmp_path / "sweep"))
    # a --set sweep: the notebook names its setting as the plot command does
    (tmp_path / "sweep" / "sweep_setting.json").write_text(
        '{"smoke": false, "overrides": {"lr": 0.003}}')
    monkeypatch.setenv("WTMODELS_RESULTS", str(tmp_path / "sweep"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 7  # depth, width, masks, capacity, time/memory, stability, extrapolation
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{len(rows)} runs" in text and "recommended:" in text
    assert "every run of this directory: --set lr=0.003" in text
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and markdown[0].startswith("| label |")
    assert not [o for o in outputs if o.output_type == "error"]
