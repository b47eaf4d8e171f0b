"""The app of tests/e2e/test_streaming.py: streamed bodies that wait for the test, big ones, endless
ones, failing ones, ones with a declared length, and handlers that try to set framing fields.

A stream that takes ?id=NAME records what happened to it in EVENTS[NAME] (items produced, whether
its `finally` or close() ran); GET /events?id=NAME reports it. Every handler runs on the one
python lane, so the dict needs no lock.
"""

import os
import time

import metronome

app = metronome.App()

EVENTS = {}

# A step that waits for the test (a file to appear) must not be stopped by the CPU budget, which
# is per step and counts wall time.
WAIT_BUDGET = "30s"
# How long a waiting step waits at most for its file (the test fails its own read before that).
WAIT_MAX_S = 10.0


def _events(req):
    name = req.query.get("id")
    if name is None:
        return {}
    return EVENTS.setdefault(name, {"items": 0, "finally": False, "closed": False, "exit": None})


def _wait_for_file(path):
    deadline = time.monotonic() + WAIT_MAX_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def burn(ms):
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        pass


@app.get("/json")
def json_hello(req):
    return {"message": "Hello, World!"}


@app.get("/events")
def events(req):
    return EVENTS.get(req.query.get("id"), {})


# --- chunks leave as they are produced ------------------------------------------------------

@app.get("/wait", cpu_budget=WAIT_BUDGET)
def wait(req):
    """"a", then (once the file ?file= exists) "b"."""
    path = req.query["file"]

    def gen():
        yield "a"
        _wait_for_file(path)
        yield "b"
    return gen()


@app.get("/sse", cpu_budget=WAIT_BUDGET)
def sse(req):
    path = req.query["file"]

    def gen():
        yield "data: one\n\n"
        _wait_for_file(path)
        yield "data: two\n\n"
    return metronome.Response(gen(), content_type="text/event-stream")


# --- big and endless ------------------------------------------------------------------------

BIG_PART = 64 * 1024
BIG_PARTS = 640  # 40 MiB


