package kms

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/coffre-kms/coffre/kms/store"
	"math/big"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudflare/circl/kem"
	"github.com/cloudflare/circl/kem/xwing"

	"github.com/coffre-kms/coffre/attest"
)

// testClock is a clock the test moves by hand.
type testClock struct{ ns atomic.Int64 }

func newTestClock() *testClock {
	c := &testClock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

func (c *testClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *testClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// auditLog is an Auditor that keeps what it is given; fail makes Record
// fail.
type auditLog struct {
	mu     sync.Mutex
	events []AuditEvent
	fail   atomic.Bool
}

func (a *auditLog) Record(_ context.Context, e *AuditEvent) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.events = append(a.events, *e)
	if a.fail.Load() {
		return errors.New("audit log unwritable")
	}
	return nil
}

func (a *auditLog) last() AuditEvent {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.events) == 0 {
		return AuditEvent{}
	}
	return a.events[len(a.events)-1]
}

type relFixture struct {
	*fixture
	rel   *ReleaseService
	clock *testClock
	audit *auditLog
}

func newRelFixture(t testing.TB, cfg ReleaseConfig) *relFixture {
	t.Helper()
	return newRelFixtureOn(t, cfg, nil)
}

// newRelFixtureOn is newRelFixture over a store the caller opened; nil
// means a fresh bbolt file.
func newRelFixtureOn(t testing.TB, cfg ReleaseConfig, st store.Store) *relFixture {
	t.Helper()
	clock := newTestClock()
	var f *fixture
	if st == nil {
		f = newFixture(t, Config{Now: clock.Now})
	} else {
		f = newFixtureOn(t, Config{Now: clock.Now}, st)
	}
	audit := &auditLog{}
	if cfg.Auditor == nil {
		cfg.Auditor = audit
	}
	rel, err := NewReleaseService(f.svc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rel.Close() })
	return &relFixture{fixture: f, rel: rel, clock: clock, audit: audit}
}

// second opens another release service on the same store, as another
// Coffre node would.
func (f *relFixture) second(t testing.TB) *ReleaseService {
	t.Helper()
	return f.secondWith(t, ReleaseConfig{})
}

// secondWith is second with the other node's release configuration.
func (f *relFixture) secondWith(t testing.TB, cfg ReleaseConfig) *ReleaseService {
	t.Helper()
	svc, err := New(Config{Store: f.store, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	rel, err := NewReleaseService(svc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rel.Close() })
	return rel
}

var pcr7 = sha256.Sum256([]byte("secure boot state"))

func testClass(name string) *NodeClass {
	return &NodeClass{Name: name, PCRs: map[uint32][]byte{7: pcr7[:]}}
}

// pinnedEK returns a fresh P-256 EK public key as PEM (attest accepts
// ECC P-256 EKs) and its fingerprint.
func pinnedEK(t testing.TB) ([]byte, string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	fp, err := ekFingerprint(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), fp
}

// testEKCA is a throw-away TPM manufacturer CA.
type testEKCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var ekSerial atomic.Int64

func newTestEKCA(t testing.TB, name string, notAfter time.Time) *testEKCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(ekSerial.Add(1)),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"Coffre test TPM maker"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testEKCA{cert: cert, key: key}
}

func (ca *testEKCA) pem() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

