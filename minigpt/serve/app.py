"""The HTTP side of `minigpt serve`: OpenAI-compatible routes, their request schemas, errors and the page.

    POST /v1/completions        prompt(s) -> text, or Server-Sent Events with "stream": true
    POST /v1/chat/completions   messages, read through `chat_prompt`'s plain template -> the same
    GET  /v1/models             the one model this server holds
    GET  /health                liveness and load (no key needed)
    GET  /metrics               Prometheus text (`minigpt.serve.metrics`)
    GET  /                      the playground page (static/index.html)

Routes validate a request at the boundary (pydantic schemas, `SamplingConfig`, `encode_prompt`), turn each
prompt and choice into a `Job` for the `Scheduler` that owns the model, and await the jobs' updates; they never
run the model. Every error is OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``:
400 a body that is not JSON, 422 a field that is wrong, 401 a missing or wrong API key (compared in constant
time), 404/405 an unknown route or method, 413 a body over the limit, 429 (with Retry-After) when the queue
is full, 500 a bug (logged with its traceback; the server goes on).

References: the OpenAI API reference (completions, chat completions, streaming, error codes); llama.cpp
`tools/server` (defaults: localhost, API key, /health, /metrics); FastAPI's documentation (lifespan, handlers).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.generation import SamplingConfig, encode_prompt
from minigpt.model import GPT
from minigpt.serve.metrics import Metrics
from minigpt.serve.scheduler import Job, QueueFull, Scheduler, Update

log = logging.getLogger("minigpt.serve")

DEFAULT_SAMPLING = SamplingConfig()
"""A field a request leaves out takes `minigpt generate`'s default (max_tokens 50, temperature 0.8, top_k 50,
top_p 0.95), so a request and the command with the same settings give the same text."""

MAX_SEED = 2**63 - 1
RETRY_AFTER_S = 1  # a full queue drains by a decoding step at a time: come back soon
CHAT_STOP = "\nUser:"
"""Ends an answer where a base model goes on to write the user's next turn itself."""

_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_NEUTRAL = (None, 0, 0.0, False, {}, [])  # OpenAI's "off" values of the fields minigpt does not implement


# -- request schemas ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    """Send a last chunk (before [DONE]) with the request's token counts and no choices."""


class _SamplingFields(BaseModel):
    """The fields completions and chat completions share (OpenAI's, plus top_k and repetition_penalty)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    """Ignored: the server holds one model (`GET /v1/models` names it), whatever a client asks for."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    """Extension: keep the k most likely tokens; null keeps every token, leaving it out keeps 50."""
    repetition_penalty: float | None = Field(None, gt=0)
    """Extension: > 1 discourages tokens already in the text (`minigpt generate --repetition_penalty`)."""
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    """Choice j of every prompt samples with seed + j; without a seed every choice draws a random one."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields minigpt does not implement: accepted only at their neutral value.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _supported(self):
        for name in ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs", *self._unsupported()):
            if getattr(self, name) not in _NEUTRAL:
                raise ValueError(f"{name} is not supported by minigpt serve; leave it out")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return self

    def _unsupported(self) -> tuple[str, ...]:
        return ()

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens_limit: int) -> SamplingConfig:
        """The request's `SamplingConfig` (fields left out take `DEFAULT_SAMPLING`'s values).

        Raises:
            UserError: max_tokens is over the server's limit.
        """
        given = self.model_fields_set
        max_tokens = self.max_tokens or min(DEFAULT_SAMPLING.max_new_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise UserError(f"max_tokens must be <= {max_tokens_limit} (the server's limit), got {max_tokens}")
        temperature = DEFAULT_SAMPLING.temperature if self.temperature is None else self.temperature
        return SamplingConfig(
            max_new_tokens=max_tokens, temperature=temperature,
            top_k=self.top_k if "top_k" in given else DEFAULT_SAMPLING.top_k,
            top_p=self.top_p if "top_p" in given else DEFAULT_SAMPLING.top_p,
            repetition_penalty=self.repetition_penalty or DEFAULT_SAMPLING.repetition_penalty,
        )  # fmt: skip


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, several texts, token ids, or several lists of token ids; a choice per prompt and n."""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def _unsupported(self) -> tuple[str, ...]:
        return ("echo", "suffix") + (("best_of",) if self.best_of not in (None, 1) else ())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": accepted, not used
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise UserError("message content parts must be {'type': 'text', 'text': ...}: this model reads text only")
        return "".join(part["text"] for part in self.content)


class ChatRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens (either may be given)."""

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not two different values")
            self.max_tokens = self.max_completion_tokens
        return self


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The plain template that turns messages into a base model's prompt: one line per message, then the
    answer's cue::

        System: You review films.
        User: Was it good?
        Assistant:
    """
    lines = [f"{_ROLES[m.role]}: {m.text().strip()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


# -- errors ------------------------------------------------------------------------------------------


def error_response(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """OpenAI's error shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"The body is not valid JSON ({first.get('msg', 'parse error')}).")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "this field is not an argument of this endpoint"
    return error_response(422, f"{param}: {message}" if param else message, param=param)


def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(err.status_code, "invalid_request_error")
    return error_response(err.status_code, str(err.detail), kind=kind, headers=getattr(err, "headers", None))


def _user_error(_: Request, err: UserError) -> JSONResponse:
    return error_response(422, str(err).strip().splitlines()[0])


def _bug(_: Request, err: Exception) -> JSONResponse:
    log.error("unexpected error answering a request", exc_info=err)
    return error_response(500, "The server failed on this request (its log has the traceback).", kind="server_error")


# -- middleware --------------------------------------------------------------------------------------


class BodyLimit:
    """Answer 413 to a body over `max_bytes`, whether its Content-Length says so or its chunks add up to it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, self._message())(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"The request body is over the server's limit of {self.max_bytes} bytes (--max_body_bytes)."


class CountRequests:
    """Count each answered request by route and status code (`minigpt_requests_total`)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted_send)


