"""``minigpt compare``: a minigpt checkpoint and a Hugging Face model side by side."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from minigpt.checkpoint import model_from_checkpoint, read_checkpoint
from minigpt.commands._common import Output
from minigpt.commands.evaluate import corpus_spec, spread, text_file_documents
from minigpt.commands.generate import add_sampling_arguments
from minigpt.errors import UserError
from minigpt.generation import SamplingConfig, generate_text

# Shorter samples than `minigpt generate`'s, two per prompt side by side, at the PyTorch tutorial's temperature.
SAMPLING_DEFAULTS = {"max_new_tokens": 40, "temperature": 0.7}


def add_arguments(parser, argv: list[str]) -> set[str]:
    """The sampling options, built from `SamplingConfig`, with this command's `SAMPLING_DEFAULTS`."""
    return add_sampling_arguments(parser, **SAMPLING_DEFAULTS)


def compare(
    ckpt_path: str,
    hf_model: str,
    prompt: list[str] | None = None,
    text_file: str | None = None,
    split: str | None = None,
    archive: str | None = None,
    max_docs: int = 100,
    seed: int = 0,
    json: bool = False,
    **sampling: Any,
) -> None:
    """Samples from both models for the same prompts and seed, and bits per character on the same text.

    Args:
        ckpt_path: a minigpt checkpoint.
        hf_model: a local Hugging Face causal LM folder (or a cached model name).
        prompt: prompt(s) to continue with both models (default: "the movie was").
        text_file: text to score (documents separated by blank lines, or JSONL).
        split: or a split of the checkpoint's data to score (e.g. test).
        archive: aclImdb_v1.tar.gz for --split (else the run's data).
        max_docs: documents to score.
        seed: both models sample with generators seeded with this.
        json: print one JSON object on stdout (the rest goes to stderr).
        **sampling: `SamplingConfig` fields (--max_new_tokens, --temperature, --top_k, ...); those not
            given keep `SAMPLING_DEFAULTS`, then `SamplingConfig`'s defaults.
    """
    sampling = SamplingConfig(**{**SAMPLING_DEFAULTS, **sampling})
    if max_docs < 1:
        raise UserError(f"--max_docs must be >= 1, got {max_docs}")
    ckpt = read_checkpoint(ckpt_path)
    model, tok = model_from_checkpoint(ckpt, ckpt_path)
    from minigpt.hf import hf_bits_per_character, hf_generate_text, load_hf_gpt2, minigpt_bits_per_character

    hf, hf_tok = load_hf_gpt2(hf_model)
    texts = _texts(ckpt, text_file, split, archive, max_docs)
    out = Output(json)
    samples = []
    for p in prompt or ["the movie was"]:
        mine = generate_text(model, tok, p, sampling, generator=torch.Generator().manual_seed(seed))
        theirs = hf_generate_text(hf, hf_tok, p, sampling, generator=torch.Generator().manual_seed(seed))
        samples.append({"prompt": p, "minigpt": mine, "hf": theirs})
        out.say(f"prompt   {p}", f"minigpt  {mine}", f"hf       {theirs}", "")
    result = {"samples": samples, "sampling": asdict(sampling), "seed": seed}
    if texts:
        result["minigpt"] = minigpt_bits_per_character(model, tok, texts)
        result["hf"] = hf_bits_per_character(hf, hf_tok, texts)
        out.say(f"{'':10}{'bits/char':>10}{'tokens':>10}{'perplexity':>12}   ({len(texts)} documents)")
        for name in ("minigpt", "hf"):
            r = result[name]
            out.say(f"{name:10}{r['bits_per_character']:10.4f}{r['tokens']:10,}{r['perplexity']:12.2f}")
    out.result(result)


def _texts(ckpt: dict, text_file: str | None, split: str | None, archive: str | None, max_docs: int) -> list[str]:
    """The texts both models score: --text_file, or raw reviews of --split."""
    if text_file:
        docs = text_file_documents(text_file)
        return [docs[i] for i in spread(len(docs), max_docs)]
    if not split:
        return []
    from minigpt.data.documents import read_splits, resolve_source

    spec, cache = corpus_spec(ckpt, archive)
    kind, path = resolve_source(spec, cache)
    splits = read_splits(spec, kind, path)
    if split not in splits:
        raise UserError(f"the {kind} data has no {split!r} split; for test pass --archive PATH/aclImdb_v1.tar.gz")
    docs = splits[split]
    return [docs[i].text for i in spread(len(docs), max_docs)]
