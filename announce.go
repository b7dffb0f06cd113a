package main

import (
	"context"
	"database/sql"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"
)

// announcer tells every process that new runs were created. The inserting transactions do
// not NOTIFY themselves: PostgreSQL serialises the commits of notifying transactions, one
// WAL flush after another, which caps enqueue at one insert per flush. Instead this
// process's own worker is woken at once, and one NOTIFY at a time is sent after the inserts
// committed, in a transaction of its own that writes nothing (no flush to wait for): inserts
// that commit while it is in flight are covered by the next one.
// The payload is the origin, then the workspaces of the runs, each with the earliest place
// in line of its new runs, so that a worker elsewhere looks for them there rather than
// everywhere, and from there rather than from the start of each line (runsAnnounced).
type announcer struct {
	db      *sql.DB
	log     *slog.Logger
	origin  string                   // this process's worker id, so that its own listener ignores it
	local   func(map[string]linePos) // tells this process's worker
	pending chan struct{}            // holds one: an announcement is due
	mu      sync.Mutex               // guards spaces
	spaces  map[string]linePos       // the workspaces of the runs created since the last announcement
	done    chan struct{}
}

// anywhere stands for the workspaces in an announcement of runs in more workspaces than
// a notification's payload (8000 bytes) can name.
const anywhere = "*"

// announceMost is the most workspaces an announcement names (an entry takes up to 58 bytes).
const announceMost = 120

// announceEvery is the least time between two notifications. After a quiet spell a new
// run is announced at once; a burst of inserts is then announced at most this often rather
// than once per commit, as each NOTIFY costs a round trip here and a transaction in every
// listening process (this one's too: PostgreSQL delivers it to its own listener). An idle
// worker elsewhere is woken by the first; a busy one claims whatever is queued when it can.
const announceEvery = 5 * time.Millisecond

// announceTimeout bounds one NOTIFY; a failed one is not retried: the workers' poll is the
// fallback, as when their listening connection is down.
const announceTimeout = 5 * time.Second

// newAnnouncer returns an announcer; run sends its notifications.
func newAnnouncer(db *sql.DB, log *slog.Logger, origin string, local func(map[string]linePos)) *announcer {
	return &announcer{db: db, log: log, origin: origin, local: local, pending: make(chan struct{}, 1),
		spaces: map[string]linePos{}, done: make(chan struct{})}
}

// claimable is called when runs of workspace ws may have become claimable: they were
// inserted and committed, at place at in their agent's line or later, or their agent was
// changed (resumed, its cap raised: keepPlace).
func (a *announcer) claimable(ws string, at linePos) {
	a.local(map[string]linePos{ws: at})
	a.mu.Lock()
	if old, ok := a.spaces[ws]; !ok || at.before(old) {
		a.spaces[ws] = at
	}
	a.mu.Unlock()
	select {
	case a.pending <- struct{}{}:
	default: // one is due already and will cover these runs
	}
}

// run sends the due notifications until ctx ends, then closes done.
func (a *announcer) run(ctx context.Context) {
	defer close(a.done)
	failing := false
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.pending:
		}
		if wait := announceEvery - time.Since(last); wait > 0 {
			timer := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-timer.C:
			}
			// This notification covers the runs committed while it waited.
			select {
			case <-a.pending:
			default:
			}
		}
		last = time.Now()
		a.mu.Lock()
		payload := announcement(a.origin, a.spaces)
		a.spaces = map[string]linePos{}
		a.mu.Unlock()
		nctx, cancel := context.WithTimeout(ctx, announceTimeout)
		_, err := a.db.ExecContext(nctx, `SELECT pg_notify('agentapp_runs', $1)`, payload)
		cancel()
		switch {
		case err != nil && !failing && ctx.Err() == nil:
			failing = true
			a.log.Warn("announcing new runs failed; other processes find them at their next poll", "err", err)
		case err == nil && failing:
			failing = false
			a.log.Info("announcing new runs works again")
		}
	}
}

// announcement is the payload of a notification of new runs from origin: the workspaces
// with their places, or anywhere when there are more than one notification can name.
func announcement(origin string, spaces map[string]linePos) string {
	if len(spaces) > announceMost {
		return origin + " " + anywhere
	}
	payload := origin
	for ws, at := range spaces {
		payload += " " + placeEntry(ws, at)
	}
	return payload
}

// placeEntry is workspace ws at place at as an announcement names it: the id alone for
// keepPlace, else "id/priority/run_at in Unix microseconds" (the trigger on runs writes the
// same).
func placeEntry(ws string, at linePos) string {
	if at == keepPlace {
		return ws
	}
	return ws + "/" + strconv.Itoa(at.priority) + "/" + strconv.FormatInt(at.runAt.UnixMicro(), 10)
}

// parsePlace reads an entry placeEntry wrote; one it cannot read is the start of the line.
func parsePlace(entry string) (ws string, at linePos) {
	ws, rest, ok := strings.Cut(entry, "/")
	if !ok {
		return ws, keepPlace
	}
	p, us, _ := strings.Cut(rest, "/")
	priority, err1 := strconv.Atoi(p)
	micros, err2 := strconv.ParseInt(us, 10, 64)
	if err1 != nil || err2 != nil {
		return ws, lineStart
	}
	return ws, linePos{priority: priority, runAt: time.UnixMicro(micros)}
}
