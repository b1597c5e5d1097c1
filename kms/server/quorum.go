package server

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/quorum"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// Operation kinds: the names admins read in a proposal's content.
const (
	KindSetKeyringPolicy = "keyring.set_policy"
	KindAddEKRoot        = "ekroot.add"
	KindSetNodeClass     = "class.set"
	KindEnrollNode       = "node.enroll"
	KindRevokeNode       = "node.revoke"
	KindSetQuorum        = quorum.KindSetQuorum
)

// The canonical arguments of each kind: what admins read and sign. Bytes
// are base64 (JSON), PCR values hex.
type (
	policyArgs struct {
		Keyring        string            `json:"keyring"`
		AllowedClasses []string          `json:"allowed_classes"`
		RequiredLabels map[string]string `json:"required_labels"`
		Release        string            `json:"release"`
	}
	ekRootArgs struct {
		Certificate []byte `json:"certificate"`
	}
	pcrArg struct {
		Index  uint32 `json:"index"`
		SHA256 string `json:"sha256"`
	}
	classArgs struct {
		Name            string   `json:"name"`
		PCRs            []pcrArg `json:"pcrs"`
		RequireEventLog bool     `json:"require_event_log"`
	}
	enrollArgs struct {
		Name          string            `json:"name"`
		Class         string            `json:"class"`
		Labels        map[string]string `json:"labels"`
		EKCertificate []byte            `json:"ek_certificate,omitempty"`
		EKPublic      []byte            `json:"ek_public,omitempty"`
	}
	revokeArgs struct {
		Name string `json:"name"`
	}
)

// QuorumAudit returns the audit hook of a quorum engine that appends each
// step to log: proposals, decisions, refusals and executions with the
// names and key fingerprints of the approvers.
func QuorumAudit(log *audit.Log) func(ctx context.Context, ev quorum.Event) error {
	return func(ctx context.Context, ev quorum.Event) error {
		e := &audit.Entry{
			Time:      time.Now(),
			Actor:     audit.Actor{Kind: audit.ActorAdmin, ID: ev.Admin},
			Operation: "quorum." + ev.Step,
			Decision:  audit.Allow,
			Reason:    ev.Reason,
			RequestID: kms.RequestID(ctx),
		}
		if e.Actor.ID == "" {
			e.Actor = audit.Actor{Kind: audit.ActorSystem, ID: "quorum"}
		}
		switch ev.Step {
		case "refuse", "failed", "reject", "requeue": // requeue: approved, then not run (the quorum changed)
			e.Decision = audit.Deny
		}
		if p := ev.Proposal; p != nil {
			e.EvidenceHashes = []string{p.ID}
			// Operations on a keyring name it in the entry's own fields, so
			// that a keyring's history reads from the log directly.
			var target struct {
				Keyring string `json:"keyring"`
				Version uint32 `json:"version"`
			}
			if json.Unmarshal(p.Parsed.Args, &target) == nil {
				if id, err := kms.ParseKeyringID(target.Keyring); err == nil {
					e.Tenant, e.Keyring, e.KeyVersion = id.Tenant, id.String(), target.Version
				}
			}
			var why []string
			why = append(why, "proposal "+p.ID[:16]+" ("+p.Parsed.Kind+")")
			if len(ev.Approvers) > 0 {
				why = append(why, fmt.Sprintf("approved by %s (%d of %d)", strings.Join(ev.Approvers, ", "), len(ev.Approvers), p.Threshold))
			}
			if ev.Reason != "" {
				why = append(why, ev.Reason)
			}
			e.Reason = strings.Join(why, "; ")
		}
		if _, err := log.Append(ctx, e); err != nil {
			return fmt.Errorf("%w: audit log: %w", kms.ErrUnavailable, err)
		}
		return nil
	}
}

