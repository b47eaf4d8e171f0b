"""`app` is not a metronome.App (no routes()), and metronome is never imported."""


class NotAnApp:
    pass


app = NotAnApp()
