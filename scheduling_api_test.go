package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of the scheduling API (SPEC "Scheduling"): the run fields priority, run_at,
// delay_ms and timeout_ms; the agent fields max_concurrency and paused with GET and PATCH
// of an agent; retry; bulk cancel; and ?agent= on the runs list.

// decodeObject decodes a JSON object, keeping each value raw, so tests can see which
// keys are present and how each is spelled.
func decodeObject(t testing.TB, data []byte) map[string]json.RawMessage {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("got body %s (%v); want a JSON object", data, err)
	}
	return m
}

// errorMessage returns the message of an API error answer.
func errorMessage(t testing.TB, data []byte) string {
	t.Helper()
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(data, &e); err != nil {
		t.Fatalf("got body %s (%v); want the API's error format", data, err)
	}
	return e.Error.Message
}

// TestSchedulingRunFields: priority, run_at, delay_ms and timeout_ms are accepted at the
// edges of their ranges, stored, and shown in the run JSON; run_at is the due time,
// computed on the database's clock (now when neither was given, or when run_at is past).
func TestSchedulingRunFields(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	future := time.Now().Add(48 * time.Hour).Truncate(time.Second)

	cases := []struct {
		name        string
		body        string
		priority    int
		timeout     string        // the timeout_ms JSON
		dueAfter    time.Duration // run_at - created_at, on the database's clock; -1: check runAt
		runAt       time.Time
		runAtString string // the run_at JSON, when not empty
	}{
		{name: "defaults", body: `{"agent":"echo"}`, timeout: "null"},
		{name: "priority 0", body: `{"agent":"echo","priority":0}`, timeout: "null"},
		{name: "priority 9", body: `{"agent":"echo","priority":9}`, priority: 9, timeout: "null"},
		{name: "priority null", body: `{"agent":"echo","priority":null}`, timeout: "null"},
		{name: "timeout_ms 1", body: `{"agent":"echo","timeout_ms":1}`, timeout: "1"},
		{name: "timeout_ms 86400000", body: `{"agent":"echo","timeout_ms":86400000}`, timeout: "86400000"},
		{name: "delay_ms 0", body: `{"agent":"echo","delay_ms":0}`, timeout: "null"},
		{name: "delay_ms an hour", body: `{"agent":"echo","delay_ms":3600000}`, timeout: "null", dueAfter: time.Hour},
		{name: "delay_ms a year", body: `{"agent":"echo","delay_ms":31536000000}`, timeout: "null", dueAfter: 365 * 24 * time.Hour},
		{name: "run_at in the past", body: `{"agent":"echo","run_at":"2001-02-03T04:05:06Z"}`, timeout: "null"},
		{name: "run_at year 1", body: `{"agent":"echo","run_at":"0001-01-01T00:00:00+01:00"}`, timeout: "null"},
		{name: "run_at null", body: `{"agent":"echo","run_at":null,"delay_ms":5}`, timeout: "null", dueAfter: 5 * time.Millisecond},
		{name: "run_at ahead with an offset", body: `{"agent":"echo","run_at":"` + future.In(time.FixedZone("", 2*3600)).Format(time.RFC3339) + `"}`,
			timeout: "null", dueAfter: -1, runAt: future, runAtString: `"` + future.UTC().Format(time.RFC3339) + `"`},
		{name: "run_at year 9999", body: `{"agent":"echo","run_at":"9999-12-31T23:59:59.5Z"}`, timeout: "null",
			dueAfter: -1, runAt: time.Date(9999, 12, 31, 23, 59, 59, 5e8, time.UTC), runAtString: `"9999-12-31T23:59:59.5Z"`},
		{name: "everything", body: `{"agent":"echo","input":{"x":1},"max_attempts":2,"priority":3,"delay_ms":60000,"timeout_ms":250}`,
			priority: 3, timeout: "250", dueAfter: time.Minute},
	}
	for _, c := range cases { // in turn: the claim below counts these runs
		t.Run(c.name, func(t *testing.T) {
			status, _, data := a.do(t, "POST", runs, ws.APIKey, nil, c.body)
			if status != 201 {
				t.Fatalf("POST %s: got status %d; want 201; body %s", c.body, status, data)
			}
			raw := decodeObject(t, data)
			for _, key := range []string{"priority", "run_at", "timeout_ms"} {
				if _, ok := raw[key]; !ok {
					t.Errorf("run JSON: got keys without %q; want it present: %s", key, data)
				}
			}
			if got := string(raw["priority"]); got != fmt.Sprint(c.priority) {
				t.Errorf("priority: got %s; want %d", got, c.priority)
			}
			if got := string(raw["timeout_ms"]); got != c.timeout {
				t.Errorf("timeout_ms: got %s; want %s", got, c.timeout)
			}
			if got := string(raw["run_at"]); !strings.HasSuffix(got, `Z"`) || (c.runAtString != "" && got != c.runAtString) {
				t.Errorf("run_at: got %s; want RFC 3339 UTC ending in Z (%s)", got, c.runAtString)
			}
			var r runRecord
			if err := json.Unmarshal(data, &r); err != nil {
				t.Fatalf("run JSON: got %v; want a run", err)
			}
			// The table: what the claim reads.
			var priority int
			var timeout *int
			var dueAfterMS float64
			var runAt time.Time
			if err := db.QueryRow(`SELECT priority, timeout_ms, EXTRACT(EPOCH FROM run_at - created_at) * 1000, run_at
				FROM runs WHERE id = $1`, r.ID).Scan(&priority, &timeout, &dueAfterMS, &runAt); err != nil {
				t.Fatalf("read run %s: got %v; want the row", r.ID, err)
			}
			if priority != c.priority || fmt.Sprint(derefOr(timeout, -1)) != strings.ReplaceAll(c.timeout, "null", "-1") {
				t.Errorf("row: got priority %d, timeout_ms %v; want %d, %s", priority, derefOr(timeout, -1), c.priority, c.timeout)
			}
			if c.dueAfter >= 0 {
				if got := time.Duration(dueAfterMS * float64(time.Millisecond)).Round(time.Millisecond); got != c.dueAfter {
					t.Errorf("run_at - created_at: got %v; want %v", got, c.dueAfter)
				}
			} else if !runAt.Equal(c.runAt) || !r.RunAt.Equal(c.runAt) {
				t.Errorf("run_at: got %v in the row, %v in JSON; want %v", runAt, r.RunAt, c.runAt)
			}
			if !runAt.Equal(r.RunAt) {
				t.Errorf("run_at: got %v in JSON; want the row's %v", r.RunAt, runAt)
			}
		})
	}

	// The same fields in a batch, each element its own.
	var batch struct {
		Runs []runRecord `json:"runs"`
	}
	a.mustDo(t, "POST", runs+"/batch", ws.APIKey, `{"runs":[{"agent":"echo"},
		{"agent":"echo","priority":9,"delay_ms":31536000000,"timeout_ms":86400000},
		{"agent":"echo","priority":0,"run_at":"`+future.Format(time.RFC3339)+`","timeout_ms":1},
		{"agent":"echo","run_at":"2001-02-03T04:05:06Z"}]}`, 201, &batch)
	if len(batch.Runs) != 4 {
		t.Fatalf("batch: got %d runs; want 4", len(batch.Runs))
	}
	for i, want := range []struct {
		priority int
		timeout  int // -1: none
		dueAfter time.Duration
	}{{0, -1, 0}, {9, 86400000, 365 * 24 * time.Hour}, {0, 1, time.Until(future)}, {0, -1, 0}} {
		r := batch.Runs[i]
		if r.Priority != want.priority || derefOr(r.TimeoutMS, -1) != want.timeout {
			t.Errorf("batch run %d: got priority %d, timeout_ms %v; want %d, %d", i, r.Priority, derefOr(r.TimeoutMS, -1), want.priority, want.timeout)
		}
		// created_at and run_at share the statement's now(), except for a given run_at.
		if got := r.RunAt.Sub(r.CreatedAt); (i != 2 && got != want.dueAfter) || (i == 2 && !r.RunAt.Equal(future)) {
			t.Errorf("batch run %d: got run_at %v (created_at + %v); want created_at + %v", i, r.RunAt, got, want.dueAfter)
		}
	}

	// A run due later is not claimed; one due now is.
	a.createAgent(t, ws, "later", "echo", map[string]any{})
	later := runRecord{}
	a.mustDo(t, "POST", runs, ws.APIKey, `{"agent":"later","delay_ms":3600000}`, 201, &later)
	// Due now: the 10 cases due at once or 5 ms after their creation, and 2 of the batch.
	if sum := a.process(t, map[string]any{"workspace_id": ws.ID, "limit": 1000}); sum.Claimed != 12 || sum.Succeeded != 12 {
		t.Errorf("process: got %+v; want 12 claimed and succeeded (every run due now)", sum)
	}
	if r := a.getRun(t, ws, later.ID); r.Status != statusQueued || r.Attempt != 0 {
		t.Errorf("run due in an hour: got status %q attempt %d; want queued, 0", r.Status, r.Attempt)
	}
}

