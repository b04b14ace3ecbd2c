"""Text generation with a `GPT`: prompt encoding, one-step sampling, the decoding loop and streaming.

Free functions over the pure model (no Lightning), split as litgpt `litgpt/generate/base.py` does:
`SamplingConfig` (validated once by `check_sampling`), `encode_prompt`, `sample_next` (one step:
greedy, temperature, top-k, top-p, repetition penalty), and the loop: `stream` yields each step's
tokens, `generate` collects them, `generate_text` goes from text to text. Special ids come from the
tokenizer or the caller, never from constants: `stop_ids` is required, `banned_ids` are never sampled
(`generate_text` bans `<pad>` always and `<unk>` unless asked).

The loop (`decode`) only sees a `StepFn`, "the next scores of every row", so Hugging Face models run
through it too (`minigpt.hf`). A `GPT` step crops the context to the last `block_size` tokens, like
nanoGPT's `GPT.generate` and the PyTorch tutorial, and sends only the last position through the head.
With `use_cache=True` a new token costs one position through the `KVCache`; past `block_size` every
absolute position in the window shifts, so the cache is refilled from the cropped window at each such
step (equal to the recompute loop, `use_cache=False`, which stays as the reference).

References: karpathy/nanoGPT `model.py` (`GPT.generate`); Lightning-AI/litgpt `litgpt/generate/base.py`;
Hugging Face transformers' `RepetitionPenaltyLogitsProcessor` and `TopPLogitsWarper`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from minigpt.errors import UserError
from minigpt.kernels.decode_head import HeadChoice, decode_head, plain_only
from minigpt.kernels.decode_step import TrunkChoice, check_trunk, decode_trunk, greedy_pick
from minigpt.model import GPT

_MAX_UNK_SHOWN = 10  # unknown prompt words listed by name in the warning; the rest are counted


class Tokenizer(Protocol):
    """What generation needs from a tokenizer (minigpt's word `Vocab` and `BpeTokenizer` have it)."""

    unk_index: int
    pad_index: int
    eot_index: int

    def tokenize(self, text: str) -> list[str]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int], *, tidy: bool = False) -> str: ...


