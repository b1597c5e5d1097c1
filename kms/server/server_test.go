package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/server/admintest"
	"github.com/coffre-kms/coffre/kms/store"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// The tests here use real parts only: a SoftHSM token, a bbolt file, TLS
// over 127.0.0.1 and grpc clients. SoftHSM tests in one process must not run
// in parallel, so none of these calls t.Parallel.

// testMaxMsg is the server's message limit in these tests, small so that
// the oversized-message test need not send megabytes.
const testMaxMsg = 16 << 10

// syncBuffer is a log sink that the server's goroutines and the test can
// share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type fixture struct {
	srv      *Server
	svc      *kms.Service
	store    store.Store
	rel      *kms.ReleaseService
	clock    *testClock
	addr     string
	adminCA  *testCA
	serverCA *testCA
	admin    tls.Certificate
	log      *syncBuffer
	events   *eventLog
	// gatedAdmin is the 1-of-1 quorum's admin, once installed.
	gatedAdmin *admintest.Gated
}

// newFixture serves a Server over a fresh SoftHSM root and bbolt store on
// 127.0.0.1, with TLS set up the way cmd/coffred sets it up.
func newFixture(t testing.TB) *fixture {
	t.Helper()
	return newFixtureWith(t, kms.ReleaseConfig{})
}

// newFixtureWith is newFixture with a release configuration; its clock is
// the fixture's, which the test moves by hand.
func newFixtureWith(t testing.TB, rcfg kms.ReleaseConfig, mods ...func(*Options)) *fixture {
	t.Helper()
	root := hsmtest.NewRoot(t)
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "coffre.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	svc, err := kms.New(kms.Config{Store: st, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	clock := newTestClock()
	rcfg.Now = clock.Now
	rel, err := kms.NewReleaseService(svc, rcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rel.Close() })

	f := &fixture{
		svc:      svc,
		store:    st,
		rel:      rel,
		clock:    clock,
		adminCA:  newTestCA(t, "test admin CA"),
		serverCA: newTestCA(t, "test server CA"),
		log:      &syncBuffer{},
	}
	f.admin = f.adminCA.issue(t, "test-admin", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	serverCert := f.serverCA.issue(t, "coffred", []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, net.IPv4(127, 0, 0, 1))

	f.events = &eventLog{}
	q, err := quorum.New(quorum.Config{Store: st, Audit: f.events.record})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{
		MaxCallTimeout: 5 * time.Second,
		Logger:         slog.New(slog.NewTextHandler(f.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
		AdminCAs:       f.adminCA.pool,
		Release:        rel,
		Quorum:         q,
	}
	for _, m := range mods {
		m(&opts)
	}
	f.srv = New(svc, opts)
	creds := credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    f.adminCA.pool,
	})
	g := grpc.NewServer(append(f.srv.ServerOptions(), grpc.Creds(creds), grpc.MaxRecvMsgSize(testMaxMsg))...)
	f.srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = lis.Addr().String()
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return f
}

// gated returns an admin client whose quorum-gated calls are proposed and
// approved by the fixture's one test admin (a 1-of-1 quorum installed on
// first use).
func (f *fixture) gated(t testing.TB) *admintest.Gated {
	t.Helper()
	c := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	if f.gatedAdmin == nil {
		g, err := admintest.New(callCtx(t), c)
		if err != nil {
			t.Fatal(err)
		}
		f.gatedAdmin = g
	}
	return f.gatedAdmin.With(c)
}

// dial connects with the given client certificate, if any. The
// certificate is sent whatever CAs the server says it accepts, as an
// attacker would: Go's client would otherwise withhold one that does not
// match, and the server's own refusal would go untested.
func (f *fixture) dial(t testing.TB, certs ...tls.Certificate) *grpc.ClientConn {
	t.Helper()
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: f.serverCA.pool}
	if len(certs) > 0 {
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &certs[0], nil }
	}
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// dialFrom is dial from a given local loopback address (any 127.0.0.0/8
// address is this host on Linux), for tests that need two callers.
func (f *fixture) dialFrom(t testing.TB, localIP string) *grpc.ClientConn {
	t.Helper()
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: f.serverCA.pool}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func callCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t testing.TB, err error, code codes.Code, msgPart string) {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != code {
		t.Fatalf("got %v %q, want %v", st.Code(), st.Message(), code)
	}
	if !strings.Contains(st.Message(), msgPart) {
		t.Fatalf("status message %q does not contain %q", st.Message(), msgPart)
	}
}

