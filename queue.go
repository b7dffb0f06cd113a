package main

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/lib/pq"
)

// The queue: every change of a run's status is here. A run is created queued (createRuns,
// createRunAlone; single creates are gathered by gather.go into agentapp_create_runs),
// claimed (claim), renewed while it executes (renew), ends or goes back to queued
// (finish, the lease recovery in claim), is canceled (cancelRun, cancelRuns) or retried
// (retryRun), and is deleted when retention says so (prune).
//
// How a run is picked. A claim is a short sequence of plain statements, with
// the fair turns and each agent's place in line kept in the claiming process's memory, so
// that nothing but the claimed runs' own rows is written: a row rewritten at every claim
// (a turn, a mark, a counter) grows a chain of versions that nobody can vacuum while any
// session holds a transaction open, and every later claim reads through it.
//
// A claim (store.claim):
//  1. recovers expired leases (when the worker's cycle asks: worker.cycle);
//  2. finds the agents with queued runs (lineup.find): those of the workspaces where runs
//     were announced, and every searchEvery those it has never seen; when a scheduled run
//     fell due, the idle ones are read again;
//  3. takes rounds (claimRound) until it has its limit or nothing more is claimable:
//     the workspaces in turn, least recently served by this process first, each getting an
//     equal share; within a workspace lower priority first, then the earliest due, merged
//     over its agents. Paused agents are left out, and throttled ones (a webhook's
//     Retry-After) read nothing until their time, which the next due time counts, so that
//     an idle worker wakes then; a capped agent is read only under its
//     advisory lock, up to its room (max_concurrency less its running runs, counted by a
//     statement that starts after the lock was taken). A new limit is a filter here.
//  4. reads each agent's runs from where its last claim stopped (head.at), not from the
//     start: a pinned horizon keeps the index entries of every run claimed since, and a
//     scan from the start reads through all of them. A run that joins a line behind that
//     place is announced with its own (announce): a new run by the API once its insert
//     committed, a run queued again (a recovered lease, a retry) by the trigger on runs.
//     The line is then read from there. A run another claim held (skipped, locked) is read
//     again by the next claim: that claim may yet roll back.
//
//  5. keeps, for an agent that is not locked, the runs it read and did not take (head.ahead):
//     the next claims take from them before they read its line again. A claim that serves
//     100 workspaces a share of one run each would otherwise read every agent of each, and
//     take one run of ten read. The take holds every limit itself (a paused or throttled
//     agent, a lock not held), so runs read ahead are never taken past a change.
//
// A line is read from its start again only when the announcements may have missed a run:
// this process's claim failed, its listening connection was lost, or every rescanEvery.

// rescanEvery is how often every line is read from its start again: the backstop for a run
// that joined a line behind its place unannounced (a writer that does not announce). Under
// a pinned horizon that read goes through the entries of every run claimed since, so it is
// rare.
const rescanEvery = time.Minute

// searchEvery is how often a claim looks for agents it has never seen with queued runs
// (a probe each): runs announced while this process was not listening.
const searchEvery = time.Second

// lateCommit is how far behind the database's clock a line is read from: a run's run_at is
// its insert's start, which may commit after runs inserted later were claimed.
const lateCommit = 200 * time.Millisecond

// claimRounds bounds the rounds of one claim; the worker claims again at once when the
// last round still found runs (claimResult.more).
const claimRounds = 3

// capLockSpace is the advisory lock space of capped agents' claims (the second key is the
// agent's hash).
const capLockSpace = 734629

// linePos is a place in an agent's line: its runs are in (priority, run_at, seq) order. seq
// 0 is before every run at that priority and run_at.
type linePos struct {
	priority int
	runAt    time.Time
	seq      int64
}

var (
	lineStart = linePos{priority: -1}   // before every run
	keepPlace = linePos{priority: 1000} // after every run: an announcement that moves no place
)

// before reports whether p comes before o in line.
func (p linePos) before(o linePos) bool {
	return cmp.Or(cmp.Compare(p.priority, o.priority), p.runAt.Compare(o.runAt), cmp.Compare(p.seq, o.seq)) < 0
}

// head is one agent's place in line, as this process last saw it.
type head struct {
	workspace string
	capped    bool    // it has a max_concurrency or a rate_limit
	keyed     bool    // runs with a concurrency_key were read from its line
	idle      bool    // its line had no due run: not read until it is announced or found again
	at        linePos // the agent's due runs are read from here on
	// An unlocked agent's runs read but not taken yet, in line order, all before at, which
	// later claims take before they read its line again: a claim that serves many
	// workspaces takes a share of one or two runs from each, and a workspace's share is the
	// first of its agents' runs, so that each of them was read and most left. more says
	// that the last read filled its limit (more may be due from at on); agent is the agent
	// as that read found it. Announcements in its workspace, a scheduled run falling due
	// and a rescan drop them (forget).
	ahead []pick
	more  bool
	agent claimedRun
}

// forget drops the runs read ahead: the line is read again from the first of them.
func (h *head) forget() {
	if len(h.ahead) > 0 {
		if at := h.ahead[0].place(); at.before(h.at) {
			h.at = at
		}
		h.ahead = nil
	}
}

// locked reports whether the agent's runs are taken only under its lock (capLockSpace):
// its cap, its rate and its keys' limits are counted by the claim that holds it.
func (h *head) locked() bool { return h.capped || h.keyed }

// lineup is what a worker knows of the queue between claims: the agents that may have due
// runs, where each one's line starts, and when each workspace was last served. Only the
// claim (under the worker's cycle lock) reads and writes it, except the announcements.
type lineup struct {
	heads  map[string]*head     // agent id → place in line
	served map[string]time.Time // workspace id → when this process last claimed one of its runs
	found  time.Time            // the last search for agents never seen
	reset  time.Time            // the last time every line was read from its start
	due    time.Time            // the next scheduled run falls due: search again then
	wake   time.Time            // the next waiting run's timer falls due: wake it then

	mu        sync.Mutex         // guards the announcements below
	announced map[string]linePos // workspaces with runs queued since the last claim: the earliest place
	rescan    bool               // read every line from its start at the next claim
}

func newLineup() *lineup {
	return &lineup{heads: map[string]*head{}, served: map[string]time.Time{}, announced: map[string]linePos{}}
}

// announce records that runs were queued in workspaces, each at the given place or later
// in its agent's line (keepPlace: none behind the places known; nil: anywhere, read every
// line from its start).
func (q *lineup) announce(workspaces map[string]linePos) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if workspaces == nil {
		q.rescan = true
	}
	for ws, at := range workspaces {
		if old, ok := q.announced[ws]; !ok || at.before(old) {
			q.announced[ws] = at
		}
	}
}

// searchDue reports whether the next claim searches for agents (find).
func (q *lineup) searchDue() bool {
	q.mu.Lock()
	rescan := q.rescan
	q.mu.Unlock()
	_, search := q.plan(time.Now(), rescan)
	return search
}

// plan says what a find at now does: read every line from its start again (reset), and
// look for agents with queued runs (search).
func (q *lineup) plan(now time.Time, rescan bool) (reset, search bool) {
	reset = rescan || now.Sub(q.reset) >= rescanEvery
	return reset, reset || now.Sub(q.found) >= searchEvery
}

// locked reports whether an agent in line (of workspace ws, "" for any) is read only
// under its lock.
func (q *lineup) locked(ws string) bool {
	for _, h := range q.heads {
		if h.locked() && !h.idle && (ws == "" || h.workspace == ws) {
			return true
		}
	}
	return false
}

// find brings the heads up to date before a claim.
func (q *lineup) find(ctx context.Context, db queryer) error {
	now := time.Now()
	q.mu.Lock()
	announced, rescan := q.announced, q.rescan
	q.announced, q.rescan = map[string]linePos{}, false
	q.mu.Unlock()
	reset, search := q.plan(now, rescan)
	if reset {
		for _, h := range q.heads {
			h.at, h.ahead = lineStart, nil
		}
		q.reset = now
	}
	if !q.due.IsZero() && !now.Before(q.due) {
		// A scheduled run fell due: its agent is in line, if idle (announced when the run was
		// created), or found at the next search; it may come before the runs read ahead.
		for _, h := range q.heads {
			h.idle = false
			h.forget()
		}
		q.due = time.Time{}
	}
	for _, h := range q.heads {
		if _, ok := announced[h.workspace]; ok {
			h.forget() // new runs may come first, or the agent changed (paused, capped, its config)
		}
	}
	if search {
		// The agents never seen (after a reset: not in line, or idle) that have queued runs,
		// due or not.
		known := make([]string, 0, len(q.heads))
		for id, h := range q.heads {
			if !reset || !h.idle {
				known = append(known, id)
			}
		}
		rows, err := db.query(ctx, searchSQL, pq.StringArray(known))
		if err != nil {
			q.announce(nil) // not done: again at the next claim
			return err
		}
		if err := scanHeads(rows, q.heads, nil); err != nil {
			q.announce(nil)
			return err
		}
		q.found = now
	}
	if len(announced) == 0 {
		return nil
	}
	ws := make([]string, 0, len(announced))
	for id := range announced {
		ws = append(ws, id)
	}
	rows, err := db.query(ctx, announcedSQL, pq.StringArray(ws))
	if err != nil {
		q.announce(announced)
		return err
	}
	return scanHeads(rows, q.heads, announced)
}

// scanHeads adds the agents in rows (id, workspace, capped) to heads at the start of their
// line. An agent in heads already keeps its place (an idle one too: read from the start
// again, its line would read through the entries of every run claimed from it since the
// horizon was pinned), moved back to where its workspace's runs were announced, if earlier.
func scanHeads(rows *sql.Rows, heads map[string]*head, announced map[string]linePos) error {
	defer rows.Close()
	for rows.Next() {
		var id string
		h := &head{at: lineStart}
		if err := rows.Scan(&id, &h.workspace, &h.capped); err != nil {
			return err
		}
		if old := heads[id]; old != nil {
			old.capped, old.idle = h.capped, false
			if at, ok := announced[old.workspace]; ok && at.before(old.at) {
				old.at = at
			}
			continue
		}
		heads[id] = h
	}
	return rows.Err()
}

// dueQueued is the test of a queued run that runs_due_queued_idx answers, and no other
// index: runs by due time for the next due time and the oldest wait (schema.sql).
const dueQueued = `(status = 'queued') IS TRUE AND priority >= 0`