// enroll sets class (if new) and enrolls a node with a fresh pinned EK.
func (f *relFixture) enroll(t testing.TB, name, class string, labels map[string]string) *Node {
	t.Helper()
	ctx := ctxT(t)
	if _, err := f.rel.GetNodeClass(ctx, class); errors.Is(err, ErrNotFound) {
		if _, err := f.rel.SetNodeClass(ctx, testClass(class)); err != nil {
			t.Fatal(err)
		}
	}
	ek, _ := pinnedEK(t)
	n, err := f.rel.EnrollNode(ctx, &Enrollment{Name: name, Class: class, Labels: labels, EKPublic: ek})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (f *relFixture) keyring(t testing.TB, id string, classes []string, labels map[string]string, mode ReleaseMode) KeyringID {
	t.Helper()
	ctx := ctxT(t)
	kid := mustID(t, id)
	if _, err := f.svc.CreateKeyring(ctx, kid); err != nil {
		t.Fatal(err)
	}
	if classes != nil {
		if _, err := f.rel.SetKeyringPolicy(ctx, &KeyringPolicy{Keyring: kid, AllowedClasses: classes, RequiredLabels: labels, Release: mode}); err != nil {
			t.Fatal(err)
		}
	}
	return kid
}

// nodeKey is the node's half of a session: its binding private key and
// the session release key it derived from the session's enc.
type nodeKey struct {
	binding kem.PrivateKey
	enc     []byte
	k       []byte
}

// deriveNodeKey derives K as the node does (HPKE receiver, independent of
// newReleaseKey's sender side).
func deriveNodeKey(t testing.TB, sk kem.PrivateKey, enc []byte) *nodeKey {
	t.Helper()
	recv, err := sessionSuite.NewReceiver(sk, []byte("coffre session v1"))
	if err != nil {
		t.Fatal(err)
	}
	o, err := recv.Setup(enc)
	if err != nil {
		t.Fatal(err)
	}
	return &nodeKey{binding: sk, enc: enc, k: o.Export([]byte("coffre release key v1"), 32)}
}

// open opens a session-sealed key as the node does, with crypto/aes
// rather than the server's cached AEAD.
func (n *nodeKey) open(sealed *SessionSealed, envelope []byte) ([]byte, error) {
	block, err := aes.NewCipher(n.k)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, 12)
	binary.BigEndian.PutUint64(nonce[4:], sealed.Seq)
	aad := binary.BigEndian.AppendUint32([]byte("coffre release v1"), uint32(len(envelope)))
	return aead.Open(nil, nonce, sealed.Ciphertext, append(aad, envelope...))
}

// injectSession opens a session for node as Complete would after a good
// attestation, with a fresh X-Wing binding key and the session release key
// set up to it, without a TPM: the tests of the session and release logic
// do not need one (the TPM tests exercise Complete itself).
func (f *relFixture) injectSession(t testing.TB, r *ReleaseService, name string) (string, *nodeKey) {
	t.Helper()
	pk, sk, err := sessionSuiteKEM.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	enc, rk, err := newReleaseKey(rand.Reader, pk)
	if err != nil {
		t.Fatal(err)
	}
	r.mu.RLock()
	node := r.nodes[name].v
	var class *NodeClass
	if node != nil {
		class = r.classes[node.Class].v
	}
	r.mu.RUnlock()
	if node == nil || class == nil {
		t.Fatalf("node %s or its class is not cached", name)
	}
	raw := make([]byte, sessionTokenSize)
	rand.Read(raw)
	now := r.now()
	s := &session{key: sha256.Sum256(raw), node: node, class: class, rk: rk, pcrs: class.PCRs, expires: now.Add(r.cfg.SessionTTL)}
	if err := r.putSession(s, now); err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(raw), deriveNodeKey(t, sk, enc)
}

// openSession opens a session-sealed key with the node's K, failing the
// test if it does not open.
func openSession(t testing.TB, n *nodeKey, k *SealedKey, envelope []byte) []byte {
	t.Helper()
	if k == nil || k.Session == nil || k.TPM != nil {
		t.Fatalf("sealed key %+v: want session-sealed only", k)
	}
	dk, err := n.open(k.Session, envelope)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return dk
}

func wantErr(t testing.TB, err, sentinel error, msgPart string) {
	t.Helper()
	if !errors.Is(err, sentinel) {
		t.Fatalf("got %v, want %v", err, sentinel)
	}
	if !strings.Contains(err.Error(), msgPart) {
		t.Fatalf("error %q does not contain %q", err, msgPart)
	}
}

