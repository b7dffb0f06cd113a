package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Causes with which a run's execution context is canceled.
var (
	errCanceledByRequest = errors.New("canceled by request")
	errShutdown          = errors.New("worker shutting down")
	errLeaseLost         = errors.New("lease lost to another worker")
)

// workerConfig is the part of config the worker uses.
type workerConfig struct {
	Poll            time.Duration
	BatchLimit      int
	WorkspaceID     string
	Concurrency     int
	Lease           time.Duration
	ShutdownTimeout time.Duration
	WebhookHosts    []string
}

func workerConfigOf(c config) workerConfig {
	return workerConfig{Poll: c.PollInterval, BatchLimit: c.BatchLimit, WorkspaceID: c.WorkspaceID,
		Concurrency: c.Concurrency, Lease: c.Lease, ShutdownTimeout: c.ShutdownTimeout, WebhookHosts: c.WebhookHosts}
}

// summary is what one cycle did. Claimed runs are counted by how their attempt ended:
// retried means back to queued for another attempt, requeued means handed back at
// shutdown with the attempt refunded, lost means another worker took the lease over.
type summary struct {
	Claimed   int  `json:"claimed"`
	Succeeded int  `json:"succeeded"`
	Failed    int  `json:"failed"`
	Retried   int  `json:"retried"`
	Canceled  int  `json:"canceled"`
	Recovered int  `json:"recovered"`
	Requeued  int  `json:"requeued"`
	Lost      int  `json:"lost"`
	Skipped   bool `json:"skipped"` // another cycle was in progress in this process
}

// execution is one attempt executing in this process.
type execution struct {
	ref    attemptRef
	cancel context.CancelCauseFunc
	result chan string // the status its outcome was written as; "" if it was not this worker's to write
}

// pendingOutcome waits in the completer's queue to be written.
type pendingOutcome struct {
	outcome
	result chan string
}

// worker claims and executes runs. One worker serves a process: its cycle is the only
// execution path, whether triggered by its loop, the worker API or `agentapp worker -once`.
type worker struct {
	st      *store
	log     *slog.Logger
	id      string
	cfg     workerConfig
	client  *http.Client
	metrics *metrics

	cycleMu sync.Mutex    // held by the cycle in progress; TryLock so cycles never overlap
	wake    chan struct{} // asks the loop for a cycle now (a new run, a free slot)
	more    atomic.Bool   // the last claim filled its quota: more runs may be waiting

	mu        sync.Mutex
	executing map[string]*execution // by run id
	stopping  bool

	runsCtx    context.Context // parent of every execution; canceled at the drain deadline
	cancelRuns context.CancelCauseFunc
	runs       sync.WaitGroup
	outcomes   chan pendingOutcome

	lastCycle    atomic.Int64 // unix nanoseconds of the last cycle that reached the database
	lastRecovery atomic.Int64 // unix nanoseconds of the last cycle that recovered leases
	stopOnce     sync.Once
	stop         chan struct{} // closed to stop the loop and claiming
	done         chan struct{} // closed when the loop, every run and every outcome write are done
	loopDone     chan struct{}
	loopActive   atomic.Bool
}

// newWorker starts a worker's background parts (the outcome writer and the lease
// renewer); runLoop adds the polling loop. shutdown stops it all.
func newWorker(st *store, log *slog.Logger, cfg workerConfig, m *metrics) *worker {
	b := make([]byte, 4)
	rand.Read(b)
	host, _ := os.Hostname()
	w := &worker{
		st: st, log: log, cfg: cfg, metrics: m,
		id:        fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b)),
		client:    newWebhookClient(),
		wake:      make(chan struct{}, 1),
		executing: map[string]*execution{},
		outcomes:  make(chan pendingOutcome, 1024),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
		loopDone:  make(chan struct{}),
	}
	w.runsCtx, w.cancelRuns = context.WithCancelCause(context.Background())
	completerDone := make(chan struct{})
	go w.completer(completerDone)
	renewerStop := make(chan struct{})
	go w.renewer(renewerStop)
	go func() {
		<-w.stop
		if w.loopActive.Load() {
			<-w.loopDone
		}
		w.drain()
		close(w.outcomes)
		<-completerDone
		close(renewerStop)
		w.log.Info("worker stopped", "worker", w.id)
		close(w.done)
	}()
	return w
}

