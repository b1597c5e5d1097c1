// Package admintest gives tests an AdminService client whose quorum-gated
// calls (EnrollNode, RevokeNode, SetNodeClass, SetKeyringPolicy, AddEKRoot)
// look like the direct calls they replace: each is proposed and approved
// with one test admin key, on a server whose quorum is that key alone.
// Only tests use it; production approvals come from M officers.
package admintest

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/quorum"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// Gated wraps an AdminService client with the key of the quorum's only
// admin.
type Gated struct {
	coffrev1.AdminServiceClient
	Key *identity.PrivateKey
}

// New makes a test admin key and installs it as a 1-of-1 quorum on the
// server c talks to (which must have none yet).
func New(ctx context.Context, c coffrev1.AdminServiceClient) (*Gated, error) {
	k, err := identity.GenerateKey()
	if err != nil {
		return nil, err
	}
	if _, err := c.InitQuorum(ctx, &coffrev1.SetQuorumRequest{Threshold: 1, Admins: []*coffrev1.QuorumAdmin{{Name: "test-admin", PublicKey: k.Public().String()}}}); err != nil {
		return nil, err
	}
	return &Gated{AdminServiceClient: c, Key: k}, nil
}

// With returns the same admin on another client connection.
func (g *Gated) With(c coffrev1.AdminServiceClient) *Gated {
	return &Gated{AdminServiceClient: c, Key: g.Key}
}

// Run proposes op, approves it and decodes the result into out. A failed
// operation comes back as the status error the direct call would have
// returned.
func (g *Gated) Run(ctx context.Context, op *coffrev1.Operation, out proto.Message) error {
	p, err := g.Propose(ctx, &coffrev1.ProposeRequest{Operation: op})
	if err != nil {
		return err
	}
	sig, err := g.Key.Sign(ctx, quorum.ApprovalMessage(quorum.Hash(p.GetContent()), quorum.Approve))
	if err != nil {
		return err
	}
	p, err = g.DecideProposal(ctx, &coffrev1.DecideProposalRequest{Id: p.GetId(), Decision: quorum.Approve, PublicKey: g.Key.Public().String(), Signature: sig})
	if err != nil {
		return err
	}
	switch p.GetState() {
	case quorum.StateExecuted:
		return protojson.Unmarshal(p.GetResult(), out)
	case quorum.StateFailed:
		return statusFromText(p.GetError())
	default:
		return fmt.Errorf("admintest: proposal %s is %s after approval", p.GetId(), p.GetState())
	}
}

// statusFromText turns "AlreadyExists: message" back into a status error.
func statusFromText(s string) error {
	name, msg, _ := strings.Cut(s, ": ")
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if c.String() == name {
			return status.Error(c, msg)
		}
	}
	return status.Error(codes.Unknown, s)
}

func (g *Gated) EnrollNode(ctx context.Context, req *coffrev1.EnrollNodeRequest, _ ...grpc.CallOption) (*coffrev1.Node, error) {
	var out coffrev1.Node
	return &out, g.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_EnrollNode{EnrollNode: req}}, &out)
}

func (g *Gated) RevokeNode(ctx context.Context, req *coffrev1.RevokeNodeRequest, _ ...grpc.CallOption) (*coffrev1.Node, error) {
	var out coffrev1.Node
	return &out, g.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_RevokeNode{RevokeNode: req}}, &out)
}

func (g *Gated) SetNodeClass(ctx context.Context, req *coffrev1.SetNodeClassRequest, _ ...grpc.CallOption) (*coffrev1.NodeClass, error) {
	var out coffrev1.NodeClass
	return &out, g.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_SetNodeClass{SetNodeClass: req}}, &out)
}

func (g *Gated) SetKeyringPolicy(ctx context.Context, req *coffrev1.SetKeyringPolicyRequest, _ ...grpc.CallOption) (*coffrev1.KeyringPolicy, error) {
	var out coffrev1.KeyringPolicy
	return &out, g.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_SetKeyringPolicy{SetKeyringPolicy: req}}, &out)
}

func (g *Gated) AddEKRoot(ctx context.Context, req *coffrev1.AddEKRootRequest, _ ...grpc.CallOption) (*coffrev1.EKRoot, error) {
	var out coffrev1.EKRoot
	return &out, g.Run(ctx, &coffrev1.Operation{Op: &coffrev1.Operation_AddEkRoot{AddEkRoot: req}}, &out)
}
