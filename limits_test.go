package main

// Flow control (SPEC "Scheduling": Per key, Rate): an agent's key_concurrency and
// on_key_conflict, its rate_limit, and a run's concurrency_key and cost, through HTTP and
// real processes. Helpers local to this file start with lim.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestLimitsFields: the agent's key and rate fields (defaults, set at creation, PATCH, a
// rate_limit removed with null, every bad value a 422 saying what is accepted) and the
// run's concurrency_key and cost (shown in its JSON, ranges, a cost over the agent's rate
// limit refused for a single create and for a batch, whole).
func TestLimitsFields(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"

	plain := mustAgent(t, a, "POST", agents, ws.APIKey, `{"name":"plain","kind":"echo"}`, 201)
	if *plain.KeyConcurrency != 1 || *plain.OnKeyConflict != "queue" || plain.RateLimit != nil {
		t.Errorf("agent created without limits: got key_concurrency %d, on_key_conflict %q, rate_limit %+v; want 1, queue, null",
			*plain.KeyConcurrency, *plain.OnKeyConflict, plain.RateLimit)
	}
	set := mustAgent(t, a, "POST", agents, ws.APIKey,
		`{"name":"set","kind":"echo","key_concurrency":3,"on_key_conflict":"reject","rate_limit":{"limit":60,"period_ms":60000}}`, 201)
	got := mustAgent(t, a, "GET", agents+"/set", ws.APIKey, nil, 200)
	for name, g := range map[string]agentJSON{"POST": set, "GET": got} {
		if *g.KeyConcurrency != 3 || *g.OnKeyConflict != "reject" || g.RateLimit == nil || *g.RateLimit != (rateLimit{60, 60000}) {
			t.Errorf("%s agent created with limits: got key_concurrency %d, on_key_conflict %q, rate_limit %+v; want 3, reject, 60 per 60000 ms",
				name, *g.KeyConcurrency, *g.OnKeyConflict, g.RateLimit)
		}
	}
	for _, c := range []struct {
		patch   string
		keys    int
		onKey   string
		rate    *rateLimit
		retryMS int
	}{
		{`{"key_concurrency":1000}`, 1000, "reject", &rateLimit{60, 60000}, 500},
		{`{"on_key_conflict":"cancel_running"}`, 1000, "cancel_running", &rateLimit{60, 60000}, 500},
		{`{"rate_limit":{"limit":1000000,"period_ms":1000}}`, 1000, "cancel_running", &rateLimit{1000000, 1000}, 500},
		{`{"retry":{"base_ms":7}}`, 1000, "cancel_running", &rateLimit{1000000, 1000}, 7},
		{`{"rate_limit":null,"key_concurrency":1,"on_key_conflict":"queue"}`, 1, "queue", nil, 7},
	} {
		ag := mustAgent(t, a, "PATCH", agents+"/set", ws.APIKey, c.patch, 200)
		if *ag.KeyConcurrency != c.keys || *ag.OnKeyConflict != c.onKey || (ag.RateLimit == nil) != (c.rate == nil) ||
			c.rate != nil && *ag.RateLimit != *c.rate || ag.Retry.BaseMS != c.retryMS {
			t.Errorf("PATCH %s: got key_concurrency %d, on_key_conflict %q, rate_limit %+v, retry %+v; want %d, %q, %+v, base_ms %d",
				c.patch, *ag.KeyConcurrency, *ag.OnKeyConflict, ag.RateLimit, ag.Retry, c.keys, c.onKey, c.rate, c.retryMS)
		}
	}

	for _, c := range []struct{ body, says string }{
		{`{"key_concurrency":0}`, "key_concurrency must be from 1 to 1000"},
		{`{"key_concurrency":1001}`, "key_concurrency must be from 1 to 1000"},
		{`{"on_key_conflict":"later"}`, `on_key_conflict must be "queue", "cancel_running" or "reject"`},
		{`{"rate_limit":{"limit":0,"period_ms":1000}}`, "rate_limit.limit must be from 1 to 1000000"},
		{`{"rate_limit":{"limit":1000001,"period_ms":1000}}`, "rate_limit.limit must be from 1 to 1000000"},
		{`{"rate_limit":{"limit":5,"period_ms":999}}`, "rate_limit.period_ms must be from 1000 to 86400000"},
		{`{"rate_limit":{"limit":5,"period_ms":86400001}}`, "rate_limit.period_ms must be from 1000 to 86400000"},
		{`{"rate_limit":{"limit":5}}`, "rate_limit.period_ms must be from 1000 to 86400000"},
		{`{"rate_limit":{"limit":5,"period_ms":1000,"burst":2}}`, `rate_limit: unknown key "burst"`},
		{`{"rate_limit":{"LIMIT":5,"period_ms":1000}}`, `rate_limit: unknown key "LIMIT"`},
		{`{"rate_limit":{"limit":"5","period_ms":1000}}`, "rate_limit.limit must be an integer"},
		{`{"rate_limit":60}`, "rate_limit must be an object"},
	} {
		for _, req := range []struct{ method, path, body string }{
			{"POST", agents, `{"name":"bad","kind":"echo",` + c.body[1:]},
			{"PATCH", agents + "/plain", c.body},
		} {
			status, hdr, data := a.do(t, req.method, req.path, ws.APIKey, nil, req.body)
			checkAPIError(t, req.method+" "+req.body, status, hdr, data, 422, "invalid")
			if !strings.Contains(string(data), strings.ReplaceAll(c.says, `"`, `\"`)) {
				t.Errorf("%s %s: got %s; want a message saying %q", req.method, req.body, data, c.says)
			}
		}
	}

	// The run's fields.
	mustAgent(t, a, "PATCH", agents+"/set", ws.APIKey, `{"rate_limit":{"limit":10,"period_ms":1000}}`, 200)
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	var r runRecord
	a.mustDo(t, "POST", runs, ws.APIKey, map[string]any{"agent": "set", "concurrency_key": "conv-ü", "cost": 10,
		"delay_ms": 3600000}, 201, &r)
	if r.ConcurrencyKey == nil || *r.ConcurrencyKey != "conv-ü" || r.Cost != 10 {
		t.Errorf("created run: got concurrency_key %v, cost %d; want conv-ü, 10", r.ConcurrencyKey, r.Cost)
	}
	if g := a.getRun(t, ws, r.ID); g.ConcurrencyKey == nil || *g.ConcurrencyKey != "conv-ü" || g.Cost != 10 {
		t.Errorf("GET run: got concurrency_key %v, cost %d; want conv-ü, 10", g.ConcurrencyKey, g.Cost)
	}
	a.mustDo(t, "POST", runs, ws.APIKey, map[string]any{"agent": "plain"}, 201, &r)
	if r.ConcurrencyKey != nil || r.Cost != 1 {
		t.Errorf("run without them: got concurrency_key %v, cost %d; want null, 1", r.ConcurrencyKey, r.Cost)
	}
	for _, c := range []struct {
		body       map[string]any
		code, says string
	}{
		{map[string]any{"agent": "plain", "concurrency_key": ""}, "invalid", "concurrency_key must be 1 to 200 characters"},
		{map[string]any{"agent": "plain", "concurrency_key": strings.Repeat("k", 201)}, "invalid", "concurrency_key must be 1 to 200 characters"},
		{map[string]any{"agent": "plain", "cost": 0}, "invalid", "cost must be from 1 to 1000000"},
		{map[string]any{"agent": "plain", "cost": 1000001}, "invalid", "cost must be from 1 to 1000000"},
		{map[string]any{"agent": "set", "cost": 11}, "invalid", `cost 11 is over agent \"set\"'s rate_limit.limit (10)`},
	} {
		status, hdr, data := a.do(t, "POST", runs, ws.APIKey, nil, c.body)
		checkAPIError(t, fmt.Sprintf("POST %v", c.body), status, hdr, data, 422, c.code)
		if !strings.Contains(string(data), c.says) {
			t.Errorf("POST %v: got %s; want a message saying %q", c.body, data, c.says)
		}
	}
	before := scCount(t, db, `SELECT count(*) FROM runs`)
	status, hdr, data := a.do(t, "POST", runs+"/batch", ws.APIKey, nil, map[string]any{"runs": []map[string]any{
		{"agent": "set", "cost": 10}, {"agent": "set", "cost": 11}}})
	checkAPIError(t, "batch with a cost over the limit", status, hdr, data, 422, "invalid")
	if !strings.Contains(string(data), "runs[1].cost 11") {
		t.Errorf("batch with a cost over the limit: got %s; want it to name runs[1]", data)
	}
	if after := scCount(t, db, `SELECT count(*) FROM runs`); after != before {
		t.Errorf("runs after the refused batch: got %d; want %d (all or nothing)", after, before)
	}
	// A keyed create with an Idempotency-Key: a repeat answers the first run.
	body := map[string]any{"agent": "plain", "concurrency_key": "k", "delay_ms": 3600000}
	var first, again runRecord
	for i, out := range []*runRecord{&first, &again} {
		status, _, data := a.do(t, "POST", runs, ws.APIKey, map[string]string{"Idempotency-Key": "same"}, body)
		if want := []int{201, 200}[i]; status != want {
			t.Fatalf("keyed create with Idempotency-Key, try %d: got %d %s; want %d", i+1, status, data, want)
		}
		json.Unmarshal(data, out)
	}
	if first.ID != again.ID {
		t.Errorf("repeat of a keyed create: got run %s; want the first, %s", again.ID, first.ID)
	}
}

