package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Runs that wait (SPEC "Runs that wait"): through HTTP, with agentapp processes and webhook
// agents served by httptest.

// stepCall is one webhook delivery as a waiting agent received it.
type stepCall struct {
	WebhookID string          `json:"-"`
	At        time.Time       `json:"-"`
	RunID     string          `json:"run_id"`
	Attempt   int             `json:"attempt"`
	Step      int             `json:"step"`
	State     json.RawMessage `json:"state"`
	Resume    json.RawMessage `json:"resume"`
	Input     json.RawMessage `json:"input"`
	EventsURL string          `json:"events_url"`
	Token     string          `json:"events_token"`
	ctx       context.Context // the request's: done when the caller hangs up
}

// stepAgent is a webhook agent whose answer depends on the step: answer(call) gives the
// status and body. Every delivery is recorded.
type stepAgent struct {
	mu     sync.Mutex
	calls  []stepCall
	answer func(c stepCall) (int, string)
}

func (s *stepAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var c stepCall
	if err := json.Unmarshal(body, &c); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	c.WebhookID, c.At, c.ctx = r.Header.Get("webhook-id"), time.Now(), r.Context()
	s.mu.Lock()
	s.calls = append(s.calls, c)
	s.mu.Unlock()
	status, out := s.answer(c)
	w.WriteHeader(status)
	io.WriteString(w, out)
}

// of returns the deliveries of run id, in order.
func (s *stepAgent) of(id string) []stepCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []stepCall
	for _, c := range s.calls {
		if c.RunID == id {
			out = append(out, c)
		}
	}
	return out
}

// jsonEq reports whether two JSON texts are the same value.
func jsonEq(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return fmt.Sprint(x) == fmt.Sprint(y)
}

