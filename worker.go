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
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Causes with which a run's execution context is canceled.
var (
	errCanceledByRequest = errors.New("canceled by request")
	errShutdown          = errors.New("worker shutting down")
	errLeaseLost         = errors.New("lease lost to another worker")
	errTimedOut          = errors.New("timed out")
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
	Retention       time.Duration // 0: final runs are kept forever
	Mode            processMode   // how the process runs, for the workers table (see as)
	Version         string        // "": buildVersion()
	Heartbeat       time.Duration // 0: heartbeatInterval
}

// workerConfigOf takes the worker's part of the configuration.
func workerConfigOf(c config) workerConfig {
	return workerConfig{Poll: c.PollInterval, BatchLimit: c.BatchLimit, WorkspaceID: c.WorkspaceID,
		Concurrency: c.Concurrency, Lease: c.Lease, ShutdownTimeout: c.ShutdownTimeout, WebhookHosts: c.WebhookHosts,
		Retention: c.Retention}
}

// attemptEnd is how one attempt of a run ended, as recorded. An execution proposes
// succeeded, failed, canceled, requeued or lost; the outcome writer records it and reports
// what the run became (a failed attempt with attempts left is retried; a cancel requested
// meanwhile wins over any outcome).
type attemptEnd string

const (
	endSucceeded  attemptEnd = "succeeded"   // the agent's output was recorded
	endFailed     attemptEnd = "failed"      // the agent failed and no attempt remains
	endRetried    attemptEnd = "retried"     // the agent failed; the run is queued again after a backoff
	endCanceled   attemptEnd = "canceled"    // a cancel was requested: the run is canceled
	endRequeued   attemptEnd = "requeued"    // the worker shut down: queued again, the attempt refunded
	endPushedBack attemptEnd = "pushed_back" // the webhook said Retry-After: queued again, the attempt refunded
	endWaiting    attemptEnd = "waiting"     // the webhook answered 202: the step ended, the run waits
	endLost       attemptEnd = "lost"        // another worker took the lease over: nothing was written
)

// summary is what one cycle did: the runs it claimed, counted by how their attempts ended,
// and the expired leases it recovered.
type summary struct {
	Claimed    int  `json:"claimed"`
	Succeeded  int  `json:"succeeded"`
	Failed     int  `json:"failed"`
	Retried    int  `json:"retried"`
	Canceled   int  `json:"canceled"`
	Recovered  int  `json:"recovered"`
	Requeued   int  `json:"requeued"`
	PushedBack int  `json:"pushed_back"`
	Lost       int  `json:"lost"`
	Skipped    bool `json:"skipped"` // another cycle was in progress in this process, or it is stopping
}

// count adds one claimed run's end to the summary.
func (s *summary) count(e attemptEnd) {
	switch e {
	case endSucceeded:
		s.Succeeded++
	case endFailed:
		s.Failed++
	case endRetried:
		s.Retried++
	case endCanceled:
		s.Canceled++
	case endRequeued:
		s.Requeued++
	case endPushedBack:
		s.PushedBack++
	case endLost:
		s.Lost++
	}
}

// execution is one attempt executing in this process. Only run's loop registers it,
// cancels it and forgets it.
type execution struct {
	run    claimedRun
	ref    attemptRef
	cancel context.CancelCauseFunc // set by run's loop when it starts the execution
	result chan attemptEnd         // how the attempt ended, once recorded (buffered: never blocks)
}

// cancelOrder asks run's loop to cancel an execution: any attempt of the run when attempt
// is 0, else only that attempt.
type cancelOrder struct {
	id      string
	attempt int
	cause   error
}

// pendingOutcome waits in the outcome writer's queue to be written.
type pendingOutcome struct {
	outcome
	exec *execution
}

