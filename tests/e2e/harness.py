"""Starts the real metronome binary for end-to-end tests, and talks raw HTTP to it.

Stdlib only; run by `meson test` with Debian's /usr/bin/python3. Every server binds port 0 on
127.0.0.1 and reports the port it got in its log ("listening on http://127.0.0.1:PORT").
"""
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("METRONOME_BINARY", os.path.join(ROOT, "build", "metronome"))

# Stages for a native-only pipeline; every test config may override it.
NATIVE_PIPELINE = """
pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: serialize}
  - {stage: send}
"""

NATIVE_ROUTES = """
routes:
  - {path: /plaintext, body: "Hello, World!"}
  - {path: /json, content_type: application/json, body: '{"message":"Hello, World!"}'}
  - {path: "/users/{id:int}", body: "user"}
  - {path: /echo, method: POST, body: "posted"}
  - {path: /echo, method: PUT, body: "put"}
"""


class Server:
    """A metronome process on a config text (or file); use as a context manager."""

    def __init__(self, config_text=None, config_file=None, args=(), start_timeout=20, cwd=ROOT):
        self.tmp = tempfile.TemporaryDirectory(prefix="metronome-e2e-")
        if config_file is None:
            config_file = os.path.join(self.tmp.name, "config.yaml")
            with open(config_file, "w") as f:
                f.write(config_text)
        self.config_file = config_file
        self.log_path = os.path.join(self.tmp.name, "server.log")
        self.log = open(self.log_path, "w+")
        cmd = [BINARY, "serve", "-c", config_file, "--listen", "127.0.0.1:0", *args]
        with open(config_file) as f:
            if re.search(r"^admin:", f.read(), re.M) and "--admin" not in args:
                cmd += ["--admin", "127.0.0.1:0"]  # never a fixed admin port in tests
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)
        self.port = None
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            text = self.read_log()
            m = re.search(r"\] listening on http://127\.0\.0\.1:(\d+)", text)
            if m and "route table" in text:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError("metronome exited during start-up:\n" + text)
            time.sleep(0.02)
        if self.port is None:
            self.kill()
            raise RuntimeError("metronome did not start:\n" + self.read_log())
        self._wait_ready()

    def _wait_ready(self):
        # The log line comes from accept's start; the pipeline runs once every lane started.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    @property
    def pid(self):
        return self.proc.pid

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self):
        """{thread name: scheduling policy number} from /proc."""
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                with open(f"/proc/{self.pid}/task/{tid}/sched") as f:
                    policy = re.search(r"^policy\s*:\s*(\d+)", f.read(), re.M).group(1)
                out[name] = int(policy)
            except (FileNotFoundError, AttributeError):
                pass
        return out

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def kill(self):
        """Ends the server now. Two SIGTERMs rather than SIGKILL: the second exits at once after
        returning the SCHED_DEADLINE threads to SCHED_OTHER (a deadline thread killed while
        throttled can be left behind holding its bandwidth); SIGKILL only if that fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        self.log.close()
        self.tmp.cleanup()

    def connect(self, timeout=10):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


class Response:
    def __init__(self, status, reason, headers, body, raw_head):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (lower-case name, value)
        self.body = body
        self.raw_head = raw_head

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


class Reader:
    """Reads HTTP/1.1 responses from a socket, with any pipelining."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed by the server")
        self.buf += data

    def read_until(self, marker):
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_request=False):
        head = self.read_until(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, status, reason = lines[0].decode().split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            k, v = line.decode("latin-1").split(":", 1)
            headers.append((k.strip().lower(), v.strip()))
        resp = Response(int(status), reason, headers, b"", head)
        if head_request or resp.status in (204, 304) or resp.status < 200:
            return resp
        te = resp.header("transfer-encoding")
        if te is not None:
            assert te == "chunked", te
            body = b""
            while True:
                size = int(self.read_until(b"\r\n")[:-2].split(b";")[0], 16)
                if size == 0:
                    self.read_until(b"\r\n")
                    break
                body += self.read_exact(size)
                assert self.read_exact(2) == b"\r\n"
            resp.body = body
        elif resp.header("content-length") is not None:
            resp.body = self.read_exact(int(resp.header("content-length")))
        else:
            # Neither framing field: the body ends when the server closes (RFC 9112 6.3).
            assert resp.header("connection") == "close", head
            resp.body = self.read_to_eof()
        return resp

    def read_to_eof(self):
        data, self.buf = self.buf, b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def closed(self, timeout=5):
        """True if the server closes the connection (EOF) within `timeout` with nothing more.
        The socket's own timeout is put back afterwards."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
                return False
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(previous)


def still_open(reader, seconds):
    """True if, for `seconds`, the server neither closes the connection nor sends anything."""
    before = len(reader.buf)
    return not reader.closed(timeout=seconds) and len(reader.buf) == before


class SharedServerTest:
    """Mixin for a unittest.TestCase whose tests share one server on CONFIG (a config text)."""

    CONFIG = None

    @classmethod
    def setUpClass(cls):
        cls.server = Server(cls.CONFIG)

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def connect(self):
        s = self.server.connect()
        self.addCleanup(s.close)
        return s, Reader(s)


def request(method, path, headers=None, body=b"", version="HTTP/1.1", host=True):
    lines = [f"{method} {path} {version}"]
    hdrs = dict(headers or {})
    if host and version == "HTTP/1.1" and not any(k.lower() == "host" for k in hdrs):
        hdrs["Host"] = "localhost"
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    for k, v in hdrs.items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(server, raw, head_request=False):
    """Sends raw bytes on a new connection and reads one response."""
    with server.connect() as s:
        s.sendall(raw)
        return Reader(s).read_response(head_request=head_request)


def config(extra="", pipeline=NATIVE_PIPELINE, routes=NATIVE_ROUTES):
    return extra + routes + pipeline
