"""The archive: finished runs sealed into Delta Lake tables, so that a run is explainable
long after Redis let it go.

``rows`` (a run as the tables' rows), ``table`` (a batch written once; a run read back),
``archiver`` (the backlog, batches, retention), ``recall`` (an archived run brought back to
Redis for every command to read) need the ``archive`` extra (``deltalake``, ``pyarrow``),
imported only by those modules; ``backlog`` reads Redis alone. This package's own import
loads neither.
"""
