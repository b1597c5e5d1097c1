package kms

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/internal/loadtest"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// BenchmarkAuditAppendReplicated compares, in one run, durable audit
// appends with 64 concurrent writers on a single node (local fsync only)
// and on a node of a cluster (local fsync, then the batch written to an
// embedded etcd, which fsyncs, before the callers are answered). Releases write nothing
// else to the store, so this ratio is the per-node throughput of releases
// on etcd against bbolt (issue 6 target: ≥ 0.7).
// benchRun gives each benchmark round its own etcd prefix: the testing
// package runs a benchmark several times, each with a fresh log.
var benchRun atomic.Int64

func BenchmarkAuditAppendReplicated(b *testing.B) {
	cluster := etcdtest.StartClusterWith(b, 1, etcdtest.Options{Fsync: true})
	for _, tc := range []struct {
		name    string
		replica func(b *testing.B) audit.Replicator
	}{
		{"local", func(*testing.B) audit.Replicator { return nil }},
		{"etcd", func(b *testing.B) audit.Replicator {
			st, err := store.OpenEtcd(context.Background(), store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: fmt.Sprintf("/bench-%d/", benchRun.Add(1))})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { st.Close() })
			return StoreAuditReplica{Store: st}
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			signer, err := audit.GenerateSigner("bench")
			if err != nil {
				b.Fatal(err)
			}
			l, err := audit.Open(audit.Options{Dir: b.TempDir(), Node: "n1", Origin: "bench/n1", Signer: signer, Replicator: tc.replica(b)})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			ctx := context.Background()
			r := loadtest.Run(b, 64, b.N, func(int) error {
				e := &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorNode, ID: "node-1"},
					Operation: "key.generate_data_key", Keyring: "acme/disks", Tenant: "acme", Decision: audit.Allow}
				_, err := l.Append(ctx, e)
				return err
			})
			b.ReportMetric(r.PerSecond(), "entries/s")
		})
	}
}

