"""Greedy decoding speed: minigpt against the tutorial's loop, a nanoGPT-style loop and Hugging Face.

    python scripts/bench_generate.py [--new_tokens 200] [--repeats 5] [--device cpu|cuda] [--quick] [--json]

Every contender runs the SAME function: a GPT-2-flavoured minigpt model (width 200, 2 layers, 2 heads,
a vocabulary of 100,000, block 256, randomly initialised: speed does not depend on the weights) and
its exact Hugging Face copy (`minigpt.convert.minigpt_to_gpt2`). Each gets the same 10-token prompt and
makes the same number of new tokens (end-of-text never stops a run):

- minigpt: `generate(model, prompt, SamplingConfig.greedy(n), stop_ids=None)`, KV cache, head and trunk
  "auto"; and the same with each trunk forced (`minigpt.kernels.decode_step`): "plain" (the reference,
  `GPT.hidden_states` on torch's threads), "one_thread", "lean" (fewer ops) and "lean_one_thread";
- tutorial loop: what the PyTorch tutorial's generation does, a full forward over the cropped window
  per token with the head over every position (`model(window)[:, -1].argmax()`);
- recompute, last position: nanoGPT's `generate` (full trunk over the window, the head over the last
  position only);
- HF generate: `GPT2LMHeadModel.generate(do_sample=False)` with its cache;
- HF loop: a bare cached loop, `model(input_ids, past_key_values=past)` and an argmax per token.

Costs minigpt pays once per weight version or model (the packed head copy, the one-time measurements
that choose the head, the trunk and the greedy pick) are timed in a separate "cold" row: the first
call after `reset_decode_heads()` and `reset_decode_steps()`. The warm rows are the median of `--repeats` runs;
contenders take turns (round robin) so that load from other processes hits them alike. The bound is
one read of the output matrix per token with plain torch (`W.sum()` run once per token, in the same
round robin): a token can hardly cost less than reading W once; `of_bound` is minigpt's rate over the
bound's (`plain_of_bound` the same for trunk "plain"). More per-token rows time the head alone, plain
(`F.linear`) and packed (`minigpt.kernels.decode_head.PackedHead`), and the greedy pick alone, plain
(`argmax`) and chunked (`minigpt.kernels.decode_step.chunked_argmax`): they show where each fast path wins.
On CUDA every timer synchronises the device. Batches of 8 and 32 prompts are timed for minigpt and
HF generate (tokens/s counts every row's tokens).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from minigpt.config import GPTConfig
from minigpt.convert import minigpt_to_gpt2
from minigpt.generation import SamplingConfig, generate
from minigpt.kernels.decode_head import PackedHead, decode_head, decode_head_cache_size, reset_decode_heads
from minigpt.kernels.decode_step import (
    decode_step_cache_size,
    greedy_pick,
    reset_decode_steps,
    resolve_pick,
    resolve_trunk,
)
from minigpt.model import GPT

VOCAB, WIDTH, LAYERS, HEADS, BLOCK, PROMPT = 100_000, 200, 2, 2, 256, 10
BATCHES = (8, 32)
QUICK = dict(VOCAB=64, WIDTH=16, LAYERS=1, HEADS=2, BLOCK=16, PROMPT=4)  # --quick: a smoke run in seconds

Run = Callable[[list[list[int]]], list[list[int]]]  # prompts -> the new tokens of each row


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@torch.inference_mode()
def tutorial_loop(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The tutorial's generation: the whole window through the model, the head over every position."""
    seq = torch.tensor(prompts, device=model.lm_head.weight.device)
    for _ in range(n):
        logits = model(seq[:, -model.config.block_size :])  # (B, T, V)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, -n:].tolist()


