package main

// Upgrades (SPEC "Upgrades"): a database left by the previous release — its schema is
// testdata/schema-v1.sql, exactly what that release applied — is upgraded in place when
// the new binary starts, and everything in it keeps working. Helpers local to this file
// start with up.

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
)

// upFutureDelay is how far after the fill the previous release's scheduled run falls due:
// long enough for the new binary (built with -race, on a loaded machine) to start and run
// the due runs first, so that the test sees the scheduled one still waiting.
const upFutureDelay = 12 * time.Second

// upMadeBy empties db's public schema and applies an earlier release's schema to it, as
// that release would have made the database.
func upMadeBy(t testing.TB, db *sql.DB, version string) {
	t.Helper()
	if _, err := db.Exec(`DROP SCHEMA public CASCADE; CREATE SCHEMA public`); err != nil {
		t.Fatal(err)
	}
	if err := upApply(db, upRelease(t, version)); err != nil {
		t.Fatalf("apply testdata/schema-%s.sql to an empty database: got %v; want it applied", version, err)
	}
}

// upRelease is an earlier release's schema: "v1" the one before scheduling, "v2" the last.
func upRelease(t testing.TB, version string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/schema-" + version + ".sql")
	if err != nil {
		t.Fatalf("read testdata/schema-%s.sql: got %v; want that release's schema", version, err)
	}
	return string(b)
}

