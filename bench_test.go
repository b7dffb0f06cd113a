package main

// Benchmarks of a real agentapp process (built without -race, default settings), each on
// a database of its own. They measure once whatever b.N is and report their figures with
// b.ReportMetric; run them with `make bench` (-benchtime 1x). The method follows the
// shared black-box harness (shared/bench/agentapp), so the figures compare with it and
// with River's. BenchmarkSoak runs only with SOAK=1.

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
)

// benchEnv is the environment of a benchmarked process: agentapp's defaults except the
// database, a free loopback address, the admin token and whether the worker is embedded.
// Defaults are measured unless RUN_WORKER_CONCURRENCY or RUN_WORKER_BATCH_LIMIT is set in
// the benchmark's own environment, which is passed on (to measure a tuned worker).
func benchEnv(b *testing.B, dsn string, embedded bool) map[string]string {
	env := map[string]string{
		"DATABASE_URL":        dsn,
		"LISTEN_ADDR":         freeAddr(b),
		"ADMIN_TOKEN":         testAdminToken,
		"RUN_WORKER_EMBEDDED": strconv.FormatBool(embedded),
	}
	for _, k := range []string{"RUN_WORKER_CONCURRENCY", "RUN_WORKER_BATCH_LIMIT"} {
		if v := os.Getenv(k); v != "" {
			env[k] = v
		}
	}
	return env
}

// benchStop stops the process with SIGTERM and fails the benchmark unless it exits 0.
func benchStop(b *testing.B, p *proc) {
	b.Helper()
	p.signal(b, syscall.SIGTERM)
	if code := p.wait(b, 90*time.Second); code != 0 {
		b.Errorf("agentapp after SIGTERM: got exit %d; want 0; log:\n%s", code, p.log)
	}
}

// benchClient is an HTTP client that keeps enough connections to the server alive for
// the benchmarks' concurrent clients, so that they measure requests, not TCP handshakes.
func benchClient() *http.Client {
	return &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{
		MaxIdleConns: 128, MaxIdleConnsPerHost: 128, IdleConnTimeout: 90 * time.Second,
		DisableCompression: true, DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}}
}

// benchRunBody is the body of POST …/runs for an echo run; i makes inputs distinct.
func benchRunBody(i int) []byte {
	return []byte(`{"agent":"echo","input":{"i":` + strconv.Itoa(i) + `}}`)
}

// benchBatchBody is the body of POST …/runs/batch with n echo runs.
func benchBatchBody(from, n int) []byte {
	var buf bytes.Buffer
	buf.WriteString(`{"runs":[`)
	for i := range n {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.Write(benchRunBody(from + i))
	}
	buf.WriteString(`]}`)
	return buf.Bytes()
}

// benchProc is what /proc says about a process: CPU seconds (utime+stime), VmRSS and
// VmHWM in MiB, and its number of threads.
type benchProc struct {
	cpu, rss, hwm float64
	threads       int
}

func benchProcStats(b *testing.B, pid int) benchProc {
	b.Helper()
	var s benchProc
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatalf("read /proc/%d/stat: %v", pid, err)
	}
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	s.cpu = (utime + stime) / 100 // USER_HZ is 100 on Linux
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatalf("read /proc/%d/status: %v", pid, err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, _ := strings.Cut(line, ":")
		n, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
		switch k {
		case "VmRSS":
			s.rss = n / 1024
		case "VmHWM":
			s.hwm = n / 1024
		case "Threads":
			s.threads = int(n)
		}
	}
	return s
}

// benchQuantile is the nearest-rank quantile of sorted durations, in milliseconds.
func benchQuantile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := max(0, min(int(float64(len(sorted))*q+0.999999)-1, len(sorted)-1))
	return float64(sorted[i]) / float64(time.Millisecond)
}

// benchDrained polls until no run is queued or running and returns when that was first
// seen; it fails the benchmark after timeout or if the process exits. It reads the
// counts (run_totals), not the runs: probing the runs table every 10 ms cost PostgreSQL
// 1.7 ms a probe in BenchmarkFairClaim, a sixth of a core taken from the drain it timed.
// The callers check the runs themselves afterwards.
func benchDrained(b *testing.B, db *sql.DB, p *proc, timeout time.Duration) time.Time {
	b.Helper()
	probe, err := db.Prepare(`SELECT coalesce(sum(n), 0) > 0 FROM run_totals WHERE status = 'active'`)
	if err != nil {
		b.Fatal(err)
	}
	defer probe.Close()
	// Every 50 ms, not eventually's 10: the probe sums the counters' changes not yet rolled
	// up, which a drain over many workspaces makes many, and at 10 ms it took a fifth of a
	// core from the drain it measures (BenchmarkFairClaim, 100 workspaces: 2 ms a probe).
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-p.done:
			b.Fatalf("agentapp while draining: got exit %v; want it running", p.err)
		default:
		}
		var left bool
		if err := probe.QueryRow().Scan(&left); err != nil {
			b.Fatal(err)
		}
		if !left {
			return time.Now()
		}
		if time.Now().After(deadline) {
			b.Fatalf("no run is queued or running: not after %v", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// benchStatusCounts counts the runs by status.
func benchStatusCounts(b *testing.B, db *sql.DB) map[string]int {
	b.Helper()
	rows, err := db.Query(`SELECT status, count(*) FROM runs GROUP BY status`)
	if err != nil {
		b.Fatal(err)
	}
	defer rows.Close()
	counts := map[string]int{}
	for rows.Next() {
		var status string
		var n int
		if err := rows.Scan(&status, &n); err != nil {
			b.Fatal(err)
		}
		counts[status] = n
	}
	if err := rows.Err(); err != nil {
		b.Fatal(err)
	}
	return counts
}

// BenchmarkDrain: 50,000 echo runs enqueued with the worker off (POST …/runs/batch × 1000),
// then the time from /healthz of a process with the embedded worker at default settings
// until no run is queued or running. Reports the batch enqueue rate, the drain rate, and
// the process's CPU and peak RSS over the drain.
func BenchmarkDrain(b *testing.B) {
	const n, batch = 50_000, 1000
	dsn := testDB(b)
	db := openTestDB(b, dsn)
	client := benchClient()

	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, false))
	ws := p.app().createWorkspace(b)
	var bodies [][]byte
	for i := 0; i < n; i += batch {
		bodies = append(bodies, benchBatchBody(i, batch))
	}
	url := p.base + "/v1/workspaces/" + ws.ID + "/runs/batch"
	start := time.Now()
	for _, body := range bodies {
		if status, _, data, err := send(client, "POST", url, ws.APIKey, nil, body); err != nil || status != 201 {
			b.Fatalf("POST %s: got %d %v %.300s; want 201", url, status, err, data)
		}
	}
	enqueue := time.Since(start)
	benchStop(b, p)
	if c := benchStatusCounts(b, db); c["queued"] != n {
		b.Fatalf("after enqueue: got %v; want %d queued", c, n)
	}
	if _, err := db.Exec(`ANALYZE runs`); err != nil { // as the shared harness and River's do
		b.Fatal(err)
	}

	p = startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	t0 := time.Now()
	cpu0 := benchProcStats(b, p.cmd.Process.Pid).cpu
	done := benchDrained(b, db, p, 10*time.Minute)
	st := benchProcStats(b, p.cmd.Process.Pid)
	benchStop(b, p)
	c := benchStatusCounts(b, db)
	if c["succeeded"] != n {
		b.Errorf("after drain: got %v; want %d succeeded", c, n)
	}
	elapsed := done.Sub(t0)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(n)/enqueue.Seconds(), "enqueue-runs/s")
	b.ReportMetric(float64(c["succeeded"])/elapsed.Seconds(), "runs/s")
	b.ReportMetric(elapsed.Seconds(), "drain-s")
	b.ReportMetric(st.cpu-cpu0, "app-CPU-s")
	b.ReportMetric(st.hwm, "peak-RSS-MiB")
}

