package main

import (
	"fmt"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// consoleClient sends console requests without following redirects, so that tests see
// each 303 and the cookies it sets.
var consoleClient = &http.Client{Timeout: 2 * time.Minute,
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// browser is a console user: the app it talks to and the cookies it holds. Its requests
// go through send, like every test request.
type browser struct {
	a       *app
	cookies map[string]string
}

// newBrowser returns a browser with no cookies.
func newBrowser(a *app) *browser { return &browser{a: a, cookies: map[string]string{}} }

// page is one console answer.
type page struct {
	status   int
	header   http.Header
	body     string
	location string
}

// do sends a request with the browser's cookies (and a form, when form is not nil) and
// keeps the cookies the answer sets.
func (b *browser) do(t testing.TB, method, path string, form url.Values) page {
	t.Helper()
	var pairs []string
	for k, v := range b.cookies {
		pairs = append(pairs, k+"="+v)
	}
	hdr := map[string]string{}
	if len(pairs) > 0 {
		hdr["Cookie"] = strings.Join(pairs, "; ")
	}
	var body any
	if form != nil {
		hdr["Content-Type"] = "application/x-www-form-urlencoded"
		body = form.Encode()
	}
	status, h, data, err := send(consoleClient, method, b.a.base+path, "", hdr, body)
	if err != nil {
		t.Fatalf("%s %s: got %v; want an answer", method, path, err)
	}
	for _, c := range (&http.Response{Header: h}).Cookies() {
		if c.MaxAge < 0 {
			delete(b.cookies, c.Name)
		} else {
			b.cookies[c.Name] = c.Value
		}
	}
	return page{status: status, header: h, body: string(data), location: h.Get("Location")}
}

// get is do with GET.
func (b *browser) get(t testing.TB, path string) page {
	t.Helper()
	return b.do(t, "GET", path, nil)
}

// mustGet is get that fails the test unless the answer is 200.
func (b *browser) mustGet(t testing.TB, path string) page {
	t.Helper()
	p := b.get(t, path)
	if p.status != http.StatusOK {
		t.Fatalf("GET %s: got %d (Location %q); want 200; body:\n%s", path, p.status, p.location, p.body)
	}
	return p
}

// csrfField finds the CSRF token in a page's forms.
var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf returns the CSRF token in the page; the test fails when there is none.
func (p page) csrf(t testing.TB) string {
	t.Helper()
	m := csrfField.FindStringSubmatch(p.body)
	if m == nil {
		t.Fatalf("page: got no csrf field; want one in:\n%s", p.body)
	}
	return m[1]
}

// signIn signs the browser in with token and returns the overview's CSRF token.
func (b *browser) signIn(t testing.TB, token string) string {
	t.Helper()
	form := b.mustGet(t, "/ui/sign-in")
	p := b.do(t, "POST", "/ui/sign-in", url.Values{"csrf": {form.csrf(t)}, "token": {token}})
	if p.status != http.StatusSeeOther || p.location != "/ui/" {
		t.Fatalf("POST /ui/sign-in: got %d to %q; want 303 to /ui/; body:\n%s", p.status, p.location, p.body)
	}
	return b.mustGet(t, "/ui/").csrf(t)
}

// post sends a form with the given CSRF token (none when csrf is "").
func (b *browser) post(t testing.TB, path, csrf string, form url.Values) page {
	t.Helper()
	if form == nil {
		form = url.Values{}
	}
	if csrf != "" {
		form.Set("csrf", csrf)
	}
	return b.do(t, "POST", path, form)
}

// TestConsoleSignIn: the form, its CSRF check, a wrong key, the cookie's attributes, and
// sign-out ending the session.
func TestConsoleSignIn(t *testing.T) {
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	b := newBrowser(a)

	if p := b.get(t, "/ui/"); p.status != http.StatusSeeOther || p.location != "/ui/sign-in" {
		t.Fatalf("GET /ui/ signed out: got %d to %q; want 303 to /ui/sign-in", p.status, p.location)
	}
	form := b.mustGet(t, "/ui/sign-in")
	if ct := form.header.Get("Content-Type"); ct != "text/html; charset=utf-8" {
		t.Errorf("sign-in Content-Type: got %q; want text/html; charset=utf-8", ct)
	}
	if !strings.Contains(form.body, `type="password"`) {
		t.Errorf("sign-in page: got no password field; want one")
	}

	// Without the form's CSRF token (another site posting it) the key is not even checked.
	if p := b.do(t, "POST", "/ui/sign-in", url.Values{"token": {ws.APIKey}}); p.status != http.StatusForbidden {
		t.Errorf("sign-in without csrf: got %d; want 403", p.status)
	}
	if p := newBrowser(a).do(t, "POST", "/ui/sign-in", url.Values{"csrf": {form.csrf(t)}, "token": {ws.APIKey}}); p.status != http.StatusForbidden {
		t.Errorf("sign-in with a csrf token but not its cookie: got %d; want 403", p.status)
	}

	form = b.mustGet(t, "/ui/sign-in")
	p := b.do(t, "POST", "/ui/sign-in", url.Values{"csrf": {form.csrf(t)}, "token": {"ak_wrong"}})
	if p.status != http.StatusUnauthorized {
		t.Errorf("sign-in with a wrong key: got %d; want 401", p.status)
	}
	if _, ok := b.cookies[sessionCookie]; ok {
		t.Errorf("sign-in with a wrong key: got a session cookie; want none")
	}
	if strings.Contains(p.body, "ak_wrong") {
		t.Errorf("sign-in with a wrong key: the page shows the key; want it never in a page")
	}

	form = b.mustGet(t, "/ui/sign-in")
	p = b.do(t, "POST", "/ui/sign-in", url.Values{"csrf": {form.csrf(t)}, "token": {ws.APIKey}})
	if p.status != http.StatusSeeOther || p.location != "/ui/" {
		t.Fatalf("sign-in: got %d to %q; want 303 to /ui/", p.status, p.location)
	}
	var session *http.Cookie
	for _, c := range (&http.Response{Header: p.header}).Cookies() {
		if c.Name == sessionCookie {
			session = c
		}
	}
	switch {
	case session == nil:
		t.Fatalf("sign-in: got cookies %v; want %s", p.header["Set-Cookie"], sessionCookie)
	case !session.HttpOnly || session.SameSite != http.SameSiteStrictMode || session.Path != "/ui/" || session.Secure:
		t.Errorf("session cookie: got HttpOnly=%v SameSite=%v Path=%q Secure=%v; want HttpOnly, Strict, /ui/, not Secure over plain HTTP",
			session.HttpOnly, session.SameSite, session.Path, session.Secure)
	case session.MaxAge != int(sessionTTL.Seconds()):
		t.Errorf("session cookie Max-Age: got %d; want %d", session.MaxAge, int(sessionTTL.Seconds()))
	}
	db := openTestDB(t, dsn)
	var stored int
	if err := db.QueryRow(`SELECT count(*) FROM sessions WHERE id_hash = $1 AND workspace_id = $2`, hashKey(session.Value), ws.ID).Scan(&stored); err != nil || stored != 1 {
		t.Errorf("sessions row for the cookie's sha256: got %d (%v); want 1", stored, err)
	}
	over := b.mustGet(t, "/ui/")
	if !strings.Contains(over.body, "Runs by status") || !strings.Contains(over.body, "workspace test") {
		t.Errorf("overview: got no figures or no workspace name; body:\n%s", over.body)
	}
	if p := b.get(t, "/ui/sign-in"); p.status != http.StatusSeeOther {
		t.Errorf("sign-in page while signed in: got %d; want 303 to the overview", p.status)
	}

	// Sign-out needs the CSRF token too, then the session is gone from the database.
	cookie := b.cookies[sessionCookie]
	if p := b.post(t, "/ui/sign-out", "", nil); p.status != http.StatusForbidden {
		t.Errorf("sign-out without csrf: got %d; want 403", p.status)
	}
	if p := b.post(t, "/ui/sign-out", over.csrf(t), nil); p.status != http.StatusSeeOther || p.location != "/ui/sign-in" {
		t.Errorf("sign-out: got %d to %q; want 303 to /ui/sign-in", p.status, p.location)
	}
	if err := db.QueryRow(`SELECT count(*) FROM sessions WHERE id_hash = $1`, hashKey(cookie)).Scan(&stored); err != nil || stored != 0 {
		t.Errorf("sessions row after sign-out: got %d (%v); want 0", stored, err)
	}
	replay := newBrowser(a)
	replay.cookies[sessionCookie] = cookie
	if p := replay.get(t, "/ui/"); p.status != http.StatusSeeOther {
		t.Errorf("the signed-out cookie again: got %d; want 303 to sign-in", p.status)
	}
}

// noSecrets fails the test when a page or its Location holds one of the secrets.
func noSecrets(t testing.TB, what string, p page, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if strings.Contains(p.body, s) || strings.Contains(p.location, s) {
			t.Errorf("%s: got a key or token in the page or its URL; want it never there", what)
		}
	}
}

// TestConsolePages renders every page against real PostgreSQL for the admin and for a
// workspace, and checks what each shows, that workspaces are kept apart and that no key
// is ever in a page or a URL.
func TestConsolePages(t *testing.T) {
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	wsA, wsB := a.createWorkspace(t), a.createWorkspace(t)
	a.createAgent(t, wsA, "slow", "echo", map[string]any{"delay_ms": 1})
	done := a.createRun(t, wsA, "echo", map[string]any{"greeting": "hello from A"})
	a.process(t, map[string]any{"workspace_id": wsA.ID})
	queuedA := a.createRun(t, wsA, "slow", map[string]any{"n": 1})
	queuedB := a.createRun(t, wsB, "echo", map[string]any{"secret": "only B sees this"})
	secrets := []string{wsA.APIKey, wsB.APIKey, testAdminToken}

	admin, userA := newBrowser(a), newBrowser(a)
	admin.signIn(t, testAdminToken)
	userA.signIn(t, wsA.APIKey)

	t.Run("overview", func(t *testing.T) {
		p := userA.mustGet(t, "/ui/")
		noSecrets(t, "overview", p, secrets...)
		for _, want := range []string{"Runs by status", "<svg", `<rect class="succeeded"`, "Oldest wait", "Live processes", "/ui/live.js"} {
			if !strings.Contains(p.body, want) {
				t.Errorf("overview: got no %q; want it; body:\n%s", want, p.body)
			}
		}
		// A's figures: one queued (the slow run), one succeeded in the last hour; B's run is not A's.
		if got := regexp.MustCompile(`(?s)<dt>queued</dt><dd>(\d+)</dd>`).FindStringSubmatch(p.body); got == nil || got[1] != "1" {
			t.Errorf("overview queued for A: got %v; want 1", got)
		}
		if got := regexp.MustCompile(`(?s)<dt>queued</dt><dd>(\d+)</dd>`).FindStringSubmatch(admin.mustGet(t, "/ui/").body); got == nil || got[1] != "2" {
			t.Errorf("overview queued for the admin: got %v; want 2", got)
		}
	})

	t.Run("runs", func(t *testing.T) {
		p := userA.mustGet(t, "/ui/runs")
		noSecrets(t, "runs", p, secrets...)
		if !strings.Contains(p.body, done.ID) || !strings.Contains(p.body, queuedA.ID) || strings.Contains(p.body, queuedB.ID) {
			t.Errorf("A's runs list: got done %v, queued %v, B's run %v; want A's two runs only",
				strings.Contains(p.body, done.ID), strings.Contains(p.body, queuedA.ID), strings.Contains(p.body, queuedB.ID))
		}
		// A workspace session cannot widen its scope with ?workspace=.
		if p := userA.mustGet(t, "/ui/runs?workspace="+wsB.ID); strings.Contains(p.body, queuedB.ID) {
			t.Errorf("A's runs list with ?workspace=B: got B's run; want it never shown to A")
		}
		filtered := userA.mustGet(t, "/ui/runs?status=queued&agent=slow")
		if !strings.Contains(filtered.body, queuedA.ID) || strings.Contains(filtered.body, done.ID) {
			t.Errorf("runs ?status=queued&agent=slow: got queued %v, succeeded %v; want the queued slow run only",
				strings.Contains(filtered.body, queuedA.ID), strings.Contains(filtered.body, done.ID))
		}
		all := admin.mustGet(t, "/ui/runs")
		if !strings.Contains(all.body, queuedA.ID) || !strings.Contains(all.body, queuedB.ID) {
			t.Errorf("admin runs list: got A %v, B %v; want both workspaces' runs", strings.Contains(all.body, queuedA.ID), strings.Contains(all.body, queuedB.ID))
		}
		onlyB := admin.mustGet(t, "/ui/runs?workspace="+wsB.ID)
		if strings.Contains(onlyB.body, queuedA.ID) || !strings.Contains(onlyB.body, queuedB.ID) {
			t.Errorf("admin runs ?workspace=B: got A %v, B %v; want B's only", strings.Contains(onlyB.body, queuedA.ID), strings.Contains(onlyB.body, queuedB.ID))
		}
		if p := userA.get(t, "/ui/runs?status=lost"); p.status != http.StatusUnprocessableEntity {
			t.Errorf("runs ?status=lost: got %d; want 422", p.status)
		}
	})

	t.Run("run", func(t *testing.T) {
		p := userA.mustGet(t, "/ui/runs/"+done.ID)
		noSecrets(t, "run", p, secrets...)
		for _, want := range []string{"hello from A", "succeeded", "Timeline", "Error history", "Events"} {
			if !strings.Contains(p.body, want) {
				t.Errorf("run page: got no %q; want it; body:\n%s", want, p.body)
			}
		}
		if p := userA.get(t, "/ui/runs/"+queuedB.ID); p.status != http.StatusNotFound || strings.Contains(p.body, "only B sees this") {
			t.Errorf("A opens B's run: got %d; want 404 without B's input", p.status)
		}
		if p := userA.get(t, "/ui/runs/not-a-uuid"); p.status != http.StatusNotFound {
			t.Errorf("run page for a bad id: got %d; want 404", p.status)
		}
		if p := admin.mustGet(t, "/ui/runs/"+queuedB.ID); !strings.Contains(p.body, "only B sees this") {
			t.Errorf("admin opens B's run: got no input; want it shown")
		}
	})

	t.Run("agents", func(t *testing.T) {
		p := userA.mustGet(t, "/ui/agents")
		noSecrets(t, "agents", p, secrets...)
		if !strings.Contains(p.body, "slow") || !strings.Contains(p.body, `{&#34;delay_ms&#34;: 1}`) {
			t.Errorf("agents page: got no slow agent or its config; body:\n%s", p.body)
		}
		if n := strings.Count(p.body, ">echo</a>"); n != 1 {
			t.Errorf("A's agents page: got %d agents named echo; want 1 (its own, not B's)", n)
		}
		if n := strings.Count(admin.mustGet(t, "/ui/agents").body, ">echo</a>"); n != 2 {
			t.Errorf("admin agents page: got %d agents named echo; want 2 (both workspaces')", n)
		}
		// A throttle (a webhook's Retry-After) is shown until it passes.
		until := time.Now().Add(time.Hour).UTC().Truncate(time.Millisecond)
		sqlExec(t, openTestDB(t, dsn))(`UPDATE agents SET throttled_until = $2 WHERE workspace_id = $1 AND name = 'slow'`, wsA.ID, until)
		if p := userA.mustGet(t, "/ui/agents"); !strings.Contains(p.body, formatTime(until)) || !strings.Contains(p.body, "throttled until") {
			t.Errorf("agents page of a throttled agent: got no %s; want its throttled_until shown", formatTime(until))
		}
		sqlExec(t, openTestDB(t, dsn))(`UPDATE agents SET throttled_until = now() - interval '1 second' WHERE workspace_id = $1 AND name = 'slow'`, wsA.ID)
		if p := userA.mustGet(t, "/ui/agents"); strings.Contains(p.body, formatTime(until)) {
			t.Errorf("agents page once the throttle has passed: got %s still; want it gone", formatTime(until))
		}
	})

	t.Run("cancel", func(t *testing.T) {
		csrf := userA.mustGet(t, "/ui/runs/"+queuedA.ID).csrf(t)
		if p := userA.post(t, "/ui/runs/"+queuedA.ID+"/cancel", "", nil); p.status != http.StatusForbidden {
			t.Errorf("cancel without csrf: got %d; want 403", p.status)
		}
		adminCSRF := admin.mustGet(t, "/ui/").csrf(t)
		if p := userA.post(t, "/ui/runs/"+queuedA.ID+"/cancel", adminCSRF, nil); p.status != http.StatusForbidden {
			t.Errorf("cancel with another session's csrf: got %d; want 403", p.status)
		}
		if got := a.getRun(t, wsA, queuedA.ID).Status; got != statusQueued {
			t.Fatalf("run after refused cancels: got %s; want queued", got)
		}
		if p := userA.post(t, "/ui/runs/"+queuedB.ID+"/cancel", csrf, nil); p.status != http.StatusNotFound {
			t.Errorf("A cancels B's run: got %d; want 404", p.status)
		}
		if got := a.getRun(t, wsB, queuedB.ID).Status; got != statusQueued {
			t.Errorf("B's run after A's cancel: got %s; want queued", got)
		}
		p := userA.post(t, "/ui/runs/"+queuedA.ID+"/cancel", csrf, nil)
		if p.status != http.StatusSeeOther || p.location != "/ui/runs/"+queuedA.ID+"?flash=canceled" {
			t.Fatalf("cancel: got %d to %q; want 303 back to the run", p.status, p.location)
		}
		if p := userA.mustGet(t, p.location); !strings.Contains(p.body, `<p class="flash" role="status">Run canceled.</p>`) {
			t.Errorf("run page after cancel: got no flash %q; want it; body:\n%s", "Run canceled.", p.body)
		}
		if got := a.getRun(t, wsA, queuedA.ID).Status; got != statusCanceled {
			t.Errorf("run after cancel: got %s; want canceled", got)
		}
		if p := userA.post(t, "/ui/runs/"+queuedA.ID+"/cancel", csrf, nil); p.status != http.StatusConflict {
			t.Errorf("cancel of a canceled run: got %d; want 409", p.status)
		}
	})

	t.Run("headers", func(t *testing.T) {
		p := userA.mustGet(t, "/ui/")
		if csp := p.header.Get("Content-Security-Policy"); !strings.Contains(csp, "frame-ancestors 'none'") {
			t.Errorf("Content-Security-Policy: got %q; want frame-ancestors 'none'", csp)
		}
		if p := userA.get(t, "/ui/nothing-here"); p.status != http.StatusNotFound || !strings.Contains(p.header.Get("Content-Type"), "text/html") {
			t.Errorf("unknown console page: got %d %q; want an HTML 404", p.status, p.header.Get("Content-Type"))
		}
		if p := userA.mustGet(t, "/ui/style.css"); !strings.Contains(p.header.Get("Content-Type"), "text/css") {
			t.Errorf("style.css: got Content-Type %q; want text/css", p.header.Get("Content-Type"))
		}
	})
}

// TestConsoleRunsPagination pages through 120 runs 50 at a time with the opaque cursor:
// every run once, newest first; a cursor of another workspace is refused.
func TestConsoleRunsPagination(t *testing.T) {
	dsn := testDB(t)
	st := &store{db: openTestDB(t, dsn)}
	ws, ids := seedRuns(t, st, 120, 3)
	other, otherIDs := seedRuns(t, st, 1, 3)
	a := startApp(t, testEnv(t, dsn, nil))
	b := newBrowser(a)
	b.signIn(t, ws.APIKey)

	link := regexp.MustCompile(`href="(/ui/runs\?cursor=[^"]+)" rel="next"`)
	row := regexp.MustCompile(`<a href="/ui/runs/([0-9a-f-]{36})">`)
	var seen []string
	path := "/ui/runs"
	for pages := 0; path != ""; pages++ {
		if pages > 3 {
			t.Fatalf("runs list: got more than 3 pages for 120 runs; want 3")
		}
		p := b.mustGet(t, path)
		for _, m := range row.FindAllStringSubmatch(p.body, -1) {
			seen = append(seen, m[1])
		}
		path = ""
		if m := link.FindStringSubmatch(p.body); m != nil {
			path = strings.ReplaceAll(m[1], "&amp;", "&")
			if strings.Contains(path, ids[0]) {
				t.Errorf("cursor: got the run id in clear in %q; want an opaque cursor", path)
			}
		}
	}
	if len(seen) != len(ids) {
		t.Fatalf("runs listed over all pages: got %d; want %d", len(seen), len(ids))
	}
	for i, id := range seen {
		if want := ids[len(ids)-1-i]; id != want {
			t.Fatalf("run %d listed: got %s; want %s (newest first, each once)", i, id, want)
		}
	}
	if p := b.get(t, "/ui/runs?cursor="+encodeCursor(otherIDs[0])); p.status != http.StatusUnprocessableEntity {
		t.Errorf("runs with a cursor of workspace %s: got %d; want 422", other.ID, p.status)
	}
	if p := b.get(t, "/ui/runs?cursor=garbage"); p.status != http.StatusUnprocessableEntity {
		t.Errorf("runs with a garbage cursor: got %d; want 422", p.status)
	}
}

// TestConsoleSessionsAcrossProcesses: a session made by one process is accepted by
// another; a rotated key ends the workspace's sessions everywhere; a session made under
// one ADMIN_TOKEN dies when the admin token changes.
func TestConsoleSessionsAcrossProcesses(t *testing.T) {
	dsn := testDB(t)
	one := startApp(t, testEnv(t, dsn, nil))
	two := startApp(t, testEnv(t, dsn, map[string]string{"ADMIN_TOKEN": "another-admin-token-0123"}))
	ws := one.createWorkspace(t)

	b := newBrowser(one)
	b.signIn(t, ws.APIKey)
	b.a = two
	over := b.mustGet(t, "/ui/")
	p := b.post(t, "/ui/runs/"+one.createRun(t, ws, "echo", nil).ID+"/cancel", over.csrf(t), nil)
	if p.status != http.StatusSeeOther {
		t.Errorf("cancel through the second process with the first's session: got %d; want 303", p.status)
	}

	admin := newBrowser(one)
	admin.signIn(t, testAdminToken)
	admin.a = two
	if p := admin.get(t, "/ui/"); p.status != http.StatusSeeOther {
		t.Errorf("admin session on a process with another ADMIN_TOKEN: got %d; want 303 to sign-in", p.status)
	}

	one.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/rotate-key", ws.APIKey, nil, 200, nil)
	if p := b.get(t, "/ui/"); p.status != http.StatusSeeOther || p.location != "/ui/sign-in" {
		t.Errorf("session after the key was rotated: got %d to %q; want 303 to /ui/sign-in", p.status, p.location)
	}
}

// TestConsoleProcessesAndEvents: the overview lists the live processes to the admin (a
// workspace sees only how many), and a run's page lists its progress events oldest first,
// the first runEventsShown of them with a note, each event's data cut at eventDataShown.
func TestConsoleProcessesAndEvents(t *testing.T) {
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_CONCURRENCY": "7", "LOG_LEVEL": "info"}))
	hook, calls := evAgent(t)
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "hook", "webhook", map[string]any{"url": hook})
	admin, user := newBrowser(a), newBrowser(a)
	admin.signIn(t, testAdminToken)
	user.signIn(t, ws.APIKey)

	host, _ := os.Hostname()
	row := fmt.Sprintf("<td>%s</td><td>%d</td><td>serve&#43;worker</td><td><code>%s</code></td>", host, os.Getpid(), buildVersion())
	var over page
	eventually(t, 5*time.Second, "the overview lists this process", func() bool {
		over = admin.mustGet(t, "/ui/")
		return strings.Contains(over.body, row)
	})
	if !regexp.MustCompile(`<td>7</td><td>\d+</td><td>\d+(ms|s|m\d+s) ago</td>`).MatchString(over.body) {
		t.Errorf("admin overview: got no concurrency 7, executing count and heartbeat age; body:\n%s", over.body)
	}
	p := user.mustGet(t, "/ui/")
	if strings.Contains(p.body, row) || strings.Contains(p.body, "<td>serve&#43;worker</td>") {
		t.Errorf("workspace overview: got the process's host, pid or mode; want only how many are live")
	}
	if !strings.Contains(p.body, "<strong>1</strong> live process serves") {
		t.Errorf("workspace overview: got no count of 1 live process; body:\n%s", p.body)
	}

	// A webhook agent posts runEventsShown+1 events through the API, one with a long data.
	run := a.createRun(t, ws, "hook", map[string]any{"doc": "a.pdf"})
	c := evNextCall(t, calls)
	long := strings.Repeat("x", eventDataShown+500)
	for i := 1; i <= runEventsShown+1; i++ {
		data := any(map[string]any{"step": i})
		if i == 2 {
			data = long
		}
		evMustPost(t, c, "progress", data, i)
	}
	close(c.done)
	a.waitRunStatus(t, ws, run.ID, "succeeded", time.Minute)

	p = user.mustGet(t, "/ui/runs/"+run.ID)
	events := regexp.MustCompile(`<tr><td>(\d+)</td><td>1</td><td>[^<]+</td><td>progress</td>`).FindAllStringSubmatch(p.body, -1)
	if len(events) != runEventsShown || events[0][1] != "1" || events[len(events)-1][1] != strconv.Itoa(runEventsShown) {
		first, last := "", ""
		if len(events) > 0 {
			first, last = events[0][1], events[len(events)-1][1]
		}
		t.Errorf("run page events: got %d rows, seq %s to %s; want %d, 1 to %d (oldest first)", len(events), first, last, runEventsShown, runEventsShown)
	}
	for _, want := range []string{`<code>{&#34;step&#34;: 1}</code>`, "Only the first 200 events are shown", "… (cut)"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("run page: got no %q; want it", want)
		}
	}
	if strings.Contains(p.body, long[:eventDataShown+1]) {
		t.Errorf("run page: got the long event's data whole; want its first %d characters", eventDataShown)
	}
	if p := user.mustGet(t, "/ui/runs/"+a.createRun(t, ws, "echo", nil).ID); !strings.Contains(p.body, "No progress events.") {
		t.Errorf("run page of a run without events: got no %q; want it", "No progress events.")
	}
}

