"""examples/gpt_from_scratch.ipynb runs top to bottom on a tiny budget and shows what it promises."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "gpt_from_scratch.ipynb"
PROBE = "PROBE "


def _tiny(corpus: Path, runs: Path) -> str:
    """Assignments appended to the cell tagged "parameters" (papermill's convention: later values win)."""
    return f"""
# tiny budget for the test suite
MAX_TIME, MAX_STEPS = None, 30
SOURCE, TEXT_PATH = "text", {str(corpus)!r}
BLOCK_SIZE, BATCH_SIZE = 16, 8
N_EMBD, N_LAYER, N_HEAD, D_FF, DROPOUT = 32, 1, 2, 64, 0.0
LR, VAL_EVERY, VAL_BATCHES, LOG_EVERY = 1e-2, 10, 2, 1
MAX_NEW_TOKENS = 8
RUN_DIR = {str(runs)!r}
"""


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1


def test_notebook_trains_plots_and_generates(corpus, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    params.source += "\n" + _tiny(corpus, tmp_path / "runs")
    # Read the notebook's own variables after its last cell: the logged losses, the drawn lines, the sample.
    probe = (
        "import json\n"
        "lines = {l.get_label(): len(l.get_xdata()) for l in ax.get_lines()}\n"
        f"print({PROBE!r} + json.dumps({{'steps': trainer.global_step, 'vocab': len(vocab), 'lines': lines,"
        " 'train': [v for _, v in curves['train_loss']], 'val': [v for _, v in curves['val_loss']], 'sample': sample}))"
    )
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    result = json.loads(out.split(PROBE, 1)[1])
    assert result["steps"] == 30
    train, val = result["train"], result["val"]
    assert len(train) == 30 and len(val) == 3 and all(math.isfinite(v) for v in train + val)
    # Learned something: the last losses are well below the first one and below a uniform guess's.
    assert min(train[0], math.log(result["vocab"])) > 2 * sum(train[-5:]) / 5
    assert result["lines"] == {"train_loss": 30, "val_loss": 3, "ln(vocabulary size)": 2}

    (plot,) = [cell for cell in nb.cells if "plt.show()" in cell.source]
    images = [o["data"]["image/png"] for o in plot.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    width, height = _png_size(base64.b64decode(images[0]))
    assert width > height > 100  # the 7 x 4 inch figure

    sample = result["sample"]
    assert sample.strip()
    (gen,) = [cell for cell in nb.cells if "sample = generate_text(" in cell.source]
    assert "".join(o.get("text", "") for o in gen.outputs) == f"the movie was | {sample}\n"
