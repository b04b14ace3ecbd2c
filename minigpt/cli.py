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
from lightning.pytorch.utilities.exceptions import MisconfigurationException

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
    "convert": "Hugging Face GPT-2 folder -> minigpt checkpoint (--from_hf), or back (--to_hf)",
    "compare": "a minigpt checkpoint and a Hugging Face model side by side: samples and bits per character",
}


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# What main() reports as one line and exit code 2 (anything else is a bug and keeps its traceback).
USER_ERRORS = (
    UserError, DataError, ValueError, FileNotFoundError, ArgumentError, FloatingPointError, MisconfigurationException
)  # fmt: skip


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

    def __init__(self, *args, **kwargs):
        # The options as typed, to tell values the user passed from values of a config file.
        self.typed_args = list(kwargs.get("args") or sys.argv[1:])
        self._checkpoints: dict[str, dict] = {}
        super().__init__(*args, **kwargs)

    def _checkpoint(self, path: str) -> dict:
        """Each checkpoint file read once per command (several hooks below need it)."""
        if path not in self._checkpoints:
            self._checkpoints[path] = load_checkpoint_file(path)
        return self._checkpoints[path]

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyper-parameters here, before any hook: check the file
        # first so a missing, empty, corrupt or foreign one is one line, not a traceback.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best"):
            self._checkpoint(ckpt)
        super()._parse_ckpt_path()

    def _passed(self, prefix: str) -> set[str]:
        return {a.split("=")[0][len(prefix) :] for a in self.typed_args if a.startswith(prefix)}

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
        if cfg["model"].get("init_from"):
            init_from = cfg["model"]["init_from"]
            self._architecture_from(cfg, init_from, self._checkpoint(init_from), self._passed("--model.config."))
        ckpt = cfg.get("ckpt_path")
        if ckpt:
            cfg["ckpt_path"] = ckpt = resolve_ckpt_path(ckpt, cfg)
            if self.subcommand == "fit":
                self._continue_in_same_version(cfg, Path(ckpt), self._checkpoint(ckpt))
            else:
                self._config_from_checkpoint(cfg, self._checkpoint(ckpt), self._passed("--data."))

    @staticmethod
    def _continue_in_same_version(cfg, ckpt: Path, loaded: dict) -> None:
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
            step = loaded.get("global_step")
            if step:
                init["purge_step"] = int(step)  # events are logged at global_step - 1

    @staticmethod
    def _architecture_from(cfg, init_from: str, ckpt: dict, passed: set[str]) -> None:
        """Fine-tuning: the model's architecture (and a pretrained tokenizer) come from the checkpoint."""
        for key, value in (ckpt["hyper_parameters"].get("config") or {}).items():
            if key not in ("vocab_size", "block_size", "dropout") and key not in passed:
                cfg["model"]["config"][key] = value
        stored_block = (ckpt["hyper_parameters"].get("config") or {}).get("block_size", 0)
        if cfg["data"]["block_size"] > stored_block:
            raise UserError(
                f"data.block_size {cfg['data']['block_size']} is larger than the position table of {init_from} "
                f"({stored_block}); use a block_size <= {stored_block}"
            )
        tok = (ckpt.get("minigpt") or {}).get("tokenizer") or {}
        if tok.get("kind") == "bpe" and not cfg["data"].get("tokenizer"):
            cfg["data"]["tokenizer"] = init_from

    @staticmethod
    def _config_from_checkpoint(cfg, hp: dict, passed: set[str]) -> None:
        """validate/test --ckpt_path: build the model (and data vocab) the checkpoint was trained with.

        Lightning fills the model from an explicit path already; ``last``/``best`` need this."""
        for key, value in (hp["hyper_parameters"].get("config") or {}).items():
            if key not in ("vocab_size",):
                cfg["model"]["config"][key] = value
        data = (hp.get("minigpt") or {}).get("data") or {}
        for key in ("source", "archive", "text_path", "min_freq", "max_size", "include_unsup", "val_fraction"):
            if key in data and key not in passed:
                cfg["data"][key] = data[key]
        cfg["data"]["block_size"] = cfg["model"]["config"]["block_size"]


def resolve_ckpt_path(ckpt: str, cfg) -> str:
    """``last``/``best`` -> the newest such file under lightning_logs/version_*/checkpoints/; else the path."""
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
    return ckpt  # a given file was checked when Lightning's _parse_ckpt_path ran


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
    from minigpt.generation import SamplingConfig, banned_special_ids, check_sampling, encode_prompt, stream
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
        shown = ""  # the part of the continuation already printed by --stream
        if a.stream and not a.json:
            print(text, end="", flush=True)
        for step in stream(
            model, batch, SamplingConfig(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty),
            stop_ids=(tokenizer.eot_index,), generator=generator, banned_ids=banned_special_ids(tokenizer),
        ):  # fmt: skip
            for i, tok in enumerate(step):
                if tok is None:
                    continue
                if tok == tokenizer.eot_index:
                    stops[i] = "eos"
                    continue
                tokens[i].append(tok)
                if a.stream and not a.json and i == 0 and a.num_samples == 1:
                    shown = _stream_piece(tokenizer, tokens[i], shown, raw=a.raw)
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


