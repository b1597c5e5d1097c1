package kms

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/attest/attesttest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// These tests drive the node side with the TPM simulator through the
// agent package. The simulator is one per process: no t.Parallel here.

// tpmNode is a simulated machine: its TPM and the agent on it.
type tpmNode struct {
	a    *agent.Agent
	pcrs map[uint32][]byte // current values of PCRs 0 and 7
}

var nodePCRs = []uint32{0, 7}

func openTPMNode(t testing.TB) *tpmNode {
	t.Helper()
	tpm, err := agent.OpenTPM("simulator")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	ctx := ctxT(t)
	a, err := agent.New(ctx, tpm, agent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	nonce := make([]byte, 32)
	rand.Read(nonce)
	_, _, vals, err := a.Quote(ctx, nonce, nodePCRs)
	if err != nil {
		t.Fatal(err)
	}
	return &tpmNode{a: a, pcrs: vals}
}

func (n *tpmNode) class(name string) *NodeClass {
	return &NodeClass{Name: name, PCRs: n.pcrs}
}

// evidence answers ch as the agent does.
func (n *tpmNode) evidence(ctx context.Context, ch *attest.Challenge) (*attest.Evidence, error) {
	secret, err := n.a.Activate(ctx, ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		return nil, err
	}
	quote, sig, vals, err := n.a.Quote(ctx, ch.Nonce, ch.PCRSelection)
	if err != nil {
		return nil, err
	}
	return &attest.Evidence{
		ActivatedSecret: secret,
		AKPublic:        n.a.AKPublic(),
		Quote:           quote,
		Signature:       sig,
		PCRs:            vals,
		BindingKey:      n.a.BindingPublicKey(),
	}, nil
}

func (n *tpmNode) attest(ctx context.Context, r *ReleaseService, ekCert []byte) (*Session, error) {
	ch, err := r.Challenge(ctx, ekCert, n.a.EKPublic(), n.a.AKPublic())
	if err != nil {
		return nil, err
	}
	ev, err := n.evidence(ctx, ch)
	if err != nil {
		return nil, err
	}
	return r.Complete(ctx, ch.ID, ev)
}

func TestAttestedReleaseTPM(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	node := openTPMNode(t)
	ctx := ctxT(t)

	// Not enrolled yet.
	_, err := f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
	wantErr(t, err, ErrPermissionDenied, "is not enrolled")
	if ev := f.audit.last(); ev.Op != AuditChallenge || ev.Allowed || ev.EKFingerprint == "" {
		t.Fatalf("audit of the refusal: %+v", ev)
	}

	if _, err := f.rel.SetNodeClass(ctx, node.class("sim")); err != nil {
		t.Fatal(err)
	}
	n, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "sim-1", Class: "sim", Labels: map[string]string{"site": "lab"}, EKPublic: node.a.EKPublic()})
	if err != nil {
		t.Fatal(err)
	}
	hpkeRing := f.keyring(t, "acme/disks", []string{"sim"}, map[string]string{"site": "lab"}, ReleaseHPKE)
	tpmRing := f.keyring(t, "acme/vault", []string{"sim"}, nil, ReleaseTPM)

	sess, err := node.attest(ctx, f.rel, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sess.Node != "sim-1" || sess.Class != "sim" || sess.Labels["site"] != "lab" || sess.EKFingerprint != n.EKFingerprint ||
		sess.Expires.Sub(f.clock.Now()) != DefaultSessionTTL || len(sess.Token) != 43 {
		t.Fatalf("session %+v", sess)
	}
	if strings.Contains(sess.String(), sess.Token) {
		t.Fatal("Session.String shows the token")
	}
	if ev := f.audit.last(); ev.Op != AuditComplete || !ev.Allowed || ev.EvidenceHash == [32]byte{} {
		t.Fatalf("audit of the attestation: %+v", ev)
	}

	// HPKE-mode release round trip: the agent derives K from the
	// session's enc through the real X-Wing, with the binding key it
	// quoted, and opens the release with it.
	nodeK, err := node.a.DeriveSessionKey(sess.Enc)
	if err != nil {
		t.Fatal(err)
	}
	// The agent does not hand K out; that it holds the server's K shows
	// as a seal made directly with the session's key opening under it.
	probe := bytes.Repeat([]byte{0x17}, 32)
	direct, err := sessionOf(t, f.rel, sess.Token).rk.seal(probe, []byte("probe"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := nodeK.Open(&coffrev1.SessionSealed{Seq: direct.Seq, Ciphertext: direct.Ciphertext}, []byte("probe")); err != nil || !bytes.Equal(got, probe) {
		t.Fatalf("the node's K does not open the server's seal: %v", err)
	}
	ec := map[string]string{"volume": "vol-1"}
	dk, err := f.rel.GenerateDataKey(ctx, sess.Token, hpkeRing, ec)
	if err != nil {
		t.Fatal(err)
	}
	if dk.Key.Session == nil || dk.Key.TPM != nil {
		t.Fatalf("hpke release gave %+v", dk.Key)
	}
	key, err := nodeK.Open(sessionSealedProto(dk.Key), dk.Envelope)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := f.svc.Decrypt(ctx, "acme", dk.Envelope, ec)
	if err != nil || string(plain.Expose()) != string(key) {
		t.Fatalf("the agent opened another key (%v)", err)
	}

	// TPM-bound release round trip.
	tk, err := f.rel.GenerateDataKey(ctx, sess.Token, tpmRing, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tk.Key.TPM == nil || tk.Key.Session != nil {
		t.Fatalf("tpm release gave %+v", tk.Key)
	}
	d := tk.Key.TPM
	key, err = node.a.OpenTPM(ctx, &coffrev1.TPMDuplicate{Duplicate: d.Duplicate, InSymSeed: d.InSymSeed, Public: d.Public}, nodePCRs)
	if err != nil {
		t.Fatal(err)
	}
	if plain, err = f.svc.Decrypt(ctx, "acme", tk.Envelope, nil); err != nil || string(plain.Expose()) != string(key) {
		t.Fatalf("TPM release opened another key (%v)", err)
	}

	// A replayed challenge.
	ch, err := f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	if ch.Secret != nil {
		t.Fatal("Challenge handed out the credential secret")
	}
	ev, err := node.evidence(ctx, ch)
	if err != nil {
		t.Fatal(err)
	}
	second, err := f.rel.Complete(ctx, ch.ID, ev)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.rel.Complete(ctx, ch.ID, ev)
	wantErr(t, err, attest.ErrNonce, "unknown, expired or already used")
	if !errors.Is(err, ErrPermissionDenied) {
		t.Fatalf("replay: %v, want ErrPermissionDenied", err)
	}
	// Re-attestation issued a second session, with its own K; both work,
	// each with its own key.
	secondK, err := node.a.DeriveSessionKey(second.Enc)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		tok        string
		own, other *agent.SessionKey
	}{{sess.Token, nodeK, secondK}, {second.Token, secondK, nodeK}} {
		rel, err := f.rel.GenerateDataKey(ctx, c.tok, hpkeRing, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.own.Open(sessionSealedProto(rel.Key), rel.Envelope); err != nil {
			t.Fatalf("own session key: %v", err)
		}
		if _, err := c.other.Open(sessionSealedProto(rel.Key), rel.Envelope); !errors.Is(err, agent.ErrOpen) {
			t.Fatalf("the other session's key: %v, want ErrOpen", err)
		}
	}

	// Evidence without the activated secret proves nothing about who sent
	// it (an EK public key is no secret): refused, and the node's sessions
	// stand.
	ch, err = f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	if ev, err = node.evidence(ctx, ch); err != nil {
		t.Fatal(err)
	}
	ev.ActivatedSecret[0] ^= 1
	_, err = f.rel.Complete(ctx, ch.ID, ev)
	wantErr(t, err, attest.ErrSecret, "attestation refused: credential")
	for _, tok := range []string{sess.Token, second.Token} {
		if _, err := f.rel.GenerateDataKey(ctx, tok, hpkeRing, nil); err != nil {
			t.Fatalf("a session ended on evidence that did not activate the credential: %v", err)
		}
	}

	// A failed attestation by whoever holds the TPM ends the node's
	// sessions at once.
	ch, err = f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	if ev, err = node.evidence(ctx, ch); err != nil {
		t.Fatal(err)
	}
	ev.Signature[len(ev.Signature)-1] ^= 1
	_, err = f.rel.Complete(ctx, ch.ID, ev)
	wantErr(t, err, attest.ErrSignature, "attestation refused")
	for _, tok := range []string{sess.Token, second.Token} {
		_, err := f.rel.GenerateDataKey(ctx, tok, hpkeRing, nil)
		wantErr(t, err, ErrPermissionDenied, "an attestation of node sim-1 failed")
	}

	// An expired challenge.
	ch, err = f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	if ev, err = node.evidence(ctx, ch); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(DefaultChallengeTTL)
	_, err = f.rel.Complete(ctx, ch.ID, ev)
	wantErr(t, err, attest.ErrNonce, "")

	// Revoked: refused at the challenge.
	if _, err := f.rel.RevokeNode(ctx, "sim-1"); err != nil {
		t.Fatal(err)
	}
	_, err = f.rel.Challenge(ctx, nil, node.a.EKPublic(), node.a.AKPublic())
	wantErr(t, err, ErrPermissionDenied, "node sim-1 is revoked")
}

// sessionSealedProto is the wire form of a session-sealed key.
func sessionSealedProto(k *SealedKey) *coffrev1.SessionSealed {
	return &coffrev1.SessionSealed{Seq: k.Session.Seq, Ciphertext: k.Session.Ciphertext}
}

func TestAttestWrongPCRs(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	node := openTPMNode(t)
	ctx := ctxT(t)
	bad := node.class("sim")
	bad.PCRs = map[uint32][]byte{0: node.pcrs[0], 7: pcr7[:]}
	if _, err := f.rel.SetNodeClass(ctx, bad); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "sim-1", Class: "sim", EKPublic: node.a.EKPublic()}); err != nil {
		t.Fatal(err)
	}
	_, err := node.attest(ctx, f.rel, nil)
	wantErr(t, err, attest.ErrPCR, "attestation refused: PCR: PCR 7 is ")
}

func TestAttestByEKCertificate(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	node := openTPMNode(t)
	ctx := ctxT(t)
	ek, err := attest.ParseEKPublic(node.a.EKPublic())
	if err != nil {
		t.Fatal(err)
	}
	ca := attesttest.NewEKCA(t)
	now := time.Now()
	cert := ca.IssueEKCert(t, ek.PublicKey, now.Add(-time.Hour), now.Add(time.Hour))
	if _, err := f.rel.AddEKRoot(ctx, ca.CertPEM()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rel.SetNodeClass(ctx, node.class("sim")); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rel.EnrollNode(ctx, &Enrollment{Name: "sim-1", Class: "sim", EKCertificate: cert}); err != nil {
		t.Fatal(err)
	}
	// With the certificate, and without it (the one on record is checked).
	for _, c := range [][]byte{cert, nil} {
		if _, err := node.attest(ctx, f.rel, c); err != nil {
			t.Fatalf("attest with certificate %v: %v", c != nil, err)
		}
	}
	// A certificate for this EK from a CA that is not an EK root.
	rogue := attesttest.NewEKCA(t).IssueEKCert(t, ek.PublicKey, now.Add(-time.Hour), now.Add(time.Hour))
	_, err = node.attest(ctx, f.rel, rogue)
	wantErr(t, err, attest.ErrEK, "does not chain")
	// The certificate on record expires: refused from then on.
	f.clock.Advance(2 * time.Hour)
	_, err = node.attest(ctx, f.rel, nil)
	wantErr(t, err, attest.ErrEK, "expired")
}
