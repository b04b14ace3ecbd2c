"""Greedy decoding speed: minigpt (KV cache) vs the tutorial's loop vs Hugging Face GPT-2, side by side.

    python scripts/bench_generate.py [--new_tokens 200] [--repeats 3] [--preset seed|gpt2] [--json]

Batch 1, a 10-token prompt, 200 new tokens, on a model of width 200, 2 layers, 2 heads, a vocabulary of
100,000 and a block of 256 (randomly initialised: speed does not depend on the weights):

- minigpt: `generate(model, ..., temperature=0)` with its KV cache;
- tutorial loop: the same model and call with `use_cache=False` (a full forward over the window per
  token, what the PyTorch tutorial's generation does);
- Hugging Face: `GPT2LMHeadModel.generate(do_sample=False)` with its cache, on a GPT-2 of the same size,
  end-of-text disabled so it runs all 200 steps.

At this size one token costs about one read of the 100,000 x 200 output matrix, so the script also
times that matrix-vector product alone (median of many) and reports generation against it. Each row
is the median of `--repeats` timed runs (after one warm-up run, except for the slow recompute loop).
The contenders take turns, so that load from other processes (the script prints the load average)
hits them alike. Times cover the whole `generate` call (prefill, and the head copy minigpt makes,
included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minigpt.config import GPTConfig
from minigpt.generation import DecodeHead, generate
from minigpt.model import GPT

VOCAB, WIDTH, LAYERS, HEADS, BLOCK, PROMPT = 100_000, 200, 2, 2, 256, 10


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_minigpt(preset: str) -> GPT:
    if preset == "gpt2":  # the architecture of the Hugging Face model below
        config = GPTConfig.gpt2(VOCAB, BLOCK, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS)
    else:  # the tutorial's model (post-norm, ReLU MLP of 2048, untied head with bias)
        config = GPTConfig.seed(VOCAB, BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH)
    return GPT(config).eval()


def head_products(model: GPT, repeats: int) -> dict[str, float]:
    """Seconds (median) of one head matrix-vector product per layout, and of one plain read of it."""
    weight = model.lm_head.weight.detach()  # (V, C)
    h = torch.randn(1, weight.size(1))
    transposed = weight.t().contiguous()  # (C, V)
    with torch.inference_mode():
        split = DecodeHead(model, 1)
        return {
            "F.linear(h, W), W (V, C) row-major": median_seconds(lambda: F.linear(h, weight), repeats, 10),
            "h @ W.T, contiguous (C, V) copy": median_seconds(lambda: h @ transposed, repeats, 10),
            "minigpt generation head (2 x (C, V/2) bmm)": median_seconds(lambda: split(h), repeats, 10),
            "read W once (W.sum(), bandwidth floor)": median_seconds(lambda: weight.sum(), repeats, 10),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender, >= 1 (median)")
    parser.add_argument("--head_repeats", type=int, default=200, help="timed head products (median)")
    parser.add_argument("--preset", choices=("seed", "gpt2"), default="seed", help="minigpt's architecture")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = parser.parse_args()
    n = args.new_tokens

    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model = build_minigpt(args.preset)
    prompt = torch.randint(3, VOCAB, (PROMPT,)).tolist()

    def minigpt_run(use_cache: bool) -> list[int]:
        (result,) = generate(model, prompt, max_new_tokens=n, temperature=0, stop_ids=None, use_cache=use_cache)
        return result.tokens

    minigpt_run(True)  # warm-up (and the head copy minigpt keeps per model)
    t0 = time.perf_counter()
    cached = minigpt_run(True)
    t1 = time.perf_counter()
    naive = minigpt_run(False)  # the recompute loop is slow: its first run is timed, not a warm-up
    first = {"minigpt (KV cache)": t1 - t0, "tutorial loop (recompute)": time.perf_counter() - t1}
    if cached != naive:
        raise SystemExit("KV-cache and recompute loops disagree: the benchmark would compare different work")

    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(
        GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=BLOCK)
    ).eval()
    hf.generation_config.eos_token_id = None  # never stop early: all runs do n steps
    hf.generation_config.pad_token_id = 0
    hf_ids = torch.tensor([prompt])

    def hf_run() -> None:
        with torch.inference_mode():
            out = hf.generate(
                hf_ids, attention_mask=torch.ones_like(hf_ids), do_sample=False, max_new_tokens=n,
                min_new_tokens=n, use_cache=True,
            )  # fmt: skip
        assert out.size(1) == PROMPT + n

    # Round robin (one run of each, repeated) so that a burst of load from other processes on the machine
    # hits every contender alike; the runs above are the first round.
    runs = {
        "minigpt (KV cache)": lambda: minigpt_run(True),
        "tutorial loop (recompute)": lambda: minigpt_run(False),
        "HF GPT2LMHeadModel.generate": hf_run,
    }
    hf_run()  # warm-up
    t0 = time.perf_counter()
    hf_run()
    first["HF GPT2LMHeadModel.generate"] = time.perf_counter() - t0
    times = {name: [t] for name, t in first.items()}
    for _ in range(args.repeats - 1):
        for name, run in runs.items():
            times[name].append(median_seconds(run, 1, warmup=0))
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    heads = head_products(model, args.head_repeats)
    head_bound = min(t for name, t in heads.items() if not name.startswith("read"))

    print(
        f"greedy decoding, batch 1, {PROMPT}-token prompt, {n} new tokens; width {WIDTH}, {LAYERS} layers, "
        f"{HEADS} heads, vocab {VOCAB:,}, block {BLOCK}; minigpt preset {args.preset!r}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    print(f"{'':44} {'tokens/s':>10} {'ms/token':>10} {'minigpt is':>11}")
    base = seconds["minigpt (KV cache)"]
    for name, t in seconds.items():
        print(f"{name:44} {n / t:>10.1f} {1e3 * t / n:>10.3f} {t / base:>10.2f}x")
    print(f"head matrix-vector product alone ({VOCAB:,} x {WIDTH}), median of {args.head_repeats}:")
    for name, t in heads.items():
        print(f"  {name:42} {1 / t:>10.1f} {1e3 * t:>10.3f}")
    tok_s = {name: n / t for name, t in seconds.items()}
    summary = {
        "minigpt_tok_s": round(tok_s["minigpt (KV cache)"], 2),
        "tutorial_loop_tok_s": round(tok_s["tutorial loop (recompute)"], 2),
        "hf_generate_tok_s": round(tok_s["HF GPT2LMHeadModel.generate"], 2),
        "head_bound_tok_s": round(1 / head_bound, 2),
        "vs_tutorial": round(seconds["tutorial loop (recompute)"] / base, 2),
        "vs_hf": round(seconds["HF GPT2LMHeadModel.generate"] / base, 2),
    }
    print(
        f"vs_tutorial {summary['vs_tutorial']:.2f}x   vs_hf {summary['vs_hf']:.2f}x   "
        f"minigpt reaches {summary['minigpt_tok_s'] / summary['head_bound_tok_s']:.0%} of the head bound"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
