# agentapp developer tasks. Tests and the server need PostgreSQL: if
# DATABASE_URL is unset, a throwaway local cluster is started (./dev-db.sh).

SHELL      := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO         ?= go
TESTFLAGS  ?=
BENCHFLAGS ?= -run '^$$' -bench . -benchtime 1x -timeout 60m

# Shell prefix: use $DATABASE_URL if set, else start the dev database.
WITH_DB  = if [ -z "$${DATABASE_URL:-}" ]; then DATABASE_URL=$$(./dev-db.sh start) || exit 1; fi; export DATABASE_URL;
# Fails (and lists the files) if anything is not gofmt-formatted.
FMTCHECK = files=$$(gofmt -l .); if [ -n "$$files" ]; then echo "gofmt needed:" $$files >&2; exit 1; fi;

.PHONY: build run test bench lint db-stop

build:
	$(GO) build -o agentapp .

run:
	@$(WITH_DB) \
	if [ -z "$${ADMIN_TOKEN:-}" ]; then export ADMIN_TOKEN=dev-admin-token-0123456789; \
		echo "agentapp: admin token is $$ADMIN_TOKEN"; fi; \
	export RUN_WORKER_EMBEDDED="$${RUN_WORKER_EMBEDDED:-true}"; \
	$(GO) build -o agentapp . && exec ./agentapp # exec: Ctrl-C reaches agentapp, which exits 0

# go test without a package list (one package: the directory's) prints the test binary's
# output even when every test passes, so its last lines say whether the browser test ran.
test:
	@$(WITH_DB) echo "+ gofmt -l ." >&2; $(FMTCHECK) set -x; \
	$(GO) vet ./... && \
	$(GO) test -race -count=1 -timeout 30m $(TESTFLAGS)

bench:
	@$(WITH_DB) set -x; $(GO) test $(BENCHFLAGS) ./...

lint:
	@$(FMTCHECK) set -x; \
	$(GO) vet ./... && \
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

db-stop:
	./dev-db.sh stop

# The chaos test alone (chaos_test.go), for CHAOS_DURATION (5m here; make test runs it for
# its default, 60 s). It needs PostgreSQL's server binaries, not DATABASE_URL: it runs a
# cluster of its own, which it stops and restarts. The agentapp processes it starts are
# the -race build either way (agentappBinary), so races in the product under faults are
# caught; the test binary itself runs without -race here, because over minutes -race
# would double the harness's CPU on a shared machine, and make test runs the same harness
# with -race.
CHAOS_DURATION ?= 5m
CHAOS_TIMEOUT  ?= 60m
.PHONY: chaos
chaos:
	@set -x; CHAOS_DURATION=$(CHAOS_DURATION) $(GO) test -count=1 -v -run '^TestChaos$$' -timeout $(CHAOS_TIMEOUT) .
