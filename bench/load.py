"""Load: thousands of runs enqueued at once all finish, hold the invariants, and expire
after their retention while a live run stays.

``--runs`` runs of the no-op credit shape (1 -> 3 parallel -> 1) are started as fast
as one client can (nothing waits in between), served by one prefork pool of
``--concurrency``. Then: how long enqueuing and finishing took, the deepest any
agent queue got, the invariant checker over every run, and, with a retention of
``--retention`` seconds, every finished run's keys gone while a run that is still
live keeps all of its own. Exit status 1 when anything did not hold.

Usage: python -m bench.load [--runs 5000] [--concurrency 2] [--retention 20]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.common import (
    FINAL_STATUSES,
    bench_redis,
    client,
    release_results,
    run_statuses,
    worker,
    worker_env,
)
from bench.noop_agents import CREDIT_QUEUES, noop_credit
from pipeline.invariants import Verdict, verify
from pipeline.keys import RunKeys
from pipeline.state import RunStatus


def deepest_queue(p: Any, queues: Sequence[str], stop: threading.Event, out: list[int]) -> None:
    while not stop.wait(0.5):
        pipe = p.store.redis.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        out.append(max(pipe.execute()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--retention", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    problems: list[str] = []
    with bench_redis() as url:
        p = client(url)
        p.store.retention_s = args.retention
        queues = [*CREDIT_QUEUES, p.settings.default_queue]
        live = "live-run"  # created and handed over, its first step never sent: live
        p.store.create_run(live, workflow=noop_credit.name, payload={"n": 0},
                           contract=noop_credit.input_contract.ref)
        p.store.mark_enqueued(live)
        depth: list[int] = [0]
        stop = threading.Event()
        with worker(worker_env(url, PIPELINE_RETENTION_S=str(args.retention)),
                    concurrency=args.concurrency, queues=queues):
            watcher = threading.Thread(target=deepest_queue, args=(p, CREDIT_QUEUES, stop, depth),
                                       daemon=True)
            watcher.start()
            t0 = time.monotonic()
            run_ids = [p.start(noop_credit.name, {"n": i}).run_id for i in range(args.runs)]
            enqueued_s = time.monotonic() - t0
            deadline = t0 + args.timeout
            final: dict[str, str] = {}  # each run checked as it finishes: before it expires
            verdict = Verdict()
            while len(final) < len(run_ids) and time.monotonic() < deadline:
                waiting = [r for r in run_ids if r not in final]
                seen = run_statuses(p.store.redis, waiting)
                ended = {r: s for r, s in zip(waiting, seen, strict=True)
                         if s in FINAL_STATUSES or s == "missing"}  # missing: expired unseen
                verify(p.store, [r for r, st in ended.items() if st != "missing"],
                       verdict=verdict)
                final.update(ended)
                if len(final) < len(run_ids):
                    time.sleep(1.0)
            finished_s = time.monotonic() - t0
            stop.set()
            watcher.join()
            release_results(p.app)
        done = [final.get(r, "unfinished") for r in run_ids]
        by_status = Counter(done)
        if by_status != Counter({"succeeded": args.runs}):
            problems.append(f"not every run succeeded: {dict(by_status)}")
        if verdict.runs != len(final):
            problems.append(f"{len(final) - verdict.runs} run(s) expired before they were "
                            "checked (the checker fell behind): raise --retention")
        problems += [str(v) for v in verdict.violations[:20]]
        # retention: every finished run's keys go, the live run keeps its own
        expire_deadline = time.monotonic() + args.retention + 30
        left = run_ids
        while left and time.monotonic() < expire_deadline:
            time.sleep(1.0)
            pipe = p.store.redis.pipeline(transaction=False)
            for run_id in left:
                pipe.exists(*RunKeys(run_id).all())
            left = [r for r, n in zip(left, pipe.execute(), strict=True) if n]
        expired_s = time.monotonic() - t0 - finished_s
        if left:
            problems.append(f"{len(left)} finished run(s) still have keys after their retention")
        live_keys = [k for k in RunKeys(live).all() if p.store.redis.exists(k)]
        live_ttls = {p.store.redis.ttl(k) for k in live_keys}
        if RunKeys(live).run not in live_keys or live_ttls != {-1}:
            problems.append(f"the live run lost keys or got a time to live: {live_ttls}")
        if p.store.run_info(live).status is not RunStatus.RUNNING:
            problems.append("the live run is no longer running")
    steps = len(noop_credit.agents())
    print(f"load: {args.runs} runs ({steps} steps each) started at once on a pool of "
          f"{args.concurrency}")
    print(f"  enqueued in {enqueued_s:.1f}s ({args.runs / enqueued_s:,.0f} runs/s from one "
          f"client); all finished {finished_s:.1f}s after the first "
          f"({args.runs / finished_s:,.1f} runs/s, {args.runs * steps / finished_s:,.0f} "
          f"steps/s); deepest agent queue {max(depth)} messages")
    print(f"  by status: {dict(by_status)}; invariants: {len(verdict.violations)} violation(s) "
          f"over {verdict.runs} runs and {verdict.versions} versions")
    print(f"  retention {args.retention}s: every finished run's keys gone "
          f"{expired_s:.0f}s after the last finished; the live run kept its "
          f"{len(live_keys)} keys, without a time to live")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