// recoverSQL puts runs whose lease expired back in line (or ends them when no attempt is
// left, or a cancel was requested), and counts those requeued and those ended. run_at is
// kept: their place in line.
const recoverSQL = `
	WITH recovered AS (UPDATE runs r SET
		status = CASE WHEN r.cancel_requested THEN 'canceled'
		              WHEN r.attempt < r.max_attempts THEN 'queued' ELSE 'failed' END,
		error = CASE WHEN r.cancel_requested THEN coalesce(r.cancel_error, 'canceled by request')
		             ELSE 'lease expired: worker ' || r.worker_id || ' stopped renewing attempt ' || r.attempt END,
		errors = r.errors || jsonb_build_array(jsonb_build_object('attempt', r.attempt, 'at', ` + nowZ + `,
		         'message', 'lease expired: worker ' || r.worker_id || ' stopped renewing attempt ' || r.attempt)),
		finished_at = CASE WHEN r.cancel_requested OR r.attempt >= r.max_attempts THEN now() END,
		started_at = CASE WHEN r.cancel_requested OR r.attempt >= r.max_attempts THEN r.started_at END,
		worker_id = NULL, lease_expires_at = NULL, updated_at = now()
	WHERE r.id = ANY (ARRAY(SELECT x.id FROM runs x WHERE x.status = 'running' AND x.lease_expires_at < now()
	                        ORDER BY x.lease_expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
	RETURNING r.status)
	SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status <> 'queued') FROM recovered`

// wakeSQL puts the waiting runs whose sleep or signal timeout fell due back in line, due
// now, with what met the wait, and answers where each joined its line (the claim
// announces them, as the trigger on runs does to the other processes). The waiting runs
// are found in runs_wake_idx, whose predicate the test says: those without a timer are
// never read.
const wakeSQL = `
	UPDATE runs r SET status = 'queued', run_at = now(), updated_at = now(), wake_at = NULL, waiting_for = NULL,
		resume = CASE WHEN r.waiting_for ? 'sleep_ms' THEN '{"slept":true}'::jsonb ELSE '{"timeout":true}'::jsonb END
	WHERE r.id = ANY (ARRAY(SELECT x.id FROM runs x WHERE x.status = 'waiting' AND x.wake_at IS NOT NULL
	                        AND x.wake_at <= now() ORDER BY x.wake_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
	  AND r.status = 'waiting'
	RETURNING r.workspace_id, r.priority, r.run_at`

// pickSQL reads up to n due runs of each agent from its place in line, in claim order, with
// the agent as it stands now: a range of runs_line_idx, whose predicate the status test
// says, and whose start the row comparison bounds. A run with a concurrency_key is passed
// over while its key has key_concurrency runs running or due ahead of it in line (two
// ranges of runs_key_idx): a key at its limit never holds up other runs, and a run never
// starts before an earlier one of its key, wherever this process's place in line is (a
// line read from after the earlier run, in a process that the announcement of the key's
// freeing had not reached yet, started runs of a key out of order); the runs a pick returns
// of one key are within its room, since each counts the ones before it. A throttled agent
// reads none: its head goes idle until the next due time, which its throttled_until is among.
const pickSQL = `
	SELECT h.agent_id, a.paused, a.max_concurrency IS NOT NULL OR a.rate_limit IS NOT NULL, a.name, a.kind, a.config,
		a.signing_secret, CASE WHEN a.secret_rotated_at > now() - $5 * interval '1 millisecond' THEN a.previous_signing_secret END,
		a.retry_base_ms, a.retry_max_ms, c.id, c.priority, c.run_at, c.seq, c.concurrency_key IS NOT NULL, c.cost, now()
	FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $6::bigint[], $4::int[]) AS h (agent_id, priority, run_at, seq, n)
	JOIN agents a ON a.id = h.agent_id
	CROSS JOIN LATERAL (
		SELECT r.id, r.priority, r.run_at, r.seq, r.concurrency_key, r.cost FROM runs r
		LEFT JOIN LATERAL (SELECT a.key_concurrency
			- (SELECT count(*) FROM (SELECT FROM runs k
				WHERE k.agent_id = r.agent_id AND k.concurrency_key = r.concurrency_key AND k.concurrency_key IS NOT NULL
				  AND k.status IN ('queued', 'running', 'waiting') AND k.status = 'running'
				LIMIT a.key_concurrency) running)
			- (SELECT count(*) FROM (SELECT FROM runs k
				WHERE k.agent_id = r.agent_id AND k.concurrency_key = r.concurrency_key AND k.concurrency_key IS NOT NULL
				  AND k.status IN ('queued', 'running', 'waiting') AND k.status = 'queued' AND k.run_at <= now()
				  AND (k.priority, k.run_at, k.seq) < (r.priority, r.run_at, r.seq)
				LIMIT a.key_concurrency) ahead) AS room) k ON r.concurrency_key IS NOT NULL
		WHERE r.agent_id = h.agent_id AND (r.status = 'queued') IS TRUE AND r.run_at <= now()
		  AND (r.priority, r.run_at, r.seq) >= (h.priority, h.run_at, h.seq) AND (r.concurrency_key IS NULL OR k.room > 0)
		ORDER BY r.priority, r.run_at, r.seq
		LIMIT h.n) c
	WHERE a.throttled_until IS NULL OR a.throttled_until <= now()`

// takeSQL claims the picked runs that are still queued, skipping those another
// transaction holds, and records the cost of those of rate-limited agents ($4) as started
// now. Every limit holds here, whatever the claim read before: a paused or throttled
// agent's run is not taken, nor a run of an agent with a cap, a rate or a key unless this
// claim holds the agent's lock ($5). The status test is one no index can answer, so that the runs are
// found by id: as a plain equality the generic plan read the queued range of
// runs_list_idx, and as (status = 'queued') IS TRUE the whole of runs_line_idx, whose
// predicate that is; under a pinned horizon each holds an entry for every run queued since.
// status is never null, so IS NOT FALSE says the same. The rows locked are then written by
// their address (ctid), not found by id a second time.
const takeSQL = `
	WITH taken AS (
	UPDATE runs r SET status = 'running', attempt = r.attempt + 1, worker_id = $1,
		lease_expires_at = now() + $2 * interval '1 millisecond', started_at = now(), updated_at = now()
	WHERE r.ctid = ANY (ARRAY(SELECT x.ctid FROM runs x WHERE x.id = ANY ($3) AND (x.status = 'queued') IS NOT FALSE
	                            AND NOT EXISTS (SELECT FROM agents g WHERE g.id = x.agent_id
	                                AND (g.paused OR g.throttled_until > now() OR x.agent_id <> ALL ($5) AND
	                                     (g.max_concurrency IS NOT NULL OR g.rate_limit IS NOT NULL OR x.concurrency_key IS NOT NULL)))
	                          FOR UPDATE OF x SKIP LOCKED))
	RETURNING r.id, r.agent_id, r.workspace_id, r.attempt, r.input, r.timeout_ms, r.trace_id, r.trace_flags, r.pushbacks,
	          r.cost, r.step, r.state, r.resume),
	started AS (
	INSERT INTO rate_starts (agent_id, at, cost)
	SELECT agent_id, now(), sum(cost) FROM taken WHERE agent_id = ANY ($4) GROUP BY agent_id)
	SELECT id, agent_id, workspace_id, attempt, input, timeout_ms, trace_id, trace_flags, pushbacks, step, state, resume
	FROM taken`

// The claim's other statements: the agents not in line (or idle) with queued runs, a probe
// each in runs_line_idx; the agents of announced workspaces; the next due time (a scheduled
// run's, or a throttled agent's end of throttle, whichever comes first); the locks of the
// agents read only under them; and, counted after the locks were taken, their room: how
// many more may run (max_concurrency less those running), how many units their rate
// leaves in the window that ends now, and when the earliest start in it leaves it.
const (
	searchSQL = `SELECT a.id, a.workspace_id, a.max_concurrency IS NOT NULL OR a.rate_limit IS NOT NULL FROM agents a
			WHERE NOT a.paused AND a.id <> ALL ($1)
			  AND (SELECT true FROM runs r WHERE r.agent_id = a.id AND (r.status = 'queued') IS TRUE
			       ORDER BY r.priority, r.run_at, r.seq LIMIT 1)`
	announcedSQL = `SELECT a.id, a.workspace_id, a.max_concurrency IS NOT NULL OR a.rate_limit IS NOT NULL
		FROM agents a WHERE a.workspace_id = ANY ($1) AND NOT a.paused`
	nextDueSQL = `SELECT least(d.at, d.wake), d.wake FROM (SELECT least(
			(SELECT min(run_at) FROM runs
			 WHERE ` + dueQueued + ` AND run_at > coalesce(NULLIF($2, '')::timestamptz, now())
			   AND ($1 = '' OR workspace_id = NULLIF($1, '')::uuid)),
			(SELECT min(throttled_until) FROM agents
			 WHERE throttled_until > now() AND ($1 = '' OR workspace_id = NULLIF($1, '')::uuid))) AS at,
			(SELECT min(wake_at) FROM runs WHERE status = 'waiting' AND wake_at IS NOT NULL
			 AND ($1 = '' OR workspace_id = NULLIF($1, '')::uuid)) AS wake) d`
	lockAgentsSQL = `SELECT coalesce(array_agg(id), '{}') FROM unnest($1::uuid[]) AS id
			WHERE pg_try_advisory_xact_lock($2, hashtext(id::text))`
	roomSQL = `SELECT a.id,
			coalesce(a.max_concurrency - (SELECT count(*) FROM runs x
				WHERE x.status = 'running' AND x.workspace_id = a.workspace_id AND x.agent_id = a.id), $2),
			coalesce((a.rate_limit - coalesce(w.used, 0))::bigint, $2),
			w.first + a.rate_period_ms * interval '1 millisecond'
			FROM agents a LEFT JOIN LATERAL (SELECT sum(s.cost) AS used, min(s.at) AS first FROM rate_starts s
				WHERE s.agent_id = a.id AND s.at > now() - a.rate_period_ms * interval '1 millisecond') w
				ON a.rate_limit IS NOT NULL
			WHERE a.id = ANY ($1)`
)

// claimSQL is every statement a claim may send. They are prepared before its transaction
// begins: prepared inside it, a statement took a second connection of the worker's small
// pool while the transaction held rows locked, and with the pool's other connections
// waiting on another process's claim for locks of their own, three processes started
// together waited for each other until the claim's 30 s timeout (compare.sh's 3-process
// drain, 322 runs/s in 2 of 3 reps).
var claimSQL = []string{recoverSQL, wakeSQL, searchSQL, announcedSQL, pickSQL, takeSQL, nextDueSQL, lockAgentsSQL, roomSQL}

