// Package quorum owns Coffre's M-of-N rule over sensitive operations: the
// set of security officers (each named by a hybrid Ed25519 + ML-DSA-65
// public key, see [github.com/coffre-kms/coffre/kms/identity]), the
// threshold M, and proposals.
//
// A sensitive operation (enrolling a node, changing a keyring policy,
// destroying a key, exporting a backup, changing the quorum itself, …) is
// never run on one person's word. It becomes a [Proposal] whose identity is
// the SHA-256 hash of its canonical content — the operation kind, its
// arguments, who proposed it, when, until when, and a random nonce — and
// it runs once, when M distinct, current admins have signed that exact
// hash before it expired. An approval is a hybrid signature over
// [ApprovalMessage]; it cannot be moved to another proposal (another hash),
// replayed after execution (the proposal is no longer pending) or replayed
// onto a re-proposal of the same operation (another nonce, another hash).
//
// # Execution
//
// Operations are registered by kind with [Engine.Register]; the engine
// knows nothing of what they do. A proposal's state moves pending →
// executing → executed or failed by compare-and-swap in the store, so that
// of several Coffre nodes racing on the last approval exactly one runs it;
// a crash while executing leaves it "executing", which is never re-run
// (at most once) and shows in listings for the officers to look at.
//
// That compare-and-swap guards the proposal, not the rule: a quorum change
// (an admin revoked, M raised) may land between the read of the rule that
// counted the approvals and the swap. So once a proposal is "executing",
// and no other decision can reach it, the engine reads the rule again and
// counts the approvals under that rule; if they fall short, the proposal
// goes back to "pending" without running (audited as "requeue") and waits
// for more approvals from current admins. A quorum change landing after
// that second read finds the proposal already executing, approved under
// the rule then in force.
//
// Every step is first given to [Config.Audit]: if the audit entry cannot be
// written the step does not happen (fail closed).
//
// # Store layout
//
//	quorum/rule                the admin set and the threshold (one record)
//	quorum/proposals/<hash>    one record per proposal
package quorum

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/store"
)

// Sentinel errors; callers match them with errors.Is.
var (
	// ErrNoQuorum: no admin set has been installed yet (see Engine.Init).
	ErrNoQuorum = errors.New("quorum: no quorum configured")
	// ErrExists: Init was called when a quorum exists already.
	ErrExists = errors.New("quorum: a quorum is already configured")
	// ErrInvalid: a malformed rule, operation or approval.
	ErrInvalid = errors.New("quorum: invalid")
	// ErrNotFound: no proposal by that id.
	ErrNotFound = errors.New("quorum: no such proposal")
	// ErrNotAdmin: the signer is not a current admin (unknown or revoked).
	ErrNotAdmin = errors.New("quorum: not a current admin")
	// ErrBadApproval: the signature does not verify over this proposal's
	// hash under the admin's key.
	ErrBadApproval = errors.New("quorum: approval signature does not verify for this proposal")
	// ErrDuplicate: this admin has already approved or rejected it.
	ErrDuplicate = errors.New("quorum: this admin has already decided on this proposal")
	// ErrNotPending: the proposal is executed, failed, rejected, expired
	// or executing; it takes no more decisions.
	ErrNotPending = errors.New("quorum: proposal is not pending")
	// ErrUnavailable: the store or the audit log cannot be written.
	ErrUnavailable = errors.New("quorum: unavailable")
	// ErrLimit: too many pending proposals.
	ErrLimit = errors.New("quorum: too many pending proposals")
)

// Proposal states.
const (
	StatePending   = "pending"
	StateExecuting = "executing"
	StateExecuted  = "executed"
	StateFailed    = "failed"
	StateRejected  = "rejected"
	StateExpired   = "expired"
)

// Decisions an admin signs.
const (
	Approve = "approve"
	Reject  = "reject"
)

