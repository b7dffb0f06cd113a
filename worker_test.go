package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestEmbeddedWorker: with RUN_WORKER_EMBEDDED=true a run created through the API
// succeeds without anyone calling the worker API or `agentapp worker`.
func TestEmbeddedWorker(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "60000"}))
	ws := a.createWorkspace(t)
	input := map[string]any{"prompt": "hello", "n": 3.5}
	r := a.createRun(t, ws, "echo", input)
	if r.Status != "queued" || r.Attempt != 0 {
		t.Fatalf("created run: got status %q attempt %d; want queued, 0", r.Status, r.Attempt)
	}
	r = a.waitRunStatus(t, ws, r.ID, "succeeded", 10*time.Second)
	want, _ := json.Marshal(input)
	if string(r.Output) != string(want) {
		t.Errorf("output: got %s; want %s", r.Output, want)
	}
	if r.Attempt != 1 || r.FinishedAt == nil || r.StartedAt == nil {
		t.Errorf("got attempt %d, started_at %v, finished_at %v; want 1 and both set", r.Attempt, r.StartedAt, r.FinishedAt)
	}
}

// runErrors decodes a run's errors.
func runErrors(t testing.TB, r runRecord) []runError {
	t.Helper()
	var errs []runError
	if err := json.Unmarshal(r.Errors, &errs); err != nil {
		t.Fatalf("run %s: got errors %s (%v); want a JSON array", r.ID, r.Errors, err)
	}
	return errs
}

// isNull reports whether a JSON value is absent or null.
func isNull(v json.RawMessage) bool { return len(v) == 0 || string(v) == "null" }

// errorText is a run's error, "" when it has none.
func errorText(r runRecord) string {
	if r.Error == nil {
		return ""
	}
	return *r.Error
}

