package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// peakRSSMiB is the peak resident set (VmHWM) of process pid, in MiB.
func peakRSSMiB(t testing.TB, pid int) float64 {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb / 1024
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}

// TestMemoryBombsRefused: values that PostgreSQL would expand past 1 MiB (1e131071 is 8
// bytes in and 131,072 digits out) are refused with 422 before anything is stored, one at a
// time and in batches, and the process stays small while they are tried 100 times each.
func TestMemoryBombsRefused(t *testing.T) {
	t.Parallel()
	dsn := testDB(t)
	p := startProcBin(t, agentappBinary(t, false), testEnv(t, dsn, map[string]string{"LOG_LEVEL": "info"}))
	a := p.app()
	ws := a.createWorkspace(t)
	nine := "[" + strings.Repeat("1e131071,", 8) + "1e131071]"
	runs := "/v1/workspaces/" + ws.ID + "/runs"
	bombs := map[string]struct{ path, body, want string }{
		"nine numbers in one input": {runs, `{"agent":"echo","input":` + nine + `}`, "over 1 MiB as stored"},
		"a batch of ten such inputs": {runs + "/batch",
			`{"runs":[` + strings.TrimSuffix(strings.Repeat(`{"agent":"echo","input":`+nine+`},`, 10), ",") + `]}`,
			"runs[0].input is over 1 MiB"},
		"a batch of 1000 inputs each under 1 MiB": {runs + "/batch",
			`{"runs":[` + strings.TrimSuffix(strings.Repeat(`{"agent":"echo","input":[1e131071]},`, 1000), ",") + `]}`,
			"the batch's inputs are over"},
		"a number beyond numeric": {runs, `{"agent":"echo","input":[1e1000000]}`, "cannot be stored"},
		"a NUL in a string":       {runs, `{"agent":"echo","input":{"a":"x\u0000y"}}`, "cannot be stored"},
	}
	for name, b := range bombs {
		t.Run(name, func(t *testing.T) {
			for i := range 100 {
				status, _, body := a.do(t, "POST", b.path, ws.APIKey, nil, b.body)
				if status != 422 || !strings.Contains(string(body), b.want) {
					t.Fatalf("try %d: got %d %.300s; want 422 saying %q", i, status, body, b.want)
				}
			}
		})
	}
	var stored int
	openTestDB(t, dsn).QueryRow(`SELECT count(*) FROM runs`).Scan(&stored)
	if stored != 0 {
		t.Errorf("runs stored: got %d; want none", stored)
	}
	// One such number fits in 1 MiB: it is accepted and answered whole.
	status, _, body := a.do(t, "POST", runs, ws.APIKey, nil, `{"agent":"echo","input":[1e131071]}`)
	if status != 201 || len(body) < 131072 {
		t.Errorf("one 1e131071: got %d and %d bytes; want 201 with its 131,072 digits", status, len(body))
	}
	hwm := peakRSSMiB(t, p.cmd.Process.Pid)
	t.Logf("peak RSS after 500 refused bombs: %.1f MiB", hwm)
	if hwm >= 100 {
		t.Errorf("peak RSS: got %.1f MiB; want under 100 MiB", hwm)
	}
}
