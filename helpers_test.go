package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// testAdminToken is the ADMIN_TOKEN of every server the tests start.
const testAdminToken = "test-admin-token-0123456789"

// testDB creates a database of its own for the test on the server DATABASE_URL names,
// applies the schema, and returns its URL; the database is dropped when the test ends.
// Without DATABASE_URL the test is skipped, except under CI, where that is a failure.
func testDB(t testing.TB) string {
	t.Helper()
	base := os.Getenv("DATABASE_URL")
	if base == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("DATABASE_URL is not set: under CI the database tests must run (see README: make test)")
		}
		t.Skip("DATABASE_URL is not set: skipping a test that needs PostgreSQL (make test starts one)")
	}
	admin := adminDB(t)
	name := "agentapp_test_" + randomHex(6)
	if _, err := admin.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatalf("create test database: got %v; want it created", err)
	}
	dsn := withDatabase(t, base, name)
	t.Cleanup(func() { // registered after admin's own cleanup, so it runs before admin closes
		if _, err := admin.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)"); err != nil {
			t.Logf("drop test database %s: %v", name, err)
		}
	})
	db := openTestDB(t, dsn)
	defer db.Close()
	if err := (&store{db: db}).applySchema(context.Background()); err != nil {
		t.Fatalf("apply schema: got %v; want it applied", err)
	}
	return dsn
}

// withDatabase returns the URL base with its database replaced by name.
func withDatabase(t testing.TB, base, name string) string {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Fatalf("DATABASE_URL: got %q; want a postgres:// URL for the tests", base)
	}
	u.Path = "/" + name
	q := u.Query()
	if q.Get("sslmode") == "" {
		q.Set("sslmode", "disable")
	}
	if q.Get("connect_timeout") == "" {
		q.Set("connect_timeout", "5")
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// dbName returns the database a postgres:// URL names.
func dbName(t testing.TB, dsn string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatalf("database URL: got %v; want a URL", err)
	}
	return strings.TrimPrefix(u.Path, "/")
}

