package server

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/coffre-kms/coffre/attest"
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

		RotationPeriodSeconds: uint64(max(k.RotationPeriod/time.Second, 0)), // #nosec G115 -- non-negative
		NextRotationTime:      timeToProto(k.NextRotationTime),
		MinDecryptionVersion:  k.MinDecryptionVersion,
	}
	for _, v := range k.Versions {
		p.Versions = append(p.Versions, &coffrev1.KeyVersion{
			Version:     v.Version,
			State:       keyStateToProto(v.State),
			CreateTime:  timeToProto(v.CreateTime),
			RootId:      v.RootID,
			DestroyTime: timeToProto(v.DestroyTime),
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

		RotationPeriod:       time.Duration(min(p.GetRotationPeriodSeconds(), uint64(1<<62)/uint64(time.Second))) * time.Second, // #nosec G115 -- bounded above
		NextRotationTime:     timeFromProto(p.GetNextRotationTime()),
		MinDecryptionVersion: p.GetMinDecryptionVersion(),
	}
	for _, v := range p.GetVersions() {
		st, err := keyStateFromProto(v.GetState())
		if err != nil {
			return nil, fmt.Errorf("keyring %q version %d: %w", p.GetId(), v.GetVersion(), err)
		}
		k.Versions = append(k.Versions, kms.KeyVersion{
			Version:     v.GetVersion(),
			State:       st,
			CreateTime:  timeFromProto(v.GetCreateTime()),
			RootID:      v.GetRootId(),
			DestroyTime: timeFromProto(v.GetDestroyTime()),
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
	case kms.StateDisabled:
		return coffrev1.KeyState_KEY_STATE_DISABLED
	case kms.StateDestroyScheduled:
		return coffrev1.KeyState_KEY_STATE_DESTROY_SCHEDULED
	case kms.StateDestroyed:
		return coffrev1.KeyState_KEY_STATE_DESTROYED
	case kms.StateCompromised:
		return coffrev1.KeyState_KEY_STATE_COMPROMISED
	case kms.StatePreActive:
		return coffrev1.KeyState_KEY_STATE_PRE_ACTIVE
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
	case coffrev1.KeyState_KEY_STATE_DISABLED:
		return kms.StateDisabled, nil
	case coffrev1.KeyState_KEY_STATE_DESTROY_SCHEDULED:
		return kms.StateDestroyScheduled, nil
	case coffrev1.KeyState_KEY_STATE_DESTROYED:
		return kms.StateDestroyed, nil
	case coffrev1.KeyState_KEY_STATE_COMPROMISED:
		return kms.StateCompromised, nil
	case coffrev1.KeyState_KEY_STATE_PRE_ACTIVE:
		return kms.StatePreActive, nil
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

// ---- attested release ----

// maxPCRValues bounds the PCR values a node may send: a PC-client TPM has
// 24 PCRs per bank.
const maxPCRValues = 24

// SealedKeyToProto converts a sealed data key to its wire form.
func SealedKeyToProto(k *kms.SealedKey) *coffrev1.SealedKey {
	switch {
	case k == nil:
		return nil
	case k.Session != nil:
		return &coffrev1.SealedKey{Seal: &coffrev1.SealedKey_Session{Session: &coffrev1.SessionSealed{
			Seq: k.Session.Seq, Ciphertext: k.Session.Ciphertext,
		}}}
	case k.TPM != nil:
		return &coffrev1.SealedKey{Seal: &coffrev1.SealedKey_Tpm{Tpm: &coffrev1.TPMDuplicate{
			Duplicate: k.TPM.Duplicate, InSymSeed: k.TPM.InSymSeed, Public: k.TPM.Public,
		}}}
	default:
		return nil
	}
}

// EKRootToProto describes an EK root.
func EKRootToProto(r *kms.EKRoot) *coffrev1.EKRoot {
	if r == nil {
		return nil
	}
	return &coffrev1.EKRoot{Fingerprint: r.Fingerprint, Subject: r.Subject, NotAfter: timeToProto(r.NotAfter)}
}

// NodeClassToProto converts a node class, PCRs in increasing order.
func NodeClassToProto(c *kms.NodeClass) *coffrev1.NodeClass {
	if c == nil {
		return nil
	}
	p := &coffrev1.NodeClass{Name: c.Name, RequireEventLog: c.RequireEventLog}
	for _, i := range c.PCRIndices() {
		p.Pcrs = append(p.Pcrs, &coffrev1.PCRReference{Index: i, Sha256: c.PCRs[i]})
	}
	return p
}

// NodeClassFromProto converts the wire form of a class; the kms service
// validates the values, this refuses only what a map cannot hold (a PCR
// given twice).
func NodeClassFromProto(p *coffrev1.NodeClass) (*kms.NodeClass, error) {
	if p == nil {
		return nil, fmt.Errorf("%w: class is missing", kms.ErrInvalidArgument)
	}
	if len(p.GetPcrs()) > maxPCRValues {
		return nil, fmt.Errorf("%w: class has %d PCR references, at most %d", kms.ErrInvalidArgument, len(p.GetPcrs()), maxPCRValues)
	}
	c := &kms.NodeClass{Name: p.GetName(), RequireEventLog: p.GetRequireEventLog(), PCRs: make(map[uint32][]byte, len(p.GetPcrs()))}
	for _, r := range p.GetPcrs() {
		if _, dup := c.PCRs[r.GetIndex()]; dup {
			return nil, fmt.Errorf("%w: PCR %d is given twice", kms.ErrInvalidArgument, r.GetIndex())
		}
		c.PCRs[r.GetIndex()] = r.GetSha256()
	}
	return c, nil
}

func nodeStateToProto(s kms.NodeState) coffrev1.NodeState {
	switch s {
	case kms.NodeEnrolled:
		return coffrev1.NodeState_NODE_STATE_ENROLLED
	case kms.NodeRevoked:
		return coffrev1.NodeState_NODE_STATE_REVOKED
	default:
		return coffrev1.NodeState_NODE_STATE_UNSPECIFIED
	}
}

// NodeToProto describes a node. Its ek_fingerprint is the project's EK
// fingerprint: SHA-256 of the PKIX DER of the EK public key.
func NodeToProto(n *kms.Node) *coffrev1.Node {
	if n == nil {
		return nil
	}
	return &coffrev1.Node{
		Name:          n.Name,
		Class:         n.Class,
		Labels:        n.Labels,
		State:         nodeStateToProto(n.State),
		EkFingerprint: n.EKFingerprint,
		EnrollTime:    timeToProto(n.EnrollTime),
		RevokeTime:    timeToProto(n.RevokeTime),
	}
}

func releaseToProto(m kms.ReleaseMode) coffrev1.Release {
	switch m {
	case kms.ReleaseHPKE:
		return coffrev1.Release_RELEASE_HPKE
	case kms.ReleaseTPM:
		return coffrev1.Release_RELEASE_TPM
	default:
		return coffrev1.Release_RELEASE_UNSPECIFIED
	}
}

func releaseFromProto(r coffrev1.Release) (kms.ReleaseMode, error) {
	switch r {
	case coffrev1.Release_RELEASE_HPKE:
		return kms.ReleaseHPKE, nil
	case coffrev1.Release_RELEASE_TPM:
		return kms.ReleaseTPM, nil
	default:
		return 0, fmt.Errorf("%w: release must be RELEASE_HPKE or RELEASE_TPM", kms.ErrInvalidArgument)
	}
}

// KeyringPolicyToProto converts a keyring policy.
func KeyringPolicyToProto(p *kms.KeyringPolicy) *coffrev1.KeyringPolicy {
	if p == nil {
		return nil
	}
	return &coffrev1.KeyringPolicy{
		Keyring:        p.Keyring.String(),
		AllowedClasses: p.AllowedClasses,
		RequiredLabels: p.RequiredLabels,
		Release:        releaseToProto(p.Release),
	}
}

// KeyringPolicyFromProto converts the wire form of a policy; the kms
// service validates it.
func KeyringPolicyFromProto(p *coffrev1.KeyringPolicy) (*kms.KeyringPolicy, error) {
	if p == nil {
		return nil, fmt.Errorf("%w: policy is missing", kms.ErrInvalidArgument)
	}
	id, err := kms.ParseKeyringID(p.GetKeyring())
	if err != nil {
		return nil, err
	}
	mode, err := releaseFromProto(p.GetRelease())
	if err != nil {
		return nil, err
	}
	return &kms.KeyringPolicy{Keyring: id, AllowedClasses: p.GetAllowedClasses(), RequiredLabels: p.GetRequiredLabels(), Release: mode}, nil
}

// EvidenceFromProto converts a CompleteRequest into attestation evidence.
// Everything in it is outside input; attest.Verify checks the content,
// this refuses only what the evidence type cannot hold.
func EvidenceFromProto(req *coffrev1.CompleteRequest) (*attest.Evidence, error) {
	if len(req.GetPcrs()) > maxPCRValues {
		return nil, fmt.Errorf("%w: %d PCR values, at most %d", kms.ErrInvalidArgument, len(req.GetPcrs()), maxPCRValues)
	}
	pcrs := make(map[uint32][]byte, len(req.GetPcrs()))
	for _, v := range req.GetPcrs() {
		if _, dup := pcrs[v.GetIndex()]; dup {
			return nil, fmt.Errorf("%w: PCR %d is given twice", kms.ErrInvalidArgument, v.GetIndex())
		}
		pcrs[v.GetIndex()] = v.GetSha256()
	}
	return &attest.Evidence{
		ActivatedSecret: req.GetActivatedSecret(),
		AKPublic:        req.GetAkPublic(),
		Quote:           req.GetQuote(),
		Signature:       req.GetSignature(),
		PCRs:            pcrs,
		EventLog:        req.GetEventLog(),
		BindingKey:      req.GetBindingPublicKey(),
	}, nil
}
