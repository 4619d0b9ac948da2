"""Chaos soak: credit runs under injected faults and whole workers killed, then the
invariant checker (``make soak``).

``--runs`` credit runs (the samples in tasks/samples/batch.json, in turn) go to
``--workers`` worker processes whose agents misbehave (``PIPELINE_CHAOS``: errors,
pool processes crashing, steps running past their time limit, outputs breaking
their contract). Once a tenth of the runs have started (so that even on a fast machine
kills land among runs in flight), and every ``--kill-every`` seconds from then, one
worker, chosen at random, is killed whole (SIGKILL to its main process and pool,
nothing acked, nothing said) and a new one started; ``celery beat`` runs the sweeper
every second, with a lease of ``--lease`` seconds (the broker's visibility timeout
stays at an hour), on a small worker of its own for the ``pipeline`` queue. When
every run has finished, or ``--timeout`` passed, the invariant checker reads Redis
(``pipeline.invariants``, with the credit ledger as the side effects): figures on
stdout, and exit status 1 on any violation or any run not finished.

Finished runs are archived as the soak goes (``--archive``, on by default): an archiver
process of its own makes a pass every half second into a Delta table in a temporary
directory, and is itself SIGKILLed now and then (every third kill); archived runs leave
Redis two seconds later. At the end a last pass archives what is left, and the checker reads
every run that Redis no longer has back from the archive (``Pipeline.recall``), and counts
each run's rows in the tables: every run exactly once.

Usage: python -m bench.soak [--runs 1000] [--workers 2] [--kill-every 5] [--lease 5]
                            [--chaos SPEC] [--timeout 1800] [--seed N] [--no-archive]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bench.common import FINAL_STATUSES, ROOT, bench_redis, run_statuses
from pipeline import Pipeline, Settings
from pipeline.app import create_app
from pipeline.archive.archiver import Archiver
from pipeline.archive.backlog import backlog
from pipeline.archive.table import query
from pipeline.invariants import verify
from pipeline.keys import RunKeys
from pipeline.local import BeatProcess, WorkerProcess

CHAOS = ("credit_score=error:0.03,income_verification=crash:0.03,"
         "risk_assessment=bad_output:0.02,fraud_detection=error:0.03,"
         "final_approval=slow:0.002")
"""Each kind of fault, rare enough that no breaker opens (a parked run would wait for a person)."""
SAMPLES = ROOT / "tasks" / "samples" / "batch.json"
ARCHIVED_RETENTION_S = 2
"""How long an archived run stays in Redis in the soak: most runs are gone by the end."""


class Fleet:
    """The workers and beat, with a killer that takes one worker down at a time."""

    def __init__(self, env: dict[str, str], workers: int, concurrency: int,
                 archiving: Archiving | None = None) -> None:
        self.env = env
        self.archiving = archiving
        self.concurrency = concurrency
        self.workers = [self._worker() for _ in range(workers)]
        # What beat sends (the sweep) and the saga's planners go to the `pipeline` queue: a
        # worker of its own serves it, as the Procfile's approval pool does, so that a sweep
        # never waits behind busy agent pools (it expires after one interval). Never killed.
        self.ops = WorkerProcess(env=env, concurrency=1, queues=["pipeline"], cwd=str(ROOT))
        self.beat = BeatProcess(env=env, cwd=str(ROOT))
        self.kills: list[float] = []
        self._stop = threading.Event()
        self._killer: threading.Thread | None = None

    def _worker(self) -> WorkerProcess:
        return WorkerProcess(env=self.env, concurrency=self.concurrency, cwd=str(ROOT))

    def start(self) -> None:
        for w in [*self.workers, self.ops]:
            w.start(wait=False)
        for w in [*self.workers, self.ops]:
            w.wait_ready()
        self.beat.start()
        if self.archiving is not None:
            self.archiving.start()

    def kill_every(self, seconds: float, rng: random.Random, first: threading.Event) -> None:
        """Kill a worker as soon as ``first`` is set (runs are in flight: however fast the
        machine, at least one kill lands among them), then every ``seconds``."""

        def kill() -> None:
            i = rng.randrange(len(self.workers))
            self.workers[i].kill()
            self.kills.append(time.monotonic())
            self.workers[i] = self._worker().start()  # one worker down at a time
            if self.archiving is not None and len(self.kills) % 3 == 0:
                self.archiving.kill()

        def loop() -> None:
            while not first.wait(0.05):
                if self._stop.is_set():
                    return
            kill()
            while not self._stop.wait(seconds):
                kill()

        self._killer = threading.Thread(target=loop, name="killer", daemon=True)
        self._killer.start()

    def stop_killing(self) -> None:
        self._stop.set()
        if self._killer is not None:
            self._killer.join()

    def stop(self) -> None:
        self.stop_killing()
        if self.archiving is not None:
            self.archiving.stop()
        self.beat.stop()
        for w in [*self.workers, self.ops]:
            w.stop()


class Archiving:
    """An archiver in a process of its own, a pass every half second, that the killer
    SIGKILLs now and then (it comes back at once)."""

    CODE = """
