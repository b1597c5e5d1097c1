package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// memReplica is an in-memory Replicator standing in for the shared store:
// it records what it is given and can be switched to fail.
type memReplica struct {
	mu          sync.Mutex
	fail        bool
	entries     map[uint64][]byte // by index
	calls       int
	checkpoints [][]byte
	err         error // first inconsistency seen (gap or different bytes)
}

func newMemReplica() *memReplica { return &memReplica{entries: map[uint64][]byte{}} }

func (m *memReplica) setFail(f bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fail = f
}

func (m *memReplica) Replicate(_ context.Context, node string, first uint64, entries [][]byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls++
	if m.fail {
		return errors.New("replica unreachable")
	}
	if node != "node-1" {
		m.err = fmt.Errorf("node %q", node)
	}
	if first != uint64(len(m.entries)) && m.err == nil {
		m.err = fmt.Errorf("Replicate(first=%d) but the replica holds %d entries (gap or duplicate)", first, len(m.entries))
	}
	for k, e := range entries {
		i := first + uint64(k)
		if old, ok := m.entries[i]; ok && m.err == nil {
			m.err = fmt.Errorf("index %d replicated twice (same bytes: %v)", i, bytes.Equal(old, e))
		}
		m.entries[i] = bytes.Clone(e)
	}
	return nil
}

func (m *memReplica) PublishCheckpoint(_ context.Context, _ string, note []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail {
		return errors.New("replica unreachable")
	}
	m.checkpoints = append(m.checkpoints, bytes.Clone(note))
	return nil
}

// check verifies that the replica holds exactly the local log's first n
// entries, byte for byte, with no inconsistency seen.
func (m *memReplica) check(t *testing.T, l *Log, n uint64) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		t.Fatal(m.err)
	}
	if uint64(len(m.entries)) != n {
		t.Fatalf("replica holds %d entries, want %d", len(m.entries), n)
	}
	if n == 0 {
		return
	}
	recs, err := l.Read(context.Background(), 0, int(n))
	if err != nil {
		t.Fatal(err)
	}
	if uint64(len(recs)) != n {
		t.Fatalf("local log has %d entries, want %d", len(recs), n)
	}
	for _, r := range recs {
		if !bytes.Equal(m.entries[r.Index], r.Raw) {
			t.Fatalf("entry %d differs: replica %q, log %q", r.Index, m.entries[r.Index], r.Raw)
		}
	}
}

func TestReplicateConcurrent(t *testing.T) {
	rep := newMemReplica()
	opts := testOptions(t, t.TempDir())
	opts.Replicator = rep
	l := openTestLog(t, opts)
	const workers, per = 64, 20
	var wg sync.WaitGroup
	var mu sync.Mutex
	acked := map[uint64]bool{}
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				idx, err := l.Append(context.Background(), testEntry(w*per+i))
				if err != nil {
					errs <- err
					return
				}
				// Acknowledged: it must already be in the replica.
				rep.mu.Lock()
				_, ok := rep.entries[idx]
				rep.mu.Unlock()
				if !ok {
					errs <- fmt.Errorf("entry %d acknowledged before it was replicated", idx)
					return
				}
				mu.Lock()
				acked[idx] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if len(acked) != workers*per {
		t.Fatalf("%d distinct indexes acknowledged, want %d", len(acked), workers*per)
	}
	rep.check(t, l, workers*per)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	// The final checkpoint was published and covers every entry.
	rep.mu.Lock()
	cps := rep.checkpoints
	rep.mu.Unlock()
	if len(cps) == 0 {
		t.Fatal("no checkpoint published")
	}
	cp, err := ParseCheckpoint(cps[len(cps)-1], testSigner(t).Verifier())
	if err != nil {
		t.Fatal(err)
	}
	if cp.Size != workers*per {
		t.Fatalf("published checkpoint size %d, want %d", cp.Size, workers*per)
	}
}

