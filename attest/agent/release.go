package agent

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem/xwing"
	"github.com/google/go-tpm/tpm2"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// The release sealing convention, shared with the server (kms/ENVELOPE.md,
// "Release sealing"): at Complete the server runs HPKE base mode to the
// binding key once and sends the encapsulation (CompleteResponse
// session_enc); both sides export the session release key K from that HPKE
// context, and every HPKE-mode release of the session is one AES-256-GCM
// seal under K (SessionSealed), its sequence number the nonce and its
// envelope in the associated data.
const (
	// DataKeySize is the size of a released data key (AES-256).
	DataKeySize = 32
	// SessionEncSize is the size of CompleteResponse.session_enc: an
	// X-Wing ciphertext.
	SessionEncSize = xwing.CiphertextSize
	// maxReleaseSeq is the largest sequence number a server seals under
	// one session key; past it the session must attest again.
	maxReleaseSeq  = 1 << 32
	releaseKeySize = 32
	gcmTagSize     = 16
)

var (
	sessionSuite = hpke.NewSuite(hpke.KEM_XWING, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES256GCM)
	// sessionInfo is the HPKE info of the session set-up; constant, so
	// that enc is all the node needs.
	sessionInfo = []byte("coffre session v1")
	// releaseKeyLabel is the exporter context of K.
	releaseKeyLabel = []byte("coffre release key v1")
	// releaseAADLabel starts the associated data of every release seal:
	// it keeps a sealed data key from being taken for any other message
	// under K.
	releaseAADLabel = []byte("coffre release v1")
)

// SessionKey is a session's release key K, derived by
// [Agent.DeriveSessionKey], with its AES-256-GCM AEAD keyed once. It
// opens the data keys released on that session and nothing else. It never
// prints (String, GoString and Format redact) and is wiped by Zero, or by
// the Agent's Close; after that every Open fails. It is safe for
// concurrent use.
type SessionKey struct {
	mu   sync.RWMutex
	k    []byte
	aead cipher.AEAD
	// gone is why the key is unusable (ErrOpen after Zero, ErrClosed
	// after Agent.Close); nil while it is usable.
	gone  error
	agent *Agent // whose Close wipes it; nil for keys made in tests
}

// DeriveSessionKey derives the session release key from enc, the
// CompleteResponse.session_enc of the session: HPKE base mode receiver
// (X-Wing/HKDF-SHA256/AES-256-GCM, info "coffre session v1") with this
// Agent's binding private key, then K = Export("coffre release key v1",
// 32). X-Wing decapsulation rejects implicitly: an enc that was not made
// to this binding key yields a key that opens nothing. The key is wiped by
// its Zero or by Close, whichever comes first.
func (a *Agent) DeriveSessionKey(enc []byte) (*SessionKey, error) {
	if len(enc) != SessionEncSize {
		return nil, fmt.Errorf("%w: session_enc of %d bytes, want %d", ErrMalformed, len(enc), SessionEncSize)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.bindingSK == nil {
		return nil, ErrClosed
	}
	r, err := sessionSuite.NewReceiver(a.bindingSK, sessionInfo)
	if err != nil {
		return nil, fmt.Errorf("agent: HPKE receiver: %w", err)
	}
	o, err := r.Setup(enc)
	if err != nil {
		return nil, fmt.Errorf("%w: session_enc: %w", ErrMalformed, err)
	}
	k, err := newSessionKey(o.Export(releaseKeyLabel, releaseKeySize))
	if err != nil {
		return nil, err
	}
	k.agent = a
	if a.sessionKeys == nil {
		a.sessionKeys = map[*SessionKey]struct{}{}
	}
	a.sessionKeys[k] = struct{}{}
	return k, nil
}

// newSessionKey keys the AEAD with k, which it takes ownership of.
func newSessionKey(k []byte) (*SessionKey, error) {
	block, err := aes.NewCipher(k)
	if err != nil {
		clear(k)
		return nil, fmt.Errorf("agent: session key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		clear(k)
		return nil, fmt.Errorf("agent: session key: %w", err)
	}
	return &SessionKey{k: k, aead: aead}, nil
}

// Open opens a data key released on this key's session, with the envelope
// it belongs to: a sealed key presented with another envelope, or from
// another session, does not open. Every failure is ErrOpen (ErrClosed once
// the Agent is closed).
func (k *SessionKey) Open(sealed *coffrev1.SessionSealed, envelope []byte) ([]byte, error) {
	if k == nil || sealed == nil {
		return nil, ErrOpen
	}
	seq, ct := sealed.GetSeq(), sealed.GetCiphertext()
	if seq == 0 || seq > maxReleaseSeq || len(ct) != DataKeySize+gcmTagSize || uint64(len(envelope)) > math.MaxUint32 {
		return nil, ErrOpen
	}
	var nonce [12]byte
	binary.BigEndian.PutUint64(nonce[4:], seq)
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.gone != nil {
		return nil, k.gone
	}
	key, err := k.aead.Open(make([]byte, 0, DataKeySize), nonce[:], ct, releaseAAD(envelope))
	if err != nil || len(key) != DataKeySize {
		return nil, ErrOpen
	}
	return key, nil
}

// releaseAAD is "coffre release v1" ‖ u32 len(envelope) ‖ envelope; the
// caller has checked that the length fits.
func releaseAAD(envelope []byte) []byte {
	aad := make([]byte, 0, len(releaseAADLabel)+4+len(envelope))
	aad = append(aad, releaseAADLabel...)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(envelope))) // #nosec G115 -- Open refuses longer envelopes
	return append(aad, envelope...)
}

