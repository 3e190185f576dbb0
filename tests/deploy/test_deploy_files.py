"""deploy/: the example config, the systemd unit and the Kubernetes sidecar Pod.

These files are documentation that machines read, so they are checked the way
their readers use them: the example TOML through `load_config` (and through a
real `ringtail serve`), the unit through `systemd-analyze verify` where it is
installed, the Pod through a YAML parser and the wiring the sidecar depends on
(one emptyDir holding the socket, mounted by both containers).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest

from ringtail.service.config import ServeConfig, load_config
from ringtail.service.gate import CONNECTION_COUNT_MAX
from ringtail.service.server import SHUTDOWN_GRACE_S
from ringtail.service.tenants import TENANT_COUNT_MAX, TenantSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
EXAMPLE_CONFIG = DEPLOY / "ringtail.example.toml"
UNIT_FILE = DEPLOY / "ringtail.service"
POD_FILE = DEPLOY / "kubernetes" / "sidecar-pod.yaml"

# Where the systemd unit puts things (and the example config points).
STATE_DIRECTORY = "/var/lib/ringtail"
RUNTIME_DIRECTORY = "/run/ringtail"
UNIT_EXEC_START = "/usr/local/bin/ringtail serve --config /etc/ringtail/ringtail.toml"
IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")

# Seconds for `systemd-analyze verify`, and for a daemon to get ready or to
# stop (generous for a slow CI box; nothing here sleeps to synchronise).
SYSTEMD_ANALYZE_TIMEOUT_S = 60.0
DAEMON_READY_TIMEOUT_S = 30.0
DAEMON_EXIT_TIMEOUT_S = SHUTDOWN_GRACE_S + 15.0


# -- the example config -----------------------------------------------------------

DEFAULT_LINE = re.compile(r"^# Default: (?P<value>.+)$")
KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_]+)\s*=")


def documented_top_level_defaults(text: str) -> dict[str, object]:
    """{key: value of its "# Default:" line} for every top-level key of the file.

    A key's "# Default:" line is the last one in the comment block right above
    it. Fails the test when a top-level key has none.
    """
    documented = {}
    pending = None
    for line in text.splitlines():
        if line.startswith("["):
            break  # tables ([tenants.N]) follow; their keys inherit, see the file
        if match := DEFAULT_LINE.match(line):
            pending = tomllib.loads(f"value = {match['value']}")["value"]
        elif match := KEY_LINE.match(line):
            key = match["key"]
            assert pending is not None, f"{EXAMPLE_CONFIG.name}: key {key} has no '# Default:' line"
            documented[key] = pending
            pending = None
        elif not line.startswith("#"):
            pending = None  # a blank line ends a comment block
    return documented


def as_config_value(key: str, value: object) -> object:
    if isinstance(value, list):
        return tuple(value)  # lists (admins) are kept as tuples
    return int(value, 8) if key == "socket_mode" else value


def test_example_config_loads_with_the_daemons_loader():
    config = load_config(os.fspath(EXAMPLE_CONFIG))
    assert config.data_dir == STATE_DIRECTORY
    assert config.socket == posixpath.join(RUNTIME_DIRECTORY, "ringtail.sock")
    assert config.tenants == {
        7: TenantSettings(capacity=1_048_576, sync="batch"),
        # Tenant 8 sets only sync: capacity is inherited from the top level.
        8: TenantSettings(capacity=config.capacity, sync="none"),
    }


def test_example_config_documents_every_setting_with_its_real_default():
    text = EXAMPLE_CONFIG.read_text()
    documented = documented_top_level_defaults(text)
    settings = {field.name for field in dataclasses.fields(ServeConfig)} - {"tenants", "ship"}
    assert set(documented) == settings, "every ServeConfig setting is in the example, once"
    assert "[tenants." in text
    defaults = ServeConfig()
    for key, value in documented.items():
        assert as_config_value(key, value) == getattr(defaults, key), (
            f"{EXAMPLE_CONFIG.name}: '# Default:' of {key} says {value!r}; "
            f"service/config.py says {getattr(defaults, key)!r}")


def test_example_config_values_left_at_their_default_load_as_the_default():
    text = EXAMPLE_CONFIG.read_text()
    documented = documented_top_level_defaults(text)
    written = tomllib.loads(text)
    config, defaults = load_config(os.fspath(EXAMPLE_CONFIG)), ServeConfig()
    kept = [key for key, value in documented.items() if written[key] == value]
    changed = sorted(set(documented) - set(kept))
    assert changed == ["data_dir", "socket"], "only the paths differ (set for systemd)"
    for key in kept:
        assert getattr(config, key) == getattr(defaults, key)


def test_example_config_runs_a_daemon(tmp_path):
    """`ringtail serve --config` with the example (paths overridden by flags):
    the listed tenants' rings are created at start with their own settings."""
    short = tempfile.mkdtemp(prefix="rt-deploy-")  # sun_path is 108 bytes at most
    try:
        data_dir, socket_path = os.path.join(short, "data"), os.path.join(short, "rt.sock")
        command = [ringtail_executable(), "serve", "--config", os.fspath(EXAMPLE_CONFIG),
                   "--data-dir", data_dir, "--socket", socket_path, "--io", "threads"]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        stderr = StderrLines(process)
        try:
            stderr.wait_for("ringtail ready", DAEMON_READY_TIMEOUT_S)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=DAEMON_EXIT_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log = stderr.all_text()
        assert process.returncode == 0, log
        assert re.search(r"tenant 7: created empty ring .*; io=threads sync=batch "
                         r"capacity=1048576", log), log
        assert re.search(r"tenant 8: created empty ring .*; io=threads sync=none "
                         r"capacity=65536", log), log
        assert sorted(os.listdir(data_dir)) == ["tenant-7.ring", "tenant-8.ring"]
        assert not os.path.exists(socket_path), "an orderly stop removes the socket"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def ringtail_executable() -> str:
    beside_python = Path(sys.executable).parent / "ringtail"
    if beside_python.exists():
        return os.fspath(beside_python)
    return os.fspath(REPO_ROOT / ".venv" / "bin" / "ringtail")


