package main

// Scheduling (SPEC "Scheduling: when, in what order, how many at once") through real
// agentapp processes and HTTP: workspaces take turns, priority then earliest due within
// one, max_concurrency across processes, paused agents, run_at and a retry's backoff
// waking an idle worker, timeout_ms, and what an idle worker costs. Helpers local to
// this file start with sc.

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
)

// scDueBound is how late after its run_at a run may start in these tests. SPEC promises
// 100 ms; the tests log the figure and only catch a broken wake-up, with room for a
// loaded machine running -race binaries.
const scDueBound = time.Second

// scPriorityLead is how far ahead TestSchedPriority schedules its runs: time enough to
// create them all over HTTP (a few ms each) before the first falls due, a second earlier.
const scPriorityLead = 2 * time.Second

// scEnv is the environment of a process in these tests: testEnv with the embedded worker
// on, webhooks allowed to reach this box's test servers, and less log.
func scEnv(t testing.TB, dsn string, overrides map[string]string) map[string]string {
	env := testEnv(t, dsn, map[string]string{
		"RUN_WORKER_EMBEDDED":         "true",
		"AGENT_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
		"LOG_LEVEL":                   "info",
	})
	for k, v := range overrides {
		env[k] = v
	}
	return env
}

// scCreate creates a run of agent in ws through POST …/runs, with the scheduling fields
// (priority, run_at or delay_ms, timeout_ms, max_attempts) in fields, and returns it.
func scCreate(t testing.TB, a *app, ws testWorkspace, agent string, fields map[string]any) runRecord {
	t.Helper()
	body := map[string]any{"agent": agent, "input": map[string]any{}}
	for k, v := range fields {
		body[k] = v
	}
	var r runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, body, 201, &r)
	return r
}

// scPatchAgent changes agent name in ws through PATCH …/agents/{name} ({"paused": true},
// {"max_concurrency": 2}) and fails the test unless the answer shows each value.
func scPatchAgent(t testing.TB, a *app, ws testWorkspace, name string, patch map[string]any) {
	t.Helper()
	ag := mustAgent(t, a, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/"+name, ws.APIKey, patch, 200)
	got := map[string]any{}
	if ag.MaxConcurrency != nil {
		got["max_concurrency"] = *ag.MaxConcurrency
	}
	if ag.Paused != nil {
		got["paused"] = *ag.Paused
	}
	for k, v := range patch {
		if fmt.Sprint(got[k]) != fmt.Sprint(v) {
			t.Fatalf("PATCH agent %s %v: got %s %v; want %v", name, patch, k, got[k], v)
		}
	}
}

// scCount runs a count query.
func scCount(t testing.TB, db *sql.DB, query string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: got %v; want a count", query, err)
	}
	return n
}

// scBatch creates runs of agent in ws through the batch endpoint, n at a time.
func scBatch(t testing.TB, a *app, ws testWorkspace, agents []string, n int) []runRecord {
	t.Helper()
	reqs := make([]map[string]any, n)
	for i := range reqs {
		reqs[i] = map[string]any{"agent": agents[i%len(agents)], "input": map[string]int{"i": i}}
	}
	var created struct{ Runs []runRecord }
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": reqs}, 201, &created)
	if len(created.Runs) != n {
		t.Fatalf("batch: got %d runs; want %d", len(created.Runs), n)
	}
	return created.Runs
}

// scCall is what a webhook request says about itself.
type scCall struct {
	RunID   string          `json:"run_id"`
	Agent   string          `json:"agent"`
	Attempt int             `json:"attempt"`
	Input   json.RawMessage `json:"input"`
}

// scHook is a webhook agents' server on 127.0.0.1 that counts, per agent name, the
// requests it got and the most it held at once; respond answers each request.
type scHook struct {
	*httptest.Server
	mu       sync.Mutex
	inFlight map[string]int
	most     map[string]int
	requests map[string]int
}

// scNewHook starts a hook server, closed when the test ends.
func scNewHook(t testing.TB, respond func(w http.ResponseWriter, r *http.Request, c scCall)) *scHook {
	h := &scHook{inFlight: map[string]int{}, most: map[string]int{}, requests: map[string]int{}}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body scCall
		json.NewDecoder(r.Body).Decode(&body)
		h.mu.Lock()
		h.requests[body.Agent]++
		h.inFlight[body.Agent]++
		h.most[body.Agent] = max(h.most[body.Agent], h.inFlight[body.Agent])
		h.mu.Unlock()
		defer func() {
			h.mu.Lock()
			h.inFlight[body.Agent]--
			h.mu.Unlock()
		}()
		respond(w, r, body)
	}))
	t.Cleanup(h.Close)
	return h
}

// stats returns, for agent, the requests so far and the most in flight at once.
func (h *scHook) stats(agent string) (requests, most int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.requests[agent], h.most[agent]
}

// TestSchedFairTurns is SPEC's example: with RUN_WORKER_CONCURRENCY=1, workspace A has
// 1,000 claimable runs and workspace B then queues one; B's run is among the next two
// runs to start.
func TestSchedFairTurns(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startProc(t, scEnv(t, dsn, map[string]string{"RUN_WORKER_CONCURRENCY": "1"})).app()
	wsA, wsB := a.createWorkspace(t), a.createWorkspace(t)
	// A's runs take a little while each, so that the order in which they start shows.
	a.createAgent(t, wsA, "slow", "echo", map[string]any{"delay_ms": 20})
	// B has been served before: its turn is not that of a workspace never served.
	warm := a.createRun(t, wsB, "echo", 0)
	a.waitRunStatus(t, wsB, warm.ID, "succeeded", 30*time.Second)

	scBatch(t, a, wsA, []string{"slow"}, 1000)
	eventually(t, 30*time.Second, "A's backlog is flowing", func() bool {
		return scCount(t, db, `SELECT count(*) FROM runs WHERE workspace_id = $1 AND status = 'succeeded'`, wsA.ID) >= 3
	})
	b := a.createRun(t, wsB, "echo", 1)
	a.waitRunStatus(t, wsB, b.ID, "succeeded", 30*time.Second)

	ahead := scCount(t, db, `SELECT count(*) FROM runs r, runs b WHERE b.id = $2 AND r.workspace_id = $1
		AND r.started_at > b.created_at AND r.started_at < b.started_at`, wsA.ID, b.ID)
	left := scCount(t, db, `SELECT count(*) FROM runs WHERE workspace_id = $1 AND status = 'queued'`, wsA.ID)
	t.Logf("A's runs started after B queued its run and before it started: %d (%d of A's still queued)", ahead, left)
	if ahead > 1 {
		t.Errorf("A's runs started between B's run being queued and starting: got %d; want at most 1", ahead)
	}
	if left == 0 {
		t.Errorf("A's runs still queued when B's run started: got 0; want A's backlog still there (else the test shows nothing)")
	}
}

