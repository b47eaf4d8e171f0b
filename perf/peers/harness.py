"""Common code for perf/bench_http.py and perf/bench_isolation.py (stdlib only).

- The server set: the Python peers people use today (nginx as the static ceiling, uvicorn,
  gunicorn, uWSGI) and any number of metronome configs, each launched on a free 127.0.0.1 port
  in its own process group, stopped by PID (SIGTERM to the leader, SIGKILL to the whole group
  on timeout).
- wrk: running it and parsing its --latency output.
- Small reporting helpers (median, tables in plain text and markdown, machine header).

Run everything with Debian's /usr/bin/python3: the peers must run on the same CPython 3.11 that
metronome embeds, never on the pyenv build first on PATH.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

PEERS_DIR = Path(__file__).resolve().parent
PERF_DIR = PEERS_DIR.parent
REPO = PERF_DIR.parent
WRK_DIR = PERF_DIR / "wrk"
PYTHON = "/usr/bin/python3"          # Debian's CPython 3.11; never the pyenv python3 on PATH
METRONOME_BIN = REPO / "build" / "metronome"
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# Targets (what wrk hits)

@dataclass(frozen=True)
class Target:
    key: str
    path: str
    script: Optional[Path] = None    # wrk lua script (method/body/headers)

    @property
    def label(self) -> str:
        return ("POST " if self.script else "GET ") + self.path


TARGETS = {
    "plaintext": Target("plaintext", "/plaintext"),
    "json": Target("json", "/json"),
    "users": Target("users", "/users/123"),
    "echo": Target("echo", "/echo", WRK_DIR / "echo.lua"),
}


# ---------------------------------------------------------------------------------------------
# Server specs

def _which(name: str, *fallbacks: str) -> Optional[str]:
    for cand in (shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin"), *fallbacks):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def child_env() -> dict:
    """Environment for servers: no pyenv/virtualenv leakage into Debian's interpreter."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV",
              "PYENV_VERSION"):
        env.pop(k, None)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
    return env


@dataclass
class ServerSpec:
    name: str
    description: str
    # build(port, tmpdir) -> argv; may write files into tmpdir (nginx conf)
    build: Callable[[int, Path], list]
    cwd: Path = PEERS_DIR
    targets: Optional[frozenset] = None      # None = every target
    has_app_routes: bool = True              # /hog, /alloc, /users, /echo (False for nginx)
    stop_signal: int = signal.SIGTERM
    is_peer: bool = True
    in_default: bool = True                  # False: run only when named in --servers
    check: Callable[[], Optional[str]] = lambda: None   # returns a reason to skip, or None

    def supports(self, target_key: str) -> bool:
        return self.targets is None or target_key in self.targets

    def unavailable_reason(self) -> Optional[str]:
        return self.check()


def _nginx_spec() -> ServerSpec:
    def build(port: int, tmp: Path) -> list:
        conf = (PEERS_DIR / "nginx.conf.in").read_text()
        conf = conf.replace("@PORT@", str(port)).replace("@TMPDIR@", str(tmp))
        (tmp / "nginx.conf").write_text(conf)
        return [_which("nginx") or "nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp) + "/",
                "-e", str(tmp / "error.log"), "-g", "daemon off;"]

    return ServerSpec(
        name="nginx",
        description="nginx 2 workers, static `return 200` (ceiling for a fixed response; "
                    "/plaintext and /json only)",
        build=build, targets=frozenset({"plaintext", "json"}), has_app_routes=False,
        stop_signal=signal.SIGTERM,
        check=lambda: None if _which("nginx") else "nginx not installed (apt install nginx-light)")


def _uvicorn_spec(workers: int) -> ServerSpec:
    def build(port: int, tmp: Path) -> list:
        return [PYTHON, "-m", "uvicorn", "app_asgi:app", "--host", HOST, "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--workers", str(workers),
                "--log-level", "warning", "--no-access-log"]

    return ServerSpec(
        name=f"uvicorn-{workers}",
        description=f"uvicorn {workers} worker{'s' if workers > 1 else ''}, uvloop + httptools, "
                    "raw ASGI app (app_asgi.py)",
        build=build, check=lambda: _py_module_missing("uvicorn", "uvloop", "httptools"))