// BenchmarkReleaseTwoNodesEtcd is issue 6's comparison, in one run:
// GenerateDataKey releases (in process, on an established session, KEK
// cached) with a durable audit log, on one node over bbolt against each of
// two nodes over a three-member embedded etcd releasing at the same time
// (each release's audit batch replicated to etcd before the answer). It
// reports releases/s per node and, for etcd, per-node÷bbolt (target ≥ 0.7).
// With callers in a closed loop a node's throughput is callers ÷ latency,
// and the replicated latency is etcd's commit (three members fsyncing on
// this one disk, as production members do on theirs), so the ratio is
// shown at 64 and 512 callers per node.
// On one machine the two nodes and the etcd members share the cores that
// the single node has to itself: total×bbolt (both nodes together) is the
// fairer figure here; per-node ×bbolt understates what nodes on machines
// of their own would do. bbolt-2-nodes runs two nodes without replication
// at once, as the etcd pair runs: its ×bbolt is what sharing the machine
// alone costs, and the etcd pair's ×bbolt-pair (per node, against it) is
// what replication costs.
func BenchmarkReleaseTwoNodesEtcd(b *testing.B) {
	ec := map[string]string{"volume": "v1"}
	openLog := func(b *testing.B, node string, r audit.Replicator) *audit.Log {
		signer, err := audit.GenerateSigner(node)
		if err != nil {
			b.Fatal(err)
		}
		l, err := audit.Open(audit.Options{Dir: b.TempDir(), Node: node, Origin: "bench/" + node, Signer: signer, Replicator: r})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { l.Close() })
		return l
	}
	// load runs n releases spread over callers goroutines on each node and
	// returns releases/s per node.
	load := func(b *testing.B, callers int, nodes []*ReleaseService, tokens []string, id KeyringID) float64 {
		r := loadtest.Run(b, callers*len(nodes), b.N*len(nodes), func(c int) error {
			i := c % len(nodes)
			_, err := nodes[i].GenerateDataKey(context.Background(), tokens[i], id, ec)
			return err
		})
		return r.PerSecond() / float64(len(nodes))
	}
	cluster := etcdtest.StartClusterWith(b, 3, etcdtest.Options{Fsync: true})
	for _, callers := range []int{64, 512} {
		var single float64
		b.Run(fmt.Sprintf("bbolt-1-node/callers-%d", callers), func(b *testing.B) {
			f := newRelFixture(b, ReleaseConfig{Auditor: AuditLog{Log: openLog(b, "solo", nil)}, MaxSessions: 1 << 10})
			f.enroll(b, "node-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
			id := f.keyring(b, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
			token, _ := f.injectSession(b, f.rel, "node-1")
			single = load(b, callers, []*ReleaseService{f.rel}, []string{token}, id)
			b.ReportMetric(single, "releases/s/node")
		})
		// Two nodes without replication releasing at once on this
		// machine (two services, each with its own audit log, over one
		// bbolt file, which releases only read): the most two nodes get
		// here, so that the etcd pair's gap splits into sharing the
		// machine and replicating.
		var pair float64
		b.Run(fmt.Sprintf("bbolt-2-nodes/callers-%d", callers), func(b *testing.B) {
			f := newRelFixture(b, ReleaseConfig{Auditor: AuditLog{Log: openLog(b, "solo-a", nil)}, MaxSessions: 1 << 10})
			f.enroll(b, "node-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
			id := f.keyring(b, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
			relB := f.secondWith(b, ReleaseConfig{Auditor: AuditLog{Log: openLog(b, "solo-b", nil)}, MaxSessions: 1 << 10})
			tokA, _ := f.injectSession(b, f.rel, "node-1")
			tokB, _ := f.injectSession(b, relB, "node-1")
			pair = load(b, callers, []*ReleaseService{f.rel, relB}, []string{tokA, tokB}, id)
			b.ReportMetric(pair, "releases/s/node")
			if single > 0 {
				b.ReportMetric(pair/single, "×bbolt")
			}
		})
		b.Run(fmt.Sprintf("etcd-2-nodes/callers-%d", callers), func(b *testing.B) {
			st, err := store.OpenEtcd(context.Background(), store.EtcdOptions{Endpoints: cluster.Endpoints(), Prefix: fmt.Sprintf("/bench-%d/", benchRun.Add(1))})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { st.Close() })
			replica := StoreAuditReplica{Store: st}
			f := newRelFixtureOn(b, ReleaseConfig{Auditor: AuditLog{Log: openLog(b, "node-a", replica)}, MaxSessions: 1 << 10}, st)
			f.enroll(b, "node-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
			id := f.keyring(b, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
			relB := f.secondWith(b, ReleaseConfig{Auditor: AuditLog{Log: openLog(b, "node-b", replica)}, MaxSessions: 1 << 10})
			// node B learns the enrollment through the store watch.
			deadline := time.Now().Add(10 * time.Second)
			for {
				if _, err := relB.GetNode(context.Background(), "node-1"); err == nil {
					break
				}
				if time.Now().After(deadline) {
					b.Fatal("node B never saw the enrollment")
				}
				time.Sleep(20 * time.Millisecond)
			}
			tokA, _ := f.injectSession(b, f.rel, "node-1")
			tokB, _ := f.injectSession(b, relB, "node-1")
			perNode := load(b, callers, []*ReleaseService{f.rel, relB}, []string{tokA, tokB}, id)
			b.ReportMetric(perNode, "releases/s/node")
			if single > 0 {
				b.ReportMetric(perNode/single, "×bbolt")
				// Both nodes and the three etcd members share this
				// machine's cores: the pair's total is the other figure.
				b.ReportMetric(2*perNode/single, "total×bbolt")
			}
			if pair > 0 {
				// What replication costs, the machine's sharing aside.
				b.ReportMetric(perNode/pair, "×bbolt-pair")
			}
		})
	}
}
