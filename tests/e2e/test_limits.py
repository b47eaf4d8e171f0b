"""End-to-end limits and request-smuggling rejections (stages/http/parser.h).

Every limit is probed exactly at the limit (accepted) and one byte / one field past it (rejected
with its status). Every malformed request gets its status, then the server closes the connection
and keeps serving other clients.
"""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Reader, Server, SharedServerTest, config, exchange, request  # noqa: E402

MAX_REQUEST_LINE = 256
MAX_HEADER_BYTES = 1024
MAX_HEADER_COUNT = 10
MAX_BODY_BYTES = 1024

LIMITS = f"""
limits:
  max_request_line: {MAX_REQUEST_LINE}B
  max_header_bytes: 1KiB
  max_header_count: {MAX_HEADER_COUNT}
  max_body_bytes: 1KiB
"""

HELLO = b"Hello, World!"


def chunk(data):
    return b"%x\r\n" % len(data) + data + b"\r\n"


def padded_head(total, method="GET", path="/plaintext", extra=b""):
    """A complete head (request line + fields + final CRLF) of exactly `total` bytes."""
    start = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n".encode() + extra + b"X-Pad: "
    pad = total - len(start) - len(b"\r\n\r\n")
    assert pad >= 1, pad
    head = start + b"p" * pad + b"\r\n\r\n"
    assert len(head) == total
    return head