// TestSchedSpread: one claim with batch limit 10 over 5 workspaces with 100 runs each takes
// runs from all 5; claims after it serve the workspaces served least recently first.
func TestSchedSpread(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startProc(t, testEnv(t, dsn, map[string]string{"LOG_LEVEL": "info"})).app() // the worker API only
	var wss []testWorkspace
	for range 5 {
		ws := a.createWorkspace(t)
		scBatch(t, a, ws, []string{"echo"}, 100)
		wss = append(wss, ws)
	}
	// claim runs one claim through the worker API and returns how many runs each
	// workspace (by its index) got.
	claim := func(limit int) map[int]int {
		t.Helper()
		count := func() map[string]int {
			got := map[string]int{}
			rows, err := db.Query(`SELECT workspace_id, count(*) FROM runs WHERE status <> 'queued' GROUP BY 1`)
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			for rows.Next() {
				var ws string
				var n int
				if err := rows.Scan(&ws, &n); err != nil {
					t.Fatal(err)
				}
				got[ws] = n
			}
			return got
		}
		before := count()
		if s := a.process(t, map[string]any{"limit": limit}); s.Claimed != limit {
			t.Fatalf("claim with limit %d: got %d claimed; want %d", limit, s.Claimed, limit)
		}
		after := count()
		got := map[int]int{}
		for i, ws := range wss {
			if n := after[ws.ID] - before[ws.ID]; n > 0 {
				got[i] = n
			}
		}
		return got
	}

	first := claim(10)
	t.Logf("one claim of 10 over 5 workspaces: runs per workspace %v", first)
	if len(first) != 5 {
		t.Errorf("workspaces served by one claim of 10: got %d (%v); want all 5", len(first), first)
	}
	for i, n := range first {
		if n > 2 {
			t.Errorf("workspace %d: got %d runs of a claim of 10 over 5; want at most its share, 2", i, n)
		}
	}
	// Turns: a claim of 3 takes one run from each of 3 workspaces, and the next claim of
	// 2 takes one from each of the other two.
	three, two := claim(3), claim(2)
	t.Logf("then a claim of 3: %v; then a claim of 2: %v", three, two)
	served := map[int]bool{}
	for _, c := range []map[int]int{three, two} {
		for i, n := range c {
			if n != 1 || served[i] {
				t.Errorf("claims of 3 then 2: got %v then %v; want each of the 5 workspaces served once", three, two)
			}
			served[i] = true
		}
	}
}

// TestSchedPriority: within a workspace lower priority first, then the earliest due (not
// the oldest created); a run not yet due is not claimed. Across workspaces priority does
// not let one jump ahead: they still take turns.
func TestSchedPriority(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startProc(t, testEnv(t, dsn, map[string]string{"LOG_LEVEL": "info"})).app() // the worker API only
	ws := a.createWorkspace(t)
	// Due times around a moment a little ahead, so that a run created later can fall due
	// earlier (a run_at in the past means now: the same for every run); the claims begin
	// once all are due.
	due := time.Now().Add(scPriorityLead)
	runs := []map[string]any{
		{"priority": 5, "run_at": due},
		{"priority": 0, "run_at": due},
		{"priority": 9, "run_at": due},
		{"priority": 0, "run_at": due.Add(-500 * time.Millisecond)}, // created later, due earlier
		{"priority": 1, "run_at": due},
		{"priority": 5, "run_at": due.Add(-time.Second)},
		{"priority": 0, "delay_ms": time.Hour.Milliseconds()}, // not due
	}
	index := map[string]int{}
	for i, r := range runs {
		if at, ok := r["run_at"].(time.Time); ok {
			r["run_at"] = at.UTC().Format(time.RFC3339Nano)
		}
		index[scCreate(t, a, ws, "echo", r).ID] = i
	}
	time.Sleep(time.Until(due) + 100*time.Millisecond)
	// Claims of one run each, one after the other: the order of started_at is the order
	// of the claims. order returns "run-id workspace-id" of the claimed runs of wss.
	order := func(wss ...testWorkspace) []string {
		t.Helper()
		var ids []string
		for _, ws := range wss {
			ids = append(ids, ws.ID)
		}
		var got []string
		rows, err := db.Query(`SELECT id, workspace_id FROM runs WHERE status <> 'queued'
			AND workspace_id = ANY ($1::uuid[]) ORDER BY started_at`, pq.Array(ids))
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var id, w string
			if err := rows.Scan(&id, &w); err != nil {
				t.Fatal(err)
			}
			got = append(got, id+" "+w)
		}
		return got
	}
	for range 6 {
		if s := a.process(t, map[string]any{"limit": 1}); s.Claimed != 1 || s.Succeeded != 1 {
			t.Fatalf("claim of 1: got %+v; want 1 claimed and succeeded", s)
		}
	}
	if s := a.process(t, map[string]any{"limit": 1}); s.Claimed != 0 {
		t.Errorf("claim with only a run due in an hour left: got %d claimed; want 0", s.Claimed)
	}
	var got []int
	for _, o := range order(ws) {
		got = append(got, index[o[:36]])
	}
	if want := []int{3, 1, 4, 5, 0, 2}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("claim order (runs by creation, priorities 5 0 9 0 1 5): got %v; want %v", got, want)
	}

	// Workspace X's runs are all priority 0, Y's all 9: claims still alternate.
	wsX, wsY := a.createWorkspace(t), a.createWorkspace(t)
	for range 3 {
		scCreate(t, a, wsX, "echo", map[string]any{"priority": 0})
		scCreate(t, a, wsY, "echo", map[string]any{"priority": 9})
	}
	for range 6 {
		a.process(t, map[string]any{"limit": 1})
	}
	var turns []string
	for _, o := range order(wsX, wsY) {
		turns = append(turns, map[string]string{wsX.ID: "X", wsY.ID: "Y"}[o[37:]])
	}
	for i := 1; i < len(turns); i++ {
		if len(turns) != 6 || turns[i] == turns[i-1] {
			t.Errorf("workspaces of 6 claims of one run (X priority 0, Y priority 9): got %v; want them taking turns", turns)
			break
		}
	}
}

