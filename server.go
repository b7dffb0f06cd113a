package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxBody is the largest request body accepted.
const maxBody = 1 << 20

// server holds what the HTTP handlers need.
type server struct {
	st       *store
	log      *slog.Logger
	cfg      config
	w        *worker
	n        *notifier // nil: no notifications, ?wait_ms polls
	m        *metrics
	embedded bool
	keys     sync.Map      // hex sha256 of a workspace API key → workspace id (keys never change)
	endPolls chan struct{} // closed at shutdown once the runs are drained; nil: never
}

// handler returns agentapp's HTTP API: every route is listed here.
func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.HandleFunc("GET /metrics", s.metricsHandler)
	mux.HandleFunc("POST /v1/workspaces", s.admin(s.createWorkspace))
	mux.HandleFunc("GET /v1/workspaces/{ws}", s.member(s.getWorkspace))
	mux.HandleFunc("POST /v1/workspaces/{ws}/agents", s.member(s.createAgent))
	mux.HandleFunc("GET /v1/workspaces/{ws}/agents", s.member(s.listAgents))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs", s.member(s.createRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/batch", s.member(s.createRuns))
	mux.HandleFunc("GET /v1/workspaces/{ws}/runs", s.member(s.listRuns))
	mux.HandleFunc("GET /v1/workspaces/{ws}/runs/{id}", s.member(s.getRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/{id}/cancel", s.member(s.cancelRun))
	mux.HandleFunc("GET /v1/workspaces/{ws}/stats", s.member(s.stats))
	mux.HandleFunc("POST /v1/worker/process", s.admin(s.process))
	return s.middleware(mux)
}

// middleware answers unknown routes in the API's error format, limits bodies, turns a
// handler's panic into a 500 and logs requests at debug level.
func (s *server) middleware(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				s.log.Error("handler panicked", "method", r.Method, "path", r.URL.Path, "panic", p)
				writeError(w, http.StatusInternalServerError, "internal", "internal error")
			}
		}()
		if r.ContentLength > maxBody {
			writeError(w, http.StatusRequestEntityTooLarge, "payload_too_large", "request body is over 1 MiB")
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		h, pattern := mux.Handler(r)
		if pattern == "" {
			// The mux's own 404 or 405: keep its status and Allow header, answer in JSON.
			probe := &statusOnly{header: http.Header{}}
			h.ServeHTTP(probe, r)
			if allow := probe.header.Get("Allow"); allow != "" {
				w.Header().Set("Allow", allow)
			}
			if probe.code == http.StatusMethodNotAllowed {
				writeError(w, probe.code, "method_not_allowed", r.Method+" is not allowed on "+r.URL.Path)
			} else {
				writeError(w, http.StatusNotFound, "not_found", "no such endpoint: "+r.URL.Path)
			}
			return
		}
		mux.ServeHTTP(w, r)
		s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "duration", time.Since(start))
	})
}

// statusOnly records the status a handler writes and discards the body.
type statusOnly struct {
	header http.Header
	code   int
}

func (s *statusOnly) Header() http.Header         { return s.header }
func (s *statusOnly) Write(b []byte) (int, error) { return len(b), nil }
func (s *statusOnly) WriteHeader(code int)        { s.code = code }

// writeJSON answers v as JSON with the given status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// writeError answers the API's error format.
func writeError(w http.ResponseWriter, status int, code, message string) {
	type body struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	writeJSON(w, status, map[string]body{"error": {code, message}})
}

// fail answers err: known errors get their 4xx, an unreachable database 503, anything
// else a 500 whose details are logged, never shown.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var unknown unknownAgentError
	var bad *requestError
	dataMsg, isData := dataException(err)
	switch {
	case errors.As(err, &bad):
		writeError(w, bad.status, bad.code, bad.message)
	case isData:
		writeError(w, http.StatusUnprocessableEntity, "invalid", "a value in the request cannot be stored: "+dataMsg)
	case errors.Is(err, errNotFound):
		writeError(w, http.StatusNotFound, "not_found", "not found")
	case errors.As(err, &unknown):
		writeError(w, http.StatusUnprocessableEntity, "unknown_agent", unknown.Error())
	case isUnavailable(err):
		s.log.Warn("database unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the database is unavailable; try again shortly")
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, "internal", "internal error")
	}
}

// requestError is a client's mistake, answered with its status.
type requestError struct {
	status        int
	code, message string
}

func (e *requestError) Error() string { return e.message }

func invalid(format string, args ...any) error {
	return &requestError{http.StatusUnprocessableEntity, "invalid", fmt.Sprintf(format, args...)}
}

func badRequest(format string, args ...any) error {
	return &requestError{http.StatusBadRequest, "bad_request", fmt.Sprintf(format, args...)}
}

