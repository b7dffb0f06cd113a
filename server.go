package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"path"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/lib/pq"
)

// maxBody is the largest request body accepted.
const maxBody = 1 << 20

// The HTTP server's limits, all in one place. There is no global ReadTimeout or
// WriteTimeout: either would cut a long poll (?wait_ms) or a stream that is progressing.
// Slow clients are bounded per phase instead.
const (
	// headerTimeout cuts a client that takes longer than this to send its request headers
	// (SPEC: 10 s), so half-open requests cannot pile up.
	headerTimeout = 10 * time.Second
	// idleTimeout closes a keep-alive connection that sends no next request (SPEC: 2 min).
	idleTimeout = 2 * time.Minute
	// writeStall cuts a client that stops reading its answer: every Write and Flush must
	// complete within this (SPEC: 30 s), however long the whole answer takes.
	writeStall = 30 * time.Second
	// bodyTimeout bounds the upload of a request body (at most maxBody): 1 MiB in 30 s is
	// ~35 KiB/s, slower than any client we serve. The deadline is cleared once the body is
	// read, so it never cuts the handler's work after it.
	bodyTimeout = 30 * time.Second
	// keyCacheTTL is how long a workspace key is trusted without asking the database: a
	// rotated key or a deleted workspace stops authenticating within it in every process.
	keyCacheTTL = time.Second
	// logEvery is the least time between two log lines of one kind of repeated failure
	// (database unavailable; failed authentication per client address).
	logEvery = time.Second
)

// newHTTPServer returns the HTTP server for h with agentapp's limits.
func newHTTPServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: headerTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// server holds what the HTTP handlers need.
type server struct {
	store    *store
	worker   *worker
	notifier *notifier // nil: no notifications, ?wait_ms polls
	announce *announcer
	metrics  *metrics
	log      *slog.Logger
	cfg      config
	endPolls chan struct{} // closed at shutdown once the runs are drained; nil: never
	streams  streamSet     // the streams open now (events.go)

	keys    keyCache    // workspace keys recently found, by hash
	dbLog   *logLimiter // "database unavailable" lines
	authLog *logLimiter // "authentication failed" lines, per client address
	routes  []string    // every pattern handler registered, in order (for the OpenAPI test)
}

// handler returns agentapp's HTTP API: every route is listed here.
func (s *server) handler() http.Handler {
	s.dbLog, s.authLog = newLogLimiter(logEvery), newLogLimiter(logEvery)
	mux := routeMux{http.NewServeMux(), &s.routes}
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.HandleFunc("GET /metrics", s.metricsHandler)
	mux.HandleFunc("POST /v1/workspaces", s.admin(s.createWorkspace))
	mux.HandleFunc("GET /v1/workspaces/{ws}", s.member(s.getWorkspace))
	mux.HandleFunc("POST /v1/workspaces/{ws}/rotate-key", s.member(s.rotateKey))
	mux.HandleFunc("POST /v1/workspaces/{ws}/agents", s.member(s.createAgent))
	mux.HandleFunc("GET /v1/workspaces/{ws}/agents", s.member(s.listAgents))
	mux.HandleFunc("GET /v1/workspaces/{ws}/agents/{name}", s.member(s.getAgent))
	mux.HandleFunc("PATCH /v1/workspaces/{ws}/agents/{name}", s.member(s.updateAgent))
	mux.HandleFunc("POST /v1/workspaces/{ws}/agents/{name}/rotate-secret", s.member(s.rotateSecret))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs", s.member(s.createRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/batch", s.member(s.createRuns))
	mux.HandleFunc("GET /v1/workspaces/{ws}/runs", s.member(s.listRuns))
	mux.HandleFunc("GET /v1/workspaces/{ws}/runs/{id}", s.member(s.getRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/{id}/cancel", s.member(s.cancelRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/{id}/retry", s.member(s.retryRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/{id}/signal", s.member(s.signalRun))
	mux.HandleFunc("POST /v1/workspaces/{ws}/runs/cancel", s.member(s.cancelRuns))
	mux.HandleFunc("POST /v1/workspaces/{ws}/schedules", s.member(s.createSchedule))
	mux.HandleFunc("GET /v1/workspaces/{ws}/schedules", s.member(s.listSchedules))
	mux.HandleFunc("GET /v1/workspaces/{ws}/schedules/{name}", s.member(s.getSchedule))
	mux.HandleFunc("PATCH /v1/workspaces/{ws}/schedules/{name}", s.member(s.updateSchedule))
	mux.HandleFunc("DELETE /v1/workspaces/{ws}/schedules/{name}", s.member(s.deleteSchedule))
	mux.HandleFunc("GET /v1/workspaces/{ws}/stats", s.member(s.stats))
	mux.HandleFunc("POST /v1/worker/process", s.admin(s.process))
	mux.HandleFunc("GET /v1/workers", s.admin(s.listWorkers))
	mux.HandleFunc("GET /openapi.json", s.openAPI)
	// Progress events (events.go): agents post with their events token, not a workspace key.
	mux.HandleFunc("POST /v1/runs/{id}/events", s.postEvent)
	mux.HandleFunc("GET /v1/workspaces/{ws}/runs/{id}/events", s.member(s.runEvents))
	mux.HandleFunc("GET /v1/workspaces/{ws}/events", s.member(s.workspaceEvents))
	mux.ServeMux.Handle("/ui/", s.console()) // unrecorded: console() records each of its routes
	// A browser pointed at the bare address meets the console, not a JSON 404.
	mux.Handle("GET /{$}", http.RedirectHandler("/ui/", http.StatusSeeOther))
	return s.middleware(mux.ServeMux)
}

// middleware bounds the client's writes and body upload, limits bodies, turns a handler's
// panic into a 500, answers unknown and unclean paths in the API's error format (after
// authentication under /v1/, so a bad token learns nothing of which paths exist) and logs
// requests at debug level.
func (s *server) middleware(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w := &deadlineWriter{ResponseWriter: rw, rc: http.NewResponseController(rw)}
		w.extend() // also for an answer that never calls Write
		defer w.extend()
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
			s.fail(w, r, tooLarge())
			return
		}
		if r.ContentLength != 0 {
			// Cleared once the body is read: left in place, the server's background read
			// would cancel the request's context when it passed.
			w.rc.SetReadDeadline(time.Now().Add(bodyTimeout))
			r.Body = &deadlineBody{ReadCloser: r.Body, rc: w.rc}
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		if p := r.URL.EscapedPath(); r.Method != http.MethodConnect && p != cleanPath(p) {
			// The mux would redirect it (HTML 307); no endpoint lives at such a path.
			s.fail(w, r, fmt.Errorf("%w: no such endpoint: %s", errNotFound, r.URL.Path))
			return
		}
		h, pattern := mux.Handler(r)
		if pattern == "" {
			if strings.HasPrefix(r.URL.Path, "/v1/") {
				if _, err := s.authenticate(r); err != nil {
					s.fail(w, r, err)
					return
				}
			}
			// The mux's own 404 or 405: keep its status and Allow header, answer in JSON.
			probe := &statusOnly{header: http.Header{}}
			h.ServeHTTP(probe, r)
			if allow := probe.header.Get("Allow"); allow != "" {
				w.Header().Set("Allow", allow)
			}
			if probe.code == http.StatusMethodNotAllowed {
				s.fail(w, r, &requestError{http.StatusMethodNotAllowed, "method_not_allowed", r.Method + " is not allowed on " + r.URL.Path})
			} else {
				s.fail(w, r, fmt.Errorf("%w: no such endpoint: %s", errNotFound, r.URL.Path))
			}
			return
		}
		mux.ServeHTTP(w, r)
		s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "duration", time.Since(start))
	})
}

