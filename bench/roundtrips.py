"""Round trips: what a pipeline step sends to Redis beyond what bare Celery sends.

The design budget is 2 round trips per step: one to open it, one to seal it
(the breaker's permit and record, the trace and the step metrics ride on those
two). Counted two ways, on Redis servers of their own (``EmbeddedRedis``: INFO
is per server, not per database), one for the pipeline's state and one for
Celery's broker and results:

- in the task processes: each task's round trips and the commands they carried,
  per server (``bench.common.CommandCounter``, one line per task): exact for every
  step, whatever the machine's speed;
- on the state server: ``INFO commandstats`` and ``total_commands_processed``
  deltas over the pipeline phase. The commands the clients sent (the workers'
  counted steps and this process's ``start``/``wait``) must add up to the
  server's count; commandstats also shows the commands the Lua scripts ran.

The bare phase runs the same canvas of plain Celery tasks on the same pool: its
tasks send nothing to the state server, and what they send to the broker is the
baseline for the pipeline's steps.

Usage: python -m bench.roundtrips [--workflows 20] [--concurrency 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    COUNT_DIR_ENV,
    COUNT_PORTS_ENV,
    UPKEEP,
    BareKind,
    CommandCounter,
    Kind,
    PipelineKind,
    bench_app,
    client,
    count_ports,
    counted_tasks,
    release_results,
    save,
    settled,
    table,
    throughput,
    warm_up,
    worker,
    worker_env,
)
from bench.noop_agents import bare_credit, noop_credit, noop_limited_credit
from pipeline.embedded import EmbeddedRedis

BUDGET = 2
BARE = "bare celery"
LIMITED = "pipeline, limits"
"""The same workflow, every agent drawing on a limit that never binds: the limit's admission
rides the open round trip and its settlement the seal's."""
RECORD_TIMEOUT_S = 30.0


def server_counts(r: redis.Redis) -> tuple[int, Counter[str]]:
    """(commands clients sent, calls per command including those run by scripts)."""
    info = r.info("everything")
    calls = Counter({key.removeprefix("cmdstat_").upper(): int(value["calls"])
                     for key, value in info.items() if key.startswith("cmdstat_")})
    return int(info["total_commands_processed"]), calls


def wait_for_records(directory: Path, run_ids: set[str], tasks: int) -> list[dict[str, Any]]:
    """The counted tasks of ``run_ids``, once all ``tasks`` have written their line."""
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    while True:
        lines = [t for t in counted_tasks(directory) if t["run_id"] in run_ids]
        if len(lines) >= tasks:
            return lines
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(lines)} of {tasks} tasks counted after "
                               f"{RECORD_TIMEOUT_S:g}s")
        time.sleep(0.05)


