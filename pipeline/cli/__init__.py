"""The ``pipeline`` command: the group and its output helpers, the commands by subject
(runs, the fleet, observing runs, processes), and the demo.

Importing this package registers every command on ``main``.
"""

from . import archive, fleet, observe, process, runs  # noqa: F401  (their commands register on main)
from .group import main

__all__ = ["main"]
