package main

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lib/pq"
)

// notifier holds the process's one LISTEN connection (apart from the pools) and turns
// notifications into wake-ups: of the worker for new runs, of executions to cancel, and
// of requests waiting for a run to become final. When the connection is down everyone
// falls back to polling.
type notifier struct {
	l         *pq.Listener
	log       *slog.Logger
	onRuns    func(origin string) // origin: the announcing worker's id, or "" (anyone may claim)
	onCancel  func(runID string)
	onDue     func() // schedules were made or changed: when the next falls due may be sooner
	listening atomic.Bool
	done      chan struct{}

	stopRefresh, refreshDone chan struct{}

	mu      sync.Mutex
	waiters map[string][]chan struct{} // run id → requests waiting for it to be final

	wmu      sync.Mutex
	watchers map[string]map[*watcher]bool // "run:" or "ws:" + id → open streams (events.go)

	// Run status changes are notified only while some process lists itself in
	// status_listeners (schema.sql): this one does before its first waiter or stream reads.
	db       *sql.DB
	id       string      // this process's row in status_listeners: its worker id
	umu      sync.Mutex  // held by use, release and the refresh
	users    int         // waiters and streams now
	lastUser time.Time   // when the last one ended
	listed   atomic.Bool // this process's row is in status_listeners
	failedAt time.Time   // when listing last failed; zero: it has not since it last worked
}

// statusListenerTTL is how long a process stays listed after its last waiter or stream
// ended, so that a steady trickle of ?wait_ms requests lists it once. A row not refreshed
// for workerStaleAfter (a process that ended without deleting it) is removed.
const statusListenerTTL = time.Minute

// notifyChannels are the channels schema.sql's triggers notify.
var notifyChannels = []string{"agentapp_runs", "agentapp_cancel", "agentapp_events", "agentapp_status", "agentapp_schedules"}

// newNotifier connects in the background; it never blocks start-up on the database. db
// and id serve its row in status_listeners.
func newNotifier(dsn string, db *sql.DB, id string, log *slog.Logger, onRuns func(origin string), onCancel func(string), onDue func()) *notifier {
	n := &notifier{log: log, onRuns: onRuns, onCancel: onCancel, onDue: onDue, done: make(chan struct{}),
		waiters: map[string][]chan struct{}{}, watchers: map[string]map[*watcher]bool{}, db: db, id: id,
		stopRefresh: make(chan struct{}), refreshDone: make(chan struct{})}
	n.l = pq.NewListener(dsn, 100*time.Millisecond, 5*time.Second, n.event)
	go n.run()
	go n.refresh()
	return n
}

// hears reports whether run status changes reach this process now: its LISTEN connection is
// up and it is listed. Waiters and streams poll otherwise.
func (n *notifier) hears() bool { return n.listening.Load() && n.listed.Load() }

// use counts a waiter or stream in; before it reads anything, this process is listed, so
// that every change committed after that read is notified. A failed listing leaves it
// polling (hears is false) until the refresh lists it.
func (n *notifier) use() {
	n.umu.Lock()
	defer n.umu.Unlock()
	n.users++
	if !n.listed.Load() && time.Since(n.failedAt) >= time.Second {
		n.list()
	}
}

// release counts a waiter or stream out.
func (n *notifier) release() {
	n.umu.Lock()
	defer n.umu.Unlock()
	n.users--
	n.lastUser = time.Now()
}

// list inserts this process's row into status_listeners (umu held). The claims and outcome
// writes that decided not to notify before the row was visible may still be committing: the
// lock waits for every write of runs in progress to end, so that a read after the listing
// sees what they wrote.
func (n *notifier) list() {
	ctx, cancel := context.WithTimeout(context.Background(), registryTimeout)
	defer cancel()
	err := func() error {
		tx, err := n.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, `INSERT INTO status_listeners (id) VALUES ($1)
			ON CONFLICT (id) DO UPDATE SET refreshed_at = now()`, n.id); err != nil {
			return err
		}
		// Bounded: writes of runs queue behind the lock while it waits (behind a session
		// left idle in a transaction, for one); past it, waiters poll and the listing is
		// tried again.
		if _, err := tx.ExecContext(ctx, `SET LOCAL lock_timeout = '200ms'`); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `LOCK TABLE runs IN SHARE MODE`); err != nil {
			return err
		}
		return tx.Commit()
	}()
	if err != nil {
		if n.failedAt.IsZero() {
			// An outage is logged by whoever meets it first; this only adds to it.
			level := slog.LevelWarn
			if isUnavailable(err) {
				level = slog.LevelDebug
			}
			n.log.Log(ctx, level, "could not ask for run status notifications; waiters and streams poll meanwhile", "err", err)
		}
		n.failedAt = time.Now()
		return
	}
	n.failedAt = time.Time{}
	n.listed.Store(true)
}

