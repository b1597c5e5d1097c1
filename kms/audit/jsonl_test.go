package audit

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func readLines(t testing.TB, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path) // #nosec G304 -- test file
	if err != nil {
		t.Fatal(err)
	}
	if len(b) == 0 {
		return nil
	}
	if !bytes.HasSuffix(b, []byte("\n")) {
		t.Fatalf("%s does not end with a newline", path)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func TestJSONLSink(t *testing.T) {
	l := sinkLog(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "audit.jsonl")
	appendEntries(t, l, 50)
	s, err := NewJSONLSink(l, JSONLConfig{Path: out})
	if err != nil {
		t.Fatal(err)
	}
	stop := runSink(t, s.Run)
	sinkWait(t, 10*time.Second, "50 lines", func() bool { return s.Status().Cursor == 50 })
	appendEntries(t, l, 25)
	sinkWait(t, 10*time.Second, "75 lines", func() bool { return s.Status().Cursor == 75 })
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("output mode %v", fi.Mode().Perm())
	}
	recs, err := l.Read(context.Background(), 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	lines := readLines(t, out)
	if len(lines) != 75 {
		t.Fatalf("%d lines, want 75", len(lines))
	}
	for i, line := range lines {
		if line != string(recs[i].Raw) {
			t.Fatalf("line %d = %s, want %s", i, line, recs[i].Raw)
		}
	}

	// A batch written but not committed (crash between write and commit)
	// is cut and written again: every entry exactly once.
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte(lines[74] + "\n" + `{"torn`)); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	appendEntries(t, l, 5)
	s2, err := NewJSONLSink(l, JSONLConfig{Path: out})
	if err != nil {
		t.Fatal(err)
	}
	stop = runSink(t, s2.Run)
	sinkWait(t, 10*time.Second, "80 lines", func() bool { return s2.Status().Cursor == 80 })
	_ = stop()
	recs, err = l.Read(context.Background(), 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	lines = readLines(t, out)
	if len(lines) != 80 {
		t.Fatalf("%d lines after restart, want 80", len(lines))
	}
	for i, line := range lines {
		if line != string(recs[i].Raw) {
			t.Fatalf("line %d = %s, want %s", i, line, recs[i].Raw)
		}
	}
}

// TestJSONLSinkRotatedThenCommitFails: after the output file is rotated,
// a batch written whose commit then fails (the sink crashing at that point
// leaves the same state) is cut and written again at the next session, not
// written a second time after itself.
func TestJSONLSinkRotatedThenCommitFails(t *testing.T) {
	l := sinkLog(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "audit.jsonl")
	cfg := JSONLConfig{Path: out, SpoolDir: filepath.Join(dir, "spool"), MinBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}
	appendEntries(t, l, 20)
	s, err := NewJSONLSink(l, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := runSink(t, s.Run)
	sinkWait(t, 10*time.Second, "20 lines", func() bool { return s.Status().Cursor == 20 })
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}

	// The operator rotates the file, and the spool cannot be written: a
	// directory stands where the rename puts the new cursor.
	if err := os.Rename(out, out+".1"); err != nil {
		t.Fatal(err)
	}
	spool := s.spool.Path()
	if err := os.Remove(spool); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(spool, 0o700); err != nil {
		t.Fatal(err)
	}
	appendEntries(t, l, 10)
	stop = runSink(t, s.Run)
	sinkWait(t, 10*time.Second, "a failed commit", func() bool { return s.Status().LastError != nil })
	if err := os.Remove(spool); err != nil {
		t.Fatal(err)
	}
	sinkWait(t, 10*time.Second, "30 entries", func() bool { return s.Status().Cursor == 30 })
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}

	recs, err := l.Read(context.Background(), 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if got := readLines(t, out+".1"); len(got) != 20 {
		t.Fatalf("rotated file: %d lines, want 20", len(got))
	}
	lines := readLines(t, out)
	if len(lines) != 10 {
		t.Fatalf("new file: %d lines, want the 10 entries after the rotation once each", len(lines))
	}
	for i, line := range lines {
		if line != string(recs[20+i].Raw) {
			t.Fatalf("new file line %d = %s, want %s", i, line, recs[20+i].Raw)
		}
	}
}

func TestJSONLSinkOCSF(t *testing.T) {
	l := sinkLog(t)
	out := filepath.Join(t.TempDir(), "ocsf.jsonl")
	appendEntries(t, l, 10)
	s, err := NewJSONLSink(l, JSONLConfig{Path: out, OCSF: true})
	if err != nil {
		t.Fatal(err)
	}
	stop := runSink(t, s.Run)
	sinkWait(t, 10*time.Second, "10 lines", func() bool { return s.Status().Cursor == 10 })
	_ = stop()
	recs, err := l.Read(context.Background(), 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	for i, line := range readLines(t, out) {
		want, err := MarshalOCSF(recs[i].Entry, uint64(i))
		if err != nil {
			t.Fatal(err)
		}
		if line != string(want) {
			t.Fatalf("line %d = %s, want %s", i, line, want)
		}
	}
}

func TestJSONLConfigErrors(t *testing.T) {
	if _, err := NewJSONLSink(sourceFunc{}, JSONLConfig{}); err == nil {
		t.Error("empty Path accepted")
	}
	if _, err := NewJSONLSink(nil, JSONLConfig{Path: filepath.Join(t.TempDir(), "x")}); err == nil {
		t.Error("nil source accepted")
	}
	for _, cfg := range []JSONLConfig{
		{MinBackoff: -time.Second},
		{MaxBackoff: -time.Second},
		{MinBackoff: time.Minute, MaxBackoff: time.Second},
	} {
		cfg.Path = filepath.Join(t.TempDir(), "x")
		if _, err := NewJSONLSink(sourceFunc{}, cfg); err == nil {
			t.Errorf("backoff %v..%v accepted", cfg.MinBackoff, cfg.MaxBackoff)
		}
	}
}