@dataclass
class GenerationResult:
    """What one prompt produced."""

    tokens: list[int] = field(default_factory=list)
    """The new token ids, without the prompt and without the stop token."""
    stop_reason: Literal["eos", "length"] = "length"
    """"eos" when a stop id was chosen (it is not in `tokens`), "length" after `max_new_tokens` tokens."""


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
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       repetition_penalty=self.repetition_penalty)  # fmt: skip

    @classmethod
    def greedy(cls, max_new_tokens: int = 50) -> SamplingConfig:
        """Always the most likely token."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, top_p=None)


# -- prompts -----------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Tokenizer, prompt: str | None, *, block_size: int) -> list[int]:
    """The prompt's token ids (1 to `block_size` of them) for generation.

    A prompt longer than `block_size` keeps its last `block_size` tokens (the tutorial's behaviour) and a
    warning says so; another names the words that became `<unk>`.

    Raises:
        UserError: The prompt is None, empty, only white space, or has no token at all.
    """
    if prompt is None or not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"The prompt is empty ({prompt!r}): give some text to continue, e.g. --prompt 'the movie was'.")
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise UserError(
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


def banned_special_ids(tokenizer: Tokenizer, *, allow_unk: bool = False) -> tuple[int, ...]:
    """The ids a text sample must never contain: `<pad>`, and `<unk>` unless `allow_unk`.

    Ids a tokenizer does not have (-1, e.g. byte-level BPE has no `<unk>`) are skipped, and so is the
    end-of-text id: GPT-2's BPE pads with `<|endoftext|>`, which must stay choosable to stop a sample.
    """
    ids = [tokenizer.pad_index] + ([] if allow_unk else [tokenizer.unk_index])
    return tuple(i for i in dict.fromkeys(ids) if i >= 0 and i != tokenizer.eot_index)


# -- one sampling step -------------------------------------------------------------------------------


def check_sampling(
    *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0
) -> None:
    """Reject sampling settings outside their range with a `UserError` naming the value and the range.

    The one check, run by `SamplingConfig` (callers validate settings by building one).
    """
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise UserError(
            f"temperature must be a finite number >= 0 (0 = greedy, 1 = the model's distribution), got {temperature!r}."
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1 (or None to keep every token), got {top_k!r}.")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise UserError(f"top_p must be a number in (0, 1] (or None to keep every token), got {top_p!r}.")
    if not _is_real(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise UserError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}.")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample_next(
    logits: Tensor,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    prev_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the next token of each row: (B, V) scores (logits or log-probabilities) -> (B,) int64 ids.

    Args:
        prev_ids: (B, L) ids already in each row (prompt and generated), for the repetition penalty.
        generator: Makes the draw reproducible; it must live on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be a (batch, vocab_size) tensor, got shape {tuple(logits.shape)}.")
    return _sample(logits, sampling, prev_ids, generator)


def _sample(logits: Tensor, s: SamplingConfig, prev_ids: Tensor | None, generator: torch.Generator | None) -> Tensor:
    if s.temperature == 0 and s.repetition_penalty == 1.0:
        return greedy_pick(logits)  # greedy first: no float copy, no softmax
    logits = logits.float()
    if s.repetition_penalty != 1.0 and prev_ids is not None and prev_ids.numel():
        seen = logits.gather(1, prev_ids)  # (B, L)
        seen = torch.where(seen > 0, seen / s.repetition_penalty, seen * s.repetition_penalty)
        logits = logits.scatter(1, prev_ids, seen)
    if s.temperature == 0:
        return greedy_pick(logits)
    # Only the candidates that top-k keeps are sorted, normalised and drawn from (k scores instead of the whole
    # vocabulary): the same distribution as masking the full row, at a fraction of the cost for large vocabularies.
    candidates = None  # (B, k) vocabulary ids of the kept scores, best first
    if s.top_k is not None and s.top_k < logits.size(-1):
        # `topk` keeps exactly k: masking `logits < kth value` (nanoGPT) keeps every token tied with the k-th one.
        logits, candidates = logits.topk(s.top_k, dim=-1)
    logits = logits / s.temperature  # after top-k: the same k win at any temperature > 0
    if s.top_p is not None and s.top_p < 1.0:
        if candidates is None:
            logits, candidates = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # Drop a token when the better tokens before it already reach p; the best one always stays.
        drop = probs.cumsum(dim=-1) - probs >= s.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop, -math.inf)
    choice = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(1, choice)).squeeze(1)


# -- the loop ----------------------------------------------------------------------------------------

StepFn = Callable[[Tensor, "Tensor | None", int], Tensor]
"""One model's side of the loop: `step(seq, pad, n) -> (B, V)` scores of the token after column n-1, for
(B, L) left-padded rows `seq` filled up to column n and `pad` (B,) pad columns per row or None (`window`)."""


def stream(
    model: GPT,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    stop_ids: Iterable[int] | None,
    generator: torch.Generator | None = None,
    banned_ids: Iterable[int] = (),
    use_cache: bool = True,
    head: HeadChoice = "auto",
    trunk: TrunkChoice = "auto",
) -> Iterator[list[int | None]]:
    """Generate token by token, yielding each step's choices as soon as they are made.

    Prompts of different lengths are decoded together, left-padded: each gets a key padding mask and
    the positions it would have alone, so greedy decoding gives what each prompt gives on its own.

    Args:
        model: The language model; it runs in eval mode (its mode is restored afterwards).
        prompt_ids: One prompt (a list of ids) or a batch of prompts (a list of lists), each non-empty;
            a prompt longer than `block_size` is read through its last `block_size` tokens.
        sampling: How to choose each token, and how many (`max_new_tokens`).
        stop_ids: Ids that end a sample, e.g. `(tokenizer.eot_index,)`; None or () to always run
            `max_new_tokens` steps.
        generator: Makes sampling reproducible (on the model's device).
        banned_ids: Ids never chosen (their scores become -inf before sampling), e.g. `<pad>`.
        use_cache: Use the KV cache; False recomputes the window every step (the reference).
        head: "plain" (`model.head_logits`), "packed" or "auto" (see `minigpt.kernels.decode_head`).
        trunk: How a cached step runs its one new token per row through the blocks: "plain"
            (`model.hidden_states`), "one_thread", "lean", "lean_one_thread" or "auto" (see
            `minigpt.kernels.decode_step`).

    Yields:
        Per step, one entry per prompt: the id it chose, or None once it has stopped. A stop id is
        yielded at the step it is chosen, then only None. The iteration ends when every prompt has
        stopped or after `max_new_tokens` steps.

    Raises:
        UserError: empty or out-of-vocabulary prompts or banned ids, or an unknown head or trunk.
    """
    check_trunk(trunk)
    return decode(
        model, lambda batch_size: _GPTStep(model, batch_size, use_cache, head, trunk), prompt_ids, sampling,
        vocab_size=model.config.vocab_size, stop_ids=stop_ids, generator=generator, banned_ids=banned_ids,
    )  # fmt: skip


def generate(
    model: GPT, prompt_ids: Sequence[int] | Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(), *,
    stop_ids: Iterable[int] | None, generator: torch.Generator | None = None, banned_ids: Iterable[int] = (),
    use_cache: bool = True, head: HeadChoice = "auto", trunk: TrunkChoice = "auto",
) -> list[GenerationResult]:  # fmt: skip
    """One `GenerationResult` per prompt (a list of one for a single prompt); the arguments are those of `stream`."""
    stop_ids = None if stop_ids is None else tuple(stop_ids)  # read twice: by the loop and by `collect`
    steps = stream(model, prompt_ids, sampling, stop_ids=stop_ids, generator=generator, banned_ids=banned_ids,
                   use_cache=use_cache, head=head, trunk=trunk)  # fmt: skip
    return collect(steps, stop_ids)


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    generator: torch.Generator | None = None,
    allow_unk: bool = False,
    raw: bool = False,
) -> str:
    """The continuation (without the prompt) of a text prompt, up to the tokenizer's end of text.

    Args:
        tokenizer: The model's tokenizer: its ids say what stops a sample and what is never sampled.
        allow_unk: Let the sample contain `<unk>` (`<pad>` is never sampled).
        raw: Return the tokens joined by single spaces instead of tidied text ("it's" vs "it ' s").
        The other arguments are those of `stream`.
    """
    ids = encode_prompt(tokenizer, prompt, block_size=model.config.block_size)
    (result,) = generate(
        model, ids, sampling, stop_ids=(tokenizer.eot_index,), generator=generator,
        banned_ids=banned_special_ids(tokenizer, allow_unk=allow_unk),
    )  # fmt: skip
    return tokenizer.decode(result.tokens, tidy=not raw)


def collect(steps: Iterable[list[int | None]], stop_ids: Iterable[int] | None) -> list[GenerationResult]:
    """Gather the steps of `stream` (or `decode`) into one `GenerationResult` per prompt."""
    stops = {int(i) for i in stop_ids or ()}
    results: list[GenerationResult] = []
    for step in steps:
        results = results or [GenerationResult() for _ in step]
        for result, token in zip(results, step):
            if token in stops:
                result.stop_reason = "eos"
            elif token is not None:
                result.tokens.append(token)
    assert results  # max_new_tokens >= 1, so there was at least one step
    return results


def decode(
    module: nn.Module,
    make_step: Callable[[int], StepFn],
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    vocab_size: int,
    stop_ids: Iterable[int] | None,
    generator: torch.Generator | None = None,
    banned_ids: Iterable[int] = (),
) -> Iterator[list[int | None]]:
    """The decoding loop for any model behind `make_step(batch_size) -> StepFn` (see `stream`).

    The inputs are checked at the call; the steps run lazily, as the caller iterates."""
    if not isinstance(sampling, SamplingConfig):  # e.g. an old call passing max_new_tokens positionally
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}.")
    prompts = _as_batch(prompt_ids, vocab_size)
    stops = [] if stop_ids is None else [int(i) for i in stop_ids]
    banned = sorted({int(i) for i in banned_ids})
    if any(not 0 <= i < vocab_size for i in banned) or len(banned) >= vocab_size:
        raise UserError(f"banned_ids must be some (not all) ids in [0, {vocab_size}), got {banned}.")
    return _decode(module, make_step, prompts, sampling, stops, banned, generator)


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or not prompt_ids:
        raise UserError(f"prompt_ids must be a non-empty list of token ids (or of such lists), got {prompt_ids!r}.")
    single = all(_is_int(i) for i in prompt_ids)
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]  # type: ignore[arg-type]
    for n, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {n} of the batch is empty: every prompt needs at least one token.")
        if not all(_is_int(i) and 0 <= i < vocab_size for i in prompt):
            bad = next(i for i in prompt if not (_is_int(i) and 0 <= i < vocab_size))
            raise UserError(f"prompt {n} holds {bad!r}, not a token id of this model (integers in [0, {vocab_size})).")
    return prompts


@torch.inference_mode()  # on a generator function: entered for each step, left at each yield
def _decode(
    module: nn.Module,
    make_step: Callable[[int], StepFn],
    prompts: list[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    banned_ids: list[int],
    generator: torch.Generator | None,
) -> Iterator[list[int | None]]:
    """The loop behind `decode`, with the model in eval mode until it ends (or is closed)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    # Every row, left-padded: columns [0, n) are filled, n grows by one per step. Pad slots hold the
    # row's first token rather than <pad>: the model never sees them (masked), and the repetition
    # penalty can read whole rows without counting a token the row does not contain.
    seq = torch.empty(B, longest + sampling.max_new_tokens, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        seq[row, : longest - len(prompt)] = prompt[0]
        seq[row, longest - len(prompt) : longest] = torch.tensor(prompt)
    seq = seq.to(device)
    pads = [longest - len(p) for p in prompts]
    pad = torch.tensor(pads, device=device) if any(pads) else None  # (B,) pad columns per row
    banned = torch.tensor(banned_ids, dtype=torch.long, device=device) if banned_ids else None
    stops, done = set(stop_ids), [False] * B
    try:
        step = make_step(B)
        for n in range(longest, longest + sampling.max_new_tokens):
            logits = step(seq, pad, n)  # (B, V), a fresh tensor: changed in place
            if banned is not None:
                logits.index_fill_(1, banned, -math.inf)
            prev = seq[:, :n] if sampling.repetition_penalty != 1.0 else None
            next_ids = _sample(logits, sampling, prev, generator)  # (B,)
            seq[:, n] = next_ids
            chosen = next_ids.tolist()  # the step's one transfer to the host
            yield [None if was_done else token for token, was_done in zip(chosen, done)]
            if stops:
                done = [was_done or token in stops for token, was_done in zip(chosen, done)]
                if all(done):
                    return
    finally:
        module.train(was_training)


def window(seq: Tensor, pad: Tensor | None, start: int, n: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Columns [start, n): (B, W) ids, (B, W) key padding mask (True at pads) and (B, W) positions.

    A row alone would read its last tokens from position 0; in the shared window its tokens sit after
    the pad columns, so column c of row i has position c - max(pad_i, start) (pads: 0). Mask and
    positions are None when no pad column is left in the window (positions 0 .. W-1 for every row).
    """
    idx = seq[:, start:n]  # (B, W)
    if pad is None or start >= int(pad.max()):
        return idx, None, None
    cols = torch.arange(start, n, device=seq.device)[None, :]  # (1, W)
    mask = cols < pad[:, None]  # (B, W), True at pads
    positions = (cols - pad.clamp(min=start)[:, None]).clamp(min=0)  # (B, W)
    return idx, mask, positions


class _GPTStep:
    """`StepFn` of a minigpt `GPT`: the trunk over the new tokens (or the window), the head over the last."""

    def __init__(self, model: GPT, batch_size: int, use_cache: bool, head: HeadChoice, trunk: TrunkChoice) -> None:
        self.model, self.block_size = model, model.config.block_size
        self.cache = model.new_cache(batch_size) if use_cache else None
        self.head = (  # the adaptive softmax is not one linear layer: it has no packed form
            decode_head(model.lm_head.weight, model.lm_head.bias, batch_size, head) if model.config.head == "linear"
            else plain_only(model.head_logits, head)
        )  # fmt: skip
        # The one-token trunk of a cached step (the recompute loop has none), chosen with the head after it.
        self.trunk = None if self.cache is None else decode_trunk(model, self.cache, trunk, self.head)
        self.positions: Tensor | None = None  # (B, L) position of every column of left-padded rows

    def __call__(self, seq: Tensor, pad: Tensor | None, n: int) -> Tensor:
        model, cache = self.model, self.cache
        start = max(0, n - self.block_size)  # first column of the window: the last block_size columns
        if cache is not None and cache.pos > 0 and n <= self.block_size:
            positions = None if pad is None else self._positions(seq, pad)[:, n - 1 : n]  # (B, 1) each row's own
            # The token before the new one (bigram embeddings read it): every prompt has a token, so never a pad.
            hidden = self.trunk(seq[:, n - 1 : n], positions, cache, seq[:, n - 2])
        else:
            if cache is not None:  # prefill, or slide: past block_size every position moves, the keys are stale
                cache.reset()
            idx, mask, positions = window(seq, pad, start, n)
            hidden = model.hidden_states(idx, mask, positions=positions, cache=cache)
        return self.head(hidden[:, -1])  # (B, V): only the last position goes through the head

    def _positions(self, seq: Tensor, pad: Tensor) -> Tensor:
        # Built once: a step then reads its column as a view instead of computing it.
        if self.positions is None:
            self.positions = (torch.arange(seq.size(1), device=seq.device) - pad[:, None]).clamp(min=0)
        return self.positions
