package main

// Tests on real agentapp processes: the binary built once with -race (agentappBinary),
// started with startProc, stopped with signals or killed. They check what only a whole
// process can show: the shutdown order, crash recovery through leases, exactly-once
// execution across processes, wake-ups and long polls through LISTEN/NOTIFY, and
// surviving a database outage. Helpers local to this file start with pt.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ptLogOrder fails the test unless each of lines first appears in the log after the
// previous one.
func ptLogOrder(t testing.TB, log string, lines ...string) {
	t.Helper()
	prev := -1
	for i, l := range lines {
		at := strings.Index(log, l)
		switch {
		case at < 0:
			t.Errorf("log: got no %q; want it after %q", l, lines[max(i-1, 0)])
		case at < prev:
			t.Errorf("log: got %q before %q; want it after", l, lines[i-1])
		}
		prev = max(prev, at)
	}
}

// ptPidOfWorker returns the process id inside a worker id (host/pid/random).
func ptPidOfWorker(t testing.TB, workerID string) int {
	t.Helper()
	parts := strings.Split(workerID, "/")
	if len(parts) != 3 {
		t.Fatalf("worker id: got %q; want host/pid/random", workerID)
	}
	pid, err := strconv.Atoi(parts[1])
	if err != nil {
		t.Fatalf("worker id %q: got pid %q; want a number", workerID, parts[1])
	}
	return pid
}

// TestShutdownDrainsEmbeddedRun: SIGTERM while an embedded run executes stops accepting
// connections at once, lets the run finish, and only then closes the pool; exit 0.
func TestShutdownDrainsEmbeddedRun(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	env := testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"})
	p := startProc(t, env)
	a := p.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 2000})
	r := a.createRun(t, ws, "slow", map[string]any{"n": 1})
	waitRunRow(t, db, r.ID, "running", 10*time.Second)

	signaled := time.Now()
	p.signal(t, syscall.SIGTERM)
	p.waitLog(t, "worker stopping", 1, 5*time.Second)
	eventually(t, 3*time.Second, "the HTTP listener to refuse connections", func() bool {
		c, err := net.DialTimeout("tcp", env["LISTEN_ADDR"], time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case <-p.done:
		t.Fatalf("process exited before its 2 s run could have finished; want it draining")
	default:
	}
	if got := readRunRow(t, db, r.ID); got.Status != "running" {
		t.Fatalf("run while the listener is closed: got %q; want running (still draining)", got.Status)
	}

	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Errorf("exit status: got %d; want 0", code)
	}
	t.Logf("exited %v after SIGTERM", time.Since(signaled).Round(time.Millisecond))
	got := readRunRow(t, db, r.ID)
	if got.Status != "succeeded" || got.Attempt != 1 || string(got.Output) != `{"n": 1}` {
		t.Errorf("run after shutdown: got %s attempt %d output %s; want succeeded, 1, {\"n\": 1}", got.Status, got.Attempt, got.Output)
	}
	ptLogOrder(t, p.log.String(), "shutting down", "worker stopping", "run succeeded", "worker stopped",
		"stopped listening for notifications", "database pool closed")
}

// TestCrashRecovery: when the process executing a run is killed, another process
// recovers the run once its lease expires and executes it again as attempt 2; the run's
// errors keep attempt 1's lease-expired message.
func TestCrashRecovery(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	const lease = 1000 * time.Millisecond
	over := map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_LEASE_MS": "1000", "RUN_WORKER_POLL_MS": "100"}
	procs := map[int]*proc{}
	for range 2 {
		p := startProc(t, testEnv(t, dsn, over))
		procs[p.cmd.Process.Pid] = p
	}
	var a *app
	for _, p := range procs {
		a = p.app()
	}
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 2000})
	r := a.createRun(t, ws, "slow", "crash me")

	// Whichever process claimed the run is the one to kill.
	first, _ := waitRunRow(t, db, r.ID, "running", 10*time.Second)
	victim := procs[ptPidOfWorker(t, first.WorkerID.String)]
	if victim == nil || first.Attempt != 1 {
		t.Fatalf("running run: got worker %q attempt %d; want one of the test's processes, attempt 1", first.WorkerID.String, first.Attempt)
	}
	var survivor *proc
	for _, p := range procs {
		if p != victim {
			survivor = p
		}
	}
	victim.signal(t, syscall.SIGKILL)
	victim.wait(t, 10*time.Second)

	var row runRow
	recovered := eventually(t, 15*time.Second, "the killed process's run to be recovered", func() bool {
		row = readRunRow(t, db, r.ID)
		return len(row.Errors) > 0
	})
	reclaimed := eventually(t, 15*time.Second, "the recovered run to be claimed again", func() bool {
		row = readRunRow(t, db, r.ID)
		return row.Attempt == 2 && (row.Status == "running" || row.Status == "succeeded")
	}) + recovered
	t.Logf("lease %v, poll 100ms: recovered %v after SIGKILL, claimed again after %v",
		lease, recovered.Round(time.Millisecond), reclaimed.Round(time.Millisecond))
	if row.Status == "running" && ptPidOfWorker(t, row.WorkerID.String) != survivor.cmd.Process.Pid {
		t.Errorf("attempt 2 runs on worker %q; want the surviving process (pid %d)", row.WorkerID.String, survivor.cmd.Process.Pid)
	}

	row, _ = waitRunRow(t, db, r.ID, "succeeded", 15*time.Second)
	if row.Attempt != 2 {
		t.Errorf("attempt: got %d; want 2", row.Attempt)
	}
	want := "lease expired: worker " + first.WorkerID.String + " stopped renewing attempt 1"
	if len(row.Errors) != 1 || row.Errors[0].Attempt != 1 || row.Errors[0].Message != want {
		t.Errorf("errors: got %+v; want one entry for attempt 1 with message %q", row.Errors, want)
	}
	if got := survivor.app().metric(t, "agentapp_runs_recovered_total"); got != 1 {
		t.Errorf("survivor's agentapp_runs_recovered_total: got %g; want 1", got)
	}
	if !strings.Contains(survivor.log.String(), "recovered runs whose lease expired") {
		t.Errorf("survivor's log: got no %q; want it", "recovered runs whose lease expired")
	}
	if recovered > 2*lease+2*time.Second {
		t.Logf("note: recovery took %v, well over lease + poll (a loaded machine?)", recovered)
	}
}

