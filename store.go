package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"database/sql/driver"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lib/pq"
)

var (
	errNotFound = errors.New("not found")
	errConflict = errors.New("conflict")
)

// store is agentapp's access to PostgreSQL.
type store struct {
	db     *sql.DB
	events eventKeys // signs the events tokens of claimed runs; zero: none (events.go)
	stmts  sync.Map  // query text -> *sql.Stmt: the worker's and enqueue's statements (prepared)
	gather gatherer  // single-run creates waiting to be written together (gather.go)
	// announce tells every process that runs of workspace ws may be claimable from place
	// at on (the announcer's claimable): a keyed run stopped running (finish), child runs
	// were made (a wait). Nil: not announced (tests, a single cycle).
	announce func(ws string, at linePos)
}

// prepared returns query prepared for the pool, preparing it on first use. A statement sent
// unprepared is parsed, analysed and planned again at every call: for a single-run insert
// that was about a third of PostgreSQL's time. database/sql prepares it again on each
// connection it runs on, and after a reconnect.
func (s *store) prepared(ctx context.Context, query string) (*sql.Stmt, error) {
	if st, ok := s.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if earlier, loaded := s.stmts.LoadOrStore(query, st); loaded {
		st.Close()
		return earlier.(*sql.Stmt), nil
	}
	return st, nil
}

// queryPrepared runs query, prepared, with args.
func (s *store) queryPrepared(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	st, err := s.prepared(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.QueryContext(ctx, args...)
}

// openDB opens a pool for dsn (already checked by loadConfig) with at most maxConns
// connections. It does not connect: the first query does.
func openDB(dsn string, maxConns int) (*sql.DB, error) {
	cfg, err := pq.NewConfig(dsn)
	if err != nil {
		return nil, err
	}
	// With binary_parameters lib/pq sends a statement with arguments in one round trip
	// (Parse, Bind, Execute, Sync) instead of two, and so one implicit transaction, not
	// two: an idle worker's tick costs 1 transaction, not 2. The price: a []byte argument
	// is sent in binary, so []byte may only be passed for bytea; send JSON as a string.
	cfg.BinaryParameters = true
	connector, err := pq.NewConnectorConfig(cfg)
	if err != nil {
		return nil, err
	}
	db := sql.OpenDB(connector)
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	return db, nil
}

// isUnavailable reports whether err means the database cannot be reached right now
// (as opposed to a query it rejected).
func isUnavailable(err error) bool {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		code := string(pqErr.Code)
		// 08: connection exception; 57P0x: shutdown, cannot connect now; 53: out of resources.
		return strings.HasPrefix(code, "08") || strings.HasPrefix(code, "57P") || strings.HasPrefix(code, "53")
	}
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, driver.ErrBadConn) || errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, sql.ErrConnDone)
}

// isUniqueViolation reports whether err is PostgreSQL's unique_violation.
func isUniqueViolation(err error) bool {
	var pqErr *pq.Error
	return errors.As(err, &pqErr) && pqErr.Code == "23505"
}

// dataException returns PostgreSQL's message when err is a data exception (SQLSTATE
// class 22): a value JSON accepts but PostgreSQL cannot store, such as \u0000, invalid
// UTF-8 or a number out of numeric's range.
func dataException(err error) (string, bool) {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && strings.HasPrefix(string(pqErr.Code), "22") {
		return pqErr.Message, true
	}
	return "", false
}