// TestWaitThreeStepAgent: an agent fans out to three children and waits for them, waits
// for an approval signal, then finishes. The process is SIGKILLed between its steps (while
// it waits) and during one (its last step's first attempt): another takes over each time.
// The state arrives intact at every step, each (run, step, attempt) is delivered once, and
// the run shows what it waits for, in its JSON, stats and /metrics.
func TestWaitThreeStepAgent(t *testing.T) {
	t.Parallel()
	hanging := make(chan struct{}, 1) // step 3's first attempt has arrived, and hangs
	leaf := &stepAgent{answer: func(c stepCall) (int, string) {
		var n int
		json.Unmarshal(c.Input, &n)
		return 200, fmt.Sprintf(`{"doubled":%d}`, 2*n)
	}}
	planner := &stepAgent{answer: func(c stepCall) (int, string) {
		switch c.Step {
		case 1:
			return 202, `{"state":{"plan":["a","b","c"],"deep":{"k":[1,2,3]}},
				"wait":{"runs":[{"agent":"leaf","input":1},{"agent":"leaf","input":2,"priority":3},{"agent":"leaf","input":3,"max_attempts":1}]}}`
		case 2:
			return 202, `{"state":{"plan":["a","b","c"],"deep":{"k":[1,2,3]},"children":"done"},"wait":{"signal":"approve"}}`
		default:
			if c.Attempt == 1 {
				hanging <- struct{}{}
				<-c.ctx.Done() // until its process is killed
				return 500, `"gone"`
			}
			return 200, `{"finished":true}`
		}
	}}
	mux := http.NewServeMux()
	mux.Handle("/leaf", leaf)
	mux.Handle("/planner", planner)
	srv := newWebhookServer(t, mux)

	dsn := testDB(t)
	// A short lease: the attempt of a killed process is recovered soon.
	env := testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_LEASE_MS": "2000"})
	p := startProc(t, env)
	a := p.app()
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "leaf", "webhook", map[string]any{"url": srv.URL + "/leaf"})
	a.createAgent(t, ws, "planner", "webhook", map[string]any{"url": srv.URL + "/planner"})
	run := a.createRun(t, ws, "planner", map[string]any{"task": "x"})
	if run.Step != 1 || run.State != nil && string(run.State) != "null" || run.WaitingFor != nil && string(run.WaitingFor) != "null" {
		t.Errorf("a new run: got step %d state %s waiting_for %s; want step 1, null, null", run.Step, run.State, run.WaitingFor)
	}

	// Step 1 waits for its children, which run and end; the parent is queued once more
	// and its step 2 waits for the signal.
	got := a.waitRunStatus(t, ws, run.ID, "waiting", 30*time.Second)
	if got.Step < 2 {
		t.Fatalf("after step 1: got step %d; want 2 or more", got.Step)
	}
	eventually(t, 30*time.Second, "the planner's step 2 waits for the signal", func() bool {
		got = a.getRun(t, ws, run.ID)
		return got.Status == statusWaiting && got.Step == 3
	})
	if !jsonEq(got.WaitingFor, []byte(`{"signal":"approve"}`)) || !jsonEq(got.State, []byte(`{"plan":["a","b","c"],"deep":{"k":[1,2,3]},"children":"done"}`)) {
		t.Errorf("waiting for the signal: got waiting_for %s state %s; want the signal and step 2's state", got.WaitingFor, got.State)
	}
	var children struct {
		Runs []runRecord `json:"runs"`
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?parent="+run.ID, ws.APIKey, nil, 200, &children)
	if len(children.Runs) != 3 {
		t.Fatalf("?parent=: got %d runs; want the 3 children", len(children.Runs))
	}
	for _, c := range children.Runs {
		if c.ParentID == nil || *c.ParentID != run.ID || c.Status != statusSucceeded || c.TraceID != run.TraceID {
			t.Errorf("child %s: got parent %v status %s trace %s; want parent %s, succeeded, the parent's trace %s", c.ID, c.ParentID, c.Status, c.TraceID, run.ID, run.TraceID)
		}
	}
	if st := a.stats(t, ws); st.Waiting != 1 || st.Succeeded != 3 {
		t.Errorf("stats while the planner waits: got %+v; want waiting 1, succeeded 3", st)
	}
	if n := a.metric(t, `agentapp_runs{status="waiting"}`); n != 1 {
		t.Errorf(`/metrics agentapp_runs{status="waiting"}: got %v; want 1`, n)
	}

	// The process dies while the run waits; another one receives the signal.
	p.signal(t, syscall.SIGKILL)
	p.wait(t, 10*time.Second)
	env["LISTEN_ADDR"] = freeAddr(t)
	p = startProc(t, env)
	a = p.app()
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/signal", ws.APIKey,
		map[string]any{"name": "approve", "data": map[string]any{"by": "ops", "note": "ok"}}, 200, &got)
	if got.Status != statusQueued {
		t.Errorf("signal: got the run %s; want it queued again", got.Status)
	}
	// The process dies during step 3; another recovers the lease and delivers attempt 2.
	select {
	case <-hanging:
	case <-time.After(30 * time.Second):
		t.Fatal("step 3: not delivered 30 s after the signal")
	}
	p.signal(t, syscall.SIGKILL)
	p.wait(t, 10*time.Second)
	env["LISTEN_ADDR"] = freeAddr(t)
	a = startProc(t, env).app()
	done := a.waitRunStatus(t, ws, run.ID, "succeeded", 30*time.Second)
	if !jsonEq(done.Output, []byte(`{"finished":true}`)) || done.Step != 3 || done.WaitingFor != nil && string(done.WaitingFor) != "null" {
		t.Errorf("the finished run: got output %s step %d waiting_for %s; want the output of step 3, no wait", done.Output, done.Step, done.WaitingFor)
	}

	calls := planner.of(run.ID)
	if len(calls) != 4 {
		t.Fatalf("deliveries to the planner: got %d; want 4 (one per step, and step 3's attempt 2)", len(calls))
	}
	seen := map[string]bool{}
	for i, c := range calls {
		if want := [][2]int{{1, 1}, {2, 1}, {3, 1}, {3, 2}}[i]; c.Step != want[0] || c.Attempt != want[1] {
			t.Errorf("delivery %d: got step %d attempt %d; want step %d attempt %d", i+1, c.Step, c.Attempt, want[0], want[1])
		}
		if want := fmt.Sprintf("%s_%d_%d", run.ID, c.Step, c.Attempt); c.WebhookID != want || seen[c.WebhookID] {
			t.Errorf("delivery %d: got webhook-id %q; want %q, once", i+1, c.WebhookID, want)
		}
		seen[c.WebhookID] = true
	}
	if !jsonEq(calls[0].State, []byte(`null`)) || !jsonEq(calls[0].Resume, []byte(`null`)) {
		t.Errorf("step 1: got state %s resume %s; want null, null", calls[0].State, calls[0].Resume)
	}
	if !jsonEq(calls[1].State, []byte(`{"plan":["a","b","c"],"deep":{"k":[1,2,3]}}`)) {
		t.Errorf("step 2: got state %s; want step 1's state", calls[1].State)
	}
	var resume struct {
		Runs []struct {
			ID, Agent, Status string
			Output            json.RawMessage
			Error             *string
		} `json:"runs"`
	}
	if err := json.Unmarshal(calls[1].Resume, &resume); err != nil || len(resume.Runs) != 3 {
		t.Fatalf("step 2's resume: got %s; want the 3 children", calls[1].Resume)
	}
	for i, c := range resume.Runs {
		if c.Agent != "leaf" || c.Status != "succeeded" || !jsonEq(c.Output, []byte(fmt.Sprintf(`{"doubled":%d}`, 2*(i+1)))) || c.Error != nil {
			t.Errorf("step 2's resume.runs[%d]: got %+v; want the child asked %d-th, succeeded with doubled %d", i, c, i+1, 2*(i+1))
		}
	}
	for _, c := range calls[2:] {
		if !jsonEq(c.Resume, []byte(`{"signal":{"name":"approve","data":{"by":"ops","note":"ok"}}}`)) ||
			!jsonEq(c.State, []byte(`{"plan":["a","b","c"],"deep":{"k":[1,2,3]},"children":"done"}`)) {
			t.Errorf("step 3 attempt %d: got state %s resume %s; want step 2's state and the signal with its data", c.Attempt, c.State, c.Resume)
		}
	}
	if len(done.Errors) == 0 || !strings.Contains(string(done.Errors), "lease expired") {
		t.Errorf("the finished run's errors: got %s; want step 3's attempt 1 recovered (lease expired)", done.Errors)
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/signal", ws.APIKey, map[string]any{"name": "approve"}, 409, nil)
}

