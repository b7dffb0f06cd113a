package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// chunked hides the length of s from net/http, so the request is sent chunked.
func chunked(s string) io.Reader { return io.MultiReader(strings.NewReader(s)) }

// checkAPIError fails the test unless the answer is the API's error format with the
// given status (and code, when not empty): exactly {"error":{"code","message"}}.
func checkAPIError(t testing.TB, what string, status int, hdr http.Header, body []byte, wantStatus int, wantCode string) {
	t.Helper()
	if status != wantStatus {
		t.Errorf("%s: got status %d; want %d; body %.300s", what, status, wantStatus, body)
		return
	}
	if ct := hdr.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: got Content-Type %q; want application/json", what, ct)
	}
	var e struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		t.Errorf("%s: got body %.300s (%v); want {\"error\":{\"code\",\"message\"}}", what, body, err)
		return
	}
	if e.Error.Code == "" || e.Error.Message == "" {
		t.Errorf("%s: got error %+v; want a code and a message", what, e.Error)
	}
	if wantCode != "" && e.Error.Code != wantCode {
		t.Errorf("%s: got code %q; want %q (message %q)", what, e.Error.Code, wantCode, e.Error.Message)
	}
}

// runList is the answer of GET …/runs.
type runList struct {
	Runs       []runRecord `json:"runs"`
	NextCursor *string     `json:"next_cursor"`
}

// listAllRuns follows next_cursor from the first page of GET …/runs?query to the last
// and returns every run in the order the pages gave them, and the number of pages.
func listAllRuns(t testing.TB, a *app, ws testWorkspace, query string) ([]runRecord, int) {
	t.Helper()
	var all []runRecord
	cursor := ""
	for pages := 1; ; pages++ {
		path := "/v1/workspaces/" + ws.ID + "/runs?" + query
		if cursor != "" {
			path += "&cursor=" + cursor
		}
		var l runList
		a.mustDo(t, "GET", path, ws.APIKey, nil, 200, &l)
		all = append(all, l.Runs...)
		if l.NextCursor == nil {
			return all, pages
		}
		if pages > 100 {
			t.Fatalf("GET runs?%s: got a next_cursor after 100 pages; want the last page sooner", query)
		}
		cursor = *l.NextCursor
	}
}

// runIDs returns the ids of runs.
func runIDs(runs []runRecord) []string {
	ids := make([]string, len(runs))
	for i, r := range runs {
		ids[i] = r.ID
	}
	return ids
}

const unknownUUID = "00000000-0000-4000-8000-000000000000"

