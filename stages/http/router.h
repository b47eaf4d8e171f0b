// Method + path -> route, with typed path parameters.
//
// Patterns are '/'-separated segments; a segment is a literal, "{name}" (one segment),
// "{name:int}" (one segment of an optional '-' and digits that fits int64) or "{name:path}"
// (the rest of the path, possibly empty; last segment only). At each segment a literal match
// wins over {int}, {int} over {name}, {name} over {path} (backtracking when a branch fails).
// Matching works on the raw path: parameter values are the raw (percent-encoded) text.
//
// Thread-safety: built once at start; Find is const and may be called from any thread.
#pragma once

#include <array>
#include <functional>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "stages/http/items.h"
#include "stages/http/parser.h"

namespace metronome::http {

inline constexpr int kRouteMethods = static_cast<int>(Method::kOther);  // GET .. CONNECT

class Router {
 public:
  // Adds `pattern` for `method` -> `target`. Fails on a malformed pattern, a duplicate
  // (pattern, method) (AlreadyExists, with the target already there in *existing when given)
  // or a parameter name used twice in one pattern.
  absl::Status Add(std::string_view pattern, Method method, int target, int* existing = nullptr);

  enum class Result { kFound, kNotFound, kMethodNotAllowed };
  // Finds the target for method+path; fills r->params (views into `path`) on kFound, and
  // *allow (e.g. "GET, HEAD, POST") on kMethodNotAllowed. HEAD falls back to GET.
  Result Find(Method method, std::string_view path, Request* r, std::string_view* allow,
              int* target) const;

  size_t size() const { return routes_; }
  // The parameter names of a pattern, in order ("/u/{id:int}/{rest:path}" -> id, rest).
  static std::vector<std::string> ParamNames(std::string_view pattern);

 private:
  struct Node {
    absl::flat_hash_map<std::string, int> literal;
    int int_child = -1, str_child = -1, path_child = -1;
    std::string int_name, str_name, path_name;
    std::array<int, kRouteMethods> targets;
    std::string allow;
    bool any = false;
    Node() { targets.fill(-1); }
  };
  bool Match(int node, std::string_view rest, Request* r, int depth, int* out_node) const;
  void RecomputeAllow(Node& n);

  std::vector<Node> nodes_{Node()};
  size_t routes_ = 0;
};

// What a route leads to.
struct RouteTarget {
  enum class Kind : uint8_t { kNative, kPython };
  Kind kind = Kind::kNative;
  std::string pattern;
  Method method = Method::kGet;
  // kNative: a configured static response.
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  // kPython: the python stage's handler index and the route's budgets (0: the defaults).
  int handler = -1;
  int64_t cpu_budget_ns = 0;
  uint64_t memory_budget_bytes = 0;
  bool heavy = false;
  // Where the route was declared, for start-up errors: the config's line ("file:12:
  // routes[0].path" for a native route, "file:3: python.app" for the app's) and, for a Python
  // route, its function ("handler `user` at app.py:12").
  std::string declared_at;
  std::string function;
};

// Every route's target, native and Python (StageEnv::Shared<RouteTable>("routes")): the python
// stage adds its app's routes in its Start, the route stage adds the config's native routes and
// builds the Router in its Connect. Read-only once the pipeline runs.
struct RouteTable {
  std::vector<RouteTarget> targets;
};

const char* MethodName(Method m);
// GET -> Method::kGet etc.; kOther for anything else.
Method MethodFromName(std::string_view name);

}  // namespace metronome::http
