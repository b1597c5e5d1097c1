package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// rfc6962Root recomputes the Merkle tree hash (RFC 6962 §2.1) of the
// entries from their canonical bytes alone.
func rfc6962Root(entries [][]byte) []byte {
	if len(entries) == 0 {
		h := sha256.Sum256(nil)
		return h[:]
	}
	if len(entries) == 1 {
		return audit.LeafHash(entries[0])
	}
	k := 1 << (bits.Len(uint(len(entries)-1)) - 1) // largest power of 2 < n
	h := sha256.New()
	h.Write([]byte{1})
	h.Write(rfc6962Root(entries[:k]))
	h.Write(rfc6962Root(entries[k:]))
	return h.Sum(nil)
}

func TestAuditReplicaEtcd(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 1)
	st, err := store.OpenEtcd(ctxT(t), store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-audit/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	testAuditReplica(t, st)
}

func TestAuditReplicaBolt(t *testing.T) {
	st := openBoltT(t)
	testAuditReplica(t, st)
}

func testAuditReplica(t *testing.T, st store.Store) {
	ctx := ctxT(t)
	const node = "node-7"
	signer, err := audit.GenerateSigner("coffre-replica-test")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "audit")
	l, err := audit.Open(audit.Options{
		Dir:        dir,
		Node:       node,
		Origin:     "coffre.test/" + node,
		Signer:     signer,
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		Replicator: StoreAuditReplica{Store: st},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	const workers, per = 8, 100 / 8
	total := workers * per
	extra := 100 - total
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		n := per
		if w == 0 {
			n += extra
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				e := &audit.Entry{
					Time:      time.Date(2026, 11, 22, 10, 0, 0, w*1000+i, time.UTC),
					Actor:     audit.Actor{Kind: audit.ActorNode, ID: fmt.Sprintf("worker-%d", w)},
					Operation: "key.generate_data_key",
					Keyring:   "ministry/payroll",
					Decision:  audit.Allow,
					RequestID: fmt.Sprintf("req-%d-%d", w, i),
				}
				if _, err := l.Append(ctx, e); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	got, err := ReadReplicatedAudit(ctx, st, node)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 100 {
		t.Fatalf("replica holds %d entries, want 100", len(got))
	}
	recs, err := l.Read(ctx, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 100 {
		t.Fatalf("local log holds %d entries, want 100", len(recs))
	}
	for i, r := range recs {
		if r.Index != uint64(i) || !bytes.Equal(got[i], r.Raw) {
			t.Fatalf("entry %d: replica %q, local %q", i, got[i], r.Raw)
		}
	}
	localRoot, err := l.Root(100)
	if err != nil {
		t.Fatal(err)
	}
	proof37, err := l.InclusionProof(37, 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil { // publishes the final checkpoint
		t.Fatal(err)
	}

	// The node is lost: its disk with the log is gone.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	after, err := ReadReplicatedAudit(ctx, st, node)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != 100 {
		t.Fatalf("after the node's loss the store holds %d entries, want 100", len(after))
	}
	for i := range after {
		if !bytes.Equal(after[i], got[i]) {
			t.Fatalf("entry %d changed", i)
		}
	}
	note, err := ReplicatedAuditCheckpoint(ctx, st, node)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := audit.ParseCheckpoint(note, signer.Verifier())
	if err != nil {
		t.Fatal(err)
	}
	if cp.Size != 100 {
		t.Fatalf("replicated checkpoint size %d, want 100", cp.Size)
	}
	root := rfc6962Root(after)
	if !bytes.Equal(cp.Root, root) || !bytes.Equal(root, localRoot) {
		t.Fatalf("replicated checkpoint root %x, recomputed %x, local %x", cp.Root, root, localRoot)
	}
	// A proof the node handed out before it was lost still verifies
	// against the replicated entry and checkpoint.
	if err := audit.VerifyInclusion(after[37], 37, 100, proof37, cp.Root); err != nil {
		t.Fatal(err)
	}
	// The whole replicated log verifies, its history included.
	rep, err := VerifyReplicatedAudit(ctx, st, node, []*audit.Verifier{signer.Verifier()})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Entries != 100 || rep.LatestSize != 100 || !bytes.Equal(rep.Root, localRoot) || rep.Checkpoints < 2 {
		t.Fatalf("verified replica: %+v", rep)
	}
}

func TestAuditReplicaRetryAndGap(t *testing.T) {
	st := openBoltT(t)
	ctx := context.Background()
	r := StoreAuditReplica{Store: st}
	entry := func(i uint64) []byte {
		e := audit.Entry{Version: audit.EntryVersion, Index: i, Time: time.Unix(1, 0).UTC(), Node: "n",
			Actor: audit.Actor{Kind: audit.ActorSystem, ID: "x"}, Operation: "op", Decision: audit.Allow}
		b, err := e.MarshalCanonical()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b0 := [][]byte{entry(0), entry(1)}
	if err := r.Replicate(ctx, "n", 0, b0); err != nil {
		t.Fatal(err)
	}
	// A retry after an unknown outcome: same bytes, success.
	if err := r.Replicate(ctx, "n", 0, b0); err != nil {
		t.Fatalf("identical retry: %v", err)
	}
	// Different bytes at the same index: refused.
	if err := r.Replicate(ctx, "n", 0, [][]byte{entry(0)}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("conflicting batch: %v, want ErrConflict", err)
	}
	// A gap is named.
	if err := r.Replicate(ctx, "n", 5, [][]byte{entry(5)}); err != nil {
		t.Fatal(err)
	}
	_, err := ReadReplicatedAudit(ctx, st, "n")
	if err == nil || !strings.Contains(err.Error(), "entries 2..4 missing") {
		t.Fatalf("gap: %v", err)
	}
	if err := r.Replicate(ctx, "bad/node", 0, b0); err == nil {
		t.Fatal("node id with a slash accepted")
	}
}

// TestAuditBatchFormat: batches are stored compressed, a release-like
// batch at a fraction of its size; values in the earlier uncompressed
// format are still read and count as the same batch on a retry; a value
// that would decompress past the store's limit is refused.
func TestAuditBatchFormat(t *testing.T) {
	st := openBoltT(t)
	ctx := context.Background()
	r := StoreAuditReplica{Store: st}

	// 64 release entries of one session, as one group commit makes them.
	var batch [][]byte
	raw := 0
	for i := range 64 {
		e := audit.Entry{Version: audit.EntryVersion, Index: uint64(i), Time: time.Date(2026, 11, 23, 2, 0, 0, i*7919, time.UTC), Node: "node-a",
			Actor: audit.Actor{Kind: audit.ActorNode, ID: "storage-17.qc.gouv"}, Operation: "key.generate_data_key",
			Tenant: "acme", Keyring: "acme/disks", KeyVersion: 3, Decision: audit.Allow,
			EvidenceHashes: []string{"3be78a6ee81dcb166bdcda7a02566080c9b641bf85ae960ba22b85bab7a0712e"},
			RequestID:      fmt.Sprintf("01JD%022d", i*104729)}
		b, err := e.MarshalCanonical()
		if err != nil {
			t.Fatal(err)
		}
		batch = append(batch, b)
		raw += len(b)
	}
	if err := r.Replicate(ctx, "node-a", 0, batch); err != nil {
		t.Fatal(err)
	}
	kv, err := st.Get(ctx, auditBatchKey("audit/node-a/", 0))
	if err != nil {
		t.Fatal(err)
	}
	if kv.Value[0] != auditBatchZstd || len(kv.Value)*4 > raw {
		t.Fatalf("stored batch: format %d, %d bytes for %d bytes of entries: want format %d and under a quarter", kv.Value[0], len(kv.Value), raw, auditBatchZstd)
	}
	t.Logf("64 release entries: %d bytes, stored in %d", raw, len(kv.Value))
	got, err := ReadReplicatedAudit(ctx, st, "node-a")
	if err != nil || !slices.EqualFunc(got, batch, bytes.Equal) {
		t.Fatalf("read back: %v (%d entries)", err, len(got))
	}

	// The uncompressed format, as an earlier version wrote it.
	v1 := []byte{auditBatchRaw}
	for _, e := range batch[:2] {
		v1 = binary.BigEndian.AppendUint32(v1, uint32(len(e)))
		v1 = append(v1, e...)
	}
	if _, err := st.CompareAndSwap(ctx, auditBatchKey("audit/node-b/", 0), 0, v1); err != nil {
		t.Fatal(err)
	}
	if n, err := r.ReplicatedSize(ctx, "node-b"); err != nil || n != 2 {
		t.Fatalf("ReplicatedSize of an uncompressed batch = %d, %v; want 2", n, err)
	}
	if err := r.Replicate(ctx, "node-b", 0, batch[:2]); err != nil {
		t.Fatalf("retry over the same batch in the earlier format: %v", err)
	}
	if err := r.Replicate(ctx, "node-b", 0, batch[1:3]); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("other entries over an uncompressed batch: %v, want ErrConflict", err)
	}

	// A small value that decompresses past the limit.
	bomb := batchEncoder.EncodeAll(make([]byte, store.MaxValueSize+1), []byte{auditBatchZstd})
	if len(bomb) > 1<<10 {
		t.Fatalf("bomb is %d bytes", len(bomb))
	}
	if _, err := decodeAuditBatch(bomb); err == nil {
		t.Fatal("a batch decompressing past the store's limit was accepted")
	}
	for _, bad := range [][]byte{nil, {3, 0}, {auditBatchZstd, 1, 2, 3}} {
		if _, err := decodeAuditBatch(bad); err == nil {
			t.Fatalf("decodeAuditBatch(%x) accepted", bad)
		}
	}
}

// openTestAuditLog opens a real audit log for node, replicated to st if st
// is not nil, that checkpoints only when asked (or on Close).
func openTestAuditLog(t *testing.T, st store.Store, node string, signer *audit.Signer) *audit.Log {
	t.Helper()
	opts := audit.Options{
		Dir:                filepath.Join(t.TempDir(), "audit"),
		Node:               node,
		Origin:             "coffre.test/" + node,
		Signer:             signer,
		CheckpointInterval: time.Hour,
		CheckpointEvery:    1 << 40,
		Logger:             slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if st != nil {
		opts.Replicator = StoreAuditReplica{Store: st}
	}
	l, err := audit.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// appendAudit appends n entries whose reason starts with tag.
func appendAudit(t *testing.T, l *audit.Log, tag string, n int) {
	t.Helper()
	for i := range n {
		e := &audit.Entry{Time: time.Date(2026, 11, 22, 10, 0, 0, i, time.UTC),
			Actor: audit.Actor{Kind: audit.ActorSystem, ID: "test"}, Operation: "test.op", Decision: audit.Allow,
			Reason: fmt.Sprintf("%s-%d", tag, i)}
		if _, err := l.Append(ctxT(t), e); err != nil {
			t.Fatal(err)
		}
	}
}

func checkpointSizes(t *testing.T, st store.Store, node string) []uint64 {
	t.Helper()
	kvs, err := st.List(ctxT(t), "audit/"+node+"/checkpoints/")
	if err != nil {
		t.Fatal(err)
	}
	var out []uint64
	for _, kv := range kvs {
		var s uint64
		if _, err := fmt.Sscanf(strings.TrimPrefix(kv.Key, "audit/"+node+"/checkpoints/"), "%d", &s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	return out
}

// TestAuditReplicaCheckpointHistory: every published checkpoint lands in
// the history; only the first of each power-of-two range and the latest
// AuditRecentCheckpoints stay; the same checkpoint again (other signature
// lines) is fine; another checkpoint of a retained size, or a smaller one
// than the latest, is refused as a fork.
func TestAuditReplicaCheckpointHistory(t *testing.T) {
	st := openBoltT(t)
	ctx := ctxT(t)
	const node = "node-h"
	signer, err := audit.GenerateSigner("node-h")
	if err != nil {
		t.Fatal(err)
	}
	r := StoreAuditReplica{Store: st}
	l := openTestAuditLog(t, nil, node, signer)
	var notes [][]byte
	for size := 1; size <= 40; size++ {
		appendAudit(t, l, "h", 1)
		cp, err := l.PublishCheckpoint()
		if err != nil || cp.Size != uint64(size) {
			t.Fatalf("checkpoint %d: %v, %v", size, cp.Size, err)
		}
		if err := r.PublishCheckpoint(ctx, node, cp.Note); err != nil {
			t.Fatalf("publish %d: %v", size, err)
		}
		notes = append(notes, cp.Note)
	}
	want := []uint64{1, 2, 4, 8, 16, 32, 33, 34, 35, 36, 37, 38, 39, 40}
	if got := checkpointSizes(t, st, node); !slices.Equal(got, want) {
		t.Fatalf("retained checkpoint sizes %v, want %v", got, want)
	}
	latest, err := ReplicatedAuditCheckpoint(ctx, st, node)
	if err != nil || !bytes.Equal(latest, notes[39]) {
		t.Fatalf("latest checkpoint: %v", err)
	}
	total := 0
	kvs, err := st.List(ctx, "audit/"+node+"/")
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range kvs {
		total += len(kv.Value)
	}
	t.Logf("one note is %d bytes; the node's %d checkpoint keys hold %d bytes", len(notes[0]), len(kvs), total)

	// The latest again, with a witness's signature line added: same text.
	cosigned := append(bytes.Clone(notes[39]), []byte("— witness.test AAAAAAAAAAA=\n")...)
	if err := r.PublishCheckpoint(ctx, node, cosigned); err != nil {
		t.Fatalf("same checkpoint with another signature line: %v", err)
	}
	// Rollback: an older checkpoint after a newer one.
	if err := r.PublishCheckpoint(ctx, node, notes[20]); !errors.Is(err, ErrAuditReplicaFork) || !errors.Is(err, store.ErrConflict) {
		t.Fatalf("rolled-back checkpoint: %v", err)
	}
	// A second history signed by the same key, reaching size 41 before the
	// true log does.
	fork := openTestAuditLog(t, nil, node, signer)
	appendAudit(t, fork, "other", 41)
	forged, err := fork.PublishCheckpoint()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.PublishCheckpoint(ctx, node, forged.Note); err != nil {
		t.Fatal(err) // the store cannot tell yet: size 41 is new
	}
	appendAudit(t, l, "h", 1)
	cp41, err := l.PublishCheckpoint()
	if err != nil {
		t.Fatal(err)
	}
	err = r.PublishCheckpoint(ctx, node, cp41.Note)
	if !errors.Is(err, ErrAuditReplicaFork) || !errors.Is(err, store.ErrConflict) || !strings.Contains(err.Error(), "another checkpoint of size 41") {
		t.Fatalf("second checkpoint of size 41: %v", err)
	}
	if err := r.PublishCheckpoint(ctx, node, []byte("not a note")); err == nil {
		t.Fatal("garbage note published")
	}
}

// twoNodeAudit replicates two nodes' real audit logs to a real embedded
// etcd, each checkpointed at several sizes.
type twoNodeAudit struct {
	st             store.Store
	signA, signB   *audit.Signer
	rootA, rootB   []byte
	sizeA, sizeB   uint64
	verifiers      []*audit.Verifier // B's key first
	forgedAtSize11 audit.Checkpoint  // signed by A's key over another history
}

func newTwoNodeAudit(t *testing.T) *twoNodeAudit {
	cluster := etcdtest.StartCluster(t, 1)
	st, err := store.OpenEtcd(ctxT(t), store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-audit/"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &twoNodeAudit{st: st}
	if f.signA, err = audit.GenerateSigner("node-a.audit"); err != nil {
		t.Fatal(err)
	}
	if f.signB, err = audit.GenerateSigner("node-b.audit"); err != nil {
		t.Fatal(err)
	}
	f.verifiers = []*audit.Verifier{f.signB.Verifier(), f.signA.Verifier()}
	run := func(node string, s *audit.Signer, rounds []int) ([]byte, uint64) {
		l := openTestAuditLog(t, st, node, s)
		for i, n := range rounds {
			appendAudit(t, l, fmt.Sprintf("%s-r%d", node, i), n)
			if _, err := l.PublishCheckpoint(); err != nil {
				t.Fatal(err)
			}
		}
		size := l.Size()
		root, err := l.Root(size)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		return root, size
	}
	f.rootA, f.sizeA = run("node-a", f.signA, []int{3, 9, 20, 13})
	f.rootB, f.sizeB = run("node-b", f.signB, []int{5, 5, 5, 5, 5})
	fork := openTestAuditLog(t, nil, "node-a", f.signA)
	appendAudit(t, fork, "forged", 11)
	if f.forgedAtSize11, err = fork.PublishCheckpoint(); err != nil || f.forgedAtSize11.Size != 11 {
		t.Fatalf("forged checkpoint: %v", err)
	}
	return f
}

func (f *twoNodeAudit) verifyAll(t *testing.T) map[string]AuditReplicaResult {
	t.Helper()
	res, err := VerifyReplicatedAudits(ctxT(t), f.st, f.verifiers)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]AuditReplicaResult{}
	for _, r := range res {
		out[r.Node] = r
	}
	if len(res) != 2 || out["node-a"].Node == "" || out["node-b"].Node == "" {
		t.Fatalf("results for %d nodes: %+v", len(res), res)
	}
	return out
}

// tamper changes the store with do and restores key's value (or absence)
// when the test ends.
// alterBatch returns batch value v re-encoded, as a writer with the store's
// credentials could, with the first old in its entries replaced by new (v
// itself if old is in none).
func alterBatch(t *testing.T, v []byte, old, new string) []byte {
	t.Helper()
	entries, err := decodeAuditBatch(v)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range entries {
		if altered := bytes.Replace(e, []byte(old), []byte(new), 1); !bytes.Equal(altered, e) {
			entries[i] = altered
			out, err := encodeAuditBatch(entries)
			if err != nil {
				t.Fatal(err)
			}
			return out
		}
	}
	return v
}

func tamper(t *testing.T, st store.Store, key string, do func(kv store.KV) error) {
	t.Helper()
	ctx := ctxT(t)
	kv, err := st.Get(ctx, key)
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		t.Fatal(err)
	}
	existed := err == nil
	if err := do(kv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		if existed {
			if _, err := st.Put(ctx, key, kv.Value); err != nil {
				t.Error(err)
			}
		} else if err := st.Delete(ctx, key, 0); err != nil {
			t.Error(err)
		}
	})
}

func wantReplicaErr(t *testing.T, err error, node string, kind error, detail ...string) *AuditReplicaError {
	t.Helper()
	var re *AuditReplicaError
	if !errors.As(err, &re) || !errors.Is(err, kind) || re.Node != node {
		t.Fatalf("error %v, want %v on node %s", err, kind, node)
	}
	for _, d := range detail {
		if !strings.Contains(re.Detail, d) {
			t.Fatalf("error %q does not say %q", re.Detail, d)
		}
	}
	return re
}

// TestAuditVerifyAllNodes: two nodes' logs replicated to a real etcd
// verify, each with its own key among several trusted ones; then a forged
// historical checkpoint (validly signed by the node's key over another
// history), a deleted batch, an edited entry, a removed tail and unknown
// keys are each caught and blamed on the right node, the other node still
// verifying.
func TestAuditVerifyAllNodes(t *testing.T) {
	f := newTwoNodeAudit(t)
	ctx := ctxT(t)
	b64 := base64.StdEncoding.EncodeToString

	res := f.verifyAll(t)
	for node, want := range map[string]struct {
		size uint64
		root []byte
		key  int
	}{"node-a": {f.sizeA, f.rootA, 1}, "node-b": {f.sizeB, f.rootB, 0}} {
		r := res[node]
		if r.Err != nil {
			t.Fatalf("%s: %v", node, r.Err)
		}
		rep := r.Report
		if rep.Entries != want.size || rep.LatestSize != want.size || !bytes.Equal(rep.Root, want.root) ||
			!bytes.Equal(rep.LatestRoot, want.root) || rep.Verifier != want.key || rep.Origin != "coffre.test/"+node {
			t.Fatalf("%s: report %+v, want size %d key %d", node, rep, want.size, want.key)
		}
		if rep.Checkpoints < 4 {
			t.Fatalf("%s: %d checkpoints verified, want the history too", node, rep.Checkpoints)
		}
		if root, err := rep.RootAt(want.size); err != nil || !bytes.Equal(root, want.root) {
			t.Fatalf("%s: RootAt: %v", node, err)
		}
	}
	if got := checkpointSizes(t, f.st, "node-a"); !slices.Equal(got, []uint64{0, 3, 12, 32, 45}) {
		t.Fatalf("node-a retained checkpoints %v", got)
	}
	one, err := VerifyReplicatedAudit(ctx, f.st, "node-b", f.verifiers)
	if err != nil || one.Entries != f.sizeB {
		t.Fatalf("one node: %+v, %v", one, err)
	}
	if _, err := VerifyReplicatedAudit(ctx, f.st, "node-z", f.verifiers); !errors.Is(err, ErrAuditReplicaGap) {
		t.Fatalf("unknown node: %v", err)
	}

	t.Run("ForgedHistoricalCheckpoint", func(t *testing.T) {
		// The replica refuses it on the way in: it is older than the latest.
		if err := (StoreAuditReplica{Store: f.st}).PublishCheckpoint(ctx, "node-a", f.forgedAtSize11.Note); !errors.Is(err, ErrAuditReplicaFork) {
			t.Fatalf("publishing the forged checkpoint: %v", err)
		}
		// Written behind its back, verification finds the fork.
		tamper(t, f.st, "audit/node-a/checkpoints/00000000000000000011", func(store.KV) error {
			_, err := f.st.Put(ctx, "audit/node-a/checkpoints/00000000000000000011", f.forgedAtSize11.Note)
			return err
		})
		res := f.verifyAll(t)
		if res["node-b"].Err != nil {
			t.Fatalf("node-b: %v", res["node-b"].Err)
		}
		real11, err := res2root(t, f, 11)
		if err != nil {
			t.Fatal(err)
		}
		re := wantReplicaErr(t, res["node-a"].Err, "node-a", ErrAuditReplicaFork,
			fmt.Sprintf("fork at size 11: root %s in the checkpoint, %s recomputed", b64(f.forgedAtSize11.Root), b64(real11)),
			"the checkpoint at size 12 matches the entries: the node signed two histories")
		if re.Size != 11 {
			t.Fatalf("fork size %d", re.Size)
		}
	})

	t.Run("DeletedBatch", func(t *testing.T) {
		kvs, err := f.st.List(ctx, "audit/node-b/entries/")
		if err != nil || len(kvs) < 3 {
			t.Fatalf("node-b batches: %d, %v", len(kvs), err)
		}
		mid := kvs[1]
		tamper(t, f.st, mid.Key, func(store.KV) error { return f.st.Delete(ctx, mid.Key, 0) })
		res := f.verifyAll(t)
		if res["node-a"].Err != nil {
			t.Fatalf("node-a: %v", res["node-a"].Err)
		}
		// One writer: each entry was its own batch.
		re := wantReplicaErr(t, res["node-b"].Err, "node-b", ErrAuditReplicaGap, "gap: entries 1..1 missing (next batch starts at 2)")
		if re.Index != 1 {
			t.Fatalf("gap at %d", re.Index)
		}
	})

	t.Run("EditedEntry", func(t *testing.T) {
		kvs, err := f.st.List(ctx, "audit/node-a/entries/")
		if err != nil || len(kvs) == 0 {
			t.Fatal(err)
		}
		last := kvs[len(kvs)-1] // entry 44
		tamper(t, f.st, last.Key, func(kv store.KV) error {
			altered := alterBatch(t, kv.Value, `"test.op"`, `"tset.op"`)
			if bytes.Equal(altered, kv.Value) {
				return errors.New("nothing altered")
			}
			_, err := f.st.Put(ctx, kv.Key, altered)
			return err
		})
		res := f.verifyAll(t)
		if res["node-b"].Err != nil {
			t.Fatalf("node-b: %v", res["node-b"].Err)
		}
		wantReplicaErr(t, res["node-a"].Err, "node-a", ErrAuditReplicaFork, "fork at size 45: root ", "an entry in [32, 45) was altered")

		// Made unparsable, the entry itself is named.
		tamper(t, f.st, last.Key, func(kv store.KV) error {
			altered := alterBatch(t, kv.Value, `{"v":1`, `["v":1`)
			if bytes.Equal(altered, kv.Value) {
				return errors.New("nothing altered")
			}
			_, err := f.st.Put(ctx, kv.Key, altered)
			return err
		})
		re := wantReplicaErr(t, f.verifyAll(t)["node-a"].Err, "node-a", ErrAuditReplicaEntry, "entry 44 does not parse")
		if re.Index != 44 {
			t.Fatalf("bad entry index %d", re.Index)
		}
	})

	t.Run("RemovedTail", func(t *testing.T) {
		kvs, err := f.st.List(ctx, "audit/node-b/entries/")
		if err != nil {
			t.Fatal(err)
		}
		last := kvs[len(kvs)-1]
		tamper(t, f.st, last.Key, func(store.KV) error { return f.st.Delete(ctx, last.Key, 0) })
		wantReplicaErr(t, f.verifyAll(t)["node-b"].Err, "node-b", ErrAuditReplicaFork,
			"the latest checkpoint covers 25 entries but only 24 are replicated")
	})

	t.Run("WrongKeys", func(t *testing.T) {
		other, err := audit.GenerateSigner("node-a.audit") // same name, other keys
		if err != nil {
			t.Fatal(err)
		}
		res, err := VerifyReplicatedAudits(ctx, f.st, []*audit.Verifier{other.Verifier(), f.signB.Verifier()})
		if err != nil || len(res) != 2 {
			t.Fatal(err)
		}
		wantReplicaErr(t, res[0].Err, "node-a", ErrAuditReplicaCheckpoint, "signature: the latest checkpoint verifies with none of the 2 trusted keys")
		if res[1].Err != nil {
			t.Fatalf("node-b: %v", res[1].Err)
		}
		// A retained checkpoint signed by another key than the latest.
		sneaky := openTestAuditLog(t, nil, "node-a", other)
		appendAudit(t, sneaky, "x", 7)
		cp, err := sneaky.PublishCheckpoint()
		if err != nil {
			t.Fatal(err)
		}
		key := "audit/node-a/checkpoints/00000000000000000007"
		tamper(t, f.st, key, func(store.KV) error { _, err := f.st.Put(ctx, key, cp.Note); return err })
		wantReplicaErr(t, f.verifyAll(t)["node-a"].Err, "node-a", ErrAuditReplicaCheckpoint, "signature: retained checkpoint of size 7")
	})

	t.Run("UnexpectedKey", func(t *testing.T) {
		key := "audit/node-b/entries/7"
		tamper(t, f.st, key, func(store.KV) error { _, err := f.st.Put(ctx, key, []byte{1}); return err })
		wantReplicaErr(t, f.verifyAll(t)["node-b"].Err, "node-b", ErrAuditReplicaGap, `unexpected key "audit/node-b/entries/7"`)
	})

	// Every tampering was undone: both verify again.
	for node, r := range f.verifyAll(t) {
		if r.Err != nil {
			t.Fatalf("%s after restore: %v", node, r.Err)
		}
	}
}

// res2root recomputes node-a's replicated root at size.
func res2root(t *testing.T, f *twoNodeAudit, size uint64) ([]byte, error) {
	t.Helper()
	entries, err := ReadReplicatedAudit(ctxT(t), f.st, "node-a")
	if err != nil {
		return nil, err
	}
	return rfc6962Root(entries[:size]), nil
}

func FuzzDecodeAuditBatch(f *testing.F) {
	v, _ := encodeAuditBatch([][]byte{[]byte(`{"a":1}`), nil, []byte("x")})
	f.Add(v)
	f.Add([]byte{1, 0, 0, 0})
	f.Add([]byte{1, 0, 0, 0, 1, 'x'}) // the uncompressed format
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > store.MaxValueSize {
			return // the store holds no larger value
		}
		entries, err := decodeAuditBatch(b)
		if err != nil {
			return
		}
		again, err := encodeAuditBatch(entries)
		if err != nil {
			t.Fatalf("decoded batch does not encode: %v", err)
		}
		back, err := decodeAuditBatch(again)
		if err != nil || !slices.EqualFunc(back, entries, bytes.Equal) {
			t.Fatalf("batch does not round-trip: %v", err)
		}
	})
}

func FuzzCheckpointText(f *testing.F) {
	f.Add([]byte("coffre.test/n\n12\nAAAA\n\n— n AAAA\n"))
	f.Add([]byte("o\n01\nr\n\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		text, size, err := checkpointText(b)
		if err != nil {
			return
		}
		if !bytes.HasPrefix(b, text) || !strings.Contains(string(text), fmt.Sprintf("\n%d\n", size)) {
			t.Fatalf("text %q size %d from %q", text, size, b)
		}
	})
}

func FuzzDecodeRecent(f *testing.F) {
	f.Add(encodeRecent([]recentCheckpoint{{1, true}, {2, false}, {1 << 40, true}}))
	f.Add([]byte{1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		rs, err := decodeRecent(b)
		if err != nil {
			return
		}
		if !bytes.Equal(encodeRecent(rs), b) {
			t.Fatalf("recent value does not round-trip")
		}
	})
}

// TestAuditReplicaCatchUp: entries a node wrote but did not replicate
// before it stopped (here: written while the log had no replicator, as a
// node does when it dies between its local fsync and the replica write)
// are replicated when the log opens again, before any new append is
// acknowledged; a replica holding more than the local log (a local log
// restored from an old copy) refuses appends.
func TestAuditReplicaCatchUp(t *testing.T) {
	st := openBoltT(t)
	ctx := context.Background()
	signer, err := audit.GenerateSigner("n1")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "audit")
	open := func(replica bool) *audit.Log {
		opts := audit.Options{Dir: dir, Node: "n1", Origin: "coffre.test/n1", Signer: signer,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
		if replica {
			opts.Replicator = StoreAuditReplica{Store: st}
		}
		l, err := audit.Open(opts)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	l := open(true)
	appendAudit(t, l, "replicated", 5)
	l.Close()
	l = open(false)
	appendAudit(t, l, "local-only", 3)
	l.Close()
	if n, err := (StoreAuditReplica{Store: st}).ReplicatedSize(ctx, "n1"); err != nil || n != 5 {
		t.Fatalf("before catch-up the replica holds %d entries (%v), want 5", n, err)
	}

	l = open(true)
	defer l.Close()
	if err := l.Healthy(); err != nil {
		t.Fatalf("after catch-up: %v", err)
	}
	if n, err := (StoreAuditReplica{Store: st}).ReplicatedSize(ctx, "n1"); err != nil || n != 8 {
		t.Fatalf("after catch-up the replica holds %d entries (%v), want 8", n, err)
	}
	appendAudit(t, l, "after", 1)
	if _, err := l.PublishCheckpoint(); err != nil {
		t.Fatal(err)
	}
	entries, err := ReadReplicatedAudit(ctx, st, "n1")
	if err != nil || len(entries) != 9 {
		t.Fatalf("replicated log: %d entries, %v", len(entries), err)
	}
	res, err := VerifyReplicatedAudit(ctx, st, "n1", []*audit.Verifier{signer.Verifier()})
	if err != nil {
		t.Fatalf("verify after catch-up: %v", err)
	}
	if res.Entries != 9 {
		t.Fatalf("verified %d entries", res.Entries)
	}

	// The node's disk is replaced by an empty one, under the same id: the
	// replica is ahead, and appends are refused rather than forking.
	l2, err := audit.Open(audit.Options{Dir: filepath.Join(t.TempDir(), "audit2"), Node: "n1", Origin: "coffre.test/n1",
		Signer: signer, Replicator: StoreAuditReplica{Store: st}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	if _, err := l2.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "t"}, Operation: "x", Decision: audit.Allow}); !errors.Is(err, audit.ErrReplicaAhead) {
		t.Fatalf("append with the replica ahead: %v, want ErrReplicaAhead", err)
	}
}