// TestWaitTimersPrompt: a sleep, and a signal's timeout, fall due within 100 ms even when
// the poll interval is long (the idle worker sleeps until the earliest wake_at), and the
// next step is told which met the wait. Step 2's attempt 1 posts progress events with its
// own token; step 1's attempt 1's token is refused then (attempts count per step).
func TestWaitTimersPrompt(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	tokens := map[string]string{} // run → step 1's events token
	posted := map[string][2]int{} // run → statuses of step 2's posts: its own token, step 1's
	agent := &stepAgent{answer: func(c stepCall) (int, string) {
		var in struct{ Wait string }
		json.Unmarshal(c.Input, &in)
		if c.Step == 1 {
			mu.Lock()
			tokens[c.RunID] = c.Token
			mu.Unlock()
			return 202, fmt.Sprintf(`{"state":%d,"wait":%s}`, c.Step, in.Wait)
		}
		mu.Lock()
		old := tokens[c.RunID]
		mu.Unlock()
		own, _, _, _ := send(testClient, "POST", c.EventsURL, c.Token, nil, map[string]any{"type": "step", "data": 2})
		stale, _, _, _ := send(testClient, "POST", c.EventsURL, old, nil, map[string]any{"type": "step", "data": 1})
		mu.Lock()
		posted[c.RunID] = [2]int{own, stale}
		mu.Unlock()
		return 200, `"done"`
	}}
	srv := newWebhookServer(t, agent)
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "10000"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "timers", "webhook", map[string]any{"url": srv.URL})
	for _, tc := range []struct{ wait, resume string }{
		{`{"sleep_ms":700}`, `{"slept":true}`},
		{`{"signal":"never","timeout_ms":700}`, `{"timeout":true}`},
	} {
		run := a.createRun(t, ws, "timers", map[string]any{"wait": tc.wait})
		a.waitRunStatus(t, ws, run.ID, "waiting", 20*time.Second)
		var wakeAt time.Time
		if err := db.QueryRow(`SELECT wake_at FROM runs WHERE id = $1`, run.ID).Scan(&wakeAt); err != nil {
			t.Fatalf("wake_at of the waiting run: %v", err)
		}
		done := a.waitRunStatus(t, ws, run.ID, "succeeded", 20*time.Second)
		if late := done.StartedAt.Sub(wakeAt); late < 0 || late > 100*time.Millisecond {
			t.Errorf("wait %s: step 2 started %v after wake_at; want within 100 ms", tc.wait, late)
		}
		calls := agent.of(run.ID)
		if len(calls) != 2 || !jsonEq(calls[1].Resume, []byte(tc.resume)) || !jsonEq(calls[1].State, []byte("1")) {
			t.Errorf("wait %s: got deliveries %+v; want 2, the second with state 1 and resume %s", tc.wait, calls, tc.resume)
		}
		mu.Lock()
		got := posted[run.ID]
		mu.Unlock()
		if got != [2]int{http.StatusAccepted, http.StatusConflict} {
			t.Errorf("events posted at step 2, attempt 1: got %d with its token, %d with step 1's; want 202, 409", got[0], got[1])
		}
	}
}

// TestWaitBadAnswers: a 202 whose body is not exactly a wait fails the attempt, saying why;
// a child naming an unknown agent fails it too, with no child made.
func TestWaitBadAnswers(t *testing.T) {
	t.Parallel()
	agent := &stepAgent{answer: func(c stepCall) (int, string) {
		var body string
		json.Unmarshal(c.Input, &body)
		return 202, body
	}}
	srv := newWebhookServer(t, agent)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "bad", "webhook", map[string]any{"url": srv.URL})
	for _, tc := range []struct{ body, why string }{
		{`{"state":1}`, `"wait" is required`},
		{`{"wait":{"sleep_ms":5}}`, `"state" is required`},
		{`{"state":1,"wait":{"sleep_ms":5},"more":1}`, `unknown field "more"`},
		{`{"state":1,"state":2,"wait":{"sleep_ms":5}}`, `"state" given twice`},
		{`{"state":1,"wait":{"sleep_ms":0}}`, `wait.sleep_ms must be from 1 to 31536000000`},
		{`{"state":1,"wait":{"sleep_ms":5,"signal":"a"}}`, `exactly one of`},
		{`{"state":1,"wait":{}}`, `exactly one of`},
		{`{"state":1,"wait":{"signal":"Approve"}}`, `wait.signal must be 1 to 64 characters`},
		{`{"state":1,"wait":{"timeout_ms":5}}`, `timeout_ms goes only with wait.signal`},
		{`{"state":1,"wait":{"runs":[]}}`, `wait.runs must hold 1 to 100 runs`},
		{`{"state":1,"wait":{"runs":[{"agent":"echo","delay_ms":1}]}}`, `wait.runs[0].run_at and delay_ms are not a child run's fields`},
		{`{"state":1,"wait":{"runs":[{"agent":"echo","priority":10}]}}`, `wait.runs[0].priority must be from 0 to 9`},
		{`{"state":1,"wait":{"runs":[{"agent":"echo"},{"agent":"nobody"}]}}`, `unknown agent "nobody"`},
		{`not json`, `webhook response is not JSON`},
	} {
		var run runRecord
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "bad", "input": tc.body, "max_attempts": 1}, 201, &run)
		run = a.waitRunStatus(t, ws, run.ID, "failed", 20*time.Second)
		if run.Error == nil || !strings.Contains(*run.Error, tc.why) {
			t.Errorf("202 %s: got error %v; want it to say %q", tc.body, run.Error, tc.why)
		}
		var children struct {
			Runs []runRecord `json:"runs"`
		}
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?parent="+run.ID, ws.APIKey, nil, 200, &children)
		if len(children.Runs) != 0 {
			t.Errorf("202 %s: got %d children; want none", tc.body, len(children.Runs))
		}
	}
}

