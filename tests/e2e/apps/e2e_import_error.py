"""An app module whose import fails: it imports a module that does not exist."""

import metronome
import metronome_e2e_no_such_module  # noqa: F401

app = metronome.App()
