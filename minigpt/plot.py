"""Loss curves of a run from its TensorBoard files: the picture the tutorial draws at the end."""

from __future__ import annotations

from pathlib import Path

from minigpt.errors import UserError


def latest_run(root: str | Path = "lightning_logs") -> Path:
    runs = sorted(Path(root).glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not runs:
        raise UserError(f"no runs under {root}/version_*; pass a run folder (ROOT/lightning_logs/version_N) or --root")
    return runs[-1]


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file of a run (a resumed run's files merged by step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not list(run_dir.glob("events.out.tfevents.*")):
        raise UserError(f"{run_dir} holds no TensorBoard event files; pass a run folder (lightning_logs/version_N)")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # the latest write of a step wins
        out[tag] = sorted(by_step.items())
    return out


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write a PNG with train/val loss (left) and validation perplexity (right)."""
    import matplotlib.pyplot as plt

    fig = loss_figure(read_scalars(run_dir), title=str(Path(run_dir)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def loss_figure(scalars: dict[str, list[tuple[int, float]]], title: str = ""):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    curves = {tag: scalars[tag] for tag in ("train_loss", "val_loss") if scalars.get(tag)}
    if not curves:
        raise UserError(f"{title or 'the run'} has no train_loss or val_loss scalars to plot")
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for tag, points in curves.items():
        steps, values = zip(*points)
        ax_loss.plot(steps, values, label=tag, marker="o" if tag == "val_loss" else None, markersize=3)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if scalars.get("val_ppl"):
        steps, values = zip(*scalars["val_ppl"])
        ax_ppl.plot(steps, values, marker="o", markersize=3, color="C1", label="val_ppl")
        ax_ppl.set_yscale("log" if max(values) / max(min(values), 1e-9) > 10 else "linear")
        ax_ppl.legend()
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="validation perplexity")
    ax_ppl.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
