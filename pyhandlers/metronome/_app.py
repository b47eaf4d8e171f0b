"""The application object: routes and lifecycle hooks. Routing itself runs in C++."""

import re

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _seconds(value, what):
    """A budget as seconds: a number of seconds or a string with a unit ("50ms", "2s")."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)\s*", str(value))
    if not m:
        raise ValueError(f"{what}: expected seconds or a duration like '50ms', got {value!r}")
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def _bytes(value, what):
    """A memory budget as bytes: an int or a string with a unit ("64MiB")."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)\s*", str(value))
    if not m:
        raise ValueError(f"{what}: expected bytes or a size like '64MiB', got {value!r}")
    return int(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


class App:
    """Collects routes and hooks.

        app = metronome.App()

        @app.get("/items/{id:int}")
        def item(req, id): ...

        @app.route("/things", methods=["GET", "POST"], cpu_budget="200ms", heavy=True)
        def things(req): ...

    Path parameters: {name} (one segment, str), {name:int} (int), {name:path} (the rest).
    Per-route budgets: cpu_budget (seconds or "50ms"), memory_budget (bytes or "64MiB");
    heavy=True marks a route as heavy (see the budgets in README).
    """

    def __init__(self):
        self._routes = []
        self._startup = []
        self._shutdown = []

    def route(self, path, methods=("GET",), *, cpu_budget=None, memory_budget=None, heavy=False):
        if isinstance(methods, str):
            methods = [methods]
        methods = [m.upper() for m in methods]
        for m in methods:
            if m not in _METHODS:
                raise ValueError(f"route {path}: unsupported method {m!r} (HEAD is served by GET)")
        if not path.startswith("/"):
            raise ValueError(f"route {path!r}: must start with '/'")
        options = {
            "cpu_budget": _seconds(cpu_budget, f"route {path} cpu_budget"),
            "memory_budget": _bytes(memory_budget, f"route {path} memory_budget"),
            "heavy": bool(heavy),
        }

        def register(fn):
            for m in methods:
                self._routes.append((m, path, fn, options))
            return fn

        return register

    def get(self, path, **kw):
        return self.route(path, ["GET"], **kw)

    def post(self, path, **kw):
        return self.route(path, ["POST"], **kw)

    def put(self, path, **kw):
        return self.route(path, ["PUT"], **kw)

    def patch(self, path, **kw):
        return self.route(path, ["PATCH"], **kw)

    def delete(self, path, **kw):
        return self.route(path, ["DELETE"], **kw)

    def on_startup(self, fn):
        """Registers fn() to run once before the server answers (on the python stage's thread)."""
        self._startup.append(fn)
        return fn

    def on_shutdown(self, fn):
        """Registers fn() to run once when the server stops, after the last request."""
        self._shutdown.append(fn)
        return fn

    # Called by the server.
    def routes(self):
        return list(self._routes)

    def startup(self):
        for fn in self._startup:
            fn()

    def shutdown(self):
        for fn in reversed(self._shutdown):
            fn()