# -- the app -----------------------------------------------------------------------------------------


def create_app(
    model: GPT, tokenizer, *, model_name: str = "minigpt", api_key: str | None = None, max_batch: int = 16,
    max_queue: int = 64, max_tokens_limit: int = 512, max_body_bytes: int = 1_000_000,
) -> FastAPI:  # fmt: skip
    """The server's ASGI app; its lifespan starts and stops the decoding loop.

    Args:
        model: The model (its device decides where decoding runs).
        tokenizer: The model's tokenizer.
        model_name: The id `/v1/models` lists and responses carry.
        api_key: When set, `/v1/*` and `/metrics` need ``Authorization: Bearer <api_key>``.
        max_batch: Most choices decoded together.
        max_queue: Most choices waiting for a row; beyond it a request gets 429.
        max_tokens_limit: Largest max_tokens a request may ask for.
        max_body_bytes: Largest request body.
    """
    holder: dict[str, Metrics] = {}
    scheduler = Scheduler(
        model, tokenizer, max_batch=max_batch, max_queue=max_queue,
        on_step=lambda seconds, rows: holder["m"].step(seconds, rows),
        on_token=lambda seconds, first: holder["m"].token(seconds, first),
    )  # fmt: skip
    metrics = holder["m"] = Metrics(waiting=lambda: scheduler.waiting, running=lambda: scheduler.running)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            # Reached after uvicorn's graceful shutdown: requests still running then are cancelled.
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="minigpt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(Exception, _bug)
    server = _Server(scheduler, metrics, tokenizer, model_name, model.config, max_tokens_limit)
    keyed = APIRouter(dependencies=[Depends(_key_check(api_key))])
    keyed.add_api_route("/v1/completions", server.completions, methods=["POST"])
    keyed.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    keyed.add_api_route("/v1/models", server.models, methods=["GET"])
    keyed.add_api_route("/metrics", server.prometheus, methods=["GET"])
    app.include_router(keyed)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/", playground, methods=["GET"], response_class=HTMLResponse)
    routes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/health", "/"}
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics, routes=routes)  # the outermost: it sees every answer
    return app


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    expected = None if api_key is None else api_key.encode()

    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(
                401, "Missing or wrong API key: send 'Authorization: Bearer <key>' with the server's --api_key.",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    return check


def playground() -> HTMLResponse:
    """The playground page, shipped inside the package (no CDN, works offline)."""
    return HTMLResponse(resources.files("minigpt.serve").joinpath("static", "index.html").read_text("utf-8"))


class _Server:
    """The routes' shared state: the loop, the metrics and how prompts are read."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics, tokenizer, model_name: str, config: GPTConfig,
                 max_tokens_limit: int) -> None:  # fmt: skip
        self.scheduler, self.metrics, self.tokenizer = scheduler, metrics, tokenizer
        self.model_name, self.max_tokens_limit = model_name, max_tokens_limit
        self.block_size, self.vocab_size = config.block_size, config.vocab_size
        self.created = int(time.time())

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompts = [self._encode(p) for p in _as_prompts(body.prompt)]
        return await self._answer(request, body, prompts, chat=False)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        prompt = self._encode(chat_prompt(body.messages))
        return await self._answer(request, body, [prompt], chat=True)

    async def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minigpt"}
        return {"object": "list", "data": [card]}

    async def health(self) -> dict:
        s = self.scheduler
        return {"status": "ok", "model": self.model_name, "running": s.running, "waiting": s.waiting,
                "max_batch": s.max_batch, "max_queue": s.max_queue}  # fmt: skip

    async def prometheus(self) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's ids as `minigpt generate` reads them: the last block_size tokens of a longer one."""
        if isinstance(prompt, list):
            vocab_size = self.vocab_size
            if not prompt or not all(0 <= i < vocab_size for i in prompt):
                raise UserError(f"prompt token ids must be a non-empty list of integers in [0, {vocab_size})")
            return prompt[-self.block_size :]
        with warnings.catch_warnings(record=True) as caught:  # a server logs what the command would print
            warnings.simplefilter("always")
            ids = encode_prompt(self.tokenizer, prompt, block_size=self.block_size)
        for warning in caught:
            log.info("prompt: %s", warning.message)
        return ids

    async def _answer(self, request: Request, body: _SamplingFields, prompts: list[list[int]], *, chat: bool):
        sampling = body.sampling(self.max_tokens_limit)
        stops = body.stops + ([CHAT_STOP] if chat else [])
        # A word-level continuation is separate words: it starts with a space after a completion's prompt.
        prefix = " " if self.scheduler.word_level and not chat else ""
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j  # OpenAI's order: every choice of the first prompt, then the next prompt's
                seed = (body.seed + j) % (MAX_SEED + 1) if body.seed is not None else secrets.randbits(63)
                listener = _listener(loop, updates, index)
                jobs.append(Job(ids, sampling, seed=seed, listener=listener, stop=stops, prefix=prefix))
        total = self.scheduler.max_batch + self.scheduler.max_queue
        if len(jobs) > total:
            raise UserError(f"the request asks for {len(jobs)} choices (prompts x n); the server holds at most {total}")
        try:
            self.scheduler.submit(jobs)
        except QueueFull as err:
            raise HTTPException(429, f"The server is busy ({err}); retry shortly.",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from err  # fmt: skip
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
        reply = _Reply(self.model_name, chat, jobs, prompts, body.n)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(reply, updates, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, reply))
        try:
            while not reply.done():
                reply.add(*await updates.get())
        finally:
            watcher.cancel()
            reply.cancel()
        failed = reply.failure()
        if failed is not None:
            status, message, kind = failed
            return error_response(status, message, kind=kind)
        return JSONResponse(reply.body())

    async def _cancel_on_disconnect(self, request: Request, reply: _Reply) -> None:
        """Cancel a non-streamed reply's jobs when its client goes away (its body has been read already,
        so the next message the server gets is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        reply.cancel()
        self.metrics.cancelled.inc(reply.unfinished())

    async def _stream(self, reply: _Reply, updates: asyncio.Queue, usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk per token of each choice, then the usage if asked, then [DONE]. A
        client that goes away cancels this generator at its `await`: the jobs are cancelled with it."""
        try:
            while not reply.done():
                index, update = await updates.get()
                text = reply.add(index, update)
                failed = reply.failure()
                if failed is not None:
                    yield _sse({"error": {"message": failed[1], "type": failed[2], "param": None, "code": None}})
                    break
                yield _sse(reply.chunk(index, text))
            else:
                if usage:
                    yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            unfinished = reply.unfinished()
            if unfinished:
                reply.cancel()
                self.metrics.cancelled.inc(unfinished)


def _listener(loop: asyncio.AbstractEventLoop, updates: asyncio.Queue, index: int) -> Callable[[Update], None]:
    """A job's listener: hands each update (from the loop's thread) to the request's event loop."""

    def listen(update: Update) -> None:
        try:
            loop.call_soon_threadsafe(updates.put_nowait, (index, update))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass

    return listen


def _as_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise UserError("prompt is an empty list: give a text, a list of texts or a list of token ids")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """The choices of one request as their updates arrive, and the OpenAI objects that report them."""

    def __init__(self, model_name: str, chat: bool, jobs: list[Job], prompts: list[list[int]], n: int) -> None:
        self.model_name, self.chat, self.jobs, self.n = model_name, chat, jobs, n
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.texts = [""] * len(jobs)
        self.finish: list[str | None] = [None] * len(jobs)
        self.tokens = [0] * len(jobs)
        self.errors: list[str | None] = [None] * len(jobs)
        self.role_sent = [False] * len(jobs)

    def add(self, index: int, update: Update) -> str:
        """Record a choice's update; return the text it adds to the choice."""
        text = update.text
        if self.chat and not self.texts[index]:
            text = text.lstrip()  # an answer starts at its first word, whatever the cue left before it
        self.texts[index] += text
        self.tokens[index] = update.tokens
        self.finish[index] = update.finish_reason
        self.errors[index] = update.error
        return text

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def unfinished(self) -> int:
        return sum(f is None for f in self.finish)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def failure(self) -> tuple[int, str, str] | None:
        """(status, message, type) when a choice failed or was cancelled by the server stopping."""
        if "error" in self.finish:
            message = next(e for e in self.errors if e)
            return 500, f"The server failed on this request: {message}", "server_error"
        if "cancelled" in self.finish:
            return 503, "The server is shutting down; retry on another server or later.", "server_error"
        return None

    def usage(self) -> dict[str, int]:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def body(self) -> dict[str, Any]:
        choices = []
        for i, (text, finish) in enumerate(zip(self.texts, self.finish)):
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish, "logprobs": None})  # fmt: skip
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
        return {**self._envelope(self.object), "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str) -> dict[str, Any]:
        """The streamed chunk of a choice's update that added `text`."""
        finish = self.finish[index]
        if self.chat:
            delta: dict[str, str] = {"content": text}
            if not self.role_sent[index]:  # a choice's first chunk says who speaks
                delta, self.role_sent[index] = {"role": "assistant", **delta}, True
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._envelope("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": self.usage()}