// upApply applies a schema as agentapp's applySchema does (the previous release did the
// same): in one transaction under the advisory lock.
func upApply(db *sql.DB, schema string) error {
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(7346298105)`); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, schema); err != nil {
		return err
	}
	return tx.Commit()
}

// upOldHash is the request hash the previous release stored with an Idempotency-Key:
// sha256 of agent, max_attempts and the compacted input.
func upOldHash(agent string, maxAttempts int, input string) []byte {
	h := sha256.Sum256(fmt.Appendf(nil, "%s\x00%d\x00%s", agent, maxAttempts, input))
	return h[:]
}

// upRows is every row of the three tables as JSON text, one line per row in id order,
// with the columns both releases have (due names the column: run_after before the
// upgrade, run_at after it). Equal snapshots mean no row, key or setting changed.
func upRows(t testing.TB, db *sql.DB, due string) map[string]string {
	t.Helper()
	rows, err := db.Query(`
		SELECT 'workspace', id::text, json_build_array(name, encode(api_key_hash, 'hex'), created_at)::text FROM workspaces
		UNION ALL
		SELECT 'agent', id::text, json_build_array(workspace_id, name, kind, config, created_at)::text FROM agents
		UNION ALL
		SELECT 'run', id::text, json_build_array(seq, workspace_id, agent_id, status, input, output, error, errors,
			attempt, max_attempts, ` + due + `, worker_id, lease_expires_at, cancel_requested, idempotency_key,
			encode(request_hash, 'hex'), created_at, started_at, finished_at, updated_at)::text FROM runs`)
	if err != nil {
		t.Fatalf("snapshot rows: got %v; want them read", err)
	}
	defer rows.Close()
	snap := map[string]string{}
	for rows.Next() {
		var kind, id, row string
		if err := rows.Scan(&kind, &id, &row); err != nil {
			t.Fatal(err)
		}
		snap[kind+" "+id] = row
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return snap
}

// upSchema is the shape of the schema: every column with its type, default and
// nullability, every index, constraint, function and trigger, one entry each.
func upSchema(t testing.TB, db *sql.DB) map[string]string {
	t.Helper()
	var s string
	err := db.QueryRow(`SELECT string_agg(x, E'\n' ORDER BY x) FROM (
		SELECT format('column %s.%s %s %s %s', table_name, column_name, data_type, is_nullable, column_default) AS x
		FROM information_schema.columns WHERE table_schema = 'public'
		UNION ALL SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
		UNION ALL SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
			WHERE connamespace = 'public'::regnamespace
		UNION ALL SELECT format('function %s %s', proname, md5(prosrc)) FROM pg_proc
			WHERE pronamespace = 'public'::regnamespace
		UNION ALL SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal) s`).Scan(&s)
	if err != nil {
		t.Fatalf("read the schema: got %v; want it read", err)
	}
	shape := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		shape[line] = "present"
	}
	return shape
}

// upDiff lists the rows that differ between two snapshots, but for those named in skip.
func upDiff(before, after map[string]string, skip ...string) []string {
	skipped := map[string]bool{}
	for _, k := range skip {
		skipped[k] = true
	}
	var diff []string
	for k, v := range before {
		if !skipped[k] && after[k] != v {
			diff = append(diff, fmt.Sprintf("%s: got %s; want %s", k, after[k], v))
		}
	}
	for k, v := range after {
		if _, ok := before[k]; !ok && !skipped[k] {
			diff = append(diff, fmt.Sprintf("%s: got %s; want no such row", k, v))
		}
	}
	return diff
}

// upFixture is what the previous release left in the database.
type upFixture struct {
	ws1, ws2                   testWorkspace
	due, future, hookDue       string // queued runs: due now, due after upFutureDelay, a webhook's
	running, succeeded, failed string
	canceled, unsorted, zoned  string
	futureAt                   time.Time
}

// upFill fills a database that has the previous release's schema, through SQL and with
// that release's columns only: two workspaces with keys, an echo and a webhook agent, runs
// in every status, and two runs created with an Idempotency-Key.
func upFill(t testing.TB, db *sql.DB, hookURL string) upFixture {
	t.Helper()
	f := upFixture{
		ws1: testWorkspace{APIKey: "ak_upgrade_key_one_0123456789"},
		ws2: testWorkspace{APIKey: "ak_upgrade_key_two_0123456789"},
	}
	one := func(query string, args ...any) string {
		t.Helper()
		var id string
		if err := db.QueryRow(query, args...).Scan(&id); err != nil {
			t.Fatalf("fill %q: got %v; want a row", query, err)
		}
		return id
	}
	for _, ws := range []*testWorkspace{&f.ws1, &f.ws2} {
		h := sha256.Sum256([]byte(ws.APIKey))
		ws.ID = one(`INSERT INTO workspaces (name, api_key_hash) VALUES ('before the upgrade', $1) RETURNING id`, h[:])
	}
	echo := one(`INSERT INTO agents (workspace_id, name, kind, config) VALUES ($1, 'echo', 'echo', '{}') RETURNING id`, f.ws1.ID)
	hook := one(`INSERT INTO agents (workspace_id, name, kind, config) VALUES ($1, 'hook', 'webhook', $2) RETURNING id`,
		f.ws2.ID, fmt.Sprintf(`{"url": %q, "timeout_ms": 10000}`, hookURL))

	insert := `INSERT INTO runs (workspace_id, agent_id, status, input, output, error, errors, attempt, max_attempts,
		run_after, worker_id, lease_expires_at, idempotency_key, request_hash, started_at, finished_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING id`
	now := time.Now()
	past := now.Add(-time.Hour)
	f.due = one(insert, f.ws1.ID, echo, "queued", `{"n":1}`, nil, nil, `[]`, 0, 3, past, nil, nil,
		"order-42", upOldHash("echo", 3, `{"n":1}`), nil, nil)
	f.futureAt = now.Add(upFutureDelay)
	f.future = one(insert, f.ws1.ID, echo, "queued", `{"n":2}`, nil, nil, `[]`, 0, 3, f.futureAt, nil, nil, nil, nil, nil, nil)
	f.hookDue = one(insert, f.ws2.ID, hook, "queued", `{"n":3}`, nil, nil, `[]`, 0, 5, past, nil, nil, nil, nil, nil, nil)
	// A lease far ahead: a live process of the previous release holds it; nobody may touch it.
	f.running = one(insert, f.ws1.ID, echo, "running", `{"n":4}`, nil, nil, `[]`, 1, 3, past,
		"oldhost/4242/0badcafe", now.Add(time.Hour), nil, nil, past, nil)
	f.succeeded = one(insert, f.ws2.ID, hook, "succeeded", `{"n":5}`, `{"answer":42}`, nil, `[]`, 1, 3, past, nil, nil,
		nil, nil, past, past)
	// errors[].at as the previous release wrote them: jsonb_build_object('at', now()).
	f.failed = one(insert, f.ws1.ID, echo, "failed", `{"n":6}`, nil, "boom 3",
		`[{"attempt":1,"at":"2024-05-01T12:00:00.123456+00:00","message":"boom 1"},
		  {"attempt":2,"at":"2024-05-01T12:00:01.5+00:00","message":"boom 2"},
		  {"attempt":3,"at":"2024-05-01T12:00:03+00:00","message":"boom 3"}]`, 3, 3, past, nil, nil, nil, nil, past, past)
	f.canceled = one(insert, f.ws2.ID, hook, "canceled", `{"n":7}`, nil, "canceled by request", `[]`, 0, 25, past,
		nil, nil, nil, nil, nil, past)
	// A server whose TimeZone was not UTC: jsonb_build_object wrote its offset.
	f.zoned = one(insert, f.ws1.ID, echo, "failed", `{"n":8}`, nil, "boom",
		`[{"attempt":1,"at":"2024-05-01T14:00:00.25+02:00","message":"boom"}]`, 1, 1, past, nil, nil, nil, nil, past, past)
	// An input whose keys are not in sorted order, as its client sent it (compacted).
	f.unsorted = one(insert, f.ws2.ID, hook, "succeeded", `{"b":1,"a":2}`, `{}`, nil, `[]`, 1, 3, past, nil, nil,
		"order-43", upOldHash("hook", 3, `{"b":1,"a":2}`), past, past)
	return f
}

// upEnv is what the tests' environment (testEnv) changes for the new binary on the
// upgraded database.
var upEnv = map[string]string{"RUN_WORKER_EMBEDDED": "true", "LOG_LEVEL": "info"}

// TestUpgradeFromPreviousRelease: the new binary starts on a database the previous release
// made and filled; every row is intact, keys authenticate, an Idempotency-Key still returns
// its run, old errors answer in the API's form, queued runs execute (the scheduled one at
// its time), the new columns have their defaults, and a second start changes nothing.
func TestUpgradeFromPreviousRelease(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	// testDB applied today's schema: start from the empty database the previous release met.
	upMadeBy(t, db, "v1")
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"from":"hook"}`)
	}))
	t.Cleanup(hook.Close)
	f := upFill(t, db, hook.URL)
	before := upRows(t, db, "run_after")

	p := startProc(t, testEnv(t, dsn, upEnv))
	a := p.app()

	// The queued runs that were due execute; the scheduled one waits for its time.
	run := a.waitRunStatus(t, f.ws1, f.due, "succeeded", 60*time.Second)
	if string(run.Output) != `{"n":1}` || run.Attempt != 1 {
		t.Errorf("due run: got output %s on attempt %d; want {\"n\":1} on attempt 1", run.Output, run.Attempt)
	}
	run = a.waitRunStatus(t, f.ws2, f.hookDue, "succeeded", 60*time.Second)
	if string(run.Output) != `{"from":"hook"}` || run.MaxAttempts != 5 {
		t.Errorf("due webhook run: got output %s, max_attempts %d; want {\"from\":\"hook\"}, 5", run.Output, run.MaxAttempts)
	}
	if time.Now().Before(f.futureAt.Add(-time.Second)) {
		if got := a.getRun(t, f.ws1, f.future).Status; got != statusQueued {
			t.Errorf("scheduled run before its time: got %q; want queued", got)
		}
	} else {
		t.Logf("the binary took until after the scheduled run's time to run the due ones: not checking that it waited")
	}

	// Every other row is exactly as the previous release left it.
	after := upRows(t, db, "run_at")
	for _, d := range upDiff(before, after, "run "+f.due, "run "+f.hookDue, "run "+f.future) {
		t.Errorf("after the upgrade: %s", d)
	}

	// The keys authenticate, each for its own workspace only.
	a.mustDo(t, "GET", "/v1/workspaces/"+f.ws1.ID, f.ws1.APIKey, nil, 200, nil)
	a.mustDo(t, "GET", "/v1/workspaces/"+f.ws2.ID, f.ws2.APIKey, nil, 200, nil)
	a.mustDo(t, "GET", "/v1/workspaces/"+f.ws1.ID, f.ws2.APIKey, nil, 404, nil)

	// An Idempotency-Key used before the upgrade returns its run on a repeat, whatever
	// the order of the input's keys was (the previous release hashed the input as sent).
	for _, c := range []struct {
		name          string
		ws            testWorkspace
		key, body, id string
	}{
		{"idempotency key", f.ws1, "order-42", `{"agent":"echo","input":{"n":1}}`, f.due},
		{"idempotency key, input keys unsorted", f.ws2, "order-43", `{"agent":"hook","input":{"b":1,"a":2}}`, f.unsorted},
	} {
		t.Run(c.name, func(t *testing.T) {
			status, _, body := a.do(t, "POST", "/v1/workspaces/"+c.ws.ID+"/runs", c.ws.APIKey,
				map[string]string{"Idempotency-Key": c.key}, c.body)
			var r runRecord
			json.Unmarshal(body, &r)
			if status != 200 || r.ID != c.id {
				t.Errorf("repeat with Idempotency-Key %s (%s): got %d %s; want 200 with run %s", c.key, c.body, status, body, c.id)
			}
		})
	}

	// errors[].at written as "+00:00" (or another offset) answer in UTC ending in Z, the
	// same instants.
	for _, c := range []struct {
		name, id string
		want     []string
	}{
		{"errors at", f.failed, []string{"2024-05-01T12:00:00.123456Z", "2024-05-01T12:00:01.5Z", "2024-05-01T12:00:03Z"}},
		{"errors at, another time zone", f.zoned, []string{"2024-05-01T12:00:00.25Z"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			run := a.getRun(t, f.ws1, c.id)
			var errs []struct {
				Attempt int    `json:"attempt"`
				At      string `json:"at"`
				Message string `json:"message"`
			}
			if err := json.Unmarshal(run.Errors, &errs); err != nil || len(errs) != len(c.want) {
				t.Fatalf("errors: got %s (%v); want %d entries", run.Errors, err, len(c.want))
			}
			for i, want := range c.want {
				if errs[i].At != want || errs[i].Attempt != i+1 {
					t.Errorf("errors[%d]: got %+v; want attempt %d at %s", i, errs[i], i+1, want)
				}
			}
		})
	}
	run = a.getRun(t, f.ws1, f.failed)
	if run.Status != statusFailed || run.Error == nil || *run.Error != "boom 3" || run.Attempt != 3 {
		t.Errorf("failed run: got %s, error %v, attempt %d; want failed, boom 3, attempt 3", run.Status, run.Error, run.Attempt)
	}

	// The new columns have their defaults on the old rows.
	var wrong int
	if err := db.QueryRow(`SELECT
		(SELECT count(*) FROM runs WHERE priority <> 0 OR timeout_ms IS NOT NULL OR schedule_id IS NOT NULL OR scheduled_for IS NOT NULL) +
		(SELECT count(*) FROM agents WHERE max_concurrency IS NOT NULL OR paused)`).Scan(&wrong); err != nil {
		t.Fatal(err)
	}
	if wrong != 0 {
		t.Errorf("old rows without the new columns' defaults (priority 0, timeout_ms, schedule_id and scheduled_for null, max_concurrency null, paused false): got %d; want 0", wrong)
	}
	// … and the API shows them so.
	for _, ws := range []testWorkspace{f.ws1, f.ws2} {
		var list struct{ Agents []agentJSON }
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, nil, 200, &list)
		if len(list.Agents) != 1 {
			t.Errorf("agents of a workspace from before the upgrade: got %d; want 1", len(list.Agents))
		}
		for _, ag := range list.Agents {
			if ag.MaxConcurrency != nil || ag.Paused == nil || *ag.Paused {
				t.Errorf("agent %s from before the upgrade: got max_concurrency %v, paused %v; want null, false", ag.Name, ag.MaxConcurrency, ag.Paused)
			}
		}
	}
	if run := a.getRun(t, f.ws2, f.canceled); run.Priority != 0 || run.TimeoutMS != nil || run.Schedule != nil || run.ScheduledFor != nil {
		t.Errorf("run from before the upgrade: got priority %d, timeout_ms %v, schedule %v, scheduled_for %v; want 0, null, null, null",
			run.Priority, run.TimeoutMS, run.Schedule, run.ScheduledFor)
	}

	// The scheduled run executes once its time has come, not before.
	run = a.waitRunStatus(t, f.ws1, f.future, "succeeded", upFutureDelay+60*time.Second)
	if run.StartedAt == nil || run.StartedAt.Before(f.futureAt.Add(-50*time.Millisecond)) {
		t.Errorf("scheduled run: got started_at %v; want at or after its run_after %v", run.StartedAt, f.futureAt)
	}

	// A second start applies the schema again and changes nothing.
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("first start after SIGTERM: got exit %d; want 0", code)
	}
	upgraded, schema := upRows(t, db, "run_at"), upSchema(t, db)
	p = startProc(t, testEnv(t, dsn, upEnv))
	p.app().mustDo(t, "GET", "/v1/workspaces/"+f.ws1.ID, f.ws1.APIKey, nil, 200, nil)
	for _, d := range upDiff(upgraded, upRows(t, db, "run_at")) {
		t.Errorf("after a second start: %s", d)
	}
	for _, d := range upDiff(schema, upSchema(t, db)) {
		t.Errorf("schema after a second start: %s", d)
	}
}

