//go:build linux

package ceremony

import (
	"golang.org/x/sys/unix"
)

// allocLocked maps n bytes of anonymous memory outside the Go heap (so the
// runtime never copies them), excludes them from core dumps and locks them
// in RAM. If the mapping fails it falls back to the heap; if locking fails
// (RLIMIT_MEMLOCK) the memory is used unlocked and locked is false.
func allocLocked(n int) (b []byte, locked bool, free func([]byte)) {
	size := max(n, 1)
	m, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return make([]byte, n), false, func([]byte) {}
	}
	_ = unix.Madvise(m, unix.MADV_DONTDUMP) // best effort: older kernels lack it
	locked = unix.Mlock(m) == nil
	return m[:n], locked, func(b []byte) {
		m := b[:size:size]
		if locked {
			_ = unix.Munlock(m) // unmapping unlocks anyway
		}
		_ = unix.Munmap(m) // only fails for a bad address, which m is not
	}
}
