"""End-to-end tests of Python handlers and plugins in the real binary.

The example app (pyhandlers/examples/app.py) and its plugins (configs/examples/plugins.yaml),
plus the test apps in tests/e2e/apps/: every return convention, HTTPError, failing handlers,
start-up failures, plugins that fail, and the lifecycle hooks. Raw HTTP over TCP (harness.py).
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import BINARY, ROOT, Reader, Server, exchange, request  # noqa: E402

APPS = os.path.join(HERE, "apps")
PYHANDLERS = os.path.join(ROOT, "pyhandlers")
PLUGINS_YAML = os.path.join(ROOT, "configs", "examples", "plugins.yaml")

# Keep the source tree free of __pycache__ directories from the test apps.
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

PIPELINE = """
pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: python}
  - {stage: serialize}
  - {stage: send}
"""

TEXT = "text/plain; charset=utf-8"
INTERNAL_ERROR = b"internal server error\n"


def python_config(app, path=(APPS,), pipeline=PIPELINE):
    """A config for `app` ("module:attr"). python.path entries are absolute: the server resolves
    relative ones against its working directory."""
    paths = ", ".join(json.dumps(p) for p in path)
    return f'python:\n  app: "{app}"\n  path: [{paths}]\n' + pipeline


def wait_for_log(server, text, timeout=5):
    """The server's log once it contains `text` (or, after `timeout`, as it is)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.read_log()
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.02)


class PythonServerTest(unittest.TestCase):
    """A server per class; helpers for requests."""

    CONFIG = None  # config text
    CONFIG_FILE = None  # or a config file

    @classmethod
    def setUpClass(cls):
        cls.server = Server(cls.CONFIG, config_file=cls.CONFIG_FILE)

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def get(self, path, headers=None, method="GET", body=b"", version="HTTP/1.1"):
        return exchange(self.server, request(method, path, headers=headers, body=body, version=version),
                        head_request=(method == "HEAD"))

    def connect(self):
        s = self.server.connect()
        self.addCleanup(s.close)
        return s, Reader(s)

    def assertResponse(self, resp, status, body=None, content_type=None):
        self.assertEqual(resp.status, status, resp)
        if body is not None:
            self.assertEqual(resp.body, body)
        if content_type is not None:
            self.assertEqual(resp.header("content-type"), content_type, resp)
        if resp.header("transfer-encoding") is None and status not in (204, 304):
            self.assertEqual(resp.header("content-length"), str(len(resp.body)), resp)

    def assertJson(self, resp, value, status=200):
        self.assertResponse(resp, status, content_type="application/json")
        self.assertEqual(json.loads(resp.body), value)


# --- the example app ----------------------------------------------------------------------

