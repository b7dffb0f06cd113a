package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// countsByStatus reads the runs of workspace ws by status twice: from the counters the
// triggers keep (what stats answers) and by counting the table itself.
func countsByStatus(t testing.TB, db *sql.DB, st *store, ws string) (counters, table runStats) {
	t.Helper()
	counters, err := st.stats(context.Background(), ws)
	if err != nil {
		t.Fatal(err)
	}
	rows, err := db.Query(`SELECT status, count(*) FROM runs WHERE workspace_id = $1 GROUP BY status`, ws)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var status runStatus
		var n int64
		if err := rows.Scan(&status, &n); err != nil {
			t.Fatal(err)
		}
		switch status {
		case statusQueued:
			table.Queued = n
		case statusRunning:
			table.Running = n
		case statusSucceeded:
			table.Succeeded = n
		case statusFailed:
			table.Failed = n
		case statusCanceled:
			table.Canceled = n
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return counters, table
}

// TestCountersMatchTable: after a mixed load of creates (single and batch), finishes,
// failures, retries by backoff, cancels of queued and running runs, and prunes, with the
// counts rolled up all along, the counters behind stats and /metrics equal count(*) of the
// table, per workspace.
func TestCountersMatchTable(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	st := &store{db: db}
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_CONCURRENCY": "20"}))
	wsA, wsB := a.createWorkspace(t), a.createWorkspace(t)
	for _, ws := range []testWorkspace{wsA, wsB} {
		a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 2000})
		a.createAgent(t, ws, "bad", "webhook", map[string]any{"url": "http://127.0.0.1:9/nothing", "timeout_ms": 100})
	}

	var wg sync.WaitGroup
	// Roll the counts up while the load writes them, as the heartbeats do, much more often.
	rolling, stopRolling := make(chan error, 1), make(chan struct{})
	go func() {
		for {
			select {
			case <-stopRolling:
				rolling <- nil
				return
			case <-time.After(20 * time.Millisecond):
			}
			if err := st.rollUpCounts(context.Background()); err != nil {
				rolling <- err
				return
			}
		}
	}()
	for _, ws := range []testWorkspace{wsA, wsB} {
		for c := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 25 {
					path := "/v1/workspaces/" + ws.ID + "/runs"
					switch i % 5 {
					case 0:
						send(testClient, "POST", a.base+path+"/batch", ws.APIKey, nil,
							map[string]any{"runs": []map[string]any{{"agent": "echo", "input": i}, {"agent": "echo", "input": c}}})
					case 1:
						send(testClient, "POST", a.base+path, ws.APIKey, nil, map[string]any{"agent": "bad", "input": i, "max_attempts": 2})
					case 2:
						_, _, body, err := send(testClient, "POST", a.base+path, ws.APIKey, nil, map[string]any{"agent": "slow", "input": i})
						if err == nil {
							var r runRecord
							if json.Unmarshal(body, &r) == nil {
								// Cancel it, queued or running, whichever it is by now.
								send(testClient, "POST", a.base+path+"/"+r.ID+"/cancel", ws.APIKey, nil, nil)
							}
						}
					default:
						send(testClient, "POST", a.base+path, ws.APIKey, nil, map[string]any{"agent": "echo", "input": i})
					}
				}
			}()
		}
	}
	wg.Wait()
	// Let everything settle: no run queued or running.
	eventually(t, 60*time.Second, "every run final", func() bool {
		var open int
		db.QueryRow(`SELECT count(*) FROM runs WHERE status IN ('queued', 'running')`).Scan(&open)
		return open == 0
	})
	close(stopRolling)
	if err := <-rolling; err != nil {
		t.Fatalf("roll the counts up during the load: %v", err)
	}
	// Some finished runs "long ago", then pruned: changes the last roll-up below takes.
	if _, err := db.Exec(`UPDATE runs SET finished_at = now() - interval '3 days'
		WHERE id IN (SELECT id FROM runs WHERE workspace_id = $1 ORDER BY seq LIMIT 30)`, wsA.ID); err != nil {
		t.Fatal(err)
	}
	if n, err := st.prune(context.Background(), 24*time.Hour, 7); err != nil || n != 7 {
		t.Fatalf("prune: got %d, %v; want 7 deleted", n, err)
	}
	var before, after int
	db.QueryRow(`SELECT count(*) FROM run_count_changes`).Scan(&before)
	if err := st.rollUpCounts(context.Background()); err != nil {
		t.Fatalf("roll the counts up: %v", err)
	}
	if err := db.QueryRow(`SELECT count(*) FROM run_count_changes`).Scan(&after); err != nil || before == 0 || after != 0 {
		t.Errorf("changes to roll up before and after the last roll-up: got %d and %d, %v; want some, then none", before, after, err)
	}
	for _, ws := range []testWorkspace{wsA, wsB} {
		counters, table := countsByStatus(t, db, st, ws.ID)
		if counters != table {
			t.Errorf("workspace %s: got counters %+v; want count(*) %+v", ws.ID, counters, table)
		}
		if table.Succeeded == 0 || table.Failed == 0 || table.Canceled == 0 {
			t.Errorf("workspace %s: got %+v; want succeeded, failed and canceled runs all present (the load is not mixed)", ws.ID, table)
		}
		if got := a.stats(t, ws); got != table {
			t.Errorf("GET stats of %s: got %+v; want %+v", ws.ID, got, table)
		}
	}
}

