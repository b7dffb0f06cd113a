package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
)

// statusListener LISTENs on agentapp_status from the test, as another process would.
func statusListener(t *testing.T, dsn string) <-chan *pq.Notification {
	t.Helper()
	return testListener(t, dsn, "agentapp_status")
}

// testListener LISTENs on channel from the test, as another process would.
func testListener(t *testing.T, dsn, channel string) <-chan *pq.Notification {
	t.Helper()
	l := pq.NewListener(dsn, 10*time.Millisecond, time.Second, nil)
	t.Cleanup(func() { l.Close() })
	if err := l.Listen(channel); err != nil {
		t.Fatal(err)
	}
	return l.Notify
}

// TestAnnouncementsCoalesced: runs created by 8 clients at once are announced to other
// processes (agentapp_runs) at most every announceEvery, not once per commit; a run created
// after the burst is still announced.
func TestAnnouncementsCoalesced(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	heard := testListener(t, dsn, "agentapp_runs")

	const clients, each = 8, 50
	errs := make(chan error, clients)
	var wg sync.WaitGroup
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				code, _, body, err := send(testClient, "POST", a.base+"/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, nil,
					map[string]any{"agent": "echo"})
				if err == nil && code != http.StatusCreated {
					err = fmt.Errorf("POST …/runs: got %d %s; want 201", code, body)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	announced := 0
	for quiet := false; !quiet; {
		select {
		case <-heard:
			announced++
		case <-time.After(time.Second):
			quiet = true
		}
	}
	// The last announcement may follow the burst by announceEvery, so allow one interval more.
	most := int(took/announceEvery) + 2
	t.Logf("%d runs created in %v: %d announcements (at most %d allowed)", clients*each, took.Round(time.Millisecond), announced, most)
	if announced < 1 || announced > most {
		t.Errorf("announcements of %d runs created in %v: got %d; want 1 … %d", clients*each, took, announced, most)
	}

	created := time.Now()
	a.createRun(t, ws, "echo", "after the burst")
	select {
	case <-heard:
		t.Logf("a run created after the burst was announced %v later", time.Since(created).Round(time.Microsecond))
	case <-time.After(5 * time.Second):
		t.Fatal("a run created after the burst: not announced within 5 s")
	}
}

// countListed is the number of rows in status_listeners.
func countListed(t *testing.T, db *sql.DB) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM status_listeners`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// heldCancel starts a process without an embedded worker, so that the test is the only
// writer, creates a run, and cancels it in a transaction it leaves open: a write of runs
// that decided not to notify (no process was listed) and has not committed yet.
func heldCancel(t *testing.T) (a *app, ws testWorkspace, runID string, db *sql.DB, tx *sql.Tx) {
	t.Helper()
	dsn := testDB(t)
	a = startApp(t, testEnv(t, dsn, nil))
	ws = a.createWorkspace(t)
	runID = a.createRun(t, ws, "echo", "held").ID
	db = openTestDB(t, dsn)
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback() })
	if _, err := tx.Exec(`UPDATE runs SET status = 'canceled', error = 'canceled by the test', finished_at = now()
		WHERE id = $1`, runID); err != nil {
		t.Fatal(err)
	}
	return a, ws, runID, db, tx
}

// waitAnswer is a ?wait_ms answer, taken in the background.
type waitAnswer struct {
	run runRecord
	err error
}

// waitInBackground sends GET …/runs/{id}?wait_ms=wait and delivers its answer.
func waitInBackground(a *app, ws testWorkspace, id string, wait time.Duration) <-chan waitAnswer {
	answered := make(chan waitAnswer, 1)
	go func() {
		status, _, body, err := send(http.DefaultClient, "GET",
			fmt.Sprintf("%s/v1/workspaces/%s/runs/%s?wait_ms=%d", a.base, ws.ID, id, wait.Milliseconds()), ws.APIKey, nil, nil)
		var got runRecord
		if err == nil && status != 200 {
			err = fmt.Errorf("status %d: %s", status, body)
		}
		if err == nil {
			err = json.Unmarshal(body, &got)
		}
		answered <- waitAnswer{got, err}
	}()
	return answered
}

// commitAndAwait commits tx and returns the run status the background wait answered, and
// how long after the commit it did.
func commitAndAwait(t *testing.T, tx *sql.Tx, answered <-chan waitAnswer) (runStatus, time.Duration) {
	t.Helper()
	committed := time.Now()
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	got := <-answered
	if got.err != nil {
		t.Fatal(got.err)
	}
	return got.run.Status, time.Since(committed)
}

// TestStatusNotifiedOnlyWhileListened: with no process waiting on a run or streaming, the
// worker's claims and outcome writes notify no agentapp_status; once a request waits with
// ?wait_ms, its process is listed and the changes are notified (and answer it at once).
func TestStatusNotifiedOnlyWhileListened(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
	ws := a.createWorkspace(t)
	db := openTestDB(t, dsn)
	heard := statusListener(t, dsn)

	r := a.createRun(t, ws, "echo", "quiet")
	a.waitRunStatus(t, ws, r.ID, "succeeded", 20*time.Second)
	select {
	case msg := <-heard:
		t.Errorf("agentapp_status with no waiter or stream: got %q; want no notification", msg.Extra)
	case <-time.After(300 * time.Millisecond):
	}
	if n := countListed(t, db); n != 0 {
		t.Errorf("status_listeners before any waiter: got %d rows; want 0", n)
	}

	var due runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
		map[string]any{"agent": "echo", "input": "heard", "delay_ms": 500}, 201, &due)
	began := time.Now()
	var got runRecord
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+due.ID+"?wait_ms=20000", ws.APIKey, nil, 200, &got)
	took := time.Since(began)
	if got.Status != statusSucceeded || took > 10*time.Second {
		t.Errorf("?wait_ms=20000 on a run due in 500 ms: got %s after %s; want succeeded well before the deadline", got.Status, took)
	}
	if n := countListed(t, db); n != 1 {
		t.Errorf("status_listeners after a waiter: got %d rows; want 1 (the process, for a minute after)", n)
	}
	want := map[string]bool{ws.ID + ":" + due.ID + ":running": true, ws.ID + ":" + due.ID + ":succeeded": true}
	deadline := time.After(10 * time.Second)
	for len(want) > 0 {
		select {
		case msg := <-heard:
			for _, e := range strings.Fields(msg.Extra) {
				delete(want, e)
			}
		case <-deadline:
			t.Fatalf("agentapp_status while a process is listed: still missing %v after 10s", want)
		}
	}
}

// TestStatusListingWaitsForWritesInProgress: a write of runs that decided not to notify (no
// process was listed) but has not committed yet must not be missed by a waiter that lists
// its process meanwhile: the listing waits for that write to end, so the waiter's first read
// sees it.
func TestStatusListingWaitsForWritesInProgress(t *testing.T) {
	t.Parallel()
	a, ws, id, db, tx := heldCancel(t)
	answered := waitInBackground(a, ws, id, 15*time.Second)
	select {
	case got := <-answered:
		t.Fatalf("?wait_ms answered before the write in progress committed: %+v", got)
	case <-time.After(150 * time.Millisecond): // within the listing's lock_timeout
	}
	if status, after := commitAndAwait(t, tx, answered); status != statusCanceled || after > 5*time.Second {
		t.Errorf("?wait_ms=15000: got %s, %s after the commit; want canceled at once", status, after)
	}
	if n := countListed(t, db); n != 1 {
		t.Errorf("status_listeners: got %d rows; want the process listed (the listing waited for the write, not timed out)", n)
	}
}

// TestStatusListingGivesWayToIdleTransactions: a session idle in a transaction that wrote
// runs would hold the listing's lock off indefinitely, and every write of runs would queue
// behind the waiting lock. The listing gives up after its lock_timeout instead: new runs are
// accepted meanwhile, and the waiter polls, answering soon after the commit.
func TestStatusListingGivesWayToIdleTransactions(t *testing.T) {
	t.Parallel()
	a, ws, id, _, tx := heldCancel(t)
	answered := waitInBackground(a, ws, id, 20*time.Second)
	time.Sleep(100 * time.Millisecond) // the listing is waiting for the lock
	began := time.Now()
	a.createRun(t, ws, "echo", "not held up")
	if took := time.Since(began); took > 2*time.Second {
		t.Errorf("POST …/runs while a listing waited on an idle transaction: took %s; want it not held up for long", took)
	}
	time.Sleep(time.Second)
	if status, after := commitAndAwait(t, tx, answered); status != statusCanceled || after > 5*time.Second {
		t.Errorf("?wait_ms=20000: got %s %s after the commit; want canceled soon after it (the waiter polls)", status, after)
	}
}

// TestStaleStatusListenersRemoved: a process that ended without deleting its
// status_listeners row (killed) would keep every claim notifying; a worker's heartbeat
// removes rows not refreshed for a minute, and keeps fresh ones.
func TestStaleStatusListenersRemoved(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	if _, err := db.Exec(`INSERT INTO status_listeners (id, refreshed_at) VALUES
		('killed', now() - interval '61 seconds'), ('alive', now() - interval '30 seconds')`); err != nil {
		t.Fatal(err)
	}
	startApp(t, testEnv(t, dsn, nil)) // a worker's first heartbeat comes at its start
	eventually(t, 10*time.Second, "the stale status_listeners row is removed", func() bool {
		var ids string
		if err := db.QueryRow(`SELECT coalesce(string_agg(id, ',' ORDER BY id), '') FROM status_listeners`).Scan(&ids); err != nil {
			t.Fatal(err)
		}
		return ids == "alive"
	})
}

// TestAnnouncementsCarryPlaces: the API's announcement of a new run and the trigger's
// notification of a run queued again both name the run's workspace with its place in
// line, which a worker reads back exactly (runsAnnounced, parsePlace).
func TestAnnouncementsCarryPlaces(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	db := openTestDB(t, dsn)
	ws := a.createWorkspace(t)
	heard := testListener(t, dsn, "agentapp_runs")
	places := func(what string) map[string]linePos {
		t.Helper()
		select {
		case n := <-heard:
			_, rest, _ := strings.Cut(n.Extra, " ")
			got := map[string]linePos{}
			for _, entry := range strings.Fields(rest) {
				ws, at := parsePlace(entry)
				got[ws] = at
			}
			return got
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: not announced within 5 s", what)
			return nil
		}
	}
	at := func(id string) linePos {
		var p linePos
		if err := db.QueryRow(`SELECT priority, run_at FROM runs WHERE id = $1`, id).Scan(&p.priority, &p.runAt); err != nil {
			t.Fatal(err)
		}
		return p
	}

	var run runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "echo", "priority": 3}, 201, &run)
	if got, want := places("a new run"), at(run.ID); len(got) != 1 || !got[ws.ID].runAt.Equal(want.runAt) || got[ws.ID].priority != want.priority {
		t.Errorf("the announcement of a new run: got %v; want {%s: %v}", got, ws.ID, want)
	}

	if _, err := db.Exec(`UPDATE runs SET status = 'running', run_at = now() - interval '1 hour' WHERE id = $1`, run.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE runs SET status = 'queued' WHERE id = $1`, run.ID); err != nil {
		t.Fatal(err)
	}
	if got, want := places("a run queued again"), at(run.ID); len(got) != 1 || !got[ws.ID].runAt.Equal(want.runAt) || got[ws.ID].priority != want.priority {
		t.Errorf("the trigger's notification of a run queued again: got %v; want {%s: %v}", got, ws.ID, want)
	}
}
