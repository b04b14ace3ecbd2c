"""The ``minigpt`` command: Lightning's ``fit/validate/test`` plus minigpt's own tools.

    minigpt fit      [--config configs/imdb.yaml] [--trainer.* --model.* --data.*]
    minigpt validate / test --ckpt_path PATH
    minigpt prepare  [--data.*] [--show N] [--json]

Every user error ends as one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from jsonargparse import ArgumentParser

from minigpt.data.datamodule import IMDBDataModule
from minigpt.data.sources import DataError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
OWN_COMMANDS = {
    "prepare": "download (if asked), tokenize and cache the data; print what a run will see",
}


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _fail(message: str) -> None:
    print(f"minigpt: error: {message}", file=sys.stderr)
    sys.exit(2)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("minigpt")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# -- minigpt prepare ----------------------------------------------------------------------------------
def prepare(argv: list[str]) -> None:
    parser = ArgumentParser(prog="minigpt prepare", description=OWN_COMMANDS["prepare"])
    parser.add_class_arguments(IMDBDataModule, "data")
    parser.add_argument("--show", type=int, default=0, help="also print N decoded training pairs (input | target)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    dm = IMDBDataModule(**args.data.as_dict())
    corpus = dm.corpus
    summary = {
        "source": corpus.source,
        "input": corpus.meta["input"],
        "splits": {s: {"documents": corpus.documents(s), "tokens": corpus.tokens(s)} for s in corpus.splits},
        "vocab_size": len(corpus.vocab),
        "val_unk_rate": round(corpus.unk_rate("val"), 6),
        "seconds": round(time.perf_counter() - t0, 3),
        "cache": str(corpus.path),
    }
    print(f"source      {summary['source']} ({summary['input']})")
    for split, n in summary["splits"].items():
        print(f"{split:<11} {n['documents']:>9,} documents {n['tokens']:>12,} tokens")
    print(f"vocab       {summary['vocab_size']:,} tokens (min_freq {dm.spec.min_freq}, max_size {dm.spec.max_size})")
    print(f"val <unk>   {summary['val_unk_rate']:.2%} of validation tokens")
    print(f"seconds     {summary['seconds']:.2f}   cache {summary['cache']}")
    if args.show:
        dm.setup("fit")
        ds = dm.datasets["train"]
        for i in range(min(args.show, len(ds))):
            x, y = ds[i]
            print(f"[{i}] {dm.vocab.decode(x)}  |  {dm.vocab.decode(y)}")
    if args.json:
        print(json.dumps(summary))


# -- entry point -------------------------------------------------------------------------------------
def _usage() -> str:
    lines = ["usage: minigpt {fit,validate,test," + ",".join(OWN_COMMANDS) + "} ...", ""]
    lines += [f"  {c:<9} Lightning {c} (see minigpt {c} --help)" for c in LIGHTNING_COMMANDS]
    lines += [f"  {c:<9} {h}" for c, h in OWN_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    _setup_logging()
    try:
        if command in LIGHTNING_COMMANDS:
            from minigpt.lightning_cli import run_lightning_cli  # heavy imports only when training

            run_lightning_cli(command, rest)
        elif command == "prepare":
            prepare(rest)
        else:
            _fail(f"unknown command {command!r}; run 'minigpt --help' for the list")
    except (UserError, DataError, ValueError, FileNotFoundError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")


if __name__ == "__main__":
    main()
