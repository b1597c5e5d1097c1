//go:build !linux

package audit

import "os"

// datasync is a full sync where fdatasync(2) is not used.
func datasync(f *os.File) error { return f.Sync() }