// worker claims and executes runs. One worker serves a process: its cycle is the only
// execution path, whether triggered by its loop, the worker API or `agentapp worker -once`.
// Its run method owns everything it starts.
type worker struct {
	st      *store
	log     *slog.Logger
	id      string
	cfg     workerConfig
	client  *http.Client
	metrics *metrics

	cycleMu  sync.Mutex    // held by the cycle in progress; TryLock so cycles never overlap
	line     *lineup       // what the claims know of the queue (queue.go)
	wake     chan struct{} // asks the loop for a cycle now (a run became claimable)
	due      chan struct{} // asks the scheduler to read when the next schedule falls due
	more     atomic.Bool   // the last claim filled its slots, or met capped agents: more may be claimable
	nextDue  atomic.Int64  // unix nanoseconds when the next scheduled run falls due; 0: unknown
	active   atomic.Int64  // slots taken: reserved by a cycle, freed by run's loop
	stopping atomic.Bool   // run's context is done: cycles claim nothing more

	lastCycle    atomic.Int64 // unix nanoseconds of the last cycle that reached the database
	lastRecovery atomic.Int64 // unix nanoseconds of the last cycle that recovered leases

	// Channels into run's loop, the only owner of the executing set.
	started  chan []*execution      // a cycle outside the loop hands over what it claimed
	ended    chan *execution        // an execution reports that its agent returned
	cancels  chan cancelOrder       // notifications, the API and the renewer cancel executions
	snapshot chan chan []attemptRef // the renewer asks which attempts execute

	outcomes chan pendingOutcome // executions → the outcome writer; closed by run at the end
	done     chan struct{}       // closed when run has returned
}

// newWorker returns a worker; nothing runs until its run method is called.
func newWorker(st *store, log *slog.Logger, cfg workerConfig, m *metrics) *worker {
	b := make([]byte, 4)
	rand.Read(b)
	host, _ := os.Hostname()
	return &worker{
		st: st, log: log, cfg: cfg, metrics: m,
		id:       fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b)),
		client:   newWebhookClient(),
		line:     newLineup(),
		wake:     make(chan struct{}, 1),
		due:      make(chan struct{}, 1),
		started:  make(chan []*execution),
		ended:    make(chan *execution, cfg.Concurrency),
		cancels:  make(chan cancelOrder),
		snapshot: make(chan chan []attemptRef),
		outcomes: make(chan pendingOutcome, 1024),
		done:     make(chan struct{}),
	}
}

