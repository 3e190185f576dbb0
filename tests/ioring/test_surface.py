"""The engine's public surface and its import boundaries (STYLE §1, §3).

`ringtail.ioring` is checked in a fresh interpreter started at the
repository root, which shows what importing the engine pulls in, untouched by
the test run.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parents[2]
ENGINE_DIRECTORY = REPOSITORY_ROOT / "ioring"

PUBLIC_NAMES = sorted([
    "BATCH_RECORD_COUNT_MAX", "CAPACITY_RECORD_COUNT_MAX", "CAPACITY_RECORD_COUNT_MIN",
    "CHUNK_RECORD_COUNT", "FAILURE_CLASS_NAMES", "FDATASYNC", "FORMAT_VERSION",
    "IO_CHOICES", "RECORD_DTYPE", "RECORD_MAGIC", "RECORD_SIZE_BYTES", "SYNC_CHOICES",
    "BackendUnavailableError", "BatchTicket", "ChainResult", "Layout", "RecoveryReport",
    "RingBusyError", "RingClosedError", "RingCorruptError", "RingError",
    "RingFailedError", "RingFile", "RingFormatError", "RingLockedError", "RingRangeError",
    "RingStatistics",
    "SlotRecord", "VrrlFormatError", "Write", "failure_class_name", "open_backend",
    "open_ring",
])

PROBE = """
import importlib, json, pkgutil, sys
import ringtail.ioring as ioring
names = sorted(ioring.__all__)
missing = [name for name in names if not hasattr(ioring, name)]
errors = {name: [base.__name__ for base in getattr(ioring, name).__mro__[1:]]
          for name in names if isinstance(getattr(ioring, name), type)
          and issubclass(getattr(ioring, name), Exception)}
for module in pkgutil.iter_modules(ioring.__path__):
    importlib.import_module("ringtail.ioring." + module.name)
print(json.dumps({"file": ioring.__file__, "all": names, "missing": missing,
                  "errors": errors, "modules": sorted(sys.modules)}))
"""


def _probe() -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPOSITORY_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_public_surface_is_exactly_the_pinned_names():
    probe = _probe()
    assert probe["file"] == str(ENGINE_DIRECTORY / "__init__.py")
    assert probe["all"] == PUBLIC_NAMES
    assert probe["missing"] == []


def test_error_tree_is_shallow_under_ring_error():
    errors = _probe()["errors"]
    parents = {name: bases[0] for name, bases in errors.items()}
    assert parents == {
        "RingError": "Exception",
        "RingFormatError": "RingError", "RingCorruptError": "RingError",
        "RingClosedError": "RingError", "RingFailedError": "RingError",
        "RingBusyError": "RingError", "RingRangeError": "RingError",
        "BackendUnavailableError": "RingError", "VrrlFormatError": "RingFormatError",
        "RingLockedError": "RingFormatError",
    }


def test_importing_every_engine_module_loads_neither_trio_nor_service():
    modules = _probe()["modules"]
    assert "ringtail.ioring.uring" in modules and "ringtail.ioring.vrrl" in modules  # all imported
    pulled_in = [name for name in modules
                 if name.split(".")[0] in ("trio", "service", "pytest_trio")
                 or name.startswith("ringtail.service")]
    assert pulled_in == []


def _imported_top_level_names(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_engine_source_never_imports_trio_or_service():
    sources = sorted(ENGINE_DIRECTORY.glob("*.py"))
    assert len(sources) >= 10
    offenders = {path.name: sorted(name for name in _imported_module_names(path)
                                   if name.split(".")[0] in ("trio", "service")
                                   or name.startswith("ringtail.service"))
                 for path in sources}
    assert {name: found for name, found in offenders.items() if found} == {}


def _imported_module_names(path: pathlib.Path) -> set[str]:
    """Full dotted names a module imports (`from a.b import x` gives a.b and a.b.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_uring_module_imports_the_io_uring_binding():
    importers = sorted(path.name for path in ENGINE_DIRECTORY.glob("*.py")
                       if "ringtail.ioring.uring_abi" in _imported_module_names(path))
    assert importers == ["uring.py"]
    # nor reaches it by name at run time (importlib.import_module, __import__)
    dynamic = re.compile(r"""(import_module|__import__)\(\s*["'](ringtail\.)?(ioring\.)?uring_abi""")
    assert [path.name for path in ENGINE_DIRECTORY.glob("*.py")
            if dynamic.search(path.read_text())] == []


def test_no_native_io_uring_binding_is_imported_or_required():
    """The PyPI liburing wheels died with SIGILL without AVX-512 and have no aarch64 build."""
    for path in ENGINE_DIRECTORY.glob("*.py"):
        assert "liburing" not in _imported_top_level_names(path), path.name
    pyproject = (ENGINE_DIRECTORY.parent / "pyproject.toml").read_text()
    assert "liburing" not in pyproject
