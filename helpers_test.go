package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
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
	admin := openTestDB(t, base)
	name := "agentapp_test_" + randomHex(6)
	if _, err := admin.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	dsn := withDatabase(t, base, name)
	t.Cleanup(func() {
		if _, err := admin.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)"); err != nil {
			t.Logf("drop test database %s: %v", name, err)
		}
		admin.Close()
	})
	db := openTestDB(t, dsn)
	defer db.Close()
	if err := (&store{db: db}).applySchema(context.Background()); err != nil {
		t.Fatalf("apply schema: %v", err)
	}
	return dsn
}

// withDatabase returns the URL base with its database replaced by name.
func withDatabase(t testing.TB, base, name string) string {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Fatalf("DATABASE_URL must be a postgres:// URL for the tests")
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

// openTestDB opens a small pool on dsn, closed when the test ends.
func openTestDB(t testing.TB, dsn string) *sql.DB {
	t.Helper()
	db, err := openDB(dsn, 4)
	if err != nil {
		t.Fatalf("open database: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// freeAddr returns a 127.0.0.1 address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
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

// app is an agentapp under test, reached over HTTP at base.
type app struct {
	base string
	log  *syncBuffer
}

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
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
				t.Errorf("agentapp serve returned %v", err)
			}
		case <-time.After(90 * time.Second):
			t.Errorf("agentapp serve did not stop within 90s; log:\n%s", a.log)
		}
		if t.Failed() {
			t.Logf("agentapp log:\n%s", a.log)
		}
	})
	a.waitHealthy(t, done)
	return a
}

func (a *app) waitHealthy(t testing.TB, exited <-chan error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			t.Fatalf("agentapp exited before /healthz answered: %v\nlog:\n%s", err, a.log)
		default:
		}
		resp, err := http.Get(a.base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("agentapp /healthz did not answer within 30s; log:\n%s", a.log)
}

// do sends a request with an optional JSON body (a string is sent as is) and returns the
// status and body.
func (a *app) do(t testing.TB, method, path, token string, body any) (int, []byte) {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(data)
	}
	var hdr map[string]string
	if body != nil {
		hdr = map[string]string{"Content-Type": "application/json"}
	}
	status, _, data := apiRequest(t, a, method, path, token, hdr, r)
	return status, data
}

// apiRequest sends a request with the given extra headers and raw body (nil: none) and
// returns the status, the response headers and the body. A body that is not a
// *bytes.Reader or *strings.Reader is sent chunked (no Content-Length).
func apiRequest(t testing.TB, a *app, method, path, token string, hdr map[string]string, body io.Reader) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, a.base+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resp.StatusCode, resp.Header, data
}

// mustDo is do that fails the test unless the status is want, and decodes the body into
// out (when not nil).
func (a *app) mustDo(t testing.TB, method, path, token string, body any, want int, out any) {
	t.Helper()
	status, data := a.do(t, method, path, token, body)
	if status != want {
		t.Fatalf("%s %s: got status %d; want %d; body %s", method, path, status, want, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: decode %s: %v", method, path, data, err)
		}
	}
}

// testWorkspace is a workspace created through the API, with its key.
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

func (a *app) getRun(t testing.TB, ws testWorkspace, id string) runRecord {
	t.Helper()
	var r runRecord
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+id, ws.APIKey, nil, 200, &r)
	return r
}

// waitRunStatus polls the run until it has the status, failing the test after timeout.
func (a *app) waitRunStatus(t testing.TB, ws testWorkspace, id, status string, timeout time.Duration) runRecord {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r := a.getRun(t, ws, id)
		if r.Status == status {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("run %s: got status %q after %v; want %q (run: %+v)", id, r.Status, timeout, status, r)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testLogger discards below warn unless the test is verbose.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// agentappBinary builds the agentapp binary once per test run and returns its path.
func agentappBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "agentapp-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "agentapp")
		out, err := exec.Command("go", "build", "-race", "-o", buildPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

// proc is an agentapp binary running as its own process.
type proc struct {
	cmd  *exec.Cmd
	base string
	log  *syncBuffer
	done chan struct{}
	err  error // set when done is closed
}

// startProc starts the agentapp binary with args and exactly the given environment, and
// (for serve) waits until /healthz answers. It is killed, if still running, when the test ends.
func startProc(t testing.TB, env map[string]string, args ...string) *proc {
	t.Helper()
	return startProcBin(t, agentappBinary(t), env, args...)
}

// app returns the HTTP view of a serving process.
func (p *proc) app() *app { return &app{base: p.base, log: p.log} }

// signal sends sig to the process.
func (p *proc) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("agentapp (pid %d) did not exit within %v; log:\n%s", p.cmd.Process.Pid, timeout, p.log)
		return -1
	}
}

var (
	benchBuildOnce sync.Once
	benchBuildPath string
	benchBuildErr  error
)

// agentappBenchBinary builds the agentapp binary once per test run WITHOUT -race, so that
// benchmarks measure the speed and memory of what operators run, and returns its path.
func agentappBenchBinary(t testing.TB) string {
	t.Helper()
	benchBuildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "agentapp-benchbin-")
		if err != nil {
			benchBuildErr = err
			return
		}
		benchBuildPath = filepath.Join(dir, "agentapp")
		out, err := exec.Command("go", "build", "-o", benchBuildPath, ".").CombinedOutput()
		if err != nil {
			benchBuildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if benchBuildErr != nil {
		t.Fatal(benchBuildErr)
	}
	return benchBuildPath
}

// startProcBin starts the agentapp binary at bin with args and exactly the given
// environment, and (for serve) waits until /healthz answers. It is killed, if still
// running, when the test ends.
func startProcBin(t testing.TB, bin string, env map[string]string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(bin, args...), log: &syncBuffer{}, done: make(chan struct{})}
	p.base = "http://" + env["LISTEN_ADDR"]
	for k, v := range env {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
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
		if t.Failed() {
			t.Logf("agentapp (pid %d) log:\n%s", p.cmd.Process.Pid, p.log)
		}
	})
	if len(args) == 0 || args[0] == "serve" {
		a := &app{base: p.base, log: p.log}
		exited := make(chan error, 1)
		go func() {
			<-p.done
			exited <- p.err
		}()
		a.waitHealthy(t, exited)
	}
	return p
}

// sendRequest sends a request with c, with the bearer token (if any) and a JSON body (nil:
// none), and returns the status and body, or the transport error. It never fails the test
// itself, so any goroutine may call it.
func sendRequest(c *http.Client, method, url, token string, body io.Reader) (int, []byte, error) {
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		return 0, nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp.StatusCode, data, err
}