// TestSchedMaxConcurrencyAcrossProcesses: an agent's max_concurrency 2 holds across three
// processes with embedded workers, the cap is used, and an uncapped agent's runs flow past
// the capped agent's backlog.
func TestSchedMaxConcurrencyAcrossProcesses(t *testing.T) {
	t.Parallel()
	const perAgent = 60
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, _ scCall) {
		time.Sleep(50*time.Millisecond + rand.N(50*time.Millisecond))
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ok":true}`))
	})
	var procs []*proc
	for range 3 {
		procs = append(procs, startProc(t, scEnv(t, dsn, nil)))
	}
	a := procs[0].app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "capped", "webhook", map[string]any{"url": hook.URL})
	a.createAgent(t, ws, "free", "webhook", map[string]any{"url": hook.URL})
	scPatchAgent(t, a, ws, "capped", map[string]any{"max_concurrency": 2})
	start := time.Now()
	scBatch(t, a, ws, []string{"capped", "free"}, 2*perAgent)
	eventually(t, 120*time.Second, fmt.Sprintf("all %d runs succeeded", 2*perAgent), func() bool {
		return scCount(t, db, `SELECT count(*) FROM runs WHERE status = 'succeeded'`) == 2*perAgent
	})
	took := time.Since(start)

	var cappedLast, freeLast time.Time
	if err := db.QueryRow(`SELECT max(r.finished_at) FILTER (WHERE a.name = 'capped'), max(r.finished_at) FILTER (WHERE a.name = 'free')
		FROM runs r JOIN agents a ON a.id = r.agent_id`).Scan(&cappedLast, &freeLast); err != nil {
		t.Fatal(err)
	}
	cappedN, cappedMost := hook.stats("capped")
	freeN, freeMost := hook.stats("free")
	t.Logf("%d runs in %v; most in flight: capped %d (%d requests), uncapped %d (%d requests); the uncapped agent's last run finished %v before the capped agent's",
		2*perAgent, took.Round(time.Millisecond), cappedMost, cappedN, freeMost, freeN, cappedLast.Sub(freeLast).Round(time.Millisecond))
	if cappedMost != 2 {
		t.Errorf("capped agent's most requests in flight: got %d; want 2 (never more than max_concurrency, and the cap used)", cappedMost)
	}
	if cappedN != perAgent || freeN != perAgent {
		t.Errorf("webhook requests: got capped %d, uncapped %d; want %d each", cappedN, freeN, perAgent)
	}
	if freeMost <= 2 && !freeLast.Before(cappedLast) {
		t.Errorf("uncapped agent: got at most %d in flight and its last run finished at %v, not before the capped agent's %v; want its runs flowing past the capped backlog",
			freeMost, freeLast, cappedLast)
	}
}

// TestSchedCapsAcrossWorkspaces: caps and pauses hold when each claim takes one run per
// workspace (12 workspaces, 3 processes of RUN_WORKER_CONCURRENCY 4, so a claim's share
// of a workspace is one run), the path that locks a capped agent only when its run heads a
// served workspace's queue. Each workspace has a capped agent (max_concurrency 2), an
// uncapped one and a paused one whose runs were queued first, at the head of the queue.
func TestSchedCapsAcrossWorkspaces(t *testing.T) {
	t.Parallel()
	const workspaces, perAgent = 12, 8
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, _ scCall) {
		time.Sleep(30*time.Millisecond + rand.N(40*time.Millisecond))
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ok":true}`))
	})
	var procs []*proc
	for range 3 {
		procs = append(procs, startProc(t, scEnv(t, dsn, map[string]string{"RUN_WORKER_CONCURRENCY": "4"})))
	}
	a := procs[0].app()
	var held []string
	for i := range workspaces {
		ws := a.createWorkspace(t)
		capped, free, paused := fmt.Sprintf("capped-%d", i), fmt.Sprintf("free-%d", i), fmt.Sprintf("paused-%d", i)
		for _, name := range []string{capped, free, paused} {
			a.createAgent(t, ws, name, "webhook", map[string]any{"url": hook.URL})
		}
		scPatchAgent(t, a, ws, paused, map[string]any{"paused": true})
		scPatchAgent(t, a, ws, capped, map[string]any{"max_concurrency": 2})
		for _, r := range scBatch(t, a, ws, []string{paused}, 6) {
			held = append(held, r.ID)
		}
		scBatch(t, a, ws, []string{capped, free}, 2*perAgent)
	}
	want := workspaces * 2 * perAgent
	eventually(t, 120*time.Second, fmt.Sprintf("all %d runs of the capped and uncapped agents succeeded", want), func() bool {
		return scCount(t, db, `SELECT count(*) FROM runs WHERE status = 'succeeded'`) == want
	})
	most := 0
	for i := range workspaces {
		n, m := hook.stats(fmt.Sprintf("capped-%d", i))
		most = max(most, m)
		if m > 2 || n != perAgent {
			t.Errorf("capped-%d: got %d requests, at most %d in flight; want %d requests, never more than 2 at once", i, n, m, perAgent)
		}
		if n, _ := hook.stats(fmt.Sprintf("paused-%d", i)); n != 0 {
			t.Errorf("paused-%d: got %d requests; want none", i, n)
		}
	}
	t.Logf("%d runs; the capped agents' most in flight: %d", want, most)
	if most != 2 {
		t.Errorf("capped agents' most in flight: got %d; want 2 (the cap used)", most)
	}
	for _, id := range held {
		if r := readRunRow(t, db, id); r.Status != "queued" || r.Attempt != 0 {
			t.Errorf("paused agent's run %s: got %s attempt %d; want queued, attempt 0", id, r.Status, r.Attempt)
		}
	}
}

// TestSchedPauseAndCap: a paused agent's runs stay queued while another agent's run in the
// same workspace succeeds, and run once it is resumed; a changed cap holds from the next
// claim.
func TestSchedPauseAndCap(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startProc(t, scEnv(t, dsn, nil)).app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "paused", "echo", map[string]any{})
	scPatchAgent(t, a, ws, "paused", map[string]any{"paused": true})
	var held []string
	for i := range 3 {
		held = append(held, a.createRun(t, ws, "paused", i).ID)
	}
	other := a.createRun(t, ws, "echo", "other")
	a.waitRunStatus(t, ws, other.ID, "succeeded", 30*time.Second)
	time.Sleep(500 * time.Millisecond) // ten poll intervals in which nothing may claim them
	for _, id := range held {
		if r := readRunRow(t, db, id); r.Status != "queued" || r.Attempt != 0 {
			t.Errorf("paused agent's run %s: got %s attempt %d; want queued, attempt 0", id, r.Status, r.Attempt)
		}
	}
	scPatchAgent(t, a, ws, "paused", map[string]any{"paused": false})
	for _, id := range held {
		a.waitRunStatus(t, ws, id, "succeeded", 30*time.Second)
	}

	// Cap 1, then 3: the most running at once follows the cap from the next claim.
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 300})
	scPatchAgent(t, a, ws, "slow", map[string]any{"max_concurrency": 1})
	scBatch(t, a, ws, []string{"slow"}, 10)
	running := func() int {
		return scCount(t, db, `SELECT count(*) FROM runs r JOIN agents a ON a.id = r.agent_id
			WHERE a.name = 'slow' AND r.status = 'running'`)
	}
	most := 0
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		most = max(most, running())
	}
	if most != 1 {
		t.Errorf("slow agent with max_concurrency 1: got at most %d running over 1 s; want 1", most)
	}
	scPatchAgent(t, a, ws, "slow", map[string]any{"max_concurrency": 3})
	most = 0
	eventually(t, 30*time.Second, "3 of the slow agent's runs running once its cap is 3", func() bool {
		most = max(most, running())
		return most >= 3
	})
	for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		most = max(most, running())
	}
	if most != 3 {
		t.Errorf("slow agent with max_concurrency 3: got at most %d running; want 3", most)
	}
}

