// Command agentapp serves the API of an agent app and executes its runs, which wait in
// PostgreSQL. See README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
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

// run is agentapp's whole program: it dispatches the subcommand. The command line is
// checked before the environment is read.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cl, err := parseCommandLine(args, stdout, stderr)
	if err != nil || cl.help {
		return err
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return err
	}
	logger := newLogger(cfg, stderr)

	switch cl.cmd {
	case "serve":
		return serve(ctx, cfg, logger)
	case "worker":
		return runWorker(ctx, cfg, logger, cl.once, stdout)
	case "migrate":
		st, err := openStore(ctx, cfg, 1, logger)
		if st == nil {
			return err
		}
		defer st.db.Close()
		logger.Info("schema applied")
		return nil
	default: // workspace
		st, err := openStore(ctx, cfg, 1, logger)
		if st == nil {
			return err
		}
		defer st.db.Close()
		ws, err := st.createWorkspace(ctx, cl.name)
		if err != nil {
			return err
		}
		return json.NewEncoder(stdout).Encode(ws)
	}
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

// openStore opens a pool of conns connections and applies the schema, retrying while the
// database is unreachable (with one log line), until ctx ends: then it returns nil, nil.
// Every subcommand that uses the database starts here.
func openStore(ctx context.Context, cfg config, conns int, log *slog.Logger) (*store, error) {
	db, err := openDB(cfg.DatabaseURL, conns)
	if err != nil {
		return nil, err
	}
	st := &store{db: db}
	logged := false
	for {
		err := st.applySchema(ctx)
		if err == nil {
			err = st.loadEventKeys(ctx, cfg.PublicURL)
		}
		if err == nil {
			if logged {
				log.Info("database is back; schema applied")
			}
			return st, nil
		}
		if !isUnavailable(err) || ctx.Err() != nil {
			db.Close()
			if ctx.Err() != nil {
				return nil, nil
			}
			return nil, err
		}
		if !logged {
			log.Error("database unreachable; retrying", "err", err)
			logged = true
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// serve runs the HTTP server and the worker (looping with cfg.WorkerEmbedded, else only for
// the worker API) until ctx ends, then shuts down in SPEC's order, one step after the other:
// stop accepting requests and claiming runs; wait for the worker, which drains its runs
// within its own budget; stop listening for notifications; finish in-flight requests; close
// the pools last. A failing Serve takes the same path.
func serve(ctx context.Context, cfg config, log *slog.Logger) error {
	// The schema comes first: once /healthz answers, the whole API works.
	st, err := openStore(ctx, cfg, apiPoolSize, log)
	if st == nil {
		return err
	}
	defer st.db.Close() // for the early returns; the shutdown below closes it in order
	workerDB, err := openDB(cfg.DatabaseURL, workerPoolSize)
	if err != nil {
		return err
	}
	defer workerDB.Close()
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return err
	}
	m := newMetrics()
	w := newWorker(&store{db: workerDB, events: st.events}, log, workerConfigOf(cfg).as(serveMode(cfg.WorkerEmbedded)), m)
	n := newNotifier(cfg.DatabaseURL, st.db, w.id, log, w.runsAnnounced, w.cancelLocal, w.schedulesChanged)
	// endPolls ends long polls at shutdown. It is not the requests' base context: canceling
	// that would cut in-flight requests off mid-query instead of finishing them.
	endPolls := make(chan struct{})
	announce := newAnnouncer(st.db, log, w.id, w.claimable)
	announceCtx, stopAnnounce := context.WithCancel(context.Background())
	go announce.run(announceCtx)
	w.st.announce = announce.claimable
	s := &server{store: st, worker: w, notifier: n, announce: announce, metrics: m, log: log, cfg: cfg, endPolls: endPolls}
	srv := newHTTPServer(s.handler(), log)

	workerCtx, stopWorker := context.WithCancel(context.Background())
	workerDone := make(chan error, 1)
	go func() { workerDone <- w.run(workerCtx, cfg.WorkerEmbedded) }()
	// Shutdown runs this hook in a goroutine of its own and does not wait for it: it only
	// signals the worker; below, serve waits for the worker before anything closes.
	srv.RegisterOnShutdown(stopWorker)
	// Logged before the first request can be answered: the listener is bound already.
	log.Info("listening", "addr", ln.Addr().String(), "console", consoleURL(ln.Addr()), "embedded_worker", cfg.WorkerEmbedded)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()

	select {
	case <-ctx.Done():
	case err = <-serveErr:
	}
	log.Info("shutting down")
	// 1. Stop accepting requests; the hook stops claiming. In-flight requests go on.
	httpDone := make(chan struct{})
	go func() {
		defer close(httpDone)
		sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout+time.Minute)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			log.Warn("HTTP shutdown incomplete; closing connections", "err", err)
			srv.Close()
		}
	}()
	// 2. The worker drains its runs and writes their outcomes.
	if werr := <-workerDone; err == nil {
		err = werr
	}
	// 3. Stop listening for notifications.
	n.close()
	log.Info("stopped listening for notifications")
	// 4. Finish in-flight requests; long polls answer the run as it stands.
	close(endPolls)
	began := time.Now()
	log.Info("streams closed", "streams", s.streams.wait(), "took", time.Since(began).Round(time.Millisecond))
	<-httpDone
	stopAnnounce()
	<-announce.done
	// 5. Only now close the pools: no query meets a closed pool.
	st.db.Close()
	workerDB.Close()
	log.Info("database pool closed")
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// runWorker is `agentapp worker`: the loop alone until ctx ends, or with once a single
// cycle, whose summary it prints.
func runWorker(ctx context.Context, cfg config, log *slog.Logger, once bool, stdout io.Writer) error {
	st, err := openStore(ctx, cfg, workerPoolSize, log)
	if st == nil {
		return err
	}
	defer st.db.Close()
	w := newWorker(st, log, workerConfigOf(cfg).as(modeWorker), newMetrics())
	if once {
		wctx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- w.run(wctx, false) }()
		s, err := w.process(ctx, cfg.BatchLimit, cfg.WorkspaceID)
		stop()
		if werr := <-done; err == nil {
			err = werr
		}
		if err != nil {
			return err
		}
		return json.NewEncoder(stdout).Encode(s)
	}
	n := newNotifier(cfg.DatabaseURL, st.db, w.id, log, w.runsAnnounced, w.cancelLocal, w.schedulesChanged)
	announce := newAnnouncer(st.db, log, w.id, w.claimable)
	announceCtx, stopAnnounce := context.WithCancel(context.Background())
	go announce.run(announceCtx)
	w.st.announce = announce.claimable
	err = w.run(ctx, true)
	stopAnnounce()
	<-announce.done
	n.close()
	return err
}

// consoleURL is where an operator on this box opens the console of a server listening at
// addr: a wildcard address (0.0.0.0, ::) is reached at loopback.
func consoleURL(addr net.Addr) string {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return "http://" + addr.String() + "/ui/"
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/ui/"
}
