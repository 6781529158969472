# tapgate: `make run` (the daemon on its simulator) and `make test` (everything the
# tests need, system packages included, then the whole suite) on a fresh Debian 12 or
# Raspberry Pi OS machine; `make install` / `make uninstall` (as root) put it on a gate as
# a systemd service.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/tapgate.toml

# Debian packages: building pyscard, the PC/SC stack with the vpcd virtual reader.
SYSTEM_PACKAGES := python3-venv python3-dev build-essential swig libpcsclite-dev \
                   pcscd vsmartcard-vpcd
# What only the tests need: a real broker, systemd-analyze for the unit, a D-Bus daemon,
# dbus-python for python-dbusmock's BlueZ (run under the system python3), and FUSE for
# the power-cut filesystem (fusepy loads libfuse2; fuse3 brings fusermount and /dev/fuse).
TEST_PACKAGES := mosquitto systemd dbus python3-dbus python3-gi fuse3 libfuse2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check lint typecheck system-deps test-system-deps bench clean \
        install install-system-deps install-check uninstall

run: $(VENV)/.run-deps
	$(VENV)/bin/tapgate run --config $(CONFIG)

# The real components are required: a missing pcscd or mosquitto fails the run instead
# of skipping what needs it.
test: system-deps test-system-deps $(VENV)/.test-deps
	TAPGATE_REQUIRE_PCSC=1 TAPGATE_REQUIRE_MQTT=1 TAPGATE_REQUIRE_BLUEZ=1 \
	  TAPGATE_REQUIRE_POWERCUT=1 $(PY) -m pytest -q
	$(MAKE) --no-print-directory check

check: lint typecheck

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check protocol daemon hal headend tests bench

typecheck: $(VENV)/.test-deps
	$(VENV)/bin/mypy

bench: system-deps $(VENV)/.test-deps
	$(PY) -m bench.run_all

# $(call apt-ensure,PACKAGES): apt-get install those of PACKAGES that are not installed.
define apt-ensure
@missing=""; for p in $(1); do \
  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
  echo "installing system packages:$$missing"; \
  $(SUDO) apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
fi
endef

system-deps:
	$(call apt-ensure,$(SYSTEM_PACKAGES))

test-system-deps:
	$(call apt-ensure,$(TEST_PACKAGES))

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.run-deps: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

# python-dbusmock >= 0.30 has BlueZ's LEAdvertisingManager1 (Debian 12 ships 0.28): pure
# Python, kept beside the venv and run by the system python3, which has dbus-python.
$(VENV)/.test-deps: $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --upgrade --no-deps --target $(VENV)/dbusmock python-dbusmock==0.38.1
	touch $@ $(VENV)/.run-deps

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info build

# --- make install / make uninstall ---------------------------------------------------------
# As root on Debian 12 / Raspberry Pi OS: the system packages, a virtualenv in
# $(PREFIX)/venv with the project and its pcsc extra, byte-compiled; the unit and its
# companions; the tapgate user (sysusers.d); /etc/tapgate and /var/lib/tapgate (tmpfiles.d);
# config/gate.example.toml as /etc/tapgate/tapgate.toml, which is never overwritten.
#
# DESTDIR=/some/root stages all of it under that root and touches nothing else on the
# machine: no apt-get, no systemctl; systemd-sysusers and systemd-tmpfiles run with
# --root=DESTDIR, so the tapgate user, and the owners of what is installed, come from
# DESTDIR/etc. The venv's scripts, pyvenv.cfg and bytecode name the final paths.
#
# Knobs, all empty by default so that `make install` is the real thing:
#   SKIP_SYSTEM_DEPS=1   no apt-get (implied by DESTDIR)
#   VENV_ARGS            extra `python -m venv` arguments
#   PIP_ARGS             extra `pip install` arguments (the install test: --no-deps)
#
# `make uninstall` removes the venv, the unit and its companions. /etc/tapgate (config,
# keys) and /var/lib/tapgate (the journal: the gate's record of every debit) stay unless
# PURGE=1. The tapgate user stays: sysusers.d never deletes users, and a uid handed to
# someone else would own whatever the gate left behind.

PREFIX           ?= /opt/tapgate
# The unit has ProtectHome=yes: a venv made from an interpreter under /root or /home (pyenv)
# would find no python when systemd starts it. The system python is the one to use.
INSTALL_PYTHON   ?= /usr/bin/python3
SKIP_SYSTEM_DEPS ?=
VENV_ARGS        ?=
PIP_ARGS         ?=
PURGE            ?=