// TestPruneDeletesExactlyOldFinalRuns: retention deletes the final runs finished before the
// cutoff (with their events, by cascade) in batches, never a queued or running run nor a
// recent one, while other processes prune at the same time and a drain goes on.
func TestPruneDeletesExactlyOldFinalRuns(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	st := &store{db: db}
	ws := seedWorkspace(t, st)
	// 2,500 old final runs, 300 recent final ones, 200 queued and 50 running with old
	// timestamps (never pruned: not final), all of the echo agent.
	for _, q := range []string{
		`INSERT INTO runs (workspace_id, agent_id, status, finished_at, started_at, attempt)
		 SELECT $1, a.id, (ARRAY['succeeded', 'failed', 'canceled'])[1 + i % 3],
		        now() - interval '10 days' - i * interval '1 second', now() - interval '11 days', 1
		 FROM agents a, generate_series(1, 2500) i WHERE a.workspace_id = $1`,
		`INSERT INTO runs (workspace_id, agent_id, status, finished_at, attempt)
		 SELECT $1, a.id, 'succeeded', now() - interval '1 hour', 1 FROM agents a, generate_series(1, 300) i WHERE a.workspace_id = $1`,
		`INSERT INTO runs (workspace_id, agent_id, status, run_at, created_at)
		 SELECT $1, a.id, 'queued', now() - interval '20 days', now() - interval '20 days' FROM agents a, generate_series(1, 200) i WHERE a.workspace_id = $1`,
		`INSERT INTO runs (workspace_id, agent_id, status, attempt, worker_id, lease_expires_at, started_at)
		 SELECT $1, a.id, 'running', 1, 'w', now() + interval '1 hour', now() - interval '20 days' FROM agents a, generate_series(1, 50) i WHERE a.workspace_id = $1`,
	} {
		if _, err := db.Exec(q, ws.ID); err != nil {
			t.Fatal(err)
		}
	}
	type counts struct{ old, recent, open int }
	read := func() (c counts) {
		t.Helper()
		if err := db.QueryRow(`SELECT
			count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'canceled') AND finished_at < now() - interval '1 day'),
			count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'canceled') AND finished_at >= now() - interval '1 day'),
			count(*) FILTER (WHERE status IN ('queued', 'running')) FROM runs`).Scan(&c.old, &c.recent, &c.open); err != nil {
			t.Fatal(err)
		}
		return c
	}
	if got, want := read(), (counts{2500, 300, 250}); got != want {
		t.Fatalf("seeded: got %+v; want %+v", got, want)
	}

	// A worker drains the queued runs while three "processes" prune in batches of 100.
	w := newWorker(&store{db: openTestDB(t, dsn)}, testLogger(t), workerConfig{Poll: 50 * time.Millisecond,
		BatchLimit: 20, Concurrency: 20, Lease: 30 * time.Second, ShutdownTimeout: 5 * time.Second}, newMetrics())
	ctx, stop := context.WithCancel(context.Background())
	go w.run(ctx, true)
	defer func() { stop(); <-w.done }()

	var wg sync.WaitGroup
	deleted := make([]int, 3)
	batches := make([]int, 3)
	for p := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pst := &store{db: openTestDB(t, dsn)}
			for {
				n, err := pst.prune(context.Background(), 24*time.Hour, 100)
				if err != nil {
					t.Errorf("prune %d: %v", p, err)
					return
				}
				deleted[p] += n
				if n > 0 {
					batches[p]++
					if n > 100 {
						t.Errorf("prune %d: got a batch of %d; want at most 100", p, n)
					}
				}
				if read().old == 0 {
					return
				}
			}
		}()
	}
	wg.Wait()
	total := deleted[0] + deleted[1] + deleted[2]
	t.Logf("deleted per pruner %v in batches %v", deleted, batches)
	if total != 2500 {
		t.Errorf("deleted: got %d in all; want exactly the 2500 old final runs", total)
	}
	got := read()
	if got.old != 0 || got.recent < 300 {
		t.Errorf("after pruning: got %+v; want no old final run and the 300 recent ones kept", got)
	}
	// The queued runs were old but not final: none was deleted (the drain finishes them).
	var kept int
	db.QueryRow(`SELECT count(*) FROM runs WHERE created_at < now() - interval '19 days'`).Scan(&kept)
	if kept != 200 {
		t.Errorf("old queued runs: got %d left; want all 200 (never pruned while not final)", kept)
	}
	// Compare once the drain is over: both reads then see the same table.
	eventually(t, 30*time.Second, "the drain over (no queued run, only the 50 seeded running)", func() bool {
		var queued, running int
		db.QueryRow(`SELECT count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running') FROM runs`).Scan(&queued, &running)
		return queued == 0 && running == 50
	})
	counters, table := countsByStatus(t, db, st, ws.ID)
	if counters != table {
		t.Errorf("counters after pruning: got %+v; want count(*) %+v", counters, table)
	}
}

