package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/agent"
	"github.com/coffre-kms/coffre/attest/attesttest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/server/admintest"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// These tests run the node side with the TPM simulator through the agent
// package, against the server over real TLS. The simulator is one per
// process: none of them runs in parallel.

// testClock is the release service's clock in these tests.
type testClock struct{ ns atomic.Int64 }

func newTestClock() *testClock {
	c := &testClock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

func (c *testClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *testClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// simNode is a machine with a simulated TPM and the agent on it.
type simNode struct {
	tpm  transport.TPM
	a    *agent.Agent
	pcrs map[uint32][]byte // current values of nodePCRs
}

var nodePCRs = []uint32{0, 7}

func openSimNode(t testing.TB) *simNode {
	t.Helper()
	tpm, err := agent.OpenTPM("simulator")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tpm.Close() })
	a, err := agent.New(callCtx(t), tpm, agent.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	nonce := make([]byte, 32)
	rand.Read(nonce)
	_, _, vals, err := a.Quote(callCtx(t), nonce, nodePCRs)
	if err != nil {
		t.Fatal(err)
	}
	return &simNode{tpm: tpm, a: a, pcrs: vals}
}

func (n *simNode) classProto(name string) *coffrev1.NodeClass {
	c := &coffrev1.NodeClass{Name: name}
	for _, i := range nodePCRs {
		c.Pcrs = append(c.Pcrs, &coffrev1.PCRReference{Index: i, Sha256: n.pcrs[i]})
	}
	return c
}

// extend extends PCR 7 of the node's TPM, as a changed boot would.
func (n *simNode) extend(t testing.TB) {
	t.Helper()
	d := sha256.Sum256([]byte("another bootloader"))
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(7), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}.Execute(n.tpm)
	if err != nil {
		t.Fatal(err)
	}
}

// setup enrolls the node as name in class with labels (through
// AdminService) and returns the admin client.
func (f *fixture) setup(t testing.TB, n *simNode, name, class string, labels map[string]string) *admintest.Gated {
	t.Helper()
	admin := f.gated(t)
	ctx := callCtx(t)
	if _, err := admin.SetNodeClass(ctx, &coffrev1.SetNodeClassRequest{Class: n.classProto(class)}); err != nil {
		t.Fatal(err)
	}
	node, err := admin.EnrollNode(ctx, &coffrev1.EnrollNodeRequest{
		Name: name, Class: class, Labels: labels,
		Ek: &coffrev1.EnrollNodeRequest_EkPublic{EkPublic: n.a.EKPublic()},
	})
	if err != nil {
		t.Fatal(err)
	}
	if node.GetState() != coffrev1.NodeState_NODE_STATE_ENROLLED || node.GetEkFingerprint() == "" {
		t.Fatalf("enrolled %v", node)
	}
	return admin
}

func keyringWithPolicy(t testing.TB, admin *admintest.Gated, id string, classes []string, labels map[string]string, release coffrev1.Release) {
	t.Helper()
	ctx := callCtx(t)
	if _, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
	if classes == nil {
		return
	}
	p, err := admin.SetKeyringPolicy(ctx, &coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{
		Keyring: id, AllowedClasses: classes, RequiredLabels: labels, Release: release,
	}})
	if err != nil {
		t.Fatal(err)
	}
	if p.GetKeyring() != id || p.GetRelease() != release {
		t.Fatalf("policy %v", p)
	}
}

// withSession puts token on ctx as KeyService wants it.
func withSession(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, SessionMetadataKey, token)
}