def _gunicorn_spec(kind: str) -> ServerSpec:
    def build(port: int, tmp: Path) -> list:
        argv = [PYTHON, "-m", "gunicorn", "-w", "2"]
        if kind == "gthread":
            argv += ["-k", "gthread", "--threads", "4"]
        argv += ["-b", f"{HOST}:{port}", "--log-level", "warning", "--graceful-timeout", "5",
                 "--worker-tmp-dir", str(tmp), "--chdir", str(PEERS_DIR), "app_wsgi:app"]
        return argv   # no --access-logfile: gunicorn's access log is off by default

    desc = ("gunicorn 2 sync workers (one request at a time per worker, no keep-alive)"
            if kind == "sync" else "gunicorn 2 gthread workers x 4 threads (keep-alive 2 s)")
    return ServerSpec(name=f"gunicorn-{kind}", description=desc + ", WSGI app (app_wsgi.py)",
                      build=build, check=lambda: _py_module_missing("gunicorn"))


def _uwsgi_spec(http11: bool = False) -> ServerSpec:
    def build(port: int, tmp: Path) -> list:
        return [_which("uwsgi", "/usr/bin/uwsgi-core") or "uwsgi", "--plugin", "python3",
                "--http11-socket" if http11 else "--http-socket", f"{HOST}:{port}",
                "--processes", "2",
                "--wsgi-file", "app_wsgi.py", "--chdir", str(PEERS_DIR),
                "--disable-logging", "--master", "--need-app", "--die-on-term",
                "--pidfile", str(tmp / "uwsgi.pid")]

    def check() -> Optional[str]:
        if not _which("uwsgi", "/usr/bin/uwsgi-core"):
            return "uwsgi not installed (apt install uwsgi-core uwsgi-plugin-python3)"
        if not Path("/usr/lib/uwsgi/plugins/python3_plugin.so").exists():
            return "uwsgi python3 plugin missing (apt install uwsgi-plugin-python3)"
        return None

    if http11:
        return ServerSpec(
            name="uwsgi-http11",
            description="uWSGI as `uwsgi` but --http11-socket (keep-alive); opt-in, not in the "
                        "default set",
            build=build, check=check, stop_signal=signal.SIGINT, in_default=False)
    return ServerSpec(
        name="uwsgi",
        description="uWSGI 2 processes + master, --http-socket (native HTTP in the workers, "
                    "closes the connection after each response), python3 plugin, WSGI app "
                    "(app_wsgi.py)",
        build=build, check=check, stop_signal=signal.SIGINT)   # SIGINT: uWSGI's "stop now"


def _metronome_spec(name: str, config: Path) -> ServerSpec:
    def build(port: int, tmp: Path) -> list:
        return [str(METRONOME_BIN), "serve", "-c", str(config), "--listen", f"{HOST}:{port}"]

    def check() -> Optional[str]:
        if not os.access(METRONOME_BIN, os.X_OK):
            return f"{METRONOME_BIN} not built yet (meson/ninja in build/)"
        if not config.is_file():
            return f"config {config} not found"
        return None

    return ServerSpec(name=f"metronome-{name}", description=f"metronome, config {config}",
                      build=build, cwd=REPO, is_peer=False, check=check)


def _py_module_missing(*mods: str) -> Optional[str]:
    code = "import " + ", ".join(mods)
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=child_env())
    if r.returncode != 0:
        return f"{PYTHON} cannot import {', '.join(mods)}: {r.stderr.strip().splitlines()[-1:]}"
    return None


def peer_specs() -> list:
    return [_nginx_spec(), _uvicorn_spec(1), _uvicorn_spec(2), _gunicorn_spec("sync"),
            _gunicorn_spec("gthread"), _uwsgi_spec(), _uwsgi_spec(http11=True)]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(s.name + ("" if s.in_default else " (opt-in)") for s in peer_specs())
    parser.add_argument(
        "--servers", default=None,
        help=f"comma-separated servers to run (default: all). Peers: {names}; "
             "'peers' = all default peers; metronome-NAME for each --metronome-config; "
             "'metronome' = all metronome configs")
    parser.add_argument(
        "--metronome-config", action="append", default=[], metavar="NAME=PATH",
        help="add server metronome-NAME: build/metronome serve -c PATH (repeatable; relative "
             "PATH is taken from the current directory if it exists there, else from the repo)")


def _resolve_config(p: str) -> Path:
    path = Path(p)
    if path.is_absolute():
        return path
    here = Path.cwd() / path
    return here.resolve() if here.exists() else (REPO / path).resolve()