// openTestDB opens a small pool on dsn, closed when the test ends.
func openTestDB(t testing.TB, dsn string) *sql.DB {
	t.Helper()
	db, err := openDB(dsn, 4)
	if err != nil {
		t.Fatalf("open database: got %v; want it open", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// adminDB opens a pool on DATABASE_URL's own database, never a test's: there the tests
// create and drop their databases, forbid connections to one, and read its statistics
// without adding a session to it.
func adminDB(t testing.TB) *sql.DB {
	t.Helper()
	base := os.Getenv("DATABASE_URL")
	return openTestDB(t, withDatabase(t, base, dbName(t, base)))
}

// freeAddr returns a 127.0.0.1 address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen on 127.0.0.1:0: got %v; want a free port", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// testEnv is the environment of a server started by a test: the database, a free
// address, the admin token, a short poll interval, plus the given overrides.
func testEnv(t testing.TB, dsn string, overrides map[string]string) map[string]string {
	env := map[string]string{
		"DATABASE_URL":       dsn,
		"LISTEN_ADDR":        freeAddr(t),
		"ADMIN_TOKEN":        testAdminToken,
		"RUN_WORKER_POLL_MS": "50",
		"LOG_LEVEL":          "debug",

		"AGENT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", // unset, webhooks reach public addresses only (SPEC)
	}
	for k, v := range overrides {
		env[k] = v
	}
	return env
}

// eventually polls cond every 10 ms until it is true and returns how long that took; it
// fails the test once timeout has passed. cond runs on the caller's goroutine, so it may
// fail the test itself.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not true after %v", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testLogger discards below warn unless the test is verbose.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// testWriter writes each line to the test's log.
type testWriter struct{ t testing.TB }

// Write logs p, without its final newline.
func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// HTTP: send is the one function that sends a request; app.do and app.mustDo wrap it for
// the test goroutine, and the app methods below wrap those.

// testClient sends the tests' requests: a server that hangs fails the test after two
// minutes instead of blocking it. It keeps connections alive: with "Connection: close" a
// server that refuses a large body (413) resets the connection before the client has
// written it, and the client sees the reset instead of the answer.
var testClient = &http.Client{Timeout: 2 * time.Minute}

// send sends a request with c, with the bearer token (if any) and the extra headers, and
// returns the status, the response headers and the body, or the error. body is nil
// (none), a string or []byte (sent as is), an io.Reader (sent as is: chunked unless it
// is a *bytes.Reader or *strings.Reader), or anything else (sent as JSON); a body goes
// with Content-Type: application/json unless hdr says otherwise. It never fails the test
// itself, so any goroutine may call it.
func send(c *http.Client, method, url, token string, hdr map[string]string, body any) (int, http.Header, []byte, error) {
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	case io.Reader:
		r = b
	default:
		data, err := json.Marshal(b)
		if err != nil {
			return 0, nil, nil, err
		}
		r = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		return 0, nil, nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if r != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, data, err
}

// app is an agentapp under test, reached over HTTP at base.
type app struct {
	base string
	log  *syncBuffer
}

// do sends a request to the app (see send for hdr and body) and returns the status, the
// response headers and the body; a request that gets no answer fails the test.
func (a *app) do(t testing.TB, method, path, token string, hdr map[string]string, body any) (int, http.Header, []byte) {
	t.Helper()
	status, h, data, err := send(testClient, method, a.base+path, token, hdr, body)
	if err != nil {
		t.Fatalf("%s %s: got %v; want an answer", method, path, err)
	}
	return status, h, data
}

// mustDo is do that fails the test unless the status is want, and decodes the body into
// out (when not nil).
func (a *app) mustDo(t testing.TB, method, path, token string, body any, want int, out any) {
	t.Helper()
	status, _, data := a.do(t, method, path, token, nil, body)
	if status != want {
		t.Fatalf("%s %s: got status %d; want %d; body %s", method, path, status, want, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: got body %s (%v); want JSON", method, path, data, err)
		}
	}
}

// waitHealthy waits until /healthz answers 200; it fails the test if exited reports the
// app gone first.
func (a *app) waitHealthy(t testing.TB, exited <-chan error) {
	t.Helper()
	eventually(t, 30*time.Second, "agentapp /healthz answers 200", func() bool {
		select {
		case err := <-exited:
			t.Fatalf("agentapp before /healthz answered: got exit %v; want it running", err)
		default:
		}
		status, _, _, err := send(testClient, "GET", a.base+"/healthz", "", nil, nil)
		return err == nil && status == http.StatusOK
	})
}

// testWorkspace is a workspace with its key.
type testWorkspace struct {
	ID     string `json:"id"`
	APIKey string `json:"api_key"`
}

// createWorkspace creates a workspace with an echo agent named "echo".
func (a *app) createWorkspace(t testing.TB) testWorkspace {
	t.Helper()
	var ws testWorkspace
	a.mustDo(t, "POST", "/v1/workspaces", testAdminToken, map[string]any{"name": "test"}, 201, &ws)
	a.createAgent(t, ws, "echo", "echo", map[string]any{})
	return ws
}

// createAgent creates an agent in ws.
func (a *app) createAgent(t testing.TB, ws testWorkspace, name, kind string, config any) {
	t.Helper()
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey,
		map[string]any{"name": name, "kind": kind, "config": config}, 201, nil)
}

// createRun enqueues a run of the named agent and returns it.
func (a *app) createRun(t testing.TB, ws testWorkspace, agent string, input any) runRecord {
	t.Helper()
	var r runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
		map[string]any{"agent": agent, "input": input}, 201, &r)
	return r
}

// getRun reads a run through the API.
func (a *app) getRun(t testing.TB, ws testWorkspace, id string) runRecord {
	t.Helper()
	var r runRecord
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+id, ws.APIKey, nil, 200, &r)
	return r
}

// waitRunStatus polls the run until it has the status and returns it.
func (a *app) waitRunStatus(t testing.TB, ws testWorkspace, id, status string, timeout time.Duration) runRecord {
	t.Helper()
	var r runRecord
	eventually(t, timeout, fmt.Sprintf("run %s has status %q", id, status), func() bool {
		r = a.getRun(t, ws, id)
		return string(r.Status) == status
	})
	return r
}

// stats returns a workspace's run counts.
func (a *app) stats(t testing.TB, ws testWorkspace) runStats {
	t.Helper()
	var st runStats
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/stats", ws.APIKey, nil, 200, &st)
	return st
}

