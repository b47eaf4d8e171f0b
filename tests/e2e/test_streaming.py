"""Streamed response bodies end to end, at the byte level (raw sockets): chunks leave while the
generator is still running, memory stays bounded for a big body a client reads slowly, a client
that stops reading is cut after server.stream_stall_timeout, a client that goes away stops the
generator, a cut stream never looks complete, a declared Content-Length is honoured exactly,
HEAD / HTTP/1.0 / pipelining, and the framing fields an application must not control; then
edges: a slow but steady reader, half-closed clients, bodiless statuses, a stream's close() under
its budget, an exhausted chunk pool, SIGTERM during an endless stream.

The app is tests/e2e/apps/stream_app.py. Waits are bounded (PROMPT_S, wait_for), never timed
assertions: a piece that must already be on its way either arrives or the test fails.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import ROOT, Reader, Server, request  # noqa: E402
from test_connections import (baseline_fd_count, connection_states, fd_links, server_connection_fds,  # noqa: E402
                              server_fd_links, settled_fd_count, wait_for)

os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

APPS = os.path.join(HERE, "apps")
PYHANDLERS = os.path.join(ROOT, "pyhandlers")
TEXT = "text/plain; charset=utf-8"
INTERNAL_ERROR = b"internal server error\n"

# What a reader waits for a piece that must already be on its way. The app's waiting steps wait
# up to 10 s (stream_app.WAIT_MAX_S), so a piece held back until the step ends misses this.
PROMPT_S = 5.0

# /big of stream_app: 640 parts of 64 KiB.
BIG_PART = 64 * 1024
BIG_PARTS = 640


def big_part(i):
    return i.to_bytes(4, "big") * (BIG_PART // 4)


def stream_config(server="", pipeline_plugins="", extra_path=()):
    paths = ", ".join(json.dumps(p) for p in (APPS, *extra_path))
    if "keepalive_timeout" not in server:
        server = "  keepalive_timeout: 10s\n" + server
    return f"""
admin: {{listen: 127.0.0.1:0}}
server:
{server}
python:
  app: "stream_app:app"
  path: [{paths}]
routes:
  - {{path: /plaintext, body: "Hello, World!"}}
pipeline:
  - {{stage: accept}}
  - {{stage: parse}}
  - {{stage: route}}
{pipeline_plugins}
  - {{stage: python}}
  - {{stage: serialize}}
  - {{stage: send}}
"""


# configs/examples/plugins.yaml's two plugins, with an API key for every path but /json.
PLUGINS = """
  - {stage: python-plugin, name: auth, plugin: "examples.plugins:ApiKeyAuth",
     config: {keys: [secret-1], header: X-Api-Key, public: [/json]}}
  - {stage: python-plugin, name: counter, plugin: "examples.plugins:RequestCounter",
     config: {header: X-Request-Count}}
"""


def admin_stats(server):
    m = re.search(r"admin listening on http://([\d.]+:\d+)", server.read_log())
    with urllib.request.urlopen(f"http://{m.group(1)}/stats", timeout=10) as f:
        return json.load(f)


def stage_extra(server, stage, name):
    for s in admin_stats(server)["stages"]:
        if s["name"] == stage:
            return s["extra"].get(name, 0)
    raise KeyError(stage)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1))


def head_fields(head):
    """[(lower-case name, value)] of a raw response head."""
    lines = head.split(b"\r\n")
    out = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        out.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    return out


def field_values(head, name):
    return [v for k, v in head_fields(head) if k == name.lower()]


def status_of(head):
    return int(head.split(b" ", 2)[1])


def read_head(reader):
    head = reader.read_until(b"\r\n\r\n")
    # Every line ends with CRLF: a bare LF would be a line end to some clients (a split).
    assert head.count(b"\n") == head.count(b"\r\n"), head
    return head


def read_chunk(reader):
    """One chunk's data; None for the last chunk (whose CRLF it consumes too)."""
    line = reader.read_until(b"\r\n")
    size = int(line[:-2], 16)
    if size == 0:
        assert reader.read_exact(2) == b"\r\n"
        return None
    data = reader.read_exact(size)
    assert reader.read_exact(2) == b"\r\n"
    return data


def read_chunked_body(reader):
    parts = []
    while (data := read_chunk(reader)) is not None:
        parts.append(data)
    return b"".join(parts)


def read_to_eof(reader):
    """Everything until the server ends the connection (a reset counts as the end)."""
    data, reader.buf = reader.buf, b""
    while True:
        try:
            chunk = reader.sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def quote(s):
    return urllib.parse.quote(s, safe="")


