"""Shared code of metronome's tuning tools (metronome-tune, metronome-top, metronome-load).

Stdlib only; runs under Debian's /usr/bin/python3. Everything here works on /stats snapshots
(the JSON of the admin listener, admin/stats.cc), so the proposal math can be tested on
synthetic snapshots without a server.

Snapshot shape (what this module reads):
  time, admission{admitted_cpus, deadline_bandwidth}, bucket_upper_bounds_ns[],
  threads[]{name, stages[], policy, policy_in_force, wait, runtime_ns, deadline_ns, period_ns,
            bandwidth, queue_depth, queue_full_total, sleeps, yields, overruns, stalls,
            cpu_seconds}
  stages[]{name, type, thread, items_in, items_out, batches, busy_seconds,
           service{buckets[[index, count], ...]}, extra{...}}
  config (the YAML as JSON: every scalar a string)
"""

import json
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

NS_PER_US = 1_000
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

MIN_RUNTIME_NS = 20 * NS_PER_US
PERIOD_MIN_NS = 100 * NS_PER_US
PERIOD_MAX_NS = NS_PER_S
# Periods are rounded down to this grid: 1, 2, 2.5 and 5 times a power of ten.
GRID_MANTISSAS = (1.0, 2.0, 2.5, 5.0)
# The proposal leaves this share of the admitted bandwidth unused (rounding, other deadline tasks).
ADMISSION_MARGIN = 0.01
# A deadline thread that used this share of its bandwidth (or overran) was throttled.
THROTTLED_SHARE = 0.9
# A thread that overran at less than half of its bandwidth gets this many times its old runtime.
OVERRUN_BOOST = 2.0
# Overruns below this rate (per second) are reported but taken for noise (a stray interrupt).
OVERRUN_NOISE = 0.5
# An open-loop load with more than this share of its requests late fell behind the server.
LATE_SHARE = 0.01
# The fill of a throttled window: this share of the admitted bandwidth is split equally, the rest
# in proportion to the CPU each thread used.
FILL_EQUAL = 0.5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TuneError(Exception):
    """A failure to report to the user in one line (no traceback)."""


# --- units ---------------------------------------------------------------------------------

_DURATION_UNITS = {"ns": 1, "us": NS_PER_US, "ms": NS_PER_MS, "s": NS_PER_S}


def parse_duration_ns(text):
    """'250us' -> 250000. Plain numbers are seconds. Raises ValueError."""
    t = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ns|us|ms|s)?", t)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250us, 2ms, 10s)")
    unit = m.group(2) or "s"
    return int(round(float(m.group(1)) * _DURATION_UNITS[unit]))


def format_duration(ns):
    """Like the server's FormatDuration: the largest unit that divides exactly."""
    ns = int(ns)
    for unit, scale in (("s", NS_PER_S), ("ms", NS_PER_MS), ("us", NS_PER_US)):
        if ns != 0 and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return f"{ns}ns"


def human_ns(ns):
    """Approximate and short, for tables: 1.23ms, 45.6us, 230ns."""
    if ns is None:
        return "-"
    ns = float(ns)
    if ns >= NS_PER_S:
        return f"{ns / NS_PER_S:.3g}s"
    if ns >= NS_PER_MS:
        return f"{ns / NS_PER_MS:.3g}ms"
    if ns >= NS_PER_US:
        return f"{ns / NS_PER_US:.3g}us"
    return f"{ns:.0f}ns"


def human_rate(v):
    if v is None:
        return "-"
    if v >= 100_000:
        return f"{v / 1000:.0f}k"
    if v >= 10_000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    if v == 0:
        return "0"
    return f"{v:.2f}"


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def grid_floor(ns):
    """The largest grid value (1/2/2.5/5 x 10^k ns) <= ns; at least 1ns."""
    if ns < 1:
        return 1
    best = 1
    e = 0
    while 10 ** e <= ns:
        for m in GRID_MANTISSAS:
            v = int(m * 10 ** e)
            if v <= ns:
                best = max(best, v)
        e += 1
    return best


def kernel_period_limits():
    """(min, max) SCHED_DEADLINE period in ns: the kernel's sysctls clamped to [100us, 1s]."""
    lo, hi = PERIOD_MIN_NS, PERIOD_MAX_NS
    try:
        with open("/proc/sys/kernel/sched_deadline_period_min_us") as f:
            lo = max(lo, int(f.read()) * NS_PER_US)
        with open("/proc/sys/kernel/sched_deadline_period_max_us") as f:
            hi = min(hi, int(f.read()) * NS_PER_US)
    except (OSError, ValueError):
        pass
    return lo, hi


# --- the admin listener --------------------------------------------------------------------

def normalize_admin(url):
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/stats"):
        url = url[: -len("/stats")]
    return url


def fetch_stats(admin, timeout=5.0, starting_wait=10.0):
    """The /stats document. While the server is starting (503 "starting") it retries for up to
    starting_wait seconds."""
    url = normalize_admin(admin) + "/stats"
    give_up = time.monotonic() + starting_wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as f:
                return json.load(f)
        except urllib.error.HTTPError as e:
            if e.code == 503 and time.monotonic() < give_up:
                time.sleep(0.05)
                continue
            raise TuneError(f"{url} answered {e.code} {e.reason}")
        except (urllib.error.URLError, OSError) as e:
            raise TuneError(f"cannot read {url}: {getattr(e, 'reason', e)} "
                            "(is the server running with an `admin: {listen: HOST:PORT}` section?)")
        except ValueError as e:
            raise TuneError(f"{url} did not return JSON: {e}")


