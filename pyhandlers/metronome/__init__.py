"""metronome: write HTTP handlers in Python; the C++ server does the rest.

    import metronome
    app = metronome.App()

    @app.get("/users/{id:int}")
    def user(req, id):
        return {"id": id}

A handler gets the request (metronome.Request) and its path parameters as keyword arguments,
and returns a dict or list (JSON), a str (text), bytes, None (204), a metronome.Response, a
(body, status[, headers]) tuple, or an iterator of str/bytes (streamed with chunked framing).
Raise metronome.HTTPError(status, detail) for an error response.
"""

from ._app import App
from ._http import BudgetExceeded, Headers, HTTPError, MultiDict, Response

try:
    import _metronome as _native  # built into the metronome binary
except ImportError:  # imported outside the server (tools, tests of the package itself)
    _native = None

if _native is not None:
    Request = _native.Request
    json_dumps = _native.json_dumps
    json_loads = _native.json_loads
    _native._set_helpers(Headers=Headers, MultiDict=MultiDict, HTTPError=HTTPError,
                         BudgetExceeded=BudgetExceeded, Response=Response)
else:
    import json as _json

    Request = None

    def json_dumps(obj):
        return _json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    def json_loads(data):
        return _json.loads(data)

__all__ = ["App", "BudgetExceeded", "Headers", "HTTPError", "MultiDict", "Request", "Response",
           "json_dumps", "json_loads"]
