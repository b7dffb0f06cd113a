package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/lib/pq"
)

// FuzzDecodeRunRequest feeds arbitrary bytes to createRun's decoding (decode behind the
// same 1 MiB limit as the server, then validate). It must never panic; every refusal is
// a 400, 413 or 422 requestError; an accepted request has an agent, max_attempts in
// 1 … 25 and an input that is valid, compact JSON.
func FuzzDecodeRunRequest(f *testing.F) {
	for _, seed := range []string{
		`{"agent":"echo","input":{"a":1}}`,
		`{"agent":"echo","input":[1,"two",null,true,{"x":{}}],"max_attempts":25}`,
		`{"agent":"echo"}`,
		`{"agent":"echo","input":null,"max_attempts":null}`,
		`{"agent":"echo","max_attempts":0}`,
		`{"agent":"echo","max_attempts":1e3}`,
		`{"agent":"echo","input": 1 } `,
		`{"agent":"echo","inptu":1}`,
		`{"agent":"echo"} {}`,
		`{"agent":1}`,
		`[]`,
		`null`,
		``,
		`{"agent":"echo","input":"\u0000\ud800"}`,
		"{\"agent\":\"echo\",\"input\":\"\xff\"}",
		`{"agent":"echo","input":` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		w := httptest.NewRecorder()
		r := httptest.NewRequest("POST", "/v1/workspaces/x/runs", bytes.NewReader(body))
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		var q runRequest
		err := decode(r, &q, false)
		var n newRun
		if err == nil {
			n, err = q.validate("")
		}
		if err != nil {
			var re *requestError
			if !errors.As(err, &re) {
				t.Fatalf("body %q: got error %T %v; want a *requestError", body, err, err)
			}
			if re.status != 400 && re.status != 413 && re.status != 422 || re.code == "" || re.message == "" {
				t.Fatalf("body %q: got %d %q %q; want 400, 413 or 422 with a code and a message", body, re.status, re.code, re.message)
			}
			return
		}
		if !json.Valid(n.Input) {
			t.Fatalf("body %q: got input %q accepted; want valid JSON", body, n.Input)
		}
		var compact bytes.Buffer
		if json.Compact(&compact, n.Input) != nil || !bytes.Equal(compact.Bytes(), n.Input) {
			t.Fatalf("body %q: got input %q; want it compact", body, n.Input)
		}
		if n.Agent == "" || n.MaxAttempts < 1 || n.MaxAttempts > 25 {
			t.Fatalf("body %q: got agent %q, max_attempts %d accepted; want it refused", body, n.Agent, n.MaxAttempts)
		}
	})
}

// FuzzCheckKeys holds checkKeys (a byte scanner) to the token walk it replaced, on any
// valid JSON and the request types the API decodes: the same refusal, or none.
func FuzzCheckKeys(f *testing.F) {
	for _, seed := range []string{
		`{"runs":[{"agent":"echo","input":{"a":1,"b":[{"c":2,"c":3}]}}]}`,
		`{"runs":[{"agent":"echo"},{"Agent":"echo"}]}`,
		`{"agent":"echo","\u0061gent":"x"}`,
		`{"agent":"echo","input":{"":1,"":2}}`,
		`[{"a":1},{"a":1,"a":2}]`,
		` {"agent" : "echo" , "input" : { "k\"ey" : 1 , "k\u0022ey" : 2 } } `,
		`{"agent":"echo","input":{"a1":1,"a2":2,"a3":3,"a4":4,"a5":5,"a6":6,"a7":7,"a8":8,"a9":9,"a10":10,"a11":11,"a12":12,"a13":13,"a14":14,"a15":15,"a16":16,"a17":17,"a5":0}}`,
		`"x"`, `null`, `[]`, `{}`, `{"limit":1}`,
	} {
		f.Add([]byte(seed), uint8(0))
		f.Add([]byte(seed), uint8(1))
	}
	batch := &struct {
		Runs []runRequest `json:"runs"`
	}{}
	types := []reflect.Type{reflect.TypeOf(&runRequest{}), reflect.TypeOf(batch), nil}
	f.Fuzz(func(t *testing.T, body []byte, which uint8) {
		if !json.Valid(body) {
			return
		}
		typ := types[int(which)%len(types)]
		got, want := checkKeys(body, typ), checkKeysByTokens(body, typ)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("body %q into %v: got %v; want %v", body, typ, got, want)
		}
	})
}

