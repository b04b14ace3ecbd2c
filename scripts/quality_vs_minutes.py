"""Test bits per character after a training budget, for the recommended recipe and the tutorial's.

    python scripts/quality_vs_minutes.py --archive aclImdb_v1.tar.gz [--recipes imdb seed]
        [--minutes 1 2 5 10 20 30] [--seeds 42 1 2] [--max_docs 1000] [--root runs/quality]
        [--out docs/quality_vs_minutes.png] [--json docs/quality_vs_minutes.json]

Each (recipe, budget, seed) is its own `minigpt fit --config RECIPE --trainer.max_time ...` run, one after
the other, so every run has the machine to itself and a recipe whose schedule follows its budget (imdb) ends
its decay at its own budget, as a user who trains for that long would. Each run's last checkpoint is scored
with `minigpt evaluate --split test` on `--max_docs` reviews spread evenly over the official test split; the
runs of the recommended recipe of 10 minutes (every seed) and longer are also scored on all 25,000 test reviews.

Budgets: the tutorial's recipe (`seed`) runs the budgets up to 10 minutes; the recommended one (`imdb`) runs
them all. Seeds other than the first run the 10-minute budget only (the spread of the headline number).

The JSON holds the machine, the date, and per run the optimizer steps, tokens trained on, tokens per second
of training time and the evaluations (bits per character, perplexity, share of `<unk>` targets). Run it on a
quiet machine: the minutes are wall-clock minutes of training, so anything else running costs steps.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"imdb": "the recommended recipe (configs/imdb.yaml)", "seed": "the tutorial's recipe (configs/seed.yaml)"}
TUTORIAL_MAX_MINUTES = 10  # the tutorial's recipe learns little more per minute; its budgets stop here
HEADLINE_MINUTES = 10  # the budget run with every seed; it and the longer ones are scored on the whole test split


def minigpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "minigpt", *args]


def run(cmd: list[str], log: Path) -> str:
    """Run a minigpt command; its stdout is returned, its stderr (all of it for `fit`) goes to `log`."""
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    return done.stdout


def max_time(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS for a budget in minutes."""
    seconds = round(minutes * 60)
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def scored_whole(recipe: str, minutes: float) -> bool:
    """Whether a run is also scored on all 25,000 test reviews: the recommended recipe's headline budget and
    the longer ones, whose numbers the docs quote."""
    return recipe == "imdb" and minutes >= HEADLINE_MINUTES


def score(ckpt: Path, folder: Path, split: str, max_docs: int) -> dict:
    """`minigpt evaluate --json` of a checkpoint on `max_docs` documents of a split (0: all of them)."""
    evaluate = minigpt("evaluate", "--json", "--ckpt_path", str(ckpt), "--split", split)
    if max_docs:
        evaluate += ["--max_docs", str(max_docs)]
    return json.loads(run(evaluate, folder / f"evaluate_{split}_{max_docs or 'all'}.log"))


def train(fit: list[str], folder: Path, seconds: float) -> tuple[Path, dict]:
    """Run `fit` with its runs under `folder`; return its last checkpoint and what it trained."""
    from minigpt.checkpoint import data_settings, read_checkpoint

    shutil.rmtree(folder / "lightning_logs", ignore_errors=True)  # a stale run would become version_0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fit.log").write_text(run([*fit, "--trainer.default_root_dir", str(folder)], folder / "fit.err"))
    ckpt = folder / "lightning_logs/version_0/checkpoints/last.ckpt"
    checkpoint = read_checkpoint(ckpt)
    data = data_settings(checkpoint)
    steps = int(checkpoint["global_step"])
    tokens = steps * int(data["batch_size"]) * int(data["block_size"])  # packed/random blocks: no padding
    return ckpt, {"steps": steps, "tokens": tokens, "tokens_per_s": tokens / seconds}


def config_digests(command: list[str]) -> dict[str, str]:
    """SHA-256 of each `--config` file the command reads: the same command on an edited config is another run."""
    from minigpt.configs import recipe_path

    return {
        path: hashlib.sha256(Path(recipe_path(path)).read_bytes()).hexdigest()
        for flag, path in zip(command, command[1:])
        if flag == "--config"
    }


