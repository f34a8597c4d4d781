"""The Colab notebook: valid, every code cell parses, saved with the outputs of a CPU run in CI
mode (so it renders on GitHub), and (slow) it still executes end to end on CPU with the tiny demo
(FLEXOLMO_NOTEBOOK_CI=1 skips installing and shrinks the run).

To refresh the saved outputs, from the repository root:
  FLEXOLMO_NOTEBOOK_CI=1 python -c 'import nbclient, nbformat; p = "notebooks/flexolmo_demo.ipynb"; \
nb = nbformat.read(p, 4); nbclient.NotebookClient(nb, timeout=3600).execute(); nbformat.write(nb, p)'
"""

import ast
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "flexolmo_demo.ipynb"


def _text(cells) -> str:
  return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for c in cells if c.cell_type == "code" for o in c.outputs)


def _images(cells) -> int:
  return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code"
             for o in c.outputs)


def test_notebook_is_valid_and_its_code_parses():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  sources = [c.source for c in nb.cells if c.cell_type == "code"]
  for source in sources:
    ast.parse(source)  # Plain Python (no shell magics), so CI can run every cell.
  assert any("FLEXOLMO_NOTEBOOK_CI" in s for s in sources)
  assert any("flexolmo_jax.reproduce" in s for s in sources)
  # A Colab form field holds the repository URL; the runtime comes from JAX's own device list.
  assert any('REPO_URL = "https://' in s and '# @param {type:"string"}' in s for s in sources)
  assert any("jax.devices()" in s for s in sources[:1])
  assert not any("COLAB_TPU_ADDR" in s for s in sources)


def test_notebook_is_saved_with_the_outputs_of_a_ci_run():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs for c in code), "a code cell has no saved output"
  assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
  text = _text(nb.cells)
  assert "CI mode" in text and "backend: cpu" in text and "| flexolmo |" in text
  assert "without math" in text and "policy 'public-only'" in text
  assert _images(nb.cells) >= 2  # the loss curves and the routing heatmap


@pytest.mark.slow
def test_notebook_runs_the_tiny_demo(tmp_path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("FLEXOLMO_NOTEBOOK_CI", "1")
  monkeypatch.setenv("FLEXOLMO_RUNS", str(tmp_path / "runs"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []  # Only what this run prints counts below.
  nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  text = _text(nb.cells)
  assert "CI mode" in text and "backend: cpu" in text
  assert "| flexolmo |" in text  # The results table was displayed.
  assert (tmp_path / "runs" / "results" / "results.json").exists()
  assert "without math" in text and "without news" in text  # each expert opted out in turn
  assert "policy 'public-only'" in text
  assert _images(nb.cells) >= 2