func TestReleaseRoundTripHPKE(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", map[string]string{"jurisdiction": "ca-qc", "site": "mtl-1"})
	id := f.keyring(t, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
	token, node := f.injectSession(t, f.rel, "node-1")

	ec := map[string]string{"volume": "vol-1"}
	rel, err := f.rel.GenerateDataKey(ctx, token, id, ec)
	if err != nil {
		t.Fatal(err)
	}
	if rel.KeyringID != id || rel.KeyVersion != 1 || len(rel.Envelope) == 0 {
		t.Fatalf("released %+v", rel)
	}
	dk := openSession(t, node, rel.Key, rel.Envelope)
	if len(dk) != 32 {
		t.Fatalf("data key of %d bytes", len(dk))
	}
	// The same key, from the envelope, through the service directly.
	plain, err := f.svc.Decrypt(ctx, "acme", rel.Envelope, ec)
	if err != nil || string(plain.Expose()) != string(dk) {
		t.Fatalf("service decrypt: %v", err)
	}
	if ev := f.audit.last(); !ev.Allowed || ev.Op != AuditGenerateDataKey || ev.Node != "node-1" || ev.Keyring != id || ev.KeyVersion != 1 {
		t.Fatalf("audit %+v", ev)
	}

	// Decrypt through release.
	sealed, err := f.rel.Decrypt(ctx, token, rel.Envelope, ec)
	if err != nil {
		t.Fatal(err)
	}
	if got := openSession(t, node, sealed, rel.Envelope); string(got) != string(dk) {
		t.Fatal("Decrypt released another key")
	}
	// The seal is bound to the envelope: opening with another fails.
	if _, err := node.open(sealed.Session, append([]byte("x"), rel.Envelope...)); err == nil {
		t.Fatal("sealed key opened with another envelope as aad")
	}
	// A wrong context is the one decryption error.
	if _, err := f.rel.Decrypt(ctx, token, rel.Envelope, map[string]string{"volume": "vol-2"}); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("wrong context: %v", err)
	}

	// ReEncrypt after rotation moves to version 2.
	if _, err := f.svc.RotateKeyring(ctx, id); err != nil {
		t.Fatal(err)
	}
	re, err := f.rel.ReEncrypt(ctx, token, rel.Envelope, ec, KeyringID{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if re.KeyVersion != 2 || re.KeyringID != id {
		t.Fatalf("re-encrypted %+v", re)
	}
	sealed, err = f.rel.Decrypt(ctx, token, re.Envelope, ec)
	if err != nil {
		t.Fatal(err)
	}
	if got := openSession(t, node, sealed, re.Envelope); string(got) != string(dk) {
		t.Fatal("re-encrypted envelope holds another key")
	}
}

func TestReleasePolicyRefusals(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-a", "storage", map[string]string{"jurisdiction": "ca-qc"})
	f.enroll(t, "node-b", "storage", map[string]string{"jurisdiction": "fr"})
	f.enroll(t, "node-c", "edge", map[string]string{"jurisdiction": "ca-qc"})
	tenantA := f.keyring(t, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, ReleaseHPKE)
	tenantB := f.keyring(t, "beta/disks", []string{"storage"}, map[string]string{"jurisdiction": "fr"}, ReleaseHPKE)
	nopolicy := f.keyring(t, "acme/logs", nil, nil, ReleaseHPKE)
	ta, _ := f.injectSession(t, f.rel, "node-a")
	tb, _ := f.injectSession(t, f.rel, "node-b")
	tc, _ := f.injectSession(t, f.rel, "node-c")

	_, err := f.rel.GenerateDataKey(ctx, ta, nopolicy, nil)
	wantErr(t, err, ErrPermissionDenied, "keyring acme/logs has no release policy")
	_, err = f.rel.GenerateDataKey(ctx, tc, tenantA, nil)
	wantErr(t, err, ErrPermissionDenied, "does not release to class edge of node node-c (allowed classes: storage)")
	_, err = f.rel.GenerateDataKey(ctx, tb, tenantA, nil)
	wantErr(t, err, ErrPermissionDenied, "requires label jurisdiction=ca-qc; node node-b has jurisdiction=fr")
	if ev := f.audit.last(); ev.Allowed || ev.Node != "node-b" || !strings.Contains(ev.Reason, "jurisdiction") {
		t.Fatalf("denial audit %+v", ev)
	}

	// Tenant B's node presents tenant A's envelope: refused before the
	// envelope is opened.
	a, err := f.rel.GenerateDataKey(ctx, ta, tenantA, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.rel.Decrypt(ctx, tb, a.Envelope, nil)
	wantErr(t, err, ErrPermissionDenied, "keyring acme/disks requires label jurisdiction=ca-qc")
	// Tenant B's own keys work for it.
	if _, err := f.rel.GenerateDataKey(ctx, tb, tenantB, nil); err != nil {
		t.Fatal(err)
	}
	// A node admitted by both sides cannot ReEncrypt across tenants, and
	// ReEncrypt into a keyring without a policy is refused.
	_, err = f.rel.ReEncrypt(ctx, ta, a.Envelope, nil, tenantB, nil)
	wantErr(t, err, ErrPermissionDenied, "keyring beta/disks")
	_, err = f.rel.ReEncrypt(ctx, ta, a.Envelope, nil, nopolicy, nil)
	wantErr(t, err, ErrPermissionDenied, "keyring acme/logs has no release policy")

	// A policy change applies to the next request.
	if _, err := f.rel.SetKeyringPolicy(ctx, &KeyringPolicy{Keyring: tenantA, AllowedClasses: []string{"edge"}, Release: ReleaseHPKE}); err != nil {
		t.Fatal(err)
	}
	_, err = f.rel.Decrypt(ctx, ta, a.Envelope, nil)
	wantErr(t, err, ErrPermissionDenied, "does not release to class storage")
	if _, err := f.rel.Decrypt(ctx, tc, a.Envelope, nil); err != nil {
		t.Fatalf("node-c after the policy change: %v", err)
	}
	// An envelope that does not parse.
	_, err = f.rel.Decrypt(ctx, ta, []byte("junk"), nil)
	wantErr(t, err, ErrInvalidArgument, "envelope")
}

func TestSessionRules(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{SessionTTL: time.Minute})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	token, _ := f.injectSession(t, f.rel, "node-1")

	for _, tc := range []struct{ token, want string }{
		{"", "malformed session token"},
		{"not base64!", "malformed session token"},
		{base64.RawURLEncoding.EncodeToString(make([]byte, 31)), "malformed session token"},
		{base64.RawURLEncoding.EncodeToString(make([]byte, 32)), "unknown session"},
		{token + "A", "malformed session token"},
	} {
		_, err := f.rel.GenerateDataKey(ctx, tc.token, id, nil)
		wantErr(t, err, ErrUnauthenticated, tc.want)
	}
	if _, err := f.rel.GenerateDataKey(ctx, token, id, nil); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(time.Minute)
	_, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	wantErr(t, err, ErrUnauthenticated, "session expired")
}

func TestRevocationEndsSessions(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	f.enroll(t, "node-2", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	t1, _ := f.injectSession(t, f.rel, "node-1")
	t1b, _ := f.injectSession(t, f.rel, "node-1")
	t2, _ := f.injectSession(t, f.rel, "node-2")

	n, err := f.rel.RevokeNode(ctx, "node-1")
	if err != nil || n.State != NodeRevoked || n.RevokeTime.IsZero() {
		t.Fatalf("revoke: %+v, %v", n, err)
	}
	for _, tok := range []string{t1, t1b} {
		_, err := f.rel.GenerateDataKey(ctx, tok, id, nil)
		wantErr(t, err, ErrPermissionDenied, "session ended: node node-1 was revoked")
	}
	if _, err := f.rel.GenerateDataKey(ctx, t2, id, nil); err != nil {
		t.Fatalf("another node's session: %v", err)
	}
	// Revoking again changes nothing.
	if again, err := f.rel.RevokeNode(ctx, "node-1"); err != nil || !again.RevokeTime.Equal(n.RevokeTime) {
		t.Fatalf("second revoke: %+v, %v", again, err)
	}
	if _, err := f.rel.RevokeNode(ctx, "nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("revoke unknown: %v", err)
	}
}

func TestRevocationOnAnotherCoffreNode(t *testing.T) {
	testRevocationOnAnotherNode(t, nil)
}

// testRevocationOnAnotherNode: a node revoked through one Coffre node is
// refused by another on the same store (nil: a fresh bbolt file) within a
// second.
func testRevocationOnAnotherNode(t *testing.T, st store.Store) {
	f := newRelFixtureOn(t, ReleaseConfig{}, st)
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	other := f.second(t)
	// The other Coffre node learned of node-1 through its initial load.
	token, _ := f.injectSession(t, other, "node-1")
	if _, err := other.GenerateDataKey(ctx, token, id, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := f.rel.RevokeNode(ctx, "node-1"); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := other.GenerateDataKey(ctx, token, id, nil)
		if errors.Is(err, ErrPermissionDenied) {
			wantErr(t, err, ErrPermissionDenied, "node node-1 was revoked")
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if time.Since(start) > time.Second {
			t.Fatal("a revocation written by another Coffre node did not end the session within a second")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("revocation seen by the other node after %v", time.Since(start))
}

func TestClassChangeEndsSessions(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	token, _ := f.injectSession(t, f.rel, "node-1")
	// Setting the same values keeps the session.
	if _, err := f.rel.SetNodeClass(ctx, testClass("storage")); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rel.GenerateDataKey(ctx, token, id, nil); err != nil {
		t.Fatalf("after an identical class write: %v", err)
	}
	other := sha256.Sum256([]byte("new firmware"))
	if _, err := f.rel.SetNodeClass(ctx, &NodeClass{Name: "storage", PCRs: map[uint32][]byte{7: other[:]}}); err != nil {
		t.Fatal(err)
	}
	_, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	wantErr(t, err, ErrPermissionDenied, "reference values of class storage changed")
}

func TestSessionLimits(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{MaxSessions: 4, MaxSessionsPerNode: 2, SessionTTL: time.Minute})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	f.enroll(t, "node-2", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	a, _ := f.injectSession(t, f.rel, "node-1")
	b, _ := f.injectSession(t, f.rel, "node-1")
	c, _ := f.injectSession(t, f.rel, "node-1") // ends a, the oldest
	_, err := f.rel.GenerateDataKey(ctx, a, id, nil)
	wantErr(t, err, ErrPermissionDenied, "more than 2 sessions")
	for _, tok := range []string{b, c} {
		if _, err := f.rel.GenerateDataKey(ctx, tok, id, nil); err != nil {
			t.Fatal(err)
		}
	}
	f.injectSession(t, f.rel, "node-2") // 4 held: a (ended), b, c, this
	f.rel.mu.RLock()
	node, class := f.rel.nodes["node-2"].v, f.rel.classes["storage"].v
	f.rel.mu.RUnlock()
	s := &session{key: [32]byte{1}, node: node, class: class, expires: f.clock.Now().Add(time.Minute)}
	if err := f.rel.putSession(s, f.clock.Now()); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("fifth session: %v, want ErrUnavailable", err)
	}
	// Expired sessions make room.
	f.clock.Advance(time.Minute)
	f.injectSession(t, f.rel, "node-2")
	if n := f.rel.sessionCount(); n != 1 {
		t.Fatalf("%d sessions held after expiry, want 1", n)
	}
}

func TestChallengeStore(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{MaxChallenges: 2, ChallengesPerEK: 3})
	now := f.clock.Now()
	mk := func(id string) *pendingChallenge {
		return &pendingChallenge{ch: &attest.Challenge{ID: id}, node: "n", expires: now.Add(time.Minute)}
	}
	for _, id := range []string{"a", "b"} {
		if err := f.rel.putChallenge(mk(id), now); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.rel.putChallenge(mk("c"), now); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("third challenge: %v, want ErrUnavailable", err)
	}
	if p := f.rel.takeChallenge("a", now); p == nil || p.ch.ID != "a" {
		t.Fatal("take a")
	}
	if p := f.rel.takeChallenge("a", now); p != nil {
		t.Fatal("a challenge was taken twice")
	}
	if err := f.rel.putChallenge(mk("c"), now); err != nil {
		t.Fatal(err)
	}
	// Expired: neither takeable nor counted.
	later := now.Add(time.Minute)
	if p := f.rel.takeChallenge("b", later); p != nil {
		t.Fatal("expired challenge taken")
	}
	for _, id := range []string{"d", "e"} {
		if err := f.rel.putChallenge(&pendingChallenge{ch: &attest.Challenge{ID: id}, expires: later.Add(time.Minute)}, later); err != nil {
			t.Fatalf("after expiry: %v", err)
		}
	}

	// The per-EK rate: 3 a minute from one address.
	for i := range 3 {
		if !f.rel.allowChallenge("ek1", "10.0.0.1", now) {
			t.Fatalf("challenge %d refused", i)
		}
	}
	if f.rel.allowChallenge("ek1", "10.0.0.1", now.Add(59*time.Second)) {
		t.Fatal("fourth challenge in a minute allowed")
	}
	if !f.rel.allowChallenge("ek2", "10.0.0.1", now) {
		t.Fatal("another EK was limited")
	}
	if !f.rel.allowChallenge("ek1", "10.0.0.2", now) {
		t.Fatal("the same EK from another address was limited")
	}
	if !f.rel.allowChallenge("ek1", "10.0.0.1", now.Add(time.Minute)) {
		t.Fatal("the next minute is still limited")
	}
	// A flood of EK and address pairs is bounded.
	allowed := 0
	for i := range maxRateWindows + 10 {
		if f.rel.allowChallenge("ek1", fmt.Sprintf("10.1.%d.%d", i/256, i%256), now.Add(time.Minute)) {
			allowed++
		}
	}
	if len(f.rel.rate) > maxRateWindows || allowed >= maxRateWindows+10 {
		t.Fatalf("%d windows kept, %d of %d challenges allowed", len(f.rel.rate), allowed, maxRateWindows+10)
	}
}

func TestAuditFailureStopsRelease(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	token, _ := f.injectSession(t, f.rel, "node-1")
	f.audit.fail.Store(true)
	_, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	wantErr(t, err, ErrUnavailable, "audit")
	// A denial stands whatever the auditor says.
	_, err = f.rel.GenerateDataKey(ctx, base64.RawURLEncoding.EncodeToString(make([]byte, 32)), id, nil)
	wantErr(t, err, ErrUnauthenticated, "unknown session")
}

func TestUnknownEKRefusedAtChallenge(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	// Garbage: InvalidArgument naming the EK.
	_, err := f.rel.Challenge(ctx, nil, []byte{0, 3, 1, 2, 3}, []byte{1})
	wantErr(t, err, ErrInvalidArgument, "EK public area")
	_, err = f.rel.Challenge(ctx, nil, nil, []byte{1})
	wantErr(t, err, ErrInvalidArgument, "EK public area is required")
	// A PKIX key is not what a TPM sends.
	ek, _ := pinnedEK(t)
	_, err = f.rel.Challenge(ctx, nil, ek, []byte{1})
	wantErr(t, err, ErrInvalidArgument, "TPM2B_PUBLIC")
}

// sessionOf returns the server's session of token (for tests that look at
// its release key).
func sessionOf(t testing.TB, r *ReleaseService, token string) *session {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		t.Fatal(err)
	}
	r.sessMu.RLock()
	defer r.sessMu.RUnlock()
	s := r.sessions[sha256.Sum256(raw)]
	if s == nil {
		t.Fatal("no such session")
	}
	return s
}

// The node's K, derived through the real X-Wing from enc with its binding
// private key, is the server's; every set-up has its own.
func TestReleaseKeyIsTheNodes(t *testing.T) {
	pk, sk, err := sessionSuiteKEM.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	enc, rk, err := newReleaseKey(rand.Reader, pk)
	if err != nil {
		t.Fatal(err)
	}
	if len(enc) != xwing.CiphertextSize {
		t.Fatalf("enc of %d bytes, want an X-Wing ciphertext (%d)", len(enc), xwing.CiphertextSize)
	}
	node := deriveNodeKey(t, sk, enc)
	if len(rk.k.Expose()) != 32 || !bytes.Equal(rk.k.Expose(), node.k) {
		t.Fatalf("server K %x, node K %x", rk.k.Expose(), node.k)
	}
	enc2, rk2, err := newReleaseKey(rand.Reader, pk)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(enc2, enc) || bytes.Equal(rk2.k.Expose(), rk.k.Expose()) {
		t.Fatal("two set-ups to one binding key gave the same enc or K")
	}
	// Another binding key derives another K from the same enc (X-Wing
	// rejects implicitly).
	_, sk3, err := sessionSuiteKEM.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(deriveNodeKey(t, sk3, enc).k, node.k) {
		t.Fatal("another binding key derived the same K")
	}
	for _, out := range []string{fmt.Sprintf("%v %+v %x", rk.k, rk, rk.k)} {
		if strings.Contains(out, fmt.Sprintf("%x", node.k)) {
			t.Fatalf("the release key prints: %s", out)
		}
	}
}

// Every release on a session takes its own sequence number, from 1, also
// under concurrency: the GCM nonces under K never repeat.
func TestReleaseSequenceNumbers(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	token, node := f.injectSession(t, f.rel, "node-1")

	a, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	d, err := f.rel.Decrypt(ctx, token, a.Envelope, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.Key.Session.Seq != 1 || b.Key.Session.Seq != 2 || d.Session.Seq != 3 {
		t.Fatalf("sequence numbers %d, %d, %d; want 1, 2, 3", a.Key.Session.Seq, b.Key.Session.Seq, d.Session.Seq)
	}
	ka, kd := openSession(t, node, a.Key, a.Envelope), openSession(t, node, d, a.Envelope)
	if !bytes.Equal(ka, kd) || bytes.Equal(ka, openSession(t, node, b.Key, b.Envelope)) {
		t.Fatal("releases opened to the wrong keys")
	}
	// A sealed key presented with another sequence number does not open.
	moved := &SessionSealed{Seq: b.Key.Session.Seq, Ciphertext: a.Key.Session.Ciphertext}
	if _, err := node.open(moved, a.Envelope); err == nil {
		t.Fatal("a sealed key opened under another sequence number")
	}

	const workers, each = 8, 25
	var mu sync.Mutex
	seen := map[uint64]bool{1: true, 2: true, 3: true}
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				rel, err := f.rel.GenerateDataKey(ctx, token, id, nil)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if seen[rel.Key.Session.Seq] {
					t.Errorf("sequence number %d used twice", rel.Key.Session.Seq)
				}
				seen[rel.Key.Session.Seq] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(seen) != 3+workers*each {
		t.Fatalf("%d distinct sequence numbers, want %d", len(seen), 3+workers*each)
	}
}

// A key released on one session does not open with another session's K,
// be it the same node's.
func TestSessionKeysDoNotCross(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	f.enroll(t, "node-2", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	t1, n1 := f.injectSession(t, f.rel, "node-1")
	t2, n2 := f.injectSession(t, f.rel, "node-1")
	_, n3 := f.injectSession(t, f.rel, "node-2")
	if bytes.Equal(n1.k, n2.k) {
		t.Fatal("two sessions of one node share K")
	}
	r1, err := f.rel.GenerateDataKey(ctx, t1, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	openSession(t, n1, r1.Key, r1.Envelope)
	for name, other := range map[string]*nodeKey{"the same node's second session": n2, "another node's session": n3} {
		if _, err := other.open(r1.Key.Session, r1.Envelope); err == nil {
			t.Errorf("session 1's release opened with the K of %s", name)
		}
	}
	// Session 2 releases the same envelope's key with its own K, at its
	// own sequence number 1: same nonce, another key.
	d2, err := f.rel.Decrypt(ctx, t2, r1.Envelope, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d2.Session.Seq != 1 || bytes.Equal(d2.Session.Ciphertext, r1.Key.Session.Ciphertext) {
		t.Fatalf("session 2's release: seq %d, same ciphertext %v", d2.Session.Seq, bytes.Equal(d2.Session.Ciphertext, r1.Key.Session.Ciphertext))
	}
	if _, err := n1.open(d2.Session, r1.Envelope); err == nil {
		t.Fatal("session 2's release opened with session 1's K")
	}
	if got := openSession(t, n2, d2, r1.Envelope); !bytes.Equal(got, openSession(t, n1, r1.Key, r1.Envelope)) {
		t.Fatal("the two sessions released different keys for one envelope")
	}
}

// Past MaxReleasesPerSession the session refuses with Unauthenticated,
// which tells the node to attest again.
func TestSessionExhausted(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	token, node := f.injectSession(t, f.rel, "node-1")
	sessionOf(t, f.rel, token).rk.seq.Store(MaxReleasesPerSession - 1)
	last, err := f.rel.GenerateDataKey(ctx, token, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	if last.Key.Session.Seq != MaxReleasesPerSession {
		t.Fatalf("last sequence number %d, want 2^32", last.Key.Session.Seq)
	}
	openSession(t, node, last.Key, last.Envelope)
	_, err = f.rel.GenerateDataKey(ctx, token, id, nil)
	wantErr(t, err, ErrUnauthenticated, "session exhausted; attest again")
	if ev := f.audit.last(); ev.Allowed || ev.Node != "node-1" || !strings.Contains(ev.Reason, "exhausted") {
		t.Fatalf("audit of the refusal: %+v", ev)
	}
	_, err = f.rel.Decrypt(ctx, token, last.Envelope, nil)
	wantErr(t, err, ErrUnauthenticated, "session exhausted")
	// Another session of the node is unaffected.
	other, _ := f.injectSession(t, f.rel, "node-1")
	if _, err := f.rel.GenerateDataKey(ctx, other, id, nil); err != nil {
		t.Fatal(err)
	}
}

// A session's K is wiped when the session ends (revocation, eviction by a
// newer session), expires and is pruned, or the service closes.
func TestSessionEndWipesReleaseKey(t *testing.T) {
	f := newRelFixture(t, ReleaseConfig{MaxSessionsPerNode: 1, SessionTTL: time.Minute})
	ctx := ctxT(t)
	f.enroll(t, "node-1", "storage", nil)
	f.enroll(t, "node-2", "storage", nil)
	f.enroll(t, "node-3", "storage", nil)
	id := f.keyring(t, "acme/disks", []string{"storage"}, nil, ReleaseHPKE)
	// K is wiped under sessMu, also by the store watch's goroutine.
	wiped := func(rk *releaseKey) bool {
		f.rel.sessMu.RLock()
		defer f.rel.sessMu.RUnlock()
		return rk.k.Expose() == nil
	}

	evicted, _ := f.injectSession(t, f.rel, "node-1")
	rkEvicted := sessionOf(t, f.rel, evicted).rk
	f.injectSession(t, f.rel, "node-1") // MaxSessionsPerNode 1: evicts the first
	if !wiped(rkEvicted) || sessionOf(t, f.rel, evicted).rk != nil {
		t.Error("an evicted session kept its release key")
	}

	revoked, _ := f.injectSession(t, f.rel, "node-2")
	rkRevoked := sessionOf(t, f.rel, revoked).rk
	if _, err := f.rel.RevokeNode(ctx, "node-2"); err != nil {
		t.Fatal(err)
	}
	if !wiped(rkRevoked) {
		t.Error("a revoked node's session kept its release key")
	}
	_, err := f.rel.GenerateDataKey(ctx, revoked, id, nil)
	wantErr(t, err, ErrPermissionDenied, "was revoked")

	expiring, _ := f.injectSession(t, f.rel, "node-3")
	rkExpired := sessionOf(t, f.rel, expiring).rk
	f.clock.Advance(time.Minute)
	f.injectSession(t, f.rel, "node-3") // prunes the expired ones
	if !wiped(rkExpired) {
		t.Error("an expired session kept its release key")
	}

	live, _ := f.injectSession(t, f.rel, "node-1")
	rkLive := sessionOf(t, f.rel, live).rk
	if wiped(rkLive) {
		t.Fatal("a live session without its key")
	}
	f.rel.Close()
	if !wiped(rkLive) {
		t.Error("Close left a session's release key")
	}
}
