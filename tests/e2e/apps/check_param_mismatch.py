"""A handler that does not take its route's path parameter: /u/{id} with def user(req)."""
import metronome

app = metronome.App()


@app.get("/ok/{name}")
def takes_kwargs(req, **params):
    return params


@app.get("/kw/{id:int}")
def keyword_only(req, *, id):
    return {"id": id}


@app.get("/u/{id}")
def user(req):
    return "never called with id"
