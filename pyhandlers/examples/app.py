"""The example application served by configs/default.yaml.

The first six routes are fixed: the benchmarks (perf/) and outside checks rely on them.
"""

import time

import metronome

app = metronome.App()


@app.get("/plaintext")
def plaintext(req):
    return "Hello, World!"


@app.get("/json")
def json_hello(req):
    return {"message": "Hello, World!"}


@app.post("/echo")
def echo(req):
    return req.json()  # invalid JSON -> 400 (HTTPError raised by json())


@app.get("/users/{id:int}")
def user(req, id):
    return {"id": id}


@app.get("/hog", heavy=True)
def hog(req):
    """Burns ?ms=N milliseconds of CPU in pure Python."""
    ms = int(req.query.get("ms", "100"))
    end = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < end:
        n += 1
    return "done"


@app.get("/alloc", heavy=True)
def alloc(req):
    """Allocates ?mb=N MiB in Python objects (bytearrays of 64 KiB), then lets them go."""
    mb = int(req.query.get("mb", "1"))
    chunks = [bytearray(64 * 1024) for _ in range(mb * 16)]
    del chunks
    return "done"


# --- more of the API --------------------------------------------------------------------

@app.get("/hello/{name}")
def hello(req, name):
    return metronome.Response.text(f"Hello, {name}!")


@app.get("/files/{rest:path}")
def files(req, rest):
    return {"path": rest}


@app.get("/search")
def search(req):
    return {"q": req.query.get("q"), "tags": req.query.getall("tag")}


@app.post("/form")
def form(req):
    f = req.form()
    return {k: f.getall(k) for k in f}


@app.get("/headers")
def headers(req):
    return {"user-agent": req.headers.get("user-agent"), "client": list(req.client)}


@app.get("/redirect")
def redirect(req):
    return metronome.Response.redirect("/json")


@app.get("/teapot")
def teapot(req):
    raise metronome.HTTPError(418, "I'm a teapot")


@app.get("/created")
def created(req):
    return {"ok": True}, 201, {"X-Example": "yes"}


@app.get("/stream")
def stream(req):
    def parts():
        for i in range(3):
            yield f"part {i}\n"
    return parts()


@app.get("/boom")
def boom(req):
    raise RuntimeError("this handler fails on purpose")


started = []


@app.on_startup
def _started():
    started.append(time.time())


@app.get("/started")
def was_started(req):
    return {"startup_hooks_ran": len(started)}