// TestWaitStepLimit: a run at step 1000 that asks for another step fails, saying so, at
// once: its attempts left are not spent asking again.
func TestWaitStepLimit(t *testing.T) {
	t.Parallel()
	srv := newWebhookServer(t, &stepAgent{answer: func(stepCall) (int, string) { return 202, `{"state":1,"wait":{"sleep_ms":1}}` }})
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "forever", "webhook", map[string]any{"url": srv.URL})
	var run runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "forever", "max_attempts": 3, "delay_ms": 500}, 201, &run)
	// Its 999 earlier steps, as far as the run can tell.
	sqlExec(t, db)(`UPDATE runs SET step = 1000 WHERE id = $1`, run.ID)
	run = a.waitRunStatus(t, ws, run.ID, "failed", 20*time.Second)
	if run.Error == nil || !strings.Contains(*run.Error, "step limit") || run.Step != 1000 || run.Attempt != 1 ||
		run.StartedAt == nil || run.FinishedAt == nil {
		t.Errorf("a 202 at step 1000: got step %d attempt %d error %v started %v finished %v; want failed at step 1000, attempt 1 of 3, saying step limit, with both times",
			run.Step, run.Attempt, run.Error, run.StartedAt, run.FinishedAt)
	}
}

// TestWaitRetryResumes: a run that failed at step 2 and is retried is delivered step 2
// again, with its state and resume.
func TestWaitRetryResumes(t *testing.T) {
	t.Parallel()
	var fail sync.Once
	agent := &stepAgent{}
	agent.answer = func(c stepCall) (int, string) {
		if c.Step == 1 {
			return 202, `{"state":{"kept":[1,"two"]},"wait":{"sleep_ms":1}}`
		}
		failed := false
		fail.Do(func() { failed = true })
		if failed {
			return 500, `"down"`
		}
		return 200, `"ok"`
	}
	srv := newWebhookServer(t, agent)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "flaky", "webhook", map[string]any{"url": srv.URL})
	var run runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "flaky", "max_attempts": 1}, 201, &run)
	failed := a.waitRunStatus(t, ws, run.ID, "failed", 20*time.Second)
	if failed.Step != 2 || failed.Attempt != 1 {
		t.Errorf("failed at step 2: got step %d attempt %d; want step 2 attempt 1", failed.Step, failed.Attempt)
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/retry", ws.APIKey, nil, 200, nil)
	a.waitRunStatus(t, ws, run.ID, "succeeded", 20*time.Second)
	calls := agent.of(run.ID)
	if len(calls) != 3 {
		t.Fatalf("deliveries: got %d; want 3 (step 1, step 2 failed, step 2 retried)", len(calls))
	}
	if c := calls[2]; c.Step != 2 || c.Attempt != 2 || !jsonEq(c.State, []byte(`{"kept":[1,"two"]}`)) || !jsonEq(c.Resume, []byte(`{"slept":true}`)) ||
		c.WebhookID != run.ID+"_2_2" {
		t.Errorf("the retried delivery: got step %d attempt %d state %s resume %s id %s; want step 2 attempt 2 with the state, the resume and id %s_2_2",
			c.Step, c.Attempt, c.State, c.Resume, c.WebhookID, run.ID)
	}
}

