package kms

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
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
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
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
}

func TestAuditReplicaRetryAndGap(t *testing.T) {
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
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
	_, err = ReadReplicatedAudit(ctx, st, "n")
	if err == nil || !strings.Contains(err.Error(), "entries 2..4 missing") {
		t.Fatalf("gap: %v", err)
	}
	if err := r.Replicate(ctx, "bad/node", 0, b0); err == nil {
		t.Fatal("node id with a slash accepted")
	}
}