def _stream_piece(tokenizer, tokens: list[int], shown: str, *, raw: bool) -> str:
    """Print what the newest token adds to the decoded continuation; return the text shown so far.

    Decoding the whole continuation keeps tidy spacing (word vocab) and multi-byte characters
    (BPE) right; a BPE piece that ends inside a UTF-8 character (U+FFFD) waits for the next token.
    """
    text = tokenizer.decode(tokens, tidy=not raw)
    if tokenizer.kind != "bpe":
        text = " " + text
    if text.endswith("\ufffd") or not text.startswith(shown):
        return shown
    print(text[len(shown) :], end="", flush=True)
    return text


# -- minigpt evaluate ---------------------------------------------------------------------------------
def evaluate(argv: list[str]) -> None:
    from minigpt.data.corpus import encode_documents
    from minigpt.evaluation import evaluate_ids
    from minigpt.lit_module import model_from_checkpoint

    p = ArgumentParser(prog="minigpt evaluate", description=OWN_COMMANDS["evaluate"], exit_on_error=False)
    p.add_argument("--ckpt_path", required=True, help="a minigpt checkpoint")
    p.add_argument("--split", default="test", help="test | val | train | unsup of the checkpoint's data")
    p.add_argument("--text_file", default=None, help="plain text (documents separated by blank lines) or JSONL")
    p.add_argument("--archive", default=None, help="aclImdb_v1.tar.gz to read the split from (else the run's data)")
    p.add_argument(
        "--max_docs", type=int | None, default=None, help="only N documents, spread evenly over the split or file"
    )
    p.add_argument("--stride", type=int | None, default=None, help="window step (< block_size: more context)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    a = p.parse_args(argv)
    if a.max_docs is not None and a.max_docs < 1:
        raise UserError(f"--max_docs must be >= 1, got {a.max_docs}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint_file(a.ckpt_path, map_location=device)
    model, tokenizer = model_from_checkpoint(ckpt, a.ckpt_path)
    if a.text_file:
        docs, what = _text_file_documents(a.text_file), a.text_file
        texts = [docs[i] for i in spread(len(docs), a.max_docs)]
        ids, offsets = encode_documents(tokenizer, texts)
        chars = sum(map(len, texts))
    else:
        ids, offsets, chars, what = _split_documents(ckpt, tokenizer, a.split, a.archive, a.max_docs)
    result = evaluate_ids(
        model, ids, offsets, chars, unk_index=tokenizer.unk_index, eot_index=tokenizer.eot_index, stride=a.stride,
        pad_index=tokenizer.pad_index,
        batch_size=a.batch_size,
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


def _split_documents(ckpt: dict, tokenizer, split: str, archive: str | None, max_docs: int | None):
    """The run's own data split, from the token cache (same windows as `minigpt test`)."""
    from minigpt.data.corpus import encode_documents
    from minigpt.data.sources import read_imdb

    kwargs = _data_kwargs(ckpt, archive)
    if split == "unsup":
        path = kwargs.get("archive")
        if not path:
            raise UserError("--split unsup needs the official archive: pass --archive PATH/aclImdb_v1.tar.gz")
        docs = read_imdb(path, ("unsup",))["unsup"]
        texts = [docs[i].text for i in spread(len(docs), max_docs)]
        ids, offsets = encode_documents(tokenizer, texts)
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
    ids, offsets, chars = np.asarray(s["ids"]), np.asarray(s["offsets"]), np.asarray(s["chars"])
    if max_docs is not None and max_docs < corpus.documents(split):
        keep = spread(corpus.documents(split), max_docs)
        lengths = offsets[keep + 1] - offsets[keep]
        ids = np.concatenate([ids[offsets[d] : offsets[d + 1]] for d in keep])
        offsets, chars = np.concatenate(([0], np.cumsum(lengths))), chars[keep]
    return ids, offsets, int(chars.sum()), f"{corpus.source} {split}"


def spread(total: int, n: int | None) -> np.ndarray:
    """n document indices spread evenly over 0..total-1 (all of them when n is None or >= total).

    Splits are stored sorted by label, so the first n would all be negative reviews."""
    if n is None or n >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def _data_kwargs(ckpt: dict, archive: str | None) -> dict:
    """The data module arguments a checkpoint was trained with (optionally on another archive)."""
    import inspect

    data = (ckpt.get("minigpt") or {}).get("data") or {}
    known = inspect.signature(IMDBDataModule.__init__).parameters
    kwargs = {k: v for k, v in data.items() if k in known}
    if archive:
        kwargs.update(source="imdb", archive=archive)
    return kwargs


# -- minigpt convert / compare ------------------------------------------------------------------------
def convert(argv: list[str]) -> None:
    p = ArgumentParser(prog="minigpt convert", description=OWN_COMMANDS["convert"], exit_on_error=False)
    p.add_argument("--from_hf", default=None, help="a local Hugging Face GPT-2 folder (config, weights, tokenizer)")
    p.add_argument("--out", default=None, help="with --from_hf: the minigpt checkpoint to write")
    p.add_argument("--ckpt_path", default=None, help="with --to_hf: the minigpt checkpoint to export")
    p.add_argument("--to_hf", default=None, help="with --ckpt_path: the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a = p.parse_args(argv)
    from minigpt.convert import convert_from_hf, convert_to_hf  # transformers: imported only here

    if a.from_hf and a.out and not (a.ckpt_path or a.to_hf):
        print(convert_from_hf(a.from_hf, a.out, overwrite=a.overwrite))
    elif a.ckpt_path and a.to_hf and not (a.from_hf or a.out):
        print(convert_to_hf(a.ckpt_path, a.to_hf, overwrite=a.overwrite))
    else:
        raise UserError("use either --from_hf DIR --out CKPT or --ckpt_path CKPT --to_hf DIR")


def compare(argv: list[str]) -> None:
    p = ArgumentParser(prog="minigpt compare", description=OWN_COMMANDS["compare"], exit_on_error=False)
    p.add_argument("--ckpt_path", required=True, help="a minigpt checkpoint")
    p.add_argument("--hf_model", required=True, help="a local Hugging Face causal LM folder (or a cached name)")
    p.add_argument("--prompt", action="append", default=None, help="prompt(s) to continue with both models")
    p.add_argument("--text_file", default=None, help="text to score (documents separated by blank lines, or JSONL)")
    p.add_argument("--split", default=None, help="or a split of the checkpoint's data to score (e.g. test)")
    p.add_argument("--archive", default=None, help="aclImdb_v1.tar.gz for --split (else the run's data)")
    p.add_argument("--max_docs", type=int, default=100, help="documents to score")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_k", type=int | None, default=50)
    p.add_argument("--top_p", type=float | None, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    a = p.parse_args(argv)
    from minigpt.generation import SamplingConfig, check_sampling, generate_text
    from minigpt.hf import hf_bits_per_character, hf_generate_text, load_hf_gpt2, minigpt_bits_per_character
    from minigpt.lit_module import model_from_checkpoint

    check_sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    if a.max_docs < 1:
        raise UserError(f"--max_docs must be >= 1, got {a.max_docs}")
    ckpt = load_checkpoint_file(a.ckpt_path)
    model, tok = model_from_checkpoint(ckpt, a.ckpt_path)
    hf_model, hf_tok = load_hf_gpt2(a.hf_model)
    texts = _compare_texts(a, ckpt)
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    samples = []
    for prompt in a.prompt or ["the movie was"]:
        g1, g2 = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(a.seed)
        mine = generate_text(model, tok, prompt, SamplingConfig(**sampling), generator=g1)
        theirs = hf_generate_text(hf_model, hf_tok, prompt, SamplingConfig(**sampling), generator=g2)
        samples.append({"prompt": prompt, "minigpt": mine, "hf": theirs})
        print(f"prompt   {prompt}\nminigpt  {mine}\nhf       {theirs}\n")
    result = {"samples": samples, "sampling": sampling, "seed": a.seed}
    if texts:
        result["minigpt"] = minigpt_bits_per_character(model, tok, texts)
        result["hf"] = hf_bits_per_character(hf_model, hf_tok, texts)
        print(f"{'':10}{'bits/char':>10}{'tokens':>10}{'perplexity':>12}   ({len(texts)} documents)")
        for name in ("minigpt", "hf"):
            r = result[name]
            print(f"{name:10}{r['bits_per_character']:10.4f}{r['tokens']:10,}{r['perplexity']:12.2f}")
    if a.json:
        print(json.dumps(result))


def _compare_texts(a, ckpt: dict) -> list[str]:
    """The texts both models score: --text_file, or raw reviews of --split."""
    if a.text_file:
        docs = _text_file_documents(a.text_file)
        return [docs[i] for i in spread(len(docs), a.max_docs)]
    if not a.split:
        return []
    from minigpt.data.corpus import read_splits, resolve_source

    dm = IMDBDataModule(**_data_kwargs(ckpt, a.archive))
    kind, path = resolve_source(dm.spec, dm.cache_dir)
    splits = read_splits(dm.spec, kind, path)
    if a.split not in splits:
        raise UserError(f"the {kind} data has no {a.split!r} split; for test pass --archive PATH/aclImdb_v1.tar.gz")
    docs = splits[a.split]
    return [docs[i].text for i in spread(len(docs), a.max_docs)]


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
        elif command == "convert":
            convert(rest)
        elif command == "compare":
            compare(rest)
        else:
            _fail(f"unknown command {command!r}; run 'minigpt --help' for the list")
    except USER_ERRORS as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")


if __name__ == "__main__":
    main()
