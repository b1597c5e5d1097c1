//go:build unix

package audit

import (
	"fmt"
	"os"
	"syscall"
)

// lockDir takes an exclusive advisory lock so that two processes never
// append to the same log.
func lockDir(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600) // #nosec G304 -- the log's own directory
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil { // #nosec G115 -- fd fits in int
		_ = f.Close()
		return nil, fmt.Errorf("audit: log %s is in use by another process: %w", path, err)
	}
	return f, nil
}
