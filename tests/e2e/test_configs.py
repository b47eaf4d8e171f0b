"""Every shipped configuration starts and serves the example app (each wait mode, lanes, plugins)."""
import json
import os
import unittest

from harness import ROOT, Server, exchange, request

CONFIGS = ["configs/default.yaml", "configs/examples/card-yield.yaml", "configs/examples/lanes.yaml",
           "configs/examples/fair.yaml", "configs/examples/plugins.yaml",
           "perf/configs/native-default.yaml", "perf/configs/native-lanes.yaml",
           "perf/configs/native-card-yield.yaml", "perf/configs/native-onelane.yaml"]


class ShippedConfigs(unittest.TestCase):
    def test_each_config_serves(self):
        for rel in CONFIGS:
            with self.subTest(config=rel):
                with Server(config_file=os.path.join(ROOT, rel)) as srv:
                    headers = {"X-Api-Key": "secret-1"} if "plugins" in rel else {}
                    for _ in range(50):  # enough to go through every thread more than once
                        r = exchange(srv, request("GET", "/json", headers=headers))
                        self.assertEqual(r.status, 200, r)
                        self.assertEqual(json.loads(r.body), {"message": "Hello, World!"})
                    self.assertEqual(srv.stop(), 0, srv.read_log()[-2000:])


if __name__ == "__main__":
    unittest.main()
