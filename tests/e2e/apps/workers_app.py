"""An app for the worker tests: who answers, a CPU burner, a C call that never checks for
signals, and a version read from a file (to see a reload's new code)."""
import os
import time

import metronome

app = metronome.App()
VERSION_FILE = os.environ.get("WORKERS_APP_VERSION_FILE", "")


def _version():
    if not VERSION_FILE:
        return "none"
    with open(VERSION_FILE) as f:
        return f.read().strip()


# Read at import: a reload (a new worker generation re-imports the app) shows the new value.
VERSION = _version()


@app.get("/pid")
def pid(req):
    return {"pid": os.getpid(), "version": VERSION}


@app.get("/burn")
def burn(req):
    end = time.process_time() + float(req.query.get("ms", "2")) / 1000
    while time.process_time() < end:
        pass
    return {"pid": os.getpid()}


@app.get("/stuck-in-c")
def stuck_in_c(req):
    return {"sum": sum(range(int(req.query.get("n", "10000000000"))))}


@app.get("/grow")
def grow(req):
    # Keeps memory across requests (a leak), so that RSS crosses server.max_rss.
    _leak.append(bytearray(int(req.query.get("mb", "8")) << 20))
    return {"pid": os.getpid(), "held_mb": sum(len(b) for b in _leak) >> 20}


_leak = []
