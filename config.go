package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/lib/pq"
)

// config is everything agentapp reads from its environment.
type config struct {
	DatabaseURL     string // normalised: connect_timeout added when absent
	ListenAddr      string
	AdminToken      string
	WorkerEmbedded  bool
	PollInterval    time.Duration
	BatchLimit      int
	WorkspaceID     string // empty: every workspace
	Concurrency     int
	Lease           time.Duration
	ShutdownTimeout time.Duration
	WebhookHosts    []string      // empty: public addresses only; entries "host" or "host:port"
	Retention       time.Duration // 0: keep final runs forever
	PublicURL       string        // without a trailing slash
	LogFormat       string
	LogLevel        string
}

// configVar is one environment variable. The table of them, configVars, drives both
// loadConfig and the usage text, so the two cannot disagree.
type configVar struct {
	name     string
	def      string // used when unset, parsed like a given value; "" leaves the field to loadConfig
	unset    string // what unset means, shown when def is ""
	accepted string
	secret   bool // its value is never echoed
	// parse sets the field from v, which is trimmed and not blank, or says what is wrong.
	parse func(c *config, v string) error
}

// configVars is every variable agentapp reads, in SPEC's order.
var configVars = []configVar{
	{name: "DATABASE_URL", unset: "(required)", secret: true,
		accepted: "a lib/pq URL (postgres://user@host:port/db?sslmode=disable) or key=value DSN; connect_timeout=5 is added when absent",
		parse:    func(c *config, v string) (err error) { c.DatabaseURL, err = dsnWithDefaults(v); return err }},
	{name: "LISTEN_ADDR", def: "127.0.0.1:8080", accepted: "host:port with port 0 … 65535, e.g. 127.0.0.1:8080 or :8080",
		parse: func(c *config, v string) error {
			if _, port, err := net.SplitHostPort(v); err != nil || !portIn(port, 0) {
				return errors.New("not host:port")
			}
			c.ListenAddr = v
			return nil
		}},
	{name: "ADMIN_TOKEN", unset: "(unset: admin API disabled)", secret: true, accepted: "at least 16 characters",
		parse: func(c *config, v string) error {
			if utf8.RuneCountInString(v) < 16 {
				return errors.New("too short")
			}
			c.AdminToken = v
			return nil
		}},
	{name: "RUN_WORKER_EMBEDDED", def: "false", accepted: "true, false, 1 or 0: run the worker inside the API server",
		parse: func(c *config, v string) error {
			switch strings.ToLower(v) {
			case "true", "1":
				c.WorkerEmbedded = true
			case "false", "0":
				c.WorkerEmbedded = false
			default:
				return errors.New("not a boolean")
			}
			return nil
		}},
	{name: "RUN_WORKER_POLL_MS", def: "1000", accepted: "integer 10 … 3600000",
		parse: intVar(10, 3600000, func(c *config, n int) { c.PollInterval = time.Duration(n) * time.Millisecond })},
	{name: "RUN_WORKER_BATCH_LIMIT", unset: "the concurrency", accepted: "integer 1 … 1000: most runs claimed in one cycle",
		parse: intVar(1, 1000, func(c *config, n int) { c.BatchLimit = n })},
	{name: "RUN_WORKER_WORKSPACE_ID", unset: "(unset: all)", accepted: "a UUID: only that workspace's runs are processed",
		parse: func(c *config, v string) error {
			if !isUUID(v) {
				return errors.New("not a UUID")
			}
			c.WorkspaceID = strings.ToLower(v)
			return nil
		}},
	{name: "RUN_WORKER_CONCURRENCY", def: "100", accepted: "integer 1 … 1000: most runs executing at once in one process (agent runs mostly wait on I/O; cap a slow agent with its max_concurrency)",
		parse: intVar(1, 1000, func(c *config, n int) { c.Concurrency = n })},
	{name: "RUN_WORKER_LEASE_MS", def: "30000", accepted: "integer 1000 … 3600000",
		parse: intVar(1000, 3600000, func(c *config, n int) { c.Lease = time.Duration(n) * time.Millisecond })},
	{name: "RUN_WORKER_SHUTDOWN_TIMEOUT_MS", def: "30000", accepted: "integer 0 … 3600000",
		parse: intVar(0, 3600000, func(c *config, n int) { c.ShutdownTimeout = time.Duration(n) * time.Millisecond })},
	{name: "AGENT_WEBHOOK_ALLOWED_HOSTS", unset: "(unset: public addresses only)",
		accepted: "comma-separated DNS names or IP addresses, each optionally with :port 1 … 65535 (IPv6 with a port in brackets), e.g. api.example.com,127.0.0.1:9000,[::1]:8080",
		parse:    parseHosts},
	{name: "RUN_RETENTION_DAYS", unset: "(unset: keep forever)", accepted: "integer 1 … 36500: final runs older than this are deleted",
		parse: intVar(1, 36500, func(c *config, n int) { c.Retention = time.Duration(n) * 24 * time.Hour })},
	{name: "PUBLIC_URL", unset: "http:// + LISTEN_ADDR",
		accepted: "absolute http or https URL with a host and no query or fragment, at which agents reach this server (for events_url)",
		parse:    parsePublicURL},
	{name: "LOG_FORMAT", def: "text", accepted: "text, json", parse: oneOf(func(c *config) *string { return &c.LogFormat }, "text", "json")},
	{name: "LOG_LEVEL", def: "info", accepted: "debug, info, warn, error",
		parse: oneOf(func(c *config) *string { return &c.LogLevel }, "debug", "info", "warn", "error")},
}