func TestAttestedReleaseHPKE(t *testing.T) {
	f := newFixture(t)
	n := openSimNode(t)
	admin := f.setup(t, n, "sim-1", "storage", map[string]string{"jurisdiction": "ca-qc"})
	keyringWithPolicy(t, admin, "acme/disks", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, coffrev1.Release_RELEASE_HPKE)
	conn := f.dial(t) // no client certificate: the TPM is the identity
	c := agent.NewClient(conn, n.a, agent.ClientOptions{})
	ctx := callCtx(t)

	sess, err := c.Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sess.Node != "sim-1" || sess.Class != "storage" || sess.Labels["jurisdiction"] != "ca-qc" {
		t.Fatalf("session %+v", sess)
	}
	ec := map[string]string{"volume": "vol-1"}
	plain, env, err := c.GenerateDataKey(ctx, "acme/disks", ec)
	if err != nil {
		t.Fatal(err)
	}
	if len(plain) != 32 {
		t.Fatalf("data key of %d bytes", len(plain))
	}
	again, err := c.Decrypt(ctx, env, ec)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, plain) {
		t.Fatal("Decrypt opened another key")
	}
	// What the server holds agrees.
	if k, err := f.svc.Decrypt(ctx, "acme", env, ec); err != nil || !bytes.Equal(k.Expose(), plain) {
		t.Fatalf("service decrypt: %v", err)
	}
	// ReEncrypt to a new version of the keyring.
	if _, err := admin.RotateKeyring(ctx, &coffrev1.RotateKeyringRequest{Id: "acme/disks"}); err != nil {
		t.Fatal(err)
	}
	env2, err := c.ReEncrypt(ctx, env, ec, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := kms.ParseEnvelopeInfo(env2); err != nil || info.KeyVersion != 2 {
		t.Fatalf("re-encrypted: %+v, %v", info, err)
	}
	if k, err := c.Decrypt(ctx, env2, ec); err != nil || !bytes.Equal(k, plain) {
		t.Fatalf("decrypt re-encrypted: %v", err)
	}
	// The node's call is logged with its name.
	nodes, err := admin.ListNodes(ctx, &coffrev1.ListNodesRequest{})
	if err != nil || len(nodes.GetNodes()) != 1 || nodes.GetNodes()[0].GetName() != "sim-1" {
		t.Fatalf("list nodes: %v, %v", nodes, err)
	}
	if !bytes.Contains([]byte(f.log.String()), []byte("node=sim-1")) {
		t.Fatalf("the attestation's log line does not name the node:\n%s", f.log.String())
	}
}

