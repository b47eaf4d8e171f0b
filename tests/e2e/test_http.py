"""End-to-end HTTP/1.1 semantics: keep-alive, pipelining, bodies, HEAD, errors, versions.

Every test talks raw bytes to a real metronome process over TCP (harness.py).
"""
import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SharedServerTest, config, exchange, request, still_open  # noqa: E402


DATE_RE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"\d{4} \d\d:\d\d:\d\d GMT$")

HELLO = b"Hello, World!"
JSON = b'{"message":"Hello, World!"}'


class HttpTest(SharedServerTest, unittest.TestCase):
    CONFIG = config()

    def assertOk(self, resp, body):
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(resp.body, body)
        self.assertEqual(resp.header("content-length"), str(len(body)))

    # --- basics -------------------------------------------------------------------------------

    def test_plaintext(self):
        resp = exchange(self.server, request("GET", "/plaintext"))
        self.assertOk(resp, HELLO)
        self.assertEqual(resp.reason, "OK")
        self.assertEqual(resp.header("content-type"), "text/plain; charset=utf-8")
        self.assertIsNone(resp.header("connection"))  # HTTP/1.1 keep-alive is the default

    def test_json_content_type(self):
        resp = exchange(self.server, request("GET", "/json"))
        self.assertOk(resp, JSON)
        self.assertEqual(resp.header("content-type"), "application/json")

    def test_date_and_server_headers(self):
        resp = exchange(self.server, request("GET", "/plaintext"))
        self.assertEqual(resp.header("server"), "metronome")
        self.assertRegex(resp.header("date"), DATE_RE)
        names = [k for k, _ in resp.headers]
        self.assertEqual(names.count("date"), 1)
        self.assertEqual(names.count("server"), 1)
        # Error responses carry them too.
        resp = exchange(self.server, request("GET", "/nope"))
        self.assertEqual(resp.header("server"), "metronome")
        self.assertRegex(resp.header("date"), DATE_RE)

    def test_keep_alive_several_requests(self):
        s, r = self.connect()
        paths = ["/plaintext", "/json", "/users/7", "/plaintext", "/json", "/users/8"]
        bodies = [HELLO, JSON, b"user", HELLO, JSON, b"user"]
        for path, body in zip(paths, bodies):
            s.sendall(request("GET", path))
            self.assertOk(r.read_response(), body)
        self.assertTrue(still_open(r, 0.3))  # still open after all of them
        s.sendall(request("GET", "/plaintext"))
        self.assertOk(r.read_response(), HELLO)

    def test_absolute_form_target(self):
        resp = exchange(self.server, request("GET", "http://localhost/json"))
        self.assertOk(resp, JSON)

    def test_query_string_is_not_part_of_the_path(self):
        resp = exchange(self.server, request("GET", "/plaintext?a=1&b=2"))
        self.assertOk(resp, HELLO)

    # --- pipelining ---------------------------------------------------------------------------

    def test_pipelining_five_in_one_send(self):
        s, r = self.connect()
        reqs = [("/plaintext", 200, HELLO), ("/json", 200, JSON), ("/nope", 404, b"not found\n"),
                ("/users/42", 200, b"user"), ("/users/x", 404, b"not found\n")]
        s.sendall(b"".join(request("GET", p) for p, _, _ in reqs))
        for path, status, body in reqs:
            resp = r.read_response()
            self.assertEqual((resp.status, resp.body), (status, body), path)
        self.assertEqual(r.buf, b"")
        self.assertTrue(still_open(r, 0.3))

    def test_pipelining_many(self):
        s, r = self.connect()
        n = 200
        s.sendall(b"".join(request("GET", "/plaintext" if i % 2 else "/json") for i in range(n)))
        for i in range(n):
            self.assertOk(r.read_response(), HELLO if i % 2 else JSON)
        self.assertEqual(r.buf, b"")

    def test_pipelining_after_content_length_body(self):
        s, r = self.connect()
        body = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"  # a body that looks like a request
        s.sendall(request("POST", "/echo", body=body) + request("PUT", "/echo", body=b"abc") +
                  request("GET", "/plaintext"))
        self.assertOk(r.read_response(), b"posted")
        self.assertOk(r.read_response(), b"put")
        self.assertOk(r.read_response(), HELLO)
        self.assertEqual(r.buf, b"")
        self.assertTrue(still_open(r, 0.3))

    def test_pipelining_after_chunked_body(self):
        s, r = self.connect()
        # Chunk data that looks like a request must not be taken for one.
        inner = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
        chunked = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n" + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n")
        s.sendall(chunked + request("GET", "/plaintext") + chunked + request("GET", "/json"))
        self.assertOk(r.read_response(), b"posted")
        self.assertOk(r.read_response(), HELLO)
        self.assertOk(r.read_response(), b"posted")
        self.assertOk(r.read_response(), JSON)
        self.assertEqual(r.buf, b"")

    def test_pipelined_request_split_across_sends(self):
        s, r = self.connect()
        raw = request("GET", "/plaintext") + request("POST", "/echo", body=b"x" * 100) + request("GET", "/json")
        # Every split point must give the same answers.
        for cut in (1, 10, 30, len(raw) // 2, len(raw) - 1):
            s.sendall(raw[:cut])
            s.sendall(raw[cut:])
            self.assertOk(r.read_response(), HELLO)
            self.assertOk(r.read_response(), b"posted")
            self.assertOk(r.read_response(), JSON)

    # --- request bodies -----------------------------------------------------------------------

    def test_content_length_body(self):
        s, r = self.connect()
        s.sendall(request("POST", "/echo", body=b"a" * 1000))
        self.assertOk(r.read_response(), b"posted")
        # A body sent in pieces after the head.
        s.sendall(request("PUT", "/echo", headers={"Content-Length": "10"}))
        s.sendall(b"01234")
        s.sendall(b"56789")
        self.assertOk(r.read_response(), b"put")

    def test_large_bodies_then_pipelined_request(self):
        # Bodies across many receive buffers, exactly at the default max_body_bytes (1 MiB).
        s, r = self.connect()
        s.sendall(request("POST", "/echo", body=b"z" * (1 << 20)) + request("GET", "/json"))
        self.assertOk(r.read_response(), b"posted")
        self.assertOk(r.read_response(), JSON)
        chunks = b"".join(b"%x\r\n" % 1000 + b"c" * 1000 + b"\r\n" for _ in range(1000))
        s.sendall(request("PUT", "/echo", headers={"Transfer-Encoding": "chunked"}) + chunks + b"0\r\n\r\n" +
                  request("GET", "/plaintext"))
        self.assertOk(r.read_response(), b"put")
        self.assertOk(r.read_response(), HELLO)
        self.assertEqual(r.buf, b"")

    def test_chunked_body_with_extensions_and_trailers(self):
        s, r = self.connect()
        raw = (b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;name=value;flag\r\nhello\r\n"
               b"6 ; q=\"a \\\"quoted\\\" ext\"\r\n world\r\n"
               b"A\r\n0123456789\r\n"
               b"0;last=1\r\n"
               b"X-Checksum: abc\r\nX-Other: 1 2 3\r\n\r\n")
        s.sendall(raw + request("GET", "/json"))
        self.assertOk(r.read_response(), b"posted")
        self.assertOk(r.read_response(), JSON)
        self.assertEqual(r.buf, b"")

    def test_chunked_body_byte_by_byte(self):
        s, r = self.connect()
        raw = (b"PUT /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n") + request("GET", "/plaintext")
        for i in range(len(raw)):
            s.sendall(raw[i:i + 1])
        self.assertOk(r.read_response(), b"put")
        self.assertOk(r.read_response(), HELLO)

    def test_transfer_encoding_is_case_insensitive(self):
        s, r = self.connect()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\ntransfer-encoding: Chunked\r\n\r\n"
                  b"2\r\nhi\r\n0\r\n\r\n" + request("GET", "/json"))
        self.assertOk(r.read_response(), b"posted")
        self.assertOk(r.read_response(), JSON)

    def test_expect_100_continue(self):
        s, r = self.connect()
        s.sendall(request("POST", "/echo", headers={"Content-Length": "11", "Expect": "100-continue"}))
        interim = r.read_response()
        self.assertEqual(interim.status, 100)
        self.assertEqual(interim.raw_head, b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello world")
        self.assertOk(r.read_response(), b"posted")
        # The connection goes on normally.
        s.sendall(request("GET", "/plaintext"))
        self.assertOk(r.read_response(), HELLO)
        self.assertEqual(r.buf, b"")

    def test_expect_100_continue_chunked(self):
        s, r = self.connect()
        s.sendall(request("PUT", "/echo", headers={"Transfer-Encoding": "chunked", "Expect": "100-Continue"}))
        self.assertEqual(r.read_until(b"\r\n\r\n"), b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"4\r\nbody\r\n0\r\n\r\n")
        self.assertOk(r.read_response(), b"put")

    def test_expect_100_continue_with_body_already_sent(self):
        # The client did not wait: no interim response is needed, the final one comes.
        s, r = self.connect()
        s.sendall(request("POST", "/echo", headers={"Expect": "100-continue"}, body=b"abc") +
                  request("GET", "/json"))
        first = r.read_response()
        self.assertIn(first.status, (100, 200))
        if first.status == 100:
            first = r.read_response()
        self.assertOk(first, b"posted")
        self.assertOk(r.read_response(), JSON)

    def test_expect_other_is_417(self):
        s, r = self.connect()
        s.sendall(request("POST", "/echo", headers={"Content-Length": "3", "Expect": "something-else"}) + b"abc")
        resp = r.read_response()
        self.assertEqual(resp.status, 417)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())

    # --- HEAD ---------------------------------------------------------------------------------

    def test_head(self):
        s, r = self.connect()
        s.sendall(request("HEAD", "/plaintext") + request("HEAD", "/json") + request("GET", "/json"))
        head = r.read_response(head_request=True)
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("content-length"), str(len(HELLO)))
        self.assertEqual(head.header("content-type"), "text/plain; charset=utf-8")
        head = r.read_response(head_request=True)
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("content-length"), str(len(JSON)))
        # No body bytes: the next response starts right after the head.
        self.assertOk(r.read_response(), JSON)
        self.assertEqual(r.buf, b"")

    def test_head_of_unknown_path(self):
        s, r = self.connect()
        s.sendall(request("HEAD", "/nope") + request("GET", "/plaintext"))
        head = r.read_response(head_request=True)
        self.assertEqual(head.status, 404)
        self.assertOk(r.read_response(), HELLO)

    # --- errors from routing ------------------------------------------------------------------

    def test_404(self):
        s, r = self.connect()
        s.sendall(request("GET", "/does/not/exist"))
        resp = r.read_response()
        self.assertEqual(resp.status, 404)
        self.assertEqual(resp.reason, "Not Found")
        self.assertEqual(resp.body, b"not found\n")
        # A 404 does not end the connection.
        s.sendall(request("GET", "/plaintext"))
        self.assertOk(r.read_response(), HELLO)

    def test_405_with_allow(self):
        s, r = self.connect()
        s.sendall(request("POST", "/plaintext", body=b"x"))
        resp = r.read_response()
        self.assertEqual(resp.status, 405)
        self.assertEqual(resp.header("allow"), "GET, HEAD, OPTIONS")  # OPTIONS: answered for every route
        s.sendall(request("DELETE", "/echo"))
        resp = r.read_response()
        self.assertEqual(resp.status, 405)
        self.assertEqual(resp.header("allow"), "POST, PUT, OPTIONS")
        s.sendall(request("OPTIONS", "/echo"))
        resp = r.read_response()
        self.assertEqual((resp.status, resp.header("allow")), (204, "POST, PUT, OPTIONS"))
        s.sendall(request("GET", "/plaintext"))
        self.assertOk(r.read_response(), HELLO)

    def test_501_unknown_method(self):
        s, r = self.connect()
        s.sendall(request("BREW", "/plaintext"))
        resp = r.read_response()
        self.assertEqual(resp.status, 501)
        self.assertEqual(resp.reason, "Not Implemented")
        s.sendall(request("GET", "/json"))
        self.assertOk(r.read_response(), JSON)

    def test_typed_path_params(self):
        self.assertOk(exchange(self.server, request("GET", "/users/123")), b"user")
        self.assertOk(exchange(self.server, request("GET", "/users/0")), b"user")
        for bad in ("/users/abc", "/users/12a", "/users/", "/users/1/2"):
            self.assertEqual(exchange(self.server, request("GET", bad)).status, 404, bad)

    # --- versions and Connection --------------------------------------------------------------

    def test_http10_closes(self):
        s, r = self.connect()
        s.sendall(b"GET /plaintext HTTP/1.0\r\n\r\n")
        resp = r.read_response()
        self.assertOk(resp, HELLO)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())
        self.assertEqual(r.buf, b"")

    def test_http10_keep_alive(self):
        s, r = self.connect()
        for path, body in (("/plaintext", HELLO), ("/json", JSON), ("/users/5", b"user")):
            s.sendall(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            resp = r.read_response()
            self.assertOk(resp, body)
            self.assertEqual(resp.header("connection"), "keep-alive")
        self.assertTrue(still_open(r, 0.3))
        # Without keep-alive the next one ends the connection.
        s.sendall(b"GET /json HTTP/1.0\r\n\r\n")
        resp = r.read_response()
        self.assertOk(resp, JSON)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())

    def test_connection_close(self):
        s, r = self.connect()
        s.sendall(request("GET", "/plaintext", headers={"Connection": "close"}))
        resp = r.read_response()
        self.assertOk(resp, HELLO)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())
        self.assertEqual(r.buf, b"")

    def test_connection_close_stops_the_pipeline(self):
        # Requests after the one with Connection: close are not answered.
        s, r = self.connect()
        s.sendall(request("GET", "/json") + request("GET", "/plaintext", headers={"Connection": "close"}) +
                  request("GET", "/json"))
        self.assertOk(r.read_response(), JSON)
        resp = r.read_response()
        self.assertOk(resp, HELLO)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())
        self.assertEqual(r.buf, b"")

    def test_connection_close_among_other_tokens(self):
        s, r = self.connect()
        s.sendall(request("GET", "/plaintext", headers={"Connection": "foo, Close"}))
        resp = r.read_response()
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())

    def test_http11_minor_versions(self):
        # Other 1.x minors are treated as 1.1 (keep-alive, Host required).
        s, r = self.connect()
        s.sendall(b"GET /plaintext HTTP/1.7\r\nHost: x\r\n\r\n")
        self.assertOk(r.read_response(), HELLO)
        s.sendall(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertOk(r.read_response(), JSON)

    def test_leading_empty_lines_are_skipped(self):
        s, r = self.connect()
        s.sendall(b"\r\n\r\n" + request("GET", "/plaintext"))
        self.assertOk(r.read_response(), HELLO)


if __name__ == "__main__":
    unittest.main()