// derefOr is *p, or def when p is nil.
func derefOr(p *int, def int) int {
	if p == nil {
		return def
	}
	return *p
}

// TestSchedulingRunFieldsInvalid: each bad value of a scheduling field is a 422 whose
// message names the field (in a batch, prefixed with the element), and nothing is created.
func TestSchedulingRunFieldsInvalid(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	cases := []struct {
		name    string
		fields  string // added to {"agent":"echo", …}
		field   string // the message must name it
		typeErr bool   // a JSON type mismatch: the decoder's message names the field, not the element
	}{
		{"priority -1", `"priority":-1`, "priority", false},
		{"priority 10", `"priority":10`, "priority", false},
		{"priority fractional", `"priority":1.5`, "priority", true},
		{"priority a string", `"priority":"1"`, "priority", true},
		{"delay_ms -1", `"delay_ms":-1`, "delay_ms", false},
		{"delay_ms over a year", `"delay_ms":31536000001`, "delay_ms", false},
		{"delay_ms overflows", `"delay_ms":99999999999999999999`, "delay_ms", true},
		{"delay_ms a string", `"delay_ms":"5"`, "delay_ms", true},
		{"timeout_ms 0", `"timeout_ms":0`, "timeout_ms", false},
		{"timeout_ms over a day", `"timeout_ms":86400001`, "timeout_ms", false},
		{"timeout_ms negative", `"timeout_ms":-5`, "timeout_ms", false},
		{"run_at a word", `"run_at":"tomorrow"`, "run_at", false},
		{"run_at a date only", `"run_at":"2030-01-02"`, "run_at", false},
		{"run_at without zone", `"run_at":"2030-01-02T03:04:05"`, "run_at", false},
		{"run_at a number", `"run_at":1700000000`, "run_at", true},
		{"run_at empty", `"run_at":""`, "run_at", false},
		{"run_at past year 9999 in UTC", `"run_at":"9999-12-31T23:59:59-01:00"`, "run_at", false},
		{"run_at and delay_ms", `"run_at":"2030-01-02T03:04:05Z","delay_ms":0`, "run_at and delay_ms", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			status, hdr, data := a.do(t, "POST", runs, ws.APIKey, nil, `{"agent":"echo",`+c.fields+`}`)
			checkAPIError(t, "POST runs "+c.fields, status, hdr, data, 422, "invalid")
			if msg := errorMessage(t, data); !strings.Contains(msg, c.field) {
				t.Errorf("POST runs %s: got message %q; want it to name %s", c.fields, msg, c.field)
			}
			status, hdr, data = a.do(t, "POST", runs+"/batch", ws.APIKey, nil, `{"runs":[{"agent":"echo"},{"agent":"echo",`+c.fields+`}]}`)
			checkAPIError(t, "POST runs/batch "+c.fields, status, hdr, data, 422, "invalid")
			want := "runs[1]." + c.field
			if c.typeErr {
				want = c.field
			}
			if msg := errorMessage(t, data); !strings.Contains(msg, want) {
				t.Errorf("POST runs/batch %s: got message %q; want it to name %s", c.fields, msg, want)
			}
		})
	}
	t.Cleanup(func() {
		if st := a.stats(t, ws); st != (runStats{}) {
			t.Errorf("after the invalid requests: got stats %+v; want no run", st)
		}
	})
}