# --- histograms ------------------------------------------------------------------------------

def hist_delta(h0, h1):
    """Per-bucket counts of h1 minus h0 ({index: count}); h0 may be None."""
    out = {int(i): int(c) for i, c in (h1 or {}).get("buckets", [])}
    for i, c in (h0 or {}).get("buckets", []):
        i = int(i)
        if i in out:
            out[i] = max(0, out[i] - int(c))
    return {i: c for i, c in out.items() if c > 0}


def hist_quantile_ns(counts, q, bounds):
    """The q-quantile of {bucket: count}, interpolated inside its bucket like the server's
    LatencyHistogram::Snapshot::QuantileNs. None when empty."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    last = len(bounds) - 1
    for i in sorted(counts):
        c = counts[i]
        if seen + c >= rank:
            lo = 0.0 if i == 0 else float(bounds[i - 1])
            hi = lo * 1.19 if i >= last or bounds[i] is None else float(bounds[i])
            frac = min(1.0, max(0.0, (rank - seen) / c))
            return lo + (hi - lo) * frac
        seen += c
    return float(bounds[last - 1])


# --- a measurement window --------------------------------------------------------------------

def _num(v, default=0.0):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _extra_sum(snap, stage_type, key):
    total = 0.0
    for s in snap.get("stages", []):
        if stage_type is None or s.get("type") == stage_type:
            total += _num(s.get("extra", {}).get(key))
    return total


def analyze(s0, s1, peak_windows=()):
    """Rates over the window between snapshots s0 and s1 (s1 later).

    Returns {"wall", "stages": {name: {...}}, "threads": [{...}], "totals": {...},
             "admitted", "bandwidth_before"}.
    peak_windows: optional list of analyze() results of the sub-intervals, for peaks.
    """
    wall = _num(s1.get("time")) - _num(s0.get("time"))
    if wall <= 0:
        raise TuneError("the two /stats snapshots are not in time order")
    if _num(s1.get("uptime_seconds"), 1e18) < _num(s0.get("uptime_seconds"), 0):
        raise TuneError("the server restarted during the measurement (uptime went back)")
    bounds = s1.get("bucket_upper_bounds_ns") or []
    st0 = {s["name"]: s for s in s0.get("stages", [])}
    stages = {}
    for s in s1.get("stages", []):
        p = st0.get(s["name"], {})
        d = lambda k: max(0.0, _num(s.get(k)) - _num(p.get(k)))  # noqa: E731
        hd = hist_delta(p.get("service"), s.get("service"))
        stages[s["name"]] = {
            "name": s["name"],
            "type": s.get("type", ""),
            "thread": s.get("thread", ""),
            "arrivals": d("items_in") / wall,
            "items_out": d("items_out") / wall,
            "batches": d("batches") / wall,
            "busy_share": d("busy_seconds") / wall,
            "service_count": sum(hd.values()),
            "p50_ns": hist_quantile_ns(hd, 0.5, bounds),
            "p99_ns": hist_quantile_ns(hd, 0.99, bounds),
            "items_in_delta": d("items_in"),
        }
    th0 = {t["name"]: t for t in s0.get("threads", [])}
    threads = []
    for t in s1.get("threads", []):
        p = th0.get(t["name"], {})
        d = lambda k: max(0.0, _num(t.get(k)) - _num(p.get(k)))  # noqa: E731
        cpu1, cpu0 = _num(t.get("cpu_seconds"), -1), _num(p.get("cpu_seconds"), -1)
        cpu_share = (cpu1 - cpu0) / wall if cpu1 >= 0 and cpu0 >= 0 else None
        threads.append({
            "name": t["name"],
            "stages": list(t.get("stages", [])),
            "policy": t.get("policy", "other"),
            "policy_in_force": t.get("policy_in_force", t.get("policy", "other")),
            "wait": t.get("wait", "block"),
            "runtime_ns": int(_num(t.get("runtime_ns"))),
            "deadline_ns": int(_num(t.get("deadline_ns"))),
            "period_ns": int(_num(t.get("period_ns"))),
            "bandwidth": _num(t.get("bandwidth")),
            "fallback": t.get("fallback", ""),
            "main_thread": bool(t.get("main_thread")),
            "cpu_share": cpu_share,
            "overruns": d("overruns") / wall,
            "sleeps": d("sleeps") / wall,
            "yields": d("yields") / wall,
            "stalls": d("stalls") / wall,
            "queue_full": d("queue_full_total") / wall,
            "queue_depth": int(_num(t.get("queue_depth"))),
            "queue_capacity": int(_num(t.get("queue_capacity"))),
            "batch_max": int(_num(t.get("batch_max"), 1)),
        })
    totals = {"responses": {}, "connections_open": _extra_sum(s1, "accept", "connections_open")}
    for cls in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
        key = f"responses_{cls}_total"
        totals["responses"][cls] = max(0.0, _extra_sum(s1, "send", key) - _extra_sum(s0, "send", key)) / wall
    kills = {}
    for kind, key in (("cpu", "budget_cpu_kills_total"), ("memory", "budget_memory_kills_total"),
                      ("rss", "budget_rss_sheds_total")):
        kills[kind] = {"total": _extra_sum(s1, "python", key),
                       "per_s": max(0.0, _extra_sum(s1, "python", key) - _extra_sum(s0, "python", key)) / wall}
    totals["budget_kills"] = kills
    totals["responses_per_s"] = sum(totals["responses"].values())
    totals["overruns_per_s"] = sum(t["overruns"] for t in threads)
    adm = s1.get("admission", {})
    # Under a supervisor (server.workers) /stats shows the first ready worker, and every worker
    # runs the same pipeline: the machine's admission limit is shared by all of them, so one
    # worker's proposal must fit in its share.
    workers = max(1, len((s1.get("supervisor") or {}).get("workers") or [])) if "supervisor" in s1 else 1
    return {
        "wall": wall,
        "stages": stages,
        "threads": threads,
        "totals": totals,
        "workers": workers,
        "admitted": _num(adm.get("admitted_cpus"), 0.0) / workers,
        "bandwidth_before": _num(adm.get("deadline_bandwidth"),
                                 sum(t["bandwidth"] for t in threads if t["policy"] == "deadline")),
        "peaks": list(peak_windows),
    }


# --- the proposal -----------------------------------------------------------------------------

PROPOSAL_RULES = """\
How the proposal is made (per deadline thread; other threads are left as they are):
  period   = latency target / N, rounded DOWN to the grid 1, 2, 2.5, 5 x 10^k
             (100us, 200us, 250us, 500us, 1ms, 2ms, 2.5ms, ...), clamped to [100us, 1s].
             N = the deadline threads a request crosses: every deadline thread, except that
             threads running only python stages are alternatives (light/heavy lanes): a request
             crosses one of them, so they count once. With wait: block or yield a request can
             wait up to about one period at each thread it crosses.
  need     = the measured work per period, the largest of
               sum over the thread's stages of p99 service time per item x arrivals per period,
               the thread's measured CPU share x period (cpu_seconds over the window), and
               the stages' measured busy share x period (for sources such as accept, whose
               work does not arrive as items)
  runtime  = headroom x need, rounded up to 1us, at least 20us, at most the period.
  deadline = kept only where the config sets one: same share of the period as before
             (never below the runtime).
