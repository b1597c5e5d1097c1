package agent_test

// Client behaviour against a minimal in-test server: it stands in for the
// real one (kms/server) only as far as these tests need — credential,
// nonce binding, session tokens, sealing — so that what is tested is the
// client's handling of sessions, retries and released keys. End-to-end
// tests against the real server live with the server.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/coffre-kms/coffre/attest/agent"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

type fakeServer struct {
	coffrev1.UnimplementedAttestServiceServer
	coffrev1.UnimplementedKeyServiceServer

	mu         sync.Mutex
	ttl        time.Duration
	pcrs       []uint32
	tpmRelease bool
	deny       bool
	noEnc      bool // Complete sends no session_enc
	corrupt    bool // releases carry a flipped ciphertext bit
	// gate, when set, holds GenerateDataKey (before it takes mu) until
	// closed, after signalling entered.
	gate, entered chan struct{}
	challenges    int
	keyCalls      int
	seqs          []uint64 // of every session-sealed release
	pending       map[string]challenge
	sessions      map[string]*fakeSession
	keys          map[string][]byte // envelope -> data key
	conn          *grpc.ClientConn  // the Client's, set by startClient
}

type challenge struct {
	secret, nonce, ekPub, akPub []byte
}

type fakeSession struct {
	rk    *serverSession
	ekPub []byte
	pcrs  map[uint32][]byte
}

func random(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func (s *fakeServer) Challenge(_ context.Context, r *coffrev1.ChallengeRequest) (*coffrev1.ChallengeResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.challenges++
	secret, nonce := random(32), random(32)
	blob, enc, err := credentialFor(r.GetEkPublic(), r.GetAkPublic(), secret)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	id := fmt.Sprintf("ch-%d", s.challenges)
	s.pending[id] = challenge{secret: secret, nonce: nonce, ekPub: r.GetEkPublic(), akPub: r.GetAkPublic()}
	return &coffrev1.ChallengeResponse{
		ChallengeId: id, Nonce: nonce, CredentialBlob: blob, EncryptedSecret: enc,
		ExpireTime: timestamppb.New(time.Now().Add(time.Minute)), PcrSelection: s.pcrs,
	}, nil
}

func (s *fakeServer) Complete(_ context.Context, r *coffrev1.CompleteRequest) (*coffrev1.CompleteResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch, ok := s.pending[r.GetChallengeId()]
	delete(s.pending, r.GetChallengeId())
	if !ok || !bytes.Equal(ch.secret, r.GetActivatedSecret()) || !bytes.Equal(ch.akPub, r.GetAkPublic()) {
		return nil, status.Error(codes.PermissionDenied, "credential")
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](r.GetQuote())
	want := sha256.Sum256(append(append([]byte{}, ch.nonce...), r.GetBindingPublicKey()...))
	if err != nil || !bytes.Equal(att.ExtraData.Buffer, want[:]) {
		return nil, status.Error(codes.PermissionDenied, "quote")
	}
	vals := map[uint32][]byte{}
	for _, v := range r.GetPcrs() {
		vals[v.GetIndex()] = v.GetSha256()
	}
	rk, err := newServerSession(r.GetBindingPublicKey())
	if err != nil {
		return nil, status.Error(codes.PermissionDenied, "binding key")
	}
	tok := fmt.Sprintf("tok-%d", s.challenges)
	s.sessions[tok] = &fakeSession{rk: rk, ekPub: ch.ekPub, pcrs: vals}
	rsp := &coffrev1.CompleteResponse{
		SessionToken: tok, ExpireTime: timestamppb.New(time.Now().Add(s.ttl)),
		Node: "node-1", NodeClass: "storage", Labels: map[string]string{"jurisdiction": "ca-qc"},
		SessionEnc: rk.enc,
	}
	if s.noEnc {
		rsp.SessionEnc = nil
	}
	return rsp, nil
}

// session checks the call's token: Unauthenticated for an unknown one,
// PermissionDenied when the test says the policy refuses.
func (s *fakeServer) session(ctx context.Context) (*fakeSession, error) {
	s.keyCalls++
	md, _ := metadata.FromIncomingContext(ctx)
	toks := md.Get(agent.SessionMetadataKey)
	if _, ok := ctx.Deadline(); !ok {
		return nil, status.Error(codes.InvalidArgument, "no deadline")
	}
	if len(toks) != 1 {
		return nil, status.Error(codes.Unauthenticated, "no session")
	}
	sess, ok := s.sessions[toks[0]]
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "unknown or expired session")
	}
	if s.deny {
		return nil, status.Error(codes.PermissionDenied, "keyring policy refuses this node")
	}
	return sess, nil
}

