package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
)

// testConfigDSN is a valid DATABASE_URL whose password must never be shown.
const testConfigDSN = "postgres://agent:s3cr3t-pa55word@db.internal:5432/agentapp?sslmode=disable"

// configEnv returns a getenv over DATABASE_URL=testConfigDSN plus vars; a var set to ""
// is unset.
func configEnv(vars map[string]string) func(string) string {
	env := map[string]string{"DATABASE_URL": testConfigDSN}
	for k, v := range vars {
		env[k] = v
	}
	return func(k string) string { return env[k] }
}

// specVars is every variable of SPEC's Configuration table.
var specVars = []string{"DATABASE_URL", "LISTEN_ADDR", "ADMIN_TOKEN", "RUN_WORKER_EMBEDDED",
	"RUN_WORKER_POLL_MS", "RUN_WORKER_BATCH_LIMIT", "RUN_WORKER_WORKSPACE_ID", "RUN_WORKER_CONCURRENCY",
	"RUN_WORKER_LEASE_MS", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS", "AGENT_WEBHOOK_ALLOWED_HOSTS", "LOG_FORMAT", "LOG_LEVEL"}

// TestConfigDefaults: with only DATABASE_URL set, every variable takes SPEC's default;
// the batch limit follows the concurrency unless it is set itself.
func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig(configEnv(nil))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	want := config{
		DatabaseURL:     testConfigDSN,
		ListenAddr:      "127.0.0.1:8080",
		AdminToken:      "",
		WorkerEmbedded:  false,
		PollInterval:    time.Second,
		BatchLimit:      8,
		WorkspaceID:     "",
		Concurrency:     8,
		Lease:           30 * time.Second,
		ShutdownTimeout: 30 * time.Second,
		WebhookHosts:    nil,
		LogFormat:       "text",
		LogLevel:        "info",
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("defaults:\ngot  %+v\nwant %+v", cfg, want)
	}

	for _, c := range []struct {
		name              string
		vars              map[string]string
		batch, concurrent int
	}{
		{"concurrency set", map[string]string{"RUN_WORKER_CONCURRENCY": "3"}, 3, 3},
		{"concurrency 1000", map[string]string{"RUN_WORKER_CONCURRENCY": "1000"}, 1000, 1000},
		{"batch limit set", map[string]string{"RUN_WORKER_BATCH_LIMIT": "5"}, 5, 8},
		{"both set", map[string]string{"RUN_WORKER_CONCURRENCY": "3", "RUN_WORKER_BATCH_LIMIT": "50"}, 50, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := loadConfig(configEnv(c.vars))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.BatchLimit != c.batch || cfg.Concurrency != c.concurrent {
				t.Errorf("got batch limit %d, concurrency %d; want %d, %d", cfg.BatchLimit, cfg.Concurrency, c.batch, c.concurrent)
			}
		})
	}
}

