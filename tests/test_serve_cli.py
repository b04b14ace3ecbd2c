"""`minigpt serve` as a process: it starts, serves, and stops cleanly on SIGTERM and Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'minigpt[serve]')")

import httpx  # noqa: E402
from test_serve import ckpt, endless_ckpt  # noqa: E402, F401  (fixtures)


class ServerProcess:
    """`python -m minigpt serve` on a free port of 127.0.0.1, its stderr read line by line."""

    def __init__(self, ckpt_path, *options: str) -> None:
        argv = [sys.executable, "-m", "minigpt", "serve", "--ckpt_path", str(ckpt_path), "--port", "0", *options]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(120), f"the server did not start: {self.lines}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"playground (http://\S+)/ ", line)
            if found:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def serve_process(ckpt, endless_ckpt):  # noqa: F811
    started: list[ServerProcess] = []

    def start(*options: str, endless: bool = False) -> ServerProcess:
        started.append(ServerProcess(endless_ckpt if endless else ckpt, *options))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def events(lines) -> list[dict | str]:
    """The data of each Server-Sent Event in `lines` as JSON (or the final "[DONE]")."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_starts_in_about_twice_import_torch_and_sigterm_lets_running_requests_finish(serve_process):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    import_torch = time.perf_counter() - t0
    server = serve_process("--max_tokens_limit", "40", "--shutdown_grace_s", "60")
    deadline = time.monotonic() + 120
    while True:  # from the command to a served /health
        assert time.monotonic() < deadline and server.proc.poll() is None, f"no /health: {server.lines}"
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.01)
    startup = time.perf_counter() - server.started
    print(f"import torch {import_torch:.2f} s, minigpt serve ready {startup:.2f} s ({startup / import_torch:.2f}x)")
    # "About twice": the server imports torch, minigpt's pure layers, FastAPI and uvicorn, and loads the model.
    assert startup < 2.5 * import_torch + 1.0

    body = {"prompt": "the movie was", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # running
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connection while the running request finishes
            httpx.get(server.url + "/health", timeout=5)
        rest = events(lines)
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
    assert len(rest) == 40  # every token after the first chunk, then [DONE]
    assert server.proc.wait(30) == 0
    assert "minigpt serve: stopped" in "".join(server.lines)


def test_ctrl_c_cancels_what_the_grace_period_does_not_finish_and_exits_0(serve_process):
    server = serve_process("--max_tokens_limit", "1000000", "--shutdown_grace_s", "0.5", endless=True)
    body = {"prompt": "the movie was", "max_tokens": 1_000_000, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        server.proc.send_signal(signal.SIGINT)
        rest = events(lines)
    assert rest[-1] == "[DONE]" and "shutting down" in rest[-2]["error"]["message"]
    assert all("choices" in event for event in rest[:-2])
    assert server.proc.wait(30) == 0
    assert "minigpt serve: stopped" in "".join(server.lines)
    assert "Traceback" not in "".join(server.lines)
