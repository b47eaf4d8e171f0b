#include "admin/listener.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "admin/stats.h"
#include "runtime/log.h"
#include "runtime/strings.h"
#include "stages/http/parser.h"

#ifndef METRONOME_ADMIN_PAGE_DIR
#error "METRONOME_ADMIN_PAGE_DIR must name admin/page"
#endif

namespace metronome::admin {
namespace {

const char* ContentType(const std::string& name) {
  if (absl::EndsWith(name, ".html")) return "text/html; charset=utf-8";
  if (absl::EndsWith(name, ".js")) return "text/javascript; charset=utf-8";
  if (absl::EndsWith(name, ".css")) return "text/css; charset=utf-8";
  if (absl::EndsWith(name, ".svg")) return "image/svg+xml";
  if (absl::EndsWith(name, ".png")) return "image/png";
  return "application/octet-stream";
}

std::string Response(int status, const char* reason, const std::string& type, const std::string& body,
                     bool keep_alive, bool head) {
  std::string out = absl::StrCat("HTTP/1.1 ", status, " ", reason, "\r\nServer: metronome-admin\r\nContent-Type: ",
                                 type, "\r\nContent-Length: ", body.size(), "\r\nCache-Control: no-store\r\n",
                                 keep_alive ? "" : "Connection: close\r\n", "\r\n");
  if (!head) out += body;
  return out;
}

bool WriteAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

AdminListener::~AdminListener() {
  Stop();
  if (listen_fd_ >= 0) close(listen_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

absl::Status AdminListener::Configure(ConfigNode root, bool* enabled) {
  ConfigNode admin = root.Map("admin");
  *enabled = admin.IsDefined();
  if (!*enabled) return absl::OkStatus();
  std::string listen = admin.String("listen", "127.0.0.1:9090");
  if (listen.rfind("unix:", 0) == 0) {
    // A worker's admin, for its supervisor only ("unix:@name": an abstract socket).
    unix_path_ = listen.substr(5);
    return absl::OkStatus();
  }
  size_t colon = listen.rfind(':');
  uint32_t port;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) || port > 65535) {
    admin.Error("listen", absl::StrCat("expected HOST:PORT like 127.0.0.1:9090; got '", listen, "'"));
    return absl::OkStatus();
  }
  host_ = listen.substr(0, colon);
  if (host_.size() >= 2 && host_.front() == '[') host_ = host_.substr(1, host_.size() - 2);
  port_ = static_cast<uint16_t>(port);
  return absl::OkStatus();
}

absl::Status AdminListener::Bind() {
  for (const char* name : {"index.html", "app.js", "style.css"}) {
    std::ifstream in(absl::StrCat(METRONOME_ADMIN_PAGE_DIR, "/", name), std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("admin page file missing: ", METRONOME_ADMIN_PAGE_DIR, "/", name));
    std::stringstream ss;
    ss << in.rdbuf();
    files_[absl::StrCat("/", name)] = {ContentType(name), ss.str()};
  }
  files_["/"] = files_["/index.html"];
  if (!unix_path_.empty()) {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    if (unix_path_.size() >= sizeof un.sun_path) return absl::InvalidArgumentError("admin.listen: unix path too long");
    memcpy(un.sun_path, unix_path_.data(), unix_path_.size());
    if (un.sun_path[0] == '@') un.sun_path[0] = '\0';  // abstract: no file to clean up
    listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    const socklen_t ulen = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + unix_path_.size());
    if (listen_fd_ < 0 || bind(listen_fd_, reinterpret_cast<sockaddr*>(&un), ulen) != 0 || listen(listen_fd_, 16) != 0) {
      return absl::UnavailableError(absl::StrCat("admin: cannot listen on unix:", unix_path_, ": ", std::strerror(errno)));
    }
    address_ = absl::StrCat("unix:", unix_path_);
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return absl::OkStatus();
  }
  sockaddr_storage addr{};
  socklen_t len;
  int family;
  if (inet_pton(AF_INET6, host_.c_str(), &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr) == 1) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&addr);
    a->sin6_family = family = AF_INET6;
    a->sin6_port = htons(port_);
    len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&addr);
    if (inet_pton(AF_INET, host_.c_str(), &a->sin_addr) != 1) {
      return absl::InvalidArgumentError(absl::StrCat("admin.listen: '", host_, "' is not an IP address"));
    }
    a->sin_family = family = AF_INET;
    a->sin_port = htons(port_);
    len = sizeof *a;
  }
  listen_fd_ = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(listen_fd_, 64) != 0) {
    return absl::UnavailableError(absl::StrCat("admin: cannot listen on ", host_, ":", port_, ": ", std::strerror(errno),
                                               errno == EADDRINUSE ? " (another process has the port: change admin.listen)" : ""));
  }
  sockaddr_storage bound{};
  socklen_t blen = sizeof bound;
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &blen);
  char host[INET6_ADDRSTRLEN] = "";
  int port = 0;
  if (bound.ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&bound)->sin6_addr, host, sizeof host);
    port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    address_ = absl::StrCat("[", host, "]:", port);
  } else {
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&bound)->sin_addr, host, sizeof host);
    port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    address_ = absl::StrCat(host, ":", port);
  }
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  return absl::OkStatus();
}

