"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "t2r_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.prompt_tokens = Counter("t2r_prompt_tokens", "Prompt tokens received", registry=registry)
        self.generation_tokens = Counter("t2r_generation_tokens", "Tokens generated", registry=registry)
        self.prefix_cached_tokens = Counter(
            "t2r_prefix_cached_tokens", "Prompt tokens whose state came from the prefix cache", registry=registry
        )
        self.cancelled = Counter(
            "t2r_cancelled_requests", "Choices ended early (client gone, stop string)", registry=registry
        )
        self.active_rows = Gauge("t2r_active_rows", "Sequences in the decode batch", registry=registry)
        self.queue_length = Gauge("t2r_queue_length", "Requests waiting for a row", registry=registry)
        self.state_bytes = Gauge(
            "t2r_state_bytes", "Bytes of the decode state for --max-batch rows (allocated once)", registry=registry
        )
        self.prefix_cache_bytes = Gauge("t2r_prefix_cache_bytes", "Bytes of kept prefix states", registry=registry)
        self.session_bytes = Gauge("t2r_session_bytes", "Bytes of sessions kept in memory", registry=registry)
        self.session_disk_bytes = Gauge(
            "t2r_session_disk_bytes", "Bytes of session files in --sessions-dir", registry=registry
        )
        self.session_files_evicted = Gauge(
            "t2r_session_files_evicted",
            "Session files removed, oldest first, to stay within --sessions-dir-mb",
            registry=registry,
        )
        self.step_seconds = Histogram(
            "t2r_step_seconds", "Time of one batched decode step", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.time_to_first_token = Histogram(
            "t2r_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