func (s *fakeServer) seal(sess *fakeSession, key, envelope []byte) (*coffrev1.SealedKey, error) {
	if s.tpmRelease {
		d, err := duplicateFor(sess.ekPub, key, s.pcrs, sess.pcrs)
		if err != nil {
			return nil, err
		}
		return &coffrev1.SealedKey{Seal: &coffrev1.SealedKey_Tpm{Tpm: d}}, nil
	}
	sealed := sess.rk.seal(key, envelope)
	s.seqs = append(s.seqs, sealed.GetSeq())
	if s.corrupt {
		sealed.Ciphertext[len(sealed.Ciphertext)-1] ^= 1
	}
	return &coffrev1.SealedKey{Seal: &coffrev1.SealedKey_Session{Session: sealed}}, nil
}

func (s *fakeServer) GenerateDataKey(ctx context.Context, r *coffrev1.GenerateDataKeyRequest) (*coffrev1.GenerateDataKeyResponse, error) {
	if s.gate != nil {
		s.entered <- struct{}{}
		<-s.gate
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, err := s.session(ctx)
	if err != nil {
		return nil, err
	}
	key, envelope := random(32), []byte(fmt.Sprintf("env-%s-%d", r.GetKeyring(), len(s.keys)))
	s.keys[string(envelope)] = key
	sealed, err := s.seal(sess, key, envelope)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &coffrev1.GenerateDataKeyResponse{Envelope: envelope, Key: sealed, KeyVersion: 1}, nil
}

func (s *fakeServer) Decrypt(ctx context.Context, r *coffrev1.DecryptRequest) (*coffrev1.DecryptResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sess, err := s.session(ctx)
	if err != nil {
		return nil, err
	}
	key, ok := s.keys[string(r.GetEnvelope())]
	if !ok {
		return nil, status.Error(codes.InvalidArgument, "cannot decrypt")
	}
	sealed, err := s.seal(sess, key, r.GetEnvelope())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &coffrev1.DecryptResponse{Key: sealed}, nil
}

func (s *fakeServer) ReEncrypt(ctx context.Context, r *coffrev1.ReEncryptRequest) (*coffrev1.ReEncryptResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.session(ctx); err != nil {
		return nil, err
	}
	return &coffrev1.ReEncryptResponse{Envelope: append([]byte("re-"), r.GetEnvelope()...), KeyVersion: 2}, nil
}

// forget drops every session, as a restarted server would.
func (s *fakeServer) forget() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sessions = map[string]*fakeSession{}
}

func (s *fakeServer) counts() (challenges, keyCalls int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.challenges, s.keyCalls
}

// startClient serves srv on a loopback port and returns a Client for it
// with an Agent on a fresh simulator.
func startClient(t *testing.T, srv *fakeServer, opts agent.ClientOptions) (*agent.Client, *agent.Agent) {
	t.Helper()
	srv.pending = map[string]challenge{}
	srv.sessions = map[string]*fakeSession{}
	srv.keys = map[string][]byte{}
	if srv.ttl == 0 {
		srv.ttl = time.Hour
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	coffrev1.RegisterAttestServiceServer(gs, srv)
	coffrev1.RegisterKeyServiceServer(gs, srv)
	go func() { _ = gs.Serve(l) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	srv.conn = conn
	a := newAgent(t, openSimulator(t), agent.Options{})
	return agent.NewClient(conn, a, opts), a
}

func TestClientAttestsOnFirstUseAndReleases(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0, 7}}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	ctx := context.Background()
	if c.Session() != nil {
		t.Fatal("a session before any call")
	}
	key, env, err := c.GenerateDataKey(ctx, "t/r", map[string]string{"vol": "1"})
	if err != nil {
		t.Fatal(err)
	}
	s := c.Session()
	if s == nil || s.Token == "" || s.Node != "node-1" || s.Class != "storage" || s.Labels["jurisdiction"] != "ca-qc" || time.Until(s.Expires) < 50*time.Minute {
		t.Fatalf("session %+v", s)
	}
	again, err := c.Decrypt(ctx, env, map[string]string{"vol": "1"})
	if err != nil || !bytes.Equal(again, key) {
		t.Fatalf("Decrypt = %x, %v; want the generated key", again, err)
	}
	re, err := c.ReEncrypt(ctx, env, nil, "", nil)
	if err != nil || !bytes.HasPrefix(re, []byte("re-")) {
		t.Fatalf("ReEncrypt = %q, %v", re, err)
	}
	if ch, calls := srv.counts(); ch != 1 || calls != 3 {
		t.Errorf("%d attestations and %d key calls, want 1 and 3: attestation is per session", ch, calls)
	}
}