def kept_or_run(folder: Path, key: dict, work) -> dict:
    """The row a finished run left in `folder` when it ran the same `key` (command, configs, scoring), else
    `work()`'s row, saved: re-running a script after an interruption only does what is missing."""
    done = folder / "row.json"
    kept = json.loads(done.read_text()) if done.is_file() else {}
    if {k: kept.get(k) for k in key} != key:
        kept = {**key, **work()}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(kept))
    return {k: v for k, v in kept.items() if k not in key}


def machine() -> str:
    """The CPU's model name and core count (Linux), for the JSON."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags"))
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        bf16 = ", AVX512-BF16" if "avx512_bf16" in flags else ""
        return f"{name}, {cpuinfo.count('processor')} cores, {vector}{bf16}"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def plot(results: dict[str, list[dict]], out: Path, max_docs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in results.items():
        rows = [r for r in rows if r["seed"] == rows[0]["seed"]]  # the curve of the first seed
        minutes = [r["minutes"] for r in rows]
        bpc = [r["test"]["bits_per_character"] for r in rows]
        ax.plot(minutes, bpc, marker="o", label=RECIPES.get(name, name))
        ax.annotate(f"{bpc[-1]:.3f}", (minutes[-1], bpc[-1]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ticks = sorted({r["minutes"] for rows in results.values() for r in rows})
    ax.set_xticks(ticks, [f"{m:g}" for m in ticks])
    ax.set_xlabel("training minutes (one run per budget)")
    scope = "all 25,000 test reviews" if not max_docs else f"{max_docs:,} test reviews spread evenly"
    ax.set_ylabel(f"test bits per character\n({scope})")
    ax.set_title("IMDB: quality after a training budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="aclImdb_v1.tar.gz (the official test split is scored)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10, 20, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="the first draws every curve")
    parser.add_argument("--max_docs", type=int, default=1000, help="test reviews scored per run (0: all)")
    parser.add_argument("--root", default="runs/quality_vs_minutes", help="folder for the runs")
    parser.add_argument("--out", default=str(ROOT / "docs/quality_vs_minutes.png"))
    parser.add_argument("--json", default=str(ROOT / "docs/quality_vs_minutes.json"))
    args = parser.parse_args(argv)
    if not Path(args.archive).is_file():
        parser.error(f"--archive {args.archive} is not a file; pass the path of aclImdb_v1.tar.gz")
    if any(m <= 0 for m in args.minutes):
        parser.error("--minutes must be positive numbers of minutes")

    report = {"machine": machine(), "date": datetime.date.today().isoformat(), "max_docs": args.max_docs,
              "command": " ".join(["python", "scripts/quality_vs_minutes.py", *(argv or sys.argv[1:])]),
              "results": {}}  # fmt: skip
    for name in args.recipes:
        for minutes in sorted(args.minutes):
            if name == "seed" and minutes > TUTORIAL_MAX_MINUTES:
                continue
            headline = name == "imdb" and minutes == HEADLINE_MINUTES
            for seed in args.seeds if headline else args.seeds[:1]:
                folder = Path(args.root) / name / f"{minutes:g}min" / f"seed{seed}"
                fit = minigpt("fit", "--config", name, "--data.archive", args.archive, "--seed_everything",
                              str(seed), "--trainer.max_time", max_time(minutes))  # fmt: skip
                key = {"command": fit[1:], "configs": config_digests(fit), "max_docs": args.max_docs,
                       "headline": headline}  # fmt: skip

                def work() -> dict:
                    ckpt, row = train(fit, folder, minutes * 60)
                    row["test"] = score(ckpt, folder, "test", args.max_docs)
                    if scored_whole(name, minutes):  # (already the whole split when --max_docs 0)
                        row["test_all"] = score(ckpt, folder, "test", 0) if args.max_docs else row["test"]
                    return row

                start = time.time()
                row = {"minutes": minutes, "seed": seed, **kept_or_run(folder, key, work)}
                report["results"].setdefault(name, []).append(row)
                whole = f"  all test {row['test_all']['bits_per_character']:.4f}" if "test_all" in row else ""
                print(f"{name:5s} {minutes:>4g} min seed {seed:>3}: {row['steps']:>6,} steps  {row['tokens']:>10,} "
                      f"tokens  {row['tokens_per_s']:>7,.0f} tok/s  test {row['test']['bits_per_character']:.4f} "
                      f"bits/char{whole}  ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
                Path(args.json).write_text(json.dumps(report, indent=1))
    plot(report["results"], Path(args.out), args.max_docs)
    print(f"wrote {args.out} and {args.json}")
    return report


if __name__ == "__main__":
    main()
