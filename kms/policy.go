package kms

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
)

// ReleaseMode says how a keyring's data keys leave Coffre.
type ReleaseMode int

// Release modes.
const (
	ReleaseUnspecified ReleaseMode = iota
	// ReleaseHPKE seals the data key under the session release key, which
	// only the holder of the session's binding key can derive (one HPKE
	// X-Wing set-up at attestation; see ENVELOPE.md, "Release sealing").
	ReleaseHPKE
	// ReleaseTPM returns the data key as a TPM duplicate blob under the
	// node's EK with PolicyPCR: only that TPM, in the class's PCR state,
	// can import and unseal it.
	ReleaseTPM
)

var releaseModeNames = map[ReleaseMode]string{ReleaseHPKE: "hpke", ReleaseTPM: "tpm"}

// String returns "hpke" or "tpm".
func (m ReleaseMode) String() string {
	if n, ok := releaseModeNames[m]; ok {
		return n
	}
	return fmt.Sprintf("ReleaseMode(%d)", int(m))
}

// ParseReleaseMode parses "hpke" or "tpm".
func ParseReleaseMode(s string) (ReleaseMode, error) {
	for k, v := range releaseModeNames {
		if v == s {
			return k, nil
		}
	}
	return ReleaseUnspecified, fmt.Errorf("%w: release %q: want hpke or tpm", ErrInvalidArgument, s)
}

// MaxAllowedClasses bounds the classes a keyring policy names.
const MaxAllowedClasses = 64

// KeyringPolicy says which attested nodes may receive a keyring's data
// keys, and how. A keyring without a policy releases to nobody.
type KeyringPolicy struct {
	Keyring KeyringID
	// AllowedClasses are the node classes admitted; empty admits none.
	AllowedClasses []string
	// RequiredLabels must all be carried by the node with exactly these
	// values (for example jurisdiction=ca-qc).
	RequiredLabels map[string]string
	Release        ReleaseMode
	UpdateTime     time.Time
}

func policyKey(id KeyringID) string { return policyPrefix + id.Tenant + "/" + id.Name }

func (p *KeyringPolicy) validate() error {
	if err := p.Keyring.Validate(); err != nil {
		return err
	}
	if len(p.AllowedClasses) > MaxAllowedClasses {
		return fmt.Errorf("%w: policy names %d classes, at most %d are allowed", ErrInvalidArgument, len(p.AllowedClasses), MaxAllowedClasses)
	}
	seen := make(map[string]bool, len(p.AllowedClasses))
	for _, c := range p.AllowedClasses {
		if err := ValidateClassName(c); err != nil {
			return err
		}
		if seen[c] {
			return fmt.Errorf("%w: class %s is named twice", ErrInvalidArgument, c)
		}
		seen[c] = true
	}
	if err := ValidateLabels(p.RequiredLabels); err != nil {
		return err
	}
	if _, ok := releaseModeNames[p.Release]; !ok {
		return fmt.Errorf("%w: release must be hpke or tpm", ErrInvalidArgument)
	}
	return nil
}

type policyRecord struct {
	Format         int               `json:"format"`
	Tenant         string            `json:"tenant"`
	Name           string            `json:"name"`
	AllowedClasses []string          `json:"allowed_classes"`
	RequiredLabels map[string]string `json:"required_labels"`
	Release        string            `json:"release"`
	UpdateTime     time.Time         `json:"update_time"`
}

func encodePolicy(p *KeyringPolicy) []byte {
	return mustJSON(policyRecord{
		Format:         releaseRecordFormat,
		Tenant:         p.Keyring.Tenant,
		Name:           p.Keyring.Name,
		AllowedClasses: p.AllowedClasses,
		RequiredLabels: p.RequiredLabels,
		Release:        p.Release.String(),
		UpdateTime:     p.UpdateTime,
	})
}

