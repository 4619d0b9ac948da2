"""The archive: finished runs sealed into Delta Lake tables (the ``archive`` extra:
``deltalake`` and ``pyarrow``), so that a run is explainable long after Redis let it go.

Imported only where it is used: the rest of the pipeline runs without the extra.
"""

from .rows import SCHEMAS, TABLES, RunRows, run_rows
from .table import ArchivedRun, read_run, write_batch, written_batch

__all__ = ["SCHEMAS", "TABLES", "ArchivedRun", "RunRows", "read_run", "run_rows",
           "write_batch", "written_batch"]
