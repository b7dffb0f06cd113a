package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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
		c := claimedRun{ID: "00000000-0000-0000-0000-000000000001", AgentKind: "webhook", AgentName: "hook", Attempt: 1, Secrets: []string{newSigningSecret()},
			AgentConfig: json.RawMessage(`{"url":"http://` + net.JoinHostPort(host, port) + `/","timeout_ms":5000}`), Input: json.RawMessage(`{}`)}
		out, _, err := runAgent(context.Background(), client, allowed, c)
		return out, err
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

// swVerify verifies a delivery as the Standard Webhooks specification tells a receiver to,
// written apart from signatures() so that the two check each other: the key is the base64
// after whsec_, the signed content id.timestamp.body, the timestamp within five minutes of
// now, and any one v1 signature of the space-separated list may match.
func swVerify(secret string, h http.Header, body []byte, now time.Time) error {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		return fmt.Errorf("secret: %v", err)
	}
	id, ts := h.Get("webhook-id"), h.Get("webhook-timestamp")
	sec, err := strconv.ParseInt(ts, 10, 64)
	if id == "" || err != nil {
		return fmt.Errorf("webhook-id %q, webhook-timestamp %q: want both", id, ts)
	}
	if d := now.Sub(time.Unix(sec, 0)); d > 5*time.Minute || d < -5*time.Minute {
		return fmt.Errorf("webhook-timestamp %s is %v from now", ts, d)
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "." + string(body)))
	want := mac.Sum(nil)
	for _, sig := range strings.Fields(h.Get("webhook-signature")) {
		version, b64, _ := strings.Cut(sig, ",")
		got, err := base64.StdEncoding.DecodeString(b64)
		if version == "v1" && err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return errors.New("no signature matches")
}

// TestStandardWebhooksExample: the verifier above and signatures() agree with the example
// the Standard Webhooks specification publishes, and a changed body or id fails.
func TestStandardWebhooksExample(t *testing.T) {
	const (
		secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
		id     = "msg_p5jXN8AQM9LWM0D4loKWxJek"
		ts     = 1614265330
		body   = `{"test": 2432232314}`
		want   = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
	)
	h := http.Header{"Webhook-Id": {id}, "Webhook-Timestamp": {strconv.Itoa(ts)}, "Webhook-Signature": {want}}
	at := time.Unix(ts, 0)
	if err := swVerify(secret, h, []byte(body), at); err != nil {
		t.Errorf("the specification's example: got %v; want it verified", err)
	}
	if err := swVerify(secret, h, []byte(`{"test": 2432232315}`), at); err == nil {
		t.Error("the example with another body: got verified; want refused")
	}
	if err := swVerify(secret, h, []byte(body), at.Add(10*time.Minute)); err == nil {
		t.Error("the example ten minutes late: got verified; want refused")
	}
	if got, err := signatures([]string{secret}, id, ts, []byte(body)); got != want || err != nil {
		t.Errorf("signatures of the example: got %q, %v; want %q", got, err, want)
	}
	other := newSigningSecret()
	got, err := signatures([]string{other, secret}, id, ts, []byte(body))
	if err != nil || !strings.HasSuffix(got, " "+want) || strings.Count(got, "v1,") != 2 {
		t.Errorf("signatures by a new secret and the example's: got %q, %v; want the new one's, a space, then %q", got, err, want)
	}
	h.Set("Webhook-Signature", got)
	for _, s := range []string{other, secret} {
		if err := swVerify(s, h, []byte(body), at); err != nil {
			t.Errorf("both signatures, verified with %s: got %v; want verified", s, err)
		}
	}
}

// TestParseTraceparent: valid headers (version 00, and a later version with more fields)
// give their trace id and flags; anything else is refused.
func TestParseTraceparent(t *testing.T) {
	const id = "4bf92f3577b34da6a3ce929d0e0e4736"
	for _, h := range []string{"00-" + id + "-00f067aa0ba902b7-01", "cc-" + id + "-00f067aa0ba902b7-00-what-comes-later"} {
		tc, ok := parseTraceparent(h)
		if !ok || tc.TraceID != id || tc.Flags != h[53:55] {
			t.Errorf("parseTraceparent(%q): got %+v, %v; want trace id %s, flags %s", h, tc, ok, id, h[53:55])
		}
	}
	for _, h := range []string{"", "00-" + id + "-00f067aa0ba902b7-01-", "ff-" + id + "-00f067aa0ba902b7-01",
		"00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-" + id + "-0000000000000000-01",
		"00-" + strings.ToUpper(id) + "-00f067aa0ba902b7-01", "00-" + id + "-00f067aa0ba902b7-0g", "cc-" + id + "-00f067aa0ba902b7-01x"} {
		if tc, ok := parseTraceparent(h); ok {
			t.Errorf("parseTraceparent(%q): got %+v; want refused", h, tc)
		}
	}
	a, b := newTraceContext(), newTraceContext()
	if _, ok := parseTraceparent("00-" + a.TraceID + "-00f067aa0ba902b7-" + a.Flags); !ok || a.TraceID == b.TraceID {
		t.Errorf("new trace contexts: got %+v and %+v; want valid and different", a, b)
	}
}

