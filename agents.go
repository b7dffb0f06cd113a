package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// echoConfig configures an echo agent: output = input, after an optional delay.
type echoConfig struct {
	DelayMS *int `json:"delay_ms"`
}

// webhookConfig configures a webhook agent: the run is POSTed to URL.
type webhookConfig struct {
	URL       string `json:"url"`
	TimeoutMS *int   `json:"timeout_ms"`
}

// maxWebhookBody is the largest webhook response accepted as a run's output.
const maxWebhookBody = 1 << 20

// decodeAgentConfig decodes config strictly (unknown keys are errors) into v.
func decodeAgentConfig(config json.RawMessage, v any) error {
	if len(config) == 0 || string(config) == "null" || string(config) == "{}" {
		// Every setting at its default: no decoder, which for an echo run was a good part of
		// its execution's CPU (and grew its goroutine's stack).
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(config))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("config: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	return nil
}

// checkConfigKeys refuses a key of config that is not exactly one of v's JSON names:
// encoding/json matches keys case-insensitively, so {"DELAY_MS":1} would pass for
// delay_ms. Only the API checks this; a config stored before is executed as it was read.
func checkConfigKeys(config json.RawMessage, v any) error {
	var keys map[string]json.RawMessage
	if json.Unmarshal(config, &keys) != nil {
		return nil // not an object: decodeAgentConfig says why
	}
	fields := jsonFields(reflect.TypeOf(v).Elem())
	names := slices.Sorted(maps.Keys(fields))
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		if _, ok := fields[k]; !ok {
			return fmt.Errorf("config: unknown key %q (keys match exactly; this kind knows %s)", k, strings.Join(names, ", "))
		}
	}
	return nil
}

// validateAgent checks an agent's kind and config as given to the API.
func validateAgent(kind string, config json.RawMessage, allowedHosts []string) error {
	switch kind {
	case "echo":
		var c echoConfig
		if err := checkConfigKeys(config, &c); err != nil {
			return err
		}
		if err := decodeAgentConfig(config, &c); err != nil {
			return err
		}
		if c.DelayMS != nil && (*c.DelayMS < 0 || *c.DelayMS > 600000) {
			return errors.New("config.delay_ms must be from 0 to 600000")
		}
	case "webhook":
		var c webhookConfig
		if err := checkConfigKeys(config, &c); err != nil {
			return err
		}
		if err := decodeAgentConfig(config, &c); err != nil {
			return err
		}
		if c.TimeoutMS != nil && (*c.TimeoutMS < 1 || *c.TimeoutMS > 600000) {
			return errors.New("config.timeout_ms must be from 1 to 600000")
		}
		u, err := url.Parse(c.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return errors.New("config.url must be an absolute http:// or https:// URL")
		}
		if err := checkHostPort(u); err != nil {
			return fmt.Errorf("config.url host %q is malformed: %v", u.Host, err)
		}
		if !hostAllowed(u, allowedHosts) {
			return fmt.Errorf("config.url host %q is not in AGENT_WEBHOOK_ALLOWED_HOSTS", u.Host)
		}
		if len(allowedHosts) == 0 {
			if class := literalClass(u.Hostname()); class != "" {
				return fmt.Errorf("config.url host %q refused: %s address (with AGENT_WEBHOOK_ALLOWED_HOSTS unset, webhooks reach public addresses only)", u.Host, class)
			}
		}
	default:
		return fmt.Errorf("kind %q is unknown: want echo or webhook", kind)
	}
	return nil
}

// hostAllowed reports whether u may be called: any host when the list is empty, else a
// listed host:port, or a listed bare host on any port.
func hostAllowed(u *url.URL, allowed []string) bool {
	if len(allowed) == 0 {
		return true
	}
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	for _, a := range allowed {
		if a == host || a == net.JoinHostPort(host, port) {
			return true
		}
	}
	return false
}