// run is the worker's life. It starts the outcome writer and the lease renewer, and with
// loop it claims runs itself: at once when woken (a run became claimable, a slot freed while
// runs wait), otherwise every poll interval. Without loop it only executes what the worker
// API's cycles claim. Two stops, one after the other: when ctx ends nothing more is claimed
// and executing runs may finish for up to the shutdown timeout; then their contexts are
// canceled and they go back to queued with their attempt refunded. run returns once every
// execution has ended and every outcome is written.
func (w *worker) run(ctx context.Context, loop bool) error {
	defer close(w.done)
	// workCtx is the parent of every execution: it outlives ctx by the drain.
	workCtx, cancelWork := context.WithCancelCause(context.Background())
	defer cancelWork(nil)
	writerDone := make(chan struct{})
	go w.writeOutcomes(writerDone)
	renewCtx, stopRenewer := context.WithCancel(context.Background())
	renewerDone := make(chan struct{})
	go w.renewLeases(renewCtx, renewerDone)
	// The pruner stops with ctx: it never holds up the drain.
	prunerDone := make(chan struct{})
	go w.pruneRuns(ctx, prunerDone)
	// The loop fires due schedules too; it also stops with ctx.
	schedulerDone := make(chan struct{})
	if loop {
		sd := &scheduler{st: w.st, log: w.log, m: w.metrics, origin: w.id, local: w.claimable, changed: w.due,
			workspace: w.cfg.WorkspaceID, zones: map[string]*time.Location{}}
		go sd.run(ctx, schedulerDone)
	} else {
		close(schedulerDone)
	}
	// The heartbeat registers the process now and removes its row once all else has ended.
	beatCtx, stopBeat := context.WithCancel(context.Background())
	beatDone := make(chan struct{})
	go w.beat(beatCtx, beatDone)

	executing := map[string]*execution{}
	start := func(batch []*execution) {
		for _, e := range batch {
			ctx, cancel := context.WithCancelCause(workCtx)
			e.cancel = cancel
			executing[e.run.ID] = e
			go w.execute(ctx, e)
		}
		w.metrics.executing.set(float64(len(executing)))
	}
	end := func(e *execution) {
		delete(executing, e.run.ID)
		w.active.Add(-1)
		w.metrics.executing.set(float64(len(executing)))
	}

	var tick <-chan time.Time
	wake := w.wake
	if loop {
		ticker := time.NewTicker(w.cfg.Poll)
		defer ticker.Stop()
		tick = ticker.C
		w.log.Info("worker started", "worker", w.id, "concurrency", w.cfg.Concurrency,
			"batch_limit", w.cfg.BatchLimit, "poll", w.cfg.Poll, "workspace", w.cfg.WorkspaceID)
	} else {
		wake = nil
	}
	stop := ctx.Done()
	var drainDeadline <-chan time.Time
	var cyclesOver chan struct{} // closed once no cycle can start an execution any more
	over := false
	down := false // the database was unreachable at the last cycle (logged once)
	claimNow := loop
	// due fires when the next scheduled run falls due, if that is before the next tick.
	due := time.NewTimer(time.Hour)
	due.Stop()
	defer due.Stop()
	for {
		if claimNow {
			claimNow = false
			// Executions that ended together free their slots before the claim, so it
			// fills them in one transaction rather than one or two at a time.
			for drained := false; !drained; {
				select {
				case e := <-w.ended:
					end(e)
				default:
					drained = true
				}
			}
			s, _, err := w.cycle(context.Background(), w.cfg.BatchLimit, w.cfg.WorkspaceID, start)
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
			// Slots are still free and the claim says more may be claimable (its rounds
			// over the workspaces' shares ran out): claim again at once.
			claimNow = w.more.Load() && s.Claimed > 0 && int(w.active.Load()) < w.cfg.Concurrency
			due.Stop()
			if next := w.nextDue.Load(); next != 0 && err == nil {
				if d := time.Until(time.Unix(0, next)); d < w.cfg.Poll {
					due.Reset(max(d, 0))
				}
			}
			if claimNow {
				continue
			}
		}
		if over && len(executing) == 0 {
			break
		}
		select {
		case <-stop:
			stop, tick, wake = nil, nil, nil
			w.stopping.Store(true)
			w.log.Info("worker stopping", "worker", w.id, "executing", len(executing), "drain_timeout", w.cfg.ShutdownTimeout)
			timer := time.NewTimer(w.cfg.ShutdownTimeout)
			defer timer.Stop()
			drainDeadline = timer.C
			// Wait out a cycle in progress (it may still hand over runs) and keep every
			// later one from starting: the lock is never released.
			cyclesOver = make(chan struct{})
			go func(c chan struct{}) { w.cycleMu.Lock(); close(c) }(cyclesOver)
		case <-cyclesOver:
			cyclesOver, over = nil, true
		case <-drainDeadline:
			drainDeadline = nil
			if len(executing) > 0 {
				w.log.Warn("drain deadline reached; requeueing the runs still executing", "runs", len(executing))
			}
			cancelWork(errShutdown)
		case batch := <-w.started:
			start(batch)
		case e := <-w.ended:
			end(e)
			claimNow = loop && stop != nil && w.more.Load()
		case o := <-w.cancels:
			if e := executing[o.id]; e != nil && (o.attempt == 0 || o.attempt == e.ref.Attempt) {
				e.cancel(o.cause)
			}
		case reply := <-w.snapshot:
			refs := make([]attemptRef, 0, len(executing))
			for _, e := range executing {
				refs = append(refs, e.ref)
			}
			reply <- refs
		case <-tick:
			claimNow = true
		case <-due.C:
			claimNow = stop != nil
		case <-wake:
			claimNow = true
		}
	}
	close(w.outcomes)
	<-writerDone
	stopRenewer()
	<-renewerDone
	<-prunerDone
	<-schedulerDone
	stopBeat()
	<-beatDone
	w.log.Info("worker stopped", "worker", w.id)
	return nil
}

// runsAnnounced is told that runs became claimable: payload is the announcing worker's id
// ("-" for the trigger on runs) and an entry per workspace, separated by spaces (nothing
// after the id, or "*": anywhere). An entry is the workspace's id, with "/priority/run_at
// in Unix microseconds" when the runs are at that place in line or later. Its own
// announcements are ignored: the worker was told when it made them.
func (w *worker) runsAnnounced(payload string) {
	origin, rest, _ := strings.Cut(payload, " ")
	if origin == w.id {
		return
	}
	if rest == "" || rest == anywhere {
		w.claimable(nil)
		return
	}
	workspaces := map[string]linePos{}
	for _, entry := range strings.Fields(rest) {
		ws, at := parsePlace(entry)
		workspaces[ws] = at
	}
	w.claimable(workspaces)
}

