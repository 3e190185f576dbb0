"""ringtail: a durable, multi-tenant ring log sidecar for GPU workers.

The public API, under the project's own name::

    from ringtail import Publisher, Client, SlotRecord, RingtailError

Names are imported on first use (PEP 562), so `from ringtail import
Publisher` in a GPU worker loads neither Trio nor the daemon.

Installed, the storage engine, the daemon and the benchmarks are the
subpackages `ringtail.ioring`, `ringtail.service` and `ringtail.bench`; no
generic top-level name (`service`, `ioring`) is installed. The repository keeps
them at its top level (ioring/, service/, bench/): imported from a checkout
(PYTHONPATH=the repository, as the io_uring probe child and the qemu checks
do), this package adds the checkout's root to its path so the same names
resolve there too.
"""

from __future__ import annotations

import importlib
import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_checkout, "pyproject.toml"))
        and _os.path.isdir(_os.path.join(_checkout, "ioring"))
        and _checkout not in __path__):
    __path__.append(_checkout)

# name -> the module that defines it
_EXPORTS = {
    "Publisher": "ringtail.service.publisher",
    "Client": "ringtail.service.client",
    "RingtailError": "ringtail.service.errors",
    "ErrorCode": "ringtail.service.protocol",
    "SlotRecord": "ringtail.ioring.record",
    "RECORD_DTYPE": "ringtail.ioring.record",
    "RECORD_SIZE_BYTES": "ringtail.ioring.record",
    "RECORD_MAGIC": "ringtail.ioring.record",
    "failure_class_name": "ringtail.ioring.record",
    "check_records": "ringtail.ioring.record",
    "open_ring": "ringtail.ioring.ring",
    "RingFile": "ringtail.ioring.ring",
    "RingError": "ringtail.ioring.errors",
    "RingCorruptError": "ringtail.ioring.errors",
    "import_vrrl": "ringtail.ioring.vrrl",
    "export_vrrl": "ringtail.ioring.vrrl",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ringtail' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
