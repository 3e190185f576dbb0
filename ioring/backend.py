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
    """The process's io_uring ProbeResult, probing (in a child) the first time."""
    global _probe_result
    if _probe_result is None:
        from ringtail.ioring.probe import probe_uring
        _probe_result = probe_uring(directory if directory is not None
                                    else tempfile.gettempdir())
    return _probe_result


def resolve_io(io: str, directory: str | os.PathLike | None = None):
    """The backend `io` means here, as ("uring" | "threads", ProbeResult | None).

    `threads` probes nothing. `auto` and `uring` use the process's probe (run
    on a temporary file in `directory` the first time); a failed probe gives,
    for `auto`, the thread backend and one log line with the cause and the
    fix (once per process), for `uring`, BackendUnavailableError with the cause.

    Raises:
        BackendUnavailableError: `io="uring"` and the probe failed.
        ValueError: `io` is not one of IO_CHOICES.
    """
    global _fallback_logged
    if io not in IO_CHOICES:
        raise ValueError(f"io={io!r} is not one of {', '.join(IO_CHOICES)}")
    if io == "threads":
        return "threads", None
    probe = probe_once(directory)
    if probe.ok:
        return "uring", probe
    if io == "uring":
        raise BackendUnavailableError(f"--io uring: io_uring unavailable ({probe.message})")
    if not _fallback_logged:
        log.warning("%s", probe.fallback_line())
        _fallback_logged = True
    return "threads", probe


_fallback_logged = False


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
    from ringtail.ioring.threads import ThreadBackend
    chosen = resolve_io(io, probe_directory)[0] if io == "auto" else io
    if chosen not in IO_CHOICES:
        raise ValueError(f"io={io!r} is not one of {', '.join(IO_CHOICES)}")
    if chosen == "threads":
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