// TestSchedDueRunWakesWorker: under RUN_WORKER_POLL_MS=60000 an idle worker starts a run
// scheduled 1.5 s ahead (given as delay_ms, then as run_at), and a retry after its
// backoff, at their time, not at the next tick; a final run still shows when it was due.
// The figures are logged; the bound only catches a broken wake-up.
func TestSchedDueRunWakesWorker(t *testing.T) {
	t.Parallel()
	const ahead = 1500 * time.Millisecond
	dsn := testDB(t)
	// The webhook fails every first attempt and answers the second.
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, c scCall) {
		if c.Attempt == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{}`))
	})
	a := startProc(t, scEnv(t, dsn, map[string]string{"RUN_WORKER_POLL_MS": "60000"})).app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "flaky", "webhook", map[string]any{"url": hook.URL})
	a.waitListening(t, true)

	for _, field := range []string{"delay_ms", "run_at"} {
		t.Run(field, func(t *testing.T) {
			at := time.Now().Add(ahead).UTC()
			fields := map[string]any{"delay_ms": ahead.Milliseconds()}
			if field == "run_at" {
				fields = map[string]any{"run_at": at.Format(time.RFC3339Nano)}
			}
			created := scCreate(t, a, ws, "echo", fields)
			want := created.CreatedAt.Add(ahead) // delay_ms counts on the database's clock
			if field == "run_at" {
				want = at
			}
			if d := created.RunAt.Sub(want).Abs(); d > time.Microsecond { // PostgreSQL keeps microseconds
				t.Errorf("run created with %v: got run_at %v; want %v", fields, created.RunAt, want)
			}
			run := a.waitRunStatus(t, ws, created.ID, "succeeded", 30*time.Second)
			late := run.StartedAt.Sub(created.RunAt)
			t.Logf("run due by %s 1.5 s after it was queued started %d ms after its run_at", field, late.Milliseconds())
			if late < 0 || late > scDueBound {
				t.Errorf("run due by %s 1.5 s after it was queued, poll 60 s: started %v after its run_at; want from 0 to %v (SPEC: within 100 ms)",
					field, late, scDueBound)
			}
			if !run.RunAt.Equal(created.RunAt) {
				t.Errorf("succeeded run: got run_at %v; want %v, when it was due", run.RunAt, created.RunAt)
			}
		})
	}

	// The retry's run_at, read while it waits out its backoff.
	retried := a.createRun(t, ws, "flaky", nil)
	var waiting runRecord
	eventually(t, 30*time.Second, "the run queued again after its first attempt failed", func() bool {
		waiting = a.getRun(t, ws, retried.ID)
		return waiting.Status == statusQueued && waiting.Attempt == 1
	})
	due, failedAt := waiting.RunAt, waiting.UpdatedAt
	run := a.waitRunStatus(t, ws, retried.ID, "succeeded", 30*time.Second)
	late := run.StartedAt.Sub(due)
	t.Logf("retried run started %d ms after the run_at its backoff set (%d ms after the failed attempt)",
		late.Milliseconds(), due.Sub(failedAt).Milliseconds())
	if late < 0 || late > scDueBound {
		t.Errorf("retry after its backoff, poll 60 s: started %v after its run_at; want from 0 to %v (SPEC: within 100 ms)", late, scDueBound)
	}
	if backoff := due.Sub(failedAt); backoff < 0 || backoff > 500*time.Millisecond {
		t.Errorf("retried run: got run_at %v after the failed attempt; want the backoff (0 … 0.5 s, full jitter) to have set it", backoff)
	}
	if run.Attempt != 2 {
		t.Errorf("retried run: got attempt %d; want 2", run.Attempt)
	}
	if !run.RunAt.Equal(due) {
		t.Errorf("retried run once succeeded: got run_at %v; want %v, the run_at its backoff set", run.RunAt, due)
	}
}

// TestSchedTimeout: an attempt still executing after the run's timeout_ms fails saying it
// timed out and is retried while attempts remain; errors show each attempt.
func TestSchedTimeout(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, _ scCall) {
		select { // hangs until the worker gives up (or long after the test would have)
		case <-r.Context().Done():
		case <-time.After(time.Minute):
		}
	})
	a := startProc(t, scEnv(t, dsn, nil)).app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hang", "webhook", map[string]any{"url": hook.URL})
	created := scCreate(t, a, ws, "hang", map[string]any{"timeout_ms": 300, "max_attempts": 2})
	if created.TimeoutMS == nil || *created.TimeoutMS != 300 || created.MaxAttempts != 2 {
		t.Errorf("created run: got timeout_ms %v, max_attempts %d; want 300, 2", created.TimeoutMS, created.MaxAttempts)
	}
	run := a.waitRunStatus(t, ws, created.ID, "failed", 60*time.Second)
	var errs []runError
	if err := json.Unmarshal(run.Errors, &errs); err != nil {
		t.Fatal(err)
	}
	const want = "timed out after 300 ms"
	if run.Error == nil || *run.Error != want || run.Attempt != 2 || len(errs) != 2 {
		t.Fatalf("run with timeout_ms 300 and 2 attempts: got error %v, attempt %d, errors %s; want %q, 2 attempts, 2 errors",
			run.Error, run.Attempt, run.Errors, want)
	}
	for i, e := range errs {
		if e.Attempt != i+1 || e.Message != want {
			t.Errorf("errors[%d]: got attempt %d %q; want attempt %d %q", i, e.Attempt, e.Message, i+1, want)
		}
	}
	if n, _ := hook.stats("hang"); n != 2 {
		t.Errorf("webhook requests: got %d; want 2 (one per attempt)", n)
	}
}

// TestSchedIdleLoad: with the default poll, an idle worker with one run scheduled an hour
// ahead costs about one transaction a second: its claim (measured from another database,
// so the reading adds none).
func TestSchedIdleLoad(t *testing.T) {
	t.Parallel()
	// PostgreSQL flushes an idle backend's statistics within 10 s (as BenchmarkIdle
	// found), so the creates before the settle are counted before the window opens.
	const settle, window, most = 10 * time.Second, 10 * time.Second, 3.0
	dsn := testDB(t)
	admin := adminDB(t)
	env := scEnv(t, dsn, nil)
	delete(env, "RUN_WORKER_POLL_MS")
	a := startProc(t, env).app()
	ws := a.createWorkspace(t)
	scCreate(t, a, ws, "echo", map[string]any{"delay_ms": time.Hour.Milliseconds()})
	xacts := func() int64 {
		var x int64
		if err := admin.QueryRow(`SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, dbName(t, dsn)).Scan(&x); err != nil {
			t.Fatal(err)
		}
		return x
	}
	time.Sleep(settle)
	x0, t0 := xacts(), time.Now()
	time.Sleep(window)
	rate := float64(xacts()-x0) / time.Since(t0).Seconds()
	t.Logf("idle worker, default poll, one run due in an hour: %.2f transactions/s", rate)
	if rate > most {
		t.Errorf("idle worker: got %.2f transactions/s; want at most %.0f (about one claim a second)", rate, most)
	}
	if st := a.stats(t, ws); st.Queued != 1 || st.Running != 0 {
		t.Errorf("the run due in an hour: got %+v; want it still queued", st)
	}
}

