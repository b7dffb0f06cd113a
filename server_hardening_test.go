package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rawRequest sends raw bytes as a request on a new connection to a and returns the answer.
func rawRequest(t *testing.T, a *app, raw string) (*http.Response, []byte) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(a.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("read the answer to %q: %v", raw, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, body
}

// TestHTTPServerLimits: the header and idle limits are set and there is no whole-request
// read or write timeout, which would cut a progressing long poll or stream.
func TestHTTPServerLimits(t *testing.T) {
	srv := newHTTPServer(http.NotFoundHandler(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if srv.ReadHeaderTimeout != 10*time.Second || srv.IdleTimeout != 2*time.Minute {
		t.Errorf("got ReadHeaderTimeout %v, IdleTimeout %v; want 10s, 2m", srv.ReadHeaderTimeout, srv.IdleTimeout)
	}
	if srv.ReadTimeout != 0 || srv.WriteTimeout != 0 {
		t.Errorf("got ReadTimeout %v, WriteTimeout %v; want none", srv.ReadTimeout, srv.WriteTimeout)
	}
}

// TestSlowClientsAreCut: a client that sends half a request line is disconnected after
// 10 s; one that stops sending its body is answered 408 after bodyTimeout; one that stops
// reading a large answer is disconnected after ~30 s, while others are answered at once.
func TestSlowClientsAreCut(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"LOG_LEVEL": "info"}))
	ws := a.createWorkspace(t)
	addr := strings.TrimPrefix(a.base, "http://")
	big := strings.Repeat("x", 900<<10)
	for range 8 {
		a.createRun(t, ws, "echo", big)
	}
	listPath := "/v1/workspaces/" + ws.ID + "/runs?limit=200"
	_, _, full := a.do(t, "GET", listPath, ws.APIKey, nil, nil)

	dial := func(d *net.Dialer) net.Conn {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	type result struct {
		what string
		err  error
	}
	results := make(chan result, 3)

	// Half a request line, then nothing.
	header := dial(&net.Dialer{})
	start := time.Now()
	io.WriteString(header, "GET /healthz HT")
	go func() {
		// net/http may say 400 or 408 before it closes the connection.
		header.SetReadDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(header)
		took := time.Since(start)
		if err != nil || (len(got) > 0 && !bytes.HasPrefix(got, []byte("HTTP/1.1 4"))) || took < 9*time.Second || took > 13*time.Second {
			results <- result{"half a request line", fmt.Errorf("got %q, %v after %v; want the connection closed after ~10s", got, err, took.Round(time.Millisecond))}
			return
		}
		results <- result{"half a request line", nil}
	}()

	// Headers that promise 100 bytes of body, and 10 of them.
	body := dial(&net.Dialer{})
	fmt.Fprintf(body, "POST /v1/workspaces/%s/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{\"agent\":", ws.ID, ws.APIKey)
	go func() {
		body.SetReadDeadline(time.Now().Add(45 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(body), nil)
		took := time.Since(start)
		switch {
		case err != nil:
			results <- result{"stalled body", fmt.Errorf("got %v after %v; want a 408 after ~30s", err, took)}
		case resp.StatusCode != http.StatusRequestTimeout || took < 29*time.Second:
			results <- result{"stalled body", fmt.Errorf("got status %d after %v; want 408 after ~30s", resp.StatusCode, took)}
		default:
			results <- result{"stalled body", nil}
		}
	}()

	// A large answer that is never read: a small receive buffer, set before the
	// connection is made (set later, the kernel drops what the larger window let in, and
	// the retransmissions back off for longer than the test waits), keeps the kernel
	// from taking it all.
	reader := dial(&net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}})
	fmt.Fprintf(reader, "GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", listPath, ws.APIKey)
	go func() {
		time.Sleep(35 * time.Second)
		reader.SetReadDeadline(time.Now().Add(15 * time.Second))
		n, err := io.Copy(io.Discard, reader)
		if err != nil || n >= int64(len(full)) {
			results <- result{"unread answer", fmt.Errorf("got %d of %d bytes, then %v; want the connection closed before the whole answer", n, len(full), err)}
			return
		}
		results <- result{"unread answer", nil}
	}()

	// Meanwhile everyone else is answered at once.
	for time.Since(start) < 12*time.Second {
		t0 := time.Now()
		if status, _, _ := a.do(t, "GET", "/healthz", "", nil, nil); status != 200 || time.Since(t0) > time.Second {
			t.Errorf("GET /healthz during the stalls: got %d after %v; want 200 within 1s", status, time.Since(t0))
		}
		time.Sleep(time.Second)
	}
	for range 3 {
		if r := <-results; r.err != nil {
			t.Errorf("%s: %v", r.what, r.err)
		}
	}
}