// claimable tells the worker that runs of workspaces (nil: anywhere) may have become
// claimable, each at the given place in line or later, and wakes it.
func (w *worker) claimable(workspaces map[string]linePos) {
	w.line.announce(workspaces)
	w.wakeUp()
}

// schedulesChanged is told that schedules were made or changed (or that such news may have
// been missed): the scheduler reads when the next falls due.
func (w *worker) schedulesChanged() {
	select {
	case w.due <- struct{}{}:
	default:
	}
}

// wakeUp asks the loop for a cycle as soon as the current one (if any) ends.
func (w *worker) wakeUp() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// cycle is the one execution path: it recovers expired leases, claims up to
// min(limit, free slots) queued runs of workspace ws ("" for all) and hands them to start,
// which starts executing them. It does not wait for them: each execution's result channel
// says how it ended.
func (w *worker) cycle(ctx context.Context, limit int, ws string, start func([]*execution)) (summary, []*execution, error) {
	if !w.cycleMu.TryLock() {
		w.metrics.cycles.inc("skipped")
		return summary{Skipped: true}, nil, nil
	}
	defer w.cycleMu.Unlock()
	if w.stopping.Load() {
		w.metrics.cycles.inc("skipped")
		return summary{Skipped: true}, nil, nil
	}
	n := max(0, min(limit, w.cfg.Concurrency-int(w.active.Load())))

	begin := time.Now()
	// Recovery rides along at most every half poll interval or quarter lease, whichever is
	// longer: it reads the range of running runs in runs_list_idx, which under a pinned
	// horizon holds an entry for every run that ran since, and a lease expires no sooner.
	recoverLeases := time.Since(time.Unix(0, w.lastRecovery.Load())) >= max(w.cfg.Poll/2, w.cfg.Lease/4)
	// The claim is not canceled with ctx (a client that left, a shutdown): canceled after
	// its commit, it would leave claimed runs that nobody executes until their leases expire.
	claimCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.Lease)
	defer cancel()
	res, err := w.st.claim(claimCtx, w.line, w.id, n, ws, w.cfg.Lease, recoverLeases)
	if err != nil {
		w.metrics.cycles.inc("error")
		return summary{}, nil, err
	}
	w.metrics.claimDuration.observe(time.Since(begin).Seconds())
	w.metrics.cycles.inc("run")
	w.lastCycle.Store(time.Now().UnixNano())
	if recoverLeases {
		w.lastRecovery.Store(begin.UnixNano())
	}
	// A claim for no free slot learns nothing of the queue: what the last one learnt stands.
	if n > 0 {
		// Fewer than n claimed and no "more": nothing else was claimable. New runs, retries
		// and freed caps wake the loop; scheduled ones set nextDue.
		w.more.Store(len(res.claimed) == n || res.more || res.capped)
		w.nextDue.Store(0)
		if !res.nextDue.IsZero() {
			w.nextDue.Store(res.nextDue.UnixNano())
		}
	}
	recovered := res.requeued + res.failed
	if recovered > 0 {
		w.metrics.recovered.add(float64(recovered))
		w.log.Warn("recovered runs whose lease expired", "requeued", res.requeued, "failed", res.failed)
	}
	if len(res.claimed) == 0 {
		return summary{Recovered: recovered}, nil, nil
	}
	w.active.Add(int64(len(res.claimed)))
	execs := make([]*execution, len(res.claimed))
	for i, c := range res.claimed {
		execs[i] = &execution{run: c, ref: attemptRef{c.ID, c.Attempt, c.Step}, result: make(chan attemptEnd, 1)}
	}
	start(execs)
	return summary{Claimed: len(res.claimed), Recovered: recovered}, execs, nil
}

// process runs one cycle and waits until the runs it claimed have ended and their
// outcomes are written: the worker API and `agentapp worker -once`. The worker's run must
// be running.
func (w *worker) process(ctx context.Context, limit int, ws string) (summary, error) {
	s, execs, err := w.cycle(ctx, limit, ws, func(batch []*execution) { w.started <- batch })
	if err != nil {
		return s, err
	}
	for _, e := range execs {
		s.count(<-e.result)
	}
	return s, nil
}

