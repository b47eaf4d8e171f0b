// The YAML configuration, read into typed values with errors that name the file, the line, the
// key and the expected form.
//
// Usage: a reader asks a ConfigNode for each key it understands (Duration, Size, Int, ...). Every
// key asked for is marked as consumed; after all readers ran, ConfigDoc::CheckUnknownKeys()
// reports every key nobody asked for, with its line. Errors accumulate in the document instead of
// stopping at the first one, so `metronome check` lists them all.
//
// Thread-safety: a ConfigDoc and its nodes are used by one thread at start-up only.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "yaml-cpp/yaml.h"

namespace metronome {

class ConfigNode;

class ConfigDoc {
 public:
  // Parses `text`; `source` names it in messages (usually the file path).
  static absl::StatusOr<std::unique_ptr<ConfigDoc>> FromString(absl::string_view text,
                                                                std::string source);
  static absl::StatusOr<std::unique_ptr<ConfigDoc>> FromFile(const std::string& path);

  ConfigNode Root();
  YAML::Node& raw_root() { return root_; }
  const std::string& source() const { return source_; }

  // Records an error at `node` (its line) for the dotted `path`.
  void AddError(const YAML::Node& node, absl::string_view path, absl::string_view message);
  void AddErrorAtLine(int line, absl::string_view path, absl::string_view message);
  // Walks the document and records an error for every mapping key no reader consumed. Subtrees
  // handed out with ConfigNode::Opaque are skipped.
  void CheckUnknownKeys();
  // OK, or InvalidArgument carrying every recorded error, one per line.
  absl::Status status() const;
  const std::vector<std::string>& errors() const { return errors_; }

 private:
  friend class ConfigNode;
  ConfigDoc(YAML::Node root, std::string source) : root_(std::move(root)), source_(std::move(source)) {}
  void CheckNode(const YAML::Node& node, const std::string& path);
  static int64_t Key(const YAML::Node& node) { return node.Mark().pos; }

  YAML::Node root_;
  std::string source_;
  std::set<std::pair<int64_t, std::string>> consumed_;  // (mapping position, key)
  std::set<int64_t> opaque_;                              // positions of opaque subtrees
  std::vector<std::string> errors_;
};

// A view of one YAML node with typed accessors. A missing optional key yields its default; a
// missing required key (no default given) or a malformed value records an error and yields a
// neutral value, so the caller can go on and report the next problem too.
class ConfigNode {
 public:
  ConfigNode(ConfigDoc* doc, YAML::Node node, std::string path)
      : doc_(doc), node_(std::move(node)), path_(std::move(path)) {}

  bool IsDefined() const { return node_.IsDefined() && !node_.IsNull(); }
  bool IsMap() const { return node_.IsMap(); }
  bool Has(absl::string_view key) const;
  const std::string& path() const { return path_; }
  int line() const { return node_.Mark().line + 1; }
  // The line of `key`'s value (this node's line when it is absent).
  int LineOf(absl::string_view key) const;
  // "file:line: path.key", for messages about the value found later (e.g. at start-up).
  std::string Where(absl::string_view key) const;
  ConfigDoc* doc() const { return doc_; }
  const YAML::Node& raw() const { return node_; }

  // Durations in nanoseconds ("250us"); sizes in bytes ("64KiB"); both refuse bare numbers.
  int64_t DurationNs(absl::string_view key, std::optional<int64_t> def, int64_t min_ns = 0,
                     int64_t max_ns = INT64_MAX);
  uint64_t SizeBytes(absl::string_view key, std::optional<uint64_t> def, uint64_t min_bytes = 0,
                     uint64_t max_bytes = UINT64_MAX);
  int64_t Int(absl::string_view key, std::optional<int64_t> def, int64_t min, int64_t max);
  bool Bool(absl::string_view key, std::optional<bool> def);
  std::string String(absl::string_view key, std::optional<std::string> def);
  // One of `choices`; the error lists them.
  std::string Enum(absl::string_view key, std::optional<std::string> def,
                   const std::vector<std::string>& choices);
  std::vector<std::string> StringList(absl::string_view key);
  // A nested mapping (an empty, undefined node when absent).
  ConfigNode Map(absl::string_view key);
  // The elements of a sequence (empty when absent).
  std::vector<ConfigNode> Seq(absl::string_view key);
  // A subtree passed through as-is (e.g. a Python plugin's own settings): never checked for
  // unknown keys.
  YAML::Node Opaque(absl::string_view key);
  // Exempts this whole node from the unknown-key check.
  void MarkOpaque() {
    if (node_.IsDefined()) doc_->opaque_.insert(ConfigDoc::Key(node_));
  }
  // Marks `key` consumed without reading it (a reader that validates it elsewhere).
  void Consume(absl::string_view key);

  void Error(absl::string_view key, absl::string_view message);
  void Error(absl::string_view message) { doc_->AddError(node_, path_, message); }
  // The status of the whole document so far.
  absl::Status status() const { return doc_->status(); }

 private:
  // The value node for `key`, marking it consumed; undefined when absent.
  YAML::Node Lookup(absl::string_view key);
  std::string Child(absl::string_view key) const;
  // The scalar at `key`, or nullopt after recording an error (missing required key, or not a
  // scalar); `absent` is set when the key is missing and a default applies.
  std::optional<std::string> Scalar(absl::string_view key, bool has_default, bool* absent,
                                    absl::string_view expected);

  ConfigDoc* doc_;
  YAML::Node node_;
  std::string path_;
};

}  // namespace metronome
