package main

// Runs that wait (SPEC "Runs that wait"): a webhook that answers 202 with {"state", "wait"}
// ends its step without ending the run. This file reads that answer and the signal request;
// the writes (the wait, the wake, the signal) are in queue.go with every other change of
// a run's status.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// maxSteps is the last step a run may take (SPEC): an agent that keeps waiting forever is a
// bug, and the run fails rather than living on.
const maxSteps = 1000

// The ranges of a wait (SPEC "Runs that wait").
const (
	maxWaitMS   = 365 * 24 * 3600_000 // sleep_ms and timeout_ms: a year, as delay_ms
	maxChildren = 100                 // child runs of one wait
)

// waitKind says which of the three waits a run waits for.
type waitKind string

const (
	waitSleep  waitKind = "sleep"
	waitSignal waitKind = "signal"
	waitRuns   waitKind = "runs"
)

// waitRequest is a webhook's 202: the step's state and what the run waits for.
type waitRequest struct {
	State    json.RawMessage // compacted
	Wait     json.RawMessage // the answer's "wait", compacted: the run's waiting_for
	Kind     waitKind
	After    time.Duration // sleep_ms, or a signal's timeout_ms (0: none)
	Signal   string
	Children []newRun // a runs wait's child runs, in the order asked
}

// waitBody and waitSpec are the 202's body as decoded: every key known, none twice.
type waitBody struct {
	State json.RawMessage `json:"state"`
	Wait  json.RawMessage `json:"wait"`
}

type waitSpec struct {
	SleepMS   *int64            `json:"sleep_ms"`
	Signal    *string           `json:"signal"`
	TimeoutMS *int64            `json:"timeout_ms"`
	Runs      []json.RawMessage `json:"runs"`
}

// parseWait reads a webhook's 202 body: exactly {"state": any JSON, "wait": W}, W one of
// {"sleep_ms"}, {"signal", "timeout_ms"?}, {"runs": [...]}, each child as a create's run
// fields without run_at or delay_ms. The error says what is wrong, for the failed attempt.
func parseWait(data []byte) (*waitRequest, error) {
	var a waitBody
	if err := decodeJSON(data, &a); err != nil {
		return nil, err
	}
	if len(a.State) == 0 {
		return nil, errors.New(`"state" is required (null for none)`)
	}
	if len(a.Wait) == 0 || bytes.Equal(a.Wait, []byte("null")) {
		return nil, errors.New(`"wait" is required: {"sleep_ms"}, {"signal", "timeout_ms"?} or {"runs"}`)
	}
	var w waitSpec
	if err := decodeJSON(a.Wait, &w); err != nil {
		return nil, fmt.Errorf("wait: %v", err)
	}
	req := &waitRequest{}
	kinds := 0
	if w.SleepMS != nil {
		kinds++
		req.Kind = waitSleep
		if *w.SleepMS < 1 || *w.SleepMS > maxWaitMS {
			return nil, fmt.Errorf("wait.sleep_ms must be from 1 to %d", int64(maxWaitMS))
		}
		req.After = time.Duration(*w.SleepMS) * time.Millisecond
	}
	if w.Signal != nil {
		kinds++
		req.Kind, req.Signal = waitSignal, *w.Signal
		if !validEventType(req.Signal) {
			return nil, fmt.Errorf("wait.signal must be 1 to 64 characters of a-z, 0-9, _, . and -, got %q", req.Signal)
		}
	}
	if w.TimeoutMS != nil {
		if w.Signal == nil {
			return nil, errors.New("wait.timeout_ms goes only with wait.signal")
		}
		if *w.TimeoutMS < 1 || *w.TimeoutMS > maxWaitMS {
			return nil, fmt.Errorf("wait.timeout_ms must be from 1 to %d", int64(maxWaitMS))
		}
		req.After = time.Duration(*w.TimeoutMS) * time.Millisecond
	}
	if w.Runs != nil {
		kinds++
		req.Kind = waitRuns
		if len(w.Runs) < 1 || len(w.Runs) > maxChildren {
			return nil, fmt.Errorf("wait.runs must hold 1 to %d runs, got %d", maxChildren, len(w.Runs))
		}
		for i, raw := range w.Runs {
			where := fmt.Sprintf("wait.runs[%d].", i)
			var q runRequest
			if err := decodeJSON(raw, &q); err != nil {
				return nil, fmt.Errorf("wait.runs[%d]: %v", i, err)
			}
			if q.RunAt != nil || q.DelayMS != nil {
				return nil, fmt.Errorf("%srun_at and delay_ms are not a child run's fields: children start at once", where)
			}
			n, err := q.validate(where)
			if err != nil {
				return nil, err
			}
			req.Children = append(req.Children, n)
		}
	}
	if kinds != 1 {
		return nil, errors.New(`wait must be exactly one of {"sleep_ms"}, {"signal", "timeout_ms"?} or {"runs"}`)
	}
	if err := checkStorable(a.State); err != nil {
		return nil, fmt.Errorf("state %v", err)
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, a.State); err != nil {
		return nil, err
	}
	req.State = bytes.Clone(buf.Bytes())
	buf.Reset()
	if err := json.Compact(&buf, a.Wait); err != nil {
		return nil, err
	}
	req.Wait = buf.Bytes()
	return req, nil
}

// signalRequest is the body of POST …/runs/{id}/signal.
type signalRequest struct {
	Name string          `json:"name"`
	Data json.RawMessage `json:"data"`
}

// signalRun sends a signal to a run waiting for it: 200 with the run, queued again; a run
// not waiting for that name is 409.
func (s *server) signalRun(w http.ResponseWriter, r *http.Request) {
	var req signalRequest
	if err := decode(r, &req, false); err != nil {
		s.fail(w, r, err)
		return
	}
	data, err := signalData(req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	run, err := s.store.signalRun(r.Context(), r.PathValue("ws"), r.PathValue("id"), req.Name, data)
	s.answer(w, r, http.StatusOK, run, err)
}

// signalData validates a signal's name and returns its data, compacted (null when absent).
func signalData(req signalRequest) (json.RawMessage, error) {
	if !validEventType(req.Name) {
		return nil, invalid("name must be 1 to 64 characters of a-z, 0-9, _, . and -, got %q", req.Name)
	}
	if len(req.Data) == 0 {
		return json.RawMessage("null"), nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, req.Data); err != nil {
		return nil, badRequest("data: %v", err)
	}
	size, err := storedJSONSize(buf.Bytes())
	switch {
	case err != nil:
		return nil, invalid("data cannot be stored: %v", err)
	case size > maxStoredJSON:
		return nil, invalid("data is over 1 MiB as stored and answered (%d bytes)", size)
	}
	return buf.Bytes(), nil
}
