// Command agentapp serves the API of an agent app and executes its runs, which wait in
// PostgreSQL. See README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	// The first SIGINT/SIGTERM starts the graceful shutdown; a second one exits at once
	// (the leases recover the runs that were still executing). The channel holds both, so
	// a second signal arriving at any moment is never lost.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-signals
		cancel()
		sig := <-signals
		fmt.Fprintf(os.Stderr, "agentapp: second signal (%v): exiting now\n", sig)
		os.Exit(1)
	}()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	cancel()
	var cfgErr configError
	switch {
	case err == nil:
	case errors.As(err, &cfgErr), errors.Is(err, errUsage):
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "agentapp:", err)
		os.Exit(1)
	}
}

// API and worker connections come from separate pools so neither can starve the other;
// the notification listener has its own connection besides.
const (
	apiPoolSize    = 16
	workerPoolSize = 4
)

// run is agentapp's whole program: it dispatches the subcommand.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cmd := "serve"
	if len(args) > 0 {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage())
		return nil
	case "serve", "worker", "migrate", "workspace":
	default:
		fmt.Fprintf(stderr, "agentapp: unknown command %q\n\n%s", cmd, usage())
		return errUsage
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return err
	}
	logger := newLogger(cfg, stderr)

	switch cmd {
	case "serve":
		if len(args) > 0 {
			fmt.Fprintf(stderr, "agentapp serve takes no arguments\n")
			return errUsage
		}
		return serve(ctx, cfg, logger)
	case "worker":
		fs := flag.NewFlagSet("worker", flag.ContinueOnError)
		fs.SetOutput(stderr)
		once := fs.Bool("once", false, "run one cycle, print its summary as JSON and exit")
		if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
			return errUsage
		}
		return runWorker(ctx, cfg, logger, *once, stdout)
	case "migrate":
		db, err := openDB(cfg.DatabaseURL, 1)
		if err != nil {
			return err
		}
		defer db.Close()
		if err := (&store{db: db}).applySchema(ctx); err != nil {
			return err
		}
		logger.Info("schema applied")
		return nil
	default: // workspace
		if len(args) != 2 || args[0] != "create" || strings.TrimSpace(args[1]) == "" {
			fmt.Fprintf(stderr, "usage: agentapp workspace create NAME\n")
			return errUsage
		}
		db, err := openDB(cfg.DatabaseURL, 1)
		if err != nil {
			return err
		}
		defer db.Close()
		st := &store{db: db}
		if err := st.applySchema(ctx); err != nil {
			return err
		}
		ws, err := st.createWorkspace(ctx, args[1])
		if err != nil {
			return err
		}
		return json.NewEncoder(stdout).Encode(ws)
	}
}

// usage is the -h text; it lists every variable.
func usage() string {
	var b strings.Builder
	b.WriteString(`agentapp serves an agent app's API and executes its runs, queued in PostgreSQL.

Usage:
  agentapp [serve]                  apply the schema and serve HTTP (RUN_WORKER_EMBEDDED=true
                                    also runs the worker in this process)
  agentapp worker [-once]           run the worker loop until SIGINT/SIGTERM; -once runs one
                                    cycle, prints its summary as JSON and exits
  agentapp migrate                  apply the schema and exit
  agentapp workspace create NAME    create a workspace; prints it with its API key as JSON
  agentapp -h                       this help

Environment:
`)
	for _, v := range configVars {
		fmt.Fprintf(&b, "  %-31s default %s\n  %-31s %s\n", v.name, v.def, "", v.accepted)
	}
	return b.String()
}