// TestStrictJSONKeys: object keys are matched exactly and a key given twice, at any
// depth, is a 400; keys that differ only in case inside a free-form value are distinct.
func TestStrictJSONKeys(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	wsPath := "/v1/workspaces/" + ws.ID
	cases := []struct {
		name, path, token, body string
	}{
		{"key in upper case", wsPath + "/runs", ws.APIKey, `{"AGENT":"echo"}`},
		{"key in mixed case", wsPath + "/runs", ws.APIKey, `{"agent":"echo","Input":1}`},
		{"key twice", wsPath + "/runs", ws.APIKey, `{"agent":"echo","agent":"echo"}`},
		{"key twice inside input", wsPath + "/runs", ws.APIKey, `{"agent":"echo","input":{"a":1,"a":2}}`},
		{"key twice deep inside input", wsPath + "/runs", ws.APIKey, `{"agent":"echo","input":[{"x":1},{"y":{"z":1,"z":1}}]}`},
		{"batch run key in wrong case", wsPath + "/runs/batch", ws.APIKey, `{"runs":[{"agent":"echo"},{"Agent":"echo"}]}`},
		{"batch run key twice", wsPath + "/runs/batch", ws.APIKey, `{"runs":[{"agent":"echo","agent":"x"}]}`},
		{"batch key twice", wsPath + "/runs/batch", ws.APIKey, `{"runs":[{"agent":"echo"}],"runs":[]}`},
		{"agent config key twice", wsPath + "/agents", ws.APIKey, `{"name":"e","kind":"echo","config":{"delay_ms":1,"delay_ms":2}}`},
		{"agent key in wrong case", wsPath + "/agents", ws.APIKey, `{"Name":"e","kind":"echo"}`},
		{"workspace key in wrong case", "/v1/workspaces", testAdminToken, `{"NAME":"x"}`},
		{"process key in wrong case", "/v1/worker/process", testAdminToken, `{"Limit":1}`},
	}
	for _, c := range cases {
		status, hdr, body := a.do(t, "POST", c.path, c.token, nil, strings.NewReader(c.body))
		checkAPIError(t, c.name+" "+c.body, status, hdr, body, 400, "bad_request")
	}
	var r runRecord
	a.mustDo(t, "POST", wsPath+"/runs", ws.APIKey, `{"agent":"echo","input":{"a":1,"A":2}}`, 201, &r)
	if string(r.Input) != `{"A": 2, "a": 1}` && string(r.Input) != `{"A":2,"a":1}` {
		t.Errorf("input with keys a and A: got %s; want both kept", r.Input)
	}
	if st := a.stats(t, ws); st.Queued != 1 {
		t.Errorf("after the refused bodies: got %d queued runs; want 1", st.Queued)
	}
}