// configError lists every problem found in the environment, one per line.
type configError []string

func (e configError) Error() string { return strings.Join(e, "\n") }

// loadConfig parses the environment strictly: a present but invalid value is an error,
// never silently replaced by a default, and every problem is reported at once.
// Surrounding whitespace is trimmed from every value first (a secret file's trailing
// newline is not part of the secret), and a blank value counts as unset.
func loadConfig(getenv func(string) string) (config, error) {
	var c config
	var problems configError
	for _, cv := range configVars {
		raw := getenv(cv.name)
		v := strings.TrimSpace(raw)
		if v == "" {
			v = cv.def
		}
		if v == "" {
			continue
		}
		err := cv.parse(&c, v)
		switch {
		case err == nil:
		case cv.secret:
			// Not even the parser's words: lib/pq's errors can quote the DSN.
			problems = append(problems, fmt.Sprintf("%s is invalid (value not shown): want %s", cv.name, cv.accepted))
		default:
			problems = append(problems, fmt.Sprintf("%s=%q is invalid (%v): want %s", cv.name, raw, err, cv.accepted))
		}
	}
	if strings.TrimSpace(getenv("DATABASE_URL")) == "" {
		problems = append(problems, "DATABASE_URL is required: want "+configVars[0].accepted)
	}
	if c.BatchLimit == 0 {
		c.BatchLimit = c.Concurrency
	}
	if c.PublicURL == "" {
		c.PublicURL = "http://" + c.ListenAddr
	}
	if len(problems) > 0 {
		return config{}, problems
	}
	return c, nil
}

// intVar parses a decimal integer from lo to hi and hands it to set.
func intVar(lo, hi int, set func(*config, int)) func(*config, string) error {
	return func(c *config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil {
			return errors.New("not an integer")
		}
		if n < lo || n > hi {
			return errors.New("out of range")
		}
		set(c, n)
		return nil
	}
}

// oneOf accepts one of allowed, in any case, and stores it as written in allowed.
func oneOf(field func(*config) *string, allowed ...string) func(*config, string) error {
	return func(c *config, v string) error {
		for _, a := range allowed {
			if strings.EqualFold(v, a) {
				*field(c) = a
				return nil
			}
		}
		return errors.New("unknown value")
	}
}

