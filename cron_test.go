package main

import (
	"strings"
	"testing"
	"time"
)

// mustTime parses an RFC 3339 time for a test vector.
func mustTime(t *testing.T, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339, s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestCronNext holds next to vectors worked out by hand from calendars and the zones'
// 2026 transitions (Berlin: 29 March 02:00 → 03:00, 25 October 03:00 → 02:00; New York:
// 8 March 02:00 → 03:00, 1 November 02:00 → 01:00).
func TestCronNext(t *testing.T) {
	tests := []struct {
		name, cron, zone, after, want string
	}{
		{"step", "*/15 * * * *", "UTC", "2026-12-07T10:07:00Z", "2026-12-07T10:15:00Z"},
		{"range with step", "5-20/5 * * * *", "UTC", "2026-12-07T10:20:00Z", "2026-12-07T11:05:00Z"},
		{"value with step runs to the end", "50/5 * * * *", "UTC", "2026-12-07T10:56:00Z", "2026-12-07T11:50:00Z"},
		{"list", "0 8,17 * * *", "UTC", "2026-12-07T08:00:00Z", "2026-12-07T17:00:00Z"},
		{"weekday names", "0 9 * * mon-fri", "UTC", "2026-12-04T10:00:00Z", "2026-12-07T09:00:00Z"},
		{"month names", "0 12 * feb,MAR *", "UTC", "2026-03-31T12:00:00Z", "2027-02-01T12:00:00Z"},
		{"Sunday as 0", "0 0 * * 0", "UTC", "2026-12-07T00:00:00Z", "2026-12-13T00:00:00Z"},
		{"Sunday as 7", "0 0 * * 7", "UTC", "2026-12-07T00:00:00Z", "2026-12-13T00:00:00Z"},
		{"dom or dow: the weekday first", "0 0 13 * fri", "UTC", "2026-12-07T00:00:00Z", "2026-12-11T00:00:00Z"},
		{"dom or dow: then the day", "0 0 13 * fri", "UTC", "2026-12-11T00:00:00Z", "2026-12-13T00:00:00Z"},
		{"dom starred with a step: both", "0 0 */2 * mon", "UTC", "2026-12-07T00:00:00Z", "2026-12-21T00:00:00Z"},
		{"zone", "0 9 * * *", "America/New_York", "2026-12-07T12:00:00Z", "2026-12-07T14:00:00Z"},
		{"@hourly", "@hourly", "UTC", "2026-12-07T10:30:00Z", "2026-12-07T11:00:00Z"},
		{"@daily", "@daily", "UTC", "2026-12-07T10:30:00Z", "2026-12-08T00:00:00Z"},
		{"@weekly", "@weekly", "UTC", "2026-12-07T10:30:00Z", "2026-12-13T00:00:00Z"},
		{"@monthly", "@monthly", "UTC", "2026-12-07T10:30:00Z", "2027-01-01T00:00:00Z"},
		{"@yearly", "@yearly", "UTC", "2026-12-07T10:30:00Z", "2027-01-01T00:00:00Z"},
		{"@every from the epoch", "@every 90s", "UTC", "1970-01-01T00:01:40Z", "1970-01-01T00:03:00Z"},
		{"@every ignores the zone", "@every 1h", "Europe/Berlin", "2026-03-29T00:30:00Z", "2026-03-29T01:00:00Z"},
		{"leap day", "0 0 29 2 *", "UTC", "2026-12-07T00:00:00Z", "2028-02-29T00:00:00Z"},

		{"Berlin skipped time runs after the gap", "30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z"},
		{"Berlin the day after the gap", "30 2 * * *", "Europe/Berlin", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"},
		{"Berlin every minute across the gap", "* * * * *", "Europe/Berlin", "2026-03-29T00:59:00Z", "2026-03-29T01:00:00Z"},
		{"Berlin after the gap's instant", "* * * * *", "Europe/Berlin", "2026-03-29T01:00:00Z", "2026-03-29T01:01:00Z"},
		{"Berlin repeated hour: first occurrence", "30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", "2026-10-25T00:30:00Z"},
		{"Berlin repeated hour: once", "30 2 * * *", "Europe/Berlin", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"},
		{"Berlin repeated hour skipped the second time", "0,30 * * * *", "Europe/Berlin", "2026-10-25T00:30:00Z", "2026-10-25T02:00:00Z"},
		{"New York skipped time", "30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", "2026-03-08T07:00:00Z"},
		{"New York repeated hour: first occurrence", "30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", "2026-11-01T05:30:00Z"},
		{"New York repeated hour: once", "30 1 * * *", "America/New_York", "2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"},
		{"New York from inside the second pass", "*/20 * * * *", "America/New_York", "2026-11-01T06:10:00Z", "2026-11-01T07:00:00Z"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseCron(tt.cron)
			if err != nil {
				t.Fatalf("parseCron(%q): %v", tt.cron, err)
			}
			loc, err := time.LoadLocation(tt.zone)
			if err != nil {
				t.Fatal(err)
			}
			got := c.next(mustTime(t, tt.after), loc)
			if want := mustTime(t, tt.want); !got.Equal(want) {
				t.Errorf("next(%q in %s after %s) = %s; want %s", tt.cron, tt.zone, tt.after, got.Format(time.RFC3339), tt.want)
			}
		})
	}
}

// TestCronNeverDue: a cron no date matches has no next time.
func TestCronNeverDue(t *testing.T) {
	c, err := parseCron("0 0 30 2 *")
	if err != nil {
		t.Fatal(err)
	}
	if got := c.next(mustTime(t, "2026-01-01T00:00:00Z"), time.UTC); !got.IsZero() {
		t.Errorf("next = %s; want never (zero)", got)
	}
}

// TestCronErrors: each malformed cron is refused with a message saying what is wrong.
func TestCronErrors(t *testing.T) {
	tests := []struct{ cron, want string }{
		{"* * * *", "want five fields"},
		{"* * * * * *", "want five fields"},
		{"60 * * * *", "minute field"},
		{"* 24 * * *", "hour field"},
		{"* * 0 * *", "day-of-month field"},
		{"* * * 13 *", "month field"},
		{"* * * * 8", "day-of-week field"},
		{"* * * * mon-sun", "runs backwards"},
		{"*/0 * * * *", "step"},
		{"x * * * *", `"x" is not a number`},
		{"* * * foo *", "or a name such as jan"},
		{"@fortnightly", "is not one of"},
		{"@every 500ms", "out of range"},
		{"@every 745h", "out of range"},
		{"@every 2d", "Go duration"},
		{"", "want five fields"},
	}
	for _, tt := range tests {
		_, err := parseCron(tt.cron)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseCron(%q) = %v; want an error containing %q", tt.cron, err, tt.want)
		}
	}
}

// TestCronLatestDue: after a long time with no process up, the due time to fire is the
// latest one missed, found without walking them all.
func TestCronLatestDue(t *testing.T) {
	tests := []struct{ cron, from, now, want string }{
		{"@every 1s", "2026-12-07T10:00:00Z", "2026-12-07T10:00:10.5Z", "2026-12-07T10:00:10Z"},
		{"@every 1m", "2026-12-07T10:00:00Z", "2026-12-07T09:59:00Z", "2026-12-07T10:00:00Z"},
		{"* * * * *", "2025-01-01T00:00:00Z", "2026-06-01T00:00:30Z", "2026-06-01T00:00:00Z"},
		{"@hourly", "2025-01-01T00:00:00Z", "2026-06-01T05:59:59Z", "2026-06-01T05:00:00Z"},
		{"0 0 1 1 *", "2020-01-01T00:00:00Z", "2026-06-01T00:00:00Z", "2026-01-01T00:00:00Z"},
		{"0 12 * * *", "2026-06-01T12:00:00Z", "2026-06-01T12:00:00Z", "2026-06-01T12:00:00Z"},
	}
	for _, tt := range tests {
		c, err := parseCron(tt.cron)
		if err != nil {
			t.Fatal(err)
		}
		got := c.latestDue(mustTime(t, tt.from), mustTime(t, tt.now), time.UTC)
		if want := mustTime(t, tt.want); !got.Equal(want) {
			t.Errorf("latestDue(%q, from %s, now %s) = %s; want %s", tt.cron, tt.from, tt.now, got, tt.want)
		}
	}
}