// TestUpgradeThenOlderBinary: the previous release's schema applied again to an upgraded
// database (an older binary starting) changes no row; the new binary started after it
// restores its own schema and executes runs.
func TestUpgradeThenOlderBinary(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	upMadeBy(t, db, "v1")
	f := upFill(t, db, "http://127.0.0.1:1/unused")
	env := testEnv(t, dsn, upEnv)
	if code := startProc(t, env, "migrate").wait(t, 60*time.Second); code != 0 {
		t.Fatalf("agentapp migrate on the previous release's database: got exit %d; want 0", code)
	}
	upgraded, schema := upRows(t, db, "run_at"), upSchema(t, db)

	// The previous release does not refuse: its schema applies, creates its claim index
	// again and replaces the update trigger's function with its own, which reads
	// run_after. Rows are untouched; until a new binary starts again, putting a run back
	// to queued fails (shown here in a transaction rolled back).
	err := upApply(db, upRelease(t, "v1"))
	t.Logf("the previous release's schema applied to the upgraded database: error %v", err)
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	_, err = tx.Exec(`UPDATE runs SET status = 'queued', finished_at = NULL WHERE id = $1`, f.canceled)
	tx.Rollback()
	t.Logf("meanwhile a run put back to queued: error %v", err)
	for _, d := range upDiff(upgraded, upRows(t, db, "run_at")) {
		t.Errorf("after the previous release's schema: %s", d)
	}

	if code := startProc(t, env, "migrate").wait(t, 60*time.Second); code != 0 {
		t.Fatalf("agentapp migrate after the previous release's schema: got exit %d; want 0", code)
	}
	for _, d := range upDiff(schema, upSchema(t, db)) {
		t.Errorf("schema after the new binary started again: %s", d)
	}
	for _, d := range upDiff(upgraded, upRows(t, db, "run_at")) {
		t.Errorf("after the new binary started again: %s", d)
	}
	a := startProc(t, env).app()
	run := a.createRun(t, f.ws1, "echo", map[string]int{"n": 8})
	a.waitRunStatus(t, f.ws1, run.ID, "succeeded", 60*time.Second)
	a.waitRunStatus(t, f.ws1, f.due, "succeeded", 60*time.Second)
}

