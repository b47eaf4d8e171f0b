#!/usr/bin/python3
"""Isolation ("hog") scenario: does one heavy request hurt the innocent ones?

Per server (same set and flags as perf/bench_http.py):
  1. baseline: `wrk -t1 -c16 -d<D>s --latency` on GET /json;
  2. with hogs: a background client keeps 4 `GET /hog?ms=200` requests in flight on 4
     keep-alive connections for the whole wrk run (each connection sends the next hog as soon
     as the previous one answers; reconnects when the server closes or times out), while the
     same wrk run measures GET /json.
Reports /json p50/p99/max, req/s and wrk errors for both runs, the p99 and req/s ratios, and
what the hogs got (count by status, latency p50/max, reconnects, errors).

Run with Debian's interpreter (stdlib only):
    /usr/bin/python3 perf/bench_isolation.py --duration 10 \\
        --metronome-config lanes=configs/examples/bench.yaml --markdown /tmp/iso.md
See perf/peers/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import harness as H  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The hog client: N threads, one keep-alive connection each, raw sockets.

class _Closed(Exception):
    """The server closed the connection before a full response."""


class HogClient:
    def __init__(self, port: int, n: int = 4, ms: int = 200, timeout: float = 30.0):
        self.port, self.n, self.ms, self.timeout = port, n, ms, timeout
        self.request = (f"GET /hog?ms={ms} HTTP/1.1\r\nHost: {H.HOST}:{port}\r\n"
                        "User-Agent: metronome-hog\r\n\r\n").encode()
        self.stop_evt = threading.Event()
        self.lock = threading.Lock()
        self.results = []           # (status, latency_ms, t_done)
        self.errors = Counter()     # kind -> count
        self.connects = 0           # successful TCP connects (first ones included)
        self.closed_by_server = 0   # server closed a connection after/while answering
        self.in_flight = [False] * n
        self.socks = [None] * n
        self.threads = []
        self.t0 = 0.0

    # -- response reading ---------------------------------------------------------------------
    @staticmethod
    def _recv_more(sock, buf: bytearray, rx: list) -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise _Closed()
        rx[0] += len(chunk)
        buf += chunk

    def _read_response(self, sock, buf: bytearray, rx: list):
        """Reads one response from sock (buf holds leftover bytes; rx[0] counts bytes received).
        Returns (status, keep)."""
        while b"\r\n\r\n" not in buf:
            self._recv_more(sock, buf, rx)
        head_end = buf.index(b"\r\n\r\n")
        head = bytes(buf[:head_end]).decode("latin-1")
        del buf[:head_end + 4]
        lines = head.split("\r\n")
        m = re.match(r"HTTP/(1\.[01]) (\d{3})", lines[0])
        if not m:
            raise _Closed()
        version, status = m.group(1), int(m.group(2))
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        conn = headers.get("connection", "").lower()
        keep = (version == "1.1" and "close" not in conn) or (version == "1.0" and "keep-alive" in conn)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in buf:
                    self._recv_more(sock, buf, rx)
                i = buf.index(b"\r\n")
                size = int(bytes(buf[:i]).split(b";")[0], 16)
                del buf[:i + 2]
                while len(buf) < size + 2:
                    self._recv_more(sock, buf, rx)
                del buf[:size + 2]
                if size == 0:
                    break
        elif "content-length" in headers:
            n = int(headers["content-length"])
            while len(buf) < n:
                self._recv_more(sock, buf, rx)
            del buf[:n]
        elif status not in (204, 304):
            keep = False       # body until EOF
            try:
                while True:
                    self._recv_more(sock, buf, rx)
            except _Closed:
                pass
            buf.clear()
        return status, keep

    # -- per connection loop ------------------------------------------------------------------
    def _close(self, i: int) -> None:
        s = self.socks[i]
        self.socks[i] = None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def _loop(self, i: int) -> None:
        buf = bytearray()
        served = 0           # responses received on the current connection
        while not self.stop_evt.is_set():
            if self.socks[i] is None:
                try:
                    s = socket.create_connection((H.HOST, self.port), timeout=self.timeout)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError as e:
                    with self.lock:
                        self.errors[f"connect: {type(e).__name__}"] += 1
                    time.sleep(0.05)
                    continue
                self.socks[i] = s
                buf.clear()
                served = 0
                with self.lock:
                    self.connects += 1
            sock = self.socks[i]
            rx = [0]
            t = time.perf_counter()
            self.in_flight[i] = True
            try:
                sock.sendall(self.request)
                status, keep = self._read_response(sock, buf, rx)
            except socket.timeout:
                with self.lock:
                    self.errors["timeout"] += 1
                self._close(i)
                continue
            except (_Closed, OSError) as e:
                with self.lock:
                    if self.stop_evt.is_set() and self.socks[i] is None:
                        self.errors["abandoned at end"] += 1
                    elif served > 0 and rx[0] == 0:
                        # The server had silently closed this kept-alive connection after its
                        # previous answer (uWSGI --http-socket does, without Connection: close);
                        # the hog never reached it. Like any HTTP client: reconnect and resend.
                        self.closed_by_server += 1
                    else:
                        kind = "closed before response" if isinstance(e, _Closed) \
                            else f"socket error: {type(e).__name__}"
                        self.errors[kind] += 1
                self._close(i)
                continue
            finally:
                self.in_flight[i] = False
            dt = (time.perf_counter() - t) * 1000.0
            served += 1
            with self.lock:
                self.results.append((status, dt, time.perf_counter() - self.t0))
            if not keep:
                with self.lock:
                    self.closed_by_server += 1
                self._close(i)
        self._close(i)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        for i in range(self.n):
            th = threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"hog-{i}")
            th.start()
            self.threads.append(th)

    def wait_in_flight(self, timeout: float = 5.0) -> bool:
        """True once every connection has a hog in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.in_flight):
                return True
            time.sleep(0.01)
        return False

    def stop(self, grace: float) -> None:
        """Stop sending new hogs; let in-flight ones finish for up to `grace` s, then abort."""
        self.stop_evt.set()
        deadline = time.monotonic() + grace
        for th in self.threads:
            th.join(max(0.0, deadline - time.monotonic()))
        aborted = []
        for i in range(self.n):
            s = self.socks[i]
            if s is not None:
                self.socks[i] = None     # tells the thread the abort is ours
                aborted.append(s)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for th in self.threads:
            th.join(5)
        for s in aborted:
            s.close()

    def summary(self) -> dict:
        lat = sorted(r[1] for r in self.results)
        by_status = Counter(r[0] for r in self.results)
        return {
            "answered": len(self.results),
            "by_status": dict(sorted(by_status.items())),
            "lat_p50": H.median(lat) if lat else float("nan"),
            "lat_max": lat[-1] if lat else float("nan"),
            "lat_min": lat[0] if lat else float("nan"),
            "connects": self.connects,
            "reconnects": max(0, self.connects - self.n),
            "closed_by_server": self.closed_by_server,
            "errors": dict(self.errors),
        }