func TestAdminEndToEnd(t *testing.T) {
	f := newFixture(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	ctx := callCtx(t)

	created, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: "acme/disks"})
	if err != nil {
		t.Fatal(err)
	}
	if created.GetId() != "acme/disks" || created.GetTenant() != "acme" || created.GetName() != "disks" {
		t.Fatalf("created %v", created)
	}
	if created.GetPrimaryVersion() != 1 || len(created.GetVersions()) != 1 ||
		created.GetVersions()[0].GetState() != coffrev1.KeyState_KEY_STATE_ACTIVE ||
		created.GetVersions()[0].GetRootId() == "" || created.GetCreateTime() == nil {
		t.Fatalf("created %v: want one active version 1 with a root id and a create time", created)
	}

	if _, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: "acme/disks"}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("second create: got %v, want AlreadyExists", err)
	}
	if _, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: "other/db"}); err != nil {
		t.Fatal(err)
	}

	got, err := admin.GetKeyring(ctx, &coffrev1.GetKeyringRequest{Id: "acme/disks"})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetId() != "acme/disks" || got.GetPrimaryVersion() != 1 {
		t.Fatalf("get: %v", got)
	}
	if _, err := admin.GetKeyring(ctx, &coffrev1.GetKeyringRequest{Id: "acme/nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("get missing: got %v, want NotFound", err)
	}

	list, err := admin.ListKeyrings(ctx, &coffrev1.ListKeyringsRequest{Tenant: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetKeyrings()) != 1 || list.GetKeyrings()[0].GetId() != "acme/disks" {
		t.Fatalf("list acme: %v", list)
	}
	all, err := admin.ListKeyrings(ctx, &coffrev1.ListKeyringsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(all.GetKeyrings()) != 2 {
		t.Fatalf("list all: %v", all)
	}

	rotated, err := admin.RotateKeyring(ctx, &coffrev1.RotateKeyringRequest{Id: "acme/disks"})
	if err != nil {
		t.Fatal(err)
	}
	if rotated.GetPrimaryVersion() != 2 || len(rotated.GetVersions()) != 2 {
		t.Fatalf("rotated: %v", rotated)
	}
	states := map[uint32]coffrev1.KeyState{}
	for _, v := range rotated.GetVersions() {
		states[v.GetVersion()] = v.GetState()
	}
	if states[1] != coffrev1.KeyState_KEY_STATE_DEACTIVATED || states[2] != coffrev1.KeyState_KEY_STATE_ACTIVE {
		t.Fatalf("rotated states: %v", states)
	}
	if k, err := KeyringFromProto(rotated); err != nil || k.Primary != 2 || k.ID.String() != "acme/disks" {
		t.Fatalf("KeyringFromProto(rotated) = %+v, %v", k, err)
	}

	// The admin's subject is in the server log.
	if log := f.log.String(); !strings.Contains(log, "CN=test-admin") {
		t.Fatalf("log does not name the admin:\n%s", log)
	}
}

func TestAdminWithoutClientCert(t *testing.T) {
	f := newFixture(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t))
	_, err := admin.CreateKeyring(callCtx(t), &coffrev1.CreateKeyringRequest{Id: "acme/disks"})
	wantCode(t, err, codes.Unauthenticated, "admin client certificate")
	_, err = admin.ListKeyrings(callCtx(t), &coffrev1.ListKeyringsRequest{})
	wantCode(t, err, codes.Unauthenticated, "admin client certificate")
}

func TestAdminCertFromAnotherCA(t *testing.T) {
	f := newFixture(t)
	other := newTestCA(t, "rogue CA")
	rogue := other.issue(t, "test-admin", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	admin := coffrev1.NewAdminServiceClient(f.dial(t, rogue))
	_, err := admin.CreateKeyring(callCtx(t), &coffrev1.CreateKeyringRequest{Id: "acme/disks"})
	// The server refuses the handshake, so the call never reaches a
	// handler: the client sees the connection fail. (What it reads then
	// depends on timing: a TLS alert or a reset connection.)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("got %v, want Unavailable from a refused handshake", err)
	}
	if strings.Contains(f.log.String(), "CreateKeyring") {
		t.Fatalf("a call with a rogue certificate reached the server:\n%s", f.log.String())
	}
}

func TestAdminCertWithoutClientAuthUsage(t *testing.T) {
	f := newFixture(t)
	// No extended key usage at all: the TLS layer accepts it (an absent
	// extension means any usage), the admin gate must not.
	anyUse := f.adminCA.issue(t, "no-eku", nil)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, anyUse))
	_, err := admin.CreateKeyring(callCtx(t), &coffrev1.CreateKeyringRequest{Id: "acme/disks"})
	wantCode(t, err, codes.PermissionDenied, "clientAuth")
}

func TestAdminCAsUnset(t *testing.T) {
	f := newFixture(t)
	f.srv.adminCAs = nil // as if Options.AdminCAs were left out
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	_, err := admin.ListKeyrings(callCtx(t), &coffrev1.ListKeyringsRequest{})
	wantCode(t, err, codes.PermissionDenied, "no admin CA")
}