@torch.inference_mode()
def recompute_last(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """nanoGPT's `generate`: the whole window through the trunk, only the last position through the head."""
    seq = torch.tensor(prompts, device=model.lm_head.weight.device)
    for _ in range(n):
        hidden = model.hidden_states(seq[:, -model.config.block_size :])
        seq = torch.cat([seq, model.head_logits(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return seq[:, -n:].tolist()


@torch.inference_mode()
def hf_loop(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    """A bare Hugging Face cached loop: prefill, then one token per call with the returned cache."""
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns on every call).
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    ids = torch.tensor(prompts, device=hf.device)
    out = hf(input_ids=ids, use_cache=True)
    new = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n - 1):
        past = out.get("cache") or out.get("past_key_values")
        out = hf(input_ids=new[-1], use_cache=True, **{name: past})
        new.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(new, dim=1).tolist()


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids = torch.tensor(prompts, device=hf.device)
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
        eos_token_id=None, pad_token_id=0, use_cache=True,
    )  # fmt: skip
    return out[:, ids.size(1) :].tolist()


def minigpt_generate(model: GPT, prompts: list[list[int]], n: int, trunk: str = "auto") -> list[list[int]]:
    return [r.tokens for r in generate(model, prompts, SamplingConfig.greedy(n), stop_ids=None, trunk=trunk)]


TRUNKS = ("plain", "one_thread", "lean", "lean_one_thread")  # a row each, beside minigpt's "auto"


def trunk_row(trunk: str) -> str:
    return f"minigpt, trunk {trunk!r}"


def build(device: torch.device) -> tuple[GPT, object]:
    """The minigpt model and its Hugging Face copy (the same function, the same weights)."""
    torch.manual_seed(0)
    config = GPTConfig.gpt2(VOCAB, BLOCK, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, d_ff=4 * WIDTH)
    model = GPT(config).eval()
    with torch.no_grad():  # wider than GPT-2's init (std 0.02): greedy picks far from ties, so texts compare
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    hf = minigpt_to_gpt2(model)
    hf.generation_config.eos_token_id = None  # never stop early: every run makes n tokens
    return model.to(device), hf.to(device).eval()


def bench(n: int, repeats: int, device: torch.device, batches: tuple[int, ...] = BATCHES) -> dict:
    """Time every contender side by side; returns the summary (and `rows`, `runs`, `cold_cache` for checks)."""
    model, hf = build(device)
    prompt = torch.randint(3, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    contenders: dict[str, Run] = {
        "minigpt (KV cache)": lambda p: minigpt_generate(model, p, n),
        **{trunk_row(t): lambda p, t=t: minigpt_generate(model, p, n, trunk=t) for t in TRUNKS},
        "tutorial loop (recompute, full head)": lambda p: tutorial_loop(model, p, n),
        "recompute, head on last position": lambda p: recompute_last(model, p, n),
        "HF generate": lambda p: hf_generate(hf, p, n),
        "HF cached loop": lambda p: hf_loop(hf, p, n),
    }
    weight, hidden = model.lm_head.weight, torch.randn(1, WIDTH, device=device)
    packed = PackedHead(weight, None, torch.get_num_threads() if device.type == "cpu" else 1)
    with torch.inference_mode():
        logits = model.head_logits(hidden)  # (1, V)
    per_token: dict[str, Callable[[], object]] = {  # timed n times per round, as if once per token
        "bound: one read of W (W.sum())": weight.sum,
        "head alone, plain (F.linear)": lambda: model.head_logits(hidden),
        f"head alone, packed ({packed.weight.size(0)} slabs)": lambda: packed(hidden),
        "greedy pick alone, plain (argmax)": lambda: greedy_pick(logits, "plain"),
        "greedy pick alone, chunked": lambda: greedy_pick(logits, "chunked"),
    }
    runs: dict[str, dict] = {}  # what each contender was given and produced, for the invariants

    def record(name: str, prompts: list[list[int]], out: list[list[int]]) -> None:
        runs[name] = {"prompts": prompts, "new_tokens": [len(row) for row in out], "tokens": out}

    # Cold: the first minigpt call after forgetting every packed head and every measurement.
    reset_decode_heads()
    reset_decode_steps()
    cold_cache = [(decode_head_cache_size(), decode_step_cache_size())]  # (heads, step measurements) before
    cold = timed(lambda: record("minigpt cold (first call)", [prompt], minigpt_generate(model, [prompt], n)), device)
    cold_cache.append((decode_head_cache_size(), decode_step_cache_size()))  # and after
    times: dict[str, list[float]] = {name: [] for name in [*contenders, *per_token]}
    for name, run in contenders.items():  # warm-up round (its outputs are recorded)
        record(name, [prompt], run([prompt]))
    with torch.inference_mode():
        for _ in range(repeats):  # round robin: load from other processes hits every contender alike
            for name, run in contenders.items():
                times[name].append(timed(lambda run=run: run([prompt]), device))
            for name, fn in per_token.items():
                times[name].append(timed(lambda fn=fn: [fn() for _ in range(n)], device))
    rows = {"minigpt cold (first call)": cold, **{name: statistics.median(ts) for name, ts in times.items()}}
    batch_tok_s: dict[str, float] = {}
    for b in batches:
        prompts = torch.randint(3, VOCAB, (b, PROMPT), generator=torch.Generator().manual_seed(b)).tolist()
        for key, name in (("minigpt", "minigpt (KV cache)"), ("hf", "HF generate")):
            record(f"{name}, batch {b}", prompts, contenders[name](prompts))  # warm-up
            t = statistics.median(timed(lambda name=name: contenders[name](prompts), device) for _ in range(repeats))
            batch_tok_s[f"{key}_batch{b}_tok_s"] = round(b * n / t, 2)
    tok_s = {name: n / t for name, t in rows.items()}
    mine, bound = tok_s["minigpt (KV cache)"], tok_s["bound: one read of W (W.sum())"]
    return {
        "minigpt_tok_s": round(mine, 2),
        "minigpt_cold_tok_s": round(tok_s["minigpt cold (first call)"], 2),
        **{f"trunk_{t}_tok_s": round(tok_s[trunk_row(t)], 2) for t in TRUNKS},
        "tutorial_loop_tok_s": round(tok_s["tutorial loop (recompute, full head)"], 2),
        "recompute_last_tok_s": round(tok_s["recompute, head on last position"], 2),
        "hf_generate_tok_s": round(tok_s["HF generate"], 2),
        "hf_loop_tok_s": round(tok_s["HF cached loop"], 2),
        "bandwidth_bound_tok_s": round(bound, 2),
        "of_bound": round(mine / bound, 3),
        "plain_of_bound": round(tok_s[trunk_row("plain")] / bound, 3),
        "vs_tutorial": round(mine / tok_s["tutorial loop (recompute, full head)"], 2),
        "vs_hf": round(mine / tok_s["HF generate"], 2),
        **batch_tok_s,
        "head": "packed" if isinstance(decode_head(weight, model.lm_head.bias, 1), PackedHead) else "plain",
        "trunk": resolve_trunk(model, model.new_cache(1), head=decode_head(weight, model.lm_head.bias, 1)),
        "pick": resolve_pick(logits),
        "rows": rows,
        "runs": runs,
        "cold_cache": cold_cache,
    }


def agreement(runs: dict[str, dict], reference: str = "minigpt (KV cache)") -> dict[str, float]:
    """Share of greedy tokens each batch-1 contender has in common with minigpt's (1.0 = the same text)."""
    ref = runs[reference]["tokens"][0]
    return {
        name: sum(a == b for a, b in zip(r["tokens"][0], ref)) / len(ref)
        for name, r in runs.items()
        if r["prompts"] == runs[reference]["prompts"]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=None, help="new tokens per run (default 200; --quick: 12)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (width 16, vocab 64, block 16, batch 3)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.quick:
        globals().update(QUICK)
    n = args.new_tokens or (12 if args.quick else 200)
    if n < 1 or PROMPT + n > BLOCK:  # the Hugging Face copy has BLOCK learned positions
        parser.error(f"--new_tokens must be between 1 and {BLOCK - PROMPT} (block {BLOCK}, prompt {PROMPT})")
    device = torch.device(args.device)
    load = os.getloadavg()[0]
    r = bench(n, args.repeats, device, batches=(3,) if args.quick else BATCHES)
    print(
        f"greedy decoding, batch 1, {PROMPT}-token prompt, {n} new tokens; GPT-2 flavour width {WIDTH}, "
        f"{LAYERS} layers, {HEADS} heads, vocab {VOCAB:,}, block {BLOCK}; {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}; load average {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    print(f"{'':40} {'tokens/s':>10} {'ms/token':>10} {'minigpt is':>11}")
    base = r["rows"]["minigpt (KV cache)"]
    for name, t in r["rows"].items():
        print(f"{name:40} {n / t:>10.1f} {1e3 * t / n:>10.3f} {t / base:>10.2f}x")
    for key, value in r.items():
        if "_batch" in key:
            print(f"{key:40} {value:>10.1f}")
    print(f"chosen by minigpt's one-time measurements ('auto'): head {r['head']!r}, trunk {r['trunk']!r}, "
          f"greedy pick {r['pick']!r}")  # fmt: skip
    same = agreement(r["runs"])
    print("greedy tokens shared with minigpt: " + ", ".join(f"{k} {v:.0%}" for k, v in same.items()))
    print(
        f"vs_tutorial {r['vs_tutorial']:.2f}x   vs_hf {r['vs_hf']:.2f}x   minigpt reaches {r['of_bound']:.0%} "
        f"of the bandwidth bound (trunk 'plain': {r['plain_of_bound']:.0%})"
    )
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("rows", "runs", "cold_cache")}))


if __name__ == "__main__":
    main()