// checkKeysByTokens is checkKeys as it was, over encoding/json's Token: the reference.
func checkKeysByTokens(data []byte, t reflect.Type) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	err := walkTokens(dec, t, "", 0)
	var bad *requestError
	if errors.As(err, &bad) {
		return err
	}
	return nil
}

func walkTokens(dec *json.Decoder, t reflect.Type, where string, depth int) error {
	if depth > maxJSONDepth {
		return badRequest("request body is nested too deeply")
	}
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch tok {
	case json.Delim('{'):
		var fields map[string]reflect.Type
		if t != nil && t.Kind() == reflect.Struct {
			fields = jsonFields(t)
		}
		seen := map[string]bool{}
		for dec.More() {
			tok, err := dec.Token()
			if err != nil {
				return err
			}
			key, _ := tok.(string)
			if seen[key] {
				return badRequest("key %q given twice in %s", key, bodyPath(where))
			}
			seen[key] = true
			var ft reflect.Type
			if fields != nil {
				var ok bool
				if ft, ok = fields[key]; !ok {
					return badRequest("unknown field %q in %s", key, bodyPath(where))
				}
			}
			if err := walkTokens(dec, ft, where+"."+key, depth+1); err != nil {
				return err
			}
		}
		_, err = dec.Token()
		return err
	case json.Delim('['):
		var et reflect.Type
		if t != nil && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) {
			et = t.Elem()
		}
		for i := 0; dec.More(); i++ {
			if err := walkTokens(dec, et, fmt.Sprintf("%s[%d]", where, i), depth+1); err != nil {
				return err
			}
		}
		_, err = dec.Token()
		return err
	}
	return nil
}

// fuzzConfigVars are the variables FuzzLoadConfig sets, in the order of its arguments.
var fuzzConfigVars = []string{"DATABASE_URL", "LISTEN_ADDR", "ADMIN_TOKEN", "RUN_WORKER_EMBEDDED",
	"RUN_WORKER_POLL_MS", "RUN_WORKER_BATCH_LIMIT", "RUN_WORKER_WORKSPACE_ID", "RUN_WORKER_CONCURRENCY",
	"RUN_WORKER_LEASE_MS", "AGENT_WEBHOOK_ALLOWED_HOSTS", "LOG_LEVEL", "RUN_RETENTION_DAYS", "PUBLIC_URL"}