func TestNoDeadline(t *testing.T) {
	f := newFixture(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	_, err := admin.ListKeyrings(context.Background(), &coffrev1.ListKeyringsRequest{})
	wantCode(t, err, codes.InvalidArgument, "a deadline is required")
}

func TestOversizedMessage(t *testing.T) {
	f := newFixture(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	_, err := admin.CreateKeyring(callCtx(t), &coffrev1.CreateKeyringRequest{Id: "acme/" + strings.Repeat("a", 2*testMaxMsg)})
	wantCode(t, err, codes.ResourceExhausted, "")
}

func TestKeyServiceWithoutSession(t *testing.T) {
	f := newFixture(t)
	// With or without a client certificate: only a session opens
	// KeyService.
	for _, conn := range []*grpc.ClientConn{f.dial(t), f.dial(t, f.admin)} {
		keys := coffrev1.NewKeyServiceClient(conn)
		ctx := callCtx(t)
		_, err := keys.GenerateDataKey(ctx, &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"})
		wantCode(t, err, codes.Unauthenticated, "KeyService needs a session")
		_, err = keys.Decrypt(ctx, &coffrev1.DecryptRequest{Envelope: []byte{1}})
		wantCode(t, err, codes.Unauthenticated, "KeyService needs a session")
		_, err = keys.ReEncrypt(ctx, &coffrev1.ReEncryptRequest{Envelope: []byte{1}})
		wantCode(t, err, codes.Unauthenticated, "KeyService needs a session")
		// A token nobody issued.
		bogus := metadata.AppendToOutgoingContext(ctx, SessionMetadataKey, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
		_, err = keys.GenerateDataKey(bogus, &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"})
		wantCode(t, err, codes.Unauthenticated, "unknown session")
		two := metadata.AppendToOutgoingContext(ctx, SessionMetadataKey, "a", SessionMetadataKey, "b")
		_, err = keys.GenerateDataKey(two, &coffrev1.GenerateDataKeyRequest{Keyring: "acme/disks"})
		wantCode(t, err, codes.Unauthenticated, "more than one")
	}
}

func TestReleaseNotConfigured(t *testing.T) {
	f := newFixture(t)
	f.srv.rel = nil
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	_, err := admin.ListNodes(callCtx(t), &coffrev1.ListNodesRequest{})
	wantCode(t, err, codes.FailedPrecondition, "attested release is not configured")
	_, err = coffrev1.NewAttestServiceClient(f.dial(t)).Challenge(callCtx(t), &coffrev1.ChallengeRequest{})
	wantCode(t, err, codes.FailedPrecondition, "attested release is not configured")
	ctx := metadata.AppendToOutgoingContext(callCtx(t), SessionMetadataKey, "x")
	_, err = coffrev1.NewKeyServiceClient(f.dial(t)).Decrypt(ctx, &coffrev1.DecryptRequest{})
	wantCode(t, err, codes.Unauthenticated, "unknown session")
}

func TestHealthWithoutClientCert(t *testing.T) {
	f := newFixture(t)
	h := healthpb.NewHealthClient(f.dial(t))
	for _, svc := range []string{"", "coffre.v1.AdminService", "coffre.v1.AttestService", "coffre.v1.KeyService"} {
		// No deadline either: probes are exempt from the deadline rule.
		resp, err := h.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			t.Fatalf("Check(%q): %v", svc, err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("Check(%q) = %v, want SERVING", svc, resp.GetStatus())
		}
	}
	f.srv.Drain()
	resp, err := h.Check(callCtx(t), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("after Drain: %v, %v; want NOT_SERVING", resp, err)
	}
}

func TestBadKeyringName(t *testing.T) {
	f := newFixture(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	ctx := callCtx(t)
	for _, tc := range []struct{ id, want string }{
		{"Acme/disks", `tenant "Acme"`},
		{"acme/Disks!", `keyring name "Disks!"`},
		{"acme", "TENANT/NAME"},
		{"", "TENANT/NAME"},
		{"acme/" + strings.Repeat("x", 64), "longer than 63"},
	} {
		_, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: tc.id})
		wantCode(t, err, codes.InvalidArgument, tc.want)
		_, err = admin.GetKeyring(ctx, &coffrev1.GetKeyringRequest{Id: tc.id})
		wantCode(t, err, codes.InvalidArgument, tc.want)
		_, err = admin.RotateKeyring(ctx, &coffrev1.RotateKeyringRequest{Id: tc.id})
		wantCode(t, err, codes.InvalidArgument, tc.want)
	}
	_, err := admin.ListKeyrings(ctx, &coffrev1.ListKeyringsRequest{Tenant: "ACME"})
	wantCode(t, err, codes.InvalidArgument, `tenant "ACME"`)
}
