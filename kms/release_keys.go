package kms

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem"

	"github.com/coffre-kms/coffre/attest"
)

// Release sealing (kms/ENVELOPE.md, "Release sealing"). Attestation is per
// session and release per request, so the public-key work happens once per
// session: at Complete the server runs HPKE base mode to the verified
// binding key and exports the session release key K from that context; the
// node derives the same K from the encapsulation (CompleteResponse
// session_enc) and its binding private key. Each release is then one
// AES-256-GCM seal under K with the release's sequence number as the nonce.
const (
	// releaseKeySize is the size of K: an AES-256 key.
	releaseKeySize = 32
	// MaxReleasesPerSession bounds the releases sealed under one K; past
	// it the session refuses with ErrUnauthenticated and the node attests
	// again. 2^32 keeps each session's K far inside AES-GCM's limits (the
	// nonces are distinct by construction; this bounds the data sealed).
	MaxReleasesPerSession = 1 << 32
)

var (
	// sessionSuite is the HPKE suite of the session set-up, fixed for the
	// whole project: X-Wing (ML-KEM-768 + X25519), HKDF-SHA256,
	// AES-256-GCM, base mode.
	sessionSuite    = hpke.NewSuite(hpke.KEM_XWING, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES256GCM)
	sessionSuiteKEM = hpke.KEM_XWING.Scheme()
	// sessionInfo is the HPKE info of every session set-up: constant, so
	// that the node needs nothing but enc to derive K. Each set-up has its
	// own fresh encapsulation, hence its own K.
	sessionInfo = []byte("coffre session v1")
	// releaseKeyLabel is the exporter context K is exported under.
	releaseKeyLabel = []byte("coffre release key v1")
	// releaseAADLabel starts the associated data of every release seal.
	releaseAADLabel = []byte("coffre release v1")
)

// releaseKey is a session's release key K with the AES-256-GCM AEAD keyed
// with it once, so that a release costs one seal, and the session's
// release counter. It is never stored and never logged (k is a Secret).
type releaseKey struct {
	k    *Secret
	aead cipher.AEAD
	seq  atomic.Uint64 // the last sequence number taken; 0 before the first release
}

// newReleaseKey sets up a session's release key to binding: HPKE base mode
// (sessionSuite, sessionInfo), K = Export(releaseKeyLabel, 32). It returns
// the encapsulation the node needs to derive K.
func newReleaseKey(rand io.Reader, binding kem.PublicKey) (enc []byte, rk *releaseKey, err error) {
	sender, err := sessionSuite.NewSender(binding, sessionInfo)
	if err != nil {
		return nil, nil, fmt.Errorf("kms: HPKE sender: %w", err)
	}
	enc, sealer, err := sender.Setup(rand)
	if err != nil {
		return nil, nil, fmt.Errorf("kms: HPKE setup: %w", err)
	}
	k := NewSecret(sealer.Export(releaseKeyLabel, releaseKeySize))
	block, err := aes.NewCipher(k.Expose())
	if err != nil {
		k.Zero()
		return nil, nil, fmt.Errorf("kms: release key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		k.Zero()
		return nil, nil, fmt.Errorf("kms: release key: %w", err)
	}
	return enc, &releaseKey{k: k, aead: aead}, nil
}

// zero wipes K. The AEAD's key schedule is beyond reach (the Go runtime
// offers no way to wipe it); the session drops its last reference to it
// when it ends, so zeroization is best effort, like every one in Go.
func (rk *releaseKey) zero() { rk.k.Zero() }

// errSessionExhausted refuses a release past MaxReleasesPerSession.
var errSessionExhausted = fmt.Errorf("%w: session exhausted; attest again", ErrUnauthenticated)

// seal seals the 32-byte data key dk of envelope under K with the next
// sequence number.
func (rk *releaseKey) seal(dk, envelope []byte) (*SessionSealed, error) {
	seq := rk.seq.Add(1)
	if seq > MaxReleasesPerSession {
		return nil, errSessionExhausted
	}
	var nonce [12]byte
	binary.BigEndian.PutUint64(nonce[4:], seq)
	// #nosec G407 -- the nonce is seq, taken once per release from the
	// session's counter: unique under K (ENVELOPE.md, "Release sealing").
	ct := rk.aead.Seal(make([]byte, 0, len(dk)+rk.aead.Overhead()), nonce[:], dk, releaseAAD(envelope))
	return &SessionSealed{Seq: seq, Ciphertext: ct}, nil
}

// releaseAAD is "coffre release v1" ‖ u32 len(envelope) ‖ envelope.
func releaseAAD(envelope []byte) []byte {
	aad := make([]byte, 0, len(releaseAADLabel)+4+len(envelope))
	aad = append(aad, releaseAADLabel...)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(envelope))) // #nosec G115 -- both callers hold a parsed envelope, at most MaxEnvelopeSize bytes
	return append(aad, envelope...)
}

// SealedKey is a data key as it leaves Coffre: exactly one of Session and
// TPM is set. Neither holds the key in the clear.
type SealedKey struct {
	Session *SessionSealed
	TPM     *TPMDuplicate
}

// SessionSealed is a data key sealed with AES-256-GCM under the session
// release key: nonce 0^32 ‖ Seq (64 bits, big-endian), associated data
// "coffre release v1" ‖ u32 len(envelope) ‖ envelope.
type SessionSealed struct {
	Seq        uint64 // from 1, distinct within the session
	Ciphertext []byte // 32-byte data key and 16-byte tag
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

// seal seals dk to the session as mode says; envelope is the envelope dk
// belongs to.
func (r *ReleaseService) seal(s sessionView, mode ReleaseMode, dk, envelope []byte) (*SealedKey, error) {
	switch mode {
	case ReleaseHPKE:
		if s.rk == nil {
			return nil, errors.New("kms: session has no release key")
		}
		sealed, err := s.rk.seal(dk, envelope)
		if err != nil {
			return nil, err
		}
		return &SealedKey{Session: sealed}, nil
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
