package kms

import (
	"context"
	"errors"
	"fmt"

	"github.com/cloudflare/circl/hpke"

	"github.com/coffre-kms/coffre/attest"
)

// The HPKE release suite, fixed for the whole project: X-Wing (ML-KEM-768
// + X25519), HKDF-SHA256, AES-256-GCM, base mode, with the envelope the
// data key belongs to as the associated data.
const HPKESuiteName = "X-Wing/HKDF-SHA256/AES-256-GCM"

var (
	releaseSuite    = hpke.NewSuite(hpke.KEM_XWING, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES256GCM)
	releaseSuiteKEM = hpke.KEM_XWING.Scheme()
	// releaseInfo is the HPKE info string of every release.
	releaseInfo = []byte("coffre release v1")
)

// SealedKey is a data key as it leaves Coffre: exactly one of HPKE and TPM
// is set. Neither holds the key in the clear.
type SealedKey struct {
	HPKE *HPKESealed
	TPM  *TPMDuplicate
}

// HPKESealed is a data key sealed with HPKE to the session's binding key.
type HPKESealed struct {
	Suite      string // HPKESuiteName
	Enc        []byte
	Ciphertext []byte
}

// TPMDuplicate is a data key as a TPM duplicate blob under the node's EK,
// with PolicyPCR over the class's reference values (see attest.SealToTPM).
type TPMDuplicate struct {
	Duplicate []byte // TPM2B_PRIVATE contents
	InSymSeed []byte // TPM2B_ENCRYPTED_SECRET contents
	Public    []byte // TPM2B_PUBLIC of the sealed object
}

// ReleasedDataKey is the result of [ReleaseService.GenerateDataKey].
type ReleasedDataKey struct {
	Envelope   []byte
	KeyringID  KeyringID
	KeyVersion uint32
	Key        *SealedKey
}

// ReEncrypted is the result of [ReleaseService.ReEncrypt].
type ReEncrypted struct {
	Envelope   []byte
	KeyringID  KeyringID
	KeyVersion uint32
}

// session finds the live session of token and fills the session's part of
// au; it records the denial when it refuses. It reads only memory.
func (r *ReleaseService) session(ctx context.Context, token string, au *AuditEvent) (sessionView, error) {
	s, err := r.lookup(token, r.now())
	if err != nil {
		return sessionView{}, r.deny(ctx, au, err)
	}
	au.Node, au.Class, au.EKFingerprint, au.EvidenceHash = s.node.Name, s.class.Name, s.node.EKFingerprint, s.evidenceHash
	return s, nil
}

// authorize checks that what session s attested against still holds and
// that the release policy of keyring id (and of dest, unless zero) admits
// its node. It reads only memory, and records the denial when it refuses.
func (r *ReleaseService) authorize(ctx context.Context, s sessionView, au *AuditEvent, id, dest KeyringID) (*KeyringPolicy, error) {
	r.mu.RLock()
	live := r.allLive
	node := r.nodes[s.node.Name].v
	class := r.classes[s.class.Name].v
	pol := r.policies[id].v
	var destPol *KeyringPolicy
	if !dest.IsZero() {
		destPol = r.policies[dest].v
	}
	r.mu.RUnlock()
	if !live {
		return nil, errNotSynced
	}
	if node != s.node || class != s.class {
		reason := "node " + s.node.Name + " or its class changed since it attested; attest again"
		switch {
		case node == nil:
			reason = "node " + s.node.Name + " was removed"
		case node.State == NodeRevoked:
			reason = "node " + s.node.Name + " was revoked"
		}
		return nil, r.deny(ctx, au, fmt.Errorf("%w: session ended: %s", ErrPermissionDenied, reason))
	}
	if err := admit(id, pol, s.node.Name, s.class.Name, s.node.Labels); err != nil {
		return nil, r.deny(ctx, au, err)
	}
	if !dest.IsZero() && dest != id {
		if err := admit(dest, destPol, s.node.Name, s.class.Name, s.node.Labels); err != nil {
			return nil, r.deny(ctx, au, err)
		}
	}
	return pol, nil
}

// GenerateDataKey makes a data key under keyring id for the node of the
// session token, after checking the keyring's release policy, and returns
// its envelope with the key sealed as the policy says. The plaintext key is
// zeroized before returning.
func (r *ReleaseService) GenerateDataKey(ctx context.Context, token string, id KeyringID, ec map[string]string) (*ReleasedDataKey, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	au := &AuditEvent{Op: AuditGenerateDataKey, Keyring: id}
	s, err := r.session(ctx, token, au)
	if err != nil {
		return nil, err
	}
	pol, err := r.authorize(ctx, s, au, id, KeyringID{})
	if err != nil {
		return nil, err
	}
	dk, err := r.svc.GenerateDataKey(ctx, id, ec)
	if err != nil {
		return nil, r.deny(ctx, au, err)
	}
	defer dk.Plaintext.Zero()
	au.KeyVersion = dk.KeyVersion
	sealed, err := r.seal(s, pol.Release, dk.Plaintext.Expose(), dk.Envelope)
	if err != nil {
		return nil, r.deny(ctx, au, err)
	}
	if err := r.allow(ctx, au); err != nil {
		return nil, err
	}
	return &ReleasedDataKey{Envelope: dk.Envelope, KeyringID: id, KeyVersion: dk.KeyVersion, Key: sealed}, nil
}

