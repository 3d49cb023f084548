"""Progress on stderr: byte bars, a spinner for long silent steps, and other libraries kept quiet.

Every progress bar in ``surgery`` comes from :func:`bar`, so one place decides when a bar is drawn:
only when progress is asked for *and* stderr is a terminal. tqdm redraws with ``\\r``, which turns
a redirected log into one long line of noise; its own ``disable=None`` switch (off on a non-TTY)
is what we pass, rather than testing ``isatty`` ourselves.

:func:`spinner` covers steps that report nothing for a long time (``torch.onnx.export`` traces a
model for about a minute): on a terminal a spinner with the seconds elapsed, redrawn in place;
elsewhere the message once, as a plain stage line.

:func:`silence_transformers` turns off transformers' own tqdm bars ("Loading weights" in
``from_pretrained``) through its documented switch,
``transformers.utils.logging.disable_progress_bar``: our stage lines already say what is loading.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import tqdm

__all__ = ["bar", "silence_transformers", "spinner"]

_FRAMES = "|/-\\"
_INTERVAL_S = 0.2


def bar(*, total: int, desc: str, enabled: bool = True) -> tqdm.tqdm[Any]:
    """A byte progress bar on stderr, drawn only when ``enabled`` and stderr is a terminal."""
    return tqdm.tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=None if enabled else True
    )


@contextlib.contextmanager
def spinner(message: str, *, enabled: bool = True) -> Iterator[None]:
    """Show ``message`` on stderr while the block runs.

    On a terminal, a spinner and the seconds elapsed follow the message, redrawn in place, and the
    line is finished with the total time. Elsewhere the message is printed once. Nothing when not
    ``enabled``.
    """
    stream = sys.stderr
    if not enabled:
        yield
        return
    if not stream.isatty():
        print(message, file=stream, flush=True)
        yield
        return
    start = time.perf_counter()
    stop = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle(_FRAMES):
            stream.write(f"\r{message} {frame} {time.perf_counter() - start:.0f}s")
            stream.flush()
            if stop.wait(_INTERVAL_S):
                return

    thread = threading.Thread(target=spin, name="surgery-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        # \x1b[K clears what is left of the longer spinner line.
        stream.write(f"\r{message} ({time.perf_counter() - start:.1f}s)\x1b[K\n")
        stream.flush()


def silence_transformers() -> None:
    """Turn off transformers' (and huggingface_hub's) tqdm bars for the rest of the process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