// TestExactlyOnceAcrossProcesses: three serving processes with embedded workers drain
// 1,000 webhook runs; each is delivered exactly once, on attempt 1, and the work is
// shared.
func TestExactlyOnceAcrossProcesses(t *testing.T) {
	t.Parallel()
	const n = 1000
	dsn := testDB(t)
	db := openTestDB(t, dsn)

	var mu sync.Mutex
	deliveries := map[string]int{}
	var wrong []string
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			RunID   string `json:"run_id"`
			Attempt int    `json:"attempt"`
		}
		err := json.NewDecoder(r.Body).Decode(&body)
		key := r.Header.Get("Idempotency-Key")
		mu.Lock()
		deliveries[key]++
		if err != nil || key != body.RunID || body.Attempt != 1 {
			wrong = append(wrong, fmt.Sprintf("key %q run_id %q attempt %d err %v", key, body.RunID, body.Attempt, err))
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok":true}`)
	}))
	t.Cleanup(hook.Close)

	var procs []*proc
	for range 3 {
		procs = append(procs, startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "LOG_LEVEL": "info"})))
	}
	a := procs[0].app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": hook.URL})
	reqs := make([]map[string]any, n)
	for i := range reqs {
		reqs[i] = map[string]any{"agent": "hook", "input": map[string]any{"i": i}}
	}
	start := time.Now()
	var created struct{ Runs []runRecord }
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": reqs}, 201, &created)
	if len(created.Runs) != n {
		t.Fatalf("batch: got %d runs; want %d", len(created.Runs), n)
	}

	var done int
	eventually(t, 120*time.Second, fmt.Sprintf("%d runs to succeed", n), func() bool {
		if err := db.QueryRow(`SELECT count(*) FROM runs WHERE status = 'succeeded'`).Scan(&done); err != nil {
			t.Fatal(err)
		}
		return done == n
	})
	t.Logf("%d runs drained by 3 processes in %v", n, time.Since(start).Round(time.Millisecond))

	var onFirst, withErrors int
	if err := db.QueryRow(`SELECT count(*) FILTER (WHERE attempt = 1), count(*) FILTER (WHERE errors <> '[]')
		FROM runs`).Scan(&onFirst, &withErrors); err != nil {
		t.Fatal(err)
	}
	if onFirst != n || withErrors != 0 {
		t.Errorf("runs on attempt 1: got %d (%d with errors); want %d (none)", onFirst, withErrors, n)
	}
	mu.Lock()
	for _, r := range created.Runs {
		if c := deliveries[r.ID]; c != 1 {
			t.Errorf("run %s: got %d deliveries; want 1", r.ID, c)
		}
	}
	if len(deliveries) != n || len(wrong) > 0 {
		t.Errorf("webhook: got %d distinct runs and %d malformed deliveries (%v); want %d and none", len(deliveries), len(wrong), wrong, n)
	}
	mu.Unlock()

	// Each process counts the outcomes it wrote; the counters are bumped just after the
	// write, so allow them a moment to catch up with the table.
	var per []float64
	eventually(t, 10*time.Second, "the processes' succeeded counters to add up", func() bool {
		per, done = nil, 0
		for _, p := range procs {
			v := p.app().metric(t, `agentapp_run_attempts_total{status="succeeded"}`)
			per = append(per, v)
			done += int(v)
		}
		return done == n
	})
	working := 0
	for _, v := range per {
		if v > 0 {
			working++
		}
	}
	t.Logf("runs per process: %v", per)
	if working < 2 {
		t.Errorf("processes that executed runs: got %d (%v); want at least 2", working, per)
	}
}

