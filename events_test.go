package main

// Tests of progress events and streams (events.go): through HTTP in-process, and through
// real processes for what crosses processes and shutdown. Helpers local to this file
// start with ev.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// evCall is one webhook call an evAgent received; closing done lets the agent answer.
type evCall struct {
	RunID       string `json:"run_id"`
	Attempt     int    `json:"attempt"`
	EventsURL   string `json:"events_url"`
	EventsToken string `json:"events_token"`
	done        chan struct{}
}

// evAgent is a webhook agent served by the test: each call is handed to calls and held
// until the test closes its done; it then answers {"ok":true}.
func evAgent(t testing.TB) (url string, calls <-chan *evCall) {
	t.Helper()
	ch := make(chan *evCall, 1000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := &evCall{done: make(chan struct{})}
		if err := json.NewDecoder(r.Body).Decode(c); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ch <- c
		select {
		case <-c.done:
		case <-r.Context().Done():
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ok":true}`))
	}))
	t.Cleanup(srv.Close)
	return srv.URL, ch
}

// evNextCall returns the next call the agent receives.
func evNextCall(t testing.TB, calls <-chan *evCall) *evCall {
	t.Helper()
	select {
	case c := <-calls:
		return c
	case <-time.After(30 * time.Second):
		t.Fatal("webhook agent: got no call within 30s; want one")
		return nil
	}
}

// evPost posts one event with the call's token (or token, when given) to url.
func evPost(t testing.TB, url, token string, body any) (int, []byte) {
	t.Helper()
	status, _, data, err := send(testClient, "POST", url, token, nil, body)
	if err != nil {
		t.Fatalf("POST %s: got %v; want an answer", url, err)
	}
	return status, data
}

// evMustPost posts an event and fails the test unless it is accepted with seq want.
func evMustPost(t testing.TB, c *evCall, typ string, data any, want int) {
	t.Helper()
	status, body := evPost(t, c.EventsURL, c.EventsToken, map[string]any{"type": typ, "data": data})
	var got struct{ Seq int }
	if status != http.StatusAccepted || json.Unmarshal(body, &got) != nil || got.Seq != want {
		t.Fatalf("POST event %q: got %d %s; want 202 {\"seq\":%d}", typ, status, body, want)
	}
}

// sseFrame is one frame of a stream; a comment line is a frame with only Comment set.
type sseFrame struct {
	ID, Event, Data, Comment string
	At                       time.Time // when it was read
}

// evStream opens a stream at url and returns its frames, the channel closed when the
// server ends the stream. It returns once the response headers are in: the server
// watches the stream from then on. The stream is closed when the test ends.
func evStream(t testing.TB, url, token string, hdr map[string]string) <-chan sseFrame {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+token)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := (&http.Client{}).Do(req) // no timeout: a stream may last
	if err != nil {
		t.Fatalf("GET %s: got %v; want a stream", url, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET %s: got %d %q; want 200 text/event-stream", url, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	ch := make(chan sseFrame, 10000)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 4<<20)
		var f sseFrame
		for sc.Scan() {
			line := sc.Text()
			k, v, _ := strings.Cut(line, ": ")
			switch {
			case line == "":
				if f != (sseFrame{}) {
					f.At = time.Now()
					ch <- f
				}
				f = sseFrame{}
			case strings.HasPrefix(line, ":"):
				f.Comment = strings.TrimPrefix(line, ": ")
			case k == "id":
				f.ID = v
			case k == "event":
				f.Event = v
			case k == "data":
				f.Data = v
			}
		}
	}()
	return ch
}

// evNext returns the stream's next frame that is not a comment; ok is false when the
// stream ended.
func evNext(t testing.TB, ch <-chan sseFrame, timeout time.Duration) (f sseFrame, ok bool) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case f, ok := <-ch:
			if ok && f.Comment != "" {
				continue
			}
			return f, ok
		case <-deadline:
			t.Fatalf("stream: got no frame within %v; want one", timeout)
			return f, false
		}
	}
}