// delivery is one webhook request as a test server received it.
type delivery struct {
	header http.Header
	body   []byte
	at     time.Time
}

// deliveryLog is a test webhook server's record of what it received, by path.
type deliveryLog struct {
	mu  sync.Mutex
	got map[string][]delivery
}

func (l *deliveryLog) add(path string, d delivery) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.got == nil {
		l.got = map[string][]delivery{}
	}
	l.got[path] = append(l.got[path], d)
}

func (l *deliveryLog) of(path string) []delivery {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.got[path])
}

// newDeliveryServer starts a webhook server that records every request: /fail answers
// 500, /hang waits until the request is canceled, anything else 200 {}.
func newDeliveryServer(t *testing.T) (*httptest.Server, *deliveryLog) {
	log := &deliveryLog{}
	srv := newWebhookServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		log.add(r.URL.Path, delivery{r.Header.Clone(), body, time.Now()})
		switch r.URL.Path {
		case "/fail":
			http.Error(w, "failing on purpose", http.StatusInternalServerError)
		case "/hang":
			<-r.Context().Done()
		default:
			io.WriteString(w, "{}")
		}
	}))
	return srv, log
}

// traceparentOf splits a delivery's traceparent into trace id and parent id, failing the
// test unless it is 00-<32 hex>-<16 hex>-<2 hex>.
func traceparentOf(t *testing.T, d delivery) (traceID, parentID string) {
	t.Helper()
	h := d.header.Get("traceparent")
	if !regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$`).MatchString(h) {
		t.Fatalf("traceparent: got %q; want 00-<trace id>-<parent id>-<flags>", h)
	}
	return h[3:35], h[36:52]
}

// TestSignedDeliveries: every delivery of a webhook agent is signed with its secret, which
// only its creation and a rotation show; after a rotation both secrets sign for 24 hours,
// then only the new one; each attempt has its own webhook-id; the create request's trace
// id is carried, with a new parent id for each delivery.
func TestSignedDeliveries(t *testing.T) {
	t.Parallel()
	srv, log := newDeliveryServer(t)
	host := strings.TrimPrefix(srv.URL, "http://")
	env := testEnv(t, testDB(t), map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": host, "RUN_WORKER_EMBEDDED": "true"})
	db := openTestDB(t, env["DATABASE_URL"])
	a := startApp(t, env)
	ws := a.createWorkspace(t)
	agents := "/v1/workspaces/" + ws.ID + "/agents"
	runs := "/v1/workspaces/" + ws.ID + "/runs"

	var hook agent
	a.mustDo(t, "POST", agents, ws.APIKey, map[string]any{"name": "hook", "kind": "webhook",
		"config": map[string]any{"url": srv.URL + "/ok"}}, 201, &hook)
	secret := hook.SigningSecret
	if key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_")); !strings.HasPrefix(secret, "whsec_") || err != nil || len(key) < 24 {
		t.Fatalf("signing_secret of a new webhook agent: got %q; want whsec_ and the base64 of 24 bytes or more", secret)
	}
	var echo agent
	a.mustDo(t, "GET", agents+"/echo", ws.APIKey, nil, 200, &echo)
	var failingHook agent
	a.mustDo(t, "POST", agents, ws.APIKey, map[string]any{"name": "failing", "kind": "webhook",
		"config": map[string]any{"url": srv.URL + "/fail"}}, 201, &failingHook)
	if failingHook.SigningSecret == "" || failingHook.SigningSecret == secret {
		t.Fatalf("signing_secret of a second webhook agent: got %q; want its own", failingHook.SigningSecret)
	}
	noSecret := func(when string) {
		t.Helper()
		for _, path := range []string{agents, agents + "/hook"} {
			if _, _, body := a.do(t, "GET", path, ws.APIKey, nil, nil); strings.Contains(string(body), "signing_secret") ||
				strings.Contains(string(body), strings.TrimPrefix(secret, "whsec_")) {
				t.Errorf("GET %s %s: got %s; want no signing secret", path, when, body)
			}
		}
		if _, _, body := a.do(t, "PATCH", agents+"/hook", ws.APIKey, nil, map[string]any{"paused": false}); strings.Contains(string(body), "signing_secret") {
			t.Errorf("PATCH agent %s: got %s; want no signing secret", when, body)
		}
	}
	noSecret("after its creation")

	// One run with the caller's trace, one without, one with an invalid traceparent.
	const callerTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	const callerParent = "00f067aa0ba902b7"
	create := func(agentName, traceparent string) runRecord {
		t.Helper()
		var r runRecord
		hdr := map[string]string{}
		if traceparent != "" {
			hdr["traceparent"] = traceparent
		}
		status, _, body := a.do(t, "POST", runs, ws.APIKey, hdr, map[string]any{"agent": agentName, "input": map[string]any{"n": 1}})
		if status != 201 || json.Unmarshal(body, &r) != nil {
			t.Fatalf("POST run: got %d %s; want 201 and a run", status, body)
		}
		return r
	}
	traced := create("hook", "00-"+callerTrace+"-"+callerParent+"-01")
	fresh := create("hook", "")
	invalid := create("hook", "00-"+callerTrace+"-"+callerParent+"-1")
	if traced.TraceID != callerTrace {
		t.Errorf("trace_id of a run created with traceparent: got %q; want %s", traced.TraceID, callerTrace)
	}
	for _, r := range []runRecord{fresh, invalid} {
		if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(r.TraceID) || r.TraceID == callerTrace {
			t.Errorf("trace_id of a run created without a valid traceparent: got %q; want a new one", r.TraceID)
		}
	}
	if fresh.TraceID == invalid.TraceID {
		t.Errorf("trace_id of two runs created without a traceparent: got %s for both; want each its own", fresh.TraceID)
	}
	var batch struct{ Runs []runRecord }
	status, _, body := a.do(t, "POST", runs+"/batch", ws.APIKey, map[string]string{"traceparent": "00-" + callerTrace + "-" + callerParent + "-00"},
		map[string]any{"runs": []any{map[string]any{"agent": "hook"}, map[string]any{"agent": "hook"}}})
	if status != 201 || json.Unmarshal(body, &batch) != nil || len(batch.Runs) != 2 {
		t.Fatalf("POST batch: got %d %s; want 201 and two runs", status, body)
	}
	for _, r := range append(batch.Runs, traced, fresh, invalid) {
		if got := a.waitRunStatus(t, ws, r.ID, "succeeded", 30*time.Second); got.TraceID != r.TraceID {
			t.Errorf("GET run %s: got trace_id %q; want %q, as created", r.ID, got.TraceID, r.TraceID)
		}
	}
	for _, r := range batch.Runs {
		if r.TraceID != callerTrace {
			t.Errorf("trace_id of a batch's run: got %q; want the batch request's %s", r.TraceID, callerTrace)
		}
	}
	var untraced struct{ Runs []runRecord }
	a.mustDo(t, "POST", runs+"/batch", ws.APIKey, map[string]any{"runs": []any{map[string]any{"agent": "echo"}, map[string]any{"agent": "echo"}}}, 201, &untraced)
	if got := untraced.Runs; len(got) != 2 || got[0].TraceID != got[1].TraceID || got[0].TraceID == callerTrace ||
		got[0].TraceID == fresh.TraceID || !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(got[0].TraceID) {
		t.Errorf("trace_ids of a batch without traceparent: got %+v; want one new trace id for both", got)
	}

	// Each delivery: signed with the secret, webhook-id <run>_1_1 (step 1, attempt 1), the run's trace id.
	byRun := map[string]delivery{}
	for _, d := range log.of("/ok") {
		var b struct {
			RunID string `json:"run_id"`
		}
		json.Unmarshal(d.body, &b)
		byRun[b.RunID] = d
	}
	parents := map[string]bool{}
	for _, r := range append(batch.Runs, traced, fresh, invalid) {
		d, ok := byRun[r.ID]
		if !ok {
			t.Fatalf("deliveries: got none of run %s; want one", r.ID)
		}
		if err := swVerify(secret, d.header, d.body, d.at); err != nil {
			t.Errorf("delivery of run %s (signature %q): got %v; want verified with the agent's secret", r.ID, d.header.Get("webhook-signature"), err)
		}
		if got := d.header.Values("webhook-signature"); len(got) != 1 || strings.Count(got[0], "v1,") != 1 {
			t.Errorf("webhook-signature before any rotation: got %q; want one signature", got)
		}
		if got, want := d.header.Get("webhook-id"), r.ID+"_1_1"; got != want {
			t.Errorf("webhook-id of run %s: got %q; want %q", r.ID, got, want)
		}
		traceID, parent := traceparentOf(t, d)
		if traceID != r.TraceID {
			t.Errorf("traceparent of run %s: got trace id %s; want the run's %s", r.ID, traceID, r.TraceID)
		}
		if parent == callerParent || parents[parent] {
			t.Errorf("traceparent of run %s: got parent id %s again; want a new one for each delivery", r.ID, parent)
		}
		parents[parent] = true
	}

	// Each attempt of a failing run: its own webhook-id, the same trace, a new parent id.
	failing := create("failing", "00-"+callerTrace+"-"+callerParent+"-01")
	a.waitRunStatus(t, ws, failing.ID, "failed", 30*time.Second)
	tries := log.of("/fail")
	if len(tries) != 3 {
		t.Fatalf("deliveries of a run failing 3 attempts: got %d; want 3", len(tries))
	}
	for i, d := range tries {
		if got, want := d.header.Get("webhook-id"), fmt.Sprintf("%s_1_%d", failing.ID, i+1); got != want {
			t.Errorf("webhook-id of attempt %d: got %q; want %q", i+1, got, want)
		}
		if err := swVerify(failingHook.SigningSecret, d.header, d.body, d.at); err != nil {
			t.Errorf("attempt %d: got %v; want verified with its agent's secret", i+1, err)
		}
		if err := swVerify(secret, d.header, d.body, d.at); err == nil {
			t.Errorf("attempt %d: got it verified with another agent's secret; want refused", i+1)
		}
		traceID, parent := traceparentOf(t, d)
		if traceID != callerTrace || parents[parent] {
			t.Errorf("traceparent of attempt %d: got %s; want trace id %s and a parent id not seen before", i+1, d.header.Get("traceparent"), callerTrace)
		}
		parents[parent] = true
	}

	// A rotation: the new secret, shown once; both sign for 24 hours, the new one first.
	var rotated agent
	a.mustDo(t, "POST", agents+"/hook/rotate-secret", ws.APIKey, nil, 200, &rotated)
	if rotated.SigningSecret == "" || rotated.SigningSecret == secret || rotated.Name != "hook" {
		t.Fatalf("rotate-secret: got agent %q with secret %q; want hook with a new secret", rotated.Name, rotated.SigningSecret)
	}
	noSecret("after a rotation")
	before := len(log.of("/ok"))
	deliver := func() delivery {
		t.Helper()
		r := create("hook", "")
		a.waitRunStatus(t, ws, r.ID, "succeeded", 30*time.Second)
		got := log.of("/ok")
		if len(got) != before+1 {
			t.Fatalf("deliveries: got %d; want %d", len(got), before+1)
		}
		before++
		return got[len(got)-1]
	}
	d := deliver()
	sigs := strings.Fields(d.header.Get("webhook-signature"))
	if len(sigs) != 2 {
		t.Fatalf("webhook-signature after a rotation: got %q; want two signatures", sigs)
	}
	for i, s := range []string{rotated.SigningSecret, secret} {
		one := d.header.Clone()
		one.Set("webhook-signature", sigs[i])
		if err := swVerify(s, one, d.body, d.at); err != nil {
			t.Errorf("signature %d after a rotation: got %v; want verified with the %s secret", i+1, err, []string{"new", "old"}[i])
		}
		if err := swVerify(s, d.header, d.body, d.at); err != nil {
			t.Errorf("webhook-signature after a rotation: got %v; want it verified with the %s secret", err, []string{"new", "old"}[i])
		}
	}
	// 24 hours later (the rotation moved back): the new secret alone.
	if _, err := db.Exec(`UPDATE agents SET secret_rotated_at = secret_rotated_at - interval '24 hours 1 second' WHERE id = $1`, hook.ID); err != nil {
		t.Fatal(err)
	}
	d = deliver()
	if err := swVerify(rotated.SigningSecret, d.header, d.body, d.at); err != nil || strings.Count(d.header.Get("webhook-signature"), "v1,") != 1 {
		t.Errorf("webhook-signature 24 h after a rotation: got %q (%v); want the new secret's alone", d.header.Get("webhook-signature"), err)
	}
	if err := swVerify(secret, d.header, d.body, d.at); err == nil {
		t.Error("webhook-signature 24 h after a rotation: got it verified with the old secret; want refused")
	}

	// An echo agent has nothing to sign: 409 saying so.
	status, _, body = a.do(t, "POST", agents+"/echo/rotate-secret", ws.APIKey, nil, nil)
	if status != 409 || !strings.Contains(string(body), "only webhook agents") {
		t.Errorf("rotate-secret of an echo agent: got %d %s; want 409 saying only webhook agents have a secret", status, body)
	}
	if status, _, body = a.do(t, "POST", agents+"/nobody/rotate-secret", ws.APIKey, nil, nil); status != 404 {
		t.Errorf("rotate-secret of an unknown agent: got %d %s; want 404", status, body)
	}
}

// TestRedeliveryKeepsWebhookID: an attempt put back in the queue at shutdown (its attempt
// refunded) is delivered again by the next process with the same webhook-id, so that the
// agent can tell it is the same delivery; the trace id is the same, the parent id new.
func TestRedeliveryKeepsWebhookID(t *testing.T) {
	t.Parallel()
	srv, log := newDeliveryServer(t)
	env := testEnv(t, testDB(t), map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": strings.TrimPrefix(srv.URL, "http://"),
		"RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "200", "RUN_WORKER_EMBEDDED": "true"})
	p := startProc(t, env)
	a := p.app()
	ws := a.createWorkspace(t)
	var hook agent
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/agents", ws.APIKey, map[string]any{"name": "hook", "kind": "webhook",
		"config": map[string]any{"url": srv.URL + "/hang"}}, 201, &hook)
	r := a.createRun(t, ws, "hook", nil)
	eventually(t, 30*time.Second, "the run is delivered", func() bool { return len(log.of("/hang")) == 1 })
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit after SIGTERM: got %d; want 0", code)
	}
	db := openTestDB(t, env["DATABASE_URL"])
	if got := readRunRow(t, db, r.ID); got.Status != "queued" || got.Attempt != 0 {
		t.Fatalf("run after shutdown: got %s attempt %d; want queued, attempt 0 (refunded)", got.Status, got.Attempt)
	}
	env["LISTEN_ADDR"] = freeAddr(t)
	startProc(t, env)
	eventually(t, 30*time.Second, "the run is delivered again", func() bool { return len(log.of("/hang")) == 2 })
	got := log.of("/hang")
	for i, d := range got {
		if err := swVerify(hook.SigningSecret, d.header, d.body, d.at); err != nil {
			t.Errorf("delivery %d: got %v; want verified", i+1, err)
		}
	}
	if id0, id1 := got[0].header.Get("webhook-id"), got[1].header.Get("webhook-id"); id0 != r.ID+"_1_1" || id1 != id0 {
		t.Errorf("webhook-id of a redelivered attempt: got %q, then %q; want %s_1_1 both times", id0, id1, r.ID)
	}
	t0, p0 := traceparentOf(t, got[0])
	t1, p1 := traceparentOf(t, got[1])
	if t0 != r.TraceID || t1 != t0 || p1 == p0 {
		t.Errorf("traceparent of a redelivery: got %s, then %s; want trace id %s both times, parent ids different",
			got[0].header.Get("traceparent"), got[1].header.Get("traceparent"), r.TraceID)
	}
}

// TestPushbackRetryAfter: which webhook answers are a pushback, and for how long: a 429 or
// 503 with Retry-After in seconds or as an HTTP date (one past is now), at most an hour;
// anything else is an ordinary failure.
func TestPushbackRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		status     int
		retryAfter string // "": no header
		want       time.Duration
		ok         bool
	}{
		{429, "2", 2 * time.Second, true},
		{503, "0", 0, true},
		{503, " 30 ", 30 * time.Second, true},
		{429, "3600", time.Hour, true},
		{429, "3601", time.Hour, true},
		{429, "99999999999999999999", time.Hour, true},
		{503, now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second, true},
		{503, now.Add(3 * time.Hour).Format(http.TimeFormat), time.Hour, true},
		{429, now.Add(-time.Minute).Format(http.TimeFormat), 0, true},
		{429, "Sunday, 06-Dec-26 12:00:30 GMT", 0, true}, // RFC 850, past: now
		{429, "", 0, false},
		{503, "soon", 0, false},
		{429, "-1", 0, false},
		{429, "1.5", 0, false},
		{500, "2", 0, false},
		{502, "2", 0, false},
		{200, "2", 0, false},
	} {
		resp := &http.Response{StatusCode: c.status, Header: http.Header{}}
		if c.retryAfter != "" {
			resp.Header.Set("Retry-After", c.retryAfter)
		}
		got, ok := pushback(resp, now)
		if got != c.want || ok != c.ok {
			t.Errorf("HTTP %d, Retry-After %q: got %v, %v; want %v, %v", c.status, c.retryAfter, got, ok, c.want, c.ok)
		}
	}
}
