"""An app that imports a module that does not exist."""
import metronome
import metronome_check_no_such_module  # noqa: F401

app = metronome.App()
