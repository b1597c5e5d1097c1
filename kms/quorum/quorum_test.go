package quorum

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/store"
)

type fixture struct {
	e      *Engine
	st     store.Store // the engine's store (wrapped, if newFixtureOn wrapped it)
	now    time.Time
	keys   map[string]*identity.PrivateKey
	mu     sync.Mutex
	events []Event
	// failStep, when set, makes the audit of that step fail.
	failStep string
	runs     atomic.Int32
}

// newFixture makes an engine with admins alice, bob and carol, 2 of 3, and
// a test operation "test.op" that counts its runs.
func newFixture(t *testing.T) *fixture { return newFixtureOn(t, nil) }

// newFixtureOn is newFixture with the bbolt store wrapped by wrap (when not
// nil) under the engine, to control an interleaving.
func newFixtureOn(t *testing.T, wrap func(store.Store) store.Store) *fixture {
	t.Helper()
	st, err := store.OpenBolt(filepath.Join(t.TempDir(), "store.db"), store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f := &fixture{st: st, now: time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC), keys: map[string]*identity.PrivateKey{}}
	if wrap != nil {
		f.st = wrap(st)
	}
	f.e = f.node(t)
	var specs []AdminSpec
	for _, name := range []string{"alice", "bob", "carol"} {
		specs = append(specs, AdminSpec{Name: name, PublicKey: f.key(t, name).Public().String()})
	}
	if _, err := f.e.Init(context.Background(), SetQuorumArgs{Threshold: 2, Admins: specs}, "test"); err != nil {
		t.Fatal(err)
	}
	return f
}

