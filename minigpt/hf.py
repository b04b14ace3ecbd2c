"""Hugging Face causal LMs beside minigpt: load them from local folders, score and sample them.

- `load_hf_gpt2` reads a model and its tokenizer from a local folder (or the local Hugging Face
  cache); it never touches the network. A folder minigpt exported in its own architecture loads with
  minigpt's classes (`minigpt.hf_model`, registered when transformers' Auto classes load).
- `hf_bits_per_character` / `minigpt_bits_per_character` score texts with the one scorer of
  `minigpt.evaluation` (same windows, special ids from the tokenizer), and `hf_generate(_text)` run an
  HF model through the one decoding loop of `minigpt.generation` (same sampler, same banned ids), so
  the two kinds of model are compared on equal terms.

Conversion between the two lives in `minigpt.convert`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.bpe import BpeTokenizer
from minigpt.errors import UserError
from minigpt.evaluation import eval_mode, gpt_nll, score_texts
from minigpt.generation import (
    GenerationResult,
    SamplingConfig,
    Tokenizer,
    banned_special_ids,
    collect,
    decode,
    encode_prompt,
    window,
)
from minigpt.model import GPT
from minigpt.tokenizer import IGNORE_INDEX, Vocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# -- loading -------------------------------------------------------------------------------------------


def load_hf_gpt2(
    dir_or_name: str | Path, *, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, BpeTokenizer | Vocab]:
    """A Hugging Face causal LM (GPT-2 or other) and its tokenizer, from local files only.

    Args:
        dir_or_name: A local folder (config.json, weights, tokenizer files), or a Hub name such as
            "gpt2" that is already in the local Hugging Face cache. Nothing is downloaded.
        cache_dir: The Hugging Face cache to look names up in (default: the usual HF_HOME cache).

    Returns:
        (the model in eval mode, its tokenizer: the word `Vocab` when the folder holds one minigpt exported
        (`minigpt.convert.word_level_hf_tokenizer`), else a `BpeTokenizer` over the folder's tokenizer).

    Raises:
        ValueError: one line saying why: not a folder and not cached, or a folder transformers cannot read.
    """
    folder = _local_folder(dir_or_name, cache_dir)
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load a Hugging Face causal LM from {folder}: {_first_line(err)}") from err
    model.eval()
    tokenizer = BpeTokenizer.from_pretrained(folder)
    from minigpt.convert import word_vocab_of  # minigpt.convert imports this module: imported here, when used

    return model, word_vocab_of(tokenizer) or tokenizer


def _local_folder(dir_or_name: str | Path, cache_dir: str | Path | None) -> Path:
    path = Path(dir_or_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(dir_or_name), local_files_only=True, cache_dir=cache_dir))
    except OSError as err:  # LocalEntryNotFoundError (before 1.0 also a ValueError): a Hub name not in the cache
        raise UserError(
            f"{str(dir_or_name)!r} is not a local folder and not in the local Hugging Face cache; minigpt never "
            "downloads. Pass a folder with config.json, the weights and the tokenizer files, e.g. made once on a "
            f"machine with internet by `hf download {dir_or_name} --local-dir ./{path.name}`, or set HF_HOME to a "
            "cache that holds it."
        ) from err
    except ValueError as err:  # HFValidationError: not a Hub name either, so a folder that is missing
        raise UserError(f"{str(dir_or_name)!r} is not a local folder (it does not exist)") from err


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info messages and progress bars (a CLI prints one line per result)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# -- scoring -------------------------------------------------------------------------------------------


@torch.inference_mode()
def hf_bits_per_character(
    hf_model: PreTrainedModel,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    block_size: int | None = None,
    stride: int | None = None,
    *,
    batch_size: int = 4,
) -> dict:
    """Score every token of every text once with a Hugging Face causal LM, as `minigpt.evaluation` does.

    Each text becomes `<eot> text <eot>` (the tokenizer's end-of-text id) cut into windows of
    `block_size` targets; bits per character = total NLL in bits / characters of the texts, which does
    not depend on the tokenizer.

    Args:
        hf_model: e.g. a `GPT2LMHeadModel` (put in eval mode; its device is used).
        tokenizer: Its tokenizer with minigpt's interface (a `BpeTokenizer` from `load_hf_gpt2`).
        texts: The documents.
        block_size: Window length in tokens; default the model's context (`n_positions`).
        stride: Window step (< block_size gives later windows more context); default block_size.
        batch_size: Windows per forward pass (memory: batch_size x block_size x vocab floats).

    Returns:
        The keys of `minigpt.evaluation.EvalResult`: documents, characters, tokens, loss (nats/token),
        perplexity, bits_per_character, unk_rate, seconds.
    """
    context = _context_length(hf_model)
    block_size = block_size or context
    if not 1 <= block_size <= context:
        raise UserError(f"block_size must be in [1, {context}] (the model's context), got {block_size}")

    def nll_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # Right padding after causal attention never changes the real positions: no attention mask.
        logits = hf_model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return nll, (y != IGNORE_INDEX).sum()

    with eval_mode(hf_model):
        return score_texts(
            nll_fn, tokenizer, texts, block_size=block_size, stride=stride, batch_size=batch_size,
            device=next(hf_model.parameters()).device,
        ).to_dict()  # fmt: skip


@torch.inference_mode()
def minigpt_bits_per_character(
    model: GPT, tokenizer: Tokenizer, texts: Sequence[str], block_size: int | None = None, stride: int | None = None,
    *, batch_size: int = 32,
) -> dict:  # fmt: skip
    """`hf_bits_per_character` for a minigpt model: the same windows, taking every special id from
    `tokenizer` (so BPE checkpoints score right too). With a word `Vocab` it equals
    `minigpt.evaluation.evaluate_ids` on the same texts.

    Args:
        model: The minigpt model (its mode is restored afterwards).
        block_size: Window length; default (and at most) `model.config.block_size`.
        The other arguments and the result are those of `hf_bits_per_character`.
    """
    block_size = block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise UserError(f"block_size must be in [1, {model.config.block_size}], got {block_size}")
    with eval_mode(model):
        return score_texts(
            gpt_nll(model), tokenizer, texts, block_size=block_size, stride=stride, batch_size=batch_size,
            device=next(model.parameters()).device,
        ).to_dict()  # fmt: skip


# -- generation ----------------------------------------------------------------------------------------


def _context_length(hf_model: PreTrainedModel) -> int:
    config = hf_model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"cannot tell the context length of {type(hf_model).__name__} (no n_positions in its config)")


class _HFStep:
    """`minigpt.generation.StepFn` of a Hugging Face causal LM: its own cache, minigpt's loop and sampler."""

    def __init__(self, hf_model: PreTrainedModel, use_cache: bool) -> None:
        self.model, self.context, self.use_cache = hf_model, _context_length(hf_model), use_cache
        params = inspect.signature(hf_model.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40).
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # minigpt's own model class: a cached step with bigram embeddings also reads the token before the new one.
        self.previous = "previous_token_ids" in params and bool(getattr(hf_model.config, "bigram_buckets", 0))
        self.past: Any = None

    def __call__(self, seq: Tensor, pad: Tensor | None, n: int) -> Tensor:
        if self.past is not None and n <= self.context:
            idx = seq[:, n - 1 : n]  # one new token after the cached ones
            keep = None if pad is None else torch.arange(n, device=seq.device) >= pad[:, None]  # (B, n)
            positions = None if pad is None else (n - 1 - pad)[:, None]
        else:  # prefill, or slide: past the context every position moves
            self.past = None
            idx, pad_mask, positions = window(seq, pad, max(0, n - self.context), n)
            keep = None if pad_mask is None else ~pad_mask
        extra = {} if keep is None else {"attention_mask": keep.long(), "position_ids": positions}
        if self.previous and self.past is not None:  # every prompt has a token, so the one before is never a pad
            extra["previous_token_ids"] = seq[:, n - 2]
        past = {self.cache_kwarg: self.past}
        out = self.model(input_ids=idx, use_cache=self.use_cache, **past, **self.last_only, **extra)
        self.past = _returned_cache(out) if self.use_cache else None
        return out.logits[:, -1]


def hf_generate(
    hf_model: PreTrainedModel, prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(), *, stop_ids: Iterable[int] | None,
    generator: torch.Generator | None = None, banned_ids: Iterable[int] = (), use_cache: bool = True,
) -> list[GenerationResult]:  # fmt: skip
    """`minigpt.generation.generate` for a Hugging Face causal LM: the same loop and the same sampler.

    The settings mean exactly what they mean for minigpt (same order of penalty, temperature, top-k,
    top-p), a seeded `generator` makes the draw reproducible, and past the model's context the window
    slides and is recomputed each step, as in minigpt.

    Args:
        hf_model: e.g. a `GPT2LMHeadModel`.
        use_cache: Reuse the model's key/value cache between steps (False recomputes the window).
        The other arguments are those of `minigpt.generation.generate`.

    Returns:
        One `GenerationResult` per prompt.
    """
    stop_ids = None if stop_ids is None else tuple(stop_ids)  # read twice: by the loop and by `collect`
    steps = decode(
        hf_model, lambda _: _HFStep(hf_model, use_cache), prompt_ids, sampling,
        vocab_size=_vocab_size(hf_model), stop_ids=stop_ids, generator=generator,
        banned_ids=banned_ids,
    )  # fmt: skip
    return collect(steps, stop_ids)


def _vocab_size(hf_model: PreTrainedModel) -> int:
    # The rows of the output layer (GPT-2 may pad them past the tokenizer); an adaptive head has no such matrix.
    head = hf_model.get_output_embeddings()
    return hf_model.config.vocab_size if head is None else head.weight.size(0)


def _returned_cache(out: Any) -> Any:
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


def hf_generate_text(
    hf_model: PreTrainedModel, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig = SamplingConfig(), *,
    generator: torch.Generator | None = None, allow_unk: bool = False, use_cache: bool = True,
) -> str:  # fmt: skip
    """`minigpt.generation.generate_text` for a Hugging Face causal LM: same prompt checks, same sampler,
    same banned ids (never `<pad>`, `<unk>` only with `allow_unk`).

    Stops at the tokenizer's end-of-text token or after `max_new_tokens`; returns the continuation only, decoded
    as `generate_text` decodes it (tidied: a word vocabulary's "it ' s" reads "it's").
    """
    ids = encode_prompt(tokenizer, prompt, block_size=_context_length(hf_model))
    (result,) = hf_generate(
        hf_model, ids, sampling, stop_ids=(tokenizer.eot_index,), generator=generator,
        banned_ids=banned_special_ids(tokenizer, allow_unk=allow_unk), use_cache=use_cache,
    )  # fmt: skip
    return tokenizer.decode(result.tokens, tidy=True)


def _first_line(err: BaseException) -> str:
    """The first line of a library's error, whole; past 200 characters only its sentences that fit (at least
    one), so a message is never cut inside a word."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0].strip()
    if len(line) <= 200:
        return line
    sentences = re.split(r"(?<=[.!?])\s+", line)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > 200:
            break
        kept = f"{kept} {sentence}"
    return kept