// TestDrainDeadline: at SIGTERM a run longer than RUN_WORKER_SHUTDOWN_TIMEOUT_MS is
// canceled at the deadline and handed back to the queue with its attempt refunded.
func TestDrainDeadline(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	p := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "500"}))
	a := p.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "long", "echo", map[string]any{"delay_ms": 60000})
	r := a.createRun(t, ws, "long", nil)
	waitRunRow(t, db, r.ID, "running", 10*time.Second)

	signaled := time.Now()
	p.signal(t, syscall.SIGTERM)
	code := p.wait(t, 20*time.Second)
	took := time.Since(signaled)
	t.Logf("exited %v after SIGTERM with a 500ms drain timeout", took.Round(time.Millisecond))
	if code != 0 {
		t.Errorf("exit status: got %d; want 0", code)
	}
	if took < 500*time.Millisecond || took > 10*time.Second {
		t.Errorf("exit after SIGTERM: got %v; want the 500ms drain and then promptly out", took)
	}
	got := readRunRow(t, db, r.ID)
	if got.Status != "queued" || got.Attempt != 0 || got.Error.Valid || len(got.Errors) != 0 ||
		got.WorkerID.Valid || got.Leased || got.FinishedAt.Valid {
		t.Errorf("run after shutdown: got %+v; want queued, attempt 0, no error, no worker, no lease, not finished", got)
	}
	ptLogOrder(t, p.log.String(), "worker stopping", "drain deadline reached", "run requeued at shutdown",
		"worker stopped", "database pool closed")
}

// TestSecondSignalExitsAtOnce: a second SIGTERM during a long drain ends the process at
// once; the run it was executing stays running, for its lease to recover.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	p := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "60000",
		"RUN_WORKER_LEASE_MS": "1000"}))
	a := p.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "long", "echo", map[string]any{"delay_ms": 60000})
	r := a.createRun(t, ws, "long", nil)
	running, _ := waitRunRow(t, db, r.ID, "running", 10*time.Second)

	p.signal(t, syscall.SIGTERM)
	// Signals do not queue: the second must come once the first has been handled, which
	// the drain's first log line shows.
	p.waitLog(t, "worker stopping", 1, 5*time.Second)
	p.waitLog(t, "shutting down", 1, 5*time.Second)
	// Both lines are out, so the drain (60 s of it) is under way.
	select {
	case <-p.done:
		t.Fatalf("process exited after one SIGTERM; want it draining its 60 s run")
	default:
	}
	second := time.Now()
	p.signal(t, syscall.SIGTERM)
	code := p.wait(t, 5*time.Second)
	t.Logf("exited %v after the second SIGTERM, status %v", time.Since(second).Round(time.Millisecond), p.cmd.ProcessState)
	if p.cmd.ProcessState.Success() {
		t.Errorf("exit status: got %d; want a failure (killed by the signal)", code)
	}
	if strings.Contains(p.log.String(), "worker stopped") {
		t.Errorf("log: got %q; want the process gone before the drain ended", "worker stopped")
	}
	got := readRunRow(t, db, r.ID)
	if got.Status != "running" || got.Attempt != 1 || got.WorkerID != running.WorkerID || !got.Leased {
		t.Fatalf("run after the second signal: got %+v; want still running, attempt 1, leased by %s", got, running.WorkerID.String)
	}

	// Its lease (1 s) recovers it: another process takes it over as attempt 2.
	q := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "100"}))
	eventually(t, 15*time.Second, "the run to be recovered and claimed again", func() bool {
		got = readRunRow(t, db, r.ID)
		return got.Status == "running" && got.Attempt == 2
	})
	if pid := ptPidOfWorker(t, got.WorkerID.String); pid != q.cmd.Process.Pid || len(got.Errors) != 1 {
		t.Errorf("recovered run: got worker pid %d, errors %+v; want pid %d, one lease-expired error", pid, got.Errors, q.cmd.Process.Pid)
	}
}

