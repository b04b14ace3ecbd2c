"""Test bits per character after 1, 2, 5 and 10 minutes of training, for three recipes (issue 15).

    python scripts/quality_vs_minutes.py --archive aclImdb_v1.tar.gz [--minutes 1 2 5 10] [--max_docs 1000]
        [--root runs/quality] [--out docs/quality_vs_minutes.png] [--json docs/quality_vs_minutes.json]

Each (recipe, budget) pair is its own `minigpt fit ... --trainer.max_time` run, one after the other, so
every run has the machine to itself and a recipe whose schedule follows its budget (imdb.yaml) ends its
decay at its own budget, as a user who trains for that long would. Each run's last checkpoint is then
scored with `minigpt evaluate --split test` on `--max_docs` reviews spread evenly over the official test
split (all 25,000 with `--max_docs 0`, which takes much longer for the tutorial's 100,000-word linear head).

Recipes:
- tutorial: `configs/seed.yaml`, the PyTorch tutorial's model and training loop (batch 1, block 30);
- previous: the recipe `configs/imdb.yaml` held before issue 15 (issue 8's, with the budget-following
  schedule), written here as overrides of today's imdb.yaml;
- imdb.yaml: today's recommended recipe.

The JSON holds, per run, the optimizer steps, tokens trained on, tokens per second of training time and
the evaluation (bits per character, perplexity, share of `<unk>` targets). Run it on a quiet machine: the
minutes are wall-clock minutes of training, so anything else running costs steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPES: dict[str, list[str]] = {
    "tutorial (seed.yaml)": ["--config", str(ROOT / "configs/seed.yaml")],
    "previous recipe": [
        "--config", str(ROOT / "configs/imdb.yaml"),
        "--model.config.n_embd", "200", "--model.config.n_layer", "2", "--model.config.n_head", "2",
        "--model.config.d_ff", "800", "--model.config.scale_embedding", "false",
        "--model.config.tie_weights", "false", "--model.config.adaptive_cutoffs", "[2000, 10000]",
        "--model.config.adaptive_div_value", "4.0", "--model.lr", "0.004", "--model.min_lr", "0.0004",
        "--model.warmup_steps", "100", "--data.batch_size", "64", "--data.block_size", "64",
        "--model.optimizer", "adamw", "--data.min_freq", "1",
    ],
    "imdb.yaml": ["--config", str(ROOT / "configs/imdb.yaml")],
}  # fmt: skip


def run(cmd: list[str], log: Path) -> str:
    """Run a minigpt command; its stdout is returned, its stderr (all of it for `fit`) goes to `log`."""
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return done.stdout


def train_and_score(fit: list[str], seconds: int, folder: Path, max_docs: int) -> dict:
    from minigpt.checkpoint import data_settings, read_checkpoint

    shutil.rmtree(folder / "lightning_logs", ignore_errors=True)  # a stale run would become version_0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fit.log").write_text(run(fit, folder / "fit.err"))
    ckpt = folder / "lightning_logs/version_0/checkpoints/last.ckpt"
    evaluate = [sys.executable, "-m", "minigpt", "evaluate", "--json", "--ckpt_path", str(ckpt), "--split", "test"]
    if max_docs:
        evaluate += ["--max_docs", str(max_docs)]
    scores = json.loads(run(evaluate, folder / "evaluate.log"))
    checkpoint = read_checkpoint(ckpt)
    data = data_settings(checkpoint)
    steps = int(checkpoint["global_step"])
    tokens = steps * int(data["batch_size"]) * int(data["block_size"])  # packed/random blocks: no padding
    return {"steps": steps, "tokens": tokens, "tokens_per_s": tokens / seconds, "test": scores}


def config_digests(command: list[str]) -> dict[str, str]:
    """SHA-256 of each `--config` file the command reads: the same command on an edited config is another run."""
    return {
        path: hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for flag, path in zip(command, command[1:])
        if flag == "--config"
    }


def plot(results: dict[str, list[dict]], out: Path, max_docs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in results.items():
        minutes = [r["minutes"] for r in rows]
        bpc = [r["test"]["bits_per_character"] for r in rows]
        ax.plot(minutes, bpc, marker="o", label=name)
        ax.annotate(f"{bpc[-1]:.3f}", (minutes[-1], bpc[-1]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ticks = sorted({r["minutes"] for rows in results.values() for r in rows})
    ax.set_xticks(ticks, [f"{m:g}" for m in ticks])
    ax.set_xlabel("training minutes (2-core CPU, one run per budget)")
    scope = "all 25,000 test reviews" if not max_docs else f"{max_docs:,} test reviews spread evenly"
    ax.set_ylabel(f"test bits per character\n({scope})")
    ax.set_title("IMDB: quality after a training budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="aclImdb_v1.tar.gz (the official test split is scored)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--max_docs", type=int, default=1000, help="test reviews scored per run (0: all)")
    parser.add_argument("--root", default="runs/quality_vs_minutes", help="folder for the runs")
    parser.add_argument("--out", default=str(ROOT / "docs/quality_vs_minutes.png"))
    parser.add_argument("--json", default=str(ROOT / "docs/quality_vs_minutes.json"))
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        parser.error(f"--archive {args.archive} is not a file; pass the path of aclImdb_v1.tar.gz")
    if any(m <= 0 for m in args.minutes):
        parser.error("--minutes must be positive numbers of minutes")

    results: dict[str, list[dict]] = {}
    for name in args.recipes:
        for minutes in sorted(args.minutes):
            folder = Path(args.root) / name.split()[0] / f"{minutes:g}min"
            seconds = round(minutes * 60)
            max_time = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
            fit = [sys.executable, "-m", "minigpt", "fit", *RECIPES[name], "--data.archive", args.archive,
                   "--trainer.max_time", max_time, "--trainer.default_root_dir", str(folder)]  # fmt: skip
            start, done = time.time(), folder / "row.json"
            # A finished run is kept when it ran the same command on the same config files and was scored
            # the same way: re-running the script after an interruption only does what is missing.
            key = {"command": fit[1:], "configs": config_digests(fit), "max_docs": args.max_docs}
            kept = json.loads(done.read_text()) if done.is_file() else {}
            if {k: kept.get(k) for k in key} != key:
                kept = {**key, "minutes": minutes, **train_and_score(fit, seconds, folder, args.max_docs)}
                done.write_text(json.dumps(kept))
            row = {k: v for k, v in kept.items() if k not in key}
            results.setdefault(name, []).append(row)
            print(f"{name:22s} {minutes:>4g} min: {row['steps']:>6,} steps  {row['tokens']:>10,} tokens  "
                  f"{row['tokens_per_s']:>7,.0f} tok/s  test {row['test']['bits_per_character']:.4f} bits/char  "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
            Path(args.json).write_text(json.dumps({"max_docs": args.max_docs, "results": results}, indent=1))
    plot(results, Path(args.out), args.max_docs)
    print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    main()
