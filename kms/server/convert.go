package server

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/coffre-kms/coffre/kms"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// KeyringToProto converts a keyring description to its wire form. Neither
// form holds key material.
func KeyringToProto(k *kms.Keyring) *coffrev1.Keyring {
	if k == nil {
		return nil
	}
	p := &coffrev1.Keyring{
		Id:             k.ID.String(),
		Tenant:         k.ID.Tenant,
		Name:           k.ID.Name,
		CreateTime:     timeToProto(k.CreateTime),
		PrimaryVersion: k.Primary,
		Versions:       make([]*coffrev1.KeyVersion, 0, len(k.Versions)),
	}
	for _, v := range k.Versions {
		p.Versions = append(p.Versions, &coffrev1.KeyVersion{
			Version:    v.Version,
			State:      keyStateToProto(v.State),
			CreateTime: timeToProto(v.CreateTime),
			RootId:     v.RootID,
		})
	}
	return p
}

// KeyringFromProto converts the wire form back, for clients. The wire form
// comes from outside, so it is checked: the id must parse and agree with
// the tenant and name fields, and every state must be known.
func KeyringFromProto(p *coffrev1.Keyring) (*kms.Keyring, error) {
	if p == nil {
		return nil, fmt.Errorf("keyring: missing")
	}
	id, err := kms.ParseKeyringID(p.GetId())
	if err != nil {
		return nil, fmt.Errorf("keyring id: %w", err)
	}
	if id.Tenant != p.GetTenant() || id.Name != p.GetName() {
		return nil, fmt.Errorf("keyring %q: tenant %q and name %q do not match the id", p.GetId(), p.GetTenant(), p.GetName())
	}
	k := &kms.Keyring{
		ID:         id,
		CreateTime: timeFromProto(p.GetCreateTime()),
		Primary:    p.GetPrimaryVersion(),
		Versions:   make([]kms.KeyVersion, 0, len(p.GetVersions())),
	}
	for _, v := range p.GetVersions() {
		st, err := keyStateFromProto(v.GetState())
		if err != nil {
			return nil, fmt.Errorf("keyring %q version %d: %w", p.GetId(), v.GetVersion(), err)
		}
		k.Versions = append(k.Versions, kms.KeyVersion{
			Version:    v.GetVersion(),
			State:      st,
			CreateTime: timeFromProto(v.GetCreateTime()),
			RootID:     v.GetRootId(),
		})
	}
	return k, nil
}

func keyStateToProto(s kms.KeyState) coffrev1.KeyState {
	switch s {
	case kms.StateActive:
		return coffrev1.KeyState_KEY_STATE_ACTIVE
	case kms.StateDeactivated:
		return coffrev1.KeyState_KEY_STATE_DEACTIVATED
	default:
		return coffrev1.KeyState_KEY_STATE_UNSPECIFIED
	}
}

func keyStateFromProto(s coffrev1.KeyState) (kms.KeyState, error) {
	switch s {
	case coffrev1.KeyState_KEY_STATE_ACTIVE:
		return kms.StateActive, nil
	case coffrev1.KeyState_KEY_STATE_DEACTIVATED:
		return kms.StateDeactivated, nil
	case coffrev1.KeyState_KEY_STATE_UNSPECIFIED:
		return kms.StateUnspecified, nil
	default:
		return 0, fmt.Errorf("unknown key state %d", int32(s))
	}
}

// timeToProto leaves an unset time unset rather than sending year 1.
func timeToProto(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func timeFromProto(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}