// evExpectStatus reads the next frame and fails the test unless it is a status frame
// with status want (and attempt, when not 0), without input or output.
func evExpectStatus(t testing.TB, ch <-chan sseFrame, want string, attempt int) {
	t.Helper()
	f, ok := evNext(t, ch, 30*time.Second)
	var run map[string]any
	if !ok || f.Event != "status" || f.ID != "" || json.Unmarshal([]byte(f.Data), &run) != nil {
		t.Fatalf("stream: got frame %+v (open %v); want a status frame", f, ok)
	}
	if run["status"] != want || (attempt != 0 && run["attempt"] != float64(attempt)) {
		t.Fatalf("status frame: got status %v attempt %v; want %s attempt %d", run["status"], run["attempt"], want, attempt)
	}
	if _, in := run["input"]; in {
		t.Errorf("status frame: got input in %s; want none", f.Data)
	}
	if _, out := run["output"]; out {
		t.Errorf("status frame: got output in %s; want none", f.Data)
	}
}

// evExpectEvent reads the next frame and fails the test unless it is event seq with type.
func evExpectEvent(t testing.TB, ch <-chan sseFrame, seq int, typ string) runEvent {
	t.Helper()
	f, ok := evNext(t, ch, 30*time.Second)
	var e runEvent
	if !ok || f.ID != strconv.Itoa(seq) || f.Event != typ || json.Unmarshal([]byte(f.Data), &e) != nil || e.Seq != seq || e.Type != typ {
		t.Fatalf("stream: got frame %+v (open %v); want event %d of type %q", f, ok, seq, typ)
	}
	return e
}

// evExpectEnd fails the test unless the stream ends (after comments only) within timeout.
func evExpectEnd(t testing.TB, ch <-chan sseFrame, timeout time.Duration) {
	t.Helper()
	if f, ok := evNext(t, ch, timeout); ok {
		t.Fatalf("stream: got frame %+v; want the stream ended", f)
	}
}

// TestEventTokens: a token is good for its run, step and attempt only: attempts count per
// step, so step 2's attempt 1 does not take step 1's attempt 1's token.
func TestEventTokens(t *testing.T) {
	k := eventKeys{secret: []byte("secret"), publicURL: "http://a.example"}
	run, other := "6f1c2c4e-3b1d-4a53-9b54-0c8e9f0a1b2c", "00000000-0000-4000-8000-000000000000"
	url, token := k.link(run, 1, 2)
	if want := "http://a.example/v1/runs/" + run + "/events"; url != want {
		t.Errorf("events_url: got %q; want %q", url, want)
	}
	_, sig, _ := strings.Cut(token, ".")
	if s, a, ok := k.verify(run, token); !ok || s != 1 || a != 2 {
		t.Errorf("verify its own token: got step %d attempt %d ok %v; want 1 2 true", s, a, ok)
	}
	_, stepped := k.link(run, 3, 2)
	_, stepSig, _ := strings.Cut(stepped, ".")
	if s, a, ok := k.verify(run, stepped); !ok || s != 3 || a != 2 || !strings.HasPrefix(stepped, "3-2.") {
		t.Errorf("verify a step 3 token %q: got step %d attempt %d ok %v; want 3 2 true", stepped, s, a, ok)
	}
	for name, c := range map[string]struct{ run, token string }{
		"another run":           {other, token},
		"another attempt":       {run, "3." + sig},
		"attempt spelled 02":    {run, "02." + sig},
		"no attempt":            {run, sig},
		"empty":                 {run, ""},
		"altered signature":     {run, "2." + strings.Repeat("A", len(sig))},
		"another secret":        {run, func() string { _, t := (eventKeys{secret: []byte("other")}).link(run, 1, 2); return t }()},
		"step 1's at step 2":    {run, "2-2." + sig},
		"step 3's at step 1":    {run, "2." + stepSig},
		"step 1 spelled out":    {run, "1-2." + sig},
		"step 3's at step 4":    {run, "4-2." + stepSig},
		"step spelled 03":       {run, "03-2." + stepSig},
		"step 3's at attempt 1": {run, "3-1." + stepSig},
	} {
		if _, _, ok := k.verify(c.run, c.token); ok {
			t.Errorf("%s: got the token accepted; want it refused", name)
		}
	}
	if _, _, ok := (eventKeys{}).verify(run, token); ok {
		t.Error("no secret loaded: got a token accepted; want every token refused")
	}
}

