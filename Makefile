# make install | run | test | bench | lint
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SANDBOX_PORT ?= 8080

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# Runs the Procfile. Without NETCORE_API_KEY and NETCORE_API_URL it starts the sandbox API
# instead of talking to Netcore, and says so.
run: install
	@if [ -z "$$NETCORE_API_KEY" ] && [ -z "$$NETCORE_API_URL" ]; then \
	  echo "################################################################"; \
	  echo "# NETCORE_API_KEY is not set: running against the local SANDBOX #"; \
	  echo "# at http://127.0.0.1:$(SANDBOX_PORT). Nothing reaches Netcore.      #"; \
	  echo "################################################################"; \
	  NETCORE_API_URL=http://127.0.0.1:$(SANDBOX_PORT) NETCORE_API_KEY=sandbox-key SANDBOX_API_KEY=sandbox-key \
	    SANDBOX_PORT=$(SANDBOX_PORT) $(BIN)/honcho start; \
	else \
	  $(BIN)/honcho start worker flower; \
	fi

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