// TestSchedulingIdempotency: the scheduling fields are part of the request an
// Idempotency-Key stands for: a repeat returns the first run, another value is 409.
func TestSchedulingIdempotency(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	first := `{"agent":"echo","input":1,"priority":2,"delay_ms":60000,"timeout_ms":100}`
	hdr := map[string]string{"Idempotency-Key": "k1"}
	status, _, data := a.do(t, "POST", runs, ws.APIKey, hdr, first)
	if status != 201 {
		t.Fatalf("first: got status %d; want 201; body %s", status, data)
	}
	var r1 runRecord
	json.Unmarshal(data, &r1)
	for _, body := range []string{first, `{"timeout_ms":100,"delay_ms":60000,"priority":2,"input":1,"agent":"echo"}`} {
		status, _, data := a.do(t, "POST", runs, ws.APIKey, hdr, body)
		var r runRecord
		json.Unmarshal(data, &r)
		if status != 200 || r.ID != r1.ID {
			t.Errorf("repeat %s: got status %d, run %s; want 200, the first run %s", body, status, r.ID, r1.ID)
		}
	}
	for _, body := range []string{
		`{"agent":"echo","input":1,"priority":3,"delay_ms":60000,"timeout_ms":100}`,
		`{"agent":"echo","input":1,"priority":2,"delay_ms":60001,"timeout_ms":100}`,
		`{"agent":"echo","input":1,"priority":2,"delay_ms":60000,"timeout_ms":101}`,
		`{"agent":"echo","input":1,"priority":2,"delay_ms":60000}`,
		`{"agent":"echo","input":1,"priority":2,"run_at":"2030-01-01T00:00:00Z","timeout_ms":100}`,
		`{"agent":"echo","input":1}`,
	} {
		status, rh, data := a.do(t, "POST", runs, ws.APIKey, hdr, body)
		checkAPIError(t, "another request "+body, status, rh, data, 409, "idempotency_conflict")
	}
	// The same instant in another offset is the same request.
	hdr2 := map[string]string{"Idempotency-Key": "k2"}
	var r2, r3 runRecord
	status, _, data = a.do(t, "POST", runs, ws.APIKey, hdr2, `{"agent":"echo","run_at":"2030-01-01T02:00:00+02:00"}`)
	json.Unmarshal(data, &r2)
	if status != 201 {
		t.Fatalf("k2: got status %d; want 201; body %s", status, data)
	}
	status, _, data = a.do(t, "POST", runs, ws.APIKey, hdr2, `{"agent":"echo","run_at":"2030-01-01T00:00:00Z"}`)
	json.Unmarshal(data, &r3)
	if status != 200 || r3.ID != r2.ID {
		t.Errorf("k2 repeat in UTC: got status %d, run %s; want 200, %s", status, r3.ID, r2.ID)
	}

	// Without scheduling fields the hash is the one of earlier releases, so a key used
	// before an upgrade still matches its repeat after it.
	n := newRun{Agent: "echo", MaxAttempts: 3, Priority: 0}
	old := sha256.Sum256([]byte("echo\x003\x00{\"a\":1}"))
	if got := requestHash(n, []byte(`{"a":1}`)); string(got) != string(old[:]) {
		t.Errorf("requestHash without scheduling fields: got %x; want the earlier release's %x", got, old)
	}
}

// agentJSON is an agent as the API answers it, with its optional fields as pointers.
type agentJSON struct {
	ID             string          `json:"id"`
	WorkspaceID    string          `json:"workspace_id"`
	Name           string          `json:"name"`
	Kind           string          `json:"kind"`
	Config         json.RawMessage `json:"config"`
	MaxConcurrency *int            `json:"max_concurrency"`
	Paused         *bool           `json:"paused"`
	Retry          *retryPolicy    `json:"retry"`
	ThrottledUntil *time.Time      `json:"throttled_until"`
	KeyConcurrency *int            `json:"key_concurrency"`
	OnKeyConflict  *string         `json:"on_key_conflict"`
	RateLimit      *rateLimit      `json:"rate_limit"`
	CreatedAt      string          `json:"created_at"`
}

// mustAgent sends a request that answers an agent and returns it, failing the test
// unless the status is want or the agent JSON lacks a key.
func mustAgent(t testing.TB, a *app, method, path, token string, body any, want int) agentJSON {
	t.Helper()
	status, _, data := a.do(t, method, path, token, nil, body)
	if status != want {
		t.Fatalf("%s %s %v: got status %d; want %d; body %s", method, path, body, status, want, data)
	}
	raw := decodeObject(t, data)
	for _, key := range []string{"id", "workspace_id", "name", "kind", "config", "max_concurrency", "paused", "retry",
		"throttled_until", "created_at", "key_concurrency", "on_key_conflict", "rate_limit"} {
		if _, ok := raw[key]; !ok {
			t.Errorf("%s %s: got agent %s without %q; want every agent key", method, path, data, key)
		}
	}
	var ag agentJSON
	json.Unmarshal(data, &ag)
	return ag
}

