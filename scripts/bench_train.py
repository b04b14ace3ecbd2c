"""Training throughput and memory: minigpt vs the PyTorch tutorial's model vs Hugging Face GPT-2 (issue 6).

    python scripts/bench_train.py [--blocks 30 128] [--json]

All three train the same size of model (width 200, 2 layers, 2 heads, d_ff 2048, vocabulary 100,000, batch
32) with the same optimizer (the tutorial's Adam: lr 1e-2, betas 0.9/0.999, L2 weight decay 0.01), StepLR and
gradient clipping at 0.5, on the same synthetic batches:

- minigpt: `LitMiniGPT(GPTConfig.seed(...))` driven by a real Lightning `Trainer.fit`, so a step is exactly what
  `minigpt fit` runs: forward, chunked loss, backward, clipping (`configure_gradient_clipping`), the optimizer
  from `configure_optimizers`, the per-step scheduler and Lightning's hooks and logging;
- tutorial: the PyTorch tutorial's `TransformerModel` (embedding, `PositionalEncoding`, `nn.TransformerEncoder`
  with a causal mask, `nn.Linear` head, full logits + `F.cross_entropy`), written out below;
- hf: `transformers.GPT2LMHeadModel` (defaults otherwise: tied head, dropout 0.1), loss from `labels=`.

The contenders take turns, one step each per round, in one process (the two other models' steps run in the
Trainer's `on_train_batch_end`), so load from other processes hits them alike; the table shows medians over
the timed rounds. Each round also times the head's three matrix products (forward, input gradient, weight
gradient) at the benchmark's shapes: the machine's fp32 matmul rate, which bounds tokens/s at
rate / (6 x n_embd x vocab) because those products alone cost that many FLOP per token.

Peak memory (CPU): every step starts by resetting the kernel's resident-set high-water mark (writing 5 to
/proc/self/clear_refs) and ends by reading it (VmHWM). A contender's peak is: the process's RSS before any
model existed + what that contender keeps resident between steps (the RSS growth of building it and of all
its steps so far: weights, gradients, Adam moments, buffers) + the high-water rise within its step. It is the
peak the process would reach with that contender alone, measured, not estimated from tensor sizes. On CUDA
the same is done with torch.cuda's allocated-memory statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH, LAYERS, HEADS, D_FF, VOCAB, BATCH = 200, 2, 2, 2048, 100_000, 32
LR, BETAS, WEIGHT_DECAY, CLIP, STEP_SIZE, GAMMA = 1e-2, (0.9, 0.999), 0.01, 0.5, 10_000, 0.9


# -- the tutorial's model (PyTorch "Language Modeling with nn.Transformer and torchtext") ------------------
class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):  # (T, B, C)
        return self.dropout(x + self.pe[: x.size(0)])


class TutorialModel(nn.Module):
    def __init__(self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int, dropout: float = 0.2):
        super().__init__()
        self.pos_encoder = PositionalEncoding(d_model, dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.embedding = nn.Embedding(ntoken, d_model)
        self.d_model = d_model
        self.linear = nn.Linear(d_model, ntoken)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.linear.bias.data.zero_()
        self.linear.weight.data.uniform_(-0.1, 0.1)

    def forward(self, src, src_mask):  # src: (T, B) -> (T, B, ntoken)
        src = self.pos_encoder(self.embedding(src) * math.sqrt(self.d_model))
        return self.linear(self.transformer_encoder(src, src_mask))


def _adam(params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.Adam(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)  # PyTorch defaults otherwise
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)


def tutorial_step_fn(block: int, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    model = TutorialModel(VOCAB, WIDTH, HEADS, D_FF, LAYERS).to(device).train()
    opt, sched = _adam(model.parameters())
    mask = nn.Transformer.generate_square_subsequent_mask(block, device=device)
    src, tgt = x.t().contiguous(), y.t().contiguous()  # the tutorial is sequence-first

    def step() -> None:
        opt.zero_grad()
        with _autocast(device):
            out = model(src, mask)
        loss = F.cross_entropy(out.view(-1, VOCAB).float(), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()

    return step


def hf_step_fn(block: int, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=128, n_inner=D_FF)
    model = GPT2LMHeadModel(cfg).to(device).train()
    opt, sched = _adam(model.parameters())

    def step() -> None:
        opt.zero_grad()
        with _autocast(device):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()

    return step


def _autocast(device: torch.device):
    # bf16 on a GPU, as `minigpt fit` runs there (precision bf16-mixed); plain fp32 on CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# -- measuring ------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Meter:
    """Times steps and tracks each contender's memory (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.times: dict[str, list[float]] = {}
        self.peak: dict[str, int] = {}
        self.kept: dict[str, int] = {}
        self.memory_ok = self.cuda or self._reset_hwm()
        self.base = self._now()
        self._open: tuple[str, float, int] | None = None

    def _reset_hwm(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _proc_status_kb("VmRSS") * 1024

    def _high_water(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _proc_status_kb("VmHWM") * 1024

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def build(self, name: str, make: Callable[[], object]) -> object:
        before = self._now()
        obj = make()
        self.kept[name] = self.kept.get(name, 0) + self._now() - before
        return obj

    def start(self, name: str) -> None:
        self._sync()
        before = self._now()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.memory_ok:
            self._reset_hwm()
        self._open = (name, time.perf_counter(), before)

    def stop(self, timed: bool) -> None:
        self._sync()
        name, t0, before = self._open
        seconds = time.perf_counter() - t0
        peak = self.base + self.kept.get(name, 0) + self._high_water() - before
        self.peak[name] = max(self.peak.get(name, 0), peak)
        self.kept[name] = self.kept.get(name, 0) + self._now() - before
        if timed:
            self.times.setdefault(name, []).append(seconds)
        self._open = None

    def run(self, name: str, fn: Callable[[], None], timed: bool) -> None:
        self.start(name)
        fn()
        self.stop(timed)


def head_matmul_probe(rows: int, device: torch.device) -> tuple[Callable[[], None], float]:
    """The head's three products at the benchmark's shapes, into preallocated outputs: (probe, FLOP)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, WIDTH, generator=g).to(device)
    w = torch.randn(VOCAB, WIDTH, generator=g).to(device)
    logits = torch.empty(rows, VOCAB, device=device)
    gx, gw = torch.empty(rows, WIDTH, device=device), torch.empty(VOCAB, WIDTH, device=device)

    def probe() -> None:
        torch.mm(x, w.t(), out=logits)
        torch.mm(logits, w, out=gx)
        torch.mm(logits.t(), x, out=gw)

    return probe, 3 * 2.0 * rows * WIDTH * VOCAB


def model_flops_per_token(block: int) -> float:
    """6 x (non-embedding weights incl. the head) + attention (PaLM appendix B); the same for all three."""
    per_layer = 4 * WIDTH * WIDTH + 2 * WIDTH * D_FF
    return 6.0 * (LAYERS * per_layer + WIDTH * VOCAB) + 12.0 * LAYERS * block * WIDTH


# -- one block size ------------------------------------------------------------------------------------
def bench_block(block: int, warmup: int, steps: int, device: torch.device, meter: Meter) -> dict:
    import lightning.pytorch as pl

    from minigpt.lit_module import LitMiniGPT

    g = torch.Generator().manual_seed(block)
    x = torch.randint(3, VOCAB, (BATCH, block), generator=g).to(device)
    y = torch.roll(x, -1, dims=1)
    tag = f"@{block}"
    others = {
        "tutorial": meter.build("tutorial" + tag, lambda: tutorial_step_fn(block, x, y, device)),
        "hf": meter.build("hf" + tag, lambda: hf_step_fn(block, x, y, device)),
    }
    probe, probe_flop = head_matmul_probe(min(BATCH * block, 1024), device)
    lit = meter.build("minigpt" + tag, lambda: LitMiniGPT(_config(block)))

    class Rounds(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.start("minigpt" + tag)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timed = batch_idx >= warmup
            meter.stop(timed)
            names = list(others)
            if batch_idx % 2:
                names.reverse()
            for name in names:
                meter.run(name + tag, others[name], timed)
            meter.run("probe" + tag, probe, timed)

    _fit(lit, _Repeat((x.cpu(), y.cpu()), warmup + steps), warmup + steps, device, [Rounds()])

    med = {k: statistics.median(meter.times[k + tag]) for k in ("minigpt", "tutorial", "hf", "probe")}
    rate = probe_flop / med["probe"]
    bound = rate / (6.0 * WIDTH * VOCAB)
    flop_tok = model_flops_per_token(block)
    out: dict = {"tokens_per_step": BATCH * block, "matmul_gflops": rate / 1e9, "bound_tok_s": bound}
    for k in ("minigpt", "tutorial", "hf"):
        tok_s = BATCH * block / med[k]
        out[f"{k}_tok_s"] = tok_s
        out[f"{k}_ms_step"] = med[k] * 1e3
        out[f"{k}_of_bound"] = tok_s / bound
        out[f"{k}_mfu"] = tok_s * flop_tok / rate
        out[f"{k}_peak_rss_mb"] = meter.peak[k + tag] / 2**20 if meter.memory_ok else None
    out["vs_tutorial"] = out["minigpt_tok_s"] / out["tutorial_tok_s"]
    out["vs_hf"] = out["minigpt_tok_s"] / out["hf_tok_s"]
    return out


def _config(block: int):
    from minigpt.config import GPTConfig

    # The tutorial's model (post-norm, ReLU, dropout 0.2, sinusoidal positions, untied linear head).
    return GPTConfig.seed(
        vocab_size=VOCAB, block_size=block, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, d_ff=D_FF
    )  # fmt: skip


class _Repeat:
    """The same (x, y) batch n times: a data loader that costs nothing."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


def _fit(lit, batches, max_steps: int, device: torch.device, callbacks: list) -> None:
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",  # as `minigpt fit` chooses
        max_steps=max_steps,
        gradient_clip_val=CLIP,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(lit, train_dataloaders=batches)


def bench_data(block: int, steps: int, device: torch.device) -> dict:
    """minigpt's step with synthetic batches vs with IMDB batches from `IMDBDataModule` (bundled reviews),
    alternating in one run; each step's time includes fetching its batch."""
    import lightning.pytorch as pl

    from minigpt.data.datamodule import IMDBDataModule
    from minigpt.lit_module import LitMiniGPT

    dm = IMDBDataModule(block_size=block, batch_size=BATCH)
    dm.setup("fit")
    real = iter(dm.train_dataloader())
    x = torch.randint(3, VOCAB, (BATCH, block), generator=torch.Generator().manual_seed(1))
    synthetic = (x, torch.roll(x, -1, dims=1))
    times: dict[str, list[float]] = {"synthetic": [], "imdb": []}
    fetch: list[float] = []
    warmup = 2

    class Batches:
        def __len__(self):
            return warmup + 2 * steps

        def __iter__(self):
            for i in range(len(self)):
                if i % 2:
                    t0 = time.perf_counter()
                    batch = next(real)
                    fetch.append(time.perf_counter() - t0)
                    yield batch
                else:
                    yield synthetic

    class Clock(pl.Callback):
        last_end: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if batch_idx >= warmup and self.last_end is not None:  # from the previous step's end: fetch + step
                times["imdb" if batch_idx % 2 else "synthetic"].append(now - self.last_end)
            self.last_end = now

    lit = LitMiniGPT(_config(block))
    _fit(lit, Batches(), warmup + 2 * steps, device, [Clock()])
    return {
        "data_vocab": dm.vocab_size,
        "synthetic_ms_step": statistics.median(times["synthetic"]) * 1e3,
        "imdb_ms_step": statistics.median(times["imdb"]) * 1e3,
        "imdb_fetch_ms": statistics.median(fetch) * 1e3,
    }


# -- report -------------------------------------------------------------------------------------------
def print_table(results: dict, data: dict | None, device: torch.device) -> None:
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: width {WIDTH}, {LAYERS} layers, {HEADS} heads, d_ff {D_FF}, vocab {VOCAB:,}, batch {BATCH}")
    print("optimizer: Adam lr 1e-2 betas 0.9/0.999 weight_decay 0.01 (L2), StepLR, clip_grad_norm 0.5 for all")
    print("minigpt: LitMiniGPT(GPTConfig.seed) through Lightning Trainer.fit (the step `minigpt fit` runs)")
    for block, r in results.items():
        print(
            f"\nblock {block} ({r['tokens_per_step']:,} tokens/step); head matmul rate {r['matmul_gflops']:.1f} "
            f"GFLOP/s -> bound {r['bound_tok_s']:.0f} tokens/s"
        )
        print(f"{'':10} {'tokens/s':>9} {'ms/step':>9} {'of bound':>9} {'MFU':>6} {'peak RSS MB':>12}")
        for k in ("minigpt", "tutorial", "hf"):
            mem = r[f"{k}_peak_rss_mb"]
            print(
                f"{k:10} {r[f'{k}_tok_s']:9.0f} {r[f'{k}_ms_step']:9.0f} {r[f'{k}_of_bound']:9.0%} "
                f"{r[f'{k}_mfu']:6.0%} {'n/a' if mem is None else f'{mem:12.0f}'}"
            )
        print(f"minigpt vs_tutorial {r['vs_tutorial']:.2f}x   vs_hf {r['vs_hf']:.2f}x")
    if data:
        print(
            f"\ndata (block {data['block']}): minigpt step with synthetic batches {data['synthetic_ms_step']:.0f} ms, "
            f"with IMDB batches {data['imdb_ms_step']:.0f} ms (fetching one: {data['imdb_fetch_ms']:.2f} ms)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[30, 128])
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default: 5 at block <= 64, else 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 2 at block <= 64, else 1)")
    p.add_argument("--data-steps", type=int, default=3, help="timed steps of each kind in the data check (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    import lightning.pytorch  # noqa: F401  (imported before the baseline RSS is taken, like transformers)
    import transformers  # noqa: F401

    transformers.logging.set_verbosity_error()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no per-run banners between the tables
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec|set_vital|num_workers).*")
    meter = Meter(device)
    if not meter.memory_ok:
        print("note: /proc/self/clear_refs is not writable here; peak memory is not measured")
    t0 = time.perf_counter()
    results = {}
    for block in args.blocks:
        steps = args.steps or (5 if block <= 64 else 3)
        warmup = args.warmup if args.warmup is not None else (2 if block <= 64 else 1)
        results[str(block)] = bench_block(block, warmup, steps, device, meter)
    data = None
    if args.data_steps > 0:
        block = min(args.blocks)
        data = {"block": block, **bench_data(block, args.data_steps, device)}
    print_table(results, data, device)
    print(f"\n(baseline RSS {meter.base / 2**20:.0f} MB, wall time {time.perf_counter() - t0:.0f} s)")
    if args.json:
        print(json.dumps({"device": str(device), "block": results, "data": data}))


if __name__ == "__main__":
    main()
