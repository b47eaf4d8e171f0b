"""GET /clash here and as a native route in the config (tests/e2e/test_check.py)."""
import metronome

app = metronome.App()


@app.get("/ok")
def ok(req):
    return "ok"


@app.get("/clash")
def clash(req):
    return "python"