class StreamTest(unittest.TestCase):
    """A server per class; a scratch directory for the files the app waits for."""

    CONFIG = stream_config()

    @classmethod
    def setUpClass(cls):
        cls.server = Server(cls.CONFIG)
        cls.scratch = tempfile.mkdtemp(prefix="metronome-stream-")

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)
        shutil.rmtree(cls.scratch, ignore_errors=True)

    def connect(self, timeout=PROMPT_S):
        s = self.server.connect(timeout=timeout)
        self.addCleanup(s.close)
        return s, Reader(s)

    def flag(self):
        return os.path.join(self.scratch, "flag-" + uuid.uuid4().hex)

    def exchange(self, raw):
        """One response on a connection of its own, closed afterwards (fd counts settle)."""
        with self.server.connect(timeout=PROMPT_S) as s:
            s.sendall(raw)
            return Reader(s).read_response()

    def events(self, name):
        resp = self.exchange(request("GET", f"/events?id={name}"))
        self.assertEqual(resp.status, 200, resp)
        return json.loads(resp.body)

    def prompt(self, what, fn, *args):
        """fn(*args), failing the test (not erroring) if it waits past PROMPT_S."""
        try:
            return fn(*args)
        except socket.timeout:
            self.fail(f"{what} did not arrive within {PROMPT_S} s")

    def assertOneChunkedHead(self, head, status=200):
        self.assertEqual(status_of(head), status, head)
        self.assertEqual(field_values(head, "transfer-encoding"), ["chunked"], head)
        self.assertEqual(field_values(head, "content-length"), [], head)

    def assertCut(self, reader, expected_rest):
        """After the head: exactly `expected_rest`, then the end of the connection (no last chunk,
        no next response)."""
        rest = read_to_eof(reader)
        self.assertEqual(rest, expected_rest)
        self.assertNotIn(b"0\r\n\r\n", rest)

    def json_ok(self):
        resp = self.exchange(request("GET", "/json"))
        return resp.status == 200 and resp.body == b'{"message":"Hello, World!"}'


# --- 1. chunks leave as they are produced ---------------------------------------------------

class ChunksLeaveAsProduced(StreamTest):
    def check_waiting_stream(self, path, first, second, headers=None):
        """The head and `first` arrive while the generator waits for its file; `second` and the
        last chunk once the file exists. Returns the head."""
        flag = self.flag()
        s, r = self.connect()
        s.sendall(request("GET", f"{path}?file={quote(flag)}", headers=headers))
        head = self.prompt("the head (sent before the generator's next step)", read_head, r)
        self.assertOneChunkedHead(head)
        self.assertEqual(self.prompt("the first chunk, while the generator still runs", read_chunk, r), first)
        self.assertFalse(os.path.exists(flag))
        with open(flag, "w"):
            pass
        self.assertEqual(self.prompt("the second chunk", read_chunk, r), second)
        self.assertIsNone(self.prompt("the last chunk", read_chunk, r))
        # The connection goes on.
        s.sendall(request("GET", "/json"))
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')
        return head

    def test_generator_chunks_leave_before_it_ends(self):
        head = self.check_waiting_stream("/wait", b"a", b"b")
        self.assertEqual(field_values(head, "content-type"), [TEXT])

    def test_server_sent_events(self):
        head = self.check_waiting_stream("/sse", b"data: one\n\n", b"data: two\n\n")
        self.assertEqual(field_values(head, "content-type"), ["text/event-stream"])

    def test_second_stream_on_the_connection_leaves_as_produced(self):
        # The first step of a stream that is not the connection's first request.
        s, r = self.connect()
        s.sendall(request("GET", "/json"))
        self.assertEqual(r.read_response().status, 200)
        flag = self.flag()
        s.sendall(request("GET", f"/wait?file={quote(flag)}"))
        self.assertOneChunkedHead(self.prompt("the head", read_head, r))
        self.assertEqual(self.prompt("the first chunk", read_chunk, r), b"a")
        with open(flag, "w"):
            pass
        self.assertEqual(read_chunked_body(r), b"b")


class ChunksLeaveAsProducedWithPlugins(StreamTest):
    """configs/examples/plugins.yaml's plugins in the pipeline: RequestCounter's on_response sets
    a field on the response; it must stay a stream (the plugin sees the iterator) and carry it."""

    CONFIG = stream_config(pipeline_plugins=PLUGINS, extra_path=(PYHANDLERS,))
    KEY = {"X-Api-Key": "secret-1"}

    check_waiting_stream = ChunksLeaveAsProduced.check_waiting_stream

    def test_generator_with_plugins(self):
        head = self.check_waiting_stream("/wait", b"a", b"b", headers=self.KEY)
        self.assertEqual(len(field_values(head, "x-request-count")), 1, head)
        self.assertGreaterEqual(int(field_values(head, "x-request-count")[0]), 1)

    def test_server_sent_events_with_plugins(self):
        head = self.check_waiting_stream("/sse", b"data: one\n\n", b"data: two\n\n", headers=self.KEY)
        self.assertEqual(field_values(head, "content-type"), ["text/event-stream"])
        self.assertEqual(len(field_values(head, "x-request-count")), 1, head)

    def test_plugin_answer_is_not_a_stream(self):
        s, r = self.connect()
        s.sendall(request("GET", "/wait?file=x"))
        resp = r.read_response()
        self.assertEqual(resp.status, 401, resp)


# --- 2. bounded memory for a big body -------------------------------------------------------

