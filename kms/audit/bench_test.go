package audit

import (
	"context"
	"testing"

	"github.com/coffre-kms/coffre/kms/internal/loadtest"
)

// BenchmarkAppend64 measures durable appends with 64 concurrent writers
// (group commit): entries/s and the p99 latency of one Append, with the
// entries file allocated ahead (the default) and without. flush-p50-µs and
// flush-p99-µs bound what one group commit waited for its write and
// fdatasync (the upper bounds of FlushBuckets): an append waits for at
// least one flush after it arrives, so the disk's flush tail is the floor
// of the append's.
func BenchmarkAppend64(b *testing.B) {
	b.Run("prealloc", func(b *testing.B) { benchAppend(b, 0) })
	b.Run("no-prealloc", func(b *testing.B) { benchAppend(b, -1) })
}

func benchAppend(b *testing.B, prealloc int64) {
	const writers = 64
	opts := testOptions(b, b.TempDir())
	opts.Preallocate = prealloc
	l := openTestLog(b, opts)
	ctx := context.Background()
	r := loadtest.Run(b, writers, b.N, func(w int) error {
		_, err := l.Append(ctx, testEntry(w))
		return err
	})
	b.ReportMetric(r.PerSecond(), "entries/s")
	r.ReportLatency(b)
	st := l.Stats()
	if st.Fsyncs > 0 {
		b.ReportMetric(float64(b.N)/float64(st.Fsyncs), "entries/fsync")
	}
	reportFlush(b, st.Flush)
}

// reportFlush reports the bucket bounds of the flushes' p50 and p99.
func reportFlush(b *testing.B, h FlushHistogram) {
	b.ReportMetric(float64(h.Quantile(0.5).Microseconds()), "flush-p50-µs")
	b.ReportMetric(float64(h.Quantile(0.99).Microseconds()), "flush-p99-µs")
}
