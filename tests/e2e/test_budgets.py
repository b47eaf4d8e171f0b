"""Per-request budgets end to end: CPU (BudgetExceeded raised in the handler, 503 whatever the
handler does), memory (MemoryError, 503), the stuck-in-C hard limit, the RSS guard, and that a
late interrupt never hits a later request."""
import json
import os
import re
import threading
import time
import unittest
import urllib.request

from harness import ROOT, Reader, Server, request

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
# Set by tests/meson.build in a sanitizer build.
SANITIZED = os.environ.get("METRONOME_SANITIZED") == "1"


def budget_config(extra_python="", lanes="", budget="cpu: 50ms, memory: 64MiB, hard: 300ms", admin=True, plugins=""):
    return f"""
{'admin: {listen: 127.0.0.1:0}' if admin else ''}
python:
  app: "budget_app:app"
  path: [{APPS}]
  budget: {{{budget}}}
{extra_python}
routes:
  - {{path: /native, body: "native"}}
pipeline:
  - {{stage: accept}}
  - {{stage: parse}}
  - {{stage: route}}
{plugins}
  - {{stage: python}}
{lanes}
  - {{stage: serialize}}
  - {{stage: send}}
"""


HEAVY_LANE = "  - {stage: python, name: heavy, serves: heavy}"


def get(server, path, timeout=30):
    with server.connect(timeout=timeout) as s:
        t0 = time.monotonic()  # before sending: the server may start before sendall returns
        s.sendall(request("GET", path))
        r = Reader(s).read_response()
        return r, time.monotonic() - t0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1))


def admin_stats(server):
    m = re.search(r"admin listening on http://([\d.]+:\d+)", server.read_log())
    with urllib.request.urlopen(f"http://{m.group(1)}/stats", timeout=10) as f:
        return json.load(f)


def stage_extra(stats, stage, name):
    for s in stats["stages"]:
        if s["name"] == stage:
            return s["extra"].get(name)
    raise KeyError(stage)


