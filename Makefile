# ringtail — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test-tools test soak bench check-aarch64 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m ringtail.service.demo

# tests/ioring/test_cpu_baseline.py runs the daemon's native code on emulated
# CPUs without AVX-512 (qemu-user; x86_64 only), tests/deploy verifies the
# systemd unit with systemd-analyze (Debian's systemd), and
# tests/service/test_web_browser.py drives Debian's chromium through
# chromedriver: install them here, out loud.
test-tools:
	@if [ "$$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then \
		echo "make: installing qemu-user (apt-get) for the CPU-baseline test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		apt-cache policy qemu-user | grep -q 'Candidate: [^(]' || $$SUDO apt-get update; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends qemu-user; \
	fi
	@if ! command -v systemd-analyze >/dev/null; then \
		echo "make: installing systemd (apt-get) for systemd-analyze, the unit file's check"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		apt-cache policy systemd | grep -q 'Candidate: [^(]' || $$SUDO apt-get update; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends systemd; \
	fi
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "make: installing chromium and chromium-driver (apt-get) for the web page's browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		apt-cache policy chromium-driver | grep -q 'Candidate: [^(]' || $$SUDO apt-get update; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

test: $(STAMP) test-tools
	$(PY) -m pytest -q -m "not soak" tests

soak: $(STAMP) test-tools
	$(PY) -m pytest -q -m soak -s tests

# The io_uring binding's aarch64 path (libatomic acquire/release), run for real
# under qemu-aarch64 with Debian's arm64 CPython (tests/aarch64/run.py). `make
# test` runs it too (tests/ioring/test_aarch64_path.py): it adds arm64 as a dpkg
# foreign architecture (root or sudo) and downloads arm64 packages and wheels
# into build/aarch64-sysroot (~15 s, once).
check-aarch64: $(STAMP) test-tools
	$(PY) tests/aarch64/run.py

# The end-to-end bench compares with Redis and fio: install them here, out loud.
bench: $(STAMP)
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v fio >/dev/null || missing="$$missing fio"; \
	if [ -n "$$missing" ]; then \
		echo "make bench: installing$$missing (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		apt-cache policy redis-server | grep -q 'Candidate: (none)' && $$SUDO apt-get update; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y $$missing; \
	fi
	@$(PY) -c "import redis" 2>/dev/null || { echo "make bench: installing redis (pip, into $(VENV))"; $(PY) -m pip install --quiet redis; }
	$(VENV)/bin/ringtail bench --write-doc
	$(PY) bench/engine.py --write-doc

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
