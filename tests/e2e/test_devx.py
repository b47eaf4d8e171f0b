"""What a Python developer expects around the server: Python logging in the server's log,
request ids (kept, made, echoed, logged), and an access log with durations and budget outcomes,
in Common Log Format or JSON lines."""
import json
import os
import re
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Reader, Server, request  # noqa: E402
from test_python import PIPELINE, python_config  # noqa: E402

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")


def get(srv, path, headers=None):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        s.sendall(request("GET", path, headers=headers or {}))
        return Reader(s).read_response()
    finally:
        s.close()


def wait_for_text(read, text, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = read()
        if text in content:
            return content
        time.sleep(0.05)
    return read()


class LoggingTest(unittest.TestCase):
    def test_python_logging_goes_to_the_server_log_with_its_level(self):
        with Server(python_config("devx_app:app", path=(APPS,)).replace("python:\n", "python:\n  log_level: info\n", 1)) as srv:
            r = get(srv, "/log")
            self.assertEqual(r.status, 200)
            log = wait_for_text(srv.read_log, "a warning line from the app")
            rid = json.loads(r.body)["request_id"]
            # Same line format as the server's own: timestamp, level, thread, then logger: message.
            self.assertRegex(log, r"\d{4}-\d\d-\d\dT[\d:.]+Z info \[python\] devx: an info line from the app " + re.escape(rid))
            self.assertRegex(log, r"Z WARN \[python\] devx: a warning line from the app")
            self.assertNotIn("a debug line nobody sees", log)
            self.assertIn("Python logging goes to the server log at level info", log)

    def test_an_app_that_configures_logging_keeps_its_handlers(self):
        with Server(python_config("devx_logging_app:app", path=(APPS,))) as srv:
            self.assertEqual(get(srv, "/log").status, 200)
            log = wait_for_text(srv.read_log, "APP-OWN INFO configured by the app")
            self.assertIn("APP-OWN INFO configured by the app", log)
            self.assertIn("kept the app's own logging configuration", log)


class RequestIdTest(unittest.TestCase):
    def config(self, extra=""):
        return ("server:\n  access_log: \"-\"\n" + extra
                + python_config("devx_app:app", path=(APPS,)).replace("python:\n", "python:\n  budget: {cpu: 50ms}\n", 1))

    def test_an_incoming_id_is_kept_echoed_and_logged(self):
        with Server(self.config()) as srv:
            r = get(srv, "/log", headers={"X-Request-Id": "abc-123"})
            self.assertEqual(r.header("x-request-id"), "abc-123")
            self.assertEqual(json.loads(r.body)["request_id"], "abc-123")
            log = wait_for_text(srv.read_log, '"GET /log HTTP/1.1" 200')
            self.assertRegex(log, r'"GET /log HTTP/1\.1" 200 \d+ \d+\.\d{6} - abc-123')

    def test_a_missing_or_unusable_id_is_made(self):
        with Server(self.config()) as srv:
            a = get(srv, "/log").header("x-request-id")
            b = get(srv, "/log", headers={"X-Request-Id": "has space"}).header("x-request-id")
            c = get(srv, "/log", headers={"X-Request-Id": "x" * 65}).header("x-request-id")
            self.assertTrue(a and b and c)
            self.assertEqual(len({a, b, c}), 3)
            self.assertNotEqual(b, "has space")
            self.assertLessEqual(len(c), 64)

    def test_budget_outcome_and_id_in_the_access_log_and_error_lines(self):
        with Server(self.config()) as srv:
            r = get(srv, "/slow", headers={"X-Request-Id": "slow-1"})
            self.assertEqual((r.status, r.header("metronome-budget")), (503, "cpu"))
            log = wait_for_text(srv.read_log, '"GET /slow HTTP/1.1" 503')
            self.assertRegex(log, r'"GET /slow HTTP/1\.1" 503 \d+ \d+\.\d{6} cpu slow-1')
            self.assertIn("[request slow-1]", log)

    def test_echo_can_be_turned_off_and_the_header_renamed(self):
        with Server(self.config("  echo_request_id: false\n  request_id_header: X-Trace\n")) as srv:
            r = get(srv, "/log", headers={"X-Trace": "t-9"})
            self.assertIsNone(r.header("x-trace"))
            self.assertEqual(json.loads(r.body)["request_id"], "t-9")

    def test_json_access_log_lines(self):
        with Server(self.config("  access_log_format: json\n")) as srv:
            get(srv, "/log", headers={"X-Request-Id": "j-1"})
            log = wait_for_text(srv.read_log, '"request_id":"j-1"')
            line = next(l for l in log.splitlines() if '"request_id":"j-1"' in l)
            entry = json.loads(line)
            self.assertEqual((entry["method"], entry["target"], entry["status"], entry["budget"]), ("GET", "/log", 200, "-"))
            self.assertGreaterEqual(entry["duration_s"], 0)


PLUGIN_PIPELINE = """
pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: python-plugin, name: cors, plugin: "examples.plugins:Cors", config: {origins: ["https://app.example"]}}
  - {stage: python}
  - {stage: serialize}
  - {stage: send}
"""
PYHANDLERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "pyhandlers")


