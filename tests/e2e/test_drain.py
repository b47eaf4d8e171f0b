"""The drain (SIGTERM/SIGINT) as a load balancer, a client and an orchestrator see it: the
listening socket closes at once (new connections are refused, not left hanging), a request on
an open connection is answered (with Connection: close) or the connection was closed before it
could be sent, never swallowed; and a drain that cannot finish (a handler stuck in C code)
ends the process after runtime.drain_timeout without a second signal, saying what was stuck."""
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import NATIVE_ROUTES, Reader, Server, config, request  # noqa: E402
from test_python import python_config  # noqa: E402

HELLO = b"Hello, World!"


class DrainTest(unittest.TestCase):
    def start(self, text):
        server = Server(text)
        self.addCleanup(server.__exit__, None, None, None)
        return server

    def wait_exit(self, server, timeout):
        try:
            return server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running {timeout} s after the signal:\n" + server.read_log())

    def keepalive(self, server):
        s = server.connect()
        self.addCleanup(s.close)
        r = Reader(s)
        s.sendall(request("GET", "/plaintext"))
        self.assertEqual(r.read_response().body, HELLO)
        return s, r

    def test_new_connections_are_refused_once_the_drain_starts(self):
        server = self.start(config("server:\n  drain_grace: 3s\n"))
        s, r = self.keepalive(server)  # keeps the drain going for its grace
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                c = socket.create_connection(("127.0.0.1", server.port), timeout=2)
            except ConnectionRefusedError:
                refused = True
                break
            # Accepted before the socket closed: it must be served, not left hanging. (A
            # handshake the kernel completes between the server's last accept and its close
            # is reset by the kernel: a window of microseconds, and a reset, not a hang.)
            c.settimeout(3)
            try:
                c.sendall(request("GET", "/plaintext"))
                reader = Reader(c)
                resp = reader.read_response()
                self.assertEqual(resp.status, 200)
                # Each stage sees the stop on its own thread: a response serialized a moment
                # before serialize saw it may still say keep-alive; the connection ends anyway.
                if resp.header("connection") != "close":
                    self.assertTrue(reader.closed(timeout=5))
            except ConnectionResetError:
                pass
            c.close()
            time.sleep(0.02)
        self.assertTrue(refused, "the listening socket stayed open during the drain")
        self.assertIn("listening socket is closed", server.read_log())
        self.assertEqual(self.wait_exit(server, 10), 0, server.read_log())

    def test_a_request_on_an_idle_connection_during_the_drain_is_answered(self):
        server = self.start(config("server:\n  drain_grace: 3s\n"))
        s, r = self.keepalive(server)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the drain has begun (well inside its grace)
        s.sendall(request("GET", "/plaintext"))
        resp = r.read_response()
        self.assertEqual(resp.body, HELLO)
        self.assertEqual(resp.header("connection"), "close")
        self.assertTrue(r.closed())
        self.assertEqual(self.wait_exit(server, 10), 0, server.read_log())

    def test_idle_connections_are_closed_after_the_grace(self):
        server = self.start(config("server:\n  drain_grace: 200ms\n"))
        s, r = self.keepalive(server)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        self.assertTrue(r.closed(timeout=5))
        self.assertGreaterEqual(time.monotonic() - started, 0.15)
        self.assertEqual(self.wait_exit(server, 10), 0, server.read_log())

    def test_under_load_every_request_is_answered_or_never_sent(self):
        server = self.start(config("server:\n  drain_grace: 1s\n"))
        counts = {"answered": 0, "closed_before_send": 0, "swallowed": 0, "errors": []}
        lock = threading.Lock()
        stop_at = [None]

        def client():
            try:
                s = server.connect()
                s.settimeout(10)
                r = Reader(s)
                while True:
                    # Closed by the server before we send? Then nothing is lost.
                    readable, _, _ = select.select([s], [], [], 0)
                    if readable:
                        try:
                            data = s.recv(1, socket.MSG_PEEK)
                        except ConnectionResetError:
                            data = b""
                        if not data:
                            with lock:
                                counts["closed_before_send"] += 1
                            return
                    try:
                        s.sendall(request("GET", "/plaintext"))
                    except (BrokenPipeError, ConnectionResetError):
                        with lock:
                            counts["closed_before_send"] += 1
                        return
                    try:
                        resp = r.read_response()
                    except (EOFError, ConnectionResetError):
                        with lock:
                            counts["swallowed"] += 1
                        return
                    with lock:
                        counts["answered"] += 1
                    if resp.header("connection") == "close":
                        return
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    counts["errors"].append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(32)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        self.assertEqual(counts["errors"], [])
        self.assertEqual(counts["swallowed"], 0, counts)
        self.assertGreater(counts["answered"], 100, counts)
        self.assertEqual(self.wait_exit(server, 10), 0, server.read_log())

    def test_a_stuck_handler_ends_the_process_after_the_drain_timeout(self):
        # One signal, as systemd and Kubernetes send: past drain_timeout (+1 s of grace for the
        # lanes' own deadline) the server exits non-zero and names the request that was stuck.
        apps = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
        text = "runtime:\n  drain_timeout: 1s\n" + python_config("budget_app:app", path=(apps,))
        server = self.start(text)
        s = server.connect()
        self.addCleanup(s.close)
        s.sendall(request("GET", "/stuck-in-c?n=10000000000"))
        time.sleep(0.5)  # the handler is in sum(range(...)) by now
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = self.wait_exit(server, 15)
        elapsed = time.monotonic() - started
        log = server.read_log()
        self.assertEqual(rc, 1, log)
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertIn("without waiting for a second signal", log)
        self.assertIn("/stuck-in-c?n=10000000000", log)
        self.assertIn("stuck in C code", log)


class LingerTest(unittest.TestCase):
    def test_a_client_that_never_closes_after_connection_close_is_closed_after_the_linger(self):
        server = Server(config("server:\n  linger_timeout: 300ms\n"))
        self.addCleanup(server.__exit__, None, None, None)

        def sockets():
            n = 0
            for fd in os.listdir(f"/proc/{server.pid}/fd"):
                try:
                    n += os.readlink(f"/proc/{server.pid}/fd/{fd}").startswith("socket:")
                except FileNotFoundError:
                    pass
            return n

        baseline = sockets()
        s = server.connect()
        self.addCleanup(s.close)
        r = Reader(s)
        s.sendall(b"GET /plaintext HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(r.read_response().body, HELLO)
        self.assertTrue(r.closed())  # the server's FIN; this client does not close its side
        deadline = time.monotonic() + 5
        while sockets() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(sockets(), baseline, "the server kept the half-closed connection past its linger")


if __name__ == "__main__":
    unittest.main()