# pcscd and its client library at run time; the others build pyscard (no Linux wheel).
INSTALL_PACKAGES := pcscd libpcsclite1 bluez python3-venv python3-dev build-essential swig \
                    libpcsclite-dev
# What the wheel is built from: pyproject.toml, its readme, and every top-level package
# (pyproject's packages.find picks those that go in).
SOURCE_FILES := pyproject.toml README.md $(patsubst %/__init__.py,%,$(wildcard */__init__.py))

# Named by tapgate.service, tapgate.sysusers and tapgate.tmpfiles: not knobs.
CONF_DIR     := /etc/tapgate
STATE_DIR    := /var/lib/tapgate
UNIT_DIR     := /etc/systemd/system
SYSUSERS_DIR := /usr/lib/sysusers.d
TMPFILES_DIR := /usr/lib/tmpfiles.d
POLKIT_DIR   := /etc/polkit-1/rules.d
DBUS_DIR     := /etc/dbus-1/system.d
COMPANIONS   := $(UNIT_DIR)/tapgate.service $(SYSUSERS_DIR)/tapgate.conf \
                $(TMPFILES_DIR)/tapgate.conf $(POLKIT_DIR)/50-tapgate-pcscd.rules \
                $(DBUS_DIR)/tapgate-bluez.conf

DEST      := $(if $(DESTDIR),$(abspath $(DESTDIR)))
VENV_DIR  := $(PREFIX)/venv
D_VENV    := $(DEST)$(VENV_DIR)
D_VENV_PY := $(D_VENV)/bin/python
# The tapgate group's gid, from DESTDIR's group file when staging.
TAPGATE_GID = $(if $(DEST),awk -F: '$$1 == "tapgate" { print $$3 }' $(DEST)/etc/group,getent group tapgate | cut -d: -f3)
SYSTEMD_RUNNING = [ -z "$(DEST)" ] && [ -d /run/systemd/system ]

install-check:
	@case "$(PREFIX)" in /?*) ;; *) echo "PREFIX must be an absolute path, not '$(PREFIX)'"; exit 2;; esac
	@[ "$$(id -u)" = 0 ] || { echo "make $(MAKECMDGOALS) sets owners: run it as root (sudo make $(MAKECMDGOALS))"; exit 2; }

install-system-deps: install-check
ifeq ($(DEST)$(SKIP_SYSTEM_DEPS),)
	$(call apt-ensure,$(INSTALL_PACKAGES))
else
	@echo "system packages skipped ($(if $(DEST),DESTDIR is set,SKIP_SYSTEM_DEPS=1)): $(INSTALL_PACKAGES)"
endif

install: install-check install-system-deps
	@command -v systemd-sysusers >/dev/null && command -v systemd-tmpfiles >/dev/null || \
	  { echo "systemd-sysusers and systemd-tmpfiles are needed (Debian: apt install systemd)"; exit 2; }
	@[ -x "$(INSTALL_PYTHON)" ] || { echo "no $(INSTALL_PYTHON) (Debian: apt install python3-venv)"; exit 2; }
# The user and the directories first: the config is installed group tapgate.
	install -D -m 0644 systemd/tapgate.sysusers $(DEST)$(SYSUSERS_DIR)/tapgate.conf
	install -D -m 0644 systemd/tapgate.tmpfiles $(DEST)$(TMPFILES_DIR)/tapgate.conf
	$(if $(DEST),umask 022 && mkdir -p $(DEST)/etc)
	systemd-sysusers $(if $(DEST),--root=$(DEST)) tapgate.conf
	systemd-tmpfiles --create $(if $(DEST),--root=$(DEST)) tapgate.conf
	@gid=$$($(TAPGATE_GID)); [ -n "$$gid" ] || { echo "no tapgate group after systemd-sysusers"; exit 1; }; \
	conf=$(DEST)$(CONF_DIR)/tapgate.toml; \
	if [ -e "$$conf" ] || [ -L "$$conf" ]; then \
	  echo "keeping $(CONF_DIR)/tapgate.toml: it is never overwritten (new keys: config/gate.example.toml)"; \
	else \
	  echo "install -m 0640 -o root -g tapgate config/gate.example.toml $(CONF_DIR)/tapgate.toml"; \
	  install -m 0640 -o 0 -g "$$gid" config/gate.example.toml "$$conf"; \
	fi