// decode reads one JSON value from the body into v: unknown fields, trailing data and
// malformed JSON are 400, a wrong type 422, a body over the limit 413. An empty body is
// allowed only when emptyOK.
func decode(r *http.Request, v any, emptyOK bool) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	var tooBig *http.MaxBytesError
	if err == nil {
		// Trailing space past the limit is still a body over 1 MiB: 413, not 400.
		if rest := dec.Decode(&json.RawMessage{}); errors.As(rest, &tooBig) {
			err = rest
		} else if rest != io.EOF {
			err = errors.New("trailing data after the JSON value")
		}
	}
	var typeErr *json.UnmarshalTypeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &tooBig):
		return &requestError{http.StatusRequestEntityTooLarge, "payload_too_large", "request body is over 1 MiB"}
	case errors.Is(err, io.EOF) && emptyOK:
		return nil
	case errors.Is(err, io.EOF):
		return badRequest("request body is empty: want a JSON object")
	case errors.As(err, &typeErr) && typeErr.Field == "":
		return invalid("request body must be a JSON object, got %s", typeErr.Value)
	case errors.As(err, &typeErr):
		return invalid("%s: want %s, got %s", typeErr.Field, typeErr.Type, typeErr.Value)
	default:
		return badRequest("malformed request body: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
}

// bearer returns the request's bearer token.
func bearer(r *http.Request) string {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") { // auth schemes are case-insensitive
		return ""
	}
	return strings.TrimSpace(token)
}

func (s *server) isAdmin(token string) bool {
	return s.cfg.AdminToken != "" && subtle.ConstantTimeCompare([]byte(token), []byte(s.cfg.AdminToken)) == 1
}

// admin guards the admin API.
func (s *server) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.isAdmin(bearer(r)) {
			writeError(w, http.StatusUnauthorized, "unauthorized", "an admin token is required")
			return
		}
		h(w, r)
	}
}

// member guards a workspace's endpoints: the admin token, or the workspace's own key.
// Another workspace's key gets 404, as if the workspace did not exist. Keys are found by
// their hash, so the secret itself is never compared byte by byte.
func (s *server) member(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token := bearer(r)
		if token == "" {
			writeError(w, http.StatusUnauthorized, "unauthorized", "missing bearer token")
			return
		}
		ws, id := r.PathValue("ws"), r.PathValue("id")
		if !isUUID(ws) || (id != "" && !isUUID(id)) {
			writeError(w, http.StatusNotFound, "not_found", "not found")
			return
		}
		if s.isAdmin(token) {
			// A key always names an existing workspace; the admin may name any id, and
			// one that does not exist is 404, not an empty list.
			if _, _, err := s.st.getWorkspace(r.Context(), ws); err != nil {
				s.fail(w, r, err)
				return
			}
			h(w, r)
			return
		}
		sum := sha256.Sum256([]byte(token))
		hash := hex.EncodeToString(sum[:])
		owner, ok := s.keys.Load(hash)
		if !ok {
			id, err := s.st.workspaceByKey(r.Context(), sum[:])
			if errors.Is(err, errNotFound) {
				writeError(w, http.StatusUnauthorized, "unauthorized", "invalid token")
				return
			}
			if err != nil {
				s.fail(w, r, err)
				return
			}
			s.keys.Store(hash, id)
			owner = id
		}
		if !strings.EqualFold(owner.(string), ws) {
			writeError(w, http.StatusNotFound, "not_found", "not found")
			return
		}
		h(w, r)
	}
}

func (s *server) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// readyz is 200 when the database answers and, with an embedded worker, its loop has
// completed a cycle recently.
func (s *server) readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	body := map[string]any{"status": "ok", "database": "ok"}
	status := http.StatusOK
	if err := s.st.db.PingContext(ctx); err != nil {
		body["database"], body["status"], status = "unreachable", "unavailable", http.StatusServiceUnavailable
	}
	if s.embedded {
		alive, last := s.w.alive()
		state := map[string]any{"embedded": true, "alive": alive, "executing": s.w.executingCount(),
			"listening": s.n != nil && s.n.listening.Load(), "last_cycle_at": nil}
		if !last.IsZero() && last.Unix() > 0 {
			state["last_cycle_at"] = last.UTC().Format(time.RFC3339Nano)
		}
		body["worker"] = state
		if !alive {
			body["status"], status = "unavailable", http.StatusServiceUnavailable
		}
	} else {
		body["worker"] = map[string]any{"embedded": false}
	}
	writeJSON(w, status, body)
}

func (s *server) metricsHandler(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	writeMetrics(r.Context(), w, s.st, s.m)
}

func (s *server) createWorkspace(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Name string `json:"name"`
	}
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	if err := checkName(req.Name); err != nil {
		s.fail(w, r, err)
		return
	}
	ws, err := s.st.createWorkspace(r.Context(), req.Name)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, ws)
}