// TestWaitCancelCascade: cancel of a waiting run cancels it at once, and every run of its
// tree that is not final with it: a running child where it executes, a grandchild that
// waits, its own child.
func TestWaitCancelCascade(t *testing.T) {
	t.Parallel()
	tree := &stepAgent{}
	tree.answer = func(c stepCall) (int, string) {
		var in string
		json.Unmarshal(c.Input, &in)
		switch in {
		case "root":
			return 202, `{"state":null,"wait":{"runs":[{"agent":"tree","input":"middle"},{"agent":"tree","input":"hang"}]}}`
		case "middle":
			return 202, `{"state":null,"wait":{"runs":[{"agent":"tree","input":"leaf"}]}}`
		case "leaf":
			return 202, `{"state":null,"wait":{"signal":"go"}}`
		}
		select { // "hang": canceled while it runs, which ends the request
		case <-c.ctx.Done():
		case <-time.After(30 * time.Second):
		}
		return 200, `null`
	}
	srv := newWebhookServer(t, tree)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "tree", "webhook", map[string]any{"url": srv.URL, "timeout_ms": 60000})
	root := a.createRun(t, ws, "tree", "root")
	var all []runRecord
	eventually(t, 20*time.Second, "the tree of four runs is made, the leaf waiting and the hanging child running", func() bool {
		var page struct {
			Runs []runRecord `json:"runs"`
		}
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?agent=tree", ws.APIKey, nil, 200, &page)
		all = page.Runs
		waiting, running := 0, 0
		for _, r := range all {
			switch r.Status {
			case statusWaiting:
				waiting++
			case statusRunning:
				running++
			}
		}
		return len(all) == 4 && waiting == 3 && running == 1
	})
	var canceled runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+root.ID+"/cancel", ws.APIKey, nil, 200, &canceled)
	if canceled.Status != statusCanceled || canceled.WaitingFor != nil && string(canceled.WaitingFor) != "null" {
		t.Errorf("cancel of the waiting root: got %s waiting_for %s; want canceled at once, no wait", canceled.Status, canceled.WaitingFor)
	}
	for _, r := range all {
		got := a.waitRunStatus(t, ws, r.ID, "canceled", 20*time.Second)
		if r.ID != root.ID && (got.Error == nil || !strings.Contains(*got.Error, "canceled")) {
			t.Errorf("descendant %s: got error %v; want it canceled", r.ID, got.Error)
		}
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+root.ID+"/cancel", ws.APIKey, nil, 409, nil)
}

// TestWaitFanInOnce: when the last two children of a parent end at the same moment in two
// transactions, the parent is resumed, once, with both children final in its resume;
// repeated, so that the two writes overlap in every order.
func TestWaitFanInOnce(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ctx := context.Background()
	ws := seedWorkspace(t, st)
	exec := sqlExec(t, db)
	for i := range 40 {
		var parent string
		if err := db.QueryRow(`INSERT INTO runs (workspace_id, agent_id, status, step, waiting_for)
			SELECT workspace_id, id, 'waiting', 2, '{"runs":[{"agent":"echo"},{"agent":"echo"}]}' FROM agents WHERE workspace_id = $1
			RETURNING id`, ws.ID).Scan(&parent); err != nil {
			t.Fatal(err)
		}
		// Two children, running in two workers, each at its attempt 1.
		var kids []string
		for _, w := range []string{"worker-1", "worker-2"} {
			var id string
			if err := db.QueryRow(`INSERT INTO runs (workspace_id, agent_id, status, attempt, worker_id, lease_expires_at,
				parent_id, parent_step) SELECT workspace_id, id, 'running', 1, $2, now() + interval '1 minute', $3, 2
				FROM agents WHERE workspace_id = $1 RETURNING id`, ws.ID, w, parent).Scan(&id); err != nil {
				t.Fatal(err)
			}
			kids = append(kids, id)
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		for k, w := range []string{"worker-1", "worker-2"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				out := outcome{attemptRef: attemptRef{kids[k], 1, 1}, End: endSucceeded, Output: json.RawMessage(fmt.Sprint(k))}
				if k == 1 {
					out.End, out.Message = endCanceled, "" // a child may end in any final status
				}
				if got, err := st.finish(ctx, w, []outcome{out}); err != nil || len(got) != 1 {
					t.Errorf("round %d: %s's finish: got %v, %v; want written", i, w, got, err)
				}
			}()
		}
		close(start)
		wg.Wait()
		var status string
		var resume []byte
		if err := db.QueryRow(`SELECT status, resume FROM runs WHERE id = $1`, parent).Scan(&status, &resume); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf(`{"runs":[{"id":%q,"agent":"echo","status":"succeeded","output":0,"error":null},`+
			`{"id":%q,"agent":"echo","status":"canceled","output":null,"error":"canceled by request"}]}`, kids[0], kids[1])
		if status != "queued" || !jsonEq(resume, []byte(want)) {
			t.Fatalf("round %d: the parent after its last two children ended together: got %s, resume %s; want queued once, resume %s", i, status, resume, want)
		}
		exec(`DELETE FROM runs WHERE id = $1`, parent)
	}
}

// TestWaitPruneWholeTrees: retention deletes a run only with its whole tree, once every run
// in it is final and older than the retention: not a tree with a recent or open
// descendant, and never a child alone.
func TestWaitPruneWholeTrees(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	st := &store{db: db}
	ws := seedWorkspace(t, st)
	// insert adds a run of the echo agent: old and final unless status says otherwise.
	insert := func(parent any, status string, age string) string {
		t.Helper()
		var id string
		if err := db.QueryRow(`INSERT INTO runs (workspace_id, agent_id, status, finished_at, parent_id, parent_step)
			SELECT workspace_id, id, $2, CASE WHEN $2 IN ('succeeded', 'failed', 'canceled') THEN now() - $3::interval END,
			       $4::uuid, CASE WHEN $4::uuid IS NOT NULL THEN 2 END
			FROM agents WHERE workspace_id = $1 RETURNING id`, ws.ID, status, age, parent).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return id
	}
	old := insert(nil, "succeeded", "3 days") // a whole old tree of three generations
	oldChild := insert(old, "succeeded", "3 days")
	oldGrandchild := insert(oldChild, "failed", "3 days")
	recent := insert(nil, "succeeded", "3 days") // a grandchild finished an hour ago
	recentChild := insert(recent, "succeeded", "3 days")
	insert(recentChild, "succeeded", "1 hour")
	open := insert(nil, "waiting", "0") // a waiting parent with an old final child
	openChild := insert(open, "succeeded", "3 days")
	n, err := st.prune(context.Background(), 24*time.Hour, 100)
	if err != nil || n != 1 {
		t.Fatalf("prune: got %d, %v; want 1 tree deleted", n, err)
	}
	for id, want := range map[string]bool{old: false, oldChild: false, oldGrandchild: false, recent: true, recentChild: true, open: true, openChild: true} {
		var there bool
		if err := db.QueryRow(`SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1)`, id).Scan(&there); err != nil {
			t.Fatal(err)
		}
		if there != want {
			t.Errorf("run %s after prune: got present %v; want %v", id, there, want)
		}
	}
}

