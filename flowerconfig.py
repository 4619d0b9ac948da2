"""Flower settings: never serve it without authentication.

Set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH with an OAuth provider);
``celery -A config flower``, run from the project directory, reads this file
(Flower's default ``--conf``) and refuses to start without one.
"""

import os

basic_auth = [a for a in os.environ.get("FLOWER_BASIC_AUTH", "").split(",") if a]
if not basic_auth and not os.environ.get("FLOWER_AUTH"):
    raise SystemExit("refusing to start Flower without authentication: set FLOWER_BASIC_AUTH")
port = int(os.environ.get("FLOWER_PORT", "5555"))
address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