// TestSchedulingAgents: max_concurrency and paused at creation, GET and PATCH of an
// agent (a null cap, pause and unpause, a config validated again for the agent's kind, an
// empty patch), 4xx for bad values and unknown agents, and a pause that holds from the
// next claim.
func TestSchedulingAgents(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	other := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"

	// Creation: defaults, the edges, and bad values.
	echo := mustAgent(t, a, "GET", agents+"/echo", ws.APIKey, nil, 200)
	if echo.MaxConcurrency != nil || echo.Paused == nil || *echo.Paused || echo.Kind != "echo" || echo.WorkspaceID != ws.ID {
		t.Errorf("default agent: got %+v; want no cap, not paused, echo of %s", echo, ws.ID)
	}
	for _, c := range []struct {
		body   string
		cap    int // -1: none
		paused bool
	}{
		{`{"name":"c1","kind":"echo","max_concurrency":1}`, 1, false},
		{`{"name":"c1000","kind":"echo","max_concurrency":1000,"paused":true}`, 1000, true},
		{`{"name":"cnull","kind":"echo","max_concurrency":null,"paused":false}`, -1, false},
	} {
		ag := mustAgent(t, a, "POST", agents, ws.APIKey, c.body, 201)
		if derefOr(ag.MaxConcurrency, -1) != c.cap || ag.Paused == nil || *ag.Paused != c.paused {
			t.Errorf("create %s: got max_concurrency %v, paused %v; want %d, %v", c.body, derefOr(ag.MaxConcurrency, -1), ag.Paused, c.cap, c.paused)
		}
		got := mustAgent(t, a, "GET", agents+"/"+ag.Name, ws.APIKey, nil, 200)
		if got.ID != ag.ID || derefOr(got.MaxConcurrency, -1) != c.cap || *got.Paused != c.paused {
			t.Errorf("GET %s: got %+v; want what was created: %+v", ag.Name, got, ag)
		}
	}
	for _, body := range []string{
		`{"name":"x","kind":"echo","max_concurrency":0}`,
		`{"name":"x","kind":"echo","max_concurrency":1001}`,
		`{"name":"x","kind":"echo","max_concurrency":-1}`,
		`{"name":"x","kind":"echo","max_concurrency":"2"}`,
		`{"name":"x","kind":"echo","paused":"yes"}`,
	} {
		status, hdr, data := a.do(t, "POST", agents, ws.APIKey, nil, body)
		checkAPIError(t, "create "+body, status, hdr, data, 422, "invalid")
	}
	var list struct {
		Agents []agentJSON `json:"agents"`
	}
	a.mustDo(t, "GET", agents, ws.APIKey, nil, 200, &list)
	if len(list.Agents) != 4 || list.Agents[1].Name != "c1000" || derefOr(list.Agents[1].MaxConcurrency, -1) != 1000 || !*list.Agents[1].Paused {
		t.Errorf("agents list: got %+v; want echo, c1, c1000 (cap 1000, paused), cnull", list.Agents)
	}

	// PATCH, field by field; each answer is what GET then shows.
	path := agents + "/echo"
	for _, c := range []struct {
		body   string
		cap    int
		paused bool
		config string
	}{
		{`{}`, -1, false, `{}`},
		{`{"max_concurrency":5}`, 5, false, `{}`},
		{`{"paused":true}`, 5, true, `{}`},
		{`{"config":{"delay_ms":7}}`, 5, true, `{"delay_ms":7}`},
		{`{}`, 5, true, `{"delay_ms":7}`},
		{`{"max_concurrency":null,"paused":false}`, -1, false, `{"delay_ms":7}`},
		{`{"config":null,"max_concurrency":1000,"paused":null}`, 1000, false, `{}`},
		{`{"max_concurrency":1,"paused":true,"config":{"delay_ms":600000}}`, 1, true, `{"delay_ms":600000}`},
		{`{"config":{},"max_concurrency":null,"paused":false}`, -1, false, `{}`},
	} {
		ag := mustAgent(t, a, "PATCH", path, ws.APIKey, c.body, 200)
		got := mustAgent(t, a, "GET", path, ws.APIKey, nil, 200)
		for name, g := range map[string]agentJSON{"PATCH": ag, "GET": got} {
			if g.ID != echo.ID || derefOr(g.MaxConcurrency, -1) != c.cap || *g.Paused != c.paused || string(g.Config) != c.config {
				t.Errorf("%s after PATCH %s: got max_concurrency %d, paused %v, config %s; want %d, %v, %s",
					name, c.body, derefOr(g.MaxConcurrency, -1), *g.Paused, g.Config, c.cap, c.paused, c.config)
			}
		}
	}

	// A webhook's config is validated as a webhook's, not an echo's.
	hook := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "{}") }))
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": hook.URL})
	mustAgent(t, a, "PATCH", agents+"/hook", ws.APIKey, map[string]any{"config": map[string]any{"url": hook.URL + "/v2", "timeout_ms": 600000}}, 200)

	bad := []struct {
		name, path, body string
		status           int
	}{
		{"cap 0", path, `{"max_concurrency":0}`, 422},
		{"cap 1001", path, `{"max_concurrency":1001}`, 422},
		{"cap fractional", path, `{"max_concurrency":1.5}`, 422},
		{"cap a string", path, `{"max_concurrency":"5"}`, 422},
		{"cap an object", path, `{"max_concurrency":{}}`, 422},
		{"paused a string", path, `{"paused":"true"}`, 422},
		{"echo config with a webhook key", path, `{"config":{"url":"http://127.0.0.1/"}}`, 422},
		{"echo delay out of range", path, `{"config":{"delay_ms":600001}}`, 422},
		{"config not an object", path, `{"config":[1]}`, 422},
		{"webhook config without url", agents + "/hook", `{"config":{"timeout_ms":5}}`, 422},
		{"webhook host not allowed", agents + "/hook", `{"config":{"url":"http://example.com/"}}`, 422},
		{"webhook config with an echo key", agents + "/hook", `{"config":{"url":"` + hook.URL + `","delay_ms":1}}`, 422},
		{"unknown key", path, `{"name":"renamed"}`, 400},
		{"kind is not patchable", path, `{"kind":"webhook"}`, 400},
		{"key in another case", path, `{"Paused":true}`, 400},
		{"key twice", path, `{"paused":true,"paused":false}`, 400},
		{"empty body", path, ``, 400},
		{"unknown agent", agents + "/nope", `{"paused":true}`, 404},
		{"unknown agent with config", agents + "/nope", `{"config":{}}`, 404},
		{"unknown agent empty patch", agents + "/nope", `{}`, 404},
	}
	for _, c := range bad {
		status, hdr, data := a.do(t, "PATCH", c.path, ws.APIKey, nil, c.body)
		checkAPIError(t, c.name, status, hdr, data, c.status, "")
	}
	if got := mustAgent(t, a, "GET", path, ws.APIKey, nil, 200); got.MaxConcurrency != nil || *got.Paused || string(got.Config) != `{}` {
		t.Errorf("after the bad patches: got %+v; want the agent unchanged", got)
	}
	status, hdr, data := a.do(t, "GET", agents+"/nope", ws.APIKey, nil, nil)
	checkAPIError(t, "GET unknown agent", status, hdr, data, 404, "not_found")
	// Another workspace's agent: its key on our path, and our agent's name on its path.
	for _, c := range []struct{ method, path, token string }{
		{"GET", path, other.APIKey},
		{"PATCH", path, other.APIKey},
		{"GET", "/v1/workspaces/" + other.ID + "/agents/c1", other.APIKey},
		{"PATCH", "/v1/workspaces/" + other.ID + "/agents/c1", other.APIKey},
	} {
		status, hdr, data := a.do(t, c.method, c.path, c.token, nil, `{"paused":true}`)
		checkAPIError(t, c.method+" "+c.path+" with the other workspace's key", status, hdr, data, 404, "not_found")
	}
	if got := mustAgent(t, a, "GET", path, testAdminToken, nil, 200); *got.Paused {
		t.Errorf("after the other workspace's patch: got paused; want the agent unchanged")
	}

	// A pause holds from the next claim, and so does the unpause.
	mustAgent(t, a, "PATCH", path, ws.APIKey, `{"paused":true}`, 200)
	r := a.createRun(t, ws, "echo", "paused")
	if sum := a.process(t, map[string]any{"workspace_id": ws.ID}); sum.Claimed != 0 {
		t.Errorf("process with the agent paused: got %d claimed; want 0", sum.Claimed)
	}
	mustAgent(t, a, "PATCH", path, ws.APIKey, `{"paused":false}`, 200)
	if sum := a.process(t, map[string]any{"workspace_id": ws.ID}); sum.Claimed != 1 || sum.Succeeded != 1 {
		t.Errorf("process after unpausing: got %+v; want 1 claimed and succeeded", sum)
	}
	if got := a.getRun(t, ws, r.ID); got.Status != statusSucceeded {
		t.Errorf("run of the unpaused agent: got %q; want succeeded", got.Status)
	}
}

