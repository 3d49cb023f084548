"""Anonymous memory, the real cost of a step (mapped file pages are not).

``RssAnon`` from ``/proc/self/status`` counts heap and numpy buffers but not memory-mapped weight
files, which the kernel can drop at will; plain RSS would count those and mislead. Peaks are
found by sampling in a background thread, since the kernel keeps no resettable anon high-water mark.
"""

from __future__ import annotations

import re
import threading
import types
from pathlib import Path

__all__ = ["PeakAnonSampler", "rss_anon_bytes"]

_STATUS = Path("/proc/self/status")


def rss_anon_bytes(status: Path = _STATUS) -> int:
    """Current anonymous resident memory of the process (0 where /proc is unavailable)."""
    try:
        match = re.search(r"^RssAnon:\s+(\d+) kB", status.read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


class PeakAnonSampler:
    """Context manager that records the peak of :func:`rss_anon_bytes` while it is open."""

    def __init__(self, interval_s: float = 0.005, status: Path = _STATUS) -> None:
        self.interval_s = interval_s
        self.status = status
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, rss_anon_bytes(self.status))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakAnonSampler:
        self.start_bytes = self.peak_bytes = rss_anon_bytes(self.status)
        self._thread = threading.Thread(target=self._run, name="peak-anon-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
