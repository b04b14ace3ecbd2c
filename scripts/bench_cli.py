"""Start-up wall times of the `minigpt` command (a benchmark, not a test).

Each command runs as a fresh process, as a user types it: `minigpt --help`, `minigpt prepare` on
data already in the cache, and `minigpt generate` of a few tokens from a tiny checkpoint (trained
first, not timed). The median of --repeats runs is reported, with the modules each run imported.

    python scripts/bench_cli.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINIGPT = [sys.executable, "-m", "minigpt.cli"]
HEAVY = ("lightning", "transformers")
# Runs a command in-process, then prints which heavy packages it imported.
PROBE = (
    "import sys; from minigpt.cli import main; main(sys.argv[1:]); "
    f"print('imported:', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), file=sys.stderr)"
)


def _corpus(path: Path) -> Path:
    words = "the movie was great bad plot actor film really good story not very boring fun".split()
    docs = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12 + i % 5 * 4)) for i in range(60)]
    path.write_text("\n\n".join(docs))
    return path


def _time(args: list[str], env: dict, repeats: int) -> dict:
    times, imported = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"minigpt {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        imported = next((ln for ln in done.stderr.splitlines() if ln.startswith("imported:")), "")
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "imports": imported[10:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MINIGPT_CACHE": str(tmp / "cache")}
        data = ["--data.source", "text", "--data.text_path", str(_corpus(tmp / "corpus.txt"))]
        fit = [*MINIGPT, "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *data, "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp)]  # fmt: skip
        subprocess.run(fit, env=env, check=True, capture_output=True)  # the checkpoint and a warm data cache
        ckpt = str(tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
        rows = {
            "--help": _time(["--help"], env, a.repeats),
            "prepare (cached)": _time(["prepare", *data], env, a.repeats),
            "generate (tiny checkpoint, 8 tokens)": _time(
                ["generate", "--ckpt_path", ckpt, "--prompt", "the movie was", "--max_new_tokens", "8"], env, a.repeats
            ),
        }
    if a.json:
        print(json.dumps(rows))
        return
    print(f"{'command':40}{'median s':>10}{'min s':>8}   heavy imports")
    for name, r in rows.items():
        print(f"{name:40}{r['median_s']:10.3f}{r['min_s']:8.3f}   {r['imports']}")


if __name__ == "__main__":
    main()
