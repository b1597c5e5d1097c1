package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var (
	testSignerOnce sync.Once
	testSignerVal  *Signer
)

// testSigner returns the tests' log signer, from fixed seeds so that a
// re-executed test binary (TestCrashKill9) signs with the same keys.
func testSigner(testing.TB) *Signer {
	testSignerOnce.Do(func() {
		var ml [32]byte
		copy(ml[:], "coffre test ML-DSA-65 seed......")
		s, err := newSigner("coffre-test-log", []byte("coffre test Ed25519 seed........"), ml)
		if err != nil {
			panic(err)
		}
		testSignerVal = s
	})
	return testSignerVal
}

// logBuffer is a concurrency-safe sink for slog output.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *logBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *logBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

func testOptions(t testing.TB, dir string) Options {
	return Options{
		Dir:    dir,
		Node:   "node-1",
		Origin: "coffre.test/node-1",
		Signer: testSigner(t),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

// setForTest sets a package variable (a probe interval, a chunk size) for
// the test and restores it when the test ends, after the logs the test
// opened afterwards are closed (cleanups run last first), so that no
// goroutine of theirs reads it while it is restored.
func setForTest[T any](t testing.TB, p *T, v T) {
	old := *p
	*p = v
	t.Cleanup(func() { *p = old })
}

func openTestLog(t testing.TB, opts Options) *Log {
	t.Helper()
	l, err := Open(opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func testEntry(i int) *Entry {
	return &Entry{
		Time:      time.Date(2026, 11, 22, 10, 0, 0, i, time.UTC),
		Actor:     Actor{Kind: ActorNode, ID: "worker-7"},
		Operation: "key.generate_data_key",
		Tenant:    "ministry",
		Keyring:   "ministry/payroll",
		Decision:  Allow,
		RequestID: fmt.Sprintf("req-%d", i),
	}
}

func appendN(t testing.TB, l *Log, n int) {
	t.Helper()
	for i := range n {
		if _, err := l.Append(context.Background(), testEntry(i)); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
}

func TestAppendReadSize(t *testing.T) {
	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	ctx := context.Background()
	for i := range 10 {
		e := testEntry(i)
		idx, err := l.Append(ctx, e)
		if err != nil {
			t.Fatal(err)
		}
		if idx != uint64(i) || e.Index != idx || e.Node != "node-1" || e.Version != EntryVersion {
			t.Fatalf("Append %d: index %d, entry %+v", i, idx, e)
		}
	}
	if l.Size() != 10 {
		t.Fatalf("Size %d", l.Size())
	}
	recs, err := l.Read(ctx, 3, 4)
	if err != nil || len(recs) != 4 {
		t.Fatalf("Read: %d, %v", len(recs), err)
	}
	for k, r := range recs {
		if r.Index != uint64(3+k) || r.Entry.Index != r.Index || r.Entry.RequestID != fmt.Sprintf("req-%d", 3+k) {
			t.Fatalf("record %d: %+v", k, r)
		}
		raw, _ := r.Entry.MarshalCanonical()
		if !bytes.Equal(raw, r.Raw) {
			t.Fatalf("record %d: not canonical", k)
		}
	}
	if recs, _ := l.Read(ctx, 8, 100); len(recs) != 2 {
		t.Fatalf("Read at the end: %d records", len(recs))
	}
	if recs, _ := l.Read(ctx, 10, 100); len(recs) != 0 {
		t.Fatalf("Read past the end: %d records", len(recs))
	}
	// Wait returns at once for a smaller size and blocks for the current one.
	if err := l.Wait(ctx, 9); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(20 * time.Millisecond)
		_, _ = l.Append(ctx, testEntry(10))
	}()
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := l.Wait(wctx, 10); err != nil || l.Size() != 11 {
		t.Fatalf("Wait: %v, size %d", err, l.Size())
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(ctx, testEntry(0)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close: %v", err)
	}

	// Reopen: same contents, final checkpoint covers everything.
	l2 := openTestLog(t, testOptions(t, dir))
	if l2.Size() != 11 || l2.Recovered() != 0 {
		t.Fatalf("reopened: size %d recovered %d", l2.Size(), l2.Recovered())
	}
	cp, err := l2.Checkpoint()
	if err != nil || cp.Size != 11 {
		t.Fatalf("checkpoint after reopen: %+v, %v", cp, err)
	}
	rep, err := VerifyDir(dir, testSigner(t).Verifier())
	if err != nil || rep.Entries != 11 || rep.LastSize != 11 {
		t.Fatalf("VerifyDir: %+v, %v", rep, err)
	}
	for _, name := range []string{entriesFile, checkpointsFile, cosignaturesFile} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, %v", name, fi.Mode(), err)
		}
	}
}

func TestAppendRejectsBadEntry(t *testing.T) {
	l := openTestLog(t, testOptions(t, t.TempDir()))
	e := testEntry(0)
	e.Decision = "maybe"
	if _, err := l.Append(context.Background(), e); !errors.Is(err, ErrEntry) {
		t.Fatalf("bad decision: %v", err)
	}
	appendN(t, l, 2)
	if l.Size() != 2 {
		t.Fatalf("a rejected entry used an index: size %d", l.Size())
	}
}

func TestCanonicalRoundTrip(t *testing.T) {
	e := testEntry(42)
	e.Version, e.Index, e.Node = EntryVersion, 7, "n"
	e.EvidenceHashes = []string{"ab", "cd"}
	e.Time = time.Date(2026, 1, 2, 3, 4, 5, 6, time.FixedZone("x", 3600))
	raw, err := e.MarshalCanonical()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseEntry(raw)
	if err != nil {
		t.Fatal(err)
	}
	raw2, _ := got.MarshalCanonical()
	if !bytes.Equal(raw, raw2) || !got.Time.Equal(e.Time) {
		t.Fatalf("round trip:\n%s\n%s", raw, raw2)
	}
	if _, err := ParseEntry(append([]byte(" "), raw...)); err == nil {
		t.Fatal("non-canonical entry accepted")
	}
}

func TestConcurrentAppends(t *testing.T) {
	const writers, each = 64, 200
	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	var mu sync.Mutex
	seen := map[uint64]string{}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				e := testEntry(i)
				e.RequestID = fmt.Sprintf("w%d-%d", w, i)
				idx, err := l.Append(context.Background(), e)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if prev, dup := seen[idx]; dup {
					t.Errorf("index %d acknowledged twice (%s, %s)", idx, prev, e.RequestID)
				}
				seen[idx] = e.RequestID
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	n := uint64(writers * each)
	if l.Size() != n || uint64(len(seen)) != n {
		t.Fatalf("size %d, acknowledged %d, want %d", l.Size(), len(seen), n)
	}
	recs, err := l.Read(context.Background(), 0, int(n))
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for i, r := range recs {
		if r.Index != uint64(i) || seen[r.Index] != r.Entry.RequestID {
			t.Fatalf("record %d: %+v, acknowledged as %q", i, r.Entry, seen[r.Index])
		}
		ids[r.Entry.RequestID] = true
	}
	if len(ids) != int(n) {
		t.Fatalf("%d distinct entries, want %d", len(ids), n)
	}
	st := l.Stats()
	t.Logf("%d appends, %d batches, %d fsyncs", n, st.Batches, st.Fsyncs)
	if st.Fsyncs > n/4 {
		t.Fatalf("%d fsyncs for %d appends: no group commit", st.Fsyncs, n)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil {
		t.Fatal(err)
	}
}

func TestCheckpointsPublished(t *testing.T) {
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.CheckpointEvery = 10
	opts.CheckpointInterval = time.Hour
	l := openTestLog(t, opts)
	appendN(t, l, 25)
	deadline := time.Now().Add(5 * time.Second)
	for {
		cp, _ := l.Checkpoint()
		if cp.Size >= 20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint every 10 entries: latest %d", cp.Size)
		}
		time.Sleep(5 * time.Millisecond)
	}

	opts2 := testOptions(t, t.TempDir())
	opts2.CheckpointInterval = 20 * time.Millisecond
	l2 := openTestLog(t, opts2)
	appendN(t, l2, 3)
	deadline = time.Now().Add(5 * time.Second)
	for {
		cp, err := l2.Checkpoint()
		if err == nil && cp.Size == 3 {
			if _, err := ParseCheckpoint(cp.Note, opts2.Signer.Verifier()); err != nil {
				t.Fatal(err)
			}
			root, _ := l2.Root(3)
			if !bytes.Equal(root, cp.Root) {
				t.Fatal("checkpoint root differs from the tree")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint after the interval: %+v", cp)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLogHoldsNoKeyBytes(t *testing.T) {
	dir := t.TempDir()
	l := openTestLog(t, testOptions(t, dir))
	key := bytes.Repeat([]byte{0xC0, 0xFF, 0xEE, 0x42}, 8) // a 32-byte "key"
	for i := range 20 {
		e := testEntry(i)
		// What the service puts in an entry about a key: its name, version
		// and a hash of the request — never the key.
		e.KeyVersion = 3
		e.EvidenceHashes = []string{fmt.Sprintf("%x", LeafHash(key))}
		if _, err := l.Append(context.Background(), e); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	for _, de := range ents {
		b, err := os.ReadFile(filepath.Join(dir, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, needle := range [][]byte{key, []byte(fmt.Sprintf("%x", key)), []byte(fmt.Sprintf("%X", key))} {
			if bytes.Contains(b, needle) {
				t.Fatalf("%s contains the key bytes", de.Name())
			}
		}
	}
}

func TestOpenTwiceRefused(t *testing.T) {
	dir := t.TempDir()
	openTestLog(t, testOptions(t, dir))
	if l, err := Open(testOptions(t, dir)); err == nil {
		_ = l.Close()
		t.Fatal("a second Open of the same directory succeeded")
	}
}

func TestSignerMarshal(t *testing.T) {
	s := testSigner(t)
	b, err := s.MarshalPrivate()
	if err != nil {
		t.Fatal(err)
	}
	s2, err := ParseSigner(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.Verifier().Marshal(), s2.Verifier().Marshal()) {
		t.Fatal("signer round trip changed the keys")
	}
	path := filepath.Join(t.TempDir(), "signer.key")
	if err := WriteSignerFile(path, s); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", fi.Mode())
	}
	if s3, err := ReadSignerFile(path); err != nil || !bytes.Equal(s3.Verifier().Marshal(), s.Verifier().Marshal()) {
		t.Fatalf("ReadSignerFile: %v", err)
	}
	if err := WriteSignerFile(path, s); err == nil {
		t.Fatal("WriteSignerFile overwrote a key")
	}
	_ = os.Chmod(path, 0o644)
	if _, err := ReadSignerFile(path); err == nil {
		t.Fatal("world-readable key file accepted")
	}
	v, err := ParseVerifier(s.Verifier().Marshal())
	if err != nil {
		t.Fatal(err)
	}
	cp, err := signCheckpoint(s2, "o", 0, hasher.EmptyRoot())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseCheckpoint(cp.Note, v); err != nil {
		t.Fatal(err)
	}
	if str := fmt.Sprintf("%v %+v %#v %s", s, s, s, s); bytes.Contains([]byte(str), b[len(signerHeader):]) ||
		bytes.Contains([]byte(str), s.edPriv.Seed()) {
		t.Fatal("Signer prints its keys")
	}
	// Both signatures are required.
	text, sigs, _ := splitNote(cp.Note)
	for drop := range sigs {
		note := append(bytes.Clone(text), '\n')
		for i, sg := range sigs {
			if i != drop {
				note = append(note, sg.line...)
			}
		}
		if _, err := ParseCheckpoint(note, v); !errors.Is(err, ErrCheckpoint) {
			t.Fatalf("checkpoint without signature %d accepted: %v", drop, err)
		}
	}
}

func TestIndexSplice(t *testing.T) {
	for _, idx := range []uint64{0, 1, 9, 10, 99, 1000, 12345678901234, ^uint64(0)} {
		e := testEntry(3)
		e.Version, e.Node = EntryVersion, "node-1"
		raw0, err := e.MarshalCanonical()
		if err != nil {
			t.Fatal(err)
		}
		e.Index = idx
		want, _ := e.MarshalCanonical()
		buf, payload := appendEntryRecord([]byte("xx"), raw0, idx)
		if !bytes.Equal(payload, want) || !bytes.Equal(buf[2:], appendRecord(nil, want)) {
			t.Fatalf("index %d: %q, want %q", idx, payload, want)
		}
	}
}

func TestAppendCanceledContext(t *testing.T) {
	l := openTestLog(t, testOptions(t, t.TempDir()))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Append(ctx, testEntry(0)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Append with a canceled context: %v", err)
	}
	appendN(t, l, 1)
	cp, err := l.PublishCheckpoint()
	if err != nil || cp.Size != 1 {
		t.Fatalf("PublishCheckpoint: %+v, %v", cp, err)
	}
	if _, err := ParseCheckpoint(cp.Note, l.Verifier()); err != nil {
		t.Fatal(err)
	}
}

// TestFlushHistogram: a flush lands in the first bucket whose bound it does
// not exceed, Quantile names that bound, and a real log counts one flush
// per group commit.
func TestFlushHistogram(t *testing.T) {
	var h flushHist
	for _, d := range []time.Duration{0, 50 * time.Microsecond, 51 * time.Microsecond, 900 * time.Microsecond, 2 * time.Second} {
		h.observe(d)
	}
	s := h.snapshot()
	want := [len(FlushBuckets) + 1]uint64{0: 2, 1: 1, 7: 1, len(FlushBuckets): 1}
	if s.Counts != want {
		t.Fatalf("counts %v, want %v", s.Counts, want)
	}
	if s.Sum != 2*time.Second+1001*time.Microsecond {
		t.Fatalf("sum %v", s.Sum)
	}
	for _, tc := range []struct {
		q    float64
		want time.Duration
	}{{0.2, 50 * time.Microsecond}, {0.4, 50 * time.Microsecond}, {0.6, 100 * time.Microsecond}, {0.8, time.Millisecond}, {1, -1}} {
		if got := s.Quantile(tc.q); got != tc.want {
			t.Errorf("Quantile(%v) = %v, want %v", tc.q, got, tc.want)
		}
	}
	if got := (FlushHistogram{}).Quantile(0.99); got != 0 {
		t.Errorf("Quantile of nothing = %v", got)
	}

	l := openTestLog(t, testOptions(t, t.TempDir()))
	for i := range 5 {
		if _, err := l.Append(context.Background(), testEntry(i)); err != nil {
			t.Fatal(err)
		}
	}
	st := l.Stats()
	var n uint64
	for _, c := range st.Flush.Counts {
		n += c
	}
	if n != st.Batches || n != 5 || st.Flush.Sum <= 0 {
		t.Fatalf("%d flushes counted (sum %v) for %d batches, want 5", n, st.Flush.Sum, st.Batches)
	}
}
