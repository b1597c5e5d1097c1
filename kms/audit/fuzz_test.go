package audit

import (
	"bytes"
	"testing"
)

func FuzzParseEntry(f *testing.F) {
	e := testEntry(1)
	e.Version, e.Node = EntryVersion, "n"
	e.EvidenceHashes = []string{"00ff"}
	raw, _ := e.MarshalCanonical()
	f.Add(raw)
	f.Add([]byte(`{"v":1}`))
	f.Add([]byte(`{"v":1,"index":0,"time":"2026-01-01T00:00:00Z","node":"","actor":{"kind":"node","id":""},"op":"x","decision":"deny"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := ParseEntry(b)
		if err != nil {
			return
		}
		again, err := e.MarshalCanonical()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("accepted a non-canonical entry: %q -> %q, %v", b, again, err)
		}
	})
}

func FuzzParseCheckpoint(f *testing.F) {
	s := testSigner(f)
	cp, _ := signCheckpoint(s, "coffre.test/node-1", 42, LeafHash([]byte("x")))
	f.Add(cp.Note)
	f.Add([]byte("o\n1\nAAAA\n\n— a AAAAAAAA\n"))
	f.Add([]byte("\n\n"))
	v := s.Verifier()
	f.Fuzz(func(t *testing.T, note []byte) {
		got, err := ParseCheckpoint(note, v)
		if err != nil {
			return
		}
		// Anything accepted carries the real signatures over its body.
		if len(got.Root) != hashSize || !bytes.HasPrefix(note, checkpointBody(got.Origin, got.Size, got.Root)) {
			t.Fatalf("accepted %q as %+v", note, got)
		}
	})
}

func FuzzScanEntries(f *testing.F) {
	var good []byte
	for i := range 3 {
		e := testEntry(i)
		e.Version, e.Index, e.Node = EntryVersion, uint64(i), "n"
		raw, _ := e.MarshalCanonical()
		good = appendRecord(good, raw)
	}
	f.Add(good)
	f.Add(good[:len(good)-3])
	f.Add(append(bytes.Clone(good), 0, 0, 0))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		var total int64
		n, end, err := scanEntries(bytes.NewReader(b), func(i uint64, off int64, raw []byte, e *Entry) error {
			if e.Index != i || off != total {
				t.Fatalf("entry %d at %d: index %d, expected offset %d", i, off, e.Index, total)
			}
			total += recHeader + int64(len(raw))
			return nil
		})
		if end != total || end > int64(len(b)) {
			t.Fatalf("end %d, records end at %d, input %d", end, total, len(b))
		}
		// A clean end before the end of the input is allowed only over
		// zeros: space allocated ahead.
		if err == nil && bytes.ContainsFunc(b[end:], func(r rune) bool { return r != 0 }) {
			t.Fatalf("clean end at %d of %d bytes (%d entries) before non-zero bytes", end, len(b), n)
		}
	})
}