// wakeUp asks the loop for a cycle as soon as the current one (if any) ends.
func (w *worker) wakeUp() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// cycle is the one execution path: it recovers expired leases, claims up to
// min(limit, free slots) queued runs of workspace ws ("" for all) and starts executing
// them. It does not wait for them: each execution's result channel says how it ended.
func (w *worker) cycle(ctx context.Context, limit int, ws string) (summary, []*execution, error) {
	if !w.cycleMu.TryLock() {
		w.metrics.cycles.inc("skipped")
		return summary{Skipped: true}, nil, nil
	}
	defer w.cycleMu.Unlock()
	w.mu.Lock()
	n := min(limit, w.cfg.Concurrency-len(w.executing))
	stopping := w.stopping
	w.mu.Unlock()
	if stopping {
		w.metrics.cycles.inc("skipped")
		return summary{Skipped: true}, nil, nil
	}

	start := time.Now()
	// Recovery rides along at most every half poll interval: on every tick of an idle
	// worker, now and then for a busy one.
	recoverLeases := time.Since(time.Unix(0, w.lastRecovery.Load())) >= w.cfg.Poll/2
	// The claim is not canceled with ctx (a client that left, a shutdown): canceled after
	// its commit, it would leave claimed runs that nobody executes until their leases expire.
	claimCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.Lease)
	defer cancel()
	claimed, requeued, failed, err := w.st.claim(claimCtx, w.id, n, ws, w.cfg.Lease, recoverLeases)
	if err != nil {
		w.metrics.cycles.inc("error")
		return summary{}, nil, err
	}
	w.metrics.claimDuration.observe(time.Since(start).Seconds())
	w.metrics.cycles.inc("run")
	w.lastCycle.Store(time.Now().UnixNano())
	if recoverLeases {
		w.lastRecovery.Store(start.UnixNano())
	}
	w.more.Store(len(claimed) == n)
	if requeued+failed > 0 {
		w.metrics.recovered.add(float64(requeued + failed))
		w.log.Warn("recovered runs whose lease expired", "requeued", requeued, "failed", failed)
	}

	execs := make([]*execution, len(claimed))
	w.mu.Lock()
	for i, c := range claimed {
		ctx, cancel := context.WithCancelCause(w.runsCtx)
		e := &execution{ref: attemptRef{c.ID, c.Attempt}, cancel: cancel, result: make(chan string, 1)}
		w.executing[c.ID] = e
		execs[i] = e
		w.runs.Add(1)
		go w.execute(ctx, c, e)
	}
	w.metrics.executing.set(float64(len(w.executing)))
	w.mu.Unlock()
	return summary{Claimed: len(claimed), Recovered: requeued + failed}, execs, nil
}

// process runs one cycle and waits until the runs it claimed have ended and their
// outcomes are written: the worker API and `agentapp worker -once`.
func (w *worker) process(ctx context.Context, limit int, ws string) (summary, error) {
	s, execs, err := w.cycle(ctx, limit, ws)
	if err != nil {
		return s, err
	}
	for _, e := range execs {
		switch <-e.result {
		case "succeeded":
			s.Succeeded++
		case "failed":
			s.Failed++
		case "canceled":
			s.Canceled++
		case "queued":
			s.Retried++
		case "requeued":
			s.Requeued++
		default:
			s.Lost++
		}
	}
	return s, nil
}

// startLoop starts the loop: cycles until shutdown, at once when woken (a new run was
// notified, or a slot freed while runs wait), otherwise every poll interval. Database
// errors never end it: it logs the outage once and keeps trying at the poll interval.
func (w *worker) startLoop() {
	w.loopActive.Store(true) // before shutdown can look: it waits for the loop to end
	go w.runLoop()
}

