package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/lib/pq"
)

// schedule is a workspace's schedule as the API shows it: every due time of its cron
// makes one run of its agent.
type schedule struct {
	ID          string          `json:"id"`
	WorkspaceID string          `json:"workspace_id"`
	Name        string          `json:"name"`
	Cron        string          `json:"cron"`
	Timezone    string          `json:"timezone"`
	Agent       string          `json:"agent"`
	Input       json.RawMessage `json:"input"`
	Priority    int             `json:"priority"`
	TimeoutMS   *int            `json:"timeout_ms"`
	MaxAttempts int             `json:"max_attempts"`
	Key         *string         `json:"concurrency_key"` // its runs' concurrency_key; nil: none
	Cost        int             `json:"cost"`            // its runs' cost
	Paused      bool            `json:"paused"`
	NextAt      *time.Time      `json:"next_at"` // null while paused, or when it never falls due again
	LastAt      *time.Time      `json:"last_at"`
	CreatedAt   time.Time       `json:"created_at"`
}

// scheduleColumns is what scanSchedule reads from schedules.
const scheduleColumns = `id, workspace_id, name, cron, timezone,
	(SELECT a.name FROM agents a WHERE a.id = schedules.agent_id), input, priority, timeout_ms, max_attempts,
	paused, next_at, last_at, created_at, concurrency_key, cost`

// scanSchedule reads one row of scheduleColumns.
func scanSchedule(row interface{ Scan(...any) error }) (schedule, error) {
	var sc schedule
	var timeout sql.NullInt64
	var next, last sql.NullTime
	err := row.Scan(&sc.ID, &sc.WorkspaceID, &sc.Name, &sc.Cron, &sc.Timezone, &sc.Agent, &sc.Input, &sc.Priority,
		&timeout, &sc.MaxAttempts, &sc.Paused, &next, &last, &sc.CreatedAt, &sc.Key, &sc.Cost)
	if timeout.Valid {
		ms := int(timeout.Int64)
		sc.TimeoutMS = &ms
	}
	sc.NextAt, sc.LastAt = utcOrNil(next), utcOrNil(last)
	sc.CreatedAt = sc.CreatedAt.UTC()
	return sc, err
}

// utcOrNil is t in UTC, or nil when it is null.
func utcOrNil(t sql.NullTime) *time.Time {
	if !t.Valid {
		return nil
	}
	u := t.Time.UTC()
	return &u
}

// nullTime is t as a query argument: NULL when t is nil.
func nullTime(t *time.Time) any {
	if t == nil {
		return nil
	}
	return *t
}

// createSchedule inserts sc; an unknown agent is unknownAgentError, a taken name errConflict.
func (s *store) createSchedule(ctx context.Context, sc schedule) (schedule, error) {
	out, err := scanSchedule(s.db.QueryRowContext(ctx, `
		INSERT INTO schedules (workspace_id, name, cron, timezone, agent_id, input, priority, timeout_ms,
		                       max_attempts, paused, next_at, concurrency_key, cost)
		SELECT $1, $2, $3, $4, a.id, $6, $7, $8, $9, $10, $11, $12, $13 FROM agents a WHERE a.workspace_id = $1 AND a.name = $5
		RETURNING `+scheduleColumns,
		sc.WorkspaceID, sc.Name, sc.Cron, sc.Timezone, sc.Agent, string(sc.Input), sc.Priority, nullInt(sc.TimeoutMS),
		sc.MaxAttempts, sc.Paused, nullTime(sc.NextAt), nullString(sc.Key), max(sc.Cost, 1)))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return out, unknownAgentError{name: sc.Agent}
	case isUniqueViolation(err):
		return out, fmt.Errorf("%w: schedule %q already exists", errConflict, sc.Name)
	}
	return out, err
}

// listSchedules returns a workspace's schedules by name.
func (s *store) listSchedules(ctx context.Context, ws string) ([]schedule, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+scheduleColumns+` FROM schedules WHERE workspace_id = $1 ORDER BY schedules.name`, ws)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	list := []schedule{}
	for rows.Next() {
		sc, err := scanSchedule(rows)
		if err != nil {
			return nil, err
		}
		list = append(list, sc)
	}
	return list, rows.Err()
}

