package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

// forbiddenURLs are webhook URLs whose host is a literal forbidden address in some spelling,
// with the class the refusal names.
var forbiddenURLs = []struct{ url, class string }{
	{"http://127.0.0.1/", "loopback"},
	{"http://127.8.9.10:8080/", "loopback"},
	{"http://2130706433/", "loopback"},
	{"http://0177.0.0.1/", "loopback"},
	{"http://0x7f.0.0.1/", "loopback"},
	{"http://0x7F000001/", "loopback"},
	{"http://017700000001/", "loopback"},
	{"http://127.1/", "loopback"},
	{"http://127.0.1/", "loopback"},
	{"http://127.0.0.1./", "loopback"},
	{"http://localhost:9000/", "loopback"},
	{"http://LocalHost./", "loopback"},
	{"http://api.localhost/", "loopback"},
	{"http://[::1]:8080/", "loopback"},
	{"http://[0:0:0:0:0:0:0:1]/", "loopback"},
	{"http://[::ffff:127.0.0.1]/", "loopback"},
	{"http://[::ffff:7f00:1]/", "loopback"},
	{"http://0/", "unspecified"},
	{"http://0.0.0.0:80/", "unspecified"},
	{"http://[::]/", "unspecified"},
	{"http://10.1.2.3/", "private"},
	{"http://012.1.2.3/", "private"},
	{"http://172.16.0.1/", "private"},
	{"http://172.31.255.255/", "private"},
	{"http://192.168.1.1/", "private"},
	{"http://0xc0a80101/", "private"},
	{"http://[fd00::1]/", "private"},
	{"http://[::ffff:10.0.0.1]/", "private"},
	{"http://100.64.0.1/", "shared"},
	{"http://100.127.255.254/", "shared"},
	{"http://169.254.169.254/latest/meta-data/", "link-local"},
	{"http://2852039166/", "link-local"},
	{"http://[fe80::1]/", "link-local"},
	{"http://[fe80::1%25eth0]/", "link-local"},
	{"http://[::ffff:169.254.169.254]/", "link-local"},
	{"http://224.0.0.1/", "multicast"},
	{"http://239.255.255.250:1900/", "multicast"},
	{"http://[ff02::1]/", "multicast"},
	{"http://255.255.255.255/", "broadcast"},
	{"http://0.1.2.3/", "reserved"},
	{"http://192.0.0.8/", "reserved"},
	{"http://198.18.0.1/", "reserved"},
	{"http://240.0.0.1/", "reserved"},
}

// malformedURLs have a host:port that is refused whatever AGENT_WEBHOOK_ALLOWED_HOSTS says.
var malformedURLs = []string{
	"http://127.0.0.1:19001:19002/",
	"http://example.com:65536/",
	"http://example.com:99999/",
	"http://example.com:0/",
	"http://example.com:/",
	"http://:80/",
	"http://user@/",
	"http://[::1/",
}

// publicURLs are accepted with the list unset.
var publicURLs = []string{
	"https://example.com/hook",
	"http://8.8.8.8:8080/",
	"http://100.128.0.1/",
	"http://172.32.0.1/",
	"http://192.169.0.1/",
	"http://[2606:4700::1111]/",
	"http://[::ffff:8.8.8.8]/",
	"http://1.2.3/",               // 1.2.0.3, public
	"http://localhost.example/",   // a name: checked when it is resolved
	"http://999.0.0.1/",           // no inet_aton spelling: a name
	"http://127.0.0.1.nip.io:80/", // a name too; its resolution is refused at execution
}

