package quorum

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/store"
)

// ruleRecord is the stored form of a Rule.
type ruleRecord struct {
	Format    int           `json:"format"`
	Version   uint64        `json:"version"`
	Threshold int           `json:"threshold"`
	Admins    []adminRecord `json:"admins"`
	Revoked   []adminRecord `json:"revoked,omitempty"`
}

type adminRecord struct {
	Name      string    `json:"name"`
	PublicKey string    `json:"public_key"`
	AddTime   time.Time `json:"add_time"`
}

func (a adminRecord) admin() (Admin, error) {
	pk, err := identity.ParsePublicKey(a.PublicKey)
	if err != nil {
		return Admin{}, err
	}
	return Admin{Name: a.Name, PublicKey: pk, ID: pk.Fingerprint(), AddTime: a.AddTime}, nil
}

func decodeRule(b []byte) (*Rule, error) {
	var r ruleRecord
	if err := strictDecode(b, &r); err != nil {
		return nil, fmt.Errorf("quorum: stored rule: %v", err)
	}
	if r.Format != ruleFormat {
		return nil, fmt.Errorf("quorum: stored rule has format %d, this server reads %d", r.Format, ruleFormat)
	}
	rule := &Rule{Version: r.Version, Threshold: r.Threshold}
	for _, a := range r.Admins {
		ad, err := a.admin()
		if err != nil {
			return nil, fmt.Errorf("quorum: stored rule: admin %q: %v", a.Name, err)
		}
		rule.Admins = append(rule.Admins, ad)
	}
	for _, a := range r.Revoked {
		ad, err := a.admin()
		if err != nil {
			return nil, fmt.Errorf("quorum: stored rule: revoked admin %q: %v", a.Name, err)
		}
		rule.Revoked = append(rule.Revoked, ad)
	}
	if err := checkRule(rule.Threshold, rule.Admins); err != nil {
		return nil, fmt.Errorf("quorum: stored rule: %w", err)
	}
	return rule, nil
}

func (r *Rule) encode() []byte {
	rec := ruleRecord{Format: ruleFormat, Version: r.Version, Threshold: r.Threshold}
	for _, a := range r.Admins {
		rec.Admins = append(rec.Admins, adminRecord{Name: a.Name, PublicKey: a.PublicKey.String(), AddTime: a.AddTime.UTC()})
	}
	for _, a := range r.Revoked {
		rec.Revoked = append(rec.Revoked, adminRecord{Name: a.Name, PublicKey: a.PublicKey.String(), AddTime: a.AddTime.UTC()})
	}
	b, err := json.Marshal(rec)
	if err != nil {
		panic(err) // plain types only
	}
	return b
}

// checkRule enforces what every rule must be: a real quorum (M ≥ 2 unless
// there is a single admin, which only a development set-up has), M ≤ N,
// distinct names and keys.
func checkRule(threshold int, admins []Admin) error {
	n := len(admins)
	if n == 0 || n > MaxAdmins {
		return fmt.Errorf("%w: %d admins (1 to %d)", ErrInvalid, n, MaxAdmins)
	}
	if threshold < 1 || threshold > n {
		return fmt.Errorf("%w: threshold %d of %d admins", ErrInvalid, threshold, n)
	}
	if threshold == 1 && n > 1 {
		return fmt.Errorf("%w: threshold 1 of %d admins would let any one of them act alone; use at least 2", ErrInvalid, n)
	}
	names, ids := map[string]bool{}, map[string]bool{}
	for _, a := range admins {
		if err := validName(a.Name); err != nil {
			return err
		}
		if names[a.Name] || ids[a.ID] {
			return fmt.Errorf("%w: admin %q appears twice (same name or same key)", ErrInvalid, a.Name)
		}
		names[a.Name], ids[a.ID] = true, true
	}
	return nil
}

func validName(s string) error {
	if s == "" || len(s) > 64 {
		return fmt.Errorf("%w: admin name %q: 1 to 64 characters", ErrInvalid, s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '@') {
			return fmt.Errorf("%w: admin name %q: only letters, digits and - _ . @", ErrInvalid, s)
		}
	}
	return nil
}

func (e *Engine) specAdmins(specs []AdminSpec, prev *Rule) ([]Admin, error) {
	now := e.now().UTC()
	var out []Admin
	for _, s := range specs {
		pk, err := identity.ParsePublicKey(s.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("%w: admin %q: %v", ErrInvalid, s.Name, err)
		}
		a := Admin{Name: s.Name, PublicKey: pk, ID: pk.Fingerprint(), AddTime: now}
		if prev != nil {
			if old, ok := prev.admin(a.ID); ok && old.Name == a.Name {
				a.AddTime = old.AddTime
			}
			for _, r := range prev.Revoked {
				if r.ID == a.ID {
					return nil, fmt.Errorf("%w: admin %q's key was revoked; a revoked key never comes back, generate a new one", ErrInvalid, s.Name)
				}
			}
		}
		out = append(out, a)
	}
	return out, checkRule(len(out), out) // count checked again below with the threshold
}