// TestUpgradeFromLastRelease: a database made and filled by the release before this one
// (testdata/schema-v2.sql: row triggers that notified per row, the workspace-leading
// listing index, random run ids) gets, once the new binary has migrated it, exactly the
// schema a new database gets; its rows and counters are intact, its queued run executes,
// and a long poll on a run created now answers as soon as the run is final.
func TestUpgradeFromLastRelease(t *testing.T) {
	t.Parallel()
	fresh := upSchema(t, openTestDB(t, testDB(t)))
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	upMadeBy(t, db, "v2")
	ws := testWorkspace{APIKey: "ak_upgrade_key_last_0123456789"}
	h := sha256.Sum256([]byte(ws.APIKey))
	var queued string
	err := db.QueryRow(`WITH w AS (INSERT INTO workspaces (name, api_key_hash) VALUES ('last release', $1) RETURNING id),
		a AS (INSERT INTO agents (workspace_id, name, kind) SELECT id, 'echo', 'echo' FROM w RETURNING id, workspace_id),
		done AS (INSERT INTO runs (workspace_id, agent_id, status, input, output, attempt, started_at, finished_at)
		         SELECT workspace_id, id, 'succeeded', '1', '1', 1, now(), now() FROM a)
		INSERT INTO runs (workspace_id, agent_id, input) SELECT workspace_id, id, '{"n":2}' FROM a
		RETURNING workspace_id, id`, h[:]).Scan(&ws.ID, &queued)
	if err != nil {
		t.Fatalf("fill the last release's database: %v", err)
	}
	env := testEnv(t, dsn, upEnv)
	if code := startProc(t, env, "migrate").wait(t, 60*time.Second); code != 0 {
		t.Fatalf("agentapp migrate on the last release's database: got exit %d; want 0", code)
	}
	for _, d := range upDiff(fresh, upSchema(t, db)) {
		t.Errorf("upgraded schema against a new database's: %s", d)
	}
	// The last release counted the queued run as 'queued', not 'active': a page, which
	// reads a status's range only as far as the counters allow, still finds it.
	var listed []string
	if err := db.QueryRow(`SELECT array_agg(status ORDER BY status) FROM agentapp_runs_page(ARRAY[$1::uuid],
		'{queued,running,succeeded,failed,canceled}', '', $2, 50)`, ws.ID, int64(newestFirst)).Scan((*pq.StringArray)(&listed)); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(listed, []string{"queued", "succeeded"}) {
		t.Errorf("a page of the upgraded workspace: got runs %v; want one queued and one succeeded", listed)
	}

	a := startProc(t, env).app()
	if done := a.waitRunStatus(t, ws, queued, "succeeded", 60*time.Second); done.Step != 1 || done.ParentID != nil ||
		done.State != nil && string(done.State) != "null" || done.WaitingFor != nil && string(done.WaitingFor) != "null" {
		t.Errorf("the run queued before the upgrade: got step %d state %s waiting_for %s parent %v; want step 1 and no state, wait or parent",
			done.Step, done.State, done.WaitingFor, done.ParentID)
	}
	// Due a second from now, so that the long poll is waiting when the run ends: it can
	// only answer early through the new status notifications.
	var run runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
		map[string]any{"agent": "echo", "input": "after the upgrade", "delay_ms": 1000}, 201, &run)
	var got runRecord
	began := time.Now()
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+run.ID+"?wait_ms=30000", ws.APIKey, nil, 200, &got)
	if took := time.Since(began); got.Status != statusSucceeded || took < 900*time.Millisecond || took > 10*time.Second {
		t.Errorf("?wait_ms=30000 on a run due 1 s after the upgrade: got %q after %v; want succeeded once it ran, after about 1 s", got.Status, took)
	}
	var stats runStats
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/stats", ws.APIKey, nil, 200, &stats)
	if stats.Succeeded != 3 || stats.Queued+stats.Running+stats.Failed+stats.Canceled != 0 {
		t.Errorf("stats after the upgrade: got %+v; want 3 succeeded and nothing else", stats)
	}
}

