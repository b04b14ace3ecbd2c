"""Text generation with a `GPT`: prompt encoding, one-step sampling, the decoding loop and streaming.

Free functions over the pure model (no Lightning), split as litgpt `litgpt/generate/base.py` does:

- `encode_prompt` turns text into ids (empty prompts are errors, long ones keep their last tokens);
- `sample_next` picks one token per row from (B, V) scores: greedy, temperature, top-k, top-p and
  repetition penalty, each checked by `check_sampling`;
- `stream` is the loop and yields the tokens of each step as soon as they are chosen; `generate`
  collects them and `generate_text` goes from text to text.

The loop crops the context to the last `block_size` tokens, like nanoGPT's `GPT.generate` and the
PyTorch tutorial. With `use_cache=True` each new token costs one position through the model's
`KVCache`; once the sequence outgrows `block_size` every absolute position in the window shifts, so
the cache is refilled from the cropped window at each such step (the result equals the tutorial's
recompute loop, `use_cache=False`, which stays as the reference).

References: karpathy/nanoGPT `model.py` (`GPT.generate`) and `sample.py`; Lightning-AI/litgpt
`litgpt/generate/base.py` (`sample`, `generate`); Hugging Face transformers' logits processors
(`RepetitionPenaltyLogitsProcessor`, `TopPLogitsWarper`).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from minigpt.errors import UserError
from minigpt.model import GPT

EOT_ID = 2
"""Id of `<|endoftext|>` in minigpt's word vocabulary (`minigpt.tokenizer.EOT_ID`): the default stop id."""

_MAX_UNK_SHOWN = 10  # unknown prompt words listed by name in the warning; the rest are counted

StopReason = Literal["eos", "length"]


class Tokenizer(Protocol):
    """What generation needs from a tokenizer (minigpt's word `Vocab` has it; a BPE wrapper can too)."""

    unk_index: int
    pad_index: int
    eot_index: int

    def tokenize(self, text: str) -> list[str]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], *, tidy: bool = False) -> str: ...


@dataclass
class GenerationResult:
    """What one prompt produced.

    Attributes:
        tokens: The new token ids, without the prompt and without the stop token.
        stop_reason: "eos" when a stop id was chosen (it is not in `tokens`), "length" when
            `max_new_tokens` tokens were generated.
    """

    tokens: list[int] = field(default_factory=list)
    stop_reason: StopReason = "length"


@dataclass(frozen=True)
class SamplingConfig:
    """How to choose each new token, validated once here (every entry point takes one of these).

    The steps run in Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a draw.
    """

    max_new_tokens: int = 50
    """Most tokens to generate per prompt."""
    temperature: float = 0.8
    """0 picks the argmax (greedy); otherwise scores are divided by it (1 = the model's distribution)."""
    top_k: int | None = 50
    """Keep exactly the k best tokens (ties at the k-th score do not let more through); None keeps all."""
    top_p: float | None = 0.95
    """Keep the smallest set of best tokens whose probability reaches p (at least one); None = off."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) scores of tokens already in the row (Keskar et al. 2019); 1 = off."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}.")
        check_sampling(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )  # fmt: skip

    @classmethod
    def greedy(cls, max_new_tokens: int = 50) -> SamplingConfig:
        """Always the most likely token."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, top_p=None)


# -- prompts -----------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Tokenizer, prompt: str | None, *, block_size: int) -> list[int]:
    """Encode a text prompt for generation.

    Args:
        tokenizer: Anything with `tokenize`, `encode` and `unk_index` (see `Tokenizer`).
        prompt: The text to continue.
        block_size: The model's context length; a longer prompt keeps its last `block_size` tokens
            (the tutorial's behaviour) and a warning says so.

    Returns:
        The prompt's token ids (1 to `block_size` of them).

    Raises:
        ValueError: The prompt is None, empty, only white space, or has no token at all.
    """
    if prompt is None or not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            f"The prompt is empty ({prompt!r}): give some text to continue, e.g. --prompt 'the movie was'."
        )
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ValueError(
            f"The prompt {prompt!r} has no tokens once tokenized (the tokenizer drops these characters); "
            "give some words to continue."
        )
    _warn_unknown_words(tokenizer, prompt, ids)
    if len(ids) > block_size:
        warnings.warn(
            f"The prompt has {len(ids)} tokens but the model reads at most block_size={block_size}: "
            f"keeping its last {block_size} tokens.",
            stacklevel=2,
        )
        ids = ids[-block_size:]
    return ids


