"""``minigpt plot``: a run's train/validation loss curves from its TensorBoard files, as a PNG."""

from __future__ import annotations

from pathlib import Path

from minigpt.errors import UserError


def add_arguments(parser, argv: list[str]) -> set[str]:
    parser.add_argument(
        "run_dir", nargs="?", default=None,
        help="a run folder, ROOT/lightning_logs/version_N (default: the newest under --root)",
    )  # fmt: skip
    return {"run_dir"}


def plot(run_dir: str | None = None, root: str = ".", out: str = "losses.png") -> None:
    """Draw a run's loss curves into a PNG.

    Args:
        run_dir: the run folder (positional).
        root: the folder runs live under, as ``--trainer.default_root_dir`` of ``minigpt fit``.
        out: PNG file to write.
    """
    from minigpt.plot import latest_run, plot_run

    folder = Path(run_dir) if run_dir else latest_run(Path(root) / "lightning_logs")
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist")
    print(plot_run(folder, out))
