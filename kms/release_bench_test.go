package kms

import (
	"context"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/audit/audittest"
	"github.com/coffre-kms/coffre/kms/internal/loadtest"
)

// BenchmarkAttestSession: server CPU for one attestation session,
// Challenge + Complete, which includes the session's one X-Wing
// encapsulation (the release key set-up). The node's TPM work (ActivateCredential, Quote in
// the simulator) runs with the timer stopped: evidence is bound to its
// challenge, so it is made afresh each iteration.
func BenchmarkAttestSession(b *testing.B) {
	f := newRelFixture(b, ReleaseConfig{ChallengesPerEK: 1 << 30, MaxSessions: 1 << 20})
	node := openTPMNode(b)
	// No deadline: the simulator's work, outside the timer, can take
	// longer than ctxT's 30 seconds over a long -benchtime.
	ctx := context.Background()
	if _, err := f.rel.SetNodeClass(ctx, node.class("sim")); err != nil {
		b.Fatal(err)
	}
	if _, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "sim-1", Class: "sim", EKPublic: node.a.EKPublic()}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		ch, err := f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		ev, err := node.evidence(ctx, ch)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := f.rel.Complete(ctx, ch.ID, ev); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReleaseGenerateDataKey: a release on an established session,
// in process, KEK cached. The "in-process" sub-benchmark is the same
// GenerateDataKey without release (BenchmarkGenerateDataKey, on this
// fixture); "session" is the release, and reports added-ns/op, its cost
// over "in-process" — the session and policy check, the audit hook and
// the seal, one AES-256-GCM under the session's K. "check" times the
// check alone, "session-seal" the seal alone. Run all four together
// (-bench ReleaseGenerateDataKey) for added-ns/op. The auditor is a no-op:
// the test auditor keeps every event, and its slice growing would be most
// of what this measures; the audit log's cost is its own.
func BenchmarkReleaseGenerateDataKey(b *testing.B) {
	f := newRelFixture(b, ReleaseConfig{Auditor: noAudit{}})
	ctx := ctxT(b)
	f.enroll(b, "node-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
	id := f.keyring(b, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
	token, _ := f.injectSession(b, f.rel, "node-1")
	ec := map[string]string{"volume": "vol-1"}
	if _, err := f.rel.GenerateDataKey(ctx, token, id, ec); err != nil {
		b.Fatal(err)
	}
	// The sub-benchmarks run several times with growing b.N; the last
	// run of each is the one reported.
	var baseline float64 // ns/op of in-process
	nsPerOp := func(b *testing.B) float64 { return float64(b.Elapsed().Nanoseconds()) / float64(b.N) }
	b.Run("in-process", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			dk, err := f.svc.GenerateDataKey(ctx, id, ec)
			if err != nil {
				b.Fatal(err)
			}
			dk.Plaintext.Zero()
		}
		baseline = nsPerOp(b)
	})
	b.Run("session", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := f.rel.GenerateDataKey(ctx, token, id, ec); err != nil {
				b.Fatal(err)
			}
		}
		if baseline > 0 {
			b.ReportMetric(nsPerOp(b)-baseline, "added-ns/op")
		}
	})
	b.Run("check", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			au := AuditEvent{Op: AuditGenerateDataKey, Keyring: id}
			s, err := f.rel.session(ctx, token, &au)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := f.rel.authorize(ctx, s, &au, id, KeyringID{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("session-seal", func(b *testing.B) {
		s, err := f.rel.lookup(token, f.clock.Now())
		if err != nil {
			b.Fatal(err)
		}
		dk, env := make([]byte, 32), make([]byte, 100)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := f.rel.seal(s, ReleaseHPKE, dk, env); err != nil {
				b.Fatal(err)
			}
		}
	})
	if n := f.root.unwraps.Load(); n != 1 {
		b.Fatalf("HSM unwrapped %d times on the release path", n)
	}
}

// BenchmarkReleaseGenerateDataKeyTPM: a TPM-bound release (duplicate blob
// under the EK, RSA-2048 OAEP of the seed) on a session from the simulator.
func BenchmarkReleaseGenerateDataKeyTPM(b *testing.B) {
	f := newRelFixture(b, ReleaseConfig{})
	node := openTPMNode(b)
	// No deadline: the simulator's work, outside the timer, can take
	// longer than ctxT's 30 seconds over a long -benchtime.
	ctx := context.Background()
	if _, err := f.rel.SetNodeClass(ctx, node.class("sim")); err != nil {
		b.Fatal(err)
	}
	if _, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "sim-1", Class: "sim", EKPublic: node.a.EKPublic()}); err != nil {
		b.Fatal(err)
	}
	id := f.keyring(b, "acme/vault", []string{"sim"}, nil, ReleaseTPM)
	sess, err := node.attest(ctx, f.rel, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.rel.GenerateDataKey(ctx, sess.Token, id, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReleaseAuditLatency: the latency the audit log adds to a
// release, with 64 concurrent callers on one session, in process (so the
// release itself costs microseconds and the callers wait on the log far
// more than they would behind gRPC and TLS: this is the harsher case).
// "no-audit" releases with a no-op auditor, "audit-log" with the durable
// log in b's temporary directory (group commit, one fsync per batch);
// audit-log reports added-p50-µs (its p50 less no-audit's) and
// added-p99-µs (its p99 less no-audit's p50: the whole tail is charged to
// the audit, since no-audit's own p99 is scheduling noise of 64 goroutines
// on this machine's cores). flush-p50-µs and flush-p99-µs bound what the
// log's group commits waited for the disk (see BenchmarkAppend64).
func BenchmarkReleaseAuditLatency(b *testing.B) {
	const callers = 64
	run := func(b *testing.B, a Auditor) (p50, p99 time.Duration) {
		f := newRelFixture(b, ReleaseConfig{Auditor: a})
		ctx := context.Background()
		f.enroll(b, "node-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
		id := f.keyring(b, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
		token, _ := f.injectSession(b, f.rel, "node-1")
		ec := map[string]string{"volume": "vol-1"}
		if _, err := f.rel.GenerateDataKey(ctx, token, id, ec); err != nil {
			b.Fatal(err)
		}
		r := loadtest.Run(b, callers, b.N, func(int) error {
			_, err := f.rel.GenerateDataKey(ctx, token, id, ec)
			return err
		})
		return r.ReportLatency(b)
	}
	var base50 time.Duration
	b.Run("no-audit", func(b *testing.B) { base50, _ = run(b, noAudit{}) })
	b.Run("audit-log", func(b *testing.B) {
		l := audittest.NewLog(b)
		p50, p99 := run(b, AuditLog{Log: l})
		b.ReportMetric(float64((p50 - base50).Microseconds()), "added-p50-µs")
		b.ReportMetric(float64((p99 - base50).Microseconds()), "added-p99-µs")
		audittest.ReportFlush(b, l)
	})
}