// TestSchedulingRetry: a failed run goes back to queued with more attempts, its errors
// kept and its last outcome cleared, and the worker then executes it; a canceled run too;
// a run in any other status is 409; of concurrent retries exactly one wins.
func TestSchedulingRetry(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	failing := true
	hook := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		fail := failing
		mu.Unlock()
		if fail {
			http.Error(w, "down", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok":true}`)
	}))
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": hook.URL})
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 600000})
	runs := "/v1/workspaces/" + ws.ID + "/runs/"
	process := map[string]any{"workspace_id": ws.ID}

	var failed runRecord
	a.mustDo(t, "POST", runs[:len(runs)-1], ws.APIKey, map[string]any{"agent": "hook", "max_attempts": 1}, 201, &failed)
	if sum := a.process(t, process); sum.Failed != 1 {
		t.Fatalf("process: got %+v; want 1 failed", sum)
	}
	failed = a.getRun(t, ws, failed.ID)
	if failed.Status != statusFailed || failed.Error == nil || failed.FinishedAt == nil || failed.StartedAt == nil {
		t.Fatalf("run before the retry: got %+v; want failed with an error, started and finished", failed)
	}

	// Queued, running and succeeded runs are not retried.
	queued := a.createRun(t, ws, "echo", "q")
	status, hdr, data := a.do(t, "POST", runs+queued.ID+"/retry", ws.APIKey, nil, nil)
	checkAPIError(t, "retry of a queued run", status, hdr, data, 409, "conflict")
	if msg := errorMessage(t, data); msg != "run is queued: only failed or canceled runs can be retried" {
		t.Errorf("retry of a queued run: got message %q; want %q", msg, "run is queued: only failed or canceled runs can be retried")
	}
	if sum := a.process(t, process); sum.Succeeded != 1 {
		t.Fatalf("process: got %+v; want the echo run succeeded", sum)
	}
	status, hdr, data = a.do(t, "POST", runs+queued.ID+"/retry", ws.APIKey, nil, nil)
	checkAPIError(t, "retry of a succeeded run", status, hdr, data, 409, "conflict")
	if msg := errorMessage(t, data); !strings.HasPrefix(msg, "run is succeeded:") {
		t.Errorf("retry of a succeeded run: got message %q; want it to say the run is succeeded", msg)
	}
	slow := a.createRun(t, ws, "slow", "s")
	processed := make(chan error, 1)
	go func() { // answers once the slow run has ended
		status, _, body, err := send(testClient, "POST", a.base+"/v1/worker/process", testAdminToken, nil, process)
		if err == nil && status != 200 {
			err = fmt.Errorf("status %d, body %s", status, body)
		}
		processed <- err
	}()
	a.waitRunStatus(t, ws, slow.ID, "running", 30*time.Second)
	status, hdr, data = a.do(t, "POST", runs+slow.ID+"/retry", ws.APIKey, nil, `{"attempts":3}`)
	checkAPIError(t, "retry of a running run", status, hdr, data, 409, "conflict")
	a.mustDo(t, "POST", runs+slow.ID+"/cancel", ws.APIKey, nil, 200, nil)
	a.waitRunStatus(t, ws, slow.ID, "canceled", 30*time.Second)
	if err := <-processed; err != nil {
		t.Fatalf("process of the slow run: got %v; want 200", err)
	}

	// Bad requests change nothing.
	for _, c := range []struct {
		name, id, body string
		status         int
	}{
		{"attempts 0", failed.ID, `{"attempts":0}`, 422},
		{"attempts 26", failed.ID, `{"attempts":26}`, 422},
		{"attempts a string", failed.ID, `{"attempts":"2"}`, 422},
		{"unknown key", failed.ID, `{"attempt":2}`, 400},
		{"unknown run", unknownUUID, ``, 404},
		{"not a UUID", "123", ``, 404},
	} {
		status, hdr, data := a.do(t, "POST", runs+c.id+"/retry", ws.APIKey, nil, c.body)
		checkAPIError(t, c.name, status, hdr, data, c.status, "")
	}
	other := a.createWorkspace(t)
	status, hdr, data = a.do(t, "POST", runs+failed.ID+"/retry", other.APIKey, nil, nil)
	checkAPIError(t, "retry with another workspace's key", status, hdr, data, 404, "not_found")

	// The failed run: 2 more attempts, errors kept, the last outcome cleared.
	var retried runRecord
	a.mustDo(t, "POST", runs+failed.ID+"/retry", ws.APIKey, `{"attempts":2}`, 200, &retried)
	if retried.Status != statusQueued || retried.Attempt != 1 || retried.MaxAttempts != 3 || retried.Error != nil ||
		string(retried.Output) != "null" || retried.StartedAt != nil || retried.FinishedAt != nil {
		t.Errorf("retried run: got status %q attempt %d max_attempts %d error %v output %s started %v finished %v; want queued, 1, 3, no error, output, start or finish",
			retried.Status, retried.Attempt, retried.MaxAttempts, retried.Error, retried.Output, retried.StartedAt, retried.FinishedAt)
	}
	if string(retried.Errors) != string(failed.Errors) || len(readRunRow(t, db, failed.ID).Errors) != 1 {
		t.Errorf("retried run: got errors %s; want the failed attempt's kept: %s", retried.Errors, failed.Errors)
	}
	if retried.RunAt.Before(failed.FinishedAt.Add(-time.Second)) || !retried.UpdatedAt.Equal(retried.RunAt) {
		t.Errorf("retried run: got run_at %v; want now (%v)", retried.RunAt, retried.UpdatedAt)
	}
	// The worker executes it again: it fails once more (attempt 2), then succeeds (3).
	if sum := a.process(t, process); sum.Claimed != 1 || sum.Retried != 1 {
		t.Errorf("process after the retry: got %+v; want 1 claimed and retried", sum)
	}
	mu.Lock()
	failing = false
	mu.Unlock()
	var done runRecord
	eventually(t, 30*time.Second, "the retried run succeeds", func() bool {
		a.process(t, process) // its backoff may not have passed yet
		done = a.getRun(t, ws, failed.ID)
		return done.final()
	})
	if done.Status != statusSucceeded || done.Attempt != 3 || string(done.Output) != `{"ok":true}` {
		t.Errorf("retried run after the worker: got status %q attempt %d output %s; want succeeded, 3, {\"ok\":true}", done.Status, done.Attempt, done.Output)
	}
	if row := readRunRow(t, db, failed.ID); len(row.Errors) != 2 || row.Errors[0].Attempt != 1 || row.Errors[1].Attempt != 2 {
		t.Errorf("retried run's errors: got %+v; want attempts 1 and 2", row.Errors)
	}

	// The canceled run (canceled while running): an empty body means 1 more attempt.
	slowRow := readRunRow(t, db, slow.ID)
	a.mustDo(t, "POST", runs+slow.ID+"/retry", ws.APIKey, nil, 200, &retried)
	var cancelRequested bool
	if err := db.QueryRow(`SELECT cancel_requested FROM runs WHERE id = $1`, slow.ID).Scan(&cancelRequested); err != nil {
		t.Fatal(err)
	}
	if retried.Status != statusQueued || retried.MaxAttempts != slowRow.Attempt+1 || retried.Error != nil || cancelRequested {
		t.Errorf("retried canceled run: got status %q max_attempts %d error %v cancel_requested %v; want queued, %d, none, false",
			retried.Status, retried.MaxAttempts, retried.Error, cancelRequested, slowRow.Attempt+1)
	}

	// A queued run canceled, then retried by 8 clients at once: one wins.
	q := a.createRun(t, ws, "echo", "race")
	a.mustDo(t, "POST", runs+q.ID+"/cancel", ws.APIKey, nil, 200, nil)
	statuses := make(chan int, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, _, _, _ := send(testClient, "POST", a.base+runs+q.ID+"/retry", ws.APIKey, nil, nil)
			statuses <- status
		}()
	}
	wg.Wait()
	close(statuses)
	counts := map[int]int{}
	for s := range statuses {
		counts[s]++
	}
	if counts[200] != 1 || counts[409] != 7 {
		t.Errorf("8 concurrent retries: got statuses %v; want one 200 and seven 409", counts)
	}
	if got := a.getRun(t, ws, q.ID); got.Status != statusQueued || got.MaxAttempts != 1 {
		t.Errorf("raced run: got status %q max_attempts %d; want queued, 1 (attempt 0 + 1)", got.Status, got.MaxAttempts)
	}
}

