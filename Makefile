# The two commands of the README's Quickstart, plus the lint CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
PORT ?= 8443

.PHONY: run demo test lint format bench clean conformance

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# The main job: the quickstart scenario against the embedded enforcer; prints its report.
run: $(STAMP)
	$(BIN)/testbed run scenarios/quickstart.toml

# The enforcer demo: a PKI, demo devices and curl commands to try by hand.
demo: $(STAMP)
	$(BIN)/testbed enforcer demo --out $(DEMO_DIR) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The conformance suite at full size against the built-in enforcer (make test runs a small one).
CONFORMANCE_ARGS ?= --target builtin --examples 1000
conformance: $(STAMP)
	$(BIN)/testbed conformance $(CONFORMANCE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Enforcer vs nginx, same clients, same run: full handshakes (1 and 2 workers) with the crypto
# ceiling and the split of the enforcer's CPU beside them, the same handshakes counted in
# instructions (callgrind: a figure the machine's noise does not move), then cookie reuse on
# kept-alive connections, the load generator against openssl s_time, and good clients' latency
# beside slow-drip ClientHello attackers (fairness); goal 3: 100,000 devices provisioned with
# the default options beside a plain single-core loop (bench/provision.py); a virtual week's CPU
# per attempt beside the build before (bench/virtual_week.py; --full for the 10,000-device
# week); last, memory per held connection: 10,000 mTLS connections and WebSocket tunnels
# through one worker, beside nginx (connections.py); full handshakes with the device key in a
# SoftHSM2 token beside the software key store (pkcs11_handshakes.py); the Dask engine's
# overhead: a load on `--cluster local:2` beside `--workers 2` (cluster.py).
bench: $(STAMP)
	$(BIN)/python bench/ceiling.py
	$(BIN)/python bench/instructions.py
	$(BIN)/python bench/cookies.py
	$(BIN)/python bench/loadgen.py
	$(BIN)/python bench/fairness.py
	$(BIN)/python bench/http2.py
	$(BIN)/python bench/h2floods.py
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/provision.py
	$(BIN)/python bench/virtual_week.py
	$(BIN)/python bench/connections.py
	$(BIN)/python bench/pkcs11_handshakes.py
	$(BIN)/python bench/cluster.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) reports/*/