def per_step(lines: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Round trips and commands per task to server ``label``: mean, and the most."""
    trips = [t[label]["round_trips"] for t in lines]
    commands: Counter[str] = Counter()
    for t in lines:
        commands.update({k: v for k, v in t[label]["commands"].items() if k not in UPKEEP})
    n = len(lines)
    return {"round_trips": sum(trips) / n, "max_round_trips": max(trips),
            "min_round_trips": min(trips),
            "upkeep_round_trips": sum(t[label]["upkeep"] for t in lines),
            "commands": sum(commands.values()) / n,
            "by_command": {k: v / n for k, v in sorted(commands.items())}}


def by_step(lines: list[dict[str, Any]]) -> dict[str, float]:
    """All round trips (every server) per step of the workflow, averaged over its runs: a
    sequential step by its key; a parallel stage's members by rank within their run (the
    one with the most round trips is the one that joined), as ``<stage>.<rank>``."""
    runs: dict[str, dict[str, int]] = {}
    for t in lines:
        trips = sum(v["round_trips"] for v in t.values() if isinstance(v, dict))
        runs.setdefault(t["run_id"], {})[t["step"]] = trips
    totals: Counter[str] = Counter()
    for steps in runs.values():
        stages: dict[str, list[int]] = {}
        for key, trips in steps.items():
            stage, _, _ = key.partition(":")
            stages.setdefault(stage.split(".")[0] if "." in stage else key, []).append(trips)
        for name, trips in stages.items():
            if len(trips) == 1:
                totals[name] += trips[0]
            else:
                totals.update({f"{name}.{rank}": n for rank, n in enumerate(sorted(trips))})
    return {name: n / len(runs) for name, n in sorted(totals.items())}


def measure(*, workflows: int, concurrency: int) -> dict[str, Any]:
    with EmbeddedRedis() as state, EmbeddedRedis() as broker, settled(), \
            tempfile.TemporaryDirectory(prefix="bench-count-") as count_dir:
        ports = {"state": state.port, "broker": broker.port}
        here = CommandCounter({port: label for label, port in ports.items()}).install()
        p = client(state.url, broker.url)
        pipeline = PipelineKind(p, noop_credit.name, {"n": 0})
        bare = BareKind(bench_app(p.settings), bare_credit)
        limited = PipelineKind(p, noop_limited_credit.name, {"n": 0}, name=LIMITED)
        kinds: list[Kind] = [pipeline, bare, limited]
        env = worker_env(state.url, broker.url,
                         **{COUNT_DIR_ENV: count_dir, COUNT_PORTS_ENV: count_ports(ports)})
        state_redis = redis.Redis.from_url(state.url)
        steps = len(noop_credit.agents())
        phases: dict[str, Any] = {}
        with worker(env, concurrency=concurrency):
            warm_up(kinds, concurrency)
            for kind in kinds:
                first = len(kind.run_ids)
                served_before = server_counts(state_redis)
                sent_before = here.snapshot()
                throughput(kind, workflows)
                run_ids = set(kind.run_ids[first:])
                lines = wait_for_records(Path(count_dir), run_ids, workflows * steps)
                sent = here.since(sent_before)
                served_after = server_counts(state_redis)
                phases[kind.name] = {"lines": lines, "client": sent,
                                     "served": (served_after[0] - served_before[0],
                                                served_after[1] - served_before[1])}
            release_results(p.app)
        offset = _info_cost(state_redis)
        state_redis.close()
    return _summarise(phases, workflows=workflows, steps=steps, offset=offset,
                      concurrency=concurrency)


def _info_cost(r: redis.Redis) -> int:
    """What one measurement itself adds to the server's command count (its INFO)."""
    a, _ = server_counts(r)
    b, _ = server_counts(r)
    return b - a


def _summarise(phases: dict[str, Any], *, workflows: int, steps: int, offset: int,
               concurrency: int) -> dict[str, Any]:
    out: dict[str, Any] = {"workflows": workflows, "steps_per_workflow": steps,
                           "concurrency": concurrency, "budget_round_trips_per_step": BUDGET}
    for name, phase in phases.items():
        lines = phase["lines"]
        out[name] = {"tasks": len(lines), "state": per_step(lines, "state"),
                     "broker": per_step(lines, "broker"), "by_step": by_step(lines)}
    ours = phases["pipeline"]
    by_steps: Counter[str] = Counter()
    for t in ours["lines"]:
        by_steps.update(t["state"]["commands"])
    client_state = ours["client"]["state"]
    by_client = Counter(client_state["commands"])
    served_total, served_calls = ours["served"]
    served_total -= offset
    by_scripts = served_calls - by_steps - by_client  # what the Lua scripts ran
    del by_scripts["INFO"]
    evalsha_sent = by_steps["EVALSHA"] + by_client["EVALSHA"]
    out["state_server"] = {
        "commands_per_workflow": served_total / workflows,
        "sent_by_steps_per_workflow": by_steps.total() / workflows,
        "sent_by_client_per_workflow": by_client.total() / workflows,
        "run_by_scripts_per_workflow": by_scripts.total() / workflows,
        "script_commands_per_workflow": {k.lower(): v / workflows
                                         for k, v in sorted(by_scripts.items())},
        "evalsha_served": served_calls["EVALSHA"],
        "evalsha_sent": evalsha_sent,
        "agrees": served_calls["EVALSHA"] == evalsha_sent,
        "evalsha_per_step": (served_calls["EVALSHA"] - by_client["EVALSHA"]) / (workflows * steps),
        "client_round_trips_per_workflow": client_state["round_trips"] / workflows,
        "client_commands_per_workflow": {k: v / workflows for k, v in sorted(by_client.items())},
    }
    state, bare_broker = out["pipeline"]["state"], out[BARE]["broker"]["round_trips"]
    out["extra_round_trips_per_step"] = (state["round_trips"]
                                         + out["pipeline"]["broker"]["round_trips"] - bare_broker)
    out["within_budget"] = state["max_round_trips"] <= BUDGET
    out["extra_round_trips_per_step_limits"] = round(
        out[LIMITED]["state"]["round_trips"] + out[LIMITED]["broker"]["round_trips"]
        - state["round_trips"] - out["pipeline"]["broker"]["round_trips"], 9) + 0.0
    return out