class BigBodyBoundedMemory(StreamTest):
    def test_40_mib_read_late(self):
        self.assertTrue(self.json_ok())
        pauses_before = stage_extra(self.server, "python", "stream_pauses_total")
        rss_before = rss_kib(self.server.pid)
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/big?id=big"))
        time.sleep(1.0)  # read nothing: the server must pause the generator, not buffer it all
        rss_paused = rss_kib(self.server.pid)
        produced = self.events("big")["items"]
        pauses = stage_extra(self.server, "python", "stream_pauses_total")
        self.assertLess(produced, BIG_PARTS, "the generator ran to its end while the client read nothing")
        self.assertGreaterEqual(pauses - pauses_before, 1)
        self.assertLess(rss_paused - rss_before, 16 * 1024, f"RSS grew by {rss_paused - rss_before} KiB")
        # Now all of it, in order.
        head = read_head(r)
        self.assertOneChunkedHead(head)
        self.assertEqual(field_values(head, "content-type"), ["application/octet-stream"])
        got, want = hashlib.sha256(), hashlib.sha256()
        n = 0
        while (data := read_chunk(r)) is not None:
            got.update(data)
            n += len(data)
        for i in range(BIG_PARTS):
            want.update(big_part(i))
        self.assertEqual(n, BIG_PARTS * BIG_PART)
        self.assertEqual(got.hexdigest(), want.hexdigest(), "the body's bytes differ")
        ev = self.events("big")
        self.assertEqual(ev["items"], BIG_PARTS)
        self.assertTrue(ev["finally"])
        # The pool's chunks came back; nothing is left open.
        self.assertEqual(stage_extra(self.server, "python", "streams_open"), 0)


class PoolMemoryComesBack(StreamTest):
    """The chunk pool must not keep what big streams grew its chunks to: the pool hands its
    chunks out in turn, so each of its server.stream_chunks (4096) would keep a 64 KiB buffer."""

    def read_big(self, name):
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", f"/big?id={name}"))
        read_head(r)
        n = 0
        while (data := read_chunk(r)) is not None:
            n += len(data)
        self.assertEqual(n, BIG_PARTS * BIG_PART)
        s.close()

    def test_rss_after_big_streams(self):
        self.assertTrue(self.json_ok())
        rss_before = rss_kib(self.server.pid)
        for i in range(3):
            self.read_big(f"pool-mem-{i}")
        self.assertTrue(wait_for(lambda: stage_extra(self.server, "send", "stream_chunks_in_use") == 0))
        grown = rss_kib(self.server.pid) - rss_before
        self.assertLess(grown, 24 * 1024, f"RSS grew by {grown} KiB over three 40 MiB streams read whole")


# --- 3. a client that stops reading ---------------------------------------------------------

class StallTimeout(StreamTest):
    CONFIG = stream_config(server="  stream_stall_timeout: 1s\n  stream_buffer_size: 16KiB\n")

    def server_socket_inode(self, client):
        """The inode of the server's end of `client`'s connection."""
        port = client.getsockname()[1]
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    local, remote = fields[1], fields[2]
                    if int(local.rsplit(":", 1)[1], 16) == self.server.port and int(remote.rsplit(":", 1)[1], 16) == port:
                        return fields[9]
        return None

    def server_holds(self, inode):
        return any(link == f"socket:[{inode}]" for _, link in server_fd_links(self.server))

    def test_client_that_never_reads_is_cut(self):
        stalls_before = stage_extra(self.server, "python", "stream_stalls_total")
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/endless?id=stall"))
        inode = wait_for(lambda: self.server_socket_inode(s))
        self.assertIsNotNone(inode)
        # While it stalls, the python lane serves others.
        answered = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            self.assertTrue(self.json_ok(), "another connection was not served during the stall")
            answered += 1
            time.sleep(0.1)
        self.assertGreater(answered, 3)
        ev = wait_for(lambda: (e := self.events("stall"))["finally"] and e, timeout=10)
        self.assertTrue(ev, "the generator's finally did not run after the stall timeout")
        self.assertEqual(ev["exit"], "GeneratorExit")
        self.assertGreaterEqual(stage_extra(self.server, "python", "stream_stalls_total") - stalls_before, 1)
        # The server ended the connection: its socket is no longer among the server's fds.
        self.assertTrue(wait_for(lambda: not self.server_holds(inode), timeout=10),
                        f"the server still holds the stalled connection: {fd_links(self.server)}")
        # What the client reads now is a body cut short: chunks, and no last chunk.
        self.assertEqual(status_of(read_head(r)), 200)
        rest = read_to_eof(r)
        self.assertGreater(len(rest), 0)
        self.assertFalse(rest.endswith(b"0\r\n\r\n"), "a cut stream ended with the last chunk")
        self.assertTrue(self.json_ok())


# --- 4. a client that goes away mid-stream --------------------------------------------------

