package audit

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
)

func TestInclusionProofs(t *testing.T) {
	l := openTestLog(t, testOptions(t, t.TempDir()))
	appendN(t, l, 100)
	recs, err := l.Read(context.Background(), 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, size := range []uint64{1, 2, 3, 7, 8, 33, 64, 99, 100} {
		root, err := l.Root(size)
		if err != nil {
			t.Fatal(err)
		}
		for i := range size {
			p, err := l.InclusionProof(i, size)
			if err != nil {
				t.Fatalf("InclusionProof(%d, %d): %v", i, size, err)
			}
			if err := VerifyInclusion(recs[i].Raw, i, size, p, root); err != nil {
				t.Fatalf("VerifyInclusion(%d, %d): %v", i, size, err)
			}
			// The wrong entry, or the right one at another index, fails.
			if err := VerifyInclusion(recs[(i+1)%100].Raw, i, size, p, root); err == nil {
				t.Fatalf("inclusion of entry %d accepted at %d", (i+1)%100, i)
			}
			if size > 1 {
				if err := VerifyInclusion(recs[i].Raw, (i+1)%size, size, p, root); err == nil {
					t.Fatalf("inclusion of %d accepted at another index", i)
				}
			}
		}
	}
	if _, err := l.InclusionProof(100, 100); !errors.Is(err, ErrProof) {
		t.Fatalf("out of range: %v", err)
	}
	if _, err := l.InclusionProof(0, 101); !errors.Is(err, ErrProof) {
		t.Fatalf("beyond the log: %v", err)
	}
}

func TestConsistencyProofs(t *testing.T) {
	l := openTestLog(t, testOptions(t, t.TempDir()))
	appendN(t, l, 100)
	sizes := []uint64{0, 1, 2, 3, 5, 8, 13, 32, 64, 65, 99, 100}
	for _, a := range sizes {
		ra, _ := l.Root(a)
		for _, b := range sizes {
			if b < a {
				continue
			}
			rb, _ := l.Root(b)
			p, err := l.ConsistencyProof(a, b)
			if err != nil {
				t.Fatalf("ConsistencyProof(%d, %d): %v", a, b, err)
			}
			if err := VerifyConsistency(a, b, p, ra, rb); err != nil {
				t.Fatalf("VerifyConsistency(%d, %d): %v", a, b, err)
			}
			if a > 0 && a < b {
				bad := bytes.Clone(rb)
				bad[0] ^= 1
				if err := VerifyConsistency(a, b, p, ra, bad); err == nil {
					t.Fatalf("consistency (%d, %d) accepted with a wrong root", a, b)
				}
			}
		}
	}
	if _, err := l.ConsistencyProof(5, 4); !errors.Is(err, ErrProof) {
		t.Fatalf("from > to: %v", err)
	}
}

func TestWitnessCosign(t *testing.T) {
	dir := t.TempDir()
	witness, err := GenerateSigner("witness.example")
	if err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, dir)
	opts.Witnesses = []*Verifier{witness.Verifier()}
	l := openTestLog(t, opts)
	logV := testSigner(t).Verifier()

	appendN(t, l, 10)
	if err := l.publish(); err != nil {
		t.Fatal(err)
	}
	first, _ := l.Checkpoint()
	sig1, err := Cosign(witness, nil, first, nil, logV)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.AddCosignature(append(bytes.Clone(first.Note), sig1...)); err != nil {
		t.Fatal(err)
	}

	appendN(t, l, 15)
	if err := l.publish(); err != nil {
		t.Fatal(err)
	}
	next, _ := l.Checkpoint()
	p, _ := l.ConsistencyProof(first.Size, next.Size)
	sig2, err := Cosign(witness, &first, next, p, logV)
	if err != nil {
		t.Fatalf("consistent checkpoint refused: %v", err)
	}
	cosigned := append(bytes.Clone(next.Note), sig2...)
	if err := l.AddCosignature(cosigned); err != nil {
		t.Fatal(err)
	}
	// The cosigned note verifies with the log's key and the witness's key.
	for _, v := range []*Verifier{logV, witness.Verifier()} {
		if _, err := ParseCheckpoint(cosigned, v); err != nil {
			t.Fatalf("cosigned note, verifier %s: %v", v.Name(), err)
		}
	}
	if err := l.AddCosignature(cosigned); err != nil { // again: stored once
		t.Fatal(err)
	}
	lines, err := l.Cosignatures(next.Size)
	if err != nil || len(lines) != 2 || !bytes.Equal(bytes.Join(lines, nil), sig2) {
		t.Fatalf("Cosignatures: %q, %v", lines, err)
	}

	// A fork: another log under the same key that rewrote entry 3.
	forkDir := t.TempDir()
	fork := openTestLog(t, testOptions(t, forkDir))
	for i := range 25 {
		e := testEntry(i)
		if i == 3 {
			e.Decision = Deny
		}
		if _, err := fork.Append(context.Background(), e); err != nil {
			t.Fatal(err)
		}
	}
	if err := fork.publish(); err != nil {
		t.Fatal(err)
	}
	forked, _ := fork.Checkpoint()
	fp, _ := fork.ConsistencyProof(first.Size, forked.Size)
	if _, err := Cosign(witness, &first, forked, fp, logV); !errors.Is(err, ErrProof) {
		t.Fatalf("forked checkpoint cosigned: %v", err)
	}
	// The real proof does not help the fork either.
	if _, err := Cosign(witness, &first, forked, p, logV); err == nil {
		t.Fatal("forked checkpoint cosigned with the log's proof")
	}
	// A rollback: the witness saw 25, the log now shows 10.
	if _, err := Cosign(witness, &next, first, nil, logV); err == nil {
		t.Fatal("rollback cosigned")
	}
	// Not signed by the log.
	other, _ := GenerateSigner("coffre-test-log")
	bogus, _ := signCheckpoint(other, next.Origin, next.Size, next.Root)
	if _, err := Cosign(witness, &first, bogus, p, logV); !errors.Is(err, ErrCheckpoint) {
		t.Fatalf("checkpoint by another key cosigned: %v", err)
	}
	// The log refuses a cosigned checkpoint that is not its own.
	fsig, _ := Cosign(witness, nil, forked, nil, logV)
	if err := l.AddCosignature(append(bytes.Clone(forked.Note), fsig...)); !errors.Is(err, ErrCheckpoint) {
		t.Fatalf("AddCosignature of a fork: %v", err)
	}
}

