"""An app for the developer-experience tests: logging, request ids."""
import logging

import metronome

app = metronome.App()
log = logging.getLogger("devx")


@app.get("/log")
def log_something(req):
    log.info("an info line from the app %s", req.request_id)
    log.warning("a warning line from the app")
    log.debug("a debug line nobody sees at level info")
    return {"request_id": req.request_id}


@app.get("/slow")
def slow(req):
    x = 0
    while True:
        x += 1
