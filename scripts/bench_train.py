"""Training throughput and memory: minigpt vs the PyTorch tutorial's model vs Hugging Face GPT-2.

    python scripts/bench_train.py [--blocks 30 128] [--rounds 5] [--peers-own-optimizer] [--json]

All contenders train the same size of model (width 200, 2 layers, 2 heads, d_ff 2048, vocabulary 100,000,
batch 32) on the same synthetic (batch, block) token batches, with the SAME optimizer implementation and
settings: the optimizer object minigpt's `configure_optimizers` builds (the tutorial's Adam: lr 1e-2, betas
0.9/0.999, L2 weight decay 0.01; fused where minigpt uses the fused kernel) is cloned for every peer, with
StepLR and gradient clipping at 0.5. The JSON says so ("peer_optimizer": "same") and lists each contender's
optimizer class and settings, checked equal before anything is reported.

- minigpt: `LitMiniGPT(GPTConfig.seed(...))` driven by a real Lightning `Trainer.fit`, so a step is exactly what
  `minigpt fit` runs: forward, loss (the kernel `loss_kernel="auto"` picks), backward, clipping, the
  optimizer, the per-step scheduler and Lightning's hooks and logging;
- tutorial: the PyTorch tutorial's `TransformerModel` (scripts/tutorial_model.py: embedding, `PositionalEncoding`,
  `nn.TransformerEncoder` with a causal mask, `nn.Linear` head, full logits + `F.cross_entropy`);
- hf: `transformers.GPT2LMHeadModel` (defaults otherwise: tied head, dropout 0.1), loss from `labels=`;
- loss rows (`--kernel-rows`, on by default): minigpt's model and optimizer stepped by hand (no Lightning)
  with `loss_kernel="plain"` and `"fused"`: where the optional fused loss kernel wins, and by how much.
- `--peers-own-optimizer` adds a second, labelled table: the peers with `torch.optim.Adam`'s default
  implementation, as their own code runs them (not used in the ratios).

The contenders take turns, one step each per round, in one process (the other steps run in the Trainer's
`on_train_batch_end`), so load from other processes hits them alike; the table shows medians over the timed
rounds (`--rounds`, at least 5). Each round also times the head's three matrix products (logits, input
gradient, weight gradient) with plain `torch.matmul` at the benchmark's shapes (batch x block rows): the
machine's matmul rate, which bounds tokens/s at rate / (6 x n_embd x vocab) because those products alone
cost that many FLOP per token. `of_bound` is minigpt's tokens/s over that bound. Timers synchronise CUDA.

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
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tutorial_model import TransformerModel  # scripts/tutorial_model.py, beside this script

WIDTH, LAYERS, HEADS, D_FF, VOCAB, BATCH = 200, 2, 2, 2048, 100_000, 32
LR, BETAS, WEIGHT_DECAY, CLIP, STEP_SIZE, GAMMA = 1e-2, (0.9, 0.999), 0.01, 0.5, 10_000, 0.9
QUICK = dict(WIDTH=16, D_FF=32, VOCAB=64, BATCH=2)  # --quick: a smoke run in seconds (tests use it)
OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused", "capturable")


@dataclass
class Contender:
    """One training step to time, and what it steps with (checked equal across contenders)."""

    step: Callable[[], None]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batch_shape: tuple[int, int]  # (batch, block) of the token ids it trains on


def optimizer_settings(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> dict:
    settings = {"class": type(opt).__name__, **{k: opt.defaults.get(k) for k in OPTIMIZER_KEYS}}
    settings["betas"] = list(settings["betas"])
    return settings | {"scheduler": type(sched).__name__, "step_size": sched.step_size, "gamma": sched.gamma}


def clone_optimizer(like: torch.optim.Optimizer | None, params) -> torch.optim.Optimizer:
    """An optimizer of `like`'s class and settings over `params`; None: torch.optim.Adam's own defaults."""
    if like is None:
        return torch.optim.Adam(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return type(like)(params, **{k: v for k, v in like.defaults.items() if k in OPTIMIZER_KEYS})


def _contender(model: nn.Module, loss_fn: Callable[[], torch.Tensor], like, batch_shape, device) -> Contender:
    """The step every contender takes: zero grads, loss (bf16 autocast on CUDA), backward, clip, Adam, StepLR."""
    opt = clone_optimizer(like, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)

    def step() -> None:
        opt.zero_grad()
        with _autocast(device):
            loss = loss_fn()
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()

    return Contender(step, opt, sched, tuple(batch_shape))


def tutorial_contender(x, y, device, like) -> Contender:
    model = TransformerModel(VOCAB, WIDTH, HEADS, D_FF, LAYERS).to(device).train()
    mask = nn.Transformer.generate_square_subsequent_mask(x.size(1), device=device)
    src, tgt = x.t().contiguous(), y.t().contiguous()  # the tutorial is sequence-first

    def loss() -> torch.Tensor:  # full logits, then cross-entropy, as the tutorial does
        return F.cross_entropy(model(src, mask).view(-1, VOCAB).float(), tgt.reshape(-1))

    return _contender(model, loss, like, x.shape, device)


def hf_contender(x, y, device, like) -> Contender:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=max(128, x.size(1)),
                     n_inner=D_FF)  # fmt: skip
    model = GPT2LMHeadModel(cfg).to(device).train()
    return _contender(model, lambda: model(input_ids=x, labels=x).loss, like, x.shape, device)


def loss_kernel_contender(x, y, device, like, loss_kernel: str) -> Contender:
    """minigpt's model and optimizer without Lightning, with the given loss kernel."""
    from minigpt.model import GPT

    model = GPT(_config(x.size(1)), loss_kernel=loss_kernel).to(device).train()
    return _contender(model, lambda: model.loss(x, y), like, x.shape, device)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 on a GPU, as `minigpt fit` runs there (precision bf16-mixed); plain fp32 on CPU.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=_compute_dtype(device) == torch.bfloat16)


