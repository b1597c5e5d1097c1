// Package server puts the kms service on the wire: the gRPC handlers of
// Coffre's API, the interceptors every call passes through, and the one
// place where errors become gRPC status codes.
//
// # What a call goes through
//
// Every call passes, in order:
//   - a recovery interceptor: a panic becomes codes.Internal with a generic
//     message; the stack is logged on the server and never sent;
//   - the admin gate: every AdminService method needs a client certificate
//     that the TLS layer verified, that chains to [Options.AdminCAs] and
//     that is meant for client authentication;
//   - the deadline rule: every call except the health service must carry a
//     deadline, which is capped at [Options.MaxCallTimeout], so that no
//     caller can hold an HSM session or a store transaction open for ever.
//
// [Server.ServerOptions] returns these as grpc.ServerOptions; the transport
// settings (TLS, message sizes, keepalive) belong to the binary that builds
// the grpc.Server.
//
// # What is served
//
// [Server.Register] registers AdminService, AttestService, KeyService and
// the standard health service:
//   - AdminService: keyrings, and the state of attested release (EK
//     roots, node classes, nodes, keyring policies), quorum proposals, and
//     the backups that executed exports keep in the store (FetchBackup
//     streams one out); admin-gated, and every call, unary or stream, is
//     audited before it runs.
//   - AttestService: TPM attestation (Challenge, Complete) that yields a
//     session. It needs no client certificate — the TPM is the node's
//     identity — but a deadline like every call.
//   - KeyService: data-key release. Every call carries the session token
//     in the metadata "coffre-session"; without one it is Unauthenticated.
//     Keys come back sealed to the attested node, never in the clear.
//
// Attestation and release are [kms.ReleaseService]'s; without one
// ([Options.Release] nil) their calls are refused (FailedPrecondition, and
// Unauthenticated for KeyService: no session can exist).
//
// # Status codes
//
// Errors of the kms package are mapped to status codes in one function
// (see the package's sentinel errors): invalid argument, not found,
// already exists, failed precondition and unavailable map one to one; a
// decryption failure is InvalidArgument "decryption failed" whatever its
// cause; a missing, unknown or expired session is Unauthenticated; a
// refused attestation, a revoked node or a policy refusal is
// PermissionDenied with the reason, which is meant for the caller; a rate
// limit is ResourceExhausted; anything unexpected is Internal with a generic message, and the
// detail stays in the server log. No status ever carries key material.
package server