// TestSchedLineup: claims read each agent's line from where the last one stopped, and
// find what joined a line behind that place: a run announced with a lower priority number,
// a run committed late, a run queued again far behind and announced at its place. Then
// three lineups (three processes) claim while connections insert runs, some ahead of the
// line (a lower priority number), and some runs are queued again after a claim (as a
// recovered lease is, keeping its place): every run is claimed and finishes. Every
// announcement here goes through the form a notification carries (placeEntry, parsePlace).
func TestSchedLineup(t *testing.T) {
	t.Parallel()
	const workspaces = 50
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ctx := context.Background()
	seedEchoWorkspaces(t, db, workspaces)
	exec := sqlExec(t, db)
	var wss []string
	if err := db.QueryRow(`SELECT array_agg(id ORDER BY id) FROM workspaces`).Scan(pq.Array(&wss)); err != nil {
		t.Fatal(err)
	}
	const insert = `INSERT INTO runs (workspace_id, agent_id, priority) SELECT workspace_id, id, $2 FROM agents WHERE workspace_id = $1`
	claim := func(q *lineup, limit int) ([]string, error) {
		res, err := st.claim(ctx, q, "test", limit, "", time.Minute, false)
		var ids []string
		for _, c := range res.claimed {
			ids = append(ids, c.ID)
		}
		return ids, err
	}
	const requeue = `UPDATE runs SET status = 'queued', worker_id = NULL, lease_expires_at = NULL WHERE id = ANY ($1)
		RETURNING workspace_id, priority, run_at`
	// places reads (workspace, priority, run_at) rows: the earliest place of each workspace,
	// as an announcement of those runs names it.
	places := func(rows *sql.Rows, err error) map[string]linePos {
		if err != nil {
			t.Errorf("queue runs: %v", err)
			return nil
		}
		defer rows.Close()
		at := map[string]linePos{}
		for rows.Next() {
			var ws string
			var p linePos
			if err := rows.Scan(&ws, &p.priority, &p.runAt); err != nil {
				t.Errorf("queue runs: %v", err)
				return nil
			}
			if old, ok := at[ws]; !ok || p.before(old) {
				at[ws] = p
			}
		}
		sent := map[string]linePos{}
		for ws, p := range at {
			ws, p = parsePlace(placeEntry(ws, p))
			sent[ws] = p
		}
		return sent
	}

	// One workspace: priority 5 runs are claimed, then a priority 0 run joins ahead.
	q := newLineup()
	for range 3 {
		exec(insert, wss[0], 5)
	}
	first, err := claim(q, 2)
	if err != nil || len(first) != 2 {
		t.Fatalf("claim of 2 from 3 queued: got %v, %v; want 2 runs", first, err)
	}
	var ahead string
	var aheadAt linePos
	if err := db.QueryRow(`INSERT INTO runs (workspace_id, agent_id, priority) SELECT workspace_id, id, 0
		FROM agents WHERE workspace_id = $1 RETURNING id, priority, run_at`, wss[0]).Scan(&ahead, &aheadAt.priority, &aheadAt.runAt); err != nil {
		t.Fatal(err)
	}
	q.announce(map[string]linePos{wss[0]: aheadAt}) // as the API does
	if got, err := claim(q, 1); err != nil || fmt.Sprint(got) != fmt.Sprint([]string{ahead}) {
		t.Fatalf("claim of 1 after a priority 0 run joined ahead: got %v, %v; want %s", got, err, ahead)
	}
	// A run whose insert started 100 ms ago and committed only now is behind where the last
	// claim stopped in the line, yet within lateCommit: the next claim takes it.
	var late string
	if err := db.QueryRow(`INSERT INTO runs (workspace_id, agent_id, priority, run_at) SELECT workspace_id, id, 0,
		now() - interval '100 ms' FROM agents WHERE workspace_id = $1 RETURNING id`, wss[0]).Scan(&late); err != nil {
		t.Fatal(err)
	}
	if got, err := claim(q, 1); err != nil || fmt.Sprint(got) != fmt.Sprint([]string{late}) {
		t.Fatalf("claim of 1 after a run committed late: got %v, %v; want %s", got, err, late)
	}
	// A run queued again an hour behind (a lease recovered, keeping its place) is announced
	// at its place: the next claim takes it, not the run just added after where the last
	// claim stopped. Unannounced, it would wait for the next read from the start.
	exec(insert, wss[0], 0)
	exec(`UPDATE runs SET run_at = now() - interval '1 hour', priority = 0 WHERE id = $1`, first[0])
	q.announce(places(db.Query(requeue, pq.Array([]string{first[0]}))))
	if got, err := claim(q, 1); err != nil || fmt.Sprint(got) != fmt.Sprint([]string{first[0]}) {
		t.Fatalf("claim of 1 after a run was queued again an hour behind: got %v, %v; want %s", got, err, first[0])
	}
	exec(`UPDATE runs SET status = 'succeeded', finished_at = now() WHERE status = 'running'`)
	exec(`DELETE FROM runs WHERE status = 'queued'`)

	const inserters, perInserter, claimers = 4, 100, 3
	var ins, cl sync.WaitGroup
	lineups := make([]*lineup, claimers)
	for i := range lineups {
		lineups[i] = newLineup()
	}
	stop := make(chan struct{})
	for range inserters {
		ins.Add(1)
		go func() {
			defer ins.Done()
			for range perInserter {
				ws := wss[rand.N(len(wss))]
				at := places(db.Query(insert+` RETURNING workspace_id, priority, run_at`, ws, rand.N(3)))
				if at == nil {
					return
				}
				for _, q := range lineups { // as the API's announcement tells every process
					q.announce(at)
				}
			}
		}()
	}
	defer func() { // before the pool closes, also when the test fails
		close(stop)
		cl.Wait()
	}()
	for _, q := range lineups {
		cl.Add(1)
		go func() {
			defer cl.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ids, err := claim(q, 5)
				if err != nil {
					t.Errorf("claim: %v", err)
					return
				}
				var done, again []string
				for _, id := range ids {
					if rand.N(4) == 0 {
						again = append(again, id)
					} else {
						done = append(done, id)
					}
				}
				if len(again) > 0 {
					at := places(db.Query(requeue, pq.Array(again)))
					if at == nil {
						return
					}
					for _, q := range lineups { // as the trigger's notification tells every process
						q.announce(at)
					}
				}
				if err == nil {
					_, err = db.Exec(`UPDATE runs SET status = 'succeeded', finished_at = now() WHERE id = ANY ($1)`, pq.Array(done))
				}
				if err != nil {
					t.Errorf("requeue or finish claimed runs: %v", err)
					return
				}
			}
		}()
	}
	ins.Wait()
	want := inserters*perInserter + len(first) + 2 // and the runs ahead and late
	took := eventually(t, 30*time.Second, fmt.Sprintf("all %d runs succeeded", want), func() bool {
		return scCount(t, db, `SELECT count(*) FROM runs WHERE status = 'succeeded'`) == want
	})
	t.Logf("%d runs inserted by %d connections into %d workspaces, claimed by %d lineups: all succeeded %v after the last insert",
		inserters*perInserter, inserters, workspaces, claimers, took.Round(time.Millisecond))
}

