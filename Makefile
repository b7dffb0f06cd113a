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

test:
	@$(WITH_DB) $(FMTCHECK) set -x; \
	$(GO) vet ./... && \
	$(GO) test -race -count=1 -timeout 30m $(TESTFLAGS) ./...

bench:
	@$(WITH_DB) set -x; $(GO) test $(BENCHFLAGS) ./...

lint:
	@$(FMTCHECK) set -x; \
	$(GO) vet ./... && \
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

db-stop:
	./dev-db.sh stop