// TestAPIErrors: every client mistake gets the error format and its documented status
// (400 malformed, 413 too big, 404 unknown path or id, 405 wrong method, 409 conflict,
// 422 invalid value), and none of them is a 500.
func TestAPIErrors(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	run := a.createRun(t, ws, "echo", 1)
	wsPath := "/v1/workspaces/" + ws.ID
	runs := wsPath + "/runs"
	big := `{"agent":"echo","input":"` + strings.Repeat("a", 2<<20) + `"}`
	padded := `{"agent":"echo","input":1}` + strings.Repeat(" ", 2<<20)

	cases := []struct {
		name         string
		method, path string
		token        string // "" means the workspace's key; "-" none
		hdr          map[string]string
		body         io.Reader
		status       int
		code         string
	}{
		{name: "malformed JSON", method: "POST", path: runs, body: strings.NewReader(`{"agent":`), status: 400, code: "bad_request"},
		{name: "malformed JSON unquoted key", method: "POST", path: runs, body: strings.NewReader(`{agent:"echo"}`), status: 400},
		{name: "malformed input value", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","input":tru}`), status: 400},
		{name: "unknown field", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","inptu":1}`), status: 400, code: "bad_request"},
		{name: "unknown field in workspace", method: "POST", path: "/v1/workspaces", token: testAdminToken, body: strings.NewReader(`{"name":"x","extra":1}`), status: 400},
		{name: "unknown field in agent", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"x","kind":"echo","cfg":{}}`), status: 400},
		{name: "unknown field in batch", method: "POST", path: runs + "/batch", body: strings.NewReader(`{"runs":[{"agent":"echo","x":1}]}`), status: 400},
		{name: "unknown field in process", method: "POST", path: "/v1/worker/process", token: testAdminToken, body: strings.NewReader(`{"limt":1}`), status: 400},
		{name: "trailing object", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo"} {}`), status: 400, code: "bad_request"},
		{name: "trailing garbage", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo"}x`), status: 400},
		{name: "empty body", method: "POST", path: runs, body: strings.NewReader(""), status: 400, code: "bad_request"},
		{name: "no body", method: "POST", path: runs, status: 400},
		{name: "whitespace body", method: "POST", path: runs, body: strings.NewReader(" \n"), status: 400},
		{name: "wrong type agent", method: "POST", path: runs, body: strings.NewReader(`{"agent":1}`), status: 422, code: "invalid"},
		{name: "wrong type max_attempts", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","max_attempts":"3"}`), status: 422},
		{name: "fractional max_attempts", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","max_attempts":2.5}`), status: 422},
		{name: "body is an array", method: "POST", path: runs, body: strings.NewReader(`[]`), status: 422},
		{name: "batch runs not an array", method: "POST", path: runs + "/batch", body: strings.NewReader(`{"runs":{}}`), status: 422},
		{name: "over 1 MiB with Content-Length", method: "POST", path: runs, body: strings.NewReader(big), status: 413, code: "payload_too_large"},
		{name: "over 1 MiB chunked", method: "POST", path: runs, body: chunked(big), status: 413, code: "payload_too_large"},
		{name: "over 1 MiB of trailing space chunked", method: "POST", path: runs, body: chunked(padded), status: 413, code: "payload_too_large"},
		{name: "over 1 MiB agent chunked", method: "POST", path: wsPath + "/agents", body: chunked(`{"name":"` + strings.Repeat("n", 2<<20) + `"}`), status: 413},
		{name: "over 1 MiB batch chunked", method: "POST", path: runs + "/batch", body: chunked(`{"runs":[` + strings.Repeat(`{"agent":"echo"},`, 80000) + `{"agent":"echo"}]}`), status: 413},
		{name: "workspace id not a UUID", method: "GET", path: "/v1/workspaces/not-a-uuid", status: 404, code: "not_found"},
		{name: "workspace id not a UUID as admin", method: "GET", path: "/v1/workspaces/123", token: testAdminToken, status: 404},
		{name: "workspace id not a UUID on runs", method: "POST", path: "/v1/workspaces/zz/runs", body: strings.NewReader(`{"agent":"echo"}`), status: 404},
		{name: "run id not a UUID", method: "GET", path: runs + "/not-a-uuid", status: 404, code: "not_found"},
		{name: "run id almost a UUID", method: "GET", path: runs + "/" + run.ID[:35] + "g", status: 404},
		{name: "run id not a UUID on cancel", method: "POST", path: runs + "/42/cancel", status: 404},
		{name: "unknown run", method: "GET", path: runs + "/" + unknownUUID, status: 404, code: "not_found"},
		{name: "cancel unknown run", method: "POST", path: runs + "/" + unknownUUID + "/cancel", status: 404},
		{name: "unknown route", method: "GET", path: "/v1/nothing", status: 404, code: "not_found"},
		{name: "unknown route without a token", method: "GET", path: "/v1/nothing", token: "-", status: 401, code: "unauthorized"},
		{name: "unknown route at the root", method: "GET", path: "/nothing", token: "-", status: 404}, // "/" itself leads to the console (TestRootRedirectsToConsole)
		{name: "unknown route under a workspace", method: "GET", path: wsPath + "/nothing", status: 404},
		{name: "wrong method on runs", method: "DELETE", path: runs, status: 405, code: "method_not_allowed"},
		{name: "wrong method on workspaces", method: "GET", path: "/v1/workspaces", token: testAdminToken, status: 405},
		{name: "wrong method on healthz", method: "PUT", path: "/healthz", token: "-", status: 405},
		{name: "wrong method on metrics", method: "POST", path: "/metrics", token: "-", status: 405},
		{name: "max_attempts 0", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","max_attempts":0}`), status: 422, code: "invalid"},
		{name: "max_attempts 26", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","max_attempts":26}`), status: 422},
		{name: "max_attempts -1", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","max_attempts":-1}`), status: 422},
		{name: "max_attempts overflows int", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","max_attempts":99999999999999999999}`), status: 422},
		{name: "agent missing", method: "POST", path: runs, body: strings.NewReader(`{"input":1}`), status: 422},
		{name: "limit 0", method: "GET", path: runs + "?limit=0", status: 422, code: "invalid"},
		{name: "limit 201", method: "GET", path: runs + "?limit=201", status: 422},
		{name: "limit abc", method: "GET", path: runs + "?limit=abc", status: 422},
		{name: "cursor abc", method: "GET", path: runs + "?cursor=abc", status: 422},
		{name: "cursor 0", method: "GET", path: runs + "?cursor=0", status: 422},
		{name: "cursor -5", method: "GET", path: runs + "?cursor=-5", status: 422},
		{name: "wait_ms -1", method: "GET", path: runs + "/" + run.ID + "?wait_ms=-1", status: 422, code: "invalid"},
		{name: "wait_ms 60001", method: "GET", path: runs + "/" + run.ID + "?wait_ms=60001", status: 422},
		{name: "wait_ms abc", method: "GET", path: runs + "/" + run.ID + "?wait_ms=abc", status: 422},
		{name: "bad status filter", method: "GET", path: runs + "?status=done", status: 422, code: "invalid"},
		{name: "status filter wrong case", method: "GET", path: runs + "?status=QUEUED", status: 422},
		{name: "unknown agent", method: "POST", path: runs, body: strings.NewReader(`{"agent":"nope","input":1}`), status: 422, code: "unknown_agent"},
		{name: "unknown agent in batch", method: "POST", path: runs + "/batch", body: strings.NewReader(`{"runs":[{"agent":"echo"},{"agent":"nope"}]}`), status: 422, code: "unknown_agent"},
		{name: "invalid run in batch", method: "POST", path: runs + "/batch", body: strings.NewReader(`{"runs":[{"agent":"echo"},{"agent":"echo","max_attempts":26}]}`), status: 422},
		{name: "empty batch", method: "POST", path: runs + "/batch", body: strings.NewReader(`{"runs":[]}`), status: 422},
		{name: "batch without runs", method: "POST", path: runs + "/batch", body: strings.NewReader(`{}`), status: 422},
		{name: "Idempotency-Key too long", method: "POST", path: runs, hdr: map[string]string{"Idempotency-Key": strings.Repeat("k", 256)}, body: strings.NewReader(`{"agent":"echo"}`), status: 422},
		{name: "unknown key in echo config", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"e2","kind":"echo","config":{"delay":5}}`), status: 422, code: "invalid"},
		{name: "unknown key in webhook config", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"w","kind":"webhook","config":{"url":"http://127.0.0.1:1/","retries":3}}`), status: 422},
		{name: "delay_ms out of range", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"e2","kind":"echo","config":{"delay_ms":600001}}`), status: 422},
		{name: "delay_ms negative", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"e2","kind":"echo","config":{"delay_ms":-1}}`), status: 422},
		{name: "delay_ms wrong type", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"e2","kind":"echo","config":{"delay_ms":"5"}}`), status: 422},
		{name: "config not an object", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"e2","kind":"echo","config":[1]}`), status: 422},
		{name: "webhook url not http", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"w","kind":"webhook","config":{"url":"ftp://example.com/"}}`), status: 422},
		{name: "webhook url missing", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"w","kind":"webhook","config":{}}`), status: 422},
		{name: "webhook timeout_ms 0", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"w","kind":"webhook","config":{"url":"http://example.com/","timeout_ms":0}}`), status: 422},
		{name: "bad agent kind", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"x","kind":"llm","config":{}}`), status: 422, code: "invalid"},
		{name: "agent kind missing", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"x"}`), status: 422},
		{name: "agent name empty", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":" ","kind":"echo"}`), status: 422},
		{name: "duplicate agent name", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"echo","kind":"echo"}`), status: 409, code: "conflict"},
		{name: "workspace name empty", method: "POST", path: "/v1/workspaces", token: testAdminToken, body: strings.NewReader(`{"name":""}`), status: 422},
		{name: "workspace name too long", method: "POST", path: "/v1/workspaces", token: testAdminToken, body: strings.NewReader(`{"name":"` + strings.Repeat("n", 201) + `"}`), status: 422},
		{name: "process limit 0", method: "POST", path: "/v1/worker/process", token: testAdminToken, body: strings.NewReader(`{"limit":0}`), status: 422},
		{name: "process limit 1001", method: "POST", path: "/v1/worker/process", token: testAdminToken, body: strings.NewReader(`{"limit":1001}`), status: 422},
		{name: "process workspace_id not a UUID", method: "POST", path: "/v1/worker/process", token: testAdminToken, body: strings.NewReader(`{"workspace_id":"x"}`), status: 422},
		// Values JSON accepts but PostgreSQL cannot store are the client's to fix: 4xx, not 500.
		{name: "input with NUL escape", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","input":"a\u0000b"}`), status: 422},
		{name: "input with lone surrogate", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","input":"\ud800"}`), status: 422},
		{name: "input with invalid UTF-8", method: "POST", path: runs, body: strings.NewReader("{\"agent\":\"echo\",\"input\":\"\xff\xfe\"}"), status: 422},
		{name: "input number out of range", method: "POST", path: runs, body: strings.NewReader(`{"agent":"echo","input":1e1000000}`), status: 422},
		{name: "batch input with NUL escape", method: "POST", path: runs + "/batch", body: strings.NewReader(`{"runs":[{"agent":"echo"},{"agent":"echo","input":{"k":"\u0000"}}]}`), status: 422},
		{name: "agent name with NUL", method: "POST", path: runs, body: strings.NewReader(`{"agent":"ec\u0000ho"}`), status: 422},
		{name: "new agent name with NUL", method: "POST", path: wsPath + "/agents", body: strings.NewReader(`{"name":"a\u0000","kind":"echo"}`), status: 422},
		{name: "workspace name with NUL", method: "POST", path: "/v1/workspaces", token: testAdminToken, body: strings.NewReader(`{"name":"a\u0000"}`), status: 422},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			token := c.token
			switch token {
			case "":
				token = ws.APIKey
			case "-":
				token = ""
			}
			status, hdr, body := a.do(t, c.method, c.path, token, c.hdr, c.body)
			if status == 500 {
				t.Fatalf("got 500 %s; want no 500", body)
			}
			checkAPIError(t, c.method+" "+c.path, status, hdr, body, c.status, c.code)
			if status == 405 && hdr.Get("Allow") == "" {
				t.Errorf("got 405 without an Allow header; want one")
			}
		})
	}

	// The mistakes above created nothing: the one run made before them is still the only one.
	t.Cleanup(func() {
		if st := a.stats(t, ws); st != (runStats{Queued: 1}) {
			t.Errorf("after the invalid requests: got stats %+v; want only the first run queued", st)
		}
	})
}