// cleanPath is p as the mux would canonicalize it: no //, /./ or /.. elements, the
// trailing slash kept.
func cleanPath(p string) string {
	if p == "" || p == "*" {
		return p
	}
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c
}

// deadlineWriter gives every Write and Flush writeStall to complete, so a client that
// stops reading is cut while a slow but progressing answer (a long poll, a stream) is not.
type deadlineWriter struct {
	http.ResponseWriter
	rc     *http.ResponseController
	failed bool // a write failed: the deadline stays passed, so the connection is closed
}

// extend moves the write deadline writeStall ahead, unless a write already failed.
func (w *deadlineWriter) extend() {
	if !w.failed {
		w.rc.SetWriteDeadline(time.Now().Add(writeStall))
	}
}

// WriteHeader extends the deadline: a header-only answer is written after it.
func (w *deadlineWriter) WriteHeader(code int) {
	w.extend()
	w.ResponseWriter.WriteHeader(code)
}

// Write extends the deadline, then writes.
func (w *deadlineWriter) Write(b []byte) (int, error) {
	w.extend()
	n, err := w.ResponseWriter.Write(b)
	w.failed = w.failed || err != nil
	return n, err
}

// Flush extends the deadline, then flushes.
func (w *deadlineWriter) Flush() {
	w.extend()
	w.failed = w.failed || w.rc.Flush() != nil
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (w *deadlineWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// deadlineBody clears the body's read deadline once the body has been read. After a
// failed read the deadline stays: the server then reads what is left of the body before
// it answers, and that read must stay bounded too.
type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

// Read reads the body and clears the read deadline at its end.
func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}

// statusOnly records the status a handler writes and discards the body.
type statusOnly struct {
	header http.Header
	code   int
}

// Header returns the recorded header.
func (s *statusOnly) Header() http.Header { return s.header }

// Write discards b.
func (s *statusOnly) Write(b []byte) (int, error) { return len(b), nil }

// WriteHeader records code.
func (s *statusOnly) WriteHeader(code int) { s.code = code }

// writeJSON answers v as JSON with the given status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// answer writes v as JSON with status, or, when err is set, the error (see fail).
func (s *server) answer(w http.ResponseWriter, r *http.Request, status int, v any, err error) {
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, status, v)
}

// writeError answers the API's error format.
func writeError(w http.ResponseWriter, status int, code, message string) {
	type body struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	writeJSON(w, status, map[string]body{"error": {code, message}})
}

// errKeyReused is an Idempotency-Key used before with another request.
var errKeyReused = fmt.Errorf("%w: Idempotency-Key was already used with a different request", errConflict)

// fail answers err; it is the one place where errors become statuses. A client's mistake
// (requestError) carries its own; errNotFound and errConflict, wrapped with a message or
// not, are 404 and 409; values PostgreSQL cannot store 422; an unreachable database 503;
// anything else a 500 whose details are logged, never shown.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var unknown unknownAgentError
	var busy keyBusyError
	var bad *requestError
	var pqErr *pq.Error
	dataMsg, isData := dataException(err)
	switch {
	case errors.As(err, &bad):
		if bad.status == http.StatusUnauthorized {
			s.logAuthFailure(r, bad.message)
		}
		writeError(w, bad.status, bad.code, bad.message)
	case isData:
		writeError(w, http.StatusUnprocessableEntity, "invalid", "a value in the request cannot be stored: "+dataMsg)
	case errors.Is(err, errNotFound), errors.As(err, &pqErr) && pqErr.Code == "23503":
		// 23503, a foreign key violation: the workspace was deleted under the request.
		writeError(w, http.StatusNotFound, "not_found", messageOf(err, errNotFound, "not found"))
	case errors.Is(err, errKeyReused):
		writeError(w, http.StatusConflict, "idempotency_conflict", messageOf(err, errConflict, "conflict"))
	case errors.Is(err, errConflict):
		writeError(w, http.StatusConflict, "conflict", messageOf(err, errConflict, "conflict"))
	case errors.As(err, &unknown):
		writeError(w, http.StatusUnprocessableEntity, "unknown_agent", unknown.Error())
	case errors.As(err, &busy):
		writeError(w, http.StatusConflict, "key_busy", busy.Error())
	case isUnavailable(err):
		if ok, suppressed := s.dbLog.allow(""); ok {
			s.log.Warn("database unavailable", "method", r.Method, "path", r.URL.Path, "err", err, "suppressed", suppressed)
		}
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the database is unavailable; try again shortly")
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, "internal", "internal error")
	}
}

// messageOf is the message that wraps sentinel in err ("not found: run x" → "run x"), or
// def when err is the bare sentinel.
func messageOf(err, sentinel error, def string) string {
	if msg, ok := strings.CutPrefix(err.Error(), sentinel.Error()+": "); ok {
		return msg
	}
	return def
}

// logAuthFailure logs a failed authentication, at most once per logEvery per client address.
func (s *server) logAuthFailure(r *http.Request, why string) {
	addr, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		addr = r.RemoteAddr
	}
	if ok, suppressed := s.authLog.allow(addr); ok {
		s.log.Warn("authentication failed", "addr", addr, "method", r.Method, "path", r.URL.Path, "reason", why, "suppressed", suppressed)
	}
}