// TestSchedLineupAgentChanged: an agent paused, or given a cap, after a lineup found it
// with several runs in its line leaves the line; a paused agent's runs are not claimed.
func TestSchedLineupAgentChanged(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, change string }{
		{"paused", `UPDATE agents SET paused = true`},
		{"capped", `UPDATE agents SET max_concurrency = 5`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			db := openTestDB(t, testDB(t))
			st := &store{db: db}
			ctx := context.Background()
			seedEchoWorkspaces(t, db, 1)
			exec := sqlExec(t, db)
			exec(`INSERT INTO runs (workspace_id, agent_id) SELECT workspace_id, id FROM agents, generate_series(1, 4)`)
			q := newLineup()
			if res, err := st.claim(ctx, q, "test", 1, "", time.Minute, false); err != nil || len(res.claimed) != 1 {
				t.Fatalf("first claim of 1: got %d runs, %v; want 1", len(res.claimed), err)
			}
			exec(tc.change)
			res, err := st.claim(ctx, q, "test", 2, "", time.Minute, false)
			if err != nil || len(res.claimed) != 0 {
				t.Fatalf("claim of 2 after the change: got %d runs, %v; want none (the agent leaves the line first)", len(res.claimed), err)
			}
			if len(q.heads) != 0 {
				t.Errorf("lineup after the changed agent was read: got %d agents in line; want none", len(q.heads))
			}
		})
	}
}

// scCalls records a hook's requests per run: when each came and the attempt it carried.
type scCalls struct {
	mu  sync.Mutex
	got map[string][]scCallAt
}

// scCallAt is one request a hook got.
type scCallAt struct {
	at      time.Time
	attempt int
}

// add records a request of run id and returns how many that run has made, this one included.
func (c *scCalls) add(id string, attempt int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.got == nil {
		c.got = map[string][]scCallAt{}
	}
	c.got[id] = append(c.got[id], scCallAt{time.Now(), attempt})
	return len(c.got[id])
}

// of returns the requests of run id.
func (c *scCalls) of(id string) []scCallAt {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got[id])
}

// scAgent reads an agent through the API.
func scAgent(t testing.TB, a *app, ws testWorkspace, name string) agentJSON {
	t.Helper()
	return mustAgent(t, a, "GET", "/v1/workspaces/"+ws.ID+"/agents/"+name, ws.APIKey, nil, 200)
}

