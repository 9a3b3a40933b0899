# Everything a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= etc/relay.ini

.PHONY: run test lint bench bench-queue clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# compat mode puts the checkout on sys.path, so twisted/plugins/relay_plugin.py
# is found as a dropin; the default editable mode would hide it.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e . --config-settings editable_mode=compat
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# The example plugins are installed as a user would, from their own
# directories; the integration tests run a relay with them.
EXAMPLES := examples/relay-http-backend examples/relay-sqlite-validator

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed $(shell find $(EXAMPLES) -name '*.py' -o -name pyproject.toml)
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -m pip install -q $(addprefix ./,$(EXAMPLES))
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/twistd -n --pidfile= relay --config $(CONFIG)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Beside a private Postfix (needs root and Debian's postfix): durable
# acceptance and end to end, 2 KB, 100 KB and 1 MB rows; BENCH_ARGS="--help".
bench: $(VENV)/.installed-test
	$(PY) bench/run.py $(BENCH_ARGS)

# A million held messages: the relay's memory, and a new message's 250 after
# a SIGKILL and a restart; BENCH_QUEUE_ARGS="--messages 100000" for less.
bench-queue: $(VENV)/.installed-test
	$(PY) bench/bigqueue.py $(BENCH_QUEUE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