// TestWaitConsoleApprove: a waiting run's console page says what it waits for and, for a
// signal, offers a form (with the session's CSRF token) that sends it with JSON data: the
// operator's approve button. The runs list says it too.
func TestWaitConsoleApprove(t *testing.T) {
	t.Parallel()
	agent := &stepAgent{answer: func(c stepCall) (int, string) {
		if c.Step == 1 {
			return 202, `{"state":{"draft":"send the refund"},"wait":{"signal":"approve"}}`
		}
		return 200, `"sent"`
	}}
	srv := newWebhookServer(t, agent)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "refund", "webhook", map[string]any{"url": srv.URL})
	run := a.createRun(t, ws, "refund", nil)
	a.waitRunStatus(t, ws, run.ID, "waiting", 20*time.Second)

	b := newBrowser(a)
	b.signIn(t, ws.APIKey)
	p := b.mustGet(t, "/ui/runs/"+run.ID)
	for _, want := range []string{"Waiting for", "&#34;signal&#34;: &#34;approve&#34;", `action="/ui/runs/` + run.ID + `/signal"`,
		`name="name" value="approve"`, "Send signal approve", "send the refund", "step 2"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("the waiting run's page: got no %q; want it in:\n%s", want, p.body)
		}
	}
	if list := b.mustGet(t, "/ui/runs?status=waiting"); !strings.Contains(list.body, "waits for signal approve") {
		t.Errorf("runs ?status=waiting: got no %q; want it in:\n%s", "waits for signal approve", list.body)
	}
	if ov := b.mustGet(t, "/ui/"); !strings.Contains(ov.body, `<dt>waiting</dt><dd>1</dd>`) {
		t.Errorf("the overview: got no waiting figure of 1; want it in:\n%s", ov.body)
	}
	csrf := p.csrf(t)
	if got := b.post(t, "/ui/runs/"+run.ID+"/signal", "", url.Values{"name": {"approve"}}); got.status != http.StatusForbidden {
		t.Errorf("the signal form without its CSRF token: got %d; want 403", got.status)
	}
	got := b.post(t, "/ui/runs/"+run.ID+"/signal", csrf, url.Values{"name": {"approve"}, "data": {`{"approved_by": "ops"}`}})
	if got.status != http.StatusSeeOther || !strings.HasPrefix(got.location, "/ui/runs/"+run.ID+"?flash=signaled") {
		t.Fatalf("the signal form: got %d to %q; want 303 back to the run with the signaled flash", got.status, got.location)
	}
	a.waitRunStatus(t, ws, run.ID, "succeeded", 20*time.Second)
	calls := agent.of(run.ID)
	if len(calls) != 2 || !jsonEq(calls[1].Resume, []byte(`{"signal":{"name":"approve","data":{"approved_by":"ops"}}}`)) {
		t.Errorf("after the console's signal: got deliveries %+v; want step 2 resumed with the form's data", calls)
	}
	if again := b.post(t, "/ui/runs/"+run.ID+"/signal", csrf, url.Values{"name": {"approve"}}); again.status != http.StatusConflict {
		t.Errorf("the signal form on a run no longer waiting: got %d; want 409", again.status)
	}
}