// BenchmarkLatency: embedded worker at defaults, 2 s idle, then 300 single POST …/runs
// 10–20 ms apart; for each, the time from POST's 201 until a goroutine polling the runs
// table every 1 ms sees it succeeded (the shared harness's method).
func BenchmarkLatency(b *testing.B) {
	const n = 300
	dsn := testDB(b)
	db := openTestDB(b, dsn)
	client := benchClient()
	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	ws := p.app().createWorkspace(b)
	time.Sleep(2 * time.Second)

	var (
		mu      sync.Mutex
		pending = map[string]time.Time{} // run id → when its POST returned
		latency []time.Duration
		pollErr error
	)
	stmt, err := db.Prepare(`SELECT id::text, status FROM runs WHERE id = ANY($1::uuid[])`)
	if err != nil {
		b.Fatal(err)
	}
	defer stmt.Close()
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		ticker := time.NewTicker(time.Millisecond)
		defer ticker.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ticker.C:
			}
			mu.Lock()
			ids := make([]string, 0, len(pending))
			for id := range pending {
				ids = append(ids, id)
			}
			mu.Unlock()
			if len(ids) == 0 {
				continue
			}
			rows, err := stmt.Query(pq.Array(ids))
			if err != nil {
				mu.Lock()
				pollErr = err
				mu.Unlock()
				return
			}
			var final []string
			for rows.Next() {
				var id, status string
				if err := rows.Scan(&id, &status); err == nil && status == "succeeded" {
					final = append(final, id)
				}
			}
			rows.Close()
			now := time.Now()
			mu.Lock()
			for _, id := range final {
				latency = append(latency, now.Sub(pending[id]))
				delete(pending, id)
			}
			mu.Unlock()
		}
	}()
	defer func() {
		select {
		case <-stopped:
		default:
			close(stop)
			<-stopped
		}
	}()

	url := p.base + "/v1/workspaces/" + ws.ID + "/runs"
	for i := range n {
		status, _, data, err := send(client, "POST", url, ws.APIKey, nil, benchRunBody(i))
		returned := time.Now()
		var run struct{ ID string }
		if err != nil || status != 201 || json.Unmarshal(data, &run) != nil {
			b.Fatalf("POST %s: got %d %v %.300s; want 201 with a run", url, status, err, data)
		}
		mu.Lock()
		pending[strings.ToLower(run.ID)] = returned
		mu.Unlock()
		time.Sleep(10*time.Millisecond + rand.N(10*time.Millisecond))
	}
	eventually(b, 30*time.Second, "every run succeeded after the last POST", func() bool {
		mu.Lock()
		defer mu.Unlock()
		if pollErr != nil {
			b.Fatalf("poll: got %v; want the runs' statuses", pollErr)
		}
		return len(pending) == 0
	})
	close(stop)
	<-stopped
	benchStop(b, p)
	slices.Sort(latency)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(benchQuantile(latency, .50), "p50-ms")
	b.ReportMetric(benchQuantile(latency, .95), "p95-ms")
	b.ReportMetric(benchQuantile(latency, .99), "p99-ms")
	b.ReportMetric(benchQuantile(latency, 1), "max-ms")
}

// benchLoad is clients goroutines POSTing runs; see startBenchLoad.
type benchLoad struct {
	wg              sync.WaitGroup // done when every client has stopped
	created, failed atomic.Int64   // runs acknowledged with 201; requests that failed
	firstErr        atomic.Value   // the first failure, as a string
}

// startBenchLoad starts clients goroutines, each POSTing body(i) to url with token until
// deadline or max requests, a 201 counting perRequest runs.
func startBenchLoad(c *http.Client, url, token string, clients, max, perRequest int, deadline time.Time, body func(i int) []byte) *benchLoad {
	l := &benchLoad{}
	for g := range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; i < max && time.Now().Before(deadline); i++ {
				status, _, data, err := send(c, "POST", url, token, nil, body(g*max+i))
				if err != nil || status != 201 {
					l.failed.Add(1)
					l.firstErr.CompareAndSwap(nil, fmt.Sprintf("got %d %v %.200s", status, err, data))
					continue
				}
				l.created.Add(int64(perRequest))
			}
		}()
	}
	return l
}