// TestCheckKeysMessages: checkKeys names the key and where it is, through arrays, escaped
// keys and objects with many keys; malformed JSON is left to the decoder.
func TestCheckKeysMessages(t *testing.T) {
	batch := reflect.TypeOf(&struct {
		Runs []runRequest `json:"runs"`
	}{})
	many := `{"agent":"echo","input":{` + ""
	for i := range 40 {
		many += fmt.Sprintf(`"k%d":%d,`, i, i)
	}
	many += `"k7":1}}`
	deep := strings.Repeat(`[`, maxJSONDepth+1) + strings.Repeat(`]`, maxJSONDepth+1)
	for _, tc := range []struct {
		name, body string
		typ        reflect.Type
		want       string // "": accepted
	}{
		{"accepted", `{"runs":[{"agent":"echo","input":{"a":1,"A":[{"a":1}]}}]}`, batch, ""},
		{"whitespace everywhere", " {\n \"runs\" : [ ] , \"x\" : [ { } , [ ] , \"s\" ] }\t", nil, ""},
		{"key twice after whitespace", "{ \"a\" : [ 1 , { } ] ,\r\n \"a\" : 2 }", nil, `key "a" given twice in the request body`},
		{"unknown field in a batch run", `{"runs":[{"agent":"echo"},{"agent":"echo","inptu":1}]}`, batch, `unknown field "inptu" in runs[1]`},
		{"key twice deep in an input", `{"runs":[{"agent":"echo","input":[0,{"x":{"z":1,"z":2}}]}]}`, batch, `key "z" given twice in runs[0].input[1].x`},
		{"escaped key equal to another", `{"agent":"echo","\u0061gent":"x"}`, reflect.TypeOf(&runRequest{}), `key "agent" given twice in the request body`},
		{"key twice among many", many, reflect.TypeOf(&runRequest{}), `key "k7" given twice in input`},
		{"nested too deeply: left to the decoder", deep, nil, ""},
		{"malformed: left to the decoder", `{"agent":"echo","agent":}`, reflect.TypeOf(&runRequest{}), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkKeys([]byte(tc.body), tc.typ)
			if got := fmt.Sprint(err); (tc.want == "" && err != nil) || (tc.want != "" && got != tc.want) {
				t.Errorf("got %v; want %q", err, tc.want)
			}
		})
	}
	var v any
	err := decode(httptest.NewRequest("POST", "/", strings.NewReader(deep)), &v, false)
	if want := "request body is nested too deeply (over 10000 levels)"; fmt.Sprint(err) != want {
		t.Errorf("decode of %d nested arrays: got %v; want %q", maxJSONDepth+1, err, want)
	}
}

// TestAuthBeforeNotFound: no or a wrong token is 401 on every path under /v1/, even
// where the ids are not UUIDs, do not exist, or the route does not exist; a valid key
// learns 404 there.
func TestAuthBeforeNotFound(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	paths := []struct{ method, path string }{
		{"GET", "/v1/workspaces/not-a-uuid"},
		{"GET", "/v1/workspaces/" + unknownUUID},
		{"GET", "/v1/workspaces/" + ws.ID + "/runs/not-a-uuid"},
		{"GET", "/v1/workspaces/" + ws.ID + "/runs/" + unknownUUID},
		{"POST", "/v1/workspaces/zz/runs/42/cancel"},
		{"GET", "/v1/workspaces/" + ws.ID + "/nothing"},
		{"DELETE", "/v1/workspaces/" + ws.ID + "/runs"},
		{"GET", "/v1/nothing"},
	}
	for _, p := range paths {
		for _, token := range []string{"", "wrong", ws.APIKey + "x"} {
			status, hdr, body := a.do(t, p.method, p.path, token, nil, nil)
			checkAPIError(t, fmt.Sprintf("%s %s with token %q", p.method, p.path, token), status, hdr, body, 401, "unauthorized")
		}
		status, _, body := a.do(t, p.method, p.path, ws.APIKey, nil, nil)
		if status != 404 && status != 405 {
			t.Errorf("%s %s with the key: got %d; want 404 (or 405); body %s", p.method, p.path, status, body)
		}
	}
}