def _warn_unknown_words(tokenizer: Tokenizer, prompt: str, ids: list[int]) -> None:
    unk = tokenizer.unk_index
    if unk not in ids:
        return
    words = list(tokenizer.tokenize(prompt))
    if len(words) == len(ids):  # word-level: name the words (a subword tokenizer only gets a count)
        unknown = list(dict.fromkeys(w for w, i in zip(words, ids) if i == unk))
        shown = ", ".join(repr(w) for w in unknown[:_MAX_UNK_SHOWN])
        more = f" and {len(unknown) - _MAX_UNK_SHOWN} more" if len(unknown) > _MAX_UNK_SHOWN else ""
        message = f"{len(unknown)} prompt word(s) not in the vocabulary became <unk>: {shown}{more}."
    else:
        message = f"{ids.count(unk)} prompt token(s) are <unk> (not in the vocabulary)."
    warnings.warn(message, stacklevel=3)


# -- one sampling step -------------------------------------------------------------------------------


def check_sampling(
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> None:
    """Reject sampling settings outside their range (used by `sample_next`, the loop and the CLI).

    Raises:
        ValueError: naming the value and the allowed range.
    """
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy, 1 = the model's distribution), got {temperature!r}."
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None to keep every token), got {top_k!r}.")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (or None to keep every token), got {top_p!r}.")
    if not _is_real(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(
            f"repetition_penalty must be a finite number > 0 (1 = no penalty, > 1 discourages repeats), "
            f"got {repetition_penalty!r}."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    prev_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the next token of each row.

    The steps run in Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a draw.

    Args:
        logits: (B, V) scores of the next token (logits or log-probabilities).
        temperature: 0 picks the argmax (no division); otherwise the scores are divided by it.
        top_k: Keep exactly the k best tokens (ties at the k-th score do not let more through).
        top_p: Keep the smallest set of best tokens whose probability reaches p (at least one token).
        repetition_penalty: Scores of tokens in `prev_ids` are divided by it when positive and
            multiplied by it when negative (Keskar et al. 2019, as in Hugging Face).
        prev_ids: (B, L) ids already in each row (prompt and generated), for the penalty.
        generator: Makes the draw reproducible; it must live on the logits' device.

    Returns:
        (B,) int64 token ids.

    Raises:
        ValueError: a sampling setting is out of range, or `logits` is not 2-D.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if logits.dim() != 2:
        raise ValueError(f"logits must be a (batch, vocab_size) tensor, got shape {tuple(logits.shape)}.")
    return _sample(logits, temperature, top_k, top_p, repetition_penalty, prev_ids, generator)


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    prev_ids: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    logits = logits.float()
    if repetition_penalty != 1.0 and prev_ids is not None and prev_ids.numel():
        seen = logits.gather(1, prev_ids)  # (B, L)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits = logits.scatter(1, prev_ids, seen)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        # Scatter the k winners into -inf rather than masking `logits < kth value` (nanoGPT): that
        # comparison keeps every token tied with the k-th one, so more than k could survive.
        values, indices = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter(1, indices, values)
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        # Drop a token when the better tokens before it already reach p; the best one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -math.inf)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# -- the loop ----------------------------------------------------------------------------------------


def stream(
    model: GPT,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Iterable[int] | None = (EOT_ID,),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[list[int | None]]:
    """Generate token by token, yielding each step's choices as soon as they are made.

    Prompts of different lengths are decoded together, left-padded: each gets a key padding mask and
    the positions it would have alone, so greedy decoding gives what each prompt gives on its own.

    Args:
        model: The language model; it runs in eval mode (its mode is restored afterwards).
        prompt_ids: One prompt (a list of ids) or a batch of prompts (a list of lists), each non-empty.
            A prompt longer than `block_size` is read through its last `block_size` tokens.
        max_new_tokens: Most tokens to generate per prompt.
        temperature: See `sample_next`; 0 is greedy decoding.
        top_k: See `sample_next`.
        top_p: See `sample_next`.
        repetition_penalty: See `sample_next`; the penalised ids are the prompt and what follows it.
        stop_ids: Ids that end a sample (default `<|endoftext|>`); None or () to always run
            `max_new_tokens` steps.
        generator: Makes sampling reproducible (on the model's device).
        use_cache: Use the KV cache; False recomputes the whole window every step (the tutorial's
            loop, the reference the cache must match).

    Yields:
        Per step, a list with one entry per prompt: the id it chose, or None once it has stopped. A
        stop id is yielded at the step it is chosen (so callers see why a sample ended) and nothing
        but None follows it. The iteration ends when every prompt has stopped or after
        `max_new_tokens` steps.

    Raises:
        ValueError: empty or out-of-vocabulary prompts, or bad sampling settings.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    prompts = _as_batch(prompt_ids, model.config.vocab_size)
    stops = [] if stop_ids is None else [int(i) for i in stop_ids]
    # Checked above, at the call; the steps run lazily, as the caller iterates.
    return _decode(
        model, prompts, max_new_tokens, (temperature, top_k, top_p, repetition_penalty), stops,
        generator, use_cache,
    )  # fmt: skip


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Iterable[int] | None = (EOT_ID,),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[GenerationResult]:
    """Generate a continuation of each prompt; the arguments are those of `stream`.

    Returns:
        One `GenerationResult` per prompt (a list of one for a single prompt).
    """
    stops = set() if stop_ids is None else {int(i) for i in stop_ids}
    results: list[GenerationResult] | None = None
    for step in stream(
        model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=stops, generator=generator,
        use_cache=use_cache,
    ):  # fmt: skip
        if results is None:
            results = [GenerationResult() for _ in step]
        for result, token in zip(results, step):
            if token is None:
                continue
            if token in stops:
                result.stop_reason = "eos"
            else:
                result.tokens.append(token)
    assert results is not None  # max_new_tokens >= 1, so there was at least one step
    return results


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    raw: bool = False,
) -> str:
    """Continue a text prompt; stops at the tokenizer's `<|endoftext|>` or after `max_new_tokens`.

    Args:
        model: The language model.
        tokenizer: The vocabulary the model was trained with.
        prompt: Text to continue (see `encode_prompt` for the checks).
        raw: Return the tokens joined by single spaces instead of tidied text ("it's" vs "it ' s").
        The other arguments are those of `generate`.

    Returns:
        The continuation only (not the prompt).
    """
    ids = encode_prompt(tokenizer, prompt, block_size=model.config.block_size)
    (result,) = generate(
        model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop_ids=(tokenizer.eot_index,), generator=generator,
        use_cache=use_cache,
    )  # fmt: skip
    return tokenizer.decode(result.tokens, tidy=not raw)


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise ValueError(
            "prompt_ids must be a non-empty list of token ids, or a list of such lists for a batch; "
            f"got {prompt_ids!r}."
        )
    single = all(_is_int(i) for i in prompt_ids)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]  # type: ignore[arg-type]
    for n, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {n} of the batch is empty: every prompt needs at least one token.")
        if not all(_is_int(i) and 0 <= i < vocab_size for i in prompt):
            bad = next(i for i in prompt if not (_is_int(i) and 0 <= i < vocab_size))
            raise ValueError(f"prompt {n} holds {bad!r}, not a token id of this model (integers in [0, {vocab_size})).")
    return prompts


@torch.inference_mode()  # on a generator function: entered for each step, left at each yield
def _decode(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: tuple[float, int | None, float | None, float],
    stop_ids: list[int],
    generator: torch.Generator | None,
    use_cache: bool,
) -> Iterator[list[int | None]]:
    """The loop behind `stream`, with the model in eval mode until it ends (or is closed)."""
    was_training = model.training
    model.eval()
    try:
        yield from _decode_steps(model, prompts, max_new_tokens, sampling, stop_ids, generator, use_cache)
    finally:
        model.train(was_training)


def _decode_steps(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: tuple[float, int | None, float | None, float],
    stop_ids: list[int],
    generator: torch.Generator | None,
    use_cache: bool,
) -> Iterator[list[int | None]]:
    temperature, top_k, top_p, repetition_penalty = sampling
    block_size = model.config.block_size
    device = model.transformer.wte.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    # Every row, left-padded: columns [0, n) are filled, n grows by one per step. Pad slots hold the
    # row's first token rather than <pad>: the model never sees them (masked), and the repetition
    # penalty can read whole rows without counting a token the row does not contain.
    seq = torch.empty(B, longest + max_new_tokens, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        seq[row, : longest - len(prompt)] = prompt[0]
        seq[row, longest - len(prompt) : longest] = torch.tensor(prompt)
    seq = seq.to(device)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # (B,) pad columns per row
    padded = bool(pad.any())
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B) if use_cache else None
    head = DecodeHead(model, B) if use_cache else None
    n = longest
    for _ in range(max_new_tokens):
        start = max(0, n - block_size)  # first column of the window: the last block_size columns
        if cache is None:
            idx, mask, positions = _window(seq, pad, start, n, padded)
            logits = model(idx, mask, positions=positions)[:, -1]  # (B, V)
        else:
            if cache.pos == 0 or n > block_size:
                # Prefill, or slide: past block_size every absolute position in the window moves, so
                # the cached keys are stale and the cache is refilled from the cropped window.
                cache.reset()
                idx, mask, positions = _window(seq, pad, start, n, padded)
            else:
                idx, mask = seq[:, n - 1 : n], None
                positions = (n - 1 - pad)[:, None] if padded else None  # (B, 1) each row's own position
            hidden = model.hidden_states(idx, mask, positions=positions, cache=cache)
            logits = head(hidden[:, -1])  # (B, V)
        prev = seq[:, :n] if repetition_penalty != 1.0 else None
        next_ids = _sample(logits, temperature, top_k, top_p, repetition_penalty, prev, generator)  # (B,)
        seq[:, n] = next_ids
        n += 1
        step = next_ids.tolist()
        finished = done.tolist()
        yield [None if was_done else token for token, was_done in zip(step, finished)]
        if stops.numel():
            done |= torch.isin(next_ids, stops)
            if bool(done.all()):
                return


def _window(seq: Tensor, pad: Tensor, start: int, n: int, padded: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Columns [start, n) of the left-padded rows with their key padding mask and own positions.

    A row alone would read its last block_size tokens from position 0; in the shared window its tokens
    sit after the pad columns, so column c of row i has position c - max(pad_i, start) (pads: 0).
    """
    idx = seq[:, start:n]  # (B, W)
    if not padded or start >= int(pad.max()):
        return idx, None, None  # no pad column left in the window: positions 0 .. W-1 for every row
    cols = torch.arange(start, n, device=seq.device)[None, :]  # (1, W)
    mask = cols < pad[:, None]  # (B, W), True at pads
    positions = (cols - pad.clamp(min=start)[:, None]).clamp(min=0)  # (B, W)
    return idx, mask, positions


class DecodeHead:
    """The model's output head for one decoding step, computed in a layout that suits matrix-vector.

    On CPU, `F.linear(h, W)` with the (V, C) row-major head matrix is slow for a single row h (about
    6 ms at 100,000 x 200 on a 2-core EPYC): a contiguous (C, V) copy runs the same product in about
    2.5 ms, and split into two (C, V/2) halves run as one `baddbmm` (bias fused) the two cores share the
    work: about 1.3 ms. The packed copy is used only for the float32 linear head on CPU at batch size 1,
    where decoding is bound by this product; otherwise (and for the adaptive head) the model's own
    `head_logits` runs. Training never sees it: the model is not modified.
    """

    def __init__(self, model: GPT, batch_size: int) -> None:
        self.model = model
        self.packed = _packed_head(model) if batch_size == 1 else None

    def __call__(self, hidden: Tensor) -> Tensor:
        """(B, C) last hidden states -> (B, V) scores."""
        if self.packed is None:
            return self.model.head_logits(hidden)
        weight, bias = self.packed  # (S, C, P), (S, 1, P) or None; S x P >= V
        S, B, C = weight.size(0), hidden.size(0), hidden.size(1)
        h = hidden.expand(S, B, C)
        parts = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)  # (S, B, P)
        return parts.transpose(0, 1).reshape(B, -1)[:, : self.model.config.vocab_size]  # (B, V)


_HEAD_SPLIT = 2  # parts of the vocabulary in the packed head: one per core of the 2-core CPU it was tuned on
_PACKED_HEADS: weakref.WeakKeyDictionary[GPT, tuple[tuple, tuple[Tensor, Tensor | None]]]
_PACKED_HEADS = weakref.WeakKeyDictionary()


def _packed_head(model: GPT) -> tuple[Tensor, Tensor | None] | None:
    """The linear head packed as (S, C, P) weights and (S, 1, P) bias, or None where it does not pay.

    The copy (80 MB and ~40 ms at 100,000 x 200) is kept per model until its head weights change (their
    version counter moves with every in-place update, e.g. an optimizer step or `load_state_dict`).
    """
    if model.config.head != "linear":
        return None
    weight, bias = model.lm_head.weight, model.lm_head.bias  # (V, C), (V,) or None
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    key = (_version(weight), weight.data_ptr(), None if bias is None else (_version(bias), bias.data_ptr()))
    cached = _PACKED_HEADS.get(model)
    if cached is not None and cached[0] == key and key[0] is not None:
        return cached[1]
    V, C = weight.shape
    P = -(-V // _HEAD_SPLIT)
    with torch.no_grad():
        packed_weight = weight.new_empty(_HEAD_SPLIT, C, P)
        packed_bias = None if bias is None else bias.new_zeros(_HEAD_SPLIT, 1, P)
        for i in range(_HEAD_SPLIT):
            rows = weight[i * P : (i + 1) * P]  # (<= P, C); the last part may be short
            packed_weight[i, :, : rows.size(0)] = rows.t()
            packed_weight[i, :, rows.size(0) :] = 0
        if packed_bias is not None:
            packed_bias.view(-1)[:V] = bias
    packed = (packed_weight, packed_bias)
    _PACKED_HEADS[model] = (key, packed)
    return packed


def _version(tensor: Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter: no caching for them
        return None
