package audit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tamperLog makes a closed log of 20 entries with checkpoints at sizes 0,
// 5, 10, 15 and 20.
func tamperLog(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	opts := testOptions(t, dir)
	opts.CheckpointInterval = time.Hour
	opts.CheckpointEvery = 1 << 40
	l := openTestLog(t, opts)
	for range 4 {
		appendN(t, l, 5)
		if err := l.publish(); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rep, err := VerifyDir(dir, testSigner(t).Verifier())
	if err != nil || rep.Checkpoints != 5 || rep.Entries != 20 {
		t.Fatalf("untampered log: %+v, %v", rep, err)
	}
	return dir
}

func readRecords(t *testing.T, path string) [][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs [][]byte
	if _, err := scanRecords(f, maxNoteSize, func(_ int64, r []byte) error {
		recs = append(recs, bytes.Clone(r))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return recs
}

func writeRecords(t *testing.T, path string, recs [][]byte) {
	t.Helper()
	var b []byte
	for _, r := range recs {
		b = appendRecord(b, r)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func wantVerifyError(t *testing.T, dir string, index int64, reason string) {
	t.Helper()
	_, err := VerifyDir(dir, testSigner(t).Verifier())
	var ve *VerifyError
	if !errors.As(err, &ve) {
		t.Fatalf("VerifyDir: %v, want a *VerifyError", err)
	}
	if ve.Index != index || !strings.Contains(ve.Reason, reason) {
		t.Fatalf("VerifyDir: index %d %q, want index %d and %q", ve.Index, ve.Reason, index, reason)
	}
	t.Logf("detected: %v", err)
}

func wantOpenFails(t *testing.T, dir string) {
	t.Helper()
	if l, err := Open(testOptions(t, dir)); err == nil {
		_ = l.Close()
		t.Fatal("Open accepted a tampered log")
	} else if !errors.Is(err, ErrTampered) {
		t.Fatalf("Open: %v, want ErrTampered", err)
	} else {
		t.Logf("Open refused: %v", err)
	}
}

func TestTamperEditedByte(t *testing.T) {
	t.Run("still canonical", func(t *testing.T) {
		dir := tamperLog(t)
		path := filepath.Join(dir, entriesFile)
		recs := readRecords(t, path)
		recs[7] = bytes.Replace(recs[7], []byte(`"allow"`), []byte(`"deny"`), 1)
		recs[7] = bytes.Replace(recs[7], []byte(`req-2`), []byte(`req-22`), 1) // keep it parseable
		if _, err := ParseEntry(recs[7]); err != nil {
			t.Fatalf("edit broke the entry: %v", err)
		}
		writeRecords(t, path, recs)
		wantVerifyError(t, dir, 5, "[5, 10) was altered")
		wantOpenFails(t, dir)
	})
	t.Run("one byte", func(t *testing.T) {
		dir := tamperLog(t)
		path := filepath.Join(dir, entriesFile)
		b, _ := os.ReadFile(path)
		recs := readRecords(t, path)
		off := 0
		for _, r := range recs[:7] {
			off += recHeader + len(r)
		}
		i := off + recHeader + bytes.Index(recs[7], []byte("worker-7"))
		b[i] ^= 0x01 // "worker-7" -> "vorker-7"
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		wantVerifyError(t, dir, 5, "altered")
	})
	t.Run("unparseable", func(t *testing.T) {
		dir := tamperLog(t)
		path := filepath.Join(dir, entriesFile)
		recs := readRecords(t, path)
		recs[7] = bytes.Replace(recs[7], []byte(`"op"`), []byte(`"OP"`), 1)
		writeRecords(t, path, recs)
		wantVerifyError(t, dir, 7, "bad record")
		// Open must not mistake it for a torn tail and cut the log.
		before, _ := os.ReadFile(path)
		wantOpenFails(t, dir)
		if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
			t.Fatal("Open changed a tampered log")
		}
	})
}

func TestTamperDeletedEntry(t *testing.T) {
	dir := tamperLog(t)
	path := filepath.Join(dir, entriesFile)
	recs := readRecords(t, path)
	recs = append(recs[:7], recs[8:]...)
	writeRecords(t, path, recs)
	wantVerifyError(t, dir, 7, "has index 8")
	wantOpenFails(t, dir)

	// Deleting and renumbering the rest is caught by the checkpoints.
	for i := 7; i < len(recs); i++ {
		e, _ := ParseEntry(recs[i])
		e.Index = uint64(i)
		recs[i], _ = e.MarshalCanonical()
	}
	writeRecords(t, path, recs)
	wantVerifyError(t, dir, 5, "altered")
	wantOpenFails(t, dir)
}

func TestTamperReorderedPair(t *testing.T) {
	dir := tamperLog(t)
	path := filepath.Join(dir, entriesFile)
	recs := readRecords(t, path)
	recs[7], recs[8] = recs[8], recs[7]
	writeRecords(t, path, recs)
	wantVerifyError(t, dir, 7, "has index 8")
	wantOpenFails(t, dir)

	// Swapping the contents but keeping the indexes in order.
	orig7, _ := ParseEntry(recs[8]) // recs are swapped at this point
	orig8, _ := ParseEntry(recs[7])
	orig8.Index, orig7.Index = 7, 8
	recs[7], _ = orig8.MarshalCanonical()
	recs[8], _ = orig7.MarshalCanonical()
	writeRecords(t, path, recs)
	wantVerifyError(t, dir, 5, "altered")
}

func TestTamperRollback(t *testing.T) {
	dir := tamperLog(t)
	path := filepath.Join(dir, entriesFile)
	recs := readRecords(t, path)
	writeRecords(t, path, recs[:12])
	wantVerifyError(t, dir, -1, "covers 15 entries but the log has 12")
	wantOpenFails(t, dir)

	// Rolling back the checkpoints too (dropping the last one) is visible
	// to whoever saw it: a witness, see TestWitnessCosign.
}

func TestTamperForgedCheckpoint(t *testing.T) {
	t.Run("wrong key", func(t *testing.T) {
		dir := tamperLog(t)
		path := filepath.Join(dir, checkpointsFile)
		cps := readRecords(t, path)
		other, err := GenerateSigner("coffre-test-log") // same name, other keys
		if err != nil {
			t.Fatal(err)
		}
		root, _ := ParseCheckpoint(cps[4], testSigner(t).Verifier())
		forged, err := signCheckpoint(other, root.Origin, root.Size, root.Root)
		if err != nil {
			t.Fatal(err)
		}
		cps[4] = forged.Note
		writeRecords(t, path, cps)
		wantVerifyError(t, dir, -1, "#4")
		wantOpenFails(t, dir)
	})
	t.Run("edited root", func(t *testing.T) {
		dir := tamperLog(t)
		path := filepath.Join(dir, checkpointsFile)
		cps := readRecords(t, path)
		lines := strings.SplitN(string(cps[2]), "\n", 4)
		lines[2] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
		cps[2] = []byte(strings.Join(lines, "\n"))
		writeRecords(t, path, cps)
		wantVerifyError(t, dir, -1, "#2")
	})
	t.Run("one key only", func(t *testing.T) {
		dir := tamperLog(t)
		path := filepath.Join(dir, checkpointsFile)
		cps := readRecords(t, path)
		text, sigs, _ := splitNote(cps[4])
		cps[4] = append(append(bytes.Clone(text), '\n'), sigs[0].line...) // Ed25519 only
		writeRecords(t, path, cps)
		wantVerifyError(t, dir, -1, "missing")
		wantOpenFails(t, dir)
	})
}