// refresh keeps this process's row while it has waiters or streams (and statusListenerTTL
// after), and deletes it afterwards; rows not refreshed for statusListenerTTL (a process
// that ended without deleting its own) are removed by every worker's heartbeat. A row
// found missing (removed while this process could not reach the database) is listed again,
// and everyone waiting re-reads: changes may have gone unnotified meanwhile.
func (n *notifier) refresh() {
	defer close(n.refreshDone)
	ticker := time.NewTicker(statusListenerTTL / 6)
	defer ticker.Stop()
	for {
		select {
		case <-n.stopRefresh:
			if n.listed.Load() {
				n.unlist()
			}
			return
		case <-ticker.C:
		}
		n.umu.Lock()
		wanted := n.users > 0 || time.Since(n.lastUser) < statusListenerTTL
		ctx, cancel := context.WithTimeout(context.Background(), registryTimeout)
		switch {
		case wanted && n.listed.Load():
			var kept bool
			err := n.db.QueryRowContext(ctx, `UPDATE status_listeners SET refreshed_at = now() WHERE id = $1 RETURNING true`,
				n.id).Scan(&kept)
			if errors.Is(err, sql.ErrNoRows) {
				n.listed.Store(false)
				n.list()
				n.wakeAll()
				n.pokeAll(true)
			}
		case wanted:
			n.list() // the listing at use failed
		case n.listed.Load():
			n.unlist()
		}
		cancel()
		n.umu.Unlock()
	}
}

// unlist deletes this process's row from status_listeners.
func (n *notifier) unlist() {
	ctx, cancel := context.WithTimeout(context.Background(), registryTimeout)
	defer cancel()
	if _, err := n.db.ExecContext(ctx, `DELETE FROM status_listeners WHERE id = $1`, n.id); err == nil {
		n.listed.Store(false)
	}
}

// event is called by the listener on connection changes; it must not block.
func (n *notifier) event(ev pq.ListenerEventType, err error) {
	switch ev {
	case pq.ListenerEventReconnected: // the listener has re-issued every LISTEN by now
		n.listening.Store(true)
		n.log.Info("listening for notifications")
	case pq.ListenerEventDisconnected:
		if n.listening.Swap(false) {
			n.log.Warn("notification connection lost; the worker polls until it is back", "err", err)
		}
	}
}

func (n *notifier) run() {
	defer close(n.done)
	for _, ch := range notifyChannels {
		if err := n.l.Listen(ch); err != nil && !errors.Is(err, pq.ErrChannelAlreadyOpen) {
			if !errors.Is(err, net.ErrClosed) {
				// LISTEN is refused (for example behind PgBouncer in transaction mode).
				n.log.Warn("LISTEN is unavailable; the worker polls instead", "channel", ch, "err", err)
				n.l.Close()
			}
			n.listening.Store(false)
			for range n.l.Notify {
			}
			return
		}
	}
	n.listening.Store(true)
	n.log.Info("listening for notifications")
	// Whatever was notified before LISTEN took effect went unheard, as after a reconnect.
	n.onRuns("")
	n.onDue()
	n.wakeAll()
	n.pokeAll(true)
	for msg := range n.l.Notify {
		if msg == nil {
			// Reconnected: notifications may have been missed meanwhile.
			n.onRuns("")
			n.onDue()
			n.wakeAll()
			n.pokeAll(true)
			continue
		}
		switch msg.Channel {
		case "agentapp_runs":
			n.onRuns(msg.Extra)
		case "agentapp_schedules":
			n.onDue()
		case "agentapp_cancel":
			for run := range strings.FieldsSeq(msg.Extra) {
				n.onCancel(run)
			}
		case "agentapp_events":
			run, _, _ := strings.Cut(msg.Extra, ":")
			n.signal("run:"+run, "")
		case "agentapp_status":
			n.statusChanged(msg.Extra)
		}
	}
}

