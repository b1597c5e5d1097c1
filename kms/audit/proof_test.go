package audit

import (
	"bytes"
	"context"
	"errors"
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
	l := openTestLog(t, testOptions(t, dir))
	logV := testSigner(t).Verifier()
	witness, err := GenerateSigner("witness.example")
	if err != nil {
		t.Fatal(err)
	}

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
