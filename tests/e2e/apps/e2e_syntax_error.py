"""An app module that cannot be imported: a SyntaxError (tests/e2e/test_python.py)."""

import metronome

app = metronome.App()


def broken(:
    pass