// TestWorkerProcessDrains: `agentapp worker` (no HTTP) drains the same way as the
// embedded worker: SIGTERM lets the executing run finish, then it exits 0.
func TestWorkerProcessDrains(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	st := &store{db: db}
	ws := seedWorkspace(t, st)
	ctx := context.Background()
	if _, err := st.createAgent(ctx, agent{WorkspaceID: ws.ID, Name: "slow", Kind: "echo", Config: json.RawMessage(`{"delay_ms": 1500}`)}); err != nil {
		t.Fatal(err)
	}
	r, _, err := st.createRun(ctx, ws.ID, newRun{Agent: "slow", Input: json.RawMessage(`"drained"`), MaxAttempts: 3})
	if err != nil {
		t.Fatal(err)
	}
	p := startProc(t, testEnv(t, dsn, nil), "worker")
	waitRunRow(t, db, r.ID, "running", 15*time.Second)

	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Errorf("exit status: got %d; want 0", code)
	}
	if got := readRunRow(t, db, r.ID); got.Status != "succeeded" || got.Attempt != 1 || string(got.Output) != `"drained"` {
		t.Errorf("run after shutdown: got %s attempt %d output %s; want succeeded, 1, \"drained\"", got.Status, got.Attempt, got.Output)
	}
	ptLogOrder(t, p.log.String(), "worker started", "worker stopping", "run succeeded", "worker stopped")
}

// ptPostgres is a PostgreSQL cluster of the test's own, which the test may stop and
// start.
type ptPostgres struct {
	bin  string // directory of initdb, pg_ctl
	dir  string // temporary directory holding data and log
	port int
	root bool // run the server binaries as the OS user postgres
}

// ptPostgresBin returns the newest /usr/lib/postgresql/*/bin with initdb and pg_ctl,
// else the directory of initdb on PATH, else "".
func ptPostgresBin() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	version := func(d string) int {
		n, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		return n
	}
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if ptIsFile(filepath.Join(d, "initdb")) && ptIsFile(filepath.Join(d, "pg_ctl")) {
			return d
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil && ptIsFile(filepath.Join(filepath.Dir(p), "pg_ctl")) {
		return filepath.Dir(p)
	}
	return ""
}

// ptIsFile reports whether path is a regular file.
func ptIsFile(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

// newPTPostgres initdbs and starts a cluster on a free 127.0.0.1 port, stopped and
// removed when the test ends. Without PostgreSQL server binaries it skips the test,
// except under CI.
func newPTPostgres(t *testing.T) *ptPostgres {
	t.Helper()
	skip := func(why string) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatal(why)
		}
		t.Skip(why)
	}
	pg := &ptPostgres{bin: ptPostgresBin(), root: os.Geteuid() == 0}
	if pg.bin == "" {
		skip("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH): this test runs its own cluster")
	}
	dir, err := os.MkdirTemp("", "agentapp-pg-")
	if err != nil {
		t.Fatal(err)
	}
	pg.dir = dir
	t.Cleanup(func() {
		if ptIsFile(filepath.Join(pg.data(), "postmaster.pid")) {
			if out, err := pg.command("pg_ctl", "-D", pg.data(), "-m", "immediate", "-w", "stop").CombinedOutput(); err != nil {
				t.Logf("pg_ctl stop: %v\n%s", err, out)
			}
		}
		if t.Failed() {
			if log, err := os.ReadFile(filepath.Join(dir, "server.log")); err == nil {
				t.Logf("PostgreSQL log:\n%s", log)
			}
		}
		os.RemoveAll(dir)
	})
	if pg.root {
		// initdb and postgres refuse to run as root: they run as postgres, which must
		// reach and own the directory.
		u, err := user.Lookup("postgres")
		if err != nil {
			skip("running as root needs the OS user postgres to run a PostgreSQL cluster: " + err.Error())
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := pg.command("initdb", "-D", pg.data(), "-U", "postgres", "--auth=trust", "-E", "UTF8",
		"--locale=C", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	// The port comes from freeAddr and may be taken in between: try a few.
	for try := 0; ; try++ {
		_, port, _ := net.SplitHostPort(freeAddr(t))
		pg.port, _ = strconv.Atoi(port)
		err := pg.startErr()
		if err == nil {
			return pg
		}
		if try == 2 {
			t.Fatalf("start PostgreSQL: %v", err)
		}
	}
}

// data is the cluster's data directory; its unix socket lives there too.
func (pg *ptPostgres) data() string { return filepath.Join(pg.dir, "data") }

// dsn is the URL of the cluster's postgres database.
func (pg *ptPostgres) dsn() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=5", pg.port)
}

// command runs a PostgreSQL binary, as the OS user postgres when the test runs as root.
func (pg *ptPostgres) command(name string, args ...string) *exec.Cmd {
	path := filepath.Join(pg.bin, name)
	var cmd *exec.Cmd
	if pg.root {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	} else {
		cmd = exec.Command(path, args...)
	}
	cmd.Dir = "/" // postgres may not be able to enter the test's working directory
	return cmd
}

// startErr starts the cluster on pg.port and waits until it accepts connections.
func (pg *ptPostgres) startErr() error {
	out, err := pg.command("pg_ctl", "-D", pg.data(), "-w", "-t", "60", "-l", filepath.Join(pg.dir, "server.log"),
		"-o", fmt.Sprintf("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories=%s -c fsync=off",
			pg.port, pg.data()), "start").CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl start: %v\n%s", err, out)
	}
	return nil
}