// TestSchedPushback: across two processes, a webhook's 429 with Retry-After: 2 does not
// spend the attempt: the run is queued again and succeeds at attempt 1 once the time has
// passed; the agent shows throttled_until meanwhile and starts no attempt before it, in
// either process, while another agent's runs flow, and its runs start once it has passed
// (poll 60 s: the workers wake then); then throttled_until is null again.
// A 503 whose Retry-After is an HTTP date throttles until that date; a 503 without a
// Retry-After, or with one that is neither seconds nor a date, is an ordinary failed attempt.
func TestSchedPushback(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	var calls, byAgent scCalls
	var mu sync.Mutex
	var date time.Time // the Retry-After date the dated agent was sent
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, c scCall) {
		n := calls.add(c.RunID, c.Attempt)
		switch {
		case c.Agent == "limited" && byAgent.add(c.Agent, c.Attempt) == 1:
			w.Header().Set("Retry-After", "2")
			http.Error(w, "slow down", http.StatusTooManyRequests)
		case c.Agent == "dated" && n == 1:
			mu.Lock()
			date = time.Now().Add(2 * time.Second).Truncate(time.Second)
			w.Header().Set("Retry-After", date.UTC().Format(http.TimeFormat))
			mu.Unlock()
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
		case c.Agent == "plain":
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
		case c.Agent == "patient":
			w.Header().Set("Retry-After", "7200")
			http.Error(w, "come back tomorrow", http.StatusTooManyRequests)
		case c.Agent == "vague":
			w.Header().Set("Retry-After", "soon")
			http.Error(w, "slow down", http.StatusTooManyRequests)
		default:
			w.Header().Set("Content-Type", "application/json")
			w.Write([]byte(`{"ok":true}`))
		}
	})
	// A long poll: the throttled agent's runs start when their time comes, not at a tick.
	slow := map[string]string{"RUN_WORKER_POLL_MS": "60000"}
	procs := []*proc{startProc(t, scEnv(t, dsn, slow)), startProc(t, scEnv(t, dsn, slow))}
	a, b := procs[0].app(), procs[1].app()
	ws := a.createWorkspace(t)
	for _, name := range []string{"limited", "dated", "plain", "vague", "patient"} {
		a.createAgent(t, ws, name, "webhook", map[string]any{"url": hook.URL})
	}
	a.waitListening(t, true)
	b.waitListening(t, true)

	first := a.createRun(t, ws, "limited", 1)
	var until time.Time
	eventually(t, 30*time.Second, "the limited agent shows throttled_until", func() bool {
		if ag := scAgent(t, b, ws, "limited"); ag.ThrottledUntil != nil {
			until = *ag.ThrottledUntil
		}
		return !until.IsZero()
	})
	pushedAt := calls.of(first.ID)[0].at
	if d := until.Sub(pushedAt); d < 2*time.Second || d > 2*time.Second+scDueBound {
		t.Errorf("throttled_until: got %v after the 429; want Retry-After's 2 s", d)
	}
	// Another run of the throttled agent, and runs of another agent, queued meanwhile.
	second := b.createRun(t, ws, "limited", 2)
	var echoes []runRecord
	for i := range 6 {
		echoes = append(echoes, []*app{a, b}[i%2].createRun(t, ws, "echo", i))
	}
	for _, e := range echoes {
		e = a.waitRunStatus(t, ws, e.ID, "succeeded", 30*time.Second)
		if !e.StartedAt.Before(until) {
			t.Errorf("echo run while limited is throttled until %v: started %v; want before (other agents flow)", until, e.StartedAt)
		}
	}
	for _, r := range []runRecord{first, second} {
		r = a.waitRunStatus(t, ws, r.ID, "succeeded", 30*time.Second)
		late := r.StartedAt.Sub(until)
		t.Logf("run %s of the throttled agent started %d ms after throttled_until", r.ID, late.Milliseconds())
		if late < 0 || late > scDueBound {
			t.Errorf("run %s of the throttled agent: started %v after throttled_until; want from 0 to %v (an idle worker wakes then)",
				r.ID, late, scDueBound)
		}
		if r.Attempt != 1 || string(r.Errors) != "[]" || r.Error != nil {
			t.Errorf("run %s of the throttled agent: got attempt %d, errors %s, error %v; want attempt 1, no error (a pushback spends none)",
				r.ID, r.Attempt, r.Errors, r.Error)
		}
	}
	got := calls.of(first.ID)
	if len(got) != 2 || got[0].attempt != 1 || got[1].attempt != 1 || got[1].at.Before(until) {
		t.Errorf("requests of the pushed-back run: got %+v; want 2, both attempt 1, the second not before %v", got, until)
	}
	if n := scCount(t, db, `SELECT pushbacks FROM runs WHERE id = $1`, first.ID); n != 1 {
		t.Errorf("pushbacks of the pushed-back run: got %d; want 1", n)
	}
	if n := a.metric(t, "agentapp_pushbacks_total") + b.metric(t, "agentapp_pushbacks_total"); n != 1 {
		t.Errorf("agentapp_pushbacks_total over both processes: got %v; want 1", n)
	}
	if ag := scAgent(t, a, ws, "limited"); ag.ThrottledUntil != nil {
		t.Errorf("throttled_until once it has passed: got %v; want null", ag.ThrottledUntil)
	}

	// Retry-After as an HTTP date.
	dated := a.createRun(t, ws, "dated", 3)
	var dateUntil time.Time
	eventually(t, 30*time.Second, "the dated agent shows throttled_until", func() bool {
		if ag := scAgent(t, a, ws, "dated"); ag.ThrottledUntil != nil {
			dateUntil = *ag.ThrottledUntil
		}
		return !dateUntil.IsZero()
	})
	mu.Lock()
	sent := date
	mu.Unlock()
	if d := dateUntil.Sub(sent); d < 0 || d > scDueBound {
		t.Errorf("throttled_until after Retry-After: %s: got %v, %v after it; want the date (plus the time to write it)",
			sent.UTC().Format(http.TimeFormat), dateUntil, d)
	}
	run := a.waitRunStatus(t, ws, dated.ID, "succeeded", 30*time.Second)
	if run.Attempt != 1 || run.StartedAt.Before(dateUntil) {
		t.Errorf("run pushed back to a date: got attempt %d, started %v; want 1, not before %v", run.Attempt, run.StartedAt, dateUntil)
	}

	// Retry-After: 7200 holds the agent for an hour, the most honoured.
	patient := b.createRun(t, ws, "patient", 4)
	var hourUntil time.Time
	eventually(t, 30*time.Second, "the patient agent shows throttled_until", func() bool {
		if ag := scAgent(t, a, ws, "patient"); ag.ThrottledUntil != nil {
			hourUntil = *ag.ThrottledUntil
		}
		return !hourUntil.IsZero()
	})
	if d := hourUntil.Sub(calls.of(patient.ID)[0].at); d < time.Hour || d > time.Hour+scDueBound {
		t.Errorf("throttled_until after Retry-After: 7200: got %v after the 429; want an hour, the most honoured", d)
	}
	if r := a.getRun(t, ws, patient.ID); r.Status != statusQueued || r.Attempt != 0 || r.RunAt.Sub(hourUntil).Abs() > time.Millisecond {
		t.Errorf("run pushed back for an hour: got %s, attempt %d, run_at %v; want queued, attempt 0 (refunded), due at %v",
			r.Status, r.Attempt, r.RunAt, hourUntil)
	}

	// No Retry-After, or one that says neither seconds nor a date: an ordinary failed attempt.
	for _, name := range []string{"plain", "vague"} {
		r := scCreate(t, a, ws, name, map[string]any{"max_attempts": 2})
		r = a.waitRunStatus(t, ws, r.ID, "failed", 30*time.Second)
		var errs []runError
		json.Unmarshal(r.Errors, &errs)
		if r.Attempt != 2 || len(errs) != 2 || r.Error == nil || !strings.Contains(*r.Error, "HTTP") {
			t.Errorf("%s agent's run: got attempt %d, errors %s; want 2 failed attempts saying the status", name, r.Attempt, r.Errors)
		}
		if ag := scAgent(t, a, ws, name); ag.ThrottledUntil != nil {
			t.Errorf("%s agent: got throttled_until %v; want null", name, ag.ThrottledUntil)
		}
	}
}

