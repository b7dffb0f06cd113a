package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"database/sql"
	"embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lib/pq"
)

// uiFS holds the console's templates, stylesheet and its one small script.
//
//go:embed ui
var uiFS embed.FS

// The console's limits and durations, all in one place. No page counts more rows than
// these allow, so every page costs the same with 10,000 runs or 10,000,000.
const (
	// sessionCookie names the console's session cookie.
	sessionCookie = "agentapp_session"
	// signInCookie holds the sign-in form's CSRF token (double submit): a session does not
	// exist yet, and another site must not sign a browser in with its own key.
	signInCookie = "agentapp_signin"
	// sessionTTL is how long a sign-in lasts: a working day, after which the key is asked again.
	sessionTTL = 12 * time.Hour
	// signInTTL is how long a sign-in form may be left open before it is submitted.
	signInTTL = time.Hour
	// runsPageSize is how many runs one page of the runs list shows.
	runsPageSize = 50
	// agentCountCap bounds each agent's queued and running counts on the agents page ("1000+").
	agentCountCap = 1000
	// agentsPageLimit is the most agents the agents page lists.
	agentsPageLimit = 500
	// workspacesListLimit is the most workspaces the admin's workspace filter offers.
	workspacesListLimit = 500
	// chartMinutes is the span of the overview's chart of runs finished per minute.
	chartMinutes = 60
	// runEventsShown is the most events a run's page lists (the first ones); the API pages
	// through all of a run's events (up to maxRunEvents).
	runEventsShown = 200
	// eventDataShown is how many characters of an event's data the run page shows: an
	// event may hold 1 MiB, and 200 of them must still make a page that loads at once.
	eventDataShown = 2000
)

// console serves the operator's console under /ui/: server-rendered pages that work
// without script, signed in with a session kept in the database.
type console struct {
	s     *server
	pages map[string]*template.Template
}

// consolePages are the page templates in ui/, each rendered inside ui/layout.html.
var consolePages = []string{"sign-in", "overview", "runs", "run", "agents", "schedules", "error"}