Admission: the sum of runtime/period over the deadline threads must fit the CPUs the kernel
admits (/stats admission.admitted_cpus, less a 1 % margin; other deadline processes on the
machine share the same limit). If it does not, the tuner says which consecutive threads to group
on one lane (the pair using the least CPU first) or which thread to give less, and fits the
proposal: first the headroom above each need shrinks (the same share on every thread); if the
needs alone do not fit, every need is scaled by one factor (never below 20us): such a proposal
cannot carry the measured load, and the tuner says so.
Throttled threads: a deadline thread that overran its runtime in the window (0.5 times a second
or more; fewer are taken for noise), or used 90 % of its bandwidth or more, was throttled; and
with --load, when the load fell behind (its p99 above the latency target, or more than 1 % of an
open loop's requests late), every deadline thread counts as throttled, since tiny runtimes are
throttled without a signal (SIGXCPU comes at most once per scheduler tick) and a thread idle in
some periods stays under its bandwidth on average. A throttled thread's CPU share was capped by
the old budget, its service times and busy time include the time it spent throttled, and under
closed-loop load every thread of the pipeline saw the rate the throttled one let through, not
the demand. Then
  need     = the larger of its CPU share x period and p50 service x arrivals per period;
             runtime = headroom x that need, and, if it overran at less than half of its
             bandwidth (short of runtime per period for its bursts, not of bandwidth), at
             least twice its old runtime (this extra is the first to go in the admission fit)
  fill     = every deadline thread gets at least (admitted - 1 %) x period x weight,
             weight = 1/2 x use / total use + 1/2 x 1 / (deadline threads),
             use = max(CPU share, p50 service x arrivals/s): half the admitted bandwidth shared
             in proportion to each thread's cost per request, half equally (every thread also
             pays for wake-ups and interrupts charged to it, whatever its average), so that no
             thread stays the bottleneck; the admission fit above then applies.
