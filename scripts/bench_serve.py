"""Load and soak test of `minigpt serve`: concurrent streaming clients against batching and one-at-a-time servers.

    python scripts/bench_serve.py --ckpt_path CKPT [--max_tokens 32] [--requests_per_client 2] [--soak 1000]
                                  [--time_limit 900] [--temperature T] [--hf_folder FOLDER]

Both servers run the same checkpoint as subprocesses on 127.0.0.1 (`python -m minigpt serve`): the batching
one with --max_batch 16, and a one-request-at-a-time one with --max_batch 1 (every other request waits in its
queue). Clients are threads, each with its own official `openai` client, sending streaming completions
(`minigpt generate`'s default sampling unless --temperature is given, a seed per request, prompts from a fixed
list) one after another:
1, 4 and 16 of them at once, `--requests_per_client` requests each, so every level is bounded in requests;
`--time_limit` bounds the whole run. Each streamed chunk is one token: a request's time to first token is
its first chunk, its inter-token latencies the gaps between chunks, and a level's aggregate tokens/s is
every request's tokens over the level's wall time.

Then a soak: `--soak` short requests (16 clients) to the batching server, its resident memory (VmRSS)
read before (after a warm-up) and after. `transformers serve` joins the table only with `--hf_folder`
(a Hugging Face export of the checkpoint) and when it starts offline here; otherwise the reason is printed.

Prints a table, then one JSON line: agg_tok_s_16, vs_single (16 clients / 1 client, batching server),
vs_serial (16 clients, batching / one-at-a-time server), ttft_p95_s (16 clients, batching), rss_growth,
the per-step cost of 16 decoding rows over 1 row (the server's minigpt_decode_step_seconds), errors, the
machine and its load average. Any model works; the recipe it is meant for is configs/imdb.yaml (a
checkpoint of `minigpt fit`, however short: speed does not depend on how well it is trained).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

PROMPTS = [
    "the movie was", "this film is one of the", "i have never seen a", "the acting in this movie",
    "what a waste of", "the plot of the film", "my favourite scene is", "if you like horror movies",
]  # fmt: skip
LEVELS = (1, 4, 16)
SOAK_CLIENTS, SOAK_TOKENS = 16, 4


@dataclass
class Level:
    """What one concurrency level measured."""

    clients: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Server:
    """A server subprocess on a free 127.0.0.1 port; `url` once it answers /health."""

    def __init__(self, argv: list[str], name: str, url_pattern: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name, self.lines = name, []
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.url = f"http://127.0.0.1:{port}" if port else ""
        self._pattern = url_pattern
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = self._pattern and re.search(self._pattern, line)
            if found and not self.url:
                self.url = found.group(1)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        return False

    def rss_mb(self) -> float:
        """Resident memory of the server process (Linux /proc)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def minigpt_server(ckpt: str, max_batch: int, max_tokens: int) -> Server:
    argv = [sys.executable, "-m", "minigpt", "serve", "--ckpt_path", ckpt, "--port", "0", "--max_batch",
            str(max_batch), "--max_queue", "256", "--max_tokens_limit", str(max_tokens)]  # fmt: skip
    return Server(argv, f"minigpt serve --max_batch {max_batch}", url_pattern=r"playground (http://\S+)/ ")


def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int, deadline: float,
              sampling: dict | None = None) -> Level:  # fmt: skip
    """`clients` threads, each sending `per_client` streaming completions one after another."""
    level, lock = Level(clients), threading.Lock()

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=300)
        for r in range(per_client):
            if time.monotonic() > deadline:
                return
            times, tokens = [], 0
            t0 = time.perf_counter()
            try:
                stream = api.completions.create(model=model, prompt=PROMPTS[(c + r) % len(PROMPTS)],
                                                max_tokens=max_tokens, seed=1000 * c + r, stream=True,
                                                **(sampling or {}))  # fmt: skip
                for chunk in stream:
                    if chunk.choices:
                        times.append(time.perf_counter())
                        tokens += 1
            except openai.OpenAIError:
                with lock:
                    level.errors += 1
                continue
            with lock:
                level.requests += 1
                level.tokens += tokens
                if times:
                    level.ttft.append(times[0] - t0)
                    level.gaps += [b - a for a, b in zip(times, times[1:])]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.seconds = time.perf_counter() - t0
    return level


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def step_cost(metrics: str, rows: int) -> float:
    """Mean seconds of the server's decoding steps with `rows` decoding rows (NaN when there were none)."""
    found = {}
    for kind in ("sum", "count"):
        m = re.search(rf'minigpt_decode_step_seconds_{kind}{{rows="{rows}"}} (\S+)', metrics)
        found[kind] = float(m.group(1)) if m else 0.0
    return found["sum"] / found["count"] if found["count"] else float("nan")


