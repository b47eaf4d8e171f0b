"""`metronome check` refuses what `serve` would refuse at start-up, with the same messages: an
app that does not import, a missing attribute, a route defined twice, a native route that clashes
with a Python one, a handler that cannot take its route's path parameters, an app whose import
hangs (--timeout). Each message names the function, its file:line and the config's line. And
check still says valid on every shipped config.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BINARY, ROOT  # noqa: E402

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

PIPELINE = """pipeline:
  - {stage: accept}
  - {stage: parse}
  - {stage: route}
  - {stage: python}
  - {stage: serialize}
  - {stage: send}
"""


def app_config(app, routes=""):
    """python.app is on line 2 of every config written here."""
    return f'python:\n  app: "{app}"\n  path: [{json.dumps(APPS)}]\n{routes}{PIPELINE}'


def decorator_line(module, function):
    """The line of the first decorator of `function` in apps/<module>.py (co_firstlineno)."""
    path = os.path.join(APPS, module + ".py")
    with open(path) as f:
        lines = f.read().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"def {function}("))
    while at > 0 and lines[at - 1].startswith("@"):
        at -= 1
    return f"{path}:{at + 1}"


class CheckTest(unittest.TestCase):
    def write(self, text):
        d = tempfile.TemporaryDirectory(prefix="metronome-check-")
        self.addCleanup(d.cleanup)
        path = os.path.join(d.name, "config.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def check(self, path, *args, timeout=60):
        return subprocess.run([BINARY, "check", "-c", path, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def serve(self, path, timeout=30):
        return subprocess.run([BINARY, "serve", "-c", path, "--listen", "127.0.0.1:0"], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)

    def assertRefused(self, text, *expected):
        """check exits 1 without saying valid, and stderr holds every expected fragment (FILE: the
        config's path). Returns (path, stderr)."""
        path = self.write(text)
        p = self.check(path)
        self.assertEqual(p.returncode, 1, p)
        self.assertNotIn("valid", p.stdout)
        self.assertIn(f"{path}: the server would not start", p.stderr)
        for e in expected:
            self.assertIn(e.replace("FILE", path), p.stderr)
        return path, p.stderr

    def assertServeRefusesLikeCheck(self, path, check_stderr):
        """serve stops at start-up, before any lane runs, with the message check gave (after the
        stage's prefix). (accept may have bound its socket already: a route error is found in
        Connect, after every Start.)"""
        check_msg = re.search(r"^stage '[\w-]+'(?: would fail to start)?: (.*)$", check_stderr, re.M).group(1)
        p = self.serve(path)
        self.assertEqual(p.returncode, 1, p)
        self.assertNotIn("running:", p.stderr)
        self.assertIn(check_msg, p.stderr)

    # --- the app -------------------------------------------------------------------------------

    def test_missing_module(self):
        self.assertRefused(app_config("check_missing_module:app"), "FILE:2: python.app: cannot import 'check_missing_module'",
                           "Traceback (most recent call last)", f"{APPS}/check_missing_module.py\", line 3",
                           "ModuleNotFoundError: No module named 'metronome_check_no_such_module'")

    def test_app_module_not_found(self):
        self.assertRefused(app_config("check_no_such_app_module:app"),
                           "FILE:2: python.app: cannot import 'check_no_such_app_module'", "ModuleNotFoundError")

    def test_missing_attribute(self):
        self.assertRefused(app_config("check_native_clash:no_such_app"),
                           "FILE:2: python.app: module 'check_native_clash' has no attribute 'no_such_app'")

    def test_syntax_error(self):
        self.assertRefused(app_config("e2e_syntax_error:app"), "FILE:2: python.app", "SyntaxError",
                           "e2e_syntax_error.py")

    def test_startup_hooks_are_not_run(self):
        # e2e_startup_fail's hook raises: serve refuses it, check cannot know and says so.
        path = self.write(app_config("e2e_startup_fail:app"))
        p = self.check(path)
        self.assertEqual(p.returncode, 0, p)
        self.assertIn("python: e2e_startup_fail:app imported, 1 route", p.stdout)
        self.assertIn("startup hooks were not run", p.stdout)
        self.assertNotIn("E2E-STARTUP", p.stdout + p.stderr)

    # --- routes ----------------------------------------------------------------------------------

    def test_duplicate_route(self):
        path, err = self.assertRefused(
            app_config("check_duplicate_route:app"),
            "FILE:2: python.app: route GET /dup is defined twice in the app: "
            f"by handler `first` at {decorator_line('check_duplicate_route', 'first')} "
            f"and by handler `second` at {decorator_line('check_duplicate_route', 'second')}")
        self.assertServeRefusesLikeCheck(path, err)

    def test_native_route_clashes_with_python_route(self):
        routes = "routes:\n  - {path: /native, body: x}\n  - {path: /clash, body: native}\n"
        path, err = self.assertRefused(
            app_config("check_native_clash:app", routes),
            "FILE:6: routes[1].path: native route GET /clash clashes with a Python route: "
            f"handler `clash` at {decorator_line('check_native_clash', 'clash')} (FILE:2: python.app)")
        self.assertServeRefusesLikeCheck(path, err)

    def test_native_route_twice(self):
        routes = "routes:\n  - {path: /n, body: x}\n  - {path: /other, body: y}\n  - {path: /n, body: z}\n"
        self.assertRefused(app_config("check_native_clash:app", routes),
                           "FILE:7: routes[2].path: route GET /n is defined twice: also at FILE:5: routes[0].path")

    def test_handler_does_not_take_its_path_parameter(self):
        path, err = self.assertRefused(
            app_config("check_param_mismatch:app"),
            f"FILE:2: python.app: handler `user` at {decorator_line('check_param_mismatch', 'user')}: route GET /u/{{id}}: "
            "the handler cannot take the route's path parameters",
            "user(req, id=...)", "(req)", "got an unexpected keyword argument 'id'")
        # **params and a keyword-only parameter take theirs.
        self.assertNotIn("takes_kwargs", err)
        self.assertNotIn("keyword_only", err)
        # Before, serve started and answered every /u/... with a 500.
        self.assertServeRefusesLikeCheck(path, err)

    # --- an import that hangs --------------------------------------------------------------------

    def test_import_that_hangs_is_stopped_at_the_timeout(self):
        path = self.write(app_config("check_slow_import:app"))
        # The app sleeps 60 s at import; the subprocess timeout (30 s) proves check did not wait.
        p = self.check(path, "--timeout", "1s", timeout=30)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn(f"stage 'python': did not finish within 1s while importing python.app "
                      f"\"check_slow_import:app\" ({path}:2: python.app); the check process was killed", p.stderr)
        self.assertIn("--timeout", p.stderr)
        # The child is gone: nothing runs on this config any more.
        left = subprocess.run(["pgrep", "-f", path], capture_output=True, text=True)
        self.assertEqual(left.stdout, "", "a check process was left behind")

    def test_timeout_flag_usage(self):
        path = self.write(app_config("check_native_clash:app"))
        for bad in ("soon", "30", "0s", "2h"):
            with self.subTest(bad):
                p = self.check(path, "--timeout", bad)
                self.assertEqual(p.returncode, 2, p)
                self.assertIn("--timeout", p.stderr)
        p = subprocess.run([BINARY, "serve", "-c", path, "--timeout", "5s"], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)
        self.assertEqual(p.returncode, 2, p)
        self.assertIn("--timeout applies to check only", p.stderr)
        p = self.check(path, "--timeout=5s")
        self.assertEqual(p.returncode, 0, p)

    # --- shipped configs -------------------------------------------------------------------------

    def test_every_shipped_config_is_valid(self):
        shipped = sorted(glob.glob(os.path.join(ROOT, pattern))
                         for pattern in ("configs/*.yaml", "configs/examples/*.yaml", "perf/configs/*.yaml"))
        shipped = [p for group in shipped for p in group]
        self.assertGreaterEqual(len(shipped), 10)
        for path in shipped:
            with self.subTest(os.path.relpath(path, ROOT)):
                p = self.check(path)
                self.assertEqual(p.returncode, 0, p)
                self.assertIn(f"{path}: valid", p.stdout)
                self.assertRegex(p.stdout, r"(?m)^python: \S+ imported, \d+ routes?, every handler takes its path "
                                           r"parameters; startup hooks were not run$")


if __name__ == "__main__":
    unittest.main()