// Init installs the first admin set. It works only while none exists:
// afterwards the rule changes only through a KindSetQuorum proposal.
func (e *Engine) Init(ctx context.Context, args SetQuorumArgs, by string) (*Rule, error) {
	admins, err := e.specAdmins(args.Admins, nil)
	if err != nil {
		return nil, err
	}
	if err := checkRule(args.Threshold, admins); err != nil {
		return nil, err
	}
	rule := &Rule{Version: 1, Threshold: args.Threshold, Admins: admins}
	if _, _, err := e.loadRule(ctx); err == nil {
		return nil, ErrExists
	} else if !errors.Is(err, ErrNoQuorum) {
		return nil, err
	}
	if err := e.auditStep(ctx, Event{Step: "init", Admin: by, Reason: ruleSummary(rule)}); err != nil {
		return nil, err
	}
	if _, err := e.store.CompareAndSwap(ctx, ruleKey, 0, rule.encode()); errors.Is(err, store.ErrConflict) {
		return nil, ErrExists
	} else if err != nil {
		return nil, storeErr(err)
	}
	return rule, nil
}

func ruleSummary(r *Rule) string {
	var names []string
	for _, a := range r.Admins {
		names = append(names, a.Name+" ("+a.ID+")")
	}
	return fmt.Sprintf("quorum v%d: %d of %d: %s", r.Version, r.Threshold, len(r.Admins), strings.Join(names, ", "))
}

// Rule returns the current rule, or ErrNoQuorum.
func (e *Engine) Rule(ctx context.Context) (*Rule, error) {
	r, _, err := e.loadRule(ctx)
	return r, err
}

func (e *Engine) loadRule(ctx context.Context) (*Rule, int64, error) {
	kv, err := e.store.Get(ctx, ruleKey)
	if errors.Is(err, store.ErrNotFound) {
		return nil, 0, ErrNoQuorum
	}
	if err != nil {
		return nil, 0, storeErr(err)
	}
	r, err := decodeRule(kv.Value)
	if err != nil {
		return nil, 0, err
	}
	return r, kv.Revision, nil
}

// DecodeArgs decodes canonical arguments strictly (unknown fields refused);
// executors use it.
func DecodeArgs(raw json.RawMessage, v any) error {
	if err := strictDecode(raw, v); err != nil {
		return fmt.Errorf("%w: arguments: %v", ErrInvalid, err)
	}
	return nil
}

// strictDecode decodes JSON into v, refusing fields v does not have.
func strictDecode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func (e *Engine) validateSetQuorum(ctx context.Context, raw json.RawMessage) error {
	var a SetQuorumArgs
	if err := DecodeArgs(raw, &a); err != nil {
		return err
	}
	prev, _, err := e.loadRule(ctx)
	if err != nil {
		return err
	}
	admins, err := e.specAdmins(a.Admins, prev)
	if err != nil {
		return err
	}
	return checkRule(a.Threshold, admins)
}

func (e *Engine) execSetQuorum(ctx context.Context, raw json.RawMessage) (json.RawMessage, error) {
	var a SetQuorumArgs
	if err := DecodeArgs(raw, &a); err != nil {
		return nil, err
	}
	for range maxCAS {
		prev, rev, err := e.loadRule(ctx)
		if err != nil {
			return nil, err
		}
		admins, err := e.specAdmins(a.Admins, prev)
		if err != nil {
			return nil, err
		}
		if err := checkRule(a.Threshold, admins); err != nil {
			return nil, err
		}
		next := &Rule{Version: prev.Version + 1, Threshold: a.Threshold, Admins: admins, Revoked: prev.Revoked}
		for _, old := range prev.Admins {
			if _, kept := next.admin(old.ID); !kept {
				next.Revoked = append(next.Revoked, old)
			}
		}
		if _, err := e.store.CompareAndSwap(ctx, ruleKey, rev, next.encode()); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return nil, storeErr(err)
		}
		return marshalCanonical(map[string]any{"version": next.Version, "summary": ruleSummary(next)})
	}
	return nil, fmt.Errorf("%w: the rule changed %d times", ErrUnavailable, maxCAS)
}

// proposalRecord is the stored form of a Proposal.
type proposalRecord struct {
	Content   []byte          `json:"content"`
	State     string          `json:"state"`
	Decisions []Decision      `json:"decisions,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     string          `json:"error,omitempty"`
	DoneTime  time.Time       `json:"done_time,omitzero"`
}

func (p *Proposal) encode() []byte {
	b, err := json.Marshal(proposalRecord{Content: p.Content, State: p.State, Decisions: p.Decisions, Result: p.Result, Error: p.Error, DoneTime: p.DoneTime})
	if err != nil {
		panic(err) // plain types only
	}
	return b
}

var states = map[string]bool{StatePending: true, StateExecuting: true, StateExecuted: true, StateFailed: true, StateRejected: true}

// decodeProposal parses a stored proposal. The store is not trusted: the
// key must be the content's hash, and every decision is checked again when
// it counts.
func decodeProposal(key string, b []byte) (*Proposal, error) {
	var r proposalRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("quorum: stored proposal %s: %v", key, err)
	}
	c, err := ParseContent(r.Content)
	if err != nil {
		return nil, fmt.Errorf("quorum: stored proposal %s: %w", key, err)
	}
	h := Hash(r.Content)
	id := hex.EncodeToString(h[:])
	if key != proposalPrefix+id {
		return nil, fmt.Errorf("quorum: stored proposal %s does not hash to its key", key)
	}
	if !states[r.State] {
		return nil, fmt.Errorf("quorum: stored proposal %s: state %q", key, r.State)
	}
	return &Proposal{ID: id, Content: r.Content, Parsed: c, State: r.State, Decisions: r.Decisions, Result: r.Result, Error: r.Error, DoneTime: r.DoneTime}, nil
}
