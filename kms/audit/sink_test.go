package audit

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
)

var (
	sinkSignerOnce sync.Once
	sinkSignerVal  *Signer
)

// sinkLog opens a real log in a temporary directory.
func sinkLog(t testing.TB) *Log {
	t.Helper()
	sinkSignerOnce.Do(func() {
		s, err := GenerateSigner("coffre-sink-test")
		if err != nil {
			panic(err)
		}
		sinkSignerVal = s
	})
	l, err := Open(Options{
		Dir:    t.TempDir(),
		Node:   "node-1",
		Origin: "coffre.test/node-1",
		Signer: sinkSignerVal,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func sinkEntry(i int) *Entry {
	e := &Entry{
		Time:      time.Date(2026, 11, 22, 10, 0, 0, i*1000, time.UTC),
		Actor:     Actor{Kind: ActorNode, ID: "worker-7"},
		Operation: "key.generate_data_key",
		Tenant:    "ministry",
		Keyring:   "ministry/payroll",
		Decision:  Allow,
		RequestID: "req-" + strconv.Itoa(i),
	}
	if i%7 == 3 {
		e.Decision, e.Reason = Deny, `policy "pcr7" ] \ mismatch`
	}
	return e
}

// appendEntries appends n entries with a few concurrent writers (group
// commit keeps it fast).
func appendEntries(t testing.TB, l *Log, n int) {
	t.Helper()
	const writers = 8
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += writers {
				if _, err := l.Append(context.Background(), sinkEntry(i)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Append: %v", err)
	}
}

func TestSpoolRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenSpool(dir, "x")
	if err != nil {
		t.Fatal(err)
	}
	if s.Next() != 0 || s.Offset() != 0 {
		t.Fatalf("new spool at %d/%d", s.Next(), s.Offset())
	}
	if err := s.Commit(42, 4096); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(41, 0); err == nil {
		t.Fatal("cursor moved back")
	}
	fi, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("spool mode %v, want 0600", fi.Mode().Perm())
	}
	s2, err := OpenSpool(dir, "x")
	if err != nil {
		t.Fatal(err)
	}
	if s2.Next() != 42 || s2.Offset() != 4096 {
		t.Fatalf("reopened at %d/%d", s2.Next(), s2.Offset())
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(m) != 0 {
		t.Errorf("temporary files left: %v", m)
	}
	for _, bad := range []string{"", "a/b", "..", `a\b`} {
		if _, err := OpenSpool(dir, bad); err == nil {
			t.Errorf("OpenSpool(%q) accepted", bad)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "bad.spool"), []byte("next=1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenSpool(dir, "bad"); err == nil {
		t.Error("bad spool file accepted")
	}
}

func TestParseSpool(t *testing.T) {
	for _, tc := range []struct {
		in   string
		ok   bool
		next uint64
		off  int64
	}{
		{"coffre-audit-spool v1 next=0 offset=0\n", true, 0, 0},
		{"coffre-audit-spool v1 next=18446744073709551615 offset=9223372036854775807\n", true, 1<<64 - 1, 1<<63 - 1},
		{"coffre-audit-spool v1 next=1 offset=0", false, 0, 0},
		{"coffre-audit-spool v1 next=01 offset=0\n", false, 0, 0},
		{"coffre-audit-spool v1 next=-1 offset=0\n", false, 0, 0},
		{"coffre-audit-spool v1 next=1 offset=-1\n", false, 0, 0},
		{"coffre-audit-spool v1 next=18446744073709551616 offset=0\n", false, 0, 0},
		{"coffre-audit-spool v2 next=1 offset=0\n", false, 0, 0},
		{"coffre-audit-spool v1 next=1  offset=0\n", false, 0, 0},
		{"coffre-audit-spool v1 next=1 offset=0 x=1\n", false, 0, 0},
		{"coffre-audit-spool v1 next=1 offset=0\n\n", false, 0, 0},
	} {
		n, o, err := parseSpool([]byte(tc.in))
		if (err == nil) != tc.ok || n != tc.next || o != tc.off {
			t.Errorf("parseSpool(%q) = %d, %d, %v", tc.in, n, o, err)
		}
	}
}

func FuzzParseSpool(f *testing.F) {
	f.Add([]byte("coffre-audit-spool v1 next=7 offset=1024\n"))
	f.Add([]byte("coffre-audit-spool v1 next=0 offset=0\n"))
	f.Add([]byte("coffre-audit-spool v1 next=00 offset=\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, o, err := parseSpool(b)
		if err != nil {
			return
		}
		if o < 0 {
			t.Fatalf("negative offset %d from %q", o, b)
		}
		if got := formatSpool(n, o); string(got) != string(b) {
			t.Fatalf("parse(%q) formats back as %q", b, got)
		}
	})
}

func TestBackoff(t *testing.T) {
	b := backoff{min: 100 * time.Millisecond, max: time.Second}
	prev := time.Duration(0)
	for i := range 20 {
		d := b.next()
		if d < 50*time.Millisecond || d > time.Second {
			t.Fatalf("step %d: %v out of range", i, d)
		}
		prev = d
	}
	if prev < 500*time.Millisecond {
		t.Errorf("backoff did not reach the cap: %v", prev)
	}
	b.reset()
	if d := b.next(); d > 100*time.Millisecond {
		t.Errorf("after reset: %v", d)
	}
}

// sinkWait polls cond until it holds or the deadline passes.
func sinkWait(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func runSink(t testing.TB, run func(context.Context) error) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				err = fmt.Errorf("sink did not stop")
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}