// FuzzLoadConfig feeds arbitrary values to loadConfig. It must never panic. Accepted, the
// config respects every range of SPEC (and dsnWithDefaults keeps the DSN's meaning);
// refused, every line names a variable and the secrets' lines are the fixed ones that
// never show their value. Values are trimmed, so the checks compare trimmed values.
func FuzzLoadConfig(f *testing.F) {
	f.Add("postgres://u:pw@localhost/db?sslmode=disable", "127.0.0.1:8080", "", "", "", "", "", "", "", "", "", "", "")
	f.Add("host=h password=", ":0", "0123456789abcdef", "true", "10", "1000", "3F1C2A9E-8B7D-4C1E-9A55-0D2F6B8E4C71", "1", "1000", "a.example.com,[::1]:80", "DEBUG", "1", "https://x.example/")
	f.Add("", "localhost", "short", "yes", "9", "0", "nope", "1001", "999", "http://x", "loud", "0", "ftp://x")
	f.Add("host='x", "[::1", "0123456789abcdef\n", " 1", "3600001", " 5 ", "", "-1", "+1000", ",", "warn", "36501", "http://x?y")
	f.Fuzz(func(t *testing.T, dsn, listen, token, embedded, poll, batch, wsID, concurrency, lease, hosts, level, retention, publicURL string) {
		values := []string{dsn, listen, token, embedded, poll, batch, wsID, concurrency, lease, hosts, level, retention, publicURL}
		env := map[string]string{}
		for i, v := range fuzzConfigVars {
			env[v] = values[i]
		}
		c, err := loadConfig(func(k string) string { return env[k] })
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				named := ""
				for _, v := range specVars {
					if strings.HasPrefix(line, v+"=") || strings.HasPrefix(line, v+" ") {
						named = v
					}
				}
				switch {
				case named == "":
					t.Fatalf("error line: got %q (env %q); want it to name a variable", line, env)
				case named == "DATABASE_URL" && !strings.HasPrefix(line, "DATABASE_URL is "),
					named == "ADMIN_TOKEN" && !strings.HasPrefix(line, "ADMIN_TOKEN is invalid (value not shown)"):
					t.Fatalf("error line: got %q; want no secret in it", line)
				case named != "DATABASE_URL" && named != "ADMIN_TOKEN" && !strings.Contains(line, fmt.Sprintf("%q", env[named])):
					t.Fatalf("error line: got %q; want it to show the value %q", line, env[named])
				}
			}
			return
		}
		ms := func(d time.Duration) int64 { return d.Milliseconds() }
		if d := ms(c.PollInterval); d < 10 || d > 3600000 {
			t.Fatalf("poll: got %v (env %q); want it in range", c.PollInterval, env)
		}
		if c.Concurrency < 1 || c.Concurrency > 1000 || c.BatchLimit < 1 || c.BatchLimit > 1000 {
			t.Fatalf("concurrency, batch limit: got %d, %d (env %q); want them in range", c.Concurrency, c.BatchLimit, env)
		}
		if strings.TrimSpace(batch) == "" && c.BatchLimit != c.Concurrency {
			t.Fatalf("batch limit %d unset but not the concurrency %d", c.BatchLimit, c.Concurrency)
		}
		if d := ms(c.Lease); d < 1000 || d > 3600000 {
			t.Fatalf("lease: got %v (env %q); want it in range", c.Lease, env)
		}
		if d := ms(c.ShutdownTimeout); d != 30000 {
			t.Fatalf("shutdown timeout %v; want the default", c.ShutdownTimeout)
		}
		if c.WorkspaceID != "" && (!isUUID(c.WorkspaceID) || c.WorkspaceID != strings.ToLower(c.WorkspaceID)) {
			t.Fatalf("workspace id: got %q; want a lower-case UUID", c.WorkspaceID)
		}
		if _, _, err := net.SplitHostPort(c.ListenAddr); err != nil {
			t.Fatalf("listen address: got %q (%v); want host:port", c.ListenAddr, err)
		}
		if c.AdminToken != strings.TrimSpace(token) || (c.AdminToken != "" && utf8.RuneCountInString(c.AdminToken) < 16) {
			t.Fatalf("admin token of %d bytes accepted from %d", len(c.AdminToken), len(token))
		}
		for _, h := range c.WebhookHosts {
			if h == "" || strings.ContainsAny(h, "/ ,@?#%") || h != strings.ToLower(h) {
				t.Fatalf("webhook host %q accepted from %q", h, hosts)
			}
			if host, port, err := net.SplitHostPort(h); err == nil {
				if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || host == "" || net.JoinHostPort(host, port) != h {
					t.Fatalf("webhook host:port %q accepted from %q", h, hosts)
				}
			} else if strings.ContainsAny(h, "[]") || (strings.Contains(h, ":") && net.ParseIP(h) == nil) {
				t.Fatalf("webhook host %q accepted from %q", h, hosts)
			}
		}
		if (strings.TrimSpace(hosts) == "") != (len(c.WebhookHosts) == 0) {
			t.Fatalf("webhook hosts %q from %q", c.WebhookHosts, hosts)
		}
		if c.LogFormat != "text" || (c.LogLevel != "debug" && c.LogLevel != "info" && c.LogLevel != "warn" && c.LogLevel != "error") {
			t.Fatalf("log format, level: got %q, %q; want known ones", c.LogFormat, c.LogLevel)
		}
		if c.DatabaseURL == "" {
			t.Fatal("DATABASE_URL: got empty and accepted; want it refused")
		}
		if c.Retention < 0 || c.Retention > 36500*24*time.Hour || c.Retention%(24*time.Hour) != 0 {
			t.Fatalf("retention %v from %q", c.Retention, retention)
		}
		if u, err := url.Parse(c.PublicURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
			u.RawQuery != "" || u.Fragment != "" || strings.HasSuffix(c.PublicURL, "/") {
			t.Fatalf("public URL %q from %q, listen %q", c.PublicURL, publicURL, listen)
		}
		// The DSN is normalised once: it keeps its meaning and has a connect timeout.
		checkSameDSN(t, strings.TrimSpace(dsn), c.DatabaseURL)
		if pc, err := pq.NewConfig(c.DatabaseURL); err != nil || pc.ConnectTimeout <= 0 {
			t.Fatalf("DATABASE_URL %q: %v, no connect timeout", c.DatabaseURL, err)
		}
	})
}
