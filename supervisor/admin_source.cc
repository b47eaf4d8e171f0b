#include "supervisor/admin_source.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/clock.h"

namespace metronome::supervisor {
namespace {

Family* FamilyFor(const std::string& name, std::vector<std::pair<std::string, Family>>* families) {
  for (auto& f : *families) {
    if (f.first == name) return &f.second;
  }
  families->push_back({name, Family{}});
  return &families->back().second;
}

// The family a sample belongs to: its name, less a histogram's or summary's suffix when the
// family is typed so.
std::string FamilyOfSample(const std::string& sample_name, const std::string& current) {
  if (!current.empty() && sample_name.rfind(current, 0) == 0) {
    std::string rest = sample_name.substr(current.size());
    if (rest.empty() || rest == "_bucket" || rest == "_sum" || rest == "_count") return current;
  }
  return sample_name;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

std::string FetchFromWorker(const std::string& name, const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  if (name.empty() || name.size() >= sizeof un.sun_path) {
    close(fd);
    return "";
  }
  memcpy(un.sun_path, name.data(), name.size());
  if (un.sun_path[0] == '@') un.sun_path[0] = '\0';
  timeval tv{kWorkerScrapeTimeoutMs / 1000, (kWorkerScrapeTimeoutMs % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  const socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
  if (connect(fd, reinterpret_cast<sockaddr*>(&un), len) != 0) {
    close(fd);
    return "";
  }
  std::string req = absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: supervisor\r\nConnection: close\r\n\r\n");
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string resp;
  char buf[65536];
  const int64_t deadline = MonotonicNowNs() + int64_t{kWorkerScrapeTimeoutMs} * 1'000'000;
  ssize_t n;
  while (MonotonicNowNs() < deadline && (n = read(fd, buf, sizeof buf)) > 0) resp.append(buf, static_cast<size_t>(n));
  close(fd);
  size_t body = resp.find("\r\n\r\n");
  if (resp.rfind("HTTP/1.1 200", 0) != 0 || body == std::string::npos) return "";
  return resp.substr(body + 4);
}

void MergeWorkerMetrics(const std::string& text, int worker, std::vector<std::pair<std::string, Family>>* families) {
  std::string current;
  const std::string label = absl::StrCat("worker=\"", worker, "\"");
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty()) continue;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      std::vector<std::string> parts = absl::StrSplit(line.substr(7), absl::MaxSplits(' ', 1));
      if (parts.size() < 2) continue;
      current = parts[0];
      Family* f = FamilyFor(current, families);
      (line[2] == 'H' ? f->help : f->type) = parts[1];
      continue;
    }
    if (line[0] == '#') continue;
    size_t brace = line.find('{'), space = line.find(' ');
    size_t name_end = std::min(brace, space);
    if (name_end == absl::string_view::npos) continue;
    std::string name(line.substr(0, name_end));
    std::string sample = brace != absl::string_view::npos && brace < space
                             ? absl::StrCat(line.substr(0, brace + 1), label, line[brace + 1] == '}' ? "" : ",", line.substr(brace + 1))
                             : absl::StrCat(name, "{", label, "}", line.substr(name_end));
    FamilyFor(FamilyOfSample(name, current), families)->samples.push_back(std::move(sample));
  }
}

std::string RenderFamilies(const std::vector<std::pair<std::string, Family>>& families) {
  std::string out;
  for (const auto& [name, f] : families) {
    if (f.samples.empty()) continue;
    absl::StrAppend(&out, "# HELP ", name, " ", f.help.empty() ? name : f.help, "\n");
    absl::StrAppend(&out, "# TYPE ", name, " ", f.type.empty() ? "untyped" : f.type, "\n");
    for (const auto& s : f.samples) absl::StrAppend(&out, s, "\n");
  }
  return out;
}

std::string WorkersSource::Metrics() {
  std::vector<std::pair<std::string, Family>> families;
  std::vector<WorkerView> workers = table_->Snapshot();
  Family up{"Worker processes by state (supervisor).", "gauge", {}};
  Family restarts{"Times the supervisor replaced a worker that died, per worker slot.", "counter", {}};
  Family requests{"Requests a worker served (its own count, reported to the supervisor).", "counter", {}};
  Family rss{"A worker's resident memory, as the supervisor last heard it.", "gauge", {}};
  Family generation{"The configuration generation a worker runs (it grows with each SIGHUP reload).", "gauge", {}};
  std::map<std::string, int> by_state;
  for (const WorkerView& w : workers) {
    ++by_state[w.state];
    const std::string l = absl::StrCat("{worker=\"", w.index, "\",pid=\"", w.pid, "\"}");
    restarts.samples.push_back(absl::StrCat("metronome_worker_restarts_total", l, " ", w.restarts));
    requests.samples.push_back(absl::StrCat("metronome_worker_requests_total", l, " ", w.requests));
    rss.samples.push_back(absl::StrCat("metronome_worker_rss_bytes", l, " ", w.rss_bytes));
    generation.samples.push_back(absl::StrCat("metronome_worker_generation", l, " ", w.generation));
    if (w.state == "ready" || w.state == "draining") {
      MergeWorkerMetrics(FetchFromWorker(w.admin, "/metrics"), w.index, &families);
    }
  }
  for (const char* s : {"starting", "ready", "draining"}) {
    up.samples.push_back(absl::StrCat("metronome_supervisor_workers{state=\"", s, "\"} ", by_state[s]));
  }
  families.push_back({"metronome_supervisor_workers", up});
  families.push_back({"metronome_worker_restarts_total", restarts});
  families.push_back({"metronome_worker_requests_total", requests});
  families.push_back({"metronome_worker_rss_bytes", rss});
  families.push_back({"metronome_worker_generation", generation});
  return RenderFamilies(families);
}

std::string WorkersSource::Stats() {
  std::vector<WorkerView> workers = table_->Snapshot();
  std::string sup = absl::StrCat("{\"pid\":", getpid(), ",\"draining\":", table_->draining() ? "true" : "false",
                                 ",\"workers\":[");
  std::string first_stats;
  for (size_t i = 0; i < workers.size(); ++i) {
    const WorkerView& w = workers[i];
    std::string stats = w.state == "starting" ? "" : FetchFromWorker(w.admin, "/stats");
    if (first_stats.empty() && w.state == "ready") first_stats = stats;
    absl::StrAppend(&sup, i ? "," : "", "{\"index\":", w.index, ",\"generation\":", w.generation, ",\"pid\":", w.pid,
                    ",\"state\":\"", JsonEscape(w.state), "\",\"requests\":", w.requests, ",\"rss_bytes\":", w.rss_bytes,
                    ",\"restarts\":", w.restarts, ",\"started_unix_ns\":", w.started_unix_ns,
                    ",\"stats\":", stats.empty() ? "null" : stats, "}");
  }
  absl::StrAppend(&sup, "]}");
  // The page and tools read one pipeline's figures at the top level: the first ready worker's,
  // with the supervisor's view beside them.
  if (first_stats.size() > 2 && first_stats[0] == '{') {
    return absl::StrCat("{\"supervisor\":", sup, ",", first_stats.substr(1));
  }
  return absl::StrCat("{\"supervisor\":", sup, "}");
}

bool WorkersSource::Ready() {
  if (table_->draining()) return false;
  for (const WorkerView& w : table_->Snapshot()) {
    if (w.state == "ready") return true;
  }
  return false;
}

}  // namespace metronome::supervisor