// benchEnqueue runs clients goroutines POSTing body to path for d (each at most
// maxRequests times) against a process with the worker off, checks that every run
// acknowledged with 201 is in the table, and returns runs per second.
func benchEnqueue(b *testing.B, clients, perRequest int, body func(i int) []byte, path string, d time.Duration) float64 {
	const maxRequests = 1_000_000
	dsn := testDB(b)
	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, false))
	ws := p.app().createWorkspace(b)
	client := benchClient()
	url := p.base + "/v1/workspaces/" + ws.ID + path
	start := time.Now()
	l := startBenchLoad(client, url, ws.APIKey, clients, maxRequests, perRequest, start.Add(d), body)
	l.wg.Wait()
	elapsed := time.Since(start)
	benchStop(b, p)
	if l.failed.Load() > 0 {
		b.Errorf("requests: got %d failed, the first %v; want none", l.failed.Load(), l.firstErr.Load())
	}
	var inTable int64
	if err := openTestDB(b, dsn).QueryRow(`SELECT count(*) FROM runs`).Scan(&inTable); err != nil {
		b.Fatal(err)
	}
	if inTable != l.created.Load() {
		b.Errorf("got %d runs in the table; want the %d acknowledged with 201", inTable, l.created.Load())
	}
	return float64(l.created.Load()) / elapsed.Seconds()
}

// BenchmarkEnqueueSingle: worker off, 8 clients × single POST …/runs for 10 s.
func BenchmarkEnqueueSingle(b *testing.B) {
	rate := benchEnqueue(b, 8, 1, benchRunBody, "/runs", 10*time.Second)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rate, "runs/s")
}

// BenchmarkEnqueueBatch: worker off, 2 clients × POST …/runs/batch of 1000 for 10 s.
func BenchmarkEnqueueBatch(b *testing.B) {
	body := benchBatchBody(0, 1000)
	rate := benchEnqueue(b, 2, 1000, func(int) []byte { return body }, "/runs/batch", 10*time.Second)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rate, "runs/s")
}

