"""The decoding loop of `minigpt serve`: one thread owns the model and batches requests between steps.

Requests never touch the model. A route turns each prompt (and each of its `n` choices) into a `Job` and
`submit`s it; the loop admits waiting jobs into free rows between decoding steps (continuous batching) and
calls each job's listener with an `Update` per token. Every step:

    1. retire cancelled jobs (their client went away) and move jobs past block_size to the sliding set;
    2. one batched forward of a token per decoding row through the `SlotCache`, each row at its own position;
    3. a sliding job re-reads its last block_size tokens alone, as `minigpt generate` does past block_size;
    4. an admitted job's prompt is prefilled alone into a free row;
    5. each job draws its token with its own `SamplingConfig` and seeded generator (a (1, V) draw: the
       draws `minigpt generate` makes for one prompt with the same seed; on a CPU, several jobs draw at once
       on a pool of threads), then finishing jobs leave and the
       last row fills the gap, so the decoding rows stay 0 .. rows-1.

A job's text is the tokenizer's tidy decode of its whole continuation; each update carries what is new, and
text that may still change (a BPE piece ending inside a character, the start of a stop string) waits.

References: llama.cpp `tools/server` (slots), vLLM's scheduler (admit and retire sequences every step).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from minigpt.cache import SlotCache
from minigpt.generation import SamplingConfig, Tokenizer, banned_special_ids, sample_next
from minigpt.kernels.decode_head import decode_head
from minigpt.model import GPT

log = logging.getLogger("minigpt.serve")

FinishReason = Literal["stop", "length", "cancelled", "error"]


class QueueFull(Exception):
    """The loop holds as many jobs as it may (running plus waiting); the request should come back later."""


@dataclass(frozen=True)
class Update:
    """What one step added to a job, passed to the job's listener (from the loop's thread)."""

    text: str
    """Text that follows what earlier updates sent ("" while what is new may still change)."""
    tokens: int
    """Tokens generated so far (the stop token not counted)."""
    finish_reason: FinishReason | None = None
    """Set on the job's last update: "stop" (end of text or a stop string), "length" (max tokens),
    "cancelled" (the server is stopping) or "error" (the step failed; `error` says why)."""
    error: str | None = None


class Job:
    """One prompt and one choice: what the loop generates, and what it has produced so far.

    Args:
        prompt_ids: The prompt's token ids, 1 to block_size of them (`minigpt.generation.encode_prompt`).
        sampling: How to choose each token, and how many (`max_new_tokens`).
        seed: Seeds the job's own generator.
        listener: Called from the loop's thread with each `Update`; it must return quickly.
        stop: Strings that end the text (they are not part of it), as OpenAI's `stop`.
        prefix: Put before the decoded continuation (a space after a word-level prompt).
    """

    def __init__(
        self, prompt_ids: Sequence[int], sampling: SamplingConfig, *, seed: int, listener: Callable[[Update], None],
        stop: Iterable[str] = (), prefix: str = "",
    ) -> None:  # fmt: skip
        self.prompt_ids = list(prompt_ids)
        self.sampling, self.seed, self.listener = sampling, seed, listener
        self.stop, self.prefix = tuple(s for s in stop if s), prefix
        self.tokens: list[int] = []
        self.text = ""  # the continuation as sent so far
        self.finish_reason: FinishReason | None = None
        self.cancelled = False  # set by any thread, read by the loop at its next step
        self.submitted = time.perf_counter()
        self._last_token_at: float | None = None
        self._generator: torch.Generator | None = None
        self._seq: Tensor | None = None  # (L + max_new_tokens,) prompt then generated ids, on the model's device
        self._n = 0  # filled columns of `_seq`

    def cancel(self) -> None:
        """Stop generating for this job; its row is freed at the loop's next step."""
        self.cancelled = True