// TestMigrationsRecorded: each migration is applied once and recorded with its time, on
// an upgraded database as on a new one; a database that a newer release migrated is
// refused at start with a message that says so, and left as it was.
func TestMigrationsRecorded(t *testing.T) {
	t.Parallel()
	versions := func(db *sql.DB) string {
		t.Helper()
		var s string
		err := db.QueryRow(`SELECT coalesce(string_agg(version || ':' || (applied_at IS NOT NULL), ' ' ORDER BY version), '')
			FROM schema_migrations`).Scan(&s)
		if err != nil {
			t.Fatalf("read schema_migrations: got %v; want its rows", err)
		}
		return s
	}
	var want []string
	for _, m := range migrations {
		want = append(want, fmt.Sprintf("%d:true", m.version))
	}

	fresh := openTestDB(t, testDB(t))
	if got := versions(fresh); got != strings.Join(want, " ") {
		t.Errorf("a new database: got migrations %q; want %q", got, strings.Join(want, " "))
	}

	dsn := testDB(t)
	db := openTestDB(t, dsn)
	upMadeBy(t, db, "v2")
	env := testEnv(t, dsn, upEnv)
	for i := range 2 {
		if code := startProc(t, env, "migrate").wait(t, 60*time.Second); code != 0 {
			t.Fatalf("agentapp migrate (start %d): got exit %d; want 0", i+1, code)
		}
		if got := versions(db); got != strings.Join(want, " ") {
			t.Errorf("the last release's database after start %d: got migrations %q; want %q", i+1, got, strings.Join(want, " "))
		}
	}

	newer := migrations[len(migrations)-1].version + 1
	if _, err := db.Exec(`INSERT INTO schema_migrations (version, name) VALUES ($1, 'a later release')`, newer); err != nil {
		t.Fatal(err)
	}
	schema := upSchema(t, db)
	p := startProc(t, env, "migrate")
	if code := p.wait(t, 60*time.Second); code == 0 {
		t.Errorf("agentapp migrate on a database a newer release migrated: got exit 0; want a refusal")
	}
	if msg := fmt.Sprintf("migration %d; this binary knows up to %d", newer, newer-1); !strings.Contains(p.log.String(), msg) {
		t.Errorf("the refusal: got log %q; want it to contain %q", p.log.String(), msg)
	}
	for _, d := range upDiff(schema, upSchema(t, db)) {
		t.Errorf("after the refused start: %s", d)
	}
}