// TestConsoleActions: Retry, Pause and Resume, and Cancel the queued runs shown, each a
// form with the CSRF token answered 303 with a flash: refused without the token (403),
// for another workspace's run or agent (404), for a run that cannot be retried (409).
func TestConsoleActions(t *testing.T) {
	hook := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusInternalServerError)
	}))
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	wsA, wsB := a.createWorkspace(t), a.createWorkspace(t)
	a.createAgent(t, wsA, "hook", "webhook", map[string]any{"url": hook.URL})
	a.createAgent(t, wsA, "slow", "echo", map[string]any{"delay_ms": 1})
	var failed runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+wsA.ID+"/runs", wsA.APIKey, map[string]any{"agent": "hook", "max_attempts": 1}, 201, &failed)
	succeeded := a.createRun(t, wsA, "echo", nil)
	if sum := a.process(t, map[string]any{"workspace_id": wsA.ID}); sum.Failed != 1 || sum.Succeeded != 1 {
		t.Fatalf("process: got %+v; want 1 failed, 1 succeeded", sum)
	}
	// No worker runs in this app but the one the test asks for: queued runs stay queued.
	canceled := a.createRun(t, wsA, "echo", nil)
	a.mustDo(t, "POST", "/v1/workspaces/"+wsA.ID+"/runs/"+canceled.ID+"/cancel", wsA.APIKey, nil, 200, nil)
	slow1, slow2, echoA := a.createRun(t, wsA, "slow", nil), a.createRun(t, wsA, "slow", nil), a.createRun(t, wsA, "echo", nil)
	queuedB := a.createRun(t, wsB, "echo", nil)

	admin, userA, userB := newBrowser(a), newBrowser(a), newBrowser(a)
	adminCSRF, csrfA, csrfB := admin.signIn(t, testAdminToken), userA.signIn(t, wsA.APIKey), userB.signIn(t, wsB.APIKey)
	status := func(ws testWorkspace, id string) runStatus { t.Helper(); return a.getRun(t, ws, id).Status }
	// flash follows an action's 303 in browser b and checks the flash it shows.
	flash := func(b *browser, p page, want string) {
		t.Helper()
		if p.status != http.StatusSeeOther {
			t.Fatalf("action: got %d; want 303; body:\n%s", p.status, p.body)
		}
		if got := b.mustGet(t, p.location).body; !strings.Contains(got, `<p class="flash" role="status">`+want+`</p>`) {
			t.Errorf("page after the action (%s): got no flash %q; want it; body:\n%s", p.location, want, got)
		}
	}

	t.Run("retry", func(t *testing.T) {
		if p := userA.mustGet(t, "/ui/runs/"+failed.ID); !strings.Contains(p.body, `action="/ui/runs/`+failed.ID+`/retry"`) {
			t.Errorf("failed run's page: got no Retry form; want one")
		}
		if p := userA.mustGet(t, "/ui/runs/"+succeeded.ID); strings.Contains(p.body, "/retry") {
			t.Errorf("succeeded run's page: got a Retry form; want none")
		}
		if p := userA.post(t, "/ui/runs/"+failed.ID+"/retry", "", nil); p.status != http.StatusForbidden {
			t.Errorf("retry without csrf: got %d; want 403", p.status)
		}
		if p := userB.post(t, "/ui/runs/"+failed.ID+"/retry", csrfB, nil); p.status != http.StatusNotFound {
			t.Errorf("B retries A's run: got %d; want 404", p.status)
		}
		if p := userA.post(t, "/ui/runs/"+failed.ID+"/retry", csrfA, url.Values{"attempts": {"0"}}); p.status != http.StatusUnprocessableEntity {
			t.Errorf("retry with attempts 0: got %d; want 422", p.status)
		}
		if got := status(wsA, failed.ID); got != statusFailed {
			t.Fatalf("run after refused retries: got %s; want failed", got)
		}
		p := userA.post(t, "/ui/runs/"+failed.ID+"/retry", csrfA, nil)
		if p.location != "/ui/runs/"+failed.ID+"?flash=retried&n=1" {
			t.Errorf("retry: got %d to %q; want 303 back to the run", p.status, p.location)
		}
		flash(userA, p, "Run queued again with 1 more attempt.")
		if r := a.getRun(t, wsA, failed.ID); r.Status != statusQueued || r.MaxAttempts != r.Attempt+1 {
			t.Errorf("retried run: got %s, attempt %d of %d; want queued with 1 more attempt", r.Status, r.Attempt, r.MaxAttempts)
		}
		// The admin retries a canceled run of any workspace, with more attempts.
		flash(admin, admin.post(t, "/ui/runs/"+canceled.ID+"/retry", adminCSRF, url.Values{"attempts": {"3"}}), "Run queued again with 3 more attempts.")
		if r := a.getRun(t, wsA, canceled.ID); r.Status != statusQueued || r.MaxAttempts != r.Attempt+3 {
			t.Errorf("retried canceled run: got %s, attempt %d of %d; want queued with 3 more attempts", r.Status, r.Attempt, r.MaxAttempts)
		}
		p = userA.post(t, "/ui/runs/"+succeeded.ID+"/retry", csrfA, nil)
		if p.status != http.StatusConflict || !strings.Contains(p.header.Get("Content-Type"), "text/html") ||
			!strings.Contains(p.body, "run is succeeded: only failed or canceled runs can be retried") {
			t.Errorf("retry of a succeeded run: got %d %q; want an HTML 409 that says why; body:\n%s", p.status, p.header.Get("Content-Type"), p.body)
		}
		if back := `<a href="/ui/runs/` + succeeded.ID + `">Back to the page you came from</a>`; !strings.Contains(p.body, back) {
			t.Errorf("refused retry: got no %s; want a link back to the run; body:\n%s", back, p.body)
		}
	})

	t.Run("pause", func(t *testing.T) {
		var slow agent
		agentPath := "/v1/workspaces/" + wsA.ID + "/agents/slow"
		a.mustDo(t, "GET", agentPath, wsA.APIKey, nil, 200, &slow)
		pause, resume := "/ui/agents/"+slow.ID+"/pause", "/ui/agents/"+slow.ID+"/resume"
		if p := userA.mustGet(t, "/ui/agents"); !strings.Contains(p.body, `action="`+pause+`"`) {
			t.Errorf("agents page: got no Pause form for slow; want one")
		}
		if p := userA.post(t, pause, "", nil); p.status != http.StatusForbidden {
			t.Errorf("pause without csrf: got %d; want 403", p.status)
		}
		if p := userB.post(t, pause, csrfB, nil); p.status != http.StatusNotFound {
			t.Errorf("B pauses A's agent: got %d; want 404", p.status)
		}
		if p := userA.post(t, "/ui/agents/not-an-id/pause", csrfA, nil); p.status != http.StatusNotFound {
			t.Errorf("pause of a bad agent id: got %d; want 404", p.status)
		}
		a.mustDo(t, "GET", agentPath, wsA.APIKey, nil, 200, &slow)
		if slow.Paused {
			t.Fatalf("agent after refused pauses: got paused; want not")
		}
		p := userA.post(t, pause, csrfA, nil)
		if p.location != "/ui/agents?flash=paused" {
			t.Errorf("pause: got %d to %q; want 303 to /ui/agents?flash=paused", p.status, p.location)
		}
		flash(userA, p, "Agent paused: its runs stay queued until it is resumed.")
		a.mustDo(t, "GET", agentPath, wsA.APIKey, nil, 200, &slow)
		if !slow.Paused {
			t.Errorf("agent after pause: got not paused; want paused")
		}
		if p := userA.mustGet(t, "/ui/agents"); !strings.Contains(p.body, `action="`+resume+`"`) || strings.Contains(p.body, `action="`+pause+`"`) {
			t.Errorf("agents page of a paused agent: got no Resume form, or a Pause one; want Resume only")
		}
		flash(admin, admin.post(t, resume, adminCSRF, nil), "Agent resumed: its queued runs are claimed again.")
		a.mustDo(t, "GET", agentPath, wsA.APIKey, nil, 200, &slow)
		if slow.Paused {
			t.Errorf("agent after the admin's resume: got paused; want not")
		}
	})

	t.Run("cancel queued", func(t *testing.T) {
		const form = `action="/ui/runs/cancel-queued"`
		if p := userA.mustGet(t, "/ui/runs?status=queued&agent=slow"); !strings.Contains(p.body, form) {
			t.Errorf("runs ?status=queued: got no cancel form; want one")
		}
		if p := userA.mustGet(t, "/ui/runs?status=failed"); strings.Contains(p.body, form) {
			t.Errorf("runs ?status=failed: got a cancel form; want none")
		}
		if p := admin.mustGet(t, "/ui/runs"); strings.Contains(p.body, form) || !strings.Contains(p.body, "Choose a workspace") {
			t.Errorf("admin runs list of every workspace: got a cancel form or no hint; want the hint only")
		}
		if p := admin.mustGet(t, "/ui/runs?workspace="+wsB.ID); !strings.Contains(p.body, form) {
			t.Errorf("admin runs ?workspace=B: got no cancel form; want one")
		}
		filters := url.Values{"status": {"queued"}, "agent": {"slow"}}
		if p := userA.post(t, "/ui/runs/cancel-queued", "", filters); p.status != http.StatusForbidden {
			t.Errorf("cancel queued without csrf: got %d; want 403", p.status)
		} else if back := `<a href="/ui/runs?agent=slow&amp;status=queued">Back to the page you came from</a>`; !strings.Contains(p.body, back) {
			t.Errorf("refused cancel of the queued runs: got no %s; want a link back to the filtered list; body:\n%s", back, p.body)
		}
		for _, c := range []struct {
			name string
			b    *browser
			csrf string
			form url.Values
			want int
		}{
			{"status running", userA, csrfA, url.Values{"status": {"running"}}, http.StatusUnprocessableEntity},
			{"unknown agent", userA, csrfA, url.Values{"agent": {"nope"}}, http.StatusUnprocessableEntity},
			{"admin without a workspace", admin, adminCSRF, url.Values{"status": {"queued"}}, http.StatusUnprocessableEntity},
			{"admin with an unknown workspace", admin, adminCSRF, url.Values{"workspace": {"00000000-0000-4000-8000-000000000000"}}, http.StatusNotFound},
		} {
			if p := c.b.post(t, "/ui/runs/cancel-queued", c.csrf, c.form); p.status != c.want {
				t.Errorf("cancel queued, %s: got %d; want %d", c.name, p.status, c.want)
			}
		}
		for _, id := range []string{slow1.ID, slow2.ID, echoA.ID} {
			if got := status(wsA, id); got != statusQueued {
				t.Fatalf("A's run after refused cancels: got %s; want queued", got)
			}
		}
		// A's filter on agent slow: its two queued runs only; a workspace in the form is
		// ignored, as the runs list ignores it for a workspace session.
		filters.Set("workspace", wsB.ID)
		p := userA.post(t, "/ui/runs/cancel-queued", csrfA, filters)
		if p.location != "/ui/runs?agent=slow&status=queued&flash=canceled-queued&n=2" {
			t.Errorf("cancel queued: got %d to %q; want 303 to the list with a flash of 2", p.status, p.location)
		}
		flash(userA, p, "Canceled 2 queued runs.")
		for id, want := range map[string]runStatus{slow1.ID: statusCanceled, slow2.ID: statusCanceled, echoA.ID: statusQueued, failed.ID: statusQueued} {
			if got := status(wsA, id); got != want {
				t.Errorf("A's run %s after cancelling slow's queued runs: got %s; want %s", id, got, want)
			}
		}
		if got := status(wsB, queuedB.ID); got != statusQueued {
			t.Errorf("B's run after A's cancel: got %s; want queued", got)
		}
		p = admin.post(t, "/ui/runs/cancel-queued", adminCSRF, url.Values{"workspace": {wsB.ID}})
		if p.location != "/ui/runs?workspace="+wsB.ID+"&flash=canceled-queued&n=1" {
			t.Errorf("admin cancel queued of B: got %d to %q; want 303 to B's list with a flash of 1", p.status, p.location)
		}
		flash(admin, p, "Canceled 1 queued run.")
		if got := status(wsB, queuedB.ID); got != statusCanceled {
			t.Errorf("B's run after the admin's cancel: got %s; want canceled", got)
		}
		if got := status(wsA, echoA.ID); got != statusQueued {
			t.Errorf("A's run after the admin canceled B's: got %s; want queued", got)
		}
	})
}