# ---------------------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_server_args(p)
    p.add_argument("--duration", type=float, default=10, help="wrk seconds per run (default 10)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat R times (servers interleaved); median per cell")
    p.add_argument("--connections", type=int, default=16, help="wrk -c on /json (default 16)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--hogs", type=int, default=4, help="concurrent hog connections (default 4)")
    p.add_argument("--hog-ms", type=int, default=200, help="CPU ms per hog (default 200)")
    p.add_argument("--hog-timeout", type=float, default=30,
                   help="seconds a hog may take before the client gives up on it (default 30)")
    p.add_argument("--wrk-timeout", type=float, default=10,
                   help="wrk --timeout in s (default 10, not wrk's 2: a /json stuck behind hogs "
                        "for 2+ s must show in the percentiles, not vanish into 'timeout' errors)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured wrk seconds (default 1)")
    p.add_argument("--ready-timeout", type=float, default=30, help="seconds to wait for a server")
    p.add_argument("--markdown", metavar="FILE", help="also write a markdown report to FILE")
    p.add_argument("--json", metavar="FILE", help="also write raw results to FILE")
    a = p.parse_args()
    if a.rounds < 1 or a.duration <= 0 or a.hogs < 1:
        p.error("--rounds, --hogs must be >= 1 and --duration > 0")
    return a