// TestUpgradeSignsWebhookAgents: the webhook agents of the last release's database get a
// signing secret each at the upgrade, and their queued runs are delivered signed with it,
// with the run's id as the trace id (they were created without one), as the run's JSON
// shows; a rotation then answers a new secret.
func TestUpgradeSignsWebhookAgents(t *testing.T) {
	t.Parallel()
	srv, log := newDeliveryServer(t)
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	upMadeBy(t, db, "v2")
	ws := testWorkspace{APIKey: "ak_upgrade_key_signed_0123456789"}
	h := sha256.Sum256([]byte(ws.APIKey))
	var runIDs pq.StringArray
	err := db.QueryRow(`WITH w AS (INSERT INTO workspaces (name, api_key_hash) VALUES ('signed', $1) RETURNING id),
		a AS (INSERT INTO agents (workspace_id, name, kind, config)
		      SELECT id, n, 'webhook', jsonb_build_object('url', $2::text || '/' || n) FROM w, unnest('{one,two}'::text[]) n
		      RETURNING id, workspace_id),
		r AS (INSERT INTO runs (workspace_id, agent_id, input) SELECT workspace_id, id, '{}' FROM a RETURNING id)
		SELECT (SELECT id FROM w), array_agg(id) FROM r`, h[:], srv.URL).Scan(&ws.ID, &runIDs)
	if err != nil {
		t.Fatalf("fill the last release's database: %v", err)
	}
	env := testEnv(t, dsn, upEnv)
	env["AGENT_WEBHOOK_ALLOWED_HOSTS"] = strings.TrimPrefix(srv.URL, "http://")
	a := startProc(t, env).app()
	secrets := map[string]string{}
	rows, err := db.Query(`SELECT name, signing_secret FROM agents`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var name string
		var secret sql.NullString
		if err := rows.Scan(&name, &secret); err != nil {
			t.Fatal(err)
		}
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret.String, "whsec_"))
		if !strings.HasPrefix(secret.String, "whsec_") || err != nil || len(key) < 24 {
			t.Errorf("signing_secret of upgraded agent %s: got %q; want whsec_ and the base64 of 24 bytes or more", name, secret.String)
		}
		secrets[name] = secret.String
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(secrets) != 2 || secrets["one"] == secrets["two"] {
		t.Fatalf("secrets of the upgraded agents: got %v; want two, different", secrets)
	}
	for _, id := range runIDs {
		got := a.waitRunStatus(t, ws, id, "succeeded", 60*time.Second)
		if want := strings.ReplaceAll(id, "-", ""); got.TraceID != want {
			t.Errorf("trace_id of a run queued before the upgrade: got %q; want its id, %s", got.TraceID, want)
		}
	}
	for name, secret := range secrets {
		ds := log.of("/" + name)
		if len(ds) != 1 {
			t.Fatalf("deliveries to agent %s: got %d; want 1", name, len(ds))
		}
		if err := swVerify(secret, ds[0].header, ds[0].body, ds[0].at); err != nil {
			t.Errorf("delivery of upgraded agent %s: got %v; want verified with the secret the upgrade gave it", name, err)
		}
		var body struct {
			RunID string `json:"run_id"`
		}
		json.Unmarshal(ds[0].body, &body)
		if traceID, _ := traceparentOf(t, ds[0]); traceID != strings.ReplaceAll(body.RunID, "-", "") {
			t.Errorf("traceparent of a run queued before the upgrade: got trace id %s; want its run id %s", traceID, body.RunID)
		}
	}
	var rotated agent
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents/one/rotate-secret", ws.APIKey, nil, 200, &rotated)
	if rotated.SigningSecret == "" || rotated.SigningSecret == secrets["one"] {
		t.Errorf("rotate-secret of an upgraded agent: got %q; want a new secret", rotated.SigningSecret)
	}
}

