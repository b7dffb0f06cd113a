package main

import (
	"database/sql"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// scheduleOut is a schedule as the API answers it.
type scheduleOut struct {
	Name        string     `json:"name"`
	Cron        string     `json:"cron"`
	Timezone    string     `json:"timezone"`
	Agent       string     `json:"agent"`
	Priority    int        `json:"priority"`
	TimeoutMS   *int       `json:"timeout_ms"`
	MaxAttempts int        `json:"max_attempts"`
	Paused      bool       `json:"paused"`
	NextAt      *time.Time `json:"next_at"`
	LastAt      *time.Time `json:"last_at"`
	CreatedAt   time.Time  `json:"created_at"`
}

// scheduledRuns are the due times that made runs of the schedule called name, in order,
// read from the runs table.
func scheduledRuns(t testing.TB, db *sql.DB, name string) []time.Time {
	t.Helper()
	rows, err := db.Query(`SELECT r.scheduled_for FROM runs r JOIN schedules s ON s.id = r.schedule_id
		WHERE s.name = $1 ORDER BY r.scheduled_for`, name)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []time.Time
	for rows.Next() {
		var at time.Time
		if err := rows.Scan(&at); err != nil {
			t.Fatal(err)
		}
		out = append(out, at.UTC())
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestScheduleAPI: a schedule's life through the API — create, read, list, change, pause,
// delete — the runs it makes (with schedule and scheduled_for, listed by ?schedule=), and
// every refusal SPEC names.
func TestScheduleAPI(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "LOG_LEVEL": "info"}))
	ws := a.createWorkspace(t)
	base := "/v1/workspaces/" + ws.ID + "/schedules"

	var sc scheduleOut
	a.mustDo(t, "POST", base, ws.APIKey, map[string]any{"name": "tick", "cron": "@every 1s", "agent": "echo",
		"input": map[string]any{"x": 1}, "priority": 2, "timeout_ms": 5000, "max_attempts": 4}, 201, &sc)
	if sc.Timezone != "UTC" || sc.Priority != 2 || sc.MaxAttempts != 4 || sc.TimeoutMS == nil || *sc.TimeoutMS != 5000 ||
		sc.NextAt == nil || sc.LastAt != nil || sc.Paused {
		t.Errorf("created: got %+v; want timezone UTC, priority 2, max_attempts 4, timeout 5000, next_at set, last_at null", sc)
	}
	if d := time.Until(*sc.NextAt); d <= 0 || d > time.Second+100*time.Millisecond {
		t.Errorf("next_at of @every 1s: got %v from now; want within the next second", d)
	}

	// Runs arrive, one per due time, with the schedule's fields.
	var runs struct{ Runs []runRecord }
	eventually(t, 10*time.Second, "two runs of the schedule", func() bool {
		a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?schedule=tick", ws.APIKey, nil, 200, &runs)
		return len(runs.Runs) >= 2
	})
	for _, r := range runs.Runs {
		if r.Schedule == nil || *r.Schedule != "tick" || r.ScheduledFor == nil || r.Priority != 2 || r.MaxAttempts != 4 ||
			r.TimeoutMS == nil || string(r.Input) != `{"x":1}` {
			t.Errorf("scheduled run: got schedule %v scheduled_for %v priority %d max_attempts %d input %s; want tick, a time, 2, 4, {\"x\":1}",
				r.Schedule, r.ScheduledFor, r.Priority, r.MaxAttempts, r.Input)
		}
	}
	// Pages of a schedule's runs, newest first.
	var page1, page2 struct {
		Runs       []runRecord
		NextCursor *string `json:"next_cursor"`
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?schedule=tick&limit=1", ws.APIKey, nil, 200, &page1)
	if len(page1.Runs) != 1 || page1.NextCursor == nil {
		t.Fatalf("first page of limit 1: got %d runs, next_cursor %v; want 1 and a cursor", len(page1.Runs), page1.NextCursor)
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?schedule=tick&limit=1&cursor="+*page1.NextCursor, ws.APIKey, nil, 200, &page2)
	if len(page2.Runs) != 1 || !page2.Runs[0].ScheduledFor.Before(*page1.Runs[0].ScheduledFor) {
		t.Errorf("second page: got %d runs; want one due before the first page's (%s)", len(page2.Runs), page1.Runs[0].ScheduledFor)
	}
	a.createRun(t, ws, "echo", 1)
	var other struct{ Runs []runRecord }
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs?schedule=nope", ws.APIKey, nil, 200, &other)
	if len(other.Runs) != 0 {
		t.Errorf("?schedule=nope: got %d runs; want none", len(other.Runs))
	}
	a.mustDo(t, "GET", base+"/tick", ws.APIKey, nil, 200, &sc)
	if sc.LastAt == nil {
		t.Errorf("last_at after runs: got null; want the last due time")
	}

	// PATCH: pause makes none; changing the cron retimes it.
	a.mustDo(t, "PATCH", base+"/tick", ws.APIKey, map[string]any{"paused": true}, 200, &sc)
	if !sc.Paused || sc.NextAt != nil {
		t.Errorf("paused: got paused %v next_at %v; want true and null", sc.Paused, sc.NextAt)
	}
	time.Sleep(200 * time.Millisecond) // a firing under way when the pause committed ends
	before := len(scheduledRuns(t, db, "tick"))
	time.Sleep(2500 * time.Millisecond)
	if after := len(scheduledRuns(t, db, "tick")); after != before {
		t.Errorf("runs while paused: got %d more; want none", after-before)
	}
	a.mustDo(t, "PATCH", base+"/tick", ws.APIKey, map[string]any{"paused": false, "cron": "0 9 * * mon-fri",
		"timezone": "Europe/Berlin", "timeout_ms": nil}, 200, &sc)
	if sc.Paused || sc.NextAt == nil || sc.TimeoutMS != nil || sc.Cron != "0 9 * * mon-fri" {
		t.Errorf("patched: got %+v; want resumed, next_at set, timeout_ms null", sc)
	} else if at := sc.NextAt.In(mustZone(t, "Europe/Berlin")); at.Hour() != 9 || at.Minute() != 0 || at.Weekday() == time.Saturday || at.Weekday() == time.Sunday {
		t.Errorf("next_at of 0 9 * * mon-fri in Berlin: got %s; want 09:00 on a weekday", at)
	}

	var list struct{ Schedules []scheduleOut }
	a.mustDo(t, "POST", base, ws.APIKey, map[string]any{"name": "another", "cron": "@daily", "agent": "echo", "paused": true}, 201, nil)
	a.mustDo(t, "GET", base, ws.APIKey, nil, 200, &list)
	if len(list.Schedules) != 2 || list.Schedules[0].Name != "another" || list.Schedules[1].Name != "tick" {
		t.Errorf("list: got %+v; want another and tick", list.Schedules)
	}

	// Refusals.
	for _, c := range []struct {
		method, path string
		body         any
		status       int
		want         string
	}{
		{"POST", base, map[string]any{"name": "tick", "cron": "@daily", "agent": "echo"}, 409, "already exists"},
		{"PATCH", base + "/another", map[string]any{"name": "tick"}, 409, "already exists"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "colour": 1}, 400, "colour"},
		{"POST", base, map[string]any{"name": "x", "CRON": "@daily", "agent": "echo"}, 400, "CRON"},
		{"POST", base, map[string]any{"name": "x", "cron": "61 * * * *", "agent": "echo"}, 422, "minute field"},
		{"POST", base, map[string]any{"name": "x", "cron": "* * * *", "agent": "echo"}, 422, "five fields"},
		{"POST", base, map[string]any{"name": "x", "cron": "@every 10ms", "agent": "echo"}, 422, "out of range"},
		{"POST", base, map[string]any{"name": "x", "cron": "0 0 30 2 *", "agent": "echo"}, 422, "never fall due"},
		{"POST", base, map[string]any{"name": "x", "agent": "echo"}, 422, "cron is required"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "timezone": "Mars/Olympus"}, 422, "IANA"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "timezone": "Local"}, 422, "IANA"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "ghost"}, 422, "unknown agent"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily"}, 422, "agent is required"},
		{"POST", base, map[string]any{"name": "", "cron": "@daily", "agent": "echo"}, 422, "name must be"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "priority": 10}, 422, "priority"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "max_attempts": 0}, 422, "max_attempts"},
		{"POST", base, map[string]any{"name": "x", "cron": "@daily", "agent": "echo", "timeout_ms": 0}, 422, "timeout_ms"},
		{"PATCH", base + "/tick", map[string]any{"timezone": "Nowhere"}, 422, "IANA"},
		{"PATCH", base + "/tick", map[string]any{"cron": "@weekly x"}, 422, "is not one of"},
		{"PATCH", base + "/tick", map[string]any{"agent": "ghost"}, 422, "unknown agent"},
		{"PATCH", base + "/nope", map[string]any{"paused": true}, 404, "nope"},
		{"GET", base + "/nope", nil, 404, "nope"},
		{"DELETE", base + "/nope", nil, 404, "nope"},
	} {
		status, _, body := a.do(t, c.method, c.path, ws.APIKey, nil, c.body)
		if status != c.status || !strings.Contains(string(body), c.want) {
			t.Errorf("%s %s %v: got %d %s; want %d saying %q", c.method, c.path, c.body, status, body, c.status, c.want)
		}
	}

	// Another workspace does not see it.
	other2 := a.createWorkspace(t)
	if status, _, _ := a.do(t, "GET", base+"/tick", other2.APIKey, nil, nil); status != 404 {
		t.Errorf("another workspace's key: got %d; want 404", status)
	}

	// DELETE: 204, and its runs stay.
	made := len(scheduledRuns(t, db, "tick"))
	a.mustDo(t, "DELETE", base+"/tick", ws.APIKey, nil, 204, nil)
	var orphan runRecord
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+runs.Runs[0].ID, ws.APIKey, nil, 200, &orphan)
	if orphan.Schedule != nil || orphan.ScheduledFor == nil {
		t.Errorf("run of the deleted schedule: got schedule %v scheduled_for %v; want null and its due time", orphan.Schedule, orphan.ScheduledFor)
	}
	var kept int
	if err := db.QueryRow(`SELECT count(*) FROM runs WHERE scheduled_for IS NOT NULL
		AND NOT EXISTS (SELECT 1 FROM schedules s WHERE s.id = runs.schedule_id)`).Scan(&kept); err != nil {
		t.Fatal(err)
	}
	if kept != made {
		t.Errorf("runs of the deleted schedule: got %d; want %d kept", kept, made)
	}
	if n := a.metric(t, "agentapp_schedule_runs_total"); int(n) != made {
		t.Errorf("agentapp_schedule_runs_total: got %v; want %d", n, made)
	}
	if n := a.metric(t, "agentapp_schedule_lag_seconds_count"); int(n) != made {
		t.Errorf("agentapp_schedule_lag_seconds_count: got %v; want %d", n, made)
	}
}