Short periods: a thread's runtime per period must also cover its bursts (a clump of wake-ups,
interrupt time charged to it). A thread that overran at less than half of its bandwidth was
short of runtime per period, not of bandwidth: the tuner says so; a longer period (a longer
--latency-target) gives it more runtime per period at the same bandwidth.
Closed-loop load (wrk, or metronome-load without --rate) speeds up until the machine is busy:
tuned budgets raise the throughput until the threads are CPU-bound and some overrun again. The
tuner then says the needs do not fit (group stages on fewer threads, or cap the load); budgets
are sized for an offered load (metronome-load --rate R).
Run the load and the tuner again on the new budgets: an unthrottled window sizes every thread to
its measured demand, and a thread that still overruns gets more."""


def path_thread_count(threads, stages):
    """Deadline threads a request crosses (python-only threads count once together)."""
    types = {s["name"]: s.get("type", "") for s in stages.values()} if isinstance(stages, dict) else \
        {s["name"]: s.get("type", "") for s in stages}
    n = 0
    python_alt = False
    for t in threads:
        if t["policy"] != "deadline":
            continue
        st = t["stages"]
        if st and all(types.get(s) == "python" for s in st):
            python_alt = True
        else:
            n += 1
    return n + (1 if python_alt else 0)


def choose_period_ns(target_ns, n_path, limits=None):
    lo, hi = limits or (PERIOD_MIN_NS, PERIOD_MAX_NS)
    n = max(1, n_path)
    return int(min(hi, max(lo, grid_floor(target_ns / n))))


def thread_need_ns(thread, stages, period_ns, behind=False):
    """(need_ns, parts): the measured work of one thread per period (see PROPOSAL_RULES).

    parts: items_p99 (sum of p99 service x arrivals per period), cpu (CPU share x period),
    busy (busy share x period), items_p50 (p50 service x arrivals per period), use (CPU per
    second: max of the CPU share and the p50 work), bursty (it overran at less than half of its
    bandwidth), boost (then: twice its old runtime), throttled (bool), and robust (the need of a
    throttled thread: the measures that throttling does not inflate). behind: the load fell
    behind during the window, so every deadline thread counts as throttled."""
    items = items50 = busy = 0.0
    for name in thread["stages"]:
        s = stages.get(name)
        if s is None:
            continue
        if s["p99_ns"] is not None and s["arrivals"] > 0:
            items += s["p99_ns"] * s["arrivals"] * period_ns / NS_PER_S
            items50 += s["p50_ns"] * s["arrivals"] * period_ns / NS_PER_S
        busy += s["busy_share"] * period_ns
    cpu = (thread["cpu_share"] or 0.0) * period_ns
    in_force = thread.get("policy_in_force", thread["policy"]) == "deadline"
    overran = in_force and thread["overruns"] >= OVERRUN_NOISE
    saturated = in_force and thread["cpu_share"] is not None and thread["bandwidth"] > 0 and \
        thread["cpu_share"] >= THROTTLED_SHARE * thread["bandwidth"]
    # Overruns at less than half of the bandwidth: the runtime per period was short of the
    # thread's bursts, not of its load: ask twice the old runtime (absolute).
    bursty = overran and thread["cpu_share"] is not None and thread["cpu_share"] < 0.5 * thread["bandwidth"]
    boost = min(period_ns, OVERRUN_BOOST * thread["runtime_ns"]) if bursty else 0.0
    parts = {"items_p99": items, "items_p50": items50, "cpu": cpu, "busy": busy, "boost": boost,
             "bursty": bursty, "use": max(cpu, items50) / period_ns,
             "throttled": overran or saturated or (in_force and behind)}
    parts["robust"] = max(cpu, items50)
    need = parts["robust"] if parts["throttled"] else max(items, cpu, busy)
    return need, parts


def load_behind(load, latency_target_ns):
    """Why the tuner's own load fell behind the server (None if it did not): its p99 above the
    latency target, or more than LATE_SHARE of an open loop's requests never sent in time.
    load: metronome-load --json output."""
    if not load or not load.get("requests"):
        return None
    p99_ms, late = load.get("p99_ms") or 0.0, load.get("late") or 0
    target_ms = latency_target_ns / 1e6
    why = []
    if p99_ms > target_ms:
        why.append(f"p99 {p99_ms:.1f}ms against the {format_duration(latency_target_ns)} target")
    if late > LATE_SHARE * load["requests"]:
        why.append(f"{late} requests late at {load.get('rate', 0):g} req/s offered")
    return ", ".join(why) or None


def _round_us(ns, lo, hi, up=True):
    # (1e-6: float noise such as 1.2000000000000002 must not round up a whole microsecond)
    v = math.ceil(ns / NS_PER_US - 1e-6) if up else math.floor(ns / NS_PER_US + 1e-6)
    return int(min(hi, max(lo, v * NS_PER_US)))


def propose(window, latency_target_ns, headroom=1.5, admitted=None, min_runtime_ns=MIN_RUNTIME_NS,
            period_limits=None, margin=ADMISSION_MARGIN, behind=None):
    """The proposal for every thread of an analyze() window. Returns a dict:
      period_ns, n_path, limit, rows[] (one per thread, in pipeline order), wanted_bandwidth,
      bandwidth_after, need_bandwidth, fitted (None | "headroom" | "scaled"), fit_factor,
      filled (the window was throttled), advice[] (lines), feasible (the measured needs fit),
      behind.
    behind: None, or why the load fell behind during the window (see load_behind()).
    """
    if headroom < 1.0:
        raise TuneError("--headroom must be at least 1.0")
    admitted = window["admitted"] if admitted is None else admitted
    limit = admitted * (1.0 - margin) if admitted > 0 else float("inf")
    stages = window["stages"]
    n_path = path_thread_count(window["threads"], stages)
    period = choose_period_ns(latency_target_ns, n_path, period_limits)
    rows = []
    for t in window["threads"]:
        row = {"thread": t["name"], "stages": t["stages"], "policy": t["policy"], "wait": t["wait"],
               "before": {"runtime_ns": t["runtime_ns"], "deadline_ns": t["deadline_ns"],
                          "period_ns": t["period_ns"], "bandwidth": t["bandwidth"]},
               "cpu_share": t["cpu_share"], "overruns": t["overruns"], "sleeps": t["sleeps"],
               "yields": t["yields"], "queue_depth": t["queue_depth"],
               "arrivals": max((stages[s]["arrivals"] for s in t["stages"] if s in stages), default=0.0),
               "p99_ns": _sum_or_none([stages[s]["p99_ns"] for s in t["stages"] if s in stages]),
               "batches": sum(stages[s]["batches"] for s in t["stages"] if s in stages),
               "throttled": False, "after": None}
        row["bursty"] = False
        if t["policy"] == "deadline":
            need, parts = thread_need_ns(t, stages, period, behind=bool(behind))
            # A throttled thread's p99 service and busy time include the time it was throttled:
            # only the measures that throttling does not inflate count (its need).
            rule = need if parts["throttled"] else max(parts["items_p99"], parts["cpu"], parts["busy"])
            row.update(need_ns=need, need_parts=parts, throttled=parts["throttled"], use_share=parts["use"],
                       bursty=parts["bursty"],
                       need_runtime_ns=_round_us(need, min_runtime_ns, period),
                       want_runtime_ns=_round_us(max(headroom * rule, need, parts["boost"]), min_runtime_ns, period))
        rows.append(row)
    dl = [r for r in rows if r["policy"] == "deadline"]
    # A throttled window: the arrivals are what the old budgets let through, not the demand
    # (under closed-loop load every thread of the pipeline sees the same capped rate). Give
    # every deadline thread at least its share of the admitted bandwidth in proportion to the
    # CPU it used per second (its cost per request), so that no thread is the bottleneck.
    fill = any(r["throttled"] for r in dl) and limit != float("inf")
    use_total = sum(r["use_share"] for r in dl)
    for r in dl:
        r["fill_runtime_ns"] = 0
        if fill and use_total > 0:
            weight = (1 - FILL_EQUAL) * r["use_share"] / use_total + FILL_EQUAL / len(dl)
            r["fill_runtime_ns"] = _round_us(weight * limit * period, min_runtime_ns, period, up=False)
            r["want_runtime_ns"] = max(r["want_runtime_ns"], r["fill_runtime_ns"])
    wanted = sum(r["want_runtime_ns"] / period for r in dl)
    need_bw = sum(r["need_runtime_ns"] / period for r in dl)
    fitted, factor = None, 1.0
    runtimes = {r["thread"]: r["want_runtime_ns"] for r in dl}
    if wanted > limit:
        floor_bw = len(dl) * min_runtime_ns / period
        if need_bw <= limit:
            # Shrink only the headroom above each need, by one factor f in [0, 1).
            fitted = "headroom"
            excess = sum((r["want_runtime_ns"] - r["need_runtime_ns"]) / period for r in dl)
            factor = (limit - need_bw) / excess if excess > 0 else 0.0
            for r in dl:
                v = r["need_runtime_ns"] + factor * (r["want_runtime_ns"] - r["need_runtime_ns"])
                runtimes[r["thread"]] = _round_us(v, min_runtime_ns, period, up=False)
        elif floor_bw <= limit:
            fitted = "scaled"
            # One factor on the needs, solved with the 20us floor taken into account.
            lo, hi = 0.0, 1.0
            for _ in range(60):
                mid = (lo + hi) / 2
                s = sum(max(min_runtime_ns, r["need_runtime_ns"] * mid) / period for r in dl)
                lo, hi = (mid, hi) if s <= limit else (lo, mid)
            factor = lo
            for r in dl:
                runtimes[r["thread"]] = _round_us(r["need_runtime_ns"] * factor, min_runtime_ns, period, up=False)
        else:
            raise TuneError(
                f"{len(dl)} deadline threads at the minimum {format_duration(min_runtime_ns)} per "
                f"{format_duration(period)} already ask {floor_bw:.3f} CPUs, more than the "
                f"{admitted:.2f} admitted: use a longer latency target or fewer deadline threads")
        # Rounding may still leave a hair over the limit: take 1us from the largest.
        while sum(v / period for v in runtimes.values()) > limit:
            big = max(runtimes, key=runtimes.get)
            if runtimes[big] <= min_runtime_ns:
                break
            runtimes[big] -= NS_PER_US
    for r in dl:
        rt = runtimes[r["thread"]]
        dl_ns = None
        b = r["before"]
        if b["deadline_ns"] and b["period_ns"] and b["deadline_ns"] != b["period_ns"]:
            dl_ns = int(round(period * b["deadline_ns"] / b["period_ns"] / NS_PER_US)) * NS_PER_US
            dl_ns = min(period, max(rt, dl_ns))
        r["after"] = {"runtime_ns": rt, "period_ns": period, "deadline_ns": dl_ns,
                      "bandwidth": rt / period}
        r["short"] = rt < r["need_runtime_ns"]
    after_bw = sum(r["after"]["bandwidth"] for r in dl)
    out = {"period_ns": period, "n_path": n_path, "headroom": headroom, "admitted": admitted,
           "limit": limit, "rows": rows, "wanted_bandwidth": wanted, "need_bandwidth": need_bw,
           "bandwidth_before": sum(r["before"]["bandwidth"] for r in dl),
           "bandwidth_after": after_bw, "fitted": fitted, "fit_factor": factor,
           "feasible": need_bw <= limit, "latency_target_ns": latency_target_ns, "filled": fill,
           "behind": behind}
    out["advice"] = advice(out, window)
    return out


def _sum_or_none(values):
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


def grouping_candidates(rows, stages):
    """Pairs of consecutive deadline threads that could share a lane, least CPU first.
    Two threads that both run python stages are never paired (two python lanes exist to
    serve different routes; only one of them may be the main thread)."""
    types = {s["name"]: s.get("type", "") for s in stages.values()}
    out = []
    for a, b in zip(rows, rows[1:]):
        if a["policy"] != "deadline" or b["policy"] != "deadline":
            continue
        if any(types.get(s) == "python" for s in a["stages"]) and \
                any(types.get(s) == "python" for s in b["stages"]):
            continue
        util = (a["need_runtime_ns"] + b["need_runtime_ns"]) / a["after"]["period_ns"]
        out.append((util, a, b))
    out.sort(key=lambda x: x[0])
    return out


def advice(prop, window):
    lines = []
    period = prop["period_ns"]
    if prop["wanted_bandwidth"] > prop["limit"]:
        lines.append(
            f"admission: the proposal asks {prop['wanted_bandwidth']:.3f} CPUs of deadline bandwidth "
            f"(the measured needs alone {prop['need_bandwidth']:.3f}); the kernel admits "
            f"{prop['admitted']:.2f} (proposals stay under {prop['limit']:.3f}).")
        cands = grouping_candidates(prop["rows"], window["stages"])
        if cands:
            util, a, b = cands[0]
            names = a["stages"] + b["stages"]
            lines.append(
                f"  group: put stages {', '.join(names)} on one lane (the consecutive pair using the "
                f"least CPU, {util:.3f} CPUs measured): give them all `thread: {a['thread']}`, with the "
                f"scheduling keys on {names[0]} only, runtime about "
                f"{format_duration(min(period, math.ceil(prop['headroom'] * (a['need_runtime_ns'] + b['need_runtime_ns']) / NS_PER_US) * NS_PER_US))}"
                f"/{format_duration(period)}. One thread fewer saves a queue hop, a wake-up per batch "
                f"and a 20us floor; run the tuner again afterwards.")
            for util2, a2, b2 in cands[1:3]:
                lines.append(f"         next: {', '.join(a2['stages'] + b2['stages'])} ({util2:.3f} CPUs)")
        dl = [r for r in prop["rows"] if r["policy"] == "deadline"]
        if dl:
            big = max(dl, key=lambda r: r["want_runtime_ns"])
            lines.append(
                f"  or give less: thread {big['thread']} asks the most "
                f"({format_duration(big['want_runtime_ns'])}/{format_duration(period)}, "
                f"{big['want_runtime_ns'] / period:.3f} CPUs; it needs {big['need_runtime_ns'] / period:.3f}).")
        if prop["fitted"] == "headroom":
            lines.append(
                f"  fitted: the headroom above each thread's measured need was cut to "
                f"{100 * prop['fit_factor']:.0f} % of the asked (effective headroom about "
                f"{1 + (prop['headroom'] - 1) * prop['fit_factor']:.2f}x); every thread still covers its need.")
        elif prop["fitted"] == "scaled":
            short = [r["thread"] for r in dl if r.get("short")]
            lines.append(
                f"  fitted: every runtime was scaled to {100 * prop['fit_factor']:.0f} % of the measured need "
                f"(no headroom left). NOT ENOUGH for the measured load: threads {', '.join(short) or '-'} "
                f"will be throttled. Group stages as above, lower the load, or use a longer latency target.")
    throttled = [r["thread"] for r in prop["rows"] if r["throttled"]]
    if prop.get("behind"):
        lines.append(
            f"note: the load fell behind during the window ({prop['behind']}), so every deadline thread "
            f"counts as throttled, overruns signalled or not (SIGXCPU comes at most once per scheduler "
            f"tick, and a thread throttled in its busy periods and idle in the others uses less than "
            f"its bandwidth on average). Each was given at least its share of the admitted bandwidth "
            f"in proportion to the CPU it used per second (the 'fill'). Apply the proposal, run the "
            f"load again and run the tuner again to trim the budgets to the demand.")
    elif throttled:
        lines.append(
            f"note: threads {', '.join(throttled)} were throttled during the window (overruns, or CPU "
            f"at {100 * THROTTLED_SHARE:.0f} % of the budget or more): the measured rates are what the old "
            f"budgets let through, not the demand. Each deadline thread was given at least its share of "
            f"the admitted bandwidth in proportion to the CPU it used per second (the 'fill'). Apply the "
            f"proposal, run the load again and run the tuner again to trim the budgets to the demand.")
    bursty = [r for r in prop["rows"] if r["bursty"]]
    if bursty:
        lines.append(
            "note: " + ", ".join(f"{r['thread']} overran {r['overruns']:.1f}/s at {100 * r['cpu_share']:.1f} % of "
                                 f"a CPU with {100 * r['before']['bandwidth']:.0f} % reserved "
                                 f"({format_duration(r['before']['runtime_ns'])}/{format_duration(r['before']['period_ns'])})"
                                 for r in bursty)
            + ": short of runtime per period for their bursts, not of bandwidth. The proposal asks twice "
              "their old runtime" + (" (cut by the admission fit)" if prop["fitted"] else "")
            + f"; a longer period gives more runtime per period at the same bandwidth: e.g. "
              f"--latency-target {format_duration(2 * prop['latency_target_ns'])} "
              f"(periods of {format_duration(choose_period_ns(2 * prop['latency_target_ns'], prop['n_path']))}).")
    fb = [t["name"] for t in window["threads"] if t.get("fallback")]
    if fb:
        lines.append(f"note: threads {', '.join(fb)} fell back to policy other (the kernel refused "
                     f"SCHED_DEADLINE): their budgets are not in force.")
    return lines


# --- tables -----------------------------------------------------------------------------------

def render_table(headers, rows, right=()):
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(str(c)))
    def line(cells):
        out = []
        for i, c in enumerate(cells):
            c = str(c)
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(out).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def rp(runtime_ns, period_ns, policy="deadline"):
    if policy != "deadline" or not period_ns:
        return "-"
    return f"{format_duration(runtime_ns)}/{format_duration(period_ns)}"


def proposal_table(prop):
    headers = ["thread", "stages", "policy", "before", "cpu", "p99 svc", "arrivals/s", "overruns/s",
               "after", "bw after"]
    rows = []
    for r in prop["rows"]:
        b, a = r["before"], r["after"]
        after = rp(a["runtime_ns"], a["period_ns"]) if a else "(unchanged)"
        if a and a.get("deadline_ns"):
            after += f" dl {format_duration(a['deadline_ns'])}"
        if a and r.get("short"):
            after += " !"
        rows.append([r["thread"], ",".join(r["stages"]), r["policy"], rp(b["runtime_ns"], b["period_ns"], r["policy"]),
                     pct(r["cpu_share"]), human_ns(r["p99_ns"]), human_rate(r["arrivals"]),
                     human_rate(r["overruns"]), after, f"{a['bandwidth']:.3f}" if a else "-"])
    text = render_table(headers, rows, right={4, 5, 6, 7, 9})
    text += (f"\ndeadline bandwidth: before {prop['bandwidth_before']:.3f}, after {prop['bandwidth_after']:.3f} "
             f"of {prop['admitted']:.2f} CPUs admitted")
    if prop["fitted"]:
        text += f" (asked {prop['wanted_bandwidth']:.3f}: fitted, see below)"
    return text


def window_summary(w):
    t = w["totals"]
    resp = "  ".join(f"{k} {human_rate(v)}" for k, v in t["responses"].items() if v > 0) or "none"
    return (f"window {w['wall']:.1f}s: responses/s {human_rate(t['responses_per_s'])} ({resp}); "
            f"overruns/s {t['overruns_per_s']:.1f}; open connections {t['connections_open']:.0f}")


# --- the YAML ---------------------------------------------------------------------------------

def _split_comment(line):
    """(code, comment) of a YAML line: the comment starts at a '#' outside quotes that begins the
    line or follows whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "\"'" and (i == 0 or line[i - 1] in " \t[{,:-"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i], line[i:]
    return line, ""


