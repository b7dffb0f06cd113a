package main

import (
	"context"
	"errors"
	"sync"

	"github.com/lib/pq"
)

// Single-run creates (POST …/runs) that arrive while one statement of them is being
// written are gathered and written together by the next, in one statement and one commit.
// One statement at a time gathers the most: with 8 clients a statement took 4 creates on
// average, and the creates went 3,820 and 3,940/s against 3,356 and 3,227/s with a
// statement each (3,416 and 3,192/s with two statements in flight). A create that finds
// none in flight is written at once, by its own request; no goroutine waits in the
// background. Each create still succeeds or fails on its own: one the statement did not
// insert (an idempotent repeat, an unknown agent), or that a statement PostgreSQL
// rejected took down with it, is written again in a statement of its own.

// gatherMax and gatherMaxBytes bound one statement (inputs counted), as a batch is.
const (
	gatherMax      = 100
	gatherMaxBytes = 8 << 20
)

// gatherer holds the creates waiting to be written. The zero value is ready.
type gatherer struct {
	mu      sync.Mutex
	pending []*pendingCreate
	writing bool // a statement is in flight
}

// pendingCreate is one create waiting for its statement.
type pendingCreate struct {
	ws   string
	n    newRun
	id   string
	done chan createResult // one message at a time: a batch to write, then the result
}

// createResult is what a pending create learns: a batch it is to write (itself first),
// its outcome, or that it must be written alone.
type createResult struct {
	lead    []*pendingCreate
	alone   bool
	run     runRecord
	created bool
	err     error
}

// join adds p; it returns the creates p is to write now (p first) when no statement is
// in flight, else nil: p waits to be handed on by the statement in flight.
func (g *gatherer) join(p *pendingCreate) []*pendingCreate {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.pending = append(g.pending, p)
	if g.writing {
		return nil
	}
	g.writing = true
	return g.takeLocked()
}

// handOff ends a statement: the creates that gathered meanwhile go to the first of them,
// which writes them, so that no writer answers its own request late.
func (g *gatherer) handOff() {
	g.mu.Lock()
	if len(g.pending) == 0 {
		g.writing = false
		g.mu.Unlock()
		return
	}
	batch := g.takeLocked()
	g.mu.Unlock()
	batch[0].done <- createResult{lead: batch}
}

// takeLocked removes the next statement's creates from pending: at least one, then as
// many as fit the bounds.
func (g *gatherer) takeLocked() []*pendingCreate {
	n, size := 1, len(g.pending[0].n.Input)
	for n < len(g.pending) && n < gatherMax && size+len(g.pending[n].n.Input) <= gatherMaxBytes {
		size += len(g.pending[n].n.Input)
		n++
	}
	batch := g.pending[:n:n]
	g.pending = append([]*pendingCreate(nil), g.pending[n:]...)
	return batch
}

// createRun inserts one queued run, gathered with the creates that arrive meanwhile.
// With an idempotency key already used in the workspace it returns the first run and
// created=false, or errConflict when that run was created from a different request. A run
// with a concurrency_key or a cost is created apart: its agent's limits decide on it.
func (s *store) createRun(ctx context.Context, ws string, n newRun) (runRecord, bool, error) {
	if n.Key != "" || n.Cost > 1 {
		return s.createRunApart(ctx, ws, n)
	}
	p := &pendingCreate{ws: ws, n: n, id: newRunID(), done: make(chan createResult, 1)}
	batch := s.gather.join(p)
	for {
		if batch != nil {
			s.writeLead(ctx, batch)
		}
		res := <-p.done
		switch {
		case res.lead != nil:
			batch = res.lead
		case res.alone:
			return s.createRunAlone(ctx, ws, n, p.id)
		default:
			return res.run, res.created, res.err
		}
	}
}

// writeLead writes batch, answers its creates and hands on those that gathered
// meanwhile, even if writing panics: the creates of batch are then answered with an
// error, and no later create waits for a statement that will never end.
func (s *store) writeLead(ctx context.Context, batch []*pendingCreate) {
	var results []createResult
	defer func() {
		for i, p := range batch {
			if results == nil {
				p.done <- createResult{err: errors.New("the statement writing this create failed")}
			} else {
				p.done <- results[i]
			}
		}
		s.gather.handOff()
	}()
	results = s.writeGathered(ctx, batch)
}

// writeGathered inserts batch in one statement and returns each create's outcome. The
// statement runs to its end even when the request that writes it goes away: the others
// wait for it.
func (s *store) writeGathered(ctx context.Context, batch []*pendingCreate) []createResult {
	runs, err := s.insertGathered(context.WithoutCancel(ctx), batch)
	var pqErr *pq.Error
	rejected := errors.As(err, &pqErr) && !isUnavailable(err)
	results := make([]createResult, len(batch))
	for i, p := range batch {
		r, ok := runs[p.id]
		switch {
		case ok:
			results[i] = createResult{run: r, created: true}
		case err == nil || rejected:
			results[i] = createResult{alone: true}
		default:
			results[i] = createResult{err: err}
		}
	}
	return results
}

// insertGathered inserts the creates of batch (gathered, or one alone) that name an agent
// of their workspace and whose idempotency key is unused, in their order, and returns them
// by id.
func (s *store) insertGathered(ctx context.Context, batch []*pendingCreate) (map[string]runRecord, error) {
	k := len(batch)
	ids, wss, agents, inputs, keys := make([]string, k), make([]string, k), make([]string, k), make([]string, k), make([]string, k)
	hashes := make(pq.ByteaArray, k)
	maxes, priorities, delays, timeouts := make([]int64, k), make([]int64, k), make([]int64, k), make([]int64, k)
	runAts, traceIDs, flags := make([]string, k), make([]string, k), make([]string, k)
	for i, p := range batch {
		traceIDs[i], flags[i] = p.n.Trace.TraceID, p.n.Trace.Flags
		ids[i], wss[i], agents[i], inputs[i], keys[i] = p.id, p.ws, p.n.Agent, string(p.n.Input), p.n.IdempotencyKey
		hashes[i], maxes[i], priorities[i], delays[i] = p.n.RequestHash, int64(p.n.MaxAttempts), int64(p.n.Priority), p.n.DelayMS
		timeouts[i], runAts[i] = int64(p.n.TimeoutMS), timeArg(p.n.RunAt)
	}
	rows, err := s.queryPrepared(ctx, `SELECT `+runColumns+`
		FROM agentapp_create_runs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) r JOIN agents a ON a.id = r.agent_id`,
		pq.StringArray(ids), pq.StringArray(wss), pq.StringArray(agents), pq.StringArray(inputs), pq.Int64Array(maxes),
		pq.StringArray(keys), hashes, pq.Int64Array(priorities), pq.StringArray(runAts), pq.Int64Array(delays),
		pq.Int64Array(timeouts), pq.StringArray(traceIDs), pq.StringArray(flags))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	runs := make(map[string]runRecord, k)
	for rows.Next() {
		r, err := scanRun(rows)
		if err != nil {
			return nil, err
		}
		runs[r.ID] = r
	}
	return runs, rows.Err()
}