// requestError is a client's mistake, answered with its status; the constructors below
// are the only places that choose one.
type requestError struct {
	status        int
	code, message string
}

// Error returns the message.
func (e *requestError) Error() string { return e.message }

// invalid is a well-formed request with a value out of its range: 422.
func invalid(format string, args ...any) error {
	return &requestError{http.StatusUnprocessableEntity, "invalid", fmt.Sprintf(format, args...)}
}

// badRequest is a malformed request: 400.
func badRequest(format string, args ...any) error {
	return &requestError{http.StatusBadRequest, "bad_request", fmt.Sprintf(format, args...)}
}

// tooLarge is a body over maxBody: 413.
func tooLarge() error {
	return &requestError{http.StatusRequestEntityTooLarge, "payload_too_large", "request body is over 1 MiB"}
}

// unauthorized is no or a wrong token: 401.
func unauthorized(message string) error {
	return &requestError{http.StatusUnauthorized, "unauthorized", message}
}

// bodyTimedOut is a body not received within bodyTimeout: 408.
func bodyTimedOut() error {
	return &requestError{http.StatusRequestTimeout, "request_timeout", "request body not received in time"}
}

// maxJSONDepth is how deeply a request body may nest, as encoding/json's own limit.
const maxJSONDepth = 10000

// decode reads one JSON value from the body into v: malformed JSON, unknown fields (keys
// are matched exactly, case-sensitively), a key given twice and trailing data are 400, a
// wrong type 422, a body over the limit 413. An empty body is allowed only when emptyOK.
func decode(r *http.Request, v any, emptyOK bool) error {
	data, err := io.ReadAll(r.Body)
	var tooBig *http.MaxBytesError
	var netErr net.Error
	switch {
	case errors.As(err, &tooBig):
		return tooLarge()
	case errors.As(err, &netErr) && netErr.Timeout():
		return bodyTimedOut()
	case err != nil:
		return badRequest("reading the request body: %v", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		if emptyOK {
			return nil
		}
		return badRequest("request body is empty: want a JSON object")
	}
	return decodeJSON(data, v)
}

// decodeJSON is decode's reading of one JSON value, for a body already read (a request's,
// or a webhook's 202, held to the same strictness).
func decodeJSON(data []byte, v any) error {
	if err := checkKeys(data, reflect.TypeOf(v)); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.Decode(&json.RawMessage{}) != io.EOF {
		err = errors.New("trailing data after the JSON value")
	}
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &syntaxErr) && strings.HasSuffix(syntaxErr.Error(), "exceeded max depth"):
		return badRequest("request body is nested too deeply (over %d levels)", maxJSONDepth)
	case errors.As(err, &typeErr) && typeErr.Field == "":
		return invalid("request body must be a JSON object, got %s", typeErr.Value)
	case errors.As(err, &typeErr):
		return invalid("%s: want %s, got %s", typeErr.Field, typeErr.Type, typeErr.Value)
	default:
		return badRequest("malformed request body: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
}

// checkKeys refuses a key given twice in any object of the JSON value in data and, where
// the value decodes into a struct of t, a key that is not exactly one of its fields' JSON
// names (encoding/json would accept {"AGENT":…} for "agent"). Malformed JSON is left to
// the decoder, whose message says where.
func checkKeys(data []byte, t reflect.Type) error {
	if !json.Valid(data) {
		return nil
	}
	c := keyChecker{data: data, fields: map[reflect.Type]map[string]reflect.Type{}}
	return c.value(t)
}

// keyChecker walks a valid JSON text for checkKeys byte by byte, without allocating per
// token as encoding/json's Token does (a batch of 1,000 runs spent more time there than in
// decoding). path is where it is, for messages.
type keyChecker struct {
	data   []byte
	pos    int
	path   []pathStep
	fields map[reflect.Type]map[string]reflect.Type // jsonFields, per struct type met
}

// pathStep is a key (its text, unescaped) or, when index is not -1, an index in an array.
type pathStep struct {
	key   []byte
	index int
}

// value reads one value; t is the Go type it decodes into (nil: any).
func (c *keyChecker) value(t reflect.Type) error {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	c.skipSpace()
	switch c.data[c.pos] {
	case '{':
		c.pos++
		var fields map[string]reflect.Type
		if t != nil && t.Kind() == reflect.Struct {
			if fields = c.fields[t]; fields == nil {
				fields = jsonFields(t)
				c.fields[t] = fields
			}
		}
		var seen [][]byte        // the keys so far, while they are few
		var many map[string]bool // past that
		for c.skipSpace(); c.data[c.pos] != '}'; c.skipSpace() {
			key := c.key()
			var twice bool
			if many != nil {
				twice = many[string(key)]
				many[string(key)] = true
			} else {
				twice = slices.ContainsFunc(seen, func(k []byte) bool { return bytes.Equal(k, key) })
				if seen = append(seen, key); len(seen) > 16 {
					many = make(map[string]bool, 64)
					for _, k := range seen {
						many[string(k)] = true
					}
				}
			}
			if twice {
				return badRequest("key %q given twice in %s", key, c.where())
			}
			var ft reflect.Type
			if fields != nil {
				var ok bool
				if ft, ok = fields[string(key)]; !ok {
					return badRequest("unknown field %q in %s", key, c.where())
				}
			}
			c.skipSpace()
			c.pos++ // ':'
			c.path = append(c.path, pathStep{key: key, index: -1})
			if err := c.value(ft); err != nil {
				return err
			}
			c.path = c.path[:len(c.path)-1]
			if c.skipSpace(); c.data[c.pos] == ',' {
				c.pos++
			}
		}
		c.pos++
	case '[':
		c.pos++
		c.skipSpace()
		var et reflect.Type
		if t != nil && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) {
			et = t.Elem()
		}
		for i := 0; c.data[c.pos] != ']'; i++ {
			c.path = append(c.path, pathStep{index: i})
			if err := c.value(et); err != nil {
				return err
			}
			c.path = c.path[:len(c.path)-1]
			if c.skipSpace(); c.data[c.pos] == ',' {
				c.pos++
				c.skipSpace()
			}
		}
		c.pos++
	case '"':
		c.str()
	default: // a number, true, false or null
		for c.pos < len(c.data) && !strings.ContainsRune(",]} \t\n\r", rune(c.data[c.pos])) {
			c.pos++
		}
	}
	return nil
}

