//go:build !linux

package ceremony

// allocLocked on systems other than Linux keeps secrets on the Go heap,
// unlocked: they are still zeroized, and callers warn that they may reach
// swap.
func allocLocked(n int) (b []byte, locked bool, free func([]byte)) {
	return make([]byte, n), false, func([]byte) {}
}