// mustZone loads a time zone.
func mustZone(t testing.TB, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		t.Fatal(err)
	}
	return loc
}

// checkEverySecond fails the test unless the due times are whole seconds, each once, one
// second apart except across the gaps allowed (from, to: no due time strictly between).
func checkEverySecond(t testing.TB, dues []time.Time, gaps ...[2]time.Time) {
	t.Helper()
	for i, at := range dues {
		if !at.Equal(at.Truncate(time.Second)) {
			t.Errorf("scheduled_for %s: want a whole second", at)
		}
		if i == 0 {
			continue
		}
		switch d := at.Sub(dues[i-1]); {
		case d == 0:
			t.Errorf("scheduled_for %s: got two runs; want one", at)
		case d > time.Second:
			allowed := false
			for _, g := range gaps {
				allowed = allowed || !dues[i-1].Before(g[0]) && !at.After(g[1])
			}
			if !allowed {
				t.Errorf("scheduled_for: got a gap from %s to %s; want a run every second", dues[i-1], at)
			}
		}
	}
}

// TestScheduleAcrossProcesses: three processes fire an @every 1s schedule while one of them
// is SIGKILLed and started again: every due time makes exactly one run, with no gap.
func TestScheduleAcrossProcesses(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	env := func() map[string]string {
		return testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "LOG_LEVEL": "info"})
	}
	var procs []*proc
	for range 3 {
		procs = append(procs, startProc(t, env()))
	}
	a := procs[0].app()
	ws := a.createWorkspace(t)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/schedules", ws.APIKey,
		map[string]any{"name": "tick", "cron": "@every 1s", "agent": "echo"}, 201, nil)
	time.Sleep(3 * time.Second)
	procs[1].signal(t, syscall.SIGKILL)
	procs[1].wait(t, 10*time.Second)
	time.Sleep(3 * time.Second)
	procs[1] = startProc(t, env())
	time.Sleep(3 * time.Second)
	a.mustDo(t, "PATCH", "/v1/workspaces/"+ws.ID+"/schedules/tick", ws.APIKey, map[string]any{"paused": true}, 200, nil)
	time.Sleep(200 * time.Millisecond)

	dues := scheduledRuns(t, db, "tick")
	if len(dues) < 8 {
		t.Fatalf("runs made over about 9 s: got %d; want at least 8", len(dues))
	}
	checkEverySecond(t, dues)
	var lag float64
	if err := db.QueryRow(`SELECT coalesce(max(extract(epoch FROM created_at - scheduled_for)), 0) FROM runs
		WHERE scheduled_for IS NOT NULL`).Scan(&lag); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d due times, each one run; the largest due→created lag %.3f s", len(dues), lag)
	// Race-built processes starting on a shared box: twice the target, which
	// BenchmarkSchedules measures on a built binary.
	if lag > 2 {
		t.Errorf("largest lag from due time to run: got %.3f s; want at most 2 s", lag)
	}
	perProc := 0
	for _, p := range procs {
		if p.app().metric(t, "agentapp_schedule_runs_total") > 0 {
			perProc++
		}
	}
	t.Logf("processes now up that made scheduled runs: %d of 3", perProc)
}