// statusChanged tells waiters and streams of the runs in an agentapp_status payload:
// "workspace id:run id:status" entries separated by spaces.
func (n *notifier) statusChanged(payload string) {
	for entry := range strings.FieldsSeq(payload) {
		ws, rest, _ := strings.Cut(entry, ":")
		run, status, _ := strings.Cut(rest, ":")
		if runStatus(status).final() {
			n.mu.Lock()
			for _, ch := range n.waiters[run] {
				close(ch)
			}
			delete(n.waiters, run)
			n.mu.Unlock()
		}
		n.signal("run:"+run, "")
		n.signal("ws:"+ws, run)
	}
}

// subscribe returns a channel closed when the run may have become final (or when
// notifications were interrupted), and a function to call when no longer waiting.
func (n *notifier) subscribe(runID string) (<-chan struct{}, func()) {
	n.use()
	ch := make(chan struct{})
	n.mu.Lock()
	n.waiters[runID] = append(n.waiters[runID], ch)
	n.mu.Unlock()
	return ch, func() {
		defer n.release()
		n.mu.Lock()
		defer n.mu.Unlock()
		list := n.waiters[runID]
		for i, c := range list {
			if c == ch {
				list = append(list[:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(n.waiters, runID)
		} else {
			n.waiters[runID] = list
		}
	}
}

func (n *notifier) wakeAll() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for id, list := range n.waiters {
		for _, ch := range list {
			close(ch)
		}
		delete(n.waiters, id)
	}
}

// close stops listening, deletes this process's status_listeners row and wakes every waiter.
func (n *notifier) close() {
	n.l.Close()
	<-n.done
	close(n.stopRefresh)
	<-n.refreshDone
	n.listening.Store(false)
	n.wakeAll()
	n.pokeAll(false) // streams poll from now on
}

// watcher is an open stream's subscription to what the notifier hears about one run or
// one workspace. Unlike a waiter it lasts as long as the stream: wake holds at most one
// pending signal, so nothing heard between two reads of the stream is lost.
type watcher struct {
	wake chan struct{}
	mu   sync.Mutex
	runs map[string]bool // run ids whose status changed since take (workspace streams)
	lost bool            // more changed than runs holds; or notifications were interrupted
}

// maxWatchedRuns bounds what one workspace stream remembers between two reads: past it the
// stream learns that it lost track (a client that far behind re-lists the runs).
const maxWatchedRuns = 10000

// poke records run (if any; lost: changes went unheard) and signals the watcher, never
// blocking the notifier.
func (w *watcher) poke(run string, lost bool) {
	w.mu.Lock()
	w.lost = w.lost || lost
	switch {
	case run == "":
	case len(w.runs) < maxWatchedRuns:
		w.runs[run] = true
	default:
		w.lost = true
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// take returns the run ids recorded since the last take, and whether some were lost.
func (w *watcher) take() ([]string, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	ids := make([]string, 0, len(w.runs))
	for id := range w.runs {
		ids = append(ids, id)
	}
	clear(w.runs)
	lost := w.lost
	w.lost = false
	return ids, lost
}

// watch subscribes to key ("run:<id>" or "ws:<id>") until the returned function is called.
func (n *notifier) watch(key string) (*watcher, func()) {
	n.use()
	w := &watcher{wake: make(chan struct{}, 1), runs: map[string]bool{}}
	n.wmu.Lock()
	if n.watchers[key] == nil {
		n.watchers[key] = map[*watcher]bool{}
	}
	n.watchers[key][w] = true
	n.wmu.Unlock()
	return w, func() {
		defer n.release()
		n.wmu.Lock()
		defer n.wmu.Unlock()
		delete(n.watchers[key], w)
		if len(n.watchers[key]) == 0 {
			delete(n.watchers, key)
		}
	}
}

// signal pokes every watcher of key with run.
func (n *notifier) signal(key, run string) {
	n.wmu.Lock()
	defer n.wmu.Unlock()
	for w := range n.watchers[key] {
		w.poke(run, false)
	}
}

// pokeAll wakes every stream: after a reconnect (lost) to catch up, at close to poll.
func (n *notifier) pokeAll(lost bool) {
	n.wmu.Lock()
	defer n.wmu.Unlock()
	for _, set := range n.watchers {
		for w := range set {
			w.poke("", lost)
		}
	}
}