// process asks the app for one worker cycle through the worker API.
func (a *app) process(t testing.TB, body any) summary {
	t.Helper()
	var s summary
	a.mustDo(t, "POST", "/v1/worker/process", testAdminToken, body, 200, &s)
	return s
}

// readiness is what /readyz answers.
type readiness struct {
	Status   string `json:"status"`
	Database string `json:"database"`
	Worker   struct {
		Embedded    bool    `json:"embedded"`
		Alive       bool    `json:"alive"`
		Listening   bool    `json:"listening"`
		LastCycleAt *string `json:"last_cycle_at"`
	} `json:"worker"`
}

// readyz asks for /readyz and returns its status and body.
func (a *app) readyz(t testing.TB) (int, readiness) {
	t.Helper()
	status, _, body := a.do(t, "GET", "/readyz", "", nil, nil)
	var r readiness
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("GET /readyz: got %s (%v); want JSON", body, err)
	}
	return status, r
}

// waitListening waits until the app's embedded worker has done a cycle and its notifier
// says it listens (or, with want false, that it does not). lib/pq reports the first
// connection before the LISTEN statements issued right after it have run (three round
// trips) and nothing shows when they have, so the wait ends with a short settle; wake-up
// tests measured from here would otherwise race those statements.
func (a *app) waitListening(t testing.TB, want bool) {
	t.Helper()
	eventually(t, 15*time.Second, fmt.Sprintf("%s /readyz worker.listening is %v", a.base, want), func() bool {
		status, r := a.readyz(t)
		return status == 200 && r.Worker.LastCycleAt != nil && r.Worker.Listening == want
	})
	if want {
		time.Sleep(200 * time.Millisecond)
	}
}

// metrics reads /metrics: series (name with labels, as printed) → value.
func (a *app) metrics(t testing.TB) map[string]float64 {
	t.Helper()
	status, _, body := a.do(t, "GET", "/metrics", "", nil, nil)
	if status != 200 {
		t.Fatalf("GET /metrics: got %d; want 200", status)
	}
	return parseMetrics(t, string(body))
}

// metric returns the value of one series on /metrics; 0 when it is absent.
func (a *app) metric(t testing.TB, series string) float64 {
	t.Helper()
	return a.metrics(t)[series]
}

// parseMetrics reads Prometheus text: series (name with labels) → value. Every line that
// is not a comment must be a series and its value a number.
func parseMetrics(t testing.TB, body string) map[string]float64 {
	t.Helper()
	series := map[string]float64{}
	for _, line := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		if strings.HasPrefix(line, "#") {
			if f := strings.Fields(line); len(f) < 4 || (f[1] != "HELP" && f[1] != "TYPE") {
				t.Errorf("metrics: got comment line %q; want # HELP or # TYPE", line)
			}
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Errorf("metrics: got line %q; want a series and a value", line)
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Errorf("metrics: got value %q in %q; want a number", line[i+1:], line)
		}
		series[line[:i]] = v
	}
	return series
}

// cycles returns the worker cycles the app has counted, whatever their result.
func (a *app) cycles(t testing.TB) float64 {
	t.Helper()
	var n float64
	for series, v := range a.metrics(t) {
		if strings.HasPrefix(series, "agentapp_worker_cycles_total{") {
			n += v
		}
	}
	return n
}

// startApp runs `agentapp serve` in this test process through run, with the given
// environment, and waits until /healthz answers. It is stopped (and waited for) when the
// test ends.
func startApp(t testing.TB, env map[string]string) *app {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a := &app{base: "http://" + env["LISTEN_ADDR"], log: &syncBuffer{}}
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve"}, func(k string) string { return env[k] }, io.Discard, a.log)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agentapp serve: got %v; want a clean stop", err)
			}
		case <-time.After(90 * time.Second):
			t.Errorf("agentapp serve: still running 90s after its context ended; want it stopped; log:\n%s", a.log)
		}
		if t.Failed() {
			t.Logf("agentapp log:\n%s", a.log)
		}
	})
	a.waitHealthy(t, done)
	return a
}

// Database rows, for tests that look under the API.

// runRow is a run as read straight from the runs table.
type runRow struct {
	Status     string
	Attempt    int
	Error      sql.NullString
	Errors     []runError
	WorkerID   sql.NullString
	Leased     bool // lease_expires_at is set
	FinishedAt sql.NullTime
	Output     []byte
}