void AdminListener::Start(const Pipeline* pipeline, const ConfigDoc* doc) {
  pipeline_ = pipeline;
  doc_ = doc;
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  started_unix_ns_ = static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
  thread_ = std::thread([this] { Loop(); });
  LOG_INFO("admin listening on http://%s (/, /metrics, /stats)", address_.c_str());
}

void AdminListener::Start(Source* source) {
  source_ = source;
  thread_ = std::thread([this] { Loop(); });
  LOG_INFO("admin listening on http://%s (/, /metrics, /stats, /healthz, /readyz)", address_.c_str());
}

void AdminListener::Stop() {
  if (!thread_.joinable()) return;
  stop_.store(true);
  uint64_t one = 1;
  ssize_t n = write(wake_fd_, &one, sizeof one);
  (void)n;
  thread_.join();
}

std::string AdminListener::Respond(absl::string_view method, absl::string_view path, bool keep_alive, bool* close) {
  const bool head = method == "HEAD";
  if (method != "GET" && !head) {
    *close = true;
    return Response(405, "Method Not Allowed", "text/plain", "GET only\n", false, head);
  }
  if (path == "/readyz") {
    const bool ready = source_ != nullptr ? source_->Ready() : pipeline_->running() && !pipeline_->stop_requested();
    return ready ? Response(200, "OK", "text/plain", "ready\n", keep_alive, head)
                 : Response(503, "Service Unavailable", "text/plain", "not ready (starting or draining)\n", keep_alive, head);
  }
  if (source_ != nullptr && (path == "/metrics" || path == "/stats")) {
    if (path == "/metrics") return Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", source_->Metrics(), keep_alive, head);
    return Response(200, "OK", "application/json", source_->Stats(), keep_alive, head);
  }
  if (path == "/metrics" || path == "/stats") {
    if (!pipeline_->running()) return Response(503, "Service Unavailable", "text/plain", "starting\n", keep_alive, head);
    if (path == "/metrics") {
      return Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", RenderMetrics(*pipeline_), keep_alive, head);
    }
    return Response(200, "OK", "application/json", RenderStats(*pipeline_, *doc_, started_unix_ns_), keep_alive, head);
  }
  if (path == "/healthz") return Response(200, "OK", "text/plain", "ok\n", keep_alive, head);
  auto it = files_.find(std::string(path));
  if (it != files_.end()) return Response(200, "OK", it->second.first, it->second.second, keep_alive, head);
  return Response(404, "Not Found", "text/plain", "not found\n", keep_alive, head);
}

void AdminListener::Loop() {
  pthread_setname_np(pthread_self(), "admin");
  struct Conn {
    int fd;
    std::string buf;
    size_t scanned = 0;
  };
  std::vector<Conn> conns;
  http::Limits limits;
  limits.max_header_bytes = kAdminRequestBytesMax;
  limits.max_body_bytes = 0;
  while (!stop_.load()) {
    std::vector<pollfd> fds;
    fds.push_back({wake_fd_, POLLIN, 0});
    fds.push_back({listen_fd_, static_cast<short>(conns.size() < kAdminConnectionsMax ? POLLIN : 0), 0});
    for (const Conn& c : conns) fds.push_back({c.fd, POLLIN, 0});
    if (poll(fds.data(), fds.size(), -1) < 0) continue;
    if (fds[1].revents & POLLIN) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        timeval tv{2, 0};  // a reader that stops reading cannot hold the admin thread longer
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns.push_back({fd, {}, 0});
      }
    }
    std::vector<int> closing;
    for (size_t i = 2; i < fds.size(); ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      Conn& c = conns[i - 2];
      char tmp[4096];
      ssize_t n = recv(c.fd, tmp, sizeof tmp, MSG_DONTWAIT);
      if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        closing.push_back(c.fd);
        continue;
      }
      c.buf.append(tmp, static_cast<size_t>(n));
      while (!c.buf.empty()) {
        http::RequestHead head;
        size_t consumed = 0;
        http::ParseError err;
        http::ParseStatus st = http::ParseRequestHead(c.buf.data(), c.buf.size(), c.scanned, limits, &head, &consumed, &err);
        if (st == http::ParseStatus::kIncomplete) {
          c.scanned = c.buf.size();
          break;
        }
        bool close = false;
        std::string resp;
        if (st == http::ParseStatus::kError || head.body_kind != http::BodyKind::kNone) {
          resp = Response(st == http::ParseStatus::kError ? err.status : 413, "Bad Request", "text/plain",
                          st == http::ParseStatus::kError ? absl::StrCat(err.reason, "\n") : "no bodies here\n", false, false);
          close = true;
        } else {
          resp = Respond(Sv(head.method), Sv(head.path), head.keep_alive, &close);
          close |= !head.keep_alive;
        }
        if (!WriteAll(c.fd, resp) || close) {
          closing.push_back(c.fd);
          break;
        }
        c.buf.erase(0, consumed);
        c.scanned = 0;
      }
    }
    for (int fd : closing) {
      close(fd);
      for (size_t k = 0; k < conns.size(); ++k) {
        if (conns[k].fd == fd) {
          conns.erase(conns.begin() + static_cast<long>(k));
          break;
        }
      }
    }
  }
  for (Conn& c : conns) close(c.fd);
}

}  // namespace metronome::admin