// TestWaitStreams: both streams show a run's waiting, with the wait in the waiting frame,
// then (once signaled) its end; the run's stream ends only once the run is final, not
// while it waits.
func TestWaitStreams(t *testing.T) {
	t.Parallel()
	srv := newWebhookServer(t, &stepAgent{answer: func(c stepCall) (int, string) {
		if c.Step == 1 {
			return 202, `{"state":1,"wait":{"signal":"go"}}`
		}
		return 200, `"done"`
	}})
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "waits", "webhook", map[string]any{"url": srv.URL})
	wsStream := evStream(t, a.base+"/v1/workspaces/"+ws.ID+"/events", ws.APIKey, nil)
	var run runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "waits", "delay_ms": 1000}, 201, &run)
	runStream := evStream(t, a.base+"/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/events", ws.APIKey, nil)
	// statuses reads a stream's frames of the run (event kind) until its status is last.
	statuses := func(ch <-chan sseFrame, kind, last string) []string {
		t.Helper()
		var got []string
		for len(got) == 0 || got[len(got)-1] != last {
			f, ok := evNext(t, ch, 30*time.Second)
			if !ok {
				t.Fatalf("%s stream: ended after statuses %v; want up to %s", kind, got, last)
			}
			var r runRecord
			if f.Event != kind || json.Unmarshal([]byte(f.Data), &r) != nil || r.ID != run.ID {
				continue
			}
			got = append(got, string(r.Status))
			if r.Status == statusWaiting && (r.Step != 2 || !jsonEq(r.WaitingFor, []byte(`{"signal":"go"}`))) {
				t.Errorf("%s stream: got a waiting frame at step %d waiting for %s; want step 2, the signal", kind, r.Step, r.WaitingFor)
			}
		}
		return got
	}
	// A stream reads the run when told of a change, so quick changes may show as one (the
	// queued between a signal and the claim): what must show is the wait, and the end.
	statuses(runStream, "status", "waiting") // fails the test unless a waiting frame comes
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/signal", ws.APIKey, map[string]any{"name": "go"}, 200, nil)
	if got := statuses(runStream, "status", "succeeded"); slices.Contains(got, "waiting") {
		t.Errorf("run stream after the signal: got %v; want no wait again, then succeeded", got)
	}
	evExpectEnd(t, runStream, 10*time.Second)
	if got := statuses(wsStream, "run", "succeeded"); !slices.Contains(got, "waiting") {
		t.Errorf("workspace stream: got %v; want waiting among them before succeeded", got)
	}
}

// TestWaitKeysAndSupersede: a child run carries the concurrency_key and cost its wait
// gave it; a waiting run superseded by a newer run of its key (on_key_conflict
// cancel_running) is canceled at once, as its own cancel would, with its tree.
func TestWaitKeysAndSupersede(t *testing.T) {
	t.Parallel()
	agent := &stepAgent{}
	agent.answer = func(c stepCall) (int, string) {
		var in string
		json.Unmarshal(c.Input, &in)
		if in == "parent" {
			return 202, `{"state":null,"wait":{"runs":[{"agent":"tree","input":"child","concurrency_key":"sub","cost":7}]}}`
		}
		<-c.ctx.Done() // the child hangs until it is canceled
		return 200, `null`
	}
	srv := newWebhookServer(t, agent)
	// The newer run hangs too: the drain at the end does not wait for it long.
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "500"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "tree", "webhook", map[string]any{"url": srv.URL, "timeout_ms": 60000})
	a.mustDo(t, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/tree", ws.APIKey, map[string]any{"on_key_conflict": "cancel_running"}, 200, nil)
	var parent runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "tree", "input": "parent", "concurrency_key": "k"}, 201, &parent)
	a.waitRunStatus(t, ws, parent.ID, "waiting", 20*time.Second)
	var children struct {
		Runs []runRecord `json:"runs"`
	}
	eventually(t, 20*time.Second, "the child runs", func() bool {
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?parent="+parent.ID, ws.APIKey, nil, 200, &children)
		return len(children.Runs) == 1 && children.Runs[0].Status == statusRunning
	})
	child := children.Runs[0]
	if child.ConcurrencyKey == nil || *child.ConcurrencyKey != "sub" || child.Cost != 7 {
		t.Errorf("the child: got concurrency_key %v cost %d; want sub, 7 as its wait asked", child.ConcurrencyKey, child.Cost)
	}
	var newer runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "tree", "input": "later", "concurrency_key": "k"}, 201, &newer)
	got := a.getRun(t, ws, parent.ID)
	if got.Status != statusCanceled || got.Error == nil || *got.Error != "superseded by run "+newer.ID || got.WaitingFor != nil && string(got.WaitingFor) != "null" {
		t.Errorf("the superseded waiting run: got %s error %v waiting_for %s; want canceled at once, superseded by run %s, no wait", got.Status, got.Error, got.WaitingFor, newer.ID)
	}
	done := a.waitRunStatus(t, ws, child.ID, "canceled", 20*time.Second)
	if done.Error == nil || *done.Error != "canceled with its parent run "+parent.ID {
		t.Errorf("the superseded run's running child: got error %v; want canceled with its parent run %s", done.Error, parent.ID)
	}
}

