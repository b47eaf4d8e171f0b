"""Every shipped configuration starts and serves its app: a native route *and* a Python route
(each wait mode, lanes, plugins, every start order of the threads)."""
import glob
import json
import os
import unittest

from harness import ROOT, Server, exchange, request

# (config, a native route, a Python route): every shipped config is listed (test_all_listed).
CONFIGS = [
    ("configs/default.yaml", "/native/plaintext", "/json"),
    ("configs/examples/bad-budgets.yaml", "/native/plaintext", "/json"),
    ("configs/examples/card-yield.yaml", "/native/plaintext", "/json"),
    ("configs/examples/lanes.yaml", "/native/plaintext", "/json"),
    ("configs/examples/fair.yaml", "/native/plaintext", "/json"),
    ("configs/examples/plugins.yaml", "/native/plaintext", "/json"),
    ("perf/configs/native-default.yaml", "/plaintext", "/py/json"),
    ("perf/configs/native-lanes.yaml", "/plaintext", "/py/json"),
    ("perf/configs/native-card-yield.yaml", "/plaintext", "/py/json"),
    # route and python on the main thread: route's lane starts before the python stage fills
    # the route table (the router is built in Connect, after every Start)
    ("perf/configs/native-onelane.yaml", "/plaintext", "/py/json"),
]


class ShippedConfigs(unittest.TestCase):
    def test_all_listed(self):
        shipped = {os.path.relpath(p, ROOT) for pattern in ("configs/*.yaml", "configs/examples/*.yaml",
                                                             "perf/configs/*.yaml")
                   for p in glob.glob(os.path.join(ROOT, pattern))}
        self.assertEqual(shipped, {c for c, _, _ in CONFIGS})

    def test_each_config_serves_native_and_python(self):
        for rel, native, python in CONFIGS:
            with self.subTest(config=rel):
                with Server(config_file=os.path.join(ROOT, rel)) as srv:
                    headers = {"X-Api-Key": "secret-1"} if "plugins" in rel else {}
                    for _ in range(50):  # enough to go through every thread more than once
                        r = exchange(srv, request("GET", native, headers=headers))
                        self.assertEqual(r.status, 200, (native, r))
                        self.assertEqual(r.body, b"Hello, World!")
                        r = exchange(srv, request("GET", python, headers=headers))
                        self.assertEqual(r.status, 200, (python, r))
                        self.assertEqual(json.loads(r.body), {"message": "Hello, World!"})
                    self.assertEqual(srv.stop(), 0, srv.read_log()[-2000:])


if __name__ == "__main__":
    unittest.main()
