#include "runtime/config.h"

#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/units.h"

namespace metronome {

absl::StatusOr<std::unique_ptr<ConfigDoc>> ConfigDoc::FromString(absl::string_view text,
                                                                  std::string source) {
  try {
    YAML::Node root = YAML::Load(std::string(text));
    if (root.IsNull() || !root.IsDefined()) root = YAML::Node(YAML::NodeType::Map);
    if (!root.IsMap()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", root.Mark().line + 1,
                       ": the top level must be a mapping of sections (server:, pipeline:, ...)"));
    }
    return std::unique_ptr<ConfigDoc>(new ConfigDoc(std::move(root), std::move(source)));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", e.mark.line + 1, ":", e.mark.column + 1, ": YAML syntax: ", e.msg));
  }
}

absl::StatusOr<std::unique_ptr<ConfigDoc>> ConfigDoc::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read config file '", path,
                                            "': ", std::strerror(errno)));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  return FromString(buffer.str(), path);
}

ConfigNode ConfigDoc::Root() { return ConfigNode(this, root_, ""); }

void ConfigDoc::AddError(const YAML::Node& node, absl::string_view path, absl::string_view message) {
  AddErrorAtLine(node.IsDefined() ? node.Mark().line + 1 : 0, path, message);
}

void ConfigDoc::AddErrorAtLine(int line, absl::string_view path, absl::string_view message) {
  std::string where = line > 0 ? absl::StrCat(source_, ":", line) : source_;
  std::string error = path.empty() ? absl::StrCat(where, ": ", message) : absl::StrCat(where, ": ", path, ": ", message);
  // Sections read by several stages (server:, limits:) would report the same error each time.
  for (const std::string& e : errors_) {
    if (e == error) return;
  }
  errors_.push_back(std::move(error));
}

void ConfigDoc::CheckUnknownKeys() { CheckNode(root_, ""); }

void ConfigDoc::CheckNode(const YAML::Node& node, const std::string& path) {
  if (opaque_.count(Key(node))) return;
  if (node.IsMap()) {
    std::set<std::string> seen;
    for (const auto& kv : node) {
      std::string key = kv.first.Scalar();
      std::string child = path.empty() ? key : absl::StrCat(path, ".", key);
      if (!seen.insert(key).second) {
        AddErrorAtLine(kv.first.Mark().line + 1, child, "duplicate key");
        continue;
      }
      if (!consumed_.count({Key(node), key})) {
        AddErrorAtLine(kv.first.Mark().line + 1, child,
                       "unknown key (misspelt, or not valid in this section)");
        continue;
      }
      CheckNode(kv.second, child);
    }
  } else if (node.IsSequence()) {
    for (size_t i = 0; i < node.size(); ++i) CheckNode(node[i], absl::StrCat(path, "[", i, "]"));
  }
}

absl::Status ConfigDoc::status() const {
  if (errors_.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrJoin(errors_, "\n"));
}

bool ConfigNode::Has(absl::string_view key) const {
  if (!node_.IsMap()) return false;
  const YAML::Node& n = node_;
  return n[std::string(key)].IsDefined();
}

int ConfigNode::LineOf(absl::string_view key) const {
  if (!Has(key)) return line();
  const YAML::Node& n = node_;
  return n[std::string(key)].Mark().line + 1;
}

std::string ConfigNode::Where(absl::string_view key) const {
  return absl::StrCat(doc_->source(), ":", LineOf(key), ": ", Child(key));
}

std::string ConfigNode::Child(absl::string_view key) const {
  return path_.empty() ? std::string(key) : absl::StrCat(path_, ".", key);
}