// TestAPIValidEdges: the values at the edges of every range are accepted, and bodies of
// exactly 1 MiB are not too big.
func TestAPIValidEdges(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": ""})) // unset: public hosts only
	ws := a.createWorkspace(t)
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	for _, n := range []int{1, 25} {
		var r runRecord
		a.mustDo(t, "POST", runs, ws.APIKey, map[string]any{"agent": "echo", "max_attempts": n}, 201, &r)
		if r.MaxAttempts != n {
			t.Errorf("max_attempts %d: got %d; want %d", n, r.MaxAttempts, n)
		}
	}
	for _, q := range []string{"?limit=1", "?limit=200", "?status=queued&limit=50", "?status=canceled"} {
		a.mustDo(t, "GET", runs+q, ws.APIKey, nil, 200, nil)
	}
	r := a.createRun(t, ws, "echo", nil)
	if string(r.Input) != "null" || r.MaxAttempts != 3 {
		t.Errorf("absent input and max_attempts: got input %s, max_attempts %d; want null, 3", r.Input, r.MaxAttempts)
	}
	for _, q := range []string{"?wait_ms=0", ""} {
		a.mustDo(t, "GET", runs+"/"+r.ID+q, ws.APIKey, nil, 200, nil)
	}
	// Upper-case ids are the same UUIDs.
	a.mustDo(t, "GET", "/v1/workspaces/"+strings.ToUpper(ws.ID)+"/runs/"+strings.ToUpper(r.ID), ws.APIKey, nil, 200, nil)
	for _, cfg := range []string{`{"delay_ms":0}`, `{"delay_ms":600000}`, `{}`, `null`} {
		name := "e" + randomHex(3)
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, `{"name":"`+name+`","kind":"echo","config":`+cfg+`}`, 201, nil)
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey,
		`{"name":"wh","kind":"webhook","config":{"url":"https://example.com/hook","timeout_ms":600000}}`, 201, nil)

	// A body of exactly 1 MiB, with its length given and chunked.
	prefix, suffix := `{"agent":"echo","input":"`, `"}`
	exact := prefix + strings.Repeat("a", maxBody-len(prefix)-len(suffix)) + suffix
	for name, body := range map[string]io.Reader{"Content-Length": strings.NewReader(exact), "chunked": chunked(exact)} {
		status, _, data := a.do(t, "POST", runs, ws.APIKey, nil, body)
		if status != 201 {
			t.Errorf("body of exactly 1 MiB (%s): got status %d; want 201; body %.200s", name, status, data)
		}
	}
}

