// python-plugin: a Python class that sees each request before the handler, on its own thread
// (see python_plugin.cc).
// Thread-safety: runs on its lane only; takes the GIL per batch.
#pragma once

#include <Python.h>

#include <string>

#include "runtime/stage.h"
#include "stages/http/shared.h"
#include "stages/python.h"

namespace metronome::py {

class PythonPluginStage : public Stage {
 public:
  // Plugins are numbered in a 32-bit mask on each request (Request::plugins_seen).
  static constexpr int kPluginsMax = 32;

  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  void ExtraStats(StatsSink& sink) const override;

 private:
  std::string name_;
  std::string spec_;
  YAML::Node config_;
  http::HttpConfig http_config_;
  http::HttpShared* shared_ = nullptr;
  PythonShared* python_ = nullptr;
  PyObject* plugin_ = nullptr;
  PyObject* on_request_ = nullptr;
  int index_ = -1;
  int serialize_ = -1;
  bool last_ = false;  // the last plugin dispatches to a python lane
  http::RouteTable* routes_ = nullptr;
  http::Dispatch* dispatch_ = nullptr;
  PyThreadState* saved_ = nullptr;
  Counter answered_, passed_, errors_, shed_;
  Counter gil_wait_ns_;  // time spent waiting to take the GIL (the price of a plugin thread)
};

}  // namespace metronome::py