// TestValidateAgentWebhookDestinations: with AGENT_WEBHOOK_ALLOWED_HOSTS unset, a webhook
// URL whose host is a forbidden address in any spelling is refused at creation, through
// validateAgent and through the API (422); a malformed host:port is refused with the list
// set too; public hosts and names are accepted.
func TestValidateAgentWebhookDestinations(t *testing.T) {
	t.Parallel()
	config := func(u string) json.RawMessage {
		b, _ := json.Marshal(map[string]string{"url": u})
		return b
	}
	for _, f := range forbiddenURLs {
		err := validateAgent("webhook", config(f.url), nil)
		if err == nil || !strings.Contains(err.Error(), "refused: "+f.class+" address") {
			t.Errorf("validateAgent(%s) with the list unset: got %v; want an error naming a %s address", f.url, err, f.class)
		}
	}
	for _, u := range malformedURLs {
		for _, list := range [][]string{nil, {"127.0.0.1", "example.com"}} {
			if err := validateAgent("webhook", config(u), list); err == nil {
				t.Errorf("validateAgent(%s) with list %q: got nil; want an error", u, list)
			}
		}
	}
	for _, u := range publicURLs {
		if err := validateAgent("webhook", config(u), nil); err != nil {
			t.Errorf("validateAgent(%s) with the list unset: got %v; want nil", u, err)
		}
	}
	// With the list set, a listed literal is accepted and an unlisted spelling of it is not.
	if err := validateAgent("webhook", config("http://127.0.0.1:9000/"), []string{"127.0.0.1:9000"}); err != nil {
		t.Errorf("validateAgent of a listed 127.0.0.1:9000: got %v; want nil", err)
	}
	if err := validateAgent("webhook", config("http://2130706433:9000/"), []string{"127.0.0.1:9000"}); err == nil {
		t.Errorf("validateAgent of 2130706433:9000 with 127.0.0.1:9000 listed: got nil; want an error")
	}

	a := startApp(t, testEnv(t, testDB(t), map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": ""}))
	ws := a.createWorkspace(t)
	create := func(name, u string) (int, []byte) {
		status, _, body := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, nil,
			map[string]any{"name": name, "kind": "webhook", "config": map[string]any{"url": u}})
		return status, body
	}
	for i, f := range forbiddenURLs {
		if status, body := create(fmt.Sprint("f", i), f.url); status != 422 || !strings.Contains(string(body), "refused: "+f.class+" address") {
			t.Errorf("POST agent with url %s: got %d %s; want 422 naming a %s address", f.url, status, body, f.class)
		}
	}
	for i, u := range malformedURLs {
		if status, body := create(fmt.Sprint("m", i), u); status != 422 {
			t.Errorf("POST agent with url %s: got %d %s; want 422", u, status, body)
		}
	}
	for i, u := range publicURLs {
		if status, body := create(fmt.Sprint("p", i), u); status != 201 {
			t.Errorf("POST agent with url %s: got %d %s; want 201", u, status, body)
		}
	}
}

// TestAddressClass: every forbidden class, its edges, and public neighbours.
func TestAddressClass(t *testing.T) {
	t.Parallel()
	for addr, want := range map[string]string{
		"127.0.0.1": "loopback", "127.255.255.255": "loopback", "::1": "loopback", "::ffff:127.0.0.2": "loopback",
		"10.0.0.0": "private", "10.255.255.255": "private", "172.16.0.0": "private", "172.31.255.255": "private",
		"192.168.0.0": "private", "fc00::1": "private", "fdff:ffff::1": "private", "::ffff:192.168.0.1": "private",
		"100.64.0.0": "shared", "100.127.255.255": "shared",
		"169.254.0.0": "link-local", "169.254.255.255": "link-local", "fe80::1": "link-local", "fe80::1%eth0": "link-local",
		"febf::1": "link-local", "0.0.0.0": "unspecified", "::": "unspecified", "::ffff:0.0.0.0": "unspecified",
		"224.0.0.0": "multicast", "239.255.255.255": "multicast", "ff02::1": "multicast", "ff0e::1": "multicast",
		"255.255.255.255": "broadcast", "::ffff:255.255.255.255": "broadcast",
		"0.0.0.1": "reserved", "192.0.0.1": "reserved", "198.18.0.0": "reserved", "198.19.255.255": "reserved",
		"240.0.0.0": "reserved", "255.255.255.254": "reserved", "fec0::1": "reserved",
		"1.1.1.1": "", "8.8.8.8": "", "9.255.255.255": "", "11.0.0.0": "", "100.63.255.255": "", "100.128.0.0": "",
		"126.255.255.255": "", "128.0.0.0": "", "169.253.255.255": "", "172.15.255.255": "", "172.32.0.0": "",
		"192.0.1.0": "", "192.167.255.255": "", "198.17.255.255": "", "198.20.0.0": "", "223.255.255.255": "",
		"2606:4700::1111": "", "2001:4860:4860::8888": "", "::ffff:1.1.1.1": "", "fbff::1": "", "fe7f::1": "",
	} {
		if got := addressClass(netip.MustParseAddr(addr)); got != want {
			t.Errorf("addressClass(%s): got %q; want %q", addr, got, want)
		}
	}
	for s, want := range map[string]string{
		"2130706433": "127.0.0.1", "0x7f.1": "127.0.0.1", "0177.0.0.01": "127.0.0.1", "127.1": "127.0.0.1",
		"10.0x10203": "10.1.2.3", "192.168.257": "192.168.1.1", "0": "0.0.0.0", "0x": "0.0.0.0", "4294967295": "255.255.255.255",
		"4294967296": "", "256.0.0.1": "", "1.2.3.4.5": "", "1..2": "", "08.0.0.1": "", "0x1g": "", "example.com": "", "": "",
		"1.2.65536": "", "-1": "", "+1": "",
	} {
		a, ok := parseIPv4Loose(s)
		if got := ""; ok {
			got = a.String()
			if got != want {
				t.Errorf("parseIPv4Loose(%q): got %s; want %q", s, got, want)
			}
		} else if want != "" {
			t.Errorf("parseIPv4Loose(%q): got no address; want %s", s, want)
		}
	}
}

// testLookup resolves the names of evil.test to forbidden addresses and public.test to
// 127.0.0.1 (as a stand-in that a test can listen on), without any DNS.
func testLookup(ctx context.Context, host string) ([]netip.Addr, error) {
	addrs := map[string]string{
		"loopback.evil.test": "127.0.0.1", "mapped.evil.test": "::ffff:127.0.0.1", "v6.evil.test": "::1",
		"private.evil.test": "10.0.0.1", "metadata.evil.test": "169.254.169.254", "shared.evil.test": "100.64.0.1",
		"unspecified.evil.test": "0.0.0.0", "multicast.evil.test": "224.0.0.1", "broadcast.evil.test": "255.255.255.255",
		"public.test": "127.0.0.1",
	}
	a, ok := addrs[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return []netip.Addr{netip.MustParseAddr(a)}, nil
}

// TestWebhookDialRefusesForbidden: at execution, with the list unset, a name that resolves
// to a forbidden address is refused at the dial, before any connection; with the list set,
// a listed host is reached whatever it resolves to.
func TestWebhookDialRefusesForbidden(t *testing.T) {
	t.Parallel()
	var calls webhookRecorder
	srv := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.record()
		io.WriteString(w, `"reached"`)
	}))
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	client := newWebhookClientWith(testLookup)
	t.Cleanup(client.CloseIdleConnections)
	attempt := func(host string, allowed []string) (json.RawMessage, error) {
		c := claimedRun{ID: "00000000-0000-0000-0000-000000000001", AgentKind: "webhook", AgentName: "hook", Attempt: 1,
			AgentConfig: json.RawMessage(`{"url":"http://` + net.JoinHostPort(host, port) + `/","timeout_ms":5000}`), Input: json.RawMessage(`{}`)}
		return runAgent(context.Background(), client, allowed, c)
	}
	for host, class := range map[string]string{
		"loopback.evil.test": "loopback", "mapped.evil.test": "loopback", "v6.evil.test": "loopback",
		"private.evil.test": "private", "metadata.evil.test": "link-local", "shared.evil.test": "shared",
		"unspecified.evil.test": "unspecified", "multicast.evil.test": "multicast", "broadcast.evil.test": "broadcast",
		// literals that slipped past creation (written before this check, or in SQL)
		"127.0.0.1": "loopback", "0.0.0.0": "unspecified", "::ffff:127.0.0.1": "loopback",
	} {
		out, err := attempt(host, nil)
		want := "webhook destination " + net.JoinHostPort(host, port)
		if err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "refused: "+class+" address") ||
			!strings.Contains(err.Error(), "AGENT_WEBHOOK_ALLOWED_HOSTS") {
			t.Errorf("webhook at %s with the list unset: got output %s, err %v; want %q … refused: %s address …", host, out, err, want, class)
		}
	}
	if n := len(calls.times()); n != 0 {
		t.Fatalf("calls that reached the webhook server: got %d; want 0", n)
	}
	if out, err := attempt("no-such.evil.test", nil); err == nil || !strings.Contains(err.Error(), "no such host") {
		t.Errorf("webhook at an unknown name: got output %s, err %v; want an error saying no such host", out, err)
	}

	// Before any request below pools a connection to it (one process has one list, so
	// pooled connections never cross from one policy to the other): public.test maps to
	// 127.0.0.1 here, so with the list unset it is refused as such.
	if _, err := attempt("public.test", nil); err == nil || !strings.Contains(err.Error(), "loopback address") {
		t.Errorf("webhook at public.test (127.0.0.1) with the list unset: got %v; want refused as a loopback address", err)
	}

	// The name is resolved once, through the client's lookup, and that address is dialed.
	for _, list := range [][]string{{"public.test"}, {"loopback.evil.test:" + port}, {"127.0.0.1"}} {
		host := strings.Split(list[0], ":")[0]
		if out, err := attempt(host, list); err != nil || string(out) != `"reached"` {
			t.Errorf("webhook at %s with list %q: got output %s, err %v; want \"reached\"", host, list, out, err)
		}
	}
	if n := len(calls.times()); n != 3 {
		t.Errorf("calls through the allow-list: got %d; want 3", n)
	}
}

