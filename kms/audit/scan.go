package audit

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The entries file is a sequence of records, each a 4-byte big-endian
// length n (1 ≤ n ≤ MaxEntrySize) followed by n bytes: one entry in its
// canonical encoding, whose Index is the record's position from 0. The
// records may be followed by zero bytes up to the end of the file: space
// the log allocated ahead (see Options.Preallocate), where the next
// records will be written. A zero length followed by anything but zeros is
// not padding but a torn or altered record.
//
// The checkpoints and cosignatures files use the same framing around a
// signed note.

// MaxEntrySize bounds one canonical entry.
const MaxEntrySize = 1 << 20

const recHeader = 4

// tornError describes where and why the readable part of a file ends.
type tornError struct {
	Offset int64 // where the last whole record ends
	Reason string
}

func (e *tornError) Error() string {
	return fmt.Sprintf("torn record at offset %d: %s", e.Offset, e.Reason)
}

// indexError is an entry that parses but sits at the wrong position: not a
// torn write but an edited, deleted or reordered log.
type indexError struct {
	Position uint64
	Index    uint64
	Offset   int64
}

func (e *indexError) Error() string {
	return fmt.Sprintf("entry at offset %d is record %d but has index %d", e.Offset, e.Position, e.Index)
}

// scanRecords reads framed records from r, calling fn with each record's
// offset and payload (valid only during the call). It returns the offset
// after the last whole record, and a *tornError if the stream ends in a
// partial or bad record (nil at a clean end), or fn's error.
func scanRecords(r io.Reader, maxLen int, fn func(off int64, rec []byte) error) (int64, error) {
	return scanFramed(r, maxLen, false, fn)
}

// scanFramed is scanRecords; with padding, zero bytes from a record
// boundary to the end of the stream are a clean end.
func scanFramed(r io.Reader, maxLen int, padding bool, fn func(off int64, rec []byte) error) (int64, error) {
	br := bufio.NewReaderSize(r, 1<<16)
	var off int64
	var hdr [recHeader]byte
	var buf []byte
	for {
		n, err := io.ReadFull(br, hdr[:])
		if err == io.EOF {
			return off, nil
		}
		if err == io.ErrUnexpectedEOF && padding && !bytes.ContainsFunc(hdr[:n], func(r rune) bool { return r != 0 }) {
			return off, nil // zeros to the end, fewer than a header
		}
		if err == io.ErrUnexpectedEOF {
			return off, &tornError{off, fmt.Sprintf("partial length prefix (%d bytes)", n)}
		}
		if err != nil {
			return off, err
		}
		l := binary.BigEndian.Uint32(hdr[:])
		if l == 0 && padding {
			if zero, err := allZero(br); err != nil {
				return off, err
			} else if zero {
				return off, nil
			}
		}
		if l == 0 || int64(l) > int64(maxLen) {
			return off, &tornError{off, fmt.Sprintf("bad record length %d", l)}
		}
		if cap(buf) < int(l) {
			buf = make([]byte, l)
		}
		buf = buf[:l]
		if n, err := io.ReadFull(br, buf); err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return off, &tornError{off, fmt.Sprintf("partial record (%d of %d bytes)", n, l)}
			}
			return off, err
		}
		if err := fn(off, buf); err != nil {
			return off, err
		}
		off += recHeader + int64(l)
	}
}

// scanEntries reads an entries file, checking that each record is a
// canonical entry at its position. fn (may be nil) sees each entry. A
// *tornError reports a bad tail (a partial record or a record that does not
// parse); an *indexError reports a well-formed entry out of place.
func scanEntries(r io.Reader, fn func(i uint64, off int64, raw []byte, e *Entry) error) (n uint64, end int64, err error) {
	end, err = scanFramed(r, MaxEntrySize, true, func(off int64, raw []byte) error {
		e, err := ParseEntry(raw)
		if err != nil {
			return &tornError{off, err.Error()}
		}
		if e.Index != n {
			return &indexError{Position: n, Index: e.Index, Offset: off}
		}
		if fn != nil {
			if err := fn(n, off, raw, e); err != nil {
				return err
			}
		}
		n++
		return nil
	})
	return n, end, err
}

// allZero reads r to its end and reports whether every byte was zero.
func allZero(r io.Reader) (bool, error) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		for _, c := range buf[:n] {
			if c != 0 {
				return false, nil
			}
		}
		if err == io.EOF {
			return true, nil
		}
		if err != nil {
			return false, err
		}
	}
}

func appendRecord(dst, payload []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload))) // #nosec G115 -- bounded by MaxEntrySize
	return append(dst, payload...)
}

func isTorn(err error) (*tornError, bool) {
	var te *tornError
	ok := errors.As(err, &te)
	return te, ok
}
