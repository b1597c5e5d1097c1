package audit

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
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
	var next atomic.Int64
	lat := make([][]time.Duration, writers)
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				e := testEntry(w)
				t0 := time.Now()
				if _, err := l.Append(ctx, e); err != nil {
					b.Error(err)
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	all := slices.Concat(lat...)
	slices.Sort(all)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "entries/s")
	if len(all) > 0 {
		b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
		b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
	}
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