class CpuBudget(unittest.TestCase):
    def check_hog(self, path, lanes):
        with Server(budget_config(lanes=lanes)) as srv:
            r, elapsed = get(srv, path)
            self.assertEqual(r.status, 503, r)
            self.assertEqual(r.header("metronome-budget"), "cpu")
            self.assertIn(b"cpu budget", r.body)
            # The handler asks for 1 s; the 50 ms budget stops it. The bound is loose on purpose
            # (a loaded CI machine): it proves the handler was cut short, the benchmark measures
            # how soon (perf/bench_isolation.py).
            self.assertGreaterEqual(elapsed, 0.050)
            self.assertLess(elapsed, 0.5, f"503 came {elapsed * 1000:.1f} ms after the request")
            used = float(re.search(r"exceeded its cpu budget \(50ms\) after ([\d.]+)ms", srv.read_log()).group(1))
            self.assertLess(used, 100, "the server measured the handler past twice its budget")
            r, _ = get(srv, "/json")
            self.assertEqual(r.status, 200)
            self.assertEqual(json.loads(r.body), {"message": "Hello, World!"})
            self.assertIn("exceeded its cpu budget (50ms)", srv.read_log())

    def test_hog_on_main_lane(self):  # Py_AddPendingCall + SIGUSR2
        self.check_hog("/hog-light?ms=1000", "")

    def test_hog_on_heavy_lane(self):  # PyThreadState_SetAsyncExc under the GIL
        self.check_hog("/hog?ms=1000", HEAVY_LANE)

    def test_within_budget_is_not_stopped(self):
        with Server(budget_config()) as srv:
            r, _ = get(srv, "/hog-light?ms=20")
            self.assertEqual((r.status, r.body), (200, b"done"))

    def test_swallowed_budget_exceeded_still_503(self):
        with Server(budget_config()) as srv:
            r, elapsed = get(srv, "/swallow-cpu")
            self.assertEqual(r.status, 503)
            self.assertEqual(r.header("metronome-budget"), "cpu")
            self.assertNotIn(b"pretend", r.body)
            self.assertLess(elapsed, 0.45)  # the handler would burn 500 ms

    def test_finally_blocks_run(self):
        with Server(budget_config()) as srv:
            for _ in range(3):
                self.assertEqual(get(srv, "/cleanup")[0].status, 503)
            r, _ = get(srv, "/cleanups")
            self.assertEqual(json.loads(r.body), {"cleanups": 3})

    def test_blocking_call_on_main_lane_is_cut_short(self):
        # time.sleep(2) is one C call, but an interruptible one: the budget signal (SIGUSR2) ends
        # it with EINTR, Python runs its handler for the signal, and the pending call sent with
        # the signal raises BudgetExceeded from there. The main lane is free again at ~50 ms.
        with Server(budget_config()) as srv:
            r, elapsed = get(srv, "/sleep?s=2")
            self.assertEqual(r.status, 503, r)
            self.assertEqual(r.header("metronome-budget"), "cpu")
            self.assertLess(elapsed, 1.0, f"503 came {elapsed * 1000:.1f} ms after the request")
            self.assertEqual(json.loads(get(srv, "/cleanups")[0].body), {"cleanups": 1})
            self.assertEqual(get(srv, "/hog-light?ms=5")[0].status, 200)  # no second exception left over

    def test_async_handlers(self):
        # An `async def` handler is a task on its lane's loop: its budget is the CPU time of its
        # own steps. Burning CPU, on the main lane and on the heavy one, it is stopped like a
        # plain one; awaiting costs no budget, and python.budget.hard (300ms here) ends a wait
        # that lasts too long. Its `finally` runs either way.
        with Server(budget_config(lanes=HEAVY_LANE)) as srv:
            for path in ("/async-hog-light?ms=1000", "/async-hog?ms=1000"):
                r, elapsed = get(srv, path)
                self.assertEqual((r.status, r.header("metronome-budget")), (503, "cpu"), path)
                self.assertLess(elapsed, 0.5, path)
            r, elapsed = get(srv, "/async-sleep?s=2")
            self.assertEqual((r.status, r.header("metronome-budget")), (503, "hard"))
            self.assertLess(elapsed, 1.5)
            self.assertEqual(get(srv, "/async-sleep?s=0.1")[0].status, 200)  # 100 ms of waiting: free
            self.assertEqual(json.loads(get(srv, "/cleanups")[0].body), {"cleanups": 2})
            self.assertEqual(get(srv, "/async-hog-light?ms=5")[0].status, 200)
            self.assertEqual(get(srv, "/async-hog?ms=5")[0].status, 200)

    def test_ended_past_budget_before_the_interrupt_is_503(self):
        # The answer does not depend on the watchdog's timing: a handler that returns past its
        # budget before any interrupt reached it (here: 1us, shorter than any look) is failed too.
        extra = "  routes:\n    - {path: /tiny-budget, cpu: 1us}"
        with Server(budget_config(extra_python=extra)) as srv:
            for _ in range(20):
                r, _ = get(srv, "/tiny-budget")
                self.assertEqual((r.status, r.header("metronome-budget")), (503, "cpu"))
            self.assertGreater(stage_extra(admin_stats(srv), "python", "budget_ended_past_budget_total"), 0)
            self.assertEqual(get(srv, "/json")[0].status, 200)

    def test_route_budget_from_decorator_and_yaml(self):
        extra = "  routes:\n    - {path: /budget-yaml, method: GET, cpu: 30ms}"
        with Server(budget_config(extra_python=extra)) as srv:
            r, elapsed = get(srv, "/budget-20ms")
            self.assertEqual(r.status, 503)
            self.assertGreaterEqual(elapsed, 0.020)
            self.assertLess(elapsed, 0.150)  # the handler would burn 200 ms
            r, elapsed = get(srv, "/budget-yaml")
            self.assertEqual(r.status, 503)
            self.assertGreaterEqual(elapsed, 0.030)
            self.assertLess(elapsed, 0.150)
            log = srv.read_log()
            self.assertIn("GET /budget-20ms exceeded its cpu budget (20ms)", log)
            self.assertIn("GET /budget-yaml exceeded its cpu budget (30ms)", log)

    def test_yaml_override_for_unknown_route_fails_start(self):
        extra = "  routes:\n    - {path: /no-such-route, cpu: 30ms}"
        with self.assertRaises(RuntimeError) as cm:
            Server(budget_config(extra_python=extra))
        self.assertIn("no route of the app has path '/no-such-route'", str(cm.exception))

    def test_kills_counted_per_route(self):
        with Server(budget_config()) as srv:
            for _ in range(2):
                get(srv, "/hog-light?ms=1000")
            stats = admin_stats(srv)
            self.assertEqual(stage_extra(stats, "python", "budget_cpu_kills_total"), 2)
            py = [s for s in stats["stages"] if s["name"] == "python"][0]
            kills = {e["value_label"]: e["value"] for e in py["labeled"] if e["name"] == "budget_cpu_kills_by_route_total"}
            self.assertEqual(kills["GET /hog-light"], 2)
            self.assertEqual(kills["GET /json"], 0)