// runLoop is the loop that startLoop starts.
func (w *worker) runLoop() {
	defer close(w.loopDone)
	ticker := time.NewTicker(w.cfg.Poll)
	defer ticker.Stop()
	w.log.Info("worker started", "worker", w.id, "concurrency", w.cfg.Concurrency,
		"batch_limit", w.cfg.BatchLimit, "poll", w.cfg.Poll, "workspace", w.cfg.WorkspaceID)
	down := false
	for {
		s, _, err := w.cycle(context.Background(), w.cfg.BatchLimit, w.cfg.WorkspaceID)
		switch {
		case err != nil && !down:
			down = true
			w.log.Error("worker cycle failed; retrying every poll interval", "err", err)
		case err == nil && down:
			down = false
			w.log.Info("worker cycle succeeded again; database is back")
		case s.Claimed > 0:
			w.log.Debug("worker cycle", "claimed", s.Claimed, "recovered", s.Recovered)
		}
		select {
		case <-w.stop:
			return
		case <-w.wake:
			// An ending execution wakes us as the first of its batch ends: yield once,
			// so that the others, ending at the same instant, free their slots too and
			// the claim fills them all in one transaction, not one or two at a time.
			runtime.Gosched()
		case <-ticker.C:
		}
	}
}

// alive reports whether the loop has completed a cycle recently (several poll intervals).
func (w *worker) alive() (bool, time.Time) {
	last := time.Unix(0, w.lastCycle.Load())
	return time.Since(last) < 3*w.cfg.Poll+2*time.Second, last
}

// executingCount is the number of runs executing now.
func (w *worker) executingCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.executing)
}

// execute runs one attempt and queues its outcome for the completer.
func (w *worker) execute(ctx context.Context, c claimedRun, e *execution) {
	defer w.runs.Done()
	w.log.Debug("run claimed", "run", c.ID, "attempt", c.Attempt, "agent", c.AgentName)
	start := time.Now()
	output, err := runAgent(ctx, w.client, w.cfg.WebhookHosts, c)
	w.metrics.runDuration.observe(time.Since(start).Seconds())
	out := outcome{attemptRef: e.ref, Kind: "succeeded", Output: output}
	cause := context.Cause(ctx)
	switch {
	case err == nil:
	case ctx.Err() != nil && errors.Is(cause, errCanceledByRequest):
		out.Kind = "canceled"
	case ctx.Err() != nil && errors.Is(cause, errShutdown):
		out.Kind = "requeue"
	case ctx.Err() != nil && errors.Is(cause, errLeaseLost):
		out.Kind = ""
	default:
		out.Kind, out.Message = "failed", err.Error()
	}

	w.mu.Lock()
	delete(w.executing, c.ID)
	w.metrics.executing.set(float64(len(w.executing)))
	w.mu.Unlock()
	e.cancel(nil)
	if w.more.Load() {
		w.wakeUp() // a slot is free and runs may be waiting: claim now, not at the next tick
	}
	if out.Kind == "" {
		w.log.Warn("run abandoned: another worker took its lease over", "run", c.ID, "attempt", c.Attempt)
		e.result <- ""
		return
	}
	w.outcomes <- pendingOutcome{out, e.result}
}

// completer writes outcomes. It writes whatever has queued up while the previous write
// was in flight in one statement: no added latency when the queue is quiet, few
// transactions when it is busy.
func (w *worker) completer(done chan struct{}) {
	defer close(done)
	const maxBatch = 1000
	for p := range w.outcomes {
		batch := []pendingOutcome{p}
	fill:
		for len(batch) < maxBatch {
			select {
			case p, ok := <-w.outcomes:
				if !ok {
					break fill
				}
				batch = append(batch, p)
			default:
				break fill
			}
		}
		w.writeOutcomes(batch)
	}
}