// parseHosts parses AGENT_WEBHOOK_ALLOWED_HOSTS, naming every bad entry.
func parseHosts(c *config, v string) error {
	var hosts, bad []string
	for _, e := range strings.Split(v, ",") {
		h, ok := hostEntry(strings.ToLower(strings.TrimSpace(e)))
		if !ok {
			bad = append(bad, strconv.Quote(strings.TrimSpace(e)))
			continue
		}
		hosts = append(hosts, h)
	}
	if len(bad) > 0 {
		return fmt.Errorf("bad entry %s", strings.Join(bad, ", "))
	}
	c.WebhookHosts = hosts
	return nil
}

// hostEntry checks one allow-list entry and returns it in the form hostAllowed compares:
// a bare host (IPv6 without brackets) or net.JoinHostPort's host:port.
func hostEntry(e string) (string, bool) {
	host, port := e, ""
	switch {
	case strings.HasPrefix(e, "[") && strings.HasSuffix(e, "]"):
		host = e[1 : len(e)-1]
	case strings.HasPrefix(e, "[") || strings.Count(e, ":") == 1:
		h, p, err := net.SplitHostPort(e)
		if err != nil || !portIn(p, 1) || (strings.HasPrefix(e, "[") != strings.Contains(h, ":")) {
			return "", false
		}
		host, port = h, p
	}
	if strings.HasPrefix(e, "[") && !strings.Contains(host, ":") {
		return "", false // brackets are for IPv6 only
	}
	if net.ParseIP(host) == nil && (strings.Contains(host, ":") || !hostName(host)) {
		return "", false
	}
	if port == "" {
		return host, true
	}
	return net.JoinHostPort(host, port), true
}

// hostName reports whether h is a lower-case DNS name: dot-separated labels of letters,
// digits, '-' and '_' (service names), not starting or ending with '-'.
func hostName(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	// URL parsers read a name whose last label is numeric (127.1, 0x7f.1) as an IPv4
	// address in another spelling: only ParseIP's dotted form is taken for an address.
	last := labels[len(labels)-1]
	return strings.Trim(last, "0123456789") != "" && !strings.HasPrefix(last, "0x")
}

// portIn reports whether p is a decimal port from lo to 65535.
func portIn(p string, lo int) bool {
	if p == "" || strings.Trim(p, "0123456789") != "" {
		return false
	}
	n, err := strconv.Atoi(p)
	return err == nil && n >= lo && n <= 65535
}