class ExampleAppTest(PythonServerTest):
    CONFIG = python_config("examples.app:app", path=(PYHANDLERS,))

    def test_plaintext(self):
        self.assertResponse(self.get("/plaintext"), 200, b"Hello, World!", TEXT)

    def test_percent_encoded_unreserved_characters_route_like_their_letters(self):
        # RFC 3986 6.2.2.2: /%70lain%74ext is /plaintext.
        self.assertResponse(self.get("/%70lain%74ext"), 200, b"Hello, World!", TEXT)
        self.assertResponse(self.get("/hello/%4Aane"), 200, b"Hello, Jane!", TEXT)
        # Reserved characters stay encoded until the handler decodes its parameter: %2F does
        # not split a segment, so {name} takes "a/b" whole.
        self.assertResponse(self.get("/hello/a%2Fb"), 200, b"Hello, a/b!", TEXT)

    def test_dot_segments_never_reach_a_handler(self):
        # Encoded dots are dots: the path is normalised before routing (RFC 3986 5.2.4), so
        # /files/%2e%2e/%2e%2e/etc/passwd is /etc/passwd, which no route serves.
        self.assertEqual(self.get("/files/%2e%2e/%2e%2e/etc/passwd").status, 404)
        self.assertJson(self.get("/files/a/./b/../c"), {"path": "a/c"})
        self.assertJson(self.get("/files/a/%2e/b/%2E%2E/c"), {"path": "a/c"})
        # A ".." hidden behind an encoded slash would appear when the parameter is decoded:
        # refused rather than handed over.
        for path in ("/files/..%2F..%2Fetc%2Fpasswd", "/hello/..%2F..", "/files/x/%2e%2e%2Fy"):
            with self.subTest(path=path):
                resp = self.get(path)
                self.assertEqual(resp.status, 400, resp)
                self.assertNotIn(b"etc", resp.body)

    def test_encoded_nul_in_the_path_is_400_like_a_raw_one(self):
        s, reader = self.connect()
        s.sendall(request("GET", "/hello/a%00b"))
        resp = reader.read_response()
        self.assertEqual(resp.status, 400)
        self.assertIn(b"NUL", resp.body)
        self.assertTrue(reader.closed())

    def test_a_path_param_is_decoded_for_the_handler_after_normalisation(self):
        self.assertJson(self.get("/files/%2e/x%2Fy"), {"path": "x/y"})

    def test_json(self):
        self.assertResponse(self.get("/json"), 200, b'{"message":"Hello, World!"}', "application/json")

    def test_head_runs_the_get_handler_without_body(self):
        resp = self.get("/json", method="HEAD")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header("content-length"), str(len(b'{"message":"Hello, World!"}')))
        self.assertEqual(resp.body, b"")

    def test_echo_returns_identical_json(self):
        doc = {
            "id": 12345678901234567890123,  # beyond 64 bits
            "neg": -9223372036854775808,
            "max": 18446744073709551615,
            "floats": [0.1, -0.0, 1e300, 5e-324, 2.5, 1e16],
            "flags": [True, False, None],
            "text": "héllo wörld 😀 \"quoted\" back\\slash \n\t\u0001 \u2028",
            "nested": {"a": [{"b": [{"c": [1, 2, 3]}]}], "empty": {}, "list": []},
            "items": [{"n": i, "name": f"item-{i}", "tags": ["x", "y"]} for i in range(18)],
        }
        body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        self.assertGreater(len(body), 900)
        self.assertLess(len(body), 1400)
        resp = self.get("/echo", method="POST", body=body, headers={"Content-Type": "application/json"})
        self.assertResponse(resp, 200, body, "application/json")
        self.assertEqual(json.loads(resp.body), doc)

    def test_echo_escaped_input_comes_back_compact_utf8(self):
        body = b'{ "e" : "\\u00e9\\ud83d\\ude00" , "n" : [ 1 , 2 ] }'
        resp = self.get("/echo", method="POST", body=body)
        self.assertResponse(resp, 200, '{"e":"é😀","n":[1,2]}'.encode(), "application/json")

    def test_echo_invalid_json_is_400(self):
        for body in (b"[1,2,]", b"{'a': 1}", b"nul", b'{"a":', b'"\xff"', b"[1] x", b"NaN"):
            with self.subTest(body=body):
                resp = self.get("/echo", method="POST", body=body)
                self.assertResponse(resp, 400, content_type=TEXT)
                self.assertTrue(resp.body.startswith(b"invalid JSON"), resp.body)
        # An empty body is not JSON either.
        resp = self.get("/echo", method="POST", headers={"Content-Length": "0"})
        self.assertEqual(resp.status, 400, resp)

    def test_users_int_param(self):
        resp = self.get("/users/123")
        self.assertResponse(resp, 200, b'{"id":123}', "application/json")
        self.assertIs(type(json.loads(resp.body)["id"]), int)
        self.assertResponse(self.get("/users/-5"), 200, b'{"id":-5}')
        self.assertResponse(self.get("/users/9223372036854775807"), 200, b'{"id":9223372036854775807}')

    def test_users_not_int_is_404(self):
        for path in ("/users/abc", "/users/12a", "/users/1.5", "/users/", "/users/99999999999999999999"):
            with self.subTest(path=path):
                self.assertEqual(self.get(path).status, 404)

    def test_hello_decodes_percent_utf8(self):
        resp = self.get("/hello/J%C3%B6rg")
        self.assertResponse(resp, 200, "Hello, Jörg!".encode(), TEXT)
        self.assertResponse(self.get("/hello/a%20b"), 200, b"Hello, a b!")
        self.assertResponse(self.get("/hello/a+b"), 200, b"Hello, a+b!")
        self.assertResponse(self.get("/hello/%FF"), 200, "Hello, \ufffd!".encode())

    def test_files_path_param(self):
        self.assertJson(self.get("/files/a/b/c.txt"), {"path": "a/b/c.txt"})
        self.assertJson(self.get("/files/dir%20x/f%C3%A9.txt"), {"path": "dir x/fé.txt"})
        self.assertJson(self.get("/files/single"), {"path": "single"})
        self.assertJson(self.get("/files/"), {"path": ""})  # {rest:path} may be empty

    def test_search_query_multi_values(self):
        resp = self.get("/search?q=hello+world&tag=a&tag=b&tag=%C3%A9&other=1")
        self.assertJson(resp, {"q": "hello world", "tags": ["a", "b", "é"]})
        self.assertJson(self.get("/search"), {"q": None, "tags": []})
        self.assertJson(self.get("/search?q=%zz&q=last&tag="), {"q": "last", "tags": [""]})

    def test_form(self):
        body = b"a=1&b=2&a=3&name=J%C3%B6rg&plus=x+y&empty=&eq=k%3Dv=w"
        resp = self.get("/form", method="POST", body=body,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertJson(resp, {"a": ["1", "3"], "b": ["2"], "name": ["Jörg"], "plus": ["x y"], "empty": [""],
                               "eq": ["k=v=w"]})

    def test_headers_and_client(self):
        s, reader = self.connect()
        s.sendall(request("GET", "/headers", headers={"User-Agent": "e2e-agent/1.0"}))
        resp = reader.read_response()
        self.assertJson(resp, {"user-agent": "e2e-agent/1.0", "client": ["127.0.0.1", s.getsockname()[1]]})
        resp = self.get("/headers")
        self.assertIsNone(json.loads(resp.body)["user-agent"])
        resp = self.get("/headers", headers={"USER-AGENT": "upper"})
        self.assertEqual(json.loads(resp.body)["user-agent"], "upper")

    def test_redirect(self):
        resp = self.get("/redirect")
        self.assertEqual(resp.status, 302)
        self.assertEqual(resp.header("location"), "/json")
        self.assertEqual(resp.body, b"Redirecting to /json\n")
        self.assertEqual(resp.header("content-type"), "text/plain; charset=utf-8")

    def test_teapot_http_error(self):
        resp = self.get("/teapot")
        self.assertResponse(resp, 418, b"I'm a teapot\n", TEXT)

    def test_created_tuple(self):
        resp = self.get("/created")
        self.assertResponse(resp, 201, b'{"ok":true}', "application/json")
        self.assertEqual(resp.header("x-example"), "yes")

    def test_stream_chunked(self):
        resp = self.get("/stream")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header("transfer-encoding"), "chunked")
        self.assertIsNone(resp.header("content-length"))
        self.assertEqual(resp.header("content-type"), TEXT)
        self.assertEqual(resp.body, b"part 0\npart 1\npart 2\n")
        # HTTP/1.0 has no chunked framing: the body ends when the server closes the connection.
        resp = self.get("/stream", version="HTTP/1.0")
        self.assertIsNone(resp.header("transfer-encoding"))
        self.assertIsNone(resp.header("content-length"))
        self.assertEqual(resp.header("connection"), "close")
        self.assertEqual(resp.body, b"part 0\npart 1\npart 2\n")

    def test_started(self):
        self.assertJson(self.get("/started"), {"startup_hooks_ran": 1})

    def test_unhandled_exception_is_500_with_traceback_in_log_only(self):
        s, reader = self.connect()
        s.sendall(request("GET", "/boom"))
        resp = reader.read_response()
        self.assertResponse(resp, 500, INTERNAL_ERROR, TEXT)
        self.assertNotIn(b"Traceback", resp.raw_head + resp.body)
        self.assertNotIn(b"on purpose", resp.raw_head + resp.body)
        log = wait_for_log(self.server, "RuntimeError: this handler fails on purpose")
        self.assertIn("Traceback (most recent call last)", log)
        self.assertIn("RuntimeError: this handler fails on purpose", log)
        self.assertIn("app.py", log)
        # The same connection serves the next request normally, then new connections too.
        s.sendall(request("GET", "/json"))
        self.assertResponse(reader.read_response(), 200, b'{"message":"Hello, World!"}')
        s.sendall(request("GET", "/boom") + request("GET", "/plaintext"))
        self.assertResponse(reader.read_response(), 500, INTERNAL_ERROR)
        self.assertResponse(reader.read_response(), 200, b"Hello, World!")
        for _ in range(3):
            self.assertResponse(self.get("/users/7"), 200, b'{"id":7}')

    def test_pipelined_python_requests_answer_in_order(self):
        s, reader = self.connect()
        paths = ["/users/%d" % i for i in range(20)]
        s.sendall(b"".join(request("GET", p) for p in paths))
        for i in range(20):
            self.assertResponse(reader.read_response(), 200, b'{"id":%d}' % i)

    def test_method_not_allowed_on_python_route(self):
        resp = self.get("/echo")
        self.assertEqual(resp.status, 405, resp)
        self.assertIn("POST", resp.header("allow", ""))