// TestUncleanPathsAreJSON404: a path the mux would redirect is a JSON 404, never a 307.
func TestUncleanPathsAreJSON404(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	for _, p := range []string{"//healthz", "/v1//workspaces", "/./healthz", "/v1/../healthz",
		"/v1/workspaces/" + ws.ID + "/./runs", "/v1/workspaces/" + ws.ID + "//runs", "/v1/workspaces/x/../" + ws.ID} {
		resp, body := rawRequest(t, a, "GET "+p+" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+ws.APIKey+"\r\nConnection: close\r\n\r\n")
		checkAPIError(t, "GET "+p, resp.StatusCode, resp.Header, body, 404, "not_found")
		if loc := resp.Header.Get("Location"); loc != "" {
			t.Errorf("GET %s: got Location %q; want none", p, loc)
		}
	}
}

// TestNamesCountCharacters: a name is 1 to 200 characters (runes, not bytes) and not
// only whitespace.
func TestNamesCountCharacters(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	cases := []struct {
		name string
		want int
	}{
		{strings.Repeat("é", 200), 201},
		{strings.Repeat("é", 201), 422},
		{strings.Repeat("日", 200), 201},
		{strings.Repeat("n", 200), 201},
		{strings.Repeat("n", 201), 422},
		{"   ", 422},
		{"\t\n\u00a0\u2003", 422},
	}
	for i, c := range cases {
		body, _ := json.Marshal(map[string]string{"name": c.name})
		if status, _, data := a.do(t, "POST", "/v1/workspaces", testAdminToken, nil, string(body)); status != c.want {
			t.Errorf("workspace name of %d bytes, %d runes: got %d; want %d; body %s", len(c.name), len([]rune(c.name)), status, c.want, data)
		}
		// Agent names follow the same rule; a suffix keeps the accepted ones distinct.
		agentName := c.name
		if c.want == 201 {
			agentName = string([]rune(c.name)[:199]) + strconv.Itoa(i)
		}
		body, _ = json.Marshal(map[string]string{"name": agentName, "kind": "echo"})
		if status, _, data := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, nil, string(body)); status != c.want {
			t.Errorf("agent name of %d runes: got %d; want %d; body %s", len([]rune(agentName)), status, c.want, data)
		}
	}
}

// TestRotateKey: rotate-key answers the workspace with a new key; the old key is dead at
// once in the process that rotated it and within a second in another process that had
// it cached; the admin may rotate any workspace, an unknown one is 404.
func TestRotateKey(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	b := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	b.mustDo(t, "GET", "/v1/workspaces/"+ws.ID, ws.APIKey, nil, 200, nil) // b caches the key

	var rotated struct {
		ID     string  `json:"id"`
		Name   string  `json:"name"`
		APIKey *string `json:"api_key"`
	}
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/rotate-key", ws.APIKey, nil, 200, &rotated)
	if rotated.ID != ws.ID || rotated.Name != "test" || rotated.APIKey == nil || *rotated.APIKey == ws.APIKey || !strings.HasPrefix(*rotated.APIKey, "ak_") {
		t.Fatalf("rotate-key: got %+v; want workspace %s with a new ak_ key", rotated, ws.ID)
	}
	status, hdr, body := a.do(t, "GET", "/v1/workspaces/"+ws.ID, ws.APIKey, nil, nil)
	checkAPIError(t, "old key right after rotation", status, hdr, body, 401, "unauthorized")
	newWS := testWorkspace{ID: ws.ID, APIKey: *rotated.APIKey}
	a.createRun(t, newWS, "echo", 1)

	time.Sleep(1100 * time.Millisecond)
	status, hdr, body = b.do(t, "GET", "/v1/workspaces/"+ws.ID, ws.APIKey, nil, nil)
	checkAPIError(t, "old key 1.1 s after rotation in another process", status, hdr, body, 401, "unauthorized")
	b.mustDo(t, "GET", "/v1/workspaces/"+ws.ID, newWS.APIKey, nil, 200, nil)

	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/rotate-key", testAdminToken, nil, 200, &rotated)
	status, hdr, body = a.do(t, "POST", "/v1/workspaces/"+unknownUUID+"/rotate-key", testAdminToken, nil, nil)
	checkAPIError(t, "rotate an unknown workspace", status, hdr, body, 404, "not_found")
	other := a.createWorkspace(t)
	status, hdr, body = a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/rotate-key", other.APIKey, nil, nil)
	checkAPIError(t, "rotate with another workspace's key", status, hdr, body, 404, "not_found")
}