func newLogger(cfg config, w io.Writer) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// waitForSchema applies the schema, retrying while the database is unreachable, until
// ctx ends.
func waitForSchema(ctx context.Context, st *store, log *slog.Logger) error {
	logged := false
	for {
		err := st.applySchema(ctx)
		if err == nil {
			if logged {
				log.Info("database is back; schema applied")
			}
			return nil
		}
		if !isUnavailable(err) {
			return err
		}
		if !logged {
			log.Error("database unreachable; retrying", "err", err)
			logged = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// serve runs the HTTP server, and with cfg.WorkerEmbedded the worker loop, until ctx
// ends; then it shuts down in SPEC's order: stop accepting requests and claiming runs,
// drain the runs, stop listening, finish requests, and close the pools last.
func serve(ctx context.Context, cfg config, log *slog.Logger) error {
	apiDB, err := openDB(cfg.DatabaseURL, apiPoolSize)
	if err != nil {
		return err
	}
	defer apiDB.Close() // for the early returns; the shutdown below closes it in order
	workerDB, err := openDB(cfg.DatabaseURL, workerPoolSize)
	if err != nil {
		return err
	}
	defer workerDB.Close()
	// The schema comes first: once /healthz answers, the whole API works.
	st := &store{db: apiDB}
	if err := waitForSchema(ctx, st, log); err != nil {
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	}
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return err
	}
	m := newMetrics()
	w := newWorker(&store{db: workerDB}, log, workerConfigOf(cfg), m)
	n := newNotifier(cfg.DatabaseURL, log, w.wakeUp, w.cancelLocal)
	// endPolls ends long polls at shutdown. It is not the requests' base context: canceling
	// that would cut in-flight requests off mid-query instead of finishing them.
	endPolls := make(chan struct{})
	s := &server{store: st, worker: w, notifier: n, metrics: m, log: log, cfg: cfg, endPolls: endPolls}
	srv := newHTTPServer(s.handler(), log)
	// Shutdown runs this hook in its own goroutine and does not wait for it: it only
	// tells the worker to stop; below we wait for w.done before closing the pools.
	srv.RegisterOnShutdown(w.shutdown)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String(), "embedded_worker", cfg.WorkerEmbedded)
	if cfg.WorkerEmbedded {
		w.startLoop()
	}

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-serveErr:
		w.shutdown() // no hook runs when Serve fails
	}
	log.Info("shutting down")
	shutdownDone := make(chan struct{})
	go func() {
		defer close(shutdownDone)
		sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout+time.Minute)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			log.Warn("HTTP shutdown incomplete; closing connections", "err", err)
			srv.Close()
		}
	}()
	w.shutdown()
	waitWorker(w, cfg, log)
	n.close()
	log.Info("stopped listening for notifications")
	close(endPolls) // long polls answer the run as it stands; other requests finish
	<-shutdownDone
	apiDB.Close()
	workerDB.Close()
	log.Info("database pool closed")
	if errors.Is(runErr, http.ErrServerClosed) {
		runErr = nil
	}
	return runErr
}

// waitWorker waits for the worker to stop: its drain is bounded by the shutdown timeout,
// its last writes by their own timeouts and the lease.
func waitWorker(w *worker, cfg config, log *slog.Logger) {
	limit := cfg.ShutdownTimeout + cfg.Lease + 15*time.Second
	select {
	case <-w.done:
	case <-time.After(limit):
		log.Error("worker did not stop in time; closing anyway", "waited", limit)
	}
}

// runWorker is `agentapp worker`: the loop alone, or one cycle with once.
func runWorker(ctx context.Context, cfg config, logger *slog.Logger, once bool, stdout io.Writer) error {
	db, err := openDB(cfg.DatabaseURL, workerPoolSize)
	if err != nil {
		return err
	}
	defer db.Close()
	st := &store{db: db}
	if err := waitForSchema(ctx, st, logger); err != nil {
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	}
	w := newWorker(st, logger, workerConfigOf(cfg), newMetrics())
	go func() {
		<-ctx.Done()
		w.shutdown()
	}()
	if once {
		s, err := w.process(ctx, cfg.BatchLimit, cfg.WorkspaceID)
		w.shutdown()
		waitWorker(w, cfg, logger)
		if err != nil {
			return err
		}
		return json.NewEncoder(stdout).Encode(s)
	}
	n := newNotifier(cfg.DatabaseURL, logger, w.wakeUp, w.cancelLocal)
	w.startLoop()
	<-ctx.Done()
	w.shutdown()
	waitWorker(w, cfg, logger)
	n.close()
	return nil
}