func TestReplicateFailureFailsClosedAndRecovers(t *testing.T) {
	setForTest(t, &probeInterval, 20*time.Millisecond)
	rep := newMemReplica()
	opts := testOptions(t, t.TempDir())
	opts.Replicator = rep
	opts.CheckpointInterval = 10 * time.Millisecond
	l := openTestLog(t, opts)
	ctx := context.Background()
	for i := range 10 {
		if _, err := l.Append(ctx, testEntry(i)); err != nil {
			t.Fatal(err)
		}
	}
	rep.check(t, l, 10)

	// The replica goes away: the batch that meets it is refused (durable
	// locally, not acknowledged), later appends fail fast, Healthy says so.
	rep.setFail(true)
	if _, err := l.Append(ctx, testEntry(10)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append with the replica down: %v, want ErrUnavailable", err)
	}
	if err := l.Healthy(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Healthy with the replica down: %v", err)
	}
	for i := range 5 {
		if _, err := l.Append(ctx, testEntry(11+i)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Append with the replica down: %v, want ErrUnavailable", err)
		}
	}
	if got := l.Size(); got != 11 {
		t.Fatalf("local size %d, want 11 (10 acknowledged + 1 refused after its write)", got)
	}
	rep.mu.Lock()
	n := len(rep.entries)
	rep.mu.Unlock()
	if n != 10 {
		t.Fatalf("replica holds %d entries while failing, want the 10 acknowledged", n)
	}

	// The replica comes back: the probe replicates the pending entry and
	// appends resume by themselves.
	rep.setFail(false)
	deadline := time.Now().Add(5 * time.Second)
	for l.Healthy() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("log still unhealthy after the replica came back: %v", l.Healthy())
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := range 10 {
		if _, err := l.Append(ctx, testEntry(100+i)); err != nil {
			t.Fatal(err)
		}
	}
	rep.check(t, l, 21) // contiguous: no gap, no duplicate index
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rep.mu.Lock()
	cps := rep.checkpoints
	rep.mu.Unlock()
	if len(cps) == 0 {
		t.Fatal("no checkpoint published")
	}
	for _, note := range cps {
		cp, err := ParseCheckpoint(note, testSigner(t).Verifier())
		if err != nil {
			t.Fatal(err)
		}
		if cp.Size > 21 {
			t.Fatalf("checkpoint of size %d published", cp.Size)
		}
	}
	last, _ := ParseCheckpoint(cps[len(cps)-1], testSigner(t).Verifier())
	root, err := l.Root(21)
	if err != nil {
		t.Fatal(err)
	}
	if last.Size != 21 || !bytes.Equal(last.Root, root) {
		t.Fatalf("last published checkpoint: size %d, want 21 with the log's root", last.Size)
	}
}

// Without a Replicator the log behaves as before.
func TestReplicateNilReplicatorUnchanged(t *testing.T) {
	l := openTestLog(t, testOptions(t, t.TempDir()))
	if _, err := l.Append(context.Background(), testEntry(1)); err != nil {
		t.Fatal(err)
	}
}

// TestReplicationFailureDuringRecovery: replication fails again after the
// probe has cleared the failure but before it has returned. That failure
// must start a new probe, or the log refuses appends for good.
func TestReplicationFailureDuringRecovery(t *testing.T) {
	setForTest(t, &probeInterval, 20*time.Millisecond)
	rep := newMemReplica()
	opts := testOptions(t, t.TempDir())
	opts.Replicator = rep
	h := newHoldHandler("audit log: replication works again; appends resume")
	opts.Logger = slog.New(h)
	l := openTestLog(t, opts)
	t.Cleanup(h.release) // runs before Close, which waits for the held probe
	ctx := context.Background()
	appendN(t, l, 3)

	rep.setFail(true)
	if _, err := l.Append(ctx, testEntry(100)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append with the replica down: %v", err)
	}
	rep.setFail(false)
	h.wait(t) // the probe has replicated entry 3 and is held before returning
	rep.setFail(true)
	if _, err := l.Append(ctx, testEntry(101)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append with the replica down, again: %v", err)
	}
	rep.setFail(false)
	h.release()
	waitHealthy(t, l, "second replication failure during the first recovery")
	appendN(t, l, 2)
	rep.check(t, l, 7)
}

// aheadReplica claims more of the node's entries than its local log has.
type aheadReplica struct{ *memReplica }

func (aheadReplica) ReplicatedSize(context.Context, string) (uint64, error) { return 99, nil }

// TestReplicaAheadIsUnavailable: with the replica ahead the log refuses
// appends, and Append and Healthy say so as they document, with an error
// wrapping ErrUnavailable, which also tells why (ErrReplicaAhead).
func TestReplicaAheadIsUnavailable(t *testing.T) {
	opts := testOptions(t, t.TempDir())
	opts.Replicator = aheadReplica{newMemReplica()}
	l := openTestLog(t, opts)
	_, err := l.Append(context.Background(), testEntry(1))
	for what, err := range map[string]error{"Append": err, "Healthy": l.Healthy()} {
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrReplicaAhead) || !errors.Is(err, ErrTampered) {
			t.Errorf("%s with the replica ahead: %v, want ErrUnavailable and ErrReplicaAhead", what, err)
		}
	}
	if n := l.Size(); n != 0 {
		t.Errorf("%d entries written with the replica ahead", n)
	}
}

