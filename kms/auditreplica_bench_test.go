package kms

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/store"
	"github.com/coffre-kms/coffre/kms/store/etcdtest"
)

// BenchmarkAuditAppendReplicated compares, in one run, durable audit
// appends with 64 concurrent writers on a single node (local fsync only)
// and on a node of a cluster (local fsync, then the batch written to an
// embedded etcd before the callers are answered). Releases write nothing
// else to the store, so this ratio is the per-node throughput of releases
// on etcd against bbolt (issue 6 target: ≥ 0.7).
// benchRun gives each benchmark round its own etcd prefix: the testing
// package runs a benchmark several times, each with a fresh log.
var benchRun atomic.Int64

func BenchmarkAuditAppendReplicated(b *testing.B) {
	cluster := etcdtest.StartCluster(b, 1)
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
			var next atomic.Int64
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			for range 64 {
				wg.Go(func() {
					for next.Add(1) <= int64(b.N) {
						e := &audit.Entry{Time: time.Now(), Actor: audit.Actor{Kind: audit.ActorNode, ID: "node-1"},
							Operation: "key.generate_data_key", Keyring: "acme/disks", Tenant: "acme", Decision: audit.Allow}
						if _, err := l.Append(ctx, e); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "entries/s")
		})
	}
}
