"""``minigpt generate``: continue prompts with a trained checkpoint.

Prompts come from ``--prompt`` (repeatable), ``--prompt_file`` (``-`` = stdin, one per line) or,
on a terminal without either, from a loop that asks for them (the model is loaded once).
Imports torch and minigpt's pure layers only: no Lightning, no transformers.
"""

from __future__ import annotations

import sys
import time
import typing
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import docstring_parser
import torch

from minigpt.checkpoint import load_model
from minigpt.commands._common import Output
from minigpt.errors import UserError
from minigpt.generation import SamplingConfig, banned_special_ids, encode_prompt
from minigpt.generation import stream as stream_tokens


def add_arguments(parser, argv: list[str]) -> set[str]:
    """The sampling options, built from `SamplingConfig` (see `add_sampling_arguments`)."""
    return add_sampling_arguments(parser)


def add_sampling_arguments(parser, **defaults) -> set[str]:
    """Add one option per `SamplingConfig` field (--max_new_tokens, --temperature, ...) to a command's parser.

    Each option takes the field's type, default and attribute docstring (its help), so a new field
    reaches every command that calls this; the values arrive as keyword arguments of the command.

    Args:
        parser: The command's jsonargparse parser.
        **defaults: This command's own defaults for some fields (the others keep `SamplingConfig`'s).

    Returns:
        The names of the options added (the command's signature must not add them again).
    """
    names = [f.name for f in fields(SamplingConfig)]
    unknown = set(defaults) - set(names)
    if unknown:
        raise TypeError(f"SamplingConfig has no field {sorted(unknown)}; its fields are {names}.")
    types = typing.get_type_hints(SamplingConfig)
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(SamplingConfig).params}
    group = parser.add_argument_group("sampling (how each new token is chosen)")
    for f in fields(SamplingConfig):
        group.add_argument(f"--{f.name}", type=types[f.name], default=defaults.get(f.name, f.default),
                           help=docs.get(f.name))  # fmt: skip
    return set(names)


def generate(
    ckpt_path: str,
    prompt: list[str] | None = None,
    prompt_file: str | None = None,
    seed: int = 0,
    num_samples: int = 1,
    allow_unk: bool = False,
    stream: bool = False,
    raw: bool = False,
    json: bool = False,
    **sampling: Any,
) -> None:
    """Continue prompts with a trained checkpoint (its vocabulary and model config are inside).

    Args:
        ckpt_path: a minigpt checkpoint.
        prompt: text to continue (repeat the option for several).
        prompt_file: a UTF-8 file with one prompt per line; - reads them from stdin.
        seed: same seed, same text.
        num_samples: samples per prompt.
        allow_unk: let samples contain <unk> (<pad> is never generated).
        stream: print tokens as they are chosen.
        raw: print tokens separated by spaces, untidied.
        json: print one JSON object (all prompts and samples) on stdout.
        **sampling: `SamplingConfig` fields (--max_new_tokens, --temperature, --top_k, ...); those not
            given keep `SamplingConfig`'s defaults.
    """
    sampling = SamplingConfig(**sampling)
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")
    prompts = list(prompt or [])
    if prompt_file:
        prompts += _read_prompts(prompt_file)
    interactive = not prompts and sys.stdin.isatty()
    if not prompts and not interactive:
        raise UserError("give a prompt: --prompt TEXT or --prompt_file FILE (- for stdin)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(ckpt_path, map_location=device)
    writer = _Writer(model, tokenizer, sampling, allow_unk, torch.Generator(device=device).manual_seed(seed))
    out = Output(json)
    records: list[dict] = []
    for text in _ask() if interactive else prompts:
        records += writer.run(text, num_samples, out, stream=stream and not json, raw=raw)
    out.result({"sampling": asdict(sampling), "seed": seed, "samples": records})


def _read_prompts(prompt_file: str) -> list[str]:
    try:
        text = sys.stdin.read() if prompt_file == "-" else Path(prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --prompt_file {prompt_file}: {err}") from err
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompt_file {prompt_file} holds no prompt (it is empty)")
    return prompts


def _ask() -> Iterable[str]:
    """Prompts typed at the terminal; an empty line asks again, Ctrl-D or Ctrl-C ends."""
    print("type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            text = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text.strip():
            yield text


class _Writer:
    """The loaded model and how to sample from it: one call per prompt."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, allow_unk: bool, generator: torch.Generator):
        self.model, self.tokenizer, self.sampling, self.generator = model, tokenizer, sampling, generator
        self.banned = banned_special_ids(tokenizer, allow_unk=allow_unk)

    def run(self, text: str, num_samples: int, out: Output, *, stream: bool, raw: bool) -> list[dict]:
        tok = self.tokenizer
        ids = encode_prompt(tok, text, block_size=self.model.config.block_size)
        batch = [ids] * num_samples  # rows sample independently from one generator
        t0 = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in batch]
        stops = ["length"] * len(batch)
        shown = ""  # the part of the continuation already printed by --stream
        live = stream and num_samples == 1
        if live:
            print(text, end="", flush=True)
        steps = stream_tokens(
            self.model, batch, self.sampling, stop_ids=(tok.eot_index,), generator=self.generator,
            banned_ids=self.banned,
        )  # fmt: skip
        for step in steps:
            for i, t in enumerate(step):
                if t is None:
                    continue
                if t == tok.eot_index:
                    stops[i] = "eos"
                    continue
                tokens[i].append(t)
                if live:
                    shown = _stream_piece(tok, tokens[i], shown, raw=raw)
        seconds = time.perf_counter() - t0
        rate = round(sum(map(len, tokens)) / max(seconds, 1e-9), 2)
        records = []
        for i, toks in enumerate(tokens):
            continuation = tok.decode(toks, tidy=not raw)
            records.append(
                {"prompt": text, "sample": i, "text": continuation, "tokens": toks, "stop_reason": stops[i],
                 "tokens_per_s": rate}
            )  # fmt: skip
            if live:
                print()
            elif not out.as_json:
                print(f"{text} {continuation}" if num_samples == 1 else f"[{i}] {text} {continuation}")
        return records


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
