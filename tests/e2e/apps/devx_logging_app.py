"""An app that configures logging itself: the server keeps its handlers."""
import logging
import sys

import metronome

logging.basicConfig(stream=sys.stdout, format="APP-OWN %(levelname)s %(message)s", level=logging.INFO)
app = metronome.App()


@app.get("/log")
def log_something(req):
    logging.getLogger("own").info("configured by the app")
    return "ok"