// start starts the cluster again, on the same port.
func (pg *ptPostgres) start(t testing.TB) {
	t.Helper()
	if err := pg.startErr(); err != nil {
		t.Fatal(err)
	}
}

// stop stops the cluster (fast shutdown: sessions are terminated) and waits for it.
func (pg *ptPostgres) stop(t testing.TB) {
	t.Helper()
	if out, err := pg.command("pg_ctl", "-D", pg.data(), "-m", "fast", "-w", "-t", "60", "stop").CombinedOutput(); err != nil {
		t.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
}

// TestDatabaseOutage: while PostgreSQL is down the process keeps running, answers API
// requests 503 (never 500, never hanging), /healthz 200 and /readyz 503, and logs the
// outage a bounded number of times; once PostgreSQL is back it recovers on its own.
func TestDatabaseOutage(t *testing.T) {
	t.Parallel()
	pg := newPTPostgres(t)
	env := testEnv(t, pg.dsn(), map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "100", "LOG_LEVEL": "info"})
	p := startProc(t, env)
	a := p.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 1000})
	r := a.createRun(t, ws, "echo", "before")
	a.waitRunStatus(t, ws, r.ID, "succeeded", 10*time.Second)
	// This run finishes while the database is down: its outcome must wait for it.
	inFlight := a.createRun(t, ws, "slow", "across the outage")
	a.waitRunStatus(t, ws, inFlight.ID, "running", 10*time.Second)

	logBefore := len(p.log.String())
	const failedCycles = `agentapp_worker_cycles_total{result="error"}`
	failedBefore := a.metric(t, failedCycles)
	pg.stop(t)
	wsPath := "/v1/workspaces/" + ws.ID
	requests := []struct {
		method, path, token string
		body                any
	}{
		{"POST", wsPath + "/runs", ws.APIKey, map[string]any{"agent": "echo", "input": "during"}},
		{"GET", wsPath + "/runs/" + r.ID, ws.APIKey, nil},
		{"GET", wsPath + "/runs/" + r.ID + "?wait_ms=200", ws.APIKey, nil},
		{"GET", wsPath + "/runs", ws.APIKey, nil},
		{"GET", wsPath + "/stats", ws.APIKey, nil},
		{"GET", wsPath + "/agents", ws.APIKey, nil},
		{"POST", "/v1/workspaces", testAdminToken, map[string]any{"name": "during"}},
		{"POST", wsPath + "/runs/batch", ws.APIKey, map[string]any{"runs": []any{map[string]any{"agent": "echo"}}}},
	}
	// Twice over: the first round meets the pool's dead connections, the second finds
	// none and has to dial.
	for round := range 2 {
		for _, q := range requests {
			start := time.Now()
			status, _, body, err := send(testClient, q.method, a.base+q.path, q.token, nil, q.body)
			took := time.Since(start)
			var e struct {
				Error struct{ Code string } `json:"error"`
			}
			json.Unmarshal(body, &e)
			if err != nil || status != 503 || e.Error.Code != "unavailable" || took > 7*time.Second {
				t.Errorf("round %d, %s %s with the database down: got %d %s (err %v) after %v; want 503 unavailable within seconds",
					round, q.method, q.path, status, body, err, took.Round(time.Millisecond))
			}
		}
	}
	if status, _, _ := a.do(t, "GET", "/healthz", "", nil, nil); status != 200 {
		t.Errorf("/healthz with the database down: got %d; want 200", status)
	}
	eventually(t, 10*time.Second, "/readyz to answer 503", func() bool {
		status, r := a.readyz(t)
		return status == 503 && r.Database == "unreachable"
	})
	if got := a.metric(t, "agentapp_database_up"); got != 0 {
		t.Errorf("agentapp_database_up with the database down: got %g; want 0", got)
	}
	// Stay down for many failed cycles, so a loop that logged every one would show.
	eventually(t, 30*time.Second, "20 worker cycles failed with the database down", func() bool {
		return a.metric(t, failedCycles) >= failedBefore+20
	})
	outage := p.log.String()[logBefore:]

	pg.start(t)
	back := time.Now()
	eventually(t, 20*time.Second, "/readyz to answer 200 again", func() bool {
		status, _ := a.readyz(t)
		return status == 200
	})
	t.Logf("ready again %v after PostgreSQL restarted", time.Since(back).Round(time.Millisecond))
	r2 := a.createRun(t, ws, "echo", "after")
	a.waitRunStatus(t, ws, r2.ID, "succeeded", 10*time.Second)
	if got := a.waitRunStatus(t, ws, inFlight.ID, "succeeded", 10*time.Second); got.Attempt != 1 || string(got.Errors) != "[]" {
		t.Errorf("run that finished during the outage: got attempt %d errors %s; want attempt 1, no errors", got.Attempt, got.Errors)
	}
	if got := strings.Count(p.log.String(), "worker cycle succeeded again"); got != 1 {
		t.Errorf("log: got %d %q; want 1", got, "worker cycle succeeded again")
	}
	eventually(t, 15*time.Second, "/readyz worker.listening true again", func() bool {
		_, r := a.readyz(t)
		return r.Worker.Listening
	})

	// The outage in the log: one line from the loop, at most one from the listener, one
	// warning per failed request, and the outcome writer's retries, which back off
	// exponentially (100 ms, doubling); nothing per poll.
	if got := strings.Count(outage, "worker cycle failed"); got != 1 {
		t.Errorf("log during the outage: got %d %q; want 1 (about 20 cycles failed)", got, "worker cycle failed")
	}
	if got := strings.Count(outage, "writing run outcomes failed"); got > 8 {
		t.Errorf("log during the outage: got %d %q; want at most 8 (exponential backoff)", got, "writing run outcomes failed")
	}
	other := 0
	for _, line := range strings.Split(strings.TrimSpace(outage), "\n") {
		if !strings.Contains(line, "database unavailable") && !strings.Contains(line, "writing run outcomes failed") {
			other++
		}
	}
	if other > 3 {
		t.Errorf("log during the outage: got %d lines besides the per-request warnings and write retries; want at most 3:\n%s", other, outage)
	}
}