def run_server(spec, args):
    """One server: baseline run, then the run with hogs. Returns a dict or None."""
    try:
        srv = H.start_server(spec, ready_timeout=args.ready_timeout)
    except H.ServerError as e:
        H.log(f"  FAILED to start: {e}")
        return None
    out = {"server": spec.name}
    try:
        url = srv.base_url + "/json"
        if args.warmup > 0:
            H.run_wrk(url, args.warmup, args.connections, args.threads, timeout_s=args.wrk_timeout)
        base = H.run_wrk(url, args.duration, args.connections, args.threads,
                         timeout_s=args.wrk_timeout)
        out["base"] = base
        H.log(f"  baseline : {base.rps:,.0f} req/s  p50 {H.fmt_ms(base.p50)}  p99 "
              f"{H.fmt_ms(base.p99)}  max {H.fmt_ms(base.max_ms)} ms  errors: {base.error_text()}"
              + ("" if base.ok else f"  [{base.error}]"))
        hogs = HogClient(srv.port, args.hogs, args.hog_ms, args.hog_timeout)
        hogs.start()
        if not hogs.wait_in_flight(5.0):
            H.log("  warning: not every hog connection had a request in flight after 5 s")
        time.sleep(0.2)  # the hogs now occupy the server
        hog_run = H.run_wrk(url, args.duration, args.connections, args.threads,
                            timeout_s=args.wrk_timeout)
        hogs.stop(grace=max(5.0, 2 * args.hogs * args.hog_ms / 1000.0))
        out["hog"] = hog_run
        out["hogs"] = hogs.summary()
        hs = out["hogs"]
        H.log(f"  with hogs: {hog_run.rps:,.0f} req/s  p50 {H.fmt_ms(hog_run.p50)}  p99 "
              f"{H.fmt_ms(hog_run.p99)}  max {H.fmt_ms(hog_run.max_ms)} ms  errors: "
              f"{hog_run.error_text()}" + ("" if hog_run.ok else f"  [{hog_run.error}]"))
        H.log(f"  hogs: {hs['answered']} answered {hs['by_status']}  p50 {H.fmt_ms(hs['lat_p50'])} "
              f"max {H.fmt_ms(hs['lat_max'])} ms  reconnects {hs['reconnects']}  "
              f"errors {hs['errors'] or 0}")
        out["alive"] = srv.alive()
        if not out["alive"]:
            H.log(f"  server died; log tail:\n{srv.log_tail()}")
    finally:
        note = srv.stop()
        if "SIGKILL" in note or "still alive" in note:
            H.log(f"  stop: {note}")
        out["stop"] = note
        srv.cleanup_tmp()
    return out


def _status_text(by_status: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in by_status.items()) or "none"