import sys, time
from pipeline.archive.archiver import Archiver
from pipeline.archive.backlog import backlog
from pipeline.state import StateStore, connect
archiver = Archiver(StateStore(connect(sys.argv[1])), sys.argv[2], settle_s=1.0, lag_s=0,
                    archived_retention_s=int(sys.argv[3]))
while True:
    archiver.run_once()
    time.sleep(0.5)
"""

    def __init__(self, url: str, root: str) -> None:
        self.url, self.root = url, root
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, self.url, self.root,
                                      str(ARCHIVED_RETENTION_S)], cwd=ROOT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.kills += 1
            self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


def check_archive(p: Pipeline, root: str, run_ids: Sequence[str]) -> dict[str, Any]:
    """The rest archived (the archiver is stopped: its lock, if it was killed holding it,
    is not waited for); every run Redis no
    longer has read back from the archive, for the checker; each run's rows counted."""
    archiver = Archiver(p.store, root, settle_s=0, lag_s=0,
                        archived_retention_s=ARCHIVED_RETENTION_S)
    deadline = time.monotonic() + 60  # a run found live is looked at again 10 s later
    while backlog(p.store)["backlog"] and time.monotonic() < deadline:
        archiver.run_once(lock=False)
        time.sleep(0.5)
    deadline = time.monotonic() + 30  # archived runs leave Redis: the checker reads them
    while set(run_statuses(p.store.redis, run_ids)) != {"missing"} \
            and time.monotonic() < deadline:  # from the archive
        time.sleep(0.5)
    reader = Pipeline(settings=replace(p.settings, archive_uri=root, archived_retention_s=600),
                      app=p.app)
    recalled = sum(reader.recall(run_id) for run_id in run_ids)
    runs, versions = (Counter(found.column("run_id").to_pylist() if found is not None else [])
                      for found in (query(root, f"SELECT run_id FROM {table}", table)
                                    for table in ("runs", "versions")))
    heads = dict(zip(run_ids, [int(h or -1) for h in run_heads(p, run_ids)], strict=True))
    return {"archived": sum(1 for r in run_ids if runs[r] == 1),
            "recalled": recalled,
            "not_once": sorted(r for r in run_ids if runs[r] != 1),
            "versions_not_once": sorted(r for r in run_ids if versions[r] != heads[r] + 1)}


def run_heads(p: Pipeline, run_ids: Sequence[str]) -> list[str | None]:
    pipe = p.store.redis.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(RunKeys(run_id).run, "head")
    return list(pipe.execute())


def wait_finished(p: Pipeline, run_ids: Sequence[str], timeout_s: float) -> dict[str, str]:
    """Poll until every run has a final status (or the timeout); run id -> status. A run
    seen final stays so (archived, it leaves Redis soon after)."""
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, str] = {}
    last_print = 0.0
    while True:
        now_read = dict(zip(run_ids, run_statuses(p.store.redis, run_ids), strict=True))
        statuses = {r: statuses[r] if statuses.get(r) in FINAL_STATUSES else s
                    for r, s in now_read.items()}
        done = sum(1 for s in statuses.values() if s in FINAL_STATUSES)
        now = time.monotonic()
        if now - last_print > 5:
            print(f"  {done}/{len(run_ids)} finished", flush=True)
            last_print = now
        if done == len(run_ids) or now > deadline:
            return statuses
        time.sleep(0.5)


def _sid(entry: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(part) for part in entry["id"].split("-"))


def faults(p: Pipeline, run_ids: Sequence[str]) -> dict[str, Any]:
    """What the logs say was injected and recovered, over every run."""
    injected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    redriven = 0  # runs that stopped moving with no message left, re-driven by the sweeper
    silent_s: list[float] = []  # from the last sign of life to the sweeper's redelivery
    lost_s: list[float] = []  # from the lost attempt's start to the step's end
    for run_id in run_ids:
        log = p.store.log(run_id)
        injected.update(e["mode"] for e in log if e.get("event") == "chaos")
        failed.update(e.get("error_type", "?") for e in log if e.get("event") == "step.failed")
        redriven += sum(1 for e in log if e.get("event") == "run.redriven")
        for e in log:
            if e.get("event") != "step.redelivered":
                continue
            silent_s.append(float(e["silent_s"]))
            started = [int(x["at"]) for x in log if x.get("event") == "step.started"
                       and x.get("step") == e["step"] and _sid(x) < _sid(e)]
            ended = [int(x["at"]) for x in log if x.get("event") in ("step.sealed", "step.failed")
                     and x.get("step") == e["step"] and _sid(x) > _sid(e)]
            if started and ended:  # else it had sealed before its worker died
                lost_s.append((min(ended) - max(started)) / 1000.0)
    return {"injected": dict(injected), "step_failures": dict(failed),
            "redelivered_by_sweeper": len(silent_s), "redriven_by_sweeper": redriven,
            "silent_s": _spread(silent_s), "recovery_s": _spread(lost_s)}


def _spread(values: list[float]) -> dict[str, float | int | None]:
    return {"median": statistics.median(values) if values else None,
            "max": max(values) if values else None, "count": len(values)}


