"""What a WSGI app gets from the server beside its environ (PEP 3333)."""

import logging

try:
    import _metronome as _native
except ImportError:  # outside the server
    _native = None


class ErrorStream:
    """wsgi.errors: text written here becomes lines in the server's log (WARN level)."""

    def __init__(self):
        self._buf = ""

    def write(self, s):
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._emit(line)
        return len(s)

    def writelines(self, seq):
        for s in seq:
            self.write(s)

    def flush(self):
        if self._buf:
            self._emit(self._buf)
            self._buf = ""

    def _emit(self, line):
        if _native is not None:
            _native.log(logging.WARNING, "wsgi.errors: " + line)


class FileWrapper:
    """wsgi.file_wrapper(filelike, block_size): the file in blocks; close() closes it."""

    def __init__(self, filelike, block_size=64 * 1024):
        self.filelike = filelike
        self.block_size = block_size
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.block_size)
        if data:
            return data
        raise StopIteration
