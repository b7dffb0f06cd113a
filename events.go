package main

// Progress events and streams (SPEC "Progress events", "Streams"). An agent POSTs events
// to the events_url its webhook call carries, with the events_token that is good for that
// attempt only; clients read a run's events as a page or a Server-Sent Events stream, and
// a workspace's run changes as a stream. Streams learn of news through the process's one
// LISTEN connection (notify.go) and read it with short queries on the API pool: a stream
// holds no database connection while it waits.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lib/pq"
)

// Limits and cadences of events and streams.
const (
	// maxEventBody is the largest event a POST may carry (SPEC: 64 KiB); larger is a 413,
	// as every body over its limit is.
	maxEventBody = 64 << 10
	// maxEventData is the most an event's data may take as PostgreSQL stores and we answer
	// it (SPEC: 1 MiB): 64 KiB of JSON numbers can grow past it.
	maxEventData = 1 << 20
	// maxRunEvents is the most events one run keeps (SPEC: 10,000); more is a 429.
	maxRunEvents = 10000
	// eventsPage is the most events one page answers, and one stream read fetches.
	eventsPage = 1000
	// sseKeepAlive is how often a stream sends a comment line: under SPEC's 15 s even
	// with a late timer, and well under writeStall, which cuts a write-less answer.
	sseKeepAlive = 10 * time.Second
	// streamPoll is how often a stream re-reads while notifications are down.
	streamPoll = time.Second
	// streamCatchUp bounds the last read a stream makes at shutdown.
	streamCatchUp = 2 * time.Second
)

// eventKeys issues and checks events tokens with the cluster's shared secret, so that a
// token one process issued is good in every other. A token is the attempt and the HMAC
// of run id and attempt: it names one attempt of one run, and nothing needs storing.
type eventKeys struct {
	secret    []byte
	publicURL string // PUBLIC_URL, without a trailing slash
}

// loadEventKeys reads the events secret that schema.sql generated once for the database.
func (s *store) loadEventKeys(ctx context.Context, publicURL string) error {
	var secret string
	err := s.db.QueryRowContext(ctx, `SELECT secret FROM cluster_secrets WHERE name = 'events'`).Scan(&secret)
	if err != nil {
		return fmt.Errorf("read the events secret: %w", err)
	}
	s.events = eventKeys{secret: []byte(secret), publicURL: publicURL}
	return nil
}

// mac is the token's signature of one attempt of run id (lower-case) at a step. Attempts
// count per step, so a token names its step too; step 1's is signed as before steps
// existed, so that the tokens of attempts in flight across an upgrade stay good.
func (k eventKeys) mac(id string, step, attempt int) []byte {
	h := hmac.New(sha256.New, k.secret)
	if step == 1 {
		fmt.Fprintf(h, "%s:%d", id, attempt)
	} else {
		fmt.Fprintf(h, "%s:%d:%d", id, step, attempt)
	}
	return h.Sum(nil)
}

// link returns the events_url and events_token for one attempt of run id at a step
// ("attempt.sig" at step 1, "step-attempt.sig" after); both are empty when no secret is
// loaded (a store made by hand, in tests).
func (k eventKeys) link(id string, step, attempt int) (string, string) {
	if len(k.secret) == 0 {
		return "", ""
	}
	prefix := strconv.Itoa(attempt)
	if step != 1 {
		prefix = strconv.Itoa(step) + "-" + prefix
	}
	return k.publicURL + "/v1/runs/" + id + "/events",
		prefix + "." + base64.RawURLEncoding.EncodeToString(k.mac(id, step, attempt))
}

