package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestGatheredCreates sends 320 creates from 32 goroutines at once, over two workspaces:
// plain ones, repeats of one idempotent request, one key used with different requests,
// an unknown agent, inputs PostgreSQL refuses and a max_attempts its check refuses. Each
// gets its own outcome, the table holds exactly the runs created, and statements took
// several creates each (the runs of one statement share created_at, its transaction's
// time).
func TestGatheredCreates(t *testing.T) {
	t.Parallel()
	st := &store{db: openTestDB(t, testDB(t))}
	ctx := context.Background()
	wsA, wsB := seedWorkspace(t, st), seedWorkspace(t, st)
	const goroutines, each = 32, 10
	type outcome struct {
		g, i    int
		run     runRecord
		created bool
		err     error
	}
	var mu sync.Mutex
	var got []outcome
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				ws := []string{wsA.ID, wsB.ID}[(g+i)%2]
				n := newRun{Agent: "echo", Input: json.RawMessage(fmt.Sprintf(`{"g":%d,"i":%d}`, g, i)), MaxAttempts: 3}
				switch i {
				case 3: // the same request every time
					ws, n.Input, n.IdempotencyKey, n.RequestHash = wsA.ID, json.RawMessage(`{"same":true}`), "same", []byte("hash-same")
				case 5: // one key, a different request each time
					ws, n.IdempotencyKey, n.RequestHash = wsB.ID, "clash", fmt.Appendf(nil, "hash-%d", g)
				case 7:
					n.Agent = "nope"
				case 8:
					n.Input = json.RawMessage(`{"bad":"\u0000"}`)
				case 9:
					n.MaxAttempts = 0
				}
				r, created, err := st.createRun(ctx, ws, n)
				mu.Lock()
				got = append(got, outcome{g, i, r, created, err})
				mu.Unlock()
			}
		}()
	}
	wg.Wait()

	var sameID string
	var sameCreated, clashCreated, plain int
	for _, o := range got {
		switch o.i {
		case 3:
			if o.err != nil || o.run.ID == "" || (sameID != "" && o.run.ID != sameID) {
				t.Errorf("repeat %d: got %s, %v; want the one run %s", o.g, o.run.ID, o.err, sameID)
			}
			sameID = o.run.ID
			if o.created {
				sameCreated++
			}
		case 5:
			switch {
			case o.err == nil && o.created:
				clashCreated++
			case !errors.Is(o.err, errConflict):
				t.Errorf("clash %d: got %v (created %v); want created once, errConflict after", o.g, o.err, o.created)
			}
		case 7:
			var unknown unknownAgentError
			if !errors.As(o.err, &unknown) {
				t.Errorf("unknown agent %d: got %v; want unknownAgentError", o.g, o.err)
			}
		case 8:
			if _, ok := dataException(o.err); !ok {
				t.Errorf("input with \\u0000 %d: got %v; want a data exception", o.g, o.err)
			}
		case 9:
			if o.err == nil || !strings.Contains(o.err.Error(), "runs_max_attempts_min") {
				t.Errorf("max_attempts 0 %d: got %v; want the check violation", o.g, o.err)
			}
		default:
			want := fmt.Sprintf(`{"g": %d, "i": %d}`, o.g, o.i)
			if o.err != nil || !o.created || string(o.run.Input) != want || o.run.Status != statusQueued {
				t.Errorf("create %d/%d: got %+v, %v; want queued with input %s", o.g, o.i, o.run, o.err, want)
			}
			plain++
		}
	}
	if sameCreated != 1 || clashCreated != 1 {
		t.Errorf("idempotent creates: got %d and %d created; want 1 each", sameCreated, clashCreated)
	}
	var rows, stamps int
	if err := st.db.QueryRow(`SELECT count(*), count(DISTINCT created_at) FROM runs`).Scan(&rows, &stamps); err != nil {
		t.Fatal(err)
	}
	if want := plain + 2; rows != want {
		t.Errorf("runs in the table: got %d; want %d", rows, want)
	}
	if stamps >= rows*3/4 {
		t.Errorf("statements: got %d for %d runs; want several runs per statement", stamps, rows)
	}
	t.Logf("%d runs written by %d statements", rows, stamps)
}