// alive reports whether the loop has completed a cycle recently (several poll intervals).
func (w *worker) alive() (bool, time.Time) {
	last := time.Unix(0, w.lastCycle.Load())
	return time.Since(last) < 3*w.cfg.Poll+2*time.Second, last
}

// executingCount is the number of runs executing now (claimed and not yet returned).
func (w *worker) executingCount() int {
	return int(w.active.Load())
}

// execute runs one attempt and queues its outcome for the writer, then reports to run's
// loop that the slot is free.
func (w *worker) execute(ctx context.Context, e *execution) {
	c := e.run
	w.log.Debug("run claimed", "run", c.ID, "attempt", c.Attempt, "agent", c.AgentName)
	if c.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, c.Timeout, errTimedOut)
		defer cancel()
	}
	begin := time.Now()
	output, wait, err := runAgent(ctx, w.client, w.cfg.WebhookHosts, c)
	w.metrics.runDuration.observe(time.Since(begin).Seconds())
	out := outcome{attemptRef: e.ref, End: endSucceeded, Output: output}
	cause := context.Cause(ctx)
	var pushed *pushbackError
	switch {
	case err == nil && wait != nil && c.Step >= maxSteps:
		out.End, out.Output, out.Final = endFailed, nil, true
		out.Message = fmt.Sprintf("step limit: step %d asked for step %d; a run takes at most %d steps", c.Step, c.Step+1, maxSteps)
	case err == nil && wait != nil:
		out.End, out.Output, out.Wait = endWaiting, nil, wait
	case err == nil:
	case ctx.Err() != nil && errors.Is(cause, errCanceledByRequest):
		out.End = endCanceled
	case ctx.Err() != nil && errors.Is(cause, errShutdown):
		out.End = endRequeued
	case ctx.Err() != nil && errors.Is(cause, errLeaseLost):
		out.End = endLost
	case ctx.Err() != nil && errors.Is(cause, errTimedOut):
		out.End, out.Message = endFailed, fmt.Sprintf("timed out after %d ms", c.Timeout.Milliseconds())
	case errors.As(err, &pushed) && c.Pushbacks < maxPushbacks:
		out.End, out.Delay, out.Throttled, out.Throttle = endPushedBack, pushed.delay, true, pushed.delay
	case pushed != nil:
		out.End, out.Throttled, out.Throttle = endFailed, true, pushed.delay
		out.Message = fmt.Sprintf("%v (pushed back %d times already: counted as a failed attempt)", err, c.Pushbacks)
	default:
		out.End, out.Message = endFailed, err.Error()
	}
	if out.End == endFailed {
		out.Delay = c.Retry.backoff(c.Attempt)
	}
	e.cancel(nil)
	if out.End == endLost {
		w.log.Warn("run abandoned: another worker took its lease over", "run", c.ID, "attempt", c.Attempt)
		w.metrics.outcomes.inc(string(endLost))
		e.result <- endLost
	} else {
		w.outcomes <- pendingOutcome{out, e}
	}
	w.ended <- e
}

// writeOutcomes is the outcome writer. It writes whatever has queued up while the previous
// write was in flight in one statement: no added latency when the queue is quiet, few
// transactions when it is busy. It returns when the queue is closed and empty.
func (w *worker) writeOutcomes(done chan struct{}) {
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
		w.record(batch)
	}
}

