"""End-to-end command line: --version, --help, usage errors, `check` on good and broken configs,
and `serve` on a port that is taken.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BINARY, NATIVE_PIPELINE, ROOT  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.yaml")


def run(*args, timeout=60):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


class CliTest(unittest.TestCase):
    def write(self, text, name="config.yaml"):
        d = tempfile.TemporaryDirectory(prefix="metronome-cli-")
        self.addCleanup(d.cleanup)
        path = os.path.join(d.name, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def assertUsage(self, proc, message):
        self.assertEqual(proc.returncode, 2, proc)
        self.assertIn(message, proc.stderr)
        self.assertIn("usage:", proc.stderr)
        self.assertIn("metronome serve -c FILE", proc.stderr)
        self.assertEqual(proc.stdout, "")

    # --- flags and usage ----------------------------------------------------------------------

    def test_version(self):
        p = run("--version")
        self.assertEqual(p.returncode, 0, p)
        self.assertRegex(p.stdout, r"^metronome \d+\.\d+\.\d+\n$")
        self.assertEqual(p.stderr, "")

    def test_help(self):
        for flag in ("--help", "-h"):
            with self.subTest(flag):
                p = run(flag)
                self.assertEqual(p.returncode, 0, p)
                self.assertIn("usage:", p.stdout)
                for text in ("serve -c FILE", "check -c FILE", "--listen", "--version"):
                    self.assertIn(text, p.stdout)
                self.assertEqual(p.stderr, "")

    def test_no_arguments(self):
        self.assertUsage(run(), "missing command")

    def test_unknown_command(self):
        self.assertUsage(run("frobnicate", "-c", DEFAULT_CONFIG), "unknown command 'frobnicate'")

    def test_missing_config(self):
        self.assertUsage(run("serve"), "missing -c FILE")
        self.assertUsage(run("check"), "missing -c FILE")
        self.assertUsage(run("check", "-c"), "unexpected argument '-c'")

    def test_unknown_flag(self):
        self.assertUsage(run("check", "-c", DEFAULT_CONFIG, "--frob"), "unexpected argument '--frob'")

    def test_config_file_not_found(self):
        p = run("check", "-c", "/nonexistent/metronome.yaml")
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("/nonexistent/metronome.yaml", p.stderr)

    # --- check on the default config ----------------------------------------------------------

    def test_check_default_config(self):
        p = run("check", "-c", DEFAULT_CONFIG)
        self.assertEqual(p.returncode, 0, p)
        self.assertIn(f"{DEFAULT_CONFIG}: valid", p.stdout)
        with open(DEFAULT_CONFIG) as f:
            text = f.read()
        entries = re.findall(r"^\s*-\s*\{stage:\s*([\w-]+)(.*)\}", text.split("\npipeline:", 1)[1], re.M)
        self.assertGreaterEqual(len(entries), 5)
        self.assertIn(f"pipeline: {len(entries)} stages", p.stdout)
        for i, (stage, rest) in enumerate(entries):
            name = re.search(r"\bname:\s*([\w-]+)", rest)
            name = name.group(1) if name else stage
            self.assertRegex(p.stdout, rf"(?m)^\s*{i}\s+{re.escape(name)}\s+{re.escape(stage)}\s")
        self.assertRegex(p.stdout, r"deadline bandwidth: \d+\.\d+ of \d+\.\d+ CPUs admitted")
        self.assertIn("io_uring: ok", p.stdout)

    def test_check_with_equals_flags(self):
        p = run("check", f"--config={DEFAULT_CONFIG}", "--listen=127.0.0.1:9999")
        self.assertEqual(p.returncode, 0, p)

    # --- check on broken configs --------------------------------------------------------------

    def check_error(self, text, *expected):
        """`check` exits 1; stderr holds every expected fragment (file:line, key, reason)."""
        path = self.write(text)
        p = run("check", "-c", path)
        self.assertEqual(p.returncode, 1, p)
        for e in expected:
            self.assertIn(e.replace("FILE", path), p.stderr)
        return p, path

    def test_yaml_syntax_error(self):
        p, path = self.check_error("server:\n  listen: [oops\n" + NATIVE_PIPELINE, "FILE:")
        self.assertRegex(p.stderr, re.escape(path) + r":\d+(:\d+)?: YAML syntax")

    def test_yaml_syntax_error_line(self):
        self.check_error("server:\n  backlog: 10\n  name: x: y\n" + NATIVE_PIPELINE,
                         "FILE:3:", "YAML syntax")

    def test_unknown_key(self):
        self.check_error("server:\n  backlog: 10\n  listne: 127.0.0.1:0\n" + NATIVE_PIPELINE,
                         "FILE:3: server.listne: unknown key")

    def test_unknown_top_level_key(self):
        self.check_error("serverr:\n  backlog: 10\n" + NATIVE_PIPELINE, "FILE:1: serverr: unknown key")

    def test_unknown_key_in_stage(self):
        self.check_error("pipeline:\n  - {stage: accept}\n  - {stage: parse, polcy: other}\n"
                         "  - {stage: route}\n  - {stage: serialize}\n  - {stage: send}\n",
                         "FILE:3: pipeline[1].polcy: unknown key")

    def test_wrong_type(self):
        self.check_error("server:\n  backlog: lots\n" + NATIVE_PIPELINE,
                         "FILE:2: server.backlog:", "'lots'")
        self.check_error("limits:\n  header_timeout: soon\n" + NATIVE_PIPELINE,
                         "FILE:2: limits.header_timeout:", "'soon'")
        self.check_error("server:\n  reuse_port: maybe\n" + NATIVE_PIPELINE,
                         "FILE:2: server.reuse_port:", "'maybe'")

    def test_out_of_range(self):
        self.check_error("server:\n  backlog: 0\n" + NATIVE_PIPELINE,
                         "FILE:2: server.backlog: out of range", "got 0")
        self.check_error("\n\nlimits:\n  max_header_count: 100000\n" + NATIVE_PIPELINE,
                         "FILE:4: limits.max_header_count: out of range", "100000")
        self.check_error("server:\n  recv_buffers: 1000\n" + NATIVE_PIPELINE,
                         "FILE:2: server.recv_buffers:", "power of two")

    def test_missing_required_key(self):
        self.check_error("routes:\n  - {body: x}\n" + NATIVE_PIPELINE,
                         "FILE:2: routes[0].path: missing required key")

    def test_missing_pipeline(self):
        self.check_error("server:\n  backlog: 10\n", "FILE: pipeline: missing or empty")

    def test_unknown_stage_type(self):
        self.check_error("pipeline:\n  - {stage: accept}\n  - {stage: frobnicate}\n  - {stage: route}\n"
                         "  - {stage: serialize}\n  - {stage: send}\n",
                         "FILE:3: pipeline[1].stage: unknown stage type 'frobnicate'", "registered:")

    def test_bad_route_pattern(self):
        self.check_error("routes:\n  - {path: \"/users/{id:float}\", body: x}\n" + NATIVE_PIPELINE,
                         "FILE:2: routes[0].path:", "float")

    def test_deadline_keys_on_other_policy(self):
        self.check_error("pipeline:\n  - {stage: accept}\n  - {stage: parse, policy: other, runtime: 100us}\n"
                         "  - {stage: route}\n  - {stage: serialize}\n  - {stage: send}\n",
                         "FILE:3: pipeline[1].runtime:", "policy: deadline only")

    def test_runtime_over_period(self):
        self.check_error("pipeline:\n  - {stage: accept}\n"
                         "  - {stage: parse, policy: deadline, runtime: 2ms, period: 1ms}\n"
                         "  - {stage: route}\n  - {stage: serialize}\n  - {stage: send}\n",
                         "FILE:3: pipeline[1].runtime:", "runtime <= deadline <= period")

    def test_bandwidth_over_admission(self):
        p, path = self.check_error(
            "pipeline:\n"
            "  - {stage: accept, policy: deadline, runtime: 900us, period: 1ms}\n"
            "  - {stage: parse, policy: deadline, runtime: 900us, period: 1ms}\n"
            "  - {stage: route, policy: deadline, runtime: 900us, period: 1ms}\n"
            "  - {stage: serialize}\n"
            "  - {stage: send}\n",
            "pipeline:", "deadline bandwidth 2.700 CPUs exceeds",
            "accept 0.900, parse 0.900, route 0.900")
        self.assertIn(path, p.stderr)

    def test_several_errors_all_reported(self):
        p, _ = self.check_error("server:\n  backlog: 0\n  listne: x\nlimits:\n  max_header_count: 0\n"
                                + NATIVE_PIPELINE,
                                "FILE:2: server.backlog", "FILE:3: server.listne", "FILE:5: limits.max_header_count")

    # Every HTTP stage reads the server/limits sections; each error is still listed once.
    def test_each_error_reported_once(self):
        # Five stages read the server section; its errors should still be listed once each.
        p, path = self.check_error("server:\n  backlog: 0\n" + NATIVE_PIPELINE, "FILE:2: server.backlog")
        lines = [line for line in p.stderr.splitlines() if "server.backlog" in line]
        self.assertEqual(len(lines), 1, p.stderr)

    # --- serve --------------------------------------------------------------------------------

    def test_serve_port_taken(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path = self.write(f"server:\n  listen: 127.0.0.1:{port}\n" + NATIVE_PIPELINE)
            p = run("serve", "-c", path, timeout=30)
            self.assertNotEqual(p.returncode, 0, p)
            self.assertNotIn(p.returncode, (-9, -6, -11), p)  # exited, not killed or crashed
            self.assertIn(f"127.0.0.1:{port}", p.stdout + p.stderr)
            self.assertIn("Address already in use", p.stdout + p.stderr)
            # The same through --listen.
            path = self.write("server:\n  listen: 127.0.0.1:0\n" + NATIVE_PIPELINE)
            p = run("serve", "-c", path, "--listen", f"127.0.0.1:{port}", timeout=30)
            self.assertNotEqual(p.returncode, 0, p)
            self.assertIn(f"127.0.0.1:{port}", p.stdout + p.stderr)

    def test_serve_invalid_config_exits_1(self):
        path = self.write("server:\n  backlog: lots\n" + NATIVE_PIPELINE)
        p = run("serve", "-c", path, timeout=30)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn(f"{path}:2: server.backlog", p.stderr)

    def test_serve_bad_listen_address(self):
        p = run("serve", "-c", self.write(NATIVE_PIPELINE), "--listen", "nohost", timeout=30)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn("server.listen", p.stderr)
        self.assertIn("nohost", p.stderr)


if __name__ == "__main__":
    unittest.main()