// TestRootRedirectsToConsole: a browser pointed at the server's address is sent to the
// console (which then asks it to sign in), other unknown paths still answer the API's 404,
// and the start-up log line names the console's URL.
func TestRootRedirectsToConsole(t *testing.T) {
	t.Parallel()
	env := testEnv(t, testDB(t), nil)
	a := startApp(t, env)
	b := newBrowser(a)
	for _, method := range []string{"GET", "HEAD"} {
		if p := b.do(t, method, "/", nil); p.status != http.StatusSeeOther || p.location != "/ui/" {
			t.Errorf("%s /: got %d, Location %q; want 303 to /ui/", method, p.status, p.location)
		}
	}
	if p := b.get(t, "/ui/"); p.status != http.StatusSeeOther || p.location != "/ui/sign-in" {
		t.Errorf("GET /ui/ signed out: got %d, Location %q; want 303 to /ui/sign-in", p.status, p.location)
	}
	if p := b.get(t, "/nothing-here"); p.status != http.StatusNotFound || !strings.Contains(p.body, `"code":"not_found"`) {
		t.Errorf("GET /nothing-here: got %d %s; want the API's 404", p.status, p.body)
	}
	if want := "console=http://" + env["LISTEN_ADDR"] + "/ui/"; !strings.Contains(a.log.String(), want) {
		t.Errorf("log: got no %q; want the start-up line to name the console; log:\n%s", want, a.log)
	}
}

