"""The app of tests/e2e/test_python.py: every return convention, HTTPError, failing handlers,
request fields, a request kept past its response, and lifecycle hooks.

Shutdown hooks append a line to the file named by $METRONOME_E2E_SHUTDOWN_MARKER (if set).
"""

import asyncio
import os

import metronome

app = metronome.App()

startup_calls = []
kept = []


@app.on_startup
def _first_startup():
    startup_calls.append("first")


@app.on_startup
def _second_startup():
    startup_calls.append("second")


def _mark(text):
    path = os.environ.get("METRONOME_E2E_SHUTDOWN_MARKER")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


@app.on_shutdown
def _first_shutdown():
    _mark("first registered (runs last)")


@app.on_shutdown
def _second_shutdown():
    _mark(f"second registered (runs first); requests kept: {len(kept)}")


@app.on_startup
async def _async_startup():
    await asyncio.sleep(0)
    startup_calls.append("async")


@app.get("/hooks")
def hooks(req):
    return {"startup": startup_calls}


# --- async handlers ------------------------------------------------------------------------

@app.get("/async/json")
async def async_json(req):
    return {"async": True, "path": req.path}


@app.get("/async/users/{id:int}")
async def async_user(req, id):
    await asyncio.sleep(0.002)  # a real wait on the lane's event loop
    return {"id": id, "plugin": req.state.get("async_plugin")}


@app.get("/async/gather")
async def async_gather(req):
    async def part(n):
        await asyncio.sleep(0.001 * n)
        return n
    return await asyncio.gather(*(part(n) for n in range(5)))


@app.get("/async/http-error")
async def async_http_error(req):
    await asyncio.sleep(0)
    raise metronome.HTTPError(418, "I'm a teapot")


@app.get("/async/raise")
async def async_raise(req):
    await asyncio.sleep(0)
    raise ValueError("async handler fails on purpose: E2E-ASYNC")


# --- return conventions -------------------------------------------------------------------

@app.get("/conv/dict")
def conv_dict(req):
    return {"kind": "dict", "n": [1, 2.5, None, True, False], "u": "é😀", "big": 2**70}


@app.get("/conv/list")
def conv_list(req):
    return [1, "two", {"three": 3}, [], {}]


@app.get("/conv/str")
def conv_str(req):
    return "plain text é"


@app.get("/conv/bytes")
def conv_bytes(req):
    return b"\x00\x01binary\xff"


@app.get("/conv/bytearray")
def conv_bytearray(req):
    return bytearray(b"bytearray body")


@app.get("/conv/memoryview")
def conv_memoryview(req):
    return memoryview(b"memoryview body")


@app.get("/conv/none")
def conv_none(req):
    return None


@app.get("/conv/response")
def conv_response(req):
    return metronome.Response("custom", status=202, headers={"X-Custom": "1"}, content_type="text/x-custom")


@app.get("/conv/response-json")
def conv_response_json(req):
    return metronome.Response.json({"a": 1}, status=201, headers=[("X-A", "1"), ("X-A", "2")])


@app.get("/conv/response-html")
def conv_response_html(req):
    return metronome.Response.html("<h1>hi</h1>")


@app.get("/conv/response-stream")
def conv_response_stream(req):
    return metronome.Response(iter(["a", b"b", "c"]), status=206, content_type="text/event-stream")


@app.get("/conv/tuple2")
def conv_tuple2(req):
    return "created", 201


@app.get("/conv/tuple3")
def conv_tuple3(req):
    return {"ok": True}, 202, [("X-One", "1"), ("X-Two", "2")]


@app.get("/conv/tuple3-ctype")
def conv_tuple3_ctype(req):
    return "a,b\n", 200, {"Content-Type": "text/csv"}


@app.get("/conv/generator")
def conv_generator(req):
    def gen():
        yield "text part\n"
        yield b"bytes part\n"
        yield ""  # an empty part must not end the body early
        yield "last part\n"
    return gen()


@app.get("/conv/large")
def conv_large(req):
    return "0123456789" * 10000  # 100 kB: sent in place, not copied next to the fields


@app.get("/conv/unsupported")
def conv_unsupported(req):
    return object()


@app.get("/conv/bad-status")
def conv_bad_status(req):
    return "x", 42


@app.get("/conv/nan")
def conv_nan(req):
    return {"x": float("nan")}


@app.get("/conv/bad-stream-first")
def conv_bad_stream_first(req):
    def gen():
        raise ValueError("the stream fails before its first part")
        yield "never"
    return gen()


@app.get("/conv/bad-stream")
def conv_bad_stream(req):
    def gen():
        yield "ok\n"
        raise ValueError("the stream fails on purpose")
    return gen()


@app.get("/conv/header-injection")
def conv_header_injection(req):
    return "x", 200, {"X-Bad": "a\r\nX-Injected: yes", "X-Good": "ok"}


@app.get("/conv/ctype-injection")
def conv_ctype_injection(req):
    return metronome.Response("x", content_type="text/plain\r\nX-Injected: yes")


@app.get("/conv/ctype-header-injection")
def conv_ctype_header_injection(req):
    return "x", 200, {"Content-Type": "text/plain\r\nX-Injected: yes"}


# --- errors -------------------------------------------------------------------------------

@app.get("/err/teapot")
def err_teapot(req):
    raise metronome.HTTPError(418, "I'm a teapot")


@app.get("/err/dict")
def err_dict(req):
    raise metronome.HTTPError(422, {"error": "invalid", "field": "name"})


@app.get("/err/none")
def err_none(req):
    raise metronome.HTTPError(404)


@app.get("/err/headers")
def err_headers(req):
    raise metronome.HTTPError(401, "login first", headers={"WWW-Authenticate": "Bearer"})


@app.get("/err/bad-status")
def err_bad_status(req):
    raise metronome.HTTPError(42, "not a status")


@app.get("/boom")
def boom(req):
    raise RuntimeError("e2e handler fails on purpose: SECRET-E2E-TOKEN")


@app.get("/keyerror")
def keyerror(req):
    return {}["missing-key-E2E"]


# --- the request --------------------------------------------------------------------------

@app.route("/info/{name}/{id:int}/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def info(req, name, id, rest):
    return {
        "method": req.method,
        "path": req.path,
        "raw_path": req.raw_path,
        "target": req.target,
        "query_string": req.query_string,
        "query": req.query.multi_items(),
        "headers": {k: req.headers.getall(k) for k in req.headers},
        "params": req.params,
        "args": [name, id, rest, type(id).__name__],
        "http_version": req.http_version,
        "body": req.body.decode("latin-1"),
        "client": list(req.client),
    }


@app.post("/echo-json")
def echo_json(req):
    return req.json()


@app.post("/echo-text")
def echo_text(req):
    return req.text()


@app.post("/keep/{id:int}")
def keep(req, id):
    kept.append(req)  # read nothing now: every field must still be there later
    return "kept"


@app.get("/kept")
def kept_fields(req):
    k = kept[-1]
    return {
        "method": k.method,
        "path": k.path,
        "query": k.query.multi_items(),
        "agent": k.headers.get("user-agent"),
        "params": k.params,
        "text": k.text(),
        "json": k.json(),
        "same": k is not req,
    }