// TestEventsThroughHTTP: an agent posts events with the token its webhook call carries;
// a stream shows the running status, replays and follows the events, shows the final
// status and ends; the page answers after ?after=; Last-Event-ID resumes; the token is
// refused after its attempt ended (409), a wrong one 401, and each limit holds.
func TestEventsThroughHTTP(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	url, calls := evAgent(t)
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": url})
	run := a.createRun(t, ws, "hook", map[string]any{"q": 1})
	c := evNextCall(t, calls)
	if want := a.base + "/v1/runs/" + run.ID + "/events"; c.EventsURL != want || c.EventsToken == "" || c.Attempt != 1 {
		t.Fatalf("webhook body: got events_url %q, token %q, attempt %d; want %q, a token, 1", c.EventsURL, c.EventsToken, c.Attempt, want)
	}
	path := "/v1/workspaces/" + ws.ID + "/runs/" + run.ID + "/events"
	stream := evStream(t, a.base+path, ws.APIKey, nil)
	evExpectStatus(t, stream, "running", 1)

	evMustPost(t, c, "step", map[string]any{"n": 1}, 1)
	evMustPost(t, c, "log.line", "two", 2)
	evMustPost(t, c, "done-3", nil, 3)
	e := evExpectEvent(t, stream, 1, "step")
	if string(e.Data) != `{"n":1}` || e.Attempt != 1 || e.At.IsZero() {
		t.Errorf("event 1: got %+v; want data {\"n\":1}, attempt 1, a time", e)
	}
	evExpectEvent(t, stream, 2, "log.line")
	evExpectEvent(t, stream, 3, "done-3")

	t.Run("page", func(t *testing.T) {
		var page struct{ Events []runEvent }
		a.mustDo(t, "GET", path+"?after=1", ws.APIKey, nil, 200, &page)
		if len(page.Events) != 2 || page.Events[0].Seq != 2 || page.Events[1].Seq != 3 || string(page.Events[0].Data) != `"two"` {
			t.Errorf("page after 1: got %+v; want events 2 and 3", page.Events)
		}
		a.mustDo(t, "GET", path+"?after=3", ws.APIKey, nil, 200, &page)
		if page.Events == nil || len(page.Events) != 0 {
			t.Errorf("page after 3: got %+v; want []", page.Events)
		}
		a.mustDo(t, "GET", path+"?after=-1", ws.APIKey, nil, 422, nil)
		other := a.createWorkspace(t)
		a.mustDo(t, "GET", path, other.APIKey, nil, 404, nil)
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/00000000-0000-4000-8000-000000000000/events", ws.APIKey, nil, 404, nil)
	})
	t.Run("resume with Last-Event-ID", func(t *testing.T) {
		resumed := evStream(t, a.base+path+"?after=0", ws.APIKey, map[string]string{"Last-Event-ID": "2"})
		evExpectStatus(t, resumed, "running", 1)
		evExpectEvent(t, resumed, 3, "done-3")
		status, _, body := a.do(t, "GET", path, ws.APIKey, map[string]string{"Accept": "text/event-stream", "Last-Event-ID": "x"}, nil)
		if status != 422 {
			t.Errorf("Last-Event-ID x: got %d %s; want 422", status, body)
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		n, sig, _ := strings.Cut(c.EventsToken, ".")
		for name, token := range map[string]string{
			"none": "", "altered": n + "." + strings.Repeat("A", len(sig)), "next attempt": "2." + sig, "a workspace key": ws.APIKey,
		} {
			if status, body := evPost(t, c.EventsURL, token, map[string]any{"type": "x"}); status != 401 {
				t.Errorf("token %s: got %d %s; want 401", name, status, body)
			}
		}
		other := a.base + "/v1/runs/00000000-0000-4000-8000-000000000000/events"
		if status, body := evPost(t, other, c.EventsToken, map[string]any{"type": "x"}); status != 401 {
			t.Errorf("token of another run: got %d %s; want 401", status, body)
		}
		if status, body := evPost(t, a.base+"/v1/runs/not-a-uuid/events", c.EventsToken, map[string]any{"type": "x"}); status != 401 {
			t.Errorf("path id not a UUID: got %d %s; want 401", status, body)
		}
	})
	t.Run("limits", func(t *testing.T) {
		for name, c2 := range map[string]struct {
			body any
			want int
		}{
			"type empty":            {map[string]any{"type": ""}, 422},
			"type 65 characters":    {map[string]any{"type": strings.Repeat("a", 65)}, 422},
			"type upper case":       {map[string]any{"type": "Step"}, 422},
			"type with a space":     {map[string]any{"type": "a b"}, 422},
			"type not ASCII":        {map[string]any{"type": "é"}, 422},
			"type missing":          {map[string]any{"data": 1}, 422},
			"type a number":         {map[string]any{"type": 1}, 422},
			"unknown key":           {map[string]any{"type": "x", "extra": 1}, 400},
			"not JSON":              {"{", 400},
			"body over 64 KiB":      {map[string]any{"type": "x", "data": strings.Repeat("a", maxEventBody)}, 413},
			"over 1 MiB as stored":  {`{"type":"x","data":[` + strings.TrimSuffix(strings.Repeat("1e131071,", 9), ",") + `]}`, 422},
			"data PG cannot store":  {`{"type":"x","data":"\u0000"}`, 422},
			"type 64 characters ok": {map[string]any{"type": strings.Repeat("a", 64)}, 202},
		} {
			if status, body := evPost(t, c.EventsURL, c.EventsToken, c2.body); status != c2.want {
				t.Errorf("%s: got %d %s; want %d", name, status, body, c2.want)
			}
		}
		evExpectEvent(t, stream, 4, strings.Repeat("a", 64))
		// The run's counter stands for 10,000 posted events: the last one fits, one more is 429.
		if _, err := db.Exec(`UPDATE runs SET events_count = $2 - 1 WHERE id = $1`, run.ID, maxRunEvents); err != nil {
			t.Fatal(err)
		}
		evMustPost(t, c, "last", nil, maxRunEvents)
		if status, body := evPost(t, c.EventsURL, c.EventsToken, map[string]any{"type": "x"}); status != 429 {
			t.Errorf("event %d: got %d %s; want 429", maxRunEvents+1, status, body)
		}
		evExpectEvent(t, stream, maxRunEvents, "last")
	})

	close(c.done)
	evExpectStatus(t, stream, "succeeded", 1)
	evExpectEnd(t, stream, 30*time.Second)
	if status, body := evPost(t, c.EventsURL, c.EventsToken, map[string]any{"type": "late"}); status != 409 {
		t.Errorf("event after the attempt ended: got %d %s; want 409", status, body)
	}
	// A stream of a final run replays its events, shows the final status and ends.
	final := evStream(t, a.base+path+"?after=3", ws.APIKey, nil)
	evExpectEvent(t, final, 4, strings.Repeat("a", 64))
	evExpectEvent(t, final, maxRunEvents, "last")
	evExpectStatus(t, final, "succeeded", 1)
	evExpectEnd(t, final, 10*time.Second)
}

// TestEventsAcrossProcesses: events posted to process A (which executes the run) are
// streamed in order from process B, which also verifies A's tokens; B's stream ends after
// the final status, and B's workspace stream shows the run's changes.
func TestEventsAcrossProcesses(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	pa := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "LOG_LEVEL": "info"}))
	pb := startProc(t, testEnv(t, dsn, map[string]string{"LOG_LEVEL": "info"}))
	a, b := pa.app(), pb.app()
	evWaitListening(t, pb)
	url, calls := evAgent(t)
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": url})
	wsStream := evStream(t, b.base+"/v1/workspaces/"+ws.ID+"/events", ws.APIKey, nil)
	run := a.createRun(t, ws, "hook", "x")
	c := evNextCall(t, calls)
	stream := evStream(t, b.base+"/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/events", ws.APIKey, nil)
	evExpectStatus(t, stream, "running", 1)
	const n = 20
	for i := 1; i <= n; i++ {
		evMustPost(t, c, "step", map[string]any{"i": i}, i)
	}
	// B verifies a token A's worker issued.
	status, body := evPost(t, strings.Replace(c.EventsURL, a.base, b.base, 1), c.EventsToken, map[string]any{"type": "via-b"})
	if status != 202 {
		t.Fatalf("event posted to B: got %d %s; want 202", status, body)
	}
	for i := 1; i <= n; i++ {
		e := evExpectEvent(t, stream, i, "step")
		if want := fmt.Sprintf(`{"i":%d}`, i); string(e.Data) != want {
			t.Fatalf("event %d: got data %s; want %s", i, e.Data, want)
		}
	}
	evExpectEvent(t, stream, n+1, "via-b")
	close(c.done)
	evExpectStatus(t, stream, "succeeded", 1)
	evExpectEnd(t, stream, 30*time.Second)

	var seen []string
	for len(seen) == 0 || seen[len(seen)-1] != "succeeded" {
		f, ok := evNext(t, wsStream, 30*time.Second)
		var r runRecord
		if !ok || f.Event != "run" || json.Unmarshal([]byte(f.Data), &r) != nil || r.ID != run.ID {
			t.Fatalf("workspace stream: got %+v (open %v) after %v; want run frames of %s", f, ok, seen, run.ID)
		}
		seen = append(seen, string(r.Status))
	}
	if seen[0] != "queued" && seen[0] != "running" {
		t.Errorf("workspace stream: got statuses %v; want queued or running first, succeeded last", seen)
	}
}

