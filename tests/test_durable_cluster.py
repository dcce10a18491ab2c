"""Durable mode on a Redis Cluster (``redis+cluster://``): six local ``redis-server``
processes in cluster mode (three masters, three replicas) started by the test in a
temporary directory, forwarders connected through different nodes, and a failover of
the master that holds the queue.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from celery_langfuse.durable import DurableSpanExporter, QueueUnavailable, check_url, open_queue
from celery_langfuse.forwarder import Forwarder, LangfuseEndpoint
from celery_langfuse.testing import PUBLIC_KEY, SECRET_KEY, CaptureServer
from tests.durable_support import RedisServer, delivered_once, free_port
from tests.test_durable import make_spans, running

pytestmark = pytest.mark.timeout(240)


def cluster_ports() -> list[int]:
    """Six ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < 6:
        port = free_port()
        if port < 55000 and port not in ports:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    base = tmp_path_factory.mktemp("durable-cluster")
    servers = [
        RedisServer(
            base / str(port), port, "--cluster-enabled", "yes", "--cluster-config-file",
            "nodes.conf", "--cluster-node-timeout", "1500",
        )
        for port in cluster_ports()
    ]  # fmt: skip
    for server in servers:
        server.start()
    try:
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed"
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not all(s.client().cluster("info")["cluster_state"] == "ok" for s in servers):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.2)
        yield servers
    finally:
        for server in servers:
            server.kill()


def url_of(server: RedisServer) -> str:
    return f"redis+cluster://127.0.0.1:{server.port}/0"


def forwarder_via(server: RedisServer, name: str, capture: CaptureServer, **kw: float) -> Forwarder:
    return Forwarder(
        open_queue(url_of(server), name),
        LangfuseEndpoint(capture.base_url, PUBLIC_KEY, SECRET_KEY, timeout=5),
        consumer=f"via-{server.port}",
        max_backoff=0.2,
        block=0.1,
        claim_timeout=kw.get("claim_timeout", 5.0),
    )


def test_a_cluster_node_given_as_a_plain_redis_url_is_refused_with_what_to_do(
    cluster: list[RedisServer],
) -> None:
    with pytest.raises(QueueUnavailable, match=r"use a redis\+cluster://"):
        check_url(f"redis://127.0.0.1:{cluster[0].port}/0", "durable-cluster")
    check_url(url_of(cluster[0]), "durable-cluster")


def test_forwarders_on_different_nodes_share_one_queue_and_deliver_each_span_once(
    cluster: list[RedisServer], capture: CaptureServer
) -> None:
    name = f"durable-cluster-{uuid.uuid4().hex[:8]}"
    exporter = DurableSpanExporter(open_queue(url_of(cluster[0]), name))
    ids: set[str] = set()
    for b in range(60):
        spans = make_spans(5, prefix=f"b{b}")
        exporter.export(spans)
        ids |= {format(s.context.span_id, "016x") for s in spans}
    assert exporter.stats().written_spans == 300
    forwarders = [forwarder_via(cluster[i], name, capture) for i in (1, 2, 4)]
    with running(forwarders[0]), running(forwarders[1]), running(forwarders[2]):
        capture.wait_for(lambda s: len(s.deliveries) == 300, timeout=60)
        time.sleep(0.5)
    delivered_once(capture, ids)
    assert sum(f.totals.forwarded_spans for f in forwarders) == 300
    assert sum(1 for f in forwarders if f.totals.forwarded_spans) >= 2
    exporter.shutdown()


def test_a_failover_of_the_queues_master_loses_nothing_acknowledged(
    cluster: list[RedisServer], capture: CaptureServer
) -> None:
    name = f"durable-cluster-{uuid.uuid4().hex[:8]}"
    queue = open_queue(url_of(cluster[0]), name)
    exporter = DurableSpanExporter(queue)
    ids: set[str] = set()

    def export(batches: int, tag: str) -> None:
        for b in range(batches):
            spans = make_spans(4, prefix=f"{tag}{b}")
            exporter.export(spans)
            ids.update(format(s.context.span_id, "016x") for s in spans)

    export(20, "before")
    # The master holding the queue's slot, and a replication barrier: what the master
    # acknowledged before a failover is on its replica (Redis replicates
    # asynchronously; see docs/reliability.md).
    slot = int(cluster[0].client().execute_command("CLUSTER KEYSLOT", f"{{{name}}}:batches"))
    master = next(
        s for s in cluster
        if s.client().info("replication")["role"] == "master"
        and any(
            int(r[0]) <= slot <= int(r[1])
            for r in s.client().execute_command("CLUSTER SLOTS") if r[2][1] == s.port
        )
    )  # fmt: skip
    assert master.client().execute_command("WAIT", 1, 5000) >= 1
    master.kill()
    export(20, "during")  # held by the exporter while the replica takes over
    survivor = next(s for s in cluster if s is not master)
    capture.set_response()
    with running(forwarder_via(survivor, name, capture)):
        capture.wait_for(lambda s: len(s.deliveries) == 160, timeout=90)
        time.sleep(0.5)
    delivered_once(capture, ids)
    stats = exporter.stats()
    assert stats.dropped_spans == 0
    assert stats.recovered_spans > 0  # the exporter held batches through the failover
    exporter.shutdown()
