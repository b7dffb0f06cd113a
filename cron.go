package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// cronSpec is a parsed schedule: five cron fields as bit sets, or a fixed interval
// (@every). Its due times are computed by next, in a time zone.
type cronSpec struct {
	minute, hour, dom, month, dow uint64 // bit n set: value n matches
	domStar, dowStar              bool   // the field began with "*": Vixie's rule for dom and dow
	every                         time.Duration
}

// The range of @every. Below a second the scheduler could not keep up with its own due
// times; above a month a calendar schedule says it better.
const (
	minEvery = time.Second
	maxEvery = 31 * 24 * time.Hour
)

// cronMacros are the @ names and the five fields each stands for.
var cronMacros = map[string]string{
	"@yearly":  "0 0 1 1 *",
	"@monthly": "0 0 1 * *",
	"@weekly":  "0 0 * * 0",
	"@daily":   "0 0 * * *",
	"@hourly":  "0 * * * *",
}

var monthNames = []string{"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"}
var dayNames = []string{"sun", "mon", "tue", "wed", "thu", "fri", "sat"}

// parseCron parses a schedule's cron: five fields (minute hour day-of-month month
// day-of-week), a macro such as @daily, or "@every D". Its errors say what is wrong.
func parseCron(s string) (*cronSpec, error) {
	s = strings.TrimSpace(s)
	if rest, ok := strings.CutPrefix(s, "@every "); ok {
		d, err := time.ParseDuration(strings.TrimSpace(rest))
		if err != nil {
			return nil, fmt.Errorf("@every wants a Go duration such as 90s or 1h30m, got %q", strings.TrimSpace(rest))
		}
		if d < minEvery || d > maxEvery {
			return nil, fmt.Errorf("@every %s is out of range: from 1s to 744h (31 days)", d)
		}
		return &cronSpec{every: d}, nil
	}
	if strings.HasPrefix(s, "@") {
		m, ok := cronMacros[strings.ToLower(s)]
		if !ok {
			return nil, fmt.Errorf("%q is not one of @hourly, @daily, @weekly, @monthly, @yearly, @every D", s)
		}
		s = m
	}
	f := strings.Fields(s)
	if len(f) != 5 {
		return nil, fmt.Errorf("want five fields (minute hour day-of-month month day-of-week), got %d", len(f))
	}
	c := &cronSpec{domStar: strings.HasPrefix(f[2], "*"), dowStar: strings.HasPrefix(f[4], "*")}
	var err error
	fields := []struct {
		dst     *uint64
		name    string
		lo, hi  int
		names   []string
		nameLow int
	}{
		{&c.minute, "minute", 0, 59, nil, 0},
		{&c.hour, "hour", 0, 23, nil, 0},
		{&c.dom, "day-of-month", 1, 31, nil, 0},
		{&c.month, "month", 1, 12, monthNames, 1},
		{&c.dow, "day-of-week", 0, 7, dayNames, 0},
	}
	for i, fd := range fields {
		if *fd.dst, err = parseCronField(f[i], fd.lo, fd.hi, fd.names, fd.nameLow); err != nil {
			return nil, fmt.Errorf("%s field %q: %v", fd.name, f[i], err)
		}
	}
	if c.dow&(1<<7) != 0 { // Sunday as 7
		c.dow |= 1
	}
	return c, nil
}

// parseCronField parses one comma-separated field whose values lie in lo … hi; names
// (if any) spell the values from nameLow on.
func parseCronField(field string, lo, hi int, names []string, nameLow int) (uint64, error) {
	var bits uint64
	for _, part := range strings.Split(field, ",") {
		rng, stepText, hasStep := strings.Cut(part, "/")
		step := 1
		if hasStep {
			n, err := strconv.Atoi(stepText)
			if err != nil || n < 1 || n > hi-lo+1 {
				return 0, fmt.Errorf("step %q must be a number from 1 to %d", stepText, hi-lo+1)
			}
			step = n
		}
		var a, b int
		switch {
		case rng == "*":
			a, b = lo, hi
		default:
			first, last, isRange := strings.Cut(rng, "-")
			var err error
			if a, err = cronValue(first, lo, hi, names, nameLow); err != nil {
				return 0, err
			}
			b = a
			if isRange {
				if b, err = cronValue(last, lo, hi, names, nameLow); err != nil {
					return 0, err
				}
				if b < a {
					return 0, fmt.Errorf("range %s runs backwards", rng)
				}
			} else if hasStep {
				b = hi // "a/n": from a to the end, as Vixie cron reads it
			}
		}
		for v := a; v <= b; v += step {
			bits |= 1 << v
		}
	}
	return bits, nil
}

