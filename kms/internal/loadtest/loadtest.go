// Package loadtest runs the closed-loop load of the project's benchmarks:
// a fixed number of callers, each starting its next call when its last
// one returns, until the benchmark's calls are made. With callers in a
// closed loop, throughput is callers ÷ latency: a benchmark reports both.
package loadtest

import (
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Result is what [Run] measured.
type Result struct {
	Calls   int           // calls made (fewer than asked if one failed)
	Elapsed time.Duration // from the first call to the last return
	sorted  []time.Duration
}

// Run makes calls calls of op from callers goroutines; op gets the index
// of its caller (0..callers-1). It resets b's timer before the first call
// and stops it after the last. A failed call is reported with b.Error and
// stops its caller.
func Run(b *testing.B, callers, calls int, op func(caller int) error) Result {
	b.Helper()
	var next atomic.Int64
	lat := make([][]time.Duration, callers)
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for c := range callers {
		wg.Go(func() {
			for next.Add(1) <= int64(calls) {
				t0 := time.Now()
				if err := op(c); err != nil {
					b.Error(err)
					return
				}
				lat[c] = append(lat[c], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	all := slices.Concat(lat...)
	slices.Sort(all)
	return Result{Calls: len(all), Elapsed: elapsed, sorted: all}
}

// PerSecond is the calls made per second.
func (r Result) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Calls) / r.Elapsed.Seconds()
}

// Quantile returns the latency at quantile q (0 ≤ q < 1), 0 if no call
// was made.
func (r Result) Quantile(q float64) time.Duration {
	if len(r.sorted) == 0 {
		return 0
	}
	return r.sorted[min(int(q*float64(len(r.sorted))), len(r.sorted)-1)]
}

// ReportLatency reports p50-µs and p99-µs on b and returns them.
func (r Result) ReportLatency(b *testing.B) (p50, p99 time.Duration) {
	p50, p99 = r.Quantile(0.5), r.Quantile(0.99)
	b.ReportMetric(float64(p50.Microseconds()), "p50-µs")
	b.ReportMetric(float64(p99.Microseconds()), "p99-µs")
	return p50, p99
}