// node returns an engine on the fixture's store, clock and audit, with
// "test.op": what another Coffre node sharing the store runs.
func (f *fixture) node(t *testing.T) *Engine {
	t.Helper()
	e, err := New(Config{Store: f.st, Now: func() time.Time { return f.now }, Audit: func(_ context.Context, ev Event) error {
		f.mu.Lock()
		defer f.mu.Unlock()
		if ev.Step == f.failStep {
			return errors.New("audit log full")
		}
		f.events = append(f.events, ev)
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	e.Register("test.op", nil, func(_ context.Context, args json.RawMessage) (json.RawMessage, error) {
		f.runs.Add(1)
		return json.RawMessage(`{"ran":` + string(args) + `}`), nil
	})
	return e
}

func (f *fixture) key(t *testing.T, name string) *identity.PrivateKey {
	t.Helper()
	if k, ok := f.keys[name]; ok {
		return k
	}
	k, err := identity.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	f.keys[name] = k
	return k
}

func (f *fixture) sign(t *testing.T, name string, p *Proposal, decision string) []byte {
	t.Helper()
	sig, err := f.key(t, name).Sign(context.Background(), ApprovalMessage(Hash(p.Content), decision))
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

func (f *fixture) decide(t *testing.T, name string, p *Proposal, decision string) (*Proposal, error) {
	t.Helper()
	return f.e.Decide(context.Background(), p.ID, decision, f.key(t, name).Public(), f.sign(t, name, p, decision))
}

func (f *fixture) propose(t *testing.T, args any) *Proposal {
	t.Helper()
	p, err := f.e.Propose(context.Background(), "test.op", args, "alice-cert", 0)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (f *fixture) refusals() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, ev := range f.events {
		if ev.Step == "refuse" {
			n++
		}
	}
	return n
}

func TestQuorumExecutesOnceAtThreshold(t *testing.T) {
	f := newFixture(t)
	p := f.propose(t, map[string]int{"x": 1})
	got, err := f.decide(t, "alice", p, Approve)
	if err != nil || got.State != StatePending {
		t.Fatalf("first approval: %v, state %v", err, got)
	}
	if f.runs.Load() != 0 {
		t.Fatal("ran with one approval of two (short by one)")
	}
	got, err = f.decide(t, "bob", p, Approve)
	if err != nil || got.State != StateExecuted || string(got.Result) != `{"ran":{"x":1}}` {
		t.Fatalf("second approval: %v, %+v", err, got)
	}
	if f.runs.Load() != 1 {
		t.Fatalf("ran %d times", f.runs.Load())
	}
	// Replaying an approval after execution: refused, never re-run.
	if _, err := f.decide(t, "carol", p, Approve); !errors.Is(err, ErrNotPending) {
		t.Errorf("approval after execution: %v, want ErrNotPending", err)
	}
	if f.runs.Load() != 1 {
		t.Fatalf("ran %d times", f.runs.Load())
	}
	var steps []string
	for _, ev := range f.events {
		steps = append(steps, ev.Step)
	}
	want := "init propose approve approve execute executed refuse"
	if strings.Join(steps, " ") != want {
		t.Errorf("audit steps %q, want %q", strings.Join(steps, " "), want)
	}
	// The execute entry names both approvers.
	for _, ev := range f.events {
		if ev.Step == "execute" && (len(ev.Approvers) != 2 || !strings.HasPrefix(ev.Approvers[0], "alice (sha256:")) {
			t.Errorf("execute entry approvers %q", ev.Approvers)
		}
	}
}

func TestQuorumRefusals(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	p := f.propose(t, "op-1")
	other := f.propose(t, "op-2")

	check := func(name string, err error, want error) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Errorf("%s: %v, want %v", name, err, want)
		}
	}
	before := f.refusals()

	// The same admin twice.
	if _, err := f.decide(t, "alice", p, Approve); err != nil {
		t.Fatal(err)
	}
	_, err := f.decide(t, "alice", p, Approve)
	check("same admin twice", err, ErrDuplicate)

	// An approval signed for another operation's hash.
	sigOther := f.sign(t, "bob", other, Approve)
	_, err = f.e.Decide(ctx, p.ID, Approve, f.key(t, "bob").Public(), sigOther)
	check("approval for another hash", err, ErrBadApproval)

	// A rejection's signature presented as an approval.
	_, err = f.e.Decide(ctx, p.ID, Approve, f.key(t, "bob").Public(), f.sign(t, "bob", p, Reject))
	check("rejection as approval", err, ErrBadApproval)

	// Someone who is not an admin.
	_, err = f.decide(t, "mallory", p, Approve)
	check("not an admin", err, ErrNotAdmin)

	// An admin's key claimed with another admin's fingerprint cannot help:
	// the signature is checked under the key the rule holds.
	if f.runs.Load() != 0 {
		t.Fatal("an operation ran after refused approvals")
	}

	// Expired: the clock passes the expiry.
	f.now = f.now.Add(DefaultTTL + time.Second)
	_, err = f.decide(t, "bob", p, Approve)
	check("expired", err, ErrNotPending)
	got, _ := f.e.Get(ctx, p.ID[:12])
	if got.State != StateExpired {
		t.Errorf("state after expiry %q", got.State)
	}
	if f.runs.Load() != 0 {
		t.Fatal("an expired proposal ran")
	}
	if n := f.refusals() - before; n != 5 {
		t.Errorf("%d refusals audited, want 5", n)
	}
}

func TestQuorumReplayOntoReproposal(t *testing.T) {
	f := newFixture(t)
	p1 := f.propose(t, "same")
	sig := f.sign(t, "alice", p1, Approve)
	p2 := f.propose(t, "same")
	if p1.ID == p2.ID {
		t.Fatal("two proposals of the same operation share a hash")
	}
	if _, err := f.e.Decide(context.Background(), p2.ID, Approve, f.key(t, "alice").Public(), sig); !errors.Is(err, ErrBadApproval) {
		t.Errorf("approval replayed onto a re-proposal: %v", err)
	}
}

func TestQuorumRevokedAdmin(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	pending := f.propose(t, "before the change")
	if _, err := f.decide(t, "carol", pending, Approve); err != nil {
		t.Fatal(err)
	}
	// Replace carol by dave, 2 of 3, by quorum.
	args := SetQuorumArgs{Threshold: 2, Admins: []AdminSpec{
		{Name: "alice", PublicKey: f.key(t, "alice").Public().String()},
		{Name: "bob", PublicKey: f.key(t, "bob").Public().String()},
		{Name: "dave", PublicKey: f.key(t, "dave").Public().String()},
	}}
	q, err := f.e.Propose(ctx, KindSetQuorum, args, "alice-cert", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.decide(t, "alice", q, Approve); err != nil {
		t.Fatal(err)
	}
	if got, err := f.decide(t, "bob", q, Approve); err != nil || got.State != StateExecuted {
		t.Fatalf("quorum change: %v %+v", err, got)
	}
	rule, _ := f.e.Rule(ctx)
	if rule.Version != 2 || len(rule.Revoked) != 1 || rule.Revoked[0].Name != "carol" {
		t.Fatalf("rule after change: %+v", rule)
	}
	// carol is refused now.
	p := f.propose(t, "after")
	if _, err := f.decide(t, "carol", p, Approve); !errors.Is(err, ErrNotAdmin) {
		t.Errorf("revoked admin: %v, want ErrNotAdmin", err)
	}
	// carol's earlier approval no longer counts: alice's makes one, not two.
	got, err := f.decide(t, "alice", pending, Approve)
	if err != nil || got.State != StatePending || f.runs.Load() != 0 {
		t.Fatalf("revoked admin's old approval counted: %v %+v runs=%d", err, got, f.runs.Load())
	}
	// A revoked key cannot be re-added.
	args.Admins = append(args.Admins, AdminSpec{Name: "carol2", PublicKey: f.key(t, "carol").Public().String()})
	args.Threshold = 3
	if _, err := f.e.Propose(ctx, KindSetQuorum, args, "alice-cert", 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("re-adding a revoked key: %v", err)
	}
}

func TestQuorumRejectAndRules(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	p := f.propose(t, "doomed")
	if got, err := f.decide(t, "alice", p, Reject); err != nil || got.State != StatePending {
		t.Fatalf("one rejection: %v %+v", err, got)
	}
	// Two rejections of three leave only one possible approval of the two needed.
	if got, err := f.decide(t, "bob", p, Reject); err != nil || got.State != StateRejected {
		t.Fatalf("two rejections: %v %+v", err, got)
	}
	if _, err := f.decide(t, "carol", p, Approve); !errors.Is(err, ErrNotPending) {
		t.Errorf("approval of a rejected proposal: %v", err)
	}
	if _, err := f.e.Init(ctx, SetQuorumArgs{Threshold: 1, Admins: nil}, "x"); err == nil {
		t.Error("Init twice accepted")
	}
	for _, bad := range []SetQuorumArgs{
		{Threshold: 1, Admins: []AdminSpec{{Name: "a", PublicKey: f.key(t, "alice").Public().String()}, {Name: "b", PublicKey: f.key(t, "bob").Public().String()}}},
		{Threshold: 3, Admins: []AdminSpec{{Name: "a", PublicKey: f.key(t, "alice").Public().String()}, {Name: "b", PublicKey: f.key(t, "bob").Public().String()}}},
		{Threshold: 2, Admins: []AdminSpec{{Name: "a", PublicKey: f.key(t, "alice").Public().String()}, {Name: "b", PublicKey: f.key(t, "alice").Public().String()}}},
		{Threshold: 2, Admins: []AdminSpec{{Name: "a b", PublicKey: f.key(t, "alice").Public().String()}, {Name: "b", PublicKey: f.key(t, "bob").Public().String()}}},
	} {
		if _, err := f.e.Propose(ctx, KindSetQuorum, bad, "x", 0); !errors.Is(err, ErrInvalid) {
			t.Errorf("bad rule %+v: %v", bad, err)
		}
	}
	if _, err := f.e.Propose(ctx, "no.such", nil, "x", 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("unknown kind: %v", err)
	}
	if _, err := f.e.Propose(ctx, "test.op", nil, "x", time.Minute); !errors.Is(err, ErrInvalid) {
		t.Errorf("1-minute expiry: %v", err)
	}
}

func TestQuorumConcurrentLastApprovals(t *testing.T) {
	// Two admins sending the deciding approval at once, to two nodes on
	// one store: exactly one run.
	f := newFixture(t)
	other := f.node(t)
	if _, err := f.e.Init(context.Background(), SetQuorumArgs{}, "x"); !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrExists) {
		t.Fatal(err)
	}
	for i := range 10 {
		p := f.propose(t, i)
		sigB, sigC := f.sign(t, "bob", p, Approve), f.sign(t, "carol", p, Approve)
		if _, err := f.decide(t, "alice", p, Approve); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for _, x := range []struct {
			e   *Engine
			k   *identity.PrivateKey
			sig []byte
		}{{f.e, f.key(t, "bob"), sigB}, {other, f.key(t, "carol"), sigC}} {
			wg.Go(func() { _, _ = x.e.Decide(context.Background(), p.ID, Approve, x.k.Public(), x.sig) })
		}
		wg.Wait()
	}
	if f.runs.Load() != 10 {
		t.Errorf("10 proposals ran %d times", f.runs.Load())
	}
}

func TestStoredProposalTampering(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	p := f.propose(t, "x")
	if _, err := f.decide(t, "alice", p, Approve); err != nil {
		t.Fatal(err)
	}
	// Someone with write access to the store forges bob's approval.
	kv, err := f.st.Get(ctx, proposalPrefix+p.ID)
	if err != nil {
		t.Fatal(err)
	}
	var rec proposalRecord
	if err := json.Unmarshal(kv.Value, &rec); err != nil {
		t.Fatal(err)
	}
	bobID := f.key(t, "bob").Public().Fingerprint()
	rec.Decisions = append(rec.Decisions, Decision{AdminID: bobID, Name: "bob", Decision: Approve, Signature: rec.Decisions[0].Signature})
	b, _ := json.Marshal(rec)
	if _, err := f.st.Put(ctx, kv.Key, b); err != nil {
		t.Fatal(err)
	}
	// carol's approval would make three on paper, but only two verify.
	if got, err := f.decide(t, "carol", p, Approve); err != nil || got.State != StateExecuted {
		t.Fatalf("carol: %v %+v", err, got)
	}
	q := f.propose(t, "y")
	kv, _ = f.st.Get(ctx, proposalPrefix+q.ID)
	_ = json.Unmarshal(kv.Value, &rec)
	rec.Decisions = []Decision{{AdminID: bobID, Name: "bob", Decision: Approve, Signature: make([]byte, 10)}}
	b, _ = json.Marshal(rec)
	_, _ = f.st.Put(ctx, kv.Key, b)
	if got, err := f.decide(t, "alice", q, Approve); err != nil || got.State != StatePending {
		t.Fatalf("a forged approval counted: %v %+v", err, got)
	}
	// A record moved under another key is refused.
	_, _ = f.st.Put(ctx, proposalPrefix+strings.Repeat("0", 64), kv.Value)
	if _, err := f.e.Get(ctx, strings.Repeat("0", 64)); err == nil {
		t.Error("a proposal stored under a key that is not its hash was accepted")
	}
}

func FuzzParseContent(f *testing.F) {
	c := Content{Version: 1, Kind: "k", Args: json.RawMessage(`{"a":1}`), Nonce: strings.Repeat("ab", 16)}
	b, _ := c.marshal()
	f.Add(b)
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseContent(b)
		if err != nil {
			return
		}
		again, err := c.marshal()
		if err != nil || string(again) != string(b) {
			t.Fatalf("accepted non-canonical content %q", b)
		}
	})
}

// TestQuorumPendingLimits: one proposer cannot crowd out the others.
func TestQuorumPendingLimits(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for i := range MaxPendingPerProposer {
		if _, err := f.e.Propose(ctx, "test.op", i, "stolen-cert", 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.e.Propose(ctx, "test.op", "one more", "stolen-cert", 0); !errors.Is(err, ErrLimit) {
		t.Fatalf("proposal %d of one proposer: %v, want ErrLimit", MaxPendingPerProposer+1, err)
	}
	if _, err := f.e.Propose(ctx, "test.op", "another officer", "officer-cert", 0); err != nil {
		t.Fatalf("another proposer: %v", err)
	}
	// Expired proposals no longer count.
	f.now = f.now.Add(DefaultTTL + time.Second)
	if _, err := f.e.Propose(ctx, "test.op", "later", "stolen-cert", 0); err != nil {
		t.Fatalf("after expiry: %v", err)
	}
}
