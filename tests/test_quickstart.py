"""examples/quickstart.ipynb runs top to bottom in a fresh kernel and shows its pictures."""

import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "cache"))  # the kernel inherits it: a fresh toy conversion
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 5, len(pictures)  # regions, knockout curve, lens, attention per layer, patch sweep
    text = "".join(o.get("text", "") for o in outputs)
    assert "gold:" in text and "largest drop" in text
