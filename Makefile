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

# Debian packages some tests drive for real, installed here out loud:
# $(call apt_install,COMMAND,PACKAGES,WHY) installs PACKAGES when COMMAND is missing.
define apt_install
	@if ! command -v $(1) >/dev/null; then \
		echo "make: installing $(2) (apt-get) for $(3)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		apt-cache policy $(firstword $(2)) | grep -q 'Candidate: [^(]' || $$SUDO apt-get update; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $(2); \
	fi
endef

# qemu-user: tests/ioring/test_cpu_baseline.py runs the daemon's native code on
# emulated CPUs without AVX-512 (x86_64 hosts only); systemd: tests/deploy checks
# the unit with systemd-analyze; chromium: tests/service/test_web_browser.py;
# nats-server: tests/service/test_fleet.py (JetStream, a 3-node cluster).
test-tools:
ifeq ($(shell uname -m),x86_64)
	$(call apt_install,qemu-x86_64,qemu-user,the CPU-baseline test)
endif
	$(call apt_install,systemd-analyze,systemd,the unit file's check)
	$(call apt_install,chromedriver,chromium chromium-driver,the web page's browser tests)
	$(call apt_install,nats-server,nats-server,the fleet tests (ringtail ship))

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