# -- measuring ------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Meter:
    """Times steps and tracks each contender's memory (see the module docstring)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device = device
        self.clock = clock
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
        self._open = (name, self.clock(), before)

    def stop(self, timed: bool) -> None:
        self._sync()
        name, t0, before = self._open
        seconds = self.clock() - t0
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
    """The head's three products with plain `torch.matmul` at the benchmark's shapes, in the dtype the contenders'
    products run in (`_compute_dtype`): (probe, FLOP)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = _compute_dtype(device)
    x = torch.randn(rows, WIDTH, generator=g).to(device, dtype)
    w = torch.randn(VOCAB, WIDTH, generator=g).to(device, dtype)

    def probe() -> None:
        logits = torch.matmul(x, w.t())  # (rows, V)
        torch.matmul(logits, w)  # d loss / d x: (rows, C)
        torch.matmul(logits.t(), x)  # d loss / d w: (V, C)

    return probe, 3 * 2.0 * rows * WIDTH * VOCAB


def model_flops_per_token(block: int) -> float:
    """6 x (non-embedding weights incl. the head) + attention (PaLM appendix B); the same for all three."""
    per_layer = 4 * WIDTH * WIDTH + 2 * WIDTH * D_FF
    return 6.0 * (LAYERS * per_layer + WIDTH * VOCAB) + 12.0 * LAYERS * block * WIDTH


