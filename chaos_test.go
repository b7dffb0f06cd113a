package main

// The chaos test (issue "Hardened by default"): three agentapp processes on a PostgreSQL
// cluster of the test's own; webhook agents that delay, fail, hang past their timeout,
// post progress events or answer output PostgreSQL refuses; a steps agent whose runs wait
// (issue "Runs that wait": a sleep, a signal with or without a timeout, or child runs of
// the other agents) at step 1, maybe again at step 2, and finish by step 3; a controller
// that SIGKILLs and restarts a process every few seconds, SIGTERMs another, and once stops
// and restarts PostgreSQL; clients that enqueue, signal, cancel, retry and pause all
// along. After quiescence (the runs still waiting for a signal are sent it) it checks the
// invariants against the webhook server's own log and the tables, logs its figures and
// fails on any violation. CHAOS_DURATION sets how long the chaos lasts (`make chaos`: 5
// minutes; `make test`: the default).

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Chaos parameters.
const (
	chaosDefaultDuration = 60 * time.Second // the version inside make test; make chaos sets CHAOS_DURATION=5m
	chaosProcs           = 3
	chaosConcurrency     = "16"   // RUN_WORKER_CONCURRENCY: enough slots that the capped agents are what limits
	chaosLeaseMS         = "2000" // RUN_WORKER_LEASE_MS: short, so a killed process's runs are recovered within the test
	chaosShutdownMS      = "500"  // RUN_WORKER_SHUTDOWN_TIMEOUT_MS: short, so a SIGTERM requeues hanging runs
	chaosHookTimeoutMS   = 2000   // the agents' timeout_ms: past the slowest honest answer (delay, events), short of a hang
	chaosMaxDelay        = 500 * time.Millisecond
	chaosHangMax         = 30 * time.Second // a hanging answer ends only when its connection dies, or after this
	chaosCap             = 2                // max_concurrency of the capped agents
	chaosDeadConnGrace   = 100 * time.Millisecond
	chaosFaultEvery      = 3 * time.Second  // the controller's pace
	chaosOutage          = 4 * time.Second  // PostgreSQL down this long: past the lease, so leases expire meanwhile
	chaosLeaseGrace      = 10 * time.Second // an expired lease not recovered after this (PostgreSQL up) is a violation
	chaosSamplePause     = 250 * time.Millisecond
	chaosClientCount     = 3
	chaosClientPause     = 80 * time.Millisecond  // at most between one client's requests
	chaosQuiesceTimeout  = 3 * time.Minute        // for the backlog left at the end to drain, on a loaded machine; plus the chaos's length
	chaosExitTimeout     = 60 * time.Second       // a SIGTERMed process exits within its drain; generous under load
	chaosShowViolations  = 100                    // violations reported one by one; the rest are counted
	chaosSleepMax        = 300 * time.Millisecond // a steps run's sleep_ms, at most
	chaosSignalTimeout   = 2 * time.Second        // a signal wait's timeout_ms (half have one), at most
	chaosSignal          = "go"                   // the signal the steps agent waits for
	chaosMaxChildren     = 3                      // child runs of one wait, at most
)

// chaosChildAgents are the agents a steps run's children run as: one step each.
var chaosChildAgents = []string{"hook", "capped", "pausy"}

// Webhook faults, as the webhook server decided them for a delivery ("" answers honestly).
const (
	chaosFail      = "fail"       // HTTP 500
	chaosHang      = "hang"       // no answer until the connection dies
	chaosBadOutput = "bad-output" // JSON that jsonb refuses
)

// chaosBadOutputs are 2xx answers PostgreSQL cannot store: a NUL character, and a number
// past numeric's 131,072 digits before the point.
var chaosBadOutputs = []string{`{"text":"nul \u0000 here"}`, `{"n":1e131072}`}

// chaosDuration reads CHAOS_DURATION (a Go duration), chaosDefaultDuration when unset.
func chaosDuration(t *testing.T) time.Duration {
	t.Helper()
	s := os.Getenv("CHAOS_DURATION")
	if s == "" {
		return chaosDefaultDuration
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("CHAOS_DURATION: got %q; want a positive Go duration such as 60s or 5m", s)
	}
	return d
}

// chaosViolations collects the invariant violations any goroutine finds.
type chaosViolations struct {
	mu   sync.Mutex
	list []string
}

// add records one violation.
func (v *chaosViolations) add(format string, args ...any) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.list = append(v.list, fmt.Sprintf(format, args...))
}

// all returns the violations so far.
func (v *chaosViolations) all() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]string(nil), v.list...)
}

// chaosDelivery is one request the webhook server received: one delivery of one attempt
// of one step.
type chaosDelivery struct {
	ws, agent, run string
	step, attempt  int
	state, resume  json.RawMessage // what it carried: the previous step's state, and what met its wait
	fault          string          // "" (answered honestly: 200 with answer, or 202 with a wait) or one of the faults
	answer         json.RawMessage // what an honest delivery answered with 200
	start, end     time.Time       // end: answered, or its connection seen dead (see chaosHook.ServeHTTP)
	ctx            context.Context // the request's: done once its connection dies

	// An honest 202 of the steps agent: the wait and the state it answered.
	wait     waitKind // "" for a 200
	timeout  bool     // a signal wait with a timeout_ms
	children int      // a runs wait's child runs
	newState json.RawMessage
}

// chaosEvent is a progress event the server acknowledged (202).
type chaosEvent struct {
	run     string
	attempt int
	seq     int64
}

// chaosHook is the webhook server's side: it picks each delivery's fault and logs it.
type chaosHook struct {
	events *http.Client
	bad    *chaosViolations

	mu          sync.Mutex
	deliveries  []*chaosDelivery
	open        map[*chaosDelivery]bool // in flight: arrived, and end not set yet
	eventStatus map[int]int             // event posts by the status answered (0: no answer)
	eventsAcked []chaosEvent
}