// skipSpace moves past whitespace.
func (c *keyChecker) skipSpace() {
	for c.pos < len(c.data) && (c.data[c.pos] == ' ' || c.data[c.pos] == '\t' || c.data[c.pos] == '\n' || c.data[c.pos] == '\r') {
		c.pos++
	}
}

// str moves past the string at pos and returns its text between the quotes, raw; plain
// is false when that has an escape or a byte outside ASCII.
func (c *keyChecker) str() (raw []byte, plain bool) {
	start, plain := c.pos, true
	for c.pos++; c.data[c.pos] != '"'; c.pos++ {
		switch b := c.data[c.pos]; {
		case b == '\\':
			plain = false
			c.pos++
		case b >= utf8.RuneSelf:
			plain = false
		}
	}
	c.pos++
	return c.data[start+1 : c.pos-1], plain
}

// key reads a key: its text as encoding/json decodes it (escapes resolved, invalid UTF-8
// as U+FFFD), a slice of data in the usual case.
func (c *keyChecker) key() []byte {
	raw, plain := c.str()
	if plain || (utf8.Valid(raw) && bytes.IndexByte(raw, '\\') < 0) {
		return raw
	}
	var s string
	json.Unmarshal(c.data[c.pos-len(raw)-2:c.pos], &s) // valid: json.Valid passed
	return []byte(s)
}

// where names the current place in the body for messages: "the request body", or a path
// such as runs[3].input.
func (c *keyChecker) where() string {
	var b strings.Builder
	for _, p := range c.path {
		if p.index >= 0 {
			fmt.Fprintf(&b, "[%d]", p.index)
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('.')
		}
		b.Write(p.key)
	}
	return bodyPath(b.String())
}

// bodyPath names a place in the body for messages.
func bodyPath(where string) string {
	if where = strings.TrimPrefix(where, "."); where == "" {
		return "the request body"
	}
	return where
}

// jsonFields maps the JSON names of struct t's fields to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	fields := make(map[string]reflect.Type, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch name {
		case "-":
			continue
		case "":
			name = f.Name
		}
		fields[name] = f.Type
	}
	return fields
}

// bearer returns the request's bearer token.
func bearer(r *http.Request) string {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") { // auth schemes are case-insensitive
		return ""
	}
	return strings.TrimSpace(token)
}

// isAdmin reports whether token is the admin token, compared in constant time.
func (s *server) isAdmin(token string) bool {
	return s.cfg.AdminToken != "" && subtle.ConstantTimeCompare([]byte(token), []byte(s.cfg.AdminToken)) == 1
}

// caller is who a request's token names: the admin, or a workspace's key.
type caller struct {
	admin     bool
	workspace string // the key's workspace id
}

// authenticate finds the caller of r; no or a wrong token is a 401 error.
func (s *server) authenticate(r *http.Request) (caller, error) {
	return s.authenticateToken(r.Context(), bearer(r))
}

// authenticateToken finds the caller a token names (a bearer token, or the console's
// sign-in form); no or a wrong token is a 401 error.
func (s *server) authenticateToken(ctx context.Context, token string) (caller, error) {
	switch {
	case token == "":
		return caller{}, unauthorized("missing bearer token")
	case s.isAdmin(token):
		return caller{admin: true}, nil
	}
	// Keys are found by their hash, so the secret itself is never compared byte by byte.
	sum := sha256.Sum256([]byte(token))
	hash := hex.EncodeToString(sum[:])
	if ws, ok := s.keys.get(hash); ok {
		return caller{workspace: ws}, nil
	}
	ws, err := s.store.workspaceByKey(ctx, sum[:])
	if errors.Is(err, errNotFound) {
		return caller{}, unauthorized("invalid token")
	}
	if err != nil {
		return caller{}, err
	}
	s.keys.put(hash, ws)
	return caller{workspace: ws}, nil
}

// admin guards the admin API.
func (s *server) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c, err := s.authenticate(r)
		if err == nil && !c.admin {
			err = unauthorized("an admin token is required")
		}
		if err != nil {
			s.fail(w, r, err)
			return
		}
		h(w, r)
	}
}

// member guards a workspace's endpoints: the admin token, or the workspace's own key.
// The token is checked first, so a bad one gets 401 whatever the path. Another
// workspace's key gets 404, as if the workspace did not exist.
func (s *server) member(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c, err := s.authenticate(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		ws, id := r.PathValue("ws"), r.PathValue("id")
		if !isUUID(ws) || (id != "" && !isUUID(id)) || (!c.admin && !strings.EqualFold(c.workspace, ws)) {
			s.fail(w, r, errNotFound)
			return
		}
		if c.admin {
			// A key names an existing workspace; the admin may name any id, and one that
			// does not exist is 404, not an empty list.
			if _, _, err := s.store.getWorkspace(r.Context(), ws); err != nil {
				s.fail(w, r, err)
				return
			}
		}
		h(w, r)
	}
}

// keyCache remembers which workspace a key hash belongs to for keyCacheTTL, so most
// requests do not ask the database, and a rotated key dies within the TTL everywhere.
type keyCache struct {
	mu sync.Mutex
	m  map[string]keyEntry
}

// keyEntry is one cached key.
type keyEntry struct {
	workspace string
	expires   time.Time
}

// get returns the workspace of hash when it was found within keyCacheTTL.
func (c *keyCache) get(hash string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[hash]
	if !ok || time.Now().After(e.expires) {
		delete(c.m, hash)
		return "", false
	}
	return e.workspace, true
}

// put remembers hash for keyCacheTTL, dropping expired entries when the map has grown.
func (c *keyCache) put(hash, workspace string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.m == nil {
		c.m = map[string]keyEntry{}
	}
	if len(c.m) >= 1024 {
		for h, e := range c.m {
			if now.After(e.expires) {
				delete(c.m, h)
			}
		}
	}
	c.m[hash] = keyEntry{workspace, now.Add(keyCacheTTL)}
}

// forget drops every cached key of workspace, so its old key dies at once in this process.
func (c *keyCache) forget(workspace string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for h, e := range c.m {
		if strings.EqualFold(e.workspace, workspace) {
			delete(c.m, h)
		}
	}
}

// healthz is 200 while the process runs.
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
	if err := s.store.db.PingContext(ctx); err != nil {
		body["database"], body["status"], status = "unreachable", "unavailable", http.StatusServiceUnavailable
	}
	if s.cfg.WorkerEmbedded {
		alive, last := s.worker.alive()
		state := map[string]any{"embedded": true, "alive": alive, "executing": s.worker.executingCount(),
			"listening": s.notifier != nil && s.notifier.listening.Load(), "last_cycle_at": nil}
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

// metricsHandler answers the Prometheus text format.
func (s *server) metricsHandler(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	writeMetrics(r.Context(), w, s.store, s.metrics)
}

// createWorkspace creates a workspace (admin) and answers it with its API key.
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
	ws, err := s.store.createWorkspace(r.Context(), req.Name)
	s.answer(w, r, http.StatusCreated, ws, err)
}