// TestWakeAcrossProcesses: a run created through an API-only process wakes the idle
// embedded worker of another process at once, through NOTIFY, long before its next tick.
func TestWakeAcrossProcesses(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	agentappBinary(t, true) // built before the clock starts
	bStarted := time.Now()  // B's loop starts later, so its first tick is more than 10 s after this
	b := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "10000"}))
	a := startProc(t, testEnv(t, dsn, nil)).app()
	ws := a.createWorkspace(t)
	b.app().waitListening(t, true)

	created := time.Now()
	r := a.createRun(t, ws, "echo", "wake")
	eventually(t, 3*time.Second, "the run to succeed through B's wake-up", func() bool {
		return a.getRun(t, ws, r.ID).Status == "succeeded"
	})
	took := time.Since(created)
	t.Logf("run created through A succeeded on B %v later (B polls every 10 s)", took.Round(time.Millisecond))
	if since := time.Since(bStarted); since > 9*time.Second {
		t.Fatalf("time since B started: got %v; want under 9s, or B's first tick may have run the run (cannot tell a wake-up from a tick)", since)
	}
	if got := b.app().metric(t, `agentapp_run_attempts_total{status="succeeded"}`); got != 1 {
		t.Errorf("B's succeeded attempts: got %g; want 1", got)
	}
}