def _errors_text(errors: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "0"


def main():
    args = parse_args()
    H.install_signal_handlers()
    header = H.machine_header()
    for line in header:
        print(line, flush=True)
    specs = []
    for s in H.select_servers(args):
        if not s.has_app_routes:
            H.log(f"SKIP {s.name}: static peer without /hog (isolation needs the app routes)")
            continue
        specs.append(s)
    if not specs:
        sys.exit("no server to run")
    est = args.rounds * len(specs) * (2 * args.duration + args.warmup + 4)
    print(f"servers: {', '.join(s.name for s in specs)}")
    print(f"/json: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency"
          f"{' --timeout %gs' % args.wrk_timeout if args.wrk_timeout else ''}; hogs: {args.hogs} x "
          f"GET /hog?ms={args.hog_ms} kept in flight on {args.hogs} keep-alive connections; "
          f"{args.rounds} round(s); about {est / 60:.1f} min", flush=True)

    runs = {s.name: [] for s in specs}
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        k = rnd % len(specs)
        for spec in specs[k:] + specs[:k]:
            H.log(f"[round {rnd + 1}/{args.rounds}] {spec.name}")
            r = run_server(spec, args)
            if r and r.get("base") and r.get("hog"):
                runs[spec.name].append(r)
    elapsed = time.monotonic() - t_start
    la = os.getloadavg()

    # ---- tables
    t1_headers = ["server", "run", "req/s", "p50 ms", "p99 ms", "max ms", "wrk errors"]
    t2_headers = ["server", "p99 x", "req/s x", "hogs answered", "hog status", "hog p50 ms",
                  "hog max ms", "hog reconnects", "hog errors"]
    t1, t2, summary = [], [], []
    for spec in specs:
        rs = runs[spec.name]
        if not rs:
            t1.append([spec.name, "failed", "", "", "", "", ""])
            t2.append([spec.name, "failed", "", "", "", "", "", "", ""])
            continue
        agg = {}
        for which in ("base", "hog"):
            w = [r[which] for r in rs]
            ok = [x for x in w if x.ok]
            agg[which] = {
                "rps": H.median(x.rps for x in w),
                "p50": H.median(x.p50 for x in ok), "p99": H.median(x.p99 for x in ok),
                "max": H.median(x.max_ms for x in ok),
                "errors": H.sum_error_kinds(w),
            }
            label = "baseline" if which == "base" else f"{args.hogs} hogs"
            a = agg[which]
            a["bad"] = sum(x.non2xx for x in w) > 0.01 * max(1, sum(x.requests for x in w))
            t1.append([spec.name, label, H.fmt_num(a["rps"], 0) + (" (!)" if a["bad"] else ""),
                       H.fmt_ms(a["p50"]),
                       H.fmt_ms(a["p99"]), H.fmt_ms(a["max"]), a["errors"]])
        p99x = agg["hog"]["p99"] / agg["base"]["p99"] if agg["base"]["p99"] > 0 else float("nan")
        rpsx = agg["hog"]["rps"] / agg["base"]["rps"] if agg["base"]["rps"] > 0 else float("nan")
        statuses, errs = Counter(), Counter()
        for r in rs:
            statuses.update(r["hogs"]["by_status"])
            errs.update(r["hogs"]["errors"])
        hs = {
            "answered": sum(r["hogs"]["answered"] for r in rs),
            "by_status": dict(sorted(statuses.items())),
            "lat_p50": H.median(r["hogs"]["lat_p50"] for r in rs),
            "lat_max": max((r["hogs"]["lat_max"] for r in rs if r["hogs"]["lat_max"] == r["hogs"]["lat_max"]),
                           default=float("nan")),
            "reconnects": sum(r["hogs"]["reconnects"] for r in rs),
            "errors": dict(errs),
        }
        t2.append([spec.name, H.fmt_num(p99x, 1) + "x", H.fmt_num(rpsx, 2 if rpsx >= 0.01 else 4) + "x",
                   str(hs["answered"]), _status_text(hs["by_status"]), H.fmt_ms(hs["lat_p50"]),
                   H.fmt_ms(hs["lat_max"]), str(hs["reconnects"]), _errors_text(hs["errors"])])
        dead = [r for r in rs if not r.get("alive", True)]
        summary.append({"server": spec.name, "base": agg["base"], "hog": agg["hog"],
                        "p99_ratio": p99x, "rps_ratio": rpsx, "hogs": hs, "rounds": len(rs),
                        "died": len(dead)})

    notes = [
        f"/json measured with wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency"
        f" (+{args.warmup:g}s warm-up); same server instance for both runs; {args.rounds} round(s), "
        "median per cell (hog counts summed).",
        f"hogs: {args.hogs} connections each sending GET /hog?ms={args.hog_ms} (pure-Python CPU "
        "loop) back to back, started before and stopped after the wrk run.",
        "p99 x = p99 with hogs / p99 baseline; req/s x = req/s with hogs / baseline. wrk errors = "
        "non-2xx/3xx and socket errors by kind (wrk drops timed-out requests from its latency "
        f"percentiles: timeout = no answer within {args.wrk_timeout or 2:g} s, wrk --timeout).",
        "(!) = more than 1 % of the /json answers were non-2xx/3xx (e.g. 503 load shedding): "
        "req/s and latency then describe those answers too.",
        "hog reconnects = connections opened beyond the first per hog client (server closed or "
        "timed out a connection); hog latency is wall time on the client.",
        f"load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; elapsed {elapsed / 60:.1f} min",
    ]
    print()
    print("GET /json without and with hogs")
    print(H.format_table(t1_headers, t1, align="ll" + "r" * 4 + "l"))
    print()
    print("Effect of the hogs, and what the hogs received")
    print(H.format_table(t2_headers, t2, align="lrrrlrrrl"))
    print()
    for n in notes:
        print(n)
    print()
    print("\n".join(H.servers_text(specs)))

    if args.markdown:
        md = ["## Isolation: /json under concurrent CPU hogs", ""]
        md += [f"- {line}" for line in header]
        md += ["", H.format_table(t1_headers, t1, markdown=True, align="ll" + "r" * 4 + "l"), "",
               H.format_table(t2_headers, t2, markdown=True, align="lrrrlrrrl"), ""]
        md += notes + [""]
        md += H.servers_markdown(specs)
        Path(args.markdown).write_text("\n".join(md) + "\n")
        print(f"\nmarkdown written to {args.markdown}")
    if args.json:
        raw = {"header": header, "args": vars(args), "summary": summary,
               "runs": {name: [{"base": vars(r["base"]),
                                "hog": vars(r["hog"]), "hogs": r["hogs"], "alive": r.get("alive"),
                                "stop": r.get("stop")} for r in rs]
                        for name, rs in runs.items()}}
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str) + "\n")
        print(f"raw results written to {args.json}")
    return 0 if all(runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