// checkName validates the name of a workspace or an agent: 1 to 200 characters (not
// bytes), not only whitespace.
func checkName(name string) error {
	if strings.TrimSpace(name) == "" || utf8.RuneCountInString(name) > 200 {
		return invalid("name must be 1 to 200 characters, not only whitespace")
	}
	return nil
}

// getWorkspace answers the workspace.
func (s *server) getWorkspace(w http.ResponseWriter, r *http.Request) {
	ws, _, err := s.store.getWorkspace(r.Context(), r.PathValue("ws"))
	s.answer(w, r, http.StatusOK, ws, err)
}

// rotateKey gives the workspace a new API key and answers it; the old key stops working
// here at once and in other processes within keyCacheTTL.
func (s *server) rotateKey(w http.ResponseWriter, r *http.Request) {
	ws, err := s.store.rotateKey(r.Context(), r.PathValue("ws"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.keys.forget(ws.ID)
	writeJSON(w, http.StatusOK, ws)
}

// createAgent creates an agent; a taken name is 409.
func (s *server) createAgent(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Name           string          `json:"name"`
		Kind           string          `json:"kind"`
		Config         json.RawMessage `json:"config"`
		MaxConcurrency *int            `json:"max_concurrency"`
		Paused         bool            `json:"paused"`
		Retry          json.RawMessage `json:"retry"`
		KeyConcurrency *int            `json:"key_concurrency"`
		OnKeyConflict  *string         `json:"on_key_conflict"`
		RateLimit      json.RawMessage `json:"rate_limit"`
	}
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	if err := checkName(req.Name); err != nil {
		s.fail(w, r, err)
		return
	}
	config, err := s.agentConfig(req.Kind, req.Config)
	if err == nil {
		err = checkConcurrency(req.MaxConcurrency)
	}
	retry := defaultRetry
	if err == nil && req.Retry != nil {
		retry, err = parseRetry(req.Retry)
	}
	var rate *rateLimit
	if err == nil && req.RateLimit != nil {
		rate, err = parseRate(req.RateLimit)
	}
	if err == nil {
		err = checkKeyLimit(req.KeyConcurrency, req.OnKeyConflict)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	a := agent{WorkspaceID: r.PathValue("ws"), Name: req.Name, Kind: req.Kind, Config: config,
		MaxConcurrency: req.MaxConcurrency, Paused: req.Paused, Retry: retry, RateLimit: rate}
	if req.KeyConcurrency != nil {
		a.KeyConcurrency = *req.KeyConcurrency
	}
	if req.OnKeyConflict != nil {
		a.OnKeyConflict = *req.OnKeyConflict
	}
	a, err = s.store.createAgent(r.Context(), a)
	if errors.Is(err, errConflict) {
		err = fmt.Errorf("%w: agent %q already exists", errConflict, req.Name)
	}
	s.answer(w, r, http.StatusCreated, a, err)
}

// agentConfig validates an agent's config for its kind and returns it as stored: absent
// or null is {}.
func (s *server) agentConfig(kind string, config json.RawMessage) (json.RawMessage, error) {
	if len(config) == 0 || string(config) == "null" {
		config = json.RawMessage("{}")
	}
	if config[0] != '{' {
		return nil, invalid("config must be a JSON object")
	}
	if err := validateAgent(kind, config, s.cfg.WebhookHosts); err != nil {
		return nil, invalid("%s", err.Error())
	}
	if err := checkStorable(config); err != nil {
		return nil, invalid("config %s", err.Error())
	}
	return config, nil
}

// maxAgentConcurrency is the largest max_concurrency an agent may set (SPEC), as
// RUN_WORKER_CONCURRENCY's own limit: a larger cap could never bind.
const maxAgentConcurrency = 1000

// checkConcurrency validates an agent's max_concurrency; nil is no cap.
func checkConcurrency(n *int) error {
	if n != nil && (*n < 1 || *n > maxAgentConcurrency) {
		return invalid("max_concurrency must be from 1 to %d, or null for no cap", maxAgentConcurrency)
	}
	return nil
}

// Bounds of an agent's limits per key and per rate (SPEC "Per key", "Rate").
const (
	maxKeyConcurrency = 1000
	maxRateLimit      = 1000000
	minRatePeriodMS   = 1000
	maxRatePeriodMS   = 86400000
	maxKeyLength      = 200
	maxRunCost        = 1000000
)

// checkKeyLimit validates an agent's key_concurrency and on_key_conflict; nil is unchanged.
func checkKeyLimit(n *int, conflict *string) error {
	if n != nil && (*n < 1 || *n > maxKeyConcurrency) {
		return invalid("key_concurrency must be from 1 to %d (default 1)", maxKeyConcurrency)
	}
	if conflict != nil && *conflict != keyQueue && *conflict != keyCancelRunning && *conflict != keyReject {
		return invalid("on_key_conflict must be %q, %q or %q", keyQueue, keyCancelRunning, keyReject)
	}
	return nil
}

// parseRate validates an agent's rate_limit, given whole; null is none. Keys match exactly.
func parseRate(raw json.RawMessage) (*rateLimit, error) {
	if string(raw) == "null" {
		return nil, nil
	}
	shape := invalid(`rate_limit must be an object {"limit": 1…%d, "period_ms": %d…%d}, or null for none`,
		maxRateLimit, minRatePeriodMS, maxRatePeriodMS)
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return nil, shape
	}
	var p rateLimit
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		var field *int
		switch k {
		case "limit":
			field = &p.Limit
		case "period_ms":
			field = &p.PeriodMS
		default:
			return nil, invalid("rate_limit: unknown key %q (keys match exactly: limit, period_ms)", k)
		}
		if json.Unmarshal(keys[k], field) != nil {
			return nil, invalid("rate_limit.%s must be an integer", k)
		}
	}
	if p.Limit < 1 || p.Limit > maxRateLimit {
		return nil, invalid("rate_limit.limit must be from 1 to %d", maxRateLimit)
	}
	if p.PeriodMS < minRatePeriodMS || p.PeriodMS > maxRatePeriodMS {
		return nil, invalid("rate_limit.period_ms must be from %d to %d", minRatePeriodMS, maxRatePeriodMS)
	}
	return &p, nil
}

