package main

import (
	"cmp"
	"context"
	"database/sql"
	"slices"
	"sync"
	"time"

	"github.com/lib/pq"
)

// The queue: how a run is picked. A claim is a short sequence of plain statements, with
// the fair turns and each agent's place in line kept in the claiming process's memory, so
// that nothing but the claimed runs' own rows is written: a row rewritten at every claim
// (a turn, a mark, a counter) grows a chain of versions that nobody can vacuum while any
// session holds a transaction open, and every later claim reads through it.
//
// A claim (store.claim):
//  1. recovers expired leases (every half poll interval);
//  2. finds the agents with queued runs (lineup.find): at most every rescanEvery, when runs
//     were announced or requeued, or when a scheduled run fell due;
//  3. takes rounds (claimRound) until it has its limit or nothing more is claimable:
//     the workspaces in turn, least recently served by this process first, each getting an
//     equal share; within a workspace lower priority first, then the earliest due, merged
//     over its agents. Paused agents are left out; a capped agent is read only under its
//     advisory lock, up to its room (max_concurrency less its running runs, counted by a
//     statement that starts after the lock was taken). A new limit is a filter here.
//  4. reads each agent's runs from where its last claim stopped (head.priority, head.runAt),
//     not from the start: a pinned horizon keeps the index entries of every run claimed
//     since, and a scan from the start reads through all of them.

// rescanEvery is how often a claim looks for agents with queued runs from scratch and
// reads every agent's line from its start. Runs that joined a line behind where a claim
// stopped (a lower priority number, a lease recovered by another process, a commit that
// came late) are found then at the latest.
const rescanEvery = time.Second

// claimRounds bounds the rounds of one claim; the worker claims again at once when the
// last round still found runs (claimResult.more).
const claimRounds = 3

// capLockSpace is the advisory lock space of capped agents' claims (the second key is the
// agent's hash).
const capLockSpace = 734629

// head is one agent's place in line, as this process last saw it.
type head struct {
	workspace string
	capped    bool
	priority  int       // the agent's due runs are read from (priority, runAt) on
	runAt     time.Time // zero with priority -1: from the start
}

// lineup is what a worker knows of the queue between claims: the agents that may have due
// runs, where each one's line starts, and when each workspace was last served. Only the
// claim (under the worker's cycle lock) reads and writes it, except the announcements.
type lineup struct {
	heads  map[string]*head     // agent id → place in line
	served map[string]time.Time // workspace id → when this process last claimed one of its runs
	found  time.Time            // the last search from scratch
	due    time.Time            // the next scheduled run falls due: search again then

	mu        sync.Mutex      // guards the announcements below
	announced map[string]bool // workspaces with runs created since the last claim
	rescan    bool            // search from scratch at the next claim
}

func newLineup() *lineup {
	return &lineup{heads: map[string]*head{}, served: map[string]time.Time{}, announced: map[string]bool{}}
}

// announce records that runs were created in workspaces (nil: anywhere, or made queued
// by an update: search from scratch).
func (q *lineup) announce(workspaces []string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if workspaces == nil {
		q.rescan = true
	}
	for _, ws := range workspaces {
		q.announced[ws] = true
	}
}

// find brings the heads up to date before a claim.
func (q *lineup) find(ctx context.Context, db txQueryer) error {
	q.mu.Lock()
	all := q.rescan || time.Since(q.found) >= rescanEvery || (!q.due.IsZero() && !time.Now().Before(q.due))
	announced := q.announced
	q.announced, q.rescan = map[string]bool{}, false
	q.mu.Unlock()
	if all {
		// Every agent with queued runs, due or not, one index probe each (runs_claim_idx).
		rows, err := db.query(ctx, `
			WITH RECURSIVE t (agent_id) AS (
				(SELECT r.agent_id FROM runs r WHERE r.status = 'queued' ORDER BY r.agent_id LIMIT 1)
				UNION ALL
				SELECT (SELECT r.agent_id FROM runs r WHERE r.status = 'queued' AND r.agent_id > t.agent_id
				        ORDER BY r.agent_id LIMIT 1)
				FROM t WHERE t.agent_id IS NOT NULL)
			SELECT a.id, a.workspace_id, a.max_concurrency IS NOT NULL FROM t JOIN agents a ON a.id = t.agent_id
			WHERE NOT a.paused`)
		if err != nil {
			q.announce(nil) // not done: again at the next claim
			return err
		}
		heads, err := scanHeads(rows, nil)
		if err != nil {
			q.announce(nil)
			return err
		}
		q.heads, q.found, q.due = heads, time.Now(), time.Time{}
		return nil
	}
	if len(announced) == 0 {
		return nil
	}
	// New runs go to the back of their line, unless they jump ahead by priority: a line read
	// from a later priority than the first is read from the start again.
	ws := make([]string, 0, len(announced))
	for id := range announced {
		ws = append(ws, id)
	}
	rows, err := db.query(ctx, `SELECT a.id, a.workspace_id, a.max_concurrency IS NOT NULL
		FROM agents a WHERE a.workspace_id = ANY ($1) AND NOT a.paused`, pq.StringArray(ws))
	if err != nil {
		q.announce(ws)
		return err
	}
	_, err = scanHeads(rows, q.heads)
	return err
}