// registerOperations teaches the quorum engine the server's gated
// operations. Results are the protojson form of the RPC's usual answer.
func (s *Server) registerOperations(q *quorum.Engine) {
	relOnly := func(exec func(ctx context.Context, rel *kms.ReleaseService, raw json.RawMessage) (proto.Message, error)) quorum.Executor {
		return s.statusExecutor(func(ctx context.Context, raw json.RawMessage) (proto.Message, error) {
			rel, err := s.release()
			if err != nil {
				return nil, err
			}
			return exec(ctx, rel, raw)
		})
	}
	q.Register(KindSetKeyringPolicy, validateAs[policyArgs](func(a policyArgs) error { _, err := a.policy(); return err }),
		relOnly(func(ctx context.Context, rel *kms.ReleaseService, raw json.RawMessage) (proto.Message, error) {
			var a policyArgs
			if err := decodeArgs(raw, &a); err != nil {
				return nil, err
			}
			p, err := a.policy()
			if err != nil {
				return nil, err
			}
			p, err = rel.SetKeyringPolicy(ctx, p)
			if err != nil {
				return nil, err
			}
			return KeyringPolicyToProto(p), nil
		}))
	q.Register(KindAddEKRoot, validateAs[ekRootArgs](nil),
		relOnly(func(ctx context.Context, rel *kms.ReleaseService, raw json.RawMessage) (proto.Message, error) {
			var a ekRootArgs
			if err := decodeArgs(raw, &a); err != nil {
				return nil, err
			}
			r, err := rel.AddEKRoot(ctx, a.Certificate)
			if err != nil {
				return nil, err
			}
			return EKRootToProto(r), nil
		}))
	q.Register(KindSetNodeClass, validateAs[classArgs](func(a classArgs) error { _, err := a.class(); return err }),
		relOnly(func(ctx context.Context, rel *kms.ReleaseService, raw json.RawMessage) (proto.Message, error) {
			var a classArgs
			if err := decodeArgs(raw, &a); err != nil {
				return nil, err
			}
			c, err := a.class()
			if err != nil {
				return nil, err
			}
			c, err = rel.SetNodeClass(ctx, c)
			if err != nil {
				return nil, err
			}
			return NodeClassToProto(c), nil
		}))
	q.Register(KindEnrollNode, validateAs[enrollArgs](func(a enrollArgs) error {
		if err := kms.ValidateNodeName(a.Name); err != nil {
			return err
		}
		if (len(a.EKCertificate) == 0) == (len(a.EKPublic) == 0) {
			return fmt.Errorf("%w: exactly one of the EK certificate and the EK public key", kms.ErrInvalidArgument)
		}
		return nil
	}), relOnly(func(ctx context.Context, rel *kms.ReleaseService, raw json.RawMessage) (proto.Message, error) {
		var a enrollArgs
		if err := decodeArgs(raw, &a); err != nil {
			return nil, err
		}
		n, err := rel.EnrollNode(ctx, &kms.Enrollment{Name: a.Name, Class: a.Class, Labels: a.Labels, EKCertificate: a.EKCertificate, EKPublic: a.EKPublic})
		if err != nil {
			return nil, err
		}
		return NodeToProto(n), nil
	}))
	q.Register(KindRevokeNode, validateAs[revokeArgs](func(a revokeArgs) error { return kms.ValidateNodeName(a.Name) }),
		relOnly(func(ctx context.Context, rel *kms.ReleaseService, raw json.RawMessage) (proto.Message, error) {
			var a revokeArgs
			if err := decodeArgs(raw, &a); err != nil {
				return nil, err
			}
			n, err := rel.RevokeNode(ctx, a.Name)
			if err != nil {
				return nil, err
			}
			return NodeToProto(n), nil
		}))
}

// statusExecutor adapts exec to the quorum engine: its result is the
// protojson form of the message, and its failure the status the direct call
// would have given ("NotFound: node x"), never an internal detail — that
// is what the officers read in the proposal.
func (s *Server) statusExecutor(exec func(ctx context.Context, raw json.RawMessage) (proto.Message, error)) quorum.Executor {
	return func(ctx context.Context, raw json.RawMessage) (json.RawMessage, error) {
		m, err := exec(ctx, raw)
		if err != nil {
			st := toStatus(err)
			if st.Code() == codes.Internal || st.Code() == codes.Unavailable {
				s.log.ErrorContext(ctx, "approved operation failed", "err", err)
			}
			return nil, fmt.Errorf("%s: %s", st.Code(), st.Message())
		}
		return protojson.Marshal(m)
	}
}

func decodeArgs(raw json.RawMessage, v any) error {
	if err := quorum.DecodeArgs(raw, v); err != nil {
		return fmt.Errorf("%w: %w", kms.ErrInvalidArgument, err)
	}
	return nil
}

// validateAs decodes the arguments strictly as T and runs check on them.
func validateAs[T any](check func(T) error) quorum.Validator {
	return func(_ context.Context, raw json.RawMessage) error {
		var a T
		if err := decodeArgs(raw, &a); err != nil {
			return err
		}
		if check == nil {
			return nil
		}
		return check(a)
	}
}

func (a policyArgs) policy() (*kms.KeyringPolicy, error) {
	id, err := kms.ParseKeyringID(a.Keyring)
	if err != nil {
		return nil, err
	}
	mode, err := kms.ParseReleaseMode(a.Release)
	if err != nil {
		return nil, err
	}
	return &kms.KeyringPolicy{Keyring: id, AllowedClasses: a.AllowedClasses, RequiredLabels: a.RequiredLabels, Release: mode}, nil
}

