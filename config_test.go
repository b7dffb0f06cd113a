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

// testConfigDSN is a valid DATABASE_URL whose password must never be shown;
// testConfigDSNNormal is what loadConfig makes of it.
const (
	testConfigDSN       = "postgres://agent:s3cr3t-pa55word@db.internal:5432/agentapp?sslmode=disable"
	testConfigDSNNormal = "postgres://agent:s3cr3t-pa55word@db.internal:5432/agentapp?connect_timeout=5&sslmode=disable"
)

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
	"RUN_WORKER_LEASE_MS", "RUN_WORKER_SHUTDOWN_TIMEOUT_MS", "AGENT_WEBHOOK_ALLOWED_HOSTS", "RUN_RETENTION_DAYS",
	"PUBLIC_URL", "LOG_FORMAT", "LOG_LEVEL"}

// TestConfigDefaults: with only DATABASE_URL set, every variable takes SPEC's default;
// the batch limit follows the concurrency unless it is set itself.
func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig(configEnv(nil))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	want := config{
		DatabaseURL:     testConfigDSNNormal,
		ListenAddr:      "127.0.0.1:8080",
		AdminToken:      "",
		WorkerEmbedded:  false,
		PollInterval:    time.Second,
		BatchLimit:      100,
		WorkspaceID:     "",
		Concurrency:     100,
		Lease:           30 * time.Second,
		ShutdownTimeout: 30 * time.Second,
		WebhookHosts:    nil,
		Retention:       0,
		PublicURL:       "http://127.0.0.1:8080",
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
		{"batch limit set", map[string]string{"RUN_WORKER_BATCH_LIMIT": "5"}, 5, 100},
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

	t.Run("public URL follows LISTEN_ADDR", func(t *testing.T) {
		cfg, err := loadConfig(configEnv(map[string]string{"LISTEN_ADDR": "[::1]:9090"}))
		if err != nil {
			t.Fatal(err)
		}
		if cfg.PublicURL != "http://[::1]:9090" {
			t.Errorf("got PUBLIC_URL %q; want %q", cfg.PublicURL, "http://[::1]:9090")
		}
	})
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
				return c.DatabaseURL == "connect_timeout=5 host=127.0.0.1 port=5432 user=u dbname=d sslmode=disable"
			}},
		{"postgresql:// URL", map[string]string{"DATABASE_URL": "postgresql://u@localhost/d"},
			func(c config) bool { return c.DatabaseURL == "postgresql://u@localhost/d?connect_timeout=5" }},
		{"DSN with a timeout", map[string]string{"DATABASE_URL": "postgres://u@h/d?connect_timeout=9"},
			func(c config) bool { return c.DatabaseURL == "postgres://u@h/d?connect_timeout=9" }},
		{"retention 1", map[string]string{"RUN_RETENTION_DAYS": "1"}, func(c config) bool { return c.Retention == 24*time.Hour }},
		{"retention 36500", map[string]string{"RUN_RETENTION_DAYS": "36500"}, func(c config) bool { return c.Retention == 36500*24*time.Hour }},
		{"public URL https with a path", map[string]string{"PUBLIC_URL": "https://agents.example.com/app/"},
			func(c config) bool { return c.PublicURL == "https://agents.example.com/app" }},
		{"public URL with a port", map[string]string{"PUBLIC_URL": "http://10.0.0.5:8080"}, func(c config) bool { return c.PublicURL == "http://10.0.0.5:8080" }},
		{"public URL root slash", map[string]string{"PUBLIC_URL": "http://x.example/"}, func(c config) bool { return c.PublicURL == "http://x.example" }},
		{"public URL IPv6", map[string]string{"PUBLIC_URL": "http://[::1]:8080"}, func(c config) bool { return c.PublicURL == "http://[::1]:8080" }},
		{"public URL ignores LISTEN_ADDR", map[string]string{"PUBLIC_URL": "https://a.example", "LISTEN_ADDR": ":9000"},
			func(c config) bool { return c.PublicURL == "https://a.example" && c.ListenAddr == ":9000" }},
		{"hosts bracketed bare IPv6", map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "[::1]"}, func(c config) bool { return reflect.DeepEqual(c.WebhookHosts, []string{"::1"}) }},
		{"hosts IPv6 lowercased", map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "[FE80::1]:443,FD00::AB"},
			func(c config) bool { return reflect.DeepEqual(c.WebhookHosts, []string{"[fe80::1]:443", "fd00::ab"}) }},
		{"hosts ports at the edges", map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "a.example:1,b.example:65535"},
			func(c config) bool {
				return reflect.DeepEqual(c.WebhookHosts, []string{"a.example:1", "b.example:65535"})
			}},
		{"hosts single labels and service names", map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "localhost,my_service:8080,x1"},
			func(c config) bool {
				return reflect.DeepEqual(c.WebhookHosts, []string{"localhost", "my_service:8080", "x1"})
			}},
		{"hosts IPv4-mapped IPv6", map[string]string{"AGENT_WEBHOOK_ALLOWED_HOSTS": "::ffff:10.0.0.1"},
			func(c config) bool { return reflect.DeepEqual(c.WebhookHosts, []string{"::ffff:10.0.0.1"}) }},
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
		{"hosts two ports", "AGENT_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1:19001:19002"},
		{"hosts http scheme", "AGENT_WEBHOOK_ALLOWED_HOSTS", "http://x"},
		{"hosts a b", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a b"},
		{"hosts port only", "AGENT_WEBHOOK_ALLOWED_HOSTS", ":80"},
		{"hosts host colon", "AGENT_WEBHOOK_ALLOWED_HOSTS", "host:"},
		{"hosts port 0", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a.example:0"},
		{"hosts signed port", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a.example:+80"},
		{"hosts bracketed IPv4", "AGENT_WEBHOOK_ALLOWED_HOSTS", "[127.0.0.1]:80"},
		{"hosts IPv6 port without brackets", "AGENT_WEBHOOK_ALLOWED_HOSTS", "::1:80:x"},
		{"hosts unclosed bracket", "AGENT_WEBHOOK_ALLOWED_HOSTS", "[::1"},
		{"hosts short IPv4 spelling", "AGENT_WEBHOOK_ALLOWED_HOSTS", "127.1"},
		{"hosts hex IPv4 spelling", "AGENT_WEBHOOK_ALLOWED_HOSTS", "0x7f000001"},
		{"hosts empty label", "AGENT_WEBHOOK_ALLOWED_HOSTS", "a..example"},
		{"hosts leading hyphen", "AGENT_WEBHOOK_ALLOWED_HOSTS", "-a.example"},
		{"hosts IPv6 zone", "AGENT_WEBHOOK_ALLOWED_HOSTS", "fe80::1%eth0"},
		{"hosts non-ASCII", "AGENT_WEBHOOK_ALLOWED_HOSTS", "bücher.example"},
		{"retention 0", "RUN_RETENTION_DAYS", "0"},
		{"retention above", "RUN_RETENTION_DAYS", "36501"},
		{"retention with unit", "RUN_RETENTION_DAYS", "30d"},
		{"retention negative", "RUN_RETENTION_DAYS", "-1"},
		{"public URL no scheme", "PUBLIC_URL", "agents.example.com"},
		{"public URL relative", "PUBLIC_URL", "/app"},
		{"public URL ftp", "PUBLIC_URL", "ftp://agents.example.com"},
		{"public URL no host", "PUBLIC_URL", "http://"},
		{"public URL port only", "PUBLIC_URL", "http://:8080"},
		{"public URL query", "PUBLIC_URL", "https://a.example/?x=1"},
		{"public URL empty query", "PUBLIC_URL", "https://a.example/?"},
		{"public URL fragment", "PUBLIC_URL", "https://a.example/#top"},
		{"public URL port 0", "PUBLIC_URL", "http://a.example:0"},
		{"public URL port too big", "PUBLIC_URL", "http://a.example:65536"},
		{"public URL empty port", "PUBLIC_URL", "http://a.example:"},
		{"public URL opaque", "PUBLIC_URL", "http:a.example"},
		{"public URL bad escape", "PUBLIC_URL", "http://a.example/%zz"},
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
		{"admin token short once trimmed", "ADMIN_TOKEN", "  short-secret-15  \n"},
		{"admin token 15 characters of 30 bytes", "ADMIN_TOKEN", "ééééééééééééééé"},
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
		"RUN_RETENTION_DAYS":             "forever",
		"PUBLIC_URL":                     "ftp://x",
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

// TestConfigUsage: the table has exactly SPEC's variables, and the usage text lists each
// with its default, what it accepts, every subcommand and the whitespace rule.
func TestConfigUsage(t *testing.T) {
	t.Parallel()
	var names []string
	for _, v := range configVars {
		names = append(names, v.name)
	}
	if !reflect.DeepEqual(names, specVars) {
		t.Errorf("got variables %q; want SPEC's %q", names, specVars)
	}
	u := usage()
	for name, want := range map[string]string{
		"DATABASE_URL":                "(required)",
		"RUN_WORKER_CONCURRENCY":      "default 100\n",
		"RUN_WORKER_BATCH_LIMIT":      "default the concurrency\n",
		"AGENT_WEBHOOK_ALLOWED_HOSTS": "default (unset: public addresses only)\n",
		"RUN_RETENTION_DAYS":          "integer 1 … 36500",
		"PUBLIC_URL":                  "default http:// + LISTEN_ADDR\n",
		"LOG_LEVEL":                   "debug, info, warn, error",
	} {
		i := strings.Index(u, "\n  "+name+"\n")
		if i < 0 {
			t.Errorf("usage does not list %s:\n%s", name, u)
			continue
		}
		// The entry runs to the next line that starts a variable (two spaces, a capital).
		entry := u[i+len(name)+4:]
		for j := 1; j < len(entry)-3; j++ {
			if entry[j-1] == '\n' && entry[j:j+2] == "  " && entry[j+2] >= 'A' && entry[j+2] <= 'Z' {
				entry = entry[:j]
				break
			}
		}
		if !strings.Contains(entry, want) {
			t.Errorf("usage entry of %s: got %q; want it to contain %q", name, entry, want)
		}
	}
	for _, want := range []string{"agentapp [serve]", "agentapp worker [-once]", "agentapp migrate", "agentapp workspace create NAME",
		"surrounding whitespace is trimmed from every value; a blank value counts as unset"} {
		if !strings.Contains(u, want) {
			t.Errorf("usage does not contain %q", want)
		}
	}
}

// TestConfigWhitespace: every variable reads " value\n" as "value" and a blank value as
// unset.
func TestConfigWhitespace(t *testing.T) {
	t.Parallel()
	valid := map[string]string{
		"DATABASE_URL":                   "host=db user=u",
		"LISTEN_ADDR":                    ":9000",
		"ADMIN_TOKEN":                    "0123456789abcdef-secret",
		"RUN_WORKER_EMBEDDED":            "true",
		"RUN_WORKER_POLL_MS":             "50",
		"RUN_WORKER_BATCH_LIMIT":         "7",
		"RUN_WORKER_WORKSPACE_ID":        "3f1c2a9e-8b7d-4c1e-9a55-0d2f6b8e4c71",
		"RUN_WORKER_CONCURRENCY":         "9",
		"RUN_WORKER_LEASE_MS":            "5000",
		"RUN_WORKER_SHUTDOWN_TIMEOUT_MS": "0",
		"AGENT_WEBHOOK_ALLOWED_HOSTS":    "a.example , b.example:81",
		"RUN_RETENTION_DAYS":             "30",
		"PUBLIC_URL":                     "https://a.example",
		"LOG_FORMAT":                     "json",
		"LOG_LEVEL":                      "debug",
	}
	if len(valid) != len(specVars) {
		t.Fatalf("got %d variables here; want all %d", len(valid), len(specVars))
	}
	unset, err := loadConfig(configEnv(nil))
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range valid {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			plain, err := loadConfig(configEnv(map[string]string{name: v}))
			if err != nil {
				t.Fatalf("%s=%q: %v", name, v, err)
			}
			padded, err := loadConfig(configEnv(map[string]string{name: " \t" + v + "\r\n"}))
			if err != nil {
				t.Fatalf("%s padded: got %v; want it read as %q", name, err, v)
			}
			if !reflect.DeepEqual(padded, plain) {
				t.Errorf("%s padded:\ngot  %+v\nwant %+v", name, padded, plain)
			}
			if reflect.DeepEqual(plain, unset) {
				t.Errorf("%s=%q: got the defaults; want a different config (pick another value)", name, v)
			}
			blank, err := loadConfig(configEnv(map[string]string{name: " \t\n"}))
			if name == "DATABASE_URL" {
				if err == nil || !strings.HasPrefix(err.Error(), "DATABASE_URL is required") {
					t.Errorf("DATABASE_URL blank: got %v; want it required", err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(blank, unset) {
				t.Errorf("%s blank: got %+v, %v; want the defaults %+v", name, blank, err, unset)
			}
		})
	}
}

// TestRunCommandLine: the command line is checked before the environment, which is not
// even read for -h or a mistake: -h of every subcommand prints its usage on stdout and
// succeeds, a mistake is errUsage with the usage on stderr.
func TestRunCommandLine(t *testing.T) {
	t.Parallel()
	cases := map[string]struct {
		args []string
		help string // for -h, what stdout must contain; "" for a mistake
	}{
		"-h":                        {[]string{"-h"}, "RUN_RETENTION_DAYS"},
		"--help":                    {[]string{"--help"}, "agentapp workspace create NAME"},
		"help":                      {[]string{"help"}, "agentapp worker [-once]"},
		"serve -h":                  {[]string{"serve", "-h"}, "agentapp [serve]"},
		"serve --help":              {[]string{"serve", "--help"}, "agentapp [serve]"},
		"worker -h":                 {[]string{"worker", "-h"}, "agentapp worker [-once]"},
		"worker -once -help":        {[]string{"worker", "-once", "-help"}, "agentapp worker [-once]"},
		"migrate -h":                {[]string{"migrate", "-h"}, "agentapp migrate"},
		"workspace -h":              {[]string{"workspace", "-h"}, "agentapp workspace create NAME"},
		"workspace create -h":       {[]string{"workspace", "create", "-h"}, "agentapp workspace create NAME"},
		"workspace create --help":   {[]string{"workspace", "create", "--help"}, "agentapp workspace create NAME"},
		"unknown command":           {args: []string{"frobnicate"}},
		"unknown flag":              {args: []string{"-v"}},
		"serve extra":               {args: []string{"serve", "extra"}},
		"serve flag":                {args: []string{"serve", "-once"}},
		"worker extra":              {args: []string{"worker", "-once", "now"}},
		"worker bad flag":           {args: []string{"worker", "-bogus"}},
		"worker bad bool":           {args: []string{"worker", "-once=maybe"}},
		"migrate extra":             {args: []string{"migrate", "now"}},
		"workspace alone":           {args: []string{"workspace"}},
		"workspace delete":          {args: []string{"workspace", "delete", "x"}},
		"workspace create no name":  {args: []string{"workspace", "create"}},
		"workspace create two":      {args: []string{"workspace", "create", "a", "b"}},
		"workspace create blank":    {args: []string{"workspace", "create", "  "}},
		"workspace create too long": {args: []string{"workspace", "create", strings.Repeat("n", 201)}},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			read := ""
			getenv := func(k string) string {
				read = k
				return "bad" // every variable invalid: had it been read, run would say so
			}
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), c.args, getenv, &stdout, &stderr)
			if read != "" {
				t.Errorf("got %s read from the environment; want the command line checked first", read)
			}
			if c.help != "" {
				if err != nil || stderr.Len() > 0 || !strings.Contains(stdout.String(), c.help) {
					t.Errorf("got %v, stderr %q, stdout %q; want nil and usage with %q on stdout", err, stderr.String(), stdout.String(), c.help)
				}
				return
			}
			if !errors.Is(err, errUsage) || stdout.Len() > 0 || !strings.Contains(strings.ToLower(stderr.String()), "usage") {
				t.Errorf("got %v, stdout %q, stderr %q; want errUsage and a usage message on stderr", err, stdout.String(), stderr.String())
			}
		})
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
		if _, err := db.Exec(`DROP TABLE sessions, run_events, cluster_secrets, workers, runs, agents, workspaces CASCADE`); err != nil {
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
		// A subcommand's -h succeeds even with a bad environment, which it does not read.
		for _, args := range [][]string{{"serve", "-h"}, {"worker", "-h"}, {"migrate", "-h"}, {"workspace", "create", "-h"}} {
			code, stdout, stderr := exec1(t, map[string]string{"RUN_WORKER_POLL_MS": "x"}, args...)
			if code != 0 || stderr != "" || !strings.HasPrefix(stdout, "Usage:") || !strings.Contains(stdout, args[0]) {
				t.Errorf("agentapp %v: got exit %d, stdout %q, stderr %q; want 0 and its usage on stdout", args, code, stdout, stderr)
			}
		}
	})

	t.Run("unknown command", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{{"frobnicate"}, {"serve", "extra"}, {"workspace", "delete", "x"}, {"worker", "-bogus"}} {
			// The environment is bad too: the command line is reported, not the variables.
			code, _, stderr := exec1(t, map[string]string{"DATABASE_URL": testConfigDSN, "RUN_WORKER_POLL_MS": "x"}, args...)
			if code != 2 || !strings.Contains(strings.ToLower(stderr), "usage") || strings.Contains(stderr, "RUN_WORKER_POLL_MS=") {
				t.Errorf("agentapp %v: got exit %d, stderr %q; want 2 with a usage message and no word on the variables", args, code, stderr)
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
