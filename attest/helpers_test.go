package attest_test

import (
	"crypto/ecdsa"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cloudflare/circl/hpke"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/internal/tpmtest"
)

// now is the time challenges are made at; verification happens a second
// later. It is the real time, because attesttest's CAs are valid around
// the real time.
var now = time.Now().UTC().Truncate(time.Second)

const challengeTTL = time.Minute

// node is the node side of the protocol in a test: a TPM with its EK and
// an AK, doing what the agent does, directly with go-tpm.
type node struct {
	tpm   transport.TPM
	ekKey *tpmtest.Key
	ak    *tpmtest.Key
	ek    *attest.EK // as the server parsed it
}

// newNode makes the RSA EK (template L-1) and an AK from akTemplate.
func newNode(t *testing.T, tpm transport.TPM, akTemplate tpm2.TPMTPublic) *node {
	t.Helper()
	return newNodeWithEK(t, tpm, tpm2.RSAEKTemplate, akTemplate)
}

func newNodeWithEK(t *testing.T, tpm transport.TPM, ekTemplate, akTemplate tpm2.TPMTPublic) *node {
	t.Helper()
	ekKey := tpmtest.CreatePrimary(t, tpm, tpm2.TPMRHEndorsement, ekTemplate)
	ek, err := attest.ParseEKPublic(ekKey.PublicBytes)
	if err != nil {
		t.Fatalf("ParseEKPublic: %v", err)
	}
	return &node{tpm: tpm, ekKey: ekKey, ak: tpmtest.AK(t, tpm, akTemplate), ek: ek}
}

// challenge is the server's NewChallenge for this node's EK and AK.
func (n *node) challenge(t testing.TB, pcrs ...uint32) *attest.Challenge {
	t.Helper()
	ch, err := attest.NewChallenge(rand.Reader, n.ek, n.ak.PublicBytes, pcrs, challengeTTL, now)
	if err != nil {
		t.Fatalf("NewChallenge: %v", err)
	}
	return ch
}

// answer activates the credential, makes a binding key and quotes pcrs
// with qualifying data H(nonce ‖ binding key): the evidence of an honest
// node.
func (n *node) answer(t testing.TB, ch *attest.Challenge, pcrs ...uint) *attest.Evidence {
	t.Helper()
	secret, err := tpmtest.Activate(n.tpm, n.ekKey, n.ak, ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		t.Fatalf("ActivateCredential: %v", err)
	}
	bk := bindingKey(t)
	quote, sig := tpmtest.Quote(t, n.tpm, n.ak, pcrs, attest.QualifyingData(ch.Nonce, bk))
	return &attest.Evidence{
		ActivatedSecret: secret,
		AKPublic:        n.ak.PublicBytes,
		Quote:           quote,
		Signature:       sig,
		PCRs:            tpmtest.ReadPCRs(t, n.tpm, pcrs...),
		BindingKey:      bk,
	}
}

// bindingKey makes a fresh X-Wing public key, as the agent does.
func bindingKey(t testing.TB) []byte {
	t.Helper()
	pk, _, err := hpke.KEM_XWING.Scheme().GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	b, err := pk.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// policyFor is a class policy with reference values, verified a second
// after the challenge.
func policyFor(pcrs map[uint32][]byte) attest.Policy {
	return attest.Policy{PCRs: pcrs, Now: now.Add(time.Second)}
}

// subset picks PCR values.
func subset(pcrs map[uint32][]byte, idx ...uint32) map[uint32][]byte {
	out := map[uint32][]byte{}
	for _, i := range idx {
		out[i] = pcrs[i]
	}
	return out
}

// wantRefusal fails unless err is an *attest.Error for check with a
// reason; it returns the refusal.
func wantRefusal(t *testing.T, err, check error) *attest.Error {
	t.Helper()
	var e *attest.Error
	if !errors.As(err, &e) {
		t.Fatalf("got %v, want an *attest.Error refusal for %v", err, check)
	}
	if !errors.Is(err, check) {
		t.Fatalf("got refusal %q, want check %v", err, check)
	}
	if strings.TrimSpace(e.Reason) == "" {
		t.Errorf("refusal for %v has no reason", check)
	}
	checkReason(t, e)
	return e
}

// wantReason fails unless the refusal's reason mentions each of parts;
// tests only, code never matches reasons.
func wantReason(t *testing.T, e *attest.Error, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(e.Reason, p) {
			t.Errorf("reason %q does not mention %q", e.Reason, p)
		}
	}
}

// eccXY returns the fixed-size X and Y coordinates of an ECDSA key.
func eccXY(t testing.TB, k *ecdsa.PublicKey) [2][]byte {
	t.Helper()
	b, err := k.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	size := (len(b) - 1) / 2
	return [2][]byte{b[1 : 1+size], b[1+size:]}
}