def pipeline_entry_spans(text):
    """[(first_line, end_line)] of each pipeline entry in the YAML text (block sequence under a
    top-level `pipeline:` key). Raises TuneError when the layout is not one it can edit."""
    lines = text.split("\n")
    start = None
    for i, line in enumerate(lines):
        code, _ = _split_comment(line)
        if re.match(r"pipeline\s*:", code):
            if code.split(":", 1)[1].strip():
                raise TuneError("`pipeline:` is written in flow style ([...]) on one line; the "
                                "tuner edits block sequences only (or drop --config to dump a new file)")
            start = i + 1
            break
    if start is None:
        raise TuneError("no top-level `pipeline:` key in the config file")
    spans = []
    dash_indent = None
    cur = None
    end = len(lines)
    for i in range(start, len(lines)):
        code, _ = _split_comment(lines[i])
        if not code.strip():
            continue
        indent = len(code) - len(code.lstrip(" "))
        if indent == 0 and not code.startswith("-"):
            end = i
            break
        m = re.match(r"(\s*)-(\s|$)", code)
        if m and (dash_indent is None or len(m.group(1)) == dash_indent):
            dash_indent = len(m.group(1))
            if cur is not None:
                spans.append((cur, i))
            cur = i
        elif dash_indent is not None and indent < dash_indent:
            end = i
            break
    if cur is not None:
        # The last entry ends at the last non-blank line before `end`.
        last = end
        while last > cur + 1 and not _split_comment(lines[last - 1])[0].strip():
            last -= 1
        spans.append((cur, last))
    return lines, spans