func TestClientTPMRelease(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{7, 16}, tpmRelease: true}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	key, env, err := c.GenerateDataKey(context.Background(), "t/r", nil)
	if err != nil {
		t.Fatalf("TPM-bound GenerateDataKey: %v", err)
	}
	again, err := c.Decrypt(context.Background(), env, nil)
	if err != nil || !bytes.Equal(again, key) {
		t.Fatalf("TPM-bound Decrypt = %x, %v", again, err)
	}
}

func TestClientReattestsOnUnauthenticated(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	ctx := context.Background()
	if _, err := c.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	first := c.Session().Token
	srv.forget()
	if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); err != nil {
		t.Fatalf("after the server forgot the session: %v", err)
	}
	if ch, calls := srv.counts(); ch != 2 || calls != 2 {
		t.Errorf("%d attestations and %d key calls, want 2 and 2 (one refused, one retried)", ch, calls)
	}
	if c.Session().Token == first {
		t.Errorf("the session was not replaced")
	}
}

func TestClientDoesNotRetryPermissionDenied(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}, deny: true}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	_, _, err := c.GenerateDataKey(context.Background(), "t/r", nil)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("GenerateDataKey = %v, want PermissionDenied", err)
	}
	if ch, calls := srv.counts(); ch != 1 || calls != 1 {
		t.Errorf("%d attestations and %d key calls, want 1 and 1: a refusal is final", ch, calls)
	}
}

func TestClientRenewsBeforeExpiry(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}, ttl: 10 * time.Minute}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	now := time.Now()
	agent.SetClock(c, func() time.Time { return now })
	ctx := context.Background()
	if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); err != nil {
		t.Fatal(err)
	}
	now = now.Add(7 * time.Minute) // 3 of 10 minutes left: outside the default window (2)
	if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); err != nil {
		t.Fatal(err)
	}
	if ch, _ := srv.counts(); ch != 1 {
		t.Fatalf("%d attestations before the renewal window, want 1", ch)
	}
	now = now.Add(90 * time.Second) // 1.5 minutes left: renew first
	if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); err != nil {
		t.Fatal(err)
	}
	if ch, calls := srv.counts(); ch != 2 || calls != 3 {
		t.Errorf("%d attestations and %d key calls, want 2 and 3", ch, calls)
	}
}

// Concurrent callers without a session share one attestation.
func TestClientConcurrentCallsAttestOnce(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			if _, _, err := c.GenerateDataKey(context.Background(), "t/r", nil); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if ch, _ := srv.counts(); ch != 1 {
		t.Errorf("%d attestations for 8 concurrent calls, want 1", ch)
	}
}

func TestClientRefusedAttestation(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{99}} // not a PCR: the client refuses the challenge
	c, _ := startClient(t, srv, agent.ClientOptions{})
	_, _, err := c.GenerateDataKey(context.Background(), "t/r", nil)
	if !errors.Is(err, agent.ErrPCRSelection) {
		t.Fatalf("bad challenge: %v, want ErrPCRSelection", err)
	}
	if c.Session() != nil {
		t.Errorf("a session after a failed attestation")
	}
}

