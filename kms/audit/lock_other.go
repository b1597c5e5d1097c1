//go:build !unix

package audit

import (
	"fmt"
	"os"
)

// lockDir only creates the lock file: no advisory lock on this platform.
func lockDir(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600) // #nosec G304 -- the log's own directory
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return f, nil
}
