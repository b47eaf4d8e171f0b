"""Two handlers for GET /dup: `metronome check` and serve name both, with their file:line."""
import metronome

app = metronome.App()


@app.get("/dup")
def first(req):
    return "first"


@app.get("/dup")
def second(req):
    return "second"