// scanHeads adds the agents in rows (id, workspace, capped) to heads, at the start of their
// line unless they are there already at priority 0; nil heads: a new map.
func scanHeads(rows *sql.Rows, heads map[string]*head) (map[string]*head, error) {
	defer rows.Close()
	if heads == nil {
		heads = map[string]*head{}
	}
	for rows.Next() {
		var id string
		h := &head{priority: -1}
		if err := rows.Scan(&id, &h.workspace, &h.capped); err != nil {
			return heads, err
		}
		if old := heads[id]; old != nil && old.priority <= 0 {
			old.capped = h.capped
			continue
		}
		heads[id] = h
	}
	return heads, rows.Err()
}

// recoverSQL puts runs whose lease expired back in line (or ends them when no attempt is
// left, or a cancel was requested). run_at is kept: their place in line.
const recoverSQL = `
	UPDATE runs r SET
		status = CASE WHEN r.cancel_requested THEN 'canceled'
		              WHEN r.attempt < r.max_attempts THEN 'queued' ELSE 'failed' END,
		error = CASE WHEN r.cancel_requested THEN 'canceled by request'
		             ELSE 'lease expired: worker ' || r.worker_id || ' stopped renewing attempt ' || r.attempt END,
		errors = r.errors || jsonb_build_array(jsonb_build_object('attempt', r.attempt, 'at', ` + nowZ + `,
		         'message', 'lease expired: worker ' || r.worker_id || ' stopped renewing attempt ' || r.attempt)),
		finished_at = CASE WHEN r.cancel_requested OR r.attempt >= r.max_attempts THEN now() END,
		started_at = CASE WHEN r.cancel_requested OR r.attempt >= r.max_attempts THEN r.started_at END,
		worker_id = NULL, lease_expires_at = NULL, updated_at = now()
	WHERE r.id = ANY (ARRAY(SELECT x.id FROM runs x WHERE x.status = 'running' AND x.lease_expires_at < now()
	                        ORDER BY x.lease_expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
	RETURNING r.status`

// pickSQL reads up to n due runs of each agent from its place in line, in claim order, with
// the agent as it stands now. The row comparison is a bound of runs_claim_idx's range.
const pickSQL = `
	SELECT h.agent_id, a.workspace_id, a.paused, a.max_concurrency IS NOT NULL, c.id, c.priority, c.run_at, c.seq
	FROM unnest($1::uuid[], $2::int[], $3::timestamptz[], $4::int[]) AS h (agent_id, priority, run_at, n)
	JOIN agents a ON a.id = h.agent_id
	CROSS JOIN LATERAL (
		SELECT r.id, r.priority, r.run_at, r.seq FROM runs r
		WHERE r.agent_id = h.agent_id AND r.status = 'queued' AND r.run_at <= now()
		  AND (r.priority, r.run_at) >= (h.priority, h.run_at)
		ORDER BY r.priority, r.run_at, r.seq
		LIMIT h.n) c`

