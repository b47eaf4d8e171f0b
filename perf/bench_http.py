#!/usr/bin/python3
"""Throughput/latency matrix: metronome against the Python servers people use today.

For each path (GET /plaintext, GET /json, GET /users/123, POST /echo with perf/wrk/echo.lua)
and each server, start the server on a free 127.0.0.1 port, warm it up, run
`wrk -t1 -c64 -d<D>s --latency`, stop it. With --rounds R the whole matrix runs R times, and
within a path the servers run back to back (round-robin, order rotated every round) so that
machine noise is shared; each cell reports the median of its R runs.

Run with Debian's interpreter (stdlib only):
    /usr/bin/python3 perf/bench_http.py --duration 10 --rounds 3 \\
        --metronome-config lanes=configs/examples/bench.yaml --markdown /tmp/http.md
See perf/peers/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import harness as H  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_server_args(p)
    p.add_argument("--duration", type=float, default=10, help="wrk seconds per cell (default 10)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the matrix R times; median per cell")
    p.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="unmeasured wrk seconds after start-up, same path (default 1; 0 = none)")
    p.add_argument("--paths", default=",".join(H.TARGETS),
                   help=f"comma-separated subset of {','.join(H.TARGETS)}")
    p.add_argument("--ready-timeout", type=float, default=30, help="seconds to wait for a server")
    p.add_argument("--markdown", metavar="FILE", help="also write a markdown report to FILE")
    p.add_argument("--json", metavar="FILE", help="also write every raw sample to FILE")
    a = p.parse_args()
    if a.rounds < 1 or a.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    a.targets = []
    for k in a.paths.split(","):
        k = k.strip()
        if k not in H.TARGETS:
            p.error(f"unknown path {k!r}; known: {', '.join(H.TARGETS)}")
        a.targets.append(H.TARGETS[k])
    return a


def measure_cell(spec, target, args):
    """Start spec, warm up, measure target, stop. Returns (WrkResult|None, note)."""
    try:
        srv = H.start_server(spec, ready_timeout=args.ready_timeout)
    except H.ServerError as e:
        H.log(f"  FAILED to start: {e}")
        return None, "start failed"
    try:
        url = srv.base_url + target.path
        if args.warmup > 0:
            H.run_wrk(url, args.warmup, args.connections, args.threads, target.script)
        r = H.run_wrk(url, args.duration, args.connections, args.threads, target.script)
        if not srv.alive():
            H.log(f"  server died during the run; log tail:\n{srv.log_tail()}")
            r.ok = False
            r.error = r.error or "server died"
    finally:
        note = srv.stop()
        if "SIGKILL" in note or "still alive" in note:
            H.log(f"  stop: {note}")
        srv.cleanup_tmp()
    return r, ""


def main():
    args = parse_args()
    H.install_signal_handlers()
    header = H.machine_header()
    for line in header:
        print(line, flush=True)
    specs = H.select_servers(args)
    if not specs:
        sys.exit("no server to run")
    cells = [(t, s) for t in args.targets for s in specs if s.supports(t.key)]
    est = args.rounds * len(cells) * (args.duration + args.warmup + 2.5)
    print(f"servers: {', '.join(s.name for s in specs)}")
    print(f"wrk: -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency, "
          f"warm-up {args.warmup:g}s, {args.rounds} round(s); about {est / 60:.1f} min", flush=True)

    samples = {}   # (target.key, server.name) -> [WrkResult]
    failures = {}  # (target.key, server.name) -> [str]
    t_start = time.monotonic()
    for rnd in range(args.rounds):
        for target in args.targets:
            order = [s for s in specs if s.supports(target.key)]
            if order:
                k = rnd % len(order)
                order = order[k:] + order[:k]
            for spec in order:
                H.log(f"[round {rnd + 1}/{args.rounds}] {target.label:<16} {spec.name}")
                r, note = measure_cell(spec, target, args)
                key = (target.key, spec.name)
                if r is not None and r.ok:
                    samples.setdefault(key, []).append(r)
                    H.log(f"  {r.rps:,.0f} req/s  p50 {H.fmt_ms(r.p50)} ms  p99 {H.fmt_ms(r.p99)} ms"
                          f"  errors: {r.error_text()}")
                else:
                    msg = note or (r.error if r else "failed")
                    failures.setdefault(key, []).append(msg)
                    H.log(f"  FAILED: {msg}")
    elapsed = time.monotonic() - t_start
    la = __import__("os").getloadavg()

    # ---- aggregate
    rows_txt, rows_md = [], []
    summary = []
    for target in args.targets:
        med = {}
        for spec in specs:
            if not spec.supports(target.key):
                med[spec.name] = None
                continue
            rs = samples.get((target.key, spec.name), [])
            if not rs:
                med[spec.name] = "failed"
                continue
            med[spec.name] = {
                "rps": H.median(r.rps for r in rs),
                "p50": H.median(r.p50 for r in rs),
                "p99": H.median(r.p99 for r in rs),
                "min": min(r.rps for r in rs), "max": max(r.rps for r in rs),
                "errors": sum(r.errors for r in rs), "n": len(rs),
                "error_kinds": H.sum_error_kinds(rs),
                # a server answering 404/5xx fast is not a result: flag it, keep it out of "best"
                "bad": sum(r.non2xx for r in rs) > 0.01 * max(1, sum(r.requests for r in rs)),
                "fail": len(failures.get((target.key, spec.name), [])),
            }
        peer_rps = [m["rps"] for s in specs
                    if s.is_peer and isinstance(m := med[s.name], dict) and not m["bad"]]
        best = max(peer_rps) if peer_rps else float("nan")
        best_name = next((s.name for s in specs if s.is_peer and isinstance(med[s.name], dict)
                          and not med[s.name]["bad"] and med[s.name]["rps"] == best), None)
        for spec in specs:
            m = med[spec.name]
            if m is None:
                row = [target.label, spec.name, "n/a", "n/a", "n/a", "n/a"]
            elif m == "failed":
                row = [target.label, spec.name, "failed", "", "", ""]
            else:
                ratio = m["rps"] / best if best == best and best > 0 else float("nan")
                row = [target.label, spec.name,
                       H.fmt_num(m["rps"], 0) + (" (!)" if m["bad"] else ""), H.fmt_ms(m["p50"]),
                       H.fmt_ms(m["p99"]), H.fmt_num(ratio, 2) + "x"]
            extra = []
            if args.rounds > 1:
                extra.append(f"{H.fmt_num(m['min'], 0)}-{H.fmt_num(m['max'], 0)}"
                             if isinstance(m, dict) else "")
            if isinstance(m, dict):
                e = m["error_kinds"] + (f" ({m['fail']} failed runs)" if m["fail"] else "")
            else:
                e = ""
            rows_txt.append(row + extra + [e])
            rows_md.append(row + extra + [e])
            if isinstance(m, dict):
                summary.append({"path": target.label, "server": spec.name, **m,
                                "vs_best_peer": (m["rps"] / best) if best == best and best > 0 else None,
                                "best_peer": best_name})
        rows_txt.append([""] * len(rows_txt[-1]))
    if rows_txt:
        rows_txt.pop()
    headers = ["path", "server", "req/s", "p50 ms", "p99 ms", "vs best peer"]
    if args.rounds > 1:
        headers.append("req/s range")
    headers.append("errors")
    align = "ll" + "r" * (len(headers) - 2)

    footer = [
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency per cell "
        f"(+{args.warmup:g}s unmeasured warm-up), fresh server per cell; "
        f"{args.rounds} round(s), median per cell"
        + ("; 'req/s range' = min-max over rounds" if args.rounds > 1 else "") + ".",
        "vs best peer = req/s / the best non-metronome server's req/s on that path "
        "(nginx counts: it is the static ceiling on /plaintext and /json). "
        "errors = wrk non-2xx/3xx responses and socket errors by kind, summed over rounds "
        "(a server that closes the connection after each response without `Connection: close`, "
        "like uWSGI --http-socket, shows one wrk 'read' error per response: wrk reconnects). "
        "(!) = more than 1 % non-2xx/3xx answers: not a valid result, never the 'best peer'.",
        f"load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; elapsed {elapsed / 60:.1f} min",
    ]
    print()
    print(H.format_table(headers, rows_txt, align=align))
    print()
    for line in footer:
        print(line)
    print()
    print("\n".join(H.servers_text(specs)))

    if args.markdown:
        md = ["## HTTP throughput and latency", ""]
        md += [f"- {line}" for line in header]
        md += ["", H.format_table(headers, rows_md, markdown=True, align=align), ""]
        md += [f"{line}" for line in footer] + [""]
        md += H.servers_markdown(specs)
        Path(args.markdown).write_text("\n".join(md) + "\n")
        print(f"\nmarkdown written to {args.markdown}")
    if args.json:
        raw = {"header": header, "args": vars(args) | {"targets": [t.key for t in args.targets]},
               "summary": summary,
               "samples": [{"path": k[0], "server": k[1], "rps": r.rps, "p50": r.p50, "p99": r.p99,
                            "pct": r.pct, "max_ms": r.max_ms, "non2xx": r.non2xx, "sock": r.sock,
                            "cmd": r.cmd} for k, rs in samples.items() for r in rs],
               "failures": [{"path": k[0], "server": k[1], "why": v} for k, v in failures.items()]}
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str) + "\n")
        print(f"raw samples written to {args.json}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
