#!/usr/bin/env python3
"""Stand-in cloudflared for the tests (packaged as cloudflared_<v>_all.deb by
the testbed): records how it was started, then waits like a tunnel does.

Each start appends one JSON line to /var/lib/cloudflared-standin/runs.jsonl:
its pid, its arguments, and the sha256 of TUNNEL_TOKEN (never the token: the
tests check the token is in no file, log or command line)."""

import hashlib
import json
import os
import sys
import time

RECORD = "/var/lib/cloudflared-standin/runs.jsonl"


def main() -> int:
    token = os.environ.get("TUNNEL_TOKEN", "")
    os.makedirs(os.path.dirname(RECORD), exist_ok=True)
    entry = {
        "pid": os.getpid(),
        "argv": sys.argv[1:],
        "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
        "env_keys": sorted(os.environ),
        "started": time.time(),
    }
    with open(RECORD, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    if not token:
        print("cloudflared (stand-in): no TUNNEL_TOKEN in the environment", file=sys.stderr, flush=True)
        return 1
    print(f"cloudflared (stand-in) {'@VERSION@'}: {' '.join(sys.argv[1:])}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