// ServeHTTP answers one delivery. It reads the whole body first: only then does the HTTP
// server watch the connection, so that a request whose connection dies (a killed
// process, a timeout, a cancel) ends at once. A delivery ends when its handler returns,
// or earlier when an arrival finds its connection dead: that way an end and the arrival
// it made room for are never ordered by which handler the scheduler ran first (see
// awaitDeadConns for the connection whose death is not seen yet).
func (h *chaosHook) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body struct {
		RunID       string          `json:"run_id"`
		WorkspaceID string          `json:"workspace_id"`
		Agent       string          `json:"agent"`
		Attempt     int             `json:"attempt"`
		EventsURL   string          `json:"events_url"`
		EventsToken string          `json:"events_token"`
		Step        int             `json:"step"`
		State       json.RawMessage `json:"state"`
		Resume      json.RawMessage `json:"resume"`
	}
	data, err := io.ReadAll(r.Body)
	if err == nil {
		err = json.Unmarshal(data, &body)
	}
	if err != nil || body.RunID == "" || r.Header.Get("Idempotency-Key") != body.RunID || body.Attempt < 1 || body.Step < 1 {
		if r.Context().Err() == nil { // a body cut short by a killed process is no fault of the sender's
			h.bad.add("webhook: got body %q (err %v) with Idempotency-Key %q; want a run with its id as the key, attempt and step >= 1",
				data, err, r.Header.Get("Idempotency-Key"))
		}
		http.Error(w, "bad delivery", http.StatusBadRequest)
		return
	}
	d := &chaosDelivery{ws: body.WorkspaceID, agent: body.Agent, run: body.RunID, step: body.Step, attempt: body.Attempt,
		state: body.State, resume: body.Resume, ctx: r.Context()}
	switch p := rand.Float64(); {
	case p < 0.10:
		d.fault = chaosFail
	case p < 0.15:
		d.fault = chaosHang
	case p < 0.18:
		d.fault = chaosBadOutput
	}
	h.mu.Lock()
	if d.agent == "capped" {
		h.awaitDeadConns(d)
	}
	for o := range h.open {
		if o.ctx.Err() != nil {
			o.end = time.Now()
			delete(h.open, o)
		}
	}
	d.start = time.Now()
	h.deliveries = append(h.deliveries, d)
	h.open[d] = true
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		if h.open[d] {
			d.end = time.Now()
			delete(h.open, d)
		}
		h.mu.Unlock()
	}()

	ctx := r.Context()
	if d.fault == chaosHang {
		select {
		case <-ctx.Done():
		case <-time.After(chaosHangMax):
			http.Error(w, "hung", http.StatusGatewayTimeout)
		}
		return
	}
	delay := rand.N(chaosMaxDelay + 1)
	events := 0
	if body.EventsURL != "" { // progress events, once the server offers them
		events = rand.N(4)
	}
	for i := range events + 1 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay / time.Duration(events+1)):
		}
		if i < events {
			h.postEvent(body.EventsURL, body.EventsToken, body.RunID, body.Attempt, i)
		}
	}
	switch d.fault {
	case chaosFail:
		http.Error(w, "chaos: failing on purpose", http.StatusInternalServerError)
	case chaosBadOutput:
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, chaosBadOutputs[rand.N(len(chaosBadOutputs))])
	default:
		status, answer := http.StatusOK, fmt.Sprintf(`{"run":%q,"step":%d,"attempt":%d,"nonce":%q}`,
			body.RunID, body.Step, body.Attempt, randomHex(8))
		h.mu.Lock()
		if d.agent == "steps" {
			status, answer = chaosStepAnswer(d, answer)
		}
		if status == http.StatusOK {
			d.answer = json.RawMessage(answer)
		}
		h.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, answer)
	}
}

// chaosStepAnswer is the steps agent's honest answer to delivery d, output being its 200:
// at step 1 a 202 with a wait (a sleep, a signal with or without a timeout, or one to
// chaosMaxChildren child runs of the other agents), at step 2 a wait or the end, at step
// 3 the end. It records the wait in d; h.mu is held.
func chaosStepAnswer(d *chaosDelivery, output string) (int, string) {
	if d.step >= 3 || d.step == 2 && rand.N(2) == 0 {
		return http.StatusOK, output
	}
	d.newState = json.RawMessage(fmt.Sprintf(`{"run":%q,"step":%d,"attempt":%d,"nonce":%q}`, d.run, d.step, d.attempt, randomHex(8)))
	var wait map[string]any
	switch rand.N(3) {
	case 0:
		d.wait = waitSleep
		wait = map[string]any{"sleep_ms": 1 + rand.N(chaosSleepMax.Milliseconds())}
	case 1:
		d.wait = waitSignal
		wait = map[string]any{"signal": chaosSignal}
		if d.timeout = rand.N(2) == 0; d.timeout {
			wait["timeout_ms"] = 1 + rand.N(chaosSignalTimeout.Milliseconds())
		}
	default:
		d.wait, d.children = waitRuns, 1+rand.N(chaosMaxChildren)
		runs := make([]map[string]any, d.children)
		for i := range runs {
			runs[i] = map[string]any{"agent": chaosChildAgents[rand.N(len(chaosChildAgents))],
				"input": map[string]any{"parent": d.run, "i": i}, "max_attempts": 1 + rand.N(3)}
		}
		wait = map[string]any{"runs": runs}
	}
	answer, _ := json.Marshal(map[string]any{"state": d.newState, "wait": wait})
	return http.StatusAccepted, string(answer)
}

// awaitDeadConns is called, with h.mu held, when a delivery of a capped agent arrives
// while as many of its agent's deliveries as the cap are open: it waits up to
// chaosDeadConnGrace for one of them to be seen dead. A worker closes an attempt's
// connection before it writes the outcome that frees the slot, but the HTTP server sees
// the close only once that connection's goroutine has run, which on a loaded machine
// can come after the next delivery it made room for. An open delivery whose connection
// is alive is never waited out: a real excess still counts.
func (h *chaosHook) awaitDeadConns(d *chaosDelivery) {
	deadline := time.Now().Add(chaosDeadConnGrace)
	for {
		open, dead := 0, false
		for o := range h.open {
			if o.ws == d.ws && o.agent == d.agent {
				open++
				dead = dead || o.ctx.Err() != nil
			}
		}
		if open < chaosCap || dead || time.Now().After(deadline) {
			return
		}
		h.mu.Unlock()
		time.Sleep(time.Millisecond)
		h.mu.Lock()
	}
}

// postEvent posts one progress event for the attempt and records the answer.
func (h *chaosHook) postEvent(url, token, run string, attempt, step int) {
	status, _, data, err := send(h.events, "POST", url, token, nil, map[string]any{"type": "progress", "data": map[string]any{"step": step}})
	var ack struct {
		Seq int64 `json:"seq"`
	}
	if err != nil {
		status = 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.eventStatus[status]++
	if status == http.StatusAccepted && json.Unmarshal(data, &ack) == nil {
		h.eventsAcked = append(h.eventsAcked, chaosEvent{run: run, attempt: attempt, seq: ack.Seq})
	}
}

// chaosKeyed is a create request sent with an Idempotency-Key, kept for later repeats.
type chaosKeyed struct {
	ws   testWorkspace
	key  string
	body map[string]any
}

// chaosClients is what the clients share: the runs the API acknowledged and what they
// asked for.
type chaosClients struct {
	bases []string // one per process slot; a slot may be down for a moment
	ws    []testWorkspace
	http  *http.Client
	bad   *chaosViolations

	mu          sync.Mutex
	acked       map[string]testWorkspace // runs answered 201 or 200, with their workspace
	ids         []string                 // the same, to pick cancel and retry targets from
	multi       []string                 // those of the steps agent
	keys        map[string]string        // workspace id + " " + key → the run id answered
	keyed       []chaosKeyed
	cancelAcked map[string]bool            // runs a cancel was answered 200 for
	retryAcked  map[string]bool            // runs a retry was answered 200 for
	retrySent   map[string]bool            // runs a retry was sent for, whatever the answer
	signalsSent map[string]map[string]bool // run → the nonces of the signals sent to it
	signaled    map[string][]string        // run → the nonces of its signals answered 200
	counts      map[string]int             // figures: requests by operation and answer
}

// do sends one request to a random process slot and counts its answer; status 0 is no
// answer (the process was down or killed meanwhile).
func (c *chaosClients) do(op, method, path, token string, hdr map[string]string, body any) (int, []byte) {
	base := c.bases[rand.N(len(c.bases))]
	status, _, data, err := send(c.http, method, base+path, token, hdr, body)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.counts["requests"]++
	switch {
	case err != nil:
		c.counts["no answer"]++
		return 0, nil
	case status == http.StatusServiceUnavailable:
		c.counts["503"]++
	case status >= 500:
		c.bad.add("client %s %s: got %d %s; want no 5xx but 503", method, path, status, data)
	}
	c.counts[fmt.Sprintf("%s %d", op, status)]++
	return status, data
}

// ack records runs of ws the API acknowledged.
func (c *chaosClients) ack(ws testWorkspace, runs ...runRecord) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range runs {
		if _, ok := c.acked[r.ID]; !ok {
			c.acked[r.ID] = ws
			c.ids = append(c.ids, r.ID)
			if r.Agent == "steps" {
				c.multi = append(c.multi, r.ID)
			}
		}
	}
}