// workspace is a tenant; APIKey is set only in the answer to its creation.
type workspace struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	APIKey    string    `json:"api_key,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// hashKey is how API keys are stored and compared.
func hashKey(key string) []byte {
	h := sha256.Sum256([]byte(key))
	return h[:]
}

// newAPIKey returns a new random workspace API key.
func newAPIKey() string {
	b := make([]byte, 24)
	rand.Read(b)
	return "ak_" + base64.RawURLEncoding.EncodeToString(b)
}

// newRunID returns a new run id in the layout of a UUID version 7: 48 bits of Unix
// milliseconds, then 74 random bits. New runs' entries then sit together at the end of
// the primary key's index, where random ids spread the writes of every claim and every
// outcome over the whole index, which grows with history and soon no longer fits in
// PostgreSQL's buffers (a drain with 2,000,000 finished runs in the table: 2,103 runs/s
// with random ids, one rep; 7,707 with these, median of 3; the bench harness's -bench history).
func newRunID() string {
	var b [16]byte
	rand.Read(b[6:])
	ms := uint64(time.Now().UnixMilli())
	for i := range 6 {
		b[i] = byte(ms >> (40 - 8*i))
	}
	b[6] = b[6]&0x0f | 0x70 // version 7
	b[8] = b[8]&0x3f | 0x80 // the RFC 9562 variant
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// createWorkspace creates a workspace with a new random API key.
func (s *store) createWorkspace(ctx context.Context, name string) (workspace, error) {
	key := newAPIKey()
	w := workspace{Name: name, APIKey: key}
	err := s.db.QueryRowContext(ctx,
		`INSERT INTO workspaces (name, api_key_hash) VALUES ($1, $2) RETURNING id, created_at`,
		name, hashKey(key)).Scan(&w.ID, &w.CreatedAt)
	w.CreatedAt = w.CreatedAt.UTC()
	return w, err
}

// getWorkspace returns a workspace and the hash of its API key.
func (s *store) getWorkspace(ctx context.Context, id string) (workspace, []byte, error) {
	var w workspace
	var hash []byte
	err := s.db.QueryRowContext(ctx,
		`SELECT id, name, created_at, api_key_hash FROM workspaces WHERE id = $1`, id).
		Scan(&w.ID, &w.Name, &w.CreatedAt, &hash)
	if errors.Is(err, sql.ErrNoRows) {
		return w, nil, errNotFound
	}
	w.CreatedAt = w.CreatedAt.UTC()
	return w, hash, err
}

// workspaceByKey returns the id of the workspace whose API key hashes to hash.
func (s *store) workspaceByKey(ctx context.Context, hash []byte) (string, error) {
	var id string
	err := s.db.QueryRowContext(ctx, `SELECT id FROM workspaces WHERE api_key_hash = $1`, hash).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return "", errNotFound
	}
	return id, err
}

// agent is a named, configured agent of a workspace.
type agent struct {
	ID             string          `json:"id"`
	WorkspaceID    string          `json:"workspace_id"`
	Name           string          `json:"name"`
	Kind           string          `json:"kind"`
	Config         json.RawMessage `json:"config"`
	MaxConcurrency *int            `json:"max_concurrency"` // nil: no cap
	Paused         bool            `json:"paused"`
	KeyConcurrency int             `json:"key_concurrency"` // runs of one concurrency_key at once
	OnKeyConflict  string          `json:"on_key_conflict"` // queue, cancel_running or reject
	RateLimit      *rateLimit      `json:"rate_limit"`      // nil: none
	Retry          retryPolicy     `json:"retry"`
	ThrottledUntil *time.Time      `json:"throttled_until"` // nil: not throttled (read-only)
	CreatedAt      time.Time       `json:"created_at"`
	SigningSecret  string          `json:"signing_secret,omitempty"` // only in the answers that show it once
}

// retryPolicy is an agent's backoff after a failed attempt: a delay drawn from
// 0 … min(MaxMS, BaseMS × 2^(attempt−1)) ms.
type retryPolicy struct {
	BaseMS int `json:"base_ms"`
	MaxMS  int `json:"max_ms"`
}

// rateLimit is an agent's rate: the attempts that start in any PeriodMS cost at most Limit
// units (a run's cost).
type rateLimit struct {
	Limit    int `json:"limit"`
	PeriodMS int `json:"period_ms"`
}

// What a new run with a concurrency_key does while its key has a run queued, waiting or
// running (SPEC "Per key").
const (
	keyQueue         = "queue"          // it waits its turn
	keyCancelRunning = "cancel_running" // the newest wins: the earlier ones are canceled
	keyReject        = "reject"         // the create is refused (409 key_busy)
)

// defaultRetry is the retry policy of an agent that sets none (SPEC).
var defaultRetry = retryPolicy{BaseMS: 500, MaxMS: 30000}

// agentColumns is what scanAgent reads from agents. A throttled_until that has passed is
// shown as null: the column keeps it, so that no write is needed when it passes.
const agentColumns = `id, workspace_id, name, kind, config, max_concurrency, paused, retry_base_ms, retry_max_ms,
	CASE WHEN throttled_until > now() THEN throttled_until END, created_at, key_concurrency, on_key_conflict,
	rate_limit, rate_period_ms`

// scanAgent reads one row of agentColumns.
func scanAgent(row interface{ Scan(...any) error }) (agent, error) {
	var a agent
	var limit sql.NullInt64
	var throttled sql.NullTime
	var rate, period sql.NullInt64
	err := row.Scan(&a.ID, &a.WorkspaceID, &a.Name, &a.Kind, &a.Config, &limit, &a.Paused,
		&a.Retry.BaseMS, &a.Retry.MaxMS, &throttled, &a.CreatedAt, &a.KeyConcurrency, &a.OnKeyConflict, &rate, &period)
	if rate.Valid {
		a.RateLimit = &rateLimit{Limit: int(rate.Int64), PeriodMS: int(period.Int64)}
	}
	if limit.Valid {
		n := int(limit.Int64)
		a.MaxConcurrency = &n
	}
	if throttled.Valid {
		t := throttled.Time.UTC()
		a.ThrottledUntil = &t
	}
	a.CreatedAt = a.CreatedAt.UTC()
	return a, err
}

// createAgent inserts an agent, a webhook agent with a new signing secret (in the agent
// returned, the only time it is shown), with the default retry policy if it sets none; a
// taken name is errConflict.
func (s *store) createAgent(ctx context.Context, a agent) (agent, error) {
	if a.Retry == (retryPolicy{}) {
		a.Retry = defaultRetry // none set
	}
	var secret any // an echo agent signs nothing
	if a.Kind == "webhook" {
		secret = newSigningSecret()
	}
	a, err := scanAgent(s.db.QueryRowContext(ctx,
		`INSERT INTO agents (workspace_id, name, kind, config, max_concurrency, paused, signing_secret,
		                     retry_base_ms, retry_max_ms, key_concurrency, on_key_conflict, rate_limit, rate_period_ms)
		 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
		 RETURNING `+agentColumns,
		a.WorkspaceID, a.Name, a.Kind, string(a.Config), nullInt(a.MaxConcurrency), a.Paused, secret,
		a.Retry.BaseMS, a.Retry.MaxMS, cmp.Or(a.KeyConcurrency, 1), cmp.Or(a.OnKeyConflict, keyQueue),
		a.RateLimit.limit(), a.RateLimit.period()))
	if isUniqueViolation(err) {
		return a, errConflict
	}
	if s, ok := secret.(string); ok {
		a.SigningSecret = s
	}
	return a, err
}

// rotateSecret gives the webhook agent of ws with this name a new signing secret and
// returns the agent with it; the secret before signs too for secretOverlap (one before
// that no longer). An echo agent is errConflict: it has no deliveries to sign.
func (s *store) rotateSecret(ctx context.Context, ws, name string) (agent, error) {
	secret := newSigningSecret()
	a, err := scanAgent(s.db.QueryRowContext(ctx, `
		UPDATE agents SET previous_signing_secret = signing_secret, signing_secret = $3, secret_rotated_at = now()
		WHERE workspace_id = $1 AND name = $2 AND kind = 'webhook'
		RETURNING `+agentColumns, ws, name, secret))
	if errors.Is(err, sql.ErrNoRows) {
		if a, err = s.getAgent(ctx, ws, name); err != nil {
			return a, err
		}
		return a, fmt.Errorf("%w: agent %q is of kind %s, whose runs are not delivered: only webhook agents have a signing secret", errConflict, name, a.Kind)
	}
	a.SigningSecret = secret
	return a, err
}

// limit and period are r's fields as query arguments: NULL for no rate limit.
func (r *rateLimit) limit() any {
	if r == nil {
		return nil
	}
	return int64(r.Limit)
}

func (r *rateLimit) period() any {
	if r == nil {
		return nil
	}
	return int64(r.PeriodMS)
}

// nullString is p as a query argument: NULL when p is nil.
func nullString(p *string) any {
	if p == nil {
		return nil
	}
	return *p
}

// nullInt is p as a query argument: NULL when p is nil.
func nullInt(p *int) any {
	if p == nil {
		return nil
	}
	return int64(*p)
}

// listAgents returns a workspace's agents by name.
func (s *store) listAgents(ctx context.Context, ws string) ([]agent, error) {
	rows, err := s.db.QueryContext(ctx,
		`SELECT `+agentColumns+` FROM agents WHERE workspace_id = $1 ORDER BY name`, ws)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	agents := []agent{}
	for rows.Next() {
		a, err := scanAgent(rows)
		if err != nil {
			return nil, err
		}
		agents = append(agents, a)
	}
	return agents, rows.Err()
}

// getAgent returns the agent of ws with this name.
func (s *store) getAgent(ctx context.Context, ws, name string) (agent, error) {
	a, err := scanAgent(s.db.QueryRowContext(ctx,
		`SELECT `+agentColumns+` FROM agents WHERE workspace_id = $1 AND name = $2`, ws, name))
	if errors.Is(err, sql.ErrNoRows) {
		return a, fmt.Errorf("%w: agent %q", errNotFound, name)
	}
	return a, err
}

// agentPatch is a change to an agent: nil fields stay as they are.
type agentPatch struct {
	Config         json.RawMessage // nil: unchanged
	SetConcurrency bool            // MaxConcurrency is the new cap (nil: none)
	MaxConcurrency *int
	Paused         *bool
	Retry          *retryPolicy
	KeyConcurrency *int
	OnKeyConflict  *string
	SetRate        bool // RateLimit is the new rate limit (nil: none)
	RateLimit      *rateLimit
}

// empty reports whether p changes nothing.
func (p agentPatch) empty() bool {
	return p.Config == nil && !p.SetConcurrency && p.Paused == nil && p.Retry == nil &&
		p.KeyConcurrency == nil && p.OnKeyConflict == nil && !p.SetRate
}

// updateAgent applies p to the agent of ws with this name and returns it. The claim reads
// the agents row, so a changed cap or pause holds from the next claim.
func (s *store) updateAgent(ctx context.Context, ws, name string, p agentPatch) (agent, error) {
	var config, paused, base, most, keys, conflict any
	if p.Config != nil {
		config = string(p.Config)
	}
	if p.Paused != nil {
		paused = *p.Paused
	}
	if p.Retry != nil {
		base, most = p.Retry.BaseMS, p.Retry.MaxMS
	}
	if p.KeyConcurrency != nil {
		keys = *p.KeyConcurrency
	}
	if p.OnKeyConflict != nil {
		conflict = *p.OnKeyConflict
	}
	a, err := scanAgent(s.db.QueryRowContext(ctx, `
		UPDATE agents SET
			config = coalesce($3::jsonb, config),
			max_concurrency = CASE WHEN $4 THEN $5::integer ELSE max_concurrency END,
			paused = coalesce($6::boolean, paused),
			retry_base_ms = coalesce($7::integer, retry_base_ms),
			retry_max_ms = coalesce($8::integer, retry_max_ms),
			key_concurrency = coalesce($9::integer, key_concurrency),
			on_key_conflict = coalesce($10::text, on_key_conflict),
			rate_limit = CASE WHEN $11 THEN $12::integer ELSE rate_limit END,
			rate_period_ms = CASE WHEN $11 THEN $13::integer ELSE rate_period_ms END
		WHERE workspace_id = $1 AND name = $2
		RETURNING `+agentColumns,
		ws, name, config, p.SetConcurrency, nullInt(p.MaxConcurrency), paused, base, most, keys, conflict,
		p.SetRate, p.RateLimit.limit(), p.RateLimit.period()))
	if errors.Is(err, sql.ErrNoRows) {
		return a, fmt.Errorf("%w: agent %q", errNotFound, name)
	}
	return a, err
}

// runRecord is a run as the API shows it.
type runRecord struct {
	ID             string          `json:"id"`
	WorkspaceID    string          `json:"workspace_id"`
	Agent          string          `json:"agent"`
	Status         runStatus       `json:"status"`
	Input          json.RawMessage `json:"input"`
	Output         json.RawMessage `json:"output"`
	Error          *string         `json:"error"`
	Errors         json.RawMessage `json:"errors"`
	Attempt        int             `json:"attempt"`
	MaxAttempts    int             `json:"max_attempts"`
	Priority       int             `json:"priority"`
	RunAt          time.Time       `json:"run_at"`     // not claimed before this
	TimeoutMS      *int            `json:"timeout_ms"` // nil: none
	ConcurrencyKey *string         `json:"concurrency_key"`
	Cost           int             `json:"cost"`
	Step           int             `json:"step"`          // the step it executes next: 1, 2, …
	State          json.RawMessage `json:"state"`         // what its last step returned; null before
	WaitingFor     json.RawMessage `json:"waiting_for"`   // a waiting run's wait; else null
	ParentID       *string         `json:"parent_id"`     // a child run's parent
	Schedule       *string         `json:"schedule"`      // the name of the schedule that made it
	ScheduledFor   *time.Time      `json:"scheduled_for"` // the due time it was made for
	TraceID        string          `json:"trace_id"`
	CreatedAt      time.Time       `json:"created_at"`
	StartedAt      *time.Time      `json:"started_at"`
	FinishedAt     *time.Time      `json:"finished_at"`
	UpdatedAt      time.Time       `json:"updated_at"`
	seq            int64
}

// runStatus is a run's status, as the runs table and the API spell it.
type runStatus string

const (
	statusQueued    runStatus = "queued"
	statusRunning   runStatus = "running"
	statusWaiting   runStatus = "waiting" // between steps: holds no slot and no lease
	statusSucceeded runStatus = "succeeded"
	statusFailed    runStatus = "failed"
	statusCanceled  runStatus = "canceled"
)

// traceOf is a run's trace context as stored, or for a run of an earlier release (none
// stored) its id as the trace id, sampled: the same for every delivery of the run.
func traceOf(runID string, traceID, flags sql.NullString) traceContext {
	tc := traceContext{TraceID: traceID.String, Flags: flags.String}
	if !traceID.Valid {
		tc.TraceID = strings.ReplaceAll(runID, "-", "")
	}
	if !flags.Valid {
		tc.Flags = "01"
	}
	return tc
}

// final reports whether a run in this status can no longer change.
func (s runStatus) final() bool {
	return s == statusSucceeded || s == statusFailed || s == statusCanceled
}

// final reports whether the run's status can no longer change.
func (r runRecord) final() bool { return r.Status.final() }

// runColumns is what scanRun reads, from runs r joined with agents a.
const runColumns = `r.id, r.workspace_id, a.name, r.status, r.input, r.output, r.error, r.errors,
	r.attempt, r.max_attempts, r.priority, r.run_at, r.timeout_ms, r.created_at, r.started_at, r.finished_at,
	r.updated_at, r.seq, (SELECT sc.name FROM schedules sc WHERE sc.id = r.schedule_id), r.scheduled_for, r.trace_id,
	r.concurrency_key, r.cost, r.step, r.state, r.waiting_for, r.parent_id`

// scanRun reads one row of runColumns.
func scanRun(row interface{ Scan(...any) error }) (runRecord, error) {
	var r runRecord
	var output []byte
	var started, finished sql.NullTime
	var timeout sql.NullInt64
	var scheduledFor sql.NullTime
	var traceID sql.NullString
	err := row.Scan(&r.ID, &r.WorkspaceID, &r.Agent, &r.Status, &r.Input, &output, &r.Error, &r.Errors,
		&r.Attempt, &r.MaxAttempts, &r.Priority, &r.RunAt, &timeout, &r.CreatedAt, &started, &finished,
		&r.UpdatedAt, &r.seq, &r.Schedule, &scheduledFor, &traceID, &r.ConcurrencyKey, &r.Cost, &r.Step, (*[]byte)(&r.State),
		(*[]byte)(&r.WaitingFor), &r.ParentID)
	if err != nil {
		return r, err
	}
	r.TraceID = traceOf(r.ID, traceID, sql.NullString{}).TraceID
	if scheduledFor.Valid {
		t := scheduledFor.Time.UTC()
		r.ScheduledFor = &t
	}
	if timeout.Valid {
		ms := int(timeout.Int64)
		r.TimeoutMS = &ms
	}
	r.RunAt = r.RunAt.UTC()
	if output != nil {
		r.Output = output
	}
	r.Errors = errorsInUTC(r.Errors)
	r.CreatedAt = r.CreatedAt.UTC()
	r.UpdatedAt = r.UpdatedAt.UTC()
	if started.Valid {
		t := started.Time.UTC()
		r.StartedAt = &t
	}
	if finished.Valid {
		t := finished.Time.UTC()
		r.FinishedAt = &t
	}
	return r, nil
}

// errorsInUTC rewrites the times of an errors array that an earlier release wrote with
// PostgreSQL's offset ("+00:00", or the server's time zone) into the API's form ending in Z;
// arrays whose times all end in Z are returned as they are.
func errorsInUTC(errs json.RawMessage) json.RawMessage {
	if len(errs) <= 2 || bytes.Count(errs, []byte(`Z"`)) >= bytes.Count(errs, []byte(`"at"`)) {
		return errs
	}
	var list []struct {
		Attempt int       `json:"attempt"`
		At      time.Time `json:"at"`
		Message string    `json:"message"`
	}
	if json.Unmarshal(errs, &list) != nil {
		return errs
	}
	for i := range list {
		list[i].At = list[i].At.UTC()
	}
	out, err := json.Marshal(list)
	if err != nil {
		return errs
	}
	return out
}

