package main

import (
	"sync"
	"time"
)

// logLimiter lets a repeated log line through at most once per interval per key and
// counts the ones it held back, so a flood of the same failure costs one line a second
// while the count still tells how bad it was.
type logLimiter struct {
	interval time.Duration
	mu       sync.Mutex
	keys     map[string]*logKey
}

// logKey is what logLimiter remembers of one key.
type logKey struct {
	last       time.Time // when a line for the key was last let through
	suppressed int       // lines held back since
}

// logLimiterMaxKeys bounds the keys remembered (client addresses, say): past it, keys
// quiet for an interval are forgotten.
const logLimiterMaxKeys = 10000

// newLogLimiter returns a limiter that lets one line per interval through for each key.
func newLogLimiter(interval time.Duration) *logLimiter {
	return &logLimiter{interval: interval, keys: map[string]*logKey{}}
}

// allow reports whether a line for key may be logged now and, when it may, how many
// lines for key were held back since the last one let through.
func (l *logLimiter) allow(key string) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	k := l.keys[key]
	if k == nil {
		if len(l.keys) >= logLimiterMaxKeys {
			for key, k := range l.keys {
				if now.Sub(k.last) >= l.interval {
					delete(l.keys, key)
				}
			}
		}
		l.keys[key] = &logKey{last: now}
		return true, 0
	}
	if now.Sub(k.last) < l.interval {
		k.suppressed++
		return false, 0
	}
	suppressed = k.suppressed
	k.last, k.suppressed = now, 0
	return true, suppressed
}