// The Client's session key is the server's K, derived through the real
// X-Wing from session_enc, and successive releases carry distinct
// sequence numbers.
func TestClientSessionKey(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	ctx := context.Background()
	sess, err := c.Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	srv.mu.Lock()
	serverK := srv.sessions[sess.Token].rk.k
	srv.mu.Unlock()
	k := agent.CurrentSessionKey(c)
	if got := agent.SessionKeyBytes(k); len(got) != 32 || !bytes.Equal(got, serverK) {
		t.Fatalf("client K %x, server K %x", got, serverK)
	}
	for range 3 {
		if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); err != nil {
			t.Fatal(err)
		}
	}
	srv.mu.Lock()
	seqs := slices.Clone(srv.seqs)
	srv.mu.Unlock()
	if !slices.Equal(seqs, []uint64{1, 2, 3}) {
		t.Errorf("sequence numbers %v, want 1 2 3", seqs)
	}

	// Re-attesting replaces the key and wipes the old one.
	if _, err := c.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	if agent.SessionKeyBytes(k) != nil {
		t.Error("the replaced session's key was not wiped")
	}
	if k2 := agent.CurrentSessionKey(c); k2 == k || agent.SessionKeyBytes(k2) == nil {
		t.Error("no new session key")
	}
}

func TestClientRefusesSessionWithoutEnc(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}, noEnc: true}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	_, _, err := c.GenerateDataKey(context.Background(), "t/r", nil)
	if !errors.Is(err, agent.ErrNoSession) {
		t.Fatalf("no session_enc: %v, want ErrNoSession", err)
	}
	if c.Session() != nil {
		t.Error("a session without a session key")
	}
}

// A release that does not open is ErrOpen, and not a reason to attest.
func TestClientReleaseThatDoesNotOpen(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}, corrupt: true}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	_, _, err := c.GenerateDataKey(context.Background(), "t/r", nil)
	if !errors.Is(err, agent.ErrOpen) {
		t.Fatalf("corrupted release: %v, want ErrOpen", err)
	}
	if ch, calls := srv.counts(); ch != 1 || calls != 1 {
		t.Errorf("%d attestations and %d key calls, want 1 and 1", ch, calls)
	}
}

// A call in flight when its session is replaced still opens what the
// server sealed for it: the old key is wiped only once that call is done.
func TestClientReplacedSessionServesCallsInFlight(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}}
	c, _ := startClient(t, srv, agent.ClientOptions{})
	ctx := context.Background()
	if _, err := c.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	old := agent.CurrentSessionKey(c)
	srv.gate, srv.entered = make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, _, err := c.GenerateDataKey(ctx, "t/r", nil)
		done <- err
	}()
	<-srv.entered
	if _, err := c.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	if agent.SessionKeyBytes(old) == nil {
		t.Fatal("the old session's key was wiped while a call was using it")
	}
	close(srv.gate)
	if err := <-done; err != nil {
		t.Fatalf("the call in flight: %v", err)
	}
	if agent.SessionKeyBytes(old) != nil {
		t.Error("the old session's key outlived its last call")
	}
}

func TestClientClose(t *testing.T) {
	srv := &fakeServer{pcrs: []uint32{0}}
	c, a := startClient(t, srv, agent.ClientOptions{})
	ctx := context.Background()
	if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); err != nil {
		t.Fatal(err)
	}
	k := agent.CurrentSessionKey(c)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if agent.SessionKeyBytes(k) != nil {
		t.Error("Close left the session key")
	}
	if _, _, err := c.GenerateDataKey(ctx, "t/r", nil); !errors.Is(err, agent.ErrClosed) {
		t.Errorf("after Close: %v, want ErrClosed", err)
	}
	if _, err := c.Attest(ctx); !errors.Is(err, agent.ErrClosed) {
		t.Errorf("Attest after Close: %v, want ErrClosed", err)
	}

	// The Agent's Close wipes the session keys of a Client still open.
	c2 := agent.NewClient(srv.conn, a, agent.ClientOptions{})
	if _, _, err := c2.GenerateDataKey(ctx, "t/r", nil); err != nil {
		t.Fatal(err)
	}
	k2 := agent.CurrentSessionKey(c2)
	_ = a.Close()
	if agent.SessionKeyBytes(k2) != nil {
		t.Error("Agent.Close left a Client's session key")
	}
}
