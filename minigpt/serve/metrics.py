"""The Prometheus metrics of `minigpt serve` (`GET /metrics`), on a registry of their own per server.

Reference: the `prometheus_client` documentation; the metric names follow its conventions (`_total` counters,
`_seconds` histograms).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Time to first token covers queueing and the prompt's prefill; tokens after it come one decoding step apart.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Requests, tokens, queue depth and latencies of one server.

    Args:
        waiting: Returns the number of jobs waiting for a decoding row (read at each scrape).
        running: Returns the number of jobs being decoded.
    """

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "minigpt_requests", "HTTP requests answered, by route and status code.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("minigpt_prompt_tokens", "Prompt tokens read by the model.", registry=r)
        self.generated_tokens = Counter(
            "minigpt_generated_tokens", "Tokens generated (stop tokens included).", registry=r
        )
        self.cancelled = Counter(
            "minigpt_cancelled_jobs", "Jobs (a prompt's choice) cancelled because their client went away.", registry=r
        )
        self.queue_depth = Gauge("minigpt_queue_depth", "Jobs waiting for a decoding row.", registry=r)
        self.queue_depth.set_function(waiting)
        self.running = Gauge("minigpt_running_jobs", "Jobs being decoded.", registry=r)
        self.running.set_function(running)
        self.ttft = Histogram(
            "minigpt_time_to_first_token_seconds", "From a job's submission to its first token.",
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_latency = Histogram(
            "minigpt_inter_token_latency_seconds", "Between two tokens of one job.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "minigpt_decode_step_seconds", "One step of the decoding loop, by number of decoding rows.", ["rows"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip

    def token(self, seconds: float, first: bool) -> None:
        """A job chose a token `seconds` after its previous one (after its submission when `first`)."""
        self.generated_tokens.inc()
        (self.ttft if first else self.token_latency).observe(seconds)

    def step(self, seconds: float, rows: int) -> None:
        """The loop made one step with `rows` decoding rows."""
        self.step_seconds.labels(rows=str(rows)).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