// TestScheduleCatchUp: with its only process stopped for a few seconds, a schedule makes
// one run on restart, for the latest due time missed, not one for each.
func TestScheduleCatchUp(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	db := openTestDB(t, dsn)
	env := testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "LOG_LEVEL": "info"})
	p := startProc(t, env)
	a := p.app()
	ws := a.createWorkspace(t)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/schedules", ws.APIKey,
		map[string]any{"name": "tick", "cron": "@every 1s", "agent": "echo"}, 201, nil)
	eventually(t, 10*time.Second, "two runs before the stop", func() bool { return len(scheduledRuns(t, db, "tick")) >= 2 })
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit: got %d; want 0", code)
	}
	var stopped time.Time
	if err := db.QueryRow(`SELECT now()`).Scan(&stopped); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * time.Second)
	var restarted time.Time
	if err := db.QueryRow(`SELECT now()`).Scan(&restarted); err != nil {
		t.Fatal(err)
	}
	before := scheduledRuns(t, db, "tick")
	startProc(t, env)
	eventually(t, 10*time.Second, "two runs after the restart", func() bool { return len(scheduledRuns(t, db, "tick")) >= len(before)+2 })

	dues := scheduledRuns(t, db, "tick")
	last, first := before[len(before)-1], dues[len(before)]
	if first.Before(restarted.Truncate(time.Second)) {
		t.Errorf("first run after the restart: got scheduled_for %s; want the latest due time missed, at or after %s",
			first, restarted.Truncate(time.Second))
	}
	if gap := first.Sub(last); gap < 3*time.Second {
		t.Errorf("gap while no process was up: got %v; want the missed due times to make no runs (over 3 s)", gap)
	}
	checkEverySecond(t, dues, [2]time.Time{last, first})
	t.Logf("stopped at %s, restarted at %s; runs for %s then %s", stopped.UTC().Format(time.StampMilli),
		restarted.UTC().Format(time.StampMilli), last.Format(time.StampMilli), first.Format(time.StampMilli))
}