// claim recovers expired leases when recoverLeases, then claims up to limit due runs (limit
// may be 0) for workerID from workspace ws ("" for every one), as the comment at the top of
// this file says. Each statement is a transaction of its own (one round trip each), but
// for a claim that reads capped agents, which holds their locks from the count of their
// room to the commit of what it took, and a claim that searches (claimIn).
func (s *store) claim(ctx context.Context, q *lineup, workerID string, limit int, ws string, lease time.Duration, recoverLeases bool) (claimResult, error) {
	res, err := s.claimIn(ctx, q, workerID, limit, ws, lease, recoverLeases)
	if err != nil {
		q.announce(nil) // where it stopped in each line is not known: from the start next time
		return claimResult{}, err
	}
	return res, nil
}

// claimIn is claim's work.
func (s *store) claimIn(ctx context.Context, q *lineup, workerID string, limit int, ws string, lease time.Duration, recoverLeases bool) (claimResult, error) {
	var res claimResult
	for _, query := range claimSQL {
		if _, err := s.prepared(ctx, query); err != nil {
			return res, err
		}
	}
	db := queryer{s: s}
	begin := func() error {
		tx, err := s.db.BeginTx(ctx, nil)
		db.tx = tx
		return err
	}
	defer func() {
		if db.tx != nil {
			db.tx.Rollback()
		}
	}()
	// The claim that searches (once a second) is one transaction, so that an idle worker's
	// claim costs PostgreSQL one, not two.
	if q.searchDue() {
		if err := begin(); err != nil {
			return res, err
		}
	}
	if recoverLeases {
		if err := db.queryRow(ctx, recoverSQL).Scan(&res.requeued, &res.failed); err != nil {
			return res, err
		}
		if res.requeued > 0 {
			q.announce(nil)
		}
	}
	// Wakes ride along with the recovery, and run whenever a timer this process knows of
	// fell due (the idle worker sleeps until then: nextDueSQL).
	if recoverLeases || !q.wake.IsZero() && !time.Now().Before(q.wake) {
		q.wake = time.Time{}
		rows, err := db.query(ctx, wakeSQL)
		if err != nil {
			return res, err
		}
		woken := map[string]linePos{}
		for rows.Next() {
			var ws string
			var at linePos
			if err := rows.Scan(&ws, &at.priority, &at.runAt); err != nil {
				rows.Close()
				return res, err
			}
			if old, ok := woken[ws]; !ok || at.before(old) {
				woken[ws] = at
			}
			res.woken++
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return res, err
		}
		if len(woken) > 0 {
			q.announce(woken)
		}
	}
	if limit <= 0 {
		return res, nil
	}
	if err := q.find(ctx, db); err != nil {
		return res, err
	}
	for round := 1; len(res.claimed) < limit; round++ {
		// An agent read only under its lock needs a transaction to hold it (a round may
		// learn that an agent has keyed runs: the next one locks it).
		if db.tx == nil && q.locked(ws) {
			if err := begin(); err != nil {
				return res, err
			}
		}
		more, err := s.claimRound(ctx, db, q, workerID, limit, ws, lease, &res)
		if err != nil {
			return res, err
		}
		if !more {
			break
		}
		if round == claimRounds {
			res.more = true
			break
		}
	}
	if len(res.claimed) < limit && !res.more {
		var next, wake sql.NullTime
		// Runs due after the last pick's time: one that fell due between that pick (which
		// found its agent's line empty, and left it idle) and this statement is next due,
		// now, and not missed until the next rescan.
		if err := db.queryRow(ctx, nextDueSQL, ws, timeArg(res.readAt)).Scan(&next, &wake); err != nil {
			return res, err
		}
		if next.Valid {
			res.nextDue, q.due = next.Time, next.Time
		}
		q.wake = wake.Time // zero when no run waits on a timer
		if !res.rateFree.IsZero() && (res.nextDue.IsZero() || res.rateFree.Before(res.nextDue)) {
			res.nextDue = res.rateFree
		}
	}
	if db.tx != nil {
		err := db.tx.Commit()
		db.tx = nil
		return res, err
	}
	return res, nil
}

// noLimit stands for an agent's room where it has no limit: more than any claim takes.
const noLimit = math.MaxInt32

// agentRoom is what a locked agent's limits leave to a claim: runs it may start, and units
// of its rate (noLimit for none); free is when the earliest start in its window leaves it.
type agentRoom struct {
	runs, units int64
	free        time.Time
}

// earliest is the earlier of two times, the zero time standing for none.
func earliest(a, b time.Time) time.Time {
	if a.IsZero() || !b.IsZero() && b.Before(a) {
		return b
	}
	return a
}

// pick is one due run a round read.
type pick struct {
	agent, id string
	priority  int
	runAt     time.Time
	seq       int64
}

func (p pick) before(o pick) int {
	return cmp.Or(cmp.Compare(p.priority, o.priority), p.runAt.Compare(o.runAt), cmp.Compare(p.seq, o.seq))
}

// place is p's place in its agent's line.
func (p pick) place() linePos { return linePos{p.priority, p.runAt, p.seq} }

// claimRound is one round of a claim: it adds what it claimed to res and says whether
// another round may find more.
func (s *store) claimRound(ctx context.Context, db queryer, q *lineup, workerID string, limit int, ws string, lease time.Duration, res *claimResult) (more bool, err error) {
	want := limit - len(res.claimed)
	// The workspaces with agents in line, least recently served first.
	agentsOf := map[string][]string{}
	for id, h := range q.heads {
		if h.idle || (ws != "" && h.workspace != ws) {
			continue
		}
		agentsOf[h.workspace] = append(agentsOf[h.workspace], id)
	}
	if len(agentsOf) == 0 {
		return false, nil
	}
	order := make([]string, 0, len(agentsOf))
	for w := range agentsOf {
		order = append(order, w)
	}
	slices.SortFunc(order, func(a, b string) int {
		return cmp.Or(q.served[a].Compare(q.served[b]), cmp.Compare(a, b))
	})
	// Each of the first want workspaces may take an equal share.
	if len(order) > want {
		order, more = order[:want], true
	}
	share := (want + len(order) - 1) / len(order)

	// The locked agents of those workspaces only (the others are not read this round), and
	// how much room each leaves: how many runs it may start, and how many units of cost.
	var limited []string
	for _, w := range order {
		for _, id := range agentsOf[w] {
			if q.heads[id].locked() {
				limited = append(limited, id)
			}
		}
	}
	room := map[string]agentRoom{} // locked agents whose lock this claim holds
	if len(limited) > 0 {
		res.capped = true
		var err error
		if room, err = lockAgents(ctx, db, q, limited); err != nil {
			return false, err
		}
	}

	// Read each agent's line, up to the share (a locked agent: up to its room; one whose
	// rate has no unit left is not read, and due again when the window moves on).
	var agents []string
	var prios, seqs, ns pq.Int64Array
	var ats []string
	var rated pq.StringArray    // agents whose starts count against a rate
	read := map[string][]pick{} // by agent, in claim order: the runs read ahead, then those read now
	asked := map[string]int{}   // the agents read now: how many runs were asked for
	for _, w := range order {
		for _, id := range agentsOf[w] {
			h, n := q.heads[id], share
			if len(h.ahead) > 0 {
				if h.locked() {
					h.forget() // read under its lock from now on
				} else {
					read[id] = slices.Clone(h.ahead)
					if n -= len(h.ahead); n <= 0 || !h.more {
						continue // enough read ahead, or nothing more was due behind them
					}
				}
			}
			if h.locked() {
				r, ok := room[id]
				if !ok {
					continue // its lock is held elsewhere
				}
				if r.units < noLimit {
					rated = append(rated, id)
				}
				if r.units <= 0 {
					res.rateFree = earliest(res.rateFree, r.free)
					continue
				}
				n = min(n, int(r.runs))
			}
			if n <= 0 {
				continue
			}
			agents, prios, ns = append(agents, id), append(prios, int64(h.at.priority)), append(ns, int64(n))
			asked[id] = n
			ats, seqs = append(ats, h.at.runAt.Format(time.RFC3339Nano)), append(seqs, h.at.seq)
		}
	}
	if len(agents) == 0 && len(read) == 0 {
		return false, nil
	}
	fresh := map[string]int{} // the agents read now: how many runs were read
	held := map[string]bool{} // agents whose read stopped at a run they may not start yet
	dbNow := time.Now()       // the pick's now(), read from its rows; this process's clock when it reads none
	if len(agents) > 0 {
		rows, err := db.query(ctx, pickSQL, pq.StringArray(agents), prios, pq.StringArray(ats), ns, secretOverlap.Milliseconds(), seqs)
		if err != nil {
			return false, err
		}
		for _, id := range agents {
			fresh[id] = 0
		}
		for rows.Next() {
			var p pick
			var paused, isCapped bool
			var keyed bool
			var cost int64
			var a claimedRun
			var secret, previous sql.NullString
			if err := rows.Scan(&p.agent, &paused, &isCapped, &a.AgentName, &a.AgentKind, &a.AgentConfig, &secret, &previous,
				&a.Retry.BaseMS, &a.Retry.MaxMS, &p.id, &p.priority, &p.runAt, &p.seq, &keyed, &cost, &dbNow); err != nil {
				rows.Close()
				return false, err
			}
			res.readAt = dbNow // a pick that reads no row says nothing of the database's time
			for _, s := range []sql.NullString{secret, previous} {
				if s.Valid {
					a.Secrets = append(a.Secrets, s.String)
				}
			}
			h := q.heads[p.agent]
			if h == nil || held[p.agent] {
				continue // left the line at an earlier row of this round, or stopped there
			}
			h.agent = a
			fresh[p.agent]++
			if paused || isCapped != h.capped {
				// Changed since it was found: found again at the next search.
				delete(q.heads, p.agent)
				delete(read, p.agent)
				q.announce(nil)
				more = true
				continue
			}
			r, ok := room[p.agent]
			if keyed && !ok {
				// Its keys' limits are counted under its lock: the next round takes it.
				h.keyed, held[p.agent], more = true, true, true
				continue
			}
			switch {
			case ok && cost > r.units:
				// Over its rate: this run and those behind it wait for the window to move on.
				res.rateFree = earliest(res.rateFree, r.free)
				held[p.agent] = true
				continue
			case ok:
				r.units -= cost
				room[p.agent] = r
			}
			read[p.agent] = append(read[p.agent], p)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return false, err
		}
	}

	// Each workspace's share, merged over its agents; then turns across workspaces.
	var turns [][]pick // turns[i]: the workspaces' i-th runs, in workspace order
	for _, w := range order {
		var line []pick
		for _, id := range agentsOf[w] {
			line = append(line, read[id]...)
		}
		slices.SortFunc(line, pick.before)
		if len(line) > share {
			line, more = line[:share], true
		}
		for i, p := range line {
			if i == len(turns) {
				turns = append(turns, nil)
			}
			turns[i] = append(turns[i], p)
		}
	}
	var chosen []string
	isChosen := map[string]bool{}
	for _, turn := range turns {
		for _, p := range turn {
			if len(chosen) < want {
				chosen, isChosen[p.id] = append(chosen, p.id), true
			} else {
				more = true
			}
		}
	}
	claimed := map[string]bool{}
	if len(chosen) > 0 {
		locked := pq.StringArray{} // not nil: NULL would pass every run
		for id := range room {
			locked = append(locked, id)
		}
		rows, err := db.query(ctx, takeSQL, workerID, lease.Milliseconds(), pq.StringArray(chosen), rated, locked)
		if err != nil {
			return false, err
		}
		now := time.Now()
		for rows.Next() {
			var agentID string
			var timeout sql.NullInt64
			var traceID, flags sql.NullString
			var c claimedRun
			if err := rows.Scan(&c.ID, &agentID, &c.WorkspaceID, &c.Attempt, &c.Input, &timeout, &traceID, &flags,
				&c.Pushbacks, &c.Step, (*[]byte)(&c.State), (*[]byte)(&c.Resume)); err != nil {
				rows.Close()
				return false, err
			}
			var a claimedRun
			if h := q.heads[agentID]; h != nil {
				a = h.agent
			}
			c.AgentName, c.AgentKind, c.AgentConfig, c.Secrets, c.Retry = a.AgentName, a.AgentKind, a.AgentConfig, a.Secrets, a.Retry
			c.traceContext = traceOf(c.ID, traceID, flags)
			c.Timeout = time.Duration(timeout.Int64) * time.Millisecond
			if c.AgentKind == "webhook" { // the only kind that posts events
				c.EventsURL, c.EventsToken = s.events.link(c.ID, c.Step, c.Attempt)
			}
			res.claimed = append(res.claimed, c)
			q.served[c.WorkspaceID] = now
			claimed[c.ID] = true
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return false, err
		}
	}
	// Each agent's line now starts at its first run not claimed (one not chosen, or one
	// another claim held), or after its last one; an unlocked agent keeps the runs it read
	// and did not take as its runs read ahead, and its line starts after the last one read,
	// unless a run chosen was not claimed (another claim held or took it, or its agent
	// changed): then from there. An agent whose line had no due run is idle until it is
	// announced or found again. A run held by another claim is not looked for again in
	// this claim: that claim has it, unless it rolls back.
	late := dbNow.Add(-lateCommit)
	for _, w := range order {
		for _, id := range agentsOf[w] {
			h, got := q.heads[id], read[id]
			n, wasRead := fresh[id]
			if h == nil || !wasRead && len(got) == 0 {
				continue
			}
			if len(got) == 0 {
				h.idle = !held[id]
				continue
			}
			if wasRead {
				h.more = n == asked[id] && !held[id]
				more = more || h.more
			}
			var left []pick
			missed := false // a run chosen was not claimed
			for _, p := range got {
				if !claimed[p.id] {
					left = append(left, p)
					missed = missed || isChosen[p.id]
				}
			}
			last := got[len(got)-1]
			switch {
			case h.locked() || missed || last.runAt.After(late):
				// From the first run not taken; runs committed late may yet join before the last.
				h.ahead = nil
				h.at = linePos{last.priority, last.runAt, last.seq + 1}
				if len(left) > 0 {
					h.at = left[0].place()
				}
				if h.at.runAt.After(late) {
					h.at = linePos{priority: h.at.priority, runAt: late}
				}
			default:
				h.ahead = left
				if n > 0 {
					h.at = linePos{last.priority, last.runAt, last.seq + 1} // after the last one read now
				}
			}
		}
	}
	return more, nil
}

