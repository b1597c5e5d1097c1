package audit

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const crashChildEnv = "COFFRE_AUDIT_CRASH_CHILD_DIR"

// crashChild runs in the re-executed test binary: it appends from several
// goroutines until killed, printing "ack <index>" after each acknowledged
// append.
func crashChild(dir string) {
	l, err := Open(testOptions(nil, dir))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				e := testEntry(i)
				e.RequestID = fmt.Sprintf("w%d-%d", w, i)
				idx, err := l.Append(context.Background(), e)
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(3)
				}
				mu.Lock()
				fmt.Fprintf(os.Stdout, "ack %d %s\n", idx, e.RequestID)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func TestCrashKill9(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		return
	}
	if testing.Short() {
		t.Skip("re-executes the test binary")
	}
	dir := t.TempDir()
	acked := map[uint64]string{}
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashKill9$") // #nosec G204 -- the test binary itself
		cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killAfter := time.Duration(150+rand.IntN(400)) * time.Millisecond // #nosec G404 -- test timing
		timer := time.AfterFunc(killAfter, func() { _ = cmd.Process.Signal(syscall.SIGKILL) })
		sc := bufio.NewScanner(out)
		n := 0
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) != 3 || f[0] != "ack" {
				continue // a line cut by the kill
			}
			idx, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				continue
			}
			if prev, dup := acked[idx]; dup {
				t.Fatalf("round %d: index %d acknowledged twice (%s, %s)", round, idx, prev, f[2])
			}
			acked[idx] = f[2]
			n++
		}
		timer.Stop()
		err = cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("child did not die by SIGKILL: %v\n%s", err, stderr.String())
		}
		t.Logf("round %d: killed after %v, %d appends acknowledged", round, killAfter, n)

		// Every acknowledged entry is present, with its content.
		var logs logBuffer
		opts := testOptions(t, dir)
		opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
		l, err := Open(opts)
		if err != nil {
			t.Fatalf("reopen after kill: %v", err)
		}
		size := l.Size()
		recs, err := l.Read(context.Background(), 0, int(size)+1)
		if err != nil {
			t.Fatal(err)
		}
		for idx, id := range acked {
			if idx >= size {
				t.Fatalf("acknowledged index %d missing: log has %d entries", idx, size)
			}
			if recs[idx].Entry.RequestID != id {
				t.Fatalf("index %d holds %q, acknowledged %q", idx, recs[idx].Entry.RequestID, id)
			}
		}
		t.Logf("round %d: reopened with %d entries (%d acknowledged), recovered %d bytes", round, size, len(acked), l.Recovered())
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil {
		t.Fatal(err)
	}
	// A manufactured torn tail is reported and truncated.
	testTornTail(t, dir, []byte{0, 0, 1, 0, '{', '"', 'v'})
}

func TestTornTailReported(t *testing.T) {
	for name, garbage := range map[string][]byte{
		"partial length":   {0, 1},
		"partial record":   {0, 0, 0, 50, '{', '"'},
		"bad length":       {0xff, 0xff, 0xff, 0xff, 1, 2, 3},
		"zero length":      {0, 0, 0, 0, 'x'}, // zeros then data: not padding
		"not an entry":     append([]byte{0, 0, 0, 5}, "hello"...),
		"wrong next index": nil, // filled below
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			l := openTestLog(t, testOptions(t, dir))
			appendN(t, l, 5)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if garbage == nil {
				// A whole entry with the right index but not canonical.
				garbage = appendRecord(nil, []byte(`{"v":1, "index":5}`))
			}
			testTornTail(t, dir, garbage)
		})
	}
}

