package attest_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-eventlog/register"
	"github.com/google/go-eventlog/tcg"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/internal/tpmtest"
)

// eventLogDir holds event logs recorded on real machines (see its README).
var eventLogDir = filepath.Join("..", "testdata", "eventlogs")

func readEventLog(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(eventLogDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// replaySHA256 computes the SHA-256 PCR values a log leads to, written
// independently of the verifier (which uses go-eventlog's replay): every
// event but EV_NO_ACTION extends its SHA-256 digest, PCR 0 starting at the
// locality of a StartupLocality event.
func replaySHA256(t testing.TB, log []byte) map[uint32][]byte {
	t.Helper()
	el, err := tcg.ParseEventLog(log, tcg.ParseOpts{})
	if err != nil {
		t.Fatal(err)
	}
	pcrs := map[uint32][]byte{}
	for _, e := range el.Events(register.HashSHA256) {
		i := uint32(e.Index) // #nosec G115 -- test data
		if e.Type == tcg.NoAction {
			if i == 0 && len(e.Data) == 17 && bytes.HasPrefix(e.Data, []byte("StartupLocality")) {
				start := make([]byte, 32)
				start[31] = e.Data[16]
				pcrs[0] = start
			}
			continue
		}
		if len(e.Digest) != 32 {
			t.Fatalf("event %d without a SHA-256 digest", e.Num())
		}
		cur, ok := pcrs[i]
		if !ok {
			cur = make([]byte, 32)
		}
		h := sha256.New()
		h.Write(cur)
		h.Write(e.Digest)
		pcrs[i] = h.Sum(nil)
	}
	return pcrs
}

// agileLog builds a crypto-agile event log with a SHA-256 bank only.
type agileLog struct{ bytes.Buffer }

func newAgileLog() *agileLog {
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	le := binary.LittleEndian
	_ = binary.Write(&spec, le, uint32(0))      // platformClass
	spec.Write([]byte{0, 2, 0, 2})              // specVersionMinor, Major, errata, uintnSize
	_ = binary.Write(&spec, le, uint32(1))      // numberOfAlgorithms
	_ = binary.Write(&spec, le, uint16(0x000B)) // TPM_ALG_SHA256
	_ = binary.Write(&spec, le, uint16(32))     // digestSize
	spec.WriteByte(0)                           // vendorInfoSize
	var l agileLog
	_ = binary.Write(&l, le, uint32(0))            // PCR
	_ = binary.Write(&l, le, uint32(tcg.NoAction)) // type
	l.Write(make([]byte, 20))                      // SHA-1 digest field of the header event
	_ = binary.Write(&l, le, uint32(spec.Len()))   // #nosec G115 -- small
	l.Write(spec.Bytes())
	return &l
}

// event appends an event measuring data.
func (l *agileLog) event(pcr uint32, typ tcg.EventType, data string) *agileLog {
	le := binary.LittleEndian
	d := sha256.Sum256([]byte(data))
	_ = binary.Write(l, le, pcr)
	_ = binary.Write(l, le, uint32(typ))
	_ = binary.Write(l, le, uint32(1))
	_ = binary.Write(l, le, uint16(0x000B))
	l.Write(d[:])
	_ = binary.Write(l, le, uint32(len(data))) // #nosec G115 -- small
	l.WriteString(data)
	return l
}

// extendLog extends the SHA-256 digests of a log's events into the TPM's
// PCRs, as firmware would have, and returns the events.
func extendLog(t testing.TB, tpm transport.TPM, log []byte) []tcg.Event {
	t.Helper()
	el, err := tcg.ParseEventLog(log, tcg.ParseOpts{})
	if err != nil {
		t.Fatal(err)
	}
	events := el.Events(register.HashSHA256)
	for _, e := range events {
		if e.Type != tcg.NoAction {
			tpmtest.Extend(t, tpm, uint(e.Index), e.Digest) // #nosec G115 -- test data
		}
	}
	return events
}

// TestEventLogDoesNotReplay replays a recorded event log into the
// simulator's PCRs, so that the quote covers values the log explains, and
// checks that Verify accepts it and refuses the log once modified, cut,
// missing or from another machine.
func TestEventLogDoesNotReplay(t *testing.T) {
	tpm := tpmtest.Open(t)
	tpmtest.RequireSimulator(t)
	n := newNode(t, tpm, tpmtest.RSAAKTemplate)

	log := readEventLog(t, "arch-linux-workstation.bin")
	events := extendLog(t, tpm, log)
	want := replaySHA256(t, log)
	quoted := []uint{0, 1, 2, 3, 4, 5, 6, 7, 8}
	got := tpmtest.ReadPCRs(t, tpm, quoted...)
	for i, v := range want {
		if !bytes.Equal(got[i], v) {
			t.Fatalf("simulator PCR %d = %x after replaying the log, want %x", i, got[i], v)
		}
	}

	ch := n.challenge(t, 0, 1, 2, 3, 4, 5, 6, 7)
	ev := n.answer(t, ch, quoted...)
	pol := policyFor(subset(want, 0, 7))
	pol.RequireEventLog = true

	ev.EventLog = log
	v, err := attest.Verify(ch, ev, pol)
	if err != nil {
		t.Fatalf("Verify with the log that made the PCRs: %v", err)
	}
	if len(v.Quirks) != 0 {
		t.Errorf("quirks %v for a clean log", v.Quirks)
	}

	t.Run("modified digest", func(t *testing.T) {
		// A PCR 4 event whose digest appears once in the log (separators
		// share theirs with other PCRs).
		i := slices.IndexFunc(events, func(e tcg.Event) bool {
			return e.Index == 4 && e.Type != tcg.NoAction && bytes.Count(log, e.Digest) == 1
		})
		if i < 0 {
			t.Fatal("no PCR 4 event with a unique digest")
		}
		at := bytes.Index(log, events[i].Digest)
		bad := bytes.Clone(log)
		bad[at] ^= 1
		ev.EventLog = bad
		_, err := attest.Verify(ch, ev, pol)
		wantReason(t, wantRefusal(t, err, attest.ErrEventLog), "PCR 4")
	})
	t.Run("cut", func(t *testing.T) {
		ev.EventLog = log[:len(log)/2]
		_, err := attest.Verify(ch, ev, pol)
		wantRefusal(t, err, attest.ErrEventLog)
	})
	t.Run("another machine's log", func(t *testing.T) {
		ev.EventLog = readEventLog(t, "glinux-alex.bin")
		_, err := attest.Verify(ch, ev, pol)
		wantReason(t, wantRefusal(t, err, attest.ErrEventLog), "PCR 0")
	})
	t.Run("missing", func(t *testing.T) {
		ev.EventLog = nil
		_, err := attest.Verify(ch, ev, pol)
		wantRefusal(t, err, attest.ErrEventLog)
		// A class that does not ask for the log does not judge it.
		pol2 := pol
		pol2.RequireEventLog = false
		ev.EventLog = []byte("not a log")
		if _, err := attest.Verify(ch, ev, pol2); err != nil {
			t.Fatalf("class without event log: %v", err)
		}
	})
	t.Run("padded", func(t *testing.T) {
		ev.EventLog = append(bytes.Clone(log), bytes.Repeat([]byte{0xFF}, 64)...)
		v, err := attest.Verify(ch, ev, pol)
		if err != nil {
			t.Fatalf("padded log: %v", err)
		}
		if len(v.Quirks) != 1 {
			t.Errorf("quirks %v, want the padding quirk", v.Quirks)
		}
	})
}

// TestReplayEventLog checks ReplayEventLog without a TPM, against PCR
// values computed independently from recorded and constructed logs.
func TestReplayEventLog(t *testing.T) {
	for _, name := range []string{"arch-linux-workstation.bin", "glinux-alex.bin", "ubuntu-2404-amd-sevsnp.bin"} {
		t.Run(name, func(t *testing.T) {
			log := readEventLog(t, name)
			pcrs := replaySHA256(t, log)
			if err := attest.ReplayEventLog(log, pcrs); err != nil {
				t.Fatalf("ReplayEventLog: %v", err)
			}
			// Every single wrong PCR is caught and named.
			for _, i := range slices.Sorted(maps.Keys(pcrs)) {
				bad := maps.Clone(pcrs)
				bad[i] = bytes.Repeat([]byte{0xEE}, 32)
				err := attest.ReplayEventLog(log, bad)
				wantReason(t, wantRefusal(t, err, attest.ErrEventLog), fmt.Sprintf("PCR %d ", i))
			}
		})
	}
	t.Run("StartupLocality 3", func(t *testing.T) {
		log := readEventLog(t, "glinux-alex.bin")
		pcrs := replaySHA256(t, log)
		// The same events replayed from a zero PCR 0 do not match.
		h := sha256.New()
		el, _ := tcg.ParseEventLog(log, tcg.ParseOpts{})
		cur := make([]byte, 32)
		for _, e := range el.Events(register.HashSHA256) {
			if e.Index == 0 && e.Type != tcg.NoAction {
				h.Reset()
				h.Write(cur)
				h.Write(e.Digest)
				cur = h.Sum(nil)
			}
		}
		if bytes.Equal(cur, pcrs[0]) {
			t.Fatal("locality not applied")
		}
		pcrs[0] = cur
		wantRefusal(t, attest.ReplayEventLog(log, pcrs), attest.ErrEventLog)
	})
	t.Run("SHA-1 only log", func(t *testing.T) {
		err := attest.ReplayEventLog(readEventLog(t, "debian-10.bin"), map[uint32][]byte{0: make([]byte, 32)})
		wantReason(t, wantRefusal(t, err, attest.ErrEventLog), "SHA-256")
	})
	t.Run("constructed", func(t *testing.T) {
		log := newAgileLog().
			event(0, tcg.SCRTMVersion, "firmware 1.0").
			event(7, tcg.EFIVariableDriverConfig, "SecureBoot=1").
			event(7, tcg.Separator, "\x00\x00\x00\x00").
			event(4, tcg.EFIBootServicesApplication, "shimx64.efi").Bytes()
		pcrs := replaySHA256(t, log)
		if err := attest.ReplayEventLog(log, pcrs); err != nil {
			t.Fatalf("constructed log: %v", err)
		}
		// PCR 10 (IMA) has no events in this log: not judged.
		with10 := maps.Clone(pcrs)
		with10[10] = bytes.Repeat([]byte{1}, 32)
		if err := attest.ReplayEventLog(log, with10); err != nil {
			t.Fatalf("PCR 10 outside the log: %v", err)
		}
		// A firmware PCR the log says nothing about but that is not at
		// reset: the log was cut.
		with3 := maps.Clone(pcrs)
		with3[3] = bytes.Repeat([]byte{1}, 32)
		err := attest.ReplayEventLog(log, with3)
		wantReason(t, wantRefusal(t, err, attest.ErrEventLog), "no events for PCR 3")
		// ...at reset, it is fine.
		with3[3] = make([]byte, 32)
		if err := attest.ReplayEventLog(log, with3); err != nil {
			t.Fatalf("PCR 3 at reset: %v", err)
		}
	})
	for name, log := range map[string][]byte{
		"empty":     nil,
		"garbage":   []byte("this is not an event log"),
		"truncated": newAgileLog().event(7, tcg.Separator, "abcd").Bytes()[:60],
		"huge":      make([]byte, 5<<20),
	} {
		t.Run(name, func(t *testing.T) {
			wantRefusal(t, attest.ReplayEventLog(log, map[uint32][]byte{7: make([]byte, 32)}), attest.ErrEventLog)
		})
	}
	t.Run("no PCRs", func(t *testing.T) {
		wantRefusal(t, attest.ReplayEventLog(readEventLog(t, "arch-linux-workstation.bin"), nil), attest.ErrEventLog)
	})
}