// expireLease makes a running run's lease expire now.
func expireLease(t testing.TB, db *sql.DB, id string) {
	t.Helper()
	if _, err := db.Exec(`UPDATE runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
}

// TestWorkerNotEmbeddedByDefault: without RUN_WORKER_EMBEDDED the API server executes
// nothing on its own; the worker API and `agentapp worker -once` each execute a run.
func TestWorkerNotEmbeddedByDefault(t *testing.T) {
	t.Parallel()
	env := testEnv(t, testDB(t), nil)
	if _, ok := env["RUN_WORKER_EMBEDDED"]; ok {
		t.Fatal("testEnv: got RUN_WORKER_EMBEDDED set; want it unset (this test needs the default)")
	}
	a := startApp(t, env)
	ws := a.createWorkspace(t)

	r := a.createRun(t, ws, "echo", map[string]any{"via": "api"})
	// Without a worker there is no cycle to count or line to wait for: a sleep of ten poll
	// intervals is the only way to give a stray executor the time to show.
	time.Sleep(500 * time.Millisecond)
	if got := a.getRun(t, ws, r.ID); got.Status != "queued" || got.Attempt != 0 {
		t.Fatalf("without an embedded worker, after 500ms: got status %q attempt %d; want queued, 0", got.Status, got.Attempt)
	}
	s := a.process(t, nil)
	if s.Claimed != 1 || s.Succeeded != 1 || s.Skipped {
		t.Errorf("worker API summary: got %+v; want claimed 1, succeeded 1", s)
	}
	if got := a.getRun(t, ws, r.ID); got.Status != "succeeded" || string(got.Output) != `{"via":"api"}` {
		t.Errorf("after the worker API: got status %q output %s; want succeeded {\"via\":\"api\"}", got.Status, got.Output)
	}

	r = a.createRun(t, ws, "echo", map[string]any{"via": "once"})
	var stdout, stderr syncBuffer
	if err := run(context.Background(), []string{"worker", "-once"}, func(k string) string { return env[k] }, &stdout, &stderr); err != nil {
		t.Fatalf("agentapp worker -once: got %v; want success\nstderr:\n%s", err, stderr.String())
	}
	var once summary
	dec := json.NewDecoder(strings.NewReader(stdout.String()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&once); err != nil {
		t.Fatalf("agentapp worker -once stdout: got %q; want a JSON summary (%v)", stdout.String(), err)
	}
	if once.Claimed != 1 || once.Succeeded != 1 {
		t.Errorf("agentapp worker -once summary: got %+v; want claimed 1, succeeded 1", once)
	}
	if got := a.getRun(t, ws, r.ID); got.Status != "succeeded" || got.Attempt != 1 || string(got.Output) != `{"via":"once"}` {
		t.Errorf("after worker -once: got status %q attempt %d output %s; want succeeded, 1, {\"via\":\"once\"}", got.Status, got.Attempt, got.Output)
	}
}

// TestWorkerWorkspaceFilter: RUN_WORKER_WORKSPACE_ID limits an embedded worker and the
// worker API to one workspace; without it, the worker API's workspace_id picks one.
func TestWorkerWorkspaceFilter(t *testing.T) {
	t.Parallel()
	// The workspaces must exist before the server starts: its environment names one.
	setup := func(t *testing.T) (dsn string, wsA, wsB testWorkspace) {
		dsn = testDB(t)
		st := &store{db: openTestDB(t, dsn)}
		return dsn, seedWorkspace(t, st), seedWorkspace(t, st)
	}

	t.Run("embedded", func(t *testing.T) {
		t.Parallel()
		dsn, wsA, wsB := setup(t)
		a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_WORKSPACE_ID": wsA.ID}))
		rb := a.createRun(t, wsB, "echo", "b") // older: the filter, not the order, leaves it
		ra := a.createRun(t, wsA, "echo", "a")
		a.waitRunStatus(t, wsA, ra.ID, "succeeded", 10*time.Second)
		after := a.cycles(t)
		eventually(t, 10*time.Second, "three more worker cycles", func() bool { return a.cycles(t) >= after+3 })
		if got := a.getRun(t, wsB, rb.ID); got.Status != "queued" {
			t.Errorf("run of workspace B with a worker limited to A: got status %q; want queued", got.Status)
		}
	})

	t.Run("worker API", func(t *testing.T) {
		t.Parallel()
		dsn, wsA, wsB := setup(t)
		a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_WORKSPACE_ID": wsA.ID}))
		rb := a.createRun(t, wsB, "echo", "b")
		ra := a.createRun(t, wsA, "echo", "a")
		if s := a.process(t, nil); s.Claimed != 1 || s.Succeeded != 1 {
			t.Errorf("worker API without workspace_id: got %+v; want claimed 1 (A's run), succeeded 1", s)
		}
		if got := a.getRun(t, wsA, ra.ID); got.Status != "succeeded" {
			t.Errorf("run of A: got status %q; want succeeded", got.Status)
		}
		if got := a.getRun(t, wsB, rb.ID); got.Status != "queued" {
			t.Errorf("run of B: got status %q; want queued", got.Status)
		}
		// The variable binds the process's worker however it is triggered: asking it for
		// another workspace is refused, not obeyed.
		status, _, body := a.do(t, "POST", "/v1/worker/process", testAdminToken, nil, map[string]any{"workspace_id": wsB.ID})
		if status != 422 {
			t.Errorf("worker API with workspace_id B on a worker limited to A: got %d %s; want 422", status, body)
		}
		if got := a.getRun(t, wsB, rb.ID); got.Status != "queued" {
			t.Errorf("run of B after asking for B: got status %q; want queued", got.Status)
		}
		if s := a.process(t, map[string]any{"workspace_id": strings.ToUpper(wsA.ID)}); s.Skipped || s.Claimed != 0 {
			t.Errorf("worker API with workspace_id A (upper case): got %+v; want a cycle, claimed 0", s)
		}
	})

	t.Run("worker API workspace_id on an unlimited worker", func(t *testing.T) {
		t.Parallel()
		dsn, wsA, wsB := setup(t)
		a := startApp(t, testEnv(t, dsn, nil))
		rb := a.createRun(t, wsB, "echo", "b")
		ra := a.createRun(t, wsA, "echo", "a")
		if s := a.process(t, map[string]any{"workspace_id": wsA.ID}); s.Claimed != 1 || s.Succeeded != 1 {
			t.Errorf("worker API with workspace_id A: got %+v; want claimed 1, succeeded 1", s)
		}
		if got := a.getRun(t, wsA, ra.ID); got.Status != "succeeded" {
			t.Errorf("run of A: got status %q; want succeeded", got.Status)
		}
		if got := a.getRun(t, wsB, rb.ID); got.Status != "queued" {
			t.Errorf("run of B: got status %q; want queued", got.Status)
		}
	})
}

// TestWorkerBatchLimit: one cycle claims at most min(batch limit, free slots) runs,
// oldest first; the worker API's limit replaces the batch limit.
func TestWorkerBatchLimit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		env         map[string]string
		body        any
		wantClaimed int
	}{
		{"RUN_WORKER_BATCH_LIMIT", map[string]string{"RUN_WORKER_BATCH_LIMIT": "2"}, nil, 2},
		{"limit field", map[string]string{"RUN_WORKER_BATCH_LIMIT": "4"}, map[string]any{"limit": 1}, 1},
		{"defaults to the concurrency", map[string]string{"RUN_WORKER_CONCURRENCY": "3"}, nil, 3},
		{"free slots cap the limit field", map[string]string{"RUN_WORKER_CONCURRENCY": "3"}, map[string]any{"limit": 5}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a := startApp(t, testEnv(t, testDB(t), tc.env))
			ws := a.createWorkspace(t)
			var created struct{ Runs []runRecord }
			runs := make([]map[string]any, 5)
			for i := range runs {
				runs[i] = map[string]any{"agent": "echo", "input": i}
			}
			a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": runs}, 201, &created)
			s := a.process(t, tc.body)
			if s.Claimed != tc.wantClaimed || s.Succeeded != tc.wantClaimed {
				t.Errorf("summary: got %+v; want claimed %d, succeeded %d", s, tc.wantClaimed, tc.wantClaimed)
			}
			if st := a.stats(t, ws); st.Queued != int64(5-tc.wantClaimed) || st.Succeeded != int64(tc.wantClaimed) {
				t.Errorf("stats: got %+v; want queued %d, succeeded %d", st, 5-tc.wantClaimed, tc.wantClaimed)
			}
			for i, r := range created.Runs {
				want := statusQueued
				if i < tc.wantClaimed {
					want = statusSucceeded // oldest first
				}
				if got := a.getRun(t, ws, r.ID); got.Status != want {
					t.Errorf("run %d (in creation order): got status %q; want %q", i, got.Status, want)
				}
			}
		})
	}
}

// waitLockWaiter waits until some session waits for a lock on the runs table.
func waitLockWaiter(t testing.TB, db *sql.DB) {
	t.Helper()
	eventually(t, 10*time.Second, "a session waits for the locked runs table", func() bool {
		var n int
		err := db.QueryRow(`SELECT count(*) FROM pg_locks WHERE locktype = 'relation'
			AND relation = 'runs'::regclass AND NOT granted`).Scan(&n)
		if err != nil {
			t.Fatalf("read pg_locks: got %v; want the count", err)
		}
		return n > 0
	})
}

// lockRuns holds LOCK TABLE runs IN EXCLUSIVE MODE until the returned function is called
// (or the test ends): every claim blocks meanwhile, reads do not.
func lockRuns(t testing.TB, db *sql.DB) (release func()) {
	t.Helper()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`LOCK TABLE runs IN EXCLUSIVE MODE`); err != nil {
		tx.Rollback()
		t.Fatal(err)
	}
	var once sync.Once
	release = func() { once.Do(func() { tx.Rollback() }) }
	t.Cleanup(release)
	return release
}

// TestWorkerCycleSkipsWhileOneRuns: a cycle asked for while another is in progress in the
// same process is skipped, not queued behind it nor run beside it; every run is executed
// once. The first cycle is held inside its claim statement by a lock on the runs table.
func TestWorkerCycleSkipsWhileOneRuns(t *testing.T) {
	t.Parallel()

	t.Run("worker API", func(t *testing.T) {
		t.Parallel()
		dsn := testDB(t)
		a := startApp(t, testEnv(t, dsn, nil))
		ws := a.createWorkspace(t)
		var ids []string
		for i := range 3 {
			ids = append(ids, a.createRun(t, ws, "echo", i).ID)
		}
		db := openTestDB(t, dsn)
		release := lockRuns(t, db)

		type answer struct {
			status int
			body   []byte
			err    error
		}
		// process may be called outside the test goroutine.
		process := func(c *http.Client) answer {
			status, _, body, err := send(c, "POST", a.base+"/v1/worker/process", testAdminToken, nil, nil)
			return answer{status, body, err}
		}
		first := make(chan answer, 1)
		go func() { first <- process(testClient) }()
		waitLockWaiter(t, db)

		// A cycle that waited for the first instead of skipping would not answer while
		// the table is locked.
		second := process(&http.Client{Timeout: 10 * time.Second})
		var s summary
		if second.err != nil || second.status != 200 || json.Unmarshal(second.body, &s) != nil || !s.Skipped || s.Claimed != 0 {
			t.Errorf("worker API while a cycle is blocked in its claim: got %d %s %v; want 200 and a summary skipped, claimed 0",
				second.status, second.body, second.err)
		}
		select {
		case ans := <-first:
			t.Fatalf("first cycle while the table was locked: got answer %d %s %v; want none yet", ans.status, ans.body, ans.err)
		default:
		}
		release()
		var ans answer
		select {
		case ans = <-first:
		case <-time.After(20 * time.Second):
			t.Fatal("first cycle: got no answer within 20s of releasing the lock; want one")
		}
		s = summary{}
		if ans.err != nil || ans.status != 200 || json.Unmarshal(ans.body, &s) != nil {
			t.Fatalf("first cycle: got %d %s %v; want 200 and a summary", ans.status, ans.body, ans.err)
		}
		if s.Skipped || s.Claimed != 3 || s.Succeeded != 3 {
			t.Errorf("first cycle: got %+v; want claimed 3, succeeded 3", s)
		}
		for _, id := range ids {
			if r := a.getRun(t, ws, id); r.Status != "succeeded" || r.Attempt != 1 {
				t.Errorf("run %s: got status %q attempt %d; want succeeded, 1", id, r.Status, r.Attempt)
			}
		}
		if s := a.process(t, nil); s.Skipped || s.Claimed != 0 {
			t.Errorf("a cycle after both: got %+v; want not skipped, claimed 0", s)
		}
	})

	t.Run("worker.cycle", func(t *testing.T) {
		t.Parallel()
		db := openTestDB(t, testDB(t))
		st := &store{db: db}
		_, ids := seedRuns(t, st, 3, 3)
		w := newWorker(st, testLogger(t), workerConfig{Poll: time.Second, BatchLimit: 10, Concurrency: 10,
			Lease: 30 * time.Second, ShutdownTimeout: 5 * time.Second}, newMetrics())
		runWorkerForTest(t, w)
		release := lockRuns(t, db)

		type result struct {
			s   summary
			err error
		}
		first := make(chan result, 1)
		go func() {
			s, err := w.process(context.Background(), 10, "")
			first <- result{s, err}
		}()
		waitLockWaiter(t, db)
		second := make(chan struct{})
		go func() {
			defer close(second)
			s, execs, err := w.cycle(context.Background(), 10, "", func([]*execution) {})
			if err != nil || !s.Skipped || s.Claimed != 0 || len(execs) != 0 {
				t.Errorf("second cycle: got %+v, %d executions, err %v; want skipped, none", s, len(execs), err)
			}
		}()
		select {
		case <-second:
		case <-time.After(10 * time.Second):
			t.Error("second cycle while the first was blocked: got no return within 10s; want it skipped at once")
		}
		release()
		<-second
		var r result
		select {
		case r = <-first:
		case <-time.After(20 * time.Second):
			t.Fatal("first cycle: got no return within 20s of releasing the lock; want one")
		}
		if r.err != nil || r.s.Skipped || r.s.Claimed != 3 || r.s.Succeeded != 3 {
			t.Errorf("first cycle: got %+v, err %v; want claimed 3, succeeded 3", r.s, r.err)
		}
		for _, id := range ids {
			if row := readRunRow(t, db, id); row.Status != "succeeded" || row.Attempt != 1 {
				t.Errorf("run %s: got status %q attempt %d; want succeeded, 1", id, row.Status, row.Attempt)
			}
		}
	})
}

// runWorkerForTest runs w (not looping: cycles come from the test) until the test ends.
func runWorkerForTest(t testing.TB, w *worker) {
	ctx, stop := context.WithCancel(context.Background())
	go w.run(ctx, false)
	t.Cleanup(func() { stop(); <-w.done })
}

// TestWorkerFencing: once another worker has recovered an expired lease and claimed the
// next attempt, nothing the first worker writes for its old attempt changes the run.
func TestWorkerFencing(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ctx := context.Background()
	ws, ids := seedRuns(t, st, 1, 3)
	id := ids[0]
	const lease = 30 * time.Second

	resA, err := st.claim(ctx, newLineup(), "worker-A", 1, "", lease, true)
	claimedA := resA.claimed
	if err != nil || len(claimedA) != 1 || claimedA[0].Attempt != 1 {
		t.Fatalf("A's claim: got %+v, err %v; want run %s attempt 1", claimedA, err, id)
	}
	expireLease(t, db, id)

	// B's cycle recovers the run; the same or the next cycle claims its second attempt.
	var claimedB []claimedRun
	recovered := 0
	for i := 0; i < 2 && len(claimedB) == 0; i++ {
		res, err := st.claim(ctx, newLineup(), "worker-B", 1, "", lease, true)
		if err != nil {
			t.Fatal(err)
		}
		if res.failed != 0 {
			t.Fatalf("B's claim: got %d failed for good; want 0 (attempts remain)", res.failed)
		}
		claimedB, recovered = res.claimed, recovered+res.requeued
	}
	if recovered != 1 || len(claimedB) != 1 || claimedB[0].ID != id || claimedB[0].Attempt != 2 {
		t.Fatalf("B: got recovered %d, claimed %+v; want recovered 1, run %s attempt 2", recovered, claimedB, id)
	}

	refA := attemptRef{id, 1, 1}
	for _, kind := range []attemptEnd{endSucceeded, endFailed, endCanceled, endRequeued, endPushedBack} {
		got, err := st.finish(ctx, "worker-A", []outcome{{attemptRef: refA, End: kind, Output: json.RawMessage(`"from A"`), Message: "from A"}})
		if err != nil {
			t.Fatal(err)
		}
		if status, ok := got[id]; ok {
			t.Errorf("A's finish %s of attempt 1: got status %q; want no status (not A's attempt any more)", kind, status)
		}
	}
	// A's worker id with B's attempt number, and B's worker id with A's attempt number.
	if got, err := st.finish(ctx, "worker-A", []outcome{{attemptRef: attemptRef{id, 2, 1}, End: endSucceeded, Output: json.RawMessage(`"from A"`)}}); err != nil || len(got) != 0 {
		t.Errorf("A's finish of attempt 2: got %v, err %v; want nothing written", got, err)
	}
	if got, err := st.finish(ctx, "worker-B", []outcome{{attemptRef: refA, End: endFailed, Message: "stale"}}); err != nil || len(got) != 0 {
		t.Errorf("B's finish of attempt 1: got %v, err %v; want nothing written", got, err)
	}
	held, err := st.renew(ctx, "worker-A", []attemptRef{refA, {id, 2, 1}}, lease)
	if err != nil || len(held) != 0 {
		t.Errorf("A's renew: got %v, err %v; want nothing held", held, err)
	}
	if row := readRunRow(t, db, id); row.Status != "running" || row.Attempt != 2 || row.WorkerID.String != "worker-B" {
		t.Fatalf("after A's writes: got status %q attempt %d worker %q; want running, 2, worker-B", row.Status, row.Attempt, row.WorkerID.String)
	}

	refB := attemptRef{id, 2, 1}
	if held, err := st.renew(ctx, "worker-B", []attemptRef{refB}, lease); err != nil || len(held) != 1 {
		t.Errorf("B's renew: got %v, err %v; want attempt 2 held", held, err)
	}
	got, err := st.finish(ctx, "worker-B", []outcome{{attemptRef: refB, End: endSucceeded, Output: json.RawMessage(`"from B"`)}})
	if err != nil || got[id] != "succeeded" {
		t.Fatalf("B's finish: got %v, err %v; want %s succeeded", got, err, id)
	}
	r, err := st.getRun(ctx, ws.ID, id)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != "succeeded" || r.Attempt != 2 || string(r.Output) != `"from B"` {
		t.Errorf("final run: got status %q attempt %d output %s; want succeeded, 2, \"from B\"", r.Status, r.Attempt, r.Output)
	}
	if errs := runErrors(t, r); len(errs) != 1 || errs[0].Attempt != 1 || !strings.Contains(errs[0].Message, "lease expired") {
		t.Errorf("errors: got %+v; want one entry for attempt 1 saying the lease expired", errs)
	}
	// After the final write, late writes of either worker still change nothing.
	if got, err := st.finish(ctx, "worker-B", []outcome{{attemptRef: refB, End: endFailed, Message: "late"}}); err != nil || len(got) != 0 {
		t.Errorf("B's second finish: got %v, err %v; want nothing written", got, err)
	}
}

// TestWorkerLeaseExpiredNoAttemptsLeft: a run whose lease expired on its last attempt is
// recovered as failed, with an error that says why.
func TestWorkerLeaseExpiredNoAttemptsLeft(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ctx := context.Background()
	ws, ids := seedRuns(t, st, 1, 1)
	if res, err := st.claim(ctx, newLineup(), "worker-A", 1, "", 30*time.Second, true); err != nil || len(res.claimed) != 1 {
		t.Fatalf("claim: got %+v, err %v; want one run", res.claimed, err)
	}
	expireLease(t, db, ids[0])
	res, err := st.claim(ctx, newLineup(), "worker-B", 1, "", 30*time.Second, true)
	if err != nil || len(res.claimed) != 0 || res.requeued != 0 || res.failed != 1 {
		t.Fatalf("B's claim: got claimed %d, requeued %d, failed %d, err %v; want 0, 0, 1", len(res.claimed), res.requeued, res.failed, err)
	}
	r, err := st.getRun(ctx, ws.ID, ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != "failed" || r.Attempt != 1 || r.FinishedAt == nil || !strings.Contains(errorText(r), "lease expired") {
		t.Errorf("got status %q attempt %d finished_at %v error %q; want failed, 1, set, an error saying the lease expired",
			r.Status, r.Attempt, r.FinishedAt, errorText(r))
	}
	if errs := runErrors(t, r); len(errs) != 1 || errs[0].Attempt != 1 || errs[0].Message != errorText(r) {
		t.Errorf("errors: got %+v; want one entry, attempt 1, with the run's error", errs)
	}
	if held, err := st.renew(ctx, "worker-A", []attemptRef{{ids[0], 1, 1}}, 30*time.Second); err != nil || len(held) != 0 {
		t.Errorf("A's renew after recovery: got %v, err %v; want nothing held", held, err)
	}
}

// webhookRecorder is a test webhook endpoint that records when it was called.
type webhookRecorder struct {
	mu    sync.Mutex
	calls []time.Time
}

func (h *webhookRecorder) record() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, time.Now())
	return len(h.calls)
}

func (h *webhookRecorder) times() []time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]time.Time(nil), h.calls...)
}

// newWebhookServer starts an HTTP server on 127.0.0.1, closed when the test ends (after
// any app started later, as cleanups run last-in first-out).
func newWebhookServer(t testing.TB, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// TestWorkerRetries: a failed attempt is retried after a backoff while attempts remain,
// and every failed attempt's error is kept.
func TestWorkerRetries(t *testing.T) {
	t.Parallel()
	var flaky, down webhookRecorder
	mux := http.NewServeMux()
	mux.HandleFunc("/flaky", func(w http.ResponseWriter, r *http.Request) {
		if flaky.record() == 1 {
			http.Error(w, "try later", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok":true}`)
	})
	mux.HandleFunc("/down", func(w http.ResponseWriter, r *http.Request) {
		down.record()
		http.Error(w, "down", http.StatusInternalServerError)
	})
	srv := newWebhookServer(t, mux)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "flaky", "webhook", map[string]any{"url": srv.URL + "/flaky"})
	a.createAgent(t, ws, "down", "webhook", map[string]any{"url": srv.URL + "/down"})
	var rf, rd runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "flaky", "input": 1}, 201, &rf)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "down", "input": 2, "max_attempts": 3}, 201, &rd)

	rf = a.waitRunStatus(t, ws, rf.ID, "succeeded", 15*time.Second)
	if rf.Attempt != 2 || string(rf.Output) != `{"ok":true}` || rf.Error != nil {
		t.Errorf("flaky run: got attempt %d output %s error %q; want 2, {\"ok\":true}, null", rf.Attempt, rf.Output, errorText(rf))
	}
	if errs := runErrors(t, rf); len(errs) != 1 || errs[0].Attempt != 1 || !strings.Contains(errs[0].Message, "500") {
		t.Errorf("flaky run errors: got %+v; want one entry for attempt 1 mentioning 500", errs)
	}

	rd = a.waitRunStatus(t, ws, rd.ID, "failed", 15*time.Second)
	errs := runErrors(t, rd)
	if rd.Attempt != 3 || len(errs) != 3 {
		t.Fatalf("down run: got attempt %d, %d errors (%+v); want 3 and 3", rd.Attempt, len(errs), errs)
	}
	for i, e := range errs {
		if e.Attempt != i+1 || !strings.Contains(e.Message, "500") || e.At.IsZero() {
			t.Errorf("down run errors[%d]: got %+v; want attempt %d, a message mentioning 500, a time", i, e, i+1)
		}
	}
	if errorText(rd) != errs[2].Message || rd.FinishedAt == nil || !isNull(rd.Output) {
		t.Errorf("down run: got error %q finished_at %v output %s; want the last attempt's message %q, set, null",
			errorText(rd), rd.FinishedAt, rd.Output, errs[2].Message)
	}
	calls := down.times()
	if len(calls) != 3 {
		t.Fatalf("down webhook: got %d calls; want 3", len(calls))
	}
	// Backoff drawn from 0 … 500 ms × 2^(attempt-1) (full jitter): upper bounds only, with
	// slack for the claim; TestSchedBackoffJitter reads the delays themselves.
	if gap := calls[1].Sub(calls[0]); gap > 500*time.Millisecond+scDueBound {
		t.Errorf("gap before attempt 2: got %v; want at most the 500ms backoff bound", gap)
	}
	if gap := calls[2].Sub(calls[1]); gap > time.Second+scDueBound {
		t.Errorf("gap before attempt 3: got %v; want at most the 1s backoff bound", gap)
	}
}

