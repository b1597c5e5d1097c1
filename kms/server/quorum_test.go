package server

import (
	"context"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/coffre-kms/coffre/kms"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/audit/audittest"
	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/quorum"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// eventLog keeps the quorum engine's audit events in memory.
type eventLog struct {
	mu     sync.Mutex
	events []quorum.Event
}

func (l *eventLog) record(_ context.Context, ev quorum.Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, ev)
	return nil
}

func (l *eventLog) steps() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var s []string
	for _, ev := range l.events {
		s = append(s, ev.Step)
	}
	return strings.Join(s, " ")
}

// TestQuorumOverGRPC runs a 2-of-3 quorum through AdminService: a gated
// operation waits for its second approval, and each bad approval is
// refused with its own status and audited.
func TestQuorumOverGRPC(t *testing.T) {
	f := newFixture(t)
	ctx := callCtx(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))

	revoke := &coffrev1.Operation{Op: &coffrev1.Operation_RevokeNode{RevokeNode: &coffrev1.RevokeNodeRequest{Name: "n1"}}}
	_, err := admin.Propose(ctx, &coffrev1.ProposeRequest{Operation: revoke})
	wantCode(t, err, codes.FailedPrecondition, "no quorum configured")

	keys := map[string]*identity.PrivateKey{}
	req := &coffrev1.SetQuorumRequest{Threshold: 2}
	for _, name := range []string{"alice", "bob", "carol", "mallory"} {
		k, err := identity.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		keys[name] = k
		if name != "mallory" {
			req.Admins = append(req.Admins, &coffrev1.QuorumAdmin{Name: name, PublicKey: k.Public().String()})
		}
	}
	q, err := admin.InitQuorum(ctx, req)
	if err != nil || q.GetThreshold() != 2 || len(q.GetAdmins()) != 3 {
		t.Fatalf("InitQuorum: %v %v", q, err)
	}
	_, err = admin.InitQuorum(ctx, req)
	wantCode(t, err, codes.AlreadyExists, "already configured")

	// A class is needed before a node; the class proposal itself is gated.
	class := &coffrev1.Operation{Op: &coffrev1.Operation_SetNodeClass{SetNodeClass: &coffrev1.SetNodeClassRequest{
		Class: &coffrev1.NodeClass{Name: "storage", Pcrs: []*coffrev1.PCRReference{{Index: 7, Sha256: make([]byte, 32)}}}}}}
	p, err := admin.Propose(ctx, &coffrev1.ProposeRequest{Operation: class})
	if err != nil {
		t.Fatal(err)
	}
	if p.GetKind() != KindSetNodeClass || p.GetState() != quorum.StatePending || p.GetThreshold() != 2 {
		t.Fatalf("proposal %v", p)
	}
	sign := func(name string, p *coffrev1.Proposal, decision string) *coffrev1.DecideProposalRequest {
		sig, err := keys[name].Sign(ctx, quorum.ApprovalMessage(quorum.Hash(p.GetContent()), decision))
		if err != nil {
			t.Fatal(err)
		}
		return &coffrev1.DecideProposalRequest{Id: p.GetId(), Decision: decision, PublicKey: keys[name].Public().String(), Signature: sig}
	}

	if got, err := admin.DecideProposal(ctx, sign("alice", p, quorum.Approve)); err != nil || got.GetState() != quorum.StatePending {
		t.Fatalf("alice: %v %v", got, err)
	}
	// Refusals, each with its status.
	_, err = admin.DecideProposal(ctx, sign("alice", p, quorum.Approve))
	wantCode(t, err, codes.FailedPrecondition, "already decided")
	_, err = admin.DecideProposal(ctx, sign("mallory", p, quorum.Approve))
	wantCode(t, err, codes.PermissionDenied, "not a current admin")
	other, err := admin.Propose(ctx, &coffrev1.ProposeRequest{Operation: revoke})
	if err != nil {
		t.Fatal(err)
	}
	moved := sign("bob", other, quorum.Approve)
	moved.Id = p.GetId()
	_, err = admin.DecideProposal(ctx, moved)
	wantCode(t, err, codes.PermissionDenied, "does not verify")
	_, err = admin.DecideProposal(ctx, &coffrev1.DecideProposalRequest{Id: p.GetId(), Decision: quorum.Approve, PublicKey: "junk"})
	wantCode(t, err, codes.InvalidArgument, "public key")

	got, err := admin.GetProposal(ctx, &coffrev1.GetProposalRequest{Id: p.GetId()[:10]})
	if err != nil || got.GetState() != quorum.StatePending || len(got.GetDecisions()) != 1 {
		t.Fatalf("after refusals: %v %v", got, err)
	}
	if _, err := f.rel.GetNodeClass(ctx, "storage"); err == nil {
		t.Fatal("the class exists with one approval of two")
	}

	// bob's approval makes two: the class is set, and the result is the
	// NodeClass the direct call used to return.
	got, err = admin.DecideProposal(ctx, sign("bob", p, quorum.Approve))
	if err != nil || got.GetState() != quorum.StateExecuted {
		t.Fatalf("bob: %v %v", got, err)
	}
	if !strings.Contains(string(got.GetResult()), `"storage"`) {
		t.Errorf("result %s", got.GetResult())
	}
	if _, err := f.rel.GetNodeClass(ctx, "storage"); err != nil {
		t.Fatalf("class after quorum: %v", err)
	}
	// The revoke proposal of a node that does not exist: approved, then
	// failed with the direct call's status text.
	_, _ = admin.DecideProposal(ctx, sign("alice", other, quorum.Approve))
	got, err = admin.DecideProposal(ctx, sign("carol", other, quorum.Approve))
	if err != nil || got.GetState() != quorum.StateFailed || !strings.HasPrefix(got.GetError(), "NotFound: ") {
		t.Fatalf("failed op: %v %v", got, err)
	}

	list, err := admin.ListProposals(ctx, &coffrev1.ListProposalsRequest{State: quorum.StateExecuted})
	if err != nil || len(list.GetProposals()) != 1 || list.GetProposals()[0].GetContent() != nil || list.GetProposals()[0].GetResult() != nil {
		t.Fatalf("list executed (one, without content or result): %v %v", list, err)
	}
	if list, err = admin.ListProposals(ctx, &coffrev1.ListProposalsRequest{Limit: 1}); err != nil || len(list.GetProposals()) != 1 {
		t.Fatalf("list with limit 1: %v %v", list, err)
	}
	_, err = admin.ListProposals(ctx, &coffrev1.ListProposalsRequest{Limit: 1001})
	wantCode(t, err, codes.InvalidArgument, "limit 1001")
	want := "init propose approve refuse refuse propose refuse approve execute executed approve approve execute failed"
	if got := f.events.steps(); got != want {
		t.Errorf("audited steps:\n got %s\nwant %s", got, want)
	}
}

