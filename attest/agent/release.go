package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem/xwing"
	"github.com/google/go-tpm/tpm2"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// The release sealing convention, shared with the server.
const (
	// HPKESuiteName is the HPKESealed.suite of the only suite accepted.
	HPKESuiteName = "X-Wing/HKDF-SHA256/AES-256-GCM"
	// DataKeySize is the size of a released data key (AES-256).
	DataKeySize = 32
)

// hpkeInfo is the HPKE info string of a release: it keeps a sealed data
// key from being mistaken for any other HPKE message to the same key.
var hpkeInfo = []byte("coffre release v1")

var hpkeSuite = hpke.NewSuite(hpke.KEM_XWING, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES256GCM)

// OpenHPKE opens a data key sealed to this agent's binding key, with the
// envelope it belongs to as associated data: a sealed key presented with
// another envelope does not open. Every failure is ErrOpen.
func (a *Agent) OpenHPKE(sealed *coffrev1.HPKESealed, envelope []byte) ([]byte, error) {
	if sealed == nil || sealed.GetSuite() != HPKESuiteName ||
		len(sealed.GetEnc()) != xwing.CiphertextSize ||
		len(sealed.GetCiphertext()) != DataKeySize+16 { // AES-GCM tag
		return nil, ErrOpen
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.bindingSK == nil {
		return nil, ErrClosed
	}
	r, err := hpkeSuite.NewReceiver(a.bindingSK, hpkeInfo)
	if err != nil {
		return nil, ErrOpen
	}
	o, err := r.Setup(sealed.GetEnc())
	if err != nil {
		return nil, ErrOpen
	}
	key, err := o.Open(sealed.GetCiphertext(), envelope)
	if err != nil || len(key) != DataKeySize {
		return nil, ErrOpen
	}
	return key, nil
}

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