// TestDeletedWorkspace: a workspace deleted in psql while its key is cached is never a
// 500, and its key stops authenticating within a second.
func TestDeletedWorkspace(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	ws := a.createWorkspace(t)
	a.mustDo(t, "GET", "/v1/workspaces/"+ws.ID, ws.APIKey, nil, 200, nil)
	db := openTestDB(t, dsn)
	if _, err := db.Exec(`DELETE FROM workspaces WHERE id = $1`, ws.ID); err != nil {
		t.Fatal(err)
	}
	for _, e := range []struct{ method, path, body string }{
		{"POST", "/agents", `{"name":"again","kind":"echo"}`},
		{"POST", "/runs", `{"agent":"echo"}`},
		{"POST", "/runs/batch", `{"runs":[{"agent":"echo"}]}`},
		{"GET", "", ""},
		{"POST", "/rotate-key", ""},
	} {
		var r io.Reader
		if e.body != "" {
			r = strings.NewReader(e.body)
		}
		status, _, body := a.do(t, e.method, "/v1/workspaces/"+ws.ID+e.path, ws.APIKey, nil, r)
		if status != 404 && status != 422 && status != 401 {
			t.Errorf("%s %s after the delete: got %d; want 404, 422 or 401; body %s", e.method, e.path, status, body)
		}
	}
	time.Sleep(1100 * time.Millisecond)
	status, hdr, body := a.do(t, "GET", "/v1/workspaces/"+ws.ID, ws.APIKey, nil, nil)
	checkAPIError(t, "deleted workspace's key after 1.1 s", status, hdr, body, 401, "unauthorized")
}

// TestCursorOpaque: next_cursor is not the global seq and works only in its own
// workspace; an unknown or foreign cursor is 422.
func TestCursorOpaque(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, nil))
	ws1, ws2 := a.createWorkspace(t), a.createWorkspace(t)
	var ids []string
	for range 3 {
		ids = append(ids, a.createRun(t, ws1, "echo", 1).ID)
		a.createRun(t, ws2, "echo", 2)
	}
	var page runList
	a.mustDo(t, "GET", "/v1/workspaces/"+ws1.ID+"/runs?limit=1", ws1.APIKey, nil, 200, &page)
	if page.NextCursor == nil {
		t.Fatalf("first page of 1: got no next_cursor")
	}
	cursor := *page.NextCursor
	db := openTestDB(t, dsn)
	var seq int64
	if err := db.QueryRow(`SELECT seq FROM runs WHERE id = $1`, ids[2]).Scan(&seq); err != nil {
		t.Fatal(err)
	}
	if _, err := strconv.ParseInt(cursor, 10, 64); err == nil {
		t.Errorf("next_cursor %q is a number (the run's seq is %d); want an opaque string", cursor, seq)
	}
	a.mustDo(t, "GET", "/v1/workspaces/"+ws1.ID+"/runs?limit=1&cursor="+cursor, ws1.APIKey, nil, 200, &page)
	if len(page.Runs) != 1 || page.Runs[0].ID != ids[1] {
		t.Errorf("second page: got %v; want [%s]", runIDs(page.Runs), ids[1])
	}
	for _, c := range []string{cursor, strconv.FormatInt(seq, 10), "AAAAAAAAAAAAAAAAAAAAAA", "!!"} {
		status, hdr, body := a.do(t, "GET", "/v1/workspaces/"+ws2.ID+"/runs?cursor="+c, ws2.APIKey, nil, nil)
		checkAPIError(t, "ws2 with cursor "+c, status, hdr, body, 422, "invalid")
	}
}

