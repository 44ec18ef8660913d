"""The database layer on a Galera node (a one-node MariaDB Galera cluster of this module's own):
causal reads on its connections, none of that cost elsewhere, a node that is not ready (1047)
answered as 503 with its connections replaced; migrations and the app on it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from demo.common.errors import Unavailable
from demo.common.infra import db as db_module
from demo.common.infra.db import Database, Sql, idempotent, sql_unit
from demo.common.infra.metrics import Metrics
from demo.common.infra.offload import Offloader
from tests.helpers import emptied, make_test_engine, migrated

pytestmark = pytest.mark.mysql

SYNC_WAIT = Sql("SELECT @@wsrep_sync_wait AS sync_wait")
CONNECTION_ID = Sql("SELECT CONNECTION_ID() AS id")
TABLE = Sql("SELECT COUNT(*) AS n FROM rate_counters")
QUESTIONS = Sql("SHOW SESSION STATUS LIKE 'Questions'")
ONE = Sql("SELECT 1 AS one")


@pytest.fixture(scope="module")
def galera_url(galera_node) -> str:
    return migrated(galera_node.database("demo_galera"), pool_size=2)  # the lock row: no GET_LOCK() on Galera


@pytest.fixture
def database_url(galera_url, galera_node):
    """The app's database is on the Galera node (every test starts empty, and the node ready)."""
    yield emptied(galera_url)
    galera_node.execute("SET GLOBAL wsrep_reject_queries = NONE")


@pytest.fixture
def one_connection():
    """``make(url)``: a Database on a pool of one connection (so that a test sees which one it gets)."""
    made: list[tuple[Database, Offloader]] = []

    def make(url: str) -> Database:
        offloader = Offloader(1)
        db = Database(make_test_engine(url, pool_size=1), offloader, metrics=Metrics())
        made.append((db, offloader))
        return db

    yield make
    for db, offloader in made:
        offloader.shutdown()
        db.dispose()


def test_a_galera_connection_reads_causally(database_url, one_connection):
    db = one_connection(database_url)
    assert db.run_sync(sql_unit(lambda c: c.first(SYNC_WAIT))).sync_wait == db_module.GALERA_SYNC_WAIT


def test_a_plain_server_keeps_its_setting_and_a_unit_costs_its_statements_and_commit_only(
    mysql_server_url, one_connection
):
    db = one_connection(mysql_server_url + "/")
    assert db.run_sync(sql_unit(lambda c: c.first(SYNC_WAIT))).sync_wait == 0

    def questions() -> int:
        return int(db.run_sync(sql_unit(lambda c: c.first(QUESTIONS)))[1])

    before = questions()
    for _ in range(10):
        db.run_sync(sql_unit(lambda c: c.first(ONE)))
    # Each unit: its SELECT and its COMMIT; the second SHOW and its COMMIT; the first SHOW's COMMIT.
    assert questions() - before == 10 * 2 + 1 + 1


@pytest.mark.parametrize("orm", [False, True], ids=["sql_unit", "orm"])
def test_a_node_that_is_not_ready_answers_503_and_its_connections_are_replaced(
    database_url, galera_node, one_connection, orm
):
    db = one_connection(database_url)
    first = db.run_sync(sql_unit(lambda c: c.first(CONNECTION_ID))).id
    galera_node.execute("SET GLOBAL wsrep_reject_queries = ALL")  # as a node outside the primary component
    unit = idempotent(lambda s: s.execute(text("SELECT COUNT(*) FROM rate_counters")).scalar())
    with pytest.raises(Unavailable):
        db.run_sync(unit if orm else sql_unit(lambda c: c.first(TABLE)))
    retried = db.metrics.registry.get_sample_value("demo_db_retries_total", {"reason": "not_ready"})  # type: ignore[union-attr]
    assert retried == db_module.RETRIES  # each on a new connection, through the endpoint
    galera_node.execute("SET GLOBAL wsrep_reject_queries = NONE")
    assert db.run_sync(sql_unit(lambda c: c.first(TABLE))).n == 0
    assert db.run_sync(sql_unit(lambda c: c.first(CONNECTION_ID))).id != first


@pytest.mark.gen_test(timeout=60)
async def test_the_app_on_a_galera_node(app, api, user, galera_node):
    assert (await api.get("/users/me", token=user.token)).code == 200
    galera_node.execute("SET GLOBAL wsrep_reject_queries = ALL")
    refused = await api.get("/users/me", token=user.token)
    assert refused.code == 503 and refused.error == "unavailable"
    galera_node.execute("SET GLOBAL wsrep_reject_queries = NONE")
    me = await api.get("/users/me", token=user.token)
    assert me.code == 200 and me.json["user"]["id"] == user.id