class StderrLines:
    """A process's stderr, read line by line on a thread.

    (A text pipe reads ahead, so waiting on its fd could miss lines already
    buffered; the thread hands each line over a queue instead.)
    """

    def __init__(self, process: subprocess.Popen):
        self._queue: queue.Queue[str] = queue.Queue()
        self._seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(process.stderr,),
                                        name="daemon-stderr", daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")  # end of file

    def wait_for(self, marker: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} within {timeout_s} s: {''.join(self._seen)}"
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line, f"the process exited before {marker!r}: {''.join(self._seen)}"
            self._seen.append(line)
            if marker in line:
                return

    def all_text(self) -> str:
        """Everything it wrote (call after the process exited)."""
        self._thread.join(timeout=DAEMON_EXIT_TIMEOUT_S)
        while not self._queue.empty():
            self._seen.append(self._queue.get())
        return "".join(self._seen)


# -- the systemd unit -------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; comments and blank lines dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "no continuation lines: keep each setting on one line"
        if line.startswith("["):
            section = line.strip("[]")
            sections[section] = collections.defaultdict(list)
            continue
        assert section is not None, f"setting outside a section: {line}"
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT_FILE.read_text())


def one(unit, key: str, section: str = "Service") -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


def test_unit_is_type_notify_and_runs_the_configured_daemon(unit):
    assert one(unit, "Type") == "notify"
    assert one(unit, "ExecStart") == UNIT_EXEC_START
    assert one(unit, "User") == one(unit, "Group") == "ringtail"
    assert one(unit, "RuntimeDirectory") == "ringtail"
    assert one(unit, "StateDirectory") == "ringtail"
    assert one(unit, "Restart") == "on-failure"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_paths_match_the_example_config(unit):
    config = load_config(os.fspath(EXAMPLE_CONFIG))
    assert config.data_dir == posixpath.join("/var/lib", one(unit, "StateDirectory"))
    assert posixpath.dirname(config.socket) == posixpath.join("/run", one(unit, "RuntimeDirectory"))


def test_unit_stop_timeout_covers_the_shutdown_grace(unit):
    assert one(unit, "KillSignal") == "SIGTERM"
    assert one(unit, "TimeoutStopSec") == "45"
    assert int(one(unit, "TimeoutStopSec")) > SHUTDOWN_GRACE_S


def test_unit_file_descriptor_limit_covers_tenants_and_connections(unit):
    # Per tenant: ring file, io_uring instance, eventfd; one per connection.
    assert int(one(unit, "LimitNOFILE")) >= 3 * TENANT_COUNT_MAX + CONNECTION_COUNT_MAX + 64