// record writes a batch of outcomes and reports each end. An outcome PostgreSQL refuses
// (an output it cannot store) is isolated: the others are written at once, and that
// attempt fails with a message saying what was refused.
func (w *worker) record(batch []pendingOutcome) {
	outs := make([]outcome, len(batch))
	for i, p := range batch {
		outs[i] = p.outcome
	}
	// A wait for child runs is written with its children, each in a transaction of its own
	// (waitForRuns); a child naming an unknown agent, or one its agent refuses (a cost
	// over its rate limit, a key busy under reject), fails the attempt instead.
	waited := map[string]attemptEnd{}
	var plain []int // the others: outs[i] for i in plain
	for i := range outs {
		if o := &outs[i]; o.End == endWaiting && o.Wait.Kind == waitRuns {
			var made map[string]linePos
			one, err := w.retrying(1, func(ctx context.Context) (ends map[string]attemptEnd, err error) {
				ends, made, err = w.st.waitForRuns(ctx, w.id, *o)
				return ends, err
			})
			if err == nil && made != nil {
				w.announceChildren(made)
			}
			var unknown unknownAgentError
			var childRefused childRefusedError
			msg, refused := dataException(err)
			if errors.As(err, &unknown) || errors.As(err, &childRefused) || refused {
				o.End, o.Wait, o.Message = endFailed, nil, "wait refused by PostgreSQL: "+msg
				switch {
				case errors.As(err, &unknown):
					o.Message = "wait.runs: " + unknown.Error()
				case errors.As(err, &childRefused):
					o.Message = childRefused.Error()
				}
				o.Delay = batch[i].exec.run.Retry.backoff(o.Attempt)
				plain = append(plain, i)
			}
			for id, e := range one {
				waited[id] = e
			}
			continue
		}
		plain = append(plain, i)
	}
	rest := make([]outcome, len(plain))
	for j, i := range plain {
		rest[j] = outs[i]
	}
	ends, err := w.finish(rest)
	if _, refused := dataException(err); refused {
		ends = map[string]attemptEnd{}
		for _, i := range plain {
			one, err := w.finish(outs[i : i+1])
			if msg, refused := dataException(err); refused {
				outs[i].End, outs[i].Output = endFailed, nil
				outs[i].Message = "output refused by PostgreSQL: " + msg
				one, _ = w.finish(outs[i : i+1])
			}
			for id, e := range one {
				ends[id] = e
			}
		}
	}
	if ends == nil {
		ends = map[string]attemptEnd{}
	}
	for id, e := range waited {
		ends[id] = e
	}
	timer := false
	for i, p := range batch {
		end, ok := ends[p.ID]
		switch {
		case !ok:
			end = endLost
			w.log.Warn("run outcome discarded: the attempt is no longer this worker's", "run", p.ID, "attempt", p.Attempt)
		case end == endRequeued:
			w.metrics.requeued.add(1)
			w.log.Info("run requeued at shutdown", "run", p.ID, "attempt", p.Attempt)
		case end == endPushedBack:
			w.metrics.pushbacks.add(1)
			w.log.Info("run pushed back by its webhook; agent throttled", "run", p.ID, "attempt", p.Attempt,
				"retry_after", outs[i].Throttle)
		case end == endSucceeded:
			w.log.Debug("run succeeded", "run", p.ID, "attempt", p.Attempt)
		case end == endWaiting:
			timer = timer || outs[i].Wait.After > 0
			w.log.Debug("run waits", "run", p.ID, "step", p.Step, "waiting_for", string(outs[i].Wait.Wait))
		case end == endRetried:
			w.log.Info("run attempt failed; will retry", "run", p.ID, "attempt", p.Attempt, "error", outs[i].Message)
		default:
			w.log.Info("run finished", "run", p.ID, "attempt", p.Attempt, "status", end, "error", outs[i].Message)
		}
		w.metrics.outcomes.inc(string(end))
		p.exec.result <- end
	}
	if timer {
		// A cycle reads the next due time again, which now counts these runs' timers: an
		// idle loop sleeps until the first of them, not until its next tick.
		w.wakeUp()
	}
}

// announceChildren announces the child runs a wait made (the outcome write inserted
// them, which no trigger announces) as the API's creates are: through the process's
// announcer, or to this process's worker alone when it has none (a single cycle).
func (w *worker) announceChildren(spaces map[string]linePos) {
	if w.st.announce == nil {
		w.claimable(spaces)
		return
	}
	for ws, at := range spaces {
		w.st.announce(ws, at)
	}
}

// finish writes outcomes, retrying through a database outage for as long as the leases
// could still be ours: past that, another worker has recovered the runs. A refusal of the
// values themselves (a data exception) is returned at once.
func (w *worker) finish(outs []outcome) (map[string]attemptEnd, error) {
	if len(outs) == 0 {
		return map[string]attemptEnd{}, nil
	}
	return w.retrying(len(outs), func(ctx context.Context) (map[string]attemptEnd, error) {
		return w.st.finish(ctx, w.id, outs)
	})
}

