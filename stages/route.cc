// route: finds each request's route. A native route (configured in `routes:`) is answered here
// and goes straight to serialize; a Python route goes on to the python stage (through any
// plugins). No match is 404, a path without the method is 405 with Allow, a method the server
// does not know is 501. HEAD is served by the GET route (serialize drops the body).
//
// Overload: when the queue toward the python lane a request would go to is congested
// (runtime/outbox.h), that request is answered 503 with Retry-After here instead of waiting
// behind a full queue; a full queue would stall route, and with it every other request.
#include "stages/route.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/registry.h"
#include "stages/http/path.h"

namespace metronome::http {

absl::Status RouteStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  (void)entry;
  GetHttpShared(env, root, &config_);
  table_ = &env.Shared<RouteTable>("routes");
  dispatch_ = &env.Shared<Dispatch>("dispatch");
  serialize_ = env.FindStageOfType("serialize");
  if (serialize_ < 0) return absl::InvalidArgumentError("route needs a serialize stage after it");
  if (serialize_ > env.stage_index() + 1) next_ = env.stage_index() + 1;
  // Dispatch to a python lane here unless a plugin comes first (the last plugin does it then).
  dispatch_here_ = env.FindStageOfType("python-plugin") < 0;
  for (ConfigNode r : root.Seq("routes")) {
    RouteTarget t;
    t.pattern = r.String("path", std::nullopt);
    std::string method = r.Enum("method", "GET", {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"});
    t.method = MethodFromName(method);
    t.status = static_cast<int>(r.Int("status", 200, 100, 599));
    t.content_type = r.String("content_type", t.content_type);
    t.body = r.String("body", "");
    t.declared_at = r.Where("path");
    Router check;  // validates the pattern now, so that `metronome check` reports it
    if (absl::Status s = check.Add(t.pattern, t.method, 0); !s.ok() && !t.pattern.empty()) {
      r.Error("path", s.message());
    }
    native_.push_back(std::move(t));
  }
  return absl::OkStatus();
}

namespace {

// Why `t` cannot join the router, which refused it with `s`; `existing` is the target already
// there for a duplicate (else null). Names both sides: config lines and handler functions.
std::string RouteError(const RouteTarget& t, const RouteTarget* existing, const absl::Status& s) {
  const std::string route = absl::StrCat(MethodName(t.method), " ", t.pattern);
  if (existing == nullptr) {
    return absl::StrCat(t.declared_at, ": ", t.function.empty() ? "" : absl::StrCat(t.function, ": "), s.message());
  }
  const RouteTarget& e = *existing;
  if (t.kind != e.kind) {
    const RouteTarget& native = t.kind == RouteTarget::Kind::kNative ? t : e;
    const RouteTarget& python = t.kind == RouteTarget::Kind::kNative ? e : t;
    return absl::StrCat(native.declared_at, ": native route ", route, " clashes with a Python route: ", python.function,
                        " (", python.declared_at, ")");
  }
  if (t.kind == RouteTarget::Kind::kPython) {
    return absl::StrCat(t.declared_at, ": route ", route, " is defined twice in the app: by ", e.function, " and by ",
                        t.function);
  }
  return absl::StrCat(t.declared_at, ": route ", route, " is defined twice: also at ", e.declared_at);
}

}  // namespace

// The python stages publish their routes in Start (or CheckDeep, under check); the router is
// built here, once every stage started, whatever order the lanes started in. Every route that
// cannot join is reported, not only the first.
absl::Status RouteStage::Connect(StageEnv& env) {
  (void)env;
  for (RouteTarget& t : native_) table_->targets.push_back(t);
  std::vector<std::string> errors;
  for (size_t i = 0; i < table_->targets.size(); ++i) {
    const RouteTarget& t = table_->targets[i];
    if (t.kind == RouteTarget::Kind::kPython && t.handler < 0) continue;  // the error target: not a path
    if (t.kind == RouteTarget::Kind::kPython && next_ < 0) {
      errors.push_back(absl::StrCat(t.declared_at, ": route ", MethodName(t.method), " ", t.pattern,
                                    " needs a python stage after route"));
      continue;
    }
    int existing = -1;
    if (absl::Status s = router_.Add(t.pattern, t.method, static_cast<int>(i), &existing); !s.ok()) {
      errors.push_back(RouteError(t, existing >= 0 ? &table_->targets[static_cast<size_t>(existing)] : nullptr, s));
    }
  }
  if (!errors.empty()) return absl::FailedPreconditionError(absl::StrJoin(errors, "\n"));
  LOG_INFO("route table: %zu routes", router_.size());
  return absl::OkStatus();
}

// A decoded ".." must never reach a handler through a parameter (path.h, point 3).
bool RouteStage::ParamsAreSafe(const Request& r) {
  for (int i = 0; i < r.num_params; ++i) {
    if (r.params[i].type != ParamType::kInt && !ParamValueIsSafe(r.params[i].value)) return false;
  }
  return true;
}

void RouteStage::Answer(Request* r, int status, absl::string_view detail, Outbox& out) {
  std::string_view allow = r->resp.allow;
  if (status == 204) {
    r->resp.Reset();
    r->resp.status = 204;
  } else {
    r->resp.SetError(status, std::string_view(detail.data(), detail.size()));
  }
  r->resp.allow = allow;
  if (dispatch_->error_target >= 0 && status != 501) {
    // The app sees it: its plugins (a CORS preflight) and its error handlers (@app.error),
    // with this answer prepared; the python stage keeps it unless they change it.
    r->route = dispatch_->error_target;
    const RouteTarget& t = table_->targets[static_cast<size_t>(r->route)];
    if (!dispatch_->Forward(r, t, dispatch_here_, next_, serialize_, config_.retry_after_s, out)) shed_.Add();
    return;
  }
  AnswerEarly(r, serialize_, out);
}

void RouteStage::Process(std::span<Item* const> batch, Outbox& out) {
  for (Item* it : batch) {
    auto* r = static_cast<Request*>(it);
    assert(r->kind == Kind::kRequest);
    if (r->responded) {
      out.EmitTo(serialize_, r);
      continue;
    }
    const RequestHead& h = r->head;
    if (h.method_id == Method::kOther) {
      not_implemented_.Add();
      Answer(r, 501, "method not implemented", out);
      continue;
    }
    std::string_view allow;
    int target = -1;
    switch (router_.Find(h.method_id, r->path, r, &allow, &target)) {
      case Router::Result::kNotFound:
        not_found_.Add();
        Answer(r, 404, "not found", out);
        continue;
      case Router::Result::kMethodNotAllowed:
        r->resp.allow = allow;
        if (h.method_id == Method::kOptions) {
          options_.Add();
          Answer(r, 204, "", out);  // what the resource allows (a CORS plugin may add to it)
          continue;
        }
        not_allowed_.Add();
        Answer(r, 405, "method not allowed", out);
        continue;
      case Router::Result::kFound:
        break;
    }
    if (!ParamsAreSafe(*r)) {
      unsafe_params_.Add();
      Answer(r, 400, "a path parameter decodes to a dot segment or a NUL", out);
      continue;
    }
    found_.Add();
    r->route = target;
    const RouteTarget& t = table_->targets[static_cast<size_t>(target)];
    if (t.kind == RouteTarget::Kind::kNative) {
      r->resp.status = t.status;
      r->resp.content_type = t.content_type;
      r->resp.body = t.body;
      AnswerEarly(r, serialize_, out);
      continue;
    }
    // The lane this request would go to decides: a full heavy lane sheds heavy work only.
    if (!dispatch_->Forward(r, t, dispatch_here_, next_, serialize_, config_.retry_after_s, out)) shed_.Add();
  }
}

void RouteStage::ExtraStats(StatsSink& sink) const {
  sink.Value("routed_total", static_cast<double>(found_.Get()));
  sink.Value("not_found_total", static_cast<double>(not_found_.Get()));
  sink.Value("method_not_allowed_total", static_cast<double>(not_allowed_.Get()));
  sink.Value("not_implemented_total", static_cast<double>(not_implemented_.Get()));
  sink.Value("shed_total", static_cast<double>(shed_.Get()));
  sink.Value("unsafe_params_total", static_cast<double>(unsafe_params_.Get()));
  sink.Value("options_answered_total", static_cast<double>(options_.Get()));
}

METRONOME_REGISTER_STAGE("route", RouteStage);

}  // namespace metronome::http
