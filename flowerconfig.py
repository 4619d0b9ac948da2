"""Flower settings for this repository's deployment: ``celery -A config flower``, run from
the project directory, reads this file (Flower's default ``--conf``). They are the package's
own (``pipeline/flowerconfig.py``, which ``pipeline flower`` uses from any directory): never
serve Flower without authentication; set FLOWER_BASIC_AUTH=user:password.
"""

from pipeline.flowerconfig import address, basic_auth, port  # noqa: F401  (Flower reads them)
