"""Handlers that misbehave on purpose, for tests/e2e/test_budgets.py."""
import asyncio
import time

import metronome

app = metronome.App()


def burn(ms):
    end = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


@app.get("/json")
def json_hello(req):
    return {"message": "Hello, World!"}


@app.get("/hog", heavy=True)
def hog(req):
    burn(int(req.query.get("ms", "100")))
    return "done"


@app.get("/hog-light")
def hog_light(req):
    """A hog on the main lane (not marked heavy)."""
    burn(int(req.query.get("ms", "100")))
    return "done"


@app.get("/swallow-cpu")
def swallow_cpu(req):
    try:
        burn(500)
    except metronome.BudgetExceeded:
        return "I caught it and pretend all is well"
    return "finished"


cleanups = []


@app.get("/cleanup")
def cleanup(req):
    try:
        burn(500)
    finally:
        cleanups.append(time.time())  # finally blocks run when the budget stops a handler


@app.get("/sleep")
def sleep(req):
    """Waits (a slow backend, say) instead of burning CPU: the budget is wall time."""
    try:
        time.sleep(float(req.query.get("s", "2")))
    finally:
        cleanups.append(time.time())
    return "slept"


@app.get("/async-sleep")
async def async_sleep(req):
    """An async handler awaiting a slow backend: the budget ends the wait, `finally` runs."""
    try:
        await asyncio.sleep(float(req.query.get("s", "2")))
    finally:
        cleanups.append(time.time())
    return "slept"


@app.get("/async-hog", heavy=True)
async def async_hog(req):
    burn(int(req.query.get("ms", "1000")))
    return "done"


@app.get("/async-hog-light")
async def async_hog_light(req):
    burn(int(req.query.get("ms", "1000")))
    return "done"


@app.get("/cleanups")
def cleanup_count(req):
    return {"cleanups": len(cleanups)}


@app.get("/alloc")
def alloc(req):
    mb = int(req.query.get("mb", "1"))
    chunks = [bytearray(64 * 1024) for _ in range(mb * 16)]
    return {"allocated_mb": len(chunks) // 16}


@app.get("/swallow-memory")
def swallow_memory(req):
    try:
        hoard = [bytearray(64 * 1024) for _ in range(512 * 16)]
        return {"hoard": len(hoard)}
    except MemoryError:
        return "I caught MemoryError and pretend all is well"


@app.get("/stuck-in-c")
def stuck_in_c(req):
    # One C call: the interpreter checks for interrupts only when it returns.
    return {"sum": sum(range(int(req.query.get("n", "60000000"))))}


@app.get("/budget-20ms", cpu_budget="20ms")
def budget_20ms(req):
    burn(200)
    return "done"


@app.get("/tiny-budget")
def tiny_budget(req):
    """Given 1us by its test (a YAML override, so that other servers keep their watchdog's pace):
    always past its budget, and usually done before the watchdog's next look (>= 100 us)."""
    return {"sum": sum(range(2000))}


@app.get("/budget-yaml")
def budget_yaml(req):
    burn(200)
    return "done"


@app.get("/long-budget", cpu_budget="2s")
def long_budget(req):
    """Runs 1.2 s of Python (wall time, whatever the machine's load), within its own 2 s budget
    and past a 1 s python.budget.hard: legitimately running, never stuck."""
    end = time.monotonic() + 1.2
    n = 0
    while time.monotonic() < end:
        n += 1
    return "done"
