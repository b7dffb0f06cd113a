package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/lib/pq"
)

// config is everything agentapp reads from its environment.
type config struct {
	DatabaseURL     string
	ListenAddr      string
	AdminToken      string
	WorkerEmbedded  bool
	PollInterval    time.Duration
	BatchLimit      int
	WorkspaceID     string // empty: every workspace
	Concurrency     int
	Lease           time.Duration
	ShutdownTimeout time.Duration
	WebhookHosts    []string // empty: any host
	LogFormat       string
	LogLevel        string
}

// configVars lists every variable agentapp reads, with its default and what it accepts;
// the usage text is built from it.
var configVars = []struct{ name, def, accepted string }{
	{"DATABASE_URL", "(required)", "a lib/pq URL or key=value DSN"},
	{"LISTEN_ADDR", "127.0.0.1:8080", "host:port"},
	{"ADMIN_TOKEN", "(unset: admin API disabled)", "at least 16 characters"},
	{"RUN_WORKER_EMBEDDED", "false", "true/false/1/0: run the worker inside the API server"},
	{"RUN_WORKER_POLL_MS", "1000", "integer 10 … 3600000"},
	{"RUN_WORKER_BATCH_LIMIT", "the concurrency", "integer 1 … 1000: most runs claimed in one cycle"},
	{"RUN_WORKER_WORKSPACE_ID", "(unset: all)", "a UUID: only that workspace's runs are processed"},
	{"RUN_WORKER_CONCURRENCY", "8", "integer 1 … 1000: most runs executing at once in one process"},
	{"RUN_WORKER_LEASE_MS", "30000", "integer 1000 … 3600000"},
	{"RUN_WORKER_SHUTDOWN_TIMEOUT_MS", "30000", "integer 0 … 3600000"},
	{"AGENT_WEBHOOK_ALLOWED_HOSTS", "(unset: any)", "comma-separated host or host:port list"},
	{"LOG_FORMAT", "text", "text, json"},
	{"LOG_LEVEL", "info", "debug, info, warn, error"},
}

// configError lists every problem found in the environment, one per line.
type configError []string

func (e configError) Error() string { return strings.Join(e, "\n") }

