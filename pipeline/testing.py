"""Testing your own agents and workflows (as ``structlog.testing`` and dramatiq's
``StubBroker`` help theirs).

``run_agent(agent, payload)`` runs one agent the way a step does, without Celery:
the payload is checked against the agent's input contract, ``execute`` runs with a
step context, and its output is checked against the output contract; a broken
contract is the same ``ContractViolation`` a step raises, naming the side and every
field. The context's Redis client is the one given (or one for ``PIPELINE_REDIS_URL``,
connected only if the agent uses it); ``ctx.run_input`` is the payload.

For tests on real workers, this module is also a pytest plugin. In your
``conftest.py``, ``pytest_plugins = ["pipeline.testing"]`` gives:

- ``pipeline_redis_url`` (session): ``PIPELINE_TEST_REDIS_URL`` if set, else the
  local Redis if it answers, else an embedded one started for the session; database
  ``PIPELINE_TEST_REDIS_DB`` (default 15), flushed at the start;
- ``pipeline_worker`` (session): a worker process (``celery -A pipeline.worker``) for
  your ``PIPELINE_AGENT_MODULES`` on that database, from the current directory;
- ``pipeline_client``: a ``Pipeline`` on that database, to start runs and wait for them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from .agent import Agent, agents
from .client import Pipeline
from .context import StepContext
from .contracts import contracts
from .embedded import EmbeddedRedis, answers
from .errors import ConfigurationError
from .local import WorkerProcess
from .reads import LineageReads
from .settings import DEFAULT_REDIS_URL, Settings
from .state import Version, canonical_json, digest_of

try:
    import pytest
except ImportError as e:  # pragma: no cover - the `test` extra
    raise ConfigurationError("pipeline.testing needs pytest: pip install "
                             "'celery-agent-pipeline[test]'") from e

__all__ = ["pipeline_client", "pipeline_redis_url", "pipeline_worker", "run_agent"]

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_TEST_DB = 15


def run_agent(agent: Agent | str, payload: Any, *, redis_client: redis.Redis | None = None,
              run_id: str = "test-run", attempt: int = 1) -> Any:
    """Run ``agent`` (or the registered agent of that name) on ``payload`` as a step
    would, both contracts checked; its output."""
    a = agents.get(agent) if isinstance(agent, str) else agent
    contracts.get(a.input).validate(payload, side="input", agent=a.name, run_id=run_id,
                                    version=0)
    text = canonical_json(payload)
    given = Version(run_id=run_id, version=0, parents=(), agent="", contract=a.input,
                    payload=payload, digest=digest_of(text), created_at=time.time(),
                    step="input")
    step = f"0:{a.name}"

    def read(n: int) -> Version:  # only version 0 exists in a run of one step
        return given

    ctx = StepContext(
        run_id=run_id, step=step, agent=a.name, attempt=attempt, input_versions=(0,),
        redis=redis_client if redis_client is not None else redis.Redis.from_url(
            os.environ.get("PIPELINE_REDIS_URL") or DEFAULT_REDIS_URL, decode_responses=True),
        worker="pipeline.testing",
        reads=LineageReads(read, run_id=run_id, step=step, inputs=[given]),
    )
    output = a.execute(payload, ctx)
    contracts.get(a.output).validate(output, side="output", agent=a.name, run_id=run_id)
    return output


# -- the pytest plugin ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pipeline_redis_url() -> Iterator[str]:
    """A Redis database of the tests' own (see the module docstring), flushed first."""
    db = int(os.environ.get("PIPELINE_TEST_REDIS_DB", DEFAULT_TEST_DB))
    configured = os.environ.get("PIPELINE_TEST_REDIS_URL")
    if configured or answers(LOCAL_REDIS):
        url = _with_db(configured or LOCAL_REDIS, db)
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    with EmbeddedRedis() as server:
        url = _with_db(server.url, db)
        yield url


@pytest.fixture(scope="session")
def pipeline_worker(pipeline_redis_url: str) -> Iterator[WorkerProcess]:
    """A worker for ``PIPELINE_AGENT_MODULES`` on the tests' database, until the end."""
    env = {"PIPELINE_REDIS_URL": pipeline_redis_url, "CELERY_BROKER_URL": pipeline_redis_url,
           "CELERY_RESULT_BACKEND": pipeline_redis_url}
    with WorkerProcess(app="pipeline.worker", env=env, cwd=os.getcwd()) as worker:
        yield worker


@pytest.fixture
def pipeline_client(pipeline_redis_url: str) -> Pipeline:
    """A client on the tests' database (start a run, ``wait`` for it)."""
    return Pipeline(settings=Settings.from_env({
        **os.environ, "PIPELINE_REDIS_URL": pipeline_redis_url,
        "CELERY_BROKER_URL": pipeline_redis_url, "CELERY_RESULT_BACKEND": pipeline_redis_url}))


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))