// evWaitListening waits until a process without an embedded worker listens for
// notifications (waitListening needs the worker's cycles): its log line says so.
func evWaitListening(t testing.TB, p *proc) {
	t.Helper()
	p.waitLog(t, "listening for notifications", 1, 15*time.Second)
	time.Sleep(200 * time.Millisecond) // the LISTEN statements follow the log line: see waitListening
}

// TestWorkspaceStreamIsolation: a workspace's stream shows its own runs' changes and never
// another workspace's; another workspace's key gets 404, a wrong token 401.
func TestWorkspaceStreamIsolation(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	a.waitListening(t, true)
	mine, theirs := a.createWorkspace(t), a.createWorkspace(t)
	path := "/v1/workspaces/" + mine.ID + "/events"
	a.mustDo(t, "GET", path, theirs.APIKey, nil, 404, nil)
	a.mustDo(t, "GET", path, "wrong-token", nil, 401, nil)
	stream := evStream(t, a.base+path, mine.APIKey, nil)
	other := map[string]bool{}
	for i := range 5 {
		other[a.createRun(t, theirs, "echo", i).ID] = true
	}
	own := a.createRun(t, mine, "echo", "mine")
	for i := range 5 {
		other[a.createRun(t, theirs, "echo", i).ID] = true
	}
	for id := range other {
		a.waitRunStatus(t, theirs, id, "succeeded", 30*time.Second)
	}
	check := func(f sseFrame) runRecord {
		t.Helper()
		var r map[string]json.RawMessage
		var run runRecord
		if f.Event != "run" || json.Unmarshal([]byte(f.Data), &r) != nil || json.Unmarshal([]byte(f.Data), &run) != nil {
			t.Fatalf("workspace stream: got %+v; want run frames", f)
		}
		if run.WorkspaceID != mine.ID || other[run.ID] || run.ID != own.ID {
			t.Fatalf("workspace stream: got run %s of workspace %s; want only %s of %s", run.ID, run.WorkspaceID, own.ID, mine.ID)
		}
		if r["input"] != nil || r["output"] != nil {
			t.Errorf("run frame: got input or output in %s; want neither", f.Data)
		}
		return run
	}
	for run := (runRecord{}); run.Status != statusSucceeded; {
		f, ok := evNext(t, stream, 30*time.Second)
		if !ok {
			t.Fatal("workspace stream ended; want it open")
		}
		run = check(f)
	}
	// Every change happened before that frame was read: give any stray frame a second.
	for end := time.After(time.Second); ; {
		select {
		case f, ok := <-stream:
			if !ok {
				t.Fatal("workspace stream ended; want it open")
			}
			if f.Comment == "" {
				check(f)
			}
		case <-end:
			return
		}
	}
}