// TestUpgradeFromV3: a database made and filled by the release of 2026-12-07
// (testdata/schema-v3.sql, migrations 1 … 6) gets migration 7 and then exactly the schema
// a new database gets; its agent shows the default key and rate fields, its queued run
// executes with cost 1 and no key, and the agent then takes a key limit and a rate limit
// that its new keyed runs obey.
func TestUpgradeFromV3(t *testing.T) {
	t.Parallel()
	fresh := upSchema(t, openTestDB(t, testDB(t)))
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	upMadeBy(t, db, "v3")
	ws := testWorkspace{APIKey: "ak_upgrade_key_v3_0123456789ab"}
	h := sha256.Sum256([]byte(ws.APIKey))
	var queued string
	err := db.QueryRow(`WITH w AS (INSERT INTO workspaces (name, api_key_hash) VALUES ('v3', $1) RETURNING id),
		a AS (INSERT INTO agents (workspace_id, name, kind, max_concurrency, retry_base_ms)
		      SELECT id, 'echo', 'echo', 2, 100 FROM w RETURNING id, workspace_id)
		INSERT INTO runs (workspace_id, agent_id, input, priority) SELECT workspace_id, id, '{"n":1}', 3 FROM a
		RETURNING workspace_id, id`, h[:]).Scan(&ws.ID, &queued)
	if err != nil {
		t.Fatalf("fill the v3 database: %v", err)
	}
	env := testEnv(t, dsn, upEnv)
	if code := startProc(t, env, "migrate").wait(t, 60*time.Second); code != 0 {
		t.Fatalf("agentapp migrate on the v3 database: got exit %d; want 0", code)
	}
	for _, d := range upDiff(fresh, upSchema(t, db)) {
		t.Errorf("upgraded schema against a new database's: %s", d)
	}
	a := startProc(t, env).app()
	ag := scAgent(t, a, ws, "echo")
	if *ag.MaxConcurrency != 2 || ag.Retry.BaseMS != 100 || *ag.KeyConcurrency != 1 || *ag.OnKeyConflict != "queue" || ag.RateLimit != nil {
		t.Errorf("the v3 agent after the upgrade: got max_concurrency %v, retry %+v, key_concurrency %v, on_key_conflict %v, rate_limit %+v; want 2, base_ms 100, 1, queue, null",
			*ag.MaxConcurrency, *ag.Retry, *ag.KeyConcurrency, *ag.OnKeyConflict, ag.RateLimit)
	}
	r := a.waitRunStatus(t, ws, queued, "succeeded", 60*time.Second)
	if r.Cost != 1 || r.ConcurrencyKey != nil || r.Priority != 3 {
		t.Errorf("the v3 run after the upgrade: got cost %d, concurrency_key %v, priority %d; want 1, null, 3", r.Cost, r.ConcurrencyKey, r.Priority)
	}
	mustAgent(t, a, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/echo", ws.APIKey,
		`{"on_key_conflict":"reject","rate_limit":{"limit":5,"period_ms":1000}}`, 200)
	var keyed runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
		map[string]any{"agent": "echo", "concurrency_key": "c", "cost": 5, "delay_ms": 60000}, 201, &keyed)
	status, hdr, data := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, nil,
		map[string]any{"agent": "echo", "concurrency_key": "c"})
	checkAPIError(t, "a second run of a busy key under reject", status, hdr, data, 409, "key_busy")
	status, hdr, data = a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, nil,
		map[string]any{"agent": "echo", "cost": 6})
	checkAPIError(t, "a cost over the rate limit", status, hdr, data, 422, "invalid")
}