// TestCosignatureRefusals: the log stores only cosignatures that verify
// under a configured witness, both halves together; anything else is
// refused and stores nothing, so that an auditor certificate cannot fill
// the disk or a checkpoint's slots with lines of its own.
func TestCosignatureRefusals(t *testing.T) {
	witness, err := GenerateSigner("witness.example")
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := GenerateSigner("stranger.example")
	if err != nil {
		t.Fatal(err)
	}
	logV := testSigner(t).Verifier()

	// No witness configured: no cosignature is taken.
	bare := openTestLog(t, testOptions(t, t.TempDir()))
	appendN(t, bare, 2)
	cp, err := bare.PublishCheckpoint()
	if err != nil {
		t.Fatal(err)
	}
	sig, err := Cosign(witness, nil, cp, nil, logV)
	if err != nil {
		t.Fatal(err)
	}
	if err := bare.AddCosignature(append(bytes.Clone(cp.Note), sig...)); !errors.Is(err, ErrCheckpoint) || !strings.Contains(err.Error(), "no witness configured") {
		t.Fatalf("cosignature with no witness configured: %v", err)
	}

	opts := testOptions(t, t.TempDir())
	opts.Witnesses = []*Verifier{witness.Verifier()}
	l := openTestLog(t, opts)
	appendN(t, l, 2)
	if cp, err = l.PublishCheckpoint(); err != nil {
		t.Fatal(err)
	}
	good, err := Cosign(witness, nil, cp, nil, logV)
	if err != nil {
		t.Fatal(err)
	}
	goodLines := strings.SplitAfter(string(good), "\n")
	edLine, mlLine := goodLines[0], goodLines[1]
	if len(edLine) > len(mlLine) {
		edLine, mlLine = mlLine, edLine
	}
	strange, err := Cosign(stranger, nil, cp, nil, logV)
	if err != nil {
		t.Fatal(err)
	}
	// A line of the right witness whose signature bytes were changed.
	forged := []byte(mlLine)
	forged[len(forged)-3] ^= 'A' ^ 'B'
	junk := "— witness.example " + strings.Repeat("A", 16<<10) + "\n"
	for name, lines := range map[string]string{
		"unknown witness":      string(strange),
		"forged signature":     edLine + string(forged),
		"Ed25519 half alone":   edLine,
		"ML-DSA-65 half alone": mlLine,
		"good and unknown":     string(good) + string(strange),
		"junk line":            junk,
	} {
		if err := l.AddCosignature(append(bytes.Clone(cp.Note), lines...)); !errors.Is(err, ErrCheckpoint) {
			t.Errorf("%s: %v, want ErrCheckpoint", name, err)
		}
	}
	if got, _ := l.Cosignatures(cp.Size); len(got) != 0 {
		t.Fatalf("refused cosignatures left %d lines", len(got))
	}
	if err := l.AddCosignature(append(bytes.Clone(cp.Note), good...)); err != nil {
		t.Fatal(err)
	}
	if got, _ := l.Cosignatures(cp.Size); len(got) != 2 {
		t.Fatalf("%d lines stored, want the witness's 2", len(got))
	}

	// Open checks the witness list.
	for name, ws := range map[string][]*Verifier{
		"duplicate name": {witness.Verifier(), witness.Verifier()},
		"the log's key":  {logV},
		"nil":            {nil},
	} {
		o := testOptions(t, t.TempDir())
		o.Witnesses = ws
		if l, err := Open(o); err == nil {
			l.Close()
			t.Errorf("%s: Open accepted the witnesses", name)
		}
	}
}
