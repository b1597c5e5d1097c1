package server

import (
	"context"
	"errors"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// auditPrefix: every method of AuditService is behind the auditor gate.
var auditPrefix = "/" + coffrev1.AuditService_ServiceDesc.ServiceName + "/"

// streamMethod is exempt from the deadline rule: a SIEM follows the log
// for as long as it runs.
var streamMethod = auditPrefix + "Stream"

// Stream limits: a batch read from the log per send, and how long a
// follower may wait before the next check of its context.
const streamBatch = 256

// auditAdmin writes, for every AdminService call, an audit entry before the
// handler runs (fail closed: no entry, no operation) and a second entry if
// the operation then fails. Refusals by the admin gate are audited too.
func (s *Server) auditAdminUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if s.audit == nil || !strings.HasPrefix(info.FullMethod, adminPrefix) {
		return handler(ctx, req)
	}
	if err := s.auditAdminCall(ctx, info.FullMethod, req); err != nil {
		return nil, err
	}
	resp, err := handler(ctx, req)
	if err != nil {
		s.auditAdminFailure(ctx, info.FullMethod, req, err)
	}
	return resp, err
}

// adminEntry is the audit entry of an AdminService call to method with
// request req (nil when unknown).
func (s *Server) adminEntry(ctx context.Context, method string, req any, decision, reason string) *audit.Entry {
	admin := ""
	if ci := callInfoFrom(ctx); ci != nil {
		admin = ci.admin
	}
	e := &audit.Entry{
		Time: s.now(), Actor: audit.Actor{Kind: audit.ActorAdmin, ID: admin},
		Operation: "admin." + strings.TrimPrefix(method, adminPrefix), Decision: decision, Reason: reason, RequestID: kms.RequestID(ctx),
	}
	if req != nil {
		target(req, e)
	}
	return e
}

// auditAdminCall records that an admin call is about to run; its error is
// the status that refuses the call when the entry cannot be written.
func (s *Server) auditAdminCall(ctx context.Context, method string, req any) error {
	if _, err := s.audit.Append(ctx, s.adminEntry(ctx, method, req, audit.Allow, "")); err != nil {
		s.log.ErrorContext(ctx, "audit log unwritable: admin call refused", "method", method, "err", err)
		return status.Error(codes.Unavailable, "the audit log cannot be written; the operation was not performed")
	}
	return nil
}

// auditAdminFailure records that an admin call failed with err.
func (s *Server) auditAdminFailure(ctx context.Context, method string, req any, err error) {
	if _, aerr := s.audit.Append(context.WithoutCancel(ctx), s.adminEntry(ctx, method, req, audit.Deny, "failed: "+status.Convert(err).Message())); aerr != nil {
		s.log.ErrorContext(ctx, "audit: could not record a failed admin call", "method", method, "err", aerr)
	}
}

// auditAdminStream is auditAdminUnary for AdminService's streams
// (FetchBackup): the entry is written once the request has been received
// and before the handler sees it, or before anything is sent, whichever
// comes first; no entry, no call.
func (s *Server) auditAdminStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if s.audit == nil || !strings.HasPrefix(info.FullMethod, adminPrefix) {
		return handler(srv, ss)
	}
	as := &auditedStream{ServerStream: ss, s: s, method: info.FullMethod}
	err := handler(srv, as)
	if err != nil && as.recorded {
		s.auditAdminFailure(ss.Context(), info.FullMethod, as.req, err)
	}
	return err
}

// auditedStream writes the call's entry before the first message reaches
// the handler or the caller. A stream's messages are received by one
// goroutine and sent by one (grpc's rule), here the handler's.
type auditedStream struct {
	grpc.ServerStream
	s        *Server
	method   string
	req      any
	done     bool  // the entry was attempted
	recorded bool  // and written
	err      error // the refusal, if it could not be
}

func (a *auditedStream) record(req any) error {
	if a.done {
		return a.err
	}
	a.done, a.req = true, req
	if a.err = a.s.auditAdminCall(a.Context(), a.method, req); a.err == nil {
		a.recorded = true
	}
	return a.err
}

func (a *auditedStream) RecvMsg(m any) error {
	if err := a.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return a.record(m)
}

func (a *auditedStream) SendMsg(m any) error {
	if err := a.record(nil); err != nil {
		return err
	}
	return a.ServerStream.SendMsg(m)
}

// auditGateRefusal records an admin or auditor call the gate refused.
func (s *Server) auditGateRefusal(ctx context.Context, method, subject string, err error) {
	if s.audit == nil {
		return
	}
	id := subject
	if id == "" {
		id = "unauthenticated"
	}
	e := &audit.Entry{
		Time: s.now(), Actor: audit.Actor{Kind: audit.ActorAdmin, ID: id},
		Operation: "gate." + strings.TrimPrefix(method, "/"), Decision: audit.Deny, Reason: status.Convert(err).Message(),
		RequestID: kms.RequestID(ctx),
	}
	if _, aerr := s.audit.Append(context.WithoutCancel(ctx), e); aerr != nil {
		s.log.ErrorContext(ctx, "audit: could not record a refused call", "method", method, "err", aerr)
	}
}

