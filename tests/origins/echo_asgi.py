"""An h2c-capable origin for the security suite (tests/it/sec_origins.rs).

Hypercorn serves this ASGI app over HTTP/1.1, HTTP/1.1 with an
`Upgrade: h2c` to HTTP/2, and HTTP/2 with prior knowledge. Every request is
answered with a JSON echo of what the server decoded, and appended as one
JSON line to the file named by `--log`, so a test can tell what reached the
origin even when the answer went down a tunnel the test cannot read:

    {"method", "path", "raw_path", "query", "http_version",
     "headers": [[name, value], ...],   # as the ASGI server decoded them
     "environ": {"HTTP_X_USER_ID": "..."}}  # how CGI/WSGI would name them

A path ending in `/login` with `?user=U` also answers `x-sessiongate-login: U`.

Usage: python echo_asgi.py --log FILE
Binds 127.0.0.1 on a port the kernel picks and prints `PORT <n>` on stdout
once it listens. Stops on SIGTERM, SIGINT or SIGKILL (one process).
"""

import argparse
import asyncio
import json
import signal
import socket
import sys
from urllib.parse import parse_qs

from hypercorn.asyncio import serve
from hypercorn.config import Config


def _text(b):
    return b.decode("latin-1")


def environ_of(headers):
    # CGI/WSGI read a header name upper-cased with `-` as `_`: a client's
    # `X_User_Id` and the gateway's `x-user-id` land on the same key.
    environ = {}
    for name, value in headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = environ[key] + "," + value if key in environ else value
    return environ


def make_app(log_path):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        # Drain the body (bounded by what the test sends).
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        headers = [[_text(n), _text(v)] for n, v in scope["headers"]]
        seen = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": _text(scope.get("raw_path") or b""),
            "query": _text(scope.get("query_string") or b""),
            "http_version": scope["http_version"],
            "headers": headers,
            "environ": environ_of(headers),
        }
        line = json.dumps(seen)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")
        body = line.encode()
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-origin", b"hypercorn-echo"),
        ]
        if scope["path"].endswith("/login"):
            # Sessions begin through the upstream app (the contract's login).
            query = parse_qs(seen["query"])
            if query.get("user"):
                response_headers.append((b"x-sessiongate-login", query["user"][0].encode()))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": response_headers,
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.keep_alive_timeout = 30

    shutdown = asyncio.Event()

    async def run():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.set)
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        await serve(make_app(args.log), config, shutdown_trigger=shutdown.wait)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
