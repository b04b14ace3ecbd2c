"""Tests of `minigpt serve`'s pieces: the per-row `SlotCache`, the batching `Scheduler` and the HTTP API.

The API is driven by the official `openai` client (and httpx for what the client cannot send) against a
uvicorn server on 127.0.0.1 in this process. Models are tiny and seeded, their matrices redrawn from
N(0, 0.5^2) so that logits are well separated (see tests/test_generation.py): greedy text compared across
code paths does not flip on float rounding, and is checked to be non-trivial.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'minigpt[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'minigpt[dev]')")

import httpx  # noqa: E402  (after the skips, with the other serve test dependencies)
import uvicorn  # noqa: E402

from minigpt.cache import SlotCache  # noqa: E402
from minigpt.checkpoint import load_model, new_checkpoint, save_checkpoint  # noqa: E402
from minigpt.cli import main  # noqa: E402
from minigpt.config import GPTConfig  # noqa: E402
from minigpt.generation import SamplingConfig, banned_special_ids, encode_prompt, generate  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.serve.app import create_app  # noqa: E402
from minigpt.serve.scheduler import Job, QueueFull, Scheduler  # noqa: E402
from minigpt.tokenizer import EOT_ID, SPECIALS, Vocab  # noqa: E402

WORDS = "the movie was great bad plot actor film really good story not very boring fun . , ! it ' s".split()
KEY = "sk-test-key"


def make_vocab() -> Vocab:
    return Vocab(list(SPECIALS) + WORDS)


def make_model(vocab_size: int = len(SPECIALS) + len(WORDS), seed: int = 0, *, eot_bias: float = 0.0,
               **overrides) -> GPT:  # fmt: skip
    """A tiny GPT (block 16) with seeded weights drawn wide enough for well-separated logits; `eot_bias`
    is added to the end-of-text score (negative: samples run longer before they stop)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.tiny(vocab_size=vocab_size, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
        head = model.lm_head if model.config.head == "linear" else model.adaptive.head
        head.bias[EOT_ID] += eot_bias
    return model


def write_checkpoint(path: Path, model: GPT | None = None) -> Path:
    return save_checkpoint(new_checkpoint(model or make_model(eot_bias=-5.0), make_vocab()), path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.ckpt")


@pytest.fixture(scope="module")
def endless_ckpt(tmp_path_factory) -> Path:
    """A model that never ends its text, for requests that must outlast their client however the draws fall
    (the tiny model above ends a text with about 0.08% per token)."""
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "endless.ckpt", make_model(eot_bias=-1e4))


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve_app(ckpt: Path, **kwargs):
    model, tokenizer = load_model(ckpt)
    return create_app(model, tokenizer, model_name="tiny", **kwargs)


@pytest.fixture(scope="module")
def server(ckpt):
    """A keyed server with room for 4 rows; yields (base URL, app)."""
    app = serve_app(ckpt, api_key=KEY, max_batch=4, max_queue=8, max_tokens_limit=200, max_body_bytes=4096)
    with running(app) as url:
        yield url, app


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def generate_cli(ckpt: Path, prompt: str, capsys, **options) -> dict:
    """`minigpt generate --json` in this process: its one sample."""
    argv = ["generate", "--ckpt_path", str(ckpt), "--prompt", prompt, "--json"]
    for name, value in options.items():
        argv += [f"--{name}", "null" if value is None else str(value)]
    capsys.readouterr()
    with warnings.catch_warnings():  # the command's notes about long prompts and unknown words
        warnings.simplefilter("ignore")
        main(argv)
    (sample,) = json.loads(capsys.readouterr().out)["samples"]
    return sample


# -- the SlotCache -----------------------------------------------------------------------------------

ARCHITECTURES = {
    "learned-prenorm": dict(positional="learned", norm_first=True),
    "sinusoidal-postnorm": dict(positional="sinusoidal", norm_first=False),
    "rotary-rmsnorm-swiglu": dict(positional="rotary", norm="rmsnorm", norm_first=True, activation="swiglu",
                                  qk_norm=True),  # fmt: skip
    "adaptive-input": dict(head="adaptive", adaptive_cutoffs=(8, 16), tie_weights=True),
    "rotary-bigram": dict(positional="rotary", norm="rmsnorm", norm_first=True, bigram_buckets=40, bigram_dim=8),
}


def alone(model: GPT, ids: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Scores after the prompt and after each of `steps` tokens, through a batch-1 `KVCache`."""
    cache = model.new_cache(1)
    out = [model(torch.tensor([ids]), cache=cache)[0, -1]]
    for before, token in zip([ids[-1], *steps], steps):
        out.append(model(torch.tensor([[token]]), cache=cache, previous=torch.tensor([before]))[0, -1])
    return out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@torch.inference_mode()
def test_slot_cache_rows_decode_together_as_each_alone(arch):
    model = make_model(32, **ARCHITECTURES[arch])
    cache = SlotCache(model.config, 4, None, None)
    prompts = [[5, 9, 3, 12, 7, 20, 6], [4], [30, 2, 11]]
    # Row 1 first holds a longer prompt: after its new prefill, the stale keys past its length must stay unseen.
    model(torch.tensor([list(range(3, 15))]), cache=cache.row(1))
    first = [model(torch.tensor([p]), cache=cache.row(i))[0, -1] for i, p in enumerate(prompts)]
    cache.rows = len(prompts)
    steps = [[8, 17, 3, 25], [19, 14, 10, 22], [6, 1, 13, 2]]
    batched = [first]
    for k in range(4):
        before = torch.tensor([s[k - 1] if k else p[-1] for s, p in zip(steps, prompts)])
        batched.append(model(torch.tensor([[s[k]] for s in steps]), cache=cache, previous=before)[:, -1])
    assert cache.lengths[:3] == [11, 5, 7]
    for i, p in enumerate(prompts):
        got = [first[i]] + [step[i] for step in batched[1:]]
        for g, expected in zip(got, alone(model, p, steps[i]), strict=True):
            torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_slot_cache_move_keeps_a_row_decoding_in_its_new_place():
    model = make_model(32, positional="rotary")
    cache = SlotCache(model.config, 3, None, None)
    for i, p in enumerate([[5, 9, 3], [4, 4], [30, 2, 11, 7, 8]]):
        model(torch.tensor([p]), cache=cache.row(i))
    cache.move(2, 0)  # row 0's request finished: the last row takes its place
    cache.rows = 2
    got = model(torch.tensor([[12], [13]]), cache=cache, previous=torch.tensor([8, 4]))[:, -1]
    torch.testing.assert_close(got[0], alone(model, [30, 2, 11, 7, 8], [12])[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], alone(model, [4, 4], [13])[1], atol=1e-5, rtol=1e-5)


def test_slot_cache_refuses_what_it_cannot_hold():
    model = make_model(32)
    cache = SlotCache(model.config, 2, None, None)
    with pytest.raises(ValueError, match="at least one active row"):
        cache.prepare(1, None)
    cache.rows = 1
    with pytest.raises(ValueError, match="one token per row"):
        cache.prepare(2, None)
    model(torch.tensor([list(range(3, 19))]), cache=cache.row(0))  # a full row: 16 of 16 slots
    with pytest.raises(ValueError, match="sliding window"):
        model(torch.tensor([[3]]), cache=cache)
    with pytest.raises(ValueError, match="block_size is only 16"):
        model(torch.tensor([list(range(17))]), cache=cache.row(1))


# -- the scheduler -----------------------------------------------------------------------------------


class Collector:
    """Listens to jobs: their tokens' text and finish reasons, and the rows of every step."""

    def __init__(self):
        self.text: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.done = threading.Event()
        self.rows: list[int] = []
        self.expected = 0

    def listener(self, key: int):
        def listen(update):
            self.text[key] = self.text.get(key, "") + update.text
            if update.finish_reason:
                self.finish[key] = update.finish_reason
                if len(self.finish) == self.expected:
                    self.done.set()

        return listen


def run_jobs(model, vocab, specs, *, max_batch=8, submit_together=True):
    """Run (prompt ids, sampling, seed) jobs; return (the jobs, the collector)."""
    seen = Collector()
    seen.expected = len(specs)
    scheduler = Scheduler(model, vocab, max_batch=max_batch, max_queue=16,
                          on_step=lambda seconds, rows: seen.rows.append(rows))  # fmt: skip
    jobs = [Job(ids, sampling, seed=seed, listener=seen.listener(k)) for k, (ids, sampling, seed) in enumerate(specs)]
    scheduler.start()
    try:
        if submit_together:
            scheduler.submit(jobs)
        else:
            for job in jobs:  # each alone: the next one starts after the previous one finished
                scheduler.submit([job])
                while job.finish_reason is None:
                    time.sleep(0.001)
        assert seen.done.wait(60), "the jobs did not finish"
    finally:
        scheduler.close(10)
    return jobs, seen


def reference(model, vocab, ids, sampling, seed) -> list[int]:
    """What `minigpt.generation.generate` makes of one prompt (the path of `minigpt generate`)."""
    (result,) = generate(model, ids, sampling, stop_ids=(vocab.eot_index,), banned_ids=banned_special_ids(vocab),
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return result.tokens


@pytest.mark.parametrize("arch", ["learned-prenorm", "rotary-rmsnorm-swiglu", "adaptive-input", "rotary-bigram"])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_batched_jobs_equal_each_alone_and_generate(arch, sampling):
    vocab = make_vocab()
    model = make_model(len(vocab), eot_bias=-5.0, **ARCHITECTURES[arch])
    greedy = sampling == "greedy"
    settings = [
        SamplingConfig.greedy(12) if greedy else SamplingConfig(12, temperature=1.0, top_k=None, top_p=None),
        SamplingConfig.greedy(30) if greedy else SamplingConfig(30, temperature=0.9, top_k=10, top_p=0.9),
        SamplingConfig.greedy(9) if greedy else SamplingConfig(9, temperature=1.2, repetition_penalty=1.3),
        SamplingConfig.greedy(20) if greedy else SamplingConfig(20, temperature=0.7, top_k=5),
    ]
    prompts = [[5], [5, 9, 3, 12, 7, 20, 6, 8, 10, 11], [12, 7], list(range(3, 19))]  # the last fills block_size
    specs = [(ids, s, 100 + k) for k, (ids, s) in enumerate(zip(prompts, settings))]
    batched, seen = run_jobs(model, vocab, specs)
    assert max(seen.rows) > 1, "the jobs never shared a step"
    single, _ = run_jobs(model, vocab, specs, submit_together=False)
    for job, one, (ids, s, seed) in zip(batched, single, specs):
        assert job.tokens == one.tokens == reference(model, vocab, ids, s, seed)
        assert job.finish_reason == ("stop" if len(job.tokens) < s.max_new_tokens else "length")
    assert len(set(batched[1].tokens)) > 2, f"greedy output too trivial to compare: {batched[1].tokens}"
    assert len(batched[1].tokens) + len(prompts[1]) > 16, "the sliding window past block_size went untested"


def test_a_job_joins_and_leaves_a_running_batch_without_changing_its_text():
    vocab = make_vocab()
    model = make_model(len(vocab), positional="rotary")
    greedy = SamplingConfig.greedy(25)
    seen = Collector()
    seen.expected = 3
    scheduler = Scheduler(model, vocab, max_batch=4, on_step=lambda s, rows: seen.rows.append(rows))
    late = [Job([9, 9, 4], greedy, seed=0, listener=seen.listener(1)),
            Job([7], SamplingConfig.greedy(3), seed=0, listener=seen.listener(2))]  # fmt: skip
    first_listen = seen.listener(0)

    def first(update):  # after the first job's 5th token, two more join between steps
        first_listen(update)
        if update.tokens == 5:
            scheduler.submit(late)

    jobs = [Job([5, 6, 3], greedy, seed=0, listener=first), *late]
    scheduler.start()
    try:
        scheduler.submit(jobs[:1])
        assert seen.done.wait(60)
    finally:
        scheduler.close(10)
    assert seen.rows[:4] == [1, 1, 1, 1] and 3 in seen.rows and seen.rows[-1] == 1  # joined, then the short one left
    for job in jobs:
        assert job.tokens == reference(model, vocab, job.prompt_ids, job.sampling, 0)


def test_a_cancelled_job_frees_its_row_at_the_next_step():
    vocab = make_vocab()
    model = make_model(len(vocab))
    seen = Collector()
    seen.expected = 2
    scheduler = Scheduler(model, vocab, max_batch=1, max_queue=1)
    long_job = Job([5], SamplingConfig.greedy(10_000), seed=0, listener=seen.listener(0))
    short = Job([6], SamplingConfig.greedy(2), seed=0, listener=seen.listener(1))
    scheduler.start()
    try:
        scheduler.submit([long_job])
        scheduler.submit([short])  # waits: the only row is taken
        with pytest.raises(QueueFull):
            scheduler.submit([Job([7], SamplingConfig.greedy(2), seed=0, listener=seen.listener(2))])
        while len(long_job.tokens) < 3:
            time.sleep(0.001)
        long_job.cancel()
        assert seen.done.wait(30)
    finally:
        scheduler.close(10)
    assert long_job.finish_reason == "cancelled" and len(long_job.tokens) < 1000
    assert short.finish_reason == "length" and len(short.tokens) == 2


def test_stop_strings_end_the_text_and_are_held_back_until_decided():
    vocab = make_vocab()
    model = make_model(len(vocab), eot_bias=-5.0)
    ids = encode_prompt(vocab, "the movie", block_size=16)
    full = vocab.decode(reference(model, vocab, ids, SamplingConfig.greedy(12), 0), tidy=True)
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])  # two words: the first may arrive before the stop string is complete
    seen = Collector()
    seen.expected = 1
    pieces = []
    listen = seen.listener(0)
    job = Job(ids, SamplingConfig.greedy(12), seed=0, listener=lambda u: (pieces.append(u.text), listen(u)),
              stop=[stop], prefix=" ")  # fmt: skip
    scheduler = Scheduler(model, vocab)
    scheduler.start()
    try:
        scheduler.submit([job])
        assert seen.done.wait(30)
    finally:
        scheduler.close(10)
    expected = " " + full[: full.index(stop)]
    assert seen.text[0] == expected and job.finish_reason == "stop"
    assert all(stop.split()[0] not in piece for piece in pieces[:-1] if piece), pieces


# -- the HTTP API ------------------------------------------------------------------------------------


def test_completion_equals_minigpt_generate(client, ckpt, capsys):
    settings = dict(temperature=0.9, top_k=8, top_p=0.9)
    expected = generate_cli(ckpt, "the movie was", capsys, max_new_tokens=20, seed=7, **settings)
    reply = client.completions.create(model="anything", prompt="the movie was", max_tokens=20, seed=7,
                                      temperature=0.9, top_p=0.9, extra_body={"top_k": 8})  # fmt: skip
    assert reply.choices[0].text == " " + expected["text"]
    assert reply.choices[0].finish_reason == ("stop" if expected["stop_reason"] == "eos" else "length")
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == len(expected["tokens"])
    assert reply.model == "tiny" and reply.object == "text_completion"


def test_streamed_completion_is_the_same_text_token_by_token(client, ckpt, capsys):
    expected = generate_cli(ckpt, "it was a good", capsys, max_new_tokens=30, seed=3, temperature=1.0)
    chunks = list(client.completions.create(model="tiny", prompt="it was a good", max_tokens=30, seed=3,
                                            temperature=1.0, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == " " + expected["text"]
    assert [c.choices[0].finish_reason for c in text_chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len(text_chunks) >= len(expected["tokens"]) > 5  # a chunk per token
    assert chunks[-1].usage.completion_tokens == len(expected["tokens"])


def test_prompt_longer_than_the_context_is_read_as_minigpt_generate_reads_it(client, ckpt, capsys):
    prompt = " ".join(WORDS * 2)  # 40 tokens, block_size 16
    expected = generate_cli(ckpt, prompt, capsys, max_new_tokens=10, temperature=0)
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == " " + expected["text"] and reply.usage.prompt_tokens == 16


def test_several_prompts_and_choices_come_in_openai_order(client, ckpt, capsys):
    prompts = ["the movie was", "bad plot"]
    reply = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=8, seed=11, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for c in reply.choices:  # choice j of each prompt samples with seed + j
        expected = generate_cli(ckpt, prompts[c.index // 2], capsys, max_new_tokens=8, seed=11 + c.index % 2,
                                temperature=1.0)  # fmt: skip
        assert c.text == " " + expected["text"]


def test_chat_completion_reads_the_template_streamed_or_not(client, ckpt, capsys):
    messages = [{"role": "system", "content": "film reviews"}, {"role": "user", "content": "the movie was"}]
    expected = generate_cli(ckpt, "System: film reviews\nUser: the movie was\nAssistant:", capsys, max_new_tokens=12,
                            seed=5)  # fmt: skip
    reply = client.chat.completions.create(model="x", messages=messages, max_tokens=12, seed=5)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["text"] and expected["text"]
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=12, seed=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_models_health_metrics_and_page(client, server):
    url, _ = server
    assert [m.id for m in client.models.list()] == ["tiny"]
    client.completions.create(model="tiny", prompt="the movie", max_tokens=3)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("minigpt_requests_total", "minigpt_generated_tokens_total", "minigpt_queue_depth",
                 "minigpt_time_to_first_token_seconds_bucket", "minigpt_inter_token_latency_seconds_bucket"):
        assert name in metrics  # fmt: skip
    assert 'minigpt_requests_total{route="/v1/completions",status="200"}' in metrics
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<textarea" in page.text and "://" not in page.text  # nothing from outside


def assert_still_serving(client):
    assert client.completions.create(model="tiny", prompt="the movie", max_tokens=2).choices[0].text


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b'{"prompt": "the movie"', 400, "not valid JSON"),
        (b'{"max_tokens": 3}', 422, "prompt"),
        (b'{"prompt": "the movie", "max_tokens": "many"}', 422, "max_tokens"),
        (b'{"prompt": "the movie", "temperature": -1}', 422, "temperature"),
        (b'{"prompt": "the movie", "top_p": 0}', 422, "top_p"),
        (b'{"prompt": "the movie", "max_tokens": 201}', 422, "max_tokens must be <= 200"),
        (b'{"prompt": "the movie", "colour": "red"}', 422, "colour"),
        (b'{"prompt": "the movie", "logprobs": 2}', 422, "logprobs is not supported"),
        (b'{"prompt": "   "}', 422, "prompt is empty"),
        (b'{"prompt": [3, 999]}', 422, "token ids"),
        (b'{"prompt": "the movie", "n": 13, "max_tokens": 2}', 422, "at most 12"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, body, status, says):
    url, _ = server
    reply = httpx.post(url + "/v1/completions", content=body,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert_still_serving(client)


def test_missing_or_wrong_api_key_is_401(server, client):
    url, _ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.post(url + "/v1/completions", json={"prompt": "the movie"}, headers=headers)
        assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30).models.list()
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # liveness probes carry no key
    missing = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
    assert_still_serving(client)


def test_a_body_over_the_limit_is_413_declared_or_chunked(server, client):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"prompt": "the movie " * 1000}).encode()
    assert httpx.post(url + "/v1/completions", content=big, headers=headers).status_code == 413
    chunked = httpx.post(url + "/v1/completions", content=iter([big[:3000], big[3000:]]), headers=headers)
    assert chunked.status_code == 413 and "4096 bytes" in chunked.json()["error"]["message"]
    assert_still_serving(client)


def test_a_full_queue_is_429_with_retry_after(ckpt):
    app = serve_app(ckpt, max_batch=1, max_queue=0, max_tokens_limit=100_000)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        stream = client.completions.create(model="tiny", prompt="the movie", max_tokens=100_000, stream=True)
        next(iter(stream))  # the only row is taken
        reply = httpx.post(url + "/v1/completions", json={"prompt": "the movie", "max_tokens": 2})
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "1"
        assert reply.json()["error"]["type"] == "rate_limit_error"
        stream.close()
        deadline = time.monotonic() + 10
        while app.state.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_still_serving(client)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_row_at_the_next_step(endless_ckpt, stream):
    app = serve_app(endless_ckpt, max_batch=1, max_tokens_limit=1_000_000)
    scheduler, body = app.state.scheduler, {"prompt": "the movie", "max_tokens": 1_000_000, "stream": stream}
    with running(app) as url:
        with httpx.Client(timeout=30) as http:
            if stream:
                with http.stream("POST", url + "/v1/completions", json=body) as reply:
                    lines = reply.iter_lines()
                    assert next(lines).startswith("data: ")
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post(url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 10
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.running == 0, "the abandoned request still holds its row"
        metrics = app.state.metrics.exposition().decode()
        assert "minigpt_cancelled_jobs_total 1.0" in metrics
        reply = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30).completions.create(
            model="tiny",
            prompt="the movie", max_tokens=2)  # fmt: skip
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_server_survives_a_failing_step(ckpt, monkeypatch):
    app = serve_app(ckpt)
    scheduler = app.state.scheduler
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        with monkeypatch.context() as m:
            m.setattr(scheduler, "_sample", lambda scored: 1 / 0)
            with pytest.raises(openai.InternalServerError, match="ZeroDivisionError"):
                client.completions.create(model="tiny", prompt="the movie", max_tokens=3)
        assert scheduler.running == 0
        assert_still_serving(client)


def test_serve_stays_free_of_lightning_and_transformers(ckpt):
    """`minigpt serve` loads as `minigpt generate` does: torch and minigpt's pure layers."""
    import subprocess
    import sys

    code = ("import sys; from minigpt.checkpoint import load_model; from minigpt.serve.app import create_app; "
            f"create_app(*load_model({str(ckpt)!r})); "
            "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_serve_extra_is_one_sentence_and_exit_2(ckpt, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # find_spec reports a None module as missing
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("minigpt: error: minigpt serve needs the serve extra (uvicorn is missing): "
                   "pip install 'minigpt[serve]'")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--max_batch", "0"], "--max_batch must be >= 1"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--api_key", " "], "--api_key is empty"),
    ],
)
def test_bad_serve_options_are_one_sentence_and_exit_2(ckpt, capsys, argv, says):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--ckpt_path", str(ckpt), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_a_taken_port_is_one_sentence_and_exit_2(ckpt, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--ckpt_path", str(ckpt), "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pick another --port" in err, err

