package quorum

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/coffre-kms/coffre/kms/store"
)

// hookStore is the real store with a hook run once just before the next
// compare-and-swap of a key: the moment at which another admin's call, on
// this node or another, can land in between.
type hookStore struct {
	store.Store
	mu    sync.Mutex
	hooks map[string]func()
}

func (s *hookStore) before(key string, hook func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hooks == nil {
		s.hooks = map[string]func(){}
	}
	s.hooks[key] = hook
}

func (s *hookStore) CompareAndSwap(ctx context.Context, key string, rev int64, value []byte) (int64, error) {
	s.mu.Lock()
	hook := s.hooks[key]
	delete(s.hooks, key)
	s.mu.Unlock()
	if hook != nil {
		hook()
	}
	return s.Store.CompareAndSwap(ctx, key, rev, value)
}

func newHookedFixture(t *testing.T) (*fixture, *hookStore) {
	t.Helper()
	hs := &hookStore{}
	f := newFixtureOn(t, func(st store.Store) store.Store { hs.Store = st; return hs })
	return f, hs
}

// proposeSet proposes the quorum names, threshold of them.
func (f *fixture) proposeSet(t *testing.T, threshold int, names ...string) *Proposal {
	t.Helper()
	args := SetQuorumArgs{Threshold: threshold}
	for _, n := range names {
		args.Admins = append(args.Admins, AdminSpec{Name: n, PublicKey: f.key(t, n).Public().String()})
	}
	p, err := f.e.Propose(context.Background(), KindSetQuorum, args, "bob-cert", 0)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// eventsOf returns the audited steps about proposal id, and the events.
func (f *fixture) eventsOf(id string) (string, []Event) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var steps []string
	var evs []Event
	for _, ev := range f.events {
		if ev.Proposal != nil && ev.Proposal.ID == id {
			steps = append(steps, ev.Step)
			evs = append(evs, ev)
		}
	}
	return strings.Join(steps, " "), evs
}

func (f *fixture) step(id, step string) *Event {
	_, evs := f.eventsOf(id)
	for _, ev := range evs {
		if ev.Step == step {
			return &ev
		}
	}
	return nil
}

// revokeAliceDuring arranges, on the fixture's 2 of 3 (alice, bob, carol):
// Q revokes alice (bob, carol, dave, 2 of 3) and has bob's approval; P has
// alice's. Bob's approval of P is then sent; after it has counted alice's
// under the rule it read and before its compare-and-swap lands, carol's
// approval, served by another node on the same store, runs Q. It returns
// P, and bob's Decide's answer.
func revokeAliceDuring(t *testing.T, f *fixture, hs *hookStore) (*Proposal, *Proposal, error) {
	t.Helper()
	ctx := context.Background()
	other := f.node(t)
	q := f.proposeSet(t, 2, "bob", "carol", "dave")
	if _, err := f.decide(t, "bob", q, Approve); err != nil {
		t.Fatal(err)
	}
	p := f.propose(t, "enroll a node")
	if _, err := f.decide(t, "alice", p, Approve); err != nil {
		t.Fatal(err)
	}
	hs.before(proposalPrefix+p.ID, func() {
		got, err := other.Decide(ctx, q.ID, Approve, f.key(t, "carol").Public(), f.sign(t, "carol", q, Approve))
		if err != nil || got.State != StateExecuted {
			t.Errorf("carol's approval of the quorum change: %v, state %s", err, stateOf(got))
		}
	})
	got, err := f.decide(t, "bob", p, Approve)
	if rule, _ := f.e.Rule(ctx); rule == nil || rule.Version != 2 {
		t.Fatal("the quorum change did not land in between")
	}
	return p, got, err
}

// TestQuorumRuleChangeBeforeExecution: a quorum change landing between the
// count of a proposal's approvals and its move to executing must not let
// it run on a revoked admin's approval (SECURITY.md: revoked admins'
// earlier approvals stop counting).
func TestQuorumRuleChangeBeforeExecution(t *testing.T) {
	f, hs := newHookedFixture(t)
	ctx := context.Background()
	p, got, err := revokeAliceDuring(t, f, hs)
	if err != nil {
		t.Fatalf("bob's approval: %v", err)
	}
	// Under the rule now in force only bob's approval counts: 1 of 2.
	if got.State != StatePending || f.runs.Load() != 0 {
		t.Fatalf("ran on a revoked admin's approval: state %s, %d runs", got.State, f.runs.Load())
	}
	stored, err := f.e.Get(ctx, p.ID)
	if err != nil || stored.State != StatePending || len(stored.Approvals()) != 2 || stored.Threshold != 2 {
		t.Fatalf("stored after the recount: %v, state %s", err, stateOf(stored))
	}
	if steps, _ := f.eventsOf(p.ID); steps != "propose approve approve requeue" {
		t.Errorf("audit of P: %q", steps)
	}
	rq := f.step(p.ID, "requeue")
	if rq == nil || strings.Join(rq.Approvers, ", ") != f.names(t, "bob") ||
		rq.Proposal.State != StatePending || rq.Proposal.Threshold != 2 || !strings.Contains(rq.Reason, "version 2") {
		t.Errorf("requeue entry: %v", rq)
	}

	// dave, a current admin, completes it on the other node: it runs once,
	// and its entries name bob and dave, not alice.
	other := f.node(t)
	got, err = other.Decide(ctx, p.ID, Approve, f.key(t, "dave").Public(), f.sign(t, "dave", p, Approve))
	if err != nil || got.State != StateExecuted || f.runs.Load() != 1 {
		t.Fatalf("dave's approval: %v, state %s, %d runs", err, stateOf(got), f.runs.Load())
	}
	for _, step := range []string{"execute", "executed"} {
		ev := f.step(p.ID, step)
		if ev == nil || strings.Join(ev.Approvers, ", ") != f.names(t, "bob", "dave") {
			t.Errorf("%s entry: %v", step, ev)
		}
	}
	if _, err := f.decide(t, "carol", p, Approve); !errors.Is(err, ErrNotPending) || f.runs.Load() != 1 {
		t.Errorf("approval after execution: %v, %d runs", err, f.runs.Load())
	}
}

