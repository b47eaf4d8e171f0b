"""A stage plugin for tests/e2e/test_python.py whose behaviour the request's ?plugin= picks:
raise (on_request raises), http-error (raises HTTPError 403), answer (answers early),
raise-on-response (on_response raises). Every response it sees gets X-Plugin-Seen."""

import asyncio

import metronome


class Faulty:
    def __init__(self, config):
        self.header = config.get("header", "X-Plugin-Seen")

    def on_request(self, req):
        what = req.query.get("plugin")
        if what == "raise":
            raise RuntimeError("plugin on_request fails on purpose: E2E-PLUGIN")
        if what == "http-error":
            raise metronome.HTTPError(403, "forbidden by the plugin")
        if what == "answer":
            return {"answered_by": "plugin"}
        if what == "raise-on-response":
            req.state["raise"] = True
        return None

    def on_response(self, req, resp):
        if req.state.get("raise"):
            raise RuntimeError("plugin on_response fails on purpose: E2E-ON-RESPONSE")
        resp.set_header(self.header, "1")
        return resp


class AsyncTag:
    """async on_request and on_response: they run on the plugin's and the python lane's loops."""

    def __init__(self, config):
        pass

    async def on_request(self, req):
        await asyncio.sleep(0)
        if req.query.get("plugin") == "answer":
            return {"answered_by": "async plugin"}
        req.state["async_plugin"] = "seen"
        return None

    async def on_response(self, req, resp):
        await asyncio.sleep(0)
        resp.set_header("X-Async-Plugin", "1")
        return resp