# The venv is made again only when missing or broken (its python gone after an OS upgrade).
# umask 022 throughout: the service reads it as tapgate, whatever root's umask is.
	@if ! $(D_VENV_PY) -c '' 2>/dev/null; then \
	  echo "$(INSTALL_PYTHON) -m venv $(VENV_ARGS) $(D_VENV)"; \
	  rm -rf $(D_VENV) && umask 022 && $(INSTALL_PYTHON) -m venv $(VENV_ARGS) $(D_VENV); \
	fi
# Built from a copy of the sources: the work tree gets no build/ or *.egg-info, and nothing
# but what the wheel should hold can slip into it.
	@src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && umask 022 && \
	tar -c --exclude=__pycache__ --exclude='*.pyc' $(SOURCE_FILES) | tar -x -C "$$src" && \
	echo "$(D_VENV_PY) -m pip install --no-compile $(PIP_ARGS) '.[pcsc,ble]'" && \
	$(D_VENV_PY) -m pip install --disable-pip-version-check --root-user-action=ignore \
	  --no-compile $(PIP_ARGS) "$$src[pcsc,ble]"
ifneq ($(DEST),)
# Staged: the scripts' #! lines, activate and pyvenv.cfg must name $(VENV_DIR).
	grep -rlI -F -- '$(DEST)' $(D_VENV)/bin $(D_VENV)/pyvenv.cfg | xargs -r sed -i 's|$(DEST)||g'
endif
# The unit sets PYTHONDONTWRITEBYTECODE and ProtectSystem=strict: no bytecode is ever
# written at run time, so all of it is written now (once: pip ran with --no-compile).
	umask 022 && $(D_VENV_PY) -m compileall -q -j0 $(if $(DEST),-s $(DEST) -p /) $(D_VENV)/lib
	install -D -m 0644 systemd/tapgate.service $(DEST)$(UNIT_DIR)/tapgate.service
	sed -i 's|^ExecStart=/opt/tapgate/venv/|ExecStart=$(VENV_DIR)/|' $(DEST)$(UNIT_DIR)/tapgate.service
	install -D -m 0644 systemd/50-tapgate-pcscd.rules $(DEST)$(POLKIT_DIR)/50-tapgate-pcscd.rules
	install -D -m 0644 systemd/tapgate-bluez.conf $(DEST)$(DBUS_DIR)/tapgate-bluez.conf
	@if $(SYSTEMD_RUNNING); then echo "systemctl daemon-reload"; systemctl daemon-reload; \
	else echo "systemctl daemon-reload skipped ($(if $(DEST),DESTDIR is set,systemd is not running))"; fi
	@echo
	@echo "tapgate is installed in $(DEST)$(VENV_DIR). Next steps, as root:"
	@echo "  1. The SAM purchase key, 32 hex digits, readable by tapgate alone (paste it, then Ctrl-D):"
	@echo "       install -m 0600 -o tapgate -g tapgate /dev/stdin $(CONF_DIR)/purchase.key"
	@echo "  2. Edit $(CONF_DIR)/tapgate.toml: terminal_id, fares, reader name, and under [journal]"
	@echo "       device_key = \"$(STATE_DIR)/device.key\""
	@echo "  3. The device key that signs the journal, made by and for tapgate (prints its public key):"
	@echo "       runuser -u tapgate -- $(VENV_DIR)/bin/tapgate keygen --config $(CONF_DIR)/tapgate.toml"
	@echo "  4. Check the config:  $(VENV_DIR)/bin/tapgate config check $(CONF_DIR)/tapgate.toml"
	@echo "  5. systemctl enable --now tapgate.service    (if it runs already: systemctl restart tapgate)"
	@echo "     journalctl -u tapgate -f"

uninstall: install-check
	@if $(SYSTEMD_RUNNING); then echo "systemctl disable --now tapgate.service"; \
	  systemctl disable --now tapgate.service || true; fi
	rm -rf $(D_VENV)
	@rmdir $(DEST)$(PREFIX) 2>/dev/null || true
	rm -f $(addprefix $(DEST),$(COMPANIONS))
ifeq ($(PURGE),1)
	rm -rf $(DEST)$(CONF_DIR) $(DEST)$(STATE_DIR)
else
	@echo "kept $(CONF_DIR) and $(STATE_DIR) (config, keys, the journal): PURGE=1 removes them"
endif
	@if $(SYSTEMD_RUNNING); then echo "systemctl daemon-reload"; systemctl daemon-reload; fi