_KEY_RE = r"(?<![\w-]){key}(\s*:\s*)(\"[^\"]*\"|'[^']*'|[^,}}\s#]+)"


def entry_value(lines, span, key):
    for i in range(*span):
        code, _ = _split_comment(lines[i])
        m = re.search(_KEY_RE.format(key=re.escape(key)), code)
        if m:
            return m.group(2).strip("\"'")
    return None


def edit_pipeline_text(text, changes):
    """Sets keys of pipeline entries in the YAML text, line by line, keeping everything else.
    changes: {entry_index: {key: value_text}}; a key must already be on the entry (runtime and
    period always are on a deadline thread's first stage; deadline only where it was set).
    Returns the new text."""
    lines, spans = pipeline_entry_spans(text)
    for idx, kv in changes.items():
        if idx >= len(spans):
            raise TuneError(f"the config file has {len(spans)} pipeline entries; entry {idx} is missing")
        for key, value in kv.items():
            done = False
            for i in range(*spans[idx]):
                code, comment = _split_comment(lines[i])
                pat = re.compile(_KEY_RE.format(key=re.escape(key)))
                m = pat.search(code)
                if not m:
                    continue
                old = m.group(2)
                new = value
                rest = code[m.end(2):]
                # Keep the columns of aligned flow mappings: `runtime: 20us,  period: 1ms`.
                sp = re.match(r",( +)", rest)
                if sp:
                    n = max(1, len(sp.group(1)) - (len(new) - len(old)))
                    rest = "," + " " * n + rest[sp.end():]
                code = code[:m.start(2)] + new + rest
                lines[i] = code + comment
                done = True
                break
            if not done:
                raise TuneError(f"pipeline entry {idx} has no `{key}:` to change")
    return "\n".join(lines)


