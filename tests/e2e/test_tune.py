"""The tuning tools: metronome-tune's proposal math on synthetic /stats snapshots, its YAML
editing, and end to end the acceptance run: bad budgets -> load -> tune (--write) -> restart on
the written file -> the same load: overruns gone, throughput kept. Also metronome-top --once
and metronome-load.

Stdlib only; run with Debian's /usr/bin/python3 (tests/e2e/meson.build). The end-to-end part
starts the binary from METRONOME_BINARY on port 0 with its admin listener on port 0.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BINARY, ROOT, Server  # noqa: E402

TOOLS = os.path.join(ROOT, "tools")
sys.dont_write_bytecode = True  # no __pycache__ in tools/
sys.path.insert(0, TOOLS)
import tune_lib as tl  # noqa: E402

PY = "/usr/bin/python3"
BAD_BUDGETS = os.path.join(ROOT, "configs", "examples", "bad-budgets.yaml")

# --- synthetic snapshots ----------------------------------------------------------------------

K_SUB, K_MIN, K_MAX = 4, 6, 36
K_BUCKETS = (K_MAX - K_MIN) * K_SUB + 2


def upper_bound(i):
    """LatencyHistogram::UpperBoundNs (runtime/stats.h)."""
    if i == 0:
        return 1 << K_MIN
    if i >= K_BUCKETS - 1:
        return None
    log2 = (i - 1) // K_SUB + K_MIN
    sub = (i - 1) % K_SUB
    return (1 << log2) + ((sub + 1) << (log2 - 2))


BOUNDS = [upper_bound(i) for i in range(K_BUCKETS)]


def bucket_of(ns):
    if ns < (1 << K_MIN):
        return 0
    log2 = ns.bit_length() - 1
    if log2 >= K_MAX:
        return K_BUCKETS - 1
    return 1 + (log2 - K_MIN) * K_SUB + ((ns >> (log2 - 2)) & 3)


def snapshot(t, threads, stages, admitted=1.8, uptime=100.0, extra=None):
    """A /stats document. threads: [(name, [stages], policy, runtime_ns, period_ns, cpu_seconds,
    overruns)], stages: {name: (type, items_in, {service_ns: count}, busy_seconds)}."""
    th = []
    for name, st, policy, runtime, period, cpu, overruns in threads:
        bw = runtime / period if policy == "deadline" else 0
        th.append({"name": name, "stages": st, "policy": policy, "policy_in_force": policy, "wait": "block",
                   "runtime_ns": runtime if policy == "deadline" else 0, "deadline_ns": period if policy == "deadline" else 0,
                   "period_ns": period if policy == "deadline" else 0, "bandwidth": bw, "fallback": "",
                   "queue_depth": 0, "queue_capacity": 4096, "queue_full_total": 0, "batch_max": 64,
                   "loops": 0, "sleeps": 0, "yields": 0, "overruns": overruns, "stalls": 0, "cpu_seconds": cpu})
    sts = []
    for name, (typ, items, service, busy) in stages.items():
        buckets = {}
        for ns, c in service.items():
            b = bucket_of(ns)
            buckets[b] = buckets.get(b, 0) + c
        thread = next(x[0] for x in threads if name in x[1])
        sts.append({"name": name, "type": typ, "thread": thread, "items_in": items, "items_out": items,
                    "batches": items // 8, "busy_seconds": busy,
                    "service": {"count": sum(buckets.values()), "buckets": sorted([k, v] for k, v in buckets.items())},
                    "extra": (extra or {}).get(name, {})})
    return {"version": "test", "time": t, "uptime_seconds": uptime + t,
            "admission": {"admitted_cpus": admitted,
                          "deadline_bandwidth": sum(x["bandwidth"] for x in th)},
            "bucket_upper_bounds_ns": BOUNDS, "threads": th, "stages": sts, "config": {}}


US = 1000
MS = 1000 * US

SIX = ["accept", "parse", "route", "python", "serialize", "send"]


def six_stage_window(cpu_shares, svc_ns, rate=10000.0, wall=10.0, runtime=200 * US, period=MS, overruns=None,
                     admitted=1.8, policies=None):
    """A window over the default six-stage pipeline, one thread per stage, with the given CPU
    shares and service time per item (every item takes svc_ns[stage])."""
    overruns = overruns or {}
    policies = policies or {}
    threads0, threads1, st0, st1 = [], [], {}, {}
    for name in SIX:
        pol = policies.get(name, "deadline")
        threads0.append((name, [name], pol, runtime, period, 1.0, 0))
        threads1.append((name, [name], pol, runtime, period, 1.0 + cpu_shares[name] * wall,
                         overruns.get(name, 0) * wall))
        n = 0 if name == "accept" else int(rate * wall)
        st0[name] = (name, 0, {}, 0.0)
        st1[name] = (name, n, {svc_ns[name]: n} if n else {}, cpu_shares[name] * wall * 0.9)
    s0 = snapshot(0.0, threads0, st0, admitted)
    s1 = snapshot(wall, threads1, st1, admitted)
    return tl.analyze(s0, s1)


class UnitsTest(unittest.TestCase):
    def test_durations(self):
        self.assertEqual(tl.parse_duration_ns("250us"), 250 * US)
        self.assertEqual(tl.parse_duration_ns("2ms"), 2 * MS)
        self.assertEqual(tl.parse_duration_ns("1.5s"), 1_500_000_000)
        self.assertEqual(tl.parse_duration_ns("3"), 3_000_000_000)
        self.assertRaises(ValueError, tl.parse_duration_ns, "2 parsecs")
        self.assertEqual(tl.format_duration(250 * US), "250us")
        self.assertEqual(tl.format_duration(MS), "1ms")
        self.assertEqual(tl.format_duration(1500), "1500ns")

    def test_period_rule(self):
        lim = (100 * US, 1_000_000_000)
        self.assertEqual(tl.choose_period_ns(2 * MS, 6, lim), 250 * US)   # 333us -> 250us
        self.assertEqual(tl.choose_period_ns(2 * MS, 2, lim), MS)
        self.assertEqual(tl.choose_period_ns(10 * MS, 4, lim), 2500 * US)
        self.assertEqual(tl.choose_period_ns(6 * MS, 6, lim), MS)
        self.assertEqual(tl.choose_period_ns(3 * MS, 6, lim), 500 * US)
        self.assertEqual(tl.choose_period_ns(300 * US, 6, lim), 100 * US)  # clamped up
        self.assertEqual(tl.choose_period_ns(20_000 * MS, 2, lim), 1_000_000_000)  # clamped down

    def test_histogram_quantiles_match_the_server(self):
        # 99 items at 1us and 1 at 100us: p50 in the 1us bucket, p99 still there, p99.9 beyond.
        counts = {bucket_of(1000): 99, bucket_of(100_000): 1}
        p50 = tl.hist_quantile_ns(counts, 0.5, BOUNDS)
        self.assertTrue(BOUNDS[bucket_of(1000) - 1] <= p50 <= BOUNDS[bucket_of(1000)], p50)
        p999 = tl.hist_quantile_ns(counts, 0.999, BOUNDS)
        self.assertGreater(p999, 64_000)
        self.assertIsNone(tl.hist_quantile_ns({}, 0.5, BOUNDS))
        # Deltas: only what the window added counts.
        d = tl.hist_delta({"buckets": [[5, 10], [9, 3]]}, {"buckets": [[5, 12], [9, 3], [20, 4]]})
        self.assertEqual(d, {5: 2, 20: 4})


class ProposalTest(unittest.TestCase):
    CPU = {"accept": 0.10, "parse": 0.08, "route": 0.03, "python": 0.12, "serialize": 0.04, "send": 0.15}
    SVC = {"accept": 0, "parse": 2000, "route": 500, "python": 6000, "serialize": 1000, "send": 3000}

    def test_runtime_rule_per_thread(self):
        w = six_stage_window(self.CPU, self.SVC, rate=10000)
        self.assertAlmostEqual(w["stages"]["python"]["arrivals"], 10000)
        self.assertAlmostEqual(w["threads"][3]["cpu_share"], 0.12)
        p = tl.propose(w, 2 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        self.assertEqual(p["period_ns"], 250 * US)
        self.assertEqual(p["n_path"], 6)
        rows = {r["thread"]: r for r in p["rows"]}
        for name in SIX:
            r = rows[name]
            svc = w["stages"][name]["p99_ns"]
            items = (svc or 0) * 10000 * 250e-6 if name != "accept" else 0
            cpu = self.CPU[name] * 250 * US
            busy = self.CPU[name] * 0.9 * 250 * US
            want = max(20 * US, 1.5 * max(items, cpu, busy))
            self.assertAlmostEqual(r["after"]["runtime_ns"], min(250 * US, (want + 999) // 1000 * 1000), delta=1000,
                                   msg=name)
            self.assertEqual(r["after"]["period_ns"], 250 * US)
        # python: p99 ~6us x 2.5 items per period = 15us < CPU 30us -> 1.5 x 30us = 45us
        self.assertEqual(rows["python"]["after"]["runtime_ns"], 45 * US)
        # route: 0.5us x 2.5 = 1.25us, CPU 7.5us -> 11.25us -> the 20us floor
        self.assertEqual(rows["route"]["after"]["runtime_ns"], 20 * US)
        self.assertIsNone(p["fitted"])
        self.assertTrue(p["feasible"])
        self.assertAlmostEqual(p["bandwidth_after"], sum(r["after"]["bandwidth"] for r in p["rows"]))
        self.assertLessEqual(p["bandwidth_after"], 1.8)
        self.assertEqual(p["advice"], [])

    def test_p99_service_drives_the_runtime(self):
        svc = dict(self.SVC, python=80_000)  # 80us per item at 10k/s: 200us per 250us period
        w = six_stage_window(self.CPU, svc, rate=10000)
        p = tl.propose(w, 2 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        py = next(r for r in p["rows"] if r["thread"] == "python")
        # 1.5 x ~200us > the period: clamped to the period
        self.assertEqual(py["after"]["runtime_ns"], 250 * US)

    def test_headroom_is_cut_first_to_fit_admission(self):
        cpu = {k: 0.2 for k in SIX}  # needs 6 x 0.2 = 1.2 CPUs, asked 1.5 x = 1.8
        w = six_stage_window(cpu, self.SVC, rate=1000)
        p = tl.propose(w, 2 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        self.assertEqual(p["fitted"], "headroom")
        self.assertTrue(p["feasible"])
        self.assertAlmostEqual(p["wanted_bandwidth"], 1.8, places=3)
        self.assertLessEqual(p["bandwidth_after"], 1.8 * 0.99 + 1e-9)
        self.assertGreater(p["bandwidth_after"], 1.8 * 0.99 - 6 * 0.004)
        for r in p["rows"]:
            self.assertGreaterEqual(r["after"]["runtime_ns"], r["need_runtime_ns"], r["thread"])
            self.assertFalse(r["short"])
        text = "\n".join(p["advice"])
        self.assertIn("admission: the proposal asks 1.800 CPUs", text)
        self.assertIn("fitted: the headroom above each thread's measured need was cut", text)
        self.assertNotIn("NOT ENOUGH", text)

    def test_scaling_and_grouping_advice_when_needs_exceed_admission(self):
        cpu = {"accept": 0.40, "parse": 0.35, "route": 0.05, "python": 0.50, "serialize": 0.04, "send": 0.60}
        w = six_stage_window(cpu, self.SVC, rate=1000)
        p = tl.propose(w, 2 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        self.assertEqual(p["fitted"], "scaled")
        self.assertFalse(p["feasible"])
        self.assertLessEqual(p["bandwidth_after"], 1.8 * 0.99 + 1e-9)
        rows = {r["thread"]: r for r in p["rows"]}
        # One factor on every need (the 20us floor aside): the ratios stay.
        self.assertAlmostEqual(rows["send"]["after"]["runtime_ns"] / rows["parse"]["after"]["runtime_ns"],
                               0.60 / 0.35, delta=0.05)
        self.assertTrue(all(r["short"] for r in p["rows"] if r["need_runtime_ns"] > 20 * US))
        text = "\n".join(p["advice"])
        self.assertIn("NOT ENOUGH", text)
        # The consecutive pair using the least CPU: route+python 0.55, python+serialize 0.54,
        # serialize+send 0.64, parse+route 0.40 -> parse, route first.
        self.assertIn("group: put stages parse, route on one lane", text)
        self.assertIn("`thread: parse`", text)
        self.assertIn("or give less: thread send asks the most", text)

    def test_grouping_never_pairs_two_python_lanes_or_other_threads(self):
        rows = [
            {"thread": "a", "stages": ["a"], "policy": "deadline", "need_runtime_ns": 50 * US, "after": {"period_ns": MS}},
            {"thread": "b", "stages": ["b"], "policy": "other", "need_runtime_ns": 0, "after": None},
            {"thread": "py", "stages": ["py"], "policy": "deadline", "need_runtime_ns": 10 * US, "after": {"period_ns": MS}},
            {"thread": "heavy", "stages": ["heavy"], "policy": "deadline", "need_runtime_ns": 10 * US, "after": {"period_ns": MS}},
            {"thread": "c", "stages": ["c"], "policy": "deadline", "need_runtime_ns": 300 * US, "after": {"period_ns": MS}},
        ]
        stages = {"a": {"name": "a", "type": "parse"}, "b": {"name": "b", "type": "route"},
                  "py": {"name": "py", "type": "python"}, "heavy": {"name": "heavy", "type": "python"},
                  "c": {"name": "c", "type": "send"}}
        pairs = [(a["thread"], b["thread"]) for _, a, b in tl.grouping_candidates(rows, stages)]
        self.assertEqual(pairs, [("heavy", "c")])

    def test_python_lanes_count_once_on_the_path(self):
        threads = [{"name": n, "stages": [n], "policy": pol} for n, pol in
                   [("accept", "deadline"), ("parse", "deadline"), ("route", "other"), ("python", "deadline"),
                    ("heavy", "deadline"), ("send", "deadline")]]
        stages = {"accept": {"name": "accept", "type": "accept"}, "parse": {"name": "parse", "type": "parse"},
                  "route": {"name": "route", "type": "route"}, "python": {"name": "python", "type": "python"},
                  "heavy": {"name": "heavy", "type": "python"}, "send": {"name": "send", "type": "send"}}
        self.assertEqual(tl.path_thread_count(threads, stages), 4)  # accept, parse, python|heavy, send

    def test_other_threads_are_left_alone(self):
        w = six_stage_window(self.CPU, self.SVC, policies={"route": "other"})
        p = tl.propose(w, 2 * MS, period_limits=(100 * US, 10**9))
        route = next(r for r in p["rows"] if r["thread"] == "route")
        self.assertIsNone(route["after"])
        self.assertEqual(p["n_path"], 5)
        self.assertEqual(p["period_ns"], 250 * US)  # 2ms / 5 = 400us -> 250us on the grid
        self.assertLess(p["bandwidth_after"], p["limit"])

    def test_throttled_window_fills_admission_by_cost(self):
        # Bad budgets: 20us/1ms each, every thread overrunning; CPU use in proportion 1:2:3...
        cpu = {"accept": 0.010, "parse": 0.005, "route": 0.004, "python": 0.006, "serialize": 0.003, "send": 0.018}
        ovr = {k: 2.0 for k in SIX}
        w = six_stage_window(cpu, self.SVC, rate=3000, runtime=20 * US, period=MS, overruns=ovr)
        p = tl.propose(w, 2 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        self.assertTrue(p["filled"])
        self.assertTrue(all(r["throttled"] for r in p["rows"]))
        self.assertLessEqual(p["bandwidth_after"], 1.8 * 0.99 + 1e-9)
        self.assertGreater(p["bandwidth_after"], 1.6)
        rows = {r["thread"]: r for r in p["rows"]}
        # The largest user gets the largest share, roughly in proportion.
        self.assertGreater(rows["send"]["after"]["runtime_ns"], rows["accept"]["after"]["runtime_ns"])
        self.assertGreater(rows["accept"]["after"]["runtime_ns"], rows["serialize"]["after"]["runtime_ns"])
        self.assertIn("were throttled", "\n".join(p["advice"]))

    def test_load_behind_counts_every_thread_throttled(self):
        # The window a CI run saw with 10us/1ms budgets: CPU at 20-90 % of each thread's 1 %,
        # no overrun signalled, and the open-loop load 1724 requests late with p99 1.2 s.
        cpu = {"accept": 0.004, "parse": 0.005, "route": 0.003, "python": 0.004, "serialize": 0.002, "send": 0.008}
        w = six_stage_window(cpu, self.SVC, rate=640, runtime=10 * US, period=MS)
        quiet = tl.propose(w, 30 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        self.assertFalse(quiet["filled"])  # nothing in the server's own numbers says throttled
        self.assertLess(quiet["bandwidth_after"], 0.2)
        load = {"requests": 4264, "rps": 1066, "p99_ms": 1158.7, "late": 1724, "rate": 1500}
        behind = tl.load_behind(load, 30 * MS)
        self.assertEqual(behind, "p99 1158.7ms against the 30ms target, 1724 requests late at 1500 req/s offered")
        p = tl.propose(w, 30 * MS, headroom=1.5, period_limits=(100 * US, 10**9), behind=behind)
        self.assertTrue(p["filled"])
        self.assertTrue(all(r["throttled"] for r in p["rows"]))
        self.assertGreater(p["bandwidth_after"], 1.6)
        self.assertIn("the load fell behind during the window (p99 1158.7ms", "\n".join(p["advice"]))
        # A load that kept up is not behind.
        self.assertIsNone(tl.load_behind({"requests": 6000, "p99_ms": 3.5, "late": 0, "rate": 1500}, 30 * MS))
        self.assertIsNone(tl.load_behind(None, 30 * MS))

    def test_fill_is_half_equal_half_by_cost(self):
        cpu = {"accept": 0.010, "parse": 0.005, "route": 0.004, "python": 0.006, "serialize": 0.003, "send": 0.018}
        ovr = {k: 2.0 for k in SIX}
        w = six_stage_window(cpu, self.SVC, rate=3000, runtime=20 * US, period=MS, overruns=ovr)
        p = tl.propose(w, 30 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        self.assertEqual(p["period_ns"], 5 * MS)
        total = sum(max(cpu[n], 0) for n in SIX)
        for r in p["rows"]:
            use = r["use_share"]
            weight = 0.5 * use / sum(x["use_share"] for x in p["rows"]) + 0.5 / 6
            expect = weight * 1.8 * 0.99 * 5 * MS
            self.assertAlmostEqual(r["fill_runtime_ns"], expect, delta=1000, msg=r["thread"])
            self.assertGreaterEqual(r["after"]["runtime_ns"], r["need_runtime_ns"])
        self.assertGreater(total, 0)

    def test_bursty_overruns_are_called_out(self):
        # 6 % of a CPU used with 30 % reserved, yet overrunning: short of runtime per period.
        cpu = {k: 0.06 for k in SIX}
        w = six_stage_window(cpu, self.SVC, rate=3000, runtime=75 * US, period=250 * US, overruns={"route": 4.0})
        p = tl.propose(w, 2 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        text = "\n".join(p["advice"])
        self.assertIn("route overran 4.0/s at 6.0 % of a CPU with 30 % reserved (75us/250us)", text)
        self.assertIn("short of runtime per period", text)
        self.assertIn("e.g. --latency-target 4ms (periods of 500us)", text)
        route = next(r for r in p["rows"] if r["thread"] == "route")
        self.assertEqual(route["want_runtime_ns"], 150 * US)  # twice the old runtime...
        # ...but all 1.8 CPUs were reserved already: the fit takes the extra from the others.
        self.assertEqual(p["fitted"], "headroom")
        self.assertGreater(route["after"]["runtime_ns"], 110 * US)
        for r in p["rows"]:
            if r["thread"] != "route":
                self.assertLess(r["after"]["runtime_ns"], 75 * US)
                self.assertGreaterEqual(r["after"]["runtime_ns"], r["need_runtime_ns"])

    def test_saturated_thread_is_throttled_and_fill_follows_use(self):
        # accept used 19.5 % of its 20 %: throttled (censored); the others ran free.
        cpu = dict(self.CPU, accept=0.195)
        w = six_stage_window(cpu, self.SVC, rate=10000, runtime=200 * US, period=MS)
        p = tl.propose(w, 6 * MS, headroom=1.5, period_limits=(100 * US, 10**9))
        rows = {r["thread"]: r for r in p["rows"]}
        self.assertTrue(rows["accept"]["throttled"])
        self.assertFalse(rows["parse"]["throttled"])
        self.assertTrue(p["filled"])
        self.assertGreater(rows["accept"]["after"]["bandwidth"], 0.3)
        self.assertLessEqual(p["bandwidth_after"], 1.8 * 0.99 + 1e-9)

    def test_refuses_when_even_the_floors_do_not_fit(self):
        w = six_stage_window(self.CPU, self.SVC, admitted=0.3)
        with self.assertRaises(tl.TuneError):
            tl.propose(w, 600 * US, period_limits=(100 * US, 10**9))  # 6 x 20us / 100us = 1.2 CPUs


class YamlTest(unittest.TestCase):
    TEXT = """# top comment