// Bounds of an agent's retry policy (SPEC): the first backoff up to an hour, the longest up
// to a day.
const (
	maxRetryBaseMS = 3600000
	maxRetryMaxMS  = 86400000
)

// parseRetry validates an agent's retry object, given whole: an absent key takes its
// default, null is every default. Keys match exactly, as config's do.
func parseRetry(raw json.RawMessage) (retryPolicy, error) {
	p := defaultRetry
	if string(raw) == "null" {
		return p, nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return p, invalid(`retry must be an object {"base_ms": 1…%d, "max_ms": base_ms…%d}, or null for the defaults`,
			maxRetryBaseMS, maxRetryMaxMS)
	}
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		var field *int
		switch k {
		case "base_ms":
			field = &p.BaseMS
		case "max_ms":
			field = &p.MaxMS
		default:
			return p, invalid("retry: unknown key %q (keys match exactly: base_ms, max_ms)", k)
		}
		if json.Unmarshal(keys[k], field) != nil {
			return p, invalid("retry.%s must be an integer", k)
		}
	}
	if p.BaseMS < 1 || p.BaseMS > maxRetryBaseMS {
		return p, invalid("retry.base_ms must be from 1 to %d", maxRetryBaseMS)
	}
	if p.MaxMS < p.BaseMS || p.MaxMS > maxRetryMaxMS {
		return p, invalid("retry.max_ms must be from base_ms (%d) to %d (default %d)", p.BaseMS, maxRetryMaxMS, defaultRetry.MaxMS)
	}
	return p, nil
}

// getAgent answers one agent of the workspace, by name.
func (s *server) getAgent(w http.ResponseWriter, r *http.Request) {
	a, err := s.store.getAgent(r.Context(), r.PathValue("ws"), r.PathValue("name"))
	s.answer(w, r, http.StatusOK, a, err)
}

// updateAgent changes any of an agent's config (replaced whole, validated for its kind),
// max_concurrency (null: no cap), paused and retry (replaced whole), and answers the agent;
// {} changes nothing.
func (s *server) updateAgent(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Config         json.RawMessage `json:"config"`
		MaxConcurrency json.RawMessage `json:"max_concurrency"` // absent and null differ
		Paused         *bool           `json:"paused"`
		Retry          json.RawMessage `json:"retry"`
		KeyConcurrency *int            `json:"key_concurrency"`
		OnKeyConflict  *string         `json:"on_key_conflict"`
		RateLimit      json.RawMessage `json:"rate_limit"` // absent and null differ
	}
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	ws, name := r.PathValue("ws"), r.PathValue("name")
	p := agentPatch{Paused: req.Paused, KeyConcurrency: req.KeyConcurrency, OnKeyConflict: req.OnKeyConflict}
	if err := checkKeyLimit(req.KeyConcurrency, req.OnKeyConflict); err != nil {
		s.fail(w, r, err)
		return
	}
	if req.RateLimit != nil {
		rate, err := parseRate(req.RateLimit)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		p.SetRate, p.RateLimit = true, rate
	}
	if req.Retry != nil {
		retry, err := parseRetry(req.Retry)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		p.Retry = &retry
	}
	if req.MaxConcurrency != nil {
		p.SetConcurrency = true
		if string(req.MaxConcurrency) != "null" {
			var n int
			if err := json.Unmarshal(req.MaxConcurrency, &n); err != nil {
				s.fail(w, r, invalid("max_concurrency must be an integer from 1 to %d, or null for no cap", maxAgentConcurrency))
				return
			}
			p.MaxConcurrency = &n
		}
		if err := checkConcurrency(p.MaxConcurrency); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if req.Config != nil || p.empty() {
		// The config is validated for the agent's kind; an empty patch answers the agent.
		a, err := s.store.getAgent(r.Context(), ws, name)
		if err == nil && req.Config != nil {
			p.Config, err = s.agentConfig(a.Kind, req.Config)
		}
		if err != nil {
			s.fail(w, r, err)
			return
		}
		if p.Config == nil {
			writeJSON(w, http.StatusOK, a)
			return
		}
	}
	a, err := s.store.updateAgent(r.Context(), ws, name, p)
	if err == nil {
		// More of its keys' runs may start now: the claims passed them over, so their lines
		// are read again from the start.
		at := keepPlace
		if p.KeyConcurrency != nil {
			at = lineStart
		}
		s.announce.claimable(ws, at)
	}
	s.answer(w, r, http.StatusOK, a, err)
}

// rotateSecret gives a webhook agent a new signing secret and answers the agent with it,
// the only time it is shown; an echo agent is 409, as a state the request cannot change
// (its kind), not a malformed request. No request body is read.
func (s *server) rotateSecret(w http.ResponseWriter, r *http.Request) {
	a, err := s.store.rotateSecret(r.Context(), r.PathValue("ws"), r.PathValue("name"))
	if err == nil {
		// The claims keep the agent as they last read it with its runs read ahead: they
		// read it again, with its new secret, once told.
		s.announce.claimable(a.WorkspaceID, keepPlace)
	}
	s.answer(w, r, http.StatusOK, a, err)
}

// listAgents answers the workspace's agents.
func (s *server) listAgents(w http.ResponseWriter, r *http.Request) {
	agents, err := s.store.listAgents(r.Context(), r.PathValue("ws"))
	s.answer(w, r, http.StatusOK, map[string][]agent{"agents": agents}, err)
}

// runRequest is the body that creates one run.
type runRequest struct {
	Agent       string          `json:"agent"`
	Input       json.RawMessage `json:"input"`
	MaxAttempts *int            `json:"max_attempts"`
	Priority    *int            `json:"priority"`
	RunAt       *string         `json:"run_at"`
	DelayMS     *int64          `json:"delay_ms"`
	TimeoutMS   *int            `json:"timeout_ms"`
	Key         *string         `json:"concurrency_key"`
	Cost        *int            `json:"cost"`
}

// The ranges of a run's scheduling fields (SPEC "Scheduling").
const (
	maxPriority    = 9                   // 0 … 9, lower first, as Oban
	maxDelayMS     = 365 * 24 * 3600_000 // a year: further ahead is a calendar's job, not a queue's
	maxTimeoutMS   = 24 * 3600_000       // a day
	maxRunAttempts = 25                  // of a new run, and added by one retry
)

