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
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from minigpt.callbacks import GenerationCallback, GracefulStop
from minigpt.checkpointing import AtomicCheckpointIO
from minigpt.data.datamodule import IMDBDataModule
from minigpt.data.sources import DataError
from minigpt.lit_module import LitMiniGPT, load_checkpoint_file

LIGHTNING_COMMANDS = ("fit", "validate", "test")
OWN_COMMANDS = {
    "prepare": "download (if asked), tokenize and cache the data; print what a run will see",
    "plot": "draw a run's train/validation loss curves from its TensorBoard files into a PNG",
    "generate": "continue prompts with a trained checkpoint (greedy, temperature, top-k, top-p)",
    "evaluate": "score a checkpoint on a split or a text file: loss, perplexity, bits per character",
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


# -- minigpt fit / validate / test --------------------------------------------------------------------
def default_config() -> str:
    """The recommended recipe, shipped inside the package (configs/imdb.yaml)."""
    return str(files("minigpt.configs") / "imdb.yaml")


class MiniGPTCLI(LightningCLI):
    """LightningCLI with block/vocab size linked once, fixed checkpointing and same-folder resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.block_size", "model.config.block_size")
        # The vocabulary is known only once the data is tokenized: link it at instantiation.
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_lightning_class_args(GenerationCallback, "generation")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        ckpt = cfg.get("ckpt_path")
        if ckpt:
            cfg["ckpt_path"] = ckpt = resolve_ckpt_path(ckpt, cfg)
            if self.subcommand == "fit":
                self._continue_in_same_version(cfg, Path(ckpt))
            else:
                self._config_from_checkpoint(cfg, ckpt)

    @staticmethod
    def _continue_in_same_version(cfg, ckpt: Path) -> None:
        """A resumed run logs into the checkpoint's lightning_logs/version_N, from its step on."""
        logger = cfg["trainer"].get("logger")
        if not isinstance(logger, dict | type(cfg)) or "TensorBoardLogger" not in str(logger.get("class_path", "")):
            return
        version_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        if version_dir is None or not version_dir.name.startswith("version_"):
            return
        init = logger["init_args"]
        if init.get("version") is None:
            init["save_dir"] = str(version_dir.parent.parent)
            init["name"] = version_dir.parent.name
            init["version"] = version_dir.name
            # Drop events a killed run logged after this checkpoint: one continuous curve.
            step = load_checkpoint_file(str(ckpt)).get("global_step")
            if step:
                init["purge_step"] = int(step)  # events are logged at global_step - 1

    @staticmethod
    def _config_from_checkpoint(cfg, ckpt: str) -> None:
        """validate/test --ckpt_path: build the model (and data vocab) the checkpoint was trained with."""
        hp = load_checkpoint_file(ckpt)
        for key, value in (hp["hyper_parameters"].get("config") or {}).items():
            if key not in ("vocab_size",):
                cfg["model"]["config"][key] = value
        data = (hp.get("minigpt") or {}).get("data") or {}
        passed = {a.split("=")[0][len("--data.") :] for a in sys.argv if a.startswith("--data.")}
        for key in ("source", "archive", "text_path", "min_freq", "max_size", "include_unsup", "val_fraction"):
            if key in data and key not in passed:
                cfg["data"][key] = data[key]
        cfg["data"]["block_size"] = cfg["model"]["config"]["block_size"]


def resolve_ckpt_path(ckpt: str, cfg) -> str:
    """``last`` -> the newest lightning_logs/version_*/checkpoints/last.ckpt; else check the file."""
    if ckpt in ("last", "best"):
        logger = cfg["trainer"].get("logger") or {}
        init = logger.get("init_args", {}) if hasattr(logger, "get") else {}
        root = Path(init.get("save_dir") or cfg["trainer"].get("default_root_dir") or ".") / (
            init.get("name") or "lightning_logs"
        )
        pattern = "last.ckpt" if ckpt == "last" else "best-*.ckpt"
        found = sorted(root.glob(f"version_*/checkpoints/{pattern}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"--ckpt_path {ckpt}: no {pattern} under {root}/version_*/checkpoints/")
        return str(found[-1])
    load_checkpoint_file(ckpt)  # one clear line for a missing, empty, corrupt or foreign file
    return ckpt


def run_lightning_cli(command: str, argv: list[str]) -> None:
    # `minigpt fit` alone runs the recommended recipe; a --config replaces it (never merges with it,
    # which would leak the recipe's settings into e.g. seed.yaml).
    if command == "fit" and not any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        argv = ["--config", default_config(), *argv]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    MiniGPTCLI(
        LitMiniGPT,
        IMDBDataModule,
        args=[command, *argv],
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        # Parse errors come back as exceptions so main() reports them in one line.
        parser_kwargs={"exit_on_error": False, command: {"exit_on_error": False}},
        trainer_defaults={
            # validate/test print their metrics; only training runs get a lightning_logs/version_N.
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": ".", "name": "lightning_logs"},
            }
            if command == "fit"
            else False,
            "callbacks": [LearningRateMonitor(logging_interval="step"), GracefulStop()],
            "plugins": [AtomicCheckpointIO()],
            "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        },
    )


# -- minigpt prepare ----------------------------------------------------------------------------------
def prepare(argv: list[str]) -> None:
    parser = ArgumentParser(prog="minigpt prepare", description=OWN_COMMANDS["prepare"], exit_on_error=False)
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


# -- minigpt plot -------------------------------------------------------------------------------------
def plot(argv: list[str]) -> None:
    from minigpt.plot import latest_run, plot_run

    parser = ArgumentParser(prog="minigpt plot", description=OWN_COMMANDS["plot"], exit_on_error=False)
    parser.add_argument("run_dir", nargs="?", default=None, help="lightning_logs/version_N (default: the newest)")
    parser.add_argument("--out", default="losses.png", help="PNG file to write")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir) if args.run_dir else latest_run()
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    print(plot_run(run_dir, args.out))


# -- minigpt generate ---------------------------------------------------------------------------------
def generate(argv: list[str]) -> None:
    from minigpt.generation import check_sampling, encode_prompt, stream
    from minigpt.lit_module import load_model

    p = ArgumentParser(prog="minigpt generate", description=OWN_COMMANDS["generate"], exit_on_error=False)
    p.add_argument("--ckpt_path", required=True, help="a minigpt checkpoint (vocab and config are inside)")
    p.add_argument("--prompt", action="append", default=None, help="text to continue (repeat for several)")
    p.add_argument("--prompt_file", default=None, help="a UTF-8 file with one prompt per line")
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int | None, default=50, help="keep the k most likely tokens (null = all)")
    p.add_argument("--top_p", type=float | None, default=0.95, help="nucleus sampling threshold (null = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="same seed, same text")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stream", action="store_true", help="print tokens as they are chosen")
    p.add_argument("--raw", action="store_true", help="print tokens separated by spaces, untidied")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt and sample")
    a = p.parse_args(argv)
    check_sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty)
    if a.num_samples < 1 or a.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be >= 1")
    prompts = list(a.prompt or [])
    if a.prompt_file:
        try:
            prompts += [line for line in Path(a.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read --prompt_file {a.prompt_file}: {err}") from err
        if not prompts:
            raise UserError(f"--prompt_file {a.prompt_file} holds no prompt (it is empty)")
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT or --prompt_file FILE")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(a.ckpt_path, map_location=device)
    encoded = [encode_prompt(tokenizer, text, block_size=model.config.block_size) for text in prompts]
    generator = torch.Generator(device=device).manual_seed(a.seed)
    for text, ids in zip(prompts, encoded):
        batch = [ids] * a.num_samples  # rows sample independently from one generator
        t0 = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in batch]
        stops = ["length"] * len(batch)
        if a.stream and not a.json:
            print(text, end="", flush=True)
        for step in stream(
            model, batch, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
            top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop_ids=(tokenizer.eot_index,),
            generator=generator,
        ):  # fmt: skip
            for i, tok in enumerate(step):
                if tok is None:
                    continue
                if tok == tokenizer.eot_index:
                    stops[i] = "eos"
                    continue
                if a.stream and not a.json and i == 0 and a.num_samples == 1:
                    print(_continuation(tokenizer, tokens[i], tok, raw=a.raw), end="", flush=True)
                tokens[i].append(tok)
        seconds = time.perf_counter() - t0
        for i, toks in enumerate(tokens):
            out = tokenizer.decode(toks, tidy=not a.raw)
            if a.json:
                record = {"prompt": text, "sample": i, "text": out, "tokens": toks, "stop_reason": stops[i]}
                record["tokens_per_s"] = round(sum(map(len, tokens)) / max(seconds, 1e-9), 2)
                print(json.dumps(record))
            elif a.stream and a.num_samples == 1:
                print()
            else:
                print(f"{text} {out}" if a.num_samples == 1 else f"[{i}] {text} {out}")


def _continuation(tokenizer, previous: list[int], token: int, *, raw: bool) -> str:
    """The text one more token adds to a tidied decode (what --stream prints)."""
    if raw:
        return " " + tokenizer.decode([token])
    before = tokenizer.decode(previous, tidy=True)
    after = tokenizer.decode([*previous, token], tidy=True)
    return after[len(before) :] if previous else " " + after


# -- minigpt evaluate ---------------------------------------------------------------------------------
def evaluate(argv: list[str]) -> None:
    from minigpt.evaluation import evaluate_ids, flatten
    from minigpt.lit_module import load_model

    p = ArgumentParser(prog="minigpt evaluate", description=OWN_COMMANDS["evaluate"], exit_on_error=False)
    p.add_argument("--ckpt_path", required=True, help="a minigpt checkpoint")
    p.add_argument("--split", default="test", help="test | val | train | unsup of the checkpoint's data")
    p.add_argument("--text_file", default=None, help="plain text (documents separated by blank lines) or JSONL")
    p.add_argument("--archive", default=None, help="aclImdb_v1.tar.gz to read the split from (else the run's data)")
    p.add_argument("--max_docs", type=int | None, default=None, help="only the first N documents")
    p.add_argument("--stride", type=int | None, default=None, help="window step (< block_size: more context)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    a = p.parse_args(argv)
    if a.max_docs is not None and a.max_docs < 1:
        raise UserError(f"--max_docs must be >= 1, got {a.max_docs}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(a.ckpt_path, map_location=device)
    if a.text_file:
        docs, what = _text_file_documents(a.text_file), a.text_file
        texts = docs[: a.max_docs]
        ids, offsets = flatten([tokenizer.encode(t) for t in texts])
        chars = sum(map(len, texts))
    else:
        ids, offsets, chars, what = _split_documents(a.ckpt_path, tokenizer, a.split, a.archive, a.max_docs)
    result = evaluate_ids(
        model, ids, offsets, chars, unk_index=tokenizer.unk_index, stride=a.stride, batch_size=a.batch_size,
        device=device,
    )  # fmt: skip
    r = result.to_dict()
    print(f"data        {what}: {r['documents']:,} documents, {r['characters']:,} characters")
    print(f"tokens      {r['tokens']:,} scored ({r['unk_rate']:.2%} <unk>)")
    print(f"loss        {r['loss']:.4f} nats/token   perplexity {r['perplexity']:.2f}")
    print(f"bits/char   {r['bits_per_character']:.4f}   ({r['seconds']:.1f} s)")
    if a.json:
        print(json.dumps({"data": what, **r}))


def _text_file_documents(path: str) -> list[str]:
    from minigpt.data.sources import read_text_documents

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--text_file {path} does not exist")
    docs = read_text_documents(p)
    if not docs:
        raise UserError(f"--text_file {path} is empty (no text to score)")
    return docs


def _split_documents(ckpt_path: str, tokenizer, split: str, archive: str | None, max_docs: int | None):
    """The run's own data split, from the token cache (same windows as `minigpt test`)."""
    import inspect

    from minigpt.data.sources import read_imdb

    ckpt = load_checkpoint_file(ckpt_path)
    data = dict((ckpt.get("minigpt") or {}).get("data") or {})
    known = inspect.signature(IMDBDataModule.__init__).parameters
    kwargs = {k: v for k, v in data.items() if k in known}
    if archive:
        kwargs.update(source="imdb", archive=archive)
    if split == "unsup":
        path = kwargs.get("archive")
        if not path:
            raise UserError("--split unsup needs the official archive: pass --archive PATH/aclImdb_v1.tar.gz")
        texts = [d.text for d in read_imdb(path, ("unsup",))["unsup"][:max_docs]]
        ids, offsets = _flatten_encoded(tokenizer, texts)
        return ids, offsets, sum(map(len, texts)), f"{path} unsup"
    corpus = IMDBDataModule(**kwargs).corpus
    if split not in corpus.splits:
        raise UserError(
            f"the {corpus.source} data has no {split!r} split (it has {', '.join(corpus.splits)}); "
            "for test pass --archive PATH/aclImdb_v1.tar.gz"
        )
    if corpus.vocab.itos != tokenizer.itos:
        raise UserError(
            "the checkpoint's vocabulary differs from this data's; evaluate with the data it was trained on"
        )
    s = corpus.splits[split]
    n = corpus.documents(split) if max_docs is None else min(max_docs, corpus.documents(split))
    offsets = np.asarray(s["offsets"][: n + 1])
    return (
        np.asarray(s["ids"][: offsets[-1]]),
        offsets,
        int(np.asarray(s["chars"][:n]).sum()),
        f"{corpus.source} {split}",
    )


def _flatten_encoded(tokenizer, texts: list[str]):
    from minigpt.evaluation import flatten

    return flatten([tokenizer.encode(t) for t in texts])


# -- entry point -------------------------------------------------------------------------------------
def _usage() -> str:
    lines = ["usage: minigpt {fit,validate,test," + ",".join(OWN_COMMANDS) + "} ...", ""]
    lines += [f"  {c:<9} Lightning {c} (see minigpt {c} --help)" for c in LIGHTNING_COMMANDS]
    lines += [f"  {c:<9} {h}" for c, h in OWN_COMMANDS.items()]
    return "\n".join(lines)


_default_formatwarning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """minigpt's own warnings (e.g. unknown prompt words) as one line; others as Python prints them."""
    if "/minigpt/" in filename.replace("\\", "/"):
        return f"minigpt: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    # Deprecation notices that dependencies raise about each other: nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    _setup_logging()
    try:
        if command in LIGHTNING_COMMANDS:
            run_lightning_cli(command, rest)
        elif command == "prepare":
            prepare(rest)
        elif command == "plot":
            plot(rest)
        elif command == "generate":
            generate(rest)
        elif command == "evaluate":
            evaluate(rest)
        else:
            _fail(f"unknown command {command!r}; run 'minigpt --help' for the list")
    except (UserError, DataError, ValueError, FileNotFoundError, ArgumentError, FloatingPointError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")


if __name__ == "__main__":
    main()
