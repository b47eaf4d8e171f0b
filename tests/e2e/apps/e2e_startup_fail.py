"""An app whose on_startup hook raises: the server must not start."""

import metronome

app = metronome.App()


@app.get("/never")
def never(req):
    return "never served"


@app.on_startup
def fail():
    raise RuntimeError("startup hook fails on purpose: E2E-STARTUP")
