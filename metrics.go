package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"
)

// metrics are this process's counters, exposed at /metrics in Prometheus text format.
type metrics struct {
	cycles        *counterVec // worker cycles by result: run, skipped, error
	outcomes      *counterVec // attempts written, by the status the run ended in
	recovered     *gauge      // runs recovered from expired leases (a counter)
	requeued      *gauge      // runs handed back at shutdown (a counter)
	pushbacks     *gauge      // attempts a webhook pushed back with Retry-After (a counter)
	pruned        *gauge      // final runs deleted by retention (a counter)
	executing     *gauge
	claimDuration *histogram
	runDuration   *histogram
	scheduled     *gauge     // runs made by schedules (a counter)
	scheduleLag   *histogram // from a due time to its run's creation
}

func newMetrics() *metrics {
	buckets := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}
	return &metrics{
		cycles:        &counterVec{v: map[string]float64{}},
		outcomes:      &counterVec{v: map[string]float64{}},
		recovered:     &gauge{},
		requeued:      &gauge{},
		pushbacks:     &gauge{},
		pruned:        &gauge{},
		executing:     &gauge{},
		claimDuration: &histogram{bounds: buckets, counts: make([]uint64, len(buckets))},
		runDuration:   &histogram{bounds: buckets, counts: make([]uint64, len(buckets))},
		scheduled:     &gauge{},
		scheduleLag:   &histogram{bounds: buckets, counts: make([]uint64, len(buckets))},
	}
}

// gauge is a float value; as a counter only add is used.
type gauge struct {
	mu sync.Mutex
	v  float64
}

func (g *gauge) set(v float64) { g.mu.Lock(); g.v = v; g.mu.Unlock() }
func (g *gauge) add(v float64) { g.mu.Lock(); g.v += v; g.mu.Unlock() }
func (g *gauge) get() float64  { g.mu.Lock(); defer g.mu.Unlock(); return g.v }

// counterVec is a counter with one label.
type counterVec struct {
	mu sync.Mutex
	v  map[string]float64
}

func (c *counterVec) inc(label string) { c.mu.Lock(); c.v[label]++; c.mu.Unlock() }

func (c *counterVec) write(w io.Writer, name, label string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := make([]string, 0, len(c.v))
	for k := range c.v {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "%s{%s=%q} %g\n", name, label, k, c.v[k])
	}
}

// histogram counts observations into cumulative buckets.
type histogram struct {
	mu     sync.Mutex
	bounds []float64
	counts []uint64
	count  uint64
	sum    float64
}

func (h *histogram) observe(v float64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if i := sort.SearchFloat64s(h.bounds, v); i < len(h.counts) {
		h.counts[i]++
	}
	h.count++
	h.sum += v
}

func (h *histogram) write(w io.Writer, name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var cum uint64
	for i, b := range h.bounds {
		cum += h.counts[i]
		fmt.Fprintf(w, "%s_bucket{le=\"%g\"} %d\n", name, b, cum)
	}
	fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n%s_sum %g\n%s_count %d\n", name, h.count, name, h.sum, name, h.count)
}

// writeMetrics writes every metric. Figures that come from the database (runs by status,
// queue depth and age) are left out while it is unreachable, and agentapp_database_up says so.
func writeMetrics(ctx context.Context, w io.Writer, st *store, m *metrics) {
	var b strings.Builder
	help := func(name, typ, text string) { fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, typ) }

	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	stats, err := st.stats(ctx, "")
	var age time.Duration
	if err == nil {
		age, err = st.oldestQueuedAge(ctx)
	}
	var byKey, byRate int64
	if err == nil {
		byKey, byRate, err = st.heldRuns(ctx)
	}
	help("agentapp_database_up", "gauge", "1 when the database answered this scrape.")
	if err != nil {
		fmt.Fprintf(&b, "agentapp_database_up 0\n")
	} else {
		fmt.Fprintf(&b, "agentapp_database_up 1\n")
		help("agentapp_runs", "gauge", "Runs in the database by status (all workspaces).")
		for _, s := range []struct {
			name string
			n    int64
		}{{"queued", stats.Queued}, {"running", stats.Running}, {"waiting", stats.Waiting}, {"succeeded", stats.Succeeded}, {"failed", stats.Failed}, {"canceled", stats.Canceled}} {
			fmt.Fprintf(&b, "agentapp_runs{status=%q} %d\n", s.name, s.n)
		}
		help("agentapp_queue_depth", "gauge", "Runs waiting to be claimed.")
		fmt.Fprintf(&b, "agentapp_queue_depth %d\n", stats.Queued)
		help("agentapp_queue_oldest_age_seconds", "gauge", "Age of the oldest queued run; 0 when none is queued.")
		fmt.Fprintf(&b, "agentapp_queue_oldest_age_seconds %g\n", math.Round(age.Seconds()*1000)/1000)
		help("agentapp_runs_held", "gauge", "Due queued runs held back by their limits: reason key, a concurrency key at its agent's key_concurrency; reason rate, an agent whose rate_limit window is used up.")
		fmt.Fprintf(&b, "agentapp_runs_held{reason=\"key\"} %d\nagentapp_runs_held{reason=\"rate\"} %d\n", byKey, byRate)
	}
	help("agentapp_goroutines", "gauge", "Goroutines in this process now.")
	fmt.Fprintf(&b, "agentapp_goroutines %d\n", runtime.NumGoroutine())
	help("agentapp_runs_executing", "gauge", "Runs executing in this process now.")
	fmt.Fprintf(&b, "agentapp_runs_executing %g\n", m.executing.get())
	help("agentapp_worker_cycles_total", "counter", "Worker cycles in this process by result (run, skipped, error).")
	m.cycles.write(&b, "agentapp_worker_cycles_total", "result")
	help("agentapp_run_attempts_total", "counter", "Attempts whose outcome this process wrote, by the status the run went to.")
	m.outcomes.write(&b, "agentapp_run_attempts_total", "status")
	help("agentapp_runs_recovered_total", "counter", "Runs this process recovered from expired leases.")
	fmt.Fprintf(&b, "agentapp_runs_recovered_total %g\n", m.recovered.get())
	help("agentapp_runs_requeued_at_shutdown_total", "counter", "Runs this process handed back to the queue at shutdown.")
	fmt.Fprintf(&b, "agentapp_runs_requeued_at_shutdown_total %g\n", m.requeued.get())
	help("agentapp_pushbacks_total", "counter", "Attempts whose webhook answered 429 or 503 with Retry-After, written by this process as pushed back (not spent).")
	fmt.Fprintf(&b, "agentapp_pushbacks_total %g\n", m.pushbacks.get())
	help("agentapp_runs_pruned_total", "counter", "Final runs this process deleted under RUN_RETENTION_DAYS.")
	fmt.Fprintf(&b, "agentapp_runs_pruned_total %g\n", m.pruned.get())
	help("agentapp_claim_duration_seconds", "histogram", "Time of one claim statement (recovery included).")
	m.claimDuration.write(&b, "agentapp_claim_duration_seconds")
	help("agentapp_run_duration_seconds", "histogram", "Time agents took to execute one attempt.")
	m.runDuration.write(&b, "agentapp_run_duration_seconds")
	help("agentapp_schedule_runs_total", "counter", "Runs this process made for schedules' due times.")
	fmt.Fprintf(&b, "agentapp_schedule_runs_total %g\n", m.scheduled.get())
	help("agentapp_schedule_lag_seconds", "histogram", "From a schedule's due time to the creation of its run, for the runs this process made.")
	m.scheduleLag.write(&b, "agentapp_schedule_lag_seconds")
	io.WriteString(w, b.String())
}