// TestAPIAuth: no or a wrong token is 401; another workspace's key finds nothing (404)
// on every workspace endpoint and changes nothing; the admin token works everywhere; a
// workspace key is no admin; the key is stored only as a hash.
func TestAPIAuth(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	ws1, ws2 := a.createWorkspace(t), a.createWorkspace(t)
	run1 := a.createRun(t, ws1, "echo", "mine")

	// Every workspace endpoint, with a body that would succeed for the right caller, and
	// the status it answers the admin.
	type endpoint struct {
		method, path, body string
		admin              int
	}
	endpoints := func(ws, runID string) []endpoint {
		p := "/v1/workspaces/" + ws
		return []endpoint{
			{"GET", p, "", 200},
			{"POST", p + "/agents", `{"name":"other` + randomHex(3) + `","kind":"echo"}`, 201},
			{"GET", p + "/agents", "", 200},
			{"POST", p + "/runs", `{"agent":"echo","input":1}`, 201},
			{"POST", p + "/runs/batch", `{"runs":[{"agent":"echo"}]}`, 201},
			{"GET", p + "/runs", "", 200},
			{"GET", p + "/runs?status=queued", "", 200},
			{"GET", p + "/runs/" + runID, "", 200},
			{"GET", p + "/runs/" + runID + "?wait_ms=10", "", 200},
			{"GET", p + "/stats", "", 200},
			{"POST", p + "/runs/" + runID + "/cancel", "", 200},
		}
	}
	adminEndpoints := []endpoint{
		{"POST", "/v1/workspaces", `{"name":"x"}`, 201},
		{"POST", "/v1/worker/process", `{"limit":1}`, 200},
	}
	// call sends an endpoint's request; its body "" means none.
	call := func(t *testing.T, method, path, token, body string) (int, http.Header, []byte) {
		t.Helper()
		if body == "" {
			return a.do(t, method, path, token, nil, nil)
		}
		return a.do(t, method, path, token, nil, body)
	}

	t.Run("no or wrong token is 401", func(t *testing.T) {
		all := append(endpoints(ws1.ID, run1.ID), adminEndpoints...)
		for _, token := range []string{"", "wrong", ws1.APIKey + "x", testAdminToken + "x", "ak_" + randomHex(16)} {
			for _, e := range all {
				status, hdr, body := call(t, e.method, e.path, token, e.body)
				checkAPIError(t, fmt.Sprintf("%s %s with token %q", e.method, e.path, token), status, hdr, body, 401, "unauthorized")
			}
		}
		// Not a bearer token at all.
		for _, h := range []string{"Basic " + ws1.APIKey, ws1.APIKey, "Bearer"} {
			status, hdr, body := a.do(t, "GET", "/v1/workspaces/"+ws1.ID, "", map[string]string{"Authorization": h}, nil)
			checkAPIError(t, "Authorization: "+h, status, hdr, body, 401, "unauthorized")
		}
	})

	t.Run("another workspace's key is 404", func(t *testing.T) {
		for _, e := range endpoints(ws1.ID, run1.ID) {
			status, hdr, body := call(t, e.method, e.path, ws2.APIKey, e.body)
			checkAPIError(t, e.method+" "+e.path+" with ws2's key", status, hdr, body, 404, "not_found")
		}
		// Its own path with ws1's run id: the run is not in ws2.
		for _, e := range []string{"/runs/" + run1.ID, "/runs/" + run1.ID + "/cancel"} {
			method := "GET"
			if strings.HasSuffix(e, "cancel") {
				method = "POST"
			}
			status, hdr, body := call(t, method, "/v1/workspaces/"+ws2.ID+e, ws2.APIKey, "")
			checkAPIError(t, method+" ws2"+e, status, hdr, body, 404, "not_found")
		}
		// Nothing happened to ws1.
		if r := a.getRun(t, ws1, run1.ID); r.Status != "queued" {
			t.Errorf("ws1's run after ws2's cancel: got %q; want queued", r.Status)
		}
		if st := a.stats(t, ws1); st != (runStats{Queued: 1}) {
			t.Errorf("ws1 stats: got %+v; want 1 queued", st)
		}
		var agents struct{ Agents []agent }
		a.mustDo(t, "GET", "/v1/workspaces/"+ws1.ID+"/agents", ws1.APIKey, nil, 200, &agents)
		if len(agents.Agents) != 1 {
			t.Errorf("ws1 agents: got %d; want 1 (echo)", len(agents.Agents))
		}
		if st := a.stats(t, ws2); st != (runStats{}) {
			t.Errorf("ws2 stats: got %+v; want none", st)
		}
	})

	t.Run("admin token works on workspace endpoints", func(t *testing.T) {
		run := a.createRun(t, ws1, "echo", "for the admin")
		for _, e := range endpoints(ws1.ID, run.ID) {
			status, _, body := call(t, e.method, e.path, testAdminToken, e.body)
			if status != e.admin {
				t.Errorf("%s %s as admin: got %d; want %d; body %s", e.method, e.path, status, e.admin, body)
			}
		}
	})

	t.Run("admin token on a workspace that does not exist is 404", func(t *testing.T) {
		for _, e := range endpoints(unknownUUID, unknownUUID) {
			status, hdr, body := call(t, e.method, e.path, testAdminToken, e.body)
			checkAPIError(t, e.method+" "+e.path+" as admin", status, hdr, body, 404, "not_found")
		}
	})

	t.Run("workspace key is no admin", func(t *testing.T) {
		for _, e := range adminEndpoints {
			status, hdr, body := call(t, e.method, e.path, ws1.APIKey, e.body)
			checkAPIError(t, e.method+" "+e.path+" with a workspace key", status, hdr, body, 401, "unauthorized")
		}
	})

	t.Run("key stored only as a hash", func(t *testing.T) {
		var got struct {
			APIKey *string `json:"api_key"`
		}
		a.mustDo(t, "GET", "/v1/workspaces/"+ws1.ID, ws1.APIKey, nil, 200, &got)
		if got.APIKey != nil {
			t.Errorf("GET workspace shows api_key %q; want it only at creation", *got.APIKey)
		}
		db := openTestDB(t, dsn)
		for _, ws := range []testWorkspace{ws1, ws2} {
			if !strings.HasPrefix(ws.APIKey, "ak_") || len(ws.APIKey) < 24 {
				t.Errorf("api_key %q: want a long random key", ws.APIKey)
			}
			var n int
			if err := db.QueryRow(`SELECT count(*) FROM workspaces w WHERE strpos(w::text, $1) > 0`, ws.APIKey).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 0 {
				t.Errorf("the api_key string appears in %d workspaces rows; want it stored only as a hash", n)
			}
			var hash []byte
			if err := db.QueryRow(`SELECT api_key_hash FROM workspaces WHERE id = $1`, ws.ID).Scan(&hash); err != nil {
				t.Fatal(err)
			}
			if sum := sha256.Sum256([]byte(ws.APIKey)); !bytes.Equal(hash, sum[:]) {
				t.Errorf("api_key_hash: got %x; want sha256 of the key", hash)
			}
			if strings.Contains(a.log.String(), ws.APIKey) {
				t.Errorf("server log: got an api_key in it; want none")
			}
		}
	})
}