// sizedReplica is a memReplica that reports how much it holds, as the
// shared store does (ReplicatedSizer), and records the largest call.
type sizedReplica struct {
	*memReplica
	largest int
}

func (r *sizedReplica) ReplicatedSize(context.Context, string) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail {
		return 0, errors.New("replica unreachable")
	}
	return uint64(len(r.entries)), nil
}

func (r *sizedReplica) Replicate(ctx context.Context, node string, first uint64, entries [][]byte) error {
	r.mu.Lock()
	r.largest = max(r.largest, len(entries))
	r.mu.Unlock()
	return r.memReplica.Replicate(ctx, node, first, entries)
}

// TestReplicationCatchUpInChunks: a node whose log was never replicated
// (a single node moved to a shared store) replicates its backlog at Open,
// reading it from the entries file a chunk at a time rather than all at
// once; a replica failing part-way leaves the rest to the probe, and new
// entries follow the backlog in order.
func TestReplicationCatchUpInChunks(t *testing.T) {
	setForTest(t, &catchUpChunk, 7)
	setForTest(t, &probeInterval, 20*time.Millisecond)
	dir := t.TempDir()
	l, err := Open(testOptions(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 100)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	rep := &sizedReplica{memReplica: newMemReplica()}
	opts := testOptions(t, dir)
	opts.Replicator = rep
	l = openTestLog(t, opts)
	rep.check(t, l, 100)
	if rep.largest > 7 {
		t.Errorf("a Replicate call carried %d backlog entries; the backlog is read %d at a time", rep.largest, catchUpChunk)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	// 100 more entries written alone, then the replica fails during the
	// catch-up: Open returns, appends are refused, the probe finishes.
	l, err = Open(testOptions(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 100)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	var failAfter sync.Once
	rep.memReplica.mu.Lock()
	calls := rep.memReplica.calls
	rep.memReplica.mu.Unlock()
	failing := &failingAfter{sizedReplica: rep, after: calls + 3, once: &failAfter}
	opts.Replicator = failing
	l = openTestLog(t, opts)
	if err := l.Healthy(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Healthy with the catch-up cut short: %v", err)
	}
	if _, err := l.Append(context.Background(), testEntry(1)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Append with the catch-up cut short: %v", err)
	}
	rep.mu.Lock()
	part := len(rep.entries)
	rep.mu.Unlock()
	if part <= 100 || part >= 200 {
		t.Fatalf("replica holds %d entries after the cut catch-up, want some of the backlog", part)
	}
	rep.setFail(false)
	waitHealthy(t, l, "catch-up resumed")
	appendN(t, l, 5)
	rep.check(t, l, 205)
}

// failingAfter makes its replica fail from call number after on.
type failingAfter struct {
	*sizedReplica
	after int
	once  *sync.Once
}

func (f *failingAfter) Replicate(ctx context.Context, node string, first uint64, entries [][]byte) error {
	f.mu.Lock()
	n := f.calls
	f.mu.Unlock()
	if n >= f.after {
		f.once.Do(func() { f.setFail(true) })
	}
	return f.sizedReplica.Replicate(ctx, node, first, entries)
}

// stallingReplica is a memReplica whose first Replicate call hangs until
// its context ends, as a write in flight to an etcd leader that died does.
type stallingReplica struct {
	*memReplica
	stalls int
}

func (r *stallingReplica) Replicate(ctx context.Context, node string, first uint64, entries [][]byte) error {
	r.mu.Lock()
	stall := r.stalls > 0
	if stall {
		r.stalls--
	}
	r.mu.Unlock()
	if stall {
		<-ctx.Done()
		return ctx.Err()
	}
	return r.memReplica.Replicate(ctx, node, first, entries)
}

// TestReplicationAttemptTimesOut: a replication attempt that hangs is
// abandoned after replicateAttempt and tried again within
// replicationTimeout, so the append is acknowledged once the store answers
// again, rather than refused after one long wait.
func TestReplicationAttemptTimesOut(t *testing.T) {
	setForTest(t, &replicateAttempt, 50*time.Millisecond)
	rep := &stallingReplica{memReplica: newMemReplica(), stalls: 2}
	opts := testOptions(t, t.TempDir())
	opts.Replicator = rep
	l := openTestLog(t, opts)
	if _, err := l.Append(context.Background(), testEntry(1)); err != nil {
		t.Fatalf("Append with two hung replication attempts: %v", err)
	}
	if err := l.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	rep.check(t, l, 1)
}
