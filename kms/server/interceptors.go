package server

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/kms"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

var (
	// healthPrefix: health probes come from load balancers and
	// orchestrators that often cannot set a deadline, and a Watch is meant
	// to last; they hold no HSM or store resource, so they are exempt from
	// the deadline rule and logged at debug level only.
	healthPrefix = "/" + healthgrpc.Health_ServiceDesc.ServiceName + "/"
	// adminPrefix: every method of AdminService, including methods added
	// later, is behind the admin gate.
	adminPrefix = "/" + coffrev1.AdminService_ServiceDesc.ServiceName + "/"
)

// callInfo collects, for the one log line per call, what inner interceptors
// and handlers learn about the caller. observe puts it in the context; the
// admin gate and the attestation handler fill it.
type callInfo struct {
	admin     string
	node      string // the node that attested (AttestService.Complete)
	requestID string
}

// RequestIDMetadataKey is the response header that carries the id the
// server gave the call: it is in the server's log line and in every audit
// entry the call made.
const RequestIDMetadataKey = "coffre-request-id"

func newRequestID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b) // crypto/rand does not fail on supported platforms
	return hex.EncodeToString(b)
}

type callInfoKey struct{}

func callInfoFrom(ctx context.Context) *callInfo {
	ci, _ := ctx.Value(callInfoKey{}).(*callInfo)
	return ci
}

// callerIP is the IP of a peer address, or the whole address if it has no
// port (a Unix socket).
func callerIP(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	if host, _, err := net.SplitHostPort(a.String()); err == nil {
		return host
	}
	return a.String()
}

func methodFrom(ctx context.Context) string {
	m, _ := grpc.Method(ctx)
	return m
}

// observe runs call, turning a panic into codes.Internal, and logs one line
// about it. It is the outermost interceptor so that a panic anywhere in the
// chain is caught. The stack goes to the log only: it may show internals
// that a caller has no business seeing.
func (s *Server) observe(ctx context.Context, method string, call func(context.Context) error) (err error) {
	ci := &callInfo{requestID: newRequestID()}
	ctx = context.WithValue(ctx, callInfoKey{}, ci)
	ctx = kms.WithRequestID(ctx, ci.requestID)
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		ctx = kms.WithCallerAddress(ctx, callerIP(p.Addr))
	}
	// Best effort: a stream whose header was sent already keeps the id in
	// the log and the audit log only.
	_ = grpc.SetHeader(ctx, metadata.Pairs(RequestIDMetadataKey, ci.requestID))
	start := s.now()
	defer func() {
		if r := recover(); r != nil {
			s.log.ErrorContext(ctx, "panic in call", "method", method, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
			err = status.Error(codes.Internal, msgInternal)
		}
		level := slog.LevelInfo
		if strings.HasPrefix(method, healthPrefix) {
			level = slog.LevelDebug
		}
		attrs := []slog.Attr{
			slog.String("method", method),
			slog.String("request_id", ci.requestID),
			slog.String("code", status.Code(err).String()),
			slog.Duration("duration", s.now().Sub(start)),
		}
		if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
			attrs = append(attrs, slog.String("peer", p.Addr.String()))
		}
		if ci.admin != "" {
			attrs = append(attrs, slog.String("admin", ci.admin))
		}
		if ci.node != "" {
			attrs = append(attrs, slog.String("node", ci.node))
		}
		if err != nil {
			attrs = append(attrs, slog.String("error", status.Convert(err).Message()))
		}
		s.log.LogAttrs(ctx, level, "call", attrs...)
	}()
	return call(ctx)
}

