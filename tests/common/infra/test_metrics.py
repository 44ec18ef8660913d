"""Metrics (infra/metrics.py): counters, labels and gauges as a scrape sees them (one process)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo.common.infra import metrics as metrics_module
from demo.common.infra.metrics import LATENCY_BUCKETS, MULTIPROC_ENV, Metrics


@pytest.fixture
def metrics(monkeypatch) -> Metrics:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # in memory: the single-process exposition
    return Metrics()


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed back: (name, sorted labels) -> value."""
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_request_is_counted_under_its_route_method_and_status(metrics):
    metrics.observe_request("users.login", "POST", 200, 0.003)
    metrics.observe_request("users.login", "POST", 200, 0.004)
    metrics.observe_request("users.login", "POST", 401, 0.002)
    text = metrics.exposition().decode()
    assert 'demo_requests_total{method="POST",route="users.login",status="200"} 2.0' in text
    assert 'demo_requests_total{method="POST",route="users.login",status="401"} 1.0' in text
    assert 'route="users.logout"' not in text


def test_routes_of_the_same_handler_name_are_separate_series(metrics):
    metrics.observe_request("h5.logout", "POST", 302, 0.001)
    metrics.observe_request("users.logout", "POST", 204, 0.001)
    found = samples(metrics)
    assert found[("demo_requests_total", (("method", "POST"), ("route", "h5.logout"), ("status", "302")))] == 1.0
    assert found[("demo_requests_total", (("method", "POST"), ("route", "users.logout"), ("status", "204")))] == 1.0


def test_latency_falls_into_its_buckets(metrics):
    metrics.observe_request("ops.healthz", "GET", 200, 0.03)
    metrics.observe_request("ops.healthz", "GET", 200, 3.0)
    found = samples(metrics)
    labels = (("method", "GET"), ("route", "ops.healthz"))

    def bucket(le: str) -> float:
        return found[("demo_request_duration_seconds_bucket", (("le", le), *labels))]

    assert bucket("0.025") == 0.0 and bucket("0.05") == 1.0 and bucket("2.5") == 1.0 and bucket("5.0") == 2.0
    assert bucket("+Inf") == 2.0
    assert found[("demo_request_duration_seconds_count", labels)] == 2.0
    assert found[("demo_request_duration_seconds_sum", labels)] == pytest.approx(3.03)
    buckets = {dict(key[1])["le"] for key in found if key[0] == "demo_request_duration_seconds_bucket"}
    assert len(buckets) == len(LATENCY_BUCKETS) + 1  # and +Inf


def test_counters_and_gauges_render_their_values(metrics):
    metrics.upload_bytes.inc(1234)
    metrics.sms_sent.inc()
    metrics.sms_failed.inc(2)
    metrics.in_flight.inc()
    metrics.db_pool_in_use.set(3)
    metrics.executor_queue.set(5)
    metrics.sms_outbox_pending.set(7)
    found = samples(metrics)
    assert found[("demo_upload_bytes_total", ())] == 1234.0
    assert found[("demo_sms_sent_total", ())] == 1.0 and found[("demo_sms_failed_total", ())] == 2.0
    assert found[("demo_requests_in_flight", ())] == 1.0 and found[("demo_db_pool_in_use", ())] == 3.0
    assert found[("demo_executor_queue_depth", ())] == 5.0 and found[("demo_sms_outbox_pending", ())] == 7.0


def test_a_fresh_set_starts_at_zero_and_each_app_has_its_own(metrics):
    other = Metrics()  # a second app in the same process: no "Duplicated timeseries" error
    metrics.sms_sent.inc()
    assert samples(metrics)[("demo_sms_sent_total", ())] == 1.0
    assert samples(other)[("demo_sms_sent_total", ())] == 0.0
    assert not any(name == "demo_requests_total" for name, _ in samples(other))


def test_mark_worker_dead_does_nothing_in_one_process(metrics, monkeypatch):
    called = []
    monkeypatch.setattr(metrics_module.multiprocess, "mark_process_dead", called.append)
    metrics_module.mark_worker_dead(12345)
    assert called == []
    monkeypatch.setenv(MULTIPROC_ENV, "/nonexistent")
    metrics_module.mark_worker_dead(12345)
    assert called == [12345]


def test_with_a_multiprocess_folder_the_scrape_reads_the_folder(metrics, monkeypatch, tmp_path):
    """Several workers: the scrape aggregates the folder's files, not this process's private registry."""
    metrics.sms_sent.inc()
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))  # an empty folder: no worker wrote anything yet
    assert b"demo_sms_sent" not in metrics.exposition()
    monkeypatch.delenv(MULTIPROC_ENV)
    assert b"demo_sms_sent_total 1.0" in metrics.exposition()