YAML::Node ConfigNode::Lookup(absl::string_view key) {
  if (!node_.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
  doc_->consumed_.insert({ConfigDoc::Key(node_), std::string(key)});
  const YAML::Node& n = node_;
  YAML::Node value = n[std::string(key)];
  // yaml-cpp hands back an invalid "zombie" node for a missing key, and most calls on it throw;
  // an explicit Undefined node is safe to pass around.
  if (!value.IsDefined()) return YAML::Node(YAML::NodeType::Undefined);
  return value;
}

void ConfigNode::Consume(absl::string_view key) { Lookup(key); }

void ConfigNode::Error(absl::string_view key, absl::string_view message) {
  YAML::Node value(YAML::NodeType::Undefined);
  if (node_.IsMap()) {
    YAML::Node found = static_cast<const YAML::Node&>(node_)[std::string(key)];
    if (found.IsDefined()) value.reset(found);  // never assign to a zombie node: it throws
  }
  doc_->AddError(value.IsDefined() ? value : node_, Child(key), message);
}

std::optional<std::string> ConfigNode::Scalar(absl::string_view key, bool has_default, bool* absent,
                                              absl::string_view expected) {
  *absent = false;
  if (IsDefined() && !node_.IsMap()) {
    Error(absl::StrCat("expected a mapping with key '", key, "'"));
    return std::nullopt;
  }
  YAML::Node value = Lookup(key);
  if (!value.IsDefined() || value.IsNull()) {
    if (has_default) {
      *absent = true;
      return std::nullopt;
    }
    doc_->AddError(node_, Child(key), absl::StrCat("missing required key; expected ", expected));
    return std::nullopt;
  }
  if (!value.IsScalar()) {
    doc_->AddError(value, Child(key), absl::StrCat("expected ", expected));
    return std::nullopt;
  }
  return value.Scalar();
}

int64_t ConfigNode::DurationNs(absl::string_view key, std::optional<int64_t> def, int64_t min_ns,
                               int64_t max_ns) {
  static constexpr absl::string_view kForm = "a duration with a unit, like 200us, 1ms or 5s";
  bool absent;
  auto text = Scalar(key, def.has_value(), &absent, kForm);
  if (absent) return *def;
  if (!text) return def.value_or(0);
  auto ns = ParseDurationNs(*text);
  if (!ns) {
    Error(key, absl::StrCat("expected ", kForm, ", got '", *text, "'"));
    return def.value_or(0);
  }
  if (*ns < min_ns || *ns > max_ns) {
    Error(key, absl::StrCat("out of range: ", *text, " is not within [", FormatDuration(min_ns),
                            ", ", max_ns == INT64_MAX ? "∞" : FormatDuration(max_ns), "]"));
    return def.value_or(min_ns);
  }
  return *ns;
}

uint64_t ConfigNode::SizeBytes(absl::string_view key, std::optional<uint64_t> def,
                               uint64_t min_bytes, uint64_t max_bytes) {
  static constexpr absl::string_view kForm = "a size with a unit, like 512B, 64KiB or 1MiB";
  bool absent;
  auto text = Scalar(key, def.has_value(), &absent, kForm);
  if (absent) return *def;
  if (!text) return def.value_or(0);
  auto bytes = ParseSizeBytes(*text);
  if (!bytes) {
    Error(key, absl::StrCat("expected ", kForm, ", got '", *text, "'"));
    return def.value_or(0);
  }
  if (*bytes < min_bytes || *bytes > max_bytes) {
    Error(key, absl::StrCat("out of range: ", *text, " is not within [", FormatSize(min_bytes), ", ",
                            max_bytes == UINT64_MAX ? "∞" : FormatSize(max_bytes), "]"));
    return def.value_or(min_bytes);
  }
  return *bytes;
}

int64_t ConfigNode::Int(absl::string_view key, std::optional<int64_t> def, int64_t min,
                        int64_t max) {
  std::string form = absl::StrCat("an integer in [", min, ", ", max, "]");
  bool absent;
  auto text = Scalar(key, def.has_value(), &absent, form);
  if (absent) return *def;
  if (!text) return def.value_or(min);
  int64_t value;
  if (!absl::SimpleAtoi(*text, &value) || text->find_first_of("+ ") != std::string::npos) {
    Error(key, absl::StrCat("expected ", form, ", got '", *text, "'"));
    return def.value_or(min);
  }
  if (value < min || value > max) {
    Error(key, absl::StrCat("out of range: expected ", form, ", got ", value));
    return def.value_or(min);
  }
  return value;
}

bool ConfigNode::Bool(absl::string_view key, std::optional<bool> def) {
  bool absent;
  auto text = Scalar(key, def.has_value(), &absent, "true or false");
  if (absent) return *def;
  if (!text) return def.value_or(false);
  if (*text == "true") return true;
  if (*text == "false") return false;
  Error(key, absl::StrCat("expected true or false, got '", *text, "'"));
  return def.value_or(false);
}

std::string ConfigNode::String(absl::string_view key, std::optional<std::string> def) {
  bool absent;
  auto text = Scalar(key, def.has_value(), &absent, "a string");
  if (absent) return *def;
  if (!text) return def.value_or("");
  return *text;
}

std::string ConfigNode::Enum(absl::string_view key, std::optional<std::string> def,
                             const std::vector<std::string>& choices) {
  std::string form = absl::StrCat("one of: ", absl::StrJoin(choices, ", "));
  bool absent;
  auto text = Scalar(key, def.has_value(), &absent, form);
  if (absent) return *def;
  if (!text) return def.value_or(choices.front());
  for (const auto& c : choices) {
    if (c == *text) return c;
  }
  Error(key, absl::StrCat("expected ", form, "; got '", *text, "'"));
  return def.value_or(choices.front());
}

std::vector<std::string> ConfigNode::StringList(absl::string_view key) {
  std::vector<std::string> out;
  YAML::Node value = Lookup(key);
  if (!value.IsDefined() || value.IsNull()) return out;
  if (value.IsScalar()) return {value.Scalar()};
  if (!value.IsSequence()) {
    doc_->AddError(value, Child(key), "expected a list of strings");
    return out;
  }
  for (const auto& v : value) {
    if (!v.IsScalar()) {
      doc_->AddError(v, Child(key), "expected a list of strings");
      continue;
    }
    out.push_back(v.Scalar());
  }
  return out;
}

ConfigNode ConfigNode::Map(absl::string_view key) {
  YAML::Node value = Lookup(key);
  if (value.IsDefined() && !value.IsNull() && !value.IsMap()) {
    doc_->AddError(value, Child(key), "expected a mapping (key: value pairs)");
    return ConfigNode(doc_, YAML::Node(YAML::NodeType::Undefined), Child(key));
  }
  return ConfigNode(doc_, value, Child(key));
}

std::vector<ConfigNode> ConfigNode::Seq(absl::string_view key) {
  std::vector<ConfigNode> out;
  YAML::Node value = Lookup(key);
  if (!value.IsDefined() || value.IsNull()) return out;
  if (!value.IsSequence()) {
    doc_->AddError(value, Child(key), "expected a list (- item)");
    return out;
  }
  for (size_t i = 0; i < value.size(); ++i) {
    out.emplace_back(doc_, value[i], absl::StrCat(Child(key), "[", i, "]"));
  }
  return out;
}

YAML::Node ConfigNode::Opaque(absl::string_view key) {
  YAML::Node value = Lookup(key);
  if (value.IsDefined()) doc_->opaque_.insert(ConfigDoc::Key(value));
  return value;
}

}  // namespace metronome