def select_servers(args) -> list:
    """Returns the ServerSpecs to run, in a stable order; prints skips to stderr."""
    specs = peer_specs()
    for item in args.metronome_config:
        if "=" not in item:
            sys.exit(f"--metronome-config wants NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            sys.exit(f"--metronome-config: bad NAME {name!r}")
        specs.append(_metronome_spec(name, _resolve_config(path)))
    by_name = {s.name: s for s in specs}
    if args.servers:
        chosen = []
        for raw in args.servers.split(","):
            n = raw.strip()
            if not n:
                continue
            if n == "peers":
                group = [s for s in specs if s.is_peer and s.in_default]
            elif n == "metronome":
                group = [s for s in specs if not s.is_peer]
            elif n in by_name:
                group = [by_name[n]]
            else:
                sys.exit(f"unknown server {n!r}; known: {', '.join(by_name)}, peers, metronome")
            chosen += [s for s in group if s not in chosen]
    else:
        chosen = [s for s in specs if s.in_default]
    runnable = []
    for s in chosen:
        reason = s.unavailable_reason()
        if reason:
            print(f"SKIP {s.name}: {reason}", file=sys.stderr, flush=True)
        else:
            runnable.append(s)
    return runnable


# ---------------------------------------------------------------------------------------------
# Launching and stopping

class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _probe(port: int, path: str = "/plaintext", timeout: float = 1.0) -> Optional[int]:
    """One HTTP/1.1 GET on a fresh connection; returns the status code or None."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
                      .encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
            return int(m.group(1)) if m else None
    except OSError:
        return None


_RUNNING: list = []


def _cleanup_all() -> None:
    for srv in list(_RUNNING):
        try:
            srv.stop(timeout=5)
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"cleanup of {srv.spec.name} failed: {e}", file=sys.stderr)


atexit.register(_cleanup_all)


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP on the harness stop the servers it started (via atexit/finally)."""
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    signal.signal(signal.SIGHUP, _sigterm_to_exit)


class RunningServer:
    def __init__(self, spec: ServerSpec, port: int, tmpdir: Path, proc: subprocess.Popen,
                 log_path: Path, argv: list):
        self.spec, self.port, self.tmpdir, self.proc = spec, port, tmpdir, proc
        self.log_path, self.argv = log_path, argv
        self.pgid = proc.pid       # start_new_session=True: the leader's pid is the group id
        self.stopped = False

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self, timeout: float = 10.0) -> str:
        """Signal the leader (its stop signal), wait for the whole group to be gone, SIGKILL the
        group on timeout. Returns a short note on how it ended."""
        if self.stopped:
            return "already stopped"
        note = ""
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, self.spec.stop_signal)
            elif self._group_alive():           # leader gone, children left behind
                os.killpg(self.pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.proc.poll()
                if self.proc.returncode is not None and not self._group_alive():
                    break
                time.sleep(0.05)
            else:
                note = "SIGKILL after timeout"
                try:
                    os.killpg(self.pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                note = "leader did not die after SIGKILL"
            # children reparented to init are reaped by it; wait until the group is empty
            for _ in range(100):
                if not self._group_alive():
                    break
                time.sleep(0.05)
            else:
                note += " (process group still alive!)"
        finally:
            self.stopped = True
            if self in _RUNNING:
                _RUNNING.remove(self)
        rc = self.proc.returncode
        return note or f"exit {rc}"

    def cleanup_tmp(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_server(spec: ServerSpec, ready_timeout: float = 30.0, settle: float = 0.5) -> RunningServer:
    """Starts spec on a free port and waits until it answers HTTP. Raises ServerError."""
    last_err = None
    for _attempt in range(3):          # a free port can be taken between bind() and the server
        port = free_port()
        tmpdir = Path(tempfile.mkdtemp(prefix=f"bench-{spec.name}-"))
        argv = spec.build(port, tmpdir)
        log_path = tmpdir / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=str(spec.cwd), env=child_env(),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        srv = RunningServer(spec, port, tmpdir, proc, log_path, argv)
        _RUNNING.append(srv)
        probe_path = "/plaintext"
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if not srv.alive():
                break
            if _probe(port, probe_path) is not None:
                # multi-process servers: give the other workers time to finish importing
                time.sleep(settle)
                if srv.alive() and _probe(port, probe_path) is not None:
                    return srv
            time.sleep(0.1)
        tail = srv.log_tail()
        alive = srv.alive()
        srv.stop(timeout=5)
        last_err = (f"{spec.name} {'did not answer within %.0fs' % ready_timeout if alive else 'exited early'}"
                    f" (port {port}); command: {shlex.join(argv)}\n--- log tail ({log_path}) ---\n{tail}")
        if alive or "Address already in use" not in tail:
            break
    raise ServerError(last_err)


# ---------------------------------------------------------------------------------------------
# wrk

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


@dataclass
class WrkResult:
    ok: bool
    rps: float = 0.0
    requests: int = 0
    duration_s: float = 0.0
    avg_ms: float = float("nan")
    max_ms: float = float("nan")
    pct: dict = field(default_factory=dict)       # {50: ms, 75: ms, 90: ms, 99: ms}
    non2xx: int = 0
    sock: dict = field(default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    cmd: str = ""
    output: str = ""
    error: str = ""

    @property
    def p50(self) -> float:
        return self.pct.get(50, float("nan"))

    @property
    def p99(self) -> float:
        return self.pct.get(99, float("nan"))

    @property
    def sock_errors(self) -> int:
        return sum(self.sock.values())

    @property
    def errors(self) -> int:
        return self.non2xx + self.sock_errors

    def error_text(self) -> str:
        parts = []
        if self.non2xx:
            parts.append(f"non-2xx/3xx {self.non2xx}")
        for k, v in self.sock.items():
            if v:
                parts.append(f"{k} {v}")
        return ", ".join(parts) or "0"


def parse_wrk(out: str) -> WrkResult:
    r = WrkResult(ok=False, output=out)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        r.error = "no Requests/sec line in wrk output"
        return r
    r.rps = float(m.group(1))
    for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        r.pct[int(m.group(1))] = _to_ms(m.group(2), m.group(3))
    m = re.search(r"^\s+Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+"
                  r"([\d.]+)(us|ms|s|m|h)", out, re.M)
    if m:
        r.avg_ms = _to_ms(m.group(1), m.group(2))
        r.max_ms = _to_ms(m.group(5), m.group(6))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    if m:
        r.requests = int(m.group(1))
        r.duration_s = _to_ms(m.group(2), m.group(3)) / 1000.0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.sock = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r.non2xx = int(m.group(1))
    r.ok = r.requests > 0
    if not r.ok:
        r.error = "wrk completed no request"
    return r


WRK = _which("wrk") or "wrk"


def run_wrk(url: str, duration: float, connections: int, threads: int = 1,
            script: Optional[Path] = None, timeout_s: Optional[float] = None) -> WrkResult:
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if timeout_s:
        argv += ["--timeout", f"{timeout_s:g}s"]
    if script:
        argv += ["-s", str(script)]
    argv.append(url)
    cmd = shlex.join(argv)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as e:
        return WrkResult(ok=False, cmd=cmd, error=f"wrk hung: {e}")
    r = parse_wrk(p.stdout)
    r.cmd = cmd
    if p.returncode != 0:
        r.ok = False
        r.error = f"wrk exit {p.returncode}: {p.stderr.strip()[-300:]}"
    return r


# ---------------------------------------------------------------------------------------------
# Reporting helpers

def median(values) -> float:
    vals = [v for v in values if v == v]   # drop NaN
    return statistics.median(vals) if vals else float("nan")


def sum_error_kinds(results) -> str:
    """'non-2xx 3, read 120' summed over WrkResults, or '0'."""
    tot = {"non-2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    for r in results:
        tot["non-2xx"] += r.non2xx
        for k, v in r.sock.items():
            tot[k] += v
    return ", ".join(f"{k} {v}" for k, v in tot.items() if v) or "0"


def command_line() -> str:
    return shlex.join([sys.executable] + sys.argv)


def machine_header() -> list:
    la = os.getloadavg()
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"host: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
        f"harness python {sys.executable} {platform.python_version()}",
        f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
        f"command: {command_line()}",
    ]
    if os.path.realpath(sys.executable) != os.path.realpath(PYTHON):
        lines.append(f"note: the harness runs under {sys.executable}; the peers always run under {PYTHON}")
    return lines


def fmt_num(v: float, digits: int = 2) -> str:
    if v is None or v != v:
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fmt_ms(v: float) -> str:
    if v is None or v != v:
        return "n/a"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_table(headers: list, rows: list, markdown: bool = False, align: Optional[str] = None) -> str:
    """align: one char per column, 'l' or 'r' (default: first column left, the rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(vals):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w)
                         for v, w, a in zip(vals, widths, align)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def servers_text(specs) -> list:
    """The server list printed under each report."""
    return ["servers:"] + [f"  {s.name:<18} {s.description}" for s in specs]


def servers_markdown(specs) -> list:
    """The same list as a markdown table, for --markdown."""
    return ["| server | configuration |", "| --- | --- |"] + [f"| {s.name} | {s.description} |" for s in specs]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