// testTornTail appends garbage to a closed log's entries file, reopens it
// and checks that the tail is reported, truncated, kept aside, and that the
// log works on.
func testTornTail(t *testing.T, dir string, garbage []byte) {
	t.Helper()
	path := filepath.Join(dir, entriesFile)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(before, garbage...), 0o600); err != nil {
		t.Fatal(err)
	}
	// A crash before may have left a side file at this offset already
	// (a torn batch at the same end): look for the new one.
	pattern := filepath.Join(dir, fmt.Sprintf("entries.torn-%d-*", len(before)))
	earlier, _ := filepath.Glob(pattern)
	var logs logBuffer
	opts := testOptions(t, dir)
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	l := openTestLog(t, opts)
	if l.Recovered() != int64(len(garbage)) {
		t.Fatalf("Recovered() = %d, want %d", l.Recovered(), len(garbage))
	}
	out := logs.String()
	if !strings.Contains(out, "level=WARN") || !strings.Contains(out, "torn tail") ||
		!strings.Contains(out, fmt.Sprintf("offset=%d", len(before))) ||
		!strings.Contains(out, fmt.Sprintf("bytes_dropped=%d", len(garbage))) {
		t.Fatalf("torn tail not reported: %s", out)
	}
	// The records are kept; zeros after them are space allocated ahead.
	after, _ := os.ReadFile(path)
	if string(bytes.TrimRight(after, "\x00")) != string(before) {
		t.Fatalf("entries file not truncated to the last whole entry: %d bytes, want %d", len(after), len(before))
	}
	all, _ := filepath.Glob(pattern)
	var saved []string
	for _, f := range all {
		if !slices.Contains(earlier, f) {
			saved = append(saved, f)
		}
	}
	if len(saved) != 1 {
		t.Fatalf("torn tail not kept: %v (there before: %v)", saved, earlier)
	}
	if b, _ := os.ReadFile(saved[0]); string(b) != string(garbage) {
		t.Fatal("kept torn tail differs")
	}
	size := l.Size()
	appendN(t, l, 1)
	if l.Size() != size+1 {
		t.Fatal("append after recovery")
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil {
		t.Fatal(err)
	}
}

// failWritesForTest makes the log's entries file unwritable: the write
// handle is swapped for one opened O_RDONLY (so the next write fails with
// a real *os.PathError, EBADF — chmod does not stop root), and the probe's
// reopen also yields read-only handles until the returned restore function
// is called.
func failWritesForTest(t *testing.T, l *Log) (restore func()) {
	t.Helper()
	path := filepath.Join(l.opts.Dir, entriesFile)
	orig := l.openEntries
	var mu sync.Mutex
	broken := true
	l.mu.Lock()
	l.openEntries = func() (*os.File, error) {
		mu.Lock()
		defer mu.Unlock()
		if broken {
			return os.Open(path)
		}
		return orig()
	}
	ro, err := os.Open(path)
	if err != nil {
		l.mu.Unlock()
		t.Fatal(err)
	}
	old := l.wf
	l.wf = ro
	l.mu.Unlock()
	_ = old.Close()
	return func() {
		mu.Lock()
		broken = false
		mu.Unlock()
	}
}

