"""The SMS cost guard as clients and Prometheus see it: POST /users/code past the daily budget (503) and
on a throttled prefix (429), and the per-country gauges of GET /metrics, on both databases."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo.common.sms.costguard import RECENT, SPAN

gen_test = pytest.mark.gen_test(timeout=60)


def from_client(i: int) -> dict[str, str]:
    return {"X-Real-IP": f"198.51.{i % 250}.1"}  # a network (/24) each: the breaker counts networks


def to_window_start(clock, seconds: int, into: float = 5) -> None:
    clock.advance(seconds - clock.timestamp() % seconds + into)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.settings(sms_daily_budget=5)
@gen_test
async def test_past_the_daily_budget_parallel_code_requests_get_503_with_retry_after_to_midnight(api, clock):
    to_window_start(clock, 86400, into=3600)
    responses = await asyncio.gather(
        *[api.post("/users/code", {"phone": f"1880000{i:04d}"}, headers=from_client(i)) for i in range(15)]
    )
    assert sorted(r.code for r in responses) == [200] * 5 + [503] * 10
    for refused in (r for r in responses if r.code == 503):
        assert refused.json == {"error": {"code": "unavailable", "message": "Texts are paused for now; retry later."}}
        assert abs(int(refused.headers["Retry-After"]) - (86400 - 3600)) <= 1
    # Never over, whatever came in parallel.
    clock.advance(61)
    assert (await api.post("/users/code", {"phone": "18800000000"}, headers=from_client(99))).code == 503


@pytest.mark.settings(sms_daily_budget=3)
@gen_test
async def test_a_registered_and_an_unregistered_phone_answer_and_cost_alike(api, user, clock):
    """The user's registration spent one text; a reset code for its number and for a number without an
    account spend one each (the second writes a skipped row), and the answers are the same."""
    clock.advance(61)
    registered = await api.post("/users/code", {"phone": user.phone, "purpose": "reset"}, headers=from_client(1))
    unknown = await api.post("/users/code", {"phone": "18866669999", "purpose": "reset"}, headers=from_client(2))
    assert registered.code == unknown.code == 200 and registered.body == unknown.body
    clock.advance(61)
    registered = await api.post("/users/code", {"phone": user.phone, "purpose": "reset"}, headers=from_client(1))
    unknown = await api.post("/users/code", {"phone": "18866669999", "purpose": "reset"}, headers=from_client(2))
    assert registered.code == unknown.code == 503 and registered.body == unknown.body
    assert registered.headers["Retry-After"] and unknown.headers["Retry-After"]


@pytest.mark.settings(sms_countries="CN,US", sms_daily_budget=100)
@gen_test
async def test_a_pumped_prefix_gets_429_and_metrics_show_each_country(api, app, outbox, clock):
    to_window_start(clock, SPAN)
    for i in range(20):
        assert (await api.post("/users/code", {"phone": f"1380000{i:04d}"}, headers=from_client(i))).code == 200
    for i, phone in enumerate(["+12015550123", "+12015550124"]):
        assert (await api.post("/users/code", {"phone": phone}, headers=from_client(40 + i))).code == 200
    code = await outbox.code("+12015550123")
    registered = await api.post(
        "/users/regist", {"phone": "+12015550123", "password": "demo123456", "code": code}, headers=from_client(40)
    )
    assert registered.code == 201
    clock.advance(2 * RECENT + 1)  # the pumped texts are judged now: none of 20 used
    answers = [
        await api.post("/users/code", {"phone": f"1380000{i:04d}"}, headers=from_client(i)) for i in range(20, 25)
    ]
    assert [a.code for a in answers] == [200] * 3 + [429] * 2
    assert answers[-1].error == "rate_limited" and 0 < int(answers[-1].headers["Retry-After"]) <= 3600
    # Another prefix of the same country still gets its texts.
    assert (await api.post("/users/code", {"phone": "13900000001"}, headers=from_client(60))).code == 200

    found = samples((await api.get("/metrics")).body.decode())
    cn, us = (("country", "CN"),), (("country", "US"),)
    assert found[("demo_sms_budget_texts", ())] == 100
    assert found[("demo_sms_budget_spent", ())] == 26  # 20 + 2 + 3 + 1: the refused ones cost nothing
    assert (found[("demo_sms_recent_sent", cn)], found[("demo_sms_recent_used", cn)]) == (24, 0)
    assert (found[("demo_sms_recent_sent", us)], found[("demo_sms_recent_used", us)]) == (2, 1)
    assert (found[("demo_sms_recent_conversion", cn)], found[("demo_sms_recent_conversion", us)]) == (0.0, 0.5)
    assert (found[("demo_sms_breaker_throttled", cn)], found[("demo_sms_breaker_throttled", us)]) == (1, 0)
    assert found[("demo_sms_breaker_refused_total", cn)] == 2
    assert found[("demo_sms_budget_exhausted_total", ())] == 0


@gen_test
async def test_metrics_answer_without_the_cost_guard_gauges_when_the_database_does_not(api, app, monkeypatch):
    async def down(*args, **kwargs):
        raise ConnectionError("database down")

    monkeypatch.setattr(app.services.db, "run", down)
    response = await api.get("/metrics")
    assert response.code == 200
    text = response.body.decode()
    assert "demo_requests_total" in text and "demo_sms_budget_spent" not in text


@pytest.mark.settings(sms_ip_hourly=1000)
@gen_test
async def test_parallel_code_requests_past_a_prefix_young_texts_cap_get_429_with_a_short_retry_after(api, clock):
    to_window_start(clock, SPAN)
    responses = await asyncio.gather(
        *[api.post("/users/code", {"phone": f"1380000{i:04d}"}, headers=from_client(i)) for i in range(30)]
    )
    # No code of the prefix used yet: at most max(sms_breaker_min_sent 20, 10) texts too young to judge.
    assert sorted(r.code for r in responses) == [200] * 20 + [429] * 10
    for refused in (r for r in responses if r.code == 429):
        assert refused.error == "rate_limited" and 0 < int(refused.headers["Retry-After"]) <= RECENT
    assert (await api.post("/users/code", {"phone": "13900000001"}, headers=from_client(99))).code == 200
    clock.advance(2 * RECENT + 1)  # the burst is judged now (and 20 unused texts from 20 networks trip it)
    assert (await api.post("/users/code", {"phone": "13800009999"}, headers=from_client(98))).code == 200


@pytest.mark.settings(sms_ip_hourly=20)
@gen_test
async def test_one_network_asking_reset_codes_in_parallel_does_not_close_a_prefix(api, clock):
    """Many addresses of one /24, each within sms_ip_hourly, ask reset codes for numbers without an
    account (nothing is texted): one network, so the prefix stays open to its real users."""
    to_window_start(clock, SPAN)
    responses = await asyncio.gather(
        *[
            api.post(
                "/users/code", {"phone": f"1380000{i:04d}", "purpose": "reset"}, headers={"X-Real-IP": f"203.0.113.{i}"}
            )
            for i in range(1, 21)
        ]
    )
    assert [r.code for r in responses] == [200] * 20
    clock.advance(2 * RECENT + 1)
    real = [
        await api.post("/users/code", {"phone": f"1380001{i:04d}"}, headers={"X-Real-IP": f"192.0.2.{i}"})
        for i in range(1, 6)
    ]
    assert [r.code for r in real] == [200] * 5
    found = samples((await api.get("/metrics")).body.decode())
    assert found[("demo_sms_breaker_throttled", (("country", "CN"),))] == 0
