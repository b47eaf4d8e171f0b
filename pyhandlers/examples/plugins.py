"""Example stage plugins (see configs/examples/plugins.yaml).

A plugin is a class named in the pipeline as `{stage: python-plugin, plugin: "module:Class",
config: {...}}`; it is built with its config mapping. on_request(req) runs on the plugin's own
thread before the handler and may answer early by returning a response; on_response(req, resp)
runs after the handler and may change the response.
"""

import hmac
import threading

import metronome


class ApiKeyAuth:
    """Answers 401 unless the request carries a configured key in a header (default X-Api-Key).

    config: {keys: [...], header: X-Api-Key, public: ["/plaintext", ...]}
    """

    def __init__(self, config):
        self.keys = [str(k) for k in config.get("keys", [])]
        self.header = config.get("header", "X-Api-Key")
        self.public = set(config.get("public", []))

    def on_request(self, req):
        if req.path in self.public:
            return None
        given = req.headers.get(self.header)
        if given is not None and any(hmac.compare_digest(given, k) for k in self.keys):
            req.state["api_key"] = given
            return None
        return metronome.Response.json({"error": "missing or invalid API key"}, status=401,
                                       headers={"WWW-Authenticate": self.header})

    def on_response(self, req, resp):
        return None


class RequestCounter:
    """Counts requests per path and adds an X-Request-Count field to every response.

    config: {header: X-Request-Count}
    """

    def __init__(self, config):
        self.header = config.get("header", "X-Request-Count")
        self.counts = {}
        self.lock = threading.Lock()  # on_request and on_response run on different threads

    def on_request(self, req):
        with self.lock:
            self.counts[req.path] = self.counts.get(req.path, 0) + 1
        return None

    def on_response(self, req, resp):
        with self.lock:
            n = self.counts.get(req.path, 0)
        resp.set_header(self.header, n)
        return resp


class Cors:
    """CORS for the routes behind it, as a plugin: it answers preflights (OPTIONS with an
    Access-Control-Request-Method) itself, and adds Access-Control-Allow-Origin to every
    response for an allowed origin — errors included, since the server hands its own 404, 405
    and 500 answers to plugins too.

        - {stage: python-plugin, name: cors, plugin: "examples.plugins:Cors",
           config: {origins: ["https://app.example"], max_age: 600}}
    """

    def __init__(self, config):
        self.origins = set(config.get("origins", []))
        self.any_origin = "*" in self.origins
        self.max_age = int(config.get("max_age", 600))
        self.headers = ", ".join(config.get("headers", ["Content-Type", "Authorization"]))

    def _allowed(self, origin):
        return origin is not None and (self.any_origin or origin in self.origins)

    def on_request(self, req):
        origin = req.headers.get("Origin")
        if req.method == "OPTIONS" and req.headers.get("Access-Control-Request-Method") and self._allowed(origin):
            return metronome.Response(b"", status=204, headers=[
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", self.headers),
                ("Access-Control-Max-Age", str(self.max_age)),
                ("Vary", "Origin"),
            ])
        return None

    def on_response(self, req, resp):
        origin = req.headers.get("Origin")
        if self._allowed(origin):
            resp.set_header("Access-Control-Allow-Origin", origin)
            resp.set_header("Vary", "Origin")