// target fills the entry's keyring from the request when it names one.
func target(req any, e *audit.Entry) {
	var id string
	switch r := req.(type) {
	case interface{ GetProposalId() string }: // stored backups
		e.Reason = strings.TrimSpace(e.Reason + " proposal=" + r.GetProposalId())
		return
	case interface {
		GetPolicy() *coffrev1.KeyringPolicy
	}:
		id = r.GetPolicy().GetKeyring()
	case interface{ GetId() string }:
		id = r.GetId()
	case interface{ GetKeyring() string }: // lifecycle calls
		id = r.GetKeyring()
		if v, ok := req.(interface{ GetVersion() uint32 }); ok {
			e.KeyVersion = v.GetVersion()
		}
	case interface{ GetTenant() string }: // RewrapEnvelope, ListKeyrings
		e.Tenant = r.GetTenant()
		return
	case interface{ GetName() string }:
		e.Reason = strings.TrimSpace(e.Reason + " node=" + r.GetName())
		return
	}
	if t, _, ok := strings.Cut(id, "/"); ok {
		e.Tenant, e.Keyring = t, id
	}
}

// watchAuditHealth reports the audit log's condition in the health service:
// while it cannot be written, the services that need it are NOT_SERVING,
// and SERVING again once it recovers by itself.
func (s *Server) watchAuditHealth(stop <-chan struct{}) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	healthy := true
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		err := s.audit.Healthy()
		if (err == nil) == healthy {
			continue
		}
		healthy = err == nil
		st := healthpb.HealthCheckResponse_SERVING
		if !healthy {
			st = healthpb.HealthCheckResponse_NOT_SERVING
			s.log.Error("audit log unwritable: releases and admin calls are refused until it recovers", "err", err)
		} else {
			s.log.Info("audit log writable again: serving")
		}
		for _, name := range []string{"", coffrev1.AdminService_ServiceDesc.ServiceName, coffrev1.AttestService_ServiceDesc.ServiceName, coffrev1.KeyService_ServiceDesc.ServiceName} {
			s.health.SetServingStatus(name, st)
		}
	}
}

// auditService serves the log to auditors.
type auditService struct {
	coffrev1.UnimplementedAuditServiceServer
	s *Server
}

func (a *auditService) Stream(req *coffrev1.StreamRequest, ss grpc.ServerStreamingServer[coffrev1.AuditRecord]) error {
	ctx := ss.Context()
	next := req.GetFromIndex()
	for {
		recs, err := a.s.audit.Read(ctx, next, streamBatch)
		if err != nil {
			return auditStatus(ctx, err)
		}
		for _, r := range recs {
			if err := ss.Send(&coffrev1.AuditRecord{Index: r.Index, Entry: r.Raw}); err != nil {
				return err
			}
			next = r.Index + 1
		}
		if len(recs) == 0 {
			if err := a.s.audit.Wait(ctx, next); err != nil {
				return auditStatus(ctx, err)
			}
		}
	}
}

func (a *auditService) GetCheckpoint(ctx context.Context, _ *coffrev1.GetCheckpointRequest) (*coffrev1.AuditCheckpoint, error) {
	cp, err := a.s.audit.Checkpoint()
	if err != nil {
		return nil, auditStatus(ctx, err)
	}
	cos, err := a.s.audit.Cosignatures(cp.Size)
	if err != nil {
		return nil, auditStatus(ctx, err)
	}
	return &coffrev1.AuditCheckpoint{Note: cp.Note, Size: cp.Size, Root: cp.Root, Cosignatures: cos}, nil
}

func (a *auditService) GetInclusionProof(ctx context.Context, req *coffrev1.GetInclusionProofRequest) (*coffrev1.Proof, error) {
	p, err := a.s.audit.InclusionProof(req.GetIndex(), req.GetSize())
	if err != nil {
		return nil, auditStatus(ctx, err)
	}
	return &coffrev1.Proof{Hashes: p}, nil
}

func (a *auditService) GetConsistencyProof(ctx context.Context, req *coffrev1.GetConsistencyProofRequest) (*coffrev1.Proof, error) {
	p, err := a.s.audit.ConsistencyProof(req.GetFrom(), req.GetTo())
	if err != nil {
		return nil, auditStatus(ctx, err)
	}
	return &coffrev1.Proof{Hashes: p}, nil
}

func (a *auditService) AddCosignature(ctx context.Context, req *coffrev1.AddCosignatureRequest) (*coffrev1.AddCosignatureResponse, error) {
	if err := a.s.audit.AddCosignature(req.GetNote()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "cosignature refused: %v", err)
	}
	return &coffrev1.AddCosignatureResponse{}, nil
}

// auditStatus maps audit-log errors; proofs for sizes the log does not
// have are the caller's mistake.
func auditStatus(ctx context.Context, err error) error {
	switch {
	case ctx.Err() != nil:
		return status.FromContextError(ctx.Err()).Err()
	case errors.Is(err, audit.ErrUnavailable):
		return status.Error(codes.Unavailable, "the audit log is unavailable")
	default:
		return status.Errorf(codes.InvalidArgument, "%v", err)
	}
}

// auditorGate admits an AuditService call only with a client certificate
// from the auditor CAs.
func (s *Server) auditorGate(ctx context.Context) (string, error) {
	if s.auditorCAs == nil {
		return "", status.Error(codes.PermissionDenied, "no auditor CA is configured; AuditService is closed")
	}
	return s.verifyClient(ctx, s.auditorCAs, "auditor")
}
