package server

import (
	"context"
	"fmt"

	"google.golang.org/grpc/metadata"

	"github.com/coffre-kms/coffre/kms"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// SessionMetadataKey is the gRPC metadata that carries the session token on
// KeyService calls.
const SessionMetadataKey = "coffre-session"

// errNoRelease refuses the calls that need a kms.ReleaseService when the
// server was built without one.
var errNoRelease = fmt.Errorf("%w: attested release is not configured on this server", kms.ErrFailedPrecondition)

// release returns the release service, or the error to fail with.
func (s *Server) release() (*kms.ReleaseService, error) {
	if s.rel == nil {
		return nil, errNoRelease
	}
	return s.rel, nil
}

// ---- AdminService: release state ----

func (a *adminService) ListEKRoots(ctx context.Context, _ *coffrev1.ListEKRootsRequest) (*coffrev1.ListEKRootsResponse, error) {
	rel, err := a.s.release()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	roots, err := rel.ListEKRoots(ctx)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	resp := &coffrev1.ListEKRootsResponse{Roots: make([]*coffrev1.EKRoot, 0, len(roots))}
	for _, r := range roots {
		resp.Roots = append(resp.Roots, EKRootToProto(r))
	}
	return resp, nil
}

func (a *adminService) ListNodes(ctx context.Context, _ *coffrev1.ListNodesRequest) (*coffrev1.ListNodesResponse, error) {
	rel, err := a.s.release()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	nodes, err := rel.ListNodes(ctx)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	resp := &coffrev1.ListNodesResponse{Nodes: make([]*coffrev1.Node, 0, len(nodes))}
	for _, n := range nodes {
		resp.Nodes = append(resp.Nodes, NodeToProto(n))
	}
	return resp, nil
}

// ---- AttestService ----

// attestService implements AttestService. It needs no client certificate:
// the TPM is the node's identity.
type attestService struct {
	coffrev1.UnimplementedAttestServiceServer
	s *Server
}

func (a *attestService) Challenge(ctx context.Context, req *coffrev1.ChallengeRequest) (*coffrev1.ChallengeResponse, error) {
	rel, err := a.s.release()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	ch, err := rel.Challenge(ctx, req.GetEkCertificate(), req.GetEkPublic(), req.GetAkPublic())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return &coffrev1.ChallengeResponse{
		ChallengeId:     ch.ID,
		Nonce:           ch.Nonce,
		CredentialBlob:  ch.CredentialBlob,
		EncryptedSecret: ch.EncryptedSecret,
		ExpireTime:      timeToProto(ch.Expires),
		PcrSelection:    ch.PCRSelection,
	}, nil
}

func (a *attestService) Complete(ctx context.Context, req *coffrev1.CompleteRequest) (*coffrev1.CompleteResponse, error) {
	rel, err := a.s.release()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	ev, err := EvidenceFromProto(req)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	sess, err := rel.Complete(ctx, req.GetChallengeId(), ev)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	if ci := callInfoFrom(ctx); ci != nil {
		ci.node = sess.Node
	}
	return &coffrev1.CompleteResponse{
		SessionToken: sess.Token,
		ExpireTime:   timeToProto(sess.Expires),
		Node:         sess.Node,
		NodeClass:    sess.Class,
		Labels:       sess.Labels,
		SessionEnc:   sess.Enc,
	}, nil
}

// ---- KeyService ----

// keyService implements KeyService: every call needs a session.
type keyService struct {
	coffrev1.UnimplementedKeyServiceServer
	s *Server
}

// session returns the release service and the caller's session token.
func (k *keyService) session(ctx context.Context) (*kms.ReleaseService, string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get(SessionMetadataKey)
	switch {
	case len(vals) == 0 || vals[0] == "":
		return nil, "", fmt.Errorf("%w: KeyService needs a session: attest with AttestService and send the token as metadata %q", kms.ErrUnauthenticated, SessionMetadataKey)
	case len(vals) > 1:
		return nil, "", fmt.Errorf("%w: more than one %q metadata value", kms.ErrUnauthenticated, SessionMetadataKey)
	}
	if k.s.rel == nil {
		// No release service: no session can exist.
		return nil, "", fmt.Errorf("%w: unknown session (attested release is not configured on this server)", kms.ErrUnauthenticated)
	}
	return k.s.rel, vals[0], nil
}

func (k *keyService) GenerateDataKey(ctx context.Context, req *coffrev1.GenerateDataKeyRequest) (*coffrev1.GenerateDataKeyResponse, error) {
	rel, token, err := k.session(ctx)
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	id, err := kms.ParseKeyringID(req.GetKeyring())
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	dk, err := rel.GenerateDataKey(ctx, token, id, req.GetContext())
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	return &coffrev1.GenerateDataKeyResponse{Envelope: dk.Envelope, Key: SealedKeyToProto(dk.Key), KeyVersion: dk.KeyVersion}, nil
}

func (k *keyService) Decrypt(ctx context.Context, req *coffrev1.DecryptRequest) (*coffrev1.DecryptResponse, error) {
	rel, token, err := k.session(ctx)
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	key, err := rel.Decrypt(ctx, token, req.GetEnvelope(), req.GetContext())
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	return &coffrev1.DecryptResponse{Key: SealedKeyToProto(key)}, nil
}

func (k *keyService) ReEncrypt(ctx context.Context, req *coffrev1.ReEncryptRequest) (*coffrev1.ReEncryptResponse, error) {
	rel, token, err := k.session(ctx)
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	var dest kms.KeyringID
	if d := req.GetDestinationKeyring(); d != "" {
		if dest, err = kms.ParseKeyringID(d); err != nil {
			return nil, k.s.fail(ctx, err)
		}
	}
	// proto3 cannot tell an absent map from an empty one: an empty
	// destination context means "the same context", as documented.
	var destEC map[string]string
	if len(req.GetDestinationContext()) > 0 {
		destEC = req.GetDestinationContext()
	}
	out, err := rel.ReEncrypt(ctx, token, req.GetEnvelope(), req.GetContext(), dest, destEC)
	if err != nil {
		return nil, k.s.fail(ctx, err)
	}
	return &coffrev1.ReEncryptResponse{Envelope: out.Envelope, KeyVersion: out.KeyVersion}, nil
}
