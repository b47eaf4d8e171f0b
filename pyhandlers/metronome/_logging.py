"""Python's logging into the server's log: same lines, same timestamps, the level from
python.log_level. Installed by the server after it imported the app, and only when the app did
not configure logging itself (its own root handlers are kept as they are)."""

import logging

try:
    import _metronome as _native
except ImportError:  # outside the server
    _native = None


class ServerLogHandler(logging.Handler):
    """Each record becomes one line of the server's log ("logger: message")."""

    def emit(self, record):
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the app
            self.handleError(record)
            return
        if _native is not None:
            _native.log(record.levelno, f"{record.name}: {message}")


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def install(level_name):
    """Returns what it did, for the start-up log."""
    root = logging.getLogger()
    level = _LEVELS[level_name]
    if any(not isinstance(h, ServerLogHandler) for h in root.handlers):
        return "kept the app's own logging configuration"
    if not any(isinstance(h, ServerLogHandler) for h in root.handlers):
        handler = ServerLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    return f"Python logging goes to the server log at level {level_name}"