// TestQuorumRecountFailsClosed: when the step back to pending cannot be
// audited, the proposal stays executing and never runs.
func TestQuorumRecountFailsClosed(t *testing.T) {
	f, hs := newHookedFixture(t)
	f.failStep = "requeue"
	p, got, err := revokeAliceDuring(t, f, hs)
	if !errors.Is(err, ErrUnavailable) || got == nil || got.State != StateExecuting {
		t.Fatalf("bob's approval with the audit failing: %v, state %s", err, stateOf(got))
	}
	stored, err := f.e.Get(context.Background(), p.ID)
	if err != nil || stored.State != StateExecuting {
		t.Fatalf("stored: %v, state %s", err, stateOf(stored))
	}
	if _, err := f.decide(t, "dave", p, Approve); !errors.Is(err, ErrNotPending) {
		t.Errorf("approval of a stranded proposal: %v", err)
	}
	if f.runs.Load() != 0 {
		t.Fatalf("ran %d times", f.runs.Load())
	}
}

// TestQuorumSetRequeuedAfterRuleChange: a quorum change is recounted like
// any proposal. Q1 revokes alice (bob, carol, dave); Q2, which alice
// approved and bob is approving, replaces dave by mallory. Q1 landing in
// between must not leave Q2 to run on alice's word, revoking dave and
// seating mallory; Q2 waits for another current admin, then runs once.
func TestQuorumSetRequeuedAfterRuleChange(t *testing.T) {
	f, hs := newHookedFixture(t)
	ctx := context.Background()
	q1 := f.proposeSet(t, 2, "bob", "carol", "dave")
	q2 := f.proposeSet(t, 2, "bob", "carol", "mallory")
	if _, err := f.decide(t, "bob", q1, Approve); err != nil {
		t.Fatal(err)
	}
	if _, err := f.decide(t, "alice", q2, Approve); err != nil {
		t.Fatal(err)
	}
	hs.before(proposalPrefix+q2.ID, func() {
		if got, err := f.decide(t, "carol", q1, Approve); err != nil || got.State != StateExecuted {
			t.Errorf("q1: %v, state %s", err, stateOf(got))
		}
	})
	got, err := f.decide(t, "bob", q2, Approve)
	if err != nil || got.State != StatePending {
		t.Fatalf("bob's approval of q2: %v, state %s", err, stateOf(got))
	}
	rule, err := f.e.Rule(ctx)
	if err != nil || ruleSummary(rule) != "quorum v2: 2 of 3: "+f.names(t, "bob", "carol", "dave") {
		t.Fatalf("rule after q1 and the recount of q2: %v %s", err, ruleSummary(rule))
	}
	// carol, a current admin, agrees: now it runs, counting bob and carol.
	got, err = f.decide(t, "carol", q2, Approve)
	if err != nil || got.State != StateExecuted {
		t.Fatalf("carol's approval of q2: %v, state %s", err, stateOf(got))
	}
	if rule, _ := f.e.Rule(ctx); ruleSummary(rule) != "quorum v3: 2 of 3: "+f.names(t, "bob", "carol", "mallory") {
		t.Errorf("rule after q2: %s", ruleSummary(rule))
	}
	if ev := f.step(q2.ID, "execute"); ev == nil || strings.Join(ev.Approvers, ", ") != f.names(t, "bob", "carol") {
		t.Errorf("q2's execute entry: %v", ev)
	}
}

// names returns "name (id), …" as ruleSummary writes them.
func (f *fixture) names(t *testing.T, names ...string) string {
	t.Helper()
	var out []string
	for _, n := range names {
		out = append(out, n+" ("+f.key(t, n).Public().Fingerprint()+")")
	}
	return strings.Join(out, ", ")
}

func stateOf(p *Proposal) string {
	if p == nil {
		return "none"
	}
	return p.State
}
