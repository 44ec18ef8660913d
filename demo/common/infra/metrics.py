"""Prometheus metrics (prometheus-client), correct across worker processes.

With several workers (``--processes``) main.py points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder
before the workers start; every worker then writes its samples there and ``/metrics`` on any worker
aggregates all of them. A single process keeps its metrics in memory.

State the processes share (the SMS cost guard's counters, in the database) is not a per-process metric
at all: whichever process is scraped reads it at scrape and shows it through ``shared``, a registry of
its own, never written to the multi-process folder (where every process's copy would be added up).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def enable_multiprocess(folder: str) -> None:
    """Switch prometheus-client to file-backed values; call before any metric is created."""
    os.environ[MULTIPROC_ENV] = folder
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def mark_worker_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class SharedState(Collector):
    """Metric families read elsewhere (the database) and shown as they were last read."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def show(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class Metrics:
    """One set of metrics per application (a private registry, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("demo_requests", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "demo_request_duration_seconds",
            "Time to answer a request",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "demo_requests_in_flight", "Requests being handled", multiprocess_mode="livesum", registry=r
        )
        self.db_pool_in_use = Gauge(
            "demo_db_pool_in_use", "Database connections checked out", multiprocess_mode="livesum", registry=r
        )
        self.executor_queue = Gauge(
            "demo_executor_queue_depth", "Tasks waiting for a worker thread", multiprocess_mode="livesum", registry=r
        )
        self.db_retries = Counter(
            "demo_db_retries",
            "Units of work run again: deadlock (or a lost Galera certification), not_ready (a Galera node "
            "outside the primary component), lost (an idempotent unit's connection died)",
            ["reason"],
            registry=r,
        )
        self.db_deadline = Counter(
            "demo_db_deadline_exceeded",
            "Units of work a request stopped waiting for at db_request_timeout (answered 503)",
            registry=r,
        )
        self.upload_bytes = Counter("demo_upload_bytes", "Bytes of image uploads received", registry=r)
        self.sms_sent = Counter("demo_sms_sent", "Texts handed to the SMS backend", registry=r)
        self.sms_failed = Counter(
            "demo_sms_failed", "Tries the SMS backend refused or lost (retried later)", registry=r
        )
        # Per backend of sms_backend (tencent, aliyun, http, console, file): each attempt to hand it a
        # text, by result (ok, error, timeout, rejected: the provider refused the number itself).
        self.sms_provider_sends = Counter(
            "demo_sms_provider_sends",
            "Texts offered to each SMS backend, by result",
            ["provider", "result"],
            registry=r,
        )
        self.sms_provider_seconds = Histogram(
            "demo_sms_provider_duration_seconds",
            "Time each SMS backend took to take or refuse a text",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Every process counts the same shared rows: the live maximum is the backlog, not a sum.
        self.sms_outbox_pending = Gauge(
            "demo_sms_outbox_pending",
            "Texts in the outbox not yet sent nor given up",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.sms_budget_exhausted = Counter(
            "demo_sms_budget_exhausted", "Code requests refused because the daily SMS budget is spent", registry=r
        )
        self.sms_breaker_refused = Counter(
            "demo_sms_breaker_refused",
            "Code requests refused because their number prefix is throttled by the conversion breaker",
            ["country"],
            registry=r,
        )
        self.shared_registry = CollectorRegistry()
        self.shared = SharedState()
        self.shared_registry.register(self.shared)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request; ``route`` is its route's name (``name=`` in views/*_urls.py), so two
        handler classes of the same name (the users and H5 logouts) are never one series."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def exposition(self) -> bytes:
        """The text format for a scrape: all workers' samples in multi-process mode."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry) + generate_latest(self.shared_registry)
        return generate_latest(self.registry) + generate_latest(self.shared_registry)
