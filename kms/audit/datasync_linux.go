package audit

import (
	"os"
	"syscall"
)

// datasync flushes f's data and the metadata needed to read it back, but
// not its times (fdatasync(2)): inside space already allocated and synced,
// that is one device flush and no journal commit.
func datasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd())) // #nosec G115 -- fd fits in int
		if err != syscall.EINTR {
			return err
		}
	}
}