// TestAPIAdminTokenUnset: without ADMIN_TOKEN the admin API is closed to everyone
// (including an empty bearer), while workspace keys, made with `agentapp workspace
// create`, keep working.
func TestAPIAdminTokenUnset(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	env := testEnv(t, dsn, map[string]string{"ADMIN_TOKEN": ""})
	var out, errOut bytes.Buffer
	if err := run(context.Background(), []string{"workspace", "create", "cli"}, func(k string) string { return env[k] }, &out, &errOut); err != nil {
		t.Fatalf("agentapp workspace create: got %v, stderr %s; want success", err, errOut.String())
	}
	var ws testWorkspace
	if err := json.Unmarshal(out.Bytes(), &ws); err != nil || ws.ID == "" || ws.APIKey == "" {
		t.Fatalf("agentapp workspace create printed %q (%v); want the workspace with its api_key", out.String(), err)
	}
	a := startApp(t, env)
	for _, token := range []string{"", testAdminToken, ws.APIKey, "Bearer"} {
		for path, body := range map[string]string{"/v1/workspaces": `{"name":"x"}`, "/v1/worker/process": `{}`} {
			status, hdr, body := a.do(t, "POST", path, token, nil, strings.NewReader(body))
			checkAPIError(t, fmt.Sprintf("POST %s with token %q", path, token), status, hdr, body, 401, "unauthorized")
		}
		if token != ws.APIKey {
			status, hdr, body := a.do(t, "GET", "/v1/workspaces/"+ws.ID, token, nil, nil)
			checkAPIError(t, fmt.Sprintf("GET workspace with token %q", token), status, hdr, body, 401, "unauthorized")
		}
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID, ws.APIKey, nil, 200, nil)
	a.createAgent(t, ws, "echo", "echo", nil)
	a.createRun(t, ws, "echo", 1)
}

// TestAPIRuns: a run is created queued at attempt 0, read back as created, listed newest
// first, paginated with limit and cursor without duplicates or gaps, filtered by
// status, and counted by stats.
func TestAPIRuns(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	path := "/v1/workspaces/" + ws.ID + "/runs"

	var first runRecord
	status, _, body := a.do(t, "POST", path, ws.APIKey, nil, strings.NewReader(`{"agent":"echo","input":{"q": [1, 2.5, "x"]},"max_attempts":5}`))
	if status != 201 {
		t.Fatalf("create run: got %d; want 201; body %s", status, body)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"id", "workspace_id", "agent", "status", "input", "output", "error", "errors",
		"attempt", "max_attempts", "created_at", "started_at", "finished_at", "updated_at"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("run JSON: got %s; want a %q key", body, k)
		}
	}
	json.Unmarshal(body, &first)
	if !isUUID(first.ID) || first.WorkspaceID != ws.ID || first.Agent != "echo" || first.Status != "queued" ||
		first.Attempt != 0 || first.MaxAttempts != 5 || string(first.Input) != `{"q":[1,2.5,"x"]}` ||
		string(first.Output) != "null" || first.Error != nil || string(first.Errors) != "[]" ||
		first.StartedAt != nil || first.FinishedAt != nil || first.CreatedAt.IsZero() {
		t.Errorf("created run: got %s; want queued, attempt 0, max_attempts 5, the input, nothing else set", body)
	}
	for _, k := range []string{"created_at", "updated_at"} {
		var s string
		json.Unmarshal(raw[k], &s)
		if ts, err := time.Parse(time.RFC3339Nano, s); err != nil || !strings.HasSuffix(s, "Z") || time.Since(ts) > time.Minute {
			t.Errorf("%s: got %q; want RFC 3339 UTC, now", k, s)
		}
	}
	got := a.getRun(t, ws, first.ID)
	if got.ID != first.ID || got.Status != "queued" || string(got.Input) != string(first.Input) || !got.CreatedAt.Equal(first.CreatedAt) {
		t.Errorf("GET run: got %+v; want %+v", got, first)
	}

	created := []runRecord{first}
	for i := 1; i < 7; i++ {
		created = append(created, a.createRun(t, ws, "echo", i))
	}
	newestFirst := make([]string, len(created))
	for i, r := range created {
		newestFirst[len(created)-1-i] = r.ID
	}

	var def runList
	a.mustDo(t, "GET", path, ws.APIKey, nil, 200, &def)
	if fmt.Sprint(runIDs(def.Runs)) != fmt.Sprint(newestFirst) || def.NextCursor != nil {
		t.Errorf("GET runs: got %v (next %v); want %v newest first, next_cursor null", runIDs(def.Runs), def.NextCursor, newestFirst)
	}
	for _, limit := range []int{1, 2, 3, 7, 8, 200} {
		all, pages := listAllRuns(t, a, ws, "limit="+strconv.Itoa(limit))
		if fmt.Sprint(runIDs(all)) != fmt.Sprint(newestFirst) {
			t.Errorf("limit %d, all pages: got %v; want %v", limit, runIDs(all), newestFirst)
		}
		if want := (len(created) + limit - 1) / limit; pages != want {
			t.Errorf("limit %d: got %d pages; want %d", limit, pages, want)
		}
	}
	// A page holds at most limit runs.
	var page runList
	a.mustDo(t, "GET", path+"?limit=3", ws.APIKey, nil, 200, &page)
	if len(page.Runs) != 3 || page.NextCursor == nil {
		t.Errorf("limit=3: got %d runs, next %v; want 3 and a cursor", len(page.Runs), page.NextCursor)
	}

	// Cancel two: the filter and the stats follow.
	for _, r := range []runRecord{created[1], created[4]} {
		var c runRecord
		a.mustDo(t, "POST", path+"/"+r.ID+"/cancel", ws.APIKey, nil, 200, &c)
		if c.Status != "canceled" || c.FinishedAt == nil {
			t.Errorf("cancel queued run: got status %q finished_at %v; want canceled, set", c.Status, c.FinishedAt)
		}
		status, hdr, body := a.do(t, "POST", path+"/"+r.ID+"/cancel", ws.APIKey, nil, nil)
		checkAPIError(t, "cancel again", status, hdr, body, 409, "conflict")
	}
	canceled, _ := listAllRuns(t, a, ws, "status=canceled&limit=1")
	if want := []string{created[4].ID, created[1].ID}; fmt.Sprint(runIDs(canceled)) != fmt.Sprint(want) {
		t.Errorf("status=canceled: got %v; want %v", runIDs(canceled), want)
	}
	queued, _ := listAllRuns(t, a, ws, "status=queued&limit=2")
	if len(queued) != 5 {
		t.Errorf("status=queued: got %d runs; want 5", len(queued))
	}
	for _, r := range queued {
		if r.Status != "queued" {
			t.Errorf("status=queued: got a %q run; want only queued ones", r.Status)
		}
	}
	var none runList
	a.mustDo(t, "GET", path+"?status=succeeded", ws.APIKey, nil, 200, &none)
	if none.Runs == nil || len(none.Runs) != 0 || none.NextCursor != nil {
		t.Errorf("status=succeeded: got %+v; want {\"runs\":[],\"next_cursor\":null}", none)
	}
	if st := a.stats(t, ws); st != (runStats{Queued: 5, Canceled: 2}) {
		t.Errorf("stats: got %+v; want 5 queued, 2 canceled", st)
	}
}