// parsePublicURL checks PUBLIC_URL and stores it without a trailing slash, so paths can
// be appended to it.
func parsePublicURL(c *config, v string) error {
	u, err := url.Parse(v)
	switch {
	case err != nil:
		return errors.New("not a URL")
	case u.Scheme != "http" && u.Scheme != "https":
		return errors.New("not http or https")
	case u.Opaque != "" || u.Hostname() == "":
		return errors.New("no host")
	case u.Port() != "" && !portIn(u.Port(), 1), strings.HasSuffix(u.Host, ":"):
		return errors.New("bad port")
	case strings.ContainsAny(v, "?#"):
		return errors.New("has a query or fragment")
	}
	c.PublicURL = strings.TrimRight(v, "/")
	return nil
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

// commands are agentapp's subcommands, as the usage text shows them.
var commands = []struct{ name, synopsis, doc string }{
	{"serve", "agentapp [serve]", "apply the schema and serve HTTP (RUN_WORKER_EMBEDDED=true also runs the worker in this process)"},
	{"worker", "agentapp worker [-once]", "run the worker loop until SIGINT/SIGTERM; -once runs one cycle, prints its summary as JSON and exits"},
	{"migrate", "agentapp migrate", "apply the schema and exit"},
	{"workspace", "agentapp workspace create NAME", "create a workspace; prints it with its API key as JSON"},
}

// usage is the -h text: every subcommand and every variable.
func usage() string {
	var b strings.Builder
	b.WriteString("agentapp serves an agent app's API and executes its runs, queued in PostgreSQL.\n\nUsage:\n")
	for _, c := range commands {
		fmt.Fprintf(&b, "  %s\n      %s\n", c.synopsis, c.doc)
	}
	b.WriteString("  agentapp -h\n      this help; agentapp COMMAND -h shows that command's help\n")
	writeEnv(&b)
	return b.String()
}

// commandUsage is the -h text of one subcommand.
func commandUsage(name string) string {
	var b strings.Builder
	b.WriteString("Usage:\n")
	for _, c := range commands {
		if c.name == name {
			fmt.Fprintf(&b, "  %s\n      %s\n", c.synopsis, c.doc)
		}
	}
	writeEnv(&b)
	return b.String()
}

// shortUsage is the one line shown after a mistake on the command line.
func shortUsage(name string) string {
	for _, c := range commands {
		if c.name == name {
			return fmt.Sprintf("usage: %s (agentapp %s -h for help)\n", c.synopsis, name)
		}
	}
	return ""
}

// writeEnv writes the environment section of the usage text from configVars.
func writeEnv(b *strings.Builder) {
	b.WriteString("\nEnvironment (surrounding whitespace is trimmed from every value; a blank value counts as unset):\n")
	for _, v := range configVars {
		def := v.def
		if def == "" {
			def = v.unset
		}
		fmt.Fprintf(b, "  %s\n      default %s\n      accepted: %s\n", v.name, def, v.accepted)
	}
}

// commandLine is what the arguments ask for.
type commandLine struct {
	cmd  string // serve, worker, migrate or workspace
	once bool   // worker -once
	name string // workspace create NAME
	help bool   // usage was asked for and printed: nothing else is to be done
}

// parseCommandLine checks the arguments before anything reads the environment, so a
// mistaken command line is reported as such however bad the environment is. Help goes to
// stdout; a mistake goes to stderr with the usage and errUsage.
func parseCommandLine(args []string, stdout, stderr io.Writer) (commandLine, error) {
	cl := commandLine{cmd: "serve"}
	if len(args) > 0 {
		cl.cmd, args = args[0], args[1:]
	}
	switch cl.cmd {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage())
		return commandLine{help: true}, nil
	case "serve", "worker", "migrate", "workspace":
	default:
		fmt.Fprintf(stderr, "agentapp: unknown command %q\n\n%s", cl.cmd, usage())
		return cl, errUsage
	}
	fail := func(format string, a ...any) (commandLine, error) {
		fmt.Fprintf(stderr, "agentapp %s: %s\n%s", cl.cmd, fmt.Sprintf(format, a...), shortUsage(cl.cmd))
		return cl, errUsage
	}
	// parse parses flags; a flag error has been printed by flag itself.
	parse := func(fs *flag.FlagSet, args []string) (rest []string, help bool, err error) {
		fs.SetOutput(stderr)
		fs.Usage = func() {} // ours is printed below, on stdout for -h
		switch err := fs.Parse(args); {
		case errors.Is(err, flag.ErrHelp):
			fmt.Fprint(stdout, commandUsage(cl.cmd))
			return nil, true, nil
		case err != nil:
			fmt.Fprint(stderr, shortUsage(cl.cmd))
			return nil, false, errUsage
		}
		return fs.Args(), false, nil
	}
	fs := flag.NewFlagSet("agentapp "+cl.cmd, flag.ContinueOnError)
	if cl.cmd == "worker" {
		fs.BoolVar(&cl.once, "once", false, "run one cycle, print its summary as JSON and exit")
	}
	rest, help, err := parse(fs, args)
	if help || err != nil {
		return commandLine{help: help}, err
	}
	if cl.cmd != "workspace" {
		if len(rest) > 0 {
			return fail("unexpected arguments %q", rest)
		}
		return cl, nil
	}
	if len(rest) == 0 || rest[0] != "create" {
		return fail("want the subcommand create")
	}
	rest, help, err = parse(flag.NewFlagSet("agentapp workspace create", flag.ContinueOnError), rest[1:])
	switch {
	case help || err != nil:
		return commandLine{help: help}, err
	case len(rest) != 1:
		return fail("want one NAME; got %d arguments", len(rest))
	}
	if err := checkName(rest[0]); err != nil {
		return fail("NAME %q: %v", rest[0], err)
	}
	cl.name = rest[0]
	return cl, nil
}