def soak(server: Server, model: str, n: int, deadline: float) -> tuple[float, float, int]:
    """(RSS before in MB, after, errors) around `n` (rounded up to a multiple of 16) short requests from 16
    clients."""
    run_level(server.url, model, SOAK_CLIENTS, 2, SOAK_TOKENS, deadline)  # warm-up: every path once
    before = server.rss_mb()
    level = run_level(server.url, model, SOAK_CLIENTS, -(-n // SOAK_CLIENTS), SOAK_TOKENS, deadline)
    return before, server.rss_mb(), level.errors


def hf_server(folder: str | None, max_tokens: int) -> tuple[Server | None, str]:
    if folder is None:
        return None, "skipped: no --hf_folder given (a Hugging Face export of the checkpoint)"
    exe = shutil.which("transformers")
    if exe is None:
        return None, "skipped: the transformers command is not installed"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [exe, "serve", folder, "--host", "127.0.0.1", "--port", str(port), "--continuous-batching"]
    server = Server(argv, "transformers serve", port=port, env=env)
    if not server.wait_ready(300):
        server.stop()
        return None, "skipped: transformers serve did not start offline here: " + "".join(server.lines[-3:]).strip()
    return server, ""


def _cpu_name() -> str:
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.machine()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a minigpt checkpoint (configs/imdb.yaml's recipe)")
    parser.add_argument("--max_tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--soak", type=int, default=1000, help="requests of the memory soak (0 = none)")
    parser.add_argument("--time_limit", type=float, default=900, help="seconds for the whole run")
    parser.add_argument("--hf_folder", default=None, help="a Hugging Face export to run `transformers serve` on")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's, 0.8)")
    args = parser.parse_args()
    sampling = {} if args.temperature is None else {"temperature": args.temperature}
    deadline = time.monotonic() + args.time_limit
    model = Path(args.ckpt_path).name
    servers = [minigpt_server(args.ckpt_path, 16, args.max_tokens), minigpt_server(args.ckpt_path, 1, args.max_tokens)]
    results: dict[str, dict[int, Level]] = {}
    notes = []
    try:
        for server in servers:
            if not server.wait_ready(300):
                raise SystemExit(f"{server.name} did not start: {''.join(server.lines[-5:])}")
        hf, why = hf_server(args.hf_folder, args.max_tokens)
        if hf is None:
            notes.append(f"transformers serve: {why}")
        else:
            servers.append(hf)
        results = {server.name: {} for server in servers}
        for clients in LEVELS:
            per_client = max(args.requests_per_client, 6 // clients)  # at least 6 requests per level
            for server in servers:  # the servers take turns at each level: load from elsewhere hits them alike
                name = Path(args.hf_folder).name if server is hf else model
                level = run_level(server.url, name, clients, per_client, args.max_tokens, deadline, sampling)
                results[server.name][clients] = level
        batching = servers[0]
        metrics = batching.metrics()
        before = after = float("nan")
        soak_errors = 0
        if args.soak:
            before, after, soak_errors = soak(batching, model, args.soak, deadline)
    finally:
        for server in servers:
            server.stop()

    print(f"{'server':<28} {'clients':>7} {'requests':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'ITL p50':>8} {'ITL p95':>8} {'errors':>6}")  # fmt: skip
    for name, levels in results.items():
        for clients, lv in levels.items():
            print(f"{name:<28} {clients:>7} {lv.requests:>8} {lv.tok_s:>8.1f} {percentile(lv.ttft, 50):>9.3f} "
                  f"{percentile(lv.ttft, 95):>9.3f} {percentile(lv.gaps, 50):>8.4f} {percentile(lv.gaps, 95):>8.4f} "
                  f"{lv.errors:>6}")  # fmt: skip
    for note in notes:
        print(note)
    batch, serial = results[servers[0].name], results["minigpt serve --max_batch 1"]
    step1, step16 = step_cost(metrics, 1), step_cost(metrics, 16)
    print(f"decoding step, batching server: {step1 * 1e3:.2f} ms with 1 row, {step16 * 1e3:.2f} ms with 16 rows")
    if args.soak:
        print(f"soak: {args.soak} requests, RSS {before:.1f} MB -> {after:.1f} MB, {soak_errors} errors")
    summary = {
        "agg_tok_s_16": round(batch[16].tok_s, 1),
        "vs_single": round(batch[16].tok_s / batch[1].tok_s, 2),
        "vs_serial": round(batch[16].tok_s / serial[16].tok_s, 2),
        "ttft_p95_s": round(percentile(batch[16].ttft, 95), 3),
        "itl_p95_s_16": round(percentile(batch[16].gaps, 95), 4),
        "rss_growth": round(after / before - 1, 4) if args.soak else None,
        "step_cost_16_vs_1": round(step16 / step1, 2),
        "errors": sum(lv.errors for levels in results.values() for lv in levels.values()) + soak_errors,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "machine": _cpu_name(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