func TestUnwritableLogRecovers(t *testing.T) {
	setForTest(t, &probeInterval, 20*time.Millisecond)

	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	ctx := context.Background()
	appendN(t, l, 10)

	restore := failWritesForTest(t, l)
	_, err := l.Append(ctx, testEntry(100))
	var pe *os.PathError
	if !errors.Is(err, ErrUnavailable) || !errors.As(err, &pe) {
		t.Fatalf("Append on an unwritable log: %v", err)
	}
	if err := l.Healthy(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Healthy: %v", err)
	}
	// Later appends fail fast, and the probe keeps failing.
	time.Sleep(100 * time.Millisecond)
	if _, err := l.Append(ctx, testEntry(101)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("second Append: %v", err)
	}
	if l.Size() != 10 {
		t.Fatalf("size %d while failed", l.Size())
	}

	restore()
	deadline := time.Now().Add(5 * time.Second)
	for l.Healthy() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("log did not recover: %v", l.Healthy())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Resumes: concurrent appends, no gap, no duplicate, nothing lost.
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 10 {
				e := testEntry(i)
				e.RequestID = fmt.Sprintf("after-%d-%d", w, i)
				if _, err := l.Append(ctx, e); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	recs, err := l.Read(ctx, 0, 1000)
	if err != nil || len(recs) != 90 {
		t.Fatalf("Read: %d records, %v", len(recs), err)
	}
	seen := map[string]bool{}
	for i, r := range recs {
		if r.Entry.RequestID == "req-100" || r.Entry.RequestID == "req-101" {
			t.Fatalf("refused entry %d was written", i)
		}
		if seen[r.Entry.RequestID] {
			t.Fatalf("duplicate %s", r.Entry.RequestID)
		}
		seen[r.Entry.RequestID] = true
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil || rep.Entries != 90 {
		t.Fatalf("VerifyDir: %+v %v", rep, err)
	}
}

// holdHandler is a slog.Handler that blocks the goroutine logging msg, the
// first time it does, until release is called. It holds a probe between
// its recovery and its return, the window a new failure can fall into.
type holdHandler struct {
	msg        string
	reached    chan struct{} // closed when msg is first logged
	gate       chan struct{}
	first, rel sync.Once
}

func newHoldHandler(msg string) *holdHandler {
	return &holdHandler{msg: msg, reached: make(chan struct{}), gate: make(chan struct{})}
}

func (h *holdHandler) release() { h.rel.Do(func() { close(h.gate) }) }

// wait returns once msg was logged, failing the test after 5s.
func (h *holdHandler) wait(t *testing.T) {
	t.Helper()
	select {
	case <-h.reached:
	case <-time.After(5 * time.Second):
		t.Fatalf("%q never logged", h.msg)
	}
}

func (h *holdHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message == h.msg {
		first := false
		h.first.Do(func() { first = true; close(h.reached) })
		if first {
			<-h.gate
		}
	}
	return nil
}

func (h *holdHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *holdHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *holdHandler) WithGroup(string) slog.Handler            { return h }

// waitHealthy waits up to 5s for the log to accept appends again.
func waitHealthy(t *testing.T, l *Log, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); l.Healthy() != nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the log never recovers: %v", what, l.Healthy())
		}
	}
}

// TestFailureDuringRecovery: the disk fails again after the probe has
// made the log writable but before the probe has returned. That failure
// must start a new probe, or the log refuses appends for good.
func TestFailureDuringRecovery(t *testing.T) {
	setForTest(t, &probeInterval, 20*time.Millisecond)
	dir := t.TempDir()
	opts := testOptions(t, dir)
	h := newHoldHandler("audit log writable again; appends resume")
	opts.Logger = slog.New(h)
	l := openTestLog(t, opts)
	t.Cleanup(h.release) // runs before Close, which waits for the held probe
	ctx := context.Background()
	appendN(t, l, 3)

	restore := failWritesForTest(t, l)
	if _, err := l.Append(ctx, testEntry(100)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append on an unwritable log: %v", err)
	}
	restore()
	h.wait(t) // the probe has recovered and is held before returning
	if err := l.Healthy(); err != nil {
		t.Fatalf("Healthy after recovery: %v", err)
	}
	restore = failWritesForTest(t, l)
	if _, err := l.Append(ctx, testEntry(101)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append on an unwritable log, again: %v", err)
	}
	restore()
	h.release()
	waitHealthy(t, l, "second failure during the first recovery")
	appendN(t, l, 2)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil || rep.Entries != 5 {
		t.Fatalf("VerifyDir: %+v %v", rep, err)
	}
}