class LimitsTest(SharedServerTest, unittest.TestCase):
    CONFIG = config(LIMITS)

    def assertServes(self):
        resp = exchange(self.server, request("GET", "/plaintext"))
        self.assertEqual((resp.status, resp.body), (200, HELLO))

    def assertAccepted(self, raw, body=HELLO):
        """raw is answered 200 with `body`, and the connection stays usable."""
        s, r = self.connect()
        s.sendall(raw)
        resp = r.read_response()
        self.assertEqual((resp.status, resp.body), (200, body), resp)
        s.sendall(request("GET", "/json"))
        self.assertEqual(r.read_response().status, 200)

    def assertRejected(self, raw, status, send_in_pieces=False):
        """raw gets `status`, with Connection: close, then the server closes the connection."""
        s, r = self.connect()
        if send_in_pieces:
            for i in range(0, len(raw), 7):
                s.sendall(raw[i:i + 7])
        else:
            s.sendall(raw)
        resp = r.read_response()
        self.assertEqual(resp.status, status, (raw[:120], resp))
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed(), "the server did not close the connection")
        self.assertEqual(r.buf, b"")
        self.assertServes()
        return resp

    # --- request line: 414 --------------------------------------------------------------------

    def test_request_line_at_limit(self):
        # "GET /plaintext?qqq HTTP/1.1\r\n": the CRLF counts.
        fixed = len("GET /plaintext? HTTP/1.1\r\n")
        line = f"GET /plaintext?{'q' * (MAX_REQUEST_LINE - fixed)} HTTP/1.1\r\n"
        self.assertEqual(len(line), MAX_REQUEST_LINE)
        self.assertAccepted(line.encode() + b"Host: x\r\n\r\n")

    def test_request_line_one_past_limit(self):
        fixed = len("GET /plaintext? HTTP/1.1\r\n")
        line = f"GET /plaintext?{'q' * (MAX_REQUEST_LINE - fixed + 1)} HTTP/1.1\r\n"
        self.assertEqual(len(line), MAX_REQUEST_LINE + 1)
        resp = self.assertRejected(line.encode() + b"Host: x\r\n\r\n", 414)
        self.assertEqual(resp.reason, "URI Too Long")

    def test_request_line_one_past_limit_in_pieces(self):
        fixed = len("GET /plaintext? HTTP/1.1\r\n")
        line = f"GET /plaintext?{'q' * (MAX_REQUEST_LINE - fixed + 1)} HTTP/1.1\r\n"
        self.assertRejected(line.encode() + b"Host: x\r\n\r\n", 414, send_in_pieces=True)

    def test_request_line_without_end_is_414_before_the_head_ends(self):
        # No CRLF yet: the server must not wait for more once the limit is passed.
        s, r = self.connect()
        s.sendall(b"GET /" + b"a" * MAX_REQUEST_LINE)
        resp = r.read_response()
        self.assertEqual(resp.status, 414)
        self.assertTrue(r.closed())

    # --- head size: 431 -----------------------------------------------------------------------

    def test_header_bytes_at_limit(self):
        self.assertAccepted(padded_head(MAX_HEADER_BYTES))

    def test_header_bytes_one_past_limit(self):
        self.assertRejected(padded_head(MAX_HEADER_BYTES + 1), 431)

    def test_header_bytes_one_past_limit_in_pieces(self):
        self.assertRejected(padded_head(MAX_HEADER_BYTES + 1), 431, send_in_pieces=True)

    def test_header_bytes_at_limit_in_pieces(self):
        s, r = self.connect()
        raw = padded_head(MAX_HEADER_BYTES)
        for i in range(0, len(raw), 100):
            s.sendall(raw[i:i + 100])
        resp = r.read_response()
        self.assertEqual((resp.status, resp.body), (200, HELLO))

    def test_header_bytes_exclude_leading_empty_lines(self):
        self.assertAccepted(b"\r\n\r\n" + padded_head(MAX_HEADER_BYTES))

    def test_header_bytes_limit_with_a_body(self):
        # The body does not count toward the head.
        head = padded_head(MAX_HEADER_BYTES, method="POST", path="/echo", extra=b"Content-Length: 1000\r\n")
        self.assertAccepted(head + b"b" * 1000, body=b"posted")

    def test_header_bytes_never_ending_head(self):
        s, r = self.connect()
        s.sendall(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n")
        for i in range(100):
            try:
                s.sendall(b"X-Field-%03d: %s\r\n" % (i, b"v" * 40))
            except (BrokenPipeError, ConnectionResetError):
                break
        resp = r.read_response()
        self.assertEqual(resp.status, 431)
        self.assertTrue(r.closed())

    # --- header count: 431 --------------------------------------------------------------------

    def fields(self, n):
        # Host plus n - 1 others: n fields.
        return "".join(f"X-F{i}: {i}\r\n" for i in range(n - 1)).encode()

    def test_header_count_at_limit(self):
        self.assertAccepted(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n" + self.fields(MAX_HEADER_COUNT) + b"\r\n")

    def test_header_count_one_past_limit(self):
        resp = self.assertRejected(
            b"GET /plaintext HTTP/1.1\r\nHost: x\r\n" + self.fields(MAX_HEADER_COUNT + 1) + b"\r\n", 431)
        self.assertEqual(resp.reason, "Request Header Fields Too Large")

    # --- body size: 413 -----------------------------------------------------------------------

    def test_content_length_at_limit(self):
        self.assertAccepted(request("POST", "/echo", body=b"b" * MAX_BODY_BYTES), body=b"posted")

    def test_content_length_one_past_limit(self):
        resp = self.assertRejected(request("POST", "/echo", body=b"b" * (MAX_BODY_BYTES + 1)), 413)
        self.assertEqual(resp.reason, "Content Too Large")

    def test_content_length_past_limit_answered_before_the_body(self):
        # The 413 comes from the head alone: the client need not send the body.
        s, r = self.connect()
        s.sendall(request("POST", "/echo", headers={"Content-Length": str(10 * MAX_BODY_BYTES)}))
        resp = r.read_response()
        self.assertEqual(resp.status, 413)
        self.assertTrue(r.closed())

    def test_content_length_past_limit_with_expect_continue_gets_no_100(self):
        s, r = self.connect()
        s.sendall(request("POST", "/echo", headers={"Content-Length": str(MAX_BODY_BYTES + 1),
                                                    "Expect": "100-continue"}))
        resp = r.read_response()
        self.assertEqual(resp.status, 413)
        self.assertTrue(r.closed())

    def test_chunked_total_at_limit(self):
        body = chunk(b"a" * 500) + chunk(b"b" * 500) + chunk(b"c" * (MAX_BODY_BYTES - 1000)) + b"0\r\n\r\n"
        self.assertAccepted(request("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) + body,
                            body=b"posted")

    def test_chunked_total_one_past_limit(self):
        body = chunk(b"a" * 500) + chunk(b"b" * 500) + chunk(b"c" * (MAX_BODY_BYTES - 999)) + b"0\r\n\r\n"
        self.assertRejected(request("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) + body, 413)

    def test_chunked_single_chunk_past_limit(self):
        body = chunk(b"a" * (MAX_BODY_BYTES + 1)) + b"0\r\n\r\n"
        self.assertRejected(request("PUT", "/echo", headers={"Transfer-Encoding": "chunked"}) + body, 413)

    def test_chunked_past_limit_in_pieces(self):
        body = chunk(b"a" * 600) + chunk(b"b" * 425) + b"0\r\n\r\n"
        self.assertRejected(request("PUT", "/echo", headers={"Transfer-Encoding": "chunked"}) + body, 413,
                            send_in_pieces=True)

    # --- smuggling and malformed input --------------------------------------------------------

    CASES = {
        # name: (raw request, status)
        "cl_and_te": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0\r\n\r\n", 400),
        "te_and_cl": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                      b"0\r\n\r\n", 400),
        "duplicate_cl_equal": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
                               b"hello", 400),
        "duplicate_cl_different": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
                                   b"hello!", 400),
        "cl_list": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
        "cl_plus": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400),
        "cl_hex": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello", 400),
        "cl_two_numbers": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5 5\r\n\r\nhello", 400),
        "cl_negative": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        "cl_empty": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n", 400),
        "cl_overflow": (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
        "te_chunked_not_last": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
                                b"0\r\n\r\n", 400),
        "te_chunked_twice": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        "te_chunked_then_other_field": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                        b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400),
        "te_unknown": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        "te_unknown_before_chunked": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                      b"0\r\n\r\n", 501),
        "te_in_http10": (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        "te_invalid_token": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \"chunked\"\r\n\r\n"
                             b"0\r\n\r\n", 400),
        "obs_fold": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
        "obs_fold_tab": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n", 400),
        "bare_cr_in_value": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
        "bare_cr_line_end": (b"GET /plaintext HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400),
        "bare_lf_line_end": (b"GET /plaintext HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
        "bare_lf_everywhere": (b"GET /plaintext HTTP/1.1\nHost: x\n\n", 400),
        "bare_lf_head_end": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\n", 400),
        "nul_in_value": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
        "nul_in_target": (b"GET /plain\x00text HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "space_before_colon": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", 400),
        "tab_before_colon": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nContent-Length\t: 0\r\n\r\n", 400),
        "missing_host": (b"GET /plaintext HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
        "duplicate_host": (b"GET /plaintext HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        "duplicate_host_equal": (b"GET /plaintext HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        "invalid_host": (b"GET /plaintext HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        "invalid_method": (b"G@T /plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "method_with_paren": (b"GET(1) /plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "empty_method": (b" /plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "two_spaces": (b"GET  /plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "http2": (b"GET /plaintext HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        "http09_style": (b"GET /plaintext\r\n\r\n", 400),
        "bad_version": (b"GET /plaintext HTTP/1.x\r\nHost: x\r\n\r\n", 400),
        "lower_case_version": (b"GET /plaintext http/1.1\r\nHost: x\r\n\r\n", 400),
        "relative_target": (b"GET plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "star_target_for_get": (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "userinfo_target": (b"GET http://user@localhost/plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "ctl_in_target": (b"GET /plain\x01text HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "ctl_in_value": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400),
        "invalid_field_name": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n", 400),
        "empty_field_name": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\n: b\r\n\r\n", 400),
        "field_without_colon": (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A\r\n\r\n", 400),
        "too_many_empty_lines": (b"\r\n" * 5 + b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        "invalid_chunk_size": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"xyz\r\nhello\r\n0\r\n\r\n", 400),
        "chunk_size_with_junk": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5x\r\nhello\r\n0\r\n\r\n", 400),
        "chunk_size_negative": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"-5\r\nhello\r\n0\r\n\r\n", 400),
        "chunk_size_plus": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"+5\r\nhello\r\n0\r\n\r\n", 400),
        "chunk_size_overflow": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"10000000000000005\r\nhello\r\n0\r\n\r\n", 400),
        "chunk_size_bare_lf": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\nhello\r\n0\r\n\r\n", 400),
        "chunk_data_too_long": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"5\r\nhello!\r\n0\r\n\r\n", 400),
        "chunk_data_bare_lf": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\n0\r\n\r\n", 400),
        "chunk_ext_bad": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5;=x\r\nhello\r\n0\r\n\r\n", 400),
        "chunk_ext_unterminated_quote": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                         b"5;a=\"x\r\nhello\r\n0\r\n\r\n", 400),
        "trailer_obs_fold": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\nT: a\r\n b\r\n\r\n", 400),
        "trailer_bare_lf": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5\r\nhello\r\n0\r\nT: a\n\r\n", 400),
        "trailer_space_before_colon": (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"5\r\nhello\r\n0\r\nT : a\r\n\r\n", 400),
    }

    def test_rejections(self):
        for name, (raw, status) in self.CASES.items():
            with self.subTest(name):
                self.assertRejected(raw, status)

    def test_rejections_in_pieces(self):
        # The same answer whatever way the bytes arrive.
        for name, (raw, status) in self.CASES.items():
            with self.subTest(name):
                self.assertRejected(raw, status, send_in_pieces=True)

    def test_rejection_after_a_good_request(self):
        # A pipelined good request is answered, then the bad one, then the connection ends;
        # nothing after the bad one is answered.
        s, r = self.connect()
        s.sendall(request("GET", "/json") +
                  b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc" +
                  request("GET", "/plaintext"))
        self.assertEqual(r.read_response().status, 200)
        resp = r.read_response()
        self.assertEqual(resp.status, 400)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())
        self.assertEqual(r.buf, b"")

    def test_bad_chunk_after_good_chunks(self):
        s, r = self.connect()
        s.sendall(request("POST", "/echo", headers={"Transfer-Encoding": "chunked"}) +
                  chunk(b"hello") + b"zz\r\n" + request("GET", "/plaintext"))
        resp = r.read_response()
        self.assertEqual(resp.status, 400)
        self.assertTrue(r.closed())
        self.assertEqual(r.buf, b"")

    def test_trailer_count_and_size(self):
        head = request("POST", "/echo", headers={"Transfer-Encoding": "chunked"})
        ok = b"".join(b"T%d: v\r\n" % i for i in range(MAX_HEADER_COUNT))
        self.assertAccepted(head + chunk(b"hi") + b"0\r\n" + ok + b"\r\n", body=b"posted")
        too_many = b"".join(b"T%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
        self.assertRejected(head + chunk(b"hi") + b"0\r\n" + too_many + b"\r\n", 431)
        # Trailer section (fields and the final CRLF) exactly max_header_bytes, then one more.
        field = b"T: " + b"v" * (MAX_HEADER_BYTES - len(b"T: \r\n\r\n")) + b"\r\n"
        self.assertEqual(len(field + b"\r\n"), MAX_HEADER_BYTES)
        self.assertAccepted(head + chunk(b"hi") + b"0\r\n" + field + b"\r\n", body=b"posted")
        field = b"T: " + b"v" * (MAX_HEADER_BYTES + 1 - len(b"T: \r\n\r\n")) + b"\r\n"
        self.assertRejected(head + chunk(b"hi") + b"0\r\n" + field + b"\r\n", 431)

    def test_many_bad_clients_then_good_ones(self):
        for _ in range(3):
            for raw, status in list(self.CASES.values())[:10]:
                self.assertEqual(exchange(self.server, raw).status, status)
        for _ in range(20):
            self.assertServes()


class DefaultLimitsTest(unittest.TestCase):
    """The default limits (16 KiB head, 100 fields), with heads larger than one 8 KiB receive
    buffer: the head is assembled across reads."""

    HEAD_MAX = 16 * 1024

    @classmethod
    def setUpClass(cls):
        cls.server = Server(config())

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def head_of(self, total):
        """A head of exactly `total` bytes, with fields of up to 1000 bytes."""
        start = b"GET /plaintext HTTP/1.1\r\nHost: localhost\r\n"
        left = total - len(start) - 2
        fields = []
        while left > 0:
            n = min(left, 1000)
            if n < 6:
                fields[-1] = fields[-1][:-2] + b"v" * n + b"\r\n"
                break
            fields.append(b"X: " + b"v" * (n - 5) + b"\r\n")
            left -= n
        head = start + b"".join(fields) + b"\r\n"
        assert len(head) == total
        return head

    def test_heads_across_receive_buffers(self):
        for total in (8191, 8192, 8193, 12000, self.HEAD_MAX):
            with self.subTest(total=total), self.server.connect() as s:
                r = Reader(s)
                s.sendall(self.head_of(total) + request("GET", "/json"))
                self.assertEqual((r.read_response().status, r.read_response().status), (200, 200))

    def test_head_in_pieces_at_limit(self):
        with self.server.connect() as s:
            head = self.head_of(self.HEAD_MAX)
            for i in range(0, len(head), 1000):
                s.sendall(head[i:i + 1000])
            resp = Reader(s).read_response()
            self.assertEqual((resp.status, resp.body), (200, HELLO))

    def test_head_one_past_default_limit(self):
        with self.server.connect() as s:
            r = Reader(s)
            s.sendall(self.head_of(self.HEAD_MAX + 1) + request("GET", "/json"))
            self.assertEqual(r.read_response().status, 431)
            self.assertTrue(r.closed())
            self.assertEqual(r.buf, b"")

    def test_default_header_count(self):
        fields = "".join(f"X-{i}: v\r\n" for i in range(99)).encode()
        resp = exchange(self.server, b"GET /plaintext HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        self.assertEqual(resp.status, 200)
        resp = exchange(self.server, b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-100: v\r\n" + fields + b"\r\n")
        self.assertEqual(resp.status, 431)


if __name__ == "__main__":
    unittest.main()