// checkName validates the name of a workspace or an agent.
func checkName(name string) error {
	if strings.TrimSpace(name) == "" || len(name) > 200 {
		return invalid("name must be 1 to 200 characters")
	}
	return nil
}

func (s *server) getWorkspace(w http.ResponseWriter, r *http.Request) {
	ws, _, err := s.st.getWorkspace(r.Context(), r.PathValue("ws"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, ws)
}

func (s *server) createAgent(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Name   string          `json:"name"`
		Kind   string          `json:"kind"`
		Config json.RawMessage `json:"config"`
	}
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	if err := checkName(req.Name); err != nil {
		s.fail(w, r, err)
		return
	}
	if len(req.Config) == 0 || string(req.Config) == "null" {
		req.Config = json.RawMessage("{}")
	}
	if req.Config[0] != '{' {
		s.fail(w, r, invalid("config must be a JSON object"))
		return
	}
	if err := validateAgent(req.Kind, req.Config, s.cfg.WebhookHosts); err != nil {
		s.fail(w, r, invalid("%s", err.Error()))
		return
	}
	a, err := s.st.createAgent(r.Context(), agent{WorkspaceID: r.PathValue("ws"), Name: req.Name, Kind: req.Kind, Config: req.Config})
	switch {
	case errors.Is(err, errConflict):
		writeError(w, http.StatusConflict, "conflict", fmt.Sprintf("agent %q already exists", req.Name))
	case err != nil:
		s.fail(w, r, err)
	default:
		writeJSON(w, http.StatusCreated, a)
	}
}

func (s *server) listAgents(w http.ResponseWriter, r *http.Request) {
	agents, err := s.st.listAgents(r.Context(), r.PathValue("ws"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]agent{"agents": agents})
}

// runRequest is the body that creates one run.
type runRequest struct {
	Agent       string          `json:"agent"`
	Input       json.RawMessage `json:"input"`
	MaxAttempts *int            `json:"max_attempts"`
}

// validate turns a request into a newRun; where names the request in error messages.
func (q runRequest) validate(where string) (newRun, error) {
	n := newRun{Agent: q.Agent, Input: q.Input, MaxAttempts: 3}
	if q.Agent == "" {
		return n, invalid("%sagent is required", where)
	}
	if q.MaxAttempts != nil {
		if *q.MaxAttempts < 1 || *q.MaxAttempts > 25 {
			return n, invalid("%smax_attempts must be from 1 to 25", where)
		}
		n.MaxAttempts = *q.MaxAttempts
	}
	if len(n.Input) == 0 {
		n.Input = json.RawMessage("null")
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, n.Input); err != nil {
		return n, badRequest("%sinput: %v", where, err)
	}
	n.Input = buf.Bytes()
	return n, nil
}

func (s *server) createRun(w http.ResponseWriter, r *http.Request) {
	var req runRequest
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	n, err := req.validate("")
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if key := r.Header.Get("Idempotency-Key"); key != "" {
		if len(key) > 255 {
			s.fail(w, r, invalid("Idempotency-Key must be at most 255 characters"))
			return
		}
		sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%d\x00%s", n.Agent, n.MaxAttempts, n.Input))
		n.IdempotencyKey, n.RequestHash = key, sum[:]
	}
	run, created, err := s.st.createRun(r.Context(), r.PathValue("ws"), n)
	switch {
	case errors.Is(err, errConflict):
		writeError(w, http.StatusConflict, "idempotency_conflict", "Idempotency-Key was already used with a different request")
	case err != nil:
		s.fail(w, r, err)
	case created:
		writeJSON(w, http.StatusCreated, run)
	default:
		writeJSON(w, http.StatusOK, run)
	}
}

func (s *server) createRuns(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Idempotency-Key") != "" {
		// Ignoring it would let a retried batch create every run twice.
		s.fail(w, r, invalid("Idempotency-Key is not supported on the batch endpoint: the batch is all or nothing; use POST …/runs for idempotent single runs"))
		return
	}
	var req struct {
		Runs []runRequest `json:"runs"`
	}
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	if len(req.Runs) < 1 || len(req.Runs) > 1000 {
		s.fail(w, r, invalid("runs must hold 1 to 1000 runs, got %d", len(req.Runs)))
		return
	}
	ns := make([]newRun, len(req.Runs))
	for i, q := range req.Runs {
		n, err := q.validate(fmt.Sprintf("runs[%d].", i))
		if err != nil {
			s.fail(w, r, err)
			return
		}
		ns[i] = n
	}
	runs, err := s.st.createRuns(r.Context(), r.PathValue("ws"), ns)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, map[string][]runRecord{"runs": runs})
}