class ClientGone(StreamTest):
    def check_gone(self, name, query):
        baseline = baseline_fd_count(self.server)
        aborted_before = stage_extra(self.server, "send", "streams_aborted_total")
        log_before = len(self.server.read_log().splitlines())
        s, r = self.connect()
        s.sendall(request("GET", f"/endless?id={name}&{query}"))
        self.assertOneChunkedHead(read_head(r))
        self.assertIsNotNone(read_chunk(r))
        s.close()
        ev = wait_for(lambda: (e := self.events(name))["finally"] and e, timeout=10)
        self.assertTrue(ev, "the generator's finally did not run after the client left")
        self.assertEqual(ev["exit"], "GeneratorExit")
        self.assertTrue(wait_for(lambda: stage_extra(self.server, "send", "streams_aborted_total") > aborted_before))
        count = settled_fd_count(self.server, baseline)
        if count != baseline:
            self.fail(f"the server's fd count did not come back: {count} != {baseline}; "
                      f"{server_connection_fds(self.server)} connection sockets open, "
                      f"TCP states {connection_states(self.server.port)}, fds {fd_links(self.server)}")
        self.assertEqual(stage_extra(self.server, "python", "streams_open"), 0)
        new_lines = self.server.read_log().splitlines()[log_before:]
        self.assertLess(len(new_lines), 5, "\n".join(new_lines))
        self.assertTrue(self.json_ok())

    def test_gone_while_producing_small_parts(self):
        self.check_gone("gone-small", "size=100&sleep=0.01")

    def test_gone_while_paused_on_backpressure(self):
        # Big parts: the stream fills the buffers and waits for the client, which then leaves.
        self.check_gone("gone-big", "size=65536")


# --- 5. a body cut short never looks complete -----------------------------------------------

