"""Data preparation at scale: ``minigpt prepare --data.source text`` on K copies of the IMDB train reviews.

    python scripts/bench_data.py --scale 20 [--archive aclImdb_v1.tar.gz] [--json]

Writes K files, each the 25,000 IMDB train reviews (bundled copy, or the archive's) with one
fresh word per review per copy, so the vocabulary grows with K as a real corpus's does. Then,
side by side on the same files:

1. ``minigpt prepare --data.source text`` in a subprocess: wall time, MB/s, the main process's
   peak RSS (VmHWM), and the peak total memory of the process and its workers (PSS, sampled,
   so pages the forked workers share are counted once);
2. the one-process reference: read each file, ``re.findall`` words, count them in a ``Counter``;
3. the cached start: ``prepare_corpus`` on the entry (1) wrote, in a fresh process.

Needs Linux (/proc) for the memory figures. Disk: about K x 33 MB of text plus the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def write_corpus(folder: Path, scale: int, archive: str | None) -> int:
    from minigpt.data.sources import read_bundled, read_imdb

    docs = read_imdb(archive, ("train",))["train"] if archive else read_bundled()
    for k in range(scale):
        with open(folder / f"copy{k:03d}.txt", "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(f"{d.text} zq{k}x{i}\n\n")
    return sum(p.stat().st_size for p in folder.iterdir())


def _status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return 0


def _tree_pss(pid: int) -> int:
    """Proportional set size of a process and its children (shared pages counted once in total)."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def run_prepare(text_dir: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "minigpt.cli", "prepare", "--data.source", "text"]
    cmd += ["--data.text_path", str(text_dir), "--data.cache_dir", str(cache), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm = pss = 0
    while proc.poll() is None:
        hwm = max(hwm, _status(proc.pid, "VmHWM:"))
        pss = max(pss, _tree_pss(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"minigpt prepare failed:\n{err}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"seconds": seconds, "main_peak_rss": hwm, "total_peak_pss": pss, "summary": summary, "log": err.strip()}


def reference_pass(text_dir: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    word = re.compile(r"\w+|[^\w\s]")
    counter: Counter = Counter()
    for path in sorted(text_dir.iterdir()):
        counter.update(word.findall(path.read_text(encoding="utf-8").lower()))
    return time.perf_counter() - t0, len(counter)


def tokenizer_routes(path: Path) -> dict[str, float]:
    """One file, one process: basic_english + Counter vs the Rust `tokenizers` pipeline with the same rules.

    The evidence behind the choice of tokenizer route (see minigpt/data/build.py): the Rust
    normalisers (Lowercase + the literal Replace rules) and WhitespaceSplit, counting words with a
    WordLevelTrainer and encoding with encode_batch_fast, on all threads.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from minigpt.tokenizer import BASIC_ENGLISH_REPLACEMENTS, UNK, basic_english

    texts = path.read_text(encoding="utf-8").split("\n\n")
    t0 = time.perf_counter()
    counter: Counter = Counter()
    for text in texts:
        counter.update(basic_english(text))
    python_s = time.perf_counter() - t0
    tok = Tokenizer(models.WordLevel(vocab={UNK: 0}, unk_token=UNK))
    rules = [normalizers.Replace(old, new) for old, new in BASIC_ENGLISH_REPLACEMENTS]
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rules])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t0 = time.perf_counter()
    tok.train_from_iterator(iter(texts), trainers.WordLevelTrainer(vocab_size=1 << 40, show_progress=False))
    rust_count_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode_batch_fast(texts, add_special_tokens=False)
    rust_encode_s = time.perf_counter() - t0
    return {"python_count_s": python_s, "rust_count_s": rust_count_s, "rust_encode_s": rust_encode_s}


def cached_start(text_dir: Path, cache: Path) -> float:
    code = (
        "import sys, time\nfrom minigpt.data.corpus import prepare_corpus\n"
        "from minigpt.data.documents import CorpusSpec\n"
        "t0 = time.perf_counter()\nprepare_corpus(CorpusSpec(source='text', text_path=sys.argv[1]), sys.argv[2])\n"
        "print(time.perf_counter() - t0)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(text_dir), str(cache)], capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=1, help="K: copies of the 25,000 train reviews")
    p.add_argument("--archive", default=None, help="read the reviews from aclImdb_v1.tar.gz (default: bundled)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary folder, removed at the end)")
    p.add_argument("--rust", action="store_true", help="also time the Rust tokenizers route on one copy")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_data-"))
    text_dir, cache = work / "text", work / "cache"
    text_dir.mkdir(parents=True, exist_ok=True)
    try:
        size = write_corpus(text_dir, args.scale, args.archive)
        mine = run_prepare(text_dir, cache)  # first, while this process is small (children inherit ru_maxrss)
        ref_s, ref_words = reference_pass(text_dir)
        cached_s = cached_start(text_dir, cache)
        routes = tokenizer_routes(text_dir / "copy000.txt") if args.rust else None
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    mb = size / 1e6
    result = {
        "scale": args.scale,
        "megabytes": round(mb, 1),
        "cores": len(os.sched_getaffinity(0)),
        "prepare_s": round(mine["seconds"], 2),
        "prepare_mb_s": round(mb / mine["seconds"], 1),
        "main_peak_rss_gb": round(mine["main_peak_rss"] / 1e9, 3),
        "total_peak_pss_gb": round(mine["total_peak_pss"] / 1e9, 3),
        "vocab_size": mine["summary"]["vocab_size"],
        "reference_s": round(ref_s, 2),
        "reference_mb_s": round(mb / ref_s, 1),
        "reference_words": ref_words,
        "speedup_vs_reference": round(ref_s / mine["seconds"], 2),
        "cached_start_s": round(cached_s, 3),
    }
    print(next((line for line in mine["log"].splitlines() if "prepared" in line), ""))
    print(f"{'':34}{'seconds':>9}{'MB/s':>8}{'peak memory':>14}{'vocabulary':>12}")
    print(
        f"{'minigpt prepare (subprocess)':34}{result['prepare_s']:9.1f}{result['prepare_mb_s']:8.1f}"
        f"{result['total_peak_pss_gb']:11.2f} GB{result['vocab_size']:12,}"
    )
    print(f"{'re.findall + Counter (1 process)':34}{result['reference_s']:9.1f}{result['reference_mb_s']:8.1f}")
    print(
        f"{mb:,.0f} MB, K={args.scale}, {result['cores']} cores: minigpt is {result['speedup_vs_reference']:.2f}x "
        f"the reference; main process peak RSS {result['main_peak_rss_gb']:.2f} GB; "
        f"cached start {result['cached_start_s']:.2f} s"
    )
    if routes:
        result.update({k: round(v, 2) for k, v in routes.items()})
        print(
            "one copy, one process: basic_english + Counter {python_count_s:.2f} s; Rust pipeline: count (WordLevel"
            "Trainer) {rust_count_s:.2f} s, encode_batch_fast {rust_encode_s:.2f} s".format(**routes)
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
