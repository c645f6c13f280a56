"""The ceiling for bench/webhook_load.py: a bare aiohttp server that reads a POST's body, checks
its X-Hub-Signature-256 (the receiver's own constant-time check) and answers 200, nothing else:
no parsing, no database. Same event loop (uvloop) and access log (none) as `whatsapp-worker
webhook`. Prints `listening <port>` once bound; stops on SIGTERM.

    python -m bench.webhook_bare --secret S [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web

from worker.webhook.parse import signature_ok


def app(secret: str) -> web.Application:
    async def notification(request: web.Request) -> web.Response:
        body = await request.read()
        if not signature_ok(secret, body, request.headers.get("X-Hub-Signature-256", "")):
            return web.Response(status=403, text="bad signature")
        return web.Response(text="ok")

    application = web.Application(client_max_size=1_048_576)
    application.router.add_post("/webhook", notification)
    return application


async def serve(secret: str, port: int) -> None:
    runner = web.AppRunner(app(secret), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"listening {runner.addresses[-1][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secret", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.secret, args.port))


if __name__ == "__main__":
    main()
