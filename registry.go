package main

// The process registry: every agentapp process that serves or works keeps a row in the
// workers table while it lives, so operators (psql, GET /v1/workers, the console) see
// which processes share the database and how busy each one is.

import (
	"cmp"
	"context"
	"log/slog"
	"net/http"
	"os"
	"runtime/debug"
	"time"

	"github.com/lib/pq"
)

// The registry's cadence. SPEC: a heartbeat at most every 10 s; a row not heartbeated for
// a minute is removed by any process.
const (
	// heartbeatInterval is how often a process refreshes its row (and its executing count).
	heartbeatInterval = 10 * time.Second
	// workerStaleAfter is how long a row may go without a heartbeat before any process
	// removes it: six missed beats, so a slow database or a paused VM does not evict a
	// live process.
	workerStaleAfter = time.Minute
	// registryTimeout bounds one registry statement: a beat that cannot finish in this
	// time is retried at the next one.
	registryTimeout = 5 * time.Second
)

// processMode is how a process runs, as the workers table records it.
type processMode string

const (
	modeServe       processMode = "serve"        // agentapp serve: the worker only runs worker API cycles
	modeServeWorker processMode = "serve+worker" // agentapp serve with RUN_WORKER_EMBEDDED=true
	modeWorker      processMode = "worker"       // agentapp worker
)

// serveMode is the mode of `agentapp serve`.
func serveMode(embedded bool) processMode {
	if embedded {
		return modeServeWorker
	}
	return modeServe
}

// as returns c for a worker in a process of mode m.
func (c workerConfig) as(m processMode) workerConfig {
	c.Mode = m
	return c
}

// buildVersion is the version of this binary: the module version Go stamped into it, else
// the VCS revision it was built from, else "devel".
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch {
		case s.Key == "vcs.revision" && len(s.Value) >= 12:
			rev = s.Value[:12]
		case s.Key == "vcs.modified" && s.Value == "true":
			dirty = "-dirty"
		}
	}
	if rev == "" {
		return "devel"
	}
	return rev + dirty
}

// workerRow is a process as the workers table holds it and GET /v1/workers answers it.
type workerRow struct {
	ID          string      `json:"id"`
	Hostname    string      `json:"hostname"`
	PID         int         `json:"pid"`
	Version     string      `json:"version"`
	Mode        processMode `json:"mode"`
	Concurrency int         `json:"concurrency"`
	Executing   int         `json:"executing"`
	StartedAt   time.Time   `json:"started_at"`
	HeartbeatAt time.Time   `json:"heartbeat_at"`
}

// heartbeat writes w's row (inserting it when missing: at start, or after another process
// removed it while this one could not reach the database) and, in the same statement,
// removes other processes' rows not heartbeated for staleAfter, the status_listeners
// rows not refreshed for as long (notify.go), and the rate_starts older than their agent's
// window (queue.go). It returns the workers' ids it removed.
func (s *store) heartbeat(ctx context.Context, w workerRow, staleAfter time.Duration) ([]string, error) {
	var removed pq.StringArray
	err := s.db.QueryRowContext(ctx, `
		WITH stale AS (
			DELETE FROM workers WHERE heartbeat_at < now() - $8 * interval '1 millisecond' AND id <> $1
			RETURNING id), unheard AS (
			DELETE FROM status_listeners WHERE refreshed_at < now() - $8 * interval '1 millisecond'), outdated AS (
			DELETE FROM rate_starts s USING agents a
			WHERE a.id = s.agent_id AND s.at < now() - coalesce(a.rate_period_ms, 0) * interval '1 millisecond')
		INSERT INTO workers (id, hostname, pid, version, mode, concurrency, executing)
		VALUES ($1, $2, $3, $4, $5, $6, $7)
		ON CONFLICT (id) DO UPDATE SET executing = EXCLUDED.executing, heartbeat_at = now()
		RETURNING (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM stale)`,
		w.ID, w.Hostname, w.PID, w.Version, string(w.Mode), w.Concurrency, w.Executing,
		staleAfter.Milliseconds()).Scan(&removed)
	return removed, err
}

