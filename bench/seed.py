#!/usr/bin/env python3
"""Seeds sessions for bench/load.sh (Python standard library only).

  seed.py gateway ADMIN_URL ADMIN_TOKEN COUNT OUT [PARALLEL] [USER_PREFIX]
      POST /v1/sessions COUNT times on a sessiongate admin API (PARALLEL
      keep-alive connections, default 8), one distinct user per session (so
      the max-sessions policy evicts nothing), and writes "token<TAB>user"
      lines to OUT. Exits 1 on the first failure.

  seed.py redis COUNT OUT USER_PREFIX > commands.resp
      Writes the RESP protocol for `SET sg:sess:<token> <user>` (the Lua peer's
      key layout) to stdout, for `redis-cli --pipe`, and "token<TAB>user"
      lines to OUT. Tokens have the same shape as sessiongate's (64
      characters of base64url), so the cookie headers are the same size.
"""

import http.client
import json
import secrets
import sys
import threading
import time
import urllib.parse


def seed_gateway(admin_url, admin_token, count, out, parallel=8, prefix="load"):
    url = urllib.parse.urlsplit(admin_url)
    lock = threading.Lock()
    next_index = [0]
    results = [None] * count
    errors = []

    def worker():
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        headers = {
            "Authorization": "Bearer " + admin_token,
            "Content-Type": "application/json",
        }
        while True:
            with lock:
                if errors or next_index[0] >= count:
                    break
                i = next_index[0]
                next_index[0] += 1
            user = f"{prefix}-{i}"
            body = json.dumps({"user_id": user})
            try:
                conn.request("POST", "/v1/sessions", body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
                results[i] = (json.loads(data)["token"], user)
            except Exception as e:  # noqa: BLE001 - report and stop
                with lock:
                    errors.append(f"session {i}: {e}")
                break
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("seed.py: " + errors[0], file=sys.stderr)
        sys.exit(1)
    with open(out, "w") as f:
        for token, user in results:
            f.write(f"{token}\t{user}\n")
    elapsed = time.monotonic() - started
    print(f"seed.py: {count} sessions in {elapsed:.1f} s ({count / elapsed:.0f}/s)", file=sys.stderr)


def resp(*args):
    parts = [f"*{len(args)}\r\n"]
    for a in args:
        b = a.encode()
        parts.append(f"${len(b)}\r\n{a}\r\n")
    return "".join(parts)


def seed_redis(count, out, prefix):
    w = sys.stdout
    with open(out, "w") as f:
        for i in range(count):
            token = secrets.token_urlsafe(48)  # 64 characters, like sessiongate's
            user = f"{prefix}-{i}"
            w.write(resp("SET", "sg:sess:" + token, user))
            f.write(f"{token}\t{user}\n")


def main(argv):
    if len(argv) >= 5 and argv[0] == "gateway":
        parallel = int(argv[5]) if len(argv) > 5 else 8
        prefix = argv[6] if len(argv) > 6 else "load"
        seed_gateway(argv[1], argv[2], int(argv[3]), argv[4], parallel, prefix)
    elif len(argv) == 4 and argv[0] == "redis":
        seed_redis(int(argv[1]), argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