// TestSchedulingBulkCancel: POST …/runs/cancel cancels the queued and running runs it
// matches (by agent, by status, or all) and counts them; queued ones end at once, a
// running one where it executes.
func TestSchedulingBulkCancel(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	other := a.createWorkspace(t)
	a.createAgent(t, ws, "a", "echo", map[string]any{})
	a.createAgent(t, ws, "b", "echo", map[string]any{})
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 600000})
	cancel := "/v1/workspaces/" + ws.ID + "/runs/cancel"

	slow := a.createRun(t, ws, "slow", nil)
	processed := make(chan error, 1)
	go func() {
		status, _, body, err := send(testClient, "POST", a.base+"/v1/worker/process", testAdminToken, nil, map[string]any{"workspace_id": ws.ID})
		if err == nil && status != 200 {
			err = fmt.Errorf("status %d, body %s", status, body)
		}
		processed <- err
	}()
	a.waitRunStatus(t, ws, slow.ID, "running", 30*time.Second)
	var ofA, ofB []runRecord
	for i := range 3 {
		ofA = append(ofA, a.createRun(t, ws, "a", i))
	}
	for i := range 2 {
		ofB = append(ofB, a.createRun(t, ws, "b", i))
	}
	otherRun := a.createRun(t, other, "echo", "other")

	for _, c := range []struct {
		name, body string
		status     int
	}{
		{"unknown agent", `{"agent":"nope"}`, 422},
		{"empty agent name", `{"agent":""}`, 422},
		{"an agent with nothing running", `{"agent":"echo","status":"running"}`, 200},
		{"status failed", `{"status":"failed"}`, 422},
		{"status canceled", `{"status":"canceled"}`, 422},
		{"status in another case", `{"status":"Queued"}`, 422},
		{"status a number", `{"status":1}`, 422},
		{"unknown key", `{"agents":"a"}`, 400},
		{"empty body", ``, 400},
	} {
		status, hdr, data := a.do(t, "POST", cancel, ws.APIKey, nil, c.body)
		if c.status == 200 {
			if status != 200 || string(data) != `{"canceled":0}`+"\n" {
				t.Errorf("%s: got %d %s; want 200 {\"canceled\":0}", c.name, status, data)
			}
			continue
		}
		checkAPIError(t, c.name+" "+c.body, status, hdr, data, c.status, "")
	}
	status, hdr, data := a.do(t, "POST", cancel, other.APIKey, nil, `{}`)
	checkAPIError(t, "with another workspace's key", status, hdr, data, 404, "not_found")

	mustCancel := func(body string, want int64) {
		t.Helper()
		var got struct {
			Canceled *int64 `json:"canceled"`
		}
		a.mustDo(t, "POST", cancel, ws.APIKey, body, 200, &got)
		if got.Canceled == nil || *got.Canceled != want {
			t.Errorf("cancel %s: got canceled %v; want %d", body, got.Canceled, want)
		}
	}
	mustCancel(`{"agent":"a","status":"running"}`, 0)
	mustCancel(`{"agent":"a"}`, 3)
	for _, r := range ofA {
		row := readRunRow(t, db, r.ID)
		if row.Status != "canceled" || !row.Error.Valid || row.Error.String != "canceled by request" || !row.FinishedAt.Valid {
			t.Errorf("run of a: got status %q error %v finished %v; want canceled by request, finished", row.Status, row.Error, row.FinishedAt)
		}
	}
	for _, r := range append(ofB, slow) {
		if got := a.getRun(t, ws, r.ID); got.final() {
			t.Errorf("run of %s after canceling a's: got %q; want it untouched", r.Agent, got.Status)
		}
	}
	mustCancel(`{"status":"running"}`, 1)
	a.waitRunStatus(t, ws, slow.ID, "canceled", 30*time.Second)
	if err := <-processed; err != nil {
		t.Fatalf("process of the slow run: got %v; want 200", err)
	}
	for _, r := range ofB {
		if got := a.getRun(t, ws, r.ID); got.Status != statusQueued {
			t.Errorf("run of b after canceling the running: got %q; want queued", got.Status)
		}
	}
	mustCancel(`{"status":"queued","agent":"b"}`, 2)
	mustCancel(`{}`, 0)
	if st := a.stats(t, ws); st != (runStats{Canceled: 6}) {
		t.Errorf("stats: got %+v; want 6 canceled", st)
	}
	if got := a.getRun(t, other, otherRun.ID); got.Status != statusQueued {
		t.Errorf("the other workspace's run: got %q; want queued", got.Status)
	}
	// Both statuses at once, the admin token too.
	a.createRun(t, ws, "b", "again")
	var got map[string]int64
	a.mustDo(t, "POST", cancel, testAdminToken, `{"agent":null,"status":null}`, 200, &got)
	if got["canceled"] != 1 {
		t.Errorf("cancel all as admin: got %v; want canceled 1", got)
	}
}