// TestSessionSealedOnTheWire: Complete carries session_enc, from which the
// node's agent derives the session key through the real X-Wing, and each
// release comes back as SessionSealed with its own sequence number,
// opening only under its own session's key.
func TestSessionSealedOnTheWire(t *testing.T) {
	f := newFixture(t)
	n := openSimNode(t)
	admin := f.setup(t, n, "sim-1", "storage", nil)
	keyringWithPolicy(t, admin, "acme/disks", []string{"storage"}, nil, coffrev1.Release_RELEASE_HPKE)
	conn := f.dial(t)
	att, keys := coffrev1.NewAttestServiceClient(conn), coffrev1.NewKeyServiceClient(conn)
	ctx := callCtx(t)

	var tokens []string
	var sessKeys []*agent.SessionKey
	for range 2 {
		_, req := attestRaw(t, att, n)
		done, err := att.Complete(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if len(done.GetSessionEnc()) != agent.SessionEncSize {
			t.Fatalf("session_enc of %d bytes, want %d", len(done.GetSessionEnc()), agent.SessionEncSize)
		}
		k, err := n.a.DeriveSessionKey(done.GetSessionEnc())
		if err != nil {
			t.Fatal(err)
		}
		tokens, sessKeys = append(tokens, done.GetSessionToken()), append(sessKeys, k)
	}

	var plain, env []byte
	for i, want := range []uint64{1, 2} {
		rsp, err := keys.GenerateDataKey(withSession(ctx, tokens[0]), &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"})
		if err != nil {
			t.Fatal(err)
		}
		sealed := rsp.GetKey().GetSession()
		if sealed == nil || rsp.GetKey().GetTpm() != nil || sealed.GetSeq() != want || len(sealed.GetCiphertext()) != 48 {
			t.Fatalf("release %d: %v, want SessionSealed with seq %d", i, rsp.GetKey(), want)
		}
		if plain, err = sessKeys[0].Open(sealed, rsp.GetEnvelope()); err != nil {
			t.Fatalf("release %d: %v", i, err)
		}
		if _, err := sessKeys[1].Open(sealed, rsp.GetEnvelope()); !errors.Is(err, agent.ErrOpen) {
			t.Fatalf("session 1's release under session 2's key: %v, want ErrOpen", err)
		}
		env = rsp.GetEnvelope()
	}
	if k, err := f.svc.Decrypt(ctx, "acme", env, nil); err != nil || !bytes.Equal(k.Expose(), plain) {
		t.Fatalf("service decrypt: %v", err)
	}
	// Session 2 releases the same key under its own K, from its own seq 1.
	rsp, err := keys.Decrypt(withSession(ctx, tokens[1]), &coffrev1.DecryptRequest{Envelope: env})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := sessKeys[1].Open(rsp.GetKey().GetSession(), env); err != nil || !bytes.Equal(got, plain) || rsp.GetKey().GetSession().GetSeq() != 1 {
		t.Fatalf("session 2: %x, %v (seq %d)", got, err, rsp.GetKey().GetSession().GetSeq())
	}
}

func TestAttestedReleaseTPMBound(t *testing.T) {
	f := newFixture(t)
	n := openSimNode(t)
	admin := f.setup(t, n, "sim-1", "storage", nil)
	keyringWithPolicy(t, admin, "acme/vault", []string{"storage"}, nil, coffrev1.Release_RELEASE_TPM)
	conn := f.dial(t)
	c := agent.NewClient(conn, n.a, agent.ClientOptions{})
	ctx := callCtx(t)

	sess, err := c.Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The wire form is a TPM duplicate, never session-sealed.
	keys := coffrev1.NewKeyServiceClient(conn)
	rsp, err := keys.GenerateDataKey(withSession(ctx, sess.Token), &coffrev1.GenerateDataKeyRequest{Keyring: "acme/vault"})
	if err != nil {
		t.Fatal(err)
	}
	if rsp.GetKey().GetTpm() == nil || rsp.GetKey().GetSession() != nil {
		t.Fatalf("sealed key %v: want a TPM duplicate", rsp.GetKey())
	}
	plain, env, err := c.GenerateDataKey(ctx, "acme/vault", nil)
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.Decrypt(ctx, env, nil)
	if err != nil || !bytes.Equal(again, plain) {
		t.Fatalf("decrypt: %v", err)
	}
	if k, err := f.svc.Decrypt(ctx, "acme", env, nil); err != nil || !bytes.Equal(k.Expose(), plain) {
		t.Fatalf("service decrypt: %v", err)
	}

	// After a PCR extend, the TPM no longer unseals what was released...
	rsp2, err := keys.Decrypt(withSession(ctx, sess.Token), &coffrev1.DecryptRequest{Envelope: env})
	if err != nil {
		t.Fatal(err)
	}
	n.extend(t)
	if _, err := n.a.OpenTPM(ctx, rsp2.GetKey().GetTpm(), nodePCRs); !errors.Is(err, agent.ErrPCRPolicy) {
		t.Fatalf("open after a PCR extend: %v, want ErrPCRPolicy", err)
	}
	// ...and the node no longer attests.
	_, err = c.Attest(ctx)
	wantCode(t, err, codes.PermissionDenied, "attestation refused: PCR: PCR 7 is ")
	// That failed attestation ended the session it had.
	_, err = keys.Decrypt(withSession(ctx, sess.Token), &coffrev1.DecryptRequest{Envelope: env})
	wantCode(t, err, codes.PermissionDenied, "an attestation of node sim-1 failed")
}

func TestUnenrolledEKRefused(t *testing.T) {
	f := newFixture(t)
	n := openSimNode(t)
	att := coffrev1.NewAttestServiceClient(f.dial(t))
	_, err := att.Challenge(callCtx(t), &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()})
	wantCode(t, err, codes.PermissionDenied, "is not enrolled")
	// Garbage is InvalidArgument with the reason.
	_, err = att.Challenge(callCtx(t), &coffrev1.ChallengeRequest{EkPublic: []byte{0, 1, 2}, AkPublic: n.a.AKPublic()})
	wantCode(t, err, codes.InvalidArgument, "EK")
	// AttestService needs a deadline like everything else.
	_, err = att.Challenge(context.Background(), &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()})
	wantCode(t, err, codes.InvalidArgument, "a deadline is required")
}