server:
  listen: 127.0.0.1:8080   # runtime: 1ms (not this one)
pipeline:
  # runtime: 5us in a comment stays
  - {stage: accept,    policy: deadline, wait: block, runtime: 20us, period: 1ms}   # keep me
  - stage: parse
    policy: deadline
    runtime: 20us      # block style
    deadline: 800us
    period: 1ms
  - {stage: route, thread: parse}
  - {stage: python,    policy: other}
other:
  runtime: 7us
"""

    def test_edit_in_place_keeps_everything_else(self):
        new = tl.edit_pipeline_text(self.TEXT, {0: {"runtime": "115us", "period": "250us"},
                                                1: {"runtime": "60us", "period": "250us", "deadline": "200us"}})
        old_lines, new_lines = self.TEXT.split("\n"), new.split("\n")
        self.assertEqual(len(old_lines), len(new_lines))
        changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
        self.assertEqual(changed, [
            ("  - {stage: accept,    policy: deadline, wait: block, runtime: 20us, period: 1ms}   # keep me",
             "  - {stage: accept,    policy: deadline, wait: block, runtime: 115us, period: 250us}   # keep me"),
            ("    runtime: 20us      # block style", "    runtime: 60us      # block style"),
            ("    deadline: 800us", "    deadline: 200us"),
            ("    period: 1ms", "    period: 250us"),
        ])
        self.assertEqual(tl.config_entries_from_text(self.TEXT),
                         [("accept", "accept", None), ("parse", "parse", None), ("route", "route", "parse"),
                          ("python", "python", None)])

    def test_missing_key_is_an_error(self):
        with self.assertRaises(tl.TuneError):
            tl.edit_pipeline_text(self.TEXT, {3: {"runtime": "20us"}})
        with self.assertRaises(tl.TuneError):
            tl.edit_pipeline_text("server: {}\n", {0: {"runtime": "20us"}})

    def test_dump_is_valid_for_metronome_check(self):
        cfg = {"server": {"listen": "127.0.0.1:8080"}, "python": {"app": "examples.app:app", "path": ["pyhandlers"]},
               "routes": [{"path": "/native/plaintext", "content_type": "text/plain", "body": "Hello, World!"}],
               "pipeline": [{"stage": s, "policy": "deadline", "wait": "block", "runtime": "20us", "period": "1ms"}
                            for s in SIX]}
        cfg = tl.apply_to_config_json(cfg, {0: {"runtime": "50us", "period": "250us"}})
        text = tl.dump_yaml(cfg, "# header\n")
        self.assertIn("  - {stage: accept, policy: deadline, wait: block, runtime: 50us, period: 250us}", text)
        self.assertIn('body: "Hello, World!"', text)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(text)
            f.flush()
            ok, out, budgets = tl.check_config(BINARY, f.name, cwd=ROOT)
        self.assertTrue(ok, out)
        self.assertEqual(budgets["accept"], (50 * US, 250 * US))
        self.assertEqual(budgets["send"], (20 * US, MS))


# --- end to end -----------------------------------------------------------------------------------

# The acceptance run's load on the example app's /json handler: an open loop at a fixed rate
# (metronome-load --rate), the load the tuner sizes the budgets for. (A closed loop speeds up as
# soon as the budgets allow it, until the threads are CPU-bound and overrun again.)
# The margins, measured closed loop with this load on the 2-core VM: bad budgets carry ~800 req/s,
# tuned ones ~7k with two load processes (~5k with one: six deadline threads preempting it at each
# wake-up slow a Python client down, and a CI run at 3000 req/s from one process came out 17 % late
# with zero overruns). 1500 req/s sits well apart from both.
LOAD_ARGS = os.environ.get("TUNE_TEST_LOAD", "-c 16 --rate 1500 -w 2 -e python").split()
PHASE_SECONDS = float(os.environ.get("TUNE_TEST_PHASE", "4"))
# 30ms over the six deadline threads: 5ms periods. Measured on the 2-core VM this was written on:
# with runtimes under ~0.5ms per period (periods of 1ms and less at these bandwidths) the threads
# overrun a few times a second whatever their headroom (bursts of wake-ups and interrupt time
# charged to them); with 2ms periods and more, at the same bandwidth, they did not.
LATENCY_TARGET = os.environ.get("TUNE_TEST_TARGET", "30ms")


def foreign_deadline_tasks(own_pid):
    """Threads of other processes under SCHED_DEADLINE: they share the admission limit."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == own_pid:
            continue
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/sched") as f:
                    if re.search(r"^policy\s*:\s*6$", f.read(), re.M):
                        out.append(f"{pid}/{tid}")
        except OSError:
            continue
    return out