// TestWebhookProxyIgnored: HTTP_PROXY in the environment does not route webhooks (a proxy
// would be dialed instead of the checked destination).
func TestWebhookProxyIgnored(t *testing.T) {
	t.Parallel()
	client := newWebhookClient()
	if p := client.Transport.(*http.Transport).Proxy; p != nil {
		t.Errorf("webhook transport Proxy: got a function; want nil")
	}
}

// TestWorkerWebhookLiteralRefused: an agent row written straight into the database with a
// loopback URL (as before this check) fails its attempt at execution with the list unset,
// and the webhook is never called, while the cycle's other run succeeds.
func TestWorkerWebhookLiteralRefused(t *testing.T) {
	t.Parallel()
	var calls webhookRecorder
	srv := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.record()
		io.WriteString(w, `"reached"`)
	}))
	dsn := testDB(t)
	a := startApp(t, testEnv(t, dsn, map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": ""}))
	ws := a.createWorkspace(t)
	st := &store{db: openTestDB(t, dsn)}
	if _, err := st.createAgent(context.Background(), agent{WorkspaceID: ws.ID, Name: "local", Kind: "webhook",
		Config: json.RawMessage(`{"url":"` + srv.URL + `"}`)}); err != nil {
		t.Fatal(err)
	}
	var hook runRecord
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": "local", "max_attempts": 1}, 201, &hook)
	echo := a.createRun(t, ws, "echo", 1)
	if s := a.process(t, nil); s.Claimed != 2 || s.Succeeded != 1 || s.Failed != 1 {
		t.Errorf("summary: got %+v; want claimed 2, succeeded 1, failed 1", s)
	}
	want := "webhook destination " + srv.Listener.Addr().String() + " refused: loopback address"
	if r := a.getRun(t, ws, hook.ID); r.Status != "failed" || !strings.Contains(errorText(r), want) {
		t.Errorf("run of the loopback webhook: got status %q error %q; want failed, %q", r.Status, errorText(r), want)
	}
	if r := a.getRun(t, ws, echo.ID); r.Status != "succeeded" || r.Attempt != 1 {
		t.Errorf("echo run: got status %q attempt %d; want succeeded, 1", r.Status, r.Attempt)
	}
	if n := len(calls.times()); n != 0 {
		t.Errorf("calls to the loopback webhook: got %d; want 0", n)
	}
}

// TestStoredJSONSize: the size storedJSONSize gives is never below what PostgreSQL prints
// for the value as jsonb, nor below the API's answer of it, and is exactly PostgreSQL's for
// values with no key twice and nothing the API escapes; what jsonb refuses, checkStorable
// refuses too.
func TestStoredJSONSize(t *testing.T) {
	t.Parallel()
	db := openTestDB(t, testDB(t))
	pgSize := func(v string) (int, error) {
		var n int
		err := db.QueryRow(`SELECT octet_length($1::jsonb::text)`, v).Scan(&n)
		return n, err
	}
	for _, c := range []struct {
		value string
		exact bool
	}{
		{`1e100`, true}, {`-1.5e-20`, true}, {`123.456e3`, true}, {`1.50`, true}, {`-0`, true}, {`-0.0`, true},
		{`-0.00e-2`, true}, {`0e1000000000`, true}, {`1.0e1`, true}, {`1.00E+1`, true}, {`0.001e-2`, true},
		{`000.5`, false}, // not JSON: refused below
		{`12e-16383`, true}, {`1e-16383`, true}, {`0.0001e131075`, true}, {`9.99e131069`, true}, {`-7`, true},
		{`[1, [2, [3, [4, []]]], {}, [[]]]`, true}, {` { "b" : [ true , false , null ] , "a" : { } } `, true},
		{`{"z":1,"aa":{"y":[1e3,"x"]},"b":-0.5}`, true},
		{`"plain"`, true}, {`"esc \" \\ \/ \b \f \n \r \t"`, true}, {`"\u0001\u001f\u007f\u00e9\u20ac"`, true},
		{`"\ud83d\ude00 😀 é €"`, true}, {`"\u0041"`, true}, {"\"\x7f\"", true},
		{`{"a":1,"a":2}`, false}, {`"<a href='x'>&</a>"`, false}, {`"\u2028 \u2029 \u003c"`, false},
		{`[` + strings.Repeat(`1e131071,`, 8) + `1e131071]`, true},
	} {
		got, err := storedJSONSize([]byte(c.value))
		if !json.Valid([]byte(c.value)) {
			if err == nil {
				t.Errorf("storedJSONSize(%s): got %d; want an error (not JSON)", c.value, got)
			}
			continue
		}
		pg, pgErr := pgSize(c.value)
		if err != nil || pgErr != nil {
			t.Errorf("storedJSONSize(%.40s): got %d, err %v; PostgreSQL: %d, err %v; want both to store it", c.value, got, err, pg, pgErr)
			continue
		}
		var text string
		if err := db.QueryRow(`SELECT $1::jsonb::text`, c.value).Scan(&text); err != nil {
			t.Fatal(err)
		}
		answered, err := json.Marshal(struct{ V json.RawMessage }{json.RawMessage(text)})
		if err != nil {
			t.Fatal(err)
		}
		answer := len(answered) - len(`{"V":}`)
		if got < pg || got < answer || (c.exact && got != pg) {
			t.Errorf("storedJSONSize(%.40s): got %d; want PostgreSQL's %d (exact: %v), at least the answer's %d", c.value, got, pg, c.exact, answer)
		}
	}

	for value, want := range map[string]string{
		`{"a":"x\u0000y"}`:        `cannot be stored: \u0000 in a string`,
		"[\"ok\", \"\xff\xfe\"]":  "cannot be stored: invalid UTF-8",
		"\"\xed\xa0\x80\"":        "cannot be stored: invalid UTF-8", // a surrogate in UTF-8
		`"\ud800"`:                "cannot be stored: an unpaired UTF-16 surrogate",
		`"\udc00\ud800"`:          "cannot be stored: an unpaired UTF-16 surrogate",
		`"\ud800\u0041"`:          "cannot be stored: an unpaired UTF-16 surrogate",
		`"\ud800x"`:               "cannot be stored: an unpaired UTF-16 surrogate",
		`[1e1000000]`:             "cannot be stored: number 1e1000000 is outside PostgreSQL numeric's range",
		`10e131071`:               "outside PostgreSQL numeric's range",
		`1e131072`:                "outside PostgreSQL numeric's range",
		`1e-16384`:                "outside PostgreSQL numeric's range",
		`1.5e-16383`:              "outside PostgreSQL numeric's range",
		`0e-20000`:                "outside PostgreSQL numeric's range",
		`0e1073741823`:            "outside PostgreSQL numeric's range",
		`0e-99999999999999999999`: "outside PostgreSQL numeric's range",
		`[` + strings.Repeat(`1e131071,`, 8) + `1e131071]`: "is over 1 MiB as stored (1179666 bytes)",
		`"` + strings.Repeat("<", maxStoredJSON/6+1) + `"`: "is over 1 MiB as stored",
	} {
		err := checkStorable([]byte(value))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("checkStorable(%.40q): got %v; want an error containing %q", value, err, want)
		}
		if strings.Contains(want, "cannot be stored") {
			if _, pgErr := pgSize(value); pgErr == nil {
				t.Errorf("PostgreSQL stored %.40q; want it refused, as checkStorable refuses it", value)
			}
		}
	}
	exact := `"` + strings.Repeat("x", maxStoredJSON-2) + `"`
	if err := checkStorable([]byte(exact)); err != nil {
		t.Errorf("checkStorable of a 1 MiB string: got %v; want nil", err)
	}
}

