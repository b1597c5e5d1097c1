package kms

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudflare/circl/kem"

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
	clock := newTestClock()
	f := newFixture(t, Config{Now: clock.Now})
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
	svc, err := New(Config{Store: f.store, Root: f.root, Now: f.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	rel, err := NewReleaseService(svc, ReleaseConfig{})
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

// injectSession opens a session for node as Complete would after a good
// attestation, with a fresh X-Wing binding key, without a TPM: the tests of
// the session and release logic do not need one (the TPM tests exercise
// Complete itself).
func (f *relFixture) injectSession(t testing.TB, r *ReleaseService, name string) (string, kem.PrivateKey) {
	t.Helper()
	pk, sk, err := releaseSuiteKEM.GenerateKeyPair()
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
	s := &session{key: sha256.Sum256(raw), node: node, class: class, binding: pk, pcrs: class.PCRs, expires: now.Add(r.cfg.SessionTTL)}
	if err := r.putSession(s, now); err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(raw), sk
}

func openHPKE(t testing.TB, sk kem.PrivateKey, k *SealedKey, envelope []byte) []byte {
	t.Helper()
	if k == nil || k.HPKE == nil || k.TPM != nil {
		t.Fatalf("sealed key %+v: want HPKE only", k)
	}
	if k.HPKE.Suite != HPKESuiteName {
		t.Fatalf("suite %q", k.HPKE.Suite)
	}
	recv, err := releaseSuite.NewReceiver(sk, []byte("coffre release v1"))
	if err != nil {
		t.Fatal(err)
	}
	o, err := recv.Setup(k.HPKE.Enc)
	if err != nil {
		t.Fatal(err)
	}
	dk, err := o.Open(k.HPKE.Ciphertext, envelope)
	if err != nil {
		t.Fatalf("HPKE open: %v", err)
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
	token, sk := f.injectSession(t, f.rel, "node-1")

	ec := map[string]string{"volume": "vol-1"}
	rel, err := f.rel.GenerateDataKey(ctx, token, id, ec)
	if err != nil {
		t.Fatal(err)
	}
	if rel.KeyringID != id || rel.KeyVersion != 1 || len(rel.Envelope) == 0 {
		t.Fatalf("released %+v", rel)
	}
	dk := openHPKE(t, sk, rel.Key, rel.Envelope)
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
	if got := openHPKE(t, sk, sealed, rel.Envelope); string(got) != string(dk) {
		t.Fatal("Decrypt released another key")
	}
	// The seal is bound to the envelope: opening with another fails.
	recv, _ := releaseSuite.NewReceiver(sk, releaseInfo)
	o, _ := recv.Setup(sealed.HPKE.Enc)
	if _, err := o.Open(sealed.HPKE.Ciphertext, append([]byte("x"), rel.Envelope...)); err == nil {
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
	if got := openHPKE(t, sk, sealed, re.Envelope); string(got) != string(dk) {
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
	f := newRelFixture(t, ReleaseConfig{})
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
	pk, _, _ := releaseSuiteKEM.GenerateKeyPair()
	f.rel.mu.RLock()
	node, class := f.rel.nodes["node-2"].v, f.rel.classes["storage"].v
	f.rel.mu.RUnlock()
	s := &session{key: [32]byte{1}, node: node, class: class, binding: pk, expires: f.clock.Now().Add(time.Minute)}
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

	// The per-EK rate: 3 a minute.
	for i := range 3 {
		if !f.rel.allowChallenge("ek1", now) {
			t.Fatalf("challenge %d refused", i)
		}
	}
	if f.rel.allowChallenge("ek1", now.Add(59*time.Second)) {
		t.Fatal("fourth challenge in a minute allowed")
	}
	if !f.rel.allowChallenge("ek2", now) {
		t.Fatal("another EK was limited")
	}
	if !f.rel.allowChallenge("ek1", now.Add(time.Minute)) {
		t.Fatal("the next minute is still limited")
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
