package main

import (
	"encoding/json"
	"testing"
	"time"
)

// TestEmbeddedWorker: with RUN_WORKER_EMBEDDED=true a run created through the API
// succeeds without anyone calling the worker API or `agentapp worker`.
func TestEmbeddedWorker(t *testing.T) {
	t.Parallel()
	a := startApp(t, testEnv(t, testDB(t), map[string]string{"RUN_WORKER_EMBEDDED": "true", "RUN_WORKER_POLL_MS": "60000"}))
	ws := a.createWorkspace(t)
	input := map[string]any{"prompt": "hello", "n": 3.5}
	r := a.createRun(t, ws, "echo", input)
	if r.Status != "queued" || r.Attempt != 0 {
		t.Fatalf("created run: got status %q attempt %d; want queued, 0", r.Status, r.Attempt)
	}
	r = a.waitRunStatus(t, ws, r.ID, "succeeded", 10*time.Second)
	want, _ := json.Marshal(input)
	if string(r.Output) != string(want) {
		t.Errorf("output: got %s; want %s", r.Output, want)
	}
	if r.Attempt != 1 || r.FinishedAt == nil || r.StartedAt == nil {
		t.Errorf("got attempt %d, started_at %v, finished_at %v; want 1 and both set", r.Attempt, r.StartedAt, r.FinishedAt)
	}
}