// runError is one entry of a run's errors.
type runError struct {
	Attempt int       `json:"attempt"`
	At      time.Time `json:"at"`
	Message string    `json:"message"`
}

// readRunRow reads a run straight from the table.
func readRunRow(t testing.TB, db *sql.DB, id string) runRow {
	t.Helper()
	var r runRow
	var errs []byte
	err := db.QueryRow(`SELECT status, attempt, error, errors, worker_id, lease_expires_at IS NOT NULL,
		finished_at, output FROM runs WHERE id = $1`, id).
		Scan(&r.Status, &r.Attempt, &r.Error, &errs, &r.WorkerID, &r.Leased, &r.FinishedAt, &r.Output)
	if err != nil {
		t.Fatalf("read run %s: got %v; want the row", id, err)
	}
	if err := json.Unmarshal(errs, &r.Errors); err != nil {
		t.Fatalf("run %s: got errors %s (%v); want a JSON array", id, errs, err)
	}
	return r
}

// waitRunRow polls the table until the run has the status and returns it and how long
// that took.
func waitRunRow(t testing.TB, db *sql.DB, id, status string, timeout time.Duration) (runRow, time.Duration) {
	t.Helper()
	var r runRow
	took := eventually(t, timeout, fmt.Sprintf("run %s has status %q in the table", id, status), func() bool {
		r = readRunRow(t, db, id)
		return r.Status == status
	})
	return r, took
}

// seedWorkspace creates a workspace with an echo agent named "echo" straight in the
// database, for servers that must be started already limited to it.
func seedWorkspace(t testing.TB, st *store) testWorkspace {
	t.Helper()
	ctx := context.Background()
	w, err := st.createWorkspace(ctx, "seed")
	if err != nil {
		t.Fatalf("create workspace: got %v; want it created", err)
	}
	if _, err := st.createAgent(ctx, agent{WorkspaceID: w.ID, Name: "echo", Kind: "echo", Config: json.RawMessage(`{}`)}); err != nil {
		t.Fatalf("create agent: got %v; want it created", err)
	}
	return testWorkspace{ID: w.ID, APIKey: w.APIKey}
}

// sqlExec returns a function that executes a statement on db and fails the test if it fails.
func sqlExec(t testing.TB, db *sql.DB) func(query string, args ...any) {
	return func(query string, args ...any) {
		t.Helper()
		if _, err := db.Exec(query, args...); err != nil {
			t.Fatalf("%s: %v", query, err)
		}
	}
}

// seedEchoWorkspaces creates n workspaces straight in a database that has none, each with
// an echo agent named "echo", in two statements.
func seedEchoWorkspaces(t testing.TB, db *sql.DB, n int) {
	t.Helper()
	exec := sqlExec(t, db)
	exec(`INSERT INTO workspaces (name, api_key_hash)
		SELECT 'seed-' || w, sha256(convert_to('seed-key-' || w, 'UTF8')) FROM generate_series(1, $1) w`, n)
	exec(`INSERT INTO agents (workspace_id, name, kind) SELECT id, 'echo', 'echo' FROM workspaces`)
}

// seedRuns creates, straight in the database, a workspace with an echo agent and n
// queued runs of it, oldest first.
func seedRuns(t testing.TB, st *store, n, maxAttempts int) (ws testWorkspace, ids []string) {
	t.Helper()
	ws = seedWorkspace(t, st)
	for i := range n {
		r, _, err := st.createRun(context.Background(), ws.ID, newRun{Agent: "echo", Input: json.RawMessage(fmt.Sprintf(`{"i":%d}`, i)), MaxAttempts: maxAttempts})
		if err != nil {
			t.Fatalf("create run: got %v; want it created", err)
		}
		ids = append(ids, r.ID)
	}
	return ws, ids
}

// Processes: the agentapp binary, built once, run as its own process.

// build is one `go build` of agentapp, done once per test run; TestMain removes its dir.
type build struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// raceBuild is built with -race, for the tests; plainBuild without, so that benchmarks
// measure the speed and memory of what operators run.
var raceBuild, plainBuild build