def report(r: dict[str, Any]) -> str:
    ours, bare = r["pipeline"], r[BARE]
    rows = [
        ["state round trips", f"{ours['state']['round_trips']:.2f}",
         f"{bare['state']['round_trips']:.2f}",
         f"{ours['state']['min_round_trips']}..{ours['state']['max_round_trips']}",
         str(r["budget_round_trips_per_step"])],
        ["  commands carried", f"{ours['state']['commands']:.2f}",
         f"{bare['state']['commands']:.2f}", "", ""],
    ]
    rows += [[f"    {name}", f"{n:.2f}", "", "", ""]
             for name, n in ours["state"]["by_command"].items()]
    rows.append(["broker/backend round trips", f"{ours['broker']['round_trips']:.2f}",
                 f"{bare['broker']['round_trips']:.2f}",
                 f"{ours['broker']['min_round_trips']}..{ours['broker']['max_round_trips']}", ""])
    rows.append(["extra round trips", f"{r['extra_round_trips_per_step']:.2f}", "", "", ""])
    lim = r[LIMITED]["state"]
    rows.append(["state round trips, every agent on a limit (not binding)",
                 f"{lim['round_trips']:.2f}", "",
                 f"{lim['min_round_trips']}..{lim['max_round_trips']}",
                 f"{r['extra_round_trips_per_step_limits']:+.2f} vs without"])
    steps = [[name, f"{n:.1f}", f"{bare['by_step'].get(name, 0.0):.1f}", "", ""]
             for name, n in ours["by_step"].items()]
    rows.append(["all round trips, by step (a parallel stage's members by rank, the last "
                 "joins)", "", "", "", ""])
    rows += [[f"  {name}", *rest] for name, *rest in steps]
    s = r["state_server"]
    scripts = ", ".join(f"{k} {v:.1f}" for k, v in s["script_commands_per_workflow"].items())
    client_cmds = ", ".join(f"{k} {v:.1f}" for k, v in s["client_commands_per_workflow"].items())
    return "\n".join([
        f"round trips per step: {r['workflows']} workflows of {r['steps_per_workflow']} steps "
        f"each kind, counted in the task processes",
        table(["per step", "pipeline", BARE, "min..max", "budget"], rows),
        f"state server, INFO commandstats: EVALSHA {s['evalsha_per_step']:.2f} per step "
        f"(served {s['evalsha_served']}, sent {s['evalsha_sent']}: "
        f"{'agrees' if s['agrees'] else 'DOES NOT AGREE'})",
        f"state server, commands executed per workflow: {s['commands_per_workflow']:.1f} = "
        f"{s['sent_by_steps_per_workflow']:.1f} sent by the steps + "
        f"{s['sent_by_client_per_workflow']:.1f} by the client + "
        f"{s['run_by_scripts_per_workflow']:.1f} inside Lua scripts ({scripts})",
        f"client, per workflow (start, wait, result): {s['client_round_trips_per_workflow']:.1f} "
        f"round trips: {client_cmds}",
        "within budget" if r["within_budget"] else "OVER BUDGET",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=20, help="workflows of each kind")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool processes")
    parser.add_argument("--quick", action="store_true", help="a tiny size, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.workflows = 3
    result = measure(workflows=args.workflows, concurrency=args.concurrency)
    print(report(result))
    save("roundtrips", result)


if __name__ == "__main__":
    main()
