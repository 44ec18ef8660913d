"""``python -m demo.admin sms budget`` and ``sms breaker`` as an operator runs them, on SQLite and MariaDB:
the cost guard's counters written by the app, read by the command at the real time."""

from __future__ import annotations

import json

import pytest

from demo.common.sms.costguard import RECENT
from tests.admin.test_copy_media import admin

gen_test = pytest.mark.gen_test(timeout=120)
GUARD = {"sms_daily_budget": 100, "sms_countries": "CN,US", "sms_ip_hourly": 1000}


def env_of(settings) -> dict[str, str]:
    return {"DEMO_DATABASE_URL": settings.database_url, **{f"DEMO_{k.upper()}": str(v) for k, v in GUARD.items()}}


@pytest.mark.settings(**GUARD)
@gen_test
async def test_sms_budget_and_breaker_show_what_the_app_counted(app, settings, clock):
    # The app's clock starts 5 minutes back, so that the pumped texts are judged by "now", when the
    # command reads them.
    clock.advance(-(2 * RECENT + 60))
    accounts = app.services.accounts
    for i in range(20):
        await accounts.request_code(f"+86138{i:08d}", "regist", f"198.51.{i}.1")
    await accounts.request_code("+12015550123", "regist", "198.51.100.50")
    clock.advance(2 * RECENT + 1)
    await accounts.request_code("+8613800000020", "regist", "198.51.100.21")  # trips the breaker

    budget = admin("sms", "budget", "--json", env=env_of(settings))
    assert (budget.returncode, budget.stderr) == (0, ""), budget.stderr
    document = json.loads(budget.stdout)
    assert (document["budget"], document["spent"], document["left"]) == (100, 22, 78)
    assert 0 < document["resets_in"] <= 86400
    human = admin("sms", "budget", env=env_of(settings))
    assert human.returncode == 0 and ": 22 of 100 texts, 78 left; resets in " in human.stdout

    breaker = admin("sms", "breaker", "--json", env=env_of(settings))
    assert (breaker.returncode, breaker.stderr) == (0, ""), breaker.stderr
    document = json.loads(breaker.stdout)
    cn = document["prefixes"][0]
    assert (cn["prefix"], cn["country"], cn["sent"], cn["used"], cn["conversion"], cn["throttled"]) == (
        "+86138",
        "CN",
        21,
        0,
        0.0,
        True,
    )
    us = document["prefixes"][1]
    assert (us["prefix"], us["country"], us["sent"], us["throttled"]) == ("+12015", "US", 1, False)
    assert document["countries"] == [
        {"country": "CN", "sent": 21, "used": 0, "throttled": 1, "conversion": 0.0},
        {"country": "US", "sent": 1, "used": 0, "throttled": 0, "conversion": 0.0},
    ]
    assert document["rules"] == {"min_sent": 20, "min_networks": 3, "conversion": 0.2, "hourly": 3}
    assert cn["networks"] == 21
    human = admin("sms", "breaker", env=env_of(settings)).stdout.splitlines()
    assert human[0].split() == ["prefix", "country", "sent", "used", "conversion", "state"]
    assert human[1].split()[:6] == ["+86138", "CN", "21", "0", "0.0%", "throttled"]
    assert human[2].split() == ["+12015", "US", "1", "0", "0.0%", "ok"]
    assert human[3].split() == ["total", "CN", "21", "0", "0.0%", "1", "prefix(es)", "throttled"]

    # The operator reopens the prefix: its trip and counters are gone, the app judges it afresh.
    reset = admin("sms", "breaker", "--reset", "+86138", "--json", env=env_of(settings))
    assert (reset.returncode, reset.stderr) == (0, ""), reset.stderr
    document = json.loads(reset.stdout)
    assert document["reset"] == "+86138" and [p["prefix"] for p in document["prefixes"]] == ["+12015"]
    for i in range(3):  # past the hourly allowance of 3 the prefix had
        await accounts.request_code(f"+86138{30 + i:08d}", "regist", f"198.51.{30 + i}.1")
    human = admin("sms", "breaker", "--reset", "86138", env=env_of(settings))
    assert human.returncode == 0 and human.stdout.startswith("+86138: its trip and counters are cleared\n")


@pytest.mark.settings(**GUARD)
@gen_test
async def test_sms_budget_add_raises_todays_budget_for_the_running_app(app, settings, clock):
    accounts = app.services.accounts
    added = admin("sms", "budget", "--add", "5", "--json", env={**env_of(settings), "DEMO_SMS_DAILY_BUDGET": "2"})
    assert (added.returncode, added.stderr) == (0, ""), added.stderr
    document = json.loads(added.stdout)
    assert (document["budget"], document["added"], document["spent"], document["left"]) == (7, 5, 0, 7)
    again = admin("sms", "budget", "--add", "1", env={**env_of(settings), "DEMO_SMS_DAILY_BUDGET": "2"})
    assert again.returncode == 0 and ": 0 of 8 texts, 8 left; " in again.stdout
    assert "(sms_daily_budget 2, 6 added today)" in again.stdout
    # The app (sms_daily_budget 100 here) reads what was added: 106 today.
    for i in range(3):
        await accounts.request_code(f"+86138{i:08d}", "regist", f"198.51.{i}.1")
    state = await app.services.cost_guard.snapshot(app.services.clock.now())
    assert state is not None and (state.budget, state.spent) == (106, 3)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["budget", "--add", "0"], {}, "sms budget: --add=0: must be from 1 to 1000000"),
        (["budget", "--add", "5"], {"DEMO_SMS_DAILY_BUDGET": "0"}, "sms budget: --add: there is no budget to raise"),
        (["breaker", "--reset", "+8613"], {}, "sms breaker: --reset=+8613: a prefix is '+' and the number's first 5"),
        (["breaker", "--reset", "+86a38"], {}, "sms breaker: --reset=+86a38: a prefix is '+' and the number's"),
    ],
)
def test_sms_budget_add_and_breaker_reset_refuse_bad_input_with_exit_2(database_url, args, env, says):
    done = admin("sms", *args, env={"DEMO_DATABASE_URL": database_url, **env})
    assert done.returncode == 2 and done.stderr.startswith(says), done.stderr


def test_sms_budget_without_a_budget_and_with_nothing_counted(database_url):
    done = admin("sms", "budget", env={"DEMO_DATABASE_URL": database_url, "DEMO_SMS_DAILY_BUDGET": "0"})
    assert done.returncode == 0 and done.stdout.rstrip().endswith(": 0 texts; no budget (sms_daily_budget=0)")
    empty = admin("sms", "breaker", "--json", env={"DEMO_DATABASE_URL": database_url})
    assert json.loads(empty.stdout)["prefixes"] == []


def test_sms_breaker_with_a_bad_setting_exits_2(database_url):
    done = admin("sms", "breaker", env={"DEMO_DATABASE_URL": database_url, "DEMO_SMS_TEST_NUMBERS": "nonsense"})
    assert done.returncode == 2 and done.stderr.startswith("sms breaker: bad sms_test_numbers entry")
