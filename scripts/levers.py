"""What each setting of the recommended recipe is worth: the recipe against itself with one lever changed.

    python scripts/levers.py --archive aclImdb_v1.tar.gz [--minutes 3 | --steps N] [--levers NAME ...]
        [--max_docs 1000] [--root runs/levers] [--json docs/levers.json]

Every row is a `minigpt fit --config imdb` run of `--minutes` wall-clock minutes with the lever's options
added (the first row adds none: the recipe itself), one run after the other so each has the machine to
itself; the schedule follows the budget, as in a run of that length. Each run is scored with `minigpt
evaluate --split val` on `--max_docs` validation reviews spread evenly (the test split stays for the
headline number of scripts/quality_vs_minutes.py). A lever in the recipe is measured by taking it out, a
lever that is not by putting it in; the effect is the change of validation bits per character against the
recipe's row of the same invocation. One run per row: differences of about 0.01 are within the noise of the
machine's speed. `--steps N` trains every row for N steps instead (the schedule follows them): for levers that
leave the cost of a step as it is, that takes the machine's speed out of the comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, as `python scripts/levers.py` sees it
from quality_vs_minutes import ROOT, config_digests, kept_or_run, machine, max_time, minigpt, score, train  # noqa: E402

M = "--model.config."
# name -> (what it changes, the options that change it). Options are overrides of configs/imdb.yaml.
LEVERS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("configs/imdb.yaml as it is", []),
    "recipe_again": ("configs/imdb.yaml as it is, once more (a control: its effect is the measurement's noise)", []),
    "gpt2_block": ("GPT-2's block: learned positions, LayerNorm, GELU, no QK-norm, Xavier-initialised "
                   "output projections, biases",
                   [M + "positional", "learned", M + "norm", "layernorm", M + "activation", "gelu",
                    M + "qk_norm", "false", M + "zero_init_proj", "false", M + "bias", "true"]),
    "cosine": ("cosine decay over the whole run instead of warmup-stable-decay", ["--model.scheduler", "cosine"]),
    "decay0.2": ("warmup-stable-decay decaying over the last 20% of the steps instead of 40%",
                 ["--model.decay_fraction", "0.2"]),
    "decay0.6": ("warmup-stable-decay decaying over the last 60% of the steps instead of 40%",
                 ["--model.decay_fraction", "0.6"]),
    "decay1.0": ("a linear decay over every step after warmup instead of the last 40%",
                 ["--model.decay_fraction", "1.0"]),
    "adamw": ("AdamW for the blocks' matrices too, instead of Muon", ["--model.optimizer", "adamw"]),
    "muon_ns3": ("Muon with 3 Newton-Schulz steps instead of 5", ["--model.muon_ns_steps", "3"]),
    "momentum0.95": ("Muon's momentum 0.95 instead of 0.9", ["--model.muon_momentum", "0.95"]),
    "adamw_lr3e-2": ("the AdamW half (embeddings, head, norms) at 3e-2 instead of 1e-2", ["--model.adamw_lr", "0.03"]),
    "adamw_lr3e-3": ("the AdamW half (embeddings, head, norms) at 3e-3 instead of 1e-2", ["--model.adamw_lr", "0.003"]),
    "muon_lr2e-2": ("Muon's half (the blocks' matrices) at 2e-2, the AdamW half kept at 1e-2",
                    ["--model.lr", "0.02", "--model.adamw_lr", "0.01"]),
    "muon_lr3e-2": ("Muon's half (the blocks' matrices) at 3e-2, the AdamW half kept at 1e-2",
                    ["--model.lr", "0.03", "--model.adamw_lr", "0.01"]),
    "noclip": ("no gradient clipping instead of clipping the norm at 0.5", ["--trainer.gradient_clip_val", "null"]),
    "betas0.95": ("Adam's betas 0.9/0.95 instead of 0.9/0.999 (the AdamW half)", ["--model.betas", "[0.9, 0.95]"]),
    "warmup50": ("50 warmup steps instead of 100", ["--model.warmup_steps", "50"]),
    "wd0": ("no weight decay instead of 0.01", ["--model.weight_decay", "0"]),
    "ema0.99": ("validation and checkpoints on an exponential moving average of the weights (decay 0.99)",
                ["--trainer.callbacks+", "minigpt.callbacks.EMAWeights", "--trainer.callbacks.decay", "0.99"]),
    "min_lr0": ("the decay down to 0 instead of 1e-3", ["--model.min_lr", "0"]),
    "learned": ("learned absolute positions instead of rotary", [M + "positional", "learned"]),
    "layernorm": ("LayerNorm instead of RMSNorm", [M + "norm", "layernorm"]),
    "gelu": ("GELU instead of ReLU²", [M + "activation", "gelu"]),
    "swiglu": ("SwiGLU (d_ff 536, as many weights) instead of ReLU²", [M + "activation", "swiglu", M + "d_ff", "536"]),
    "no_qk_norm": ("no QK-norm", [M + "qk_norm", "false"]),
    "no_zero_init": ("Xavier-initialised output projections instead of zeros", [M + "zero_init_proj", "false"]),
    "bias": ("biases in the blocks", [M + "bias", "true"]),
    "no_bigram": ("no hashed bigram embeddings (the recipe's table: 65,536 rows of 64 features, projected to the "
                  "width and added to the input)", [M + "bigram_buckets", "0"]),
    "bigram_dropout0": ("no dropout on the bigram table's rows instead of 0.3", [M + "bigram_dropout", "0"]),
    "bigram_dim128": ("bigram rows of 128 features instead of 64", [M + "bigram_dim", "128"]),
    "tied_shortlist": ("the shortlist's 1,000 words read their input vectors from the head's rows (tie_shortlist) "
                       "instead of a table of their own", [M + "tie_shortlist", "true"]),
    "d_ff960": ("d_ff 960 instead of 640 (the MLP 6 times the width instead of 4)", [M + "d_ff", "960"]),
    "bigram16k": ("a bigram table of 16,384 rows instead of 65,536", [M + "bigram_buckets", "16384"]),
    "dropout0.1": ("dropout 0.1 in the embeddings and blocks instead of none", [M + "dropout", "0.1"]),
    "block64": ("64-token blocks, 64 per batch instead of 128-token blocks, 32 per batch (the same tokens per step)",
                ["--data.block_size", "64", "--data.batch_size", "64"]),  # fmt: skip
    "block256": ("256-token blocks, 16 per batch (the same tokens per step)",
                 ["--data.block_size", "256", "--data.batch_size", "16"]),
    "block32": ("32-token blocks, 128 per batch", ["--data.block_size", "32", "--data.batch_size", "128"]),
    "batch16": ("16 blocks per batch instead of 32 (more steps of half the tokens)", ["--data.batch_size", "16"]),
    "no_unsup": ("the training reviews alone, without the 50,000 unlabelled ones", ["--data.include_unsup", "false"]),
    "vocab50k": ("the 50,000 most frequent words instead of 32,768 (max_size)", ["--data.max_size", "50000"]),
    "bpe16k": ("a byte-level BPE of 16,384 tokens trained on the training text instead of words (no <unk>)",
               ["--data.tokenizer", "bpe:16384"]),
    "min_freq1": (
        "every word of the training text in the vocabulary (min_freq 1, no max_size)",
        ["--data.min_freq", "1", "--data.max_size", "null"],
    ),
    "lr5e-3": ("learning rate 5e-3 instead of 1e-2", ["--model.lr", "0.005"]),
    "lr2e-2": ("learning rate 2e-2 instead of 1e-2", ["--model.lr", "0.02"]),
    "width256": ("width 256, 4 heads, d_ff 1024", [M + "n_embd", "256", M + "n_head", "4", M + "d_ff", "1024"]),
    "width200": ("width 200, d_ff 800 instead of 160 and 640", [M + "n_embd", "200", M + "d_ff", "800"]),
    "heads4": ("4 heads of width 40 instead of 2 of 80", [M + "n_head", "4"]),
    "cutoffs2k": ("adaptive cutoffs 2000/10000/25000 instead of 1000/5000/20000",
                  [M + "adaptive_cutoffs", "[2000, 10000, 25000]"]),
    "cutoffs700": ("adaptive cutoffs 700/3000/10000/20000 instead of 1000/5000/20000 (a fourth, narrower tail cluster)",
                   [M + "adaptive_cutoffs", "[700, 3000, 10000, 20000]"]),
    "div1.5": ("adaptive_div_value 1.5 instead of 2 (tail clusters of 106, 71 and 47 features instead of 80, 40, 20)",
               [M + "adaptive_div_value", "1.5"]),
    "layers3": ("3 layers instead of 2", [M + "n_layer", "3"]),
    "layers1": ("1 layer instead of 2", [M + "n_layer", "1"]),
    "no_compile": ("the blocks run eagerly instead of compiled (where torch.compile can build kernels)",
                   ["--model.compile", "false"]),
}  # fmt: skip


def main(argv: list[str] | None = None, extra: dict[str, tuple[str, list[str]]] | None = None) -> dict:
    """Run the levers; `extra` adds levers of the caller's to the table (a screen of candidates)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="aclImdb_v1.tar.gz")
    parser.add_argument("--config", default="imdb", help="the recipe the levers change (a file or a recipe name)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training minutes per run")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=[*LEVERS, *(extra or {})])
    parser.add_argument("--steps", type=int, help="train every row for this many steps instead of --minutes")
    parser.add_argument("--max_docs", type=int, default=1000, help="validation reviews scored per run (0: all)")
    parser.add_argument("--root", default="runs/levers", help="folder for the runs")
    parser.add_argument("--json", default=str(ROOT / "docs/levers.json"))
    args = parser.parse_args(argv)
    if not Path(args.archive).is_file():
        parser.error(f"--archive {args.archive} is not a file; pass the path of aclImdb_v1.tar.gz")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    names = ["recipe", *(n for n in args.levers if n != "recipe")]  # every effect is against the recipe's row
    levers = {**LEVERS, **(extra or {})}

    report = {"machine": machine(), "date": datetime.date.today().isoformat(),
              "minutes": None if args.steps else args.minutes, "steps": args.steps,
              "max_docs": args.max_docs, "command": " ".join(["python", "scripts/levers.py", *(argv or sys.argv[1:])]),
              "rows": []}  # fmt: skip
    budget = ["--trainer.max_time", max_time(args.minutes)]
    if args.steps:
        budget = ["--trainer.max_time", "null", "--trainer.max_steps", str(args.steps)]
    for name in names:
        what, options = levers[name]
        folder = Path(args.root) / name
        fit = minigpt("fit", "--config", args.config, "--data.archive", args.archive, *budget, *options)
        key = {"command": fit[1:], "configs": config_digests(fit), "max_docs": args.max_docs}

        def work() -> dict:
            ckpt, row = train(fit, folder, args.minutes * 60)
            if args.steps:  # the runs' time is not the budget: no rate to report
                row.pop("tokens_per_s")
            return {**row, "val": score(ckpt, folder, "val", args.max_docs)}

        start = time.time()
        row = {"lever": name, "what": what, "options": options, **kept_or_run(folder, key, work)}
        bpc = row["val"]["bits_per_character"]
        row["effect"] = bpc - report["rows"][0]["val"]["bits_per_character"] if report["rows"] else 0.0
        report["rows"].append(row)
        print(
            f"{name:14s} {row['steps']:>6,} steps  val {bpc:.4f} bits/char  ({row['effect']:+.4f})  "
            f"<unk> {row['val'].get('unk_rate', 0):.2%}  ({time.time() - start:.0f} s)",
            flush=True,
        )
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