def admin_url(server):
    m = re.search(r"admin listening on http://([\d.]+:\d+)", server.read_log())
    assert m, server.read_log()
    return "http://" + m.group(1)


def stats(server):
    return tl.fetch_stats(admin_url(server))  # waits while the server answers 503 "starting"


def bad_budgets_text():
    with open(BAD_BUDGETS) as f:
        text = f.read()
    new = re.sub(r"(admin:\s*\n\s*listen:\s*)127\.0\.0\.1:9090", r"\g<1>127.0.0.1:0", text)
    assert new != text, "bad-budgets.yaml has no admin listen 127.0.0.1:9090 to replace"
    return new


def tool(name, *args, timeout=120):
    return subprocess.run([PY, os.path.join(TOOLS, name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def phase(server, seconds=PHASE_SECONDS):
    """Drives the load for `seconds`; returns (load result, analyze() window of the server)."""
    s0 = stats(server)
    p = tool("metronome-load", f"http://127.0.0.1:{server.port}/json", *LOAD_ARGS,
             "-d", f"{seconds}s", "--json", timeout=seconds + 60)
    s1 = stats(server)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), tl.analyze(s0, s1)


def describe(label, load, w):
    threads = ", ".join(f"{t['name']} {t['overruns']:.1f}" + (" (fallback)" if t["fallback"] else "")
                        for t in w["threads"])
    return (f"{label}: {load['rps']:.0f} req/s, p99 {load['p99_ms']:.2f}ms, errors {load['errors_total']}, "
            f"late {load['late']}, "
            f"overruns/s {w['totals']['overruns_per_s']:.2f} [{threads}]")


class AcceptanceTest(unittest.TestCase):
    """Bad budgets -> tune -> the tuned budgets carry the same load without throttling."""

    def test_tune_removes_overruns_and_keeps_throughput(self):
        tmp = tempfile.TemporaryDirectory(prefix="metronome-tune-")
        self.addCleanup(tmp.cleanup)
        bad = os.path.join(tmp.name, "bad.yaml")
        with open(bad, "w") as f:
            f.write(bad_budgets_text())
        tuned = os.path.join(tmp.name, "tuned.yaml")

        with Server(config_file=bad) as server:
            load0, before = phase(server)
            report = [describe("before", load0, before)]
            self.assertEqual(load0["errors_total"], 0, load0)  # slow, but no errors
            self.assertGreater(load0["requests"], 0)
            if any(t["fallback"] for t in before["threads"]):
                self.skipTest("the kernel refused even the bad budgets: other processes hold SCHED_DEADLINE "
                              f"bandwidth ({len(foreign_deadline_tasks(server.pid))} threads)")
            # The bad budgets really are bad under this load: the threads overrun (SIGXCPU comes at
            # most once per 4ms tick that finds an overrun thread running, so 20us runs are
            # undercounted) or the server falls behind the offered rate.
            self.assertTrue(before["totals"]["overruns_per_s"] >= 1.0 or load0["late"] >= 0.05 * load0["requests"],
                            report)
            tune = tool("metronome-tune", "--admin", admin_url(server), "--duration", "3s",
                        "--latency-target", LATENCY_TARGET,
                        "--load", f"http://127.0.0.1:{server.port}/json {' '.join(LOAD_ARGS)}",
                        "--config", bad, "--write", tuned, "--metronome", BINARY, timeout=120)
            self.assertEqual(tune.returncode, 0, tune.stdout + tune.stderr)
        report.append(tune.stdout)
        self.assertIn("deadline bandwidth: before 0.060, after", tune.stdout)
        self.assertIn(f"wrote {tuned}", tune.stdout)

        # The written file: valid, and only runtime/period of deadline threads changed.
        check = subprocess.run([BINARY, "check", "-c", tuned], capture_output=True, text=True, cwd=ROOT)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        with open(bad) as f:
            old_lines = f.read().split("\n")
        with open(tuned) as f:
            new_lines = f.read().split("\n")
        self.assertEqual(len(old_lines), len(new_lines))
        changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
        self.assertEqual(len(changed), 6, changed)
        for a, b in changed:
            self.assertEqual(re.sub(r"runtime: \w+,\s+period: \w+", "", a),
                             re.sub(r"runtime: \w+,\s+period: \w+", "", b), (a, b))
        budgets = tl.check_config(BINARY, tuned, cwd=ROOT)[2]
        self.assertEqual(len(budgets), 6, check.stdout)
        self.assertLessEqual(sum(r / p for r, p in budgets.values()), 1.8 + 1e-9)
        self.assertTrue(all(r >= 20 * US for r, _ in budgets.values()), budgets)

        with Server(config_file=tuned) as server:
            fallbacks = [t["name"] for t in stats(server)["threads"] if t["fallback"]]
            if fallbacks:
                others = foreign_deadline_tasks(server.pid)
                if others:
                    self.skipTest(f"other processes hold SCHED_DEADLINE bandwidth ({len(others)} threads), so "
                                  f"threads {fallbacks} of the tuned server were refused admission")
                self.fail(f"the kernel refused the tuned budgets for {fallbacks}: {server.read_log()}")
            load1, after = phase(server)
            report.append(describe("after", load1, after))
            top = tool("metronome-top", "--admin", admin_url(server), "--once", "--interval", "200ms")
        msg = "\n".join(report)
        print("\n" + msg, file=sys.stderr)
        self.assertEqual(top.returncode, 0, top.stderr)
        # The tuned bandwidth, live.
        self.assertIn(f"deadline bandwidth {sum(r / p for r, p in budgets.values()):.3f} of 1.80", top.stdout)
        self.assertEqual(load1["errors_total"], 0, msg)
        # Overruns gone (or nearly), throughput kept, and the requests no longer wait out the
        # throttled periods.
        before_ovr = before["totals"]["overruns_per_s"]
        after_ovr = after["totals"]["overruns_per_s"]
        self.assertLessEqual(after_ovr, max(0.1 * before_ovr, 1.0), msg)
        self.assertGreaterEqual(load1["rps"], 0.9 * load0["rps"], msg)
        self.assertLessEqual(load1["late"], 0.01 * load1["requests"], msg)
        self.assertLess(load1["p99_ms"], load0["p99_ms"], msg)


class ToolsTest(unittest.TestCase):
    """The tools against a live server: top's frame, tune without --config (dumped config),
    usage errors, and a tuner that finds no load."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="metronome-tools-")
        path = os.path.join(cls.tmp.name, "bad.yaml")
        with open(path, "w") as f:
            f.write(bad_budgets_text())
        cls.server = Server(config_file=path)
        cls.admin = admin_url(cls.server)

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)
        cls.tmp.cleanup()

    def test_top_once_shows_threads_stages_and_totals(self):
        p = tool("metronome-top", "--admin", self.admin, "--once", "--interval", "300ms")
        self.assertEqual(p.returncode, 0, p.stderr)
        out = p.stdout
        self.assertNotIn("\x1b[", out)  # --once: no screen control
        for name in SIX:
            self.assertRegex(out, rf"(?m)^{name}\s+deadline\s+block\s+10us/1ms\s+1\.0%")
        self.assertIn("responses/s", out)
        self.assertIn("open connections", out)
        self.assertIn("budget kills: cpu", out)
        self.assertIn("deadline bandwidth 0.060 of 1.80 CPUs admitted", out)

    def test_tune_without_config_dumps_a_valid_file(self):
        out = os.path.join(self.tmp.name, "dumped.yaml")
        p = tool("metronome-tune", "--admin", self.admin, "--duration", "2s", "--latency-target", "3ms",
                 "--load", f"http://127.0.0.1:{self.server.port}/json -c 4 -e python",
                 "--write", out, "--metronome", BINARY, "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        result = json.loads(p.stdout)
        self.assertEqual(result["written"], out)
        prop = result["proposal"]
        self.assertEqual(prop["period_ns"], 500 * US)  # 3ms / 6 threads -> 500us
        with open(out) as f:
            text = f.read()
        self.assertTrue(text.startswith("# Written by metronome-tune"), text)
        budgets = tl.check_config(BINARY, out, cwd=ROOT)[2]
        self.assertEqual({k: v[1] for k, v in budgets.items()}, {n: 500 * US for n in SIX})
        for r in prop["rows"]:
            self.assertEqual(budgets[r["thread"]][0], r["after"]["runtime_ns"])

    def test_no_load_is_an_error(self):
        p = tool("metronome-tune", "--admin", self.admin, "--duration", "1s", "--latency-target", "2ms")
        self.assertEqual(p.returncode, 1)
        self.assertIn("no requests reached the pipeline", p.stderr)

    def test_no_admin_listener_is_an_error(self):
        p = tool("metronome-tune", "--admin", "http://127.0.0.1:9", "--duration", "1s", "--latency-target", "2ms")
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot read http://127.0.0.1:9/stats", p.stderr)
        p = tool("metronome-top", "--admin", "http://127.0.0.1:9", "--once")
        self.assertEqual(p.returncode, 1)

    def test_config_that_does_not_match_the_server_is_refused(self):
        other = os.path.join(self.tmp.name, "other.yaml")
        with open(other, "w") as f:
            f.write("python: {app: \"examples.app:app\", path: [pyhandlers]}\npipeline:\n" +
                    "".join(f"  - {{stage: {s}, policy: deadline, wait: block, runtime: 20us, period: 1ms}}\n"
                            for s in SIX if s != "route"))
        p = tool("metronome-tune", "--admin", self.admin, "--duration", "1s", "--latency-target", "2ms",
                 "--load", f"http://127.0.0.1:{self.server.port}/json -c 2 -e python",
                 "--config", other, "--write", os.path.join(self.tmp.name, "x.yaml"), "--metronome", BINARY)
        self.assertEqual(p.returncode, 1, p.stdout)
        self.assertIn("does not describe the running pipeline", p.stderr)

    def test_usage_errors(self):
        for args, msg in [(["--latency-target", "2ms", "--headroom", "0.5"], "--headroom"),
                          (["--latency-target", "50us"], "latency"),
                          (["--latency-target", "2ms", "--duration", "soon"], "not a duration"),
                          ([], "--latency-target")]:
            p = tool("metronome-tune", *args)
            self.assertEqual(p.returncode, 2, args)
            self.assertIn(msg, p.stderr)
        p = tool("metronome-load", "http://10.0.0.1:80/")
        self.assertEqual(p.returncode, 2)
        self.assertIn("only loopback targets", p.stderr)

    def test_load_python_engine_counts_statuses_and_paths(self):
        p = tool("metronome-load", f"http://127.0.0.1:{self.server.port}", "-p", "/json@3", "-p", "/missing@1",
                 "-c", "4", "-d", "1s", "-e", "python", "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        r = json.loads(p.stdout)
        self.assertGreater(r["requests"], 50)
        self.assertEqual(r["requests"], r["status"].get("2xx", 0) + r["status"].get("4xx", 0))
        share = r["status"].get("4xx", 0) / r["requests"]
        self.assertTrue(0.1 < share < 0.45, r)  # 1 in 4 asked for /missing
        self.assertEqual(r["non_2xx_3xx"], r["status"].get("4xx", 0))
        self.assertEqual(sum(r["errors"].values()), 0)
        self.assertLessEqual(r["p50_ms"], r["p99_ms"])


if __name__ == "__main__":
    unittest.main()