def send(srv, method, path, headers=None, body=b""):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        s.sendall(request(method, path, headers=headers or {}, body=body))
        return Reader(s).read_response(head_request=method == "HEAD")
    finally:
        s.close()


class ErrorBodiesTest(unittest.TestCase):
    def test_json_errors_and_an_error_handler(self):
        with Server(python_config("errors_app:app", path=(APPS,))) as srv:
            r = send(srv, "GET", "/nowhere")
            self.assertEqual((r.status, r.header("content-type")), (404, "application/json"))
            self.assertEqual(json.loads(r.body), {"error": "no such page", "path": "/nowhere", "status": 404})
            r = send(srv, "DELETE", "/items/1")
            self.assertEqual((r.status, r.header("content-type")), (405, "application/json"))
            self.assertEqual(json.loads(r.body), {"error": "method not allowed", "status": 405})
            self.assertEqual(r.header("allow"), "GET, HEAD, POST, OPTIONS")
            r = send(srv, "GET", "/boom")
            self.assertEqual(json.loads(r.body), {"error": "internal server error", "status": 500})
            # parse's own 400s take the form too
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")
            r = Reader(s).read_response()
            s.close()
            self.assertEqual((r.status, r.header("content-type")), (400, "application/json"))
            self.assertEqual(json.loads(r.body)["status"], 400)

    def test_error_format_from_the_config(self):
        cfg = "server:\n  error_format: json\n" + python_config("devx_app:app", path=(APPS,))
        with Server(cfg) as srv:
            r = send(srv, "GET", "/nowhere")
            self.assertEqual(json.loads(r.body), {"error": "not found", "status": 404})

    def test_options_gets_a_correct_allow(self):
        with Server(python_config("errors_app:app", path=(APPS,))) as srv:
            r = send(srv, "OPTIONS", "/items/7")
            self.assertEqual(r.status, 204)
            self.assertEqual(r.header("allow"), "GET, HEAD, POST, OPTIONS")
            self.assertEqual(r.body, b"")

    def test_a_cors_plugin_sees_preflights_and_errors(self):
        cfg = f'python:\n  app: "errors_app:app"\n  path: ["{APPS}", "{PYHANDLERS}"]\n' + PLUGIN_PIPELINE
        with Server(cfg) as srv:
            origin = {"Origin": "https://app.example"}
            r = send(srv, "OPTIONS", "/items/7", headers={**origin, "Access-Control-Request-Method": "POST"})
            self.assertEqual(r.status, 204)
            self.assertEqual(r.header("access-control-allow-origin"), "https://app.example")
            self.assertIn("POST", r.header("access-control-allow-methods"))
            for method, path, status in (("GET", "/items/7", 200), ("GET", "/nowhere", 404),
                                         ("DELETE", "/items/7", 405), ("GET", "/boom", 500)):
                with self.subTest(path=path):
                    r = send(srv, method, path, headers=origin)
                    self.assertEqual(r.status, status)
                    self.assertEqual(r.header("access-control-allow-origin"), "https://app.example")
            r = send(srv, "GET", "/items/7", headers={"Origin": "https://evil.example"})
            self.assertIsNone(r.header("access-control-allow-origin"))


if __name__ == "__main__":
    unittest.main()