// TestListenerReconnect: when the listening connection dies, runs still complete by
// polling; once it is back, wake-ups are back too, and runs queued meanwhile are caught up.
//
// One process cannot prove both: polling is proved by a short poll, a wake-up by a long
// one. So two processes share the database, each with an embedded worker filtered to its
// own workspace: "fast" polls every 200 ms, "slow" every 30 s. The test keeps the
// listeners down by disallowing new connections to the database before terminating the
// LISTEN backends (the pools keep their open connections), so nothing reconnects before
// the test says so. Everything "slow" does happens long before its first tick, so it can
// only come from notifications:
//   - listeners down: a "fast" run completes while fast's /readyz says not listening
//     (polling), and a "slow" run stays queued (no wake-up without the listener);
//   - listeners back: the queued "slow" run completes (the reconnect wakes the worker, as
//     notifications may have been missed), and a new "slow" run completes in well under
//     a second or two (wake-ups are back).
func TestListenerReconnect(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	name := dbName(t, dsn)
	st := &store{db: openTestDB(t, dsn)}
	fastWS, slowWS := seedWorkspace(t, st), seedWorkspace(t, st)
	fast := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "200",
		"RUN_WORKER_WORKSPACE_ID": fastWS.ID}))
	slowStarted := time.Now() // slow's loop starts later, so its first tick is more than 30 s after this
	slow := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "30000",
		"RUN_WORKER_WORKSPACE_ID": slowWS.ID}))
	fast.app().waitListening(t, true)
	slow.app().waitListening(t, true)
	a := fast.app() // the API of either process serves every workspace

	// Warm up: both workers execute a run, so their pools hold open connections.
	for _, ws := range []testWorkspace{fastWS, slowWS} {
		r := a.createRun(t, ws, "echo", "warm-up")
		a.waitRunStatus(t, ws, r.ID, "succeeded", 5*time.Second)
	}
	// ... and the API pool holds several: a create and its announcement (a NOTIFY sent
	// after it, on the same pool) may overlap the next request.
	var warm sync.WaitGroup
	for range 8 {
		warm.Add(1)
		go func() {
			defer warm.Done()
			send(testClient, "GET", a.base+"/readyz", "", nil, nil)
		}()
	}
	warm.Wait()

	// PostgreSQL cannot disallow connections to the database a session is in: the admin
	// connection is to DATABASE_URL's own database.
	admin := adminDB(t)
	allowConnections := func(allow bool) {
		t.Helper()
		if _, err := admin.Exec(fmt.Sprintf(`ALTER DATABASE %s ALLOW_CONNECTIONS %t`, name, allow)); err != nil {
			t.Fatalf("allow connections %t: got %v; want it done", allow, err)
		}
	}
	allowConnections(false)
	var killed int
	if err := admin.QueryRow(`SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
		FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'`, name).Scan(&killed); err != nil {
		t.Fatal(err)
	}
	if killed != 2 {
		t.Fatalf("terminated LISTEN backends: got %d; want 2 (one per process)", killed)
	}
	for _, p := range []*proc{fast, slow} {
		p.waitLog(t, "notification connection lost", 1, 5*time.Second)
		eventually(t, 5*time.Second, "/readyz worker.listening false", func() bool {
			_, r := p.app().readyz(t)
			return !r.Worker.Listening
		})
	}

	pending := a.createRun(t, slowWS, "echo", "missed notification")
	r1 := a.createRun(t, fastWS, "echo", "polled")
	took := eventually(t, 5*time.Second, "a fast run to succeed by polling", func() bool {
		return a.getRun(t, fastWS, r1.ID).Status == "succeeded"
	})
	t.Logf("with the listener down, a run succeeded by polling (200 ms) in %v", took.Round(time.Millisecond))
	if _, r := fast.app().readyz(t); r.Worker.Listening {
		t.Fatalf("fast's /readyz: got listening true; want false (the listener must still be down)")
	}
	if got := a.getRun(t, slowWS, pending.ID).Status; got != "queued" {
		t.Errorf("slow run with slow's listener down: got %q; want queued (no notification, no tick yet)", got)
	}

	allowConnections(true)
	allowed := time.Now()
	for _, p := range []*proc{fast, slow} {
		p.waitLog(t, "listening for notifications", 2, 15*time.Second)
	}
	t.Logf("listeners back %v after connections were allowed again", time.Since(allowed).Round(time.Millisecond))
	a.waitRunStatus(t, slowWS, pending.ID, "succeeded", 5*time.Second)

	slow.app().waitListening(t, true)
	r3 := a.createRun(t, slowWS, "echo", "woken")
	took = eventually(t, 5*time.Second, "a slow run to succeed through a wake-up", func() bool {
		return a.getRun(t, slowWS, r3.ID).Status == "succeeded"
	})
	t.Logf("after the reconnect, a run succeeded on the 30 s-poll worker in %v", took.Round(time.Millisecond))
	if since := time.Since(slowStarted); since > 29*time.Second {
		t.Fatalf("time since slow started: got %v; want under 29s, or its first tick may have run the runs (cannot tell wake-ups from ticks)", since)
	}
	for _, p := range []*proc{fast, slow} {
		if got := strings.Count(p.log.String(), "notification connection lost"); got != 1 {
			t.Errorf("log: got %d %q; want 1", got, "notification connection lost")
		}
	}
}

// TestWaitAcrossProcesses: a long poll (?wait_ms) on an API-only process answers as soon
// as another process's worker finishes the run.
func TestWaitAcrossProcesses(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	b := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ap := startProc(t, testEnv(t, dsn, nil))
	a := ap.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 1000})
	ap.waitLog(t, "listening for notifications", 1, 10*time.Second)
	b.app().waitListening(t, true)

	r := a.createRun(t, ws, "slow", "waited")
	start := time.Now()
	var got runRecord
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+r.ID+"?wait_ms=10000", ws.APIKey, nil, 200, &got)
	took := time.Since(start)
	answered := time.Now()
	if got.Status != "succeeded" {
		t.Fatalf("GET run ?wait_ms=10000: got status %q after %v; want succeeded", got.Status, took)
	}
	row := readRunRow(t, db, r.ID)
	lag := answered.Sub(row.FinishedAt.Time)
	t.Logf("long poll answered after %v, %v after the run finished", took.Round(time.Millisecond), lag.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("long poll: got the answer after %v; want it soon after the 1 s run finished, far under 10 s", took)
	}
}