// pick returns the API path and key of a random acknowledged run (a third of the time one
// of the steps agent, if any), ok false when there is none yet.
func (c *chaosClients) pick() (id, path, key string, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case len(c.multi) > 0 && rand.N(3) == 0:
		id = c.multi[rand.N(len(c.multi))]
	case len(c.ids) > 0:
		id = c.ids[rand.N(len(c.ids))]
	default:
		return "", "", "", false
	}
	ws := c.acked[id]
	return id, "/v1/workspaces/" + ws.ID + "/runs/" + id, ws.APIKey, true
}

// signal sends the steps agent's signal to run id (at runPath, with key; op names the
// request in the figures), with data that names the run and the signal, and records it.
// A 409 (the run does not wait for it, or no longer) is as good an answer as a 200.
func (c *chaosClients) signal(op, id, runPath, key string) {
	nonce := randomHex(4)
	c.mu.Lock()
	if c.signalsSent[id] == nil {
		c.signalsSent[id] = map[string]bool{}
	}
	c.signalsSent[id][nonce] = true
	c.mu.Unlock()
	body := map[string]any{"name": chaosSignal, "data": map[string]any{"run": id, "nonce": nonce}}
	status, data := c.do(op, "POST", runPath+"/signal", key, nil, body)
	switch status {
	case http.StatusOK:
		c.mu.Lock()
		c.signaled[id] = append(c.signaled[id], nonce)
		c.mu.Unlock()
	case 0, http.StatusConflict, http.StatusServiceUnavailable:
	default:
		c.bad.add("signal %s: got %d %s; want 200 or 409", id, status, data)
	}
}

// signalWaiting lists the steps runs of ws that wait and sends its signal to about half
// of those that wait for one.
func (c *chaosClients) signalWaiting(ws testWorkspace) {
	path := "/v1/workspaces/" + ws.ID + "/runs"
	status, data := c.do("list waiting", "GET", path+"?status=waiting&agent=steps&limit=20", ws.APIKey, nil, nil)
	var page struct {
		Runs []runRecord `json:"runs"`
	}
	if status != http.StatusOK || json.Unmarshal(data, &page) != nil {
		return
	}
	for _, r := range page.Runs {
		var w struct {
			Signal string `json:"signal"`
		}
		if r.Status != statusWaiting || r.WorkspaceID != ws.ID {
			c.bad.add("list ?status=waiting&agent=steps of %s: got run %s %s of workspace %s; want only its waiting runs",
				ws.ID, r.ID, r.Status, r.WorkspaceID)
		}
		if json.Unmarshal(r.WaitingFor, &w) == nil && w.Signal != "" && rand.N(2) == 0 {
			c.signal("signal", r.ID, path+"/"+r.ID, ws.APIKey)
		}
	}
}

// newRunBody is a random create request: one of the workspace's agents (mostly the
// uncapped one), an input that numbers it, 1 … 4 attempts.
func newRunBody(n int) map[string]any {
	agent := "hook"
	switch p := rand.Float64(); {
	case p < 0.2:
		agent = "capped"
	case p < 0.4:
		agent = "pausy"
	case p < 0.55:
		agent = "steps"
	}
	return map[string]any{"agent": agent, "input": map[string]any{"n": n}, "max_attempts": 1 + rand.N(4)}
}

// createKeyed sends a create request with an Idempotency-Key; every answer with a run
// must name the same run.
func (c *chaosClients) createKeyed(k chaosKeyed) {
	status, data := c.do("create with key", "POST", "/v1/workspaces/"+k.ws.ID+"/runs", k.ws.APIKey,
		map[string]string{"Idempotency-Key": k.key}, k.body)
	if status != http.StatusCreated && status != http.StatusOK {
		return
	}
	var r runRecord
	if err := json.Unmarshal(data, &r); err != nil || r.ID == "" {
		c.bad.add("create with key %q: got %d %s; want a run", k.key, status, data)
		return
	}
	c.ack(k.ws, r)
	c.mu.Lock()
	defer c.mu.Unlock()
	if first, ok := c.keys[k.ws.ID+" "+k.key]; !ok {
		c.keys[k.ws.ID+" "+k.key] = r.ID
	} else if first != r.ID {
		c.bad.add("Idempotency-Key %q: got run %s (status %d); want %s, answered before", k.key, r.ID, status, first)
	}
}

// client uses the API until ctx ends: creates (single, keyed with repeats, batches),
// signals, cancels, retries, pauses and resumes.
func (c *chaosClients) client(ctx context.Context, id int) {
	for n := 0; ctx.Err() == nil; n++ {
		time.Sleep(rand.N(chaosClientPause))
		ws := c.ws[rand.N(len(c.ws))]
		path := "/v1/workspaces/" + ws.ID
		switch p := rand.Float64(); {
		case p < 0.30:
			status, data := c.do("create", "POST", path+"/runs", ws.APIKey, nil, newRunBody(n))
			var r runRecord
			if status == http.StatusCreated && json.Unmarshal(data, &r) == nil {
				c.ack(ws, r)
			}
		case p < 0.45: // a keyed create, repeated at once as a client that missed the answer would
			k := chaosKeyed{ws: ws, key: fmt.Sprintf("c%d-%d-%s", id, n, randomHex(4)), body: newRunBody(n)}
			c.mu.Lock()
			c.keyed = append(c.keyed, k)
			c.mu.Unlock()
			for range 1 + rand.N(3) {
				c.createKeyed(k)
			}
		case p < 0.52: // a repeat of an older keyed create, across whatever happened since
			c.mu.Lock()
			var k chaosKeyed
			if len(c.keyed) > 0 {
				k = c.keyed[rand.N(len(c.keyed))]
			}
			c.mu.Unlock()
			if k.key != "" {
				c.createKeyed(k)
			}
		case p < 0.62:
			runs := make([]map[string]any, 2+rand.N(9))
			for i := range runs {
				runs[i] = newRunBody(n)
			}
			status, data := c.do("batch", "POST", path+"/runs/batch", ws.APIKey, nil, map[string]any{"runs": runs})
			var created struct{ Runs []runRecord }
			if status == http.StatusCreated && json.Unmarshal(data, &created) == nil {
				for _, r := range created.Runs {
					c.ack(ws, r)
				}
			}
		case p < 0.70:
			c.signalWaiting(ws)
		case p < 0.72: // a signal to any run: a 409 unless it waits for one
			if run, runPath, key, ok := c.pick(); ok {
				c.signal("signal any", run, runPath, key)
			}
		case p < 0.82:
			if run, runPath, key, ok := c.pick(); ok {
				if status, _ := c.do("cancel", "POST", runPath+"/cancel", key, nil, nil); status == http.StatusOK {
					c.mu.Lock()
					c.cancelAcked[run] = true
					c.mu.Unlock()
				}
			}
		case p < 0.93:
			if run, runPath, key, ok := c.pick(); ok {
				body := map[string]any{"attempts": 1 + rand.N(2)}
				c.mu.Lock()
				c.retrySent[run] = true
				c.mu.Unlock()
				if status, _ := c.do("retry", "POST", runPath+"/retry", key, nil, body); status == http.StatusOK {
					c.mu.Lock()
					c.retryAcked[run] = true
					c.mu.Unlock()
				}
			}
		case p < 0.98:
			c.do("pause", "PATCH", path+"/agents/pausy", ws.APIKey, nil, map[string]any{"paused": rand.N(2) == 0})
		default:
			c.do("bulk cancel", "POST", path+"/runs/cancel", ws.APIKey, nil, map[string]any{"agent": "pausy", "status": "queued"})
		}
	}
}