# -- one block size ------------------------------------------------------------------------------------
def bench_block(block: int, warmup: int, rounds: int, device: torch.device, meter: Meter, *,
                kernel_rows: bool = True, peers_own_optimizer: bool = False) -> dict:  # fmt: skip
    import lightning.pytorch as pl

    from minigpt.lit_module import LitMiniGPT

    g = torch.Generator().manual_seed(block)
    x = torch.randint(3, VOCAB, (BATCH, block), generator=g).to(device)
    y = torch.roll(x, -1, dims=1)
    tag = f"@{block}"
    others: dict[str, Contender] = {}
    minigpt_shapes: list[tuple[int, int]] = []
    probe, probe_flop = head_matmul_probe(BATCH * block, device)
    lit = meter.build("minigpt" + tag, lambda: LitMiniGPT(_config(block)))

    class Rounds(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            # The peers get a clone of the optimizer minigpt's configure_optimizers built.
            like = trainer.optimizers[0]
            makers = {"tutorial": lambda: tutorial_contender(x, y, device, like),
                      "hf": lambda: hf_contender(x, y, device, like)}  # fmt: skip
            if kernel_rows:
                for kernel in ("plain", "fused"):
                    makers[f"loss_{kernel}"] = lambda k=kernel: loss_kernel_contender(x, y, device, like, k)
            if peers_own_optimizer:
                makers["tutorial_own"] = lambda: tutorial_contender(x, y, device, None)
                makers["hf_own"] = lambda: hf_contender(x, y, device, None)
            for name, make in makers.items():
                others[name] = meter.build(name + tag, make)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            minigpt_shapes.append(tuple(batch[0].shape))
            meter.start("minigpt" + tag)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timed = batch_idx >= warmup
            meter.stop(timed)
            names = list(others)
            if batch_idx % 2:
                names.reverse()
            for name in names:
                meter.run(name + tag, others[name].step, timed)
            meter.run("probe" + tag, probe, timed)

    trainer = _fit(lit, _Repeat((x.cpu(), y.cpu()), warmup + rounds), warmup + rounds, device, [Rounds()])
    optimizer = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    settings = {"minigpt": optimizer_settings(optimizer, sched)}
    shapes = {"minigpt": sorted(set(minigpt_shapes))}
    for name, c in others.items():
        settings[name] = optimizer_settings(c.optimizer, c.scheduler)
        shapes[name] = [c.batch_shape]
    same = [n for n in others if not n.endswith("_own")]
    if any(settings[n] != settings["minigpt"] for n in same) or any(shapes[n] != shapes["minigpt"] for n in others):
        raise RuntimeError(f"contenders differ: optimizers {settings}, shapes {shapes}")

    names = ["minigpt", *others]
    med = {k: statistics.median(meter.times[k + tag]) for k in [*names, "probe"]}
    rate = probe_flop / med["probe"]
    bound = rate / (6.0 * WIDTH * VOCAB)
    flop_tok = model_flops_per_token(block)
    out: dict = {"tokens_per_step": BATCH * block, "batch_shape": [BATCH, block], "matmul_gflops": rate / 1e9,
                 "bound_tok_s": bound, "rounds": {k: len(meter.times[k + tag]) for k in names}}  # fmt: skip
    for k in names:
        tok_s = BATCH * block / med[k]
        out[f"{k}_tok_s"] = tok_s
        out[f"{k}_ms_step"] = med[k] * 1e3
        out[f"{k}_of_bound"] = tok_s / bound
        out[f"{k}_mfu"] = tok_s * flop_tok / rate
        out[f"{k}_peak_rss_mb"] = meter.peak[k + tag] / 2**20 if meter.memory_ok else None
    out["of_bound"] = out["minigpt_of_bound"]
    out["vs_tutorial"] = out["minigpt_tok_s"] / out["tutorial_tok_s"]
    out["vs_hf"] = out["minigpt_tok_s"] / out["hf_tok_s"]
    if kernel_rows:
        out["fused_loss_speedup"] = out["loss_fused_tok_s"] / out["loss_plain_tok_s"]
    out["optimizers"] = settings
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


def _fit(lit, batches, max_steps: int, device: torch.device, callbacks: list):
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
    return trainer


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
    print("minigpt: LitMiniGPT(GPTConfig.seed) through Lightning Trainer.fit (the step `minigpt fit` runs)")
    for block, r in results.items():
        opt = r["optimizers"]["minigpt"]
        print(
            f"\nblock {block} ({r['tokens_per_step']:,} tokens/step, median of {r['rounds']['minigpt']} rounds); "
            f"head matmul rate {r['matmul_gflops']:.1f} GFLOP/s -> bound {r['bound_tok_s']:.0f} tokens/s"
        )
        print(f"same optimizer for all: {opt['class']} (fused={opt['fused']}) lr {opt['lr']} betas {opt['betas']} "
              f"weight_decay {opt['weight_decay']}, {opt['scheduler']}, clip_grad_norm {CLIP}")  # fmt: skip
        rows = [k for k in ("minigpt", "tutorial", "hf", "loss_plain", "loss_fused") if f"{k}_tok_s" in r]
        _rows(r, rows)
        print(f"minigpt vs_tutorial {r['vs_tutorial']:.2f}x   vs_hf {r['vs_hf']:.2f}x   of bound {r['of_bound']:.0%}")
        if "fused_loss_speedup" in r:
            print(f"fused vs plain loss kernel (minigpt's model, no Lightning): {r['fused_loss_speedup']:.2f}x")
        own = [k for k in ("tutorial_own", "hf_own") if f"{k}_tok_s" in r]
        if own:
            print("peers as their own code runs them (torch.optim.Adam's default implementation; not in the ratios):")
            _rows(r, own)
    if data:
        print(
            f"\ndata (block {data['block']}): minigpt step with synthetic batches {data['synthetic_ms_step']:.0f} ms, "
            f"with IMDB batches {data['imdb_ms_step']:.0f} ms (fetching one: {data['imdb_fetch_ms']:.2f} ms)"
        )


def _rows(r: dict, names: list[str]) -> None:
    print(f"{'':13} {'tokens/s':>9} {'ms/step':>9} {'of bound':>9} {'MFU':>6} {'peak RSS MB':>12}")
    for k in names:
        mem = r[f"{k}_peak_rss_mb"]
        print(
            f"{k:13} {r[f'{k}_tok_s']:9.0f} {r[f'{k}_ms_step']:9.0f} {r[f'{k}_of_bound']:9.0%} "
            f"{r[f'{k}_mfu']:6.0%} {'n/a' if mem is None else f'{mem:12.0f}'}"
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[30, 128])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (at least 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--kernel-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="time minigpt's step with the plain and the fused loss kernel")  # fmt: skip
    p.add_argument("--peers-own-optimizer", action="store_true", help="add the peers with their own default Adam")
    p.add_argument("--data-steps", type=int, default=3, help="timed steps of each kind in the data check (0: skip)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (width 16, vocab 64, batch 2, block 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error("--rounds must be at least 5")
    if args.quick:
        globals().update(QUICK)
        args.blocks, args.data_steps = [8], 0
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
    results = {
        str(block): bench_block(block, args.warmup, args.rounds, device, meter, kernel_rows=args.kernel_rows,
                                peers_own_optimizer=args.peers_own_optimizer)  # fmt: skip
        for block in args.blocks
    }
    data = None
    if args.data_steps > 0:
        block = min(args.blocks)
        data = {"block": block, **bench_data(block, args.data_steps, device)}
    print_table(results, data, device)
    print(f"\n(baseline RSS {meter.base / 2**20:.0f} MB, wall time {time.perf_counter() - t0:.0f} s)")
    summary = {"device": str(device), "peer_optimizer": "same", "block": results, "data": data}
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
