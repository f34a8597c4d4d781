"""The Colab notebook: valid, every code cell parses, and (slow) it executes end to end on CPU
with the tiny demo (FLEXOLMO_NOTEBOOK_CI=1 skips the install cell and shrinks the run)."""

import ast
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "flexolmo_demo.ipynb"


def test_notebook_is_valid_and_its_code_parses():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  sources = [c.source for c in nb.cells if c.cell_type == "code"]
  for source in sources:
    ast.parse(source)  # Plain Python (no shell magics), so CI can run every cell.
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # Saved clean.
  assert any("FLEXOLMO_NOTEBOOK_CI" in s for s in sources)
  assert any("flexolmo_jax.reproduce" in s for s in sources)


@pytest.mark.slow
def test_notebook_runs_the_tiny_demo(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("FLEXOLMO_NOTEBOOK_CI", "1")
  monkeypatch.setenv("FLEXOLMO_RUNS", str(tmp_path / "runs"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "CI mode" in text and "backend: cpu" in text
  assert "| flexolmo |" in text  # The results table was displayed.
  assert (tmp_path / "runs" / "results" / "results.json").exists()
