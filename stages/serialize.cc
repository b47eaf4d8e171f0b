// serialize: writes the status line and header fields (Server, Date, Content-Type, the framing,
// Connection, and the response's own fields), then the body.
// A body up to kInlineBodyMax is copied after the fields so that send writes one buffer; a
// larger one is sent in place as a second iovec. HEAD keeps the GET route's framing fields and
// drops the body; 1xx, 204 and 304 carry neither body nor Content-Length.
//
// A streamed response (stream.h) is its head here, then each BodyChunk as it comes, framed by
// the response's Framing: chunked (size line, data, CRLF; the last chunk "0" CRLF CRLF), or the
// bytes as they are (a declared Content-Length, or HTTP/1.0 until the connection closes).
#include "stages/serialize.h"

#include <strings.h>

#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/registry.h"
#include "runtime/strings.h"

namespace metronome::http {
namespace {

// Bodies up to this size are copied next to the header fields (one contiguous send); larger
// ones are written from where they are.
constexpr size_t kInlineBodyMax = 16 * 1024;

// Field names are tokens; values must not hold CR, LF or NUL (response splitting).
bool SafeField(const std::string& name, const std::string& value) {
  if (name.empty()) return false;
  for (char c : name) {
    if (c <= ' ' || c == ':' || c == 127) return false;
  }
  for (char c : value) {
    if (c == '\r' || c == '\n' || c == '\0') return false;
  }
  return true;
}

}  // namespace

absl::Status SerializeStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  (void)entry;
  GetHttpShared(env, root, &config_);
  server_field_ = absl::StrCat("Server: ", config_.server_name, "\r\n");
  RefreshDate();
  return absl::OkStatus();
}

void SerializeStage::RefreshDate() {
  time_t now = time(nullptr);
  if (now == date_second_) return;
  date_second_ = now;
  tm t;
  gmtime_r(&now, &t);
  char buf[64];
  size_t n = strftime(buf, sizeof buf, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &t);
  date_field_.assign(buf, n);
}

void SerializeStage::Process(std::span<Item* const> batch, Outbox& out) {
  RefreshDate();
  for (Item* it : batch) {
    auto* item = static_cast<HttpItem*>(it);
    if (item->kind == Kind::kChunk) {
      SerializeChunk(static_cast<BodyChunk*>(item));
    } else {
      auto* r = static_cast<Request*>(item);
      assert(r->kind == Kind::kRequest && r->responded);
      Serialize(r);
    }
    out.Emit(item);
  }
}