// TestGatheredStatement writes hand-made batches. In one PostgreSQL accepts, the creates
// it could insert are inserted together and the others (an unknown agent, a used key) are
// sent back to be written alone; when it rejects the statement, every create is.
func TestGatheredStatement(t *testing.T) {
	t.Parallel()
	st := &store{db: openTestDB(t, testDB(t))}
	ctx := context.Background()
	ws := seedWorkspace(t, st)
	used, _, err := st.createRun(ctx, ws.ID, newRun{Agent: "echo", Input: json.RawMessage(`1`), MaxAttempts: 3,
		IdempotencyKey: "used", RequestHash: []byte("h")})
	if err != nil {
		t.Fatal(err)
	}
	pending := func(agent, input, key string) *pendingCreate {
		n := newRun{Agent: agent, Input: json.RawMessage(input), MaxAttempts: 3, IdempotencyKey: key}
		if key != "" {
			n.RequestHash = []byte("h")
		}
		return &pendingCreate{ws: ws.ID, n: n, id: newRunID()}
	}
	write := func(batch ...*pendingCreate) []createResult {
		return st.writeGathered(ctx, batch)
	}

	// Array literals carry the values: quotes, backslashes, braces, commas and NULL in
	// inputs and keys must arrive as sent.
	odd := pending("echo", `{"s":"a,\"b\"{c}\\d NULL é ✓"}`, `NULL,"k"{}\`)
	res := write(pending("echo", `{"a":1}`, ""), pending("nope", `2`, ""), pending("echo", `3`, "used"), pending("echo", `{"a":4}`, "fresh"), odd)
	var oddKey, oddInput string
	if err := st.db.QueryRow(`SELECT idempotency_key, input::text FROM runs WHERE id = $1`, odd.id).Scan(&oddKey, &oddInput); err != nil ||
		oddKey != odd.n.IdempotencyKey || oddInput != `{"s": "a,\"b\"{c}\\d NULL é ✓"}` {
		t.Errorf("odd values: got key %q, input %s (%v); want key %q, input %s", oddKey, oddInput, err, odd.n.IdempotencyKey, odd.n.Input)
	}
	for i, want := range []bool{true, false, false, true, true} {
		if r := res[i]; r.created != want || r.alone == want || r.err != nil {
			t.Errorf("create %d of the accepted batch: got %+v; want created %v, else alone", i, r, want)
		}
	}
	if a, b := res[0].run, res[3].run; string(a.Input) != `{"a": 1}` || string(b.Input) != `{"a": 4}` || !a.CreatedAt.Equal(b.CreatedAt) || a.seq >= b.seq {
		t.Errorf("accepted batch: got %+v and %+v; want both, in order, in one statement", a, b)
	}
	if r, created, err := st.createRun(ctx, ws.ID, pending("echo", `3`, "used").n); err != nil || created || r.ID != used.ID {
		t.Errorf("repeat written alone: got %s %v %v; want the first run %s", r.ID, created, err, used.ID)
	}

	for i, r := range write(pending("echo", `5`, ""), pending("echo", `{"bad":"\u0000"}`, ""), pending("echo", `6`, "")) {
		if !r.alone || r.err != nil {
			t.Errorf("create %d of a rejected batch: got %+v; want it written alone", i, r)
		}
	}
	var n int
	if err := st.db.QueryRow(`SELECT count(*) FROM runs`).Scan(&n); err != nil || n != 4 {
		t.Errorf("runs: got %d (%v); want 4: the first, and the accepted batch's three", n, err)
	}
}

// TestAPIConcurrentCreates posts 200 runs from 40 clients at once through HTTP, and 40
// repeats of one idempotent request: every run is answered 201 and listed once, and the
// repeats all name one run, answered 201 once and 200 after.
func TestAPIConcurrentCreates(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	path := "/v1/workspaces/" + ws.ID + "/runs"
	var mu sync.Mutex
	ids := map[string]bool{}
	statuses := map[int]int{}
	var repeatIDs []string
	var wg sync.WaitGroup
	for c := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 5 {
				var r runRecord
				a.mustDo(t, "POST", path, ws.APIKey, map[string]any{"agent": "echo", "input": map[string]int{"c": c, "i": i}}, 201, &r)
				mu.Lock()
				ids[r.ID] = true
				mu.Unlock()
			}
			status, _, data := a.do(t, "POST", path, ws.APIKey, map[string]string{"Idempotency-Key": "once"},
				map[string]any{"agent": "echo", "input": "same"})
			var r runRecord
			if err := json.Unmarshal(data, &r); err != nil {
				t.Errorf("repeat: got %d %s; want a run", status, data)
			}
			mu.Lock()
			statuses[status]++
			repeatIDs = append(repeatIDs, r.ID)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if len(ids) != 200 {
		t.Errorf("runs answered: got %d distinct ids; want 200", len(ids))
	}
	if statuses[http.StatusCreated] != 1 || statuses[http.StatusOK] != 39 {
		t.Errorf("repeats: got statuses %v; want one 201 and 39 200", statuses)
	}
	for _, id := range repeatIDs {
		if id != repeatIDs[0] {
			t.Errorf("repeats: got runs %s and %s; want one", repeatIDs[0], id)
			break
		}
	}
	listed := map[string]int{}
	for cursor := ""; ; {
		var page struct {
			Runs       []runRecord `json:"runs"`
			NextCursor string      `json:"next_cursor"`
		}
		a.mustDo(t, "GET", path+"?limit=200&cursor="+cursor, ws.APIKey, nil, 200, &page)
		for _, r := range page.Runs {
			listed[r.ID]++
		}
		if cursor = page.NextCursor; cursor == "" {
			break
		}
	}
	for id := range ids {
		if listed[id] != 1 {
			t.Errorf("run %s: answered 201, listed %d times; want once", id, listed[id])
		}
	}
	if len(listed) != 201 || listed[repeatIDs[0]] != 1 {
		t.Errorf("list: got %d runs; want the 200 and the repeats' one", len(listed))
	}
}

// TestGatheredWriterPanics: a writer whose statement panics (here: a store without a
// pool) still answers its creates, with an error, and hands on the creates that gathered
// meanwhile, so that no create waits for ever.
func TestGatheredWriterPanics(t *testing.T) {
	t.Parallel()
	st := &store{}
	lead := &pendingCreate{n: newRun{Agent: "echo", Input: json.RawMessage(`1`)}, id: newRunID(), done: make(chan createResult, 1)}
	waiting := &pendingCreate{n: newRun{Agent: "echo", Input: json.RawMessage(`2`)}, id: newRunID(), done: make(chan createResult, 1)}
	st.gather.writing, st.gather.pending = true, []*pendingCreate{waiting}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("writing without a pool: got no panic; want one")
			}
		}()
		st.writeLead(context.Background(), []*pendingCreate{lead})
	}()
	if r := <-lead.done; r.err == nil {
		t.Errorf("the panicking statement's create: got %+v; want an error", r)
	}
	select {
	case r := <-waiting.done:
		if len(r.lead) != 1 || r.lead[0] != waiting {
			t.Errorf("the create waiting: got %+v; want to write itself next", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the create waiting: got nothing in 10 s; want to be handed on")
	}
	if !st.gather.writing || len(st.gather.pending) != 0 {
		t.Errorf("gatherer: got writing %v with %d pending; want the next statement in flight, none pending", st.gather.writing, len(st.gather.pending))
	}
}