// getSchedule returns the schedule of ws with this name.
func (s *store) getSchedule(ctx context.Context, ws, name string) (schedule, error) {
	sc, err := scanSchedule(s.db.QueryRowContext(ctx,
		`SELECT `+scheduleColumns+` FROM schedules WHERE workspace_id = $1 AND name = $2`, ws, name))
	if errors.Is(err, sql.ErrNoRows) {
		return sc, fmt.Errorf("%w: schedule %q", errNotFound, name)
	}
	return sc, err
}

// updateSchedule writes sc over the schedule of ws called name. next_at is written only
// when retime is set (its cron, time zone or pause changed): otherwise the firing loop's
// own next_at stands.
func (s *store) updateSchedule(ctx context.Context, ws, name string, sc schedule, retime bool) (schedule, error) {
	out, err := scanSchedule(s.db.QueryRowContext(ctx, `
		UPDATE schedules SET name = $3, cron = $4, timezone = $5,
			agent_id = coalesce((SELECT a.id FROM agents a WHERE a.workspace_id = $1 AND a.name = $6), agent_id),
			input = $7, priority = $8, timeout_ms = $9, max_attempts = $10, paused = $11,
			next_at = CASE WHEN $12 THEN $13::timestamptz ELSE next_at END, concurrency_key = $14, cost = $15
		WHERE workspace_id = $1 AND name = $2
		RETURNING `+scheduleColumns,
		ws, name, sc.Name, sc.Cron, sc.Timezone, sc.Agent, string(sc.Input), sc.Priority, nullInt(sc.TimeoutMS),
		sc.MaxAttempts, sc.Paused, retime, nullTime(sc.NextAt), nullString(sc.Key), max(sc.Cost, 1)))
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return out, fmt.Errorf("%w: schedule %q", errNotFound, name)
	case isUniqueViolation(err):
		return out, fmt.Errorf("%w: schedule %q already exists", errConflict, sc.Name)
	}
	return out, err
}

