package main

import (
	"errors"
	"log/slog"
	"net"
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
	onRuns    func()
	onCancel  func(runID string)
	listening atomic.Bool
	done      chan struct{}

	mu      sync.Mutex
	waiters map[string][]chan struct{} // run id → requests waiting for it to be final
}

// notifyChannels are the channels schema.sql's triggers notify.
var notifyChannels = []string{"agentapp_runs", "agentapp_cancel", "agentapp_final"}

// newNotifier connects in the background; it never blocks start-up on the database.
func newNotifier(dsn string, log *slog.Logger, onRuns func(), onCancel func(string)) *notifier {
	n := &notifier{log: log, onRuns: onRuns, onCancel: onCancel, done: make(chan struct{}),
		waiters: map[string][]chan struct{}{}}
	n.l = pq.NewListener(dsn, 100*time.Millisecond, 5*time.Second, n.event)
	go n.run()
	return n
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
	n.onRuns()
	n.wakeAll()
	for msg := range n.l.Notify {
		if msg == nil {
			// Reconnected: notifications may have been missed meanwhile.
			n.onRuns()
			n.wakeAll()
			continue
		}
		switch msg.Channel {
		case "agentapp_runs":
			n.onRuns()
		case "agentapp_cancel":
			n.onCancel(msg.Extra)
		case "agentapp_final":
			n.mu.Lock()
			for _, ch := range n.waiters[msg.Extra] {
				close(ch)
			}
			delete(n.waiters, msg.Extra)
			n.mu.Unlock()
		}
	}
}

// subscribe returns a channel closed when the run may have become final (or when
// notifications were interrupted), and a function to call when no longer waiting.
func (n *notifier) subscribe(runID string) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	n.mu.Lock()
	n.waiters[runID] = append(n.waiters[runID], ch)
	n.mu.Unlock()
	return ch, func() {
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

// close stops listening and wakes every waiter.
func (n *notifier) close() {
	n.l.Close()
	<-n.done
	n.listening.Store(false)
	n.wakeAll()
}
