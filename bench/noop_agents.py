"""Agents that do no work, and the same canvases as plain Celery tasks.

Loaded by the bench workers (``PIPELINE_AGENT_MODULES=bench.noop_agents``) and
by the bench scripts. What is measured is what the pipeline adds around an
agent (contracts, breaker, sealed versions, trace), so the agents return at once.

- ``noop_credit``: the credit workflow's shape, ``noop_score -> (noop_income |
  noop_risk | noop_fraud) -> noop_approval``, each agent on its own queue,
  breaker on (the default policy), a compensator each;
- ``fanout_<width>``: ``parallel(fan_000 .. fan_<width-1>)`` then ``fan_join_<width>``,
  all on one queue, for every width in ``FANOUT_WIDTHS``;
- ``noop_limited_credit``: the same, every agent drawing on the limit ``bench:model``
  (rates and concurrency far above what the bench reaches: configured, never binding),
  each reserving an estimate of 100 tokens, on the same queues as ``noop_credit``'s;
- ``bench.bare``: one plain Celery task that stands in for any agent; ``bare_credit``
  and ``bare_fanout`` build the same canvases from it, on the same queues, with the
  same result handling (only a chord member's and the last task's result is stored).

With ``BENCH_COUNT_DIR`` set, every task process counts the round trips and
commands it sends to the servers named in ``BENCH_COUNT_PORTS`` and appends one
line per task to ``BENCH_COUNT_DIR/<pid>.jsonl`` (see ``bench.common.CommandCounter``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain, chord, group, shared_task
from celery.canvas import Signature
from marshmallow import Schema, fields

from bench.common import COUNT_DIR_ENV, install_task_counter
from pipeline import StepContext, Workflow, agent, contract, limit, parallel
from pipeline.agent import Agent
from pipeline.contracts import contracts, fan_in_schema
from pipeline.step import HARD_TIME_LIMIT_GRACE_S

TIME_LIMIT_S = 30.0
FANOUT_QUEUE = "agents.noop_fan"
FANOUT_WIDTHS = (2, 4, 8, 16, 32, 64, 128)
BARE_TASK = "bench.bare"


@contract("bench_noop", 1)
class Noop(Schema):
    n = fields.Integer(required=True)


def nothing(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Return at once."""
    return {"n": payload["n"] + 1}


def join(payload: dict[str, dict[str, Any]], ctx: StepContext) -> dict[str, Any]:
    """Return at once, having read the members' outputs."""
    return {"n": sum(part["n"] for part in payload.values())}


def undo_nothing(ctx: Any) -> None:
    """A compensation that has nothing to undo (never called on the happy path)."""


def noop_agent(name: str, *, input: str = "bench_noop@1", execute: Any = nothing,
               queue: str | None = None, limits: tuple[str, ...] = ()) -> Agent:
    return agent(name, input=input, output="bench_noop@1", time_limit_s=TIME_LIMIT_S,
                 queue=queue, compensate=undo_nothing, limits=limits,
                 estimate_tokens=100 if limits else 0)(execute)


# -- the credit workflow's shape ------------------------------------------------------------

CREDIT_MEMBERS = ("noop_income", "noop_risk", "noop_fraud")
contracts.register("bench_noop_assessments", 1,
                   fan_in_schema({name: Noop() for name in CREDIT_MEMBERS}))
contracts.register("bench_lim_assessments", 1,
                   fan_in_schema({f"lim_{name.removeprefix('noop_')}": Noop()
                                  for name in CREDIT_MEMBERS}))
noop_score = noop_agent("noop_score")
credit_members = [noop_agent(name) for name in CREDIT_MEMBERS]
noop_approval = noop_agent("noop_approval", input="bench_noop_assessments@1", execute=join)
noop_credit = Workflow("noop_credit", [noop_score, parallel(*credit_members), noop_approval],
                       description="The credit workflow's shape, with agents that do no work.")
CREDIT_QUEUES = tuple(a.queue for a in noop_credit.agents())

# -- the same, drawing on a limit that never binds ----------------------------------------

BENCH_LIMIT = limit("bench:model", requests_per_minute=10**8, tokens_per_minute=10**10,
                    concurrency=10**5)
_LIMITED = ("bench:model",)
noop_limited_credit = Workflow(
    "noop_limited_credit",
    [noop_agent("lim_score", queue=noop_score.queue, limits=_LIMITED),
     parallel(*[noop_agent(f"lim_{m.name.removeprefix('noop_')}", queue=m.queue,
                           limits=_LIMITED) for m in credit_members]),
     noop_agent("lim_approval", input="bench_lim_assessments@1", execute=join,
                queue=noop_approval.queue, limits=_LIMITED)],
    description="noop_credit, every agent drawing on a limit that never binds.")

# -- fan-outs ------------------------------------------------------------------------------

fan_members = [noop_agent(f"fan_{i:03d}", queue=FANOUT_QUEUE) for i in range(max(FANOUT_WIDTHS))]
fanouts: dict[int, Workflow] = {}
for width in FANOUT_WIDTHS:
    members = fan_members[:width]
    contracts.register(f"bench_fan_in_{width}", 1,
                       fan_in_schema({m.name: Noop() for m in members}))
    fan_join = noop_agent(f"fan_join_{width}", input=f"bench_fan_in_{width}@1", execute=join,
                          queue=FANOUT_QUEUE)
    fanouts[width] = Workflow(f"fanout_{width}", [parallel(*members), fan_join],
                              description=f"{width} agents side by side, then a join.")


# -- the same canvases as plain Celery tasks --------------------------------------------------


@shared_task(name=BARE_TASK, soft_time_limit=TIME_LIMIT_S,  # type: ignore[untyped-decorator]
             time_limit=TIME_LIMIT_S + HARD_TIME_LIMIT_GRACE_S)
def bare(upstream: Any, *, run_id: str, step: str, final: bool = False) -> int:
    """Return at once: a plain Celery task in an agent's place."""
    return 1


def _bare(app: Celery, run_id: str, step: str, queue: str, *, upstream: Any = None,
          joined: bool = False, final: bool = False) -> Signature:
    kwargs: dict[str, Any] = {"run_id": run_id, "step": step}
    if final:
        kwargs["final"] = True
    return app.signature(BARE_TASK, args=() if upstream is None else (upstream,), kwargs=kwargs,
                         queue=queue, ignore_result=not (joined or final))


def bare_credit(app: Celery, run_id: str) -> Signature:
    """``chain(task, chord(group(3 tasks), task))`` on the queues of ``noop_credit``."""
    entry, members, last = noop_credit.stages
    return chain(
        _bare(app, run_id, entry[0].key, entry[0].agent.queue, upstream=0),
        chord(group([_bare(app, run_id, s.key, s.agent.queue, joined=True) for s in members],
                    app=app),
              _bare(app, run_id, last[0].key, last[0].agent.queue, final=True), app=app),
        app=app,
    )


def bare_fanout(app: Celery, run_id: str, width: int) -> Signature:
    """``chord(group(width tasks), task)`` on the fan-out queue."""
    members, last = fanouts[width].stages
    return chord(group([_bare(app, run_id, s.key, FANOUT_QUEUE, upstream=0, joined=True)
                        for s in members], app=app),
                 _bare(app, run_id, last[0].key, FANOUT_QUEUE, final=True), app=app)


if os.environ.get(COUNT_DIR_ENV):
    install_task_counter()
if os.environ.get("BENCH_PROFILE_DIR"):
    from bench.profile import install_process_profiler

    install_process_profiler()
