"""Worker processes under the supervisor (supervisor/supervisor.h): they serve in parallel,
a killed one is replaced (and its replacement gets SCHED_DEADLINE again), SIGHUP reloads with
no failed request, max_requests and max_rss recycle gracefully, hard_action: replace recovers
from a handler stuck in C code, and the supervisor's /metrics adds up the workers'."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Reader, Server, request  # noqa: E402

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
SCHED_DEADLINE = 6

# Small deadline budgets, so that two workers' threads (and a reload's four) fit the 1.80 CPUs
# the kernel admits here: 6 threads x 25us/1ms = 0.15 CPUs per worker.
DEADLINE_PIPELINE = """
pipeline:
  - {stage: accept,    policy: deadline, runtime: 25us, period: 1ms}
  - {stage: parse,     policy: deadline, runtime: 25us, period: 1ms}
  - {stage: route,     policy: deadline, runtime: 25us, period: 1ms}
  - {stage: python,    policy: other}
  - {stage: serialize, policy: deadline, runtime: 25us, period: 1ms}
  - {stage: send,      policy: deadline, runtime: 25us, period: 1ms}
"""
OTHER_PIPELINE = """
pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: python}
  - {stage: serialize}
  - {stage: send}
"""


def workers_config(workers=2, server_extra="", python_extra="", pipeline=OTHER_PIPELINE, admin=True):
    return (f"server:\n  workers: {workers}\n{server_extra}"
            + ("admin: {listen: 127.0.0.1:0}\n" if admin else "")
            + f'python:\n  app: "workers_app:app"\n  path: ["{APPS}"]\n{python_extra}' + pipeline)


def get(port, path, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(request("GET", path))
        return Reader(s).read_response()
    finally:
        s.close()


def admin_port(srv):
    m = re.search(r"admin listening on http://127\.0\.0\.1:(\d+)", srv.read_log())
    return int(m.group(1))


def admin_get(srv, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port(srv)}{path}", timeout=10) as r:
        return r.status, r.read()


def workers(srv):
    """[(index, pid, state, generation)] from the supervisor's /stats."""
    _, body = admin_get(srv, "/stats")
    return [(w["index"], w["pid"], w["state"], w["generation"]) for w in json.loads(body)["supervisor"]["workers"]]


def wait_for(predicate, timeout=20, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def ready_pids(srv, count):
    """The pids of `count` ready workers, once there are that many."""
    def ready():
        try:
            w = [pid for _, pid, state, _ in workers(srv) if state == "ready"]
        except OSError:
            return None
        return w if len(w) == count else None
    return wait_for(ready)


def deadline_threads(pid):
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/sched") as f:
                if int(re.search(r"^policy\s*:\s*(\d+)", f.read(), re.M).group(1)) == SCHED_DEADLINE:
                    n += 1
        except (FileNotFoundError, AttributeError):
            pass
    return n


class Load:
    """Closed-loop clients on keep-alive connections: every request's outcome, by the pid that
    answered it. A connection that fails is replaced (a new one), so the load goes on."""

    def __init__(self, port, path="/pid", clients=8):
        self.port, self.path = port, path
        self.ok, self.failed, self.by_pid, self.errors = 0, 0, {}, []
        self.versions = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def run(self):
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError as e:
                with self.lock:
                    self.failed += 1
                    self.errors.append(repr(e))
                time.sleep(0.01)
                continue
            r = Reader(s)
            pid = None
            try:
                while not self.stop.is_set():
                    s.sendall(request("GET", self.path))
                    resp = r.read_response()
                    body = json.loads(resp.body) if resp.status == 200 else {}
                    with self.lock:
                        if resp.status == 200:
                            self.ok += 1
                            pid = body.get("pid")
                            self.by_pid[pid] = self.by_pid.get(pid, 0) + 1
                            if "version" in body:
                                self.versions.add(body["version"])
                        else:
                            self.failed += 1
                            self.errors.append(f"status {resp.status} from {pid}")
                    if resp.header("connection") == "close":
                        break
            except (OSError, EOFError, AssertionError, ValueError) as e:
                with self.lock:
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__} on a connection to {pid}")
            finally:
                s.close()