func (s *Server) observeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	err = s.observe(ctx, info.FullMethod, func(ctx context.Context) error {
		var herr error
		resp, herr = handler(ctx, req)
		return herr
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (s *Server) observeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return s.observe(ss.Context(), info.FullMethod, func(ctx context.Context) error {
		return handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
	})
}

// adminGate refuses an AdminService call unless the caller presented a
// client certificate that (1) the TLS layer verified, (2) is issued for
// client authentication, and (3) chains to the admin CAs. It returns the
// admin's subject for the log.
//
// Check (3) repeats what the TLS layer did when it was configured with the
// admin CA pool, on purpose: the TLS pool may one day hold other CAs (for
// attested nodes), and an admin right must never follow from that.
func (s *Server) adminGate(ctx context.Context) (string, error) {
	if s.adminCAs == nil {
		if subject, err := s.verifyClient(ctx, nil, "admin"); err != nil {
			return subject, err
		}
		return "", status.Error(codes.PermissionDenied, "no admin CA is configured; AdminService is closed")
	}
	return s.verifyClient(ctx, s.adminCAs, "admin")
}

// verifyClient checks the TLS client certificate of the call against pool
// for the given role ("admin", "auditor"). A nil pool checks only that a
// verified clientAuth certificate was presented.
func (s *Server) verifyClient(ctx context.Context, pool *x509.CertPool, role string) (string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", status.Errorf(codes.Unauthenticated, "this service requires mutual TLS with an %s client certificate", role)
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "", status.Errorf(codes.Unauthenticated, "this service requires mutual TLS with an %s client certificate; this connection is not TLS", role)
	}
	st := ti.State
	if len(st.PeerCertificates) == 0 {
		return "", status.Errorf(codes.Unauthenticated, "this service requires an %s client certificate; none was presented", role)
	}
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return "", status.Errorf(codes.Unauthenticated, "this service requires an %s client certificate; the one presented was not verified", role)
	}
	leaf := st.VerifiedChains[0][0]
	subject := leaf.Subject.String()
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return subject, status.Errorf(codes.PermissionDenied, "client certificate %q is not an %s certificate: it lacks the clientAuth extended key usage", subject, role)
	}
	if pool == nil {
		return subject, nil
	}
	inter := x509.NewCertPool()
	for _, c := range st.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   s.now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return subject, status.Errorf(codes.PermissionDenied, "client certificate %q is not issued by the %s CA", subject, role)
	}
	return subject, nil
}

func (s *Server) gate(ctx context.Context, method string) error {
	var (
		subject string
		err     error
	)
	switch {
	case strings.HasPrefix(method, adminPrefix):
		subject, err = s.adminGate(ctx)
	case strings.HasPrefix(method, auditPrefix):
		subject, err = s.auditorGate(ctx)
	default:
		return nil
	}
	if ci := callInfoFrom(ctx); ci != nil && subject != "" {
		ci.admin = subject
	}
	if err != nil {
		s.auditGateRefusal(ctx, method, subject, err)
	}
	return err
}

func (s *Server) adminGateUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := s.gate(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) adminGateStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := s.gate(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

// withDeadline enforces the deadline rule: a call without a deadline is
// refused, and a deadline further than maxCallTimeout is brought in to it.
// A missing deadline is the caller's mistake, hence InvalidArgument: a
// client that forgets one would otherwise wait for ever on a stuck HSM.
func (s *Server) withDeadline(ctx context.Context, method string) (context.Context, context.CancelFunc, error) {
	if strings.HasPrefix(method, healthPrefix) || method == streamMethod {
		return ctx, func() {}, nil
	}
	dl, ok := ctx.Deadline()
	if !ok {
		return nil, nil, status.Errorf(codes.InvalidArgument, "a deadline is required: set a timeout on the call (at most %s)", s.maxCallTimeout)
	}
	if limit := s.now().Add(s.maxCallTimeout); dl.After(limit) {
		ctx, cancel := context.WithDeadline(ctx, limit)
		return ctx, cancel, nil
	}
	return ctx, func() {}, nil
}

func (s *Server) deadlineUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, cancel, err := s.withDeadline(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	defer cancel()
	return handler(ctx, req)
}

func (s *Server) deadlineStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, cancel, err := s.withDeadline(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	defer cancel()
	return handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
}

// ctxStream substitutes the context of a server stream, which
// grpc.ServerStream offers no other way to do.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c *ctxStream) Context() context.Context { return c.ctx }
