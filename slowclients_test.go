package main

// Hardened by default (SPEC "HTTP API"): 200 slow or stalled clients at once, on raw
// connections to the agentapp binary, are cut at the server's limits while /healthz keeps
// answering within a second, a long poll started with them answers at its end, and a
// workspace's event stream opened before them still delivers after they have gone.
// IdleTimeout's value (2 min, too long to wait for) is checked by TestHTTPServerLimits;
// here idle keep-alive connections outlive the header limit. A rotated key dying in every
// process within a second is TestRotateKey. Helpers local to this file start with sl.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The clients of TestManySlowClients, by kind: how many of each (200 in all) and what
// they measure against.
const (
	// SPEC's figures, written out rather than server.go's constants, so that a changed
	// constant fails here. (bodyTimeout is the server's own: SPEC names no figure.)
	slHeaderLimit = 10 * time.Second // a client that takes longer to send its headers is disconnected
	slStallLimit  = 30 * time.Second // and so is a client that stops reading its answer this long
	slKeepAlive   = 15 * time.Second // a stream sends a comment line at least this often

	slHalfLine      = 60 // half a request line, then nothing: cut at slHeaderLimit
	slTrickleHeader = 20 // headers a byte every slTrickleEvery, never ending: cut at slHeaderLimit
	slSlowBody      = 45 // a body in slBodyPieces pieces, one every slBodyEvery: answered 201
	slStalledBody   = 45 // part of a body, then nothing: 408 at bodyTimeout
	slStalledReader = 10 // a 7 MB answer, not read: half drain it early (whole), half late (cut)
	slIdle          = 20 // a request, then idle past the header limit, then another: both 200

	slTrickleEvery = 500 * time.Millisecond
	slBodyPieces   = 12
	slBodyEvery    = time.Second // so a slow body takes longer than slHeaderLimit, well within bodyTimeout
	slIdleFor      = slHeaderLimit + 5*time.Second

	// A stalled reader's answer is drained this long after its first bytes came: before
	// slStallLimit (with room to take in the whole answer through a small window), and
	// after it (with room for the server to notice).
	slDrainEarly = slStallLimit - 10*time.Second
	slDrainLate  = slStallLimit + 2*time.Second

	// slEarly is how much before its limit a cut may come (the server starts its clock a
	// moment before the client does) and slLate how much after (a loaded machine running
	// the -race binary).
	slEarly = time.Second
	slLate  = 3 * time.Second

	slHealthBound = time.Second            // SPEC: others are answered; the issue says within 1 s
	slProbeEvery  = 100 * time.Millisecond // how often /healthz is asked meanwhile
	slLongPoll    = 30 * time.Second       // the ?wait_ms of the long poll
	slStreamBound = 5 * time.Second        // a run's change shows on the workspace stream within this
)

// slResult is what one client saw: its kind, how long its limit took to show, and a
// problem (nil: as SPEC says).
type slResult struct {
	kind string
	took time.Duration
	err  error
}

// slDial connects to addr; with rcvbuf > 0 the socket's receive buffer is that small,
// set before the connection is made (set later, the kernel drops what the larger window
// let in, and the retransmissions back off for longer than the test waits).
func slDial(addr string, rcvbuf int) (net.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	if rcvbuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) })
		}
	}
	return d.Dial("tcp", addr)
}

// slClosed reads c until the server closes it or wait passes, and returns what came and
// how long after start it closed. A reset counts as closed; the deadline passing is an
// error.
func slClosed(c net.Conn, start time.Time, wait time.Duration) ([]byte, time.Duration, error) {
	c.SetReadDeadline(time.Now().Add(wait))
	got, err := io.ReadAll(c)
	took := time.Since(start)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return got, took, fmt.Errorf("got the connection open after %v; want it closed", took.Round(time.Millisecond))
	}
	return got, took, nil
}