// limHook is a webhook server that counts, per agent and concurrency_key (the run's input
// {"key"}), the requests in flight and the most at once, and records the order in which
// each key's runs (input {"i"}) first arrived; respond answers each request.
type limHook struct {
	*httptest.Server
	mu       sync.Mutex
	inFlight map[string]int
	most     map[string]int
	order    map[string][]int
}

// limInput is a run's input in these tests.
type limInput struct {
	Key string `json:"key"`
	I   int    `json:"i"`
}

func limNewHook(t testing.TB, respond func(w http.ResponseWriter, r *http.Request, agent string, in limInput)) *limHook {
	h := &limHook{inFlight: map[string]int{}, most: map[string]int{}, order: map[string][]int{}}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Agent   string   `json:"agent"`
			Attempt int      `json:"attempt"`
			Input   limInput `json:"input"`
		}
		json.NewDecoder(r.Body).Decode(&body)
		k := body.Agent + "/" + body.Input.Key
		h.mu.Lock()
		h.inFlight[k]++
		h.most[k] = max(h.most[k], h.inFlight[k])
		if body.Attempt == 1 {
			h.order[k] = append(h.order[k], body.Input.I)
		}
		h.mu.Unlock()
		defer func() {
			h.mu.Lock()
			h.inFlight[k]--
			h.mu.Unlock()
		}()
		respond(w, r, body.Agent, body.Input)
	}))
	t.Cleanup(h.Close)
	return h
}