// BenchmarkIdle: embedded worker at defaults, empty queue; after a 10 s settle (Postgres
// flushes an idle backend's statistics within 10 s), over 15 s: the transactions of its
// database (read from another database, so the reading adds none), its CPU and its RSS.
func BenchmarkIdle(b *testing.B) {
	dsn := testDB(b)
	name := dbName(b, dsn)
	admin := adminDB(b)
	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	pid := p.cmd.Process.Pid
	xacts := func() int64 {
		var x int64
		if err := admin.QueryRow(`SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, name).Scan(&x); err != nil {
			b.Fatal(err)
		}
		return x
	}
	time.Sleep(10 * time.Second)
	x0, s0, t0 := xacts(), benchProcStats(b, pid), time.Now()
	time.Sleep(15 * time.Second)
	x1, s1, elapsed := xacts(), benchProcStats(b, pid), time.Since(t0)
	var conns int
	if err := admin.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, name).Scan(&conns); err != nil {
		b.Fatal(err)
	}
	benchStop(b, p)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(x1-x0)/elapsed.Seconds(), "xact/s")
	b.ReportMetric(s1.cpu-s0.cpu, "CPU-s/15s")
	b.ReportMetric(s1.rss, "RSS-MiB")
	b.ReportMetric(float64(conns), "db-conns")
}

// BenchmarkSoak (SOAK=1 only): 50 clients enqueue single runs for 60 s while the embedded
// worker (defaults) drains them; then it waits for the queue to empty. No request may
// fail and no run may be lost (every 201 is a run, every run succeeded); RSS, threads and
// the process's database connections are reported at 10 s, at the end of the load and
// after the drain, to show they stay flat.
func BenchmarkSoak(b *testing.B) {
	if os.Getenv("SOAK") != "1" {
		b.Skip("soak test (50 clients for 60 s, then the drain) runs only with SOAK=1: SOAK=1 go test -run '^$' -bench Soak -benchtime 1x .")
	}
	const clients, maxPerClient, load = 50, 100_000, 60 * time.Second
	dsn := testDB(b)
	name := dbName(b, dsn)
	admin := adminDB(b)
	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	pid := p.cmd.Process.Pid
	ws := p.app().createWorkspace(b)
	client := benchClient()
	url := p.base + "/v1/workspaces/" + ws.ID + "/runs"
	conns := func() int {
		var n int
		if err := admin.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, name).Scan(&n); err != nil {
			b.Fatal(err)
		}
		return n
	}

	start := time.Now()
	l := startBenchLoad(client, url, ws.APIKey, clients, maxPerClient, 1, start.Add(load), benchRunBody)
	created, failed, firstErr := &l.created, &l.failed, &l.firstErr
	time.Sleep(10 * time.Second) // a point in the load to sample at, not a wait for anything
	at10, conns10 := benchProcStats(b, pid), conns()
	l.wg.Wait()
	loadEnd := time.Since(start)
	atEnd, connsEnd := benchProcStats(b, pid), conns()

	db := openTestDB(b, dsn)
	db.SetMaxOpenConns(1)
	queuedAtEnd := benchStatusCounts(b, db)["queued"]
	drained := benchDrained(b, db, p, 10*time.Minute)
	db.Close() // out of pg_stat_activity before the last count
	// The backend exits after the client has gone, and the worker's pool may open or
	// close connections meanwhile, so no count tells that it has: give it a second.
	time.Sleep(time.Second)
	atDrain, connsDrain := benchProcStats(b, pid), conns()
	benchStop(b, p)

	counts := benchStatusCounts(b, openTestDB(b, dsn))
	total := 0
	for _, n := range counts {
		total += n
	}
	if failed.Load() > 0 {
		b.Errorf("requests: got %d failed, the first %v; want none", failed.Load(), firstErr.Load())
	}
	if int64(total) != created.Load() || int64(counts["succeeded"]) != created.Load() {
		b.Errorf("got %v (%d runs); want all %d runs acknowledged with 201, all succeeded", counts, total, created.Load())
	}
	// Flat: the pools may still open connections up to their bounds after 10 s (the
	// worker's, while it drains what the load left), but never more.
	if limit := apiPoolSize + workerPoolSize + 1; connsDrain > limit {
		b.Errorf("database connections: got %d after the drain; want at most %d (both pools full, plus the listener)", connsDrain, limit)
	}
	if atDrain.rss > 2*at10.rss {
		b.Errorf("RSS: got %.1f MiB after the drain; want at most twice the %.1f MiB at 10 s", atDrain.rss, at10.rss)
	}
	b.Logf("RSS MiB at 10s / end of load / after drain: %.1f / %.1f / %.1f (peak %.1f); threads %d / %d / %d; db connections %d / %d / %d; queued at end of load %d",
		at10.rss, atEnd.rss, atDrain.rss, atDrain.hwm, at10.threads, atEnd.threads, atDrain.threads, conns10, connsEnd, connsDrain, queuedAtEnd)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(created.Load())/loadEnd.Seconds(), "enqueue-runs/s")
	b.ReportMetric(float64(created.Load())/drained.Sub(start).Seconds(), "runs/s")
	b.ReportMetric(float64(failed.Load()), "failed-requests")
	b.ReportMetric(float64(created.Load()-int64(counts["succeeded"])), "lost-runs")
	b.ReportMetric(at10.rss, "RSS10s-MiB")
	b.ReportMetric(atEnd.rss, "RSSend-MiB")
	b.ReportMetric(atDrain.rss, "RSSdrained-MiB")
	b.ReportMetric(atDrain.hwm, "peak-RSS-MiB")
	b.ReportMetric(float64(at10.threads), "threads10s")
	b.ReportMetric(float64(atDrain.threads), "threads-drained")
	b.ReportMetric(float64(conns10), "conns10s")
	b.ReportMetric(float64(connsDrain), "conns-drained")
}

// BenchmarkClaimIdleWorkspaces: one claim of 100 runs (store.claim, one lineup) while 3
// workspaces have queued runs, among 3 workspaces in all and among 10,000 (each with an
// agent): what the workspaces with nothing queued cost a claim (nothing but the search
// for agents never seen, every searchEvery).
func BenchmarkClaimIdleWorkspaces(b *testing.B) {
	for _, workspaces := range []int{3, 10_000} {
		b.Run(fmt.Sprintf("workspaces=%d", workspaces), func(b *testing.B) {
			db := openTestDB(b, testDB(b))
			seedEchoWorkspaces(b, db, workspaces)
			seed := sqlExec(b, db)
			// The 3 busy workspaces, each with a third of the runs the claims take and 100
			// more: no claim finds a workspace short of its share.
			seed(`INSERT INTO runs (workspace_id, agent_id)
				SELECT a.workspace_id, a.id FROM (SELECT id, workspace_id FROM agents ORDER BY id LIMIT 3) a,
				generate_series(1, $1::int * 100 / 3 + 100)`, b.N)
			seed(`ANALYZE`)
			st, q := &store{db: db}, newLineup()
			b.ResetTimer()
			for range b.N {
				res, err := st.claim(context.Background(), q, "bench", 100, "", time.Minute, false)
				if err != nil || len(res.claimed) != 100 {
					b.Fatalf("claim: got %d runs, %v; want 100", len(res.claimed), err)
				}
			}
		})
	}
}

// BenchmarkFairClaim: the drain of FAIR_N (default 1,000,000) queued echo runs by one
// process with the embedded worker at defaults, first spread over 100 workspaces × 10
// agents (3 of each workspace's agents capped at max_concurrency 5), then all in one
// workspace with 10 uncapped agents: what taking turns and honouring caps cost the claim.
// Reports both drain rates and their ratio. FAIR_N=100000 runs it small.
func BenchmarkFairClaim(b *testing.B) {
	n := 1_000_000
	if v := os.Getenv("FAIR_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("FAIR_N: got %q; want a positive number of runs", v)
		}
	}
	fair := benchFairDrain(b, n, 100, 10, 3, 0, false)
	one := benchFairDrain(b, n, 1, 10, 0, 0, false)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(fair, "fair-runs/s")
	b.ReportMetric(one, "one-ws-runs/s")
	b.ReportMetric(fair/one, "fair/one-ws")
}

// BenchmarkLimits: the drain of LIMITS_N (default 100,000) queued echo runs over 100
// workspaces of one agent each, by one process with the embedded worker at defaults:
// first with every run carrying one of 1,000 concurrency keys (10 per agent, each at
// key_concurrency 1) and one agent with a rate limit far above the drain's rate, then the
// same runs without keys or rate. Reports both rates and the cost of the limits (1 -
// limited/plain).
func BenchmarkLimits(b *testing.B) {
	n := 100_000
	if v := os.Getenv("LIMITS_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("LIMITS_N: got %q; want a positive number of runs", v)
		}
	}
	limited := benchFairDrain(b, n, 100, 1, 0, 1000, true)
	plain := benchFairDrain(b, n, 100, 1, 0, 0, false)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(limited, "limited-runs/s")
	b.ReportMetric(plain, "plain-runs/s")
	b.ReportMetric(1-limited/plain, "cost")
}

// benchFairDrain seeds n queued echo runs, in a database of their own, over workspaces ×
// agents (the first capped agents of each workspace at max_concurrency 5), dealt round
// the agents in insertion order, each with one of keys concurrency keys (none when 0),
// and with the first agent rate-limited (1,000,000 units a second) when rated; then it
// times one process with the embedded worker at defaults until no run is queued or
// running, checks that all n succeeded, and returns runs per second.
func benchFairDrain(b *testing.B, n, workspaces, agents, capped, keys int, rated bool) float64 {
	b.Helper()
	// Rows a seeding statement inserts: big enough to be quick, small enough not to
	// hold one transaction for minutes.
	const chunk = 100_000
	dsn := testDB(b)
	db := openTestDB(b, dsn)
	seed := func(query string, args ...any) {
		b.Helper()
		if _, err := db.Exec(query, args...); err != nil {
			b.Fatalf("seed: %s: %v", query, err)
		}
	}
	seed(`INSERT INTO workspaces (name, api_key_hash)
		SELECT 'fair-' || w, sha256(convert_to('fair-key-' || w, 'UTF8')) FROM generate_series(1, $1) w`, workspaces)
	seed(`INSERT INTO agents (workspace_id, name, kind, max_concurrency)
		SELECT w.id, 'agent-' || i, 'echo', CASE WHEN i <= $2 THEN 5 END FROM workspaces w, generate_series(1, $1) i`,
		agents, capped)
	if rated {
		seed(`UPDATE agents SET rate_limit = 1000000, rate_period_ms = 1000 WHERE id = (SELECT id FROM agents ORDER BY id LIMIT 1)`)
	}
	for from := 0; from < n; from += chunk {
		seed(`INSERT INTO runs (workspace_id, agent_id, input, concurrency_key)
			SELECT a.workspace_id, a.id, jsonb_build_object('i', g), CASE WHEN $4 > 0 THEN 'key-' || g % $4 END
			FROM generate_series($1::int, $2::int) g
			JOIN (SELECT id, workspace_id, row_number() OVER (ORDER BY id) - 1 AS k FROM agents) a ON a.k = g % $3
			ORDER BY g`, from, min(from+chunk, n)-1, workspaces*agents, keys)
	}
	seed(`ANALYZE`)
	if c := benchStatusCounts(b, db); c["queued"] != n {
		b.Fatalf("seeded: got %v; want %d queued", c, n)
	}

	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	start := time.Now()
	done := benchDrained(b, db, p, time.Hour)
	benchStop(b, p)
	if c := benchStatusCounts(b, db); c["succeeded"] != n {
		b.Errorf("%d workspaces × %d agents after the drain: got %v; want all %d succeeded", workspaces, agents, c, n)
	}
	rate := float64(n) / done.Sub(start).Seconds()
	b.Logf("%d runs over %d workspaces × %d agents (%d capped each), %d keys, rated %v: drained in %v, %.0f runs/s",
		n, workspaces, agents, capped, keys, rated, done.Sub(start).Round(time.Millisecond), rate)
	return rate
}

// BenchmarkEventsFanout: one process (embedded worker, defaults) with 500 stream
// subscribers, 5 on each of 100 running webhook runs, while each run's agent posts 20
// events one after the other. Reports the delivery latency from just before the agent's
// POST until a subscriber reads the frame (p50, p99, over all 10,000 deliveries), and the
// peaks of the process's RSS, goroutines (agentapp_goroutines) and database connections:
// the pools plus the one listener, whatever the number of subscribers.
func BenchmarkEventsFanout(b *testing.B) {
	const runs, perRun, events = 100, 5, 20
	dsn := testDB(b)
	name := dbName(b, dsn)
	admin := adminDB(b)
	env := benchEnv(b, dsn, true)
	env["AGENT_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
	p := startProcBin(b, agentappBinary(b, false), env)
	a := p.app()
	client := benchClient()

	var mu sync.Mutex
	sent := map[string]time.Time{} // run id/seq → just before its POST
	start := make(chan struct{})
	var called sync.WaitGroup
	called.Add(runs)
	var postErrs atomic.Int64
	var posts []time.Duration // POST → 202, under mu
	agent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var c evCall
		json.NewDecoder(r.Body).Decode(&c)
		called.Done()
		<-start
		for i := 1; i <= events; i++ {
			mu.Lock()
			sent[c.RunID+"/"+strconv.Itoa(i)] = time.Now()
			mu.Unlock()
			t0 := time.Now()
			status, _, _, err := send(client, "POST", c.EventsURL, c.EventsToken, nil, `{"type":"step","data":{"i":`+strconv.Itoa(i)+`}}`)
			if err != nil || status != http.StatusAccepted {
				postErrs.Add(1)
			}
			mu.Lock()
			posts = append(posts, time.Since(t0))
			mu.Unlock()
		}
		w.Write([]byte(`{"ok":true}`))
	}))
	defer agent.Close()
	ws := a.createWorkspace(b)
	a.createAgent(b, ws, "hook", "webhook", map[string]any{"url": agent.URL, "timeout_ms": 300000})
	body := []byte(`{"runs":[` + strings.TrimSuffix(strings.Repeat(`{"agent":"hook"},`, runs), ",") + `]}`)
	var created struct{ Runs []runRecord }
	a.mustDo(b, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, body, 201, &created)
	called.Wait() // every run executes, its agent waiting for start

	subClient := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: runs * perRun, DisableCompression: true}}
	var ready, done sync.WaitGroup
	var latMu sync.Mutex
	var lat []time.Duration
	var short atomic.Int64 // subscribers that got fewer than all events
	for _, run := range created.Runs {
		for range perRun {
			ready.Add(1)
			done.Add(1)
			go func(id string) {
				defer done.Done()
				readied := false
				defer func() {
					if !readied {
						ready.Done()
					}
				}()
				req, _ := http.NewRequest("GET", a.base+"/v1/workspaces/"+ws.ID+"/runs/"+id+"/events", nil)
				req.Header.Set("Accept", "text/event-stream")
				req.Header.Set("Authorization", "Bearer "+ws.APIKey)
				resp, err := subClient.Do(req)
				if err != nil {
					short.Add(1)
					return
				}
				defer resp.Body.Close()
				sc := bufio.NewScanner(resp.Body)
				got := 0
				var seq string
				for sc.Scan() {
					line := sc.Text()
					switch {
					case strings.HasPrefix(line, "id: "):
						seq = line[4:]
					case strings.HasPrefix(line, "event: status") && !readied:
						readied = true
						ready.Done()
					case strings.HasPrefix(line, "data: ") && seq != "":
						at := time.Now()
						mu.Lock()
						t0 := sent[id+"/"+seq]
						mu.Unlock()
						latMu.Lock()
						lat = append(lat, at.Sub(t0))
						latMu.Unlock()
						got++
						seq = ""
					}
				}
				if got != events {
					short.Add(1)
				}
			}(run.ID)
		}
	}
	ready.Wait()

	var peak benchProc
	peakGoroutines, peakConns := 0.0, 0
	sample := func() {
		s := benchProcStats(b, p.cmd.Process.Pid)
		peak.rss = max(peak.rss, s.rss)
		peakGoroutines = max(peakGoroutines, a.metric(b, "agentapp_goroutines"))
		var n int
		if err := admin.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, name).Scan(&n); err != nil {
			b.Fatal(err)
		}
		peakConns = max(peakConns, n)
	}
	sample()
	idleGoroutines := peakGoroutines
	began := time.Now()
	close(start)
	finished := make(chan struct{})
	go func() { done.Wait(); close(finished) }()
	for waiting := true; waiting; {
		select {
		case <-finished:
			waiting = false
		case <-time.After(250 * time.Millisecond):
			sample()
			if time.Since(began) > 5*time.Minute {
				b.Fatal("subscribers: not all streams ended within 5 minutes of the first event")
			}
		}
	}
	elapsed := time.Since(began)
	benchStop(b, p)

	if n := postErrs.Load(); n > 0 {
		b.Errorf("event POSTs: got %d failed; want none", n)
	}
	if n := short.Load(); n > 0 || len(lat) != runs*perRun*events {
		b.Errorf("deliveries: got %d (%d subscribers short); want %d", len(lat), n, runs*perRun*events)
	}
	if limit := apiPoolSize + workerPoolSize + 1; peakConns > limit {
		b.Errorf("database connections: got %d at the peak; want at most %d (both pools, plus the listener)", peakConns, limit)
	}
	slices.Sort(lat)
	slices.Sort(posts)
	b.Logf("event POST → 202: p50 %.1f ms, p99 %.1f ms", benchQuantile(posts, .5), benchQuantile(posts, .99))
	b.Logf("%d deliveries in %v: p50 %.1f ms, p99 %.1f ms, max %.1f ms; peak RSS %.1f MiB, goroutines %.0f (%.0f with the subscribers idle), db connections %d",
		len(lat), elapsed.Round(time.Millisecond), benchQuantile(lat, .5), benchQuantile(lat, .99), benchQuantile(lat, 1),
		peak.rss, peakGoroutines, idleGoroutines, peakConns)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(benchQuantile(lat, .5), "p50-ms")
	b.ReportMetric(benchQuantile(lat, .99), "p99-ms")
	b.ReportMetric(benchQuantile(posts, .5), "post-p50-ms")
	b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(peak.rss, "peak-RSS-MiB")
	b.ReportMetric(peakGoroutines, "peak-goroutines")
	b.ReportMetric(float64(peakConns), "peak-db-conns")
}

// BenchmarkConsole measures each console page against a runs table of CONSOLE_N runs
// (default 10,000,000), seeded with SQL: 10 workspaces of 5 agents, half the runs in the
// first workspace; 1% failed, 0.5% canceled, 10,000 queued, the rest succeeded, finished
// over the last 30 days (newest last). Each page is asked benchConsoleRequests times
// after one warm-up, as the admin and as the big workspace, and its p50 and p95 reported;
// SPEC wants every page under 100 ms.
func BenchmarkConsole(b *testing.B) {
	n := 10_000_000
	if v := os.Getenv("CONSOLE_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 20_000 {
			b.Fatalf("CONSOLE_N: got %q; want an integer of at least 20000", v)
		}
	}
	dsn := testDB(b)
	db := openTestDB(b, dsn)
	st := &store{db: db}
	ctx := b.Context()
	var wss []workspace
	var agentIDs []string
	for i := range 10 {
		ws, err := st.createWorkspace(ctx, fmt.Sprintf("team-%02d", i))
		if err != nil {
			b.Fatalf("create workspace: %v", err)
		}
		wss = append(wss, ws)
		for j := range 5 {
			a, err := st.createAgent(ctx, agent{WorkspaceID: ws.ID, Name: fmt.Sprintf("agent-%d", j), Kind: "echo", Config: json.RawMessage(`{}`)})
			if err != nil {
				b.Fatalf("create agent: %v", err)
			}
			agentIDs = append(agentIDs, a.ID)
		}
	}
	const chunk = 500_000
	seedStart := time.Now()
	for from := 1; from <= n; from += chunk {
		to := min(from+chunk-1, n)
		// Agent: even g go to the first workspace's 5 agents, odd g to the other 45.
		_, err := db.ExecContext(ctx, `
			INSERT INTO runs (workspace_id, agent_id, status, input, output, error, errors, attempt, max_attempts,
			                  run_at, created_at, started_at, finished_at, updated_at)
			SELECT a.workspace_id, a.id, s.status, ('{"document":"report-' || g || '.pdf"}')::jsonb,
			       CASE WHEN s.status = 'succeeded' THEN '{"pages":12,"summary":"ok"}'::jsonb END,
			       CASE WHEN s.status = 'failed' THEN 'webhook answered 502 Bad Gateway'
			            WHEN s.status = 'canceled' THEN 'canceled by request' END,
			       CASE WHEN s.status = 'failed' THEN '[{"attempt":1,"at":"2026-01-01T00:00:00Z","message":"webhook answered 502 Bad Gateway"}]'::jsonb
			            ELSE '[]'::jsonb END,
			       CASE WHEN s.status = 'queued' THEN 0 ELSE 1 END, 1,
			       t.fin - interval '3 seconds', t.fin - interval '3 seconds',
			       CASE WHEN s.status <> 'queued' THEN t.fin - interval '2 seconds' END,
			       CASE WHEN s.status <> 'queued' THEN t.fin END, t.fin
			FROM generate_series($1::bigint, $2::bigint) g
			CROSS JOIN LATERAL (SELECT ($4::uuid[])[CASE WHEN g % 2 = 0 THEN 1 + (g / 2) % 5 ELSE 6 + (g / 2) % 45 END] AS agent_id) p
			JOIN agents a ON a.id = p.agent_id
			CROSS JOIN LATERAL (SELECT now() - ($3 - g) * (interval '30 days' / $3) AS fin) t
			CROSS JOIN LATERAL (SELECT CASE WHEN g > $3 - 10000 THEN 'queued'
			                               WHEN g % 1000 < 10 THEN 'failed'
			                               WHEN g % 1000 < 15 THEN 'canceled' ELSE 'succeeded' END AS status) s`,
			from, to, n, pq.StringArray(agentIDs))
		if err != nil {
			b.Fatalf("seed runs %d…%d: %v", from, to, err)
		}
	}
	if _, err := db.ExecContext(ctx, `VACUUM ANALYZE runs`); err != nil {
		b.Fatalf("vacuum: %v", err)
	}
	b.Logf("seeded %d runs in %v", n, time.Since(seedStart).Round(time.Second))

	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, false))
	defer benchStop(b, p)
	var someRun string
	if err := db.QueryRowContext(ctx, `SELECT id FROM runs WHERE workspace_id = $1 AND status = 'failed' ORDER BY seq DESC LIMIT 1`, wss[0].ID).Scan(&someRun); err != nil {
		b.Fatalf("pick a run: %v", err)
	}
	next := regexp.MustCompile(`href="(/ui/runs\?[^"]*cursor=[^"]+)" rel="next"`)
	b.ResetTimer()
	for _, who := range []struct{ name, token string }{{"admin", testAdminToken}, {"ws", wss[0].APIKey}} {
		br := newBrowser(p.app())
		br.signIn(b, who.token)
		first := br.mustGet(b, "/ui/runs?status=succeeded")
		m := next.FindStringSubmatch(first.body)
		if m == nil {
			b.Fatalf("runs ?status=succeeded as %s: got no next page; want one", who.name)
		}
		pages := []struct{ name, path string }{
			{"overview", "/ui/"},
			{"runs", "/ui/runs"},
			{"runs-failed", "/ui/runs?status=failed"},
			{"runs-agent", "/ui/runs?agent=agent-3"},
			{"runs-page2", strings.ReplaceAll(m[1], "&amp;", "&")},
			{"run", "/ui/runs/" + someRun},
			{"agents", "/ui/agents"},
		}
		for _, pg := range pages {
			br.mustGet(b, pg.path) // warm-up
			var took []time.Duration
			for range benchConsoleRequests {
				start := time.Now()
				br.mustGet(b, pg.path)
				took = append(took, time.Since(start))
			}
			slices.Sort(took)
			p50 := benchQuantile(took, .50)
			b.ReportMetric(p50, who.name+"-"+pg.name+"-p50-ms")
			b.Logf("%s %s %s: p50 %.1f ms, p95 %.1f ms", who.name, pg.name, pg.path, p50, benchQuantile(took, .95))
		}
	}
	b.ReportMetric(0, "ns/op")
}

// benchConsoleRequests is how many times BenchmarkConsole asks each page.
const benchConsoleRequests = 20

// BenchmarkSchedules: 10,000 schedules of @every 1m in one workspace, all due at the top of
// each minute, fired by one process (embedded worker, defaults) for two minutes. Their
// agent is paused, so the process's CPU is the scheduling's, not the runs' execution. It
// reports, per minute, the process's CPU seconds and the database's transactions (each
// statement outside a transaction is one), and the lag from due time to the run's
// creation (p50, p99, max) as the database's clock has it.
func BenchmarkSchedules(b *testing.B) {
	const n = 10000
	dsn := testDB(b)
	name := dbName(b, dsn)
	admin := adminDB(b)
	db := openTestDB(b, dsn)
	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	a := p.app()
	ws := a.createWorkspace(b)
	a.mustDo(b, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/echo", ws.APIKey, map[string]any{"paused": true}, 200, nil)
	if _, err := db.Exec(`INSERT INTO schedules (workspace_id, name, cron, agent_id, next_at)
		SELECT $1, 's' || i, '@every 1m', (SELECT id FROM agents WHERE workspace_id = $1 AND name = 'echo'),
		       date_trunc('minute', now()) + interval '1 minute'
		FROM generate_series(1, $2) i`, ws.ID, n); err != nil {
		b.Fatal(err)
	}
	if _, err := db.Exec(`ANALYZE schedules`); err != nil { // as autovacuum would have, on a table made over time
		b.Fatal(err)
	}
	xacts := func() int64 {
		var x int64
		if err := admin.QueryRow(`SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, name).Scan(&x); err != nil {
			b.Fatal(err)
		}
		return x
	}
	// Measure from 30 s into a minute for two minutes: two firings of all 10,000.
	var now time.Time
	if err := db.QueryRow(`SELECT now()`).Scan(&now); err != nil {
		b.Fatal(err)
	}
	start := now.Truncate(time.Minute).Add(90 * time.Second)
	time.Sleep(time.Until(start))
	x0, s0 := xacts(), benchProcStats(b, p.cmd.Process.Pid)
	time.Sleep(2 * time.Minute)
	x1, s1 := xacts(), benchProcStats(b, p.cmd.Process.Pid)
	var made int
	var p50, p99, worst float64
	if err := db.QueryRow(`SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
		percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag)
		FROM (SELECT extract(epoch FROM created_at - scheduled_for) AS lag FROM runs
		      WHERE scheduled_for > $1 AND scheduled_for <= $2) l`, start, start.Add(2*time.Minute)).Scan(&made, &p50, &p99, &worst); err != nil {
		b.Fatal(err)
	}
	perMinute, err := db.Query(`SELECT scheduled_for, count(*), max(extract(epoch FROM created_at - scheduled_for))
		FROM runs WHERE scheduled_for IS NOT NULL GROUP BY 1 ORDER BY 1`)
	if err != nil {
		b.Fatal(err)
	}
	for perMinute.Next() {
		var at time.Time
		var count int
		var most float64
		if err := perMinute.Scan(&at, &count, &most); err != nil {
			b.Fatal(err)
		}
		b.Logf("due %s: %d runs, the last made %.0f ms after", at.UTC().Format("15:04:05"), count, most*1000)
	}
	perMinute.Close()
	var dups int
	if err := db.QueryRow(`SELECT count(*) - count(DISTINCT (schedule_id, scheduled_for)) FROM runs`).Scan(&dups); err != nil {
		b.Fatal(err)
	}
	benchStop(b, p)
	if made != 2*n || dups != 0 {
		b.Errorf("runs made for the two minutes' due times: got %d (%d duplicates); want %d, none twice", made, dups, 2*n)
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric((s1.cpu-s0.cpu)/2, "CPU-s/min")
	b.ReportMetric(float64(x1-x0)/2, "xact/min")
	b.ReportMetric(p50*1000, "lag-p50-ms")
	b.ReportMetric(p99*1000, "lag-p99-ms")
	b.ReportMetric(worst*1000, "lag-max-ms")
}

// BenchmarkWaiting: runs that wait cost others nothing (issue "Runs that wait"). On a
// database with WAITING_N (default 100,000) runs waiting for a signal, seeded with SQL over
// 10 workspaces, one process with the embedded worker at defaults drains 10,000 new echo
// runs; then /metrics, a workspace's stats, and the console's overview and runs page are
// each asked benchConsoleRequests times (p50). The same on a database without the waiting
// runs. Reports each figure with them over without.
func BenchmarkWaiting(b *testing.B) {
	n := 100_000
	if v := os.Getenv("WAITING_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("WAITING_N: got %q; want a positive number of runs", v)
		}
	}
	with := benchWaitingRound(b, n)
	without := benchWaitingRound(b, 0)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(with.drain, "drain-runs/s")
	b.ReportMetric(with.drain/without.drain, "drain-with/without")
	for _, f := range []struct {
		name     string
		with, wo float64
	}{
		{"metrics", with.metrics, without.metrics}, {"stats", with.stats, without.stats},
		{"overview", with.overview, without.overview}, {"runs-page", with.runs, without.runs},
	} {
		b.ReportMetric(f.with/f.wo, f.name+"-with/without")
		b.Logf("%s p50: %.2f ms with %d waiting runs, %.2f ms without", f.name, f.with, n, f.wo)
	}
}