// TestAPIIdempotency: a repeat with the same Idempotency-Key and body returns the first
// run (200); a different body is 409; the key is scoped to its workspace.
func TestAPIIdempotency(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws1, ws2 := a.createWorkspace(t), a.createWorkspace(t)
	post := func(ws testWorkspace, key, body string) (int, runRecord, []byte) {
		t.Helper()
		status, _, data := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
			map[string]string{"Idempotency-Key": key}, strings.NewReader(body))
		var r runRecord
		if status < 300 {
			if err := json.Unmarshal(data, &r); err != nil {
				t.Fatalf("run: got %s (%v); want JSON", data, err)
			}
		}
		return status, r, data
	}
	body := `{"agent":"echo","input":{"a":1}}`
	status, first, data := post(ws1, "key-1", body)
	if status != 201 || first.Status != "queued" {
		t.Fatalf("first request: got %d %s; want 201 queued", status, data)
	}
	for _, same := range []string{body, `{ "input": {"a": 1}, "agent": "echo" }`, `{"agent":"echo","input":{"a":1},"max_attempts":3}`} {
		status, r, data := post(ws1, "key-1", same)
		if status != 200 || r.ID != first.ID {
			t.Errorf("repeat %s: got %d, run %s; want 200 with the first run %s; body %s", same, status, r.ID, first.ID, data)
		}
	}
	for _, different := range []string{`{"agent":"echo","input":{"a":2}}`, `{"agent":"echo","input":{"a":1},"max_attempts":4}`, `{"agent":"echo"}`} {
		status, _, data := post(ws1, "key-1", different)
		if status != 409 {
			t.Errorf("same key, different body %s: got %d; want 409; body %s", different, status, data)
		}
		checkAPIError(t, "same key, different body", status, http.Header{"Content-Type": {"application/json"}}, data, 409, "")
	}
	status, other, data := post(ws2, "key-1", body)
	if status != 201 || other.ID == first.ID || other.WorkspaceID != ws2.ID {
		t.Errorf("same key in another workspace: got %d %s; want 201 with a new run", status, data)
	}
	status, second, _ := post(ws1, "key-2", body)
	if status != 201 || second.ID == first.ID {
		t.Errorf("another key: got %d, run %s; want 201 with a new run", status, second.ID)
	}
	// Without the header the same body makes a new run each time.
	r1, r2 := a.createRun(t, ws1, "echo", 7), a.createRun(t, ws1, "echo", 7)
	if r1.ID == r2.ID {
		t.Errorf("two requests without Idempotency-Key: got the same run %s twice; want two runs", r1.ID)
	}
	if st := a.stats(t, ws1); st.Queued != 4 {
		t.Errorf("ws1: got %d queued runs; want 4 (key-1, key-2, two without key)", st.Queued)
	}
	if st := a.stats(t, ws2); st.Queued != 1 {
		t.Errorf("ws2: got %d queued runs; want 1", st.Queued)
	}
}