// TestRetentionThroughTheProcess: a process with RUN_RETENTION_DAYS prunes by itself soon
// after start-up, and counts it in agentapp_runs_pruned_total.
func TestRetentionThroughTheProcess(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	ws := seedWorkspace(t, &store{db: db})
	if _, err := db.Exec(`INSERT INTO runs (workspace_id, agent_id, status, finished_at, attempt)
		SELECT $1, a.id, 'succeeded', now() - $2 * interval '1 day', 1 FROM agents a, generate_series(1, 40) i
		WHERE a.workspace_id = $1`, ws.ID, 3); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO runs (workspace_id, agent_id, status, finished_at, attempt)
		SELECT $1, a.id, 'succeeded', now() - interval '1 day', 1 FROM agents a, generate_series(1, 5) i
		WHERE a.workspace_id = $1`, ws.ID); err != nil {
		t.Fatal(err)
	}
	p := startProc(t, testEnv(t, dsn, map[string]string{"RUN_RETENTION_DAYS": "2"}))
	a := p.app()
	took := eventually(t, 45*time.Second, "pruned_total 40", func() bool {
		return a.metric(t, "agentapp_runs_pruned_total") == 40
	})
	t.Logf("first retention pass %v after start-up", took.Round(time.Millisecond))
	var left int
	db.QueryRow(`SELECT count(*) FROM runs`).Scan(&left)
	if left != 5 {
		t.Errorf("runs left: got %d; want the 5 younger than the retention", left)
	}
	p.waitLog(t, fmt.Sprintf("runs=%d", 40), 1, 5*time.Second)
}

// TestRunIDsAreTimeOrdered: runs created through the API, one by one and in a batch, get
// version 7 UUIDs whose first 48 bits are their creation's Unix milliseconds (within the
// clocks' skew of the database and this process), so that later runs sort after earlier ones.
func TestRunIDsAreTimeOrdered(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	var ids []string
	var created []time.Time
	for i := range 3 {
		r := a.createRun(t, ws, "echo", i)
		ids, created = append(ids, r.ID), append(created, r.CreatedAt)
		time.Sleep(3 * time.Millisecond)
	}
	var batch struct{ Runs []runRecord }
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey,
		map[string]any{"runs": []map[string]any{{"agent": "echo"}, {"agent": "echo"}}}, 201, &batch)
	for _, r := range batch.Runs {
		ids, created = append(ids, r.ID), append(created, r.CreatedAt)
	}
	if len(ids) != 5 {
		t.Fatalf("got %d runs; want 5", len(ids))
	}
	for i, id := range ids {
		if len(id) != 36 || id[14] != '7' || !strings.ContainsRune("89ab", rune(id[19])) {
			t.Errorf("run id %s: want a UUID of version 7 and the RFC 9562 variant", id)
			continue
		}
		ms, err := strconv.ParseInt(strings.ReplaceAll(id[:13], "-", ""), 16, 64)
		if err != nil {
			t.Errorf("run id %s: its first 48 bits: %v", id, err)
			continue
		}
		if d := time.UnixMilli(ms).Sub(created[i]); d < -time.Second || d > time.Second {
			t.Errorf("run id %s: its time is %v, %v from its created_at %v; want within 1 s",
				id, time.UnixMilli(ms).UTC(), d, created[i])
		}
		if i > 0 && i < 3 && id <= ids[i-1] {
			t.Errorf("run ids %s then %s, created 3 ms apart: want the later one to sort after", ids[i-1], id)
		}
	}
	if ids[3][:13] < ids[2][:13] {
		t.Errorf("batch run id %s sorts before the earlier run %s", ids[3], ids[2])
	}
}