def test_unit_hardening(unit):
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    read_write = one(unit, "ReadWritePaths").split()
    assert STATE_DIRECTORY in read_write and RUNTIME_DIRECTORY in read_write
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute"):
        assert one(unit, key) == "yes", key
    assert one(unit, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_unit_system_call_filter_keeps_io_uring(unit):
    filters = unit["Service"]["SystemCallFilter"]
    allowed = [word for value in filters if not value.startswith("~") for word in value.split()]
    denied = [word for value in filters if value.startswith("~") for word in value[1:].split()]
    assert "@system-service" in allowed
    assert all(name in allowed for name in IO_URING_SYSCALLS)
    assert not any(name in denied for name in IO_URING_SYSCALLS)
    # A refused call must fail (so the io_uring probe falls back), not kill.
    assert one(unit, "SystemCallErrorNumber") == "EPERM"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.fail("systemd-analyze is not installed, so the unit file cannot be verified; "
                    "run `make test` (its test-tools step installs Debian's systemd package, "
                    "which ships it) or `apt-get install systemd`")
    text = UNIT_FILE.read_text()
    executable = UNIT_EXEC_START.split()[0]
    if not os.path.exists(executable):
        # verify checks that ExecStart's program exists; ringtail is not
        # installed at its production path on a test machine.
        text = text.replace(executable, sys.executable)
    unit_path = tmp_path / UNIT_FILE.name
    unit_path.write_text(text)
    result = subprocess.run([systemd_analyze, "verify", os.fspath(unit_path)],
                            capture_output=True, text=True, timeout=SYSTEMD_ANALYZE_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 even for unknown keys or unparsable values, which it
    # reports (and ignores) on lines naming the unit file.
    problems = [line for line in output.splitlines() if UNIT_FILE.name in line]
    assert problems == [], output


# -- the Kubernetes sidecar Pod ---------------------------------------------------


@pytest.fixture(scope="module")
def documents():
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed, so the Pod cannot be checked; it is in the "
                    "`test` extra: `pip install -e '.[test]'` (which `make test` runs)")
    with open(POD_FILE) as file:
        return list(yaml.safe_load_all(file))


@pytest.fixture(scope="module")
def pod(documents):
    pods = [document for document in documents if document["kind"] == "Pod"]
    assert len(pods) == 1
    return pods[0]


def container(pod, name: str, where: str) -> dict:
    found = [c for c in pod["spec"].get(where, []) if c["name"] == name]
    assert len(found) == 1, f"one {where} entry named {name}"
    return found[0]


def flag_value(container_spec: dict, flag: str) -> str:
    argv = container_spec.get("command", []) + container_spec.get("args", [])
    assert argv.count(flag) == 1, f"{flag} appears once in {argv}"
    return argv[argv.index(flag) + 1]


def mount_paths(container_spec: dict) -> dict[str, str]:
    return {mount["name"]: mount["mountPath"] for mount in container_spec["volumeMounts"]}


def test_pod_document_kinds(documents):
    assert [document["kind"] for document in documents] == [
        "ConfigMap", "PersistentVolumeClaim", "Pod"]


def test_sidecar_is_a_native_sidecar(pod):
    sidecar = container(pod, "ringtail", "initContainers")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] + sidecar["args"][:1] == ["ringtail", "serve"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE_S


def test_worker_and_sidecar_share_the_socket_directory(pod):
    sidecar = container(pod, "ringtail", "initContainers")
    worker = container(pod, "worker", "containers")
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    socket_path = flag_value(sidecar, "--socket")
    socket_dir = posixpath.dirname(socket_path)
    assert socket_dir == RUNTIME_DIRECTORY
    shared = [name for name, path in mount_paths(sidecar).items()
              if path == socket_dir and mount_paths(worker).get(name) == socket_dir]
    assert len(shared) == 1, "worker and sidecar mount one volume at the socket directory"
    assert "emptyDir" in volumes[shared[0]]
    environment = {variable["name"]: variable["value"] for variable in worker["env"]}
    assert environment["RINGTAIL_SOCKET"] == socket_path
    for probe in ("startupProbe", "livenessProbe"):
        assert socket_path in " ".join(sidecar[probe]["exec"]["command"])


def test_sidecar_keeps_its_rings_on_a_persistent_volume(pod, documents):
    sidecar = container(pod, "ringtail", "initContainers")
    data_dir = flag_value(sidecar, "--data-dir")
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    names = [name for name, path in mount_paths(sidecar).items() if path == data_dir]
    assert len(names) == 1
    claim = volumes[names[0]]["persistentVolumeClaim"]["claimName"]
    claims = [d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"]
    assert claim in claims
    worker = container(pod, "worker", "containers")
    assert names[0] not in mount_paths(worker), "only ringtail touches its ring files"


def test_sidecar_config_map_loads_with_the_daemons_loader(pod, documents, tmp_path):
    sidecar = container(pod, "ringtail", "initContainers")
    config_path = flag_value(sidecar, "--config")
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    names = [name for name, path in mount_paths(sidecar).items()
             if path == posixpath.dirname(config_path)]
    assert len(names) == 1
    config_map_name = volumes[names[0]]["configMap"]["name"]
    config_map = next(d for d in documents
                      if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map_name)
    path = tmp_path / posixpath.basename(config_path)
    path.write_text(config_map["data"][posixpath.basename(config_path)])
    config = load_config(os.fspath(path))
    # The worker runs as another user: the socket must admit the pod's group.
    assert config.socket_mode == 0o660
    assert pod["spec"]["securityContext"]["fsGroup"] == \
        pod["spec"]["securityContext"]["runAsGroup"]


def test_containers_run_unprivileged_with_read_only_roots(pod):
    for name, where in (("ringtail", "initContainers"), ("worker", "containers")):
        context = container(pod, name, where)["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