// TestEventStreamLongLived: a stream kept open for 90 s, with nothing to say, still
// delivers, with a keep-alive comment at least every 15 s meanwhile.
func TestEventStreamLongLived(t *testing.T) {
	if testing.Short() {
		t.Skip("keeps a stream open for 90 s")
	}
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	url, calls := evAgent(t)
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": url, "timeout_ms": 300000})
	run := a.createRun(t, ws, "hook", nil)
	c := evNextCall(t, calls)
	defer close(c.done)
	stream := evStream(t, a.base+"/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"/events", ws.APIKey, nil)
	evExpectStatus(t, stream, "running", 1)
	last, comments := time.Now(), 0
	for end := time.Now().Add(90 * time.Second); time.Now().Before(end); {
		select {
		case f, ok := <-stream:
			if !ok || f.Comment != "keep-alive" {
				t.Fatalf("stream while idle: got %+v (open %v); want keep-alive comments only", f, ok)
			}
			if gap := f.At.Sub(last); gap > 15*time.Second {
				t.Errorf("keep-alive: got a gap of %v; want at most 15s", gap)
			}
			last, comments = f.At, comments+1
		case <-time.After(time.Until(end)):
		}
	}
	if comments < 90/15 {
		t.Errorf("keep-alive comments in 90s: got %d; want at least %d", comments, 90/15)
	}
	posted := time.Now()
	evMustPost(t, c, "after-90s", nil, 1)
	evExpectEvent(t, stream, 1, "after-90s")
	t.Logf("after 90 s open: %d keep-alive comments; the event arrived %v after its POST", comments, time.Since(posted).Round(time.Millisecond))
}

// TestStreamsAtShutdown: with 100 streams open at SIGTERM (on a run that finishes during
// the drain, on a queued run, on the workspace) the process exits within the drain; the
// first streams end with the final status, the others once the drain is over, and the log
// says how long they took to close.
func TestStreamsAtShutdown(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	const drain = 10 * time.Second
	p := startProc(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_CONCURRENCY": "1",
		"RUN_WORKER_SHUTDOWN_TIMEOUT_MS": strconv.Itoa(int(drain.Milliseconds())), "LOG_LEVEL": "info"}))
	a := p.app()
	db := openTestDB(t, dsn)
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 3000})
	running := a.createRun(t, ws, "slow", "running")
	waitRunRow(t, db, running.ID, "running", 10*time.Second)
	queued := a.createRun(t, ws, "slow", "queued")
	base := a.base + "/v1/workspaces/" + ws.ID
	var onRunning, onQueued []<-chan sseFrame
	for range 50 {
		onRunning = append(onRunning, evStream(t, base+"/runs/"+running.ID+"/events", ws.APIKey, nil))
	}
	for range 49 {
		onQueued = append(onQueued, evStream(t, base+"/runs/"+queued.ID+"/events", ws.APIKey, nil))
	}
	onWorkspace := evStream(t, base+"/events", ws.APIKey, nil)
	for _, s := range onRunning {
		evExpectStatus(t, s, "running", 1)
	}
	for _, s := range onQueued {
		evExpectStatus(t, s, "queued", 0)
	}

	signaled := time.Now()
	p.signal(t, syscall.SIGTERM)
	for _, s := range onRunning {
		evExpectStatus(t, s, "succeeded", 1)
		evExpectEnd(t, s, drain)
	}
	for _, s := range append(onQueued, onWorkspace) {
		for {
			f, ok := evNext(t, s, drain+10*time.Second)
			if !ok {
				break
			}
			if f.Event != "run" { // the workspace stream shows the run that finished
				t.Fatalf("stream of the queued run at shutdown: got %+v; want it to end", f)
			}
		}
	}
	if code := p.wait(t, drain+10*time.Second); code != 0 {
		t.Errorf("exit status: got %d; want 0", code)
	}
	took := time.Since(signaled)
	if took > drain {
		t.Errorf("exit: got %v after SIGTERM; want within the drain timeout %v", took, drain)
	}
	log := p.log.String()
	ptLogOrder(t, log, "shutting down", "worker stopped", "streams closed", "database pool closed")
	i := strings.Index(log, "streams closed")
	line, _, _ := strings.Cut(log[i:], "\n")
	if !strings.Contains(line, "streams=") || !strings.Contains(line, "took=") {
		t.Errorf("log: got %q; want how many streams and how long they took", line)
	}
	t.Logf("exited %v after SIGTERM; %s", took.Round(time.Millisecond), line)
}