// TestSchedulingListByAgent: ?agent= keeps one agent's runs, with status, limit and
// cursor; an unknown name lists nothing.
func TestSchedulingListByAgent(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "a b/c", "echo", map[string]any{})
	var ofA, ofEcho, every []string // newest first
	for i := range 5 {
		ofA = append([]string{a.createRun(t, ws, "a b/c", i).ID}, ofA...)
		every = append([]string{ofA[0]}, every...)
		if i%2 == 0 {
			ofEcho = append([]string{a.createRun(t, ws, "echo", i).ID}, ofEcho...)
			every = append([]string{ofEcho[0]}, every...)
		}
	}
	agentA := "agent=a+b%2Fc"
	all, pages := listAllRuns(t, a, ws, agentA+"&limit=2")
	if got := runIDs(all); strings.Join(got, ",") != strings.Join(ofA, ",") || pages != 3 {
		t.Errorf("?%s&limit=2: got %v in %d pages; want %v in 3", agentA, got, pages, ofA)
	}
	for _, r := range all {
		if r.Agent != "a b/c" {
			t.Errorf("?%s: got a run of %q; want only a b/c's", agentA, r.Agent)
		}
	}
	all, _ = listAllRuns(t, a, ws, "agent=echo&limit=200")
	if got := runIDs(all); strings.Join(got, ",") != strings.Join(ofEcho, ",") {
		t.Errorf("?agent=echo: got %v; want %v", got, ofEcho)
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+ofA[1]+"/cancel", ws.APIKey, nil, 200, nil)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+ofA[3]+"/cancel", ws.APIKey, nil, 200, nil)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+ofEcho[0]+"/cancel", ws.APIKey, nil, 200, nil)
	all, pages = listAllRuns(t, a, ws, agentA+"&status=canceled&limit=1")
	if got := runIDs(all); strings.Join(got, ",") != ofA[1]+","+ofA[3] || pages != 2 {
		t.Errorf("?%s&status=canceled&limit=1: got %v in %d pages; want [%s %s] in 2", agentA, got, pages, ofA[1], ofA[3])
	}
	// Unfiltered, the runs of both agents in every status come newest first, page after page.
	for _, limit := range []int{1, 2, 3, 200} {
		all, _ = listAllRuns(t, a, ws, "limit="+strconv.Itoa(limit))
		if got := runIDs(all); strings.Join(got, ",") != strings.Join(every, ",") {
			t.Errorf("?limit=%d, every page: got %v; want %v", limit, got, every)
		}
	}
	var canceled []string
	for _, id := range every {
		if id == ofA[1] || id == ofA[3] || id == ofEcho[0] {
			canceled = append(canceled, id)
		}
	}
	all, _ = listAllRuns(t, a, ws, "status=canceled&limit=1")
	if got := runIDs(all); strings.Join(got, ",") != strings.Join(canceled, ",") {
		t.Errorf("?status=canceled&limit=1: got %v; want %v", got, canceled)
	}
	all, _ = listAllRuns(t, a, ws, agentA+"&status=queued")
	if got := runIDs(all); strings.Join(got, ",") != ofA[0]+","+ofA[2]+","+ofA[4] {
		t.Errorf("?%s&status=queued: got %v; want [%s %s %s]", agentA, got, ofA[0], ofA[2], ofA[4])
	}
	for _, q := range []string{"agent=nope", "agent=ECHO", "agent=nope&status=queued&limit=1"} {
		status, _, data := a.do(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?"+q, ws.APIKey, nil, nil)
		if status != 200 || string(data) != `{"next_cursor":null,"runs":[]}`+"\n" {
			t.Errorf("?%s: got %d %s; want 200 and no run", q, status, data)
		}
	}
	// The other workspace has an "echo" too: its runs are not ours, nor ours its.
	other := a.createWorkspace(t)
	a.createRun(t, other, "echo", "other")
	all, _ = listAllRuns(t, a, ws, "agent=echo")
	if len(all) != len(ofEcho) {
		t.Errorf("?agent=echo with another workspace's echo run: got %d runs; want %d", len(all), len(ofEcho))
	}
	// A cursor from a filtered page continues that filter.
	var page runList
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?"+agentA+"&limit=4", ws.APIKey, nil, 200, &page)
	if page.NextCursor == nil {
		t.Fatalf("?%s&limit=4: got no next_cursor; want one", agentA)
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?agent=echo&cursor="+*page.NextCursor, ws.APIKey, nil, 200, &page)
	if got := runIDs(page.Runs); len(got) != 1 || got[0] != ofEcho[len(ofEcho)-1] {
		t.Errorf("?agent=echo after a b/c's fourth run: got %v; want only echo's oldest %s", got, ofEcho[len(ofEcho)-1])
	}
}

// TestSchedulingRetryPolicy: an agent's retry policy at creation and PATCH (defaults,
// edges, replaced whole), shown in its JSON with throttled_until null, and 422s that name
// the problem for values out of range, max_ms below base_ms, unknown keys and non-objects.
func TestSchedulingRetryPolicy(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"

	for _, c := range []struct {
		body string
		want retryPolicy
	}{
		{`{"name":"r0","kind":"echo"}`, retryPolicy{500, 30000}},
		{`{"name":"r1","kind":"echo","retry":null}`, retryPolicy{500, 30000}},
		{`{"name":"r2","kind":"echo","retry":{}}`, retryPolicy{500, 30000}},
		{`{"name":"r3","kind":"echo","retry":{"base_ms":1,"max_ms":1}}`, retryPolicy{1, 1}},
		{`{"name":"r4","kind":"echo","retry":{"base_ms":3600000,"max_ms":86400000}}`, retryPolicy{3600000, 86400000}},
		{`{"name":"r5","kind":"echo","retry":{"base_ms":20}}`, retryPolicy{20, 30000}},
		{`{"name":"r6","kind":"echo","retry":{"max_ms":500}}`, retryPolicy{500, 500}},
	} {
		ag := mustAgent(t, a, "POST", agents, ws.APIKey, c.body, 201)
		got := mustAgent(t, a, "GET", agents+"/"+ag.Name, ws.APIKey, nil, 200)
		for name, g := range map[string]agentJSON{"POST": ag, "GET": got} {
			if g.Retry == nil || *g.Retry != c.want || g.ThrottledUntil != nil {
				t.Errorf("%s after create %s: got retry %+v, throttled_until %v; want %+v, null", name, c.body, g.Retry, g.ThrottledUntil, c.want)
			}
		}
	}

	path := agents + "/r0"
	for _, c := range []struct {
		body string
		want retryPolicy
	}{
		{`{"retry":{"base_ms":100,"max_ms":800}}`, retryPolicy{100, 800}},
		{`{"paused":true}`, retryPolicy{100, 800}},
		{`{}`, retryPolicy{100, 800}},
		{`{"retry":{"max_ms":900}}`, retryPolicy{500, 900}}, // replaced whole: base_ms takes its default
		{`{"retry":null}`, retryPolicy{500, 30000}},
	} {
		ag := mustAgent(t, a, "PATCH", path, ws.APIKey, c.body, 200)
		got := mustAgent(t, a, "GET", path, ws.APIKey, nil, 200)
		for name, g := range map[string]agentJSON{"PATCH": ag, "GET": got} {
			if g.Retry == nil || *g.Retry != c.want {
				t.Errorf("%s after PATCH %s: got retry %+v; want %+v", name, c.body, g.Retry, c.want)
			}
		}
	}

	for _, c := range []struct{ body, says string }{
		{`{"retry":{"base_ms":0}}`, "retry.base_ms must be from 1 to 3600000"},
		{`{"retry":{"base_ms":3600001,"max_ms":86400000}}`, "retry.base_ms must be from 1 to 3600000"},
		{`{"retry":{"base_ms":-5}}`, "retry.base_ms must be from 1 to 3600000"},
		{`{"retry":{"base_ms":1000,"max_ms":999}}`, "retry.max_ms must be from base_ms (1000) to 86400000"},
		{`{"retry":{"base_ms":60000}}`, "retry.max_ms must be from base_ms (60000) to 86400000"},
		{`{"retry":{"max_ms":86400001}}`, "retry.max_ms must be from base_ms (500) to 86400000"},
		{`{"retry":{"base_ms":1.5}}`, "retry.base_ms must be an integer"},
		{`{"retry":{"max_ms":"1000"}}`, "retry.max_ms must be an integer"},
		{`{"retry":{"base_ms":100,"jitter":true}}`, `retry: unknown key "jitter"`},
		{`{"retry":{"BASE_MS":100}}`, `retry: unknown key "BASE_MS"`},
		{`{"retry":500}`, "retry must be an object"},
		{`{"retry":[1,2]}`, "retry must be an object"},
	} {
		for _, req := range []struct{ method, path, body string }{
			{"POST", agents, `{"name":"bad","kind":"echo",` + c.body[1:]},
			{"PATCH", path, c.body},
		} {
			status, hdr, data := a.do(t, req.method, req.path, ws.APIKey, nil, req.body)
			checkAPIError(t, req.method+" "+req.body, status, hdr, data, 422, "invalid")
			var e struct{ Error struct{ Message string } }
			json.Unmarshal(data, &e)
			if !strings.Contains(e.Error.Message, c.says) {
				t.Errorf("%s %s: got message %q; want one saying %q", req.method, req.body, e.Error.Message, c.says)
			}
		}
	}
	if got := mustAgent(t, a, "GET", path, ws.APIKey, nil, 200); *got.Retry != defaultRetry {
		t.Errorf("after refused PATCHes: got retry %+v; want it unchanged, %+v", *got.Retry, defaultRetry)
	}
	status, _, _ := a.do(t, "GET", agents+"/bad", ws.APIKey, nil, nil)
	if status != 404 {
		t.Errorf("GET the agent whose creation was refused: got %d; want 404", status)
	}
}