func (a classArgs) class() (*kms.NodeClass, error) {
	c := &kms.NodeClass{Name: a.Name, PCRs: map[uint32][]byte{}, RequireEventLog: a.RequireEventLog}
	for _, p := range a.PCRs {
		v, err := hex.DecodeString(p.SHA256)
		if err != nil {
			return nil, fmt.Errorf("%w: PCR %d: %v", kms.ErrInvalidArgument, p.Index, err)
		}
		if _, dup := c.PCRs[p.Index]; dup {
			return nil, fmt.Errorf("%w: PCR %d given twice", kms.ErrInvalidArgument, p.Index)
		}
		c.PCRs[p.Index] = v
	}
	return c, nil
}

// OperationContent turns a wire Operation into the kind and arguments
// that Propose puts in the proposal's content (canonicalised by
// quorum.CanonicalArgs). coffrectl computes them the same way from the
// operation it asked for, to check the server's answer before signing it.
func OperationContent(op *coffrev1.Operation) (string, any, error) {
	switch o := op.GetOp().(type) {
	case *coffrev1.Operation_SetKeyringPolicy:
		p, err := KeyringPolicyFromProto(o.SetKeyringPolicy.GetPolicy())
		if err != nil {
			return "", nil, err
		}
		return KindSetKeyringPolicy, policyArgs{Keyring: p.Keyring.String(), AllowedClasses: nonNil(p.AllowedClasses), RequiredLabels: nonNilMap(p.RequiredLabels), Release: p.Release.String()}, nil
	case *coffrev1.Operation_AddEkRoot:
		if len(o.AddEkRoot.GetCertificate()) == 0 {
			return "", nil, fmt.Errorf("%w: no certificate", kms.ErrInvalidArgument)
		}
		return KindAddEKRoot, ekRootArgs{Certificate: o.AddEkRoot.GetCertificate()}, nil
	case *coffrev1.Operation_SetNodeClass:
		c, err := NodeClassFromProto(o.SetNodeClass.GetClass())
		if err != nil {
			return "", nil, err
		}
		a := classArgs{Name: c.Name, RequireEventLog: c.RequireEventLog, PCRs: []pcrArg{}}
		for _, p := range o.SetNodeClass.GetClass().GetPcrs() {
			a.PCRs = append(a.PCRs, pcrArg{Index: p.GetIndex(), SHA256: hex.EncodeToString(p.GetSha256())})
		}
		return KindSetNodeClass, a, nil
	case *coffrev1.Operation_EnrollNode:
		r := o.EnrollNode
		return KindEnrollNode, enrollArgs{Name: r.GetName(), Class: r.GetClass(), Labels: nonNilMap(r.GetLabels()), EKCertificate: r.GetEkCertificate(), EKPublic: r.GetEkPublic()}, nil
	case *coffrev1.Operation_RevokeNode:
		return KindRevokeNode, revokeArgs{Name: o.RevokeNode.GetName()}, nil
	case *coffrev1.Operation_SetQuorum:
		return KindSetQuorum, setQuorumArgs(o.SetQuorum), nil
	case *coffrev1.Operation_ScheduleKeyDestruction:
		r := o.ScheduleKeyDestruction
		return KindScheduleDestruction, destroyArgs{Keyring: r.GetKeyring(), Version: r.GetVersion(), Days: int(min(r.GetDays(), 1000))}, nil
	case *coffrev1.Operation_RotateRoot:
		return KindRotateRoot, rotateRootArgs{}, nil
	case *coffrev1.Operation_DestroyRoot:
		return KindDestroyRoot, destroyRootArgs{RootID: o.DestroyRoot.GetRootId()}, nil
	case *coffrev1.Operation_ExportBackup:
		return KindExportBackup, exportArgs{To: o.ExportBackup.GetTo()}, nil
	default:
		return "", nil, fmt.Errorf("%w: no operation, or one this server does not know", kms.ErrInvalidArgument)
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func nonNilMap(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

func setQuorumArgs(r *coffrev1.SetQuorumRequest) quorum.SetQuorumArgs {
	a := quorum.SetQuorumArgs{Threshold: int(r.GetThreshold()), Admins: []quorum.AdminSpec{}}
	for _, ad := range r.GetAdmins() {
		a.Admins = append(a.Admins, quorum.AdminSpec{Name: ad.GetName(), PublicKey: ad.GetPublicKey()})
	}
	return a
}

// ---- AdminService: quorum ----

// How many proposals ListProposals returns by default and at most.
const (
	defaultListProposals = 100
	maxListProposals     = 1000
)

// adminSubject is the certificate subject of the admin making the call.
func adminSubject(ctx context.Context) string {
	if ci := callInfoFrom(ctx); ci != nil && ci.admin != "" {
		return ci.admin
	}
	return "unknown"
}

func (s *Server) quorum() (*quorum.Engine, error) {
	if s.q == nil {
		return nil, fmt.Errorf("%w: quorum-gated operations are not configured on this server", kms.ErrFailedPrecondition)
	}
	return s.q, nil
}

func (a *adminService) Propose(ctx context.Context, req *coffrev1.ProposeRequest) (*coffrev1.Proposal, error) {
	q, err := a.s.quorum()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	kind, args, err := OperationContent(req.GetOperation())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	p, err := q.Propose(ctx, kind, args, adminSubject(ctx), time.Duration(req.GetTtlSeconds())*time.Second)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return ProposalToProto(p), nil
}

func (a *adminService) GetProposal(ctx context.Context, req *coffrev1.GetProposalRequest) (*coffrev1.Proposal, error) {
	q, err := a.s.quorum()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	p, err := q.Get(ctx, req.GetId())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return ProposalToProto(p), nil
}

func (a *adminService) ListProposals(ctx context.Context, req *coffrev1.ListProposalsRequest) (*coffrev1.ListProposalsResponse, error) {
	q, err := a.s.quorum()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	ps, err := q.List(ctx, req.GetState())
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	limit := int(req.GetLimit())
	switch {
	case limit == 0:
		limit = defaultListProposals
	case limit > maxListProposals:
		return nil, a.s.fail(ctx, fmt.Errorf("%w: limit %d (at most %d)", kms.ErrInvalidArgument, limit, maxListProposals))
	}
	resp := &coffrev1.ListProposalsResponse{}
	for _, p := range ps[:min(limit, len(ps))] {
		// A list stays small: content (up to 256 KiB) and result are for
		// GetProposal.
		pp := ProposalToProto(p)
		pp.Content, pp.Result = nil, nil
		resp.Proposals = append(resp.Proposals, pp)
	}
	return resp, nil
}

func (a *adminService) DecideProposal(ctx context.Context, req *coffrev1.DecideProposalRequest) (*coffrev1.Proposal, error) {
	q, err := a.s.quorum()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	pub, err := identity.ParsePublicKey(req.GetPublicKey())
	if err != nil {
		return nil, a.s.fail(ctx, fmt.Errorf("%w: public key: %v", kms.ErrInvalidArgument, err))
	}
	p, err := q.Decide(ctx, req.GetId(), req.GetDecision(), pub, req.GetSignature())
	if p != nil {
		// The decision was recorded; a failed operation shows in the
		// proposal's state and error.
		if err != nil {
			a.s.log.WarnContext(ctx, "approved operation failed", "proposal", p.ID, "err", err)
		}
		return ProposalToProto(p), nil
	}
	return nil, a.s.fail(ctx, err)
}

func (a *adminService) InitQuorum(ctx context.Context, req *coffrev1.SetQuorumRequest) (*coffrev1.Quorum, error) {
	q, err := a.s.quorum()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	r, err := q.Init(ctx, setQuorumArgs(req), adminSubject(ctx))
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return QuorumToProto(r), nil
}

func (a *adminService) GetQuorum(ctx context.Context, _ *coffrev1.GetQuorumRequest) (*coffrev1.Quorum, error) {
	q, err := a.s.quorum()
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	r, err := q.Rule(ctx)
	if err != nil {
		return nil, a.s.fail(ctx, err)
	}
	return QuorumToProto(r), nil
}

// ProposalToProto converts a proposal for the wire.
func ProposalToProto(p *quorum.Proposal) *coffrev1.Proposal {
	out := &coffrev1.Proposal{
		Id: p.ID, Content: p.Content, Kind: p.Parsed.Kind, State: p.State,
		Threshold:  uint32(max(p.Threshold, 0)), // #nosec G115 -- at most quorum.MaxAdmins
		CreateTime: timeToProto(p.Parsed.CreateTime), ExpireTime: timeToProto(p.Parsed.ExpireTime),
		Proposer: p.Parsed.Proposer, Result: p.Result, Error: p.Error,
	}
	for _, d := range p.Decisions {
		out.Decisions = append(out.Decisions, &coffrev1.ProposalDecision{AdminId: d.AdminID, AdminName: d.Name, Decision: d.Decision, Time: timeToProto(d.Time)})
	}
	return out
}

// QuorumToProto converts the rule for the wire.
func QuorumToProto(r *quorum.Rule) *coffrev1.Quorum {
	out := &coffrev1.Quorum{Version: r.Version, Threshold: uint32(max(r.Threshold, 0))} // #nosec G115 -- at most quorum.MaxAdmins
	for _, a := range r.Admins {
		out.Admins = append(out.Admins, &coffrev1.QuorumAdmin{Name: a.Name, PublicKey: a.PublicKey.String(), Id: a.ID})
	}
	for _, a := range r.Revoked {
		out.Revoked = append(out.Revoked, &coffrev1.QuorumAdmin{Name: a.Name, PublicKey: a.PublicKey.String(), Id: a.ID})
	}
	return out
}