// lockAgents takes the locks of the given agents that no other claim holds and returns
// their room. Two statements: the count must see every claim that committed before the
// lock. A lock this transaction holds already is taken again. An agent locked for its keys
// alone has no room to count (the pick tests its keys).
func lockAgents(ctx context.Context, db queryer, q *lineup, ids []string) (map[string]agentRoom, error) {
	var locked, counted pq.StringArray
	if err := db.queryRow(ctx, lockAgentsSQL, pq.StringArray(ids), capLockSpace).Scan(&locked); err != nil {
		return nil, err
	}
	room := map[string]agentRoom{}
	for _, id := range locked {
		if q.heads[id].capped {
			counted = append(counted, id)
		} else {
			room[id] = agentRoom{runs: noLimit, units: noLimit}
		}
	}
	if len(counted) == 0 {
		return room, nil
	}
	rows, err := db.query(ctx, roomSQL, counted, noLimit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var r agentRoom
		var free sql.NullTime
		if err := rows.Scan(&id, &r.runs, &r.units, &free); err != nil {
			return nil, err
		}
		r.free = free.Time
		room[id] = r
	}
	return room, rows.Err()
}

// queryer runs the claim's statements, prepared (claim prepares them all first: claimSQL),
// each in a transaction of its own, or in tx if set.
type queryer struct {
	s  *store
	tx *sql.Tx
}

func (t queryer) query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	st, err := t.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.QueryContext(ctx, args...)
}

// queryRow runs a statement that answers one row, as query does; an error comes from Scan.
func (t queryer) queryRow(ctx context.Context, query string, args ...any) interface{ Scan(...any) error } {
	st, err := t.stmt(ctx, query)
	if err != nil {
		return failedRow{err}
	}
	return st.QueryRowContext(ctx, args...)
}

// stmt is query prepared for the pool, in tx if set.
func (t queryer) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	st, err := t.s.prepared(ctx, query)
	if err != nil || t.tx == nil {
		return st, err
	}
	return t.tx.StmtContext(ctx, st), nil
}

// failedRow is a row whose statement could not be sent.
type failedRow struct{ err error }

func (r failedRow) Scan(...any) error { return r.err }

// newRun is a validated request to create a run.
type newRun struct {
	Agent          string
	Input          json.RawMessage
	MaxAttempts    int
	Priority       int          // 0 … 9, lower first
	RunAt          time.Time    // zero: now; a time in the past means now
	DelayMS        int64        // due this long after the database's now(); not with RunAt
	TimeoutMS      int          // 0: none
	Key            string       // its concurrency_key; "": none
	Cost           int          // units of its agent's rate_limit, 1 … maxRunCost
	IdempotencyKey string       // optional
	RequestHash    []byte       // with IdempotencyKey: tells a repeat from a different request
	EarlierHash    []byte       // the hash the previous release stored for the same request, or nil
	Trace          traceContext // the create request's, or a new one
	storedSize     int          // Input's size as stored and answered
}

// createRunAlone is createRun in a statement of its own, for the run with the given id.
func (s *store) createRunAlone(ctx context.Context, ws string, n newRun, id string) (r runRecord, created bool, err error) {
	runs, err := s.insertGathered(ctx, []*pendingCreate{{ws: ws, n: n, id: id}})
	if err != nil {
		return r, false, err
	}
	if r, ok := runs[id]; ok {
		return r, true, nil
	}
	// Nothing inserted: either the key was used before or the agent is unknown.
	if r, found, err := s.repeatOf(ctx, ws, n); found || err != nil {
		return r, false, err
	}
	return runRecord{}, false, unknownAgentError{n.Agent}
}

// createRunApart creates one run that the gathered statement does not: one with a
// concurrency_key or a cost, on which its agent's limits decide (createRuns). With an
// idempotency key used before, it returns the first run (or errConflict) as createRun does.
func (s *store) createRunApart(ctx context.Context, ws string, n newRun) (runRecord, bool, error) {
	if r, found, err := s.repeatOf(ctx, ws, n); found || err != nil {
		return r, false, err
	}
	runs, err := s.createRuns(ctx, ws, []newRun{n}, n.Trace)
	if err != nil {
		return runRecord{}, false, err
	}
	if len(runs) == 1 {
		return runs[0], true, nil
	}
	// Its idempotency key was taken meanwhile.
	r, _, err := s.repeatOf(ctx, ws, n)
	return r, false, err
}

// repeatOf returns the run created before with n's idempotency key, if any: found when it
// was made by the same request, errConflict when by another.
func (s *store) repeatOf(ctx context.Context, ws string, n newRun) (r runRecord, found bool, err error) {
	if n.IdempotencyKey == "" {
		return r, false, nil
	}
	var first string
	var hash []byte
	err = s.db.QueryRowContext(ctx, `SELECT id, request_hash FROM runs
		WHERE workspace_id = $1 AND idempotency_key = $2`, ws, n.IdempotencyKey).Scan(&first, &hash)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return r, false, nil
	case err != nil:
		return r, false, err
	case string(hash) != string(n.RequestHash) && (n.EarlierHash == nil || string(hash) != string(n.EarlierHash)):
		return r, false, errConflict
	}
	r, err = s.getRun(ctx, ws, first)
	return r, err == nil, err
}