def big_part(i):
    """Part i of /big: distinct per part, so a lost or repeated part changes the hash."""
    return i.to_bytes(4, "big") * (BIG_PART // 4)


@app.get("/big", cpu_budget=WAIT_BUDGET)
def big(req):
    ev = _events(req)

    def gen():
        try:
            for i in range(BIG_PARTS):
                ev["items"] = i + 1
                yield big_part(i)
        finally:
            ev["finally"] = True
    return gen()


@app.get("/endless")
def endless(req):
    """64 KiB parts (or ?size= bytes) until the server stops asking; ?sleep= seconds between."""
    ev = _events(req)
    size = int(req.query.get("size", str(BIG_PART)))
    pause = float(req.query.get("sleep", "0"))

    def gen():
        try:
            i = 0
            while True:
                ev["items"] = i + 1
                yield big_part(i)[:size] if size <= BIG_PART else b"x" * size
                i += 1
                if pause:
                    time.sleep(pause)
        except GeneratorExit:
            ev["exit"] = "GeneratorExit"
            raise
        finally:
            ev["finally"] = True
    return gen()


# --- cut short ------------------------------------------------------------------------------

@app.get("/raise-after-one")
def raise_after_one(req):
    def gen():
        yield "first part"
        raise RuntimeError("the stream fails after its first part: E2E-STREAM-RAISE")
    return gen()


@app.get("/burn-after-one", cpu_budget="50ms")
def burn_after_one(req):
    def gen():
        yield "first part"
        burn(2000)
        yield "never"
    return gen()


@app.get("/burn-before", cpu_budget="50ms")
def burn_before(req):
    def gen():
        burn(2000)
        yield "never"
    return gen()


# --- a declared Content-Length --------------------------------------------------------------

@app.get("/declared")
def declared(req):
    """Declares ?n= bytes and yields ?len= bytes ("0123456789..." in parts of ?part= bytes)."""
    n = req.query.get("n", "6")
    length = int(req.query.get("len", n))
    part = int(req.query.get("part", "2"))
    data = (b"0123456789" * (length // 10 + 1))[:length]

    def gen():
        for i in range(0, length, part):
            yield data[i:i + part]
    return metronome.Response(gen(), headers={"Content-Length": n})


# --- content types --------------------------------------------------------------------------

@app.get("/ct/bytes")
def ct_bytes(req):
    return iter([b"\x00\x01", b"\xff"])


@app.get("/ct/str")
def ct_str(req):
    return iter(["é", "x"])


@app.get("/ct/explicit")
def ct_explicit(req):
    return metronome.Response(iter(["a,b\n", "c,d\n"]), content_type="text/csv")


@app.get("/ct/explicit-header")
def ct_explicit_header(req):
    return metronome.Response(iter([b"<x/>"]), headers={"Content-Type": "application/xml"})


@app.get("/empty")
def empty(req):
    def gen():
        return
        yield "never"
    return gen()


# --- HEAD -----------------------------------------------------------------------------------

class Recorded:
    """An iterator that records being stepped and closed."""

    def __init__(self, ev):
        self.ev = ev
        self.left = 3

    def __iter__(self):
        return self

    def __next__(self):
        self.ev["items"] += 1
        if self.left == 0:
            raise StopIteration
        self.left -= 1
        return "part\n"

    def close(self):
        self.ev["closed"] = True


@app.get("/recorded")
def recorded(req):
    return Recorded(_events(req))


@app.get("/recorded-gen")
def recorded_gen(req):
    ev = _events(req)

    def gen():
        try:
            for _ in range(3):
                ev["items"] += 1
                yield "part\n"
        finally:
            ev["finally"] = True
    return gen()


# --- framing fields from the handler --------------------------------------------------------

FIELD_CASES = {
    "cl-wrong": lambda: metronome.Response(b"abc", headers={"Content-Length": "10"}),
    "cl-right": lambda: metronome.Response(b"abc", headers={"Content-Length": "3"}),
    "cl-right-lower": lambda: metronome.Response(b"abc", headers=[("content-length", "3"), ("CONTENT-LENGTH", "3")]),
    "cl-two-values": lambda: metronome.Response(b"abc", headers=[("Content-Length", "3"), ("Content-Length", "4")]),
    "cl-list": lambda: metronome.Response(b"abc", headers={"Content-Length": "3, 3"}),
    "cl-negative": lambda: metronome.Response(b"abc", headers={"Content-Length": "-3"}),
    "te-chunked": lambda: metronome.Response(b"abc", headers={"Transfer-Encoding": "chunked"}),
    "te-stream": lambda: metronome.Response(iter([b"abc"]), headers={"Transfer-Encoding": "gzip, chunked"}),
    "server-date": lambda: metronome.Response(b"abc", headers={"Server": "x", "Date": "y"}),
    "connection-close": lambda: metronome.Response(b"abc", headers={"Connection": "close"}),
    "connection-list": lambda: metronome.Response(b"abc", headers={"Connection": "keep-alive, Close"}),
    "connection-keep": lambda: metronome.Response(b"abc", headers={"Connection": "keep-alive", "Keep-Alive": "timeout=99"}),
    "value-crlf": lambda: metronome.Response(b"abc", headers={"X-Bad": "a\r\nX-Injected: yes"}),
    "value-lf": lambda: metronome.Response(b"abc", headers={"X-Bad": "a\nX-Injected: yes"}),
    "value-nul": lambda: metronome.Response(b"abc", headers={"X-Bad": "a\x00b"}),
    "name-space": lambda: metronome.Response(b"abc", headers={"X Bad": "v"}),
    "name-colon": lambda: metronome.Response(b"abc", headers={"X-Bad:": "v"}),
    "name-crlf": lambda: metronome.Response(b"abc", headers={"X-Bad\r\nX-Injected": "yes"}),
    "stream-crlf": lambda: metronome.Response(iter([b"abc"]), headers={"X-Bad": "a\r\nX-Injected: yes"}),
    "tuple-cl-wrong": lambda: ("abc", 200, {"Content-Length": "2"}),
}


@app.get("/fields/{case}")
def fields(req, case):
    return FIELD_CASES[case]()


# --- more edges -----------------------------------------------------------------------------

@app.get("/one-item", cpu_budget=WAIT_BUDGET)
def one_item(req):
    """One item of ?size= bytes (a pattern), then the end."""
    size = int(req.query.get("size", str(8 << 20)))
    ev = _events(req)

    def gen():
        try:
            ev["items"] = 1
            yield (b"0123456789abcdef" * (size // 16 + 1))[:size]
        finally:
            ev["finally"] = True
    return gen()


@app.get("/no-body-status")
def no_body_status(req):
    ev = _events(req)

    def gen():
        ev["items"] += 1
        yield "never on the wire"
    return metronome.Response(gen(), status=int(req.query.get("status", "204")))


@app.get("/bad-item")
def bad_item(req):
    def gen():
        yield "first part"
        yield 42
    return gen()


@app.get("/stream-close")
def stream_close(req):
    return metronome.Response(iter(["a", "b"]), headers={"Connection": "close"})


@app.get("/sse-endless")
def sse_endless(req):
    """An event every 20 ms until the server stops asking; the finally marks $STREAM_E2E_MARKER."""
    def gen():
        try:
            n = 0
            while True:
                yield f"data: {n}\n\n"
                n += 1
                time.sleep(0.02)
        finally:
            path = os.environ.get("STREAM_E2E_MARKER")
            if path:
                with open(path, "a") as f:
                    f.write("finally\n")
    return metronome.Response(gen(), content_type="text/event-stream")


@app.get("/burn-in-close", cpu_budget="50ms")
def burn_in_close(req):
    """Declares 1 byte and yields 2: the server cuts the stream and closes the generator, whose
    finally then burns CPU far past the budget (unless the budget stops it)."""
    ev = _events(req)

    def gen():
        try:
            yield b"ab"
        finally:
            ev["finally"] = True
            try:
                burn(2000)
            except metronome.BudgetExceeded:
                ev["exit"] = "BudgetExceeded"
    return metronome.Response(gen(), headers={"Content-Length": "1"})


class BurningClose:
    """An iterator whose close() burns CPU (HEAD closes it without stepping it)."""

    def __init__(self, ev):
        self.ev = ev

    def __iter__(self):
        return self

    def __next__(self):
        self.ev["items"] += 1
        return b"x"

    def close(self):
        self.ev["closed"] = True
        try:
            burn(2000)
        except metronome.BudgetExceeded:
            self.ev["exit"] = "BudgetExceeded"


@app.get("/burning-close", cpu_budget="50ms")
def burning_close(req):
    return BurningClose(_events(req))