// Decrypt opens envelope for the node of the session token and returns its
// data key sealed as the keyring's policy says. The keyring is the one the
// envelope's header names, and its policy must admit the node before the
// envelope is opened, with that keyring's tenant: a node admitted by tenant
// B's keyrings cannot open tenant A's envelopes.
func (r *ReleaseService) Decrypt(ctx context.Context, token string, envelope []byte, ec map[string]string) (*SealedKey, error) {
	au := &AuditEvent{Op: AuditDecrypt}
	s, err := r.session(ctx, token, au)
	if err != nil {
		return nil, err
	}
	info, err := ParseEnvelopeInfo(envelope)
	if err != nil {
		return nil, err
	}
	au.Keyring, au.KeyVersion = info.Keyring, info.KeyVersion
	pol, err := r.authorize(ctx, s, au, info.Keyring, KeyringID{})
	if err != nil {
		return nil, err
	}
	key, err := r.svc.Decrypt(ctx, info.Keyring.Tenant, envelope, ec)
	if err != nil {
		return nil, r.deny(ctx, au, err)
	}
	defer key.Zero()
	sealed, err := r.seal(s, pol.Release, key.Expose(), envelope)
	if err != nil {
		return nil, r.deny(ctx, au, err)
	}
	if err := r.allow(ctx, au); err != nil {
		return nil, err
	}
	return sealed, nil
}

// ReEncrypt moves envelope to the primary KEK of dest (the envelope's own
// keyring when dest is zero; another keyring of the same tenant otherwise)
// for the node of the session token. The policies of both keyrings must
// admit the node. No key leaves the service.
func (r *ReleaseService) ReEncrypt(ctx context.Context, token string, envelope []byte, ec map[string]string, dest KeyringID, destEC map[string]string) (*ReEncrypted, error) {
	au := &AuditEvent{Op: AuditReEncrypt}
	s, err := r.session(ctx, token, au)
	if err != nil {
		return nil, err
	}
	info, err := ParseEnvelopeInfo(envelope)
	if err != nil {
		return nil, err
	}
	if dest.IsZero() {
		dest = info.Keyring
	} else if err := dest.Validate(); err != nil {
		return nil, err
	}
	au.Keyring, au.KeyVersion = info.Keyring, info.KeyVersion
	if _, err := r.authorize(ctx, s, au, info.Keyring, dest); err != nil {
		return nil, err
	}
	out, err := r.svc.ReEncrypt(ctx, info.Keyring.Tenant, envelope, ec, dest, destEC)
	if err != nil {
		return nil, r.deny(ctx, au, err)
	}
	ni, err := ParseEnvelopeInfo(out)
	if err != nil {
		return nil, fmt.Errorf("kms: re-encrypted envelope does not parse: %w", err)
	}
	au.Keyring, au.KeyVersion = ni.Keyring, ni.KeyVersion
	if err := r.allow(ctx, au); err != nil {
		return nil, err
	}
	return &ReEncrypted{Envelope: out, KeyringID: ni.Keyring, KeyVersion: ni.KeyVersion}, nil
}

// allow records an allowed release; if the record fails, nothing is
// released.
func (r *ReleaseService) allow(ctx context.Context, au *AuditEvent) error {
	au.Allowed = true
	if err := r.record(ctx, au); err != nil {
		return fmt.Errorf("%w: audit: %w", ErrUnavailable, err)
	}
	return nil
}

// seal seals dk to the session as mode says; aad is the envelope dk
// belongs to.
func (r *ReleaseService) seal(s sessionView, mode ReleaseMode, dk, aad []byte) (*SealedKey, error) {
	switch mode {
	case ReleaseHPKE:
		if s.binding == nil {
			return nil, errors.New("kms: session has no binding key")
		}
		sender, err := releaseSuite.NewSender(s.binding, releaseInfo)
		if err != nil {
			return nil, fmt.Errorf("kms: HPKE sender: %w", err)
		}
		enc, sealer, err := sender.Setup(r.rand)
		if err != nil {
			return nil, fmt.Errorf("kms: HPKE setup: %w", err)
		}
		ct, err := sealer.Seal(dk, aad)
		if err != nil {
			return nil, fmt.Errorf("kms: HPKE seal: %w", err)
		}
		return &SealedKey{HPKE: &HPKESealed{Suite: HPKESuiteName, Enc: enc, Ciphertext: ct}}, nil
	case ReleaseTPM:
		if s.ek == nil || s.ek.Public == nil {
			return nil, errors.New("kms: session has no EK public area")
		}
		pub, dup, seed, err := attest.SealToTPM(r.rand, s.ek, s.pcrs, dk)
		if err != nil {
			return nil, fmt.Errorf("kms: TPM seal: %w", err)
		}
		return &SealedKey{TPM: &TPMDuplicate{Duplicate: dup, InSymSeed: seed, Public: pub}}, nil
	default:
		return nil, fmt.Errorf("kms: unknown release mode %v", mode)
	}
}
