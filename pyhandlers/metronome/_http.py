"""Responses, errors and the small containers a request hands out."""

from urllib.parse import quote


class HTTPError(Exception):
    """Raise it in a handler (or plugin) to answer with `status`.

    detail: a str (sent as text), a dict or list (sent as JSON) or None (the reason phrase).
    headers: extra response fields, as a dict or (name, value) pairs.
    """

    def __init__(self, status, detail=None, headers=None):
        super().__init__(status, detail)
        self.status = int(status)
        self.detail = detail
        self.headers = headers

    def __str__(self):
        return f"HTTP {self.status}: {self.detail}"


class BudgetExceeded(Exception):
    """Raised inside a handler that ran past its CPU budget (python.budget.cpu, or the route's
    own). Let it propagate: the server answers 503 (Metronome-Budget: cpu) whether or not it is
    caught, and `finally` blocks and context managers run on the way out."""


class Response:
    """A response with full control of status, fields and body.

    body: str, bytes, dict/list (JSON), None, or an iterator of str/bytes (chunked).
    content_type: None picks one from the body's type.
    """

    __slots__ = ("body", "status", "headers", "content_type")

    def __init__(self, body=b"", status=200, headers=None, content_type=None):
        self.body = body
        self.status = int(status)
        if headers is None:
            self.headers = []
        elif isinstance(headers, dict) or hasattr(headers, "items"):
            self.headers = list(headers.items())
        else:
            self.headers = list(headers)
        self.content_type = content_type

    @classmethod
    def json(cls, data, status=200, headers=None):
        return cls(data, status, headers, "application/json")

    @classmethod
    def text(cls, text, status=200, headers=None):
        return cls(str(text), status, headers, "text/plain; charset=utf-8")

    @classmethod
    def html(cls, text, status=200, headers=None):
        return cls(str(text), status, headers, "text/html; charset=utf-8")

    @classmethod
    def redirect(cls, location, status=302, headers=None):
        fields = [("Location", quote(location, safe="/:?&=#%+@,;~!$'()*[]"))]
        if headers:
            fields += list(headers.items()) if hasattr(headers, "items") else list(headers)
        return cls(f"Redirecting to {fields[0][1]}\n", status, fields, "text/plain; charset=utf-8")

    def set_header(self, name, value):
        """Replaces every field called `name` (case-insensitive) with one."""
        low = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != low]
        self.headers.append((name, str(value)))

    def __repr__(self):
        return f"<Response {self.status} {self.content_type or ''}>"


class MultiDict:
    """An ordered multi-valued mapping (query parameters, form fields).

    d[key] is the last value, d.get(key, default), d.getall(key) every value in order."""

    __slots__ = ("_pairs", "_last")

    def __init__(self, pairs=()):
        self._pairs = list(pairs)
        self._last = {}
        for k, v in self._pairs:
            self._last[k] = v

    def __getitem__(self, key):
        return self._last[key]

    def get(self, key, default=None):
        return self._last.get(key, default)

    def getall(self, key):
        return [v for k, v in self._pairs if k == key]

    def __contains__(self, key):
        return key in self._last

    def __iter__(self):
        return iter(self._last)

    def __len__(self):
        return len(self._last)

    def keys(self):
        return self._last.keys()

    def values(self):
        return self._last.values()

    def items(self):
        return self._last.items()

    def multi_items(self):
        return list(self._pairs)

    def __eq__(self, other):
        if isinstance(other, MultiDict):
            return self._pairs == other._pairs
        if isinstance(other, dict):
            return self._last == other
        return NotImplemented

    def __repr__(self):
        return f"MultiDict({self._pairs!r})"


class Headers:
    """Request header fields: case-insensitive, multi-valued, in arrival order.

    h["content-type"], h.get(name, default), h.getall(name); iterating gives lower-case names."""

    __slots__ = ("_pairs", "_map")

    def __init__(self, pairs=()):
        self._pairs = list(pairs)
        self._map = {}
        for k, v in self._pairs:
            low = k.lower()
            if low in self._map:
                # RFC 9110 5.3: repeated fields combine with commas (Set-Cookie aside).
                self._map[low] = self._map[low] + ", " + v
            else:
                self._map[low] = v

    def __getitem__(self, name):
        return self._map[name.lower()]

    def get(self, name, default=None):
        return self._map.get(name.lower(), default)

    def getall(self, name):
        low = name.lower()
        return [v for k, v in self._pairs if k.lower() == low]

    def __contains__(self, name):
        return name.lower() in self._map

    def __iter__(self):
        return iter(self._map)

    def __len__(self):
        return len(self._map)

    def keys(self):
        return self._map.keys()

    def items(self):
        return self._map.items()

    def raw(self):
        return list(self._pairs)

    def __repr__(self):
        return f"Headers({self._pairs!r})"
