# The README's two commands: `make up` (start everything) and `make test` (lint, types, tests).
# Only Python >= 3.11 with venv/pip is needed: uv is installed into .tools/ on first use.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
RUN := $(UV) run --frozen

.PHONY: install up test lint typecheck pytest bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv>=0.4"

install: $(UV)
	$(UV) sync --frozen

up: install
	$(RUN) gpuflow up --demo

lint: install
	$(RUN) ruff check src tests bench
	$(RUN) ruff format --check src tests bench

typecheck: install
	$(RUN) mypy

# Redis-backed tests run on the embedded Redis 6.2; where a Redis answers on 127.0.0.1:6379
# they run again against it, on database 9 (keys under a per-test prefix, nothing flushed).
EXTERNAL_REDIS ?= redis://127.0.0.1:6379/9

pytest: install
	$(RUN) pytest -q
	@if $(RUN) python -c "import redis,sys; redis.Redis.from_url('$(EXTERNAL_REDIS)', socket_connect_timeout=1).ping()" 2>/dev/null; then \
		echo "== Redis-backed tests against $(EXTERNAL_REDIS)"; \
		GPUFLOW_TEST_REDIS_URL=$(EXTERNAL_REDIS) $(RUN) pytest -q -m redis; \
	else echo "== no Redis on $(EXTERNAL_REDIS): external run skipped"; fi

test: lint typecheck pytest

# Benchmarks against Celery, RQ, arq, dramatiq, saq (and BullMQ with Node.js); writes
# docs/benchmarks.md. BENCH_ARGS=--quick for a short run, --scale for the 1M-task rows.
bench: install
	$(RUN) --group bench python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(TOOLS) $(VENV) .pytest_cache .mypy_cache .ruff_cache