// TestConsoleWaitReasons: the run page shows a run's due time, priority and timeout; the
// runs list its due time and error; both say why a queued run waits (not yet due, its agent
// paused, its agent at its cap); and the overview's oldest wait counts only runs that could
// start, not a paused agent's, however long those have waited.
func TestConsoleWaitReasons(t *testing.T) {
	t.Parallel()
	hook := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "the model is overloaded", http.StatusServiceUnavailable)
	}))
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "0"}))
	db := openTestDB(t, dsn)
	ws, other := a.createWorkspace(t), a.createWorkspace(t)
	a.createAgent(t, ws, "later", "echo", map[string]any{})
	a.createAgent(t, ws, "capped", "echo", map[string]any{"delay_ms": 600000})
	a.mustDo(t, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/capped", ws.APIKey, map[string]any{"max_concurrency": 1}, 200, nil)
	a.createAgent(t, ws, "failing", "webhook", map[string]any{"url": hook.URL})
	for _, w := range []testWorkspace{ws, other} {
		a.createAgent(t, w, "held", "echo", map[string]any{})
		a.mustDo(t, "PATCH", "/v1/workspaces/"+w.ID+"/agents/held", w.APIKey, map[string]any{"paused": true}, 200, nil)
	}

	var later, failed runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
		map[string]any{"agent": "later", "delay_ms": 3 * 3600 * 1000, "priority": 3, "timeout_ms": 5000}, 201, &later)
	first := a.createRun(t, ws, "capped", 1)
	a.waitRunStatus(t, ws, first.ID, "running", time.Minute)
	second := a.createRun(t, ws, "capped", 2)
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "failing", "max_attempts": 1}, 201, &failed)
	a.waitRunStatus(t, ws, failed.ID, "failed", time.Minute)
	held := a.createRun(t, ws, "held", 3)
	heldOther := a.createRun(t, other, "held", 4)
	// The paused agents' runs have waited an hour; the capped one has just fallen due.
	if _, err := db.Exec(`UPDATE runs SET run_at = now() - interval '1 hour' WHERE id IN ($1, $2)`, held.ID, heldOther.ID); err != nil {
		t.Fatalf("backdate the paused agents' runs: got %v; want them updated", err)
	}

	b := newBrowser(a)
	b.signIn(t, ws.APIKey)
	p := b.mustGet(t, "/ui/runs/"+later.ID)
	for _, want := range []string{"due in 3h", "priority 3", "timeout 5000 ms", "<dt>due</dt><dd>" + formatTime(later.RunAt) + "</dd>"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("run page of a run due in 3h: got no %q; want it; body:\n%s", want, p.body)
		}
	}
	for id, want := range map[string]string{held.ID: "agent paused", second.ID: "agent at its cap"} {
		if p := b.mustGet(t, "/ui/runs/"+id); !strings.Contains(p.body, want) {
			t.Errorf("run page of %s: got no %q; want it; body:\n%s", id, want, p.body)
		}
	}
	if p := b.mustGet(t, "/ui/runs/"+first.ID); strings.Contains(p.body, `class="wait"`) {
		t.Errorf("run page of a running run: got a wait reason; want none; body:\n%s", p.body)
	}

	rows := map[string]string{} // run id → its row in the runs list
	for _, m := range regexp.MustCompile(`(?s)<tr>\s*<td><a href="/ui/runs/([0-9a-f-]+)">.*?</tr>`).FindAllStringSubmatch(b.mustGet(t, "/ui/runs").body, -1) {
		rows[m[1]] = m[0]
	}
	for id, want := range map[string][]string{
		later.ID:  {"due in 3h", formatTime(later.RunAt)},
		held.ID:   {"agent paused"},
		second.ID: {"agent at its cap"},
		failed.ID: {`<td class="error">`, "webhook answered HTTP 503, want 2xx; body: the model is overloaded"},
	} {
		for _, w := range want {
			if !strings.Contains(rows[id], w) {
				t.Errorf("runs list, row of %s: got no %q; want it; row:\n%s", id, w, rows[id])
			}
		}
	}

	p = b.mustGet(t, "/ui/runs/"+failed.ID)
	if strings.Contains(p.body, "<h2>Output</h2>") || !regexp.MustCompile(`<dt>attempt 1</dt><dd>took \d`).MatchString(p.body) {
		t.Errorf("run page of a failed run: got an Output box %v, its attempt's duration %v; want no box and the duration; body:\n%s",
			strings.Contains(p.body, "<h2>Output</h2>"), !strings.Contains(p.body, "took "), p.body)
	}
	if p := b.mustGet(t, "/ui/runs?agent=capped"); !strings.Contains(p.body, `<option value="capped" selected>capped</option>`) ||
		!strings.Contains(p.body, `<option value="later">later</option>`) || !strings.Contains(p.body, second.ID) || strings.Contains(p.body, later.ID) {
		t.Errorf("runs ?agent=capped: got no agent choices or the wrong runs; want a select of the workspace's agents; body:\n%s", p.body)
	}

	oldest := regexp.MustCompile(`Oldest wait: <strong>([^<]*)</strong>`)
	wait := func(b *browser) string {
		t.Helper()
		m := oldest.FindStringSubmatch(b.mustGet(t, "/ui/").body)
		if m == nil {
			t.Fatalf("overview: got no oldest wait; want one")
		}
		return m[1]
	}
	// The capped run could start (a slot may free at any moment): it is the oldest wait,
	// not the paused agents' runs, an hour older.
	if got := wait(b); strings.Contains(got, "h") || got == "none waiting" {
		t.Errorf("oldest wait of a workspace with a capped run just due and a paused agent's run due an hour ago: got %q; want the capped run's seconds", got)
	}
	admin := newBrowser(a)
	admin.signIn(t, testAdminToken)
	if got := wait(admin); strings.Contains(got, "h") || got == "none waiting" {
		t.Errorf("admin's oldest wait: got %q; want the capped run's seconds", got)
	}
	// Both workspaces are named "test": the admin tells them apart by the start of their ids.
	all := admin.mustGet(t, "/ui/runs").body
	for _, w := range []testWorkspace{ws, other} {
		label := "test " + w.ID[:8]
		if !strings.Contains(all, `<option value="`+w.ID+`">`+label+`</option>`) || !strings.Contains(all, "<td>"+label+"</td>") {
			t.Errorf("admin runs list: got no %q in the workspace filter and the table; want it; body:\n%s", label, all)
		}
	}
	only := newBrowser(a)
	only.signIn(t, other.APIKey)
	if got := wait(only); got != "none waiting" {
		t.Errorf("oldest wait of a workspace whose only due run is a paused agent's: got %q; want none waiting", got)
	}
}
