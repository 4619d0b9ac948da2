"""``pipeline worker``, ``pipeline flower`` and ``pipeline demo``: the pipeline's processes,
from any directory.

``worker`` and ``flower`` are thin wrappers that replace themselves with
``celery -A pipeline.worker ...`` (signals go straight to Celery): a worker of the agents in
``PIPELINE_AGENT_MODULES`` (with ``--beat``, also the sweeper's schedule, kept under
``PIPELINE_DATA_DIR``), and Flower with the package's ``flowerconfig``, which refuses to
start without ``FLOWER_BASIC_AUTH``. ``demo`` starts and stops its own processes.
"""

from __future__ import annotations

import os
import sys
from importlib import resources

import click

from ..settings import Settings
from .demo import run_demo
from .group import main

CELERY = [sys.executable, "-m", "celery", "-A", "pipeline.worker"]


@main.command()
@click.option("--queues", "-Q", default=None,
              help="Comma-separated queues to serve (default: every agent's and `pipeline`).")
@click.option("--concurrency", "-c", type=click.IntRange(1), default=None,
              help="Pool processes (default: Celery's, one per CPU).")
@click.option("--beat", "-B", is_flag=True,
              help="Also run beat (the sweeper's schedule); one per deployment.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Node name (Celery's %h, %n apply).")
def worker(queues: str | None, concurrency: int | None, beat: bool, loglevel: str,
           hostname: str | None) -> None:
    """Run a worker of the agents in PIPELINE_AGENT_MODULES (celery -A pipeline.worker)."""
    argv = [*CELERY, "worker", "--loglevel", loglevel]
    if queues:
        argv += ["--queues", queues]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if hostname:
        argv += ["--hostname", hostname]
    if beat:
        argv += ["--beat", "--schedule", Settings.from_env().beat_schedule_path]
    _become(argv)


@main.command()
@click.option("--address", default=None, help="Listen here (default FLOWER_ADDRESS, else "
                                              "127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port (default FLOWER_PORT, else 5555).")
def flower(address: str | None, port: int | None) -> None:
    """Serve Flower for the fleet, with basic auth from FLOWER_BASIC_AUTH (else refused)."""
    if address:
        os.environ["FLOWER_ADDRESS"] = address
    if port:
        os.environ["FLOWER_PORT"] = str(port)
    conf = resources.files("pipeline").joinpath("flowerconfig.py")
    _become([*CELERY, "flower", f"--conf={conf}"])


def _become(argv: list[str]) -> None:
    """Replace this process with ``argv`` (stdout flushed first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@main.command()
@click.option("--input", "source", default=None, help="JSON list of payloads (default: the "
              "deployment's sample batch).")
@click.option("--concurrency", default=2, show_default=True, help="Worker pool processes.")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--flower", is_flag=True, help="Also start Flower (basic auth) and print its URL "
              "and credentials.")
@click.option("--hold", "hold_s", type=float, default=None,
              help="With --flower: keep Flower up this many seconds at the end (default: "
                   "until Enter on a terminal).")
def demo(source: str | None, concurrency: int, timeout: float, flower: bool,
         hold_s: float | None) -> None:
    """Start Redis (if needed) and a worker pool, run a batch, show the results."""
    run_demo(source=source, concurrency=concurrency, timeout_s=timeout, flower=flower,
             hold_s=hold_s)