// TestQuorumAuditEntries checks what QuorumAudit writes to a real log:
// the proposal hash as evidence and the approvers by name and key.
func TestQuorumAuditEntries(t *testing.T) {
	log := audittest.NewLog(t)
	p := &quorum.Proposal{ID: strings.Repeat("ab", 32), Parsed: quorum.Content{Kind: KindEnrollNode}, Threshold: 2}
	rec := QuorumAudit(log)
	ctx := context.Background()
	if err := rec(ctx, quorum.Event{Step: "execute", Proposal: p, Approvers: []string{"alice (sha256:1)", "bob (sha256:2)"}}); err != nil {
		t.Fatal(err)
	}
	if err := rec(ctx, quorum.Event{Step: "refuse", Admin: "sha256:9", Reason: "approve on x: not a current admin"}); err != nil {
		t.Fatal(err)
	}
	recs, err := log.Read(ctx, 0, 10)
	if err != nil || len(recs) != 2 {
		t.Fatalf("read: %d records, %v", len(recs), err)
	}
	e0, e1 := recs[0].Entry, recs[1].Entry
	if e0.Operation != "quorum.execute" || e0.Decision != audit.Allow || e0.EvidenceHashes[0] != p.ID ||
		!strings.Contains(e0.Reason, "approved by alice (sha256:1), bob (sha256:2) (2 of 2)") {
		t.Errorf("execute entry %+v", e0)
	}
	if e1.Operation != "quorum.refuse" || e1.Decision != audit.Deny || e1.Actor.ID != "sha256:9" {
		t.Errorf("refuse entry %+v", e1)
	}
}

// TestRequestIDInAuditAndHeader: every call gets an id, returned in the
// response header coffre-request-id and written into the audit entries it
// makes, so a SIEM can tie an entry to the call and the server's log line.
func TestRequestIDInAuditAndHeader(t *testing.T) {
	log := audittest.NewLog(t)
	f := newFixtureWith(t, kms.ReleaseConfig{}, func(o *Options) { o.Audit = log })
	ctx := callCtx(t)
	admin := coffrev1.NewAdminServiceClient(f.dial(t, f.admin))
	var md metadata.MD
	if _, err := admin.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: "acme/disks"}, grpc.Header(&md)); err != nil {
		t.Fatal(err)
	}
	ids := md.Get(RequestIDMetadataKey)
	if len(ids) != 1 || len(ids[0]) != 24 {
		t.Fatalf("response header %s = %q", RequestIDMetadataKey, ids)
	}
	recs, err := log.Read(ctx, 0, 10)
	if err != nil || len(recs) == 0 {
		t.Fatalf("audit: %d records, %v", len(recs), err)
	}
	last := recs[len(recs)-1].Entry
	if last.Operation != "admin.CreateKeyring" || last.RequestID != ids[0] {
		t.Fatalf("audit entry %+v, want admin.CreateKeyring with request id %s", last, ids[0])
	}
	if !strings.Contains(f.log.String(), "request_id="+ids[0]) {
		t.Error("the server's log line lacks the request id")
	}
}