// runAtFloor stands in for every run_at before it: all of them mean now, and PostgreSQL has no
// year 0 for Go's earliest times.
var runAtFloor = time.Unix(0, 0).UTC()

// inRange sets *dst to *v when the field name was given (v not nil), if it lies in lo … hi;
// else the 422 says what is accepted.
func inRange[T int | int64](name string, v *T, lo, hi T, dst *T) error {
	if v == nil {
		return nil
	}
	if *v < lo || *v > hi {
		return invalid("%s must be from %d to %d", name, lo, hi)
	}
	*dst = *v
	return nil
}

// validate turns a request into a newRun; where names the request in error messages.
func (q runRequest) validate(where string) (newRun, error) {
	n := newRun{Agent: q.Agent, Input: q.Input, MaxAttempts: 3}
	if q.Agent == "" {
		return n, invalid("%sagent is required", where)
	}
	if err := inRange(where+"max_attempts", q.MaxAttempts, 1, maxRunAttempts, &n.MaxAttempts); err != nil {
		return n, err
	}
	if err := inRange(where+"priority", q.Priority, 0, maxPriority, &n.Priority); err != nil {
		return n, err
	}
	if q.RunAt != nil && q.DelayMS != nil {
		return n, invalid("%srun_at and delay_ms: give one or the other, not both", where)
	}
	if q.RunAt != nil {
		t, err := time.Parse(time.RFC3339, *q.RunAt)
		if err == nil && t.UTC().Year() > 9999 {
			// Its offset carried it past 9999: the API could not write it back in RFC 3339.
			err = errors.New("after year 9999")
		}
		if err != nil {
			return n, invalid("%srun_at must be an RFC 3339 time such as 2030-01-02T15:04:05Z, got %q", where, *q.RunAt)
		}
		n.RunAt = t.UTC()
		if n.RunAt.Before(runAtFloor) {
			n.RunAt = runAtFloor
		}
	}
	if err := inRange(where+"delay_ms", q.DelayMS, 0, maxDelayMS, &n.DelayMS); err != nil {
		return n, err
	}
	if err := inRange(where+"timeout_ms", q.TimeoutMS, 1, maxTimeoutMS, &n.TimeoutMS); err != nil {
		return n, err
	}
	n.Cost = 1
	if err := inRange(where+"cost", q.Cost, 1, maxRunCost, &n.Cost); err != nil {
		return n, err
	}
	if q.Key != nil {
		if k := utf8.RuneCountInString(*q.Key); k < 1 || k > maxKeyLength || !utf8.ValidString(*q.Key) ||
			strings.ContainsRune(*q.Key, 0) {
			return n, invalid("%sconcurrency_key must be 1 to %d characters (no NUL)", where, maxKeyLength)
		}
		n.Key = *q.Key
	}
	if len(n.Input) == 0 {
		n.Input = json.RawMessage("null")
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, n.Input); err != nil {
		return n, badRequest("%sinput: %v", where, err)
	}
	n.Input = buf.Bytes()
	size, err := storedJSONSize(n.Input)
	switch {
	case err != nil:
		return n, invalid("%sinput cannot be stored: %v", where, err)
	case size > maxStoredJSON:
		return n, invalid("%sinput is over 1 MiB as stored and answered (%d bytes)", where, size)
	}
	n.storedSize = size
	return n, nil
}

// maxBatchStored bounds a whole batch's inputs as stored and answered: each may be up to
// maxStoredJSON, but a thousand such would make a gigabyte answer out of a 1 MiB request.
const maxBatchStored = 8 << 20

// canonicalJSON re-encodes a JSON value with its objects' keys sorted, so two spellings
// of the same value (keys in another order, other spacing) are the same bytes.
func canonicalJSON(v json.RawMessage) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(v))
	dec.UseNumber() // numbers keep their digits
	var x any
	if err := dec.Decode(&x); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(x); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// createRun creates a run (201); with Idempotency-Key, a repeat of the same request
// answers the first run (200), another request with the key is 409.
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
		input, err := canonicalJSON(n.Input)
		if err != nil {
			s.fail(w, r, badRequest("input: %v", err))
			return
		}
		n.IdempotencyKey, n.RequestHash = key, requestHash(n, input)
		if !bytes.Equal(input, n.Input) {
			n.EarlierHash = requestHash(n, n.Input) // the previous release hashed the input as sent
		}
	}
	n.Trace = requestTrace(r)
	run, created, err := s.store.createRun(r.Context(), r.PathValue("ws"), n)
	if errors.Is(err, errConflict) {
		err = errKeyReused
	}
	if created {
		s.announce.claimable(run.WorkspaceID, linePos{priority: run.Priority, runAt: run.RunAt})
	}
	switch {
	case err != nil:
		s.fail(w, r, err)
	case created:
		writeRun(w, http.StatusCreated, run)
	default:
		writeRun(w, http.StatusOK, run)
	}
}

// requestTrace is the trace context of a create request's traceparent header, or a new
// trace when it has none or an invalid one. A batch's runs all take their request's (one
// new trace for the batch without one): they were created by one operation.
func requestTrace(r *http.Request) traceContext {
	if tc, ok := parseTraceparent(r.Header.Get("traceparent")); ok {
		return tc
	}
	return newTraceContext()
}

// requestHash tells a repeat of a create request from another request with the same
// Idempotency-Key; input is the canonical form of n.Input.
func requestHash(n newRun, input []byte) []byte {
	b := fmt.Appendf(nil, "%s\x00%d\x00%s", n.Agent, n.MaxAttempts, input)
	if n.Priority != 0 || !n.RunAt.IsZero() || n.DelayMS != 0 || n.TimeoutMS != 0 {
		// Only when given: a key used before these fields existed still matches its repeat.
		b = fmt.Appendf(b, "\x00%d\x00%s\x00%d\x00%d", n.Priority, timeArg(n.RunAt), n.DelayMS, n.TimeoutMS)
	}
	if n.Key != "" || n.Cost > 1 {
		b = fmt.Appendf(b, "\x00%q\x00%d", n.Key, n.Cost)
	}
	sum := sha256.Sum256(b)
	return sum[:]
}

