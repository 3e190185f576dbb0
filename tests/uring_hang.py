"""A test-only io_uring binding whose set-up never returns (a hung binding).

The probe child (ioring/probe.py) imports it through
RINGTAIL_TEST_URING_BINDING; the parent must give up after its timeout and
kill the child. Never used by the daemon.
"""

import threading


class UringBackend:
    def __init__(self) -> None:
        threading.Event().wait()  # blocks forever, as a wedged native call would
