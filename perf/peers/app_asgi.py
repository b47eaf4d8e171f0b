"""Raw ASGI 3 peer app: the metronome example routes (see app_common.py), no framework
(Debian 12 does not install Starlette by default; raw ASGI keeps the peer honest and fast).

Run by uvicorn: `python3 -m uvicorn app_asgi:app` with cwd = perf/peers."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app_common import handle  # noqa: E402


async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive):
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def app(scope, receive, send):
    kind = scope["type"]
    if kind == "lifespan":
        await _lifespan(receive, send)
        return
    if kind != "http":
        return
    method = scope["method"]
    body = b""
    if method == "POST" and scope["path"] == "/echo":
        body = await _read_body(receive)
    status, ctype, out = handle(
        method,
        scope["path"],
        scope.get("query_string", b"").decode("latin-1"),
        lambda: body,
    )
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", ctype.encode()),
                    (b"content-length", str(len(out)).encode())],
    })
    await send({"type": "http.response.body", "body": out})