class WorkersTest(unittest.TestCase):
    def start(self, text, **kw):
        srv = Server(text, **kw)
        self.addCleanup(srv.__exit__, None, None, None)
        return srv

    def test_two_workers_serve_with_distinct_pids(self):
        srv = self.start(workers_config(2))
        pids = ready_pids(srv, 2)
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(srv.pid, pids)
        seen = set()
        for _ in range(200):
            seen.add(json.loads(get(srv.port, "/pid").body)["pid"])
            if seen == set(pids):
                break
        self.assertEqual(seen, set(pids), "connections reached one worker only")
        self.assertIn("a supervisor and 2 worker(s)", srv.read_log())
        self.assertEqual(admin_get(srv, "/healthz")[0], 200)
        self.assertEqual(admin_get(srv, "/readyz")[0], 200)
        self.assertEqual(srv.stop(), 0, srv.read_log()[-3000:])

    def test_killed_worker_is_replaced_and_gets_deadline_again(self):
        srv = self.start(workers_config(2, pipeline=DEADLINE_PIPELINE))
        pids = ready_pids(srv, 2)
        if any(deadline_threads(p) == 0 for p in pids):
            self.skipTest("SCHED_DEADLINE not granted here (bandwidth held by another process?)")
        victim, survivor = pids
        with Load(srv.port, clients=8) as load:
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            new = wait_for(lambda: (lambda p: p if p and victim not in p else None)(ready_pids(srv, 2)), timeout=10)
            time.sleep(0.5)
        self.assertIsNotNone(new, srv.read_log()[-3000:])
        replacement = (set(new) - {survivor}).pop()
        self.assertEqual(deadline_threads(replacement), 5, "the replacement's stage threads are not SCHED_DEADLINE")
        # Only connections the dead worker held may fail; the survivor's requests all succeed.
        self.assertFalse([e for e in load.errors if f"to {survivor}" in e or f"from {survivor}" in e], load.errors)
        self.assertGreater(load.by_pid.get(replacement, 0), 0)
        self.assertIn("was killed by signal 9", srv.read_log())
        self.assertEqual(srv.stop(), 0, srv.read_log()[-3000:])

    def test_sighup_reloads_with_no_failed_request(self):
        with tempfile.NamedTemporaryFile("w", suffix=".version", delete=False) as f:
            f.write("one")
        self.addCleanup(os.unlink, f.name)
        env_config = workers_config(2)
        os.environ["WORKERS_APP_VERSION_FILE"] = f.name
        self.addCleanup(os.environ.pop, "WORKERS_APP_VERSION_FILE", None)
        srv = self.start(env_config)
        first = ready_pids(srv, 2)
        with Load(srv.port, clients=8) as load:
            for version in ("two", "three"):
                time.sleep(0.5)
                with open(f.name, "w") as v:
                    v.write(version)
                srv.proc.send_signal(signal.SIGHUP)
                self.assertTrue(wait_for(lambda: srv.read_log().count("is ready; the old workers drain") >= (2 if version == "three" else 1)),
                                srv.read_log()[-3000:])
                time.sleep(0.5)
        self.assertEqual((load.failed, load.errors[:5]), (0, []))
        self.assertGreater(load.ok, 100)
        self.assertEqual(json.loads(get(srv.port, "/pid").body)["version"], "three")
        self.assertTrue(set(ready_pids(srv, 2)).isdisjoint(first))
        self.assertEqual(srv.stop(), 0, srv.read_log()[-3000:])

    def test_sighup_with_a_broken_config_keeps_the_old_workers(self):
        srv = self.start(workers_config(2))
        before = ready_pids(srv, 2)
        with open(srv.config_file, "a") as f:
            f.write("not_a_section: 1\n")
        srv.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: "keeps serving" in srv.read_log()), srv.read_log()[-2000:])
        self.assertEqual(sorted(ready_pids(srv, 2)), sorted(before))
        self.assertEqual(get(srv.port, "/pid").status, 200)

    def test_max_requests_recycles_with_no_failed_request(self):
        srv = self.start(workers_config(2, server_extra="  max_requests: 300\n  max_requests_jitter: 50\n"))
        first = ready_pids(srv, 2)
        with Load(srv.port, clients=6) as load:
            self.assertTrue(wait_for(lambda: srv.read_log().count("(server.max_requests): recycling") >= 2, timeout=30),
                            srv.read_log()[-3000:])
            time.sleep(1.0)
        self.assertEqual((load.failed, load.errors[:5]), (0, []))
        self.assertTrue(set(ready_pids(srv, 2)).isdisjoint(first))
        self.assertEqual(srv.stop(), 0, srv.read_log()[-3000:])

    def test_max_rss_recycles_the_worker_that_grew(self):
        srv = self.start(workers_config(1, server_extra="  max_rss: 400MiB\n",
                                        python_extra="  routes:\n    - {path: /grow, memory: 1GiB}\n"))
        (first,) = ready_pids(srv, 1)
        for _ in range(16):
            r = get(srv.port, "/grow?mb=32")
            if r.status != 200 or json.loads(r.body)["pid"] != first:
                break
        self.assertTrue(wait_for(lambda: "past server.max_rss: recycling" in srv.read_log()), srv.read_log()[-2000:])
        new = wait_for(lambda: (lambda p: p if p and p[0] != first else None)(ready_pids(srv, 1)))
        self.assertIsNotNone(new)
        self.assertEqual(get(srv.port, "/pid").status, 200)

    def test_hard_action_replace_recovers_from_a_handler_stuck_in_c(self):
        srv = self.start(workers_config(1, python_extra="  budget: {cpu: 50ms, hard: 300ms, hard_action: replace}\n"
                                        "runtime:\n  drain_timeout: 1s\n"))
        (first,) = ready_pids(srv, 1)
        stuck = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        self.addCleanup(stuck.close)
        stuck.sendall(request("GET", "/stuck-in-c"))
        new = wait_for(lambda: (lambda p: p if p and p[0] != first else None)(ready_pids(srv, 1)), timeout=20)
        self.assertIsNotNone(new, srv.read_log()[-3000:])
        # The others are answered meanwhile, by the replacement.
        for _ in range(20):
            self.assertEqual(get(srv.port, "/pid").status, 200)
        self.assertIn("stuck in C code: replacing it", srv.read_log())
        # The stuck worker is ended by its drain guard.
        self.assertTrue(wait_for(lambda: not os.path.exists(f"/proc/{first}"), timeout=15))

    def test_aggregated_metrics_add_up_to_the_workers(self):
        srv = self.start(workers_config(2))
        pids = ready_pids(srv, 2)
        for _ in range(50):
            get(srv.port, "/pid")
        _, text = admin_get(srv, "/metrics")
        text = text.decode()
        samples = re.findall(r'^metronome_parse_requests_total\{worker="(\d)",stage="parse"\} (\S+)$', text, re.M)
        self.assertEqual(len(samples), 2, text[:2000])
        total = sum(float(v) for _, v in samples)
        _, body = admin_get(srv, "/stats")
        per_worker = 0
        for w in json.loads(body)["supervisor"]["workers"]:
            stages = {s["name"]: s for s in w["stats"]["stages"]}
            per_worker += stages["parse"]["extra"]["requests_total"]
        self.assertEqual(total, per_worker)
        self.assertGreaterEqual(total, 50)
        self.assertRegex(text, r'metronome_supervisor_workers\{state="ready"\} 2')
        self.assertEqual(len(set(pids)), 2)


