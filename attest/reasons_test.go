package attest_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest"
)

// TestRefusalReasons makes every check of Verify refuse once, in software
// (a soft AK stands in for the TPM, and the test reads the credential
// secret from the challenge instead of activating it), and checks that
// each refusal is well formed: the right sentinel, a one-line printable
// reason without formatting mistakes, and never the credential secret.
func TestRefusalReasons(t *testing.T) {
	ak := softAKFor(t)
	ek, err := attest.ParseEKPublic(rsaEKPublic(&testRSAKey(t).PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	in := defaultSoftQuoteInput()

	// honest builds a challenge and the evidence an honest node with the
	// soft AK would send.
	honest := func(t *testing.T) (*attest.Challenge, *attest.Evidence) {
		t.Helper()
		ch, err := attest.NewChallenge(rand.Reader, ek, ak.publicBytes, []uint32{0, 7}, time.Minute, now)
		if err != nil {
			t.Fatal(err)
		}
		bk := bindingKey(t)
		q := softQuoteInput{pcrs: in.pcrs, extra: attest.QualifyingData(ch.Nonce, bk)}
		quote := tpm2.Marshal(ak.attestFor(q))
		return ch, &attest.Evidence{
			ActivatedSecret: bytes.Clone(ch.Secret), AKPublic: ak.publicBytes, Quote: quote,
			Signature: ak.sign(t, quote, tpm2.TPMAlgSHA256), PCRs: q.pcrs, BindingKey: bk,
		}
	}
	pol := policyFor(in.pcrs)
	if ch, ev := honest(t); true {
		if _, err := attest.Verify(ch, ev, pol); err != nil {
			t.Fatalf("control: %v", err)
		}
	}

	other := softAKOther(t)
	for _, c := range []struct {
		name  string
		check error
		run   func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error
	}{
		{"expired", attest.ErrNonce, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			p := pol
			p.Now = ch.Expires.Add(time.Second)
			_, err := attest.Verify(ch, ev, p)
			return err
		}},
		{"revoked", attest.ErrEK, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			p := pol
			p.RevokedFingerprints = map[string]bool{ek.Fingerprint: true}
			_, err := attest.Verify(ch, ev, p)
			return err
		}},
		{"secret", attest.ErrSecret, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			ev.ActivatedSecret = make([]byte, 32)
			_, err := attest.Verify(ch, ev, pol)
			return err
		}},
		{"AK swapped", attest.ErrAK, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			ev.AKPublic = append(bytes.Clone(ev.AKPublic[:len(ev.AKPublic)-1]), ev.AKPublic[len(ev.AKPublic)-1]^1)
			_, err := attest.Verify(ch, ev, pol)
			return err
		}},
		{"binding key", attest.ErrBindingKey, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			ev.BindingKey = []byte("not X-Wing")
			_, err := attest.Verify(ch, ev, pol)
			return err
		}},
		{"quote", attest.ErrQuote, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			ev.Quote = ev.Quote[:10]
			_, err := attest.Verify(ch, ev, pol)
			return err
		}},
		{"signature", attest.ErrSignature, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			ev.Signature = other.sign(t, ev.Quote, tpm2.TPMAlgSHA256)
			_, err := attest.Verify(ch, ev, pol)
			return err
		}},
		{"PCR value", attest.ErrPCR, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			p := pol
			p.PCRs = map[uint32][]byte{7: bytes.Repeat([]byte{7}, 32)}
			_, err := attest.Verify(ch, ev, p)
			return err
		}},
		{"event log", attest.ErrEventLog, func(t *testing.T, ch *attest.Challenge, ev *attest.Evidence) error {
			p := pol
			p.RequireEventLog = true
			ev.EventLog = readEventLog(t, "arch-linux-workstation.bin")
			_, err := attest.Verify(ch, ev, p)
			return err
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ch, ev := honest(t)
			err := c.run(t, ch, ev)
			wantRefusal(t, err, c.check) // checks the reason too
			if strings.Contains(strings.ToLower(err.Error()), hex.EncodeToString(ch.Secret)) {
				t.Fatal("the credential secret is in the refusal")
			}
			if !strings.HasPrefix(err.Error(), "attestation refused: "+c.check.Error()+": ") {
				t.Errorf("Error() = %q", err.Error())
			}
			// Matching is by errors.Is on the sentinel only.
			for _, s := range []error{attest.ErrEK, attest.ErrAK, attest.ErrNonce, attest.ErrSecret, attest.ErrQuote,
				attest.ErrSignature, attest.ErrPCR, attest.ErrEventLog, attest.ErrBindingKey} {
				if errors.Is(err, s) != (s == c.check) {
					t.Errorf("errors.Is(err, %v) = %v", s, !(s == c.check))
				}
			}
		})
	}
}

// checkReason fails for a reason an operator could not use.
func checkReason(t *testing.T, e *attest.Error) {
	t.Helper()
	r := e.Reason
	switch {
	case strings.Contains(r, "%!"):
		t.Errorf("formatting mistake in %q", r)
	case strings.ContainsAny(r, "\n\r"):
		t.Errorf("multi-line reason %q", r)
	case len(r) > 400:
		t.Errorf("reason of %d bytes", len(r))
	}
	for _, c := range r {
		if !unicode.IsPrint(c) {
			t.Errorf("unprintable %q in reason %q", c, r)
			break
		}
	}
}
