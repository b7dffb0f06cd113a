package main

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"
)

// plainRun is runRecord without its MarshalJSON: encoding/json's encoding of the same
// fields and tags, the reference appendJSON must match.
type plainRun runRecord

// encodingJSON is v as writeJSON wrote it before appendJSON: json.Encoder's defaults.
func encodingJSON(t testing.TB, v any) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		t.Fatalf("encoding/json: %v", err)
	}
	return buf.Bytes()
}

// sampleRuns covers every field's forms: nil and set pointers, raw JSON with PostgreSQL's
// spacing, strings that encoding/json escapes.
func sampleRuns() []runRecord {
	at := time.Date(2026, 12, 2, 6, 43, 34, 70314000, time.UTC)
	whole := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	msg := "timed out after 500 ms"
	odd := "a \"quote\" \\ <b>&amp;</b>\n\t\r\b\f\x00\x1f\x7f é 日本 \u2028\u2029 \xff\xfe end"
	timeout := 1500
	return []runRecord{
		{ID: "6bd58e1f-32f5-4b5c-80c0-289e810dcab6", WorkspaceID: "e475c0e3-da14-4a6d-a011-f124ca9a0ffb",
			Agent: "echo", Status: statusQueued, Input: json.RawMessage(`{"i": 2000000}`),
			Errors: json.RawMessage(`[]`), Attempt: 0, MaxAttempts: 3, RunAt: at, CreatedAt: at, UpdatedAt: at},
		{ID: "x", WorkspaceID: "y", Agent: odd, Status: statusFailed,
			Input:  json.RawMessage(" {\"a\" : [1, 2.5e10, -0, true, false, null],\n\t\"s\": \"<x> & \\\"y\\\" \\\\ \u2028 \u2029 é\"} "),
			Output: json.RawMessage(`"<script>\u2028"`), Error: &odd,
			Errors:  json.RawMessage(`[{"at": "2026-12-02T06:43:34.070314Z", "attempt": 1, "message": "boom & <bust>"}]`),
			Attempt: 3, MaxAttempts: 3, Priority: 9, RunAt: whole, TimeoutMS: &timeout, CreatedAt: whole,
			StartedAt: &at, FinishedAt: &whole, UpdatedAt: at, Schedule: &odd, ScheduledFor: &whole},
		{ID: "z", Status: statusSucceeded, Input: json.RawMessage(`null`), Output: json.RawMessage(`{"nested": {"deep": [[], {}, ""]}}`),
			Error: &msg, Errors: nil, Priority: -1, StartedAt: &whole},
	}
}

func TestRunJSONMatchesEncodingJSON(t *testing.T) {
	for i, r := range sampleRuns() {
		got := append(r.appendJSON(nil), '\n')
		if want := encodingJSON(t, plainRun(r)); !bytes.Equal(got, want) {
			t.Errorf("run %d:\ngot  %s\nwant %s", i, got, want)
		}
		// Inside another value (MarshalJSON), and as an answer.
		if got, want := encodingJSON(t, []runRecord{r}), encodingJSON(t, []plainRun{plainRun(r)}); !bytes.Equal(got, want) {
			t.Errorf("run %d in a slice:\ngot  %s\nwant %s", i, got, want)
		}
		rec := httptest.NewRecorder()
		writeRun(rec, 201, r)
		if want := encodingJSON(t, plainRun(r)); rec.Code != 201 || !bytes.Equal(rec.Body.Bytes(), want) {
			t.Errorf("writeRun: got %d %s; want 201 %s", rec.Code, rec.Body.Bytes(), want)
		}
	}
}

func TestWriteRunsMatchesEncodingJSON(t *testing.T) {
	runs := sampleRuns()
	plain := make([]plainRun, len(runs))
	for i, r := range runs {
		plain[i] = plainRun(r)
	}
	cursor := "DhyYoR__QSCYpoNGF6eI4g"
	for _, tc := range []struct {
		name   string
		runs   []runRecord
		list   bool
		cursor string
		want   any
	}{
		{"list page", runs, true, cursor, map[string]any{"runs": plain, "next_cursor": &cursor}},
		{"last page", runs[:1], true, "", map[string]any{"runs": plain[:1], "next_cursor": (*string)(nil)}},
		{"empty page", []runRecord{}, true, "", map[string]any{"runs": []plainRun{}, "next_cursor": (*string)(nil)}},
		{"batch", runs, false, "", map[string][]plainRun{"runs": plain}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			writeRuns(rec, 200, tc.runs, tc.list, tc.cursor)
			want := encodingJSON(t, tc.want)
			if !bytes.Equal(rec.Body.Bytes(), want) {
				t.Errorf("got  %s\nwant %s", rec.Body.Bytes(), want)
			}
			if got := rec.Header().Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type %q; want application/json", got)
			}
		})
	}
}

// FuzzRunJSON holds appendJSON to encoding/json for any strings and any valid raw JSON.
func FuzzRunJSON(f *testing.F) {
	f.Add("echo", "boom <&> \u2028", []byte(`{"a": "<b> \"c\" \u2029"}`))
	f.Add("\xff", "\x00\x1f", []byte(" [1 , 2]\n"))
	f.Fuzz(func(t *testing.T, agent, msg string, raw []byte) {
		if !json.Valid(raw) {
			return
		}
		now := time.Unix(0, 1764657814070314123).UTC()
		r := runRecord{ID: agent, Agent: agent, Status: runStatus(msg), Input: raw, Output: raw, Error: &msg,
			Errors: raw, RunAt: now, CreatedAt: now, UpdatedAt: now, FinishedAt: &now}
		if got, want := append(r.appendJSON(nil), '\n'), encodingJSON(t, plainRun(r)); !bytes.Equal(got, want) {
			t.Errorf("got  %s\nwant %s", got, want)
		}
	})
}

// BenchmarkRunsJSON encodes a list page of 50 runs as the API answers it, with encoding/json
// (before) and with appendJSON.
func BenchmarkRunsJSON(b *testing.B) {
	at := time.Now().UTC()
	page := make([]runRecord, 50)
	plain := make([]plainRun, 50)
	for i := range page {
		page[i] = runRecord{ID: "6bd58e1f-32f5-4b5c-80c0-289e810dcab6", WorkspaceID: "e475c0e3-da14-4a6d-a011-f124ca9a0ffb",
			Agent: "echo", Status: statusSucceeded, Input: json.RawMessage(`{"i": 1999950}`), Output: json.RawMessage(`{"i": 1999950}`),
			Errors: json.RawMessage(`[]`), Attempt: 1, MaxAttempts: 3, RunAt: at, CreatedAt: at, StartedAt: &at, FinishedAt: &at, UpdatedAt: at}
		plain[i] = plainRun(page[i])
	}
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			rec := httptest.NewRecorder()
			writeJSON(rec, 200, map[string]any{"runs": plain, "next_cursor": nil})
		}
	})
	b.Run("appendJSON", func(b *testing.B) {
		for b.Loop() {
			rec := httptest.NewRecorder()
			writeRuns(rec, 200, page, true, "")
		}
	})
}
