#!/usr/bin/env python3
"""Cross-instance revocation delay (standard library only).

  revocation_delay.py A_ADMIN_URL B_URL ADMIN_TOKEN SAMPLES [LABEL]

Two gateways sharing one Redis (or Redis Cluster) and one database. For each
sample: a session is created through A's admin API, B is asked for it until
it answers 200 (so that B, with a local cache, holds a copy), the session is
revoked through A's admin API (DELETE /v1/sessions/{id}), and from the moment
that call has answered, B is asked again and again (one keep-alive
connection, no pause) until it answers 401. The delay of a sample is the time
from the revoke call's answer to B's first 401; "stale" counts B's 200s after
the revoke call had answered. Prints one line:

  LABEL samples=N p50_ms=.. p99_ms=.. max_ms=.. stale_answers=.. samples_with_stale=..
  first_poll_ms=..

(first_poll_ms: the median time of one request to B, the resolution of the
figure). Exits 1 if a sample stays served for 10 s, or on any other answer
than 200/401.
"""

import http.client
import json
import statistics
import sys
import time
import urllib.parse


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    a_admin, b_url, token, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    label = sys.argv[5] if len(sys.argv) > 5 else "revocation"
    a = urllib.parse.urlsplit(a_admin)
    b = urllib.parse.urlsplit(b_url)
    admin = http.client.HTTPConnection(a.hostname, a.port, timeout=10)
    client = http.client.HTTPConnection(b.hostname, b.port, timeout=10)
    auth = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}

    def b_status(session_token):
        client.request("GET", "/", headers={"Cookie": "sg_session=" + session_token})
        resp = client.getresponse()
        resp.read()
        return resp.status

    delays, polls, stale, stale_samples = [], [], 0, 0
    for i in range(samples):
        admin.request("POST", "/v1/sessions", body=json.dumps({"user_id": f"rev-{i}"}), headers=auth)
        resp = admin.getresponse()
        body = resp.read()
        if resp.status != 201:
            sys.exit(f"create: HTTP {resp.status}: {body[:200]!r}")
        created = json.loads(body)
        for _ in range(2):
            status = b_status(created["token"])
            if status != 200:
                sys.exit(f"B answered {status} for a new session")
        admin.request("DELETE", f"/v1/sessions/{created['id']}", headers=auth)
        resp = admin.getresponse()
        resp.read()
        if resp.status != 204:
            sys.exit(f"revoke: HTTP {resp.status}")
        returned = time.perf_counter()
        served = 0
        while True:
            sent = time.perf_counter()
            status = b_status(created["token"])
            now = time.perf_counter()
            polls.append(now - sent)
            if status == 401:
                break
            if status != 200:
                sys.exit(f"B answered {status}")
            served += 1
            if now - returned > 10:
                sys.exit("B still served a revoked session 10 s after the revoke call answered")
        delays.append(now - returned)
        stale += served
        stale_samples += served > 0

    delays.sort()
    ms = lambda s: f"{s * 1000:.2f}"  # noqa: E731
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(
        f"{label} samples={len(delays)} p50_ms={ms(statistics.median(delays))} p99_ms={ms(p99)} "
        f"max_ms={ms(delays[-1])} stale_answers={stale} samples_with_stale={stale_samples} "
        f"first_poll_ms={ms(statistics.median(polls))}"
    )


if __name__ == "__main__":
    main()