func (e unknownAgentError) Error() string { return fmt.Sprintf("unknown agent %q", e.name) }

// getRun returns a run of workspace ws.
func (s *store) getRun(ctx context.Context, ws, id string) (runRecord, error) {
	r, err := scanRun(s.db.QueryRowContext(ctx, `SELECT `+runColumns+`
		FROM runs r JOIN agents a ON a.id = r.agent_id WHERE r.id = $1 AND r.workspace_id = $2`, id, ws))
	if errors.Is(err, sql.ErrNoRows) {
		return r, errNotFound
	}
	return r, err
}

// listRuns returns up to limit runs of ws, newest first, older than the run after (an id;
// "" for the first page), optionally only those with the given status and of the agent
// with the given name (an unknown name has none), and of the schedule with the given name.
// next is the id of the last run when a following page exists, else "". An after that is
// not a run of ws is an invalid cursor. With parent (a run id), only that run's children.
func (s *store) listRuns(ctx context.Context, ws, status, agentName, scheduleName, parent string, limit int, after string) (runs []runRecord, next string, err error) {
	cursor := int64(newestFirst)
	if after != "" {
		err := s.db.QueryRowContext(ctx, `SELECT seq FROM runs WHERE id = $1 AND workspace_id = $2`, after, ws).Scan(&cursor)
		if errors.Is(err, sql.ErrNoRows) {
			return nil, "", errBadCursor
		}
		if err != nil {
			return nil, "", err
		}
	}
	var rows *sql.Rows
	switch {
	case parent != "":
		// A run's children are a range of runs_parent_idx, in the order they were made.
		rows, err = s.queryPrepared(ctx, `SELECT `+runColumns+`
		FROM runs r JOIN agents a ON a.id = r.agent_id
		WHERE r.parent_id = $6 AND r.workspace_id = $1 AND r.seq < $2 AND r.status = ANY ($3) AND ($5 = '' OR a.name = $5)
		ORDER BY r.seq DESC LIMIT $4`, ws, cursor, statusList(status), limit+1, agentName, parent)
	case scheduleName == "":
		rows, err = s.queryPrepared(ctx, `SELECT `+runColumns+`
		FROM agentapp_runs_page(ARRAY[$1::uuid], $3, $5, $2, $4) r JOIN agents a ON a.id = r.agent_id
		ORDER BY r.seq DESC`, ws, cursor, statusList(status), limit+1, agentName)
	default:
		// A schedule's runs are a range of runs_schedule_due_idx, made in the order of
		// their due times: newest first is latest due first.
		rows, err = s.queryPrepared(ctx, `SELECT `+runColumns+`
		FROM runs r JOIN agents a ON a.id = r.agent_id
		WHERE r.schedule_id = (SELECT sc.id FROM schedules sc WHERE sc.workspace_id = $1 AND sc.name = $6)
			AND r.scheduled_for < coalesce((SELECT c.scheduled_for FROM runs c WHERE c.seq = $2 AND c.id = $7::uuid), 'infinity')
			AND r.status = ANY ($3) AND ($5 = '' OR a.name = $5)
		ORDER BY r.scheduled_for DESC LIMIT $4`, ws, cursor, statusList(status), limit+1, agentName, scheduleName, cursorID(after))
	}
	if err != nil {
		return nil, "", err
	}
	defer rows.Close()
	runs = []runRecord{}
	for rows.Next() {
		r, err := scanRun(rows)
		if err != nil {
			return nil, "", err
		}
		runs = append(runs, r)
	}
	if err := rows.Err(); err != nil {
		return nil, "", err
	}
	if len(runs) > limit {
		runs = runs[:limit]
		next = runs[limit-1].ID
	}
	return runs, next, nil
}

