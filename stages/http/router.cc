#include "stages/http/router.h"

#include <cassert>
#include <charconv>

#include "absl/strings/str_cat.h"
#include "runtime/strings.h"

namespace metronome::http {

const char* MethodName(Method m) {
  static const char* kNames[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "?"};
  return kNames[static_cast<int>(m)];
}

Method MethodFromName(std::string_view name) {
  for (int i = 0; i < kRouteMethods; ++i) {
    if (name == MethodName(static_cast<Method>(i))) return static_cast<Method>(i);
  }
  return Method::kOther;
}

absl::Status Router::Add(std::string_view pattern, Method method, int target, int* existing) {
  if (pattern.empty() || pattern[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "' must start with '/'"));
  }
  if (method == Method::kOther) return absl::InvalidArgumentError("unknown method");
  int node = 0;
  std::vector<std::string> names;
  std::string_view rest = pattern.substr(1);
  bool ended = false;
  while (true) {
    size_t slash = rest.find('/');
    std::string_view seg = rest.substr(0, slash);
    if (ended) {
      return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': {name:path} must be the last segment"));
    }
    if (seg.size() >= 2 && seg.front() == '{' && seg.back() == '}') {
      std::string_view inner = seg.substr(1, seg.size() - 2);
      size_t colon = inner.find(':');
      std::string name(inner.substr(0, colon));
      std::string_view type = colon == std::string_view::npos ? "str" : inner.substr(colon + 1);
      if (name.empty() || name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") != std::string::npos ||
          (name[0] >= '0' && name[0] <= '9')) {
        return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': parameter name '", name, "' is not an identifier"));
      }
      for (const auto& n : names) {
        if (n == name) return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': parameter '", name, "' appears twice"));
      }
      names.push_back(name);
      if (names.size() > static_cast<size_t>(kPathParamsMax)) {
        return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': more than ", kPathParamsMax, " parameters"));
      }
      int* child;
      std::string* child_name;
      if (type == "int") {
        child = &nodes_[node].int_child;
        child_name = &nodes_[node].int_name;
      } else if (type == "str") {
        child = &nodes_[node].str_child;
        child_name = &nodes_[node].str_name;
      } else if (type == "path") {
        child = &nodes_[node].path_child;
        child_name = &nodes_[node].path_name;
        ended = true;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': unknown parameter type '", Sv(type), "' (int, str or path)"));
      }
      if (*child >= 0 && *child_name != name) {
        return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': parameter '", name, "' conflicts with '", *child_name, "' at the same position"));
      }
      if (*child < 0) {
        *child = static_cast<int>(nodes_.size());
        *child_name = name;
        nodes_.emplace_back();  // may move nodes_: re-read through indexes only
      }
      node = type == "int" ? nodes_[node].int_child : type == "str" ? nodes_[node].str_child : nodes_[node].path_child;
    } else {
      if (seg.find_first_of("{}") != std::string_view::npos) {
        return absl::InvalidArgumentError(absl::StrCat("route pattern '", Sv(pattern), "': malformed segment '", Sv(seg), "'"));
      }
      auto it = nodes_[node].literal.find(std::string(seg));
      if (it == nodes_[node].literal.end()) {
        int child = static_cast<int>(nodes_.size());
        nodes_[node].literal.emplace(std::string(seg), child);
        nodes_.emplace_back();
        node = child;
      } else {
        node = it->second;
      }
    }
    if (slash == std::string_view::npos) break;
    rest = rest.substr(slash + 1);
  }
  Node& n = nodes_[node];
  int m = static_cast<int>(method);
  if (n.targets[m] >= 0) {
    if (existing != nullptr) *existing = n.targets[m];
    return absl::AlreadyExistsError(absl::StrCat("route ", MethodName(method), " ", Sv(pattern), " is defined twice"));
  }
  n.targets[m] = target;
  n.any = true;
  RecomputeAllow(n);
  ++routes_;
  return absl::OkStatus();
}