class LateInterrupts(unittest.TestCase):
    """10k alternating fast and slow requests: a late interrupt must never turn a fast one into
    a 503 (or a slow one into a 200)."""

    def run_alternating(self, srv, fast, slow, total=10000, connections=4):
        wrong = []
        counts = {"fast": 0, "slow": 0}
        lock = threading.Lock()

        def client(n):
            with srv.connect(timeout=30) as s:
                rd = Reader(s)
                for i in range(n):
                    is_slow = i % 2 == 1
                    s.sendall(request("GET", slow if is_slow else fast))
                    r = rd.read_response()
                    expected = 503 if is_slow else 200
                    with lock:
                        counts["slow" if is_slow else "fast"] += 1
                        if r.status != expected:
                            wrong.append((i, is_slow, r.status, r.body[:60]))

        threads = [threading.Thread(target=client, args=(total // connections,)) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(counts["fast"] + counts["slow"], total)
        self.assertEqual(wrong, [], f"{len(wrong)} wrong statuses")

    def test_main_lane(self):
        extra = "  routes:\n    - {path: /hog-light, cpu: 1ms}"
        with Server(budget_config(extra_python=extra)) as srv:
            self.run_alternating(srv, "/json", "/hog-light?ms=3")

    def test_heavy_lane(self):
        # Both routes on the heavy lane: the async-exception path, one thread for both.
        extra = "  routes:\n    - {path: /hog, cpu: 1ms}\n    - {path: /json, heavy: true}"
        with Server(budget_config(extra_python=extra, lanes=HEAVY_LANE)) as srv:
            self.run_alternating(srv, "/json", "/hog?ms=3")


class HeavyLaneFull(unittest.TestCase):
    """More heavy requests than the heavy lane's queue holds: they are shed (503 + Retry-After)
    by the congestion of the lane each one would go to, and light and native requests keep
    flowing. (Before: route looked at the main lane's queue only, sent heavy work on into the
    full heavy queue and stalled there, and everything behind it waited ~0.65 s.)"""

    LANE = "  - {stage: python, name: heavy, serves: heavy, queue: 4, batch: 1}"
    # Room for the 40 ms hogs on a slow machine: here every hog is either served or shed.
    BUDGET = "cpu: 1s, memory: 64MiB, hard: 2s"

    def flood(self, srv, shedder, hogs_n=24):
        statuses = []
        lock = threading.Lock()

        def hog():
            r, _ = get(srv, "/hog?ms=40", timeout=60)
            with lock:
                statuses.append((r.status, r.header("retry-after")))

        hogs = [threading.Thread(target=hog) for _ in range(hogs_n)]
        for t in hogs:
            t.start()
        time.sleep(0.1)  # the heavy lane busy, its queue full, ~0.5 s of hogs still to come
        light = [get(srv, "/json") for _ in range(10)] + [get(srv, "/native")]
        for t in hogs:
            t.join()
        self.assertEqual([r.status for r, _ in light], [200] * 11)
        # Not a benchmark: the bound only separates "answered at once" from "stalled behind the
        # heavy lane's queue" (hundreds of ms).
        self.assertLess(max(elapsed for _, elapsed in light), 0.25)
        shed = [s for s in statuses if s[0] == 503 and s[1] is not None]
        served = [s for s in statuses if s[0] == 200]
        self.assertEqual(len(shed) + len(served), hogs_n, statuses)
        self.assertGreater(len(shed), 0, statuses)  # they cannot all fit behind a queue of 4
        self.assertGreater(len(served), 0, statuses)
        self.assertEqual(stage_extra(admin_stats(srv), shedder, "shed_total"), len(shed))

    def test_route_sheds_by_the_heavy_lane(self):
        with Server(budget_config(lanes=self.LANE, budget=self.BUDGET)) as srv:
            self.flood(srv, "route")

    def test_last_plugin_sheds_by_the_heavy_lane(self):
        plugin = '  - {stage: python-plugin, name: seen, plugin: "e2e_plugins:Faulty"}'
        with Server(budget_config(lanes=self.LANE, plugins=plugin, budget=self.BUDGET)) as srv:
            self.flood(srv, "seen")


class MemoryBudget(unittest.TestCase):
    def test_alloc_past_cap_is_503_and_memory_comes_back(self):
        with Server(budget_config()) as srv:
            get(srv, "/alloc?mb=8")  # warm up the allocator
            before = rss_kib(srv.pid)
            r, _ = get(srv, "/alloc?mb=512")
            self.assertEqual(r.status, 503)
            self.assertEqual(r.header("metronome-budget"), "memory")
            self.assertIn(b"memory budget", r.body)
            after = rss_kib(srv.pid)
            if not SANITIZED:  # ASan holds freed memory in its quarantine: RSS cannot come back
                self.assertLess(after - before, 8 * 1024, f"RSS grew from {before} KiB to {after} KiB")
            # The interpreter is healthy: the next requests are served normally.
            r, _ = get(srv, "/alloc?mb=8")
            self.assertEqual((r.status, json.loads(r.body)), (200, {"allocated_mb": 8}))
            self.assertEqual(get(srv, "/json")[0].status, 200)

    def test_swallowed_memory_error_still_503(self):
        with Server(budget_config()) as srv:
            r, _ = get(srv, "/swallow-memory")
            self.assertEqual(r.status, 503)
            self.assertEqual(r.header("metronome-budget"), "memory")
            self.assertNotIn(b"pretend", r.body)
            self.assertEqual(get(srv, "/json")[0].status, 200)

    def test_rss_guard_sheds_python_not_native(self):
        with Server(budget_config(budget="cpu: 50ms, memory: 64MiB, rss_limit: 1MiB")) as srv:
            deadline = time.monotonic() + 5
            while True:  # the guard reads RSS every 100 ms
                r, _ = get(srv, "/json")
                if r.status == 503 or time.monotonic() > deadline:
                    break
            self.assertEqual(r.status, 503)
            self.assertEqual(r.header("metronome-budget"), "rss")
            self.assertIsNotNone(r.header("retry-after"))
            r, _ = get(srv, "/native")
            self.assertEqual((r.status, r.body), (200, b"native"))
            self.assertGreaterEqual(stage_extra(admin_stats(srv), "python", "budget_rss_sheds_total"), 1)


class StuckInC(unittest.TestCase):
    def test_route_budget_longer_than_hard_is_not_stuck(self):
        # The hard limit counts from the budget's interrupt: a handler running Python within its
        # own 2 s budget, past a 1 s hard limit, is not stuck (before: "stuck in C code" at 1 s,
        # at ERROR level, and counted).
        with Server(budget_config(budget="cpu: 50ms, memory: 64MiB, hard: 1s")) as srv:
            r, _ = get(srv, "/long-budget")
            self.assertEqual((r.status, r.body), (200, b"done"))
            log = srv.read_log()
            self.assertNotIn("hard limit", log)
            self.assertNotIn("cannot be interrupted", log)
            self.assertEqual(stage_extra(admin_stats(srv), "python", "budget_stuck_handlers_total"), 0)

    def test_hard_limit_longer_than_switch_interval(self):
        with self.assertRaises(RuntimeError) as cm:
            Server(budget_config(budget="cpu: 50ms, hard: 1ms", extra_python="  switch_interval: 5ms"))
        self.assertIn("python.budget.hard: must be longer than python.switch_interval (5ms)", str(cm.exception))

    def test_native_routes_answer_while_python_is_stuck(self):
        with Server(budget_config()) as srv:
            result = {}

            def stuck():
                result["r"], result["t"] = get(srv, "/stuck-in-c?n=120000000", timeout=120)

            t = threading.Thread(target=stuck)
            t.start()
            time.sleep(0.2)  # let it get into sum()
            for _ in range(20):
                r, elapsed = get(srv, "/native")
                self.assertEqual(r.status, 200)
                self.assertLess(elapsed, 0.25)  # the stuck handler takes seconds
            t.join()
            # The budget fired; the C call could only notice it when it returned.
            self.assertEqual(result["r"].status, 503)
            self.assertGreater(result["t"], 0.3)
            log = srv.read_log()
            self.assertIn("did not stop within the 300ms hard limit after its CPU budget interrupt", log)
            self.assertIn("it cannot be interrupted", log)
            self.assertIn("returned after", log)
            self.assertGreaterEqual(stage_extra(admin_stats(srv), "python", "budget_stuck_handlers_total"), 1)
            self.assertEqual(get(srv, "/json")[0].status, 200)


if __name__ == "__main__":
    unittest.main()