// takeSQL claims the picked runs that are still queued, skipping those another
// transaction holds.
const takeSQL = `
	UPDATE runs r SET status = 'running', attempt = r.attempt + 1, worker_id = $1,
		lease_expires_at = now() + $2 * interval '1 millisecond', started_at = now(), updated_at = now()
	FROM agents a
	WHERE r.id = ANY (ARRAY(SELECT x.id FROM runs x WHERE x.id = ANY ($3) AND x.status = 'queued'
	                        FOR UPDATE SKIP LOCKED))
	  AND a.id = r.agent_id
	RETURNING r.id, r.workspace_id, r.attempt, r.input, a.name, a.kind, a.config, r.timeout_ms`

// claim recovers expired leases when recoverLeases, then claims up to limit due runs (limit
// may be 0) for workerID from workspace ws ("" for every one), as the comment at the top of
// this file says.
func (s *store) claim(ctx context.Context, q *lineup, workerID string, limit int, ws string, lease time.Duration, recoverLeases bool) (claimResult, error) {
	// One transaction, so that an idle worker's claim costs PostgreSQL one.
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return claimResult{}, err
	}
	defer tx.Rollback()
	db := txQueryer{s, tx}
	res, err := s.claimIn(ctx, db, q, workerID, limit, ws, lease, recoverLeases)
	if err == nil {
		err = tx.Commit()
	}
	if err != nil {
		q.announce(nil) // where it stopped in each line is not known: from the start next time
		return claimResult{}, err
	}
	return res, nil
}