// loadConfig parses the environment strictly: a present but invalid value is an error,
// never silently replaced by a default, and every problem is reported at once.
func loadConfig(getenv func(string) string) (config, error) {
	var problems configError
	bad := func(name, value, accepted string) {
		problems = append(problems, fmt.Sprintf("%s=%q is invalid: want %s", name, value, accepted))
	}
	intVar := func(name string, def, lo, hi int) int {
		v := getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < lo || n > hi {
			bad(name, v, fmt.Sprintf("an integer from %d to %d", lo, hi))
			return def
		}
		return n
	}
	oneOf := func(name, def string, allowed ...string) string {
		v := getenv(name)
		if v == "" {
			return def
		}
		for _, a := range allowed {
			if strings.EqualFold(v, a) {
				return a
			}
		}
		bad(name, v, "one of "+strings.Join(allowed, ", "))
		return def
	}

	c := config{
		DatabaseURL: getenv("DATABASE_URL"),
		ListenAddr:  getenv("LISTEN_ADDR"),
		AdminToken:  getenv("ADMIN_TOKEN"),
		WorkspaceID: strings.ToLower(strings.TrimSpace(getenv("RUN_WORKER_WORKSPACE_ID"))),
	}
	if c.DatabaseURL == "" {
		problems = append(problems, "DATABASE_URL is required: want a lib/pq URL (postgres://user@host:port/db?sslmode=disable) or key=value DSN")
	} else if _, err := dsnWithDefaults(c.DatabaseURL); err != nil {
		// The value is a secret: say what is wrong, never echo it.
		problems = append(problems, "DATABASE_URL is invalid (value not shown): want a lib/pq URL or key=value DSN")
	}
	if c.ListenAddr == "" {
		c.ListenAddr = "127.0.0.1:8080"
	} else if _, port, err := net.SplitHostPort(c.ListenAddr); err != nil || !validPort(port) {
		bad("LISTEN_ADDR", c.ListenAddr, "host:port, e.g. 127.0.0.1:8080 or :8080")
	}
	// A bearer token arrives trimmed, so one with surrounding space (a secret file's
	// trailing newline) could never match: refuse it rather than lock the admin out.
	if c.AdminToken != "" && (len(c.AdminToken) < 16 || strings.TrimSpace(c.AdminToken) != c.AdminToken) {
		problems = append(problems, "ADMIN_TOKEN is invalid (value not shown): want at least 16 characters without leading or trailing space, or unset to disable the admin API")
	}
	switch v := getenv("RUN_WORKER_EMBEDDED"); strings.ToLower(v) {
	case "", "false", "0":
	case "true", "1":
		c.WorkerEmbedded = true
	default:
		bad("RUN_WORKER_EMBEDDED", v, "true, false, 1 or 0")
	}
	c.PollInterval = time.Duration(intVar("RUN_WORKER_POLL_MS", 1000, 10, 3600000)) * time.Millisecond
	c.Concurrency = intVar("RUN_WORKER_CONCURRENCY", 8, 1, 1000)
	c.BatchLimit = intVar("RUN_WORKER_BATCH_LIMIT", c.Concurrency, 1, 1000)
	c.Lease = time.Duration(intVar("RUN_WORKER_LEASE_MS", 30000, 1000, 3600000)) * time.Millisecond
	c.ShutdownTimeout = time.Duration(intVar("RUN_WORKER_SHUTDOWN_TIMEOUT_MS", 30000, 0, 3600000)) * time.Millisecond
	if c.WorkspaceID != "" && !isUUID(c.WorkspaceID) {
		bad("RUN_WORKER_WORKSPACE_ID", getenv("RUN_WORKER_WORKSPACE_ID"), "a UUID such as 3f1c2a9e-8b7d-4c1e-9a55-0d2f6b8e4c71")
	}
	if v := getenv("AGENT_WEBHOOK_ALLOWED_HOSTS"); v != "" {
		for _, h := range strings.Split(v, ",") {
			h = strings.ToLower(strings.TrimSpace(h))
			if !validHostEntry(h) {
				bad("AGENT_WEBHOOK_ALLOWED_HOSTS", v, "a comma-separated list of host or host:port, e.g. api.example.com,127.0.0.1:9000")
				break
			}
			c.WebhookHosts = append(c.WebhookHosts, h)
		}
	}
	c.LogFormat = oneOf("LOG_FORMAT", "text", "text", "json")
	c.LogLevel = oneOf("LOG_LEVEL", "info", "debug", "info", "warn", "error")

	if len(problems) > 0 {
		return config{}, problems
	}
	return c, nil
}

// validHostEntry reports whether h is a host or host:port without scheme or path.
func validHostEntry(h string) bool {
	if h == "" || strings.ContainsAny(h, "/ @?#") {
		return false
	}
	if host, port, err := net.SplitHostPort(h); err == nil {
		return host != "" && validPort(port)
	}
	return !strings.Contains(h, ":") || net.ParseIP(h) != nil
}

func validPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n >= 0 && n <= 65535
}

// dsnWithDefaults checks a lib/pq URL or key=value DSN and adds a connect timeout when
// none is given, so an unreachable database fails requests fast instead of hanging them.
func dsnWithDefaults(dsn string) (string, error) {
	cfg, err := pq.NewConfig(dsn)
	if err != nil {
		return "", err
	}
	if cfg.ConnectTimeout > 0 {
		return dsn, nil
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", err
		}
		q := u.Query()
		q.Set("connect_timeout", "5")
		u.RawQuery = q.Encode()
		return u.String(), nil
	}
	// In front: appended after a trailing empty value ("password=") it would become that value.
	return "connect_timeout=5 " + dsn, nil
}

// isUUID reports whether s is a UUID in its canonical textual form.
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, r := range s {
		switch i {
		case 8, 13, 18, 23:
			if r != '-' {
				return false
			}
		default:
			if !strings.ContainsRune("0123456789abcdefABCDEF", r) {
				return false
			}
		}
	}
	return true
}

// errUsage is returned for a bad command line; main exits 2 for it as for bad config.
var errUsage = errors.New("usage")
