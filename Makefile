# Entry points. The logic lives in scripts/ and in the `loyalty` command; see README.md.
SHELL := /usr/bin/env bash
# uv as installed by `make bootstrap` (pip may put its binary outside PATH: `python3 -m uv` then finds it).
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
UV_RUN := $(UV) run --frozen

.DEFAULT_GOAL := help
.PHONY: help bootstrap native test lint up down status worker dashboard demo bench clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

bootstrap: ## Install everything (uv, locked Python deps, Java/Maven and Kafka jars, redis-server); idempotent
	@bash scripts/bootstrap.sh

native: ## Compile the hot metric modules with mypyc (build/native; skipped without a C compiler)
	$(UV_RUN) python scripts/compile_metrics.py

test: bootstrap ## Run the whole test suite on a real Kafka and Redis (what .ci/run runs)
	@# Any pytest failure fails the target, and so does exit code 5 (no test collected).
	$(UV_RUN) pytest

lint: ## ruff and mypy
	$(UV_RUN) ruff check .
	$(UV_RUN) mypy

up: ## Start the local Kafka and Redis (idempotent)
	$(UV_RUN) loyalty up

down: ## Stop them
	$(UV_RUN) loyalty down

status: ## Are they running?
	$(UV_RUN) loyalty status

worker: ## Run one Faust worker in the foreground
	$(UV_RUN) loyalty worker

dashboard: ## Serve the live dashboard (http://127.0.0.1:8080/ by default) from Redis
	$(UV_RUN) loyalty dashboard

demo: bootstrap ## Run the product: Kafka, Redis, a worker and simulated traffic, live metrics table (Ctrl-C stops all)
	$(UV_RUN) loyalty demo

bench: bootstrap ## The benchmark of SPEC section 9 (about half an hour; writes bench/results/<date>.json)
	$(UV_RUN) loyalty bench

clean: down ## Stop everything and delete the local state folder (.loyalty)
	rm -rf .loyalty