// cursorID is a cursor's run id as a uuid argument: the nil uuid for the first page.
func cursorID(after string) string {
	if after == "" {
		return "00000000-0000-0000-0000-000000000000"
	}
	return after
}

// newestFirst is the seq before which a list's first page starts: before every run.
const newestFirst = math.MaxInt64

// allStatuses are the statuses a run may have.
var allStatuses = []runStatus{statusQueued, statusRunning, statusWaiting, statusSucceeded, statusFailed, statusCanceled}

// statusList is the statuses of a list filter as an array argument: status, or every
// status when it is "".
func statusList(status string) pq.StringArray {
	if status != "" {
		return pq.StringArray{status}
	}
	list := make(pq.StringArray, len(allStatuses))
	for i, st := range allStatuses {
		list[i] = string(st)
	}
	return list
}

// runStats counts runs by status.
type runStats struct {
	Queued    int64 `json:"queued"`
	Running   int64 `json:"running"`
	Waiting   int64 `json:"waiting"` // counted apart from the active runs: a claim never moves them
	Succeeded int64 `json:"succeeded"`
	Failed    int64 `json:"failed"`
	Canceled  int64 `json:"canceled"`
}

// stats counts the runs of ws by status; ws "" counts every workspace's. It sums the
// counts the triggers keep (schema.sql: run_totals), and counts the running runs, no
// more than the workers' slots, in one statement: the history is never counted.
func (s *store) stats(ctx context.Context, ws string) (runStats, error) {
	var st runStats
	var active int64
	err := s.db.QueryRowContext(ctx, `
		SELECT coalesce(sum(n) FILTER (WHERE status IN ('active', 'queued', 'running')), 0),
		       coalesce(sum(n) FILTER (WHERE status = 'waiting'), 0),
		       coalesce(sum(n) FILTER (WHERE status = 'succeeded'), 0),
		       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0),
		       coalesce(sum(n) FILTER (WHERE status = 'canceled'), 0),
		       (SELECT count(*) FROM runs WHERE status = 'running' AND ($1 = '' OR workspace_id = NULLIF($1, '')::uuid))
		FROM run_totals WHERE $1 = '' OR workspace_id = NULLIF($1, '')::uuid`, ws).
		Scan(&active, &st.Waiting, &st.Succeeded, &st.Failed, &st.Canceled, &st.Running)
	st.Queued = active - st.Running
	return st, err
}