// checkHostPort refuses a URL host:port that no dialer should be asked to reach: an empty
// host, a colon outside brackets, a bracketed host that is not an IPv6 address, or a port
// that is empty or outside 1 … 65535.
func checkHostPort(u *url.URL) error {
	host, port := u.Hostname(), u.Port()
	switch {
	case host == "":
		return errors.New("the host is empty")
	case strings.HasPrefix(u.Host, "["):
		if a, err := netip.ParseAddr(host); err != nil || !a.Is6() {
			return errors.New("the bracketed host is not an IPv6 address")
		}
	case strings.Contains(host, ":"):
		return errors.New("a colon outside brackets")
	}
	if port == "" {
		if strings.HasSuffix(u.Host, ":") {
			return errors.New("the port is empty")
		}
		return nil
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %s is not from 1 to 65535", port)
	}
	return nil
}

// literalClass names the class of a forbidden address that host spells, in any spelling a
// resolver would accept (inet_aton's decimal, octal, hex and short forms, IPv6, IPv4-mapped
// IPv6), or localhost and *.localhost; "" for anything else, names included: a name is
// checked when it is resolved, at execution.
func literalClass(host string) string {
	name := strings.TrimSuffix(strings.ToLower(host), ".")
	if name == "localhost" || strings.HasSuffix(name, ".localhost") {
		return "loopback"
	}
	if a, ok := parseIPv4Loose(name); ok {
		return addressClass(a)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return addressClass(a)
	}
	return ""
}