# --- return conventions and errors (tests/e2e/apps/e2e_app.py) ----------------------------

class ConventionsTest(PythonServerTest):
    CONFIG = python_config("e2e_app:app")

    def test_dict(self):
        resp = self.get("/conv/dict")
        self.assertResponse(resp, 200, content_type="application/json")
        self.assertEqual(resp.body, json.dumps(
            {"kind": "dict", "n": [1, 2.5, None, True, False], "u": "é😀", "big": 2**70},
            ensure_ascii=False, separators=(",", ":")).encode())

    def test_list(self):
        self.assertResponse(self.get("/conv/list"), 200, b'[1,"two",{"three":3},[],{}]', "application/json")

    def test_str(self):
        self.assertResponse(self.get("/conv/str"), 200, "plain text é".encode(), TEXT)

    def test_bytes_bytearray_memoryview(self):
        octets = "application/octet-stream"
        self.assertResponse(self.get("/conv/bytes"), 200, b"\x00\x01binary\xff", octets)
        self.assertResponse(self.get("/conv/bytearray"), 200, b"bytearray body", octets)
        self.assertResponse(self.get("/conv/memoryview"), 200, b"memoryview body", octets)

    def test_none_is_204(self):
        resp = self.get("/conv/none")
        self.assertEqual(resp.status, 204)
        self.assertEqual(resp.body, b"")
        self.assertIsNone(resp.header("content-length"))
        # The connection stays usable after a body-less response.
        s, reader = self.connect()
        s.sendall(request("GET", "/conv/none") + request("GET", "/conv/str"))
        self.assertEqual(reader.read_response().status, 204)
        self.assertResponse(reader.read_response(), 200, "plain text é".encode())

    def test_response_object(self):
        resp = self.get("/conv/response")
        self.assertResponse(resp, 202, b"custom", "text/x-custom")
        self.assertEqual(resp.header("x-custom"), "1")
        resp = self.get("/conv/response-json")
        self.assertResponse(resp, 201, b'{"a":1}', "application/json")
        self.assertEqual([v for k, v in resp.headers if k == "x-a"], ["1", "2"])
        self.assertResponse(self.get("/conv/response-html"), 200, b"<h1>hi</h1>", "text/html; charset=utf-8")
        resp = self.get("/conv/response-stream")
        self.assertEqual(resp.status, 206)
        self.assertEqual(resp.header("transfer-encoding"), "chunked")
        self.assertEqual(resp.header("content-type"), "text/event-stream")
        self.assertEqual(resp.body, b"abc")

    def test_tuples(self):
        self.assertResponse(self.get("/conv/tuple2"), 201, b"created", TEXT)
        resp = self.get("/conv/tuple3")
        self.assertResponse(resp, 202, b'{"ok":true}', "application/json")
        self.assertEqual(resp.header("x-one"), "1")
        self.assertEqual(resp.header("x-two"), "2")
        resp = self.get("/conv/tuple3-ctype")
        self.assertResponse(resp, 200, b"a,b\n", "text/csv")
        self.assertEqual([k for k, v in resp.headers].count("content-type"), 1)

    def test_generator_is_chunked(self):
        resp = self.get("/conv/generator")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.header("transfer-encoding"), "chunked")
        self.assertEqual(resp.body, b"text part\nbytes part\nlast part\n")

    def test_large_body(self):
        s, reader = self.connect()
        s.sendall(request("GET", "/conv/large") + request("GET", "/conv/str"))
        self.assertResponse(reader.read_response(), 200, b"0123456789" * 10000, TEXT)
        self.assertResponse(reader.read_response(), 200, "plain text é".encode())

    def test_invalid_results_are_500(self):
        for path in ("/conv/unsupported", "/conv/bad-status", "/conv/nan", "/conv/bad-stream-first", "/err/bad-status"):
            with self.subTest(path=path):
                s, reader = self.connect()
                s.sendall(request("GET", path) + request("GET", "/conv/str"))
                resp = reader.read_response()
                self.assertResponse(resp, 500, INTERNAL_ERROR, TEXT)
                self.assertIsNone(resp.header("transfer-encoding"))
                self.assertResponse(reader.read_response(), 200, "plain text é".encode())

    def test_http_errors(self):
        self.assertResponse(self.get("/err/teapot"), 418, b"I'm a teapot\n", TEXT)
        resp = self.get("/err/dict")
        self.assertResponse(resp, 422, b'{"error":"invalid","field":"name"}', "application/json")
        self.assertResponse(self.get("/err/none"), 404, b"Not Found\n", TEXT)
        resp = self.get("/err/headers")
        self.assertResponse(resp, 401, b"login first\n", TEXT)
        self.assertEqual(resp.header("www-authenticate"), "Bearer")

    def test_invalid_request_json_and_text_are_400(self):
        resp = self.get("/echo-json", method="POST", body=b"[1,2,]")
        self.assertResponse(resp, 400, content_type=TEXT)
        self.assertTrue(resp.body.startswith(b"invalid JSON"), resp.body)
        resp = self.get("/echo-text", method="POST", body=b"caf\xe9")
        self.assertResponse(resp, 400, b"request body is not valid UTF-8\n", TEXT)

    def test_large_request_body(self):
        text = ("é" * 100 + "\n") * 2000  # ~400 kB
        resp = self.get("/echo-text", method="POST", body=text.encode())
        self.assertResponse(resp, 200, text.encode(), TEXT)

    def test_request_fields(self):
        resp = self.get("/info/J%C3%B6rg/42/a/b%20c/?x=1&y=%C3%A9&x=2&flag",
                        method="PUT", body=b"payload \xe9",
                        headers={"X-Multi": "one", "x-multi": "two", "User-Agent": "e2e"})
        s_client = json.loads(resp.body)["client"]
        self.assertJson(resp, {
            "method": "PUT",
            "path": "/info/Jörg/42/a/b c/",
            "raw_path": "/info/J%C3%B6rg/42/a/b%20c/",
            "target": "/info/J%C3%B6rg/42/a/b%20c/?x=1&y=%C3%A9&x=2&flag",
            "query_string": "x=1&y=%C3%A9&x=2&flag",
            "query": [["x", "1"], ["y", "é"], ["x", "2"], ["flag", ""]],
            "headers": {"x-multi": ["one", "two"], "user-agent": ["e2e"], "host": ["localhost"],
                        "content-length": ["9"]},
            "params": {"name": "Jörg", "id": 42, "rest": "a/b c/"},
            "args": ["Jörg", 42, "a/b c/", "int"],
            "http_version": "1.1",
            "body": "payload é",
            "client": s_client,
        })
        self.assertEqual(s_client[0], "127.0.0.1")
        for method in ("GET", "POST", "DELETE", "PATCH"):
            with self.subTest(method=method):
                resp = self.get("/info/n/-1/", method=method, version="HTTP/1.0")
                value = json.loads(resp.body)
                self.assertEqual(value["method"], method)
                self.assertEqual(value["params"], {"name": "n", "id": -1, "rest": ""})
                self.assertEqual(value["http_version"], "1.0")

    def test_request_kept_after_response_stays_readable(self):
        body = b'{"kept": [1, 2]}'
        resp = self.get("/keep/7?a=1&a=2", method="POST", body=body, headers={"User-Agent": "keeper"})
        self.assertResponse(resp, 200, b"kept")
        # Other requests reuse the server's request slots in between.
        for _ in range(10):
            self.assertEqual(self.get("/conv/str?noise=" + "x" * 200).status, 200)
        resp = self.get("/kept")
        self.assertJson(resp, {"method": "POST", "path": "/keep/7", "query": [["a", "1"], ["a", "2"]],
                               "agent": "keeper", "params": {"id": 7}, "text": body.decode(),
                               "json": {"kept": [1, 2]}, "same": True})

    def test_response_header_injection_is_500(self):
        # A field with CR/LF (or an invalid name) from the app is a 500 and a log line, never a
        # split response; the connection goes on.
        s, reader = self.connect()
        s.sendall(request("GET", "/conv/header-injection") + request("GET", "/conv/str"))
        resp = reader.read_response()
        self.assertResponse(resp, 500, INTERNAL_ERROR, TEXT)
        self.assertIsNone(resp.header("x-injected"), resp.raw_head)
        self.assertIsNone(resp.header("x-good"))
        self.assertResponse(reader.read_response(), 200, "plain text é".encode())
        self.assertIn("response field", self.server.read_log())

    def test_stream_failing_midway_is_cut_not_completed(self):
        # The head and the first part were sent when the generator raised: the response cannot
        # become a 500 any more, so the connection closes without the chunked terminator (a
        # client sees a truncated body, never a complete one).
        s, reader = self.connect()
        s.sendall(request("GET", "/conv/bad-stream") + request("GET", "/conv/str"))
        head = reader.read_until(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertIn(b"transfer-encoding: chunked", head.lower())
        rest = reader.read_to_eof()
        self.assertEqual(rest, b"3\r\nok\n\r\n")  # the part, no "0\r\n\r\n", and nothing after
        self.assertIn("stream cut", self.server.read_log())

    def test_content_type_injection_from_response_object_is_refused(self):
        # A content type with CR LF must not split the head into extra fields.
        s, reader = self.connect()
        s.sendall(request("GET", "/conv/ctype-injection") + request("GET", "/conv/str"))
        resp = reader.read_response()
        self.assertNotIn(b"\r\nX-Injected", resp.raw_head)
        self.assertIsNone(resp.header("x-injected"), resp.raw_head)
        self.assertResponse(reader.read_response(), 200, "plain text é".encode())

    def test_content_type_injection_from_header_field_is_refused(self):
        s, reader = self.connect()
        s.sendall(request("GET", "/conv/ctype-header-injection") + request("GET", "/conv/str"))
        resp = reader.read_response()
        self.assertNotIn(b"\r\nX-Injected", resp.raw_head)
        self.assertIsNone(resp.header("x-injected"), resp.raw_head)
        self.assertResponse(reader.read_response(), 200, "plain text é".encode())

    def test_startup_hooks_ran_in_order(self):
        self.assertJson(self.get("/hooks"), {"startup": ["first", "second", "async"]})


class HandlerErrorLogTest(PythonServerTest):
    """Failing handlers: 500 for the client, the traceback in the log (a server of its own: the
    log is rate-limited to 5 such lines a second)."""
    CONFIG = python_config("e2e_app:app")

    def test_tracebacks_in_log_not_in_responses(self):
        cases = [
            ("/boom", "RuntimeError: e2e handler fails on purpose: SECRET-E2E-TOKEN", "in boom"),
            ("/keyerror", "KeyError: 'missing-key-E2E'", "in keyerror"),
            ("/conv/unsupported", "TypeError", "a handler returns dict, list"),
        ]
        s, reader = self.connect()
        for path, line, where in cases:
            with self.subTest(path=path):
                s.sendall(request("GET", path))
                resp = reader.read_response()
                self.assertResponse(resp, 500, INTERNAL_ERROR, TEXT)
                self.assertNotIn(b"SECRET", resp.raw_head + resp.body)
                self.assertNotIn(b"missing-key", resp.raw_head + resp.body)
                log = wait_for_log(self.server, where)
                self.assertIn(line, log)
                self.assertIn(where, log)
                self.assertIn("GET " + path, log)
        self.assertIn("Traceback (most recent call last)", self.server.read_log())
        self.assertIn("e2e_app.py", self.server.read_log())
        s.sendall(request("GET", "/conv/dict"))
        self.assertEqual(reader.read_response().status, 200)
        self.assertEqual(self.get("/hooks").status, 200)


# --- start-up failures --------------------------------------------------------------------

class StartupFailureTest(unittest.TestCase):
    def run_server(self, config_text, timeout=15):
        with tempfile.TemporaryDirectory(prefix="metronome-e2e-") as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w") as f:
                f.write(config_text)
            t0 = time.monotonic()
            try:
                proc = subprocess.run([BINARY, "serve", "-c", path, "--listen", "127.0.0.1:0"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired as e:
                self.fail(f"the server did not exit within {timeout}s:\n{(e.output or b'').decode(errors='replace')}")
            return proc.returncode, proc.stdout.decode(errors="replace"), time.monotonic() - t0

    def assertFailsToStart(self, app, *expected):
        code, out, elapsed = self.run_server(python_config(app))
        self.assertNotEqual(code, 0, out)
        self.assertLess(elapsed, 10, out)
        for text in expected:
            self.assertIn(text, out)
        # It never served: the listener was never announced.
        self.assertNotIn("listening on", out)
        return out

    def test_syntax_error(self):
        self.assertFailsToStart("e2e_syntax_error:app", "SyntaxError", "e2e_syntax_error.py", "def broken(:")

    def test_import_error(self):
        self.assertFailsToStart("e2e_import_error:app", "Traceback (most recent call last)",
                                "ModuleNotFoundError", "metronome_e2e_no_such_module", "e2e_import_error.py")

    def test_module_not_found(self):
        self.assertFailsToStart("e2e_no_such_app_module:app", "ModuleNotFoundError", "e2e_no_such_app_module")

    def test_missing_attribute(self):
        self.assertFailsToStart("e2e_app:no_such_app", "no_such_app", "AttributeError")

    def test_startup_hook_raises(self):
        self.assertFailsToStart("e2e_startup_fail:app", "Traceback (most recent call last)",
                                "RuntimeError: startup hook fails on purpose: E2E-STARTUP", "e2e_startup_fail.py")

    def test_not_an_app(self):
        # Neither a metronome.App nor a callable (WSGI) nor async (ASGI): refused with its type.
        self.assertFailsToStart("e2e_app:kept", "is a list, which is not callable")
        self.assertFailsToStart("e2e_not_an_app:app", "not a metronome.App, a WSGI callable or an ASGI app")

    def test_bad_app_spec(self):
        code, out, _ = self.run_server(python_config("e2e_app"))
        self.assertNotEqual(code, 0, out)
        self.assertIn("module:attribute", out)


# --- plugins ------------------------------------------------------------------------------

class ExamplePluginsTest(PythonServerTest):
    CONFIG_FILE = PLUGINS_YAML

    def count(self, resp):
        value = resp.header("x-request-count")
        self.assertIsNotNone(value, resp)
        return int(value)

    def test_missing_key_is_401(self):
        resp = self.get("/json")
        self.assertJson(resp, {"error": "missing or invalid API key"}, status=401)
        self.assertEqual(resp.header("www-authenticate"), "X-Api-Key")
        self.assertIsNone(resp.header("x-request-count"))
        self.assertEqual(self.get("/json", headers={"X-Api-Key": "wrong"}).status, 401)
        self.assertEqual(self.get("/json", headers={"X-Api-Key": ""}).status, 401)
        self.assertEqual(self.get("/users/1").status, 401)

    def test_key_is_200(self):
        for key in ("secret-1", "secret-2"):
            with self.subTest(key=key):
                resp = self.get("/json", headers={"X-Api-Key": key})
                self.assertResponse(resp, 200, b'{"message":"Hello, World!"}', "application/json")
                self.count(resp)
        resp = self.get("/users/5", headers={"x-api-key": "secret-1"})  # field names are case-insensitive
        self.assertResponse(resp, 200, b'{"id":5}')

    def test_public_path_without_key(self):
        resp = self.get("/plaintext")
        self.assertResponse(resp, 200, b"Hello, World!", TEXT)
        self.count(resp)

    def test_request_count_increases(self):
        s, reader = self.connect()
        counts = []
        for _ in range(5):
            s.sendall(request("GET", "/search?q=x", headers={"X-Api-Key": "secret-1"}))
            counts.append(self.count(reader.read_response()))
        self.assertEqual(counts, list(range(counts[0], counts[0] + 5)), counts)
        resp = self.get("/search", headers={"X-Api-Key": "secret-2"})
        self.assertEqual(self.count(resp), counts[-1] + 1)


class FaultyPluginTest(PythonServerTest):
    CONFIG = python_config("examples.app:app", path=(APPS, PYHANDLERS), pipeline="""
pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: python-plugin, name: faulty, plugin: "e2e_plugins:Faulty", config: {header: X-Plugin-Seen}}
  - {stage: python}
  - {stage: serialize}
  - {stage: send}
""")

    def test_plugin_passes_and_sees_the_response(self):
        resp = self.get("/plaintext")
        self.assertResponse(resp, 200, b"Hello, World!", TEXT)
        self.assertEqual(resp.header("x-plugin-seen"), "1")

    def test_on_request_raises_is_500_and_server_alive(self):
        s, reader = self.connect()
        s.sendall(request("GET", "/json?plugin=raise"))
        resp = reader.read_response()
        self.assertResponse(resp, 500, INTERNAL_ERROR, TEXT)
        self.assertNotIn(b"E2E-PLUGIN", resp.raw_head + resp.body)
        log = wait_for_log(self.server, "E2E-PLUGIN")
        self.assertIn("RuntimeError: plugin on_request fails on purpose: E2E-PLUGIN", log)
        self.assertIn("faulty", log)
        # Same connection, then new ones: served normally.
        s.sendall(request("GET", "/json"))
        self.assertResponse(reader.read_response(), 200, b'{"message":"Hello, World!"}')
        for _ in range(3):
            self.assertResponse(self.get("/users/3"), 200, b'{"id":3}')

    def test_on_request_http_error(self):
        resp = self.get("/plaintext?plugin=http-error")
        self.assertResponse(resp, 403, b"forbidden by the plugin\n", TEXT)

    def test_on_request_answers_early(self):
        resp = self.get("/plaintext?plugin=answer")
        self.assertResponse(resp, 200, b'{"answered_by":"plugin"}', "application/json")
        self.assertIsNone(resp.header("x-plugin-seen"))

    def test_on_response_raises_keeps_the_handler_response(self):
        resp = self.get("/plaintext?plugin=raise-on-response")
        self.assertResponse(resp, 200, b"Hello, World!", TEXT)
        log = wait_for_log(self.server, "E2E-ON-RESPONSE")
        self.assertIn("E2E-ON-RESPONSE", log)
        self.assertResponse(self.get("/json"), 200, b'{"message":"Hello, World!"}')


class AsyncHandlersTest(PythonServerTest):
    """`async def` handlers and plugin methods: each lane runs them on its own event loop."""
    CONFIG = python_config("e2e_app:app", path=(APPS, PYHANDLERS), pipeline="""
pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: python-plugin, name: async-tag, plugin: "e2e_plugins:AsyncTag"}
  - {stage: python}
  - {stage: serialize}
  - {stage: send}
""")

    def test_async_handler_result_and_plugin(self):
        resp = self.get("/async/json")
        self.assertJson(resp, {"async": True, "path": "/async/json"})
        self.assertEqual(resp.header("x-async-plugin"), "1")

    def test_await_and_path_params(self):
        for i in range(5):  # the loop is reused request after request
            self.assertJson(self.get(f"/async/users/{i}"), {"id": i, "plugin": "seen"})

    def test_gather(self):
        self.assertJson(self.get("/async/gather"), [0, 1, 2, 3, 4])

    def test_async_plugin_answers_early(self):
        resp = self.get("/async/json?plugin=answer")
        self.assertJson(resp, {"answered_by": "async plugin"})

    def test_http_error_and_exception(self):
        self.assertResponse(self.get("/async/http-error"), 418, b"I'm a teapot\n", TEXT)
        resp = self.get("/async/raise")
        self.assertResponse(resp, 500, INTERNAL_ERROR, TEXT)
        self.assertIn("ValueError: async handler fails on purpose: E2E-ASYNC", wait_for_log(self.server, "E2E-ASYNC"))
        self.assertJson(self.get("/async/json"), {"async": True, "path": "/async/json"})


# --- lifecycle ----------------------------------------------------------------------------

class LifecycleTest(unittest.TestCase):
    def test_shutdown_hooks_run_on_sigterm(self):
        with tempfile.TemporaryDirectory(prefix="metronome-e2e-") as tmp:
            marker = os.path.join(tmp, "shutdown-marker")
            os.environ["METRONOME_E2E_SHUTDOWN_MARKER"] = marker
            try:
                server = Server(python_config("e2e_app:app"))
            finally:
                del os.environ["METRONOME_E2E_SHUTDOWN_MARKER"]
            with server:
                self.assertEqual(exchange(server, request("GET", "/hooks")).status, 200)
                self.assertEqual(exchange(server, request("POST", "/keep/1", body=b"x")).status, 200)
                self.assertFalse(os.path.exists(marker))
                code = server.stop(signal.SIGTERM)
                log = server.read_log()
            self.assertEqual(code, 0, log)
            self.assertTrue(os.path.exists(marker), log)
            with open(marker) as f:
                lines = f.read().splitlines()
            self.assertEqual(lines, ["second registered (runs first); requests kept: 1",
                                     "first registered (runs last)"])

    def test_sigint_also_runs_shutdown_hooks(self):
        with tempfile.TemporaryDirectory(prefix="metronome-e2e-") as tmp:
            marker = os.path.join(tmp, "shutdown-marker")
            os.environ["METRONOME_E2E_SHUTDOWN_MARKER"] = marker
            try:
                server = Server(python_config("e2e_app:app"))
            finally:
                del os.environ["METRONOME_E2E_SHUTDOWN_MARKER"]
            with server:
                code = server.stop(signal.SIGINT)
                log = server.read_log()
            self.assertEqual(code, 0, log)
            with open(marker) as f:
                self.assertEqual(len(f.read().splitlines()), 2)


if __name__ == "__main__":
    unittest.main()