// TestWaitApproveInChromium: the operator's approve button in a real headless Chromium.
// A run waits for the signal "approve"; signed in with the workspace key, the browser
// opens the run's page, which says what the run waits for, writes JSON data into the
// signal form and sends it; the page comes back saying the signal was sent, and the run's
// next step is delivered with that data and finishes.
func TestWaitApproveInChromium(t *testing.T) {
	c := startChromium(t)
	agent := &stepAgent{answer: func(sc stepCall) (int, string) {
		if sc.Step == 1 {
			return 202, `{"state":{"draft":"refund order 1042"},"wait":{"signal":"approve"}}`
		}
		return 200, `{"refunded":true}`
	}}
	srv := newWebhookServer(t, agent)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "refund", "webhook", map[string]any{"url": srv.URL})
	run := a.createRun(t, ws, "refund", nil)
	a.waitRunStatus(t, ws, run.ID, "waiting", 20*time.Second)

	c.navigate(a.base + "/ui/")
	key, _ := json.Marshal(ws.APIKey)
	c.submit("sign in", `document.querySelector("#token").value = `+string(key)+`; document.querySelector("form.sign-in").submit()`)
	c.navigate(a.base + "/ui/runs/" + run.ID)
	for _, want := range []string{"Waiting for", `"signal": "approve"`, "refund order 1042", "Send signal approve"} {
		if text := c.text(); !strings.Contains(text, want) {
			t.Errorf("the waiting run's page: got no %q; want it in:\n%s", want, text)
		}
	}
	c.submit("approve", `document.querySelector("form.signal textarea[name=data]").value = '{"approved_by": "ops"}';
		document.querySelector("form.signal button").click()`)
	if got := c.path(); !strings.HasPrefix(got, "/ui/runs/"+run.ID) {
		t.Errorf("after the approve button: got page %s; want the run's", got)
	}
	r := a.waitRunStatus(t, ws, run.ID, "succeeded", 20*time.Second)
	calls := agent.of(run.ID)
	if len(calls) != 2 || !jsonEq(calls[1].Resume, []byte(`{"signal":{"name":"approve","data":{"approved_by":"ops"}}}`)) ||
		!jsonEq(calls[1].State, []byte(`{"draft":"refund order 1042"}`)) || !jsonEq(r.Output, []byte(`{"refunded":true}`)) {
		t.Errorf("after the browser's approve: got deliveries %+v and output %s; want step 2 resumed with the form's data and state, then the output", calls, r.Output)
	}
}

// TestWaitChildrenLimits: a wait's child runs are held to their agents' limits as a
// create's runs are. A child costing more than its agent's rate limit, or whose key is
// busy under on_key_conflict reject, fails the attempt saying so, and no child is made; a
// child whose key has runs under cancel_running supersedes them.
func TestWaitChildrenLimits(t *testing.T) {
	t.Parallel()
	boss := &stepAgent{answer: func(c stepCall) (int, string) {
		var in string
		json.Unmarshal(c.Input, &in)
		switch {
		case c.Step > 1:
			return 200, `null`
		case in == "costly":
			return 202, `{"state":null,"wait":{"runs":[{"agent":"once","cost":6}]}}`
		case in == "busy":
			return 202, `{"state":null,"wait":{"runs":[{"agent":"once","concurrency_key":"k"}]}}`
		case in == "newest":
			return 202, `{"state":null,"wait":{"runs":[{"agent":"newest","concurrency_key":"n"}]}}`
		}
		return 200, `null`
	}}
	srv := newWebhookServer(t, boss)
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"
	a.createAgent(t, ws, "boss", "webhook", map[string]any{"url": srv.URL})
	mustAgent(t, a, "POST", agents, ws.APIKey, map[string]any{"name": "once", "kind": "echo", "on_key_conflict": "reject",
		"rate_limit": map[string]any{"limit": 5, "period_ms": 1000}}, 201)
	mustAgent(t, a, "POST", agents, ws.APIKey, map[string]any{"name": "newest", "kind": "echo", "on_key_conflict": "cancel_running"}, 201)
	create := func(body map[string]any) runRecord {
		t.Helper()
		var r runRecord
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, body, 201, &r)
		return r
	}
	holder := create(map[string]any{"agent": "once", "concurrency_key": "k", "delay_ms": 3600000})
	older := create(map[string]any{"agent": "newest", "concurrency_key": "n", "delay_ms": 3600000})

	for _, c := range []struct{ input, says string }{
		{"costly", `wait.runs[0].cost 6 is over agent "once"'s rate_limit.limit (5)`},
		{"busy", `wait.runs[0].concurrency_key "k" of agent "once" is busy: run ` + holder.ID + ` holds it`},
	} {
		r := create(map[string]any{"agent": "boss", "input": c.input, "max_attempts": 1})
		r = a.waitRunStatus(t, ws, r.ID, "failed", 20*time.Second)
		if r.Error == nil || !strings.Contains(*r.Error, c.says) {
			t.Errorf("a wait for a child its agent refuses (%s): got error %v; want one saying %q", c.input, r.Error, c.says)
		}
		var children struct{ Runs []runRecord }
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?parent="+r.ID, ws.APIKey, nil, 200, &children)
		if len(children.Runs) != 0 {
			t.Errorf("a refused wait (%s): got %d children; want none", c.input, len(children.Runs))
		}
	}

	parent := create(map[string]any{"agent": "boss", "input": "newest"})
	a.waitRunStatus(t, ws, parent.ID, "succeeded", 20*time.Second)
	var children struct{ Runs []runRecord }
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?parent="+parent.ID, ws.APIKey, nil, 200, &children)
	if len(children.Runs) != 1 {
		t.Fatalf("the wait for a child under cancel_running: got %d children; want 1", len(children.Runs))
	}
	got := a.getRun(t, ws, older.ID)
	if want := "superseded by run " + children.Runs[0].ID; got.Status != statusCanceled || got.Error == nil || *got.Error != want {
		t.Errorf("the older run of the child's key: got %s, error %v; want canceled, %q", got.Status, got.Error, want)
	}
}