// attestRaw runs one attestation over the wire and returns the challenge
// and the completion request, so a test can replay or alter it.
func attestRaw(t testing.TB, att coffrev1.AttestServiceClient, n *simNode) (*coffrev1.ChallengeResponse, *coffrev1.CompleteRequest) {
	t.Helper()
	ctx := callCtx(t)
	ch, err := att.Challenge(ctx, &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()})
	if err != nil {
		t.Fatal(err)
	}
	secret, err := n.a.Activate(ctx, ch.GetCredentialBlob(), ch.GetEncryptedSecret())
	if err != nil {
		t.Fatal(err)
	}
	quote, sig, vals, err := n.a.Quote(ctx, ch.GetNonce(), ch.GetPcrSelection())
	if err != nil {
		t.Fatal(err)
	}
	req := &coffrev1.CompleteRequest{
		ChallengeId: ch.GetChallengeId(), ActivatedSecret: secret, AkPublic: n.a.AKPublic(),
		Quote: quote, Signature: sig, BindingPublicKey: n.a.BindingPublicKey(),
	}
	for _, i := range ch.GetPcrSelection() {
		req.Pcrs = append(req.Pcrs, &coffrev1.PCRValue{Index: i, Sha256: vals[i]})
	}
	return ch, req
}

func TestReplayedChallengeAndRateLimit(t *testing.T) {
	f := newFixtureWith(t, kms.ReleaseConfig{ChallengesPerEK: 3})
	n := openSimNode(t)
	f.setup(t, n, "sim-1", "storage", nil)
	att := coffrev1.NewAttestServiceClient(f.dial(t))
	ctx := callCtx(t)
	_, req := attestRaw(t, att, n)
	done, err := att.Complete(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if done.GetSessionToken() == "" || done.GetNode() != "sim-1" || done.GetExpireTime() == nil {
		t.Fatalf("complete: %v", done)
	}
	_, err = att.Complete(ctx, req)
	wantCode(t, err, codes.PermissionDenied, "attestation refused: nonce: challenge")
	// A PCR value given twice is refused before verification.
	_, req = attestRaw(t, att, n)
	req.Pcrs = append(req.Pcrs, req.Pcrs[0])
	_, err = att.Complete(ctx, req)
	wantCode(t, err, codes.InvalidArgument, "given twice")
	// Two challenges so far; the third is the last this minute.
	if _, err := att.Challenge(ctx, &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()}); err != nil {
		t.Fatal(err)
	}
	_, err = att.Challenge(ctx, &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()})
	wantCode(t, err, codes.ResourceExhausted, "more than 3 challenges in a minute from 127.0.0.1")
	// The budget is per EK and caller address: a caller elsewhere that
	// knows the EK's public key (no secret) has used up its own, not the
	// node's. Here the "node" is the one calling from 127.0.0.2.
	elsewhere := coffrev1.NewAttestServiceClient(f.dialFrom(t, "127.0.0.2"))
	if _, err := elsewhere.Challenge(ctx, &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()}); err != nil {
		t.Fatalf("a challenge from another address after one address used up its budget: %v", err)
	}
	f.clock.Advance(time.Minute)
	if _, err := att.Challenge(ctx, &coffrev1.ChallengeRequest{EkPublic: n.a.EKPublic(), AkPublic: n.a.AKPublic()}); err != nil {
		t.Fatalf("the next minute: %v", err)
	}
}