class Truncation(StreamTest):
    def test_raise_after_first_part(self):
        s, r = self.connect()
        s.sendall(request("GET", "/raise-after-one") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        self.assertCut(r, b"a\r\nfirst part\r\n")
        self.assertIn("E2E-STREAM-RAISE", self.server.read_log())
        self.assertTrue(self.json_ok())

    def test_cpu_budget_mid_stream(self):
        kills_before = stage_extra(self.server, "python", "budget_cpu_kills_total")
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/burn-after-one") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        self.assertCut(r, b"a\r\nfirst part\r\n")
        self.assertGreaterEqual(stage_extra(self.server, "python", "budget_cpu_kills_total") - kills_before, 1)
        self.assertTrue(self.json_ok())

    def test_cpu_budget_before_first_part_is_503(self):
        kills_before = stage_extra(self.server, "python", "budget_cpu_kills_total")
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/burn-before") + request("GET", "/json"))
        head = read_head(r)
        self.assertEqual(status_of(head), 503, head)
        self.assertEqual(field_values(head, "metronome-budget"), ["cpu"])
        self.assertEqual(field_values(head, "transfer-encoding"), [])
        self.assertEqual(r.read_exact(int(field_values(head, "content-length")[0])), b"request exceeded its cpu budget\n")
        self.assertEqual(r.read_response().status, 200)  # the connection goes on
        self.assertGreaterEqual(stage_extra(self.server, "python", "budget_cpu_kills_total") - kills_before, 1)


# --- 6. a declared Content-Length with an iterator ------------------------------------------

class DeclaredLength(StreamTest):
    def test_exact(self):
        s, r = self.connect()
        s.sendall(request("GET", "/declared?n=6&len=6") + request("GET", "/json"))
        head = read_head(r)
        self.assertEqual(status_of(head), 200, head)
        self.assertEqual(field_values(head, "content-length"), ["6"], head)
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        self.assertEqual(r.read_exact(6), b"012345")
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')  # keep-alive

    def test_longer_is_cut_at_the_declared_length(self):
        for part in (2, 4, 10):  # the cut falls on a part boundary, inside a part, in the first
            with self.subTest(part=part):
                s, r = self.connect()
                s.sendall(request("GET", f"/declared?n=6&len=10&part={part}") + request("GET", "/json"))
                head = read_head(r)
                self.assertEqual(field_values(head, "content-length"), ["6"], head)
                self.assertEqual(read_to_eof(r), b"012345")

    def test_shorter_closes_after_what_came(self):
        s, r = self.connect()
        s.sendall(request("GET", "/declared?n=6&len=3") + request("GET", "/json"))
        head = read_head(r)
        self.assertEqual(field_values(head, "content-length"), ["6"], head)
        self.assertEqual(read_to_eof(r), b"012")  # short, and no next response glued on

    def test_declared_and_nothing_produced_is_500(self):
        s, r = self.connect()
        s.sendall(request("GET", "/declared?n=6&len=0"))
        resp = r.read_response()
        self.assertEqual(resp.status, 500, resp)
        self.assertEqual(len(field_values(resp.raw_head, "content-length")), 1)

    def test_declared_zero_and_empty(self):
        s, r = self.connect()
        s.sendall(request("GET", "/declared?n=0&len=0") + request("GET", "/json"))
        resp = r.read_response()
        self.assertEqual(resp.status, 200, resp)
        self.assertEqual(field_values(resp.raw_head, "content-length"), ["0"])
        self.assertEqual(r.read_response().status, 200)


# --- 7. content types -----------------------------------------------------------------------

class ContentTypes(StreamTest):
    def get(self, path):
        s, r = self.connect()
        s.sendall(request("GET", path))
        head = read_head(r)
        return head, (read_chunked_body(r) if field_values(head, "transfer-encoding") else
                      r.read_exact(int(field_values(head, "content-length")[0])))

    def test_bytes_iterator(self):
        head, body = self.get("/ct/bytes")
        self.assertOneChunkedHead(head)
        self.assertEqual(field_values(head, "content-type"), ["application/octet-stream"])
        self.assertEqual(body, b"\x00\x01\xff")

    def test_str_iterator(self):
        head, body = self.get("/ct/str")
        self.assertOneChunkedHead(head)
        self.assertEqual(field_values(head, "content-type"), [TEXT])
        self.assertEqual(body, "éx".encode())

    def test_explicit_content_type_wins(self):
        head, body = self.get("/ct/explicit")
        self.assertEqual(field_values(head, "content-type"), ["text/csv"])
        self.assertEqual(body, b"a,b\nc,d\n")
        head, body = self.get("/ct/explicit-header")
        self.assertEqual(field_values(head, "content-type"), ["application/xml"])
        self.assertEqual(body, b"<x/>")

    def test_empty_generator(self):
        head, body = self.get("/empty")
        self.assertEqual(status_of(head), 200, head)
        self.assertEqual(field_values(head, "content-length"), ["0"], head)
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        self.assertEqual(body, b"")


# --- 8. HEAD --------------------------------------------------------------------------------

class Head(StreamTest):
    def check_head(self, path, name):
        s, r = self.connect()
        s.sendall(request("HEAD", f"{path}?id={name}") + request("GET", "/json"))
        head = read_head(r)
        self.assertOneChunkedHead(head)
        # No body: the next bytes are the next response.
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')
        ev = self.events(name)
        self.assertEqual(ev["items"], 0, "HEAD stepped the iterator")
        self.assertEqual(stage_extra(self.server, "python", "streams_open"), 0)
        return ev

    def test_head_closes_without_stepping(self):
        ev = self.check_head("/recorded", "head-iter")
        self.assertTrue(ev["closed"], "HEAD did not close the iterator")

    def test_head_generator_not_started(self):
        self.check_head("/recorded-gen", "head-gen")


# --- 9. HTTP/1.0 ----------------------------------------------------------------------------

class Http10(StreamTest):
    def check(self, headers=None):
        s, r = self.connect()
        s.sendall(request("GET", "/recorded-gen?id=h10", version="HTTP/1.0", headers=headers))
        head = read_head(r)
        self.assertEqual(status_of(head), 200, head)
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        self.assertEqual(field_values(head, "content-length"), [], head)
        self.assertEqual([v.lower() for v in field_values(head, "connection")], ["close"], head)
        self.assertEqual(read_to_eof(r), b"part\n" * 3)

    def test_http10_body_until_close(self):
        self.check()

    def test_http10_keep_alive_asked_still_closes(self):
        self.check({"Connection": "keep-alive"})

    def test_http10_declared_length_keeps_it(self):
        s, r = self.connect()
        s.sendall(request("GET", "/declared?n=6&len=6", version="HTTP/1.0"))
        head = read_head(r)
        self.assertEqual(field_values(head, "content-length"), ["6"], head)
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        self.assertEqual(read_to_eof(r), b"012345")


# --- 10. pipelining -------------------------------------------------------------------------

class Pipelining(StreamTest):
    def test_stream_then_ordinary(self):
        s, r = self.connect()
        s.sendall(request("GET", "/recorded-gen?id=pipe1") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(read_chunked_body(r), b"part\n" * 3)
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')

    def test_two_streams(self):
        s, r = self.connect()
        s.sendall(request("GET", "/recorded-gen?id=pipe2") + request("GET", "/ct/str") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(read_chunked_body(r), b"part\n" * 3)
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(read_chunked_body(r), "éx".encode())
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')

    def test_waiting_stream_then_stream(self):
        # The second stream's pieces are ready long before the first ends: they must wait for
        # the first one's last chunk.
        flag = self.flag()
        s, r = self.connect()
        s.sendall(request("GET", f"/wait?file={quote(flag)}") + request("GET", "/ct/bytes") + request("GET", "/json"))
        self.assertOneChunkedHead(self.prompt("the head", read_head, r))
        self.assertEqual(self.prompt("the first chunk", read_chunk, r), b"a")
        with open(flag, "w"):
            pass
        self.assertEqual(read_chunked_body(r), b"b")
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(read_chunked_body(r), b"\x00\x01\xff")
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')

    def test_big_stream_then_ordinary(self):
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/big?id=pipe-big") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        n = 0
        while (data := read_chunk(r)) is not None:
            n += len(data)
        self.assertEqual(n, BIG_PARTS * BIG_PART)
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')


# --- 11. framing fields from a handler ------------------------------------------------------

class FramingFields(StreamTest):
    def fetch(self, case, then=True):
        """The raw head and body of /fields/CASE; with `then`, a pipelined /json must follow."""
        s, r = self.connect()
        s.sendall(request("GET", f"/fields/{case}") + (request("GET", "/json") if then else b""))
        head = read_head(r)
        lengths = field_values(head, "content-length")
        self.assertEqual(len(lengths), 1, head)  # exactly one framing field, never two
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        body = r.read_exact(int(lengths[0]))
        return head, body, r

    def assertNext(self, reader):
        self.assertEqual(reader.read_response().body, b'{"message":"Hello, World!"}')

    def assert500(self, case):
        head, body, r = self.fetch(case)
        self.assertEqual(status_of(head), 500, head)
        self.assertEqual(body, INTERNAL_ERROR)
        self.assertNotIn(b"injected", head.lower())
        self.assertNotIn(b"x-bad", head.lower())
        self.assertNext(r)
        return head

    def test_content_length_that_disagrees_is_500_and_logged(self):
        self.assert500("cl-wrong")
        log = ""
        for _ in range(2):  # the line may fall in a rate limiter's full second: then once more
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and "Content-Length 10" not in log:
                log = self.server.read_log()
                time.sleep(0.05)
            if "Content-Length 10" in log:
                break
            time.sleep(1.1)
            self.assert500("cl-wrong")
        self.assertIn("declares Content-Length 10 but its body has 3 bytes", log)
        self.assert500("tuple-cl-wrong")

    def test_content_length_that_agrees_is_written_once(self):
        for case in ("cl-right", "cl-right-lower"):
            with self.subTest(case=case):
                head, body, r = self.fetch(case)
                self.assertEqual(status_of(head), 200, head)
                self.assertEqual(field_values(head, "content-length"), ["3"])
                self.assertEqual(body, b"abc")
                self.assertNext(r)

    def test_content_length_not_a_number_is_500(self):
        for case in ("cl-two-values", "cl-list", "cl-negative"):
            with self.subTest(case=case):
                self.assert500(case)

    def test_transfer_encoding_from_the_app_is_dropped(self):
        head, body, r = self.fetch("te-chunked")
        self.assertEqual(status_of(head), 200, head)
        self.assertEqual(field_values(head, "content-length"), ["3"])
        self.assertEqual(body, b"abc")
        self.assertNext(r)

    def test_transfer_encoding_from_the_app_on_a_stream(self):
        s, r = self.connect()
        s.sendall(request("GET", "/fields/te-stream") + request("GET", "/json"))
        head = read_head(r)
        self.assertOneChunkedHead(head)  # exactly one Transfer-Encoding: chunked, the server's
        self.assertEqual(read_chunked_body(r), b"abc")
        self.assertNext(r)

    def test_server_and_date_are_the_servers(self):
        head, body, r = self.fetch("server-date")
        self.assertEqual(field_values(head, "server"), ["metronome"], head)
        dates = field_values(head, "date")
        self.assertEqual(len(dates), 1, head)
        self.assertRegex(dates[0], r"^\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT$")
        self.assertEqual(body, b"abc")
        self.assertNext(r)

    def test_connection_close_is_honoured(self):
        for case in ("connection-close", "connection-list"):
            with self.subTest(case=case):
                head, body, r = self.fetch(case)
                self.assertEqual(status_of(head), 200, head)
                self.assertEqual([v.lower() for v in field_values(head, "connection")], ["close"], head)
                self.assertEqual(body, b"abc")
                self.assertEqual(read_to_eof(r), b"", "more came after a Connection: close response")

    def test_connection_keep_alive_and_keep_alive_field(self):
        head, body, r = self.fetch("connection-keep")
        self.assertEqual(status_of(head), 200, head)
        self.assertEqual(field_values(head, "connection"), [], head)
        self.assertEqual(field_values(head, "keep-alive"), [], head)
        self.assertNext(r)

    def test_invalid_fields_are_500_never_split(self):
        for case in ("value-crlf", "value-lf", "value-nul", "name-space", "name-colon", "name-crlf", "stream-crlf"):
            with self.subTest(case=case):
                self.assert500(case)


# --- more edges -----------------------------------------------------------------------------

class StreamEdges(StreamTest):
    CONFIG = stream_config(server="  stream_stall_timeout: 1s\n  stream_buffer_size: 16KiB\n  keepalive_timeout: 1s\n")

    def test_slow_reader_of_one_big_item_is_not_a_stall(self):
        # One 8 MiB item, read steadily but slower than the 1 s stall timeout allows for all of
        # it: the client takes bytes all the time, so it has not stalled.
        size = 8 << 20
        s, r = self.connect(timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(request("GET", f"/one-item?id=slow&size={size}"))
        got = b""
        t0 = time.monotonic()
        while True:
            try:
                data = s.recv(32 * 1024)  # ~1.6 MB/s: the 8 MiB take seconds past the buffers
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
            # The chunked terminator after the head (the head itself may end in "0\r\n\r\n":
            # a request id ending in 0).
            if b"\r\n\r\n" in got and got.partition(b"\r\n\r\n")[2].endswith(b"\r\n0\r\n\r\n"):
                break
            time.sleep(0.02)
        head, _, body = got.partition(b"\r\n\r\n")
        self.assertTrue(body.endswith(b"\r\n0\r\n\r\n"),
                        f"cut after {len(body)} body bytes in {time.monotonic() - t0:.1f} s of steady reading: {got[:300]!r}")

    def test_half_closed_client_gets_the_whole_stream(self):
        # A client that sends its request and shuts its write side down (curl, nc -q) still
        # reads the whole stream.
        flag = self.flag()
        s, r = self.connect()
        s.sendall(request("GET", f"/wait?file={quote(flag)}"))
        s.shutdown(socket.SHUT_WR)
        self.assertOneChunkedHead(self.prompt("the head", read_head, r))
        self.assertEqual(self.prompt("the first chunk", read_chunk, r), b"a")
        time.sleep(1.5)  # past keepalive_timeout and linger_timeout... of an idle connection
        with open(flag, "w"):
            pass
        self.assertEqual(read_chunked_body(r), b"b")
        self.assertEqual(read_to_eof(r), b"")

    # parse's keep-alive timer counts from the last response send accounted for, not from the
    # last request it read: a response that takes longer (a stream, a slow handler) keeps the
    # connection, and the next request (even one already pipelined) is answered.
    def test_stream_longer_than_keepalive_timeout_then_next_request(self):
        # The connection is not idle while its response streams: the keep-alive timeout must not
        # end it as soon as the stream is done.
        flag = self.flag()
        s, r = self.connect()
        s.sendall(request("GET", f"/wait?file={quote(flag)}"))
        self.assertEqual(self.prompt("the first chunk", lambda: (read_head(r), read_chunk(r))[1]), b"a")
        time.sleep(1.5)
        with open(flag, "w"):
            pass
        self.assertEqual(read_chunked_body(r), b"b")
        s.sendall(request("GET", "/json"))
        try:
            resp = r.read_response()
        except EOFError:
            self.fail("the connection was closed after the stream; parse's timeouts_keepalive_total: "
                      f"{stage_extra(self.server, 'parse', 'timeouts_keepalive_total')}")
        self.assertEqual(resp.body, b'{"message":"Hello, World!"}')

    def test_no_body_status_with_an_iterator(self):
        for status in (204, 304):
            with self.subTest(status=status):
                name = f"nobody-{status}"
                s, r = self.connect()
                s.sendall(request("GET", f"/no-body-status?id={name}&status={status}") + request("GET", "/json"))
                head = read_head(r)
                self.assertEqual(status_of(head), status, head)
                self.assertEqual(field_values(head, "transfer-encoding"), [], head)
                self.assertEqual(field_values(head, "content-length"), [], head)
                self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')
                self.assertEqual(self.events(name)["items"], 0)

    def test_head_with_declared_length(self):
        s, r = self.connect()
        s.sendall(request("HEAD", "/declared?n=6&len=6") + request("GET", "/json"))
        head = read_head(r)
        self.assertEqual(field_values(head, "content-length"), ["6"], head)
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        self.assertEqual(r.read_response().body, b'{"message":"Hello, World!"}')

    def test_bad_item_mid_stream_is_cut(self):
        s, r = self.connect()
        s.sendall(request("GET", "/bad-item") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        self.assertCut(r, b"a\r\nfirst part\r\n")

    def test_connection_close_from_the_app_on_a_stream(self):
        s, r = self.connect()
        s.sendall(request("GET", "/stream-close") + request("GET", "/json"))
        head = read_head(r)
        self.assertOneChunkedHead(head)
        self.assertEqual([v.lower() for v in field_values(head, "connection")], ["close"], head)
        self.assertEqual(read_chunked_body(r), b"ab")  # complete, with its last chunk
        self.assertEqual(read_to_eof(r), b"")

    def test_connection_close_from_the_client_on_a_stream(self):
        s, r = self.connect()
        s.sendall(request("GET", "/ct/str", headers={"Connection": "close"}))
        head = read_head(r)
        self.assertOneChunkedHead(head)
        self.assertEqual([v.lower() for v in field_values(head, "connection")], ["close"], head)
        self.assertEqual(read_chunked_body(r), "éx".encode())
        self.assertEqual(read_to_eof(r), b"")


    def test_garbage_after_a_stream(self):
        # A malformed request pipelined after a stream: the stream completes, then the 400.
        s, r = self.connect()
        s.sendall(request("GET", "/recorded-gen?id=garbage") + b"NOT HTTP AT ALL\r\n\r\n")
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(read_chunked_body(r), b"part\n" * 3)
        self.assertEqual(r.read_response().status, 400)


class CloseUnderBudget(StreamTest):
    """The server closing an iterator runs the app's code (a generator's finally, a close()
    method): under the route's CPU budget like every other step."""

    def test_generator_finally_at_a_cut(self):
        kills_before = stage_extra(self.server, "python", "budget_cpu_kills_total")
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/burn-in-close?id=close-gen"))
        head = read_head(r)
        self.assertEqual(field_values(head, "content-length"), ["1"], head)
        self.assertEqual(read_to_eof(r), b"a")
        ev = self.events("close-gen")
        self.assertTrue(ev["finally"])
        self.assertEqual(ev["exit"], "BudgetExceeded", "the finally ran past the budget")
        self.assertGreaterEqual(stage_extra(self.server, "python", "budget_cpu_kills_total") - kills_before, 1)

    def test_iterator_close_on_head(self):
        s, r = self.connect(timeout=30)
        s.sendall(request("HEAD", "/burning-close?id=close-head") + request("GET", "/json"))
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(r.read_response().status, 200)
        ev = self.events("close-head")
        self.assertEqual(ev["items"], 0)
        self.assertTrue(ev["closed"])
        self.assertEqual(ev["exit"], "BudgetExceeded", "close() ran past the budget")


class SmallChunkPool(StreamTest):
    """server.stream_chunks at its minimum: concurrent streams share 16 chunks. The producers
    pause between items, so that none holds the whole pool (a fast one may: see ChunkPoolEmpty)."""
    CONFIG = stream_config(server="  stream_chunks: 16\n")

    def test_concurrent_streams_complete(self):
        socks = []
        for i in range(3):
            s, r = self.connect(timeout=30)
            s.sendall(request("GET", f"/endless?id=pool{i}&size=100&sleep=0.002"))
            socks.append((s, r))
        for s, r in socks:
            self.assertEqual(status_of(read_head(r)), 200)
        # Every stream moves while the others hold chunks.
        for _ in range(50):
            for s, r in socks:
                self.assertIsNotNone(read_chunk(r))
        for s, r in socks:
            s.close()
        for i in range(3):
            self.assertTrue(wait_for(lambda: self.events(f"pool{i}")["finally"], timeout=10))
        self.assertTrue(wait_for(lambda: stage_extra(self.server, "python", "streams_open") == 0))
        s, r = self.connect()
        s.sendall(request("GET", "/recorded-gen?id=pool-after"))
        self.assertOneChunkedHead(read_head(r))
        self.assertEqual(read_chunked_body(r), b"part\n" * 3)


class ChunkPoolEmpty(StreamTest):
    """One client that stops reading a stream of small items holds every chunk of a 16-chunk
    pool: a new stream is a 503 (whole, with Retry-After), and the pool comes back when that
    client goes."""
    CONFIG = stream_config(server="  stream_chunks: 16\n")

    def test_new_stream_is_503_while_the_pool_is_empty(self):
        s, r = self.connect(timeout=30)
        s.sendall(request("GET", "/endless?id=hog&size=1000"))
        # Until the socket buffers are full and nothing moves: every chunk is then held.
        written = [None]

        def stuck():
            now = stage_extra(self.server, "send", "bytes_out_total")
            still = now == written[0]
            written[0] = now
            return still and stage_extra(self.server, "send", "stream_chunks_in_use") == 16
        self.assertTrue(wait_for(stuck, timeout=20, interval=0.5),
                        f"in use: {stage_extra(self.server, 'send', 'stream_chunks_in_use')}")
        s2, r2 = self.connect()
        s2.sendall(request("GET", "/ct/str") + request("GET", "/json"))
        head = read_head(r2)
        self.assertEqual(status_of(head), 503, head)
        self.assertEqual(field_values(head, "transfer-encoding"), [], head)
        self.assertEqual(len(field_values(head, "retry-after")), 1, head)
        r2.read_exact(int(field_values(head, "content-length")[0]))
        self.assertEqual(r2.read_response().status, 200)  # the connection goes on
        self.assertIn("no body chunk free", self.server.read_log())
        s.close()
        self.assertTrue(wait_for(lambda: self.events("hog")["finally"], timeout=10))
        self.assertTrue(wait_for(lambda: stage_extra(self.server, "send", "stream_chunks_in_use") == 0))
        s2.sendall(request("GET", "/ct/str"))
        head = read_head(r2)
        self.assertOneChunkedHead(head)
        self.assertEqual(read_chunked_body(r2), "éx".encode())


class StopDuringStream(unittest.TestCase):
    """SIGTERM while an endless stream runs: it is cut (its generator closed) and the server
    exits within its drain timeout."""

    def test_stop_cuts_endless_stream(self):
        tmp = tempfile.mkdtemp(prefix="metronome-stream-")
        self.addCleanup(shutil.rmtree, tmp, True)
        marker = os.path.join(tmp, "marker")
        os.environ["STREAM_E2E_MARKER"] = marker
        try:
            server = Server("runtime:\n  drain_timeout: 2s\n" + stream_config())
        finally:
            del os.environ["STREAM_E2E_MARKER"]
        with server:
            s = server.connect(timeout=10)
            self.addCleanup(s.close)
            r = Reader(s)
            s.sendall(request("GET", "/sse-endless"))
            head = read_head(r)
            self.assertEqual(field_values(head, "content-type"), ["text/event-stream"])
            self.assertEqual(read_chunk(r), b"data: 0\n\n")
            code = server.stop(timeout=20)
            self.assertEqual(code, 0, server.read_log())
            rest = read_to_eof(r)
            self.assertFalse(rest.endswith(b"0\r\n\r\n"), "a cut stream ended with the last chunk")
            with open(marker) as f:
                self.assertEqual(f.read(), "finally\n")


if __name__ == "__main__":
    unittest.main()
