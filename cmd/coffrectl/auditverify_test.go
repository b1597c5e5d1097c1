package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// TestAuditVerifyAllNodesCLI: two nodes' audit logs replicated to a real
// etcd are verified in one `coffrectl audit verify --store` call (keys
// from a directory, or repeated --verifier), one node with --node, a
// node's local directory against its replicated copy, and a deleted batch,
// a local log that forked from its replica and a missing key are reported
// naming the node.
func TestAuditVerifyAllNodesCLI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cluster := etcdtest.StartCluster(t, 1)
	st, err := store.OpenEtcd(ctx, store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: "/coffre-audit/"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	keys := t.TempDir()
	dirs := map[string]string{}
	signers := map[string]*audit.Signer{}
	for _, node := range []string{"node-a", "node-b"} {
		s, err := audit.GenerateSigner(node + ".audit")
		if err != nil {
			t.Fatal(err)
		}
		signers[node] = s
		if err := os.WriteFile(filepath.Join(keys, node+".pub"), s.Verifier().Marshal(), 0o644); err != nil {
			t.Fatal(err)
		}
		dirs[node] = filepath.Join(t.TempDir(), node)
		l, err := audit.Open(audit.Options{Dir: dirs[node], Node: node, Origin: "test/" + node, Signer: s, Replicator: kms.StoreAuditReplica{Store: st}})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 30 {
			if _, err := l.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "test"},
				Operation: "test.op", Decision: audit.Allow, Reason: fmt.Sprint(i)}); err != nil {
				t.Fatal(err)
			}
			if i%10 == 9 {
				if _, err := l.PublishCheckpoint(); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	storeArgs := []string{"audit", "verify", "--store", "etcd:" + strings.Join(cluster.Endpoints(), ","), "--prefix", "/coffre-audit/"}
	verify := func(extra ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := run(ctx, append(append([]string(nil), storeArgs...), extra...), &out, &errOut)
		return code, out.String(), errOut.String()
	}
	line := func(node string) string {
		return fmt.Sprintf("audit log of node %s (replicated) verified: 30 entries, 4 checkpoints, latest checkpoint at size 30, root ", node)
	}

	// Every node, keys from a directory.
	code, out, errOut := verify("--verifier", keys)
	if code != 0 || !strings.Contains(out, line("node-a")) || !strings.Contains(out, line("node-b")) ||
		!strings.Contains(out, "key node-a.audit ("+filepath.Join(keys, "node-a.pub")+")") ||
		!strings.Contains(out, "key node-b.audit ("+filepath.Join(keys, "node-b.pub")+")") || strings.Count(out, "\n") != 2 {
		t.Fatalf("verify all: exit %d:\n%s%s", code, out, errOut)
	}
	// Repeated --verifier, JSON: one object per node.
	code, out, errOut = verify("--verifier", filepath.Join(keys, "node-b.pub"), "--verifier", filepath.Join(keys, "node-a.pub"), "--json")
	if code != 0 {
		t.Fatalf("verify --json: exit %d: %s", code, errOut)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	for _, node := range []string{"node-a", "node-b"} {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			t.Fatal(err)
		}
		if m["node"] != node || m["ok"] != true || m["entries"] != float64(30) || m["key"] != node+".audit" {
			t.Fatalf("JSON result %v", m)
		}
	}
	// One node.
	code, out, errOut = verify("--node", "node-b", "--verifier", filepath.Join(keys, "node-b.pub"))
	if code != 0 || !strings.Contains(out, line("node-b")) || strings.Contains(out, "node-a") {
		t.Fatalf("verify --node: exit %d:\n%s%s", code, out, errOut)
	}
	// The local directory and the replicated copy agree.
	code, out, errOut = verify("--node", "node-a", "--dir", dirs["node-a"], "--verifier", keys)
	if code != 0 || !strings.Contains(out, "audit log of "+dirs["node-a"]+" (30 entries) agrees with the copy node node-a replicated (30 entries) on the first 30 entries, root ") {
		t.Fatalf("verify --dir --store: exit %d:\n%s%s", code, out, errOut)
	}
	// A local log of the same node and key but another history: a fork.
	forked := filepath.Join(t.TempDir(), "forked")
	l, err := audit.Open(audit.Options{Dir: forked, Node: "node-a", Origin: "test/node-a", Signer: signers["node-a"]})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 12 {
		if _, err := l.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "test"},
			Operation: "other.op", Decision: audit.Deny, Reason: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = verify("--node", "node-a", "--dir", forked, "--verifier", keys)
	if code != exitError || !strings.Contains(errOut, "audit log of "+forked+" and the copy node node-a replicated FORK: at size 12 the local root is ") {
		t.Fatalf("forked local log: exit %d:\n%s%s", code, out, errOut)
	}

	// The local log ahead of its replica (entries written while
	// replication failed, their calls refused) and signed past it: the
	// two are compared on every entry both hold, and the rest is named.
	l, err = audit.Open(audit.Options{Dir: dirs["node-a"], Node: "node-a", Origin: "test/node-a", Signer: signers["node-a"]})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if _, err := l.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "test"},
			Operation: "test.op", Decision: audit.Deny, Reason: fmt.Sprint("refused ", i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil { // publishes a checkpoint at 40
		t.Fatal(err)
	}
	code, out, errOut = verify("--node", "node-a", "--dir", dirs["node-a"], "--verifier", keys)
	if code != 0 || !strings.Contains(out, "(40 entries) agrees with the copy node node-a replicated (30 entries) on the first 30 entries, root ") ||
		!strings.Contains(out, "entries 30..39 are only in the local log: written, never replicated") {
		t.Fatalf("local log ahead: exit %d:\n%s%s", code, out, errOut)
	}

	// Only node-a's key: node-b's signatures are not trusted.
	code, out, errOut = verify("--verifier", filepath.Join(keys, "node-a.pub"))
	if code != exitError || !strings.Contains(out, line("node-a")) ||
		!strings.Contains(out, "audit log of node node-b (replicated) FAILED: signature: the latest checkpoint verifies with none of the 1 trusted keys") ||
		!strings.Contains(errOut, `replicated audit log does not verify: node "node-b": signature:`) {
		t.Fatalf("one key missing: exit %d:\n%s%s", code, out, errOut)
	}

	// A deleted batch of node-b.
	kvs, err := st.List(ctx, "audit/node-b/entries/")
	if err != nil || len(kvs) < 3 {
		t.Fatalf("node-b batches: %d, %v", len(kvs), err)
	}
	if err := st.Delete(ctx, kvs[1].Key, 0); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = verify("--verifier", keys)
	if code != exitError || !strings.Contains(out, line("node-a")) || !strings.Contains(out, "audit log of node node-b (replicated) FAILED: gap: entries 1..1 missing") ||
		!strings.Contains(errOut, `replicated audit log does not verify: node "node-b": gap: entries 1..1 missing (next batch starts at 2) (1 of 2 nodes failed)`) {
		t.Fatalf("deleted batch: exit %d:\n%s%s", code, out, errOut)
	}

	// A node lost after replicating entries but before publishing a
	// checkpoint over them: they verify as well formed and in order, and
	// the output says no signature covers them.
	s, err := audit.GenerateSigner("node-c.audit")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(keys, "node-c.pub"), s.Verifier().Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err = audit.Open(audit.Options{Dir: t.TempDir(), Node: "node-c", Origin: "test/node-c", Signer: s,
		CheckpointInterval: time.Hour, Replicator: &noPublishAfter{StoreAuditReplica: kms.StoreAuditReplica{Store: st}, v: s.Verifier(), after: 10}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 15 {
		if _, err := l.Append(ctx, &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorSystem, ID: "test"},
			Operation: "test.op", Decision: audit.Allow, Reason: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
		if i == 9 {
			if _, err := l.PublishCheckpoint(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = verify("--node", "node-c", "--verifier", keys)
	if code != 0 || !strings.Contains(out, "(replicated) verified: 15 entries, 2 checkpoints, latest checkpoint at size 10") ||
		!strings.Contains(out, "warning: entries 10..14 come after the latest checkpoint and are not covered by a signature") {
		t.Fatalf("unsigned tail: exit %d:\n%s%s", code, out, errOut)
	}

	// Usage errors.
	if code, _, errOut := verify("--verifier", t.TempDir()); code != exitError || !strings.Contains(errOut, "holds no *.pub key") {
		t.Errorf("empty key directory: exit %d: %s", code, errOut)
	}
	if code, _, errOut := verify("--dir", dirs["node-a"], "--verifier", keys); code != exitUsage || !strings.Contains(errOut, "needs --node") {
		t.Errorf("--dir and --store without --node: exit %d: %s", code, errOut)
	}
}

// noPublishAfter is the shared-store replica of a node that is lost once
// it has published checkpoints up to size after: later checkpoints never
// reach the store, though the entries do.
type noPublishAfter struct {
	kms.StoreAuditReplica
	v     *audit.Verifier
	after uint64
}

func (r *noPublishAfter) PublishCheckpoint(ctx context.Context, node string, note []byte) error {
	cp, err := audit.ParseCheckpoint(note, r.v)
	if err == nil && cp.Size > r.after {
		return fmt.Errorf("node lost")
	}
	return r.StoreAuditReplica.PublishCheckpoint(ctx, node, note)
}
