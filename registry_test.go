package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// readWorkerRows reads the workers table, by id.
func readWorkerRows(t testing.TB, db *sql.DB) map[string]workerRow {
	t.Helper()
	rows, err := db.Query(`SELECT id, hostname, pid, version, mode, concurrency, executing, started_at, heartbeat_at FROM workers`)
	if err != nil {
		t.Fatalf("read workers: got %v; want rows", err)
	}
	defer rows.Close()
	got := map[string]workerRow{}
	for rows.Next() {
		var w workerRow
		if err := rows.Scan(&w.ID, &w.Hostname, &w.PID, &w.Version, &w.Mode, &w.Concurrency, &w.Executing, &w.StartedAt, &w.HeartbeatAt); err != nil {
			t.Fatalf("read workers: got %v; want a row", err)
		}
		got[w.ID] = w
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read workers: got %v; want rows", err)
	}
	return got
}

// workerRowOfPid returns the row of the process pid, if any.
func workerRowOfPid(rows map[string]workerRow, pid int) (workerRow, bool) {
	for _, w := range rows {
		if w.PID == pid {
			return w, true
		}
	}
	return workerRow{}, false
}

// insertWorkerRow inserts a row for another process whose last heartbeat was ago.
func insertWorkerRow(t testing.TB, db *sql.DB, id string, ago time.Duration) {
	t.Helper()
	_, err := db.Exec(`INSERT INTO workers (id, hostname, pid, version, mode, concurrency, started_at, heartbeat_at)
		VALUES ($1, 'elsewhere', 1, 'old', 'worker', 1, now() - $2 * interval '1 millisecond', now() - $2 * interval '1 millisecond')`,
		id, ago.Milliseconds())
	if err != nil {
		t.Fatalf("insert worker row %s: got %v; want it inserted", id, err)
	}
}

// TestWorkersRegistry: a serving process and a worker process each keep a row in workers
// (hostname, pid, version, mode, concurrency) that GET /v1/workers shows to the admin
// only. Each row is gone once its process has stopped cleanly.
func TestWorkersRegistry(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	host, _ := os.Hostname()

	serveEnv := testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_CONCURRENCY": "7"})
	srv := startProc(t, serveEnv)
	a := srv.app()
	workerEnv := testEnv(t, dsn, map[string]string{"RUN_WORKER_CONCURRENCY": "3"})
	wrk := startProc(t, workerEnv, "worker")

	var listed struct {
		Workers []workerRow `json:"workers"`
	}
	eventually(t, 30*time.Second, "GET /v1/workers lists both processes", func() bool {
		a.mustDo(t, "GET", "/v1/workers", testAdminToken, nil, 200, &listed)
		return len(listed.Workers) == 2
	})
	want := map[int]struct {
		mode        processMode
		concurrency int
	}{srv.cmd.Process.Pid: {modeServeWorker, 7}, wrk.cmd.Process.Pid: {modeWorker, 3}}
	for _, w := range listed.Workers {
		exp, ok := want[w.PID]
		switch {
		case !ok:
			t.Errorf("listed worker %+v: got pid %d; want one of the two processes", w, w.PID)
		case w.Mode != exp.mode || w.Concurrency != exp.concurrency:
			t.Errorf("worker of pid %d: got mode %q concurrency %d; want %q, %d", w.PID, w.Mode, w.Concurrency, exp.mode, exp.concurrency)
		}
		if w.Hostname != host || w.Version == "" || w.Executing != 0 || !strings.Contains(w.ID, "/"+strconv.Itoa(w.PID)+"/") {
			t.Errorf("worker %+v: got hostname %q, version %q, executing %d; want %q, a version, 0, and the pid in the id",
				w, w.Hostname, w.Version, w.Executing, host)
		}
		if w.HeartbeatAt.Before(w.StartedAt) || time.Since(w.HeartbeatAt) > time.Minute {
			t.Errorf("worker of pid %d: got started_at %v heartbeat_at %v; want a recent heartbeat, not before the start", w.PID, w.StartedAt, w.HeartbeatAt)
		}
	}

	ws := a.createWorkspace(t)
	for name, token := range map[string]string{"no token": "", "workspace key": ws.APIKey} {
		if status, _, body := a.do(t, "GET", "/v1/workers", token, nil, nil); status != 401 {
			t.Errorf("GET /v1/workers with %s: got %d %s; want 401", name, status, body)
		}
	}

	for _, p := range []*proc{srv, wrk} {
		p.signal(t, syscall.SIGTERM)
		if code := p.wait(t, 60*time.Second); code != 0 {
			t.Errorf("pid %d: got exit %d; want 0", p.cmd.Process.Pid, code)
		}
		if w, ok := workerRowOfPid(readWorkerRows(t, db), p.cmd.Process.Pid); ok {
			t.Errorf("pid %d after a clean stop: got row %+v; want none", p.cmd.Process.Pid, w)
		}
	}
}