def config_entries_from_text(text):
    """[(stage, name, thread)] of each pipeline entry, read from the text (for matching the file
    against the running server)."""
    lines, spans = pipeline_entry_spans(text)
    out = []
    for sp in spans:
        stage = entry_value(lines, sp, "stage")
        out.append((stage, entry_value(lines, sp, "name") or stage, entry_value(lines, sp, "thread")))
    return out


_PLAIN_OK = re.compile(r"[A-Za-z0-9_./@+=$~^()<>-][A-Za-z0-9_./@+=$~^()<> :-]*")


def _yaml_scalar(v, flow=False):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    s = str(v)
    if s and _PLAIN_OK.fullmatch(s) and not s.endswith(" ") and ": " not in s and not s.endswith(":") \
            and not (flow and ":" in s):
        return s
    return json.dumps(s)


def _yaml_flow(v):
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_yaml_scalar(k, True)}: {_yaml_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_flow(x) for x in v) + "]"
    return _yaml_scalar(v, True)


def dump_yaml(cfg, header=""):
    """The config (the JSON form /stats gives) as YAML: sections as block mappings, lists of
    mappings (pipeline, routes) one flow mapping per line."""
    out = [header.rstrip("\n")] if header else []

    def emit(key, v, indent):
        pad = " " * indent
        if isinstance(v, dict) and v:
            out.append(f"{pad}{_yaml_scalar(key)}:")
            for k, x in v.items():
                emit(k, x, indent + 2)
        elif isinstance(v, list) and v and any(isinstance(x, (dict, list)) for x in v):
            out.append(f"{pad}{_yaml_scalar(key)}:")
            for x in v:
                out.append(f"{pad}  - {_yaml_flow(x)}")
        else:
            out.append(f"{pad}{_yaml_scalar(key)}: {_yaml_flow(v)}")

    for k, v in cfg.items():
        emit(k, v, 0)
        if isinstance(v, (dict, list)):
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def scheduling_changes(prop, stage_names):
    """{entry_index: {runtime, period[, deadline]}} for each deadline thread's first stage."""
    index = {n: i for i, n in enumerate(stage_names)}
    changes = {}
    for r in prop["rows"]:
        a = r["after"]
        if not a or not r["stages"]:
            continue
        kv = {"runtime": format_duration(a["runtime_ns"]), "period": format_duration(a["period_ns"])}
        if a.get("deadline_ns"):
            kv["deadline"] = format_duration(a["deadline_ns"])
        changes[index[r["stages"][0]]] = kv
    return changes


