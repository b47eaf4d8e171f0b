"""A minimal app for the native-route benchmarks: the native /plaintext and /json routes come
from the config, so this app must not define them."""
import metronome

app = metronome.App()


@app.get("/py/json")
def py_json(req):
    return {"message": "Hello, World!"}