// createRuns creates up to 1000 runs, all or nothing.
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
	total := 0
	for i, q := range req.Runs {
		n, err := q.validate(fmt.Sprintf("runs[%d].", i))
		if err != nil {
			s.fail(w, r, err)
			return
		}
		ns[i] = n
		total += n.storedSize
	}
	if total > maxBatchStored {
		s.fail(w, r, invalid("the batch's inputs are over %d MiB as stored and answered (%d bytes): send fewer runs at once", maxBatchStored>>20, total))
		return
	}
	runs, err := s.store.createRuns(r.Context(), r.PathValue("ws"), ns, requestTrace(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if len(runs) > 0 {
		first := linePos{priority: runs[0].Priority, runAt: runs[0].RunAt}
		for _, run := range runs[1:] {
			if at := (linePos{priority: run.Priority, runAt: run.RunAt}); at.before(first) {
				first = at
			}
		}
		s.announce.claimable(r.PathValue("ws"), first)
	}
	writeRuns(w, http.StatusCreated, runs, false, "")
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

// errBadCursor is a cursor this API did not give to this workspace.
var errBadCursor = invalid("cursor is not one this API returned")

// encodeCursor is the opaque next_cursor after the run with this id: it names a run of
// the caller's own workspace only, never the global order that would reveal other
// workspaces' activity.
func encodeCursor(runID string) string {
	b, _ := hex.DecodeString(strings.ReplaceAll(runID, "-", ""))
	return base64.RawURLEncoding.EncodeToString(b)
}

// decodeCursor returns the run id in a cursor from encodeCursor.
func decodeCursor(c string) (string, bool) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil || len(b) != 16 {
		return "", false
	}
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:], true
}

// checkStatusFilter checks a list's status filter: "" (every status) or a run status.
func checkStatusFilter(status string) error {
	if status != "" && !slices.Contains(allStatuses, runStatus(status)) {
		return invalid("status must be one of queued, running, succeeded, failed, canceled")
	}
	return nil
}

// listRuns answers a page of the workspace's runs, newest first.
func (s *server) listRuns(w http.ResponseWriter, r *http.Request) {
	status := r.URL.Query().Get("status")
	if err := checkStatusFilter(status); err != nil {
		s.fail(w, r, err)
		return
	}
	limit, err := intParam(r, "limit", 50, 1, 200)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var after string
	if c := r.URL.Query().Get("cursor"); c != "" {
		var ok bool
		if after, ok = decodeCursor(c); !ok {
			s.fail(w, r, errBadCursor)
			return
		}
	}
	parent := r.URL.Query().Get("parent")
	if parent != "" && !isUUID(parent) {
		s.fail(w, r, invalid("parent must be a run id (a UUID), got %q", parent))
		return
	}
	runs, next, err := s.store.listRuns(r.Context(), r.PathValue("ws"), status, r.URL.Query().Get("agent"),
		r.URL.Query().Get("schedule"), parent, limit, after)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var nextCursor string
	if next != "" {
		nextCursor = encodeCursor(next)
	}
	writeRuns(w, http.StatusOK, runs, true, nextCursor)
}

// getRun answers a run; with ?wait_ms it waits up to that long for the run to be final.
func (s *server) getRun(w http.ResponseWriter, r *http.Request) {
	wait, err := intParam(r, "wait_ms", 0, 0, 60000)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	run, err := s.waitRun(r.Context(), r.PathValue("ws"), r.PathValue("id"), time.Duration(wait)*time.Millisecond)
	s.answer(w, r, http.StatusOK, run, err)
}

// waitRun returns the run once it is final or wait has passed. It sleeps on the run's
// final notification; while notifications are down it re-reads the run twice a second.
func (s *server) waitRun(ctx context.Context, ws, id string, wait time.Duration) (runRecord, error) {
	deadline := time.Now().Add(wait)
	for {
		var woken <-chan struct{}
		unsubscribe := func() {}
		if s.notifier != nil && wait > 0 {
			woken, unsubscribe = s.notifier.subscribe(id)
		}
		r, err := s.store.getRun(ctx, ws, id)
		remaining := time.Until(deadline)
		if err != nil || r.final() || remaining <= 0 || ctx.Err() != nil {
			unsubscribe()
			return r, err
		}
		recheck := remaining
		if s.notifier == nil || !s.notifier.hears() {
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

// cancelRun cancels a run (200); an already final run is 409.
func (s *server) cancelRun(w http.ResponseWriter, r *http.Request) {
	run, err := s.store.cancelRun(r.Context(), r.PathValue("ws"), r.PathValue("id"))
	if errors.Is(err, errConflict) {
		err = fmt.Errorf("%w: run is already %s", errConflict, run.Status)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if run.Status == "running" {
		s.worker.cancelLocal(run.ID) // other processes hear of it through the notification
	}
	writeJSON(w, http.StatusOK, run)
}

// retryRun puts a failed or canceled run back to queued with {"attempts"} more attempts
// (default 1; the body may be empty) and answers it; a run in another status is 409.
func (s *server) retryRun(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Attempts *int `json:"attempts"`
	}
	if err := decode(r, &req, true); err != nil {
		s.fail(w, r, err)
		return
	}
	attempts := 1
	if err := inRange("attempts", req.Attempts, 1, maxRunAttempts, &attempts); err != nil {
		s.fail(w, r, err)
		return
	}
	run, err := s.store.retryRun(r.Context(), r.PathValue("ws"), r.PathValue("id"), attempts)
	s.answer(w, r, http.StatusOK, run, err)
}

// cancelRuns cancels every queued and running run of the workspace, or only those of
// {"agent"} or in {"status"}, and answers how many: each as its own cancel would.
func (s *server) cancelRuns(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Agent  *string `json:"agent"`
		Status *string `json:"status"`
	}
	// The body is required, if only {}: an empty POST must not cancel everything.
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	statuses := []runStatus{statusQueued, statusRunning}
	if req.Status != nil {
		switch st := runStatus(*req.Status); st {
		case statusQueued, statusRunning:
			statuses = []runStatus{st}
		default:
			s.fail(w, r, invalid("status must be queued or running, got %q", *req.Status))
			return
		}
	}
	n, running, err := s.store.cancelRuns(r.Context(), r.PathValue("ws"), req.Agent, statuses)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	for _, id := range running {
		s.worker.cancelLocal(id) // other processes hear of it through the notification
	}
	writeJSON(w, http.StatusOK, map[string]int64{"canceled": n})
}

// stats answers the workspace's runs counted by status.
func (s *server) stats(w http.ResponseWriter, r *http.Request) {
	st, err := s.store.stats(r.Context(), r.PathValue("ws"))
	s.answer(w, r, http.StatusOK, st, err)
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
	sum, err := s.worker.process(r.Context(), limit, ws)
	s.answer(w, r, http.StatusOK, sum, err)
}
