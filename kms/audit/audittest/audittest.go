// Package audittest gives tests and benchmarks outside kms/audit a real
// audit log to write to.
package audittest

import (
	"path/filepath"
	"testing"

	"github.com/coffre-kms/coffre/kms/audit"
)

// NewLog opens a durable audit log in a directory of tb's, signed by a
// throw-away key, and closes it when tb ends.
func NewLog(tb testing.TB) *audit.Log {
	tb.Helper()
	signer, err := audit.GenerateSigner("audittest")
	if err != nil {
		tb.Fatal(err)
	}
	l, err := audit.Open(audit.Options{Dir: filepath.Join(tb.TempDir(), "audit"), Node: "n1", Origin: "audittest/n1", Signer: signer})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("audittest: close: %v", err)
		}
	})
	return l
}

// ReportFlush reports on b the bounds of the p50 and p99 of l's group-commit
// flushes (flush-p50-µs, flush-p99-µs; see audit.FlushHistogram).
func ReportFlush(b *testing.B, l *audit.Log) {
	fl := l.Stats().Flush
	b.ReportMetric(float64(fl.Quantile(0.5).Microseconds()), "flush-p50-µs")
	b.ReportMetric(float64(fl.Quantile(0.99).Microseconds()), "flush-p99-µs")
}