// TestAPIBatch: a batch creates its runs in order, all or nothing, 1 … 1000 of them.
func TestAPIBatch(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "echo2", "echo", map[string]any{"delay_ms": 1})
	path := "/v1/workspaces/" + ws.ID + "/runs/batch"

	var got struct{ Runs []runRecord }
	a.mustDo(t, "POST", path, ws.APIKey, `{"runs":[{"agent":"echo","input":{"i":0}},{"agent":"echo2","input":{"i":1},"max_attempts":7},{"agent":"echo","input":{"i":2}}]}`, 201, &got)
	if len(got.Runs) != 3 {
		t.Fatalf("batch of 3: got %d runs; want 3", len(got.Runs))
	}
	agents := []string{"echo", "echo2", "echo"}
	for i, r := range got.Runs {
		if want := fmt.Sprintf(`{"i":%d}`, i); string(r.Input) != want || r.Agent != agents[i] || r.Status != "queued" || r.Attempt != 0 || r.WorkspaceID != ws.ID {
			t.Errorf("runs[%d]: got input %s agent %q status %q attempt %d; want %s, %q, queued, 0", i, r.Input, r.Agent, r.Status, r.Attempt, want, agents[i])
		}
	}
	if got.Runs[1].MaxAttempts != 7 || got.Runs[0].MaxAttempts != 3 {
		t.Errorf("max_attempts: got %d and %d; want 3 and 7", got.Runs[0].MaxAttempts, got.Runs[1].MaxAttempts)
	}
	all, _ := listAllRuns(t, a, ws, "")
	if want := []string{got.Runs[2].ID, got.Runs[1].ID, got.Runs[0].ID}; fmt.Sprint(runIDs(all)) != fmt.Sprint(want) {
		t.Errorf("listed: got %v; want the batch newest first %v", runIDs(all), want)
	}

	// All or nothing.
	for name, body := range map[string]string{
		"unknown agent last":  `{"runs":[{"agent":"echo"},{"agent":"echo2"},{"agent":"nope"}]}`,
		"unknown agent first": `{"runs":[{"agent":"nope"},{"agent":"echo"}]}`,
		"one invalid":         `{"runs":[{"agent":"echo"},{"agent":"echo","max_attempts":0}]}`,
		"one malformed input": `{"runs":[{"agent":"echo"},{"agent":"echo","input":"\u0000"}]}`,
		"empty":               `{"runs":[]}`,
		"null":                `{"runs":null}`,
		"1001 runs":           `{"runs":[` + strings.Repeat(`{"agent":"echo"},`, 1000) + `{"agent":"echo"}]}`,
	} {
		status, hdr, data := a.do(t, "POST", path, ws.APIKey, nil, strings.NewReader(body))
		checkAPIError(t, name, status, hdr, data, 422, "")
	}
	if st := a.stats(t, ws); st != (runStats{Queued: 3}) {
		t.Errorf("after the refused batches: got stats %+v; want the 3 runs of the first", st)
	}
	if all, _ := listAllRuns(t, a, ws, "limit=200"); len(all) != 3 {
		t.Errorf("after the refused batches: %d runs listed; want 3", len(all))
	}

	// The largest batch.
	a.mustDo(t, "POST", path, ws.APIKey, `{"runs":[`+strings.Repeat(`{"agent":"echo"},`, 999)+`{"agent":"echo","input":"last"}]}`, 201, &got)
	if len(got.Runs) != 1000 || string(got.Runs[999].Input) != `"last"` {
		t.Errorf("batch of 1000: got %d runs; want 1000, the last with input \"last\"", len(got.Runs))
	}
	if st := a.stats(t, ws); st.Queued != 1003 {
		t.Errorf("after a batch of 1000: got %d queued; want 1003", st.Queued)
	}
}

// TestAPIBatchAnswersAsStored: each run a batch answers is, byte for byte, what a GET of it
// answers, whatever fields the batch set and however it spelled its inputs (the batch builds
// its answer from the request and the columns the database made).
func TestAPIBatchAnswersAsStored(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	a.createAgent(t, ws, "echo2", "echo", nil)
	status, _, data := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey, nil, strings.NewReader(`{"runs":[
		{"agent":"echo"},
		{"agent":"echo2","input":{"b": [1, 2.50], "a": "x"},"max_attempts":5,"priority":7,"timeout_ms":1500},
		{"agent":"echo","input":"later","delay_ms":60000},
		{"agent":"echo2","input":null,"run_at":"2030-01-02T03:04:05.123456+02:00"}]}`))
	if status != 201 {
		t.Fatalf("batch: got %d %s; want 201", status, data)
	}
	var got struct{ Runs []json.RawMessage }
	if err := json.Unmarshal(data, &got); err != nil || len(got.Runs) != 4 {
		t.Fatalf("batch: got %d runs (%v) in %s; want 4", len(got.Runs), err, data)
	}
	for i, raw := range got.Runs {
		var r runRecord
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatal(err)
		}
		status, _, one := a.do(t, "GET", "/v1/workspaces/"+ws.ID+"/runs/"+r.ID, ws.APIKey, nil, nil)
		if status != 200 || string(bytes.TrimSpace(one)) != string(raw) {
			t.Errorf("runs[%d]: the batch answered\n%s\nand GET answered %d\n%s", i, raw, status, one)
		}
	}
}

// getRunWait does GET …/runs/{id}?wait_ms=wait and returns the run and how long it took.
func getRunWait(t testing.TB, a *app, ws testWorkspace, id string, wait int) (runRecord, time.Duration) {
	t.Helper()
	start := time.Now()
	var r runRecord
	a.mustDo(t, "GET", fmt.Sprintf("/v1/workspaces/%s/runs/%s?wait_ms=%d", ws.ID, id, wait), ws.APIKey, nil, 200, &r)
	return r, time.Since(start)
}

// TestAPIWait: ?wait_ms answers at once for a final run, after wait_ms for a run that
// stays queued, and as soon as the run becomes final otherwise.
func TestAPIWait(t *testing.T) {
	t.Parallel()
	t.Run("no worker", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), nil))
		ws := a.createWorkspace(t)

		final := a.createRun(t, ws, "echo", 1)
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+final.ID+"/cancel", ws.APIKey, nil, 200, nil)
		r, took := getRunWait(t, a, ws, final.ID, 60000)
		if r.Status != "canceled" || took > 2*time.Second {
			t.Errorf("final run: got %q after %v; want canceled at once", r.Status, took)
		}

		queued := a.createRun(t, ws, "echo", 2)
		r, took = getRunWait(t, a, ws, queued.ID, 400)
		if r.Status != "queued" || took < 400*time.Millisecond || took > 5*time.Second {
			t.Errorf("queued run, no worker: got %q after %v; want queued after about 400ms", r.Status, took)
		}

		// Canceled while a request waits on it: the request answers then, not at its limit.
		waiting := a.createRun(t, ws, "echo", 3)
		go func() {
			time.Sleep(300 * time.Millisecond)
			status, _, body, err := send(testClient, "POST", a.base+"/v1/workspaces/"+ws.ID+"/runs/"+waiting.ID+"/cancel", ws.APIKey, nil, nil)
			if err != nil || status != 200 {
				t.Errorf("cancel: got %d %s (err %v); want 200", status, body, err)
			}
		}()
		r, took = getRunWait(t, a, ws, waiting.ID, 30000)
		if r.Status != "canceled" || took < 300*time.Millisecond || took > 10*time.Second {
			t.Errorf("run canceled during the wait: got %q after %v; want canceled soon after 300ms", r.Status, took)
		}
	})
	t.Run("embedded worker", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
		ws := a.createWorkspace(t)
		a.createAgent(t, ws, "slow", "echo", map[string]any{"delay_ms": 300})
		created := a.createRun(t, ws, "slow", map[string]any{"x": 1})
		r, took := getRunWait(t, a, ws, created.ID, 30000)
		if r.Status != "succeeded" || string(r.Output) != `{"x":1}` || took > 15*time.Second {
			t.Errorf("got %q output %s after %v; want succeeded well before 30s", r.Status, r.Output, took)
		}
	})
}