// deleteSchedule deletes the schedule of ws called name; its runs stay, without it.
func (s *store) deleteSchedule(ctx context.Context, ws, name string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM schedules WHERE workspace_id = $1 AND name = $2`, ws, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("%w: schedule %q", errNotFound, name)
	}
	return nil
}

// scheduleRequest is the body that creates a schedule or changes one: absent fields keep
// their value (a create's defaults), timeout_ms null removes the limit.
type scheduleRequest struct {
	Name        *string         `json:"name"`
	Cron        *string         `json:"cron"`
	Timezone    *string         `json:"timezone"`
	Agent       *string         `json:"agent"`
	Input       json.RawMessage `json:"input"`
	Priority    *int            `json:"priority"`
	TimeoutMS   json.RawMessage `json:"timeout_ms"` // absent and null differ
	MaxAttempts *int            `json:"max_attempts"`
	Key         json.RawMessage `json:"concurrency_key"` // absent and null differ
	Cost        *int            `json:"cost"`
	Paused      *bool           `json:"paused"`
}

// apply returns base with the request's fields, validated as a whole, and whether its due
// times changed (cron, time zone or pause), in which case NextAt is the first due time
// after now (nil while paused or when it never falls due).
func (q scheduleRequest) apply(base schedule, now time.Time) (schedule, bool, error) {
	sc := base
	set := func(dst *string, v *string) {
		if v != nil {
			*dst = *v
		}
	}
	set(&sc.Name, q.Name)
	set(&sc.Cron, q.Cron)
	set(&sc.Timezone, q.Timezone)
	set(&sc.Agent, q.Agent)
	if q.Paused != nil {
		sc.Paused = *q.Paused
	}
	if err := checkName(sc.Name); err != nil {
		return sc, false, err
	}
	if sc.Agent == "" {
		return sc, false, invalid("agent is required")
	}
	if q.Cron == nil && base.Cron == "" {
		return sc, false, invalid("cron is required")
	}
	spec, err := parseCron(sc.Cron)
	if err != nil {
		return sc, false, invalid("cron %q: %v", sc.Cron, err)
	}
	loc, err := loadZone(sc.Timezone)
	if err != nil {
		return sc, false, err
	}
	// The run fields are checked as a run's create checks them.
	run := runRequest{Agent: sc.Agent, Input: sc.Input, Priority: q.Priority, MaxAttempts: q.MaxAttempts, Cost: q.Cost}
	if len(q.Key) > 0 && string(q.Key) != "null" {
		var key string
		if json.Unmarshal(q.Key, &key) != nil {
			return sc, false, invalid("concurrency_key must be a string of 1 to %d characters, or null for none", maxKeyLength)
		}
		run.Key = &key
	}
	if q.Input != nil {
		run.Input = q.Input
	}
	if len(q.TimeoutMS) > 0 && string(q.TimeoutMS) != "null" {
		var ms int
		if json.Unmarshal(q.TimeoutMS, &ms) != nil {
			return sc, false, invalid("timeout_ms must be an integer from 1 to %d, or null for none", maxTimeoutMS)
		}
		run.TimeoutMS = &ms
	}
	n, err := run.validate("")
	if err != nil {
		return sc, false, err
	}
	sc.Input = n.Input
	if q.Priority != nil {
		sc.Priority = n.Priority
	}
	if q.MaxAttempts != nil {
		sc.MaxAttempts = n.MaxAttempts
	}
	if len(q.TimeoutMS) > 0 {
		sc.TimeoutMS = run.TimeoutMS
	}
	if len(q.Key) > 0 {
		sc.Key = run.Key
	}
	if q.Cost != nil {
		sc.Cost = n.Cost
	}
	sc.Cost = max(sc.Cost, 1)
	retime := sc.Cron != base.Cron || sc.Timezone != base.Timezone || sc.Paused != base.Paused
	if retime {
		sc.NextAt = nil
		next := spec.next(now, loc)
		if next.IsZero() {
			return sc, false, invalid("cron %q: %v", sc.Cron, errNeverDue)
		}
		if !sc.Paused {
			sc.NextAt = &next
		}
	}
	return sc, retime, nil
}

// loadZone loads an IANA time zone for a schedule; its error is the API's 422. "Local"
// is refused: it would mean each process's own zone.
func loadZone(name string) (*time.Location, error) {
	if name == "" || name == "Local" {
		return nil, invalid("timezone %q is not an IANA time zone name such as Europe/Berlin or UTC", name)
	}
	loc, err := time.LoadLocation(name)
	if err != nil {
		return nil, invalid("timezone %q is not an IANA time zone name such as Europe/Berlin or UTC", name)
	}
	return loc, nil
}

// newScheduleDefaults is what a create starts from.
func newScheduleDefaults(ws string) schedule {
	return schedule{WorkspaceID: ws, Timezone: "UTC", Input: json.RawMessage("null"), MaxAttempts: 3, Cost: 1}
}

// checkScheduleCost refuses a schedule whose runs would cost more than its agent's rate
// limit, as a run's create does (an unknown agent is left to the write to say).
func (s *server) checkScheduleCost(ctx context.Context, sc schedule) error {
	if sc.Cost <= 1 {
		return nil
	}
	a, err := s.store.getAgent(ctx, sc.WorkspaceID, sc.Agent)
	switch {
	case errors.Is(err, errNotFound):
		return nil
	case err != nil:
		return err
	case a.RateLimit != nil && sc.Cost > a.RateLimit.Limit:
		return invalid("cost %d is over agent %q's rate_limit.limit (%d): its runs could never start", sc.Cost, a.Name, a.RateLimit.Limit)
	}
	return nil
}

// createSchedule creates a schedule (201); a taken name is 409, an unknown agent 422.
func (s *server) createSchedule(w http.ResponseWriter, r *http.Request) {
	var req scheduleRequest
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	if req.Name == nil {
		req.Name = new(string) // checked below: "name must be …"
	}
	// A new schedule's due times start now: retime is always set (base has no cron).
	sc, _, err := req.apply(newScheduleDefaults(r.PathValue("ws")), time.Now())
	if err == nil {
		err = s.checkScheduleCost(r.Context(), sc)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	sc, err = s.store.createSchedule(r.Context(), sc)
	s.answer(w, r, http.StatusCreated, sc, err)
}

// listSchedules answers the workspace's schedules.
func (s *server) listSchedules(w http.ResponseWriter, r *http.Request) {
	list, err := s.store.listSchedules(r.Context(), r.PathValue("ws"))
	s.answer(w, r, http.StatusOK, map[string][]schedule{"schedules": list}, err)
}

// getSchedule answers one schedule, by name.
func (s *server) getSchedule(w http.ResponseWriter, r *http.Request) {
	sc, err := s.store.getSchedule(r.Context(), r.PathValue("ws"), r.PathValue("name"))
	s.answer(w, r, http.StatusOK, sc, err)
}

// updateSchedule changes any of a schedule's fields. A changed cron, time zone or a
// resume starts its due times afresh from now: a resumed schedule makes no run for the
// times it was paused.
func (s *server) updateSchedule(w http.ResponseWriter, r *http.Request) {
	var req scheduleRequest
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	ws, name := r.PathValue("ws"), r.PathValue("name")
	sc, err := s.patchSchedule(r.Context(), ws, name, req)
	s.answer(w, r, http.StatusOK, sc, err)
}

// patchSchedule applies req to the schedule of ws called name (the API's PATCH and the
// console's pause toggle).
func (s *server) patchSchedule(ctx context.Context, ws, name string, req scheduleRequest) (schedule, error) {
	base, err := s.store.getSchedule(ctx, ws, name)
	if err != nil {
		return base, err
	}
	sc, retime, err := req.apply(base, time.Now())
	if err == nil {
		err = s.checkScheduleCost(ctx, sc)
	}
	if err != nil {
		return sc, err
	}
	if req.Agent != nil && *req.Agent != base.Agent {
		if _, err := s.store.getAgent(ctx, ws, *req.Agent); errors.Is(err, errNotFound) {
			return sc, unknownAgentError{name: *req.Agent}
		} else if err != nil {
			return sc, err
		}
	}
	return s.store.updateSchedule(ctx, ws, name, sc, retime)
}

// deleteSchedule deletes a schedule (204); its runs stay.
func (s *server) deleteSchedule(w http.ResponseWriter, r *http.Request) {
	if err := s.store.deleteSchedule(r.Context(), r.PathValue("ws"), r.PathValue("name")); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// Firing. Every process that runs the worker loop fires the due schedules: it sleeps until
// the earliest next_at, or until schedules are made or changed anywhere (the trigger on
// schedules notifies agentapp_schedules), at most scheduleMaxSleep; then it locks up to
// scheduleBatch due schedules with SKIP LOCKED, so that processes share them rather than
// wait on each other, and makes one run for each. The run's unique (schedule_id, scheduled_for) makes a second run for a due
// time impossible, whatever the processes do.
const (
	scheduleMaxSleep = time.Minute
	scheduleBatch    = 500
	scheduleRetry    = time.Second // after a database error
	// scheduleFirers is how many batches one process fires at once when more than one is
	// due: each holds a connection of the worker's pool (workerPoolSize) meanwhile.
	scheduleFirers = 2
)

// scheduler fires due schedules; its loop's goroutine and the firers it starts use it.
type scheduler struct {
	st        *store
	log       *slog.Logger
	m         *metrics
	origin    string                   // the worker id, as announcements name it
	workspace string                   // RUN_WORKER_WORKSPACE_ID: only its schedules ("" for all)
	local     func(map[string]linePos) // tells this process's worker of new runs
	changed   <-chan struct{}          // schedules were made or changed (agentapp_schedules)
	zonesMu   sync.Mutex
	zones     map[string]*time.Location // LoadLocation reads a file at every call
	failing   bool
}

// run fires due schedules until ctx ends, then closes done.
func (sd *scheduler) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-sd.changed:
			timer.Stop()
		}
		wait, err := sd.step(ctx)
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil && !sd.failing:
			sd.failing = true
			sd.log.Error("firing schedules failed; retrying", "err", err)
		case err == nil && sd.failing:
			sd.failing = false
			sd.log.Info("firing schedules works again")
		}
		if err != nil {
			wait = scheduleRetry
		}
		timer.Reset(wait)
	}
}

// step fires what is due now, batch after batch, and returns how long to sleep: until
// the earliest next_at, at most scheduleMaxSleep.
func (sd *scheduler) step(ctx context.Context) (time.Duration, error) {
	var wait sql.NullFloat64
	err := sd.st.db.QueryRowContext(ctx, `SELECT extract(epoch FROM min(next_at) - clock_timestamp())::float8
		FROM schedules WHERE NOT paused AND ($1 = '' OR workspace_id = NULLIF($1, '')::uuid)`, sd.workspace).Scan(&wait)
	if err != nil {
		return 0, err
	}
	if !wait.Valid || wait.Float64 > 0 {
		d := scheduleMaxSleep
		if wait.Valid {
			d = min(d, time.Duration(wait.Float64*float64(time.Second))+time.Millisecond)
		}
		return d, nil
	}
	n, err := sd.fire(ctx)
	if err != nil || n < scheduleBatch {
		return 0, err
	}
	// More are due than a batch (every schedule at the top of the hour, say): firers take
	// batches side by side, as SKIP LOCKED gives each other schedules.
	errs := make([]error, scheduleFirers)
	var wg sync.WaitGroup
	for i := range scheduleFirers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				n, err := sd.fire(ctx)
				if err != nil || n < scheduleBatch {
					errs[i] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	return 0, errors.Join(errs...)
}

// fire makes the runs of up to scheduleBatch due schedules that no other process holds,
// in one transaction, and returns how many schedules it took. Each makes one run, for the
// latest due time not after now: after a time with no process up, the missed times make
// one run, not a backlog.
func (sd *scheduler) fire(ctx context.Context) (int, error) {
	began := time.Now()
	tx, err := sd.st.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT id, cron, timezone, next_at, now(), workspace_id, agent_id, input,
		priority, coalesce(timeout_ms, 0), max_attempts, coalesce(concurrency_key, ''), cost FROM schedules
		WHERE NOT paused AND next_at <= now() AND ($2 = '' OR workspace_id = NULLIF($2, '')::uuid)
		ORDER BY next_at LIMIT $1 FOR UPDATE SKIP LOCKED`, scheduleBatch, sd.workspace)
	if err != nil {
		return 0, err
	}
	// The runs' fields travel as arrays: the insert reads no schedule again.
	var ids, runIDs, dues, nexts, broken, wss, agents, inputs, keys []string
	var priorities, timeouts, maxAttempts, costs []int64
	for rows.Next() {
		var id, cron, zone, ws, agent, input, key string
		var nextAt, now time.Time
		var priority, timeout, attempts, cost int64
		if err := rows.Scan(&id, &cron, &zone, &nextAt, &now, &ws, &agent, &input, &priority, &timeout, &attempts,
			&key, &cost); err != nil {
			rows.Close()
			return 0, err
		}
		spec, err := parseCron(cron)
		loc := sd.zone(zone)
		if err != nil || loc == nil {
			// Stored only after validation: an edit by hand, or a zone this host lacks.
			// It is set aside (next_at null) rather than found due again at every step.
			sd.log.Error("schedule cannot be fired; set aside until its cron or timezone is changed", "schedule", id,
				"cron", cron, "timezone", zone, "err", err)
			broken = append(broken, id)
			continue
		}
		due := spec.latestDue(nextAt, now, loc)
		next := ""
		if n := spec.next(due, loc); !n.IsZero() {
			next = n.Format(time.RFC3339Nano)
		}
		ids, runIDs = append(ids, id), append(runIDs, newRunID())
		dues, nexts = append(dues, due.Format(time.RFC3339Nano)), append(nexts, next)
		wss, agents, inputs = append(wss, ws), append(agents, agent), append(inputs, input)
		priorities, timeouts, maxAttempts = append(priorities, priority), append(timeouts, timeout), append(maxAttempts, attempts)
		keys, costs = append(keys, key), append(costs, cost)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, err
	}
	if len(broken) > 0 {
		if _, err := tx.ExecContext(ctx, `UPDATE schedules SET next_at = NULL WHERE id = ANY ($1::uuid[])`, pq.StringArray(broken)); err != nil {
			return 0, err
		}
	}
	if len(ids) == 0 {
		return len(broken), tx.Commit()
	}
	// One statement makes the runs and moves the schedules on.
	rows, err = tx.QueryContext(ctx, `
		WITH due AS (
			SELECT u.*, u.due_text::timestamptz AS due FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[],
				$5::uuid[], $6::uuid[], $7::text[], $8::smallint[], $9::integer[], $10::integer[], $11::text[], $12::integer[])
				AS u (id, run_id, due_text, next, workspace_id, agent_id, input, priority, timeout_ms, max_attempts, key, cost)
		), moved AS (
			UPDATE schedules s SET next_at = NULLIF(d.next, '')::timestamptz, last_at = d.due FROM due d WHERE s.id = d.id
		)
		INSERT INTO runs (id, workspace_id, agent_id, input, priority, timeout_ms, max_attempts, schedule_id, scheduled_for,
		                  concurrency_key, cost)
		SELECT d.run_id, d.workspace_id, d.agent_id, d.input::jsonb, d.priority, NULLIF(d.timeout_ms, 0), d.max_attempts,
			d.id, d.due, NULLIF(d.key, ''), d.cost
		FROM due d
		ON CONFLICT (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL DO NOTHING
		RETURNING workspace_id, priority, run_at, extract(epoch FROM created_at - scheduled_for)::float8`,
		pq.StringArray(ids), pq.StringArray(runIDs), pq.StringArray(dues), pq.StringArray(nexts), pq.StringArray(wss),
		pq.StringArray(agents), pq.StringArray(inputs), pq.Int64Array(priorities), pq.Int64Array(timeouts),
		pq.Int64Array(maxAttempts), pq.StringArray(keys), pq.Int64Array(costs))
	if err != nil {
		return 0, err
	}
	spaces := map[string]linePos{}
	var lags []float64
	for rows.Next() {
		var ws string
		var at linePos
		var lag float64
		if err := rows.Scan(&ws, &at.priority, &at.runAt, &lag); err != nil {
			rows.Close()
			return 0, err
		}
		if old, ok := spaces[ws]; !ok || at.before(old) {
			spaces[ws] = at
		}
		lags = append(lags, lag)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, err
	}
	if err := tx.Commit(); err != nil {
		return 0, err
	}
	for _, lag := range lags {
		sd.m.scheduleLag.observe(lag)
	}
	sd.m.scheduled.add(float64(len(lags)))
	sd.log.Debug("fired schedules", "schedules", len(ids), "runs", len(lags), "took", time.Since(began))
	if len(spaces) > 0 {
		sd.announce(ctx, spaces)
	}
	return len(ids) + len(broken), nil
}

// announce wakes this process's worker for the new runs, and the others with the
// notification the API's announcer sends (announce.go).
func (sd *scheduler) announce(ctx context.Context, spaces map[string]linePos) {
	sd.local(spaces)
	nctx, cancel := context.WithTimeout(ctx, announceTimeout)
	defer cancel()
	if _, err := sd.st.db.ExecContext(nctx, `SELECT pg_notify('agentapp_runs', $1)`, announcement(sd.origin, spaces)); err != nil && ctx.Err() == nil {
		// The other workers find the runs at their next search.
		sd.log.Debug("announcing scheduled runs failed", "err", err)
	}
}

// zone is the time zone named, loaded once; nil if it cannot be loaded.
func (sd *scheduler) zone(name string) *time.Location {
	sd.zonesMu.Lock()
	defer sd.zonesMu.Unlock()
	if loc, ok := sd.zones[name]; ok {
		return loc
	}
	loc, err := time.LoadLocation(name)
	if err != nil {
		loc = nil
	}
	sd.zones[name] = loc
	return loc
}