// TestPartialBatchTruncated: a batch written but not synced (the fsync
// failed) must not survive recovery, and the indexes are reused.
func TestPartialBatchTruncated(t *testing.T) {
	setForTest(t, &probeInterval, 20*time.Millisecond)
	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	appendN(t, l, 3)
	// Simulate the bytes of a failed batch left in the file.
	f, err := os.OpenFile(filepath.Join(dir, entriesFile), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	e := testEntry(9)
	e.Version, e.Index, e.Node = EntryVersion, 3, "node-1"
	raw, _ := e.MarshalCanonical()
	_, _ = f.Write(appendRecord(nil, raw))
	_ = f.Close()
	l.fail(errors.New("simulated fsync failure"))
	deadline := time.Now().Add(5 * time.Second)
	for l.Healthy() != nil {
		if time.Now().After(deadline) {
			t.Fatal("no recovery")
		}
		time.Sleep(5 * time.Millisecond)
	}
	appendN(t, l, 1)
	recs, _ := l.Read(context.Background(), 0, 10)
	if len(recs) != 4 || recs[3].Entry.RequestID != "req-0" {
		t.Fatalf("after recovery: %d records, last %+v", len(recs), recs[len(recs)-1].Entry)
	}
}

// TestTornCheckpointAndCosignature: a checkpoint or cosignature record cut
// by a crash is reported and dropped; the log opens and works on.
func TestTornCheckpointAndCosignature(t *testing.T) {
	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	appendN(t, l, 3)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{checkpointsFile, cosignaturesFile} {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = f.Write([]byte{0, 0, 1, 0, 'o', 'r'})
		_ = f.Close()
	}
	var logs logBuffer
	witness, _ := GenerateSigner("witness")
	opts := testOptions(t, dir)
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	opts.Witnesses = []*Verifier{witness.Verifier()}
	l2 := openTestLog(t, opts)
	if n := strings.Count(logs.String(), "torn record truncated"); n != 2 {
		t.Fatalf("torn records reported %d times: %s", n, logs.String())
	}
	appendN(t, l2, 2)
	cp, err := l2.PublishCheckpoint()
	if err != nil {
		t.Fatal(err)
	}
	sig, err := Cosign(witness, nil, cp, nil, l2.Verifier())
	if err != nil {
		t.Fatal(err)
	}
	if err := l2.AddCosignature(append(bytes.Clone(cp.Note), sig...)); err != nil {
		t.Fatal(err)
	}
	if got, err := l2.Cosignatures(cp.Size); err != nil || len(got) != 2 {
		t.Fatalf("Cosignatures after repair: %d, %v", len(got), err)
	}
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil || rep.Entries != 5 || rep.Origin != opts.Origin {
		t.Fatalf("VerifyDir: %+v, %v", rep, err)
	}
}

// TestPaddingIsCleanEnd: zeros after the records — space allocated ahead,
// which a crash leaves behind — are not a torn tail; zeros followed by
// data are.
func TestPaddingIsCleanEnd(t *testing.T) {
	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	appendN(t, l, 5)
	path := filepath.Join(dir, entriesFile)
	// The extender works in the background: wait for it (bounded).
	var open os.FileInfo
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if open, err = os.Stat(path); err != nil {
			t.Fatal(err)
		}
		if open.Size() >= defaultPreallocate || time.Now().After(deadline) {
			break
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	closed, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if open.Size() <= closed.Size() {
		t.Errorf("open log's file is %d bytes, closed %d: nothing was allocated ahead", open.Size(), closed.Size())
	}
	records, _ := os.ReadFile(path)
	if len(records) == 0 || records[len(records)-1] == 0 {
		t.Fatal("a closed log ends in padding")
	}
	for i, pad := range []int{1, 3, 4, 5, 1 << 20} {
		if err := os.WriteFile(path, append(bytes.Clone(records), make([]byte, pad)...), 0o600); err != nil {
			t.Fatal(err)
		}
		var logs logBuffer
		opts := testOptions(t, dir)
		opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
		l := openTestLog(t, opts)
		if l.Recovered() != 0 || l.Size() != uint64(5+i) || strings.Contains(logs.String(), "torn") {
			t.Fatalf("%d bytes of padding: recovered %d, size %d, log %s", pad, l.Recovered(), l.Size(), logs.String())
		}
		appendN(t, l, 1)
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil {
			t.Fatalf("%d bytes of padding: %v", pad, err)
		}
		records, _ = os.ReadFile(path)
	}
}
