"""Suite-wide: the io_uring tests run on io_uring, or the run says why not.

At session start the io_uring probe (ioring/probe.py, the daemon's own calls
in a child process) runs once. Where it passes, every test parametrised with
`io="uring"` and every daemon started with `io=auto` really uses io_uring:
a silent fallback fails those tests (they assert the backend). Where it fails
and nobody said so, the whole run fails at once with the probe's reason. A
machine whose kernel refuses io_uring may opt out with
RINGTAIL_TEST_WITHOUT_URING=<reason>: the io_uring variants are then skipped,
and the reason and the probe's verdict are printed in the run's header.
"""

from __future__ import annotations

import os
import tempfile

import pytest

OPT_OUT_ENVIRONMENT_VARIABLE = "RINGTAIL_TEST_WITHOUT_URING"

_probe = None


def uring_probe():
    """This machine's io_uring ProbeResult (probed once per test session)."""
    global _probe
    if _probe is None:
        from ringtail.ioring.probe import probe_uring
        with tempfile.TemporaryDirectory(prefix="ringtail-test-probe-") as directory:
            _probe = probe_uring(directory)
    return _probe


def uring_opt_out() -> str | None:
    return os.environ.get(OPT_OUT_ENVIRONMENT_VARIABLE) or None


def pytest_sessionstart(session):
    probe = uring_probe()
    if not probe.ok and uring_opt_out() is None:
        raise pytest.UsageError(
            f"io_uring does not work on this machine ({probe.message}), so the io_uring "
            f"tests cannot run on io_uring. Fix that, or opt out explicitly: "
            f"{OPT_OUT_ENVIRONMENT_VARIABLE}='<why>' make test")


def pytest_report_header(config):
    probe = uring_probe()
    if probe.ok:
        return f"io_uring: works here (probe {probe.duration_s:.2f} s); io_uring tests run on it"
    return (f"io_uring: UNAVAILABLE ({probe.message}); io_uring variants skipped because "
            f"{OPT_OUT_ENVIRONMENT_VARIABLE}={uring_opt_out()!r}")


def require_uring() -> None:
    """Skip (opted out, reason printed) or go on; never fall back silently."""
    if not uring_probe().ok:
        pytest.skip(f"io_uring unavailable here ({uring_probe().message}); "
                    f"{OPT_OUT_ENVIRONMENT_VARIABLE}={uring_opt_out()!r}")