// TestConsoleSchedules: the schedules page lists a workspace's schedules (cron, time zone,
// next and last due) to it and the admin, not to another workspace, and its pause and
// resume forms need the CSRF token and change the schedule as the API's PATCH does.
func TestConsoleSchedules(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	wsA, wsB := a.createWorkspace(t), a.createWorkspace(t)
	var sc struct {
		ID     string     `json:"id"`
		Paused bool       `json:"paused"`
		NextAt *time.Time `json:"next_at"`
	}
	path := "/v1/workspaces/" + wsA.ID + "/schedules/nightly"
	a.mustDo(t, "POST", "/v1/workspaces/"+wsA.ID+"/schedules", wsA.APIKey, map[string]any{"name": "nightly",
		"cron": "30 2 * * *", "timezone": "Europe/Berlin", "agent": "echo"}, 201, &sc)

	userA, userB, admin := newBrowser(a), newBrowser(a), newBrowser(a)
	csrfA, csrfB, adminCSRF := userA.signIn(t, wsA.APIKey), userB.signIn(t, wsB.APIKey), admin.signIn(t, testAdminToken)
	pause, resume := "/ui/schedules/"+sc.ID+"/pause", "/ui/schedules/"+sc.ID+"/resume"
	p := userA.mustGet(t, "/ui/schedules")
	for _, want := range []string{`href="/ui/schedules" aria-current="page"`, "nightly", "<code>30 2 * * *</code>",
		"Europe/Berlin", formatTime(sc.NextAt), `action="` + pause + `"`} {
		if !strings.Contains(p.body, want) {
			t.Errorf("schedules page: got no %q; want it; body:\n%s", want, p.body)
		}
	}
	if p := admin.mustGet(t, "/ui/schedules"); !strings.Contains(p.body, "nightly") {
		t.Errorf("admin's schedules page: got no nightly; want it")
	}
	if p := userB.mustGet(t, "/ui/schedules"); strings.Contains(p.body, "nightly") || !strings.Contains(p.body, "No schedules yet.") {
		t.Errorf("B's schedules page: got A's schedule or no empty hint; want neither A's nor a list")
	}

	if p := userA.post(t, pause, "", nil); p.status != http.StatusForbidden {
		t.Errorf("pause without csrf: got %d; want 403", p.status)
	}
	if p := userB.post(t, pause, csrfB, nil); p.status != http.StatusNotFound {
		t.Errorf("B pauses A's schedule: got %d; want 404", p.status)
	}
	if p := userA.post(t, "/ui/schedules/not-an-id/pause", csrfA, nil); p.status != http.StatusNotFound {
		t.Errorf("pause of a bad schedule id: got %d; want 404", p.status)
	}
	p = userA.post(t, pause, csrfA, nil)
	if p.status != http.StatusSeeOther || p.location != "/ui/schedules?flash=schedule-paused" {
		t.Errorf("pause: got %d to %q; want 303 to /ui/schedules?flash=schedule-paused", p.status, p.location)
	}
	if p := userA.mustGet(t, p.location); !strings.Contains(p.body, "Schedule paused") || !strings.Contains(p.body, `action="`+resume+`"`) {
		t.Errorf("schedules page after the pause: got no flash or no Resume form; want both")
	}
	a.mustDo(t, "GET", path, wsA.APIKey, nil, 200, &sc)
	if !sc.Paused || sc.NextAt != nil {
		t.Errorf("schedule after the console's pause: got paused %v next_at %v; want paused, no next_at", sc.Paused, sc.NextAt)
	}
	if p := admin.post(t, resume, adminCSRF, nil); p.location != "/ui/schedules?flash=schedule-resumed" {
		t.Errorf("admin's resume: got %d to %q; want 303 to /ui/schedules?flash=schedule-resumed", p.status, p.location)
	}
	a.mustDo(t, "GET", path, wsA.APIKey, nil, 200, &sc)
	if sc.Paused || sc.NextAt == nil {
		t.Errorf("schedule after the admin's resume: got paused %v next_at %v; want resumed with a next_at", sc.Paused, sc.NextAt)
	}
}