// TestLimitsKeysAcrossProcesses: three processes drain runs of two webhook agents whose
// runs carry concurrency keys: "chat" (key_concurrency 1) and "pair" (2). No key ever has
// more runs in flight than its agent's key_concurrency, and the limit is reached; each of
// chat's keys has its runs start in their order; and the "slow" key (each run 1.5 s)
// holds up nobody: every other key's runs finish before its last one does.
func TestLimitsKeysAcrossProcesses(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	hook := limNewHook(t, func(w http.ResponseWriter, r *http.Request, agent string, in limInput) {
		if in.Key == "slow" {
			time.Sleep(1500 * time.Millisecond)
		} else {
			time.Sleep(20 * time.Millisecond)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ok":true}`))
	})
	var procs []*proc
	for range 3 {
		procs = append(procs, startProc(t, scEnv(t, dsn, nil)))
	}
	a := procs[0].app()
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"
	mustAgent(t, a, "POST", agents, ws.APIKey, map[string]any{"name": "chat", "kind": "webhook",
		"config": map[string]any{"url": hook.URL}}, 201)
	mustAgent(t, a, "POST", agents, ws.APIKey, map[string]any{"name": "pair", "kind": "webhook",
		"config": map[string]any{"url": hook.URL}, "key_concurrency": 2}, 201)

	// The slow key's runs first, so that they head the line; then the others, interleaved.
	var reqs []map[string]any
	for i := range 3 {
		reqs = append(reqs, map[string]any{"agent": "chat", "concurrency_key": "slow", "input": limInput{"slow", i}})
	}
	const perKey = 8
	for i := range perKey {
		for _, k := range []string{"c0", "c1", "c2", "c3"} {
			reqs = append(reqs, map[string]any{"agent": "chat", "concurrency_key": k, "input": limInput{k, i}})
		}
		for _, k := range []string{"p0", "p1"} {
			reqs = append(reqs, map[string]any{"agent": "pair", "concurrency_key": k, "input": limInput{k, i}})
		}
		reqs = append(reqs, map[string]any{"agent": "chat", "input": limInput{"", i}}) // no key: no key limit
	}
	var created struct{ Runs []runRecord }
	procs[1].app().mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": reqs}, 201, &created)
	eventually(t, 120*time.Second, fmt.Sprintf("all %d runs succeeded", len(reqs)), func() bool {
		return scCount(t, db, `SELECT count(*) FROM runs WHERE status = 'succeeded'`) == len(reqs)
	})

	hook.mu.Lock()
	defer hook.mu.Unlock()
	t.Logf("most in flight per key: %v", hook.most)
	for k, most := range hook.most {
		limit := 1
		switch {
		case strings.HasPrefix(k, "pair/"):
			limit = 2
		case k == "chat/":
			continue // runs without a key
		}
		if most > limit {
			t.Errorf("key %s: got %d runs in flight at once; want at most its agent's key_concurrency, %d", k, most, limit)
		}
	}
	if hook.most["pair/p0"] < 2 && hook.most["pair/p1"] < 2 {
		t.Errorf("pair's keys: got at most %d and %d in flight; want key_concurrency 2 reached by one", hook.most["pair/p0"], hook.most["pair/p1"])
	}
	if hook.most["chat/"] < 2 {
		t.Errorf("chat's runs without a key: got at most %d in flight; want more than one (no key, no key limit)", hook.most["chat/"])
	}
	for _, k := range []string{"slow", "c0", "c1", "c2", "c3"} {
		if got := hook.order["chat/"+k]; !slices.IsSorted(got) || len(got) != map[bool]int{true: 3, false: perKey}[k == "slow"] {
			t.Errorf("key %s: got its runs' first attempts in the order %v; want each once, in creation order", k, got)
		}
	}
	var slowLast, othersLast time.Time
	if err := db.QueryRow(`SELECT max(finished_at) FILTER (WHERE concurrency_key = 'slow'),
		max(finished_at) FILTER (WHERE concurrency_key IS DISTINCT FROM 'slow') FROM runs`).Scan(&slowLast, &othersLast); err != nil {
		t.Fatal(err)
	}
	if !othersLast.Before(slowLast) {
		t.Errorf("the other keys' last run finished at %v, not before the slow key's last at %v; want them flowing past it", othersLast, slowLast)
	}
}

// TestLimitsRateAcrossProcesses: three processes with a 60 s poll drain an echo agent
// with rate_limit 4 per 1000 ms, whose runs cost 1 or 2 (36 units), beside an agent
// without one. In every window of 1000 ms the starts of the rated agent's runs cost at
// most 4 units, so the drain takes at least 8 windows; the runs start as the windows
// allow (the idle workers wake then, not at the poll); the other agent's runs all finish
// before the rated agent's last one starts; /metrics shows runs held by the rate meanwhile.
func TestLimitsRateAcrossProcesses(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	slow := map[string]string{"RUN_WORKER_POLL_MS": "60000"}
	var procs []*proc
	for range 3 {
		procs = append(procs, startProc(t, scEnv(t, dsn, slow)))
	}
	a := procs[0].app()
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"
	mustAgent(t, a, "POST", agents, ws.APIKey, map[string]any{"name": "rated", "kind": "echo",
		"rate_limit": map[string]any{"limit": 4, "period_ms": 1000}}, 201)
	a.createAgent(t, ws, "free", "echo", nil)
	for _, p := range procs {
		p.app().waitListening(t, true)
	}
	var reqs []map[string]any
	units := 0
	for i := range 24 {
		cost := 1 + i%2
		units += cost
		reqs = append(reqs, map[string]any{"agent": "rated", "cost": cost, "input": i})
		if i%2 == 0 {
			reqs = append(reqs, map[string]any{"agent": "free", "input": i})
		}
	}
	var created struct{ Runs []runRecord }
	procs[2].app().mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, map[string]any{"runs": reqs}, 201, &created)
	held := 0.0
	eventually(t, 60*time.Second, fmt.Sprintf("all %d runs succeeded", len(reqs)), func() bool {
		held = max(held, a.metric(t, `agentapp_runs_held{reason="rate"}`))
		return scCount(t, db, `SELECT count(*) FROM runs WHERE status = 'succeeded'`) == len(reqs)
	})
	type start struct {
		at   time.Time
		cost int
	}
	var starts []start
	rows, err := db.Query(`SELECT r.started_at, r.cost FROM runs r JOIN agents a ON a.id = r.agent_id
		WHERE a.name = 'rated' ORDER BY r.started_at`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var s start
		if err := rows.Scan(&s.at, &s.cost); err != nil {
			t.Fatal(err)
		}
		starts = append(starts, s)
	}
	rows.Close()
	most, gaps := 0, time.Duration(0)
	for i, s := range starts {
		sum := 0
		for _, o := range starts[:i+1] {
			if s.at.Sub(o.at) < time.Second {
				sum += o.cost
			}
		}
		most = max(most, sum)
		if i > 0 {
			gaps = max(gaps, s.at.Sub(starts[i-1].at))
		}
	}
	span := starts[len(starts)-1].at.Sub(starts[0].at)
	t.Logf("%d runs, %d units: the most in any 1000 ms window %d units; first to last start %v; longest gap between starts %v; most held by rate %v",
		len(starts), units, most, span.Round(time.Millisecond), gaps.Round(time.Millisecond), held)
	if most > 4 {
		t.Errorf("the rated agent's starts: got %d units in one 1000 ms window; want at most its limit, 4", most)
	}
	if min := time.Duration(units/4-1) * time.Second; span < min {
		t.Errorf("the rated agent's starts: got first to last %v; want at least %v (%d units at 4 a second)", span, min, units)
	}
	if gaps > time.Second+scDueBound {
		t.Errorf("the rated agent's starts: got a gap of %v between two; want each start as soon as its window allows (the workers wake, poll 60 s)", gaps)
	}
	var freeLast time.Time
	if err := db.QueryRow(`SELECT max(r.finished_at) FROM runs r JOIN agents a ON a.id = r.agent_id WHERE a.name = 'free'`).Scan(&freeLast); err != nil {
		t.Fatal(err)
	}
	if !freeLast.Before(starts[len(starts)-1].at) {
		t.Errorf("the free agent's last run finished at %v, not before the rated agent's last start at %v; want it never held up by another agent's rate", freeLast, starts[len(starts)-1].at)
	}
	if held < 1 {
		t.Errorf(`agentapp_runs_held{reason="rate"}: got at most %v during the drain; want the held runs counted`, held)
	}
}