class Scheduler:
    """The loop that owns `model`: admits, steps and retires `Job`s (see the module docstring).

    Args:
        model: The language model (put in eval mode); only this loop's thread runs it.
        tokenizer: The model's tokenizer: its end-of-text id stops a job, `<pad>`/`<unk>` are never sampled.
        max_batch: Most jobs decoded together (rows of the cache).
        max_queue: Most jobs waiting for a row; `submit` raises `QueueFull` beyond it.
        on_step: Called after each step with (seconds, decoding rows); metrics hang here.
        on_token: Called per token with (seconds since the job's previous token, or since its submission;
            whether it is the job's first).
    """

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 64,
        on_step: Callable[[float, int], None] | None = None, on_token: Callable[[float, bool], None] | None = None,
    ) -> None:  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}.")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block_size = model.config.block_size
        weight = next(model.parameters())
        self.device = weight.device
        self.cache = SlotCache(model.config, max_batch, self.device, weight.dtype)
        self._scratch = model.new_cache(1)  # a sliding job's window, refilled every step
        banned = banned_special_ids(tokenizer)
        self._banned = torch.tensor(banned, dtype=torch.long, device=self.device) if banned else None
        self._stop_ids = {tokenizer.eot_index}
        self._word_level = getattr(tokenizer, "kind", None) != "bpe"
        self._on_step, self._on_token = on_step, on_token
        # A draw reads the whole vocabulary (softmax, top-p's sort, the multinomial's exponential draws) with
        # the job's own generator, so jobs draw independently: a pool of threads draws several at once on a
        # CPU (torch releases the GIL in these ops), where each draw alone keeps about one core busy.
        threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(threads, "minigpt-draw") if self.device.type == "cpu" and threads > 1 else None
        self._waiting: deque[Job] = deque()
        self._decoding: list[Job] = []  # the job at index r holds row r of the cache
        self._sliding: list[Job] = []
        self._lock = threading.Condition()
        self._held = 0  # jobs submitted and not finished (running, waiting, or being admitted)
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the other threads' side -----------------------------------------------------------------------

    @property
    def word_level(self) -> bool:
        """Whether the tokenizer works on words (its text needs a space after the prompt)."""
        return self._word_level

    @property
    def running(self) -> int:
        """Jobs being decoded now."""
        return len(self._decoding) + len(self._sliding)

    @property
    def waiting(self) -> int:
        """Jobs waiting for a row."""
        return len(self._waiting)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` (all or none) for the next steps.

        Raises:
            QueueFull: They do not fit beside the jobs already running and waiting, or the loop is closing.
        """
        with self._lock:
            if self._closing or self._held + len(jobs) > self.max_batch + self.max_queue:
                raise QueueFull(
                    f"{self._held} jobs are running or waiting; at most {self.max_batch + self.max_queue} fit"
                )
            self._held += len(jobs)
            self._waiting.extend(jobs)
            self._lock.notify()

    def start(self) -> None:
        """Start the loop's thread."""
        self._thread = threading.Thread(target=self._run, name="minigpt-decode", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, cancel every job held, and wait for the loop's thread to end."""
        with self._lock:
            self._closing = True
            for job in [*self._waiting, *self._decoding, *self._sliding]:
                job.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None and (self._thread is None or not self._thread.is_alive()):
            self._pool.shutdown()

    # -- the loop ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._waiting or self.running or self._closing):
                        self._lock.wait()
                    if self._closing and not (self._waiting or self.running):
                        return
                    gone = [job for job in self._waiting if job.cancelled]  # their clients went away
                    self._waiting = deque(job for job in self._waiting if not job.cancelled)
                    free = self.max_batch - self.running
                    admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                try:
                    for job in gone:
                        self._finish(job, "cancelled")
                    self._step(admitted)
                except Exception as err:  # a failed step fails its jobs, never the server
                    log.exception("decoding step failed")
                    self._fail([*self._decoding, *self._sliding, *admitted], err)

    def _step(self, admitted: Sequence[Job]) -> None:
        """One decoding step of every running job, after the `admitted` jobs join."""
        t0 = time.perf_counter()
        for job in [job for job in self._decoding + self._sliding if job.cancelled]:
            self._finish(job, "cancelled")
        for job in [job for job in self._decoding if job._n > self.block_size]:
            self._release_row(job)  # past block_size every position moves: the row's keys are stale
            self._sliding.append(job)
        rows = len(self._decoding)
        scored: list[tuple[Job, Tensor]] = []  # (job, (1, V) scores of its next token)
        if rows:
            last = torch.stack([job._seq[job._n - 2 : job._n] for job in self._decoding])  # (rows, 2)
            self.cache.rows = rows
            hidden = self.model.hidden_states(last[:, 1:], cache=self.cache, previous=last[:, 0])
            logits = _head(self.model, rows)(hidden[:, -1])  # (rows, V)
            scored += [(job, logits[r : r + 1]) for r, job in enumerate(self._decoding)]
        for job in self._sliding:
            self._scratch.reset()
            window = job._seq[job._n - self.block_size : job._n][None]  # (1, block_size)
            scored.append((job, self._head_of_last(window, self._scratch)))
        for job in admitted:
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            self._start(job)
            row = len(self._decoding)
            self._decoding.append(job)
            self.cache.rows = len(self._decoding)
            scored.append((job, self._head_of_last(job._seq[None, : job._n], self.cache.row(row))))
        if scored:
            self._sample(scored)
        if self._on_step is not None and rows:
            self._on_step(time.perf_counter() - t0, rows)

    def _head_of_last(self, idx: Tensor, cache) -> Tensor:
        """(1, V) scores of the token after (1, T) ids, read alone through a batch-1 `cache`."""
        hidden = self.model.hidden_states(idx, cache=cache)
        return _head(self.model, 1)(hidden[:, -1])

    def _start(self, job: Job) -> None:
        job._generator = torch.Generator(device=self.device).manual_seed(job.seed)
        L = len(job.prompt_ids)
        seq = torch.empty(L + job.sampling.max_new_tokens, dtype=torch.long)
        seq[:L] = torch.tensor(job.prompt_ids)
        job._seq, job._n = seq.to(self.device), L

    def _sample(self, scored: list[tuple[Job, Tensor]]) -> None:
        if self._pool is not None and len(scored) > 1:
            chosen = list(self._pool.map(self._draw, scored))
        else:
            chosen = [self._draw(item) for item in scored]
        tokens = torch.cat(chosen)  # (jobs,)
        for (job, _), token in zip(scored, tokens.tolist()):  # the step's one transfer to the host
            self._advance(job, token)

    def _draw(self, item: tuple[Job, Tensor]) -> Tensor:
        """One job's token from its (1, V) scores, drawn as `minigpt generate` draws it: (1,) ids."""
        job, logits = item
        with torch.inference_mode():  # a pool thread does not inherit the loop thread's inference mode
            if self._banned is not None:
                logits = logits.index_fill(1, self._banned, -math.inf)
            prev = job._seq[None, : job._n] if job.sampling.repetition_penalty != 1.0 else None
            return sample_next(logits, job.sampling, prev_ids=prev, generator=job._generator)

    def _advance(self, job: Job, token: int) -> None:
        now = time.perf_counter()
        if self._on_token is not None:
            self._on_token(now - (job._last_token_at or job.submitted), job._last_token_at is None)
        job._last_token_at = now
        if token in self._stop_ids:
            self._finish(job, "stop")
            return
        job._seq[job._n] = token
        job._n += 1
        job.tokens.append(token)
        full = job.prefix + self.tokenizer.decode(job.tokens, tidy=True)
        cut = min((i for i in (full.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._finish(job, "stop", full[:cut])
        elif len(job.tokens) == job.sampling.max_new_tokens:
            self._finish(job, "length", full)
        else:
            self._send(job, _stable(full, job.stop))

    def _send(self, job: Job, text: str | None, finish_reason: FinishReason | None = None, error: str | None = None):
        """Send what `text` adds to the job's text so far (nothing when it does not extend it)."""
        new = ""
        if text is not None and text.startswith(job.text):
            new, job.text = text[len(job.text) :], text
        job.listener(Update(new, len(job.tokens), finish_reason, error))

    def _finish(self, job: Job, reason: FinishReason, text: str | None = None, error: str | None = None) -> None:
        if reason == "stop" and text is None:  # end of text: everything decoded so far is final
            text = job.prefix + self.tokenizer.decode(job.tokens, tidy=True) if job.tokens else job.text
        job.finish_reason = reason
        if job in self._decoding:
            self._release_row(job)
        elif job in self._sliding:
            self._sliding.remove(job)
        with self._lock:
            self._held -= 1
        self._send(job, text, reason, error)

    def _release_row(self, job: Job) -> None:
        """Free the job's row; the last decoding row moves into it so rows 0 .. rows-1 stay the decoding ones."""
        r, last = self._decoding.index(job), len(self._decoding) - 1
        if r != last:
            self.cache.move(last, r)
            self._decoding[r] = self._decoding[last]
        self._decoding.pop()
        self.cache.rows = len(self._decoding)

    def _fail(self, jobs: Iterable[Job], err: Exception) -> None:
        message = f"generation failed: {type(err).__name__}: {err}"
        jobs = list(dict.fromkeys(jobs))
        self._decoding.clear()
        self._sliding.clear()
        self.cache.rows = 0
        for job in jobs:
            if job.finish_reason is None:
                job.finish_reason = "error"
                with self._lock:
                    self._held -= 1
                try:
                    job.listener(Update("", len(job.tokens), "error", message))
                except Exception:
                    log.exception("a listener failed")


def _stable(text: str, stop: Sequence[str]) -> str:
    """The part of `text` no later token can change: without a trailing U+FFFD (a BPE piece that ends
    inside a UTF-8 character) and without an ending that may be the start of a stop string."""
    if text.endswith("\ufffd"):
        return text[: len(text.rstrip("\ufffd"))]
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]


def _head(model: GPT, rows: int) -> Callable[[Tensor], Tensor]:
    """The output head of a decoding step of `rows` rows: (rows, C) hidden states -> (rows, V) scores.
    A linear head goes through `minigpt.kernels.decode_head` (as `minigpt generate`'s does); the adaptive
    softmax is not one linear layer and has no packed form."""
    if model.config.head == "linear":
        return decode_head(model.lm_head.weight, model.lm_head.bias, rows)
    return model.head_logits
