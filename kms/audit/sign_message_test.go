package audit

import (
	"bytes"
	"errors"
	"testing"
)

func TestSignMessage(t *testing.T) {
	s, err := GenerateSigner("primary.example")
	if err != nil {
		t.Fatal(err)
	}
	other, err := GenerateSigner("primary.example")
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("manifest")
	sig, err := s.SignMessage("coffre backup v1", msg)
	if err != nil {
		t.Fatal(err)
	}
	if len(sig) != MessageSignatureSize {
		t.Fatalf("signature of %d bytes", len(sig))
	}
	v := s.Verifier()
	if err := v.VerifyMessage("coffre backup v1", msg, sig); err != nil {
		t.Fatalf("good signature: %v", err)
	}
	// The verifier must also work after a round trip through its file form.
	pv, err := ParseVerifier(v.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if err := pv.VerifyMessage("coffre backup v1", msg, sig); err != nil {
		t.Fatalf("parsed verifier: %v", err)
	}

	flipEd := bytes.Clone(sig)
	flipEd[3] ^= 1
	flipML := bytes.Clone(sig)
	flipML[len(flipML)-40] ^= 1
	for name, tc := range map[string]struct {
		v       *Verifier
		purpose string
		msg     []byte
		sig     []byte
	}{
		"other purpose":   {v, "coffre other v1", msg, sig},
		"other message":   {v, "coffre backup v1", []byte("manifesT"), sig},
		"other key":       {other.Verifier(), "coffre backup v1", msg, sig},
		"Ed25519 flipped": {v, "coffre backup v1", msg, flipEd},
		"ML-DSA flipped":  {v, "coffre backup v1", msg, flipML},
		"truncated":       {v, "coffre backup v1", msg, sig[:len(sig)-1]},
		"empty":           {v, "coffre backup v1", msg, nil},
	} {
		if err := tc.v.VerifyMessage(tc.purpose, tc.msg, tc.sig); !errors.Is(err, ErrMessageSignature) {
			t.Errorf("%s: %v, want ErrMessageSignature", name, err)
		}
	}
	if _, err := s.SignMessage("", msg); err == nil {
		t.Error("empty purpose accepted")
	}
	if _, err := s.SignMessage("a\x00b", msg); err == nil {
		t.Error("purpose with NUL accepted")
	}
}

// A message signature must never pass as a checkpoint signature: the
// signed bytes start with 0xFF, which a note (UTF-8) cannot hold.
func TestMessageBytesAreNotNotes(t *testing.T) {
	m, err := messageBytes("coffre backup v1", []byte("x\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := splitNote(append(m, "\n— x AAAAAAA=\n"...)); !errors.Is(err, ErrCheckpoint) {
		t.Fatalf("message bytes parsed as a note: %v", err)
	}
}