// TestAPIMetrics: /metrics answers Prometheus text with the runs by status, the queue
// depth, the cycles and the claim and run durations, and its figures match the runs.
func TestAPIMetrics(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws1, ws2 := a.createWorkspace(t), a.createWorkspace(t)
	var toCancel runRecord
	for i := range 3 {
		toCancel = a.createRun(t, ws1, "echo", i)
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws1.ID+"/runs/"+toCancel.ID+"/cancel", ws1.APIKey, nil, 200, nil)
	a.createRun(t, ws2, "echo", "done")
	if sum := a.process(t, map[string]any{"workspace_id": ws2.ID}); sum.Claimed != 1 || sum.Succeeded != 1 {
		t.Fatalf("worker cycle on ws2: got %+v; want 1 claimed, 1 succeeded", sum)
	}

	status, hdr, body := a.do(t, "GET", "/metrics", "", nil, nil)
	if status != 200 {
		t.Fatalf("GET /metrics: got %d; want 200", status)
	}
	if ct := hdr.Get("Content-Type"); ct != "text/plain; version=0.0.4" {
		t.Errorf("Content-Type: got %q; want text/plain; version=0.0.4", ct)
	}
	text := string(body)
	for _, name := range []string{"agentapp_runs", "agentapp_queue_depth", "agentapp_worker_cycles_total",
		"agentapp_claim_duration_seconds", "agentapp_run_duration_seconds", "agentapp_runs_executing"} {
		if !strings.Contains(text, "# TYPE "+name+" ") {
			t.Errorf("metrics: got no # TYPE line for %s; want one", name)
		}
	}
	m := parseMetrics(t, text)
	want := map[string]float64{
		`agentapp_runs{status="queued"}`:                    2,
		`agentapp_runs{status="running"}`:                   0,
		`agentapp_runs{status="succeeded"}`:                 1,
		`agentapp_runs{status="failed"}`:                    0,
		`agentapp_runs{status="canceled"}`:                  1,
		`agentapp_queue_depth`:                              2,
		`agentapp_runs_executing`:                           0,
		`agentapp_worker_cycles_total{result="run"}`:        1,
		`agentapp_claim_duration_seconds_count`:             1,
		`agentapp_claim_duration_seconds_bucket{le="+Inf"}`: 1,
		`agentapp_run_duration_seconds_count`:               1,
		`agentapp_run_duration_seconds_bucket{le="+Inf"}`:   1,
	}
	for series, v := range want {
		got, ok := m[series]
		if !ok {
			t.Errorf("metrics: got no series %s; want %g", series, v)
		} else if got != v {
			t.Errorf("metrics: got %s %g; want %g", series, got, v)
		}
	}
	if _, ok := m[`agentapp_claim_duration_seconds_bucket{le="0.001"}`]; !ok {
		t.Errorf("metrics: got no agentapp_claim_duration_seconds_bucket series for le=0.001; want one")
	}
}

// TestAPIHealth: /healthz is 200 {"status":"ok"}; /readyz is 200 with the database ok,
// and with an embedded worker it shows the worker's state.
func TestAPIHealth(t *testing.T) {
	t.Parallel()
	// The worker as a map: the test checks which keys it has, not only their values.
	type readyBody struct {
		Status   string         `json:"status"`
		Database string         `json:"database"`
		Worker   map[string]any `json:"worker"`
	}
	t.Run("no worker", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), nil))
		status, hdr, body := a.do(t, "GET", "/healthz", "", nil, nil)
		if status != 200 || strings.TrimSpace(string(body)) != `{"status":"ok"}` || hdr.Get("Content-Type") != "application/json" {
			t.Errorf("GET /healthz: got %d %s (%s); want 200 {\"status\":\"ok\"}", status, body, hdr.Get("Content-Type"))
		}
		var r readyBody
		a.mustDo(t, "GET", "/readyz", "", nil, 200, &r)
		if r.Status != "ok" || r.Database != "ok" || r.Worker["embedded"] != false {
			t.Errorf("GET /readyz: got %+v; want ok, database ok, worker not embedded", r)
		}
	})
	t.Run("embedded worker", func(t *testing.T) {
		t.Parallel()
		a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true"}))
		var body []byte
		eventually(t, 10*time.Second, "GET /readyz answers 200 once the worker has cycled", func() bool {
			var status int
			status, _, body = a.do(t, "GET", "/readyz", "", nil, nil)
			return status == 200
		})
		var r readyBody
		json.Unmarshal(body, &r)
		if r.Status != "ok" || r.Database != "ok" || r.Worker["embedded"] != true || r.Worker["alive"] != true {
			t.Errorf("GET /readyz: got %s; want ok, database ok, an alive embedded worker", body)
		}
		last, _ := r.Worker["last_cycle_at"].(string)
		if ts, err := time.Parse(time.RFC3339Nano, last); err != nil || time.Since(ts) > time.Minute {
			t.Errorf("worker.last_cycle_at: got %v; want a recent time", r.Worker["last_cycle_at"])
		}
		for _, k := range []string{"executing", "listening"} {
			if _, ok := r.Worker[k]; !ok {
				t.Errorf("worker state: got %s without %q; want it", body, k)
			}
		}
	})
}

// TestAPIBatchRefusesIdempotencyKey: a batch cannot be made idempotent, so a key on it is
// refused rather than ignored (a retried batch would create every run twice).
func TestAPIBatchRefusesIdempotencyKey(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	body := strings.NewReader(`{"runs":[{"agent":"echo","input":1}]}`)
	status, _, data := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/batch", ws.APIKey,
		map[string]string{"Idempotency-Key": "k1", "Content-Type": "application/json"}, body)
	if status != 422 || !strings.Contains(string(data), "Idempotency-Key") {
		t.Fatalf("batch with Idempotency-Key: got %d %s; want 422 naming Idempotency-Key", status, data)
	}
	var list struct {
		Runs []runRecord `json:"runs"`
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, nil, 200, &list)
	if len(list.Runs) != 0 {
		t.Errorf("runs after the refused batch: got %d; want 0", len(list.Runs))
	}
}