// timeArg is t as a timestamptz text argument, "" for the zero time.
func timeArg(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// unknownAgentError is a run request naming an agent its workspace does not have.
type unknownAgentError struct{ name string }

// keyBusyError is a create refused because a run's concurrency_key has a run that is not
// final, and its agent's on_key_conflict is reject.
type keyBusyError struct {
	where, agent, key, holder string
}

func (e keyBusyError) Error() string {
	return fmt.Sprintf("%sconcurrency_key %q of agent %q is busy: run %s holds it (on_key_conflict is reject)",
		e.where, e.key, e.agent, e.holder)
}

// keyLockSpace is the advisory lock space of the creates that decide on a key's runs
// (on_key_conflict reject or cancel_running); the second key is the hash of agent and key.
const keyLockSpace = 734630

// agentsNamed reads, by name, the agents the runs ns name in the workspace that where
// (a condition on $1, which is arg) selects, through query.
func agentsNamed(ctx context.Context, query func(context.Context, string, ...any) (*sql.Rows, error), where string,
	arg any, ns []newRun) (map[string]createAgentInfo, error) {
	names := make([]string, len(ns))
	for i, n := range ns {
		names[i] = n.Agent
	}
	rows, err := query(ctx, `SELECT name, id, on_key_conflict, rate_limit FROM agents WHERE `+where+` AND name = ANY ($2)`,
		arg, pq.StringArray(names))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	agents := map[string]createAgentInfo{}
	for rows.Next() {
		var name string
		var a createAgentInfo
		if err := rows.Scan(&name, &a.id, &a.conflict, &a.rateLimit); err != nil {
			return nil, err
		}
		agents[name] = a
	}
	return agents, rows.Err()
}

// createAgentInfo is what a create needs of an agent.
type createAgentInfo struct {
	id, conflict string
	rateLimit    sql.NullInt64
}

// createRuns inserts all the runs or none, in the trace tc. An unknown agent name is an
// unknownAgentError, a cost over its agent's rate limit a 422, a key busy under reject a
// keyBusyError. A run with a concurrency_key whose agent rejects or supersedes is decided
// under its key's lock, in one transaction: lock the keys, find their runs that are not
// final, insert, cancel the ones superseded ("superseded by run <id>": the newest run of
// the key wins, in the request too). With an idempotency key taken, nothing is inserted
// for that run (createRunApart).
func (s *store) createRuns(ctx context.Context, ws string, ns []newRun, tc traceContext) ([]runRecord, error) {
	agents, err := agentsNamed(ctx, s.db.QueryContext, `workspace_id = $1`, ws, ns)
	if err != nil {
		return nil, err
	}
	k := len(ns)
	runIDs, ids, inputs, maxes := make([]string, k), make([]string, k), make([]string, k), make([]int64, k)
	priorities, runAts, delays, timeouts := make([]int64, k), make([]string, k), make([]int64, k), make([]int64, k)
	keys, costs, idemKeys, hashes := make([]string, k), make([]int64, k), make([]string, k), make(pq.ByteaArray, k)
	decided := map[[2]string]int{} // agent id and key → the request's last run of it, under reject or cancel_running
	where := func(i int) string {
		if k == 1 {
			return ""
		}
		return fmt.Sprintf("runs[%d].", i)
	}
	for i, n := range ns {
		a, ok := agents[n.Agent]
		if !ok {
			return nil, unknownAgentError{n.Agent}
		}
		cost := max(n.Cost, 1)
		if a.rateLimit.Valid && int64(cost) > a.rateLimit.Int64 {
			return nil, invalid("%scost %d is over agent %q's rate_limit.limit (%d): it could never start",
				where(i), cost, n.Agent, a.rateLimit.Int64)
		}
		runIDs[i], ids[i], inputs[i], maxes[i] = newRunID(), a.id, string(n.Input), int64(n.MaxAttempts)
		priorities[i], runAts[i], delays[i], timeouts[i] = int64(n.Priority), timeArg(n.RunAt), n.DelayMS, int64(n.TimeoutMS)
		keys[i], costs[i], idemKeys[i], hashes[i] = n.Key, int64(cost), n.IdempotencyKey, n.RequestHash
		if n.Key != "" && a.conflict != keyQueue {
			ak := [2]string{a.id, n.Key}
			if first, ok := decided[ak]; ok && a.conflict == keyReject {
				return nil, keyBusyError{where(i), n.Agent, n.Key, fmt.Sprintf("%s (runs[%d] of this request)", runIDs[first], first)}
			}
			decided[ak] = i
		}
	}
	db := queryer{s: s}
	if len(decided) > 0 {
		if db.tx, err = s.db.BeginTx(ctx, nil); err != nil {
			return nil, err
		}
		defer db.tx.Rollback()
		holders, err := lockKeys(ctx, db.tx, decided)
		if err != nil {
			return nil, err
		}
		for ak, holder := range holders {
			if i := decided[ak]; agents[ns[i].Agent].conflict == keyReject {
				return nil, keyBusyError{where(i), ns[i].Agent, ak[1], holder}
			}
		}
	}
	// Only what the database makes is read back: decoding every column of the rows (and
	// joining agents for names the request gave) took a third of the server's CPU per batch.
	rows, err := db.query(ctx, `
		WITH ins AS (
			INSERT INTO runs (id, workspace_id, agent_id, input, max_attempts, priority, run_at, timeout_ms,
			                  trace_id, trace_flags, concurrency_key, cost, idempotency_key, request_hash)
			SELECT w.id, $1, w.agent_id, w.input, w.max_attempts, w.priority, agentapp_run_at(w.run_at, w.delay_ms),
			       NULLIF(w.timeout_ms, 0), $10, $11, NULLIF(w.key, ''), w.cost, NULLIF(w.idem, ''), NULLIF(w.hash, ''::bytea)
			FROM unnest($9::uuid[], $2::uuid[], $3::jsonb[], $4::int[], $5::smallint[], $6::text[], $7::bigint[], $8::int[],
			            $12::text[], $13::int[], $14::text[], $15::bytea[])
			     WITH ORDINALITY AS w(id, agent_id, input, max_attempts, priority, run_at, delay_ms, timeout_ms,
			                          key, cost, idem, hash, ord)
			ORDER BY w.ord
			ON CONFLICT (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
			RETURNING id, input, run_at, created_at, updated_at, seq
		)
		SELECT * FROM ins ORDER BY seq`,
		ws, pq.StringArray(ids), pq.StringArray(inputs), pq.Int64Array(maxes), pq.Int64Array(priorities),
		pq.StringArray(runAts), pq.Int64Array(delays), pq.Int64Array(timeouts), pq.StringArray(runIDs), tc.TraceID, tc.Flags,
		pq.StringArray(keys), pq.Int64Array(costs), pq.StringArray(idemKeys), hashes)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	// The rows were inserted in the request's order, so seq follows it: row i is ns[i].
	runs := make([]runRecord, 0, len(ns))
	for rows.Next() {
		var r runRecord
		if err := rows.Scan(&r.ID, &r.Input, &r.RunAt, &r.CreatedAt, &r.UpdatedAt, &r.seq); err != nil {
			return nil, err
		}
		if i := len(runs); i >= len(ns) || r.ID != runIDs[i] {
			return nil, fmt.Errorf("batch insert: row %d is run %s, out of the request's order", i, r.ID)
		}
		n := ns[len(runs)]
		r.WorkspaceID, r.Agent, r.Status, r.Errors, r.Step = ws, n.Agent, statusQueued, json.RawMessage("[]"), 1
		r.MaxAttempts, r.Priority, r.TraceID, r.Cost = n.MaxAttempts, n.Priority, tc.TraceID, max(n.Cost, 1)
		if n.TimeoutMS != 0 {
			ms := n.TimeoutMS
			r.TimeoutMS = &ms
		}
		if n.Key != "" {
			key := n.Key
			r.ConcurrencyKey = &key
		}
		r.RunAt, r.CreatedAt, r.UpdatedAt = r.RunAt.UTC(), r.CreatedAt.UTC(), r.UpdatedAt.UTC()
		runs = append(runs, r)
	}
	if err := rows.Err(); err != nil || db.tx == nil || len(runs) < len(ns) {
		return runs, err
	}
	rows.Close()
	// The newest run of each key superseding its earlier ones wins.
	var winAgents, winKeys, winners []string
	for ak, i := range decided {
		if agents[ns[i].Agent].conflict == keyCancelRunning {
			winAgents, winKeys, winners = append(winAgents, ak[0]), append(winKeys, ak[1]), append(winners, runIDs[i])
		}
	}
	if err := supersede(ctx, db.tx, winAgents, winKeys, winners); err != nil {
		return nil, err
	}
	return runs, db.tx.Commit()
}

// lockKeys takes the locks of the keys (agent id and key; keyLockSpace), in one order, so
// that two transactions with the same keys do not deadlock, and returns each key's first
// run in line that is queued, waiting or running: the run that holds it.
func lockKeys(ctx context.Context, tx *sql.Tx, keys map[[2]string]int) (map[[2]string]string, error) {
	var lockAgents, lockKeys []string
	for ak := range keys {
		lockAgents, lockKeys = append(lockAgents, ak[0]), append(lockKeys, ak[1])
	}
	rows, err := tx.QueryContext(ctx, `
		WITH locks AS MATERIALIZED (
			SELECT pg_advisory_xact_lock($1, hashtext(k.agent_id::text || '/' || k.key))
			FROM unnest($2::uuid[], $3::text[]) AS k (agent_id, key) ORDER BY k.agent_id, k.key)
		SELECT DISTINCT ON (r.agent_id, r.concurrency_key) r.agent_id, r.concurrency_key, r.id
		FROM (SELECT count(*) FROM locks) l, unnest($2::uuid[], $3::text[]) AS k (agent_id, key)
		JOIN runs r ON r.agent_id = k.agent_id AND r.concurrency_key = k.key
		WHERE r.concurrency_key IS NOT NULL AND r.status IN ('queued', 'running', 'waiting')
		ORDER BY r.agent_id, r.concurrency_key, r.priority, r.run_at, r.seq`,
		keyLockSpace, pq.StringArray(lockAgents), pq.StringArray(lockKeys))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	holders := map[[2]string]string{}
	for rows.Next() {
		var ak [2]string
		var holder string
		if err := rows.Scan(&ak[0], &ak[1], &holder); err != nil {
			return nil, err
		}
		holders[ak] = holder
	}
	return holders, rows.Err()
}

// supersede cancels, in tx, every run of each agent and key (agents[i], keys[i]) that is
// queued, waiting or running, but the winner (winners[i]), as its own cancel would, with
// the error "superseded by run <winner>": a queued or waiting one at once, a running one
// where it executes, and their trees.
func supersede(ctx context.Context, tx *sql.Tx, agents, keys, winners []string) error {
	if len(winners) == 0 {
		return nil
	}
	var superseded pq.StringArray
	if err := tx.QueryRowContext(ctx, `
		WITH sup AS (
		UPDATE runs r SET
			cancel_requested = true,
			cancel_error = 'superseded by run ' || k.winner,
			status = CASE WHEN r.status = 'running' THEN r.status ELSE 'canceled' END,
			error = CASE WHEN r.status = 'running' THEN r.error ELSE 'superseded by run ' || k.winner END,
			finished_at = CASE WHEN r.status = 'running' THEN r.finished_at ELSE now() END,
			waiting_for = NULL, wake_at = NULL, updated_at = now()
		FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS k (agent_id, key, winner)
		WHERE r.agent_id = k.agent_id AND r.concurrency_key = k.key AND r.id <> k.winner
		  AND r.concurrency_key IS NOT NULL AND r.status IN ('queued', 'running', 'waiting')
		RETURNING r.id)
		SELECT coalesce(array_agg(id), '{}') FROM sup`,
		pq.StringArray(agents), pq.StringArray(keys), pq.StringArray(winners)).Scan(&superseded); err != nil {
		return err
	}
	if len(superseded) == 0 {
		return nil
	}
	_, err := tx.ExecContext(ctx, cancelDescendantsSQL, superseded)
	return err
}

// cancelTreeSQL cancels the runs of tree (a CTE: the ids of the runs asked for, CTE asked,
// and of their descendants, found through runs_parent_idx) that are not final: queued and
// waiting ones at once, running ones by asking where they execute (the trigger notifies
// every process). The runs asked for are "canceled by request", their descendants with
// their parent.
const cancelTreeSQL = `
		UPDATE runs r SET
			cancel_requested = true,
			status = CASE WHEN r.status IN ('queued', 'waiting') THEN 'canceled' ELSE r.status END,
			error = CASE WHEN r.status NOT IN ('queued', 'waiting') THEN r.error
			             WHEN r.id IN (SELECT id FROM asked) THEN 'canceled by request'
			             ELSE 'canceled with its parent run ' || r.parent_id END,
			finished_at = CASE WHEN r.status IN ('queued', 'waiting') THEN now() ELSE r.finished_at END,
			cancel_error = CASE WHEN r.status = 'running' AND r.id NOT IN (SELECT id FROM asked)
			                    THEN 'canceled with its parent run ' || r.parent_id ELSE r.cancel_error END,
			waiting_for = NULL, wake_at = NULL, updated_at = now()
		WHERE r.id IN (SELECT id FROM tree) AND r.status IN ('queued', 'running', 'waiting')
		RETURNING r.id, r.status`

// cancelDescendantsSQL cancels, as cancelTreeSQL does, the descendants of the runs $1.
const cancelDescendantsSQL = `
		WITH RECURSIVE asked AS (SELECT NULL::uuid AS id WHERE false),
		tree AS (
			SELECT id FROM runs WHERE parent_id = ANY ($1::uuid[])
			UNION ALL
			SELECT c.id FROM runs c JOIN tree t ON c.parent_id = t.id),
		upd AS (` + cancelTreeSQL + `)
		SELECT count(*) FROM upd`

// cancelRun cancels a queued or waiting run at once, or asks for a running run to be
// canceled where it executes, and with it every run of its tree that is not final (SPEC:
// the cancel cascades down to the children's children). A final run is errConflict.
func (s *store) cancelRun(ctx context.Context, ws, id string) (runRecord, error) {
	var found bool
	err := onDeadlockAgain(func() error {
		return s.db.QueryRowContext(ctx, `
		WITH RECURSIVE asked AS (
			SELECT id FROM runs WHERE id = $1 AND workspace_id = $2 AND status IN ('queued', 'running', 'waiting')),
		tree AS (
			SELECT id FROM asked
			UNION ALL
			SELECT c.id FROM runs c JOIN tree t ON c.parent_id = t.id),
		upd AS (`+cancelTreeSQL+`)
		SELECT EXISTS (SELECT 1 FROM upd WHERE id = $1)`, id, ws).Scan(&found)
	})
	if err != nil {
		return runRecord{}, err
	}
	if found {
		// Its descendants again, in a statement that sees what committed meanwhile: a
		// running run whose wait for child runs committed while the statement above waited
		// for its row made children that statement's snapshot could not see.
		err := onDeadlockAgain(func() error {
			_, err := s.db.ExecContext(ctx, cancelDescendantsSQL, pq.StringArray{id})
			return err
		})
		if err != nil {
			return runRecord{}, err
		}
	}
	r, err := s.getRun(ctx, ws, id)
	if err == nil && !found {
		err = errConflict
	}
	return r, err
}

// onDeadlockAgain runs a statement of its own (f) again when PostgreSQL chose it as the
// victim of a deadlock, at most three times: a cancel locks a run and its tree's rows
// while the outcome write of a child locks the child, then its parent (the fan-in
// trigger), and the two can wait for each other. The victim's statement was rolled back
// whole, so it is sent again as it was.
func onDeadlockAgain(f func() error) error {
	for try := 1; ; try++ {
		err := f()
		var pqErr *pq.Error
		if try == 3 || !errors.As(err, &pqErr) || pqErr.Code != "40P01" {
			return err
		}
	}
}

// retryRun puts a failed or canceled run back to queued, due now, with attempts more
// attempts; its errors are kept. One statement, so of two concurrent retries one wins. A
// run in another status is errConflict, answered with the run as it stands.
func (s *store) retryRun(ctx context.Context, ws, id string, attempts int) (runRecord, error) {
	r, err := scanRun(s.db.QueryRowContext(ctx, `
		WITH upd AS (
			UPDATE runs SET status = 'queued', max_attempts = attempt + $3, error = NULL, output = NULL,
				started_at = NULL, finished_at = NULL, cancel_requested = false, cancel_error = NULL, worker_id = NULL,
				lease_expires_at = NULL, run_at = now(), updated_at = now()
			WHERE id = $1 AND workspace_id = $2 AND status IN ('failed', 'canceled')
			RETURNING *
		)
		SELECT `+runColumns+` FROM upd r JOIN agents a ON a.id = r.agent_id`, id, ws, attempts))
	if !errors.Is(err, sql.ErrNoRows) {
		return r, err
	}
	r, err = s.getRun(ctx, ws, id)
	if err == nil {
		err = fmt.Errorf("%w: run is %s: only failed or canceled runs can be retried", errConflict, r.Status)
	}
	return r, err
}

// cancelRuns cancels, in one statement, the runs of ws in the given statuses (queued,
// running), only those of the named agent unless agentName is nil: queued ones at once,
// running ones by asking where they execute (the trigger notifies every process). It
// returns how many it canceled and the ids of the running ones. An unknown agent is an
// unknownAgentError.
func (s *store) cancelRuns(ctx context.Context, ws string, agentName *string, statuses []runStatus) (n int64, running []string, err error) {
	var name any
	if agentName != nil {
		name = *agentName
	}
	list := make(pq.StringArray, len(statuses))
	for i, st := range statuses {
		list[i] = string(st)
	}
	var known bool
	var ids pq.StringArray
	// The matching runs, and their trees (a run's cancel cascades to its children).
	err = onDeadlockAgain(func() error {
		return s.db.QueryRowContext(ctx, `
		WITH RECURSIVE ag AS (SELECT id FROM agents WHERE workspace_id = $1 AND name = $2::text),
		asked AS (
			SELECT r.id FROM runs r WHERE r.workspace_id = $1 AND r.status = ANY ($3::text[])
			  AND ($2::text IS NULL OR r.agent_id IN (SELECT id FROM ag))),
		tree AS (
			SELECT id FROM asked
			UNION
			SELECT c.id FROM runs c JOIN tree t ON c.parent_id = t.id),
		upd AS (`+cancelTreeSQL+`)
		SELECT $2::text IS NULL OR EXISTS (SELECT 1 FROM ag), count(*),
		       coalesce(array_agg(upd.id) FILTER (WHERE upd.status = 'running'), '{}')
		FROM upd`, ws, name, list).Scan(&known, &n, &ids)
	})
	if err == nil && !known {
		err = unknownAgentError{*agentName}
	}
	if err == nil && len(ids) > 0 {
		// The running ones' descendants again, as cancelRun does: a wait for child runs
		// that committed while the statement above waited for a row made children its
		// snapshot could not see.
		err = onDeadlockAgain(func() error {
			_, err := s.db.ExecContext(ctx, cancelDescendantsSQL, ids)
			return err
		})
	}
	return n, ids, err
}

// claimedRun is a run a worker claimed, with what it needs to execute it.
type claimedRun struct {
	ID          string
	WorkspaceID string
	Attempt     int
	Input       json.RawMessage
	AgentName   string
	AgentKind   string
	AgentConfig json.RawMessage
	Timeout     time.Duration // 0: none
	EventsURL   string        // where the agent posts progress events, with EventsToken
	EventsToken string
	Secrets     []string        // a webhook agent's signing secrets, newest first
	Retry       retryPolicy     // the agent's backoff after a failed attempt
	Pushbacks   int             // times the run was pushed back before this attempt
	Step        int             // the step this attempt executes (1, 2, …)
	State       json.RawMessage // what the previous step returned; nil at step 1
	Resume      json.RawMessage // what met the previous step's wait; nil at step 1
	traceContext
}

// claimResult is what one claim did.
type claimResult struct {
	claimed  []claimedRun
	requeued int       // expired leases put back to queued
	woken    int       // waiting runs whose timer fell due, queued again
	failed   int       // expired leases that ended the run (no attempt left, or canceled)
	capped   bool      // locked agents had due runs: a freed slot may make one claimable
	readAt   time.Time // the database's time of the last pick; zero: none
	rateFree time.Time // the earliest time a rate-limited agent's window frees units; zero: none held
	more     bool      // fewer than the limit were claimed, yet more may be claimable
	nextDue  time.Time // when the next scheduled run falls due; zero: none, or not asked
}

// attemptRef names one attempt of a run: the fence of every write that renews or ends it.
type attemptRef struct {
	ID      string
	Attempt int
	Step    int // attempts count per step: the fence is (run, step, attempt)
}

// isRunning is the renew and finish statements' test of a run's status: written so that no
// index can answer it, and the planner finds the runs by id (runs_pkey). As a plain
// equality, the generic plan read the running range of runs_list_idx, which holds an entry
// for every run that ran since the last vacuum (an outcome write took 30-66 ms 130 s into
// a pinned horizon at 200 runs/s).
const isRunning = `(r.status = 'running') IS TRUE`

// renew extends the leases of the given attempts held by workerID. It returns the ones
// still held, and for each whether a cancel was requested; an attempt missing from the
// answer was lost (recovered by another worker, or final).
func (s *store) renew(ctx context.Context, workerID string, refs []attemptRef, lease time.Duration) (map[attemptRef]bool, error) {
	ids, attempts, steps := make([]string, len(refs)), make([]int64, len(refs)), make([]int64, len(refs))
	for i, r := range refs {
		ids[i], attempts[i], steps[i] = r.ID, int64(r.Attempt), int64(r.Step)
	}
	rows, err := s.queryPrepared(ctx, `
		UPDATE runs r SET lease_expires_at = now() + $2 * interval '1 millisecond'
		FROM unnest($3::uuid[], $4::int[], $5::int[]) AS o(id, attempt, step)
		WHERE r.id = o.id AND r.attempt = o.attempt AND r.step = o.step AND r.worker_id = $1 AND `+isRunning+`
		RETURNING r.id, r.attempt, r.step, r.cancel_requested`,
		workerID, lease.Milliseconds(), pq.StringArray(ids), pq.Int64Array(attempts), pq.Int64Array(steps))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	held := make(map[attemptRef]bool, len(refs))
	for rows.Next() {
		var ref attemptRef
		var cancel bool
		if err := rows.Scan(&ref.ID, &ref.Attempt, &ref.Step, &cancel); err != nil {
			return nil, err
		}
		held[ref] = cancel
	}
	return held, rows.Err()
}

// outcome is how one attempt ended, as its execution proposes it.
type outcome struct {
	attemptRef
	End     attemptEnd      // endSucceeded, endFailed, endCanceled, endRequeued or endPushedBack
	Output  json.RawMessage // for endSucceeded
	Message string          // for endFailed
	// Delay is how long after the write the run is due again: for endFailed its backoff, if
	// attempts remain; for endPushedBack the webhook's Retry-After.
	Delay time.Duration
	// Throttle, when Throttled, is the webhook's Retry-After: its agent starts no attempt
	// before the write's time plus Throttle (a pushback past the limit fails the attempt and
	// still throttles: the provider's limit holds all the same).
	Throttled bool
	Throttle  time.Duration
	// Final, for endFailed, fails the run whatever attempts remain (the step limit: another
	// attempt would ask for the same step again).
	Final bool
	Wait  *waitRequest // for endWaiting: the state and what the run waits for
}

// finish records outcomes in one statement, each fenced on its attempt and worker, and
// returns how each attempt ended. A keyed run that stops running frees its key: the key's
// next queued run, which the claims passed over while the key was at its limit, is
// announced at its place (store.announce), after the commit and coalesced with other
// announcements rather than notified from the outcome's transaction, whose commit a
// NOTIFY would serialise with every other notifying one. A run missing from the answer was no longer this worker's
// attempt, and nothing was written for it. A failed attempt goes back to queued after its
// backoff while attempts remain (retried); a cancel requested meanwhile wins over the
// outcome; a requeued attempt is refunded, and so is a pushed-back one, due again after
// its delay. A throttle is written to the agent in the same statement, keeping the later
// time; the agents are locked after the runs, in id order (a locking clause applies after
// the sort), so that two writers that throttle the same agents do not deadlock.
func (s *store) finish(ctx context.Context, workerID string, outs []outcome) (map[string]attemptEnd, error) {
	ends, freed, err := s.finishWith(ctx, s.queryPrepared, workerID, outs)
	if s.announce != nil {
		for ws, at := range freed {
			s.announce(ws, at)
		}
	}
	return ends, err
}

// finishWith is finish, its statement sent by query (a transaction's: waitForRuns). An
// outcome that waits (endWaiting) ends the step: the run waits with the step's state, at
// the next step's attempt 0, unless a cancel was requested meanwhile; so does a run handed
// back at shutdown (endRequeued): a cancel requested meanwhile ends it canceled, not queued. freed is, for the
// keyed runs that stopped running, their keys' next runs' workspaces and earliest places,
// for the caller to announce once committed.
func (s *store) finishWith(ctx context.Context, query func(context.Context, string, ...any) (*sql.Rows, error),
	workerID string, outs []outcome) (map[string]attemptEnd, map[string]linePos, error) {
	ids, attempts, ends := make([]string, len(outs)), make([]int64, len(outs)), make([]string, len(outs))
	outputs, messages := make([]string, len(outs)), make([]string, len(outs))
	delays, throttles := make(pq.Float64Array, len(outs)), make(pq.Float64Array, len(outs))
	steps, states, waits, wakes := make([]int64, len(outs)), make([]string, len(outs)), make([]string, len(outs)), make(pq.Float64Array, len(outs))
	finals := make(pq.BoolArray, len(outs))
	for i, o := range outs {
		ids[i], attempts[i], ends[i], messages[i] = o.ID, int64(o.Attempt), string(o.End), o.Message
		outputs[i] = "null"
		if o.Output != nil {
			outputs[i] = string(o.Output)
		}
		delays[i], throttles[i] = ms(o.Delay), -1
		if o.Throttled {
			throttles[i] = ms(o.Throttle)
		}
		steps[i], states[i], waits[i], wakes[i], finals[i] = int64(o.Step), "null", "null", -1, o.Final
		if w := o.Wait; w != nil {
			states[i], waits[i] = string(w.State), string(w.Wait)
			if w.After > 0 {
				wakes[i] = ms(w.After)
			}
		}
	}
	rows, err := query(ctx, `
		WITH fin AS (
		UPDATE runs r SET
			status = CASE WHEN o.proposed = 'requeued' AND NOT r.cancel_requested THEN 'queued'
			              WHEN o.proposed = 'canceled' OR r.cancel_requested THEN 'canceled'
			              WHEN o.proposed = 'waiting' THEN 'waiting'
			              WHEN o.proposed = 'succeeded' THEN 'succeeded'
			              WHEN o.proposed = 'pushed_back' OR r.attempt < r.max_attempts AND NOT o.final THEN 'queued' ELSE 'failed' END,
			output = CASE WHEN o.proposed = 'succeeded' AND NOT r.cancel_requested THEN o.output END,
			error = CASE WHEN o.proposed = 'requeued' AND NOT r.cancel_requested THEN r.error
			             WHEN o.proposed = 'canceled' OR r.cancel_requested THEN coalesce(r.cancel_error, 'canceled by request')
			             WHEN o.proposed = 'pushed_back' THEN r.error
			             WHEN o.proposed = 'failed' THEN o.message END,
			errors = CASE WHEN o.proposed = 'failed' THEN r.errors || jsonb_build_array(jsonb_build_object(
			                  'attempt', r.attempt, 'at', `+nowZ+`, 'message', o.message))
			              ELSE r.errors END,
			attempt = CASE WHEN o.proposed = 'requeued' AND NOT r.cancel_requested OR (o.proposed = 'pushed_back' AND NOT r.cancel_requested)
			               THEN r.attempt - 1
			               WHEN o.proposed = 'waiting' AND NOT r.cancel_requested THEN 0 ELSE r.attempt END,
			step = CASE WHEN o.proposed = 'waiting' AND NOT r.cancel_requested THEN r.step + 1 ELSE r.step END,
			state = CASE WHEN o.proposed = 'waiting' AND NOT r.cancel_requested THEN o.state ELSE r.state END,
			waiting_for = CASE WHEN o.proposed = 'waiting' AND NOT r.cancel_requested THEN o.wait END,
			wake_at = CASE WHEN o.proposed = 'waiting' AND NOT r.cancel_requested AND o.wake_ms >= 0
			               THEN now() + o.wake_ms * interval '1 millisecond' END,
			resume = CASE WHEN o.proposed = 'waiting' AND NOT r.cancel_requested THEN NULL ELSE r.resume END,
			pushbacks = CASE WHEN o.proposed = 'pushed_back' AND NOT r.cancel_requested THEN r.pushbacks + 1
			                 ELSE r.pushbacks END,
			run_at = CASE WHEN (o.proposed = 'pushed_back' OR o.proposed = 'failed' AND r.attempt < r.max_attempts AND NOT o.final)
			                   AND NOT r.cancel_requested
			                 THEN now() + o.delay_ms * interval '1 millisecond'
			                 ELSE r.run_at END, -- a requeued run keeps its place; a final one shows when it was due
			started_at = CASE WHEN o.proposed = 'requeued' AND NOT r.cancel_requested OR (o.proposed = 'pushed_back' OR o.proposed = 'failed'
			                      AND r.attempt < r.max_attempts AND NOT o.final) AND NOT r.cancel_requested
			                 THEN NULL ELSE r.started_at END,
			finished_at = CASE WHEN o.proposed = 'requeued' AND NOT r.cancel_requested THEN NULL
			                   WHEN o.proposed = 'waiting' AND NOT r.cancel_requested THEN NULL
			                   WHEN (o.proposed = 'pushed_back' OR o.proposed = 'failed' AND r.attempt < r.max_attempts AND NOT o.final)
			                        AND NOT r.cancel_requested THEN NULL
			                   ELSE now() END,
			worker_id = NULL, lease_expires_at = NULL, updated_at = now()
		FROM unnest($2::uuid[], $3::int[], $4::text[], $5::jsonb[], $6::text[], $7::float8[], $8::float8[],
		            $9::int[], $10::jsonb[], $11::jsonb[], $12::float8[], $13::bool[])
		     AS o(id, attempt, proposed, output, message, delay_ms, throttle_ms, step, state, wait, wake_ms, final)
		WHERE r.id = o.id AND r.attempt = o.attempt AND r.step = o.step AND r.worker_id = $1 AND `+isRunning+`
		RETURNING r.id, r.agent_id, r.workspace_id, r.concurrency_key, o.throttle_ms,
		          CASE WHEN o.proposed IN ('requeued', 'pushed_back') AND r.status = 'queued' THEN o.proposed
		               WHEN r.status = 'queued' THEN 'retried' ELSE r.status END AS ended),
		throttle AS MATERIALIZED (
		SELECT x.id, t.ms FROM agents x
		JOIN (SELECT agent_id, max(throttle_ms) AS ms FROM fin WHERE throttle_ms >= 0 GROUP BY agent_id) t
		  ON t.agent_id = x.id
		ORDER BY x.id FOR NO KEY UPDATE OF x),
		throttled AS (
		UPDATE agents a SET throttled_until = greatest(a.throttled_until, now() + t.ms * interval '1 millisecond')
		FROM throttle t WHERE a.id = t.id)
		SELECT f.id, f.ended, f.workspace_id, k.priority, k.run_at FROM fin f
		LEFT JOIN LATERAL (SELECT k.priority, k.run_at FROM runs k
			WHERE k.agent_id = f.agent_id AND k.concurrency_key = f.concurrency_key
			  AND k.concurrency_key IS NOT NULL AND k.status IN ('queued', 'running', 'waiting') AND k.status = 'queued'
			ORDER BY k.priority, k.run_at, k.seq LIMIT 1) k ON f.concurrency_key IS NOT NULL`,
		workerID, pq.StringArray(ids), pq.Int64Array(attempts), pq.StringArray(ends),
		pq.StringArray(outputs), pq.StringArray(messages), delays, throttles,
		pq.Int64Array(steps), pq.StringArray(states), pq.StringArray(waits), wakes, finals)
	if err != nil {
		return nil, nil, err
	}
	defer rows.Close()
	recorded := make(map[string]attemptEnd, len(outs))
	freed := map[string]linePos{} // workspace → the earliest next run of a key freed there
	for rows.Next() {
		var id, ws string
		var end attemptEnd
		var priority sql.NullInt64
		var runAt sql.NullTime
		if err := rows.Scan(&id, &end, &ws, &priority, &runAt); err != nil {
			return nil, nil, err
		}
		recorded[id] = end
		if at := (linePos{priority: int(priority.Int64), runAt: runAt.Time}); priority.Valid {
			if old, ok := freed[ws]; !ok || at.before(old) {
				freed[ws] = at
			}
		}
	}
	return recorded, freed, rows.Err()
}

// backoff draws the delay before a failed attempt's retry: uniformly from 0 to
// min(MaxMS, BaseMS × 2^(attempt−1)) ms ("full jitter", so that runs failed together
// spread out). It is drawn in Go, not in the outcome write, because the claim has read the
// agent's policy already: the write then needs no join to agents for every outcome.
func (p retryPolicy) backoff(attempt int) time.Duration {
	bound := min(float64(p.MaxMS), float64(p.BaseMS)*math.Exp2(float64(attempt-1)))
	return time.Duration(rand.Float64() * bound * float64(time.Millisecond))
}

// ms is d in milliseconds, with its fraction.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// nowZ is now() as RFC 3339 in UTC ending in Z, the form every time in the API takes, for
// times written into JSON (errors[].at).
const nowZ = `to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')`

// pruneLock is the advisory lock that lets one process prune at a time.
const pruneLock = 7346298106

// prune deletes up to limit final runs (with their events, by cascade) finished longer ago
// than retention, each with its whole tree of child runs, and returns how many (the
// children deleted with them not counted). While another process holds the prune lock it
// deletes nothing and returns 0.
func (s *store) prune(ctx context.Context, retention time.Duration, limit int) (int, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	var mine bool
	if err := tx.QueryRowContext(ctx, `SELECT pg_try_advisory_xact_lock($1)`, pruneLock).Scan(&mine); err != nil || !mine {
		return 0, err
	}
	// A tree goes whole (SPEC): a root whose every descendant is final and old too, its
	// children by the parent key's cascade. A child is never deleted alone, so a parent's
	// resume always finds its children.
	res, err := tx.ExecContext(ctx, `
		DELETE FROM runs WHERE id IN (
			SELECT r.id FROM runs r WHERE r.status IN ('succeeded', 'failed', 'canceled')
			  AND r.finished_at < now() - $1 * interval '1 millisecond' AND r.parent_id IS NULL
			  AND NOT EXISTS (
				WITH RECURSIVE tree AS (
					SELECT c.id, c.status, c.finished_at FROM runs c WHERE c.parent_id = r.id
					UNION ALL
					SELECT c.id, c.status, c.finished_at FROM runs c JOIN tree t ON c.parent_id = t.id)
				SELECT 1 FROM tree WHERE tree.status NOT IN ('succeeded', 'failed', 'canceled')
				  OR tree.finished_at >= now() - $1 * interval '1 millisecond')
			ORDER BY r.finished_at LIMIT $2)`, retention.Milliseconds(), limit)
	if err != nil {
		return 0, err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, err
	}
	return int(n), tx.Commit()
}

// waitForRuns writes an outcome that waits for child runs (endWaiting with a runs wait):
// the wait, fenced as finish's, and the children, in one transaction, so that a parent
// never waits without its children nor children exist for a wait that was not written. A
// child names an agent of the parent's workspace; one that does not is an
// unknownAgentError and nothing is written. The children carry the parent's trace and the
// parent's new step (parent_step): the fan-in trigger (schema.sql) waits for those only.
// made is the children's workspace and earliest place in line, for the caller to announce
// once committed (nil when none were made).
func (s *store) waitForRuns(ctx context.Context, workerID string, o outcome) (ends map[string]attemptEnd, made map[string]linePos, err error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, nil, err
	}
	defer tx.Rollback()
	ends, freed, err := s.finishWith(ctx, tx.QueryContext, workerID, []outcome{o})
	if err != nil {
		return nil, nil, err
	}
	if ends[o.ID] != endWaiting { // lost, or canceled meanwhile: no children
		return ends, freed, tx.Commit()
	}
	ns := o.Wait.Children
	runIDs, names, inputs := make([]string, len(ns)), make([]string, len(ns)), make([]string, len(ns))
	maxes, priorities, timeouts := make([]int64, len(ns)), make([]int64, len(ns)), make([]int64, len(ns))
	keys, costs := make([]string, len(ns)), make([]int64, len(ns))
	for i, n := range ns {
		runIDs[i], names[i], inputs[i] = newRunID(), n.Agent, string(n.Input)
		maxes[i], priorities[i], timeouts[i] = int64(n.MaxAttempts), int64(n.Priority), int64(n.TimeoutMS)
		keys[i], costs[i] = n.Key, int64(max(n.Cost, 1))
	}
	winAgents, winKeys, winners, err := s.decideChildren(ctx, tx, o.ID, ns, runIDs)
	if err != nil {
		return nil, nil, err
	}
	var inserted int
	var missing, ws sql.NullString
	var at linePos
	err = tx.QueryRowContext(ctx, `
		WITH w AS (
			SELECT c.*, (SELECT a.id FROM agents a WHERE a.workspace_id = p.workspace_id AND a.name = c.agent) AS agent_id,
			       p.workspace_id, p.trace_id, p.trace_flags, p.step
			FROM runs p, unnest($2::uuid[], $3::text[], $4::jsonb[], $5::int[], $6::smallint[], $7::int[], $8::text[], $9::int[])
			     WITH ORDINALITY AS c(id, agent, input, max_attempts, priority, timeout_ms, key, cost, ord)
			WHERE p.id = $1),
		ins AS (
			INSERT INTO runs (id, workspace_id, agent_id, input, max_attempts, priority, timeout_ms, trace_id, trace_flags,
			                  parent_id, parent_step, concurrency_key, cost)
			SELECT w.id, w.workspace_id, w.agent_id, w.input, w.max_attempts, w.priority, NULLIF(w.timeout_ms, 0),
			       w.trace_id, w.trace_flags, $1, w.step, NULLIF(w.key, ''), w.cost
			FROM w WHERE w.agent_id IS NOT NULL ORDER BY w.ord
			RETURNING workspace_id, priority, run_at),
		first AS (SELECT workspace_id, priority, run_at FROM ins ORDER BY priority, run_at LIMIT 1)
		SELECT (SELECT count(*) FROM ins), (SELECT w.agent FROM w WHERE w.agent_id IS NULL ORDER BY w.ord LIMIT 1),
		       (SELECT workspace_id FROM first), coalesce((SELECT priority FROM first), 0),
		       coalesce((SELECT run_at FROM first), now())`,
		o.ID, pq.StringArray(runIDs), pq.StringArray(names), pq.StringArray(inputs), pq.Int64Array(maxes),
		pq.Int64Array(priorities), pq.Int64Array(timeouts), pq.StringArray(keys), pq.Int64Array(costs)).
		Scan(&inserted, &missing, &ws, &at.priority, &at.runAt)
	if err != nil {
		return nil, nil, err
	}
	if missing.Valid {
		return nil, nil, unknownAgentError{missing.String}
	}
	if inserted != len(ns) {
		return nil, nil, fmt.Errorf("child runs: inserted %d of %d", inserted, len(ns))
	}
	if err := supersede(ctx, tx, winAgents, winKeys, winners); err != nil {
		return nil, nil, err
	}
	if old, ok := freed[ws.String]; !ok || at.before(old) {
		freed[ws.String] = at
	}
	return ends, freed, tx.Commit()
}