// claimIn is claim's work, in the claim's transaction.
func (s *store) claimIn(ctx context.Context, db txQueryer, q *lineup, workerID string, limit int, ws string, lease time.Duration, recoverLeases bool) (claimResult, error) {
	var res claimResult
	if recoverLeases {
		rows, err := db.query(ctx, recoverSQL)
		if err != nil {
			return res, err
		}
		for rows.Next() {
			var st runStatus
			if err := rows.Scan(&st); err != nil {
				rows.Close()
				return res, err
			}
			if st == statusQueued {
				res.requeued++
			} else {
				res.failed++
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return res, err
		}
		if res.requeued > 0 {
			q.announce(nil)
		}
	}
	if limit <= 0 {
		return res, nil
	}
	if err := q.find(ctx, db); err != nil {
		return res, err
	}
	for round := 1; len(res.claimed) < limit; round++ {
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
		var next sql.NullTime
		rows, err := db.query(ctx, `SELECT min(run_at) FROM runs
			WHERE status = 'queued' AND priority >= 0 AND run_at > now() AND ($1 = '' OR workspace_id = NULLIF($1, '')::uuid)`, ws)
		if err != nil {
			return res, err
		}
		defer rows.Close()
		for rows.Next() {
			if err := rows.Scan(&next); err != nil {
				return res, err
			}
		}
		if err := rows.Err(); err != nil {
			return res, err
		}
		if next.Valid {
			res.nextDue, q.due = next.Time, next.Time
		}
	}
	return res, nil
}

// pick is one due run a round read.
type pick struct {
	agent, workspace, id string
	priority             int
	runAt                time.Time
	seq                  int64
}

func (p pick) before(o pick) int {
	return cmp.Or(cmp.Compare(p.priority, o.priority), p.runAt.Compare(o.runAt), cmp.Compare(p.seq, o.seq))
}

// claimRound is one round of a claim: it adds what it claimed to res and says whether
// another round may find more.
func (s *store) claimRound(ctx context.Context, db txQueryer, q *lineup, workerID string, limit int, ws string, lease time.Duration, res *claimResult) (more bool, err error) {
	want := limit - len(res.claimed)
	// The workspaces with agents in line, least recently served first.
	agentsOf := map[string][]string{}
	var capped []string
	for id, h := range q.heads {
		if ws != "" && h.workspace != ws {
			continue
		}
		agentsOf[h.workspace] = append(agentsOf[h.workspace], id)
		if h.capped {
			capped = append(capped, id)
		}
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

	room := map[string]int{} // capped agents whose lock this claim holds: how many more may run
	if len(capped) > 0 {
		res.capped = true
		// Two statements: the count must see every claim that committed before the lock.
		// A lock this transaction holds already is taken again.
		rows, err := db.query(ctx, `SELECT id FROM unnest($1::uuid[]) AS id
			WHERE pg_try_advisory_xact_lock($2, hashtext(id::text))`, pq.StringArray(capped), capLockSpace)
		if err != nil {
			return false, err
		}
		var locked pq.StringArray
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return false, err
			}
			locked = append(locked, id)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return false, err
		}
		rows, err = db.query(ctx, `SELECT a.id, a.max_concurrency - (SELECT count(*) FROM runs x
			WHERE x.status = 'running' AND x.workspace_id = a.workspace_id AND x.agent_id = a.id)
			FROM agents a WHERE a.id = ANY ($1) AND a.max_concurrency IS NOT NULL`, locked)
		if err != nil {
			return false, err
		}
		for rows.Next() {
			var id string
			var n int
			if err := rows.Scan(&id, &n); err != nil {
				rows.Close()
				return false, err
			}
			room[id] = n
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return false, err
		}
	}

	// Read each agent's line, up to the share (a capped agent: up to its room).
	var agents []string
	var prios, ns pq.Int64Array
	var ats []string
	for _, w := range order {
		for _, id := range agentsOf[w] {
			h, n := q.heads[id], share
			if h.capped {
				n = min(n, room[id]) // 0 when its lock is held elsewhere
			}
			if n <= 0 {
				continue
			}
			agents, prios, ns = append(agents, id), append(prios, int64(h.priority)), append(ns, int64(n))
			ats = append(ats, h.runAt.Format(time.RFC3339Nano))
		}
	}
	if len(agents) == 0 {
		return false, nil
	}
	rows, err := db.query(ctx, pickSQL, pq.StringArray(agents), prios, pq.StringArray(ats), ns)
	if err != nil {
		return false, err
	}
	read := map[string][]pick{} // by agent, in claim order
	for rows.Next() {
		var p pick
		var paused, isCapped bool
		if err := rows.Scan(&p.agent, &p.workspace, &paused, &isCapped, &p.id, &p.priority, &p.runAt, &p.seq); err != nil {
			rows.Close()
			return false, err
		}
		h := q.heads[p.agent]
		if paused || isCapped != h.capped {
			// Changed since it was found: found again at the next search.
			delete(q.heads, p.agent)
			q.announce(nil)
			more = true
			continue
		}
		read[p.agent] = append(read[p.agent], p)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return false, err
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
	taken := map[string]bool{}
	for _, turn := range turns {
		for _, p := range turn {
			if len(chosen) < want {
				chosen, taken[p.id] = append(chosen, p.id), true
			} else {
				more = true
			}
		}
	}
	// Each agent's line now starts at its first run not taken, or after its last one; an
	// agent whose line had no due run leaves the heads until it is found again.
	for i, id := range agents {
		got := read[id]
		if len(got) == 0 {
			delete(q.heads, id)
			continue
		}
		h := q.heads[id]
		if h == nil {
			continue
		}
		next := got[len(got)-1]
		for _, p := range got {
			if !taken[p.id] {
				next = p
				break
			}
		}
		h.priority, h.runAt = next.priority, next.runAt
		if int64(len(got)) == ns[i] {
			more = true // it may have more due
		}
	}
	if len(chosen) == 0 {
		return more, nil
	}

	rows, err = db.query(ctx, takeSQL, workerID, lease.Milliseconds(), pq.StringArray(chosen))
	if err != nil {
		return false, err
	}
	now := time.Now()
	claimed := 0
	for rows.Next() {
		var c claimedRun
		var timeout sql.NullInt64
		if err := rows.Scan(&c.ID, &c.WorkspaceID, &c.Attempt, &c.Input, &c.AgentName, &c.AgentKind, &c.AgentConfig, &timeout); err != nil {
			rows.Close()
			return false, err
		}
		c.Timeout = time.Duration(timeout.Int64) * time.Millisecond
		c.EventsURL, c.EventsToken = s.events.link(c.ID, c.Attempt)
		res.claimed = append(res.claimed, c)
		q.served[c.WorkspaceID] = now
		claimed++
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return false, err
	}
	// Runs another claim held were skipped: another round looks past them.
	return more || claimed < len(chosen), nil
}

// txQueryer runs statements in tx, with the pool's prepared statements.
type txQueryer struct {
	s  *store
	tx *sql.Tx
}

func (t txQueryer) query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	st, err := t.s.prepared(ctx, query)
	if err != nil {
		return nil, err
	}
	return t.tx.StmtContext(ctx, st).QueryContext(ctx, args...)
}