// oldestQueuedAge is how long the longest-waiting due run has waited since it fell due; 0
// when none waits. One step down runs_due_queued_idx, whatever the size of the queue.
func (s *store) oldestQueuedAge(ctx context.Context) (time.Duration, error) {
	var secs float64
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(run_at)), 0)
		FROM runs WHERE `+dueQueued+` AND run_at <= now()`).Scan(&secs)
	return time.Duration(secs * float64(time.Second)), err
}

// heldRuns counts the due queued runs that their limits hold back: byKey, those of the keys
// at their agent's key_concurrency (found from the running keyed runs, then a range of
// runs_key_idx per key); byRate, those of the agents whose rate window is used up (a
// range of rate_starts, then of runs_line_idx, per rate-limited agent).
func (s *store) heldRuns(ctx context.Context) (byKey, byRate int64, err error) {
	err = s.db.QueryRowContext(ctx, `
		WITH busy AS (
			SELECT x.agent_id, x.concurrency_key AS key, count(*) AS running FROM runs x
			WHERE x.status = 'running' AND x.concurrency_key IS NOT NULL GROUP BY 1, 2)
		SELECT
			(SELECT coalesce(sum(q.n), 0) FROM busy b JOIN agents a ON a.id = b.agent_id AND b.running >= a.key_concurrency
			 CROSS JOIN LATERAL (SELECT count(*) AS n FROM runs k
			     WHERE k.agent_id = b.agent_id AND k.concurrency_key = b.key AND k.concurrency_key IS NOT NULL
			       AND k.status IN ('queued', 'running', 'waiting') AND k.status = 'queued' AND k.run_at <= now()) q),
			(SELECT coalesce(sum(q.n), 0) FROM agents a
			 CROSS JOIN LATERAL (SELECT coalesce(sum(s.cost), 0) AS used FROM rate_starts s
			     WHERE s.agent_id = a.id AND s.at > now() - a.rate_period_ms * interval '1 millisecond') w
			 CROSS JOIN LATERAL (SELECT count(*) AS n FROM runs r
			     WHERE r.agent_id = a.id AND (r.status = 'queued') IS TRUE AND r.run_at <= now()) q
			 WHERE a.rate_limit IS NOT NULL AND w.used >= a.rate_limit)`).Scan(&byKey, &byRate)
	return byKey, byRate, err
}

// rotateKey gives workspace id a new random API key and returns the workspace with it;
// the old key no longer matches any workspace.
func (s *store) rotateKey(ctx context.Context, id string) (workspace, error) {
	key := newAPIKey()
	w := workspace{APIKey: key}
	err := s.db.QueryRowContext(ctx,
		`UPDATE workspaces SET api_key_hash = $2 WHERE id = $1 RETURNING id, name, created_at`,
		id, hashKey(key)).Scan(&w.ID, &w.Name, &w.CreatedAt)
	if errors.Is(err, sql.ErrNoRows) {
		return workspace{}, errNotFound
	}
	w.CreatedAt = w.CreatedAt.UTC()
	return w, err
}

// countsLock is the advisory lock that lets one process roll the counts up at a time.
const countsLock = 7346298107

// rollUpCounts adds the changes the triggers appended to run_count_changes to run_counts,
// and empties run_count_changes with TRUNCATE (no dead row versions, whatever holds the
// horizon). TRUNCATE waits for the statements writing runs, and holds new ones while it
// waits: it gives up after a short wait, and the next heartbeat tries again.
func (s *store) rollUpCounts(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	// Nothing to add (an idle box) takes no table lock and writes nothing.
	var mine bool
	if err := tx.QueryRowContext(ctx, `SELECT pg_try_advisory_xact_lock($1) AND EXISTS (SELECT FROM run_count_changes)`,
		countsLock).Scan(&mine); err != nil || !mine {
		return err
	}
	if _, err := tx.ExecContext(ctx, `SET LOCAL lock_timeout = '50ms'`); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `LOCK TABLE run_count_changes IN ACCESS EXCLUSIVE MODE`); err != nil {
		if pqErr := (*pq.Error)(nil); errors.As(err, &pqErr) && pqErr.Code == "55P03" { // lock_not_available
			return nil
		}
		return err
	}
	if _, err := tx.ExecContext(ctx, `
		INSERT INTO run_counts AS c (workspace_id, status, shard, n)
		SELECT workspace_id, status, 0, sum(n) FROM run_count_changes GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2
		ON CONFLICT (workspace_id, status, shard) DO UPDATE SET n = c.n + excluded.n`); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `TRUNCATE run_count_changes`); err != nil {
		return err
	}
	return tx.Commit()
}
