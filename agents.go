package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
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
	if len(config) == 0 || string(config) == "null" {
		config = json.RawMessage("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(config))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("config: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	return nil
}

// validateAgent checks an agent's kind and config as given to the API.
func validateAgent(kind string, config json.RawMessage, allowedHosts []string) error {
	switch kind {
	case "echo":
		var c echoConfig
		if err := decodeAgentConfig(config, &c); err != nil {
			return err
		}
		if c.DelayMS != nil && (*c.DelayMS < 0 || *c.DelayMS > 600000) {
			return errors.New("config.delay_ms must be from 0 to 600000")
		}
	case "webhook":
		var c webhookConfig
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
		if !hostAllowed(u, allowedHosts) {
			return fmt.Errorf("config.url host %q is not in AGENT_WEBHOOK_ALLOWED_HOSTS", u.Host)
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

// newWebhookClient returns the client webhook agents use. It follows no redirects: a
// redirect is a non-2xx answer, so a webhook cannot lead the worker off the allowed hosts.
func newWebhookClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 64
	return &http.Client{
		Transport: t,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// runAgent executes one attempt of a claimed run and returns its output. A panic in the
// agent fails the attempt, not the process.
func runAgent(ctx context.Context, client *http.Client, allowedHosts []string, c claimedRun) (output json.RawMessage, err error) {
	defer func() {
		if p := recover(); p != nil {
			output, err = nil, fmt.Errorf("agent panicked: %v", p)
		}
	}()
	switch c.AgentKind {
	case "echo":
		return runEcho(ctx, c)
	case "webhook":
		return runWebhook(ctx, client, allowedHosts, c)
	}
	return nil, fmt.Errorf("agent kind %q is unknown", c.AgentKind)
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

func runWebhook(ctx context.Context, client *http.Client, allowedHosts []string, c claimedRun) (json.RawMessage, error) {
	var cfg webhookConfig
	if err := decodeAgentConfig(c.AgentConfig, &cfg); err != nil {
		return nil, err
	}
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("webhook url is invalid: %v", err)
	}
	if !hostAllowed(u, allowedHosts) {
		return nil, fmt.Errorf("webhook host %q is not in AGENT_WEBHOOK_ALLOWED_HOSTS", u.Host)
	}
	timeout := 30 * time.Second
	if cfg.TimeoutMS != nil {
		timeout = time.Duration(*cfg.TimeoutMS) * time.Millisecond
	}
	body, err := json.Marshal(map[string]any{
		"run_id": c.ID, "workspace_id": c.WorkspaceID, "agent": c.AgentName, "attempt": c.Attempt, "input": c.Input,
		"events_url": c.EventsURL, "events_token": c.EventsToken,
	})
	if err != nil {
		return nil, err
	}
	reqCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(reqCtx, http.MethodPost, cfg.URL, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("webhook request: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", c.ID)

	// timedOut tells the webhook's own timeout from the run being canceled.
	timedOut := func() bool { return ctx.Err() == nil && reqCtx.Err() != nil }
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		if timedOut() {
			return nil, fmt.Errorf("webhook timed out after %v", timeout)
		}
		return nil, fmt.Errorf("webhook connection failed: %v", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxWebhookBody+1))
	switch {
	case ctx.Err() != nil:
		return nil, context.Cause(ctx)
	case err != nil && timedOut():
		return nil, fmt.Errorf("webhook timed out after %v reading the response", timeout)
	case err != nil:
		return nil, fmt.Errorf("webhook response could not be read: %v", err)
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return nil, fmt.Errorf("webhook answered HTTP %d, want 2xx", resp.StatusCode)
	case len(data) > maxWebhookBody:
		return nil, errors.New("webhook response body is over 1 MiB")
	case !json.Valid(data):
		return nil, fmt.Errorf("webhook response is not JSON (%d bytes, Content-Type %q)", len(data), resp.Header.Get("Content-Type"))
	}
	var out bytes.Buffer
	if err := json.Compact(&out, data); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}