// parseIPv4Loose parses s as inet_aton does: one to four parts separated by dots, each
// decimal, octal (leading 0) or hex (leading 0x), the last part filling the bytes that
// remain ("127.1" is 127.0.0.1, "2130706433" too). Go's net.ParseIP accepts none of these
// forms, but a libc resolver would dial them.
func parseIPv4Loose(s string) (netip.Addr, bool) {
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var v uint64
	for i, p := range parts {
		base, digits := 10, p
		switch {
		case len(p) > 1 && (p[:2] == "0x" || p[:2] == "0X"):
			base, digits = 16, p[2:]
			if digits == "" {
				digits = "0" // inet_aton takes a bare "0x" as zero
			}
		case len(p) > 1 && p[0] == '0':
			base, digits = 8, p[1:]
		}
		n, err := strconv.ParseUint(digits, base, 32)
		if err != nil || p == "" {
			return netip.Addr{}, false
		}
		if i < len(parts)-1 {
			if n > 0xff {
				return netip.Addr{}, false
			}
			v = v<<8 | n
			continue
		}
		rest := uint(8 * (4 - i)) // the bits the last part fills
		if n >= 1<<rest {
			return netip.Addr{}, false
		}
		v = v<<rest | n
	}
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// forbiddenPrefixes are the addresses a webhook may not reach while
// AGENT_WEBHOOK_ALLOWED_HOSTS is unset, with the class an error names. The narrower prefix
// comes first where two overlap. Beyond SPEC's list, "reserved" covers what no public
// service answers on: 0/8 (Linux dials 0.x as this host), 192.0.0/24 (IETF protocol
// assignments), 198.18/15 (benchmarking), 240/4 (future use) and fec0::/10 (old site-local).
var forbiddenPrefixes = []struct {
	prefix netip.Prefix
	class  string
}{
	{netip.MustParsePrefix("0.0.0.0/32"), "unspecified"},
	{netip.MustParsePrefix("0.0.0.0/8"), "reserved"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},
	{netip.MustParsePrefix("100.64.0.0/10"), "shared"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},
	{netip.MustParsePrefix("192.0.0.0/24"), "reserved"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private"},
	{netip.MustParsePrefix("198.18.0.0/15"), "reserved"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},
	{netip.MustParsePrefix("::/128"), "unspecified"},
	{netip.MustParsePrefix("::1/128"), "loopback"},
	{netip.MustParsePrefix("fc00::/7"), "private"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("fec0::/10"), "reserved"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// addressClass names the class of a forbidden address ("loopback", "private", …), or ""
// for a public one. An IPv4-mapped IPv6 address is judged as the IPv4 address it maps.
func addressClass(a netip.Addr) string {
	a = a.Unmap().WithZone("") // Prefix.Contains never matches an address with a zone
	for _, f := range forbiddenPrefixes {
		if f.prefix.Contains(a) {
			return f.class
		}
	}
	return ""
}

// refusedDestination is the error of a webhook dial to an address it may not reach.
type refusedDestination struct {
	dest  string // host:port as the URL names it
	addr  string // the ip:port dialed
	class string
}

func (e *refusedDestination) Error() string {
	dest := e.addr
	if e.dest != "" && e.dest != e.addr {
		dest = e.dest + " (" + e.addr + ")"
	}
	return fmt.Sprintf("webhook destination %s refused: %s address (AGENT_WEBHOOK_ALLOWED_HOSTS lists the hosts that may be reached)", dest, e.class)
}

// listedDestination is the context key runWebhook sets when the URL's host is in
// AGENT_WEBHOOK_ALLOWED_HOSTS: the operator chose that host, so the dialer reaches whatever
// it resolves to. Without it the dialer reaches public addresses only, so a client used
// without runWebhook fails closed. A process has one list, so a pooled connection, dialed
// for one request and reused by the next to the same host:port, never crosses policies.
type listedDestination struct{}

// webhookDialer is the only way webhook requests reach the network. It resolves a name
// through lookup (a seam for tests), then dials each resolved address itself, so the
// address checked is the address connected to: a name cannot resolve once for a check and
// again, elsewhere, for the connection.
type webhookDialer struct {
	lookup func(ctx context.Context, host string) ([]netip.Addr, error)
	dialer net.Dialer
}

// dialContext is the webhook transport's DialContext.
func (d *webhookDialer) dialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("webhook port %q: %v", portText, err)
	}
	var ips []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil {
		ips = []netip.Addr{a}
	} else {
		if ips, err = d.lookup(ctx, host); err != nil {
			return nil, err
		}
	}
	var firstErr error
	for _, ip := range ips {
		conn, err := d.dialer.DialContext(ctx, network, netip.AddrPortFrom(ip.Unmap(), uint16(port)).String())
		if err == nil {
			return conn, nil
		}
		var refused *refusedDestination
		if errors.As(err, &refused) {
			refused.dest = addr
			return nil, refused // the policy reason outranks another address's connection error
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if firstErr == nil {
		firstErr = fmt.Errorf("webhook host %s resolves to no address", host)
	}
	return nil, firstErr
}

// checkDestination is the dialer's ControlContext: it runs on the socket about to connect,
// with the numeric address, so nothing reaches a forbidden address unless runWebhook found
// the URL's host in the allow-list.
func checkDestination(ctx context.Context, network, address string, _ syscall.RawConn) error {
	if ctx.Value(listedDestination{}) != nil {
		return nil
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("webhook destination %s: %v", address, err)
	}
	if class := addressClass(ap.Addr()); class != "" {
		return &refusedDestination{addr: address, class: class}
	}
	return nil
}

// newWebhookClient returns the client webhook agents use, resolving names with the
// system's resolver.
func newWebhookClient() *http.Client {
	return newWebhookClientWith(func(ctx context.Context, host string) ([]netip.Addr, error) {
		return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	})
}

// newWebhookClientWith returns the webhook client resolving names with lookup. Every
// connection goes through the checked dialer: no proxy from the environment (it would dial
// the proxy, not the destination), and no redirects (a redirect is a non-2xx answer, so a
// webhook cannot lead the worker off the allowed hosts).
func newWebhookClientWith(lookup func(ctx context.Context, host string) ([]netip.Addr, error)) *http.Client {
	d := &webhookDialer{lookup: lookup, dialer: net.Dialer{
		Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, ControlContext: checkDestination,
	}}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.DialContext = d.dialContext
	t.MaxIdleConnsPerHost = 64
	return &http.Client{
		Transport: t,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// runAgent executes one attempt of a claimed run and returns its output, or the wait that
// ends its step (a webhook's 202). A panic in the agent fails the attempt, not the process.
func runAgent(ctx context.Context, client *http.Client, allowedHosts []string, c claimedRun) (output json.RawMessage, wait *waitRequest, err error) {
	defer func() {
		if p := recover(); p != nil {
			output, wait, err = nil, nil, fmt.Errorf("agent panicked: %v", p)
		}
	}()
	switch c.AgentKind {
	case "echo":
		output, err = runEcho(ctx, c)
		return output, nil, err
	case "webhook":
		return runWebhook(ctx, client, allowedHosts, c)
	}
	return nil, nil, fmt.Errorf("agent kind %q is unknown", c.AgentKind)
}

func runEcho(ctx context.Context, c claimedRun) (json.RawMessage, error) {
	var cfg echoConfig
	if err := decodeAgentConfig(c.AgentConfig, &cfg); err != nil {
		return nil, err
	}
	if cfg.DelayMS != nil && *cfg.DelayMS > 0 {
		t := time.NewTimer(time.Duration(*cfg.DelayMS) * time.Millisecond)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-t.C:
		}
	}
	return c.Input, nil
}

func runWebhook(ctx context.Context, client *http.Client, allowedHosts []string, c claimedRun) (json.RawMessage, *waitRequest, error) {
	var cfg webhookConfig
	if err := decodeAgentConfig(c.AgentConfig, &cfg); err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, nil, fmt.Errorf("webhook url is invalid: %v", err)
	}
	if !hostAllowed(u, allowedHosts) {
		return nil, nil, fmt.Errorf("webhook host %q is not in AGENT_WEBHOOK_ALLOWED_HOSTS", u.Host)
	}
	if len(allowedHosts) > 0 {
		ctx = context.WithValue(ctx, listedDestination{}, true)
	}
	timeout := 30 * time.Second
	if cfg.TimeoutMS != nil {
		timeout = time.Duration(*cfg.TimeoutMS) * time.Millisecond
	}
	body, err := json.Marshal(map[string]any{
		"run_id": c.ID, "workspace_id": c.WorkspaceID, "agent": c.AgentName, "attempt": c.Attempt, "input": c.Input,
		"events_url": c.EventsURL, "events_token": c.EventsToken,
		"step": c.Step, "state": c.State, "resume": c.Resume,
	})
	if err != nil {
		return nil, nil, err
	}
	reqCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(reqCtx, http.MethodPost, cfg.URL, bytes.NewReader(body))
	if err != nil {
		return nil, nil, fmt.Errorf("webhook request: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", c.ID)
	// Unique per (run, step, attempt): attempts count per step. A requeued attempt (refunded
	// at shutdown) is delivered again with its id.
	id := fmt.Sprintf("%s_%d_%d", c.ID, c.Step, c.Attempt)
	ts := time.Now().Unix()
	sig, err := signatures(c.Secrets, id, ts, body)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("webhook-id", id)
	req.Header.Set("webhook-timestamp", strconv.FormatInt(ts, 10))
	req.Header.Set("webhook-signature", sig)
	req.Header.Set("traceparent", "00-"+c.TraceID+"-"+randomHex(8)+"-"+c.Flags)

	// timedOut tells the webhook's own timeout from the run being canceled.
	timedOut := func() bool { return ctx.Err() == nil && reqCtx.Err() != nil }
	resp, err := client.Do(req)
	if err != nil {
		var refused *refusedDestination
		if errors.As(err, &refused) {
			return nil, nil, refused
		}
		if ctx.Err() != nil {
			return nil, nil, context.Cause(ctx)
		}
		if timedOut() {
			return nil, nil, fmt.Errorf("webhook timed out after %v", timeout)
		}
		return nil, nil, fmt.Errorf("webhook connection failed: %v", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxWebhookBody+1))
	delay, pushedBack := pushback(resp, time.Now())
	switch {
	case ctx.Err() != nil:
		return nil, nil, context.Cause(ctx)
	case pushedBack:
		return nil, nil, &pushbackError{status: resp.StatusCode, delay: delay, excerpt: bodyExcerpt(data)}
	case err != nil && timedOut():
		return nil, nil, fmt.Errorf("webhook timed out after %v reading the response", timeout)
	case err != nil:
		return nil, nil, fmt.Errorf("webhook response could not be read: %v", err)
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return nil, nil, fmt.Errorf("webhook answered HTTP %d, want 2xx%s", resp.StatusCode, bodyExcerpt(data))
	case len(data) > maxWebhookBody:
		return nil, nil, errors.New("webhook response body is over 1 MiB")
	case !json.Valid(data):
		return nil, nil, fmt.Errorf("webhook response is not JSON (%d bytes, Content-Type %q)", len(data), resp.Header.Get("Content-Type"))
	}
	if resp.StatusCode == http.StatusAccepted {
		// The step ended without ending the run: the body says what it waits for.
		wait, err := parseWait(data)
		if err != nil {
			return nil, nil, fmt.Errorf("webhook answered 202 but not a wait {\"state\", \"wait\"}: %v", err)
		}
		return nil, wait, nil
	}
	if err := checkStorable(data); err != nil {
		return nil, nil, fmt.Errorf("webhook output %v", err)
	}
	var out bytes.Buffer
	if err := json.Compact(&out, data); err != nil {
		return nil, nil, err
	}
	return out.Bytes(), nil, nil
}

// maxPushback is the longest Retry-After honoured (SPEC): a longer one holds the agent for
// this long, so that a wrong header cannot park an agent for days.
const maxPushback = time.Hour

// maxPushbacks is how many times a run may be pushed back without spending an attempt
// (SPEC): the next pushback fails the attempt, so that a webhook that always pushes back
// does not keep a run forever.
const maxPushbacks = 20

// pushbackError is a webhook's 429 or 503 with a Retry-After: the attempt is not spent, and
// its agent starts no attempt before delay has passed.
type pushbackError struct {
	status  int
	delay   time.Duration
	excerpt string // bodyExcerpt of the answer
}

func (e *pushbackError) Error() string {
	return fmt.Sprintf("webhook answered HTTP %d with Retry-After %v%s", e.status, e.delay, e.excerpt)
}

// pushback reads a webhook's answer as a pushback: a 429 or 503 with a Retry-After in
// seconds or as an HTTP date, at most maxPushback from now (a date past is now). Without a
// Retry-After it can read, the answer is an ordinary failure.
func pushback(resp *http.Response, now time.Time) (time.Duration, bool) {
	if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return 0, false
	}
	h := strings.TrimSpace(resp.Header.Get("Retry-After"))
	var d time.Duration
	if secs, err := strconv.ParseUint(h, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) { // too many seconds: the most
		d = maxPushback
		if secs < uint64(maxPushback/time.Second) {
			d = time.Duration(secs) * time.Second
		}
	} else if t, err := http.ParseTime(h); err == nil {
		d = max(t.Sub(now), 0)
	} else {
		return 0, false
	}
	return min(d, maxPushback), true
}

// secretPrefix begins every signing secret, as the Standard Webhooks specification spells
// them; the rest is the key's base64.
const secretPrefix = "whsec_"

// secretOverlap is how long the secret before a rotation signs deliveries beside the new
// one, so that an agent can switch to the new secret without refusing a delivery (SPEC).
const secretOverlap = 24 * time.Hour

// newSigningSecret returns a new webhook signing secret: whsec_ and the base64 of 32 random
// bytes (the specification asks for 24 to 64).
func newSigningSecret() string {
	b := make([]byte, 32)
	rand.Read(b) // crypto/rand: never fails
	return secretPrefix + base64.StdEncoding.EncodeToString(b)
}

// signatures is a webhook-signature header: the Standard Webhooks v1 signature of
// id.ts.body by each secret, newest first, separated by spaces.
func signatures(secrets []string, id string, ts int64, body []byte) (string, error) {
	if len(secrets) == 0 {
		return "", errors.New("webhook agent has no signing secret: rotate it (POST …/rotate-secret)")
	}
	sigs := make([]string, len(secrets))
	for i, secret := range secrets {
		key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, secretPrefix))
		if err != nil {
			return "", fmt.Errorf("webhook agent's signing secret is malformed (%v): rotate it", err)
		}
		mac := hmac.New(sha256.New, key)
		fmt.Fprintf(mac, "%s.%d.", id, ts)
		mac.Write(body)
		sigs[i] = "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
	}
	return strings.Join(sigs, " "), nil
}

// randomHex returns n random bytes in lowercase hex.
func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// traceContext is the W3C trace context a run's deliveries carry: its trace id (32 hex
// digits) and trace flags (2).
type traceContext struct {
	TraceID, Flags string
}

// newTraceContext starts a trace: a random trace id, sampled (flags 01), as a request
// without a traceparent gets one.
func newTraceContext() traceContext {
	return traceContext{TraceID: randomHex(16), Flags: "01"}
}

// parseTraceparent reads a W3C traceparent header (version 00, or a later version read as
// 00 says); ok is false for an invalid one, which the caller replaces with a new trace.
func parseTraceparent(h string) (tc traceContext, ok bool) {
	h = strings.TrimSpace(h)
	if len(h) < 55 || h[2] != '-' || h[35] != '-' || h[52] != '-' {
		return tc, false
	}
	version, traceID, parent, flags := h[:2], h[3:35], h[36:52], h[53:55]
	switch {
	case !isLowerHex(version) || version == "ff",
		version == "00" && len(h) != 55,
		len(h) > 55 && h[55] != '-',
		!isLowerHex(traceID) || traceID == strings.Repeat("0", 32),
		!isLowerHex(parent) || parent == strings.Repeat("0", 16),
		!isLowerHex(flags):
		return tc, false
	}
	return traceContext{TraceID: traceID, Flags: flags}, true
}

// isLowerHex reports whether s is lowercase hex digits only, as trace context requires.
func isLowerHex(s string) bool {
	for i := range len(s) {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// maxErrorExcerpt is how much of a failed webhook's answer its attempt's error quotes: the
// start of it says why (the agent's own error message), and the error stays short enough
// for a log line and for every attempt's entry in the run's errors.
const maxErrorExcerpt = 512

// bodyExcerpt returns "; body: " and the start of a failed webhook's answer, at most
// maxErrorExcerpt bytes of it, made safe to show: control characters (newlines, escapes
// that a terminal would obey) become spaces, bytes that are not UTF-8 become U+FFFD, and
// it is cut at a character's boundary. "" for a blank body.
func bodyExcerpt(body []byte) string {
	var b strings.Builder
	cut := false
	for i := 0; i < len(body); {
		r, size := utf8.DecodeRune(body[i:]) // RuneError for a byte that is not UTF-8
		if unicode.IsControl(r) {
			r = ' '
		}
		if b.Len()+utf8.RuneLen(r) > maxErrorExcerpt {
			cut = true
			break
		}
		b.WriteRune(r)
		i += size
	}
	excerpt := strings.TrimSpace(b.String())
	switch {
	case excerpt == "":
		return ""
	case cut:
		return fmt.Sprintf("; body (its first %d bytes): %s", maxErrorExcerpt, excerpt)
	}
	return "; body: " + excerpt
}
