"""``minigpt serve``: an OpenAI-compatible HTTP server for a checkpoint, with a playground page at ``/``.

Imports torch, minigpt's pure layers and the ``serve`` extra (FastAPI, uvicorn, prometheus_client) only:
no Lightning, no transformers. Ctrl-C or SIGTERM stops accepting connections, lets running requests
finish for up to ``--shutdown_grace_s`` seconds, cancels the rest and exits with status 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from minigpt.errors import UserError

log = logging.getLogger("minigpt")

API_KEY_ENV = "MINIGPT_API_KEY"
_EXTRA = ("fastapi", "uvicorn", "prometheus_client")
_FALLBACK_S = 5.0  # after the grace period, how long cancelled requests get to send their last event


def serve(
    ckpt_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_tokens_limit: int = 512,
    max_body_bytes: int = 1_000_000,
    shutdown_grace_s: float = 10.0,
) -> None:
    """Serve a checkpoint over HTTP: OpenAI's /v1/completions and /v1/chat/completions, and a page at /.

    Args:
        ckpt_path: a minigpt checkpoint.
        host: address to listen on; the default answers this machine only.
        port: TCP port (0 picks a free one).
        api_key: when set, /v1/* and /metrics need 'Authorization: Bearer KEY' (default: $MINIGPT_API_KEY).
        max_batch: most choices decoded together.
        max_queue: most choices waiting for a slot; beyond it requests get 429.
        max_tokens_limit: largest max_tokens a request may ask for.
        max_body_bytes: largest request body (413 beyond it).
        shutdown_grace_s: on Ctrl-C or SIGTERM, seconds running requests get to finish before they are cancelled.
    """
    missing = [name for name in _EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"minigpt serve needs the serve extra ({', '.join(missing)} is missing): pip install 'minigpt[serve]'"
        )
    for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("max_tokens_limit",
                             max_tokens_limit, 1), ("max_body_bytes", max_body_bytes, 1)):  # fmt: skip
        if value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    if shutdown_grace_s < 0:
        raise UserError(f"--shutdown_grace_s must be >= 0, got {shutdown_grace_s}")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise UserError("--api_key is empty: give a key, or leave the option out to serve without one")
    sock = _listen(host, port)  # before loading the model: a taken port fails fast

    import torch

    from minigpt.checkpoint import load_model
    from minigpt.serve.app import create_app

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(ckpt_path, map_location=device)
    app = create_app(
        model, tokenizer, model_name=Path(ckpt_path).name, api_key=key, max_batch=max_batch, max_queue=max_queue,
        max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
    )  # fmt: skip
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    log.info(f"minigpt serve: {ckpt_path} on {device}, playground {url}/ , API {url}/v1 "
             f"({'API key required' if key else 'no API key'}); Ctrl-C stops")  # fmt: skip
    if key is None and not _is_loopback(bound_host):
        log.warning(f"minigpt: warning: {bound_host} is reachable from other machines and no API key is set")
    _run(app, sock, shutdown_grace_s)
    log.info("minigpt serve: stopped")


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host} is not an address this machine can listen on ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _run(app, sock: socket.socket, shutdown_grace_s: float) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, with two changes to how it stops on Ctrl-C or SIGTERM.

        Running requests get `shutdown_grace_s` seconds, then the decoding loop cancels them, so each ends
        with an error answer (503, or an error event in a stream) rather than uvicorn cancelling its task
        (uvicorn's own timeout, a little later, stays as the fallback). And the process then exits normally:
        uvicorn raises the signal again, and a re-raised SIGTERM kills the process (status 143).
        """

        async def shutdown(self, sockets=None) -> None:
            timer = threading.Timer(shutdown_grace_s, app.state.scheduler.close)
            timer.start()
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_grace_s + _FALLBACK_S,
                            access_log=False)  # fmt: skip
    Server(config).run(sockets=[sock])
