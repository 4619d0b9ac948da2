"""State and breakers on a Redis Cluster: three local redis-server nodes, real workers.

Every key of a run shares the hash tag ``{run_id}`` and every breaker key the tag
``{agent}``, so each Lua script touches one slot; a step's round trip may span
slots (the run's script, the breaker's, the runs index) and goes to each node
once. Celery's broker and results stay on the plain test database.
Skipped when no redis-server binary is installed.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from pipeline import Pipeline, RunStatus
from pipeline.app import create_app
from pipeline.breaker import BreakerRegistry, BreakerState
from pipeline.errors import ConfigurationError, StoreUnavailable
from pipeline.keys import RUNS_INDEX, RunKeys, breaker_key, breaker_log_key
from pipeline.observe.metrics import RunCensus
from pipeline.settings import Settings
from pipeline.state import StateStore, connect
from pipeline.urls import cluster_node_url
from tasks.credit import ledger
from tests.agents import QUICK_BREAKER
from tests.conftest import AGENT_MODULES, Cluster

SAMPLES = Path(__file__).parent.parent / "tasks" / "samples"
BATCH = json.loads((SAMPLES / "batch.json").read_text())
SLOTS = 16384
NODES = 3
START_TIMEOUT_S = 20.0
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def free_port_pair() -> int:
    """A loopback port free for a node and for its cluster bus (port + 10000)."""
    for _ in range(200):
        port = random.randint(20000, 65535 - BUS_OFFSET)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + BUS_OFFSET))
            return port
        except OSError:
            continue
    raise AssertionError("no free pair of ports for a cluster node")


def redis_server() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


class LocalCluster:
    """Three master nodes on free loopback ports in a temporary directory, slots split
    evenly, joined with CLUSTER MEET; stopped and removed on exit."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="pipeline-cluster-")
        self.ports: list[int] = []
        while len(self.ports) < NODES:
            port = free_port_pair()
            if not {port, port + BUS_OFFSET} & {q + d for q in self.ports for d in (0, BUS_OFFSET)}:
                self.ports.append(port)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def start(self) -> LocalCluster:
        for port in self.ports:
            self.processes.append(subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--save", "", "--appendonly", "no",
                 "--logfile", str(Path(self.dir) / f"redis-{port}.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        self._until(lambda c: bool(c.ping()), "the nodes to answer")
        share = SLOTS // NODES
        for i, port in enumerate(self.ports):
            last = SLOTS - 1 if i == NODES - 1 else (i + 1) * share - 1
            self.node(port).execute_command("CLUSTER ADDSLOTS", *range(i * share, last + 1))
        for port in self.ports[1:]:
            self.node(self.ports[0]).execute_command("CLUSTER MEET", "127.0.0.1", port)
        self._until(lambda c: self._info(c)["cluster_state"] == "ok"
                    and int(self._info(c)["cluster_known_nodes"]) == NODES,
                    "the cluster state to be ok")
        return self

    @staticmethod
    def _info(client: redis.Redis) -> dict[str, str]:
        info: dict[str, str] = client.execute_command("CLUSTER INFO")  # parsed by redis-py
        return info

    def _until(self, ok: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                break  # a node exited: no use waiting
            try:
                if all(ok(self.node(p)) for p in self.ports):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        logs = "".join(p.read_text()[-1500:] for p in Path(self.dir).glob("*.log"))
        raise AssertionError(f"no Redis Cluster: gave up waiting for {what}:\n{logs}")

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def owner(self, slot: int) -> int:
        """The port of the node that serves ``slot``."""
        for start, end, (_, port, *_rest), *_replicas in self.node(self.ports[0]).execute_command(
                "CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise AssertionError(f"slot {slot} is not served")

    def migrate(self, slot: int, to: int) -> None:
        """Move ``slot`` and its keys to the node on port ``to`` (a resharding, by hand)."""
        source, target = self.node(self.owner(slot)), self.node(to)
        source_id = source.execute_command("CLUSTER MYID")
        target_id = target.execute_command("CLUSTER MYID")
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        keys = source.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
        if keys:
            source.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, "KEYS", *keys)
        for port in self.ports:
            self.node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.owner(slot) != to and time.monotonic() < deadline:
            time.sleep(0.05)

    def getkeys_calls(self) -> int:
        """How often a client asked a node where a command's keys are (a wasted round trip)."""
        stats = [self.node(p).info("commandstats") for p in self.ports]
        return sum(int(s.get("cmdstat_command|getkeys", {}).get("calls", 0)) for s in stats)


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    binary = redis_server()
    if binary is None:
        pytest.skip("no redis-server binary to start a Redis Cluster with")
    c = LocalCluster(binary)
    try:
        yield c.start()
    finally:
        c.stop()


def cluster_settings(cluster_url: str, broker_url: str) -> Settings:
    return Settings(redis_url=cluster_url, broker_url=broker_url, result_backend=broker_url,
                    agent_modules=tuple(AGENT_MODULES.split(",")))


@pytest.fixture
def on_cluster(local_cluster: LocalCluster, cluster: Cluster) -> Iterator[Pipeline]:
    """A client and a worker pool: state on the cluster, broker and results on the test
    database; the cluster is emptied afterwards."""
    cluster.worker(concurrency=3, PIPELINE_REDIS_URL=local_cluster.url,
                   PIPELINE_CHAOS="guarded_fail=error:1")
    settings = cluster_settings(local_cluster.url, cluster.url)
    p = Pipeline(settings=settings, app=create_app(settings))
    yield p
    for port in local_cluster.ports:
        local_cluster.node(port).flushall()


def node_of(local_cluster: LocalCluster, keys: list[str]) -> dict[int, set[str]]:
    """Which of ``keys`` each node holds (ports of the nodes that hold any)."""
    held: dict[int, set[str]] = {}
    for port in local_cluster.ports:
        node = local_cluster.node(port)
        here = set()
        for slot in {key_slot(k.encode()) for k in keys}:  # GETKEYSINSLOT does not redirect
            here |= set(node.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)) & set(keys)
        if here:
            held[port] = here
    return held


def test_a_cluster_url_gives_a_cluster_client_and_needs_a_plain_broker(
    local_cluster: LocalCluster,
) -> None:
    client = connect(local_cluster.url)
    assert isinstance(client, RedisCluster)
    assert StateStore(client).url.startswith("redis+cluster://127.0.0.1:")  # for errors
    with pytest.raises(ConfigurationError, match="set CELERY_BROKER_URL"):
        Settings.from_env({"PIPELINE_REDIS_URL": local_cluster.url})
    with pytest.raises(ConfigurationError, match="cannot use a Redis Cluster as its broker"):
        Settings.from_env({"PIPELINE_REDIS_URL": local_cluster.url,
                           "CELERY_BROKER_URL": local_cluster.url})
    with pytest.raises(ConfigurationError, match="no database but 0"):
        Settings.from_env({"PIPELINE_REDIS_URL": local_cluster.url + "/3"})
    settings = Settings.from_env({"PIPELINE_REDIS_URL": local_cluster.url,
                                  "CELERY_BROKER_URL": "redis://127.0.0.1:6379/4"})
    assert settings.result_backend == "redis://127.0.0.1:6379/4"
    with pytest.raises(StoreUnavailable, match="redis\\+cluster://127.0.0.1:1"):
        connect("redis+cluster://127.0.0.1:1")


def test_a_cluster_client_that_returns_bytes_is_refused_when_built(
    local_cluster: LocalCluster,
) -> None:
    raw = RedisCluster.from_url(cluster_node_url(local_cluster.url))
    decoding = connect(local_cluster.url)
    for name, build in [("BreakerRegistry", BreakerRegistry), ("StateStore", StateStore),
                        ("RunCensus", RunCensus)]:
        with pytest.raises(ConfigurationError, match=(
                f"^{name} needs a Redis client that decodes responses, and this RedisCluster "
                r"returns bytes: pass pipeline\.state\.connect\(url\), or "
                r"RedisCluster\(\.\.\., decode_responses=True\)$")):
            build(raw)
        with pytest.raises(ConfigurationError, match=f"^{name} needs a Redis client, not a "
                                                     "redis.cluster.ClusterPipeline"):
            build(decoding.pipeline())
        build(decoding)
    raw.close()
    agent = f"decoding{random.randrange(10**6)}"
    registry = BreakerRegistry(decoding, url=local_cluster.url)
    try:
        registry.force_open(agent)
        assert registry.snapshot(agent, QUICK_BREAKER).state is BreakerState.OPEN
    finally:
        decoding.delete(breaker_key(agent), breaker_log_key(agent))  # one slot: {agent}
        decoding.close()


def test_calls_routed_by_a_stale_slot_table_follow_the_redirection(
    local_cluster: LocalCluster,
) -> None:
    """A run's slot moves to another node between calls (a resharding): the client's
    table is stale each time, and each kind of call still lands."""
    store = StateStore(connect(local_cluster.url))
    run_id = "resharded-run"
    keys = RunKeys(run_id)
    slot = key_slot(keys.run.encode())

    def move() -> None:
        local_cluster.migrate(slot, next(p for p in local_cluster.ports
                                         if p != local_cluster.owner(slot)))
        assert store.redis.get_node_from_key(keys.run).port != local_cluster.owner(slot)

    try:
        move()
        assert store.create_run(run_id, workflow="w", payload={"n": 1}, contract="count@1"
                                ).created  # a batch: script and ZADD
        move()
        assert store.note(run_id, "resharded", to="elsewhere")  # one script
        move()
        last = store.wait_log(run_id, "0-0", 100)  # XREAD
        assert [e["event"] for e in store.log(run_id)][-1] == "resharded"
        assert last == store.log(run_id)[-1]["id"]
        assert [v.version for v in store.history(run_id)] == [0]
        assert list(node_of(local_cluster, keys.all())) == [local_cluster.owner(slot)]
    finally:
        for port in local_cluster.ports:
            local_cluster.node(port).flushall()


def test_credit_runs_on_a_cluster_succeed_with_each_runs_keys_on_one_node(
    local_cluster: LocalCluster, on_cluster: Pipeline,
) -> None:
    p = on_cluster
    getkeys_before = local_cluster.getkeys_calls()
    runs = [p.start("credit_decision", a, idempotency_key=f"cluster-{a['application_id']}")
            for a in BATCH]
    results = [run.wait(60) for run in runs]
    assert [r.status for r in results] == [RunStatus.SUCCEEDED] * len(BATCH), \
        [r.error for r in results]
    assert {r.output["decision"] for r in results} <= {"approved", "declined", "referred"}
    homes = set()
    for run, result in zip(runs, results, strict=True):
        history = run.history()
        assert [v.version for v in history] == list(range(6))
        lineage = run.lineage()
        assert lineage[0].agent == "final_approval" and len(lineage[0].parents) == 3
        assert [v.version for v in lineage][-1] == 0
        held = ledger(p.store.redis, run.run_id)  # what each agent did, for its compensation
        assert set(held) - {"final_approval"} == {
            "credit_score", "income_verification", "risk_assessment", "fraud_detection"}
        assert ("final_approval" in held) == (result.output["decision"] == "approved")
        home = node_of(local_cluster, RunKeys(run.run_id).all())
        assert len(home) == 1  # states, steps, run, log, ... all on one node
        assert {"states", "steps", "run", "log"} <= {
            k.rsplit(":", 1)[1] for k in next(iter(home.values()))}
        homes |= set(home)
    assert len(homes) > 1  # and the runs spread over the cluster
    assert len(p.store.redis.zrange(RUNS_INDEX, 0, -1)) == len(BATCH)
    # Every script and XREAD went straight to its node: nobody asked where keys live.
    assert local_cluster.getkeys_calls() == getkeys_before


def test_scripts_flushed_from_every_node_are_loaded_again(
    local_cluster: LocalCluster, on_cluster: Pipeline,
) -> None:
    assert on_cluster.start("credit_decision", BATCH[0]).wait(60).status is RunStatus.SUCCEEDED
    for port in local_cluster.ports:
        local_cluster.node(port).script_flush()
    result = on_cluster.start("credit_decision", BATCH[1]).wait(60)
    assert result.status is RunStatus.SUCCEEDED, result.error


def test_a_run_refused_by_a_breaker_forced_open_on_the_cluster_is_compensated(
    local_cluster: LocalCluster, on_cluster: Pipeline,
) -> None:
    p = on_cluster
    p.breakers.force_open("fraud_detection")  # fallback `fail`
    run = p.start("credit_decision", BATCH[0])
    result = run.wait(60)
    assert result.status is RunStatus.COMPENSATED, result.error
    assert (result.error or "").startswith("CircuitOpen")
    assert ledger(p.store.redis, run.run_id) == {}
    log = p.store.log(run.run_id)
    assert [e["agent"] for e in log if e["event"] == "step.refused"] == ["fraud_detection"]
    breaker_keys = [breaker_key("fraud_detection"), breaker_log_key("fraud_detection")]
    assert [set(breaker_keys)] == list(node_of(local_cluster, breaker_keys).values())

    p.breakers.reset("fraud_detection")
    assert p.start("credit_decision", BATCH[0]).wait(60).status is RunStatus.SUCCEEDED


def test_a_breaker_trips_on_failures_recorded_on_the_cluster_and_then_fails_fast(
    on_cluster: Pipeline,
) -> None:
    p = on_cluster  # the workers run guarded_fail with chaos: every call fails
    first = [p.start("w_guarded_fail", {"n": i}).wait(30) for i in range(2)]
    assert [(r.error or "").split(":")[0] for r in first] == ["ChaosError", "ChaosError"]
    run = p.start("w_guarded_fail", {"n": 9})
    result = run.wait(30)
    assert (result.error or "").startswith("CircuitOpen")
    snapshots = {s.agent: s for s in p.breakers.snapshots(
        [("guarded_fail", QUICK_BREAKER), ("fraud_detection", QUICK_BREAKER)])}
    assert snapshots["guarded_fail"].state is BreakerState.OPEN
    assert snapshots["guarded_fail"].half_open_in_s is not None
    assert snapshots["fraud_detection"].state is BreakerState.CLOSED
    moved = [(t["from"], t["to"]) for t in p.breakers.transitions("guarded_fail")]
    assert moved == [("closed", "open")]