void Router::RecomputeAllow(Node& n) {
  n.allow.clear();
  for (int i = 0; i < kRouteMethods; ++i) {
    bool has = n.targets[i] >= 0 || (i == static_cast<int>(Method::kHead) && n.targets[static_cast<int>(Method::kGet)] >= 0);
    if (!has) continue;
    if (!n.allow.empty()) n.allow += ", ";
    n.allow += MethodName(static_cast<Method>(i));
  }
  // OPTIONS is answered for every resource that has a route (route.cc), with or without a
  // handler of its own (RFC 9110 9.3.7).
  if (n.targets[static_cast<int>(Method::kOptions)] < 0) n.allow += ", OPTIONS";
}

bool Router::Match(int node, std::string_view rest, Request* r, int depth, int* out_node) const {
  const Node& n = nodes_[node];
  size_t slash = rest.find('/');
  std::string_view seg = rest.substr(0, slash);
  bool last = slash == std::string_view::npos;
  std::string_view after = last ? std::string_view{} : rest.substr(slash + 1);
  auto descend = [&](int child) {
    if (last) {
      if (nodes_[child].any) {
        *out_node = child;
        return true;
      }
      // "/files/" with a {rest:path} child that may be empty.
      return false;
    }
    return Match(child, after, r, depth + 1, out_node);
  };
  if (!n.literal.empty()) {
    auto it = n.literal.find(absl::string_view(seg.data(), seg.size()));
    if (it != n.literal.end() && descend(it->second)) return true;
  }
  if (n.int_child >= 0 && !seg.empty()) {
    int64_t v;
    const char* b = seg.data();
    const char* e = seg.data() + seg.size();
    auto res = std::from_chars(b, e, v);
    if (res.ec == std::errc() && res.ptr == e && seg[0] != '+') {
      int k = r->num_params++;
      r->params[k] = PathParam{n.int_name, seg, ParamType::kInt, v};
      if (descend(n.int_child)) return true;
      --r->num_params;
    }
  }
  if (n.str_child >= 0 && !seg.empty()) {
    int k = r->num_params++;
    r->params[k] = PathParam{n.str_name, seg, ParamType::kString, 0};
    if (descend(n.str_child)) return true;
    --r->num_params;
  }
  if (n.path_child >= 0 && nodes_[n.path_child].any) {
    int k = r->num_params++;
    r->params[k] = PathParam{n.path_name, rest, ParamType::kPath, 0};
    *out_node = n.path_child;
    return true;
  }
  return false;
}

std::vector<std::string> Router::ParamNames(std::string_view pattern) {
  std::vector<std::string> names;
  for (size_t p = 0; (p = pattern.find('{', p)) != std::string_view::npos; ++p) {
    size_t end = pattern.find_first_of(":}", p);
    names.emplace_back(pattern.substr(p + 1, end - p - 1));
  }
  return names;
}

Router::Result Router::Find(Method method, std::string_view path, Request* r,
                            std::string_view* allow, int* target) const {
  r->num_params = 0;
  if (path.empty() || path[0] != '/') return Result::kNotFound;
  int node = -1;
  if (!Match(0, path.substr(1), r, 0, &node)) {
    r->num_params = 0;
    return Result::kNotFound;
  }
  const Node& n = nodes_[node];
  int m = static_cast<int>(method);
  int t = method == Method::kOther ? -1 : n.targets[m];
  if (t < 0 && method == Method::kHead) t = n.targets[static_cast<int>(Method::kGet)];
  if (t < 0) {
    *allow = n.allow;
    return Result::kMethodNotAllowed;
  }
  // Every parameter of the match is a view into `path`, and its count fits the request.
  assert(r->num_params >= 0 && r->num_params <= kPathParamsMax);
  for (int i = 0; i < r->num_params; ++i) {
    assert(r->params[i].value.data() >= path.data() &&
           r->params[i].value.data() + r->params[i].value.size() <= path.data() + path.size());
  }
  *target = t;
  return Result::kFound;
}

}  // namespace metronome::http
