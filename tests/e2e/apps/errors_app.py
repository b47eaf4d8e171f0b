"""An app with JSON errors and error handlers, for test_devx."""
import metronome

app = metronome.App(errors="json")


@app.get("/items/{id:int}")
def item(req, id):
    return {"id": id}


@app.post("/items/{id:int}")
def update(req, id):
    return {"updated": id}


@app.get("/boom")
def boom(req):
    raise RuntimeError("on purpose")


@app.error(404)
def not_found(req, status):
    return {"error": "no such page", "path": req.path, "status": status}
