package audit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
)

// withFileSizeLimit runs fn with the process's file size limit
// (RLIMIT_FSIZE) at limit bytes: the kernel then cuts a write short at that
// offset and fails the rest with EFBIG, as a full disk cuts it with ENOSPC.
// The limit applies to every file the process writes, so fn must be brief
// and nothing else may write meanwhile.
func withFileSizeLimit(t *testing.T, limit uint64, fn func()) {
	t.Helper()
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &orig); err != nil {
		t.Skipf("getrlimit: %v", err)
	}
	if orig.Cur < limit {
		t.Skipf("file size limit already %d", orig.Cur)
	}
	low := orig
	low.Cur = limit
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &low); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	defer func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &orig); err != nil {
			t.Fatalf("restoring the file size limit: %v", err)
		}
	}()
	fn()
}

// TestCosignatureShortWrite: a cosignature cut short by the disk is
// refused and leaves no fragment; the retry is stored whole and survives
// reopening the log.
func TestCosignatureShortWrite(t *testing.T) {
	dir := t.TempDir()
	witness, err := GenerateSigner("witness")
	if err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, dir)
	opts.Preallocate = -1 // no background writes while the limit is low
	opts.Witnesses = []*Verifier{witness.Verifier()}
	l := openTestLog(t, opts)
	appendN(t, l, 3)
	cp, err := l.PublishCheckpoint()
	if err != nil {
		t.Fatal(err)
	}
	sig, err := Cosign(witness, nil, cp, nil, l.Verifier())
	if err != nil {
		t.Fatal(err)
	}
	note := append(bytes.Clone(cp.Note), sig...)
	path := filepath.Join(dir, cosignaturesFile)
	before, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}

	withFileSizeLimit(t, uint64(before.Size())+16, func() {
		err = l.AddCosignature(note)
	})
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("AddCosignature cut short: %v, want ErrUnavailable wrapping EFBIG", err)
	}
	if after, err := os.Stat(path); err != nil || after.Size() != before.Size() {
		t.Errorf("the refused cosignature left the file at %d bytes, was %d (%v)", after.Size(), before.Size(), err)
	}

	if err := l.AddCosignature(note); err != nil {
		t.Fatalf("retry: %v", err)
	}
	want, err := l.Cosignatures(cp.Size)
	if err != nil || len(want) == 0 {
		t.Fatalf("Cosignatures: %d, %v", len(want), err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l2 := openTestLog(t, testOptions(t, dir))
	got, err := l2.Cosignatures(cp.Size)
	if err != nil || !slices.EqualFunc(got, want, bytes.Equal) {
		t.Fatalf("after reopening: %q, %v; want %q", got, err, want)
	}
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyDir(dir, testSigner(t).Verifier()); err != nil {
		t.Fatalf("VerifyDir: %v", err)
	}
}
