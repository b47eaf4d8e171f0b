// The header fields of a response that an application supplies, checked once where a Python
// result becomes a native Response (every interface goes through it), so that serialize only
// ever writes fields that are valid and that the server does not own.
//
// The server owns the framing (Content-Length, Transfer-Encoding), Date and Server, and the
// connection's persistence: a second framing field from the app would let a proxy in front read
// a different message boundary than the client (request smuggling, response desync).
//   - a name that is not a token, or a value with CR, LF, NUL or another control character:
//     invalid (the response becomes a 500 and the cause goes to the log);
//   - Content-Length: not a field but a declaration. For a body known whole it must equal the
//     body's size (else invalid); for a streamed body it becomes the framing (exactly that many
//     bytes must follow, else the connection is closed);
//   - Transfer-Encoding, Date, Server, Keep-Alive: dropped (counted), the server writes its own;
//   - Connection: "close" among its tokens ends the connection after this response; the field
//     itself is dropped (the server writes Connection: close once).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string_view>

namespace metronome::http {

enum class FieldRule : uint8_t { kKeep, kInvalid, kContentLength, kServerOwned, kConnection };

struct FieldCheck {
  FieldRule rule = FieldRule::kKeep;
  int64_t content_length = -1;  // kContentLength
  bool close = false;           // kConnection: the value holds the token "close"
  const char* why = "";         // kInvalid: what is wrong
};

FieldCheck CheckResponseField(std::string_view name, std::string_view value);

// RFC 9110 5.6.2 token characters.
bool IsTokenChar(char c);

}  // namespace metronome::http
