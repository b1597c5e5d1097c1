package server

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit/audittest"
	"github.com/coffre-kms/coffre/kms/internal/loadtest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// noAuditor records nothing: the baseline of BenchmarkReleaseAuditOverGRPC.
type noAuditor struct{}

func (noAuditor) Record(context.Context, *kms.AuditEvent) error { return nil }

// BenchmarkReleaseAuditOverGRPC measures what the audit log adds to a
// release on the real path: coffre-agent's client (a TPM-simulator node,
// attested once) calling KeyService.GenerateDataKey over TLS 1.3 and
// gRPC, 64 calls in flight on its one connection, against a server whose
// auditor is a no-op ("no-audit") or the durable log in b's temporary
// directory ("audit-log": group commit, one fdatasync per batch, the entry
// durable before the answer). Client and server share this machine's
// cores. Each reports p50-µs and p99-µs of one call; audit-log also
// reports added-p50-µs (its p50 less no-audit's) and added-p99-µs (its p99
// less no-audit's p99), and the bounds of the log's flush p50 and p99 (see
// BenchmarkAppend64). Run both together (-bench ReleaseAuditOverGRPC).
func BenchmarkReleaseAuditOverGRPC(b *testing.B) {
	const callers = 64
	run := func(b *testing.B, a kms.Auditor) (p50, p99 time.Duration) {
		// The server logs as in production (no per-call debug lines).
		f := newFixtureWith(b, kms.ReleaseConfig{Auditor: a}, func(o *Options) { o.Logger = slog.New(slog.DiscardHandler) })
		n := openSimNode(b)
		admin := f.setup(b, n, "sim-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
		keyringWithPolicy(b, admin, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, coffrev1.Release_RELEASE_HPKE)
		c := agent.NewClient(f.dial(b), n.a, agent.ClientOptions{})
		ec := map[string]string{"volume": "vol-1"}
		ctx := context.Background()
		if _, _, err := c.GenerateDataKey(ctx, "acme/disks", ec); err != nil { // attests, warms the KEK cache
			b.Fatal(err)
		}
		r := loadtest.Run(b, callers, b.N, func(int) error {
			_, _, err := c.GenerateDataKey(ctx, "acme/disks", ec)
			return err
		})
		return r.ReportLatency(b)
	}
	var base50, base99 time.Duration
	b.Run("no-audit", func(b *testing.B) { base50, base99 = run(b, noAuditor{}) })
	b.Run("audit-log", func(b *testing.B) {
		l := audittest.NewLog(b)
		p50, p99 := run(b, kms.AuditLog{Log: l})
		if base50 > 0 {
			b.ReportMetric(float64((p50 - base50).Microseconds()), "added-p50-µs")
			b.ReportMetric(float64((p99 - base99).Microseconds()), "added-p99-µs")
		}
		audittest.ReportFlush(b, l)
	})
}
