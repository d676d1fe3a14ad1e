# make install | run | test | lint | lock | bench | soak
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SANDBOX_PORT ?= 8080
# Where make run keeps the RabbitMQ node it starts when no broker answers (see run)
RABBITMQ_DIR ?= .rabbitmq
# pip-tools, for make lock, in a virtualenv of its own
LOCK_VENV := .venv-lock

.PHONY: install run test cluster-test lint lock bench soak clean

install: $(VENV)/.installed

# The pinned lock (requirements.txt), then the project itself, editable and without its
# dependencies (they are the lock's): the netcore-activity command in .venv/bin
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --editable .
	touch $@

# Refreshes requirements.txt, the pinned lock make install uses, from pyproject.toml: its ranges and
# its test and typing extras, resolved by pip-tools' pip-compile. Pins that still fit are kept;
# `make lock UPGRADE=1` moves every one to the newest release in range.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip 'pip-tools>=7.5,<8'
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --extra test --extra typing \
	  --strip-extras --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) \
	  --output-file requirements.txt pyproject.toml

# Runs the Procfile with worker/ops/supervisor.py: Ctrl-C stops everything it started, even with the
# output piped (make run 2>&1 | tee run.log); a second Ctrl-C kills it. Without NETCORE_API_KEY and
# NETCORE_API_URL it starts the sandbox API instead of talking to Netcore, and says so. Flower
# never runs without a password: without FLOWER_BASIC_AUTH, this run makes one up (user admin)
# and prints it once. When nothing answers on CELERY_BROKER_URL (this machine's), it starts a
# RabbitMQ node of its own (data in RABBITMQ_DIR), says so, and stops it with the rest; without
# RabbitMQ installed, one line says how to get it.
run: install
	@if [ -z "$$FLOWER_BASIC_AUTH" ]; then \
	  FLOWER_BASIC_AUTH="admin:$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(18))')"; \
	  export FLOWER_BASIC_AUTH; \
	  echo "################################################################"; \
	  echo "# Flower: http://$${FLOWER_ADDRESS:-127.0.0.1}:$${FLOWER_PORT:-5555}"; \
	  echo "#   user:     admin"; \
	  echo "#   password: $${FLOWER_BASIC_AUTH#admin:}"; \
	  echo "# (made up for this run; set FLOWER_BASIC_AUTH=user:password to choose)"; \
	  echo "################################################################"; \
	fi; \
	if [ -z "$$NETCORE_API_KEY" ] && [ -z "$$NETCORE_API_URL" ]; then \
	  echo "################################################################"; \
	  printf '# %-60s #\n' "NETCORE_API_KEY not set: running against the local SANDBOX"; \
	  printf '# %-60s #\n' "at http://127.0.0.1:$(SANDBOX_PORT). Nothing reaches Netcore."; \
	  echo "################################################################"; \
	  NETCORE_API_URL=http://127.0.0.1:$(SANDBOX_PORT) NETCORE_API_KEY=sandbox-key SANDBOX_API_KEY=sandbox-key \
	    SANDBOX_PORT=$(SANDBOX_PORT) exec $(BIN)/python -m worker.ops.supervisor --local-broker $(RABBITMQ_DIR); \
	else \
	  exec $(BIN)/python -m worker.ops.supervisor --local-broker $(RABBITMQ_DIR) worker flower; \
	fi

test: install lint
	$(BIN)/python -m pytest

# Only the cluster tests (three RabbitMQ nodes of their own; also part of make test), with their ledgers
cluster-test: install
	$(BIN)/python -m pytest -m cluster -rP

# Throughput against a bare drain, a naive design, a slow API and 7 vs 1000 asset_ids, a SIGKILL
# mid-run and a 5-minute outage, in one run (about 10 minutes; `python -m bench --quick` for a
# smoke test in under 2); results in bench-results/latest.json
bench: install
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check worker config tests bench
	$(BIN)/mypy

# 200,000 events, 5% API failures, a SIGKILL every 20 s; prints the ledger (minutes; not in CI)
soak: install
	$(BIN)/python -m tests.soak

clean:
	rm -rf $(VENV) $(LOCK_VENV)