// TestWorkerWebhookOutputNotStorable: a webhook output that jsonb cannot store, or that is
// over 1 MiB as stored, fails that attempt with a message saying which, while the same
// cycle's other runs succeed at attempt 1.
func TestWorkerWebhookOutputNotStorable(t *testing.T) {
	t.Parallel()
	bodies := map[string]struct{ body, want string }{
		"nul":    {`{"a":"x\u0000y"}`, `webhook output cannot be stored: \u0000 in a string`},
		"utf8":   {"{\"a\":\"\xff\"}", "webhook output cannot be stored: invalid UTF-8"},
		"range":  {`[1e1000000]`, "webhook output cannot be stored: number 1e1000000 is outside PostgreSQL numeric's range"},
		"digits": {`[` + strings.Repeat(`1e131071,`, 8) + `1e131071]`, "webhook output is over 1 MiB as stored (1179666 bytes)"},
		"fine":   {`[1e131071]`, ""},
	}
	mux := http.NewServeMux()
	for name, b := range bodies {
		mux.HandleFunc("/"+name, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, b.body)
		})
	}
	srv := newWebhookServer(t, mux)
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	runs := map[string]runRecord{}
	for name := range bodies {
		a.createAgent(t, ws, name, "webhook", map[string]any{"url": srv.URL + "/" + name})
		var r runRecord
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, map[string]any{"agent": name, "max_attempts": 1}, 201, &r)
		runs[name] = r
	}
	runs["echo"] = a.createRun(t, ws, "echo", "hello")
	if s := a.process(t, nil); s.Claimed != 6 || s.Succeeded != 2 || s.Failed != 4 {
		t.Errorf("summary: got %+v; want claimed 6, succeeded 2, failed 4", s)
	}
	for name, r := range runs {
		r = a.getRun(t, ws, r.ID)
		switch want := bodies[name].want; {
		case want == "":
			if r.Status != "succeeded" || r.Attempt != 1 {
				t.Errorf("run %s: got status %q attempt %d error %q; want succeeded at attempt 1", name, r.Status, r.Attempt, errorText(r))
			}
		case r.Status != "failed" || !strings.HasPrefix(errorText(r), want):
			t.Errorf("run %s: got status %q error %q; want failed, %q", name, r.Status, errorText(r), want)
		}
	}
	if r := a.getRun(t, ws, runs["fine"].ID); len(r.Output) < 131072 {
		t.Errorf("output of [1e131071]: got %d bytes; want the 131072 digits and more", len(r.Output))
	}
}