// benchWaiting is what benchWaitingRound measures: runs per second, and p50s in ms.
type benchWaiting struct {
	drain, metrics, stats, overview, runs float64
}

// benchWaitingRound measures one database with waiting runs waiting for a signal.
func benchWaitingRound(b *testing.B, waiting int) benchWaiting {
	b.Helper()
	const drainN = 10_000
	dsn := testDB(b)
	db := openTestDB(b, dsn)
	st := &store{db: db}
	var wss []workspace
	for i := range 10 {
		ws, err := st.createWorkspace(b.Context(), fmt.Sprintf("wait-%02d", i))
		if err != nil {
			b.Fatalf("create workspace: %v", err)
		}
		wss = append(wss, ws)
		for _, name := range []string{"echo", "approver"} {
			if _, err := st.createAgent(b.Context(), agent{WorkspaceID: ws.ID, Name: name, Kind: "echo", Config: json.RawMessage(`{}`)}); err != nil {
				b.Fatalf("create agent: %v", err)
			}
		}
	}
	seed := func(query string, args ...any) {
		b.Helper()
		if _, err := db.Exec(query, args...); err != nil {
			b.Fatalf("seed: %s: %v", query, err)
		}
	}
	seed(`INSERT INTO runs (workspace_id, agent_id, status, input, attempt, step, state, waiting_for, started_at)
		SELECT a.workspace_id, a.id, 'waiting', jsonb_build_object('i', g), 0, 2, '{"draft":"ready"}', '{"signal":"approve"}', now()
		FROM generate_series(1, $1) g
		JOIN (SELECT id, workspace_id, row_number() OVER (ORDER BY id) - 1 AS k FROM agents WHERE name = 'approver') a ON a.k = g % 10`, waiting)
	seed(`INSERT INTO runs (workspace_id, agent_id, input)
		SELECT a.workspace_id, a.id, jsonb_build_object('i', g)
		FROM generate_series(1, $1) g
		JOIN (SELECT id, workspace_id, row_number() OVER (ORDER BY id) - 1 AS k FROM agents WHERE name = 'echo') a ON a.k = g % 10
		ORDER BY g`, drainN)
	seed(`VACUUM ANALYZE runs`)

	p := startProcBin(b, agentappBinary(b, false), benchEnv(b, dsn, true))
	defer benchStop(b, p)
	start := time.Now()
	done := benchDrained(b, db, p, 10*time.Minute)
	var f benchWaiting
	f.drain = drainN / done.Sub(start).Seconds()
	if c := benchStatusCounts(b, db); c["succeeded"] != drainN || c["waiting"] != waiting {
		b.Fatalf("after the drain: got %v; want %d succeeded and %d waiting", c, drainN, waiting)
	}
	a := p.app()
	br := newBrowser(a)
	br.signIn(b, testAdminToken)
	timed := func(get func()) float64 {
		get() // warm-up
		var took []time.Duration
		for range benchConsoleRequests {
			began := time.Now()
			get()
			took = append(took, time.Since(began))
		}
		slices.Sort(took)
		return benchQuantile(took, .50)
	}
	ws := testWorkspace{ID: wss[0].ID, APIKey: wss[0].APIKey}
	f.metrics = timed(func() { a.metrics(b) })
	f.stats = timed(func() { a.stats(b, ws) })
	f.overview = timed(func() { br.mustGet(b, "/ui/") })
	f.runs = timed(func() { br.mustGet(b, "/ui/runs") })
	b.Logf("%d waiting runs: drained %d in %v (%.0f runs/s); p50 /metrics %.2f, stats %.2f, overview %.2f, runs page %.2f ms",
		waiting, drainN, done.Sub(start).Round(time.Millisecond), f.drain, f.metrics, f.stats, f.overview, f.runs)
	return f
}