def apply_to_config_json(cfg, changes):
    cfg = json.loads(json.dumps(cfg))
    entries = cfg.get("pipeline") or []
    for idx, kv in changes.items():
        for k, v in kv.items():
            if k == "deadline" and k not in entries[idx]:
                continue
            entries[idx][k] = v
    return cfg


def check_config(binary, path, cwd=None):
    """Runs `metronome check -c path`; returns (ok, output, {thread: (runtime_ns, period_ns)})."""
    if not os.path.exists(binary):
        return False, f"metronome binary not found: {binary} (use --metronome PATH)", {}
    try:
        p = subprocess.run([binary, "check", "-c", path], capture_output=True, text=True, timeout=60, cwd=cwd)
    except subprocess.TimeoutExpired:
        return False, "metronome check timed out", {}
    out = p.stdout + p.stderr
    budgets = {}
    for line in p.stdout.splitlines():
        m = re.match(r"\s+\d+\s+\S+\s+\S+\s+(\S+)(?: \(main\))?\s+deadline\s+\S+\s+(\S+)/(\S+)\s", line)
        if m:
            try:
                budgets[m.group(1)] = (parse_duration_ns(m.group(2)), parse_duration_ns(m.group(3)))
            except ValueError:
                pass
    return p.returncode == 0, out, budgets