func TestRevokedNodeMidSession(t *testing.T) {
	f := newFixture(t)
	n := openSimNode(t)
	admin := f.setup(t, n, "sim-1", "storage", nil)
	keyringWithPolicy(t, admin, "acme/disks", []string{"storage"}, nil, coffrev1.Release_RELEASE_HPKE)
	conn := f.dial(t)
	c := agent.NewClient(conn, n.a, agent.ClientOptions{})
	ctx := callCtx(t)
	_, env, err := c.GenerateDataKey(ctx, "acme/disks", nil)
	if err != nil {
		t.Fatal(err)
	}
	token := c.Session().Token
	revoked, err := admin.RevokeNode(ctx, &coffrev1.RevokeNodeRequest{Name: "sim-1"})
	if err != nil {
		t.Fatal(err)
	}
	if revoked.GetState() != coffrev1.NodeState_NODE_STATE_REVOKED || revoked.GetRevokeTime() == nil {
		t.Fatalf("revoked %v", revoked)
	}
	keys := coffrev1.NewKeyServiceClient(conn)
	_, err = keys.Decrypt(withSession(ctx, token), &coffrev1.DecryptRequest{Envelope: env})
	wantCode(t, err, codes.PermissionDenied, "session ended: node sim-1 was revoked")
	_, err = keys.GenerateDataKey(withSession(ctx, token), &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"})
	wantCode(t, err, codes.PermissionDenied, "node sim-1 was revoked")
	// The client does not retry a refusal, and attesting again fails.
	_, err = c.Decrypt(ctx, env, nil)
	wantCode(t, err, codes.PermissionDenied, "revoked")
	_, err = c.Attest(ctx)
	wantCode(t, err, codes.PermissionDenied, "node sim-1 is revoked")
}

func TestReleasePolicyRefusals(t *testing.T) {
	f := newFixture(t)
	n := openSimNode(t)
	admin := f.setup(t, n, "sim-1", "storage", map[string]string{"jurisdiction": "fr"})
	ctx := callCtx(t)
	if _, err := admin.SetNodeClass(ctx, &coffrev1.SetNodeClassRequest{Class: n.classProto("edge")}); err != nil {
		t.Fatal(err)
	}
	keyringWithPolicy(t, admin, "acme/disks", nil, nil, 0)
	keyringWithPolicy(t, admin, "acme/edge", []string{"edge"}, nil, coffrev1.Release_RELEASE_HPKE)
	keyringWithPolicy(t, admin, "acme/qc", []string{"storage"}, map[string]string{"jurisdiction": "ca-qc"}, coffrev1.Release_RELEASE_HPKE)
	keyringWithPolicy(t, admin, "beta/disks", []string{"storage"}, map[string]string{"jurisdiction": "fr"}, coffrev1.Release_RELEASE_HPKE)
	c := agent.NewClient(f.dial(t), n.a, agent.ClientOptions{})

	_, _, err := c.GenerateDataKey(ctx, "acme/disks", nil)
	wantCode(t, err, codes.PermissionDenied, "keyring acme/disks has no release policy")
	_, _, err = c.GenerateDataKey(ctx, "acme/edge", nil)
	wantCode(t, err, codes.PermissionDenied, "does not release to class storage of node sim-1 (allowed classes: edge)")
	_, _, err = c.GenerateDataKey(ctx, "acme/qc", nil)
	wantCode(t, err, codes.PermissionDenied, "requires label jurisdiction=ca-qc; node sim-1 has jurisdiction=fr")
	_, _, err = c.GenerateDataKey(ctx, "nope/disks", nil)
	wantCode(t, err, codes.PermissionDenied, "keyring nope/disks has no release policy")

	// Tenant B's node presents an envelope of tenant A's keyring.
	aKey, err := f.svc.GenerateDataKey(ctx, kms.KeyringID{Tenant: "acme", Name: "qc"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	aKey.Plaintext.Zero()
	if _, _, err := c.GenerateDataKey(ctx, "beta/disks", nil); err != nil {
		t.Fatalf("tenant B's own keyring: %v", err)
	}
	_, err = c.Decrypt(ctx, aKey.Envelope, nil)
	wantCode(t, err, codes.PermissionDenied, "keyring acme/qc requires label jurisdiction=ca-qc")
	// Re-encrypting it into tenant B's keyring is refused too.
	_, err = c.ReEncrypt(ctx, aKey.Envelope, nil, "beta/disks", nil)
	wantCode(t, err, codes.PermissionDenied, "keyring acme/qc")

	// Admin validation reaches the caller.
	_, err = admin.SetKeyringPolicy(ctx, &coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{Keyring: "acme/disks", AllowedClasses: []string{"nope"}, Release: coffrev1.Release_RELEASE_HPKE}})
	wantCode(t, err, codes.FailedPrecondition, "class nope does not exist")
	_, err = admin.SetKeyringPolicy(ctx, &coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{Keyring: "acme/disks", AllowedClasses: []string{"edge"}}})
	wantCode(t, err, codes.InvalidArgument, "release must be")
	_, err = admin.SetKeyringPolicy(ctx, &coffrev1.SetKeyringPolicyRequest{Policy: &coffrev1.KeyringPolicy{Keyring: "acme/none", Release: coffrev1.Release_RELEASE_HPKE}})
	wantCode(t, err, codes.NotFound, "keyring acme/none")
}

func TestSessionExpiry(t *testing.T) {
	f := newFixtureWith(t, kms.ReleaseConfig{SessionTTL: 5 * time.Minute})
	n := openSimNode(t)
	admin := f.setup(t, n, "sim-1", "storage", nil)
	keyringWithPolicy(t, admin, "acme/disks", []string{"storage"}, nil, coffrev1.Release_RELEASE_HPKE)
	conn := f.dial(t)
	att := coffrev1.NewAttestServiceClient(conn)
	ctx := callCtx(t)
	_, req := attestRaw(t, att, n)
	done, err := att.Complete(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if got := done.GetExpireTime().AsTime().Sub(f.clock.Now()); got != 5*time.Minute {
		t.Fatalf("session lasts %v, want 5m", got)
	}
	keys := coffrev1.NewKeyServiceClient(conn)
	sctx := withSession(ctx, done.GetSessionToken())
	if _, err := keys.GenerateDataKey(sctx, &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"}); err != nil {
		t.Fatal(err)
	}
	f.clock.Advance(5 * time.Minute)
	_, err = keys.GenerateDataKey(sctx, &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"})
	wantCode(t, err, codes.Unauthenticated, "session expired")
}

func TestEKRootsAndCertificateEnrollment(t *testing.T) {
	f := newFixture(t)
	admin := f.gated(t)
	ctx := callCtx(t)
	ca := attesttest.NewEKCA(t)
	root, err := admin.AddEKRoot(ctx, &coffrev1.AddEKRootRequest{Certificate: ca.CertPEM()})
	if err != nil {
		t.Fatal(err)
	}
	list, err := admin.ListEKRoots(ctx, &coffrev1.ListEKRootsRequest{})
	if err != nil || len(list.GetRoots()) != 1 || !proto.Equal(list.GetRoots()[0], root) {
		t.Fatalf("list roots: %v, %v", list, err)
	}
	_, err = admin.AddEKRoot(ctx, &coffrev1.AddEKRootRequest{Certificate: []byte("junk")})
	wantCode(t, err, codes.InvalidArgument, "EK root certificate")

	pcr := sha256.Sum256([]byte("pcr"))
	if _, err := admin.SetNodeClass(ctx, &coffrev1.SetNodeClassRequest{Class: &coffrev1.NodeClass{Name: "storage", Pcrs: []*coffrev1.PCRReference{{Index: 7, Sha256: pcr[:]}}}}); err != nil {
		t.Fatal(err)
	}
	_, err = admin.SetNodeClass(ctx, &coffrev1.SetNodeClassRequest{Class: &coffrev1.NodeClass{Name: "x", Pcrs: []*coffrev1.PCRReference{{Index: 7, Sha256: pcr[:]}, {Index: 7, Sha256: pcr[:]}}}})
	wantCode(t, err, codes.InvalidArgument, "PCR 7 is given twice")
	_, err = admin.SetNodeClass(ctx, &coffrev1.SetNodeClassRequest{Class: &coffrev1.NodeClass{Name: "x"}})
	wantCode(t, err, codes.InvalidArgument, "at least one PCR")

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	cert := ca.IssueEKCert(t, key.Public(), now.Add(-time.Hour), now.Add(time.Hour))
	node, err := admin.EnrollNode(ctx, &coffrev1.EnrollNodeRequest{Name: "n1", Class: "storage", Labels: map[string]string{"site": "mtl"},
		Ek: &coffrev1.EnrollNodeRequest_EkCertificate{EkCertificate: cert}})
	if err != nil {
		t.Fatal(err)
	}
	ek, err := attest.ParseEKPublic(mustPKIX(t, key))
	if err != nil {
		t.Fatal(err)
	}
	if node.GetEkFingerprint() != ek.Fingerprint || node.GetLabels()["site"] != "mtl" || node.GetEnrollTime() == nil {
		t.Fatalf("node %v", node)
	}
	_, err = admin.EnrollNode(ctx, &coffrev1.EnrollNodeRequest{Name: "n2", Class: "storage", Ek: &coffrev1.EnrollNodeRequest_EkCertificate{EkCertificate: cert}})
	wantCode(t, err, codes.AlreadyExists, "enrolled already, as node n1")
	other := attesttest.NewEKCA(t).IssueEKCert(t, key.Public(), now.Add(-time.Hour), now.Add(time.Hour))
	_, err = admin.EnrollNode(ctx, &coffrev1.EnrollNodeRequest{Name: "n3", Class: "storage", Ek: &coffrev1.EnrollNodeRequest_EkCertificate{EkCertificate: other}})
	wantCode(t, err, codes.InvalidArgument, "does not chain to a configured TPM manufacturer CA")
	_, err = admin.RevokeNode(ctx, &coffrev1.RevokeNodeRequest{Name: "ghost"})
	wantCode(t, err, codes.NotFound, "node ghost")

	// Every release-state method is behind the admin gate.
	anon := coffrev1.NewAdminServiceClient(f.dial(t))
	for _, call := range []func() error{
		func() error { _, err := anon.ListNodes(ctx, &coffrev1.ListNodesRequest{}); return err },
		func() error { _, err := anon.ListEKRoots(ctx, &coffrev1.ListEKRootsRequest{}); return err },
		func() error {
			_, err := anon.Propose(ctx, &coffrev1.ProposeRequest{Operation: &coffrev1.Operation{Op: &coffrev1.Operation_RevokeNode{RevokeNode: &coffrev1.RevokeNodeRequest{Name: "n1"}}}})
			return err
		},
	} {
		wantCode(t, call(), codes.Unauthenticated, "admin client certificate")
	}
}

func mustPKIX(t testing.TB, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestStatusOfReleaseErrors(t *testing.T) {
	refusal := &attest.Error{Check: attest.ErrPCR, Reason: "PCR 7 is 3f, the class expects 9a"}
	for _, tc := range []struct {
		err  error
		code codes.Code
		msg  string
	}{
		{kms.ErrUnauthenticated, codes.Unauthenticated, "unauthenticated"},
		{errors.Join(kms.ErrPermissionDenied, refusal), codes.PermissionDenied, "attestation refused: PCR: PCR 7 is 3f, the class expects 9a"},
		{kms.ErrResourceExhausted, codes.ResourceExhausted, "resource exhausted"},
	} {
		st := toStatus(tc.err)
		if st.Code() != tc.code || !bytes.Contains([]byte(st.Message()), []byte(tc.msg)) {
			t.Errorf("toStatus(%v) = %v %q", tc.err, st.Code(), st.Message())
		}
	}
	// A decryption failure stays generic even under a permission error.
	if st := toStatus(errors.Join(kms.ErrPermissionDenied, kms.ErrDecrypt)); st.Code() != codes.InvalidArgument || st.Message() != msgDecrypt {
		t.Errorf("decrypt under permission: %v", st)
	}
}

// FuzzEvidenceFromProto: a CompleteRequest is outside input.
func FuzzEvidenceFromProto(f *testing.F) {
	seed, _ := proto.Marshal(&coffrev1.CompleteRequest{ChallengeId: "x", Pcrs: []*coffrev1.PCRValue{{Index: 7, Sha256: []byte{1}}}})
	f.Add(seed)
	f.Fuzz(func(t *testing.T, b []byte) {
		var req coffrev1.CompleteRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		ev, err := EvidenceFromProto(&req)
		if err == nil && len(ev.PCRs) != len(req.GetPcrs()) {
			t.Fatalf("%d PCRs from %d values", len(ev.PCRs), len(req.GetPcrs()))
		}
	})
}