// TestShutdownAnswersLongPoll: long polls (?wait_ms) in flight at SIGTERM are answered
// before the pool closes: one on a run that finishes during the drain with its final
// state, one on a run that stays queued with the run as it stands, once the drain is over.
func TestShutdownAnswersLongPoll(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	// One slot: the second run stays queued while the first executes.
	p := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_CONCURRENCY": "1"}))
	a := p.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 1500})
	draining := a.createRun(t, ws, "slow", "draining")
	waitRunRow(t, db, draining.ID, "running", 10*time.Second)
	queued := a.createRun(t, ws, "slow", "queued")
	a.waitListening(t, true)

	type answer struct {
		status int
		body   []byte
		run    runRecord
		err    error
		at     time.Time
	}
	poll := func(id string) <-chan answer {
		ch := make(chan answer, 1)
		go func() {
			var ans answer
			ans.status, _, ans.body, ans.err = send(testClient, "GET", a.base+"/v1/workspaces/"+ws.ID+"/runs/"+id+"?wait_ms=60000", ws.APIKey, nil, nil)
			if ans.err == nil && ans.status == 200 {
				ans.err = json.Unmarshal(ans.body, &ans.run)
			}
			ans.at = time.Now()
			ch <- ans
		}()
		return ch
	}
	drainingAns, queuedAns := poll(draining.ID), poll(queued.ID)
	// Nothing shows that the requests have arrived (no log line or metric marks a request
	// until it ends): a sleep is all there is. Then make sure they are still waiting.
	time.Sleep(300 * time.Millisecond)
	if got := readRunRow(t, db, draining.ID); got.Status != "running" {
		t.Fatalf("run %s before SIGTERM: got %q; want running", draining.ID, got.Status)
	}
	signaled := time.Now()
	p.signal(t, syscall.SIGTERM)
	for _, c := range []struct {
		name string
		ch   <-chan answer
		want runStatus
	}{{"draining run", drainingAns, "succeeded"}, {"queued run", queuedAns, "queued"}} {
		select {
		case got := <-c.ch:
			if got.err != nil || got.status != 200 || got.run.Status != c.want {
				t.Errorf("long poll on the %s at shutdown: got %d %s (err %v); want 200 and the run, %s", c.name, got.status, got.body, got.err, c.want)
			}
			t.Logf("long poll on the %s answered %v after SIGTERM", c.name, got.at.Sub(signaled).Round(time.Millisecond))
			if c.want == "queued" {
				finished := readRunRow(t, db, draining.ID).FinishedAt
				if !finished.Valid || got.at.Before(finished.Time) {
					t.Errorf("long poll on the queued run answered at %v; want after the drain (the other run finished at %v)", got.at, finished.Time)
				}
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("long poll on the %s not answered within 20s of SIGTERM; want it answered once the drain is over", c.name)
		}
	}
	if code := p.wait(t, 15*time.Second); code != 0 {
		t.Errorf("exit status: got %d; want 0", code)
	}
	ptLogOrder(t, p.log.String(), "shutting down", "worker stopped", "stopped listening for notifications", "database pool closed")
}

// TestShutdownFinishesInflightRequest: a request in flight at SIGTERM (here an insert held
// up by a table lock) is finished, not cut off, before the pool closes.
func TestShutdownFinishesInflightRequest(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	p := startProc(t, testEnv(t, dsn, nil))
	a := p.app()
	ws := a.createWorkspace(t)

	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`LOCK TABLE runs IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	type answer struct {
		status int
		body   []byte
		err    error
	}
	answered := make(chan answer, 1)
	go func() {
		status, _, body, err := send(testClient, "POST", a.base+"/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, nil,
			map[string]any{"agent": "echo", "input": "in flight"})
		answered <- answer{status, body, err}
	}()
	eventually(t, 10*time.Second, "the insert to wait for the table lock", func() bool {
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
			AND wait_event_type = 'Lock' AND query LIKE '%agentapp_create_runs%'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 1
	})

	p.signal(t, syscall.SIGTERM)
	// Past this line shutdown only waits for requests, then closes the pools.
	p.waitLog(t, "stopped listening for notifications", 1, 10*time.Second)
	// Nothing marks the moment shutdown starts waiting for requests (the next line, "database
	// pool closed", comes only after): give a wrong shutdown a moment to cut the request.
	time.Sleep(300 * time.Millisecond)
	select {
	case got := <-answered:
		t.Fatalf("request in flight at SIGTERM: got %d %s (err %v) while its insert still waited; want it to wait", got.status, got.body, got.err)
	default:
	}
	if strings.Contains(p.log.String(), "database pool closed") {
		t.Fatalf("log: got %q while a request was in flight; want the pool open until it is finished", "database pool closed")
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	got := <-answered
	var run runRecord
	if got.err != nil || got.status != 201 || json.Unmarshal(got.body, &run) != nil || run.Status != "queued" {
		t.Fatalf("request in flight at SIGTERM: got %d %s (err %v); want 201 and the run", got.status, got.body, got.err)
	}
	if code := p.wait(t, 15*time.Second); code != 0 {
		t.Errorf("exit status: got %d; want 0", code)
	}
	if got := readRunRow(t, db, run.ID); got.Status != "queued" {
		t.Errorf("run created by the finished request: got %q; want queued", got.Status)
	}
}