// writeOutcomes records a batch, retrying through a database outage for as long as the
// leases could still be ours: past that, another worker has recovered the runs.
func (w *worker) writeOutcomes(batch []pendingOutcome) {
	outs := make([]outcome, len(batch))
	for i, p := range batch {
		outs[i] = p.outcome
	}
	giveUp := time.Now().Add(w.cfg.Lease)
	backoff := 100 * time.Millisecond
	var statuses map[string]string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var err error
		statuses, err = w.st.finish(ctx, w.id, outs)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(giveUp) {
			w.log.Error("giving up writing run outcomes; their leases have expired and other workers will recover them",
				"runs", len(batch), "err", err)
			break
		}
		w.log.Warn("writing run outcomes failed; retrying", "runs", len(batch), "err", err, "retry_in", backoff)
		time.Sleep(backoff)
		backoff = min(2*backoff, 5*time.Second)
	}
	for _, p := range batch {
		status, ok := statuses[p.ID]
		switch {
		case !ok:
			w.log.Warn("run outcome discarded: the attempt is no longer this worker's", "run", p.ID, "attempt", p.Attempt)
		case p.Kind == "requeue":
			status = "requeued"
			w.metrics.requeued.add(1)
			w.log.Info("run requeued at shutdown", "run", p.ID, "attempt", p.Attempt)
		case status == "succeeded":
			w.log.Debug("run succeeded", "run", p.ID, "attempt", p.Attempt)
		case status == "queued":
			w.log.Info("run attempt failed; will retry", "run", p.ID, "attempt", p.Attempt, "error", p.Message)
		default:
			w.log.Info("run finished", "run", p.ID, "attempt", p.Attempt, "status", status, "error", p.Message)
		}
		if ok {
			w.metrics.outcomes.inc(status)
		}
		p.result <- status
	}
}

// renewer extends the leases of the runs executing here, a third of a lease apart, and
// cancels those whose cancel was requested or whose lease was lost. An idle worker
// sends nothing.
func (w *worker) renewer(stop chan struct{}) {
	ticker := time.NewTicker(w.cfg.Lease / 3)
	defer ticker.Stop()
	for {
		select {
		case <-stop:
			return
		case <-ticker.C:
		}
		w.mu.Lock()
		refs := make([]attemptRef, 0, len(w.executing))
		for _, e := range w.executing {
			refs = append(refs, e.ref)
		}
		w.mu.Unlock()
		if len(refs) == 0 {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.cfg.Lease/3)
		held, err := w.st.renew(ctx, w.id, refs, w.cfg.Lease)
		cancel()
		if err != nil {
			w.log.Warn("renewing leases failed", "runs", len(refs), "err", err)
			continue
		}
		w.mu.Lock()
		for _, ref := range refs {
			e := w.executing[ref.ID]
			if e == nil || e.ref != ref {
				continue
			}
			if cancelRequested, ok := held[ref]; !ok {
				e.cancel(errLeaseLost)
			} else if cancelRequested {
				e.cancel(errCanceledByRequest)
			}
		}
		w.mu.Unlock()
	}
}

// cancelLocal cancels the run if it executes in this process.
func (w *worker) cancelLocal(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if e := w.executing[id]; e != nil {
		e.cancel(errCanceledByRequest)
	}
}

// shutdown stops claiming, lets executing runs finish until the drain deadline, then
// cancels the rest, which go back to queued with their attempt refunded. It only
// signals; done is closed when everything has stopped.
func (w *worker) shutdown() {
	w.stopOnce.Do(func() {
		w.log.Info("worker stopping", "worker", w.id, "executing", w.executingCount(), "drain_timeout", w.cfg.ShutdownTimeout)
		w.mu.Lock()
		w.stopping = true
		w.mu.Unlock()
		close(w.stop)
	})
}

// drain waits for executing runs up to the shutdown timeout, then cancels them.
func (w *worker) drain() {
	// Wait out a cycle in progress; with stopping set no later cycle starts a run, so
	// nothing is added to w.runs once we wait on it.
	w.cycleMu.Lock()
	defer w.cycleMu.Unlock()
	finished := make(chan struct{})
	go func() {
		w.runs.Wait()
		close(finished)
	}()
	timer := time.NewTimer(w.cfg.ShutdownTimeout)
	defer timer.Stop()
	select {
	case <-finished:
		return
	case <-timer.C:
	}
	w.log.Warn("drain deadline reached; requeueing the runs still executing", "runs", w.executingCount())
	w.cancelRuns(errShutdown)
	<-finished
}
