"""
Progress lines for work that may take long: an evaluation of a big model, a calibration, a
compilation. Nothing is printed for work that ends within a few seconds (so short runs print what
the docs show); past that, a line says what is running, how far it is and for how long, and more
lines follow while it runs. A background thread prints them: the work itself is not interrupted.

    with Heartbeat("evaluating 20 batches x 2 splits", total=40) as beat:
        for batch in beat.iter(batches):   # or beat.tick() after each unit of work
            ...
"""

import sys
import threading
import time


class Heartbeat:
    """Prints `what: k/total after N s` once the work has run `after` seconds, then every `every`
    seconds, until the block ends; `enabled=False` keeps it silent (DDP ranks other than 0)."""

    def __init__(self, what, total=None, after=5.0, every=30.0, enabled=True, file=None):
        self.what, self.total, self.after, self.every, self.enabled = what, total, after, every, enabled
        self.file, self.done, self.printed = file, 0, 0
        self._stop, self._thread = threading.Event(), None

    def tick(self, n=1):
        self.done += n

    def iter(self, items):
        for item in items:
            yield item
            self.tick()

    def line(self):
        counted = f" {self.done}/{self.total}" if self.total else ""
        return f"{self.what}:{counted} after {time.perf_counter() - self.start:.0f} s"

    def _run(self):
        wait = self.after
        while not self._stop.wait(wait):
            print(self.line(), file=self.file or sys.stdout, flush=True)
            self.printed += 1
            wait = self.every

    def __enter__(self):
        self.start = time.perf_counter()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def seconds(self):
        return time.perf_counter() - self.start