// Zero wipes the key; every later Open fails with ErrOpen. The AEAD's key
// schedule is beyond reach (the Go runtime offers no way to wipe it) and
// is dropped here, so zeroization is best effort, like every one in Go.
func (k *SessionKey) Zero() {
	if k == nil {
		return
	}
	k.wipe(ErrOpen)
	if a := k.agent; a != nil {
		a.mu.Lock()
		delete(a.sessionKeys, k)
		a.mu.Unlock()
	}
}

func (k *SessionKey) wipe(why error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.gone != nil {
		return
	}
	clear(k.k)
	k.k, k.aead, k.gone = nil, nil, why
}

const redacted = "agent.SessionKey[redacted]"

// String keeps the key out of logs.
func (k *SessionKey) String() string { return redacted }

// GoString keeps the key out of %#v.
func (k *SessionKey) GoString() string { return redacted }

// Format prints the same for every verb, %x and %v included.
func (k *SessionKey) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redacted)) }

// OpenTPM imports a TPM-bound data key (a duplicate of a sealed-data
// object made under this TPM's EK), loads it and unseals it with a
// PolicyPCR session over pcrs: the TPM gives the key out only if its PCRs
// are in the state the object's policy names. Everything loaded is
// flushed on every path. A refusal from the TPM is ErrOpen; a refusal
// because of the PCR state is also ErrPCRPolicy.
func (a *Agent) OpenTPM(ctx context.Context, d *coffrev1.TPMDuplicate, pcrs []uint32) ([]byte, error) {
	if d == nil {
		return nil, fmt.Errorf("%w: no TPM duplicate", ErrMalformed)
	}
	pub, err := parseSealedPublic(d.GetPublic())
	if err != nil {
		return nil, fmt.Errorf("%w: TPM duplicate public area: %w", ErrMalformed, err)
	}
	dup, err := unwrapTPM2BBlob(d.GetDuplicate(), maxPrivate)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM duplicate: %w", ErrMalformed, err)
	}
	sorted, err := checkPCRs(pcrs)
	if err != nil {
		return nil, err
	}
	if len(sorted) == 0 {
		return nil, fmt.Errorf("%w: a TPM-bound key needs the PCRs of its policy", ErrPCRSelection)
	}
	if err := a.lock(); err != nil {
		return nil, err
	}
	defer a.mu.Unlock()
	seed, err := unwrapEncryptedSecret(d.GetInSymSeed(), a.ekPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM duplicate seed: %w", ErrMalformed, err)
	}
	ct, cancel := a.cleanup(ctx)
	defer cancel()
	t := ctxTPM{ctx, a.tpm}
	pub2b := tpm2.New2B(*pub)

	sess, sh, err := endorsementSession(t)
	if sh != 0 {
		defer func() { _ = flush(ct, sh) }()
	}
	if err != nil {
		return nil, fmt.Errorf("agent: TPM release: %w", err)
	}
	imp, err := tpm2.Import{
		ParentHandle: tpm2.AuthHandle{Handle: a.ek.Handle, Name: a.ek.Name, Auth: sess},
		ObjectPublic: pub2b,
		Duplicate:    tpm2.TPM2BPrivate{Buffer: dup},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: seed},
		Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
	}.Execute(t)
	if err != nil {
		return nil, tpmRefusal("import", err)
	}

	sess2, sh2, err := endorsementSession(t)
	if sh2 != 0 {
		defer func() { _ = flush(ct, sh2) }()
	}
	if err != nil {
		return nil, fmt.Errorf("agent: TPM release: %w", err)
	}
	obj, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: a.ek.Handle, Name: a.ek.Name, Auth: sess2},
		InPrivate:    imp.OutPrivate,
		InPublic:     pub2b,
	}.Execute(t)
	if err != nil {
		return nil, tpmRefusal("load", err)
	}
	defer func() { _ = flush(ct, obj.ObjectHandle) }()

	pcrSess, _, err := tpm2.PolicySession(t, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return nil, fmt.Errorf("agent: TPM release: starting PCR policy session: %w", err)
	}
	defer func() { _ = flush(ct, pcrSess.Handle()) }()
	if _, err := (tpm2.PolicyPCR{PolicySession: pcrSess.Handle(), Pcrs: pcrSelection(sorted)}).Execute(t); err != nil {
		return nil, tpmRefusal("PolicyPCR", err)
	}
	rsp, err := tpm2.Unseal{
		ItemHandle: tpm2.AuthHandle{Handle: obj.ObjectHandle, Name: obj.Name, Auth: pcrSess},
	}.Execute(t)
	if err != nil {
		return nil, tpmRefusal("unseal", err)
	}
	if len(rsp.OutData.Buffer) != DataKeySize {
		clear(rsp.OutData.Buffer)
		return nil, ErrOpen
	}
	return rsp.OutData.Buffer, nil
}

// tpmRefusal classifies an error from a release step: transport failures
// and cancellations pass through as they are (nothing was refused), a
// policy failure names the PCR state, anything else the TPM said is the
// generic ErrOpen.
func tpmRefusal(step string, err error) error {
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		return fmt.Errorf("agent: TPM release: %s: %w", step, err)
	}
	if errors.Is(err, tpm2.TPMRCPolicyFail) {
		return fmt.Errorf("%w: %w (TPM %s: %w)", ErrOpen, ErrPCRPolicy, step, err)
	}
	return fmt.Errorf("%w (TPM %s: %w)", ErrOpen, step, err)
}
