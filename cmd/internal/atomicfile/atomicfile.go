// Package atomicfile writes files the way Coffre's commands must: through
// a temporary file in the same directory, with the final mode set before
// any byte is written, synced, then renamed over the target — so a reader
// (or a crash) never sees half a key, certificate or state file.
package atomicfile

import (
	"io"
	"os"
	"path/filepath"
)

// WriteFile writes data to path atomically with the given mode.
func WriteFile(path string, data []byte, mode os.FileMode) error {
	return Write(path, mode, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// Write writes what write produces to path atomically with the given mode.
// If write fails, path is left as it was.
func Write(path string, mode os.FileMode, write func(io.Writer) error) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = f.Close()           // already failing: err says why
			_ = os.Remove(f.Name()) // best effort
		}
	}()
	// CreateTemp makes the file 0600; set the mode before any byte lands.
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if err = write(f); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
