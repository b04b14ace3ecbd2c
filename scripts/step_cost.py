"""What a lever costs per training step: the recipe's model and optimizer with and without the lever, in turns.

    python scripts/step_cost.py [--levers NAME ...] [--config imdb] [--rounds 30] [--vocab_size 49441]
        [--json FILE]

scripts/levers.py measures what a lever is worth in minutes of training, where the machine's speed from
one run to the next (another process, a slower hour) moves the number of steps as much as a cheap lever
does. This script measures only the cost: every contender (the recipe as `minigpt fit --config CONFIG
--print_config` prints it, then the recipe with each lever's options) is built in one process, and they
take turns, one training step each per round, so load from elsewhere hits them alike; each round starts
with the next contender, since a step's time depends on the step that ran before it. A step is what
`minigpt fit` runs for it, without Lightning: the loss (under bf16 autocast when the recipe trains in
`bf16-mixed`, as `minigpt fit` does on a CPU with native bf16), the backward pass, clipping at the recipe's
`gradient_clip_val`, the optimizer the module configures, zeroing the gradients, with freed memory kept in
the process as `minigpt fit` keeps it (`minigpt.allocator`) and the blocks compiled where the recipe's
`compile` has `minigpt fit` compile them (its first warm-up round takes the compiling). The tokens are drawn
independently from a Zipf distribution over `--vocab_size` words (word frequencies follow one, and the
adaptive head's cost depends on which cluster a target falls in); the batch has the recipe's shape.
The table shows each contender's parameters, its median step time over the rounds (after 3 rounds of warm-up) and its
ratio to the recipe's. `--levers recipe_again` adds a second build of the recipe as a control: its ratio,
1.0 on a steady machine, shows how far the others' can be trusted. Only levers that change the model or its
optimizer (`--model.*` options) have a cost to measure this way; the others are refused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, as `python scripts/...` sees them
from levers import LEVERS  # noqa: E402
from quality_vs_minutes import machine, minigpt  # noqa: E402

from minigpt.allocator import keep_freed_memory  # noqa: E402
from minigpt.config import GPTConfig  # noqa: E402
from minigpt.lit_module import LitMiniGPT, should_compile  # noqa: E402

WARMUP_ROUNDS = 3


def recipe(config: str, options: list[str]) -> dict:
    """The whole configuration `minigpt fit --config CONFIG OPTIONS` would run, as its --print_config prints it."""
    done = subprocess.run(
        minigpt("fit", "--config", config, *options, "--print_config"), capture_output=True, text=True
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"minigpt fit --config {config} {' '.join(options)} failed: {done.stderr.strip()}")
    return yaml.safe_load(done.stdout)


class Contender:
    """One recipe's module, optimizer and clipping, stepped by hand on the batches it is given."""

    def __init__(self, cfg: dict, vocab_size: int):
        model = dict(cfg["model"])
        config = GPTConfig(**{**model.pop("config"), "vocab_size": vocab_size, "block_size": cfg["data"]["block_size"]})
        self.module = LitMiniGPT(config, **model)
        if should_compile(model.get("compile", False), torch.device("cpu"), announce=False):
            # As `minigpt fit` does; the first warm-up round takes the compiling. Each contender sees one shape:
            # a graph for it alone, not one generalised over the contenders' shapes (slower).
            self.module.model.compile_parts(dynamic=False)
        self.optimizer = self.module.configure_optimizers()["optimizer"]
        self.clip = cfg["trainer"]["gradient_clip_val"]
        self.bf16 = cfg["trainer"].get("precision") == "bf16-mixed"  # Lightning's autocast around the loss
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            nll_sum, count = self.module.model.loss_sum_and_count(x, y)
        (nll_sum / count.clamp(min=1)).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="imdb", help="the recipe the levers change (a file or a recipe name)")
    parser.add_argument("--levers", nargs="+", default=["no_bigram"], choices=list(LEVERS))
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (one step of every contender each)")
    parser.add_argument("--vocab_size", type=int, default=49441, help="words (the recipe's vocabulary on IMDB)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.vocab_size < 2:
        parser.error(f"--rounds must be at least 1 and --vocab_size at least 2, got {args.rounds}, {args.vocab_size}")
    for name in args.levers:
        if not all(flag.startswith("--model.") for flag in LEVERS[name][1][::2]):
            parser.error(f"lever {name} changes more than the model and its optimizer; its cost is a matter of "
                         "minutes of training: measure it with scripts/levers.py")  # fmt: skip
    names = ["recipe", *(n for n in args.levers if n != "recipe")]
    cfgs = {name: recipe(args.config, LEVERS[name][1]) for name in names}
    keep_freed_memory()
    torch._dynamo.config.recompile_limit = 8 * len(names)  # each contender's blocks may need graphs of their own
    torch.manual_seed(0)
    try:
        contenders = {name: Contender(cfg, args.vocab_size) for name, cfg in cfgs.items()}
    except ValueError as e:  # the model's settings refuse --vocab_size (e.g. every adaptive cutoff above it)
        parser.error(f"--vocab_size {args.vocab_size}: {e}")
    data = cfgs["recipe"]["data"]
    zipf = 1.0 / torch.arange(1, args.vocab_size + 1, dtype=torch.float64)
    tokens = torch.Generator().manual_seed(0)
    turn = list(contenders.values())
    for round_ in range(WARMUP_ROUNDS + args.rounds):
        batch = torch.multinomial(zipf, data["batch_size"] * (data["block_size"] + 1), True, generator=tokens)
        batch = batch.view(data["batch_size"], data["block_size"] + 1)
        for contender in turn[round_ % len(turn) :] + turn[: round_ % len(turn)]:
            seconds = contender.step(batch[:, :-1], batch[:, 1:])
            if round_ >= WARMUP_ROUNDS:
                contender.times.append(seconds)
    medians = {name: statistics.median(c.times) for name, c in contenders.items()}
    report = {
        "machine": machine(), "date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
        "precision": cfgs["recipe"]["trainer"].get("precision"),
        "command": " ".join(["python", "scripts/step_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "rows": [
            {"lever": name, "what": LEVERS[name][0], "options": LEVERS[name][1],
             "parameters": sum(p.numel() for p in contenders[name].module.parameters()),
             "ms_per_step": 1000 * seconds, "of_recipe": seconds / medians["recipe"]}
            for name, seconds in medians.items()
        ],
    }  # fmt: skip
    for row in report["rows"]:
        print(f"{row['lever']:14s} {row['parameters']:>12,} parameters {row['ms_per_step']:8.1f} ms/step "
              f"{row['of_recipe']:6.3f} of the recipe's  {row['what']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