import (
	"context"
	"crypto/x509"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/seal"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// DefaultMaxCallTimeout caps call deadlines when [Options.MaxCallTimeout] is
// zero. Admin calls touch the HSM at most a few times; thirty seconds leaves
// room for a slow HSM without letting a caller pin resources indefinitely.
const DefaultMaxCallTimeout = 30 * time.Second

// Options configures a [Server].
type Options struct {
	// MaxCallTimeout caps the deadline of every call: a longer deadline is
	// shortened to it. Zero means DefaultMaxCallTimeout.
	MaxCallTimeout time.Duration
	// Logger receives one line per call and the detail of every internal
	// failure. Nil means slog.Default().
	Logger *slog.Logger
	// AdminCAs are the certificate authorities that issue administrator
	// client certificates. The admin gate re-verifies each client chain
	// against this pool rather than trusting whatever pool the TLS layer was
	// given, so that a CA added there later (for nodes, say) can never
	// grant admin rights. Nil refuses every AdminService call: the safe
	// default when nobody said who the admins are.
	AdminCAs *x509.CertPool
	// Audit is the node's audit log: every AdminService call is recorded
	// in it before it runs (and refused if it cannot be), and AuditService
	// serves it. Nil disables both.
	Audit *audit.Log
	// AuditorCAs issue the client certificates of auditors (AuditService).
	// Nil refuses every AuditService call.
	AuditorCAs *x509.CertPool
	// Release serves AttestService, KeyService and the release-state
	// methods of AdminService. The caller keeps ownership and closes it
	// after the grpc.Server has stopped. Nil refuses those calls.
	Release *kms.ReleaseService
	// Quorum runs the quorum-gated operations (node enrollment and
	// revocation, classes, EK roots, keyring policies, the quorum itself):
	// New registers them with it. Nil refuses those operations.
	Quorum *quorum.Engine
	// DestroyRoot destroys the HSM object of a previous root, named by its
	// ID (quorum-gated, and only once no KEK version uses it). Nil refuses.
	DestroyRoot func(ctx context.Context, rootID string) error
	// ExportBackup writes a signed backup of the store sealed to a DR
	// site's transfer key (quorum-gated). Nil refuses.
	ExportBackup func(ctx context.Context, to *seal.PublicKey) ([]byte, error)
	// MaxMessageBytes is the largest message the grpc.Server sends (its
	// MaxSendMsgSize): FetchBackup keeps each message to half of it, at
	// most 256 KiB. Zero assumes 64 KiB.
	MaxMessageBytes int
}

// Server holds the gRPC face of one kms.Service. Create it with [New].
type Server struct {
	svc            *kms.Service
	rel            *kms.ReleaseService
	q              *quorum.Engine
	destroyRoot    func(ctx context.Context, rootID string) error
	exportBackup   func(ctx context.Context, to *seal.PublicKey) ([]byte, error)
	log            *slog.Logger
	maxCallTimeout time.Duration
	adminCAs       *x509.CertPool
	health         *health.Server
	now            func() time.Time
	audit          *audit.Log
	auditorCAs     *x509.CertPool
	stopHealth     chan struct{}
	stopOnce       sync.Once

	// backupMessageData is how many backup bytes a FetchBackup message
	// carries.
	backupMessageData int
}

// New returns a Server over svc. The caller keeps ownership of svc and
// closes it after the grpc.Server has stopped.
func New(svc *kms.Service, opts Options) *Server {
	s := &Server{
		svc:            svc,
		rel:            opts.Release,
		q:              opts.Quorum,
		destroyRoot:    opts.DestroyRoot,
		exportBackup:   opts.ExportBackup,
		log:            opts.Logger,
		maxCallTimeout: opts.MaxCallTimeout,
		adminCAs:       opts.AdminCAs,
		health:         health.NewServer(),
		now:            time.Now,
		audit:          opts.Audit,
		auditorCAs:     opts.AuditorCAs,
		stopHealth:     make(chan struct{}),

		backupMessageData: backupMessageData(opts.MaxMessageBytes),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.maxCallTimeout <= 0 {
		s.maxCallTimeout = DefaultMaxCallTimeout
	}
	if s.q != nil {
		s.registerOperations(s.q)
		s.registerLifecycle(s.q)
	}
	return s
}

// Register registers AdminService, AttestService, KeyService and the
// health service on g, and reports them SERVING. g must have been built
// with [Server.ServerOptions]; the admin gate and the deadline rule live
// there.
func (s *Server) Register(g *grpc.Server) {
	coffrev1.RegisterAdminServiceServer(g, &adminService{s: s})
	coffrev1.RegisterAttestServiceServer(g, &attestService{s: s})
	coffrev1.RegisterKeyServiceServer(g, &keyService{s: s})
	if s.audit != nil {
		coffrev1.RegisterAuditServiceServer(g, &auditService{s: s})
		go s.watchAuditHealth(s.stopHealth)
	}
	healthpb.RegisterHealthServer(g, s.health)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	for _, name := range []string{
		coffrev1.AdminService_ServiceDesc.ServiceName,
		coffrev1.AttestService_ServiceDesc.ServiceName,
		coffrev1.KeyService_ServiceDesc.ServiceName,
	} {
		s.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
}

// Drain reports every service NOT_SERVING, for good: load balancers and
// health probes stop sending new calls while the grpc.Server stops
// gracefully.
func (s *Server) Drain() {
	s.stopOnce.Do(func() { close(s.stopHealth) })
	s.health.Shutdown()
}

// ServerOptions returns the interceptor chain every call must pass (recovery
// and logging, the admin gate, the deadline rule), for grpc.NewServer.
func (s *Server) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(s.observeUnary, s.adminGateUnary, s.deadlineUnary, s.auditAdminUnary),
		grpc.ChainStreamInterceptor(s.observeStream, s.adminGateStream, s.deadlineStream, s.auditAdminStream),
	}
}

// adminService implements AdminService. It is a separate type so that the
// RPC methods do not become part of Server's Go API.
type adminService struct {
	coffrev1.UnimplementedAdminServiceServer
	s *Server
}

func (a *adminService) CreateKeyring(ctx context.Context, req *coffrev1.CreateKeyringRequest) (*coffrev1.Keyring, error) {
	id, err := kms.ParseKeyringID(req.GetId())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	k, err := a.s.svc.CreateKeyring(ctx, id)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return KeyringToProto(k), nil
}

func (a *adminService) GetKeyring(ctx context.Context, req *coffrev1.GetKeyringRequest) (*coffrev1.Keyring, error) {
	id, err := kms.ParseKeyringID(req.GetId())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	k, err := a.s.svc.GetKeyring(ctx, id)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return KeyringToProto(k), nil
}

func (a *adminService) ListKeyrings(ctx context.Context, req *coffrev1.ListKeyringsRequest) (*coffrev1.ListKeyringsResponse, error) {
	ks, err := a.s.svc.ListKeyrings(ctx, req.GetTenant())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	resp := &coffrev1.ListKeyringsResponse{Keyrings: make([]*coffrev1.Keyring, 0, len(ks))}
	for _, k := range ks {
		resp.Keyrings = append(resp.Keyrings, KeyringToProto(k))
	}
	return resp, nil
}

func (a *adminService) RotateKeyring(ctx context.Context, req *coffrev1.RotateKeyringRequest) (*coffrev1.Keyring, error) {
	id, err := kms.ParseKeyringID(req.GetId())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	k, err := a.s.svc.RotateKeyring(ctx, id)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return KeyringToProto(k), nil
}