// chaosSampler watches the tables while the chaos lasts: no run running without a lease,
// none whose lease expired long ago while PostgreSQL was up, no capped agent over its
// cap, no child run left open long after its parent became final (a running child of a
// canceled parent ends once its process learns of the cancel, or its lease expires).
type chaosSampler struct {
	db  *sql.DB
	bad *chaosViolations
	// upSince is when PostgreSQL last came back (unix nanoseconds); 0 while it is down.
	upSince atomic.Int64

	samples    atomic.Int64
	maxRunning atomic.Int64 // most running runs of one capped agent seen in a sample
}

// run samples until ctx ends.
func (s *chaosSampler) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	for ctx.Err() == nil {
		time.Sleep(chaosSamplePause)
		up := s.upSince.Load()
		if up == 0 {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var unleased, stale int
		var staleIDs []byte
		err := s.db.QueryRowContext(qctx, `SELECT count(*) FILTER (WHERE lease_expires_at IS NULL OR worker_id IS NULL),
			count(*) FILTER (WHERE lease_expires_at < now() - $1 * interval '1 millisecond'),
			coalesce(json_agg(id) FILTER (WHERE lease_expires_at < now() - $1 * interval '1 millisecond'), '[]')
			FROM runs WHERE status = 'running'`, chaosLeaseGrace.Milliseconds()).Scan(&unleased, &stale, &staleIDs)
		var capped, orphans []byte
		if err == nil {
			err = s.db.QueryRowContext(qctx, `SELECT coalesce(json_agg(x), '[]') FROM (
				SELECT a.workspace_id, a.name, a.max_concurrency, count(*) AS running
				FROM agents a JOIN runs r ON r.agent_id = a.id AND r.status = 'running'
				WHERE a.max_concurrency IS NOT NULL GROUP BY 1, 2, 3) x`).Scan(&capped)
		}
		if err == nil {
			err = s.db.QueryRowContext(qctx, `SELECT coalesce(json_agg(json_build_object('child', c.id, 'status', c.status,
				'parent', p.id, 'parent_status', p.status)), '[]')
				FROM runs c JOIN runs p ON p.id = c.parent_id
				WHERE c.parent_id IS NOT NULL AND c.status IN ('queued', 'running', 'waiting')
				  AND p.status IN ('succeeded', 'failed', 'canceled') AND p.finished_at < now() - $1 * interval '1 millisecond'`,
				chaosLeaseGrace.Milliseconds()).Scan(&orphans)
		}
		cancel()
		if err != nil { // PostgreSQL going down, or the machine too loaded: the next sample
			continue
		}
		s.samples.Add(1)
		if unleased > 0 {
			s.bad.add("sample: got %d running runs without a lease or worker; want none", unleased)
		}
		// A lease expired while PostgreSQL was down is recovered only once it is back.
		if stale > 0 && time.Since(time.Unix(0, up)) > chaosLeaseGrace {
			s.bad.add("sample: got running runs %s whose lease expired over %v ago; want them recovered", staleIDs, chaosLeaseGrace)
		}
		if string(orphans) != "[]" && time.Since(time.Unix(0, up)) > chaosLeaseGrace {
			s.bad.add("sample: got child runs not final %v after their parent became final: %s; want every child of a final parent final",
				chaosLeaseGrace, orphans)
		}
		var agents []struct {
			WorkspaceID    string `json:"workspace_id"`
			Name           string `json:"name"`
			MaxConcurrency int64  `json:"max_concurrency"`
			Running        int64  `json:"running"`
		}
		json.Unmarshal(capped, &agents)
		for _, a := range agents {
			if a.Running > s.maxRunning.Load() {
				s.maxRunning.Store(a.Running)
			}
			if a.Running > a.MaxConcurrency {
				s.bad.add("sample: agent %s/%s has %d runs running; want at most its max_concurrency %d",
					a.WorkspaceID, a.Name, a.Running, a.MaxConcurrency)
			}
		}
	}
}

// chaosRow is a run as the tables hold it after quiescence.
type chaosRow struct {
	ws, agent, status, key string
	attempt, maxAttempts   int
	output                 sql.NullString
	errors                 []runError
	leased, hasWorker      bool
	step                   int
	parent                 string // "" for none
	parentStep             int    // the parent's step that the wait which made it resumes
	seq                    int64
}

// final reports whether the run has ended.
func (r chaosRow) final() bool {
	return r.status == "succeeded" || r.status == "failed" || r.status == "canceled"
}

// chaosRequeuedLine is how a SIGTERMed process logs a run handed back at its drain
// deadline, its attempt refunded.
var chaosRequeuedLine = regexp.MustCompile(`msg="run requeued at shutdown" run=([0-9a-f-]+) attempt=(\d+)`)