// console returns the console's handler; every console route is listed here.
func (s *server) console() http.Handler {
	c := &console{s: s, pages: map[string]*template.Template{}}
	funcs := template.FuncMap{"when": formatTime, "json": prettyJSON, "capped": capped, "clip": clip, "present": present}
	for _, name := range consolePages {
		c.pages[name] = template.Must(template.New(name).Funcs(funcs).ParseFS(uiFS, "ui/layout.html", "ui/"+name+".html"))
	}
	mux := routeMux{http.NewServeMux(), &s.routes} // recorded, for the OpenAPI test
	mux.HandleFunc("GET /ui/{$}", c.page(c.overview))
	mux.HandleFunc("GET /ui/sign-in", c.signInForm)
	mux.HandleFunc("POST /ui/sign-in", c.signIn)
	mux.HandleFunc("POST /ui/sign-out", c.action(c.signOut))
	mux.HandleFunc("GET /ui/runs", c.page(c.runs))
	mux.HandleFunc("GET /ui/runs/{id}", c.page(c.run))
	mux.HandleFunc("POST /ui/runs/{id}/cancel", c.action(c.cancelRun))
	mux.HandleFunc("POST /ui/runs/{id}/retry", c.action(c.retryRun))
	mux.HandleFunc("POST /ui/runs/{id}/signal", c.action(c.signalRun))
	mux.HandleFunc("POST /ui/runs/cancel-queued", c.action(c.cancelQueued))
	mux.HandleFunc("GET /ui/agents", c.page(c.agents))
	mux.HandleFunc("POST /ui/agents/{id}/pause", c.action(c.setPaused(true)))
	mux.HandleFunc("POST /ui/agents/{id}/resume", c.action(c.setPaused(false)))
	mux.HandleFunc("GET /ui/schedules", c.page(c.schedules))
	mux.HandleFunc("POST /ui/schedules/{id}/pause", c.action(c.setSchedulePaused(true)))
	mux.HandleFunc("POST /ui/schedules/{id}/resume", c.action(c.setSchedulePaused(false)))
	mux.HandleFunc("GET /ui/style.css", c.asset("ui/style.css", "text/css; charset=utf-8"))
	mux.HandleFunc("GET /ui/live.js", c.asset("ui/live.js", "text/javascript; charset=utf-8"))
	mux.HandleFunc("GET /ui/flash.js", c.asset("ui/flash.js", "text/javascript; charset=utf-8"))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		if _, pattern := mux.Handler(r); pattern == "" {
			c.render(w, r, http.StatusNotFound, "error", pageData{Title: "Not found", Body: "There is no such page."})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// session is a signed-in console user: the admin, or one workspace.
type session struct {
	idHash    []byte
	admin     bool
	workspace string // the workspace's id; "" for the admin
	name      string // the workspace's name
	csrf      string // the token every form of this session carries
}

// scope is the workspace a query of this session is limited to; nil: every workspace.
func (se session) scope() any {
	if se.admin {
		return nil
	}
	return se.workspace
}

// pageData is what every page template gets: the layout's parts and the page's own Body.
type pageData struct {
	Title string
	Nav   string // the menu entry to mark as current
	Who   string // who is signed in; "" on the sign-in page
	CSRF  string
	Admin bool
	Live  bool   // refresh the page's data-live parts in place (live.js)
	Flash string // what the action that redirected here did (flashMessage)
	Back  string // on an error page: the page the refused form was on; "": the overview
	Body  any
}

// flashMessages are the results an action's redirect may announce, by the flash=
// parameter it adds. The page shows only these fixed texts (and a number, "(s)" made
// plural by it), never text from the URL: a crafted link cannot make the console say
// something else.
var flashMessages = map[string]string{
	"canceled":         "Run canceled.",
	"cancel-requested": "Cancel requested: the run stops where it executes.",
	"retried":          "Run queued again with %d more attempt(s).",
	"signaled":         "Signal sent: the run is queued again for its next step.",
	"canceled-queued":  "Canceled %d queued run(s).",
	"paused":           "Agent paused: its runs stay queued until it is resumed.",
	"resumed":          "Agent resumed: its queued runs are claimed again.",
	"schedule-paused":  "Schedule paused: it makes no runs until it is resumed.",
	"schedule-resumed": "Schedule resumed: its next due time is after now.",
}

// withFlash returns path with the flash parameters that announce key (and its number n).
func withFlash(path, key string, n int64) string {
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	v := url.Values{"flash": {key}}
	if strings.Contains(flashMessages[key], "%d") {
		v.Set("n", strconv.FormatInt(n, 10))
	}
	return path + sep + v.Encode()
}

// flashMessage is the text that a request's flash parameters announce, or "".
func flashMessage(q url.Values) string {
	msg, ok := flashMessages[q.Get("flash")]
	if !ok || !strings.Contains(msg, "%d") {
		return msg
	}
	n, err := strconv.ParseInt(q.Get("n"), 10, 64)
	if err != nil || n < 0 {
		return ""
	}
	plural := "s"
	if n == 1 {
		plural = ""
	}
	return strings.ReplaceAll(fmt.Sprintf(msg, n), "(s)", plural)
}

// randomToken returns 32 random bytes, URL-safe.
func randomToken() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// setCookie sets a console cookie: HttpOnly, SameSite=Strict, for /ui/ only, Secure over TLS.
func setCookie(w http.ResponseWriter, r *http.Request, name, value string, maxAge time.Duration) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: "/ui/", MaxAge: int(maxAge.Seconds()),
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
}

// clearCookie removes a console cookie.
func clearCookie(w http.ResponseWriter, r *http.Request, name string) {
	http.SetCookie(w, &http.Cookie{Name: name, Path: "/ui/", MaxAge: -1,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
}

// lookup returns the request's session, or false when there is none, it expired, or the
// key it was signed in with no longer holds (a rotated key, a changed ADMIN_TOKEN).
func (c *console) lookup(r *http.Request) (session, bool, error) {
	ck, err := r.Cookie(sessionCookie)
	if err != nil || ck.Value == "" {
		return session{}, false, nil
	}
	se := session{idHash: hashKey(ck.Value)}
	var ws, name sql.NullString
	var keyHash []byte
	err = c.s.store.db.QueryRowContext(r.Context(), `
		SELECT s.workspace_id, w.name, s.key_hash, s.csrf_token FROM sessions s
		LEFT JOIN workspaces w ON w.id = s.workspace_id
		WHERE s.id_hash = $1 AND s.expires_at > now()
		  AND (s.workspace_id IS NULL OR w.api_key_hash = s.key_hash)`, se.idHash).
		Scan(&ws, &name, &keyHash, &se.csrf)
	if errors.Is(err, sql.ErrNoRows) {
		return session{}, false, nil
	}
	if err != nil {
		return session{}, false, err
	}
	se.workspace, se.name, se.admin = ws.String, name.String, !ws.Valid
	if se.admin && (c.s.cfg.AdminToken == "" || subtle.ConstantTimeCompare(keyHash, hashKey(c.s.cfg.AdminToken)) != 1) {
		return session{}, false, nil
	}
	return se, true, nil
}

// page guards a page: without a session the browser is sent to the sign-in form.
func (c *console) page(h func(http.ResponseWriter, *http.Request, session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		se, ok, err := c.lookup(r)
		switch {
		case err != nil:
			c.fail(w, r, err)
		case !ok:
			http.Redirect(w, r, "/ui/sign-in", http.StatusSeeOther)
		default:
			h(w, r, se)
		}
	}
}

// action guards a form that changes something: it needs a session and the session's CSRF
// token in the form, else 403 before anything is done.
func (c *console) action(h func(http.ResponseWriter, *http.Request, session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		se, ok, err := c.lookup(r)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		if err := r.ParseForm(); err != nil {
			c.fail(w, r, badRequest("reading the form: %v", err))
			return
		}
		if !ok || subtle.ConstantTimeCompare([]byte(r.PostForm.Get("csrf")), []byte(se.csrf)) != 1 {
			c.render(w, r, http.StatusForbidden, "error", pageData{Title: "Forbidden", Back: backTo(r),
				Body: "This form is not from your current session (its CSRF token is missing or wrong). Go back, reload the page and try again."})
			return
		}
		h(w, r, se)
	}
}

// render writes a page inside the layout.
func (c *console) render(w http.ResponseWriter, r *http.Request, status int, name string, d pageData) {
	if status == http.StatusOK && d.Who != "" {
		d.Flash = flashMessage(r.URL.Query())
	}
	var buf bytes.Buffer
	if err := c.pages[name].ExecuteTemplate(&buf, "layout", d); err != nil {
		c.s.log.Error("console page failed", "page", name, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// fail answers err as an HTML page. Its status comes from server.fail, the one place
// where errors become statuses (and which logs what it must); 5xx details are not shown.
func (c *console) fail(w http.ResponseWriter, r *http.Request, err error) {
	probe := &statusOnly{header: http.Header{}}
	c.s.fail(probe, r, err)
	msg := err.Error()
	if probe.code >= 500 {
		msg = http.StatusText(probe.code) + ": try again shortly."
	}
	c.render(w, r, probe.code, "error", pageData{Title: http.StatusText(probe.code), Body: msg, Back: backTo(r)})
}

// backTo is the page a console form posted to r was on, for the link back from a refusal
// of it (the console sends no Referer: its Referrer-Policy is no-referrer); "" for others.
func backTo(r *http.Request) string {
	if r.Method != http.MethodPost {
		return ""
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/") // ui, runs, {id}, cancel
	switch {
	case len(parts) == 4 && parts[1] == "runs" && isUUID(parts[2]):
		return "/ui/runs/" + parts[2]
	case r.URL.Path == "/ui/runs/cancel-queued":
		f := runsFilter{Status: r.PostForm.Get("status"), Agent: r.PostForm.Get("agent"), Workspace: r.PostForm.Get("workspace")}
		return "/ui/runs" + f.query("")
	case len(parts) == 4 && parts[1] == "agents":
		return "/ui/agents"
	case len(parts) == 4 && parts[1] == "schedules":
		return "/ui/schedules"
	}
	return ""
}

// layout fills the parts of pageData that every signed-in page shares.
func (se session) layout(title, nav string, body any) pageData {
	who := "admin"
	if !se.admin {
		who = "workspace " + se.name
	}
	return pageData{Title: title, Nav: nav, Who: who, CSRF: se.csrf, Admin: se.admin, Body: body}
}

// asset serves an embedded file.
func (c *console) asset(name, contentType string) http.HandlerFunc {
	data, err := fs.ReadFile(uiFS, name)
	if err != nil {
		panic(err) // embedded at build time: cannot be missing
	}
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.Header().Set("Cache-Control", "max-age=300")
		w.Write(data)
	}
}

// signInForm shows the sign-in form, with a fresh CSRF token in it and in a cookie.
func (c *console) signInForm(w http.ResponseWriter, r *http.Request) {
	if _, ok, err := c.lookup(r); err == nil && ok {
		http.Redirect(w, r, "/ui/", http.StatusSeeOther)
		return
	}
	c.showSignIn(w, r, http.StatusOK, "")
}

// showSignIn renders the sign-in form with a new CSRF token and an optional message.
func (c *console) showSignIn(w http.ResponseWriter, r *http.Request, status int, message string) {
	token := randomToken()
	setCookie(w, r, signInCookie, token, signInTTL)
	c.render(w, r, status, "sign-in", pageData{Title: "Sign in", CSRF: token, Body: message})
}

// signIn checks the token posted (the admin token or a workspace key, found as the API
// finds a bearer token) and starts a session: only the sha256 of its cookie is stored.
func (c *console) signIn(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		c.fail(w, r, badRequest("reading the form: %v", err))
		return
	}
	ck, err := r.Cookie(signInCookie)
	if err != nil || ck.Value == "" || subtle.ConstantTimeCompare([]byte(r.PostForm.Get("csrf")), []byte(ck.Value)) != 1 {
		c.render(w, r, http.StatusForbidden, "error", pageData{Title: "Forbidden",
			Body: "This sign-in form is not one this server gave your browser (its CSRF token is missing or wrong). Open the sign-in page again."})
		return
	}
	token := strings.TrimSpace(r.PostForm.Get("token"))
	who, err := c.s.authenticateToken(r.Context(), token)
	var bad *requestError
	if errors.As(err, &bad) && bad.status == http.StatusUnauthorized {
		c.s.logAuthFailure(r, "console sign-in: "+bad.message)
		c.showSignIn(w, r, http.StatusUnauthorized, "That is neither the admin token nor a workspace key.")
		return
	}
	if err != nil {
		c.fail(w, r, err)
		return
	}
	id := randomToken()
	var ws any
	if !who.admin {
		ws = who.workspace
	}
	// Expired sessions are pruned here, where sessions are made: their number stays
	// bounded by the sign-ins of one sessionTTL.
	_, err = c.s.store.db.ExecContext(r.Context(), `
		WITH pruned AS (DELETE FROM sessions WHERE expires_at <= now())
		INSERT INTO sessions (id_hash, workspace_id, key_hash, csrf_token, expires_at)
		VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second')`,
		hashKey(id), ws, hashKey(token), randomToken(), int64(sessionTTL.Seconds()))
	if err != nil {
		c.fail(w, r, err)
		return
	}
	clearCookie(w, r, signInCookie)
	setCookie(w, r, sessionCookie, id, sessionTTL)
	http.Redirect(w, r, "/ui/", http.StatusSeeOther)
}

// signOut ends the session: its row is deleted, so no process accepts the cookie again.
func (c *console) signOut(w http.ResponseWriter, r *http.Request, se session) {
	if _, err := c.s.store.db.ExecContext(r.Context(), `DELETE FROM sessions WHERE id_hash = $1`, se.idHash); err != nil {
		c.fail(w, r, err)
		return
	}
	clearCookie(w, r, sessionCookie)
	http.Redirect(w, r, "/ui/sign-in", http.StatusSeeOther)
}

// overviewData is the overview page.
type overviewData struct {
	Stats       runStats // every run by status, from the counters (store.stats)
	OldestWait  string   // how long the longest-waiting due run has waited; "" when none
	LastHour    [3]int64 // finished in the last chartMinutes: succeeded, failed, canceled
	Chart       chart
	ChartMinute int
	Processes   []processRow // the live processes (admin only)
	LiveCount   int          // how many processes are live
}

// processRow is one live process on the overview.
type processRow struct {
	workerRow
	Age string // since its last heartbeat
}

// overview shows runs by status, the queue, the chart of runs finished per minute and the
// live processes. A workspace sees how many processes are live, not their hosts, pids and
// versions: those describe the operator's machines, as GET /v1/workers (admin) does.
func (c *console) overview(w http.ResponseWriter, r *http.Request, se session) {
	ctx := r.Context()
	d := overviewData{ChartMinute: chartMinutes}
	var err error
	if d.Stats, err = c.s.store.stats(ctx, se.workspace); err != nil {
		c.fail(w, r, err)
		return
	}
	oldest, err := c.oldestWait(ctx, se.scope())
	if err != nil {
		c.fail(w, r, err)
		return
	}
	if oldest.Valid {
		d.OldestWait = formatAge(time.Duration(oldest.Float64 * float64(time.Second)))
	}
	// One range scan of runs_finished_idx: its cost follows the last hour's throughput,
	// never the number of final runs in the table.
	rows, err := c.s.store.db.QueryContext(ctx, `
		SELECT floor(EXTRACT(EPOCH FROM now() - finished_at) / 60)::int, status, count(*)
		FROM runs WHERE status IN ('succeeded', 'failed', 'canceled') AND finished_at > now() - $2 * interval '1 minute'
		  AND ($1::uuid IS NULL OR workspace_id = $1)
		GROUP BY 1, 2`, se.scope(), chartMinutes)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	defer rows.Close()
	var perMinute [chartMinutes][3]int64 // minutes ago → succeeded, failed, canceled
	for rows.Next() {
		var ago int
		var status runStatus
		var n int64
		if err := rows.Scan(&ago, &status, &n); err != nil {
			c.fail(w, r, err)
			return
		}
		if ago < 0 || ago >= chartMinutes {
			continue
		}
		k := map[runStatus]int{statusSucceeded: 0, statusFailed: 1, statusCanceled: 2}[status]
		perMinute[ago][k] += n
		d.LastHour[k] += n
	}
	if err := rows.Err(); err != nil {
		c.fail(w, r, err)
		return
	}
	d.Chart = newChart(perMinute[:])
	workers, err := c.s.store.listWorkers(ctx, workerStaleAfter)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	d.LiveCount = len(workers)
	if se.admin {
		for _, wr := range workers {
			// Clamped: the database's clock stamped the beat, this process's measures it.
			d.Processes = append(d.Processes, processRow{wr, formatAge(max(0, time.Since(wr.HeartbeatAt))) + " ago"})
		}
	}
	p := se.layout("Overview", "overview", d)
	p.Live = true
	c.render(w, r, http.StatusOK, "overview", p)
}

// oldestWait is how long, in seconds, the longest-waiting run that could start (due, its
// agent not paused) has waited since it fell due, within scope (nil: every workspace); null
// when none. Usually one step down runs_due_queued_idx; when the oldest due run is a paused
// agent's, whose backlog may be long, the head of each priority of each unpaused agent in
// scope instead (runs_line_idx), so the cost follows the number of agents, never of runs.
func (c *console) oldestWait(ctx context.Context, scope any) (sql.NullFloat64, error) {
	var age sql.NullFloat64
	var paused bool
	err := c.s.store.db.QueryRowContext(ctx, `
		SELECT EXTRACT(EPOCH FROM now() - r.run_at), a.paused FROM runs r JOIN agents a ON a.id = r.agent_id
		WHERE (r.status = 'queued') IS TRUE AND r.priority >= 0 AND r.run_at <= now() AND ($1::uuid IS NULL OR r.workspace_id = $1)
		ORDER BY r.run_at LIMIT 1`, scope).Scan(&age, &paused)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && !paused) {
		return age, nil
	}
	if err != nil {
		return age, err
	}
	err = c.s.store.db.QueryRowContext(ctx, `
		SELECT EXTRACT(EPOCH FROM now() - min(h.run_at)) FROM agents a
		CROSS JOIN generate_series(0, $2::int) p
		CROSS JOIN LATERAL (SELECT r.run_at FROM runs r WHERE (r.status = 'queued') IS TRUE AND r.agent_id = a.id AND r.priority = p
		                    ORDER BY r.run_at LIMIT 1) h
		WHERE NOT a.paused AND ($1::uuid IS NULL OR a.workspace_id = $1) AND h.run_at <= now()`,
		scope, maxPriority).Scan(&age)
	return age, err
}

// chart is the overview's bar chart, laid out here so that the template only draws it.
type chart struct {
	Width, Height int
	ViewBox       string // the plot and, around it, room for the axes' labels
	Max           int64
	Bars          []bar
	Ticks         []tick // the time axis' labels
}

// tick is one label of the chart's time axis.
type tick struct {
	X      float64
	Label  string
	Anchor string // SVG text-anchor: the first and last labels stay inside the plot's width
}

// bar is one minute of the chart: a stack of up to three rectangles.
type bar struct {
	Label string // for the tooltip
	Rects []rect
}

// rect is one rectangle of a bar.
type rect struct {
	X, Y, W, H float64
	Class      string
}

// The chart's geometry, in SVG user units. It is drawn the width of its card (CSS), so
// these set its proportions: a wide strip whose labels stay readable on a laptop's screen.
const (
	chartWidth  = 1200
	chartHeight = 160
	barWidth    = chartWidth / chartMinutes
	chartLeft   = 48 // room for the count axis' labels
	chartBelow  = 24 // room for the time axis' labels
)

// newChart lays out the runs finished per minute (index: minutes ago; succeeded, failed,
// canceled), oldest minute on the left.
func newChart(perMinute [][3]int64) chart {
	ch := chart{Width: chartWidth, Height: chartHeight,
		ViewBox: fmt.Sprintf("%d -8 %d %d", -chartLeft, chartWidth+chartLeft+4, chartHeight+chartBelow+8)}
	for ago := len(perMinute); ago >= 0; ago -= 15 {
		t := tick{X: float64((len(perMinute) - ago) * barWidth), Label: fmt.Sprintf("%d min ago", ago), Anchor: "middle"}
		switch ago {
		case len(perMinute):
			t.Anchor = "start"
		case 0:
			t.Label, t.Anchor = "now", "end"
		}
		ch.Ticks = append(ch.Ticks, t)
	}
	for _, m := range perMinute {
		ch.Max = max(ch.Max, m[0]+m[1]+m[2])
	}
	classes := [3]string{"succeeded", "failed", "canceled"}
	for i := range perMinute {
		ago := len(perMinute) - 1 - i
		m := perMinute[ago]
		b := bar{Label: fmt.Sprintf("%d min ago: %d succeeded, %d failed, %d canceled", ago, m[0], m[1], m[2])}
		y := float64(chartHeight)
		for k, n := range m {
			if n == 0 || ch.Max == 0 {
				continue
			}
			h := float64(n) / float64(ch.Max) * chartHeight
			y -= h
			b.Rects = append(b.Rects, rect{X: float64(i * barWidth), Y: y, W: barWidth - 1, H: h, Class: classes[k]})
		}
		ch.Bars = append(ch.Bars, b)
	}
	return ch
}

// runsFilter is what the runs list shows, as its query string says.
type runsFilter struct {
	Status    string
	Agent     string
	Workspace string // admin only; "" for all
	Cursor    string
}

// query returns the filter as a query string, with cursor c.
func (f runsFilter) query(c string) string {
	v := url.Values{}
	for k, s := range map[string]string{"status": f.Status, "agent": f.Agent, "workspace": f.Workspace, "cursor": c} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if len(v) == 0 {
		return ""
	}
	return "?" + v.Encode()
}

// runsData is the runs list page.
type runsData struct {
	Filter     runsFilter
	Statuses   []runStatus
	Workspaces []workspace       // admin: the workspace filter's choices
	Names      map[string]string // admin: each listed workspace's label (workspaceLabels)
	Agents     []string          // the agent filter's choices: the agents' names in scope
	Runs       []consoleRun
	Next       string // the next page's URL; "" on the last page
	First      string // the first page's URL, when this is a later one
	// CancelQueued offers to cancel the queued runs these filters match: with no status
	// filter or queued, and for the admin once a workspace is chosen.
	CancelQueued bool
}

// runs lists runs newest first, filtered, one keyset page at a time: the cursor names the
// last run shown, never an offset, and nothing is counted.
func (c *console) runs(w http.ResponseWriter, r *http.Request, se session) {
	q := r.URL.Query()
	f := runsFilter{Status: q.Get("status"), Agent: q.Get("agent"), Cursor: q.Get("cursor")}
	if se.admin {
		f.Workspace = q.Get("workspace")
	}
	d := runsData{Filter: f, Statuses: allStatuses}
	if err := checkStatusFilter(f.Status); err != nil {
		c.fail(w, r, err)
		return
	}
	d.CancelQueued = (f.Status == "" || runStatus(f.Status) == statusQueued) && (!se.admin || f.Workspace != "")
	scope := se.scope()
	if f.Workspace != "" {
		if !isUUID(f.Workspace) {
			c.fail(w, r, invalid("workspace must be a workspace id"))
			return
		}
		scope = strings.ToLower(f.Workspace)
	}
	ctx := r.Context()
	before := int64(newestFirst)
	if f.Cursor != "" {
		id, ok := decodeCursor(f.Cursor)
		if ok {
			// The cursor must name a run this session may see.
			err := c.s.store.db.QueryRowContext(ctx, `SELECT seq FROM runs WHERE id = $1
				AND ($2::uuid IS NULL OR workspace_id = $2)`, id, se.scope()).Scan(&before)
			ok = err == nil
			if err != nil && !errors.Is(err, sql.ErrNoRows) {
				c.fail(w, r, err)
				return
			}
		}
		if !ok {
			c.fail(w, r, errBadCursor)
			return
		}
		d.First = "/ui/runs" + f.query("")
	}
	// Newest first over the workspaces in scope (every workspace's when scope is nil): a
	// page reads at most runsPageSize+1 index entries per status and agent, however many
	// runs there are.
	var ids any // null: every workspace
	if scope != nil {
		ids = pq.StringArray{scope.(string)}
	}
	rows, err := c.s.store.queryPrepared(ctx, `SELECT `+runColumns+`
		FROM agentapp_runs_page($1, $3, $4, $2, $5) r JOIN agents a ON a.id = r.agent_id
		ORDER BY r.seq DESC`, ids, before, statusList(f.Status), f.Agent, runsPageSize+1)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		run, err := scanRun(rows)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		d.Runs = append(d.Runs, consoleRun{runRecord: run})
	}
	if err := rows.Err(); err != nil {
		c.fail(w, r, err)
		return
	}
	if len(d.Runs) > runsPageSize {
		d.Runs = d.Runs[:runsPageSize]
		d.Next = "/ui/runs" + f.query(encodeCursor(d.Runs[runsPageSize-1].ID))
	}
	if err := c.explainWaits(ctx, d.Runs); err != nil {
		c.fail(w, r, err)
		return
	}
	if se.admin {
		if d.Workspaces, d.Names, err = c.workspaces(ctx); err != nil {
			c.fail(w, r, err)
			return
		}
	}
	if d.Agents, err = c.agentNames(ctx, scope); err != nil {
		c.fail(w, r, err)
		return
	}
	if f.Agent != "" && !slices.Contains(d.Agents, f.Agent) {
		d.Agents = append(d.Agents, f.Agent) // an agent deleted, or beyond the list: still the filter
	}
	c.render(w, r, http.StatusOK, "runs", se.layout("Runs", "runs", d))
}

// consoleRun is a run as the runs list and the run page show it.
type consoleRun struct {
	runRecord
	Wait string // why a queued run has not started yet (waitReason), or what a waiting run waits for
}

// waitSummary says in a few words what a waiting run's waiting_for is.
func waitSummary(raw json.RawMessage) (summary, signal string) {
	var w waitSpec
	if json.Unmarshal(raw, &w) != nil {
		return "waits", ""
	}
	switch {
	case w.SleepMS != nil:
		return fmt.Sprintf("sleeps %d ms", *w.SleepMS), ""
	case w.Signal != nil && w.TimeoutMS != nil:
		return fmt.Sprintf("waits for signal %s (timeout %d ms)", *w.Signal, *w.TimeoutMS), *w.Signal
	case w.Signal != nil:
		return "waits for signal " + *w.Signal, *w.Signal
	case w.Runs != nil:
		return fmt.Sprintf("waits for %d child run(s)", len(w.Runs)), ""
	}
	return "waits", ""
}

// agentLoad is what decides whether an agent's queued runs may start.
type agentLoad struct {
	paused  bool
	cap     sql.NullInt64 // max_concurrency; null: none
	running int64         // its running runs, counted up to cap
}

// explainWaits sets the Wait of each queued run in runs, from its own row and its agent's:
// one query for the agents of the queued runs, each running count bounded by the agent's
// cap (a range of runs_list_idx), as the claim counts them.
func (c *console) explainWaits(ctx context.Context, runs []consoleRun) error {
	var wss, names []string
	for i, r := range runs {
		if r.Status == statusWaiting {
			runs[i].Wait, _ = waitSummary(r.WaitingFor)
		}
		if r.Status == statusQueued {
			wss, names = append(wss, r.WorkspaceID), append(names, r.Agent)
		}
	}
	if len(wss) == 0 {
		return nil
	}
	rows, err := c.s.store.db.QueryContext(ctx, `
		SELECT a.workspace_id, a.name, a.paused, a.max_concurrency,
		       CASE WHEN a.max_concurrency IS NULL THEN 0 ELSE
		         (SELECT count(*) FROM (SELECT 1 FROM runs r WHERE r.status = 'running' AND r.workspace_id = a.workspace_id
		                                  AND r.agent_id = a.id LIMIT a.max_concurrency) q) END
		FROM agents a
		WHERE (a.workspace_id, a.name) IN (SELECT * FROM unnest($1::uuid[], $2::text[]))`,
		pq.StringArray(wss), pq.StringArray(names))
	if err != nil {
		return err
	}
	defer rows.Close()
	loads := map[[2]string]agentLoad{}
	for rows.Next() {
		var ws, name string
		var l agentLoad
		if err := rows.Scan(&ws, &name, &l.paused, &l.cap, &l.running); err != nil {
			return err
		}
		loads[[2]string{ws, name}] = l
	}
	if err := rows.Err(); err != nil {
		return err
	}
	now := time.Now()
	for i, r := range runs {
		if r.Status == statusQueued {
			runs[i].Wait = waitReason(r.RunAt, loads[[2]string{r.WorkspaceID, r.Agent}], now)
		}
	}
	return nil
}

// waitReason says why a queued run due at runAt, of an agent in state l, does not start:
// "due in 3h" before its time, "agent paused", "agent at its cap"; "" when nothing holds
// it but a free slot in some worker (or its workspace's turn).
func waitReason(runAt time.Time, l agentLoad, now time.Time) string {
	switch {
	case runAt.After(now):
		return "due in " + formatIn(runAt.Sub(now))
	case l.paused:
		return "agent paused"
	case l.cap.Valid && l.running >= l.cap.Int64:
		return "agent at its cap"
	}
	return ""
}

// formatIn shows a time ahead in its largest unit, rounded: "3h", "12m", "1d", "5s".
func formatIn(d time.Duration) string {
	for _, u := range []struct {
		d    time.Duration
		name string
	}{{24 * time.Hour, "d"}, {time.Hour, "h"}, {time.Minute, "m"}} {
		if d >= u.d {
			return fmt.Sprintf("%d%s", (d+u.d/2)/u.d, u.name)
		}
	}
	return fmt.Sprintf("%ds", max(1, (d+time.Second/2)/time.Second))
}

// agentNames returns the names of the agents in scope (nil: every workspace's, each name
// once), the first agentsPageLimit by name.
func (c *console) agentNames(ctx context.Context, scope any) ([]string, error) {
	rows, err := c.s.store.db.QueryContext(ctx, `SELECT DISTINCT name FROM agents
		WHERE $1::uuid IS NULL OR workspace_id = $1 ORDER BY name LIMIT $2`, scope, agentsPageLimit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		names = append(names, n)
	}
	return names, rows.Err()
}

// workspaces returns the first workspacesListLimit workspaces by name, and their labels by
// id: the name, and where two share it, the start of the id too ("prod 3f2a9c1e").
func (c *console) workspaces(ctx context.Context) ([]workspace, map[string]string, error) {
	rows, err := c.s.store.db.QueryContext(ctx,
		`SELECT id, name, created_at FROM workspaces ORDER BY name, id LIMIT $1`, workspacesListLimit)
	if err != nil {
		return nil, nil, err
	}
	defer rows.Close()
	var list []workspace
	uses := map[string]int{}
	for rows.Next() {
		var ws workspace
		if err := rows.Scan(&ws.ID, &ws.Name, &ws.CreatedAt); err != nil {
			return nil, nil, err
		}
		list = append(list, ws)
		uses[ws.Name]++
	}
	labels := map[string]string{}
	for _, ws := range list {
		labels[ws.ID] = ws.Name
		if uses[ws.Name] > 1 {
			labels[ws.ID] += " " + ws.ID[:8]
		}
	}
	return list, labels, rows.Err()
}

// runData is one run's page.
type runData struct {
	Run        consoleRun
	Errors     []attemptError
	Workspace  string // the run's workspace name (admin)
	Events     []consoleEvent
	MoreEvents bool   // the run has more than runEventsShown events
	Took       string // how long its latest attempt took, or has been running; "" before one
	EventsCap  int
	Attempts   int         // the most attempts one retry may add
	Signal     string      // the signal a waiting run waits for; "" when none
	Children   []runRecord // its child runs, newest first (up to childrenShown)
}

// childrenShown is how many of a run's children its page lists: a wait makes at most
// maxChildren, and the API's ?parent= pages through all of them.
const childrenShown = maxChildren

// consoleEvent is one progress event as the run page shows it.
type consoleEvent struct {
	Seq, Attempt int
	At           time.Time
	Type         string
	Data         string // its first eventDataShown characters
	Cut          bool   // Data is longer than shown
}

// runEvents returns the first runEventsShown events of run id, oldest first, and whether
// there are more: one range of run_events' primary key.
func (c *console) runEvents(ctx context.Context, id string) ([]consoleEvent, bool, error) {
	rows, err := c.s.store.db.QueryContext(ctx, `
		SELECT seq, attempt, at, type, left(data::text, $3), length(data::text) > $3
		FROM run_events WHERE run_id = $1 ORDER BY seq LIMIT $2`, id, runEventsShown+1, eventDataShown)
	if err != nil {
		return nil, false, err
	}
	defer rows.Close()
	var events []consoleEvent
	for rows.Next() {
		var e consoleEvent
		if err := rows.Scan(&e.Seq, &e.Attempt, &e.At, &e.Type, &e.Data, &e.Cut); err != nil {
			return nil, false, err
		}
		events = append(events, e)
	}
	if err := rows.Err(); err != nil {
		return nil, false, err
	}
	if len(events) > runEventsShown {
		return events[:runEventsShown], true, nil
	}
	return events, false, nil
}

// attemptError is one failed attempt of a run, as its errors array holds it.
type attemptError struct {
	Attempt int       `json:"attempt"`
	At      time.Time `json:"at"`
	Message string    `json:"message"`
}

// findRun returns a run this session may see: its own workspace's, or for the admin any.
func (c *console) findRun(ctx context.Context, se session, id string) (runRecord, error) {
	if !isUUID(id) {
		return runRecord{}, fmt.Errorf("%w: no such run", errNotFound)
	}
	ws := se.workspace
	if se.admin {
		err := c.s.store.db.QueryRowContext(ctx, `SELECT workspace_id FROM runs WHERE id = $1`, id).Scan(&ws)
		if errors.Is(err, sql.ErrNoRows) {
			return runRecord{}, fmt.Errorf("%w: no such run", errNotFound)
		}
		if err != nil {
			return runRecord{}, err
		}
	}
	run, err := c.s.store.getRun(ctx, ws, id)
	if errors.Is(err, errNotFound) {
		err = fmt.Errorf("%w: no such run", errNotFound)
	}
	return run, err
}

// run shows one run: input, output, error history, timeline and actions.
func (c *console) run(w http.ResponseWriter, r *http.Request, se session) {
	run, err := c.findRun(r.Context(), se, r.PathValue("id"))
	if err != nil {
		c.fail(w, r, err)
		return
	}
	shown := []consoleRun{{runRecord: run}}
	if err := c.explainWaits(r.Context(), shown); err != nil {
		c.fail(w, r, err)
		return
	}
	d := runData{Run: shown[0], EventsCap: runEventsShown, Attempts: maxRunAttempts}
	if run.Status == statusWaiting {
		_, d.Signal = waitSummary(run.WaitingFor)
	}
	if d.Children, _, err = c.s.store.listRuns(r.Context(), run.WorkspaceID, "", "", "", run.ID, childrenShown, ""); err != nil {
		c.fail(w, r, err)
		return
	}
	if run.StartedAt != nil {
		switch {
		case run.FinishedAt != nil:
			d.Took = "took " + run.FinishedAt.Sub(*run.StartedAt).Round(time.Millisecond).String()
		case run.Status == statusRunning:
			d.Took = "running for " + max(0, time.Since(*run.StartedAt)).Round(time.Millisecond).String()
		}
	}
	if err := json.Unmarshal(run.Errors, &d.Errors); err != nil {
		c.fail(w, r, err)
		return
	}
	if se.admin {
		ws, _, err := c.s.store.getWorkspace(r.Context(), run.WorkspaceID)
		if err != nil {
			c.fail(w, r, err)
			return
		}
		d.Workspace = ws.Name
	}
	if d.Events, d.MoreEvents, err = c.runEvents(r.Context(), run.ID); err != nil {
		c.fail(w, r, err)
		return
	}
	c.render(w, r, http.StatusOK, "run", se.layout("Run "+run.ID, "runs", d))
}

// cancelRun cancels a run as the API's cancel does, then shows it again.
func (c *console) cancelRun(w http.ResponseWriter, r *http.Request, se session) {
	run, err := c.findRun(r.Context(), se, r.PathValue("id"))
	if err != nil {
		c.fail(w, r, err)
		return
	}
	run, err = c.s.store.cancelRun(r.Context(), run.WorkspaceID, run.ID)
	if errors.Is(err, errConflict) {
		err = fmt.Errorf("%w: run is already %s", errConflict, run.Status)
	}
	if err != nil {
		c.fail(w, r, err)
		return
	}
	flash := "canceled"
	if run.Status == statusRunning {
		c.s.worker.cancelLocal(run.ID) // other processes hear of it through the notification
		flash = "cancel-requested"
	}
	http.Redirect(w, r, withFlash("/ui/runs/"+run.ID, flash, 0), http.StatusSeeOther)
}

// signalRun sends a waiting run the signal it waits for, as the API's signal does, with the
// form's JSON data (null when the field is empty): the operator's "approve" button.
func (c *console) signalRun(w http.ResponseWriter, r *http.Request, se session) {
	req := signalRequest{Name: r.PostForm.Get("name")}
	if v := strings.TrimSpace(r.PostForm.Get("data")); v != "" {
		if !json.Valid([]byte(v)) {
			c.fail(w, r, invalid("data must be JSON (or empty for null)"))
			return
		}
		req.Data = json.RawMessage(v)
	}
	data, err := signalData(req)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	run, err := c.findRun(r.Context(), se, r.PathValue("id"))
	if err != nil {
		c.fail(w, r, err)
		return
	}
	if _, err := c.s.store.signalRun(r.Context(), run.WorkspaceID, run.ID, req.Name, data); err != nil {
		c.fail(w, r, err)
		return
	}
	http.Redirect(w, r, withFlash("/ui/runs/"+run.ID, "signaled", 0), http.StatusSeeOther)
}

// retryRun puts a failed or canceled run back to queued as the API's retry does, with the
// form's attempts more attempts (1 when the field is empty), then shows it again.
func (c *console) retryRun(w http.ResponseWriter, r *http.Request, se session) {
	attempts := 1
	if v := r.PostForm.Get("attempts"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			n = 0 // not a number: refused as out of range
		}
		if err := inRange("attempts", &n, 1, maxRunAttempts, &attempts); err != nil {
			c.fail(w, r, err)
			return
		}
	}
	run, err := c.findRun(r.Context(), se, r.PathValue("id"))
	if err != nil {
		c.fail(w, r, err)
		return
	}
	run, err = c.s.store.retryRun(r.Context(), run.WorkspaceID, run.ID, attempts)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	http.Redirect(w, r, withFlash("/ui/runs/"+run.ID, "retried", int64(attempts)), http.StatusSeeOther)
}

// cancelQueued cancels the queued runs that the runs list's filters (posted with the form)
// match, through the bulk cancel the API uses, then shows the list again. The admin must
// have chosen a workspace: one click never cancels every tenant's runs.
func (c *console) cancelQueued(w http.ResponseWriter, r *http.Request, se session) {
	f := runsFilter{Status: r.PostForm.Get("status"), Agent: r.PostForm.Get("agent")}
	if f.Status != "" && runStatus(f.Status) != statusQueued {
		c.fail(w, r, invalid("status must be queued or absent: only queued runs are canceled here"))
		return
	}
	ws := se.workspace
	if se.admin {
		f.Workspace = strings.ToLower(r.PostForm.Get("workspace"))
		if !isUUID(f.Workspace) {
			c.fail(w, r, invalid("workspace must be a workspace id: choose a workspace to cancel its queued runs"))
			return
		}
		if _, _, err := c.s.store.getWorkspace(r.Context(), f.Workspace); err != nil {
			c.fail(w, r, err)
			return
		}
		ws = f.Workspace
	}
	var agent *string
	if f.Agent != "" {
		agent = &f.Agent
	}
	n, _, err := c.s.store.cancelRuns(r.Context(), ws, agent, []runStatus{statusQueued})
	if err != nil {
		c.fail(w, r, err)
		return
	}
	http.Redirect(w, r, withFlash("/ui/runs"+f.query(""), "canceled-queued", n), http.StatusSeeOther)
}

// setPaused returns the action that pauses (or resumes) an agent, as the API's PATCH of
// paused does, then shows the agents again.
func (c *console) setPaused(paused bool) func(http.ResponseWriter, *http.Request, session) {
	flash := map[bool]string{true: "paused", false: "resumed"}[paused]
	return func(w http.ResponseWriter, r *http.Request, se session) {
		id := r.PathValue("id")
		var ws, name string
		err := sql.ErrNoRows
		if isUUID(id) {
			err = c.s.store.db.QueryRowContext(r.Context(), `SELECT workspace_id, name FROM agents
				WHERE id = $1 AND ($2::uuid IS NULL OR workspace_id = $2)`, id, se.scope()).Scan(&ws, &name)
		}
		if errors.Is(err, sql.ErrNoRows) {
			err = fmt.Errorf("%w: no such agent", errNotFound)
		}
		if err == nil {
			_, err = c.s.store.updateAgent(r.Context(), ws, name, agentPatch{Paused: &paused})
		}
		if err == nil {
			c.s.announce.claimable(ws, keepPlace)
		}
		if err != nil {
			c.fail(w, r, err)
			return
		}
		http.Redirect(w, r, withFlash("/ui/agents", flash, 0), http.StatusSeeOther)
	}
}

// agentRow is one agent on the agents page.
type agentRow struct {
	ID, WorkspaceID, Workspace string
	Name, Kind                 string
	Config                     json.RawMessage
	MaxConcurrency             sql.NullInt64
	KeyConcurrency             int           // runs of one concurrency_key at once
	OnKeyConflict              string        // queue, cancel_running or reject
	RateLimit, RatePeriodMS    sql.NullInt64 // units per period; null: no rate limit
	Paused                     bool
	ThrottledUntil             *time.Time // a webhook's Retry-After holds its attempts until then; nil: not throttled
	Queued, Running            int64      // capped at agentCountCap+1
}

// agentsData is the agents page.
type agentsData struct {
	Agents    []agentRow
	CountCap  int
	Truncated bool // more than agentsPageLimit agents
}

// agents lists the agents with their queued and running counts, each count bounded.
func (c *console) agents(w http.ResponseWriter, r *http.Request, se session) {
	rows, err := c.s.store.db.QueryContext(r.Context(), `
		SELECT a.id, a.workspace_id, w.name, a.name, a.kind, a.config, a.max_concurrency, a.key_concurrency,
		       a.on_key_conflict, a.rate_limit, a.rate_period_ms, a.paused,
		       CASE WHEN a.throttled_until > now() THEN a.throttled_until END,
		       (SELECT count(*) FROM (SELECT 1 FROM runs r WHERE r.agent_id = a.id AND (r.status = 'queued') IS TRUE LIMIT $2) q),
		       (SELECT count(*) FROM (SELECT 1 FROM runs r WHERE r.status = 'running' AND r.workspace_id = a.workspace_id
		                                AND r.agent_id = a.id LIMIT $2) q)
		FROM agents a JOIN workspaces w ON w.id = a.workspace_id
		WHERE $1::uuid IS NULL OR a.workspace_id = $1
		ORDER BY w.name, w.id, a.name LIMIT $3`, se.scope(), agentCountCap+1, agentsPageLimit+1)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	defer rows.Close()
	d := agentsData{CountCap: agentCountCap}
	for rows.Next() {
		var a agentRow
		if err := rows.Scan(&a.ID, &a.WorkspaceID, &a.Workspace, &a.Name, &a.Kind, &a.Config, &a.MaxConcurrency,
			&a.KeyConcurrency, &a.OnKeyConflict, &a.RateLimit, &a.RatePeriodMS, &a.Paused, &a.ThrottledUntil, &a.Queued, &a.Running); err != nil {
			c.fail(w, r, err)
			return
		}
		d.Agents = append(d.Agents, a)
	}
	if err := rows.Err(); err != nil {
		c.fail(w, r, err)
		return
	}
	if len(d.Agents) > agentsPageLimit {
		d.Agents, d.Truncated = d.Agents[:agentsPageLimit], true
	}
	c.render(w, r, http.StatusOK, "agents", se.layout("Agents", "agents", d))
}

// formatTime shows a time in UTC to the millisecond (runs start and end within one second
// of each other); a nil or zero time as "—".
func formatTime(v any) string {
	var t time.Time
	switch x := v.(type) {
	case time.Time:
		t = x
	case *time.Time:
		if x != nil {
			t = *x
		}
	}
	if t.IsZero() {
		return "—"
	}
	return t.UTC().Format("2006-01-02 15:04:05.000Z")
}

// formatAge shows a duration to the second, or to the millisecond under one second.
func formatAge(d time.Duration) string {
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

// prettyJSON indents a JSON value for a <pre>; a missing value is "null".
func prettyJSON(v json.RawMessage) string {
	if len(v) == 0 {
		return "null"
	}
	var buf bytes.Buffer
	if json.Indent(&buf, v, "", "  ") != nil {
		return string(v)
	}
	return buf.String()
}

// clip shows the first n characters of a message (nil: ""), with "…" when it is longer.
func clip(msg *string, n int) string {
	if msg == nil {
		return ""
	}
	if r := []rune(*msg); len(r) > n {
		return string(r[:n]) + "…"
	}
	return *msg
}

// present reports whether a JSON value is there to show: not missing, not null.
func present(v json.RawMessage) bool {
	return len(v) > 0 && string(v) != "null"
}

// capped shows a count that stopped at limit+1 as "limit+".
func capped(n int64, limit int) string {
	if n > int64(limit) {
		return strconv.Itoa(limit) + "+"
	}
	return strconv.FormatInt(n, 10)
}

// setSchedulePaused pauses or resumes a schedule of the session's scope, by id, as the
// API's PATCH does.
func (c *console) setSchedulePaused(paused bool) func(http.ResponseWriter, *http.Request, session) {
	flash := map[bool]string{true: "schedule-paused", false: "schedule-resumed"}[paused]
	return func(w http.ResponseWriter, r *http.Request, se session) {
		id := r.PathValue("id")
		var ws, name string
		err := sql.ErrNoRows
		if isUUID(id) {
			err = c.s.store.db.QueryRowContext(r.Context(), `SELECT workspace_id, name FROM schedules
				WHERE id = $1 AND ($2::uuid IS NULL OR workspace_id = $2)`, id, se.scope()).Scan(&ws, &name)
		}
		if errors.Is(err, sql.ErrNoRows) {
			err = fmt.Errorf("%w: no such schedule", errNotFound)
		}
		if err == nil {
			_, err = c.s.patchSchedule(r.Context(), ws, name, scheduleRequest{Paused: &paused})
		}
		if err != nil {
			c.fail(w, r, err)
			return
		}
		http.Redirect(w, r, withFlash("/ui/schedules", flash, 0), http.StatusSeeOther)
	}
}

// scheduleRow is one schedule on the schedules page.
type scheduleRow struct {
	schedule
	Workspace string
}

// schedulesData is the schedules page.
type schedulesData struct {
	Schedules []scheduleRow
	Truncated bool // more than agentsPageLimit schedules
}

// schedules lists the schedules in scope, the first agentsPageLimit by workspace and name.
func (c *console) schedules(w http.ResponseWriter, r *http.Request, se session) {
	rows, err := c.s.store.db.QueryContext(r.Context(), `SELECT `+scheduleColumns+`,
		(SELECT w.name FROM workspaces w WHERE w.id = schedules.workspace_id)
		FROM schedules WHERE $1::uuid IS NULL OR workspace_id = $1
		ORDER BY workspace_id, schedules.name LIMIT $2`, se.scope(), agentsPageLimit+1)
	if err != nil {
		c.fail(w, r, err)
		return
	}
	defer rows.Close()
	var d schedulesData
	for rows.Next() {
		var row scheduleRow
		var workspace string
		sc, err := scanSchedule(scanExtra{rows, &workspace})
		if err != nil {
			c.fail(w, r, err)
			return
		}
		row.schedule, row.Workspace = sc, workspace
		d.Schedules = append(d.Schedules, row)
	}
	if err := rows.Err(); err != nil {
		c.fail(w, r, err)
		return
	}
	if len(d.Schedules) > agentsPageLimit {
		d.Schedules, d.Truncated = d.Schedules[:agentsPageLimit], true
	}
	c.render(w, r, http.StatusOK, "schedules", se.layout("Schedules", "schedules", d))
}

// scanExtra scans a row that has more columns than its reader knows into extra.
type scanExtra struct {
	rows  *sql.Rows
	extra *string
}

// Scan scans dst and then extra.
func (s scanExtra) Scan(dst ...any) error { return s.rows.Scan(append(dst, s.extra)...) }
