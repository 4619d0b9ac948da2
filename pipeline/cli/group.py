"""The ``pipeline`` command group, its exit codes and the options and helpers its commands
share. Every read command takes ``--json``.

Exit codes: 0 done, 1 the run itself failed, 2 bad input or an error of the
pipeline's (unknown workflow or run, contract violation, Redis unreachable).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click

from ..agent import agents
from ..catalog import known_agents
from ..client import Pipeline
from ..errors import InputError, PipelineError, WaitTimeout
from .output import echo_result

F = TypeVar("F", bound=Callable[..., Any])

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2


class PipelineGroup(click.Group):
    """Turns every ``PipelineError`` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_USAGE)


@click.group(cls=PipelineGroup)
def main() -> None:
    """Run and inspect multi-agent workflows on Celery."""
    # Agent modules are found from the working directory, as `celery -A` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def wait_options(what: str) -> Callable[[F], F]:
    """``--wait/--no-wait`` (for ``what`` to end) and ``--timeout`` seconds."""
    def decorate(f: F) -> F:
        f = click.option("--timeout", type=float, default=60.0, show_default=True,
                         help="Seconds to wait.")(f)
        return click.option("--wait/--no-wait", default=False,
                            help=f"Wait for {what} to end.")(f)
    return decorate


def client(agents_required: bool = False, *, runs: Sequence[str] = ()) -> Pipeline:
    """The client. Commands that start or continue runs need the agent modules
    (``agents_required``); the others read, cancel and compensate without them. Each of
    ``runs`` that Redis no longer has is brought back from the archive, when there is one
    (``PIPELINE_ARCHIVE_URI``), for the command to read as before.

    Commands call it as ``group.client(...)``, so that a test can replace it here."""
    p = Pipeline.from_env(agents_required=agents_required)
    for run_id in runs:
        p.recall(run_id)
    return p


def current_user() -> str:
    """Who runs this command, as the operating system knows them ('' if it does not)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def read_json_input(source: str) -> Any:
    """Parse JSON from a file path or ``-`` (stdin); ``InputError`` says where it broke."""
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read input {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"input {name} is not UTF-8 text: {e}") from None
    except ValueError as e:  # a path holding a NUL byte
        raise InputError(f"cannot read input {name!r}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"input {name} is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except ValueError as e:  # an integer too long to convert, for one
        raise InputError(f"input {name} is not usable JSON: {e}") from None
    except RecursionError:
        raise InputError(f"input {name} is nested too deeply to be a payload") from None


def report_run(handle: Any, wait: bool, timeout: float, as_json: bool, *,
               ok: Sequence[str]) -> None:
    """What ``replay``, ``resume``, ``cancel`` and ``compensate`` print: what ``run`` prints
    for the run they started or continued; exit 1 if, waited for, it did not end ``ok``."""
    try:
        result = handle.wait(timeout) if wait else handle.result()
    except WaitTimeout as e:
        result = replace(handle.result(), error=str(e))
    echo_result(handle.info().workflow, result, as_json)
    if wait and result.status.value not in ok:
        sys.exit(EXIT_RUN_FAILED)


def wait_all(handles: Sequence[Any], timeout: float, label: str) -> list[Any]:
    """Wait for every run, with a progress bar on a terminal; a run still going after
    ``timeout`` seconds in all is reported as it stands."""
    deadline = time.monotonic() + timeout
    results = []
    with click.progressbar(length=len(handles), label=label, file=sys.stderr) as bar:
        for handle in handles:
            try:
                results.append(handle.wait(max(0.001, deadline - time.monotonic())))
            except WaitTimeout as e:
                results.append(replace(handle.result(), error=str(e)))
            bar.update(1)
    return results


def fleet_agents(p: Pipeline) -> dict[str, Any]:
    """Every agent this process imports or a worker of the fleet published (its card)."""
    return known_agents(p.store.redis, agents)