// slWithin is an error unless took is within [limit-slEarly, limit+slLate].
func slWithin(what string, took, limit time.Duration) error {
	if took < limit-slEarly || took > limit+slLate {
		return fmt.Errorf("%s after %v; want after %v (from %v to %v)", what, took.Round(time.Millisecond), limit,
			limit-slEarly, limit+slLate)
	}
	return nil
}

// slHeaderCut is a client that starts a request with head and never finishes its headers;
// with trickle it sends one more byte every slTrickleEvery. It wants the connection closed
// at slHeaderLimit (net/http may say 400 or 408 first).
func slHeaderCut(addr, head string, trickle bool) (time.Duration, error) {
	c, err := slDial(addr, 0)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := io.WriteString(c, head); err != nil {
		return 0, err
	}
	start := time.Now()
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		if !trickle {
			return
		}
		tick := time.NewTicker(slTrickleEvery)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := io.WriteString(c, "a"); err != nil {
					return // cut
				}
			}
		}
	}()
	got, took, err := slClosed(c, start, slHeaderLimit+2*slLate)
	close(stop)
	<-stopped
	if err != nil {
		return took, err
	}
	if len(got) > 0 && !bytes.HasPrefix(got, []byte("HTTP/1.1 4")) {
		return took, fmt.Errorf("got %q before the close; want nothing or a 4xx", got)
	}
	return took, slWithin("closed", took, slHeaderLimit)
}

// slPost sends the headers of a POST of body (Content-Length: length) to path on c.
func slPost(c net.Conn, path, key string, length int) error {
	_, err := fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
		path, key, length)
	return err
}