// TestLimitsKeyConflict: what a new run does to a key that has one, between two processes.
// Under cancel_running the newest run wins: a queued earlier run is canceled at once and
// a running one (in whichever process executes it) ends canceled, both with the error
// "superseded by run <id>", while runs of other keys and without a key are untouched.
// Under reject, a create whose key has a run queued or running is 409 key_busy naming that
// run, in either process; a batch holding such a run, or two runs of one key, is refused
// whole; once the holder is final, the key takes a run again.
func TestLimitsKeyConflict(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	release := make(chan struct{})
	hook := limNewHook(t, func(w http.ResponseWriter, r *http.Request, agent string, in limInput) {
		if in.I == 1 { // a run that holds its key until released or canceled
			select {
			case <-release:
			case <-r.Context().Done():
				return
			case <-time.After(30 * time.Second):
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ok":true}`))
	})
	procs := []*proc{startProc(t, scEnv(t, dsn, nil)), startProc(t, scEnv(t, dsn, nil))}
	a, b := procs[0].app(), procs[1].app()
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	for name, conflict := range map[string]string{"newest": "cancel_running", "once": "reject"} {
		mustAgent(t, a, "POST", agents, ws.APIKey, map[string]any{"name": name, "kind": "webhook",
			"config": map[string]any{"url": hook.URL}, "on_key_conflict": conflict}, 201)
	}
	create := func(c *app, agent, key string, in limInput, fields map[string]any) runRecord {
		t.Helper()
		body := map[string]any{"agent": agent, "input": in}
		if key != "" {
			body["concurrency_key"] = key
		}
		for k, v := range fields {
			body[k] = v
		}
		var r runRecord
		c.mustDo(t, "POST", runs, ws.APIKey, body, 201, &r)
		return r
	}
	wantError := func(what string, r runRecord, status, msg string) {
		t.Helper()
		if string(r.Status) != status || r.Error == nil || *r.Error != msg {
			t.Errorf("%s: got status %s, error %v; want %s with error %q", what, r.Status, r.Error, status, msg)
		}
	}

	// cancel_running.
	later := create(a, "newest", "k", limInput{"k", 0}, map[string]any{"delay_ms": 3600000})
	other := create(a, "newest", "other", limInput{"other", 0}, map[string]any{"delay_ms": 3600000})
	unkeyed := create(a, "newest", "", limInput{"", 0}, map[string]any{"delay_ms": 3600000})
	holder := create(b, "newest", "k", limInput{"k", 1}, nil)
	wantError("the queued run superseded", a.getRun(t, ws, later.ID), "canceled", "superseded by run "+holder.ID)
	a.waitRunStatus(t, ws, holder.ID, "running", 30*time.Second)
	eventually(t, 30*time.Second, "the holder's request in flight", func() bool {
		hook.mu.Lock()
		defer hook.mu.Unlock()
		return hook.inFlight["newest/k"] == 1
	})
	winner := create(a, "newest", "k", limInput{"k", 2}, nil)
	wantError("the running run superseded", a.waitRunStatus(t, ws, holder.ID, "canceled", 30*time.Second),
		"canceled", "superseded by run "+winner.ID)
	a.waitRunStatus(t, ws, winner.ID, "succeeded", 30*time.Second)
	for _, r := range []runRecord{other, unkeyed} {
		if g := a.getRun(t, ws, r.ID); g.Status != "queued" {
			t.Errorf("run %v of another key or none: got %s; want it still queued", r.ConcurrencyKey, g.Status)
		}
	}

	// reject.
	first := create(a, "once", "k", limInput{"k", 1}, nil)
	a.waitRunStatus(t, ws, first.ID, "running", 30*time.Second)
	before := scCount(t, db, `SELECT count(*) FROM runs`)
	for _, c := range []struct {
		app  *app
		path string
		body any
		says string
	}{
		{b, runs, map[string]any{"agent": "once", "concurrency_key": "k"}, "run " + first.ID + " holds it"},
		{a, runs, map[string]any{"agent": "once", "concurrency_key": "k", "delay_ms": 60000}, "run " + first.ID + " holds it"},
		{b, runs + "/batch", map[string]any{"runs": []map[string]any{{"agent": "once", "concurrency_key": "fresh"},
			{"agent": "once", "concurrency_key": "k"}}}, "runs[1].concurrency_key \"k\""},
		{a, runs + "/batch", map[string]any{"runs": []map[string]any{{"agent": "once", "concurrency_key": "twice"},
			{"agent": "once", "concurrency_key": "twice"}}}, "runs[0] of this request"},
	} {
		status, hdr, data := c.app.do(t, "POST", c.path, ws.APIKey, nil, c.body)
		checkAPIError(t, fmt.Sprintf("POST %s %v", c.path, c.body), status, hdr, data, 409, "key_busy")
		if says := strings.ReplaceAll(c.says, `"`, `\"`); !strings.Contains(string(data), says) {
			t.Errorf("POST %s %v: got %s; want a message saying %q", c.path, c.body, data, c.says)
		}
	}
	if after := scCount(t, db, `SELECT count(*) FROM runs`); after != before {
		t.Errorf("runs after the refused creates: got %d; want %d (nothing created)", after, before)
	}
	free := create(b, "once", "elsewhere", limInput{"elsewhere", 0}, nil)
	a.waitRunStatus(t, ws, free.ID, "succeeded", 30*time.Second)
	close(release)
	a.waitRunStatus(t, ws, first.ID, "succeeded", 30*time.Second)
	again := create(b, "once", "k", limInput{"k", 0}, nil)
	a.waitRunStatus(t, ws, again.ID, "succeeded", 30*time.Second)
}