// TestWorkerWebhookContract: the webhook receives the run as specified and its 2xx JSON
// body becomes the output; each way a webhook can fail fails the attempt with a message
// that says which.
func TestWorkerWebhookContract(t *testing.T) {
	t.Parallel()
	type received struct {
		method, path, contentType, idempotencyKey string
		body                                      []byte
	}
	got := make(chan received, 10)
	exact := `"` + strings.Repeat("x", maxWebhookBody-2) + `"` // valid JSON of exactly 1 MiB
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		got <- received{r.Method, r.URL.Path, r.Header.Get("Content-Type"), r.Header.Get("Idempotency-Key"), body}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, "{ \"answer\" : 42,\n \"list\": [1, 2] }\n")
	})
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"ok":false}`)
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		// net/http notices the client hanging up (and ends r.Context()) only once the
		// request body has been read to the end.
		io.Copy(io.Discard, r.Body)
		select {
		case <-r.Context().Done():
		case <-time.After(20 * time.Second):
		}
	})
	mux.HandleFunc("/text", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "all good, but not JSON")
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `"`+strings.Repeat("x", maxWebhookBody)+`"`)
	})
	mux.HandleFunc("/exact", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, exact)
	})
	srv := newWebhookServer(t, mux)
	refused := "http://" + freeAddr(t) + "/"

	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)

	t.Run("request and output", func(t *testing.T) {
		a.createAgent(t, ws, "ok", "webhook", map[string]any{"url": srv.URL + "/ok", "timeout_ms": 10000})
		input := map[string]any{"question": "life", "n": []any{1.5, "two", nil}}
		r := a.createRun(t, ws, "ok", input)
		r = a.waitRunStatus(t, ws, r.ID, "succeeded", 10*time.Second)
		var output any
		if err := json.Unmarshal(r.Output, &output); err != nil || !reflect.DeepEqual(output, map[string]any{"answer": 42.0, "list": []any{1.0, 2.0}}) {
			t.Errorf("output: got %s; want {\"answer\":42,\"list\":[1,2]}", r.Output)
		}
		var req received
		select {
		case req = <-got:
		default:
			t.Fatal("webhook: got no call; want one")
		}
		if req.method != "POST" || req.path != "/ok" || req.contentType != "application/json" || req.idempotencyKey != r.ID {
			t.Errorf("request: got %s %s, Content-Type %q, Idempotency-Key %q; want POST /ok, application/json, %s",
				req.method, req.path, req.contentType, req.idempotencyKey, r.ID)
		}
		var body map[string]json.RawMessage
		if err := json.Unmarshal(req.body, &body); err != nil {
			t.Fatalf("request body: got %s (%v); want a JSON object", req.body, err)
		}
		wantInput, _ := json.Marshal(input)
		want := map[string]string{"run_id": `"` + r.ID + `"`, "workspace_id": `"` + ws.ID + `"`, "agent": `"ok"`,
			"attempt": `1`, "input": string(wantInput), "events_url": `"` + a.base + "/v1/runs/" + r.ID + "/events" + `"`,
			"step": `1`, "state": `null`, "resume": `null`}
		for k, v := range want {
			var gotV, wantV any
			json.Unmarshal(body[k], &gotV)
			json.Unmarshal([]byte(v), &wantV)
			if fmt.Sprint(gotV) != fmt.Sprint(wantV) || body[k] == nil {
				t.Errorf("request body %s: got %s; want %s", k, body[k], v)
			}
		}
		var token string
		if json.Unmarshal(body["events_token"], &token) != nil || !strings.HasPrefix(token, "1.") {
			t.Errorf("request body events_token: got %s; want a token for attempt 1", body["events_token"])
		}
		if len(body) != len(want)+1 {
			t.Errorf("request body: got keys of %s; want exactly run_id, workspace_id, agent, attempt, step, state, resume, input, events_url, events_token", req.body)
		}
	})

	t.Run("exactly 1 MiB", func(t *testing.T) {
		a.createAgent(t, ws, "exact", "webhook", map[string]any{"url": srv.URL + "/exact"})
		r := a.createRun(t, ws, "exact", nil)
		r = a.waitRunStatus(t, ws, r.ID, "succeeded", 10*time.Second)
		if string(r.Output) != exact {
			t.Errorf("output: got %d bytes; want the 1 MiB body", len(r.Output))
		}
	})

	for _, tc := range []struct {
		name, url string
		timeoutMS int
		want      string
	}{
		{"non-2xx status", srv.URL + "/status", 0, "HTTP 503"},
		{"timeout", srv.URL + "/slow", 100, "timed out"},
		{"connection refused", refused, 0, "connection"},
		{"non-JSON body", srv.URL + "/text", 0, "not JSON"},
		{"body over 1 MiB", srv.URL + "/big", 0, "over 1 MiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			config := map[string]any{"url": tc.url}
			if tc.timeoutMS > 0 {
				config["timeout_ms"] = tc.timeoutMS
			}
			name := strings.ReplaceAll(tc.name, " ", "-")
			a.createAgent(t, ws, name, "webhook", config)
			var r runRecord
			a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": name, "input": 1, "max_attempts": 1}, 201, &r)
			r = a.waitRunStatus(t, ws, r.ID, "failed", 15*time.Second)
			if !strings.Contains(errorText(r), tc.want) || r.Attempt != 1 || !isNull(r.Output) {
				t.Errorf("got error %q attempt %d output %s; want an error containing %q, 1, null", errorText(r), r.Attempt, r.Output, tc.want)
			}
			if errs := runErrors(t, r); len(errs) != 1 || errs[0].Message != errorText(r) {
				t.Errorf("errors: got %+v; want the one attempt's error", errs)
			}
		})
	}
}

// TestWorkerWebhookAllowedHosts: with AGENT_WEBHOOK_ALLOWED_HOSTS a webhook outside the
// list is refused at agent creation and, should one be in the database, at execution.
func TestWorkerWebhookAllowedHosts(t *testing.T) {
	t.Parallel()
	var allowedCalls, otherCalls webhookRecorder
	allowed := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		allowedCalls.record()
		io.WriteString(w, `"allowed"`)
	}))
	other := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		otherCalls.record()
		io.WriteString(w, `"other"`)
	}))
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "example.com," + allowed.Listener.Addr().String()}))
	ws := a.createWorkspace(t)

	status, _, body := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, nil,
		map[string]any{"name": "other", "kind": "webhook", "config": map[string]any{"url": other.URL}})
	if status != 422 {
		t.Errorf("agent with a URL outside AGENT_WEBHOOK_ALLOWED_HOSTS: got %d %s; want 422", status, body)
	}
	a.createAgent(t, ws, "allowed", "webhook", map[string]any{"url": allowed.URL})
	// An agent created before the list was set: put straight into the database.
	st := &store{db: openTestDB(t, dsn)}
	if _, err := st.createAgent(context.Background(), agent{WorkspaceID: ws.ID, Name: "legacy", Kind: "webhook",
		Config: json.RawMessage(`{"url":"` + other.URL + `"}`)}); err != nil {
		t.Fatal(err)
	}
	ra := a.createRun(t, ws, "allowed", nil)
	var rl runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "legacy", "max_attempts": 1}, 201, &rl)
	if s := a.process(t, nil); s.Claimed != 2 || s.Succeeded != 1 || s.Failed != 1 {
		t.Errorf("summary: got %+v; want claimed 2, succeeded 1, failed 1", s)
	}
	if r := a.getRun(t, ws, ra.ID); r.Status != "succeeded" || string(r.Output) != `"allowed"` {
		t.Errorf("run of the allowed webhook: got status %q output %s; want succeeded, \"allowed\"", r.Status, r.Output)
	}
	if r := a.getRun(t, ws, rl.ID); r.Status != "failed" || !strings.Contains(errorText(r), "AGENT_WEBHOOK_ALLOWED_HOSTS") {
		t.Errorf("run of the webhook outside the list: got status %q error %q; want failed, an error naming AGENT_WEBHOOK_ALLOWED_HOSTS", r.Status, errorText(r))
	}
	if n := len(otherCalls.times()); n != 0 {
		t.Errorf("calls to the webhook outside the list: got %d; want 0", n)
	}
	if n := len(allowedCalls.times()); n != 1 {
		t.Errorf("calls to the allowed webhook: got %d; want 1", n)
	}
}

// TestWorkerAgentPanic: a panic inside an agent fails that attempt only, and the worker
// goes on executing runs.
func TestWorkerAgentPanic(t *testing.T) {
	t.Parallel()
	// A nil *http.Client panics inside the webhook agent.
	webhook := claimedRun{ID: "00000000-0000-0000-0000-000000000001", AgentKind: "webhook", AgentName: "hook",
		AgentConfig: json.RawMessage(`{"url":"http://127.0.0.1:9/hook"}`), Input: json.RawMessage(`{}`), Attempt: 1,
		Secrets: []string{newSigningSecret()}}
	out, _, err := runAgent(context.Background(), nil, nil, webhook)
	if err == nil || !strings.Contains(err.Error(), "agent panicked") || out != nil {
		t.Fatalf("runAgent with a panicking agent: got output %s, err %v; want no output and an error saying the agent panicked", out, err)
	}

	t.Run("worker goes on", func(t *testing.T) {
		db := openTestDB(t, testDB(t))
		st := &store{db: db}
		ws, echoIDs := seedRuns(t, st, 1, 3)
		ctx := context.Background()
		if _, err := st.createAgent(ctx, agent{WorkspaceID: ws.ID, Name: "hook", Kind: "webhook", Config: webhook.AgentConfig}); err != nil {
			t.Fatal(err)
		}
		hook, _, err := st.createRun(ctx, ws.ID, newRun{Agent: "hook", Input: json.RawMessage(`{}`), MaxAttempts: 1})
		if err != nil {
			t.Fatal(err)
		}
		w := newWorker(st, testLogger(t), workerConfig{Poll: time.Second, BatchLimit: 10, Concurrency: 10,
			Lease: 30 * time.Second, ShutdownTimeout: 5 * time.Second}, newMetrics())
		runWorkerForTest(t, w)
		w.client = nil // every webhook execution panics; set before the worker executes anything
		s, err := w.process(ctx, 10, "")
		if err != nil || s.Claimed != 2 || s.Succeeded != 1 || s.Failed != 1 {
			t.Fatalf("cycle with a panicking agent: got %+v, err %v; want claimed 2, succeeded 1, failed 1", s, err)
		}
		r, err := st.getRun(ctx, ws.ID, hook.ID)
		if err != nil || r.Status != "failed" || !strings.Contains(errorText(r), "agent panicked") {
			t.Errorf("run whose agent panicked: got status %q error %q (err %v); want failed, an error saying the agent panicked", r.Status, errorText(r), err)
		}
		if r, err := st.getRun(ctx, ws.ID, echoIDs[0]); err != nil || r.Status != "succeeded" {
			t.Errorf("echo run in the same cycle: got status %q (err %v); want succeeded", r.Status, err)
		}
		next, _, err := st.createRun(ctx, ws.ID, newRun{Agent: "echo", Input: json.RawMessage(`"after"`), MaxAttempts: 1})
		if err != nil {
			t.Fatal(err)
		}
		if s, err := w.process(ctx, 10, ""); err != nil || s.Claimed != 1 || s.Succeeded != 1 {
			t.Errorf("next cycle: got %+v, err %v; want claimed 1, succeeded 1", s, err)
		}
		if r, err := st.getRun(ctx, ws.ID, next.ID); err != nil || r.Status != "succeeded" || string(r.Output) != `"after"` {
			t.Errorf("run after the panic: got status %q output %s (err %v); want succeeded, \"after\"", r.Status, r.Output, err)
		}
	})
}

// cancel asks for a run to be canceled and returns the answer's status and run.
func (a *app) cancel(t testing.TB, ws testWorkspace, id string) (int, runRecord) {
	t.Helper()
	status, _, body := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+id+"/cancel", ws.APIKey, nil, nil)
	var r runRecord
	if status == 200 {
		if err := json.Unmarshal(body, &r); err != nil {
			t.Fatalf("cancel %s: got %s (%v); want the run as JSON", id, body, err)
		}
	}
	return status, r
}

// TestWorkerCancel: a queued run is canceled at once; a running one has its execution
// canceled, in this process or another, and ends canceled; a final run cannot be canceled.
func TestWorkerCancel(t *testing.T) {
	t.Parallel()
	slow := map[string]any{"delay_ms": 60000}

	t.Run("queued", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), nil))
		ws := a.createWorkspace(t)
		r := a.createRun(t, ws, "echo", 1)
		status, c := a.cancel(t, ws, r.ID)
		if status != 200 || c.Status != "canceled" || c.FinishedAt == nil {
			t.Fatalf("cancel of a queued run: got %d, status %q, finished_at %v; want 200, canceled, set", status, c.Status, c.FinishedAt)
		}
		if s := a.process(t, nil); s.Claimed != 0 {
			t.Errorf("a cycle after the cancel: got %+v; want claimed 0", s)
		}
		if got := a.getRun(t, ws, r.ID); got.Status != "canceled" || got.Attempt != 0 {
			t.Errorf("canceled run: got status %q attempt %d; want canceled, 0", got.Status, got.Attempt)
		}
		if status, _ := a.cancel(t, ws, r.ID); status != 409 {
			t.Errorf("cancel of a canceled run: got %d; want 409", status)
		}
		done := a.createRun(t, ws, "echo", 2)
		a.process(t, nil)
		if status, _ := a.cancel(t, ws, done.ID); status != 409 {
			t.Errorf("cancel of a succeeded run: got %d; want 409", status)
		}
	})

	t.Run("running", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true",
			"RUN_WORKER_CONCURRENCY": "1", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "0"}))
		ws := a.createWorkspace(t)
		a.createAgent(t, ws, "slow", "echo", slow)
		r := a.createRun(t, ws, "slow", 1)
		a.waitRunStatus(t, ws, r.ID, "running", 10*time.Second)
		start := time.Now()
		status, c := a.cancel(t, ws, r.ID)
		if elapsed := time.Since(start); status != 200 || elapsed > 20*time.Second {
			t.Fatalf("cancel of a running run: got %d after %v; want 200 at once (the run would take 60s)", status, elapsed)
		}
		if c.Status != "running" && c.Status != "canceled" {
			t.Errorf("cancel answer: got status %q; want running or canceled", c.Status)
		}
		got := a.waitRunStatus(t, ws, r.ID, "canceled", 10*time.Second)
		if got.Attempt != 1 || got.FinishedAt == nil || !isNull(got.Output) {
			t.Errorf("canceled run: got attempt %d finished_at %v output %s; want 1, set, null", got.Attempt, got.FinishedAt, got.Output)
		}
		// Concurrency is 1: this run can only execute once the canceled one freed its slot.
		quick := a.createRun(t, ws, "echo", 2)
		a.waitRunStatus(t, ws, quick.ID, "succeeded", 10*time.Second)
		if status, _ := a.cancel(t, ws, r.ID); status != 409 {
			t.Errorf("cancel of a canceled run: got %d; want 409", status)
		}
		if status, _ := a.cancel(t, ws, quick.ID); status != 409 {
			t.Errorf("cancel of a succeeded run: got %d; want 409", status)
		}
	})

	t.Run("in another process", func(t *testing.T) {
		t.Parallel()
		dsn := testDB(t)
		// The lease is renewed every 20s: a cancel seen sooner came by notification.
		long := map[string]string{"RUN_WORKER_LEASE_MS": "60000", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "0"}
		apiOnly := startApp(t, testEnv(t, dsn, long))
		long["RUN_WORKER_EMBEDDED"] = "true"
		executor := startApp(t, testEnv(t, dsn, long))
		executor.waitListening(t, true)
		ws := apiOnly.createWorkspace(t)
		apiOnly.createAgent(t, ws, "slow", "echo", slow)
		r := apiOnly.createRun(t, ws, "slow", 1)
		apiOnly.waitRunStatus(t, ws, r.ID, "running", 10*time.Second)
		start := time.Now()
		if status, _ := apiOnly.cancel(t, ws, r.ID); status != 200 {
			t.Fatalf("cancel through the other process: got %d; want 200", status)
		}
		got := apiOnly.waitRunStatus(t, ws, r.ID, "canceled", 10*time.Second)
		if got.Attempt != 1 || got.FinishedAt == nil {
			t.Errorf("canceled run: got attempt %d finished_at %v; want 1, set", got.Attempt, got.FinishedAt)
		}
		t.Logf("canceled across processes in %v", time.Since(start))
	})
}

// TestWorkerSlots: one long run does not hold back quick runs while slots are free, and
// a freed slot claims the next queued run at once. The poll interval is a minute, so it
// is wake-ups, not ticks, that start the runs.
func TestWorkerSlots(t *testing.T) {
	t.Parallel()

	t.Run("long run does not hold back quick ones", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true",
			"RUN_WORKER_CONCURRENCY": "4", "RUN_WORKER_POLL_MS": "60000", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "0"}))
		a.waitListening(t, true)
		ws := a.createWorkspace(t)
		a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 8000})
		long := a.createRun(t, ws, "slow", "long")
		a.waitRunStatus(t, ws, long.ID, "running", 15*time.Second)
		var quick []string
		for i := range 5 {
			quick = append(quick, a.createRun(t, ws, "echo", i).ID)
		}
		for _, id := range quick {
			a.waitRunStatus(t, ws, id, "succeeded", 15*time.Second)
		}
		if r := a.getRun(t, ws, long.ID); r.Status != "running" {
			t.Errorf("long run once the 5 quick runs succeeded: got status %q; want running (it takes 8s)", r.Status)
		}
	})

	t.Run("a freed slot claims the next run at once", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true",
			"RUN_WORKER_CONCURRENCY": "1", "RUN_WORKER_POLL_MS": "60000"}))
		a.waitListening(t, true)
		ws := a.createWorkspace(t)
		// One statement, so one notification: with one slot, the second and third runs
		// can only start when the slot frees, or at the next tick a minute later.
		var created struct{ Runs []runRecord }
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": []any{
			map[string]any{"agent": "echo", "input": 0}, map[string]any{"agent": "echo", "input": 1}, map[string]any{"agent": "echo", "input": 2},
		}}, 201, &created)
		for _, r := range created.Runs {
			a.waitRunStatus(t, ws, r.ID, "succeeded", 20*time.Second)
		}
	})
}

// TestWorkerNotifierWakesOnceListening: runs created after a worker's first cycle but
// before its LISTEN took effect sent notifications nobody heard; once listening, the
// notifier asks for a cycle anyway, so such runs do not wait for the next poll.
func TestWorkerNotifierWakesOnceListening(t *testing.T) {
	t.Parallel()
	woken := make(chan struct{}, 1)
	dsn := testDB(t)
	n := newNotifier(dsn, openTestDB(t, dsn), "test-notifier", testLogger(t), func(string) {
		select {
		case woken <- struct{}{}:
		default:
		}
	}, func(string) {}, func() {})
	defer n.close()
	select {
	case <-woken:
	case <-time.After(10 * time.Second):
		t.Fatal("got no wake-up within 10s of the notifier connecting; want one once it listens")
	}
	if !n.listening.Load() {
		t.Error("listening: got false after the wake-up; want true")
	}
}

// TestWebhookErrorQuotesBody: a webhook's non-2xx answer fails the attempt with the start
// of its body in the error (the agent's own reason), made safe to show and cut at 512
// bytes on a character's boundary, and never with the agent's headers.
func TestWebhookErrorQuotesBody(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("x", 510) + "é€tail" // "é" ends at byte 512, "€" would cross it
	bodies := map[string]string{
		"/plain": "model overloaded\n",
		"/dirty": "bad\x1b[31m\tinput\xff\xfe ok",
		"/long":  long,
		"/empty": "",
	}
	srv := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Secret-Header", "header-value-never-shown")
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, bodies[r.URL.Path])
	}))
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	for _, tc := range []struct{ path, want string }{
		{"/plain", "webhook answered HTTP 500, want 2xx; body: model overloaded"},
		{"/dirty", "webhook answered HTTP 500, want 2xx; body: bad [31m input\uFFFD\uFFFD ok"},
		{"/long", "webhook answered HTTP 500, want 2xx; body (its first 512 bytes): " + long[:512]},
		{"/empty", "webhook answered HTTP 500, want 2xx"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			name := strings.TrimPrefix(tc.path, "/")
			a.createAgent(t, ws, name, "webhook", map[string]any{"url": srv.URL + tc.path})
			var r runRecord
			a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": name, "max_attempts": 1}, 201, &r)
			r = a.waitRunStatus(t, ws, r.ID, "failed", 15*time.Second)
			if got := errorText(r); got != tc.want {
				t.Errorf("error: got %q; want %q", got, tc.want)
			}
			if errs := runErrors(t, r); len(errs) != 1 || errs[0].Message != tc.want {
				t.Errorf("errors: got %+v; want one with message %q", errs, tc.want)
			}
			if strings.Contains(errorText(r), "header-value") {
				t.Errorf("error: got %q; want none of the agent's headers", errorText(r))
			}
		})
	}
}

// TestRequeueCanceled: a run handed back at shutdown whose cancel was requested meanwhile
// ends canceled, not queued (where a claim would start it again): the cancel wins over
// the requeue, as it wins over every other outcome.
func TestRequeueCanceled(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ctx := context.Background()
	_, ids := seedRuns(t, st, 2, 3)
	res, err := st.claim(ctx, newLineup(), "worker-A", 2, "", 30*time.Second, false)
	if err != nil || len(res.claimed) != 2 {
		t.Fatalf("claim: got %+v, err %v; want both runs", res.claimed, err)
	}
	sqlExec(t, db)(`UPDATE runs SET cancel_requested = true WHERE id = $1`, ids[0])
	var outs []outcome
	for _, c := range res.claimed {
		outs = append(outs, outcome{attemptRef: attemptRef{c.ID, c.Attempt, c.Step}, End: endRequeued})
	}
	got, err := st.finish(ctx, "worker-A", outs)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []struct {
		end    attemptEnd
		status string
	}{{endCanceled, "canceled"}, {endRequeued, "queued"}} {
		row := readRunRow(t, db, ids[i])
		if got[ids[i]] != want.end || row.Status != want.status {
			t.Errorf("run %d handed back (cancel requested: %v): got %q, status %s; want %q, %s", i, i == 0, got[ids[i]], row.Status, want.end, want.status)
		}
	}
}
