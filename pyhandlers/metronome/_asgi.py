"""The Python half of the server's ASGI support: the receive/send pair of a request, the
lifespan protocol driver, and shutting a lane's loop down. The stage in C++
(stages/py/asgi.cc) does the rest."""

import asyncio
import collections.abc


def register_coroutine_type(cls):
    """asyncio.create_task takes only coroutines: the server's budget wrapper is one."""
    collections.abc.Coroutine.register(cls)
    return True


def channel(call):
    """(receive, send) for one request; `call` is the server's _metronome.AsgiCall."""
    native_receive = call.receive
    native_send = call.send

    async def receive():
        message = native_receive()
        if type(message) is dict:
            return message
        return await message

    async def send(message):
        waiter = native_send(message)
        if waiter is not None:
            await waiter  # backpressure: the client is slow

    return receive, send


class Lifespan:
    """Runs the app's lifespan scope: startup before the server answers, shutdown after."""

    def __init__(self, app, loop):
        self.app = app
        self.state = {}
        self.supported = True
        self._queue = asyncio.Queue()
        self._startup = loop.create_future()
        self._shutdown = loop.create_future()
        self._task = loop.create_task(self._run())

    async def _run(self):
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as e:  # noqa: BLE001 - an app that does not do lifespan raises here
            why = f"{type(e).__name__}: {e}"
            if not self._startup.done():
                self.supported = False
                self._startup.set_result(("unsupported", f"it raised {why} on the lifespan scope"))
            elif not self._shutdown.done():
                self._shutdown.set_result(("failed", why))
        finally:
            if not self._startup.done():
                self.supported = False
                self._startup.set_result(("unsupported", "it returned from the lifespan scope at once"))
            if not self._shutdown.done():
                self._shutdown.set_result(("ok", ""))

    async def _receive(self):
        return await self._queue.get()

    async def _send(self, message):
        kind = message.get("type")
        if kind == "lifespan.startup.complete" and not self._startup.done():
            self._startup.set_result(("ok", ""))
        elif kind == "lifespan.startup.failed" and not self._startup.done():
            self._startup.set_result(("failed", message.get("message", "") or "(no message)"))
        elif kind == "lifespan.shutdown.complete" and not self._shutdown.done():
            self._shutdown.set_result(("ok", ""))
        elif kind == "lifespan.shutdown.failed" and not self._shutdown.done():
            self._shutdown.set_result(("failed", message.get("message", "") or "(no message)"))

    async def startup(self):
        await self._queue.put({"type": "lifespan.startup"})
        return await self._startup

    async def shutdown(self):
        if not self.supported or self._task.done():
            return ("ok", "")
        await self._queue.put({"type": "lifespan.shutdown"})
        return await self._shutdown


def close_loop(loop):
    """Cancels the tasks left on a lane's loop, lets them unwind, and closes it."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
