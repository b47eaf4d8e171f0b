"""Shared, framework-free logic for the peer apps (WSGI and ASGI).

Both peers serve exactly the routes of metronome's example app, with the same bodies and
status codes, so that the benchmark compares servers and not applications:

  GET  /plaintext       -> 200 "Hello, World!"                   text/plain
  GET  /json            -> 200 {"message": "Hello, World!"}      application/json (json.dumps)
  POST /echo            -> 200 json.dumps(json.loads(body))     application/json; invalid JSON -> 400
  GET  /users/{id:int}  -> 200 {"id": id}                        ([0-9]+, like Starlette's int)
  GET  /hog?ms=N        -> burns N ms of CPU in pure Python, then 200 "done"
  GET  /alloc?mb=N      -> allocates N MiB in Python objects, then 200 "done"
  anything else         -> 404 (a known path with the wrong method -> 405)

Only the standard library is used (Debian's /usr/bin/python3).
"""

import json
import re
import time
from urllib.parse import parse_qs

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

PLAINTEXT_BODY = b"Hello, World!"

_USER_RE = re.compile(r"^/users/([0-9]+)$")
_MAX_HOG_MS = 60_000
_MAX_ALLOC_MB = 1024


def _int_param(query, name):
    """Returns the int value of ?name=..., or None if missing or not an int."""
    values = parse_qs(query).get(name)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


def burn_cpu(ms):
    """Pure-Python busy loop until this thread has used `ms` ms of CPU time.

    thread_time() counts CPU actually consumed, so a hog costs N ms of CPU whatever the
    contention (its wall time can be longer on a busy machine)."""
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        for i in range(200):   # some bytecode between clock reads
            x += i
    return x


def allocate(mb):
    """Allocates `mb` MiB as Python objects (64 KiB bytearrays, zero-filled so the pages are
    really touched), keeps them alive until the end of the request, then drops them."""
    chunks = []
    for _ in range(mb * 16):
        chunks.append(bytearray(64 * 1024))
    return len(chunks)


def handle(method, path, query, read_body):
    """Routes one request. read_body() returns the request body as bytes (called only for
    /echo). Returns (status:int, content_type:str|None, body:bytes)."""
    if path == "/plaintext":
        if method != "GET":
            return 405, TEXT, b"Method Not Allowed"
        return 200, TEXT, PLAINTEXT_BODY
    if path == "/json":
        if method != "GET":
            return 405, TEXT, b"Method Not Allowed"
        return 200, JSON, json.dumps({"message": "Hello, World!"}).encode()
    if path == "/echo":
        if method != "POST":
            return 405, TEXT, b"Method Not Allowed"
        try:
            obj = json.loads(read_body())
        except (ValueError, UnicodeDecodeError):
            return 400, TEXT, b"invalid JSON"
        return 200, JSON, json.dumps(obj).encode()
    m = _USER_RE.match(path)
    if m:
        if method != "GET":
            return 405, TEXT, b"Method Not Allowed"
        return 200, JSON, json.dumps({"id": int(m.group(1))}).encode()
    if path == "/hog":
        ms = _int_param(query, "ms")
        if ms is None or ms < 0 or ms > _MAX_HOG_MS:
            return 400, TEXT, b"ms must be an int in [0, 60000]"
        burn_cpu(ms)
        return 200, TEXT, b"done"
    if path == "/alloc":
        mb = _int_param(query, "mb")
        if mb is None or mb < 0 or mb > _MAX_ALLOC_MB:
            return 400, TEXT, b"mb must be an int in [0, 1024]"
        allocate(mb)
        return 200, TEXT, b"done"
    return 404, TEXT, b"Not Found"
