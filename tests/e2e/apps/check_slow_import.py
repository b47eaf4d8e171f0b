"""An app whose import hangs (a backend that never answers, say): check's --timeout stops it."""
import time

import metronome

app = metronome.App()

time.sleep(60)