// TestAgentConfigKeysMatchExactly: a config key that differs from a known one only in case
// is unknown (SPEC: {"DELAY_MS":1} is not delay_ms): 422 at creation and at PATCH, for
// both kinds, and the exact key is accepted.
func TestAgentConfigKeysMatchExactly(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), nil))
	ws := a.createWorkspace(t)
	hook := "http://127.0.0.1:9/run"
	cases := []struct {
		kind      string
		good, bad map[string]any
	}{
		{"echo", map[string]any{"delay_ms": 1}, map[string]any{"DELAY_MS": 1}},
		{"webhook", map[string]any{"url": hook}, map[string]any{"URL": hook}},
		{"webhook", map[string]any{"url": hook, "timeout_ms": 5}, map[string]any{"url": hook, "Timeout_ms": 5}},
	}
	for i, c := range cases {
		name := fmt.Sprint(c.kind, i)
		status, _, body := a.do(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, nil,
			map[string]any{"name": name, "kind": c.kind, "config": c.bad})
		if status != 422 || !strings.Contains(string(body), "unknown key") {
			t.Errorf("POST %s agent with config %v: got %d %s; want 422 naming the unknown key", c.kind, c.bad, status, body)
		}
		a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey,
			map[string]any{"name": name, "kind": c.kind, "config": c.good}, 201, nil)
		status, _, body = a.do(t, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/"+name, ws.APIKey, nil, map[string]any{"config": c.bad})
		if status != 422 || !strings.Contains(string(body), "unknown key") {
			t.Errorf("PATCH %s agent with config %v: got %d %s; want 422 naming the unknown key", c.kind, c.bad, status, body)
		}
		a.mustDo(t, "PATCH", "/v1/workspaces/"+ws.ID+"/agents/"+name, ws.APIKey, map[string]any{"config": c.good}, 200, nil)
	}
}