func decodePolicy(key string, b []byte) (*KeyringPolicy, error) {
	var r policyRecord
	if err := strictJSON(b, &r); err != nil {
		return nil, fmt.Errorf("kms: stored policy %s: %v", key, err)
	}
	if r.Format != releaseRecordFormat {
		return nil, fmt.Errorf("kms: stored policy %s: format %d, this server reads %d", key, r.Format, releaseRecordFormat)
	}
	id := KeyringID{Tenant: r.Tenant, Name: r.Name}
	if id.Validate() != nil || policyKey(id) != key {
		return nil, fmt.Errorf("kms: stored policy %s names %s", key, id)
	}
	mode, err := ParseReleaseMode(r.Release)
	if err != nil {
		return nil, fmt.Errorf("kms: stored policy %s: %v", key, err)
	}
	if r.RequiredLabels == nil {
		r.RequiredLabels = map[string]string{}
	}
	p := &KeyringPolicy{Keyring: id, AllowedClasses: r.AllowedClasses, RequiredLabels: r.RequiredLabels, Release: mode, UpdateTime: r.UpdateTime}
	if err := p.validate(); err != nil {
		return nil, fmt.Errorf("kms: stored policy %s: %v", key, err)
	}
	return p, nil
}

// SetKeyringPolicy creates or replaces the release policy of a keyring. The
// keyring and every class named must exist. The new policy applies to the
// next release on every Coffre node (through the store watch): policies
// are checked per request, not per session.
func (r *ReleaseService) SetKeyringPolicy(ctx context.Context, p *KeyringPolicy) (*KeyringPolicy, error) {
	if p == nil {
		return nil, fmt.Errorf("%w: policy is missing", ErrInvalidArgument)
	}
	np := &KeyringPolicy{
		Keyring:        p.Keyring,
		AllowedClasses: slices.Clone(p.AllowedClasses),
		RequiredLabels: copyLabels(p.RequiredLabels),
		Release:        p.Release,
		UpdateTime:     r.now().UTC(),
	}
	if np.AllowedClasses == nil {
		np.AllowedClasses = []string{}
	}
	sort.Strings(np.AllowedClasses)
	if err := np.validate(); err != nil {
		return nil, err
	}
	if _, err := r.svc.GetKeyring(ctx, np.Keyring); err != nil {
		return nil, err
	}
	for _, c := range np.AllowedClasses {
		if _, err := r.GetNodeClass(ctx, c); errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("%w: class %s does not exist; set it first", ErrFailedPrecondition, c)
		} else if err != nil {
			return nil, err
		}
	}
	key := policyKey(np.Keyring)
	val := encodePolicy(np)
	rev, err := r.store.Put(ctx, key, val)
	if err != nil {
		return nil, storeErr(err)
	}
	r.observeLocal(key, val, rev)
	return np, nil
}

// GetKeyringPolicy returns the release policy of keyring id, read from the
// store; ErrNotFound when it has none.
func (r *ReleaseService) GetKeyringPolicy(ctx context.Context, id KeyringID) (*KeyringPolicy, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	key := policyKey(id)
	kv, err := r.store.Get(ctx, key)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: keyring %s has no release policy", ErrNotFound, id)
	}
	if err != nil {
		return nil, storeErr(err)
	}
	return decodePolicy(key, kv.Value)
}

// admit decides whether policy p (nil: none) lets a node of class with
// labels receive keys of keyring id. It is the one policy decision of the
// release path; it touches nothing but its arguments.
func admit(id KeyringID, p *KeyringPolicy, node, class string, labels map[string]string) error {
	if p == nil {
		return fmt.Errorf("%w: keyring %s has no release policy", ErrPermissionDenied, id)
	}
	if !slices.Contains(p.AllowedClasses, class) {
		allowed := "none"
		if len(p.AllowedClasses) > 0 {
			allowed = strings.Join(p.AllowedClasses, ", ")
		}
		return fmt.Errorf("%w: keyring %s does not release to class %s of node %s (allowed classes: %s)", ErrPermissionDenied, id, class, node, allowed)
	}
	// Of the unmet labels, the first in key order is named, so that the
	// refusal is the same every time; the loop allocates nothing.
	failed := ""
	for k, want := range p.RequiredLabels {
		if got, ok := labels[k]; (!ok || got != want) && (failed == "" || k < failed) {
			failed = k
		}
	}
	if failed != "" {
		want := p.RequiredLabels[failed]
		if got, ok := labels[failed]; ok {
			return fmt.Errorf("%w: keyring %s requires label %s=%s; node %s has %s=%s", ErrPermissionDenied, id, failed, want, node, failed, got)
		}
		return fmt.Errorf("%w: keyring %s requires label %s=%s; node %s has no label %s", ErrPermissionDenied, id, failed, want, node, failed)
	}
	return nil
}
