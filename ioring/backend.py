"""Choosing the I/O backend: `open_backend()`, and the once-per-process io_uring probe.

Kept apart from ioring/chain.py (the chain types every backend uses) so that
the backends import chain.py and this module imports the backends, with no
cycle between them.
"""

from __future__ import annotations

import logging
import os
import tempfile

from ringtail.ioring.chain import IO_CHOICES, Backend
from ringtail.ioring.errors import BackendUnavailableError

log = logging.getLogger("ioring")

# The io_uring probe's verdict, once per process (ioring/probe.py): later rings
# reuse it, so the probe runs and a fallback is logged once per process.
_probe_result = None


def probe_once(directory: str | os.PathLike | None = None):
    """The process's io_uring ProbeResult, probing (in a child) the first time.

    Logs the fallback line once, on the first probe that fails.
    """
    global _probe_result
    if _probe_result is None:
        from ringtail.ioring.probe import probe_uring
        result = probe_uring(directory if directory is not None else tempfile.gettempdir())
        if not result.ok:
            log.warning("%s", result.fallback_line())
        _probe_result = result
    return _probe_result


def open_backend(io: str, probe_directory: str | os.PathLike | None = None) -> Backend:
    """Choose the backend once.

    `threads` is the thread backend. `uring` sets up io_uring in this process
    (the caller chose it; the daemon probes first, see service/server.py).
    `auto` probes io_uring once per process in a child (ioring/probe.py, on a
    temporary file in `probe_directory`), then uses it, or falls back to the
    thread backend with one log line naming the cause.

    Raises:
        BackendUnavailableError: `io="uring"` and io_uring is refused here.
        ValueError: `io` is not one of IO_CHOICES.
    """
    if io not in IO_CHOICES:
        raise ValueError(f"io={io!r} is not one of {', '.join(IO_CHOICES)}")
    from ringtail.ioring.threads import ThreadBackend
    if io == "threads" or (io == "auto" and not probe_once(probe_directory).ok):
        return ThreadBackend()
    from ringtail.ioring import uring
    try:
        return uring.UringBackend()
    except BackendUnavailableError as error:
        if io == "uring":
            raise
        # The probe passed, yet this ring cannot have one (file descriptors,
        # memory): this ring alone uses threads.
        log.warning("io_uring unavailable for this ring (%s); %s", error,
                    "using the thread backend")
        return ThreadBackend()