// unregister deletes the row of the process id.
func (s *store) unregister(ctx context.Context, id string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM workers WHERE id = $1`, id)
	return err
}

// listWorkers returns the live processes, oldest first: those heartbeated within
// staleAfter (a row not yet removed is not live).
func (s *store) listWorkers(ctx context.Context, staleAfter time.Duration) ([]workerRow, error) {
	rows, err := s.db.QueryContext(ctx, `
		SELECT id, hostname, pid, version, mode, concurrency, executing, started_at, heartbeat_at
		FROM workers WHERE heartbeat_at >= now() - $1 * interval '1 millisecond'
		ORDER BY started_at, id`, staleAfter.Milliseconds())
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	workers := []workerRow{}
	for rows.Next() {
		var w workerRow
		if err := rows.Scan(&w.ID, &w.Hostname, &w.PID, &w.Version, &w.Mode, &w.Concurrency,
			&w.Executing, &w.StartedAt, &w.HeartbeatAt); err != nil {
			return nil, err
		}
		w.StartedAt, w.HeartbeatAt = w.StartedAt.UTC(), w.HeartbeatAt.UTC()
		workers = append(workers, w)
	}
	return workers, rows.Err()
}

// beat is the heartbeat, a child of the worker's run: it registers the process at once,
// refreshes its row every heartbeat interval (removing stale rows of other processes on
// the way), and deletes the row when ctx ends, then closes done. Database errors are
// logged once per outage; the next beat retries.
func (w *worker) beat(ctx context.Context, done chan struct{}) {
	defer close(done)
	host, _ := os.Hostname()
	row := workerRow{ID: w.id, Hostname: host, PID: os.Getpid(), Version: cmp.Or(w.cfg.Version, buildVersion()),
		Mode: cmp.Or(w.cfg.Mode, modeWorker), Concurrency: w.cfg.Concurrency}
	ticker := time.NewTicker(cmp.Or(w.cfg.Heartbeat, heartbeatInterval))
	defer ticker.Stop()
	down := false
	for first := true; ; first = false {
		row.Executing = w.executingCount()
		parent := ctx
		if first {
			// The registration is not cut short by a run that ends at once (worker -once).
			parent = context.WithoutCancel(ctx)
		}
		bctx, cancel := context.WithTimeout(parent, registryTimeout)
		removed, err := w.st.heartbeat(bctx, row, workerStaleAfter)
		if err == nil {
			err = w.st.rollUpCounts(bctx)
		}
		cancel()
		switch {
		case err != nil && ctx.Err() == nil && !down:
			down = true
			// An outage is logged by whoever meets it first (the loop, a request); this
			// line only adds to it at debug level.
			level := slog.LevelWarn
			if isUnavailable(err) {
				level = slog.LevelDebug
			}
			w.log.Log(ctx, level, "heartbeat failed; retrying every heartbeat interval", "worker", w.id, "err", err)
		case err == nil && down:
			down = false
			w.log.Debug("heartbeat succeeded again", "worker", w.id)
		}
		if len(removed) > 0 {
			w.log.Warn("removed processes not heartbeated for a minute", "workers", removed, "stale_after", workerStaleAfter)
		}
		select {
		case <-ctx.Done():
			uctx, cancel := context.WithTimeout(context.Background(), registryTimeout)
			defer cancel()
			if err := w.st.unregister(uctx, w.id); err != nil {
				w.log.Warn("could not remove this process from the workers table; another process will within a minute",
					"worker", w.id, "err", err)
			}
			return
		case <-ticker.C:
		}
	}
}

// listWorkers answers the live processes (admin).
func (s *server) listWorkers(w http.ResponseWriter, r *http.Request) {
	workers, err := s.store.listWorkers(r.Context(), workerStaleAfter)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]workerRow{"workers": workers})
}