// Limits, set on purpose.
const (
	// MaxAdmins bounds the admin set (a government's security officers).
	MaxAdmins = 64
	// MaxPending bounds pending proposals so that an admin certificate
	// cannot fill the store; MaxPendingPerProposer bounds one proposer's,
	// so that one stolen admin certificate cannot crowd out the others'
	// proposals until its own expire.
	MaxPending            = 256
	MaxPendingPerProposer = 32
	// MaxContent bounds a proposal's canonical content (an EK root
	// certificate or a node class with its reference values fits).
	MaxContent = 256 << 10
	// MaxResult bounds the result kept in the proposal record.
	MaxResult = 256 << 10
	// DefaultTTL, MinTTL and MaxTTL bound how long a proposal waits for
	// approvals: long enough to gather officers across sites, short enough
	// that a forgotten proposal does not linger as a loaded gun.
	DefaultTTL = 24 * time.Hour
	MinTTL     = 5 * time.Minute
	MaxTTL     = 7 * 24 * time.Hour
)

const (
	ruleKey        = "quorum/rule"
	proposalPrefix = "quorum/proposals/"
	ruleFormat     = 1
	contentVersion = 1
	maxCAS         = 16
	// KindSetQuorum is the built-in operation that replaces the rule.
	KindSetQuorum = "quorum.set"
)

// Admin is one security officer.
type Admin struct {
	Name      string              `json:"name"`
	PublicKey *identity.PublicKey `json:"-"`
	// ID is the key's fingerprint: the admin's identity in proposals and
	// audit entries.
	ID      string    `json:"id"`
	AddTime time.Time `json:"add_time"`
}

// Rule is the admin set and the threshold.
type Rule struct {
	Version   uint64
	Threshold int
	Admins    []Admin
	// Revoked are former admins; their approvals no longer count.
	Revoked []Admin
}

// AdminSpec names a new admin by name and public key text.
type AdminSpec struct {
	Name      string `json:"name"`
	PublicKey string `json:"public_key"`
}

// SetQuorumArgs are the arguments of KindSetQuorum: the complete new
// admin set and threshold. Admins left out are revoked.
type SetQuorumArgs struct {
	Threshold int         `json:"threshold"`
	Admins    []AdminSpec `json:"admins"`
}

// Decision is one admin's signed approval or rejection.
type Decision struct {
	AdminID   string    `json:"admin_id"`
	Name      string    `json:"name"`
	Decision  string    `json:"decision"`
	Signature []byte    `json:"signature"`
	Time      time.Time `json:"time"`
}

// Content is what a proposal's hash covers, in this canonical JSON form.
type Content struct {
	Version    int             `json:"v"`
	Kind       string          `json:"kind"`
	Args       json.RawMessage `json:"args"`
	Proposer   string          `json:"proposer"`
	CreateTime time.Time       `json:"create_time"`
	ExpireTime time.Time       `json:"expire_time"`
	Nonce      string          `json:"nonce"`
}

// Proposal is a sensitive operation waiting for, or having had, its
// approvals.
type Proposal struct {
	ID        string // hex SHA-256 of Content's bytes
	Content   []byte // the canonical bytes that were hashed
	Parsed    Content
	State     string
	Decisions []Decision
	// Result is the executor's output (JSON), Error its failure.
	Result json.RawMessage
	Error  string
	// Threshold is the rule's M when the proposal was last read.
	Threshold int
	DoneTime  time.Time
}

// Approvals returns the decisions that approve.
func (p *Proposal) Approvals() []Decision { return p.decisions(Approve) }

// Rejections returns the decisions that reject.
func (p *Proposal) Rejections() []Decision { return p.decisions(Reject) }

func (p *Proposal) decisions(kind string) []Decision {
	var out []Decision
	for _, d := range p.Decisions {
		if d.Decision == kind {
			out = append(out, d)
		}
	}
	return out
}

// Hash returns the SHA-256 of content, the proposal's identity.
func Hash(content []byte) [32]byte { return sha256.Sum256(content) }