// TestIdempotencyKeyOrder: a repeat whose input has its object keys in another order is
// the same request.
func TestIdempotencyKeyOrder(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	post := func(body string) (int, runRecord) {
		status, _, data := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey,
			map[string]string{"Idempotency-Key": "k"}, strings.NewReader(body))
		var r runRecord
		json.Unmarshal(data, &r)
		return status, r
	}
	status, first := post(`{"agent":"echo","input":{"a":1,"b":{"c":[1,{"x":"<&>","y":2}],"d":3}}}`)
	if status != 201 {
		t.Fatalf("first: got %d; want 201", status)
	}
	for _, same := range []string{
		`{"input":{"b":{"d":3,"c":[1,{"y":2,"x":"<&>"}]},"a":1},"agent":"echo"}`,
		`{"agent":"echo","input":{ "b" : { "d":3, "c":[ 1, {"y":2, "x":"\u003c&>"} ] }, "a":1 }}`,
	} {
		if status, r := post(same); status != 200 || r.ID != first.ID {
			t.Errorf("repeat %s: got %d, run %s; want 200 with %s", same, status, r.ID, first.ID)
		}
	}
	if status, _ := post(`{"agent":"echo","input":{"a":1,"b":{"c":[{"x":"<&>","y":2},1],"d":3}}}`); status != 409 {
		t.Errorf("array in another order: got %d; want 409", status)
	}
}

// TestLogLimiter: one line per interval per key, with the count held back in between.
func TestLogLimiter(t *testing.T) {
	l := newLogLimiter(100 * time.Millisecond)
	if ok, n := l.allow("a"); !ok || n != 0 {
		t.Errorf("first a: got %v, %d; want true, 0", ok, n)
	}
	for i := range 3 {
		if ok, _ := l.allow("a"); ok {
			t.Errorf("a again (%d) within the interval: got allowed; want held back", i)
		}
	}
	if ok, n := l.allow("b"); !ok || n != 0 {
		t.Errorf("first b: got %v, %d; want true, 0 (keys are apart)", ok, n)
	}
	time.Sleep(120 * time.Millisecond)
	if ok, n := l.allow("a"); !ok || n != 3 {
		t.Errorf("a after the interval: got %v, %d; want true, 3", ok, n)
	}
	if ok, n := l.allow("b"); !ok || n != 0 {
		t.Errorf("b after the interval: got %v, %d; want true, 0", ok, n)
	}
}

// TestFailedAuthLogRateLimited: a burst of failed authentications from one address logs
// one line a second, and the next line says how many were held back.
func TestFailedAuthLogRateLimited(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"LOG_LEVEL": "info"}))
	const burst = 30
	start := time.Now()
	for range burst {
		a.do(t, "GET", "/v1/workspaces/"+unknownUUID, "wrong-token", nil, nil)
	}
	lines := strings.Count(a.log.String(), "authentication failed")
	if max := int(time.Since(start)/time.Second) + 1; lines < 1 || lines > max {
		t.Errorf("after %d failed authentications in %v: got %d log lines; want 1 to %d", burst, time.Since(start), lines, max)
	}
	time.Sleep(1100 * time.Millisecond)
	a.do(t, "GET", "/v1/workspaces/"+unknownUUID, "", nil, nil)
	if !strings.Contains(a.log.String(), "suppressed="+strconv.Itoa(burst-lines)) {
		t.Errorf("log after the pause: got %q; want a line with suppressed=%d", a.log.String(), burst-lines)
	}
}

// TestUnavailableLogRateLimited: repeated database-unavailable errors answer 503 each
// and log one line a second, the next one with the count held back.
func TestUnavailableLogRateLimited(t *testing.T) {
	var buf bytes.Buffer
	s := &server{log: slog.New(slog.NewTextHandler(&buf, nil))}
	s.handler()
	down := &net.OpError{Op: "dial", Net: "tcp", Err: fmt.Errorf("connection refused")}
	for range 50 {
		w := httptest.NewRecorder()
		s.fail(w, httptest.NewRequest("GET", "/v1/workspaces", nil), down)
		if w.Code != http.StatusServiceUnavailable {
			t.Fatalf("got status %d; want 503", w.Code)
		}
	}
	if n := strings.Count(buf.String(), "database unavailable"); n != 1 {
		t.Errorf("after 50 errors at once: got %d log lines; want 1", n)
	}
	time.Sleep(1100 * time.Millisecond)
	s.fail(httptest.NewRecorder(), httptest.NewRequest("GET", "/v1/workspaces", nil), down)
	if !strings.Contains(buf.String(), "suppressed=49") {
		t.Errorf("log after the pause: got %q; want suppressed=49", buf.String())
	}
}