// agentappBinary builds the agentapp binary (with -race when race is set) once per test
// run and returns its path.
func agentappBinary(t testing.TB, race bool) string {
	t.Helper()
	b, args := &plainBuild, []string{"build"}
	if race {
		b, args = &raceBuild, []string{"build", "-race"}
	}
	b.once.Do(func() {
		b.dir, b.err = os.MkdirTemp("", "agentapp-bin-")
		if b.err != nil {
			return
		}
		b.path = filepath.Join(b.dir, "agentapp")
		out, err := exec.Command("go", append(args, "-o", b.path, ".")...).CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// proc is an agentapp binary running as its own process.
type proc struct {
	cmd  *exec.Cmd
	base string
	log  *syncBuffer
	done chan struct{}
	err  error // set when done is closed
}

// startProc starts the -race binary with args and the given environment, and (for
// serve) waits until /healthz answers. When the test ends it is killed, if still running,
// and its log is checked for what must never appear: a data race, a query that met a
// closed pool, a panic.
func startProc(t testing.TB, env map[string]string, args ...string) *proc {
	t.Helper()
	return startProcBin(t, agentappBinary(t, true), env, args...)
}

// startProcBin is startProc with the binary at bin.
func startProcBin(t testing.TB, bin string, env map[string]string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(bin, args...), log: &syncBuffer{}, done: make(chan struct{})}
	p.base = "http://" + env["LISTEN_ADDR"]
	for k, v := range env {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	if _, ok := env["GORACE"]; !ok {
		p.cmd.Env = append(p.cmd.Env, "GORACE=atexit_sleep_ms=0") // the race runtime's 1 s pause at exit would blur timings
	}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: got %v; want it started", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
		log := p.log.String()
		for _, bad := range []string{"DATA RACE", "database is closed", "panic:"} {
			if strings.Contains(log, bad) {
				t.Errorf("agentapp (pid %d) log: got %q in it; want it absent", p.cmd.Process.Pid, bad)
			}
		}
		if t.Failed() {
			t.Logf("agentapp (pid %d) log:\n%s", p.cmd.Process.Pid, log)
		}
	})
	if len(args) == 0 || args[0] == "serve" {
		exited := make(chan error, 1)
		go func() {
			<-p.done
			exited <- p.err
		}()
		p.app().waitHealthy(t, exited)
	}
	return p
}

// app returns the HTTP view of a serving process.
func (p *proc) app() *app { return &app{base: p.base, log: p.log} }

// signal sends sig to the process.
func (p *proc) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: got %v; want it sent", sig, err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("agentapp (pid %d): still running after %v; want it exited; log:\n%s", p.cmd.Process.Pid, timeout, p.log)
		return -1
	}
}

// waitLog waits until the process's log contains s at least n times.
func (p *proc) waitLog(t testing.TB, s string, n int, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, fmt.Sprintf("log line %q appears %d times", s, n), func() bool {
		return strings.Count(p.log.String(), s) >= n
	})
}

// TestMain runs the tests with a temporary directory of their own as TMPDIR, so that
// what they and the processes they start (go build, chromium) write there is found
// afterwards: the binaries built once for the whole run are removed, then anything else
// left is a test that did not clean up, and fails the run, before the directory goes.
func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

// runTests is TestMain's body, apart so that its deferred removal runs before os.Exit.
func runTests(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "agentapp-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "test temp dir:", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	// MkdirTemp makes it 0700; the OS user postgres must reach the clusters that tests
	// running as root create inside it (process_test.go, chaos_test.go).
	if err := os.Chmod(tmp, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "test temp dir:", err)
		return 1
	}
	os.Setenv("TMPDIR", tmp)
	code := m.Run()
	if browserTest != "" {
		fmt.Fprintln(os.Stderr, "the browser test (TestConsoleInChromium):", browserTest)
	}
	for _, b := range []*build{&raceBuild, &plainBuild} {
		if b.dir != "" {
			os.RemoveAll(b.dir)
		}
	}
	if left := leftInDir(tmp); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: the tests left %d entries in their temp dir %s: %s\n", len(left), tmp, strings.Join(left, ", "))
		return max(code, 1)
	}
	return code
}

// leftInDir lists the names of the entries in dir (the dir itself, unreadable, as one).
func leftInDir(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return []string{fmt.Sprintf("%s (%v)", dir, err)}
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