// ApprovalMessage is what an admin signs to decide on the proposal whose
// content hashes to hash. Signers recompute hash from the content they were
// shown, never take it from the server.
func ApprovalMessage(hash [32]byte, decision string) []byte {
	return []byte("coffre-proposal-decision-v1\n" + decision + "\n" + hex.EncodeToString(hash[:]) + "\n")
}

// ParseContent parses and checks canonical content bytes: they must be
// exactly what Coffre would have produced for the parsed value.
func ParseContent(b []byte) (Content, error) {
	var c Content
	if len(b) > MaxContent {
		return c, fmt.Errorf("%w: content of %d bytes (at most %d)", ErrInvalid, len(b), MaxContent)
	}
	if err := strictDecode(b, &c); err != nil {
		return c, fmt.Errorf("%w: content: %v", ErrInvalid, err)
	}
	if c.Version != contentVersion || c.Kind == "" || len(c.Nonce) != 32 {
		return c, fmt.Errorf("%w: content version, kind or nonce", ErrInvalid)
	}
	again, err := c.marshal()
	if err != nil || string(again) != string(b) {
		return c, fmt.Errorf("%w: content is not canonical", ErrInvalid)
	}
	return c, nil
}

func (c *Content) marshal() ([]byte, error) {
	cc := *c
	cc.CreateTime, cc.ExpireTime = cc.CreateTime.UTC(), cc.ExpireTime.UTC()
	return marshalCanonical(cc)
}

// CanonicalArgs returns args in the canonical form [Engine.Propose] puts in
// a proposal's content. A client compares it with the content it is
// shown, to check that a proposal holds the operation it asked for.
func CanonicalArgs(args any) (json.RawMessage, error) {
	raw, err := marshalCanonical(args)
	if err != nil {
		return nil, fmt.Errorf("%w: arguments: %v", ErrInvalid, err)
	}
	return raw, nil
}

// marshalCanonical is encoding/json without HTML escaping and with
// compacted raw messages: Go's encoder writes struct fields in declaration
// order and map keys sorted, so equal values give equal bytes.
func marshalCanonical(v any) ([]byte, error) {
	var sb strings.Builder
	enc := json.NewEncoder(&sb)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return []byte(strings.TrimSuffix(sb.String(), "\n")), nil
}

// Executor runs an approved operation with its canonical arguments and
// returns its result as JSON.
type Executor func(ctx context.Context, args json.RawMessage) (json.RawMessage, error)

// Validator checks an operation's arguments when it is proposed, so that a
// malformed operation is refused at once rather than after M approvals.
type Validator func(ctx context.Context, args json.RawMessage) error

// Event is what the engine asks the auditor to record before each step.
type Event struct {
	// Step is "init", "propose", "approve", "reject", "refuse" (a refused
	// decision), "execute", "executed", "failed", or "requeue" (an
	// approved proposal put back to pending without running because the
	// rule changed before it ran; Reason says how).
	Step     string
	Proposal *Proposal
	// Admin is who decided (approve/reject) or proposed.
	Admin string
	// Approvers lists "name (id)" of the approvals counted under the rule
	// in force (execute, executed, failed, requeue).
	Approvers []string
	Reason    string
}

// Config configures an Engine.
type Config struct {
	Store store.Store
	// Audit records each step before it takes effect; an error stops the
	// step. Required.
	Audit func(ctx context.Context, ev Event) error
	Now   func() time.Time
}

type operation struct {
	validate Validator
	exec     Executor
}

// Engine runs proposals against the rule kept in the store. Safe for
// concurrent use, also by several Coffre nodes on one store.
type Engine struct {
	store store.Store
	audit func(ctx context.Context, ev Event) error
	now   func() time.Time
	ops   map[string]operation
}