// childRefusedError is a wait whose child runs their agents refuse, as they would refuse a
// create of the same runs: a cost over the agent's rate limit, a key busy under reject.
type childRefusedError struct{ msg string }

func (e childRefusedError) Error() string { return e.msg }

// decideChildren holds the children of parent's wait (whose ids are runIDs) to their
// agents' limits as a create does, in tx: a cost over the rate limit or a key busy under
// reject is a childRefusedError; under cancel_running it returns, for each key, the
// child that wins it (the last of the key), for supersede once they are inserted. A
// child naming an unknown agent is left to the insert, which says so.
func (s *store) decideChildren(ctx context.Context, tx *sql.Tx, parent string, ns []newRun, runIDs []string) (winAgents, winKeys, winners []string, err error) {
	agents, err := agentsNamed(ctx, tx.QueryContext, `workspace_id = (SELECT workspace_id FROM runs WHERE id = $1)`, parent, ns)
	if err != nil {
		return nil, nil, nil, err
	}
	decided := map[[2]string]int{}
	for i, n := range ns {
		a, ok := agents[n.Agent]
		if !ok {
			continue
		}
		if cost := int64(max(n.Cost, 1)); a.rateLimit.Valid && cost > a.rateLimit.Int64 {
			return nil, nil, nil, childRefusedError{fmt.Sprintf("wait.runs[%d].cost %d is over agent %q's rate_limit.limit (%d): it could never start",
				i, cost, n.Agent, a.rateLimit.Int64)}
		}
		if n.Key == "" || a.conflict == keyQueue {
			continue
		}
		ak := [2]string{a.id, n.Key}
		if first, ok := decided[ak]; ok && a.conflict == keyReject {
			return nil, nil, nil, childRefusedError{keyBusyError{fmt.Sprintf("wait.runs[%d].", i), n.Agent, n.Key,
				fmt.Sprintf("wait.runs[%d]", first)}.Error()}
		}
		decided[ak] = i
	}
	if len(decided) == 0 {
		return nil, nil, nil, nil
	}
	holders, err := lockKeys(ctx, tx, decided)
	if err != nil {
		return nil, nil, nil, err
	}
	for ak, i := range decided {
		switch holder, busy := holders[ak]; {
		case agents[ns[i].Agent].conflict == keyCancelRunning:
			winAgents, winKeys, winners = append(winAgents, ak[0]), append(winKeys, ak[1]), append(winners, runIDs[i])
		case busy:
			return nil, nil, nil, childRefusedError{keyBusyError{fmt.Sprintf("wait.runs[%d].", i), ns[i].Agent, ak[1], holder}.Error()}
		}
	}
	return winAgents, winKeys, winners, nil
}

// signalRun meets the wait of a run waiting for the signal name: queued again, due now,
// resumed with the signal and its data. A run not waiting for that name is errConflict,
// answered with the run as it stands (a signal sent before the run waits is not kept).
func (s *store) signalRun(ctx context.Context, ws, id, name string, data json.RawMessage) (runRecord, error) {
	r, err := scanRun(s.db.QueryRowContext(ctx, `
		WITH upd AS (
			UPDATE runs SET status = 'queued', run_at = now(), updated_at = now(), wake_at = NULL, waiting_for = NULL,
				resume = jsonb_build_object('signal', jsonb_build_object('name', $3::text, 'data', $4::jsonb))
			WHERE id = $1 AND workspace_id = $2 AND status = 'waiting' AND waiting_for ->> 'signal' = $3
			RETURNING *
		)
		SELECT `+runColumns+` FROM upd r JOIN agents a ON a.id = r.agent_id`, id, ws, name, string(data)))
	if !errors.Is(err, sql.ErrNoRows) {
		return r, err
	}
	r, err = s.getRun(ctx, ws, id)
	if err == nil {
		err = fmt.Errorf("%w: run is %s, not waiting for signal %q", errConflict, r.Status, name)
	}
	return r, err
}