// verify returns the step and attempt a token was issued for, if it was issued for run id.
func (k eventKeys) verify(id, token string) (step, attempt int, ok bool) {
	a, sig, ok := strings.Cut(token, ".")
	st, a, stepped := strings.Cut(a, "-")
	if !stepped {
		st, a = "1", st
	}
	step, err1 := strconv.Atoi(st)
	attempt, err2 := strconv.Atoi(a)
	if !ok || err1 != nil || err2 != nil || attempt < 1 || step < 1 || len(k.secret) == 0 ||
		strconv.Itoa(attempt) != a || strconv.Itoa(step) != st || stepped && step == 1 {
		return 0, 0, false
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	return step, attempt, err == nil && hmac.Equal(got, k.mac(id, step, attempt))
}

// runEvent is one progress event as stored and answered.
type runEvent struct {
	Seq     int             `json:"seq"`
	Attempt int             `json:"attempt"`
	At      time.Time       `json:"at"`
	Type    string          `json:"type"`
	Data    json.RawMessage `json:"data"`
}

// Why an event was refused after its token was found good.
var (
	errAttemptEnded  = fmt.Errorf("%w: the attempt this events token was issued for has ended", errConflict)
	errTooManyEvents = &requestError{http.StatusTooManyRequests, "too_many_events",
		fmt.Sprintf("the run already has %d events, the most it keeps", maxRunEvents)}
	errEventTooLarge = &requestError{http.StatusRequestEntityTooLarge, "payload_too_large",
		fmt.Sprintf("an event body is at most %d bytes", maxEventBody)}
)

// addEvent appends an event to run id if its attempt is still running, and returns its
// seq. The seq comes from the run's counter, bumped under the run's row lock in the same
// statement, so seqs have no gaps and the attempt cannot end in between.
func (s *store) addEvent(ctx context.Context, id string, step, attempt int, typ string, data json.RawMessage) (int, error) {
	var seq int
	err := s.db.QueryRowContext(ctx, `
		WITH bump AS (
			UPDATE runs SET events_count = events_count + 1
			WHERE id = $1 AND status = 'running' AND attempt = $2 AND step = $7 AND events_count < $5
			  AND octet_length($4::jsonb::text) <= $6
			RETURNING id, events_count, attempt)
		INSERT INTO run_events (run_id, seq, attempt, type, data)
		SELECT id, events_count, attempt, $3, $4::jsonb FROM bump
		RETURNING seq`, id, attempt, typ, string(data), maxRunEvents, maxEventData, step).Scan(&seq)
	if !errors.Is(err, sql.ErrNoRows) {
		return seq, err
	}
	// Refused: say why. A run that is gone (retention) has ended its attempt too.
	var running, full, large bool
	err = s.db.QueryRowContext(ctx, `SELECT status = 'running' AND attempt = $2 AND step = $6, events_count >= $3,
		octet_length($4::jsonb::text) > $5 FROM runs WHERE id = $1`,
		id, attempt, maxRunEvents, string(data), maxEventData, step).Scan(&running, &full, &large)
	switch {
	case errors.Is(err, sql.ErrNoRows) || (err == nil && !running):
		return 0, errAttemptEnded
	case err != nil:
		return 0, err
	case full:
		return 0, errTooManyEvents
	case large:
		return 0, invalid("data is over 1 MiB as stored")
	}
	return 0, errAttemptEnded // it ended and its run was retried meanwhile
}

// runProgress is a run's status and attempt with the events after some seq, read in one
// snapshot.
type runProgress struct {
	status  runStatus
	attempt int
	events  []runEvent
	more    bool // a full page: more events may follow
}

// progress reads run id of workspace ws with up to eventsPage of its events after seq
// after; a run that is not the workspace's is errNotFound.
func (s *store) progress(ctx context.Context, ws, id string, after int) (runProgress, error) {
	rows, err := s.db.QueryContext(ctx, `
		SELECT r.status, r.attempt, e.seq, e.attempt, e.at, e.type, e.data
		FROM runs r LEFT JOIN LATERAL (
			SELECT seq, attempt, at, type, data FROM run_events
			WHERE run_id = r.id AND seq > $3 ORDER BY seq LIMIT $4) e ON true
		WHERE r.id = $1 AND r.workspace_id = $2
		ORDER BY e.seq`, id, ws, after, eventsPage)
	if err != nil {
		return runProgress{}, err
	}
	defer rows.Close()
	var p runProgress
	found := false
	for rows.Next() {
		found = true
		var seq, attempt sql.NullInt64
		var at sql.NullTime
		var typ sql.NullString
		var data []byte
		if err := rows.Scan(&p.status, &p.attempt, &seq, &attempt, &at, &typ, &data); err != nil {
			return p, err
		}
		if seq.Valid {
			p.events = append(p.events, runEvent{Seq: int(seq.Int64), Attempt: int(attempt.Int64),
				At: at.Time.UTC(), Type: typ.String, Data: data})
		}
	}
	if err := rows.Err(); err != nil {
		return p, err
	}
	if !found {
		return p, errNotFound
	}
	p.events = append([]runEvent{}, p.events...) // never null in a page
	p.more = len(p.events) == eventsPage
	return p, nil
}

// runsOf reads the runs of ws among ids, and with active also its 1000 newest queued or
// running runs, in the order they last changed.
func (s *store) runsOf(ctx context.Context, ws string, ids []string, active bool) ([]runRecord, error) {
	if active {
		rows, err := s.db.QueryContext(ctx, `SELECT id FROM agentapp_runs_page(ARRAY[$1::uuid], '{queued,running}', '', $2, 1000)`,
			ws, int64(newestFirst))
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return nil, err
			}
			ids = append(ids, id)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	var runs []runRecord
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), eventsPage)]
		ids = ids[len(chunk):]
		rows, err := s.db.QueryContext(ctx, `SELECT `+runColumns+` FROM runs r JOIN agents a ON a.id = r.agent_id
			WHERE r.id = ANY($1::uuid[]) AND r.workspace_id = $2`, pq.StringArray(chunk), ws)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			r, err := scanRun(rows)
			if err != nil {
				rows.Close()
				return nil, err
			}
			runs = append(runs, r)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	sort.SliceStable(runs, func(i, j int) bool {
		if !runs[i].UpdatedAt.Equal(runs[j].UpdatedAt) {
			return runs[i].UpdatedAt.Before(runs[j].UpdatedAt)
		}
		return runs[i].seq < runs[j].seq
	})
	return dedupeRuns(runs), nil
}