// New returns an Engine; register the operations before serving.
func New(cfg Config) (*Engine, error) {
	if cfg.Store == nil || cfg.Audit == nil {
		return nil, errors.New("quorum: Config.Store and Config.Audit are required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	e := &Engine{store: cfg.Store, audit: cfg.Audit, now: cfg.Now, ops: make(map[string]operation)}
	e.Register(KindSetQuorum, e.validateSetQuorum, e.execSetQuorum)
	return e, nil
}

// Register makes kind proposable. Not safe to call while serving.
func (e *Engine) Register(kind string, validate Validator, exec Executor) {
	e.ops[kind] = operation{validate: validate, exec: exec}
}

// Kinds lists the registered operation kinds.
func (e *Engine) Kinds() []string {
	out := make([]string, 0, len(e.ops))
	for k := range e.ops {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func storeErr(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: store: %w", ErrUnavailable, err)
}

func (e *Engine) auditStep(ctx context.Context, ev Event) error {
	if err := e.audit(ctx, ev); err != nil {
		return fmt.Errorf("%w: audit: %w", ErrUnavailable, err)
	}
	return nil
}

// Propose records a new proposal of kind with args (any value; it is
// encoded canonically) by proposer (the caller's identity as the
// transport established it), pending for ttl (0 means DefaultTTL).
func (e *Engine) Propose(ctx context.Context, kind string, args any, proposer string, ttl time.Duration) (*Proposal, error) {
	op, ok := e.ops[kind]
	if !ok {
		return nil, fmt.Errorf("%w: unknown operation %q (known: %s)", ErrInvalid, kind, strings.Join(e.Kinds(), ", "))
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < MinTTL || ttl > MaxTTL {
		return nil, fmt.Errorf("%w: expiry %v is outside [%v, %v]", ErrInvalid, ttl, MinTTL, MaxTTL)
	}
	rule, _, err := e.loadRule(ctx)
	if err != nil {
		return nil, err
	}
	raw, err := CanonicalArgs(args)
	if err != nil {
		return nil, err
	}
	if op.validate != nil {
		if err := op.validate(ctx, raw); err != nil {
			return nil, err
		}
	}
	nonce := make([]byte, 16)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	now := e.now().UTC()
	c := Content{
		Version: contentVersion, Kind: kind, Args: raw, Proposer: proposer,
		CreateTime: now, ExpireTime: now.Add(ttl), Nonce: hex.EncodeToString(nonce),
	}
	b, err := c.marshal()
	if err != nil {
		return nil, err
	}
	if len(b) > MaxContent {
		return nil, fmt.Errorf("%w: proposal of %d bytes (at most %d)", ErrInvalid, len(b), MaxContent)
	}
	if n, mine, err := e.countPending(ctx, proposer); err != nil {
		return nil, err
	} else if n >= MaxPending {
		return nil, fmt.Errorf("%w: %d proposals pending (at most %d); approve, reject or let some expire", ErrLimit, n, MaxPending)
	} else if mine >= MaxPendingPerProposer {
		return nil, fmt.Errorf("%w: %s has %d proposals pending (at most %d each); approve, reject or let some expire", ErrLimit, proposer, mine, MaxPendingPerProposer)
	}
	h := Hash(b)
	p := &Proposal{ID: hex.EncodeToString(h[:]), Content: b, Parsed: c, State: StatePending, Threshold: rule.Threshold}
	if err := e.auditStep(ctx, Event{Step: "propose", Proposal: p, Admin: proposer}); err != nil {
		return nil, err
	}
	if _, err := e.store.CompareAndSwap(ctx, proposalPrefix+p.ID, 0, p.encode()); err != nil {
		return nil, storeErr(err)
	}
	return p, nil
}

// countPending counts the pending proposals, all and proposer's.
func (e *Engine) countPending(ctx context.Context, proposer string) (all, mine int, err error) {
	kvs, err := e.store.List(ctx, proposalPrefix)
	if err != nil {
		return 0, 0, storeErr(err)
	}
	now := e.now()
	for _, kv := range kvs {
		p, err := decodeProposal(kv.Key, kv.Value)
		if err == nil && p.State == StatePending && now.Before(p.Parsed.ExpireTime) {
			all++
			if p.Parsed.Proposer == proposer {
				mine++
			}
		}
	}
	return all, mine, nil
}

// Get returns the proposal whose id is id or starts with id (at least 8
// hex digits, and unique).
func (e *Engine) Get(ctx context.Context, id string) (*Proposal, error) {
	p, _, err := e.get(ctx, id)
	return p, err
}

func (e *Engine) get(ctx context.Context, id string) (*Proposal, int64, error) {
	id = strings.ToLower(strings.TrimSpace(id))
	if len(id) < 8 || len(id) > 64 || strings.Trim(id, "0123456789abcdef") != "" {
		return nil, 0, fmt.Errorf("%w: proposal id %q: want 8 to 64 hex digits", ErrInvalid, id)
	}
	var kv store.KV
	if len(id) == 64 {
		var err error
		kv, err = e.store.Get(ctx, proposalPrefix+id)
		if errors.Is(err, store.ErrNotFound) {
			return nil, 0, fmt.Errorf("%w: %s", ErrNotFound, id)
		}
		if err != nil {
			return nil, 0, storeErr(err)
		}
	} else {
		kvs, err := e.store.List(ctx, proposalPrefix+id)
		if err != nil {
			return nil, 0, storeErr(err)
		}
		switch len(kvs) {
		case 0:
			return nil, 0, fmt.Errorf("%w: %s", ErrNotFound, id)
		case 1:
			kv = kvs[0]
		default:
			return nil, 0, fmt.Errorf("%w: id prefix %s names %d proposals; give more digits", ErrInvalid, id, len(kvs))
		}
	}
	p, err := decodeProposal(kv.Key, kv.Value)
	if err != nil {
		return nil, 0, err
	}
	e.settle(p, e.threshold(ctx))
	return p, kv.Revision, nil
}

// threshold is the current rule's M, 0 when it cannot be read.
func (e *Engine) threshold(ctx context.Context) int {
	if rule, _, err := e.loadRule(ctx); err == nil {
		return rule.Threshold
	}
	return 0
}

// settle fills in what depends on the present: expiry and the threshold.
func (e *Engine) settle(p *Proposal, threshold int) {
	if p.State == StatePending && !e.now().Before(p.Parsed.ExpireTime) {
		p.State = StateExpired
	}
	if threshold > 0 {
		p.Threshold = threshold
	}
}

// List returns proposals, newest first; state "" means all.
func (e *Engine) List(ctx context.Context, state string) ([]*Proposal, error) {
	kvs, err := e.store.List(ctx, proposalPrefix)
	if err != nil {
		return nil, storeErr(err)
	}
	var out []*Proposal
	threshold := e.threshold(ctx) // one rule read for the whole list
	for _, kv := range kvs {
		p, err := decodeProposal(kv.Key, kv.Value)
		if err != nil {
			return nil, err
		}
		e.settle(p, threshold)
		if state == "" || p.State == state {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Parsed.CreateTime.After(out[j].Parsed.CreateTime) })
	return out, nil
}

// Decide records admin's signed decision (Approve or Reject) on proposal
// id. When the approvals of current admins reach the threshold, counted
// again under the rule read once the proposal is marked executing, the
// operation runs before Decide returns, and the returned proposal carries
// its result; if the rule changed in between and the approvals no longer
// reach it, the decision stays recorded and the returned proposal is
// pending again. Every refusal is an error matched by a sentinel above.
func (e *Engine) Decide(ctx context.Context, id, decision string, pub *identity.PublicKey, sig []byte) (*Proposal, error) {
	p, err := e.decide(ctx, id, decision, pub, sig)
	if err != nil && p == nil && !errors.Is(err, ErrUnavailable) {
		// A refused decision is evidence too (a revoked officer trying, an
		// approval replayed): it gets its own entry.
		who := "unknown key"
		if pub != nil {
			who = pub.Fingerprint()
		}
		ev := Event{Step: "refuse", Admin: who, Reason: fmt.Sprintf("%s on %s: %v", decision, id, err)}
		if aerr := e.auditStep(ctx, ev); aerr != nil {
			return nil, errors.Join(err, aerr)
		}
	}
	return p, err
}

func (e *Engine) decide(ctx context.Context, id, decision string, pub *identity.PublicKey, sig []byte) (*Proposal, error) {
	if decision != Approve && decision != Reject {
		return nil, fmt.Errorf("%w: decision %q", ErrInvalid, decision)
	}
	if pub == nil {
		return nil, fmt.Errorf("%w: no public key", ErrInvalid)
	}
	for range maxCAS {
		p, rev, err := e.get(ctx, id)
		if err != nil {
			return nil, err
		}
		rule, _, err := e.loadRule(ctx)
		if err != nil {
			return nil, err
		}
		admin, ok := rule.admin(pub.Fingerprint())
		if !ok || !admin.PublicKey.Equal(pub) {
			return nil, fmt.Errorf("%w: key %s", ErrNotAdmin, pub.Fingerprint())
		}
		h := Hash(p.Content)
		if err := pub.Verify(ApprovalMessage(h, decision), sig); err != nil {
			return nil, fmt.Errorf("%w (%s by %s)", ErrBadApproval, decision, admin.Name)
		}
		if p.State != StatePending {
			return nil, fmt.Errorf("%w: it is %s", ErrNotPending, p.State)
		}
		for _, d := range p.Decisions {
			if d.AdminID == admin.ID {
				return nil, fmt.Errorf("%w: %s already chose %s", ErrDuplicate, admin.Name, d.Decision)
			}
		}
		next := *p
		next.Decisions = append(append([]Decision(nil), p.Decisions...),
			Decision{AdminID: admin.ID, Name: admin.Name, Decision: decision, Signature: sig, Time: e.now().UTC()})
		approvers := rule.counted(next.Approvals(), h, Approve)
		rejecters := rule.counted(next.Rejections(), h, Reject)
		// Executing is provisional: recount decides, under the rule as it
		// is once no other decision can reach the proposal.
		switch {
		case decision == Approve && len(approvers) >= rule.Threshold:
			next.State = StateExecuting
		case decision == Reject && len(rule.Admins)-len(rejecters) < rule.Threshold:
			next.State = StateRejected
			next.DoneTime = e.now().UTC()
		}
		if err := e.auditStep(ctx, Event{Step: decision, Proposal: &next, Admin: admin.Name + " (" + admin.ID + ")"}); err != nil {
			return nil, err
		}
		newRev, err := e.store.CompareAndSwap(ctx, proposalPrefix+p.ID, rev, next.encode())
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return nil, storeErr(err)
		}
		if next.State != StateExecuting {
			return &next, nil
		}
		return e.recount(ctx, &next, newRev)
	}
	return nil, fmt.Errorf("%w: proposal %s changed %d times; try again", ErrUnavailable, id, maxCAS)
}

// recount runs after this caller moved p to executing at revision rev. The
// rule is read again and p's approvals counted under it: a quorum change
// that landed since the count in decide (the swap guards only the
// proposal) must not let approvals it revoked, or a threshold it raised,
// be ignored. If they still reach the threshold p runs; if not, p goes back
// to pending, audited first, and does not run. When that cannot be done
// (the rule unreadable, the audit or the store failing) p stays executing,
// never run, as after a crash; the proposal is returned with the error
// because the decision itself was recorded.
func (e *Engine) recount(ctx context.Context, p *Proposal, rev int64) (*Proposal, error) {
	// The proposal is executing now: a caller hanging up must not leave
	// it so for want of a read.
	bg := context.WithoutCancel(ctx)
	rule, _, err := e.loadRule(bg)
	if err != nil {
		return p, fmt.Errorf("proposal %s was approved, but the rule could not be read again, so it did not run and stays executing: %w", p.ID[:16], err)
	}
	p.Threshold = rule.Threshold
	approvers := rule.counted(p.Approvals(), Hash(p.Content), Approve)
	if len(approvers) >= rule.Threshold {
		return e.execute(ctx, p, rev, approvers)
	}
	back := *p
	back.State = StatePending
	reason := fmt.Sprintf("the quorum changed before it ran (now version %d): %d of %d approvals count under it; not run, pending again",
		rule.Version, len(approvers), rule.Threshold)
	if err := e.auditStep(bg, Event{Step: "requeue", Proposal: &back, Approvers: approvers, Reason: reason}); err != nil {
		return p, fmt.Errorf("proposal %s: %s, but stays executing: %w", p.ID[:16], reason, err)
	}
	if _, err := e.store.CompareAndSwap(bg, proposalPrefix+p.ID, rev, back.encode()); err != nil {
		return p, fmt.Errorf("proposal %s: %s, but stays executing: %w", p.ID[:16], reason, storeErr(err))
	}
	return &back, nil
}

// execute runs p, which this caller moved to executing and recount found
// still approved, and records the outcome. It is reached once per
// proposal.
func (e *Engine) execute(ctx context.Context, p *Proposal, rev int64, approvers []string) (*Proposal, error) {
	op, ok := e.ops[p.Parsed.Kind]
	var result json.RawMessage
	var runErr error
	if !ok {
		runErr = fmt.Errorf("operation %q is not known to this server", p.Parsed.Kind)
	} else if err := e.auditStep(ctx, Event{Step: "execute", Proposal: p, Approvers: approvers}); err != nil {
		runErr = err
	} else {
		// The executor runs even if the caller's deadline is near: an
		// operation half-run for want of time is worse than a slow answer.
		result, runErr = op.exec(context.WithoutCancel(ctx), p.Parsed.Args)
	}
	done := *p
	done.DoneTime = e.now().UTC()
	if runErr != nil {
		done.State, done.Error = StateFailed, runErr.Error()
	} else {
		done.State = StateExecuted
		if len(result) <= MaxResult {
			done.Result = result
		}
	}
	step := "executed"
	if runErr != nil {
		step = "failed"
	}
	// The operation has happened (or failed); its outcome entry is
	// best-effort-after: the "execute" entry before it is what invariant 3
	// needs, and a failure to write this one is reported to the caller.
	auditErr := e.auditStep(context.WithoutCancel(ctx), Event{Step: step, Proposal: &done, Approvers: approvers, Reason: done.Error})
	if _, err := e.store.CompareAndSwap(context.WithoutCancel(ctx), proposalPrefix+p.ID, rev, done.encode()); err != nil {
		return nil, fmt.Errorf("proposal %s ran (%s) but recording its outcome failed: %w", p.ID, step, storeErr(err))
	}
	done.Result = result // the caller gets the full result even when too big to keep
	if runErr != nil {
		return &done, fmt.Errorf("proposal %s approved but the operation failed: %w", p.ID[:16], runErr)
	}
	if auditErr != nil {
		return &done, auditErr
	}
	return &done, nil
}

// counted returns "name (id)" of the decisions that count: made by a
// current admin, whose signature verifies again here (the store is not
// trusted to keep decisions honest), one per admin.
func (r *Rule) counted(ds []Decision, h [32]byte, decision string) []string {
	var out []string
	seen := map[string]bool{}
	for _, d := range ds {
		a, ok := r.admin(d.AdminID)
		if !ok || seen[a.ID] || a.PublicKey.Verify(ApprovalMessage(h, decision), d.Signature) != nil {
			continue
		}
		seen[a.ID] = true
		out = append(out, a.Name+" ("+a.ID+")")
	}
	return out
}

func (r *Rule) admin(id string) (Admin, bool) {
	for _, a := range r.Admins {
		if a.ID == id {
			return a, true
		}
	}
	return Admin{}, false
}