// retrying sends an outcome write (of n outcomes) as finish says, retrying through an
// outage; a refusal of the values (a data exception, a child run's unknown agent) is
// returned at once.
func (w *worker) retrying(n int, write func(context.Context) (map[string]attemptEnd, error)) (map[string]attemptEnd, error) {
	giveUp := time.Now().Add(w.cfg.Lease)
	backoff := 100 * time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ends, err := write(ctx)
		cancel()
		var unknown unknownAgentError
		var childRefused childRefusedError
		if _, refused := dataException(err); err == nil || refused || errors.As(err, &unknown) || errors.As(err, &childRefused) {
			return ends, err // the write's own answer: sending it again would not change it
		}
		if time.Now().After(giveUp) {
			w.log.Error("giving up writing run outcomes; their leases have expired and other workers will recover them",
				"runs", n, "err", err)
			return nil, err
		}
		w.log.Warn("writing run outcomes failed; retrying", "runs", n, "err", err, "retry_in", backoff)
		time.Sleep(backoff)
		backoff = min(2*backoff, 5*time.Second)
	}
}

// renewLeases extends the leases of the runs executing here, a third of a lease apart, and
// cancels those whose cancel was requested or whose lease was lost. An idle worker sends
// nothing.
func (w *worker) renewLeases(ctx context.Context, done chan struct{}) {
	defer close(done)
	ticker := time.NewTicker(w.cfg.Lease / 3)
	defer ticker.Stop()
	// held is when the leases were last known to be ours: past a lease from then, another
	// worker may have recovered them, so executions that cannot renew are abandoned.
	held := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		reply := make(chan []attemptRef, 1)
		select {
		case w.snapshot <- reply:
		case <-ctx.Done():
			return
		}
		refs := <-reply
		if len(refs) == 0 {
			held = time.Now()
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, w.cfg.Lease/3)
		renewed, err := w.st.renew(rctx, w.id, refs, w.cfg.Lease)
		cancel()
		if err != nil {
			w.log.Warn("renewing leases failed", "runs", len(refs), "err", err)
			if time.Since(held) <= w.cfg.Lease {
				continue
			}
			renewed = nil // none renewed for a whole lease: below, every one is lost
		} else {
			held = time.Now()
		}
		for _, ref := range refs {
			cause := errLeaseLost
			if cancelRequested, ok := renewed[ref]; ok && !cancelRequested {
				continue
			} else if ok {
				cause = errCanceledByRequest
			}
			select {
			case w.cancels <- cancelOrder{ref.ID, ref.Attempt, cause}:
			case <-ctx.Done():
				return
			}
		}
	}
}

// cancelLocal cancels the run if it executes in this process.
func (w *worker) cancelLocal(id string) {
	select {
	case w.cancels <- cancelOrder{id: id, cause: errCanceledByRequest}:
	case <-w.done:
	}
}

// Retention: a pass soon after start-up, then at most this far apart (SPEC: within a minute
// of start-up, then at least every 10 minutes), in batches small enough that each delete is
// a short transaction.
const (
	pruneFirstDelay = 10 * time.Second
	pruneInterval   = 5 * time.Minute
	pruneBatch      = 10000
	prunePause      = 100 * time.Millisecond // between batches, so a long pass yields to others
)

// pruneRuns deletes the final runs whose finished_at is older than the retention, with
// their events, until ctx ends. Only one process prunes at a time (store.prune).
func (w *worker) pruneRuns(ctx context.Context, done chan struct{}) {
	defer close(done)
	if w.cfg.Retention <= 0 {
		return
	}
	timer := time.NewTimer(pruneFirstDelay)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		total := 0
		for ctx.Err() == nil {
			n, err := w.st.prune(ctx, w.cfg.Retention, pruneBatch)
			total += n
			w.metrics.pruned.add(float64(n))
			if err != nil {
				if ctx.Err() == nil {
					w.log.Warn("pruning old runs failed; retrying at the next pass", "err", err)
				}
				break
			}
			if n < pruneBatch {
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(prunePause):
			}
		}
		if total > 0 {
			w.log.Info("pruned final runs past the retention", "runs", total, "retention", w.cfg.Retention)
		}
		timer.Reset(pruneInterval)
	}
}
