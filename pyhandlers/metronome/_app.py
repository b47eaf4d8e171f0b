"""The application object: routes and lifecycle hooks. Routing itself runs in C++."""

import asyncio
import functools
import inspect
import re
import threading

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


_lane = threading.local()


def _run_coroutine(coro):
    """Runs a coroutine to completion on this thread's own event loop (one per python lane,
    made on first use). The lane waits for it as it waits for a plain handler: an `await` on I/O
    holds up this lane only. When a budget stops it (BudgetExceeded, MemoryError) the task is
    cancelled and run until it has unwound, so its `finally` and `async with` blocks run."""
    loop = getattr(_lane, "loop", None)
    if loop is None:
        loop = _lane.loop = asyncio.new_event_loop()
    # A python lane's own loop is this thread's running loop (handlers run as its tasks); a
    # hook or plugin method run to completion here steps aside from it for the while.
    running = asyncio.events._get_running_loop()
    if running is not None:
        asyncio.events._set_running_loop(None)
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    finally:
        if not task.done():
            task.cancel()
            try:
                loop.run_until_complete(task)
            except BaseException:  # noqa: B036  the first exception is the one that counts
                pass
        if running is not None:
            asyncio.events._set_running_loop(running)


def sync_callable(fn):
    """fn itself, or, for an `async def` function, a plain function that runs it to completion
    (see _run_coroutine). Handlers, hooks and plugin methods may be either."""
    if not inspect.iscoroutinefunction(fn):
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _run_coroutine(fn(*args, **kwargs))

    return call


def sync_plugin(plugin):
    """Called by the python-plugin stage on the object it built: async on_request and
    on_response become plain methods."""
    for name in ("on_request", "on_response"):
        method = getattr(plugin, name, None)
        if method is not None and inspect.iscoroutinefunction(method):
            setattr(plugin, name, sync_callable(method))
    return plugin


def detect_interface(obj):
    """(interface, why) for python.interface: auto. A metronome.App is itself; an `async def`
    callable, or an object whose __call__ is `async def`, is ASGI; any other callable is WSGI."""
    if isinstance(obj, App):
        return "metronome", "a metronome.App"
    if inspect.iscoroutinefunction(obj):
        return "asgi", f"an async def callable ({type(obj).__name__})"
    call = getattr(obj, "__call__", None)
    if call is not None and not inspect.isfunction(obj) and inspect.iscoroutinefunction(call):
        return "asgi", f"a {type(obj).__module__}.{type(obj).__qualname__} with an async __call__"
    if callable(obj):
        return "wsgi", f"a callable that is not async ({type(obj).__module__}.{type(obj).__qualname__})"
    return None, f"a {type(obj).__name__}, which is not callable"


class App:
    """Collects routes and hooks.

        app = metronome.App()

        @app.get("/items/{id:int}")
        def item(req, id): ...

        @app.route("/things", methods=["GET", "POST"], cpu_budget="200ms", heavy=True)
        def things(req): ...

    Handlers may be `async def`: each python lane runs them as tasks on its own event loop, so
    a handler that awaits lets the lane serve others meanwhile.
    Path parameters: {name} (one segment, str), {name:int} (int), {name:path} (the rest).
    Per-route budgets: cpu_budget (seconds or "50ms"), memory_budget (bytes or "64MiB");
    heavy=True marks a route as heavy (see the budgets in README).
    """

    def __init__(self, errors="text"):
        if errors not in ("text", "json"):
            raise ValueError(f"App(errors=...): 'text' or 'json', not {errors!r}")
        # The form of the server's own error answers (404, 405, 500, budget 503s, 400s...).
        self.errors = errors
        self._routes = []
        self._startup = []
        self._shutdown = []
        self._error_handlers = {}

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
            # An `async def` handler stays one: the server runs its coroutine as a task on the
            # lane's event loop (concurrent with the lane's other tasks).
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

    def error(self, status):
        """Registers fn(req, status) for the server's own answers with that status (404 and 405
        from routing, 500 for an exception, 503 for a budget, OPTIONS as 204): it returns what a
        handler returns; a plain body keeps the status.

            @app.error(404)
            def not_found(req, status):
                return {"error": "no such page", "path": req.path}
        """
        status = int(status)

        def register(fn):
            self._error_handlers[status] = fn
            return fn

        return register

    def error_handlers(self):
        return dict(self._error_handlers)

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
            sync_callable(fn)()

    def shutdown(self):
        for fn in reversed(self._shutdown):
            sync_callable(fn)()


# Called by the server when it loads the routes (at start-up, and by `metronome check`).
def _describe_route(fn, param_names):
    """("handler `name` at file:line", problem or None) for a route's function. The problem is
    why fn(req, **{name: value for each path parameter}) could never be called, which is how
    the server calls it (inspect's own binding rules: positional-or-keyword and keyword-only
    names, **kwargs takes any); None when it can be called, or when it has no signature to read
    (some built-ins: the call itself will tell)."""
    target = fn
    try:
        target = inspect.unwrap(fn)  # through sync_callable's and the app's own functools.wraps
    except ValueError:
        pass
    if isinstance(target, functools.partial):
        target = target.func
    name = getattr(target, "__qualname__", None) or repr(target)
    code = getattr(target, "__code__", None) or getattr(getattr(type(target), "__call__", None), "__code__", None)
    where = f"{code.co_filename}:{code.co_firstlineno}" if code is not None else "(no source file)"
    label = f"handler `{name}` at {where}"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return label, None
    try:
        sig.bind(None, **{p: None for p in param_names})
    except TypeError as e:
        called = ", ".join(["req"] + [f"{p}=..." for p in param_names])
        return label, f"it is called as {name}({called}), which its signature {sig} refuses: {e}"
    return label, None