class DevReloadTest(unittest.TestCase):
    def test_reload_restarts_on_a_py_change_and_keeps_serving_a_broken_one(self):
        with tempfile.TemporaryDirectory() as d:
            app = os.path.join(d, "devapp.py")
            with open(app, "w") as f:
                f.write('import metronome\napp = metronome.App()\n@app.get("/v")\ndef v(req):\n    return "one"\n')
            srv = Server(config_file=_write(d, OTHER_PIPELINE_CONFIG(d)),
                         args=("--reload",))
            self.addCleanup(srv.__exit__, None, None, None)
            self.assertTrue(wait_for(lambda: "FOR DEVELOPMENT ONLY" in srv.read_log()))
            self.assertTrue(wait_for(lambda: _body(srv) == b"one"))
            with open(app, "w") as f:
                f.write('import metronome\napp = metronome.App()\n@app.get("/v")\ndef v(req):\n    return "two"\n')
            self.assertTrue(wait_for(lambda: _body(srv) == b"two", timeout=15), srv.read_log()[-2000:])
            with open(app, "a") as f:
                f.write("this is not python(\n")
            self.assertTrue(wait_for(lambda: "keeps serving" in srv.read_log(), timeout=15), srv.read_log()[-2000:])
            self.assertEqual(_body(srv), b"two")
            self.assertEqual(srv.stop(), 0, srv.read_log()[-2000:])


def OTHER_PIPELINE_CONFIG(d):
    return f'python:\n  app: "devapp:app"\n  path: ["{d}"]\n' + OTHER_PIPELINE


def _write(d, text):
    path = os.path.join(d, "config.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _body(srv):
    try:
        return get(srv.port, "/v").body
    except OSError:
        return None


if __name__ == "__main__":
    unittest.main()