// cronValue parses one value of a field: a number in lo … hi or a name.
func cronValue(s string, lo, hi int, names []string, nameLow int) (int, error) {
	for i, n := range names {
		if strings.EqualFold(s, n) {
			return i + nameLow, nil
		}
	}
	v, err := strconv.Atoi(s)
	if err != nil {
		if names != nil {
			return 0, fmt.Errorf("%q is not a number from %d to %d or a name such as %s", s, lo, hi, names[0])
		}
		return 0, fmt.Errorf("%q is not a number from %d to %d", s, lo, hi)
	}
	if v < lo || v > hi {
		return 0, fmt.Errorf("%d is out of range %d to %d", v, lo, hi)
	}
	return v, nil
}

// cronHorizon is how far ahead next looks for a due time: a leap day on a given weekday
// can be years away (0 0 29 2 1), one past this never comes.
const cronHorizon = 30 * 366

// errNeverDue is a cron whose fields no date matches (0 0 30 2 *).
var errNeverDue = errors.New("no date matches it: it would never fall due")

// next is the first due time strictly after t, in loc. A cron time that a daylight-saving
// change skips falls due at the first instant after the gap; a wall time that occurs twice
// (the clocks go back) falls due once, at its first occurrence. @every falls due at the
// multiples of its interval since the Unix epoch. The zero time: never.
func (c *cronSpec) next(t time.Time, loc *time.Location) time.Time {
	if c.every > 0 {
		n := t.UnixNano() / int64(c.every)
		return time.Unix(0, (n+1)*int64(c.every)).UTC()
	}
	lt := t.In(loc)
	y, mo, d := lt.Date()
	for i := 0; i < cronHorizon; i++ {
		day := time.Date(y, mo, d+i, 12, 0, 0, 0, time.UTC) // noon UTC: only the date counts
		if !c.matchDay(day) {
			continue
		}
		for h := 0; h < 24; h++ {
			if c.hour&(1<<h) == 0 || (i == 0 && h < lt.Hour()) {
				continue
			}
			for m := 0; m < 60; m++ {
				if c.minute&(1<<m) == 0 {
					continue
				}
				if at := wallInstant(day.Year(), day.Month(), day.Day(), h, m, loc); at.After(t) {
					return at.UTC()
				}
			}
		}
	}
	return time.Time{}
}

// matchDay reports whether the date of day matches the month, day-of-month and
// day-of-week fields; when neither of the last two begins with "*", either may match.
func (c *cronSpec) matchDay(day time.Time) bool {
	if c.month&(1<<int(day.Month())) == 0 {
		return false
	}
	dom := c.dom&(1<<day.Day()) != 0
	dow := c.dow&(1<<int(day.Weekday())) != 0
	switch {
	case c.domStar || c.dowStar:
		return dom && dow
	default:
		return dom || dow
	}
}

// wallInstant is the first instant at which loc's clocks read y-mo-d h:m, or, when they
// skip that time, the first instant after the skip.
func wallInstant(y int, mo time.Month, d, h, m int, loc *time.Location) time.Time {
	t := time.Date(y, mo, d, h, m, 0, 0, loc)
	want := time.Date(y, mo, d, h, m, 0, 0, time.UTC)
	got := time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), 0, 0, time.UTC)
	if !got.Equal(want) {
		// In a gap: Go gave the instant with the offset of one side of it.
		start, end := t.ZoneBounds()
		if got.After(want) {
			return start
		}
		return end
	}
	// A repeated wall time: the earlier occurrence is the same reading under the offset
	// in effect before t's zone began, if that reading falls before the zone's start.
	start, _ := t.ZoneBounds()
	if start.IsZero() {
		return t
	}
	_, before := start.Add(-time.Nanosecond).Zone()
	_, now := t.Zone()
	if before > now {
		if earlier := t.Add(-time.Duration(before-now) * time.Second); earlier.Before(start) {
			return earlier
		}
	}
	return t
}

// latestDue is the latest due time of c in loc that is at or before now and not before
// from, or from itself when none after it is (from being a due time). After a long time
// with no process up, it finds the due time to fire without walking every one missed.
func (c *cronSpec) latestDue(from, now time.Time, loc *time.Location) time.Time {
	if c.every > 0 {
		if n := now.UnixNano() / int64(c.every) * int64(c.every); n > from.UnixNano() {
			return time.Unix(0, n).UTC()
		}
		return from
	}
	t := from
	for _, back := range []time.Duration{2 * time.Hour, 64 * 24 * time.Hour} {
		if start := now.Add(-back); start.After(t) {
			if n := c.next(start, loc); !n.IsZero() && !n.After(now) {
				t = n
				break
			}
		}
	}
	for {
		n := c.next(t, loc)
		if n.IsZero() || n.After(now) {
			return t
		}
		t = n
	}
}