// TestSchedPushbackLimit: a run pushed back 20 times has its 21st pushback counted as a
// failed attempt (the counter is set in the database to 19 rather than waited for); the
// agent is throttled all the same, and its next run, queued meanwhile, starts when the
// throttle ends (poll 60 s: the worker wakes then, though no run falls due then).
func TestSchedPushbackLimit(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	var calls scCalls
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, c scCall) {
		calls.add(c.RunID, c.Attempt)
		if string(c.Input) == `"ok"` {
			w.Header().Set("Content-Type", "application/json")
			w.Write([]byte(`{}`))
			return
		}
		w.Header().Set("Retry-After", "2")
		http.Error(w, "slow down", http.StatusTooManyRequests)
	})
	a := startProc(t, scEnv(t, dsn, map[string]string{"RUN_WORKER_POLL_MS": "60000"})).app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "stubborn", "webhook", map[string]any{"url": hook.URL})
	r := scCreate(t, a, ws, "stubborn", map[string]any{"max_attempts": 1, "delay_ms": 2000})
	sqlExec(t, db)(`UPDATE runs SET pushbacks = 19 WHERE id = $1 AND status = 'queued'`, r.ID)

	r = a.waitRunStatus(t, ws, r.ID, "failed", 30*time.Second)
	got := calls.of(r.ID)
	if len(got) != 2 || got[0].attempt != 1 || got[1].attempt != 1 {
		t.Errorf("requests: got %+v; want 2 at attempt 1 (the 20th pushback refunded, the 21st spent)", got)
	}
	var errs []runError
	json.Unmarshal(r.Errors, &errs)
	if r.Attempt != 1 || len(errs) != 1 || r.Error == nil || !strings.Contains(*r.Error, "pushed back 20 times") ||
		!strings.Contains(*r.Error, "HTTP 429") {
		t.Errorf("run after its 21st pushback: got attempt %d, error %v, errors %s; want attempt 1 failed saying it was pushed back 20 times",
			r.Attempt, errorText(r), r.Errors)
	}
	if n := scCount(t, db, `SELECT pushbacks FROM runs WHERE id = $1`, r.ID); n != 20 {
		t.Errorf("pushbacks: got %d; want 20", n)
	}
	ag := scAgent(t, a, ws, "stubborn")
	if ag.ThrottledUntil == nil || ag.ThrottledUntil.Sub(got[1].at) < 2*time.Second {
		t.Fatalf("agent after the 21st pushback: got throttled_until %v; want 2 s after %v", ag.ThrottledUntil, got[1].at)
	}
	next := a.createRun(t, ws, "stubborn", "ok")
	next = a.waitRunStatus(t, ws, next.ID, "succeeded", 30*time.Second)
	late := next.StartedAt.Sub(*ag.ThrottledUntil)
	t.Logf("the next run started %d ms after throttled_until", late.Milliseconds())
	if late < 0 || late > scDueBound {
		t.Errorf("the next run: started %v after throttled_until; want from 0 to %v (an idle worker wakes then)", late, scDueBound)
	}
}

// TestSchedBackoffJitter: 100 runs of an agent with retry {"base_ms": 100, "max_ms": 150}
// fail 3 times each; the delay after each second failure (run_at − the failure's time,
// written by one statement) lies within 0 … min(150, 100 × 2^1) ms, and the delays are
// spread over that range, not one value.
func TestSchedBackoffJitter(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	hook := scNewHook(t, func(w http.ResponseWriter, r *http.Request, _ scCall) {
		http.Error(w, "down", http.StatusInternalServerError)
	})
	a := startProc(t, scEnv(t, dsn, nil)).app()
	ws := a.createWorkspace(t)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, map[string]any{"name": "down", "kind": "webhook",
		"config": map[string]any{"url": hook.URL}, "retry": map[string]any{"base_ms": 100, "max_ms": 150}}, 201, nil)
	const n = 100
	reqs := make([]map[string]any, n)
	for i := range reqs {
		reqs[i] = map[string]any{"agent": "down", "input": i, "max_attempts": 3}
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": reqs}, 201, nil)
	eventually(t, 60*time.Second, "every run failed 3 times", func() bool {
		return scCount(t, db, `SELECT count(*) FROM runs WHERE status = 'failed' AND attempt = 3`) == n
	})
	// A final run keeps the run_at its last backoff set: the delay after its second failure.
	rows, err := db.Query(`SELECT extract(epoch FROM run_at - (errors->1->>'at')::timestamptz) * 1000 FROM runs`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var delays []float64
	for rows.Next() {
		var ms float64
		if err := rows.Scan(&ms); err != nil {
			t.Fatal(err)
		}
		delays = append(delays, ms)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	slices.Sort(delays)
	t.Logf("delays after the second failure, ms: min %.3f, median %.3f, max %.3f", delays[0], delays[n/2], delays[n-1])
	if len(delays) != n || delays[0] < 0 || delays[n-1] > 150 {
		t.Errorf("delays: got %d from %.3f to %.3f ms; want %d within 0 … 150 ms", len(delays), delays[0], delays[n-1], n)
	}
	// Uniform over 0 … 150: some below a third and some above two thirds (each side fails
	// by chance with probability (2/3)^100).
	if delays[0] > 50 || delays[n-1] < 100 {
		t.Errorf("delays: got %.3f … %.3f ms; want them spread over 0 … 150 ms (full jitter), not one value", delays[0], delays[n-1])
	}
}

// TestSchedLineupHeldRunReadAgain: a run another transaction holds locked (another
// process's claim) is skipped; once that transaction rolls back, the next claim takes it,
// though the claim before took runs after it in line.
func TestSchedLineupHeldRunReadAgain(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ctx := context.Background()
	seedEchoWorkspaces(t, db, 1)
	exec := sqlExec(t, db)
	exec(`INSERT INTO runs (workspace_id, agent_id, input) SELECT workspace_id, id, to_jsonb(g)
		FROM agents, generate_series(1, 4) g ORDER BY g`)
	var held string
	if err := db.QueryRow(`SELECT id FROM runs WHERE input = '1'`).Scan(&held); err != nil {
		t.Fatal(err)
	}
	other, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer other.Rollback()
	if _, err := other.Exec(`SELECT 1 FROM runs WHERE id = $1 FOR UPDATE`, held); err != nil {
		t.Fatal(err)
	}
	q := newLineup()
	res, err := st.claim(ctx, q, "test", 2, "", time.Minute, false)
	// The rounds of this claim read the held run again too (its holder may roll back), so
	// they may take fewer than 2 of the runs after it; at least the next one.
	if err != nil || len(res.claimed) == 0 {
		t.Fatalf("claim of 2 while the first run is held: got %d runs, %v; want runs after it", len(res.claimed), err)
	}
	for _, c := range res.claimed {
		if c.ID == held {
			t.Fatalf("claim while the first run is held: got it claimed; want it skipped")
		}
	}
	other.Rollback()
	res, err = st.claim(ctx, q, "test", 1, "", time.Minute, false)
	if err != nil || len(res.claimed) != 1 || res.claimed[0].ID != held {
		t.Fatalf("claim of 1 after the holder rolled back: got %v, %v; want run %s", res.claimed, err, held)
	}
}