// slSlowBodyClient creates a run in ws with a body sent in slBodyPieces pieces, one every
// slBodyEvery, and wants 201: a slow client that progresses is served.
func slSlowBodyClient(addr string, ws testWorkspace) (time.Duration, error) {
	c, err := slDial(addr, 0)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	body := fmt.Sprintf(`{"agent":"echo","input":%q}`, strings.Repeat("s", 10*slBodyPieces))
	start := time.Now()
	if err := slPost(c, "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, len(body)); err != nil {
		return 0, err
	}
	step := (len(body) + slBodyPieces - 1) / slBodyPieces
	for i := 0; i < len(body); i += step {
		time.Sleep(slBodyEvery)
		if _, err := io.WriteString(c, body[i:min(i+step, len(body))]); err != nil {
			return time.Since(start), fmt.Errorf("got %v sending the body after %v; want it taken", err, time.Since(start).Round(time.Millisecond))
		}
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	took := time.Since(start)
	if err != nil {
		return took, fmt.Errorf("got %v after %v; want 201", err, took.Round(time.Millisecond))
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return took, fmt.Errorf("got status %d after %v; want 201", resp.StatusCode, took.Round(time.Millisecond))
	}
	return took, nil
}

// slStalledBodyClient sends headers that promise 100 bytes of body, and 9 of them, and wants
// a 408 at bodyTimeout.
func slStalledBodyClient(addr string, ws testWorkspace) (time.Duration, error) {
	c, err := slDial(addr, 0)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	start := time.Now()
	if err := slPost(c, "/v1/workspaces/"+ws.ID+"/runs", ws.APIKey, 100); err != nil {
		return 0, err
	}
	io.WriteString(c, `{"agent":`)
	c.SetReadDeadline(time.Now().Add(bodyTimeout + 2*slLate))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	took := time.Since(start)
	if err != nil {
		return took, fmt.Errorf("got %v after %v; want a 408 after %v", err, took.Round(time.Millisecond), bodyTimeout)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestTimeout {
		return took, fmt.Errorf("got status %d after %v; want 408", resp.StatusCode, took.Round(time.Millisecond))
	}
	return took, slWithin("408", took, bodyTimeout)
}

// slStalledReaderClient asks for path, reads the answer's first bytes as they come, stops
// reading, and drains the rest drainAfter later. With cut it wants the answer cut short
// (the server gave up on it), else whole (the server waited). It returns how long the
// answer took to start.
func slStalledReaderClient(addr, path, key string, want int, drainAfter time.Duration, cut bool) (time.Duration, error) {
	c, err := slDial(addr, 4096)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	start := time.Now()
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", path, key); err != nil {
		return 0, err
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // the query over big rows, on a loaded machine
	first := make([]byte, 512)
	n, err := c.Read(first)
	if err != nil {
		return 0, fmt.Errorf("got %v waiting for the answer; want it started", err)
	}
	began := time.Since(start)
	time.Sleep(drainAfter)
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReaderSize(io.MultiReader(bytes.NewReader(first[:n]), c), 64<<10), nil)
	if err != nil {
		return began, fmt.Errorf("got %v reading the answer's head; want it", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return began, fmt.Errorf("drained %v after it began: got %d of %d bytes, then the connection open and silent; want the answer whole or cut",
			drainAfter, len(body), want)
	case cut && (err == nil || len(body) >= want):
		return began, fmt.Errorf("drained %v after it began: got %d of %d bytes (%v); want it cut short, the reader stalled past %v",
			drainAfter, len(body), want, err, slStallLimit)
	case !cut && (err != nil || len(body) != want):
		return began, fmt.Errorf("drained %v after it began: got %d of %d bytes (%v); want it whole, the reader stalled under %v",
			drainAfter, len(body), want, err, slStallLimit)
	}
	return began, nil
}

// slIdleKeepAlive asks for /healthz, stays idle past the header limit, and asks again on
// the same connection: an idle keep-alive connection answers under idleTimeout, not the
// header limit.
func slIdleKeepAlive(addr string) (time.Duration, error) {
	c, err := slDial(addr, 0)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	br := bufio.NewReader(c)
	start := time.Now()
	for i := range 2 {
		if i == 1 {
			time.Sleep(slIdleFor)
		}
		io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return time.Since(start), fmt.Errorf("request %d on a keep-alive connection (idle %v before the second): got %v; want 200", i+1, slIdleFor, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return time.Since(start), fmt.Errorf("request %d on a keep-alive connection: got status %d; want 200", i+1, resp.StatusCode)
		}
	}
	return time.Since(start), nil
}

// TestManySlowClients: 200 slow or stalled clients at once — half request lines, headers
// trickled forever, slow bodies, stalled bodies, stalled readers of a 7 MB answer, idle
// keep-alive connections — are each cut at its limit or served, as SPEC says; meanwhile
// /healthz answers within a second every time, a ?wait_ms=30000 long poll started
// with them answers 200 at its end, and the workspace's event stream, opened before them
// and read all along, is never ended by the server: it sends a keep-alive comment at
// least every 15 s throughout, and once they have all ended (past the 30 s stall limit)
// it reports a run canceled then, on the same connection, within seconds.
func TestManySlowClients(t *testing.T) {
	t.Parallel()
	// The binary operators run: the race detector multiplies the cost of building the
	// stalled readers' 7 MB answers (10 at once took 5 s and /healthz 0.7 s at worst on
	// two loaded cores; 20 at once, 10 s and 1.3 s), and the bound is about the server,
	// not the detector. No worker: runs stay queued.
	p := startProcBin(t, agentappBinary(t, false), testEnv(t, testDB(t), map[string]string{"LOG_LEVEL": "info"}))
	a := p.app()
	addr := strings.TrimPrefix(a.base, "http://")
	ws, other := a.createWorkspace(t), a.createWorkspace(t) // other takes the slow bodies' runs: ws's list stays the same
	big := strings.Repeat("x", 900<<10)
	for range 8 {
		a.createRun(t, ws, "echo", big)
	}
	polled := a.createRun(t, ws, "echo", "long poll")
	listPath := "/v1/workspaces/" + ws.ID + "/runs?limit=200"
	_, _, full := a.do(t, "GET", listPath, ws.APIKey, nil, nil)
	// Read from now on by evStream's goroutine, one request that is never reconnected;
	// ws's runs change only when the test cancels one at the end.
	stream := evStream(t, a.base+"/v1/workspaces/"+ws.ID+"/events", ws.APIKey, nil)
	opened := time.Now()

	const clients = slHalfLine + slTrickleHeader + slSlowBody + slStalledBody + slStalledReader + slIdle
	results := make(chan slResult, clients)
	var running sync.WaitGroup
	client := func(kind string, n int, f func(i int) (time.Duration, error)) {
		for i := range n {
			running.Add(1)
			go func() {
				defer running.Done()
				took, err := f(i)
				results <- slResult{kind, took, err}
			}()
		}
	}
	start := time.Now()
	client("half a request line", slHalfLine, func(int) (time.Duration, error) {
		return slHeaderCut(addr, "GET /healthz HT", false)
	})
	client("headers trickled", slTrickleHeader, func(int) (time.Duration, error) {
		return slHeaderCut(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", true)
	})
	client("slow body", slSlowBody, func(int) (time.Duration, error) { return slSlowBodyClient(addr, other) })
	client("stalled body", slStalledBody, func(int) (time.Duration, error) { return slStalledBodyClient(addr, other) })
	client("stalled reader", slStalledReader, func(i int) (time.Duration, error) {
		if i%2 == 0 {
			return slStalledReaderClient(addr, listPath, ws.APIKey, len(full), slDrainEarly, false)
		}
		return slStalledReaderClient(addr, listPath, ws.APIKey, len(full), slDrainLate, true)
	})
	client("idle keep-alive", slIdle, func(int) (time.Duration, error) { return slIdleKeepAlive(addr) })

	type answer struct {
		status int
		body   []byte
		err    error
		took   time.Duration
	}
	poll := make(chan answer, 1)
	go func() {
		t0 := time.Now()
		status, _, body, err := send(testClient, "GET", fmt.Sprintf("%s/v1/workspaces/%s/runs/%s?wait_ms=%d", a.base, ws.ID, polled.ID, slLongPoll.Milliseconds()),
			ws.APIKey, nil, nil)
		poll <- answer{status, body, err, time.Since(t0)}
	}()
	allDone := make(chan struct{})
	go func() {
		running.Wait()
		close(allDone)
	}()

	// /healthz on a new connection each time, until every client has ended. A probe over
	// the bound is asked again at once: the whole suite and other work share this box's
	// two cores, and a hiccup of theirs (one probe in 270 at 1.14 s in a full -race run)
	// passes, where a server kept from answering stays slow.
	fresh := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var worst time.Duration
	probes, slow, again := 0, 0, false
	giveUp := time.After(2 * time.Minute)
	for done := false; !done; {
		t0 := time.Now()
		status, _, _, err := send(fresh, "GET", a.base+"/healthz", "", nil, nil)
		lat := time.Since(t0)
		probes++
		worst = max(worst, lat)
		wait := slProbeEvery
		switch ok := err == nil && status == 200 && lat <= slHealthBound; {
		case !ok && again:
			slow++
			t.Errorf("GET /healthz %v into the slow clients, twice in a row: got %d (%v) after %v; want 200 within %v",
				time.Since(start).Round(time.Millisecond), status, err, lat.Round(time.Millisecond), slHealthBound)
		case !ok:
			slow++
			t.Logf("GET /healthz %v into the slow clients: got %d (%v) after %v; asking again at once",
				time.Since(start).Round(time.Millisecond), status, err, lat.Round(time.Millisecond))
			again, wait = true, 0
		default:
			again = false
		}
		select {
		case <-allDone:
			done = true
		case <-time.After(wait):
		case <-giveUp:
			t.Fatalf("slow clients: still running after 2 min; want all ended within %v", slDrainLate+time.Minute)
		}
	}
	close(results)
	t.Logf("%d clients ended after %v; /healthz asked %d times meanwhile: worst %v, %d over %v",
		clients, time.Since(start).Round(time.Millisecond),
		probes, worst.Round(time.Microsecond), slow, slHealthBound)

	type span struct {
		n, failed int
		lo, hi    time.Duration
	}
	spans := map[string]*span{}
	var kinds []string
	for r := range results {
		s := spans[r.kind]
		if s == nil {
			s = &span{lo: r.took, hi: r.took}
			spans[r.kind] = s
			kinds = append(kinds, r.kind)
		}
		s.n++
		s.lo, s.hi = min(s.lo, r.took), max(s.hi, r.took)
		if r.err != nil {
			s.failed++
			if s.failed <= 3 { // the same cause, 60 times over, says no more
				t.Errorf("%s: %v", r.kind, r.err)
			}
		}
	}
	for _, k := range kinds {
		s := spans[k]
		t.Logf("%-20s %3d clients, %d not as SPEC says; ended (readers: answer began) after %v … %v", k, s.n, s.failed,
			s.lo.Round(time.Millisecond), s.hi.Round(time.Millisecond))
	}

	lp := <-poll
	t.Logf("long poll ?wait_ms=%d started with the clients: %d after %v", slLongPoll.Milliseconds(), lp.status, lp.took.Round(time.Millisecond))
	if lp.err != nil || lp.status != 200 || !bytes.Contains(lp.body, []byte(`"status":"queued"`)) {
		t.Errorf("long poll: got %d %.200s (%v); want 200 with the run still queued", lp.status, lp.body, lp.err)
	}
	if lp.took < slLongPoll-100*time.Millisecond || lp.took > slLongPoll+slLate {
		t.Errorf("long poll ?wait_ms=%d: answered after %v; want at its end, %v", slLongPoll.Milliseconds(), lp.took, slLongPoll)
	}

	// The stream: what came while the clients ran, then a change made now. A stream the
	// server ended is a closed channel, with its last keep-alive's time the bound of when.
	keepAlives, others, last, longest, ended := 0, 0, opened, time.Duration(0), false
	for drained := false; !drained && !ended; {
		select {
		case f, ok := <-stream:
			switch {
			case !ok:
				ended = true
			case f.Comment == "keep-alive":
				keepAlives, longest, last = keepAlives+1, max(longest, f.At.Sub(last)), f.At
			default:
				others++ // a re-listing of ws's active runs, had the listener been lost
			}
		default:
			drained = true
		}
	}
	canceled := time.Now()
	open := canceled.Sub(opened)
	if ended {
		t.Errorf("workspace stream: got it ended by the server, its last keep-alive %v after it opened (%d in all); want it open %v later",
			last.Sub(opened).Round(time.Millisecond), keepAlives, open.Round(time.Millisecond))
		return
	}
	longest = max(longest, canceled.Sub(last))
	a.mustDo(t, "POST", "/v1/workspaces/"+ws.ID+"/runs/"+polled.ID+"/cancel", ws.APIKey, nil, 200, nil)
	f, ok := evNext(t, stream, slStreamBound)
	delay := f.At.Sub(canceled)
	t.Logf("workspace stream opened before the clients: %d keep-alives (longest gap %v) and %d other frames in %v open; the canceled run came %v after the POST",
		keepAlives, longest.Round(time.Millisecond), others, open.Round(time.Millisecond), delay.Round(time.Millisecond))
	if open <= slStallLimit {
		t.Errorf("workspace stream: open %v before the cancel; want past the stall limit, %v", open.Round(time.Millisecond), slStallLimit)
	}
	if want := int(open / slKeepAlive); keepAlives < want || longest > slKeepAlive {
		t.Errorf("workspace stream over %v: got %d keep-alives, at most %v apart; want at least %d, at most %v apart",
			open.Round(time.Millisecond), keepAlives, longest.Round(time.Millisecond), want, slKeepAlive)
	}
	var run runRecord
	if !ok || f.Event != "run" || json.Unmarshal([]byte(f.Data), &run) != nil || run.ID != polled.ID || run.Status != statusCanceled {
		t.Errorf("workspace stream after canceling run %s: got frame %+v (open %v); want event: run with it canceled", polled.ID, f, ok)
	}
}