def credit_ledger(p: Pipeline) -> Any:
    from tasks.credit import ledger

    return lambda run_id: ledger(p.store.redis, run_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=5.0)
    parser.add_argument("--lease", type=int, default=5)
    parser.add_argument("--chaos", default=CHAOS)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", dest="as_json", action="store_true")
    parser.add_argument("--no-archive", dest="archive", action="store_false",
                        help="no archiver running through the soak")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    samples = json.loads(SAMPLES.read_text())
    started = time.monotonic()
    with bench_redis() as url:
        env = {"PIPELINE_REDIS_URL": url, "CELERY_BROKER_URL": url,
               "CELERY_RESULT_BACKEND": url, "PIPELINE_AGENT_MODULES": "tasks",
               "PIPELINE_CHAOS": args.chaos, "PIPELINE_LEASE_S": str(args.lease),
               "PIPELINE_SWEEP_INTERVAL_S": "1", "PIPELINE_OTEL": ""}
        settings = Settings(redis_url=url, broker_url=url, result_backend=url,
                            agent_modules=("tasks",), lease_s=args.lease)
        p = Pipeline(settings=settings, app=create_app(settings, fail_fast=True))
        tmp = tempfile.TemporaryDirectory()
        archiving = Archiving(url, f"{tmp.name}/archive") if args.archive else None
        fleet = Fleet(env, args.workers, args.concurrency, archiving)
        archived: dict[str, Any] = {}
        try:
            fleet.start()
            print(f"soak: {args.runs} credit runs, {args.workers} workers x "
                  f"{args.concurrency}, a worker killed every {args.kill_every:g}s, "
                  f"lease {args.lease}s, chaos {args.chaos}", flush=True)
            in_flight = threading.Event()  # the first kill: a tenth of the runs started
            fleet.kill_every(args.kill_every, rng, in_flight)
            run_ids = []
            for i in range(args.runs):
                run_ids.append(p.start("credit_decision", samples[i % len(samples)]).run_id)
                if i + 1 >= max(1, args.runs // 10):
                    in_flight.set()
            statuses = wait_finished(p, run_ids, args.timeout)
            fleet.stop_killing()
            if archiving is not None:
                archiving.stop()
                archived = check_archive(p, archiving.root, run_ids)
            figures = faults(p, run_ids)
            verdict = verify(p.store, run_ids, side_effects=credit_ledger(p))
        finally:
            fleet.stop()
            tmp.cleanup()
    unfinished = {r: s for r, s in statuses.items() if s not in FINAL_STATUSES}
    report = {"runs": args.runs, "seconds": round(time.monotonic() - started, 1),
              "workers_killed": len(fleet.kills), "by_status": dict(Counter(statuses.values())),
              **figures, "unfinished": len(unfinished), "invariants": verdict.to_dict(),
              "archive": {**archived, "archiver_killed": archiving.kills if archiving else 0}}
    if args.as_json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
    broken = bool(archived.get("not_once") or archived.get("versions_not_once"))
    return 0 if verdict.ok and not unfinished and not broken else 1


def summary(r: dict[str, Any]) -> str:
    rec, silent = r["recovery_s"], r["silent_s"]
    lines = [
        f"{r['runs']} runs in {r['seconds']:.0f}s: "
        + ", ".join(f"{n} {s}" for s, n in sorted(r["by_status"].items())),
        f"faults injected: {r['workers_killed']} workers killed whole; "
        + (", ".join(f"{n} {m}" for m, n in sorted(r["injected"].items())) or "no chaos drawn"),
        "step failures by error: "
        + (", ".join(f"{n} {e}" for e, n in sorted(r["step_failures"].items())) or "none"),
        f"steps handed out again by the sweeper: {r['redelivered_by_sweeper']}"
        + (f", after {silent['median']:.1f}s (median) and at most {silent['max']:.1f}s "
           "without a sign of life" if silent["count"] else ""),
        f"runs re-driven by the sweeper (stopped, no message left): {r['redriven_by_sweeper']}",
        (f"a killed step's end came {rec['median']:.1f}s (median), at most {rec['max']:.1f}s, "
         f"after its lost attempt started ({rec['count']} steps; the others had sealed)"
         if rec["count"] else "no killed step had to run again"),
        f"unfinished runs: {r['unfinished']}",
        *([f"archived as it went: {a['archived']} runs once each in the tables (the archiver "
           f"SIGKILLed {a['archiver_killed']} times), {a['recalled']} read back from the "
           f"archive for the checker; not once: {len(a['not_once'])} runs, "
           f"{len(a['versions_not_once'])} runs' versions"]
          if (a := r["archive"]).get("archived") is not None else []),
        f"invariants: {len(r['invariants']['violations'])} violation(s) over "
        f"{r['invariants']['runs']} runs, {r['invariants']['versions']} versions, "
        f"{r['invariants']['compensations']} compensations",
    ]
    lines += [f"  run {v['run_id']}: {v['rule']}: {v['detail']}"
              for v in r["invariants"]["violations"][:50]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