// TestConfigValid: the edge values of every range and each accepted form are taken as
// given.
func TestConfigValid(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		vars  map[string]string
		check func(config) bool
	}{
		{"poll 10", map[string]string{"RUN_WORKER_POLL_MS": "10"}, func(c config) bool { return c.PollInterval == 10*time.Millisecond }},
		{"poll 3600000", map[string]string{"RUN_WORKER_POLL_MS": "3600000"}, func(c config) bool { return c.PollInterval == time.Hour }},
		{"batch 1", map[string]string{"RUN_WORKER_BATCH_LIMIT": "1"}, func(c config) bool { return c.BatchLimit == 1 }},
		{"batch 1000", map[string]string{"RUN_WORKER_BATCH_LIMIT": "1000"}, func(c config) bool { return c.BatchLimit == 1000 }},
		{"concurrency 1", map[string]string{"RUN_WORKER_CONCURRENCY": "1"}, func(c config) bool { return c.Concurrency == 1 && c.BatchLimit == 1 }},
		{"lease 1000", map[string]string{"RUN_WORKER_LEASE_MS": "1000"}, func(c config) bool { return c.Lease == time.Second }},
		{"lease 3600000", map[string]string{"RUN_WORKER_LEASE_MS": "3600000"}, func(c config) bool { return c.Lease == time.Hour }},
		{"shutdown 0", map[string]string{"RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "0"}, func(c config) bool { return c.ShutdownTimeout == 0 }},
		{"shutdown 3600000", map[string]string{"RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "3600000"}, func(c config) bool { return c.ShutdownTimeout == time.Hour }},
		{"embedded true", map[string]string{"RUN_WORKER_EMBEDDED": "true"}, func(c config) bool { return c.WorkerEmbedded }},
		{"embedded 1", map[string]string{"RUN_WORKER_EMBEDDED": "1"}, func(c config) bool { return c.WorkerEmbedded }},
		{"embedded TRUE", map[string]string{"RUN_WORKER_EMBEDDED": "TRUE"}, func(c config) bool { return c.WorkerEmbedded }},
		{"embedded false", map[string]string{"RUN_WORKER_EMBEDDED": "false"}, func(c config) bool { return !c.WorkerEmbedded }},
		{"embedded 0", map[string]string{"RUN_WORKER_EMBEDDED": "0"}, func(c config) bool { return !c.WorkerEmbedded }},
		{"workspace id", map[string]string{"RUN_WORKER_WORKSPACE_ID": "3F1C2A9E-8B7D-4C1E-9A55-0D2F6B8E4C71"},
			func(c config) bool { return c.WorkspaceID == "3f1c2a9e-8b7d-4c1e-9a55-0d2f6b8e4c71" }},
		{"webhook hosts", map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "api.example.com, 127.0.0.1:9000,[::1]:80,::1,Hooks.Example.org"},
			func(c config) bool {
				return reflect.DeepEqual(c.WebhookHosts, []string{"api.example.com", "127.0.0.1:9000", "[::1]:80", "::1", "hooks.example.org"})
			}},
		{"log json", map[string]string{"LOG_FORMAT": "json"}, func(c config) bool { return c.LogFormat == "json" }},
		{"log text", map[string]string{"LOG_FORMAT": "text"}, func(c config) bool { return c.LogFormat == "text" }},
		{"level debug", map[string]string{"LOG_LEVEL": "debug"}, func(c config) bool { return c.LogLevel == "debug" }},
		{"level warn", map[string]string{"LOG_LEVEL": "warn"}, func(c config) bool { return c.LogLevel == "warn" }},
		{"level error", map[string]string{"LOG_LEVEL": "error"}, func(c config) bool { return c.LogLevel == "error" }},
		{"admin token of 16", map[string]string{"ADMIN_TOKEN": "0123456789abcdef"}, func(c config) bool { return c.AdminToken == "0123456789abcdef" }},
		{"listen :0", map[string]string{"LISTEN_ADDR": ":0"}, func(c config) bool { return c.ListenAddr == ":0" }},
		{"listen ipv6", map[string]string{"LISTEN_ADDR": "[::1]:8080"}, func(c config) bool { return c.ListenAddr == "[::1]:8080" }},
		{"listen host name", map[string]string{"LISTEN_ADDR": "localhost:65535"}, func(c config) bool { return c.ListenAddr == "localhost:65535" }},
		{"key=value DSN", map[string]string{"DATABASE_URL": "host=127.0.0.1 port=5432 user=u dbname=d sslmode=disable"},
			func(c config) bool {
				return c.DatabaseURL == "host=127.0.0.1 port=5432 user=u dbname=d sslmode=disable"
			}},
		{"postgresql:// URL", map[string]string{"DATABASE_URL": "postgresql://u@localhost/d"}, func(c config) bool { return c.DatabaseURL == "postgresql://u@localhost/d" }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := loadConfig(configEnv(c.vars))
			if err != nil {
				t.Fatalf("loadConfig(%v): %v", c.vars, err)
			}
			if !c.check(cfg) {
				t.Errorf("loadConfig(%v): got %+v", c.vars, cfg)
			}
		})
	}
}

// TestConfigInvalid: every present but invalid value is an error on one line that names
// the variable, shows the value (never for DATABASE_URL and ADMIN_TOKEN) and says what is
// accepted.
func TestConfigInvalid(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, variable, value string
	}{
		{"poll not an integer", "RUN_WORKER_POLL_MS", "abc"},
		{"poll fractional", "RUN_WORKER_POLL_MS", "1.5"},
		{"poll with unit", "RUN_WORKER_POLL_MS", "1000ms"},
		{"poll below", "RUN_WORKER_POLL_MS", "9"},
		{"poll above", "RUN_WORKER_POLL_MS", "3600001"},
		{"poll blank", "RUN_WORKER_POLL_MS", " "},
		{"poll overflow", "RUN_WORKER_POLL_MS", "99999999999999999999"},
		{"batch not an integer", "RUN_WORKER_BATCH_LIMIT", "many"},
		{"batch below", "RUN_WORKER_BATCH_LIMIT", "0"},
		{"batch above", "RUN_WORKER_BATCH_LIMIT", "1001"},
		{"concurrency not an integer", "RUN_WORKER_CONCURRENCY", "eight"},
		{"concurrency below", "RUN_WORKER_CONCURRENCY", "0"},
		{"concurrency negative", "RUN_WORKER_CONCURRENCY", "-1"},
		{"concurrency above", "RUN_WORKER_CONCURRENCY", "1001"},
		{"lease not an integer", "RUN_WORKER_LEASE_MS", "30s"},
		{"lease below", "RUN_WORKER_LEASE_MS", "999"},
		{"lease above", "RUN_WORKER_LEASE_MS", "3600001"},
		{"shutdown not an integer", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS", "forever"},
		{"shutdown below", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS", "-1"},
		{"shutdown above", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS", "3600001"},
		{"embedded yes", "RUN_WORKER_EMBEDDED", "yes"},
		{"embedded 2", "RUN_WORKER_EMBEDDED", "2"},
		{"embedded padded", "RUN_WORKER_EMBEDDED", " true"},
		{"workspace id not a UUID", "RUN_WORKER_WORKSPACE_ID", "not-a-uuid"},
		{"workspace id short", "RUN_WORKER_WORKSPACE_ID", "3f1c2a9e-8b7d-4c1e-9a55-0d2f6b8e4c7"},
		{"workspace id braced", "RUN_WORKER_WORKSPACE_ID", "{3f1c2a9e-8b7d-4c1e-9a55-0d2f6b8e4c71}"},
		{"workspace id not hex", "RUN_WORKER_WORKSPACE_ID", "3f1c2a9e-8b7d-4c1e-9a55-0d2f6b8e4czz"},
		{"hosts with a scheme", "AGENT_WEBHOOK_ALLOWED_HOSTS", "https://api.example.com"},
		{"hosts with a path", "AGENT_WEBHOOK_ALLOWED_HOSTS", "api.example.com/hook"},
		{"hosts with an empty entry", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a.example.com,,b.example.com"},
		{"hosts trailing comma", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a.example.com,"},
		{"hosts bad port", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a.example.com:99999"},
		{"hosts empty port", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a.example.com:"},
		{"hosts with a space", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a example.com"},
		{"hosts user info", "AGENT_WEBHOOK_ALLOWED_HOSTS", "user@a.example.com"},
		{"log format", "LOG_FORMAT", "xml"},
		{"log level", "LOG_LEVEL", "verbose"},
		{"log level number", "LOG_LEVEL", "0"},
		{"listen port only", "LISTEN_ADDR", "8080"},
		{"listen host only", "LISTEN_ADDR", "localhost"},
		{"listen port too big", "LISTEN_ADDR", "127.0.0.1:99999"},
		{"listen empty port", "LISTEN_ADDR", "127.0.0.1:"},
		{"listen named port", "LISTEN_ADDR", "127.0.0.1:http"},
		{"admin token short", "ADMIN_TOKEN", "short-secret-15"},
		{"admin token one char", "ADMIN_TOKEN", "x"},
		{"admin token with a trailing newline", "ADMIN_TOKEN", "0123456789abcdef-secret\n"},
		{"admin token with a leading space", "ADMIN_TOKEN", " 0123456789abcdef-secret"},
		{"database url missing", "DATABASE_URL", ""},
		{"database url not a DSN", "DATABASE_URL", "s3cr3t-pa55word is not a dsn"},
		{"database url bad port", "DATABASE_URL", "postgres://agent:s3cr3t-pa55word@db:notaport/agentapp"},
		{"database url bad escape", "DATABASE_URL", "postgres://agent:s3cr3t-pa55word%zz@db/agentapp"},
		{"database url unterminated quote", "DATABASE_URL", "host=db password='s3cr3t-pa55word"},
		{"database url bad DSN port", "DATABASE_URL", "host=db port=abc password=s3cr3t-pa55word"},
		{"database url other scheme", "DATABASE_URL", "mysql://agent:s3cr3t-pa55word@db/agentapp"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, err := loadConfig(configEnv(map[string]string{c.variable: c.value}))
			if err == nil {
				t.Fatalf("%s=%q: got no error; want one naming %s", c.variable, c.value, c.variable)
			}
			var ce configError
			if !errors.As(err, &ce) {
				t.Errorf("got error type %T; want configError (main exits 2 for it)", err)
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("one problem: got several lines:\n%s", msg)
			}
			if !strings.HasPrefix(msg, c.variable) {
				t.Errorf("got %q; want it to start with %s", msg, c.variable)
			}
			if !strings.Contains(msg, "want") {
				t.Errorf("got %q; want it to say what is accepted", msg)
			}
			secret := c.variable == "DATABASE_URL" || c.variable == "ADMIN_TOKEN"
			switch {
			case secret && c.value != "" && strings.Contains(msg, strings.TrimSpace(c.value)):
				t.Errorf("got %q: the secret value is echoed", msg)
			case secret && strings.Contains(msg, "s3cr3t"):
				t.Errorf("got %q: the password is echoed", msg)
			case !secret && !strings.Contains(msg, fmt.Sprintf("%q", c.value)):
				t.Errorf("got %q; want it to show the value %q", msg, c.value)
			}
		})
	}
}

// TestConfigManyProblems: every problem is reported, one line each, not just the first.
func TestConfigManyProblems(t *testing.T) {
	t.Parallel()
	bad := map[string]string{
		"DATABASE_URL":                   "",
		"LISTEN_ADDR":                    "nowhere",
		"ADMIN_TOKEN":                    "tiny-secret",
		"RUN_WORKER_EMBEDDED":            "maybe",
		"RUN_WORKER_POLL_MS":             "1",
		"RUN_WORKER_BATCH_LIMIT":         "0",
		"RUN_WORKER_WORKSPACE_ID":        "ws-1",
		"RUN_WORKER_CONCURRENCY":         "lots",
		"RUN_WORKER_LEASE_MS":            "10",
		"RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "-5",
		"AGENT_WEBHOOK_ALLOWED_HOSTS":    "http://x",
		"LOG_FORMAT":                     "yaml",
		"LOG_LEVEL":                      "trace",
	}
	_, err := loadConfig(func(k string) string { return bad[k] })
	if err == nil {
		t.Fatal("got no error")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != len(bad) {
		t.Errorf("got %d lines; want %d, one per variable:\n%s", len(lines), len(bad), err)
	}
	for _, v := range specVars {
		n := 0
		for _, l := range lines {
			if strings.HasPrefix(l, v+"=") || strings.HasPrefix(l, v+" ") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: named by %d lines; want 1:\n%s", v, n, err)
		}
	}
	if strings.Contains(err.Error(), "tiny-secret") {
		t.Errorf("ADMIN_TOKEN's value is echoed:\n%s", err)
	}
}

// TestConfigBinary: through the real binary, invalid variables stop it before it does
// anything (exit 2, every offender named on stderr, no listening, no schema), -h lists
// every variable, and an unknown command is exit 2.
func TestConfigBinary(t *testing.T) {
	t.Parallel()
	bin := agentappBinary(t, true)
	exec1 := func(t *testing.T, env map[string]string, args ...string) (code int, stdout, stderr string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = []string{}
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		var exitErr *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &exitErr):
			code = exitErr.ExitCode()
		default:
			t.Fatalf("run %v: %v", args, err)
		}
		return code, out.String(), errOut.String()
	}

	t.Run("bad variables", func(t *testing.T) {
		t.Parallel()
		dsn := testDB(t)
		db := openTestDB(t, dsn)
		// A fresh schema-less database: the binary must not touch it.
		if _, err := db.Exec(`DROP TABLE runs, agents, workspaces`); err != nil {
			t.Fatal(err)
		}
		addr := freeAddr(t)
		for _, cmd := range [][]string{nil, {"serve"}, {"worker"}, {"worker", "-once"}, {"migrate"}, {"workspace", "create", "x"}} {
			env := map[string]string{
				"DATABASE_URL":           dsn,
				"LISTEN_ADDR":            addr,
				"ADMIN_TOKEN":            "short-s3cr3t",
				"RUN_WORKER_EMBEDDED":    "true",
				"RUN_WORKER_POLL_MS":     "5",
				"RUN_WORKER_CONCURRENCY": "0",
				"LOG_LEVEL":              "loud",
			}
			code, stdout, stderr := exec1(t, env, cmd...)
			if code != 2 {
				t.Errorf("%v: got exit status %d; want 2; stderr %s", cmd, code, stderr)
			}
			for _, v := range []string{"ADMIN_TOKEN", "RUN_WORKER_POLL_MS", "RUN_WORKER_CONCURRENCY", "LOG_LEVEL"} {
				if !strings.Contains(stderr, v) {
					t.Errorf("%v: stderr does not name %s:\n%s", cmd, v, stderr)
				}
			}
			if lines := strings.Split(strings.TrimSpace(stderr), "\n"); len(lines) != 4 {
				t.Errorf("%v: got %d lines on stderr; want 4, one per problem:\n%s", cmd, len(lines), stderr)
			}
			if strings.Contains(stderr, "s3cr3t") || strings.Contains(stderr, dsn) {
				t.Errorf("%v: stderr shows a secret:\n%s", cmd, stderr)
			}
			if strings.Contains(stderr, "listening") || stdout != "" {
				t.Errorf("%v: it did something: stdout %q, stderr %q", cmd, stdout, stderr)
			}
			if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				c.Close()
				t.Errorf("%v: something listens on LISTEN_ADDR %s", cmd, addr)
			}
		}
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM pg_tables WHERE tablename IN ('workspaces', 'agents', 'runs')`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Errorf("after refusing to start: %d of agentapp's tables exist; want none (the schema must not be applied)", n)
		}
	})

	t.Run("DATABASE_URL missing or malformed", func(t *testing.T) {
		t.Parallel()
		for _, dsn := range []string{"", "postgres://agent:s3cr3t@db:port/x"} {
			code, _, stderr := exec1(t, map[string]string{"DATABASE_URL": dsn, "LISTEN_ADDR": freeAddr(t)})
			if code != 2 || !strings.Contains(stderr, "DATABASE_URL") || strings.Contains(stderr, "s3cr3t") {
				t.Errorf("DATABASE_URL=%q: got exit %d, stderr %q; want 2 naming DATABASE_URL without its value", dsn, code, stderr)
			}
		}
	})

	t.Run("-h", func(t *testing.T) {
		t.Parallel()
		for _, arg := range []string{"-h", "--help", "help"} {
			code, stdout, stderr := exec1(t, nil, arg)
			if code != 0 {
				t.Errorf("agentapp %s: got exit %d; want 0; stderr %s", arg, code, stderr)
			}
			for _, v := range specVars {
				if !strings.Contains(stdout, v) {
					t.Errorf("agentapp %s: usage does not list %s", arg, v)
				}
			}
			for _, cmd := range []string{"serve", "worker", "-once", "migrate", "workspace create"} {
				if !strings.Contains(stdout, cmd) {
					t.Errorf("agentapp %s: usage does not mention %q", arg, cmd)
				}
			}
		}
	})

	t.Run("unknown command", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{{"frobnicate"}, {"serve", "extra"}, {"workspace", "delete", "x"}, {"worker", "-bogus"}} {
			code, _, stderr := exec1(t, map[string]string{"DATABASE_URL": testConfigDSN}, args...)
			if code != 2 || stderr == "" {
				t.Errorf("agentapp %v: got exit %d, stderr %q; want 2 with a usage message", args, code, stderr)
			}
		}
	})
}

// TestConfigDSNDefaults: dsnWithDefaults adds a connect timeout when none is given and
// changes nothing else the DSN says, whatever its form.
func TestConfigDSNDefaults(t *testing.T) {
	t.Parallel()
	cases := []struct {
		dsn     string
		timeout time.Duration
	}{
		{"postgres://u:pw@h:5433/d?sslmode=disable", 5 * time.Second},
		{"postgresql://u@h/d", 5 * time.Second},
		{"postgres://u@h/d?connect_timeout=9", 9 * time.Second},
		{"host=h port=5433 user=u dbname=d", 5 * time.Second},
		{"host=h connect_timeout=7", 7 * time.Second},
		{"host=h password=", 5 * time.Second},
		{"host=h dbname= ", 5 * time.Second},
		{"host=h password=''", 5 * time.Second},
		{"host=h password='a b\\' c'", 5 * time.Second},
		{"", 5 * time.Second},
	}
	for _, c := range cases {
		t.Run(c.dsn, func(t *testing.T) {
			t.Parallel()
			got, err := dsnWithDefaults(c.dsn)
			if err != nil {
				t.Fatalf("dsnWithDefaults(%q): %v", c.dsn, err)
			}
			checkSameDSN(t, c.dsn, got)
			after, _ := pq.NewConfig(got)
			if after.ConnectTimeout != c.timeout {
				t.Errorf("dsnWithDefaults(%q) = %q: connect timeout %v; want %v", c.dsn, got, after.ConnectTimeout, c.timeout)
			}
		})
	}
}

// checkSameDSN fails the test unless DSNs before and after name the same connection:
// only the connect timeout may differ.
func checkSameDSN(t testing.TB, before, after string) {
	t.Helper()
	b, err := pq.NewConfig(before)
	if err != nil {
		t.Fatalf("pq.NewConfig(%q): %v", before, err)
	}
	a, err := pq.NewConfig(after)
	if err != nil {
		t.Fatalf("pq.NewConfig(%q) (from %q): %v", after, before, err)
	}
	type conn struct {
		Host, User, Password, Database string
		Port                           uint16
		SSLMode                        pq.SSLMode
		Runtime                        map[string]string
	}
	cb := conn{b.Host, b.User, b.Password, b.Database, b.Port, b.SSLMode, b.Runtime}
	ca := conn{a.Host, a.User, a.Password, a.Database, a.Port, a.SSLMode, a.Runtime}
	if len(cb.Runtime) == 0 {
		cb.Runtime = nil
	}
	if len(ca.Runtime) == 0 {
		ca.Runtime = nil
	}
	if !reflect.DeepEqual(cb, ca) {
		t.Errorf("dsnWithDefaults(%q) = %q changes the connection:\nbefore %+v\nafter  %+v", before, after, cb, ca)
	}
}