// intParam reads an optional integer query parameter within [lo, hi].
func intParam(r *http.Request, name string, def, lo, hi int) (int, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return 0, invalid("%s must be an integer from %d to %d", name, lo, hi)
	}
	return n, nil
}

func (s *server) listRuns(w http.ResponseWriter, r *http.Request) {
	status := r.URL.Query().Get("status")
	switch status {
	case "", "queued", "running", "succeeded", "failed", "canceled":
	default:
		s.fail(w, r, invalid("status must be one of queued, running, succeeded, failed, canceled"))
		return
	}
	limit, err := intParam(r, "limit", 50, 1, 200)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	cursor, ok := parseCursor(r.URL.Query().Get("cursor"))
	if !ok {
		s.fail(w, r, invalid("cursor is not one this API returned"))
		return
	}
	runs, next, err := s.st.listRuns(r.Context(), r.PathValue("ws"), status, limit, cursor)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var nextCursor *string
	if next > 0 {
		c := strconv.FormatInt(next, 10)
		nextCursor = &c
	}
	writeJSON(w, http.StatusOK, map[string]any{"runs": runs, "next_cursor": nextCursor})
}

func (s *server) getRun(w http.ResponseWriter, r *http.Request) {
	wait, err := intParam(r, "wait_ms", 0, 0, 60000)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	run, err := s.waitRun(r.Context(), r.PathValue("ws"), r.PathValue("id"), time.Duration(wait)*time.Millisecond)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, run)
}

// waitRun returns the run once it is final or wait has passed. It sleeps on the run's
// final notification; while notifications are down it re-reads the run twice a second.
func (s *server) waitRun(ctx context.Context, ws, id string, wait time.Duration) (runRecord, error) {
	deadline := time.Now().Add(wait)
	for {
		var woken <-chan struct{}
		unsubscribe := func() {}
		if s.n != nil && wait > 0 {
			woken, unsubscribe = s.n.subscribe(id)
		}
		r, err := s.st.getRun(ctx, ws, id)
		remaining := time.Until(deadline)
		if err != nil || r.final() || remaining <= 0 || ctx.Err() != nil {
			unsubscribe()
			return r, err
		}
		recheck := remaining
		if s.n == nil || !s.n.listening.Load() {
			recheck = min(remaining, 500*time.Millisecond)
		}
		t := time.NewTimer(recheck)
		select {
		case <-woken:
		case <-t.C:
		case <-ctx.Done():
			// The client left: answer the run as it stands.
			ctx = context.WithoutCancel(ctx)
			deadline = time.Now()
		case <-s.endPolls:
			// The server is shutting down: answer the run as it stands.
			deadline = time.Now()
		}
		t.Stop()
		unsubscribe()
	}
}

func (s *server) cancelRun(w http.ResponseWriter, r *http.Request) {
	run, err := s.st.cancelRun(r.Context(), r.PathValue("ws"), r.PathValue("id"))
	switch {
	case errors.Is(err, errConflict):
		writeError(w, http.StatusConflict, "conflict", "run is already "+string(run.Status))
	case err != nil:
		s.fail(w, r, err)
	default:
		if run.Status == "running" {
			s.w.cancelLocal(run.ID) // other processes hear of it through the notification
		}
		writeJSON(w, http.StatusOK, run)
	}
}

func (s *server) stats(w http.ResponseWriter, r *http.Request) {
	st, err := s.st.stats(r.Context(), r.PathValue("ws"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// process runs one worker cycle now and answers its summary once the runs it claimed
// have finished.
func (s *server) process(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Limit       *int   `json:"limit"`
		WorkspaceID string `json:"workspace_id"`
	}
	if err := decode(r, &req, true); err != nil {
		s.fail(w, r, err)
		return
	}
	limit := s.cfg.BatchLimit
	if req.Limit != nil {
		if *req.Limit < 1 || *req.Limit > 1000 {
			s.fail(w, r, invalid("limit must be from 1 to 1000"))
			return
		}
		limit = *req.Limit
	}
	ws := s.cfg.WorkspaceID
	if req.WorkspaceID != "" {
		if !isUUID(req.WorkspaceID) {
			s.fail(w, r, invalid("workspace_id must be a UUID"))
			return
		}
		ws = strings.ToLower(req.WorkspaceID)
		// RUN_WORKER_WORKSPACE_ID binds this process's worker, whoever triggers it.
		if s.cfg.WorkspaceID != "" && ws != s.cfg.WorkspaceID {
			s.fail(w, r, invalid("workspace_id: this process only processes the runs of workspace %s (RUN_WORKER_WORKSPACE_ID)", s.cfg.WorkspaceID))
			return
		}
	}
	sum, err := s.w.process(r.Context(), limit, ws)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, sum)
}
