package main

import (
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"
)

// A page of runs is most of what the API answers by volume (a list page of up to 200
// runs, a batch of up to 1,000), and encoding/json spends most of that answer re-validating
// what it already has: it compacts the output of every json.RawMessage and every
// time.Time's MarshalJSON, nine per run, byte by byte through its scanner. appendJSON writes
// the same bytes directly. TestRunJSONMatchesEncodingJSON holds it to encoding/json's output.

// MarshalJSON encodes r as the API's run object (see appendJSON), wherever a run is
// encoded inside another value.
func (r runRecord) MarshalJSON() ([]byte, error) { return r.appendJSON(nil), nil }

// appendJSON appends r as the API's run object: byte for byte what encoding/json gives for
// runRecord's fields and tags, as writeJSON encodes (HTML characters escaped, the raw JSON
// compacted). Input, Output and Errors are read from jsonb, so they are valid JSON.
func (r *runRecord) appendJSON(b []byte) []byte {
	b = append(b, `{"id":`...)
	b = appendJSONString(b, r.ID)
	b = append(b, `,"workspace_id":`...)
	b = appendJSONString(b, r.WorkspaceID)
	b = append(b, `,"agent":`...)
	b = appendJSONString(b, r.Agent)
	b = append(b, `,"status":`...)
	b = appendJSONString(b, string(r.Status))
	b = append(b, `,"input":`...)
	b = appendRawJSON(b, r.Input)
	b = append(b, `,"output":`...)
	b = appendRawJSON(b, r.Output)
	b = append(b, `,"error":`...)
	if r.Error == nil {
		b = append(b, "null"...)
	} else {
		b = appendJSONString(b, *r.Error)
	}
	b = append(b, `,"errors":`...)
	b = appendRawJSON(b, r.Errors)
	b = append(b, `,"attempt":`...)
	b = strconv.AppendInt(b, int64(r.Attempt), 10)
	b = append(b, `,"max_attempts":`...)
	b = strconv.AppendInt(b, int64(r.MaxAttempts), 10)
	b = append(b, `,"priority":`...)
	b = strconv.AppendInt(b, int64(r.Priority), 10)
	b = append(b, `,"run_at":`...)
	b = appendJSONTime(b, &r.RunAt)
	b = append(b, `,"timeout_ms":`...)
	if r.TimeoutMS == nil {
		b = append(b, "null"...)
	} else {
		b = strconv.AppendInt(b, int64(*r.TimeoutMS), 10)
	}
	b = append(b, `,"concurrency_key":`...)
	if r.ConcurrencyKey == nil {
		b = append(b, "null"...)
	} else {
		b = appendJSONString(b, *r.ConcurrencyKey)
	}
	b = append(b, `,"cost":`...)
	b = strconv.AppendInt(b, int64(r.Cost), 10)
	b = append(b, `,"step":`...)
	b = strconv.AppendInt(b, int64(r.Step), 10)
	b = append(b, `,"state":`...)
	b = appendRawJSON(b, r.State)
	b = append(b, `,"waiting_for":`...)
	b = appendRawJSON(b, r.WaitingFor)
	b = append(b, `,"parent_id":`...)
	if r.ParentID == nil {
		b = append(b, "null"...)
	} else {
		b = appendJSONString(b, *r.ParentID)
	}
	b = append(b, `,"schedule":`...)
	if r.Schedule == nil {
		b = append(b, "null"...)
	} else {
		b = appendJSONString(b, *r.Schedule)
	}
	b = append(b, `,"scheduled_for":`...)
	b = appendJSONTime(b, r.ScheduledFor)
	b = append(b, `,"trace_id":`...)
	b = appendJSONString(b, r.TraceID)
	b = append(b, `,"created_at":`...)
	b = appendJSONTime(b, &r.CreatedAt)
	b = append(b, `,"started_at":`...)
	b = appendJSONTime(b, r.StartedAt)
	b = append(b, `,"finished_at":`...)
	b = appendJSONTime(b, r.FinishedAt)
	b = append(b, `,"updated_at":`...)
	b = appendJSONTime(b, &r.UpdatedAt)
	return append(b, '}')
}

// writeRuns answers {"next_cursor": …, "runs": [...]} (the keys in encoding/json's order
// for a map), leaving next_cursor out when list is false (a batch's answer).
func writeRuns(w http.ResponseWriter, status int, runs []runRecord, list bool, nextCursor string) {
	b := make([]byte, 0, 512*len(runs)+64)
	b = append(b, '{')
	if list {
		b = append(b, `"next_cursor":`...)
		if nextCursor == "" {
			b = append(b, "null"...)
		} else {
			b = appendJSONString(b, nextCursor)
		}
		b = append(b, ',')
	}
	b = append(b, `"runs":[`...)
	for i := range runs {
		if i > 0 {
			b = append(b, ',')
		}
		b = runs[i].appendJSON(b)
	}
	b = append(b, "]}\n"...)
	writeBytes(w, status, b)
}

// writeRun answers one run.
func writeRun(w http.ResponseWriter, status int, r runRecord) {
	writeBytes(w, status, append(r.appendJSON(make([]byte, 0, 1024)), '\n'))
}

// writeBytes answers the JSON body b, with its length.
func writeBytes(w http.ResponseWriter, status int, b []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

// appendJSONTime appends t as time.Time's MarshalJSON does (RFC 3339 with nanoseconds),
// or null for nil.
func appendJSONTime(b []byte, t *time.Time) []byte {
	if t == nil {
		return append(b, "null"...)
	}
	b = append(b, '"')
	b = t.AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string, escaped as encoding/json escapes it by
// default: quotes, backslashes and control characters; <, > and & (for HTML); U+2028 and
// U+2029 (for JavaScript); invalid UTF-8 becomes U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// appendRawJSON appends the valid JSON value raw compacted, as encoding/json compacts a
// json.RawMessage: whitespace between tokens dropped; <, >, &, U+2028 and U+2029 inside
// strings escaped. Nil or empty is null.
func appendRawJSON(b []byte, raw []byte) []byte {
	if len(raw) == 0 {
		return append(b, "null"...)
	}
	inString, escaped := false, false
	start := 0
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if !inString {
			switch c {
			case ' ', '\t', '\n', '\r':
				b = append(b, raw[start:i]...)
				start = i + 1
			case '"':
				inString = true
			}
			continue
		}
		switch {
		case escaped:
			escaped = false
		case c == '\\':
			escaped = true
		case c == '"':
			inString = false
		case c == '<' || c == '>' || c == '&':
			b = append(b, raw[start:i]...)
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			start = i + 1
		case c == 0xe2 && i+2 < len(raw) && raw[i+1] == 0x80 && raw[i+2]&^1 == 0xa8:
			b = append(b, raw[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[raw[i+2]&0xf])
			i += 2
			start = i + 1
		}
	}
	return append(b, raw[start:]...)
}
