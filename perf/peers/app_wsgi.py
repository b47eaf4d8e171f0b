"""WSGI peer app: the metronome example routes (see app_common.py), no framework.

Run by gunicorn (`app_wsgi:app`) and uWSGI (`--wsgi-file app_wsgi.py`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app_common import handle  # noqa: E402

_REASONS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found",
            405: "405 Method Not Allowed", 500: "500 Internal Server Error"}


def _read_body(environ):
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n >= 0:
            return stream.read(n)
    return stream.read()


def app(environ, start_response):
    status, ctype, body = handle(
        environ["REQUEST_METHOD"],
        environ.get("PATH_INFO") or "/",
        environ.get("QUERY_STRING", ""),
        lambda: _read_body(environ),
    )
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
    start_response(_REASONS.get(status, str(status)), headers)
    return [body]


application = app