// dedupeRuns drops a run that appears twice (changed, and active), keeping the first.
func dedupeRuns(runs []runRecord) []runRecord {
	seen := map[string]bool{}
	out := runs[:0]
	for _, r := range runs {
		if !seen[r.ID] {
			seen[r.ID] = true
			out = append(out, r)
		}
	}
	return out
}

// validEventType reports whether t is 1 to 64 characters of a-z, 0-9, _, . and -.
func validEventType(t string) bool {
	if len(t) < 1 || len(t) > 64 {
		return false
	}
	for _, c := range []byte(t) {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' && c != '.' && c != '-' {
			return false
		}
	}
	return true
}

// postEvent records an agent's progress event: 202 {"seq"}. Its token is its only auth,
// checked before anything else about the request.
func (s *server) postEvent(w http.ResponseWriter, r *http.Request) {
	id := strings.ToLower(r.PathValue("id"))
	step, attempt, ok := s.store.events.verify(id, bearer(r))
	if !ok || !isUUID(id) {
		s.fail(w, r, unauthorized("invalid events token"))
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxEventBody)
	var req struct {
		Type *string         `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	err := decode(r, &req, false)
	var bad *requestError
	if errors.As(err, &bad) && bad.status == http.StatusRequestEntityTooLarge {
		err = errEventTooLarge
	}
	if err == nil && (req.Type == nil || !validEventType(*req.Type)) {
		err = invalid("type must be 1 to 64 characters of a-z, 0-9, _, . and -")
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var data bytes.Buffer
	if len(req.Data) == 0 {
		data.WriteString("null")
	} else if err := json.Compact(&data, req.Data); err != nil {
		s.fail(w, r, badRequest("data: %v", err))
		return
	}
	seq, err := s.store.addEvent(r.Context(), id, step, attempt, *req.Type, data.Bytes())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]int{"seq": seq})
}

// runEvents answers a run's events after ?after= as a page, or with Accept:
// text/event-stream as a stream (after Last-Event-ID, when given).
func (s *server) runEvents(w http.ResponseWriter, r *http.Request) {
	ws, id := strings.ToLower(r.PathValue("ws")), strings.ToLower(r.PathValue("id"))
	after, err := intParam(r, "after", 0, 0, math.MaxInt32)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if !strings.Contains(r.Header.Get("Accept"), "text/event-stream") {
		p, err := s.store.progress(r.Context(), ws, id, after)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string][]runEvent{"events": p.events})
		return
	}
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		// The browser resends the URL it first opened: the header is the newer position.
		if after, err = strconv.Atoi(v); err != nil || after < 0 {
			s.fail(w, r, invalid("Last-Event-ID must be an event seq"))
			return
		}
	}
	s.streamRun(w, r, ws, id, after)
}

// streamRun streams run id's events after seq after, and its status frames, until the run
// is final and everything before that was sent, the client leaves, or the server stops.
func (s *server) streamRun(w http.ResponseWriter, r *http.Request, ws, id string, after int) {
	ctx := r.Context()
	var wake <-chan struct{}
	if s.notifier != nil {
		// Watching before the first read: nothing posted after it goes unnoticed.
		wt, stop := s.notifier.watch("run:" + id)
		defer stop()
		wake = wt.wake
	}
	p, err := s.store.progress(ctx, ws, id, after)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer s.streams.open()()
	sse := startSSE(w)
	keepAlive := time.NewTicker(sseKeepAlive)
	defer keepAlive.Stop()
	var sentStatus runStatus // the status and attempt the last status frame showed
	sentAttempt, ending := -1, false
	for {
		var status []byte
		again := false
		if p.status != sentStatus || p.attempt != sentAttempt {
			run, err := s.store.getRun(ctx, ws, id)
			if err != nil {
				s.streamFailed(r, err)
				return
			}
			if run.Status == p.status && run.Attempt == p.attempt {
				status, sentStatus, sentAttempt = withoutIO(run), run.Status, run.Attempt
			} else {
				again = true // it changed again since: read once more before saying so
			}
		}
		// A status frame goes after the events that came before it: all of them unless
		// the run is running, then those of earlier attempts.
		split := len(p.events)
		if p.status == statusRunning {
			split = sort.Search(len(p.events), func(i int) bool { return p.events[i].Attempt >= p.attempt })
		}
		var b bytes.Buffer
		for i, e := range p.events {
			if i == split && status != nil {
				frame(&b, "", "status", status)
				status = nil
			}
			data, _ := json.Marshal(e)
			frame(&b, strconv.Itoa(e.Seq), e.Type, data)
			after = e.Seq
		}
		if status != nil {
			frame(&b, "", "status", status)
		}
		if b.Len() > 0 && sse.send(b.Bytes()) != nil {
			return
		}
		if p.status.final() && sentStatus == p.status && !p.more {
			return
		}
		if ending && !p.more && !again {
			return
		}
		if !p.more && !again && !ending {
			var ok bool
			if ending, ok = s.waitStream(ctx, wake, keepAlive.C, sse); !ok {
				return
			}
		}
		rctx, cancel := readContext(ctx, ending)
		p, err = s.store.progress(rctx, ws, id, after)
		cancel()
		if err != nil {
			s.streamFailed(r, err)
			return
		}
	}
}

// readContext is the context of a stream's read: at shutdown (ending) a last read that
// cannot hold the shutdown up.
func readContext(ctx context.Context, ending bool) (context.Context, context.CancelFunc) {
	if ending {
		return context.WithTimeout(ctx, streamCatchUp)
	}
	return context.WithCancel(ctx)
}

// waitStream waits for news (a wake, or a poll interval while notifications are down),
// sending keep-alive comments meanwhile. ending says the server is stopping; !ok that the
// stream must end now (the client left, or a write failed).
func (s *server) waitStream(ctx context.Context, wake <-chan struct{}, keepAlive <-chan time.Time, sse *sseWriter) (ending, ok bool) {
	var poll <-chan time.Time
	if s.notifier == nil || !s.notifier.hears() {
		t := time.NewTimer(streamPoll)
		defer t.Stop()
		poll = t.C
	}
	for {
		select {
		case <-wake:
			return false, true
		case <-poll:
			return false, true
		case <-s.endPolls:
			return true, true
		case <-ctx.Done():
			return false, false
		case <-keepAlive:
			if sse.send([]byte(": keep-alive\n\n")) != nil {
				return false, false
			}
		}
	}
}

// workspaceEvents streams the workspace's run changes as `event: run` frames until the
// client leaves or the server stops.
func (s *server) workspaceEvents(w http.ResponseWriter, r *http.Request) {
	ws := strings.ToLower(r.PathValue("ws"))
	ctx := r.Context()
	wt := &watcher{wake: make(chan struct{}), runs: map[string]bool{}} // never woken
	if s.notifier != nil {
		var stop func()
		wt, stop = s.notifier.watch("ws:" + ws)
		defer stop()
	}
	defer s.streams.open()()
	sse := startSSE(w)
	keepAlive := time.NewTicker(sseKeepAlive)
	defer keepAlive.Stop()
	for {
		ending, ok := s.waitStream(ctx, wt.wake, keepAlive.C, sse)
		if !ok {
			return
		}
		ids, lost := wt.take()
		if len(ids) > 0 || lost {
			rctx, cancel := readContext(ctx, ending)
			runs, err := s.store.runsOf(rctx, ws, ids, lost)
			cancel()
			if err != nil {
				s.streamFailed(r, err)
				return
			}
			var b bytes.Buffer
			for _, run := range runs {
				frame(&b, "", "run", withoutIO(run))
			}
			if b.Len() > 0 && sse.send(b.Bytes()) != nil {
				return
			}
		}
		if ending {
			return
		}
	}
}

// streamFailed logs why a stream ended early, unless the client left; the client
// reconnects (EventSource does) and resumes with Last-Event-ID.
func (s *server) streamFailed(r *http.Request, err error) {
	if r.Context().Err() != nil {
		return
	}
	if ok, suppressed := s.dbLog.allow("stream"); ok {
		s.log.Warn("stream ended: reading the database failed", "path", r.URL.Path, "err", err, "suppressed", suppressed)
	}
}

// withoutIO is the run as stream frames show it: without input and output.
func withoutIO(r runRecord) []byte {
	b, _ := json.Marshal(r)
	var m map[string]json.RawMessage
	json.Unmarshal(b, &m)
	delete(m, "input")
	delete(m, "output")
	b, _ = json.Marshal(m)
	return b
}

// frame appends one Server-Sent Events frame; data is one line of JSON.
func frame(b *bytes.Buffer, id, event string, data []byte) {
	if id != "" {
		b.WriteString("id: " + id + "\n")
	}
	b.WriteString("event: " + event + "\ndata: ")
	b.Write(data)
	b.WriteString("\n\n")
}

// sseWriter writes a stream's frames, each flushed at once.
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

// startSSE answers the stream's headers and flushes them, so the client knows it is
// subscribed.
func startSSE(w http.ResponseWriter) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // a proxy in front must not hold frames back
	w.WriteHeader(http.StatusOK)
	sse := &sseWriter{w: w, rc: http.NewResponseController(w)}
	sse.rc.Flush()
	return sse
}

// send writes b and flushes it.
func (s *sseWriter) send(b []byte) error {
	if _, err := s.w.Write(b); err != nil {
		return err
	}
	return s.rc.Flush()
}

// streamSet counts the streams open in this process, so that shutdown can wait for them
// and say how long they took to close.
type streamSet struct {
	mu    sync.Mutex
	n     int
	empty chan struct{} // closed when n drops to 0; nil while nobody waits
}

// open counts a stream; the function returned uncounts it.
func (s *streamSet) open() func() {
	s.mu.Lock()
	s.n++
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.n--
		if s.n == 0 && s.empty != nil {
			close(s.empty)
			s.empty = nil
		}
	}
}

// wait returns once no stream is open, with how many were open when it was called.
func (s *streamSet) wait() int {
	s.mu.Lock()
	n := s.n
	if n == 0 {
		s.mu.Unlock()
		return 0
	}
	if s.empty == nil {
		s.empty = make(chan struct{})
	}
	ch := s.empty
	s.mu.Unlock()
	<-ch
	return n
}