// TestChaos: see the top of this file. Every violation is reported, then the figures.
func TestChaos(t *testing.T) {
	t.Parallel()
	duration := chaosDuration(t)
	pg := newPTPostgres(t)
	db := openTestDB(t, pg.dsn())
	bad := &chaosViolations{}

	hook := &chaosHook{events: &http.Client{Timeout: 10 * time.Second}, bad: bad, eventStatus: map[int]int{}, open: map[*chaosDelivery]bool{}}
	hookServer := httptest.NewServer(hook)
	t.Cleanup(hookServer.Close)

	// Three process slots, each restarted on its own address whenever it is stopped.
	envs := make([]map[string]string, chaosProcs)
	procs := make([]*proc, chaosProcs)
	var all []*proc // every process started, for their logs
	bases := make([]string, chaosProcs)
	start := func(i int) {
		procs[i] = startProc(t, envs[i])
		all = append(all, procs[i])
	}
	for i := range envs {
		envs[i] = testEnv(t, pg.dsn(), map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "100",
			"RUN_WORKER_LEASE_MS": chaosLeaseMS, "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": chaosShutdownMS,
			"RUN_WORKER_CONCURRENCY": chaosConcurrency, "LOG_LEVEL": "info"})
		bases[i] = "http://" + envs[i]["LISTEN_ADDR"]
		start(i)
	}
	a := procs[0].app()
	var wss []testWorkspace
	for range 2 {
		ws := a.createWorkspace(t)
		for _, name := range []string{"hook", "capped", "pausy", "steps"} {
			a.createAgent(t, ws, name, "webhook", map[string]any{"url": hookServer.URL + "/" + name, "timeout_ms": chaosHookTimeoutMS})
		}
		a.mustDo(t, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/capped", ws.APIKey, map[string]any{"max_concurrency": chaosCap}, 200, nil)
		wss = append(wss, ws)
	}

	sampler := &chaosSampler{db: db, bad: bad}
	sampler.upSince.Store(time.Now().UnixNano())
	sampleCtx, stopSampling := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go sampler.run(sampleCtx, sampled)
	t.Cleanup(func() { stopSampling(); <-sampled })

	clients := &chaosClients{bases: bases, ws: wss, http: &http.Client{Timeout: 20 * time.Second}, bad: bad,
		acked: map[string]testWorkspace{}, keys: map[string]string{}, cancelAcked: map[string]bool{},
		retryAcked: map[string]bool{}, retrySent: map[string]bool{}, signalsSent: map[string]map[string]bool{},
		signaled: map[string][]string{}, counts: map[string]int{}}
	clientCtx, stopClients := context.WithCancel(context.Background())
	var clientsDone sync.WaitGroup
	for i := range chaosClientCount {
		clientsDone.Add(1)
		go func() {
			defer clientsDone.Done()
			clients.client(clientCtx, i)
		}()
	}
	t.Cleanup(func() { stopClients(); clientsDone.Wait() })

	// The controller, on the test goroutine (it may fail the test): every few seconds it
	// SIGKILLs a process and restarts it; every other time it SIGTERMs another first and
	// restarts that one once it has drained; once, PostgreSQL goes down for a while.
	began := time.Now()
	var kills, terms, outages int
	for tick := 0; time.Since(began) < duration; tick++ {
		time.Sleep(chaosFaultEvery/2 + rand.N(chaosFaultEvery))
		if outages == 0 && time.Since(began) > duration*2/5 {
			sampler.upSince.Store(0)
			pg.stop(t)
			time.Sleep(chaosOutage)
			pg.start(t)
			sampler.upSince.Store(time.Now().UnixNano())
			outages++
			continue
		}
		victim := rand.N(chaosProcs)
		termed := -1
		if tick%2 == 1 {
			termed = (victim + 1 + rand.N(chaosProcs-1)) % chaosProcs
			procs[termed].signal(t, syscall.SIGTERM)
			terms++
		}
		procs[victim].signal(t, syscall.SIGKILL)
		procs[victim].wait(t, chaosExitTimeout)
		kills++
		start(victim)
		if termed >= 0 {
			if code := procs[termed].wait(t, chaosExitTimeout); code != 0 {
				bad.add("SIGTERMed process (pid %d): got exit status %d; want 0", procs[termed].cmd.Process.Pid, code)
			}
			start(termed)
		}
	}
	stopClients()
	clientsDone.Wait()
	chaosTime := time.Since(began)

	// Quiescence: resume the paused agents, send their signal to the runs that wait for
	// one, and let every run end.
	wsByID := map[string]testWorkspace{}
	for _, ws := range wss {
		a.mustDo(t, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/pausy", ws.APIKey, map[string]any{"paused": false}, 200, nil)
		wsByID[ws.ID] = ws
	}
	// The capped agents are given more runs than their cap serves, so what is left grows
	// with the chaos's length.
	quiesce := eventually(t, chaosQuiesceTimeout+duration, "every run to be final", func() bool {
		var open int
		var waiting []byte
		if err := db.QueryRow(`SELECT count(*), coalesce(json_agg(json_build_array(id, workspace_id))
			FILTER (WHERE status = 'waiting' AND waiting_for ? 'signal'), '[]')
			FROM runs WHERE status IN ('queued', 'running', 'waiting')`).Scan(&open, &waiting); err != nil {
			t.Fatalf("count open runs: got %v; want a count", err)
		}
		var signal [][2]string
		if err := json.Unmarshal(waiting, &signal); err != nil {
			t.Fatalf("runs waiting for a signal: got %s (%v); want [[id, workspace]]", waiting, err)
		}
		for _, r := range signal {
			ws := wsByID[r[1]]
			clients.signal("signal at quiescence", r[0], "/v1/workspaces/"+ws.ID+"/runs/"+r[0], ws.APIKey)
		}
		return open == 0
	})
	eventually(t, chaosHangMax+10*time.Second, "the webhook server to have no request in flight", func() bool {
		hook.mu.Lock()
		defer hook.mu.Unlock()
		return len(hook.open) == 0
	})
	stopSampling()
	<-sampled

	rows := chaosReadRows(t, db)
	requeues := map[string]int{} // run + " " + attempt → times requeued at shutdown
	for _, p := range all {
		for _, m := range chaosRequeuedLine.FindAllStringSubmatch(p.log.String(), -1) {
			requeues[m[1]+" "+m[2]]++
		}
	}
	hook.mu.Lock()
	deliveries := append([]*chaosDelivery(nil), hook.deliveries...)
	eventsAcked := append([]chaosEvent(nil), hook.eventsAcked...)
	eventStatus := fmt.Sprint(hook.eventStatus)
	hook.mu.Unlock()
	clients.mu.Lock()
	defer clients.mu.Unlock()

	chaosCheckRuns(bad, rows, clients)
	maxInFlight, redelivered := chaosCheckDeliveries(bad, rows, deliveries, requeues)
	steps := chaosCheckSteps(bad, rows, deliveries, requeues, clients)
	chaosCheckEvents(t, bad, db, eventsAcked)
	for _, ws := range wss {
		got := a.stats(t, ws)
		want := runStats{}
		for _, r := range rows {
			if r.ws != ws.ID {
				continue
			}
			switch runStatus(r.status) {
			case statusQueued:
				want.Queued++
			case statusWaiting:
				want.Waiting++
			case "running":
				want.Running++
			case "succeeded":
				want.Succeeded++
			case "failed":
				want.Failed++
			case "canceled":
				want.Canceled++
			}
		}
		if got != want {
			bad.add("workspace %s stats: got %+v; want count(*) %+v", ws.ID, got, want)
		}
	}

	// A graceful stop of what is left: each drains and exits 0.
	for _, p := range procs {
		p.signal(t, syscall.SIGTERM)
	}
	for _, p := range procs {
		if code := p.wait(t, chaosExitTimeout); code != 0 {
			bad.add("process (pid %d) at the end: got exit status %d after SIGTERM; want 0", p.cmd.Process.Pid, code)
		}
	}

	// The figures.
	byStatus := map[string]int{}
	var recoveries, timeouts, refused, laterAttempts int
	for _, r := range rows {
		byStatus[r.status]++
		laterAttempts += max(r.attempt-1, 0)
		for _, e := range r.errors {
			switch {
			case strings.HasPrefix(e.Message, "lease expired"):
				recoveries++
			case strings.Contains(e.Message, "timed out"):
				timeouts++
			case strings.Contains(e.Message, "refused") || strings.Contains(e.Message, "output"):
				refused++
			}
		}
	}
	faults := map[string]int{}
	for _, d := range deliveries {
		faults[d.fault]++
	}
	requeued := 0
	for _, n := range requeues {
		requeued += n
	}
	t.Logf("chaos %v (then %v to quiesce), %d processes started: %d SIGKILL, %d SIGTERM, %d PostgreSQL restart",
		chaosTime.Round(time.Second), quiesce.Round(time.Second), len(all), kills, terms, outages)
	t.Logf("runs: %d acknowledged, %d in the table %v; %d keyed creates", len(clients.acked), len(rows), byStatus, len(clients.keyed))
	t.Logf("webhook: %d deliveries; faults injected: %d failed (500), %d hung, %d bad output; %d answered honestly",
		len(deliveries), faults[chaosFail], faults[chaosHang], faults[chaosBadOutput], faults[""])
	t.Logf("retries: %d attempts after a run's first, %d API retries; recoveries: %d leases expired; %d runs requeued at shutdown (%d of those attempts delivered again); %d timeouts, %d outputs refused",
		laterAttempts, len(clients.retryAcked), recoveries, requeued, redelivered, timeouts, refused)
	t.Logf("capped agents (max_concurrency %d): at most %d in flight at the webhook, %d running in %d table samples",
		chaosCap, maxInFlight, sampler.maxRunning.Load(), sampler.samples.Load())
	t.Logf("progress events: %d acknowledged; posts by answer %s", len(eventsAcked), eventStatus)
	t.Logf("runs that wait: %d of the steps agent, by the step they ended at %v; waits made %v; steps resumed by %v; "+
		"signals answered 200: %d by the clients, %d at quiescence; %d child runs %v",
		steps.runs, steps.byStep, steps.waits, steps.resumes, clients.counts["signal 200"]+clients.counts["signal any 200"],
		clients.counts["signal at quiescence 200"], steps.children, steps.childStatus)
	t.Logf("client requests: %v", clients.counts)
	list := bad.all()
	for i, v := range list {
		if i == chaosShowViolations {
			t.Errorf("… and %d more violations", len(list)-i)
			break
		}
		t.Errorf("violation: %s", v)
	}
	t.Logf("%d violations", len(list))
}

// chaosReadRows reads every run after quiescence.
func chaosReadRows(t *testing.T, db *sql.DB) map[string]chaosRow {
	t.Helper()
	rs, err := db.Query(`SELECT r.id, r.workspace_id, a.name, r.status, coalesce(r.idempotency_key, ''), r.attempt,
		r.max_attempts, r.output::text, r.errors::text, r.lease_expires_at IS NOT NULL, r.worker_id IS NOT NULL,
		r.step, coalesce(r.parent_id::text, ''), coalesce(r.parent_step, 0), r.seq
		FROM runs r JOIN agents a ON a.id = r.agent_id`)
	if err != nil {
		t.Fatalf("read runs: got %v; want rows", err)
	}
	defer rs.Close()
	rows := map[string]chaosRow{}
	for rs.Next() {
		var id, errs string
		var r chaosRow
		if err := rs.Scan(&id, &r.ws, &r.agent, &r.status, &r.key, &r.attempt, &r.maxAttempts, &r.output, &errs,
			&r.leased, &r.hasWorker, &r.step, &r.parent, &r.parentStep, &r.seq); err != nil {
			t.Fatalf("read runs: got %v; want a row", err)
		}
		if err := json.Unmarshal([]byte(errs), &r.errors); err != nil {
			t.Fatalf("run %s errors: got %s (%v); want a JSON array", id, errs, err)
		}
		rows[id] = r
	}
	if err := rs.Err(); err != nil {
		t.Fatalf("read runs: got %v; want every row", err)
	}
	return rows
}

// chaosCheckRuns checks the tables against what the clients were told: every
// acknowledged run exists and is final, none running or leased, attempts within
// max_attempts, one run per idempotency key, and a run whose cancel was acknowledged
// (and never retried) ends canceled.
func chaosCheckRuns(bad *chaosViolations, rows map[string]chaosRow, c *chaosClients) {
	for id := range c.acked {
		r, ok := rows[id]
		switch {
		case !ok:
			bad.add("run %s: acknowledged, got no row; want it in the table", id)
		case !r.final():
			bad.add("run %s: got status %s after quiescence; want it final", id, r.status)
		}
	}
	byKey := map[string][]string{}
	for id, r := range rows {
		if r.attempt > r.maxAttempts {
			bad.add("run %s: got attempt %d; want at most max_attempts %d", id, r.attempt, r.maxAttempts)
		}
		if r.leased || r.hasWorker {
			bad.add("run %s (%s): got a lease %v and a worker %v; want neither on a final run", id, r.status, r.leased, r.hasWorker)
		}
		if r.status == "succeeded" != r.output.Valid {
			bad.add("run %s (%s): got output %v; want one exactly when succeeded", id, r.status, r.output)
		}
		if r.key != "" {
			byKey[r.ws+" "+r.key] = append(byKey[r.ws+" "+r.key], id)
		}
		if c.cancelAcked[id] && !c.retryAcked[id] && r.status != "canceled" {
			bad.add("run %s: cancel answered 200 and no retry, got status %s; want canceled", id, r.status)
		}
	}
	for k, ids := range byKey {
		if len(ids) != 1 {
			bad.add("idempotency key %q: got runs %v; want one", k, ids)
		}
	}
	for k, id := range c.keys {
		if got := byKey[k]; len(got) != 1 || got[0] != id {
			bad.add("idempotency key %q: got runs %v in the table; want the one answered, %s", k, got, id)
		}
	}
}

// chaosCheckDeliveries checks the webhook server's log against the tables: every
// delivery is of a run in the table, those of its current step within its max_attempts;
// no (run, step, attempt) is delivered twice unless a SIGTERMed process requeued that
// attempt (refunding it, as SPEC says, so its next delivery carries the same number) as
// often; a succeeded run's output is what the webhook answered for its last step's last
// attempt; and no capped agent ever has more requests in flight than its cap. It returns
// the most in flight for one capped agent, and how many attempts were delivered again
// after a requeue at shutdown.
//
// The log line of a requeue names the run and the attempt, not the step: the deliveries
// beyond the first of one attempt number, over all the run's steps, are at most its
// requeues of that number.
//
// In flight means from the request's arrival until it was answered or its connection
// died, or until its lease was recovered, whichever came first. A SIGKILLed process's
// sockets are closed by the kernel and a timed-out, canceled or drained attempt closes
// its connection, so its request stops counting long before its run can be claimed
// again (SPEC: a run whose lease expired counts until it is recovered, and recovery
// waits for the lease). Recovery is the one way a request may outlive its slot: a
// process cut off from PostgreSQL cannot learn that its lease expired and may still wait
// on the webhook while the table has given the run back, and the cap is on the runs the
// table says are running.
func chaosCheckDeliveries(bad *chaosViolations, rows map[string]chaosRow, deliveries []*chaosDelivery, requeues map[string]int) (most, redelivered int) {
	byAttempt := map[string][]*chaosDelivery{}
	type edge struct {
		at    time.Time
		delta int
	}
	edges := map[string][]edge{} // capped agent → arrivals and ends
	for _, d := range deliveries {
		r, ok := rows[d.run]
		if !ok {
			bad.add("webhook: got a delivery of run %s attempt %d; want only runs in the table", d.run, d.attempt)
			continue
		}
		ref := fmt.Sprintf("%s %d %d", d.run, d.step, d.attempt)
		byAttempt[ref] = append(byAttempt[ref], d)
		// An earlier step's attempts are not bounded by today's max_attempts: a retry of a
		// run canceled while it waited sets it from attempt 0.
		if d.step == r.step && d.attempt > r.maxAttempts {
			bad.add("webhook: got run %s step %d attempt %d; want at most its max_attempts %d", d.run, d.step, d.attempt, r.maxAttempts)
		}
		if d.step == r.step && d.attempt > r.attempt && requeues[fmt.Sprintf("%s %d", d.run, d.attempt)] == 0 {
			bad.add("webhook: got run %s step %d attempt %d; want at most the table's attempt %d", d.run, d.step, d.attempt, r.attempt)
		}
		if r.agent != "capped" {
			continue
		}
		end := d.end
		for _, e := range r.errors {
			if e.Attempt == d.attempt && strings.HasPrefix(e.Message, "lease expired") && e.At.Before(end) {
				end = e.At
			}
		}
		edges[r.ws] = append(edges[r.ws], edge{d.start, 1}, edge{end, -1})
	}
	again := map[string][]string{} // run + " " + attempt → the (run, step, attempt) delivered more than once, a time per extra
	for ref, ds := range byAttempt {
		redelivered += len(ds) - 1
		for range len(ds) - 1 {
			k := fmt.Sprintf("%s %d", ds[0].run, ds[0].attempt)
			again[k] = append(again[k], ref)
		}
	}
	for k, refs := range again {
		if len(refs) > requeues[k] {
			sort.Strings(refs)
			bad.add("webhook: got (run, attempt) %s delivered again %d times (run, step, attempt %v), requeued at shutdown %d times; want at most as often as requeued",
				k, len(refs), refs, requeues[k])
		}
	}
	for id, r := range rows {
		if r.status != "succeeded" {
			continue
		}
		ds := byAttempt[fmt.Sprintf("%s %d %d", id, r.step, r.attempt)]
		if len(ds) == 0 {
			bad.add("run %s succeeded on step %d attempt %d: got no delivery of it; want one", id, r.step, r.attempt)
			continue
		}
		last := ds[0]
		for _, d := range ds {
			if d.start.After(last.start) {
				last = d
			}
		}
		var got, want any
		json.Unmarshal([]byte(r.output.String), &got)
		if last.fault != "" || json.Unmarshal(last.answer, &want) != nil || !reflect.DeepEqual(got, want) {
			bad.add("run %s succeeded on step %d attempt %d: got output %s; want the webhook's last answer to it, %s (fault %q, wait %q)",
				id, r.step, r.attempt, r.output.String, last.answer, last.fault, last.wait)
		}
	}
	for ws, es := range edges {
		sort.Slice(es, func(i, j int) bool {
			if es[i].at.Equal(es[j].at) {
				return es[i].delta < es[j].delta // an end at the same instant as an arrival frees the slot first
			}
			return es[i].at.Before(es[j].at)
		})
		n := 0
		for _, e := range es {
			n += e.delta
			most = max(most, n)
			if n > chaosCap && e.delta > 0 {
				bad.add("webhook: agent %s/capped had %d requests in flight at %s; want at most its max_concurrency %d",
					ws, n, e.at.Format(time.RFC3339Nano), chaosCap)
			}
		}
	}
	return most, redelivered
}

// chaosStepFigures are the figures of the runs that wait.
type chaosStepFigures struct {
	runs        int            // runs of the steps agent
	byStep      map[int]int    // those by the step they ended at
	waits       map[string]int // the waits they made, by kind
	resumes     map[string]int // the steps after a first, by the resume their first delivery carried
	children    int            // child runs
	childStatus map[string]int // those by status
}

// chaosEnded is the delivery whose answer ended step k of a run, given the run's
// deliveries by step and attempt: the last to arrive of the step's last attempt (an
// earlier attempt's answer was fenced out, and a delivery followed by another of the same
// attempt was requeued at shutdown). nil when the step had none.
func chaosEnded(steps map[int]map[int][]*chaosDelivery, k int) *chaosDelivery {
	var last *chaosDelivery
	for _, ds := range steps[k] {
		for _, d := range ds {
			if last == nil || d.attempt > last.attempt || d.attempt == last.attempt && d.start.After(last.start) {
				last = d
			}
		}
	}
	return last
}

// chaosNull reports whether a JSON value carried in a delivery is null or absent.
func chaosNull(v json.RawMessage) bool { return len(v) == 0 || string(v) == "null" }

// chaosCheckSteps checks the runs that wait and their children against the webhook
// server's log and the tables:
//   - every child of a final parent is final, and its parent is in the table;
//   - no step is delivered past the table's step, and a run's step is the number of
//     waits it made, plus one: each step before it ended with a wait (its last
//     attempt's last delivery answered 202);
//   - no parent is resumed twice for one wait: a step after the first has its attempt 1
//     delivered once, but for as many requeues at shutdown of that attempt number;
//   - a wait for child runs made as many as it asked, for the step it resumes, and only
//     such a wait made any;
//   - every delivery carried the state its previous step returned (null at step 1) and
//     what met that step's wait: slept, the timeout of a signal wait that had one, a
//     signal a client sent to that run, or the wait's children in the order asked with
//     their final statuses; null only at step 1 or for a run a retry was sent for (a run
//     canceled while it waits resumes without one when retried);
//   - every signal answered 200 reached a delivery, unless its run ended failed or
//     canceled.
func chaosCheckSteps(bad *chaosViolations, rows map[string]chaosRow, deliveries []*chaosDelivery, requeues map[string]int, c *chaosClients) chaosStepFigures {
	fig := chaosStepFigures{byStep: map[int]int{}, waits: map[string]int{}, resumes: map[string]int{}, childStatus: map[string]int{}}
	children := map[string]map[int][]string{} // parent → the step a wait's children resume → their ids, in the order made
	for id, r := range rows {
		if r.parent == "" {
			continue
		}
		fig.children++
		fig.childStatus[r.status]++
		p, ok := rows[r.parent]
		switch {
		case !ok:
			bad.add("child run %s: got parent %s not in the table; want its parent kept with it", id, r.parent)
		case p.final() && !r.final():
			bad.add("child run %s: got status %s under its parent %s, %s; want every child of a final parent final", id, r.status, r.parent, p.status)
		}
		if children[r.parent] == nil {
			children[r.parent] = map[int][]string{}
		}
		children[r.parent][r.parentStep] = append(children[r.parent][r.parentStep], id)
	}
	for _, bySteps := range children {
		for _, ids := range bySteps {
			sort.Slice(ids, func(i, j int) bool { return rows[ids[i]].seq < rows[ids[j]].seq })
		}
	}
	runs := map[string]map[int]map[int][]*chaosDelivery{} // run → step → attempt → deliveries
	for _, d := range deliveries {
		r, ok := rows[d.run]
		if !ok {
			continue // chaosCheckDeliveries says so
		}
		if d.step > r.step {
			bad.add("webhook: got run %s (%s) step %d attempt %d; want at most the table's step %d", d.run, r.agent, d.step, d.attempt, r.step)
		}
		if runs[d.run] == nil {
			runs[d.run] = map[int]map[int][]*chaosDelivery{}
		}
		if runs[d.run][d.step] == nil {
			runs[d.run][d.step] = map[int][]*chaosDelivery{}
		}
		runs[d.run][d.step][d.attempt] = append(runs[d.run][d.step][d.attempt], d)
	}
	carried := map[string]bool{} // run + " " + nonce: the signals a delivery carried
	for id, r := range rows {
		steps := runs[id]
		if r.agent == "steps" {
			fig.runs++
			fig.byStep[r.step]++
		}
		for k := 1; k < r.step; k++ {
			e := chaosEnded(steps, k)
			switch {
			case e == nil:
				bad.add("run %s at step %d: got no delivery of its step %d; want one that waited", id, r.step, k)
				continue
			case e.wait == "":
				bad.add("run %s at step %d: got its step %d ended by attempt %d answering fault %q, no wait; want a wait for each step before the table's",
					id, r.step, k, e.attempt, e.fault)
				continue
			}
			kind := string(e.wait)
			if e.timeout {
				kind += " with timeout"
			}
			fig.waits[kind]++
			if got := len(children[id][k+1]); got != e.children {
				bad.add("run %s: got %d child runs of its step %d's wait (%s); want %d", id, got, k, e.wait, e.children)
			}
		}
		for ps, ids := range children[id] {
			if ps < 2 || ps > r.step {
				bad.add("run %s at step %d: got child runs %v made for its step %d; want children only of its waits", id, r.step, ids, ps)
			}
		}
		for k, attempts := range steps {
			if k > 1 && len(attempts[1]) > 1+requeues[id+" 1"] {
				bad.add("run %s: got its step %d attempt 1 delivered %d times, attempt 1 requeued at shutdown %d times; want it resumed once for the wait of step %d",
					id, k, len(attempts[1]), requeues[id+" 1"], k-1)
			}
			var prev *chaosDelivery // the delivery that ended step k-1
			if k > 1 {
				if prev = chaosEnded(steps, k-1); prev == nil || prev.wait == "" {
					continue // said above
				}
			}
			var first *chaosDelivery
			for _, ds := range attempts {
				for _, d := range ds {
					if first == nil || d.attempt < first.attempt || d.attempt == first.attempt && d.start.Before(first.start) {
						first = d
					}
					if nonce := chaosCheckCarried(bad, d, prev, children[id][k], rows, c); nonce != "" {
						carried[id+" "+nonce] = true
					}
				}
			}
			if k > 1 {
				var res map[string]json.RawMessage
				json.Unmarshal(first.resume, &res)
				kind := "null"
				for name := range res {
					kind = name
				}
				fig.resumes[kind]++
			}
		}
	}
	for id, nonces := range c.signaled {
		if r := rows[id]; r.status == "failed" || r.status == "canceled" {
			continue
		}
		for _, n := range nonces {
			if !carried[id+" "+n] {
				bad.add("run %s (%s): got no delivery carrying its signal %s, answered 200; want the next step's to", id, rows[id].status, n)
			}
		}
	}
	return fig
}

// chaosCheckCarried checks the state and resume delivery d carried, prev being the
// delivery that ended the step before (nil at step 1) and kids the children of its wait;
// it returns the nonce of the signal carried, if any.
func chaosCheckCarried(bad *chaosViolations, d, prev *chaosDelivery, kids []string, rows map[string]chaosRow, c *chaosClients) (nonce string) {
	if prev == nil {
		if !chaosNull(d.state) || !chaosNull(d.resume) {
			bad.add("run %s step %d attempt %d: got state %s resume %s; want null, null at step 1", d.run, d.step, d.attempt, d.state, d.resume)
		}
		return ""
	}
	if !jsonEq(d.state, prev.newState) {
		bad.add("run %s step %d attempt %d: got state %s; want %s, what step %d returned", d.run, d.step, d.attempt, d.state, prev.newState, prev.step)
	}
	if chaosNull(d.resume) {
		if !c.retrySent[d.run] {
			bad.add("run %s step %d attempt %d: got resume null and no retry sent; want what met step %d's wait (%s)", d.run, d.step, d.attempt, prev.step, prev.wait)
		}
		return ""
	}
	var res struct {
		Signal *struct {
			Name string `json:"name"`
			Data struct {
				Run   string `json:"run"`
				Nonce string `json:"nonce"`
			} `json:"data"`
		} `json:"signal"`
		Runs []struct {
			ID     string `json:"id"`
			Status string `json:"status"`
		} `json:"runs"`
	}
	json.Unmarshal(d.resume, &res)
	ok := false
	switch prev.wait {
	case waitSleep:
		ok = jsonEq(d.resume, []byte(`{"slept":true}`))
	case waitSignal:
		if s := res.Signal; s != nil {
			nonce = s.Data.Nonce
			ok = s.Name == chaosSignal && s.Data.Run == d.run && c.signalsSent[d.run][nonce]
		} else {
			ok = prev.timeout && jsonEq(d.resume, []byte(`{"timeout":true}`))
		}
	case waitRuns:
		ok = len(res.Runs) == len(kids)
		for i := 0; ok && i < len(kids); i++ {
			ok = res.Runs[i].ID == kids[i] && res.Runs[i].Status == rows[kids[i]].status
		}
	}
	if !ok {
		bad.add("run %s step %d attempt %d: got resume %s; want what met step %d's wait (%s, timeout %v, children %v)",
			d.run, d.step, d.attempt, d.resume, prev.step, prev.wait, prev.timeout, kids)
	}
	return nonce
}

// chaosCheckEvents checks that every progress event the server acknowledged is kept
// with the run, under its seq and the attempt that posted it, and that each run's events
// are numbered 1, 2, … without a gap or a repeat.
func chaosCheckEvents(t *testing.T, bad *chaosViolations, db *sql.DB, acked []chaosEvent) {
	t.Helper()
	if len(acked) == 0 { // none posted: the server offers no events_url yet
		return
	}
	kept := map[string]int{}
	rs, err := db.Query(`SELECT run_id, seq, attempt FROM run_events`)
	if err != nil {
		t.Fatalf("read run_events: got %v; want rows", err)
	}
	defer rs.Close()
	for rs.Next() {
		var run string
		var seq int64
		var attempt int
		if err := rs.Scan(&run, &seq, &attempt); err != nil {
			t.Fatalf("read run_events: got %v; want a row", err)
		}
		kept[fmt.Sprintf("%s %d", run, seq)] = attempt
	}
	if err := rs.Err(); err != nil {
		t.Fatalf("read run_events: got %v; want every row", err)
	}
	var gapped []byte
	if err := db.QueryRow(`SELECT coalesce(json_agg(run_id), '[]') FROM (SELECT run_id FROM run_events
		GROUP BY run_id HAVING min(seq) <> 1 OR max(seq) <> count(*) OR count(DISTINCT seq) <> count(*)) x`).Scan(&gapped); err != nil {
		t.Fatalf("read run_events: got %v; want the runs whose seqs have gaps", err)
	}
	if string(gapped) != "[]" {
		bad.add("events: got runs %s whose seqs are not 1 … n; want every run's numbered 1, 2, …", gapped)
	}
	for _, e := range acked {
		if got, ok := kept[fmt.Sprintf("%s %d", e.run, e.seq)]; !ok || got != e.attempt {
			bad.add("event %d of run %s: acknowledged for attempt %d, got kept %v with attempt %d; want kept with it", e.seq, e.run, e.attempt, ok, got)
		}
	}
}
