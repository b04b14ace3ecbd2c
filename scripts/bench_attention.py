"""Causal attention on a CPU in bfloat16, in float32 and as matrix products, forward and backward, over a range
of sequence lengths.

    python scripts/bench_attention.py [--lengths 64 128 256 512 1024] [--tokens 4096] [--heads 2]
        [--head_size 80] [--rounds 15] [--json FILE]

Under `bf16-mixed` the queries, keys and values reach attention in bfloat16. Up to
`minigpt.model.CPU_SHORT_ATTENTION_MAX_KEYS` keys the model runs a whole block's causal attention (training
and its validation) as bfloat16 matrix products around a float32 softmax (`causal_matrix_attention`), and
other attention (padded prompts, generation's cache) in float32; beyond it, torch's kernel in bfloat16
(`minigpt.model.attention_way`). This script times what these choices are between, at each length:
`scaled_dot_product_attention(q, k, v, is_causal=True)` on bfloat16 tensors, the same on their float32 copies
(the casts timed with it, as the model pays them), and `causal_matrix_attention(q, k, v)`, each followed by
the backward pass into the bfloat16 tensors. Every length has the same tokens per batch (`--tokens`, 4,096 by
default; batch = tokens / length) and the recipe's heads; the three take turns, one call each per round, and
the table shows the median of `--rounds` rounds (after 3 of warm-up), each one's time over the bfloat16
kernel's and which one the model runs for a block's causal attention.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, as `python scripts/...` sees them
from quality_vs_minutes import machine  # noqa: E402

from minigpt.model import attention_way, causal_matrix_attention  # noqa: E402

WARMUP_ROUNDS = 3


CONTENDERS = {
    "bfloat16": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "float32": lambda q, k, v: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True),
    "matrix": causal_matrix_attention,
}


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, contender: str) -> float:
    """Seconds for causal attention over bfloat16 q, k, v the contender's way, and its backward pass."""
    start = time.perf_counter()
    y = CONTENDERS[contender](q, k, v)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - start


def model_runs(q: torch.Tensor, k: torch.Tensor) -> str:
    """Which contender the model runs for a whole block's causal attention over these bfloat16 queries and keys."""
    way = attention_way(q, k, is_causal=True)
    return "bfloat16" if way == "kernel" else way


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch at every length")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head_size", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    if min(args.lengths) < 1 or any(args.tokens % n for n in args.lengths):
        parser.error(f"every length must be at least 1 and divide --tokens {args.tokens}, got {args.lengths}")
    if min(args.heads, args.head_size, args.rounds) < 1:
        parser.error("--heads, --head_size and --rounds must be at least 1")
    torch.manual_seed(0)
    rows = []
    for length in args.lengths:
        shape = (args.tokens // length, args.heads, length, args.head_size)
        q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for round_ in range(WARMUP_ROUNDS + args.rounds):
            for name in times:
                seconds = attention_step(q, k, v, name)
                if round_ >= WARMUP_ROUNDS:
                    times[name].append(seconds)
        bf16, fp32, matrix = (1000 * statistics.median(times[name]) for name in CONTENDERS)
        rows.append({
            "length": length, "batch": shape[0], "bfloat16_ms": bf16, "float32_ms": fp32, "matrix_ms": matrix,
            "float32_of_bfloat16": fp32 / bf16, "matrix_of_bfloat16": matrix / bf16, "model_runs": model_runs(q, k),
        })  # fmt: skip
        print(f"length {length:5d} batch {shape[0]:4d}: bfloat16 {bf16:8.2f} ms  float32 {fp32:8.2f} ms "
              f"({fp32 / bf16:.2f}x)  matrix {matrix:8.2f} ms ({matrix / bf16:.2f}x)  "
              f"the model runs {rows[-1]['model_runs']}")  # fmt: skip
    report = {
        "machine": machine(), "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "heads": args.heads, "head_size": args.head_size, "tokens": args.tokens,
        "command": " ".join(["python", "scripts/bench_attention.py", *(sys.argv[1:] if argv is None else argv)]),
        "rows": rows,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