void SerializeStage::Serialize(Request* r) {
  Response& resp = r->resp;
  assert(resp.stream_source == nullptr && "a Python iterator left the python stage");
  const bool keep_alive = r->head.keep_alive && !resp.close && !draining_;
  resp.close = !keep_alive;
  std::string& w = r->wire;
  w.clear();
  absl::StrAppend(&w, "HTTP/1.1 ", resp.status, " ", ReasonPhrase(resp.status), "\r\n");
  w += server_field_;
  w += date_field_;
  const bool no_body = StatusHasNoBody(resp.status);
  if (!no_body) {
    if (!resp.content_type.empty()) {
      if (resp.content_type.find_first_of("\r\n") == std::string_view::npos && resp.content_type.find('\0') == std::string_view::npos) {
        absl::StrAppend(&w, "Content-Type: ", Sv(resp.content_type), "\r\n");
      } else {
        dropped_headers_.Add();
        LOG_RATE_LIMITED(LogLevel::kWarn, "dropped a Content-Type with CR/LF (response splitting attempt?)");
      }
    }
    switch (resp.framing) {
      case Framing::kLength:
        absl::StrAppend(&w, "Content-Length: ", resp.body.size(), "\r\n");
        break;
      case Framing::kChunked:
        assert(r->head.version_minor >= 1 && "HTTP/1.0 has no chunked framing");
        w += "Transfer-Encoding: chunked\r\n";
        chunked_.Add();
        break;
      case Framing::kDeclared:
        absl::StrAppend(&w, "Content-Length: ", resp.declared_length, "\r\n");
        break;
      case Framing::kUntilClose:
        assert(resp.close && "a body that ends at the close needs the close");
        break;
    }
    if (resp.streaming()) streams_.Add();
  }
  if (!keep_alive) {
    w += "Connection: close\r\n";
  } else if (r->head.version_minor == 0) {
    w += "Connection: keep-alive\r\n";
  }
  if (!resp.allow.empty()) absl::StrAppend(&w, "Allow: ", Sv(resp.allow), "\r\n");
  if (resp.retry_after_s > 0) absl::StrAppend(&w, "Retry-After: ", resp.retry_after_s, "\r\n");
  if (!resp.budget.empty()) absl::StrAppend(&w, "Metronome-Budget: ", Sv(resp.budget), "\r\n");
  bool app_set_id = false;
  if (config_.echo_request_id && r->request_id_len > 0) {
    for (const ExtraHeader& h : resp.headers) {
      app_set_id |= h.name.size() == config_.request_id_header.size() &&
                    strncasecmp(h.name.data(), config_.request_id_header.data(), h.name.size()) == 0;
    }
    if (!app_set_id) absl::StrAppend(&w, config_.request_id_header, ": ", Sv(r->id()), "\r\n");
  }
  for (const ExtraHeader& h : resp.headers) {
    // The conversion from Python already refused these (fields.h); checked again from this side
    // because a split response is the one thing serialize must never write.
    if (!SafeField(h.name, h.value)) {
      dropped_headers_.Add();
      LOG_RATE_LIMITED(LogLevel::kWarn, "dropped response field '%s': invalid name or CR/LF in value", h.name.c_str());
      continue;
    }
    absl::StrAppend(&w, h.name, ": ", h.value, "\r\n");
  }
  w += "\r\n";
  r->iov_count = 1;
  r->part = 0;
  // A streamed body follows in chunks, unless this response has none on the wire.
  r->ends = !resp.streaming() || !ResponseHasBody(*r);
  if (ResponseHasBody(*r) && !resp.streaming()) {
    if (resp.body.size() <= kInlineBodyMax) {
      w.append(resp.body.data(), resp.body.size());
    } else {
      large_bodies_.Add();
      r->iov[1].iov_base = const_cast<char*>(resp.body.data());
      r->iov[1].iov_len = resp.body.size();
      r->iov_count = 2;
    }
  }
  r->iov[0].iov_base = w.data();
  r->iov[0].iov_len = w.size();
  r->wire_total = w.size() + (r->iov_count == 2 ? r->iov[1].iov_len : 0);
}

void SerializeStage::SerializeChunk(BodyChunk* c) {
  std::string& w = c->wire;
  w.clear();
  if (c->framing == Framing::kChunked) {
    if (!c->data.empty()) {
      absl::StrAppend(&w, absl::Hex(c->data.size()), "\r\n");
      w += c->data;
      w += "\r\n";
    }
    if (c->last) w += "0\r\n\r\n";
  } else {
    w += c->data;
  }
  chunks_.Add();
  c->ends = c->terminal();
  c->iov[0].iov_base = w.data();
  c->iov[0].iov_len = w.size();
  c->iov_count = w.empty() ? 0 : 1;
  c->wire_total = w.size();
}

void SerializeStage::ExtraStats(StatsSink& sink) const {
  sink.Value("chunked_responses_total", static_cast<double>(chunked_.Get()));
  sink.Value("streamed_responses_total", static_cast<double>(streams_.Get()));
  sink.Value("body_chunks_total", static_cast<double>(chunks_.Get()));
  sink.Value("large_bodies_total", static_cast<double>(large_bodies_.Get()));
  sink.Value("dropped_response_fields_total", static_cast<double>(dropped_headers_.Get()));
}

METRONOME_REGISTER_STAGE("serialize", SerializeStage);

}  // namespace metronome::http