// TestWorkerOnceRegisters: `agentapp worker -once` heartbeats too, however short its
// life (its beat removes a stale row), and leaves no row behind.
func TestWorkerOnceRegisters(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	insertWorkerRow(t, db, "dead/1/aa", 2*time.Minute)
	once := startProc(t, testEnv(t, dsn, nil), "worker", "-once")
	if code := once.wait(t, 60*time.Second); code != 0 {
		t.Errorf("worker -once: got exit %d; want 0", code)
	}
	if rows := readWorkerRows(t, db); len(rows) != 0 {
		t.Errorf("workers after worker -once exited: got %v; want none (the stale row removed by its heartbeat, its own deleted)", rows)
	}
}

// TestWorkersStaleRemoved: a row not heartbeated for a minute is removed by any process
// (here at its first heartbeat) and is never listed; a row heartbeated 30 s ago stays.
func TestWorkersStaleRemoved(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	insertWorkerRow(t, db, "dead/1/aa", 2*time.Minute)
	insertWorkerRow(t, db, "quiet/1/bb", 30*time.Second)
	a := startApp(t, testEnv(t, dsn, nil))

	eventually(t, 30*time.Second, "the dead process's row is removed", func() bool {
		_, ok := readWorkerRows(t, db)["dead/1/aa"]
		return !ok
	})
	if _, ok := readWorkerRows(t, db)["quiet/1/bb"]; !ok {
		t.Errorf("row heartbeated 30 s ago: got it removed; want it kept")
	}
	eventually(t, 10*time.Second, "the removal is logged", func() bool {
		return strings.Contains(a.log.String(), "removed processes not heartbeated for a minute")
	})

	// A stale row that no heartbeat has removed yet is not live either.
	insertWorkerRow(t, db, "late/1/cc", 90*time.Second)
	var listed struct {
		Workers []workerRow `json:"workers"`
	}
	a.mustDo(t, "GET", "/v1/workers", testAdminToken, nil, 200, &listed)
	var ids []string
	for _, w := range listed.Workers {
		ids = append(ids, w.ID)
	}
	own := "/" + strconv.Itoa(os.Getpid()) + "/"
	if len(ids) != 2 || ids[0] != "quiet/1/bb" || !strings.Contains(ids[1], own) {
		t.Errorf("listed workers: got %v; want quiet/1/bb, then this process (oldest first), and no stale row", ids)
	}
}

// TestHeartbeatExecuting: the heartbeat records how many runs execute, in the mode and
// version the worker was given, and the row is deleted once run has returned.
func TestHeartbeatExecuting(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ws, _ := seedRuns(t, st, 0, 1)
	ctx := context.Background()
	if _, err := st.createAgent(ctx, agent{WorkspaceID: ws.ID, Name: "slow", Kind: "echo", Config: json.RawMessage(`{"delay_ms": 600000}`)}); err != nil {
		t.Fatalf("create agent: got %v; want it created", err)
	}
	for range 2 {
		if _, _, err := st.createRun(ctx, ws.ID, newRun{Agent: "slow", Input: json.RawMessage(`1`), MaxAttempts: 1}); err != nil {
			t.Fatalf("create run: got %v; want it created", err)
		}
	}
	cfg := workerConfig{Poll: 50 * time.Millisecond, BatchLimit: 10, Concurrency: 5, Lease: 30 * time.Second,
		Version: "v9.9.9-test", Heartbeat: 50 * time.Millisecond}
	w := newWorker(st, testLogger(t), cfg.as(modeServe), newMetrics())
	wctx, stop := context.WithCancel(ctx)
	go w.run(wctx, true)
	defer func() { stop(); <-w.done }()

	var row workerRow
	eventually(t, 30*time.Second, "the row says 2 runs execute", func() bool {
		row = readWorkerRows(t, db)[w.id]
		return row.Executing == 2
	})
	if row.Mode != modeServe || row.Version != "v9.9.9-test" || row.Concurrency != 5 || row.PID != os.Getpid() {
		t.Errorf("row: got %+v; want mode serve, version v9.9.9-test, concurrency 5, pid %d", row, os.Getpid())
	}
	stop() // a drain timeout of 0: the runs are requeued at once
	<-w.done
	if rows := readWorkerRows(t, db); len(rows) != 0 {
		t.Errorf("workers once run returned: got %v; want none", rows)
	}
}
