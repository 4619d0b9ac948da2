"""Flower settings: never serve it without authentication.

Set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH with an OAuth provider);
``pipeline flower`` hands this file to Flower (``--conf``) from any directory, and
Flower then refuses to start without credentials. It listens on FLOWER_ADDRESS
(127.0.0.1) and FLOWER_PORT (5555).
"""

import os

basic_auth = [a for a in os.environ.get("FLOWER_BASIC_AUTH", "").split(",") if a]
if not basic_auth and not os.environ.get("FLOWER_AUTH"):
    raise SystemExit("refusing to start Flower without authentication: set FLOWER_BASIC_AUTH")
# "ops:" or ":" would let anyone in with an empty password: name the entry, never its secret.
for number, entry in enumerate(basic_auth, 1):
    user, _, password = entry.partition(":")
    if not user or not password:
        raise SystemExit(f"refusing to start Flower: entry {number} of FLOWER_BASIC_AUTH is not "
                         "user:password with both parts set")
port = int(os.environ.get("FLOWER_PORT", "5555"))
address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
