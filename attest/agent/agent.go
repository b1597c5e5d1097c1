package agent

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"github.com/cloudflare/circl/kem/xwing"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// NV indices of the EK certificates (TCG EK Credential Profile 2.0,
// section 2.2.1.4).
const (
	ekCertIndexRSA = tpm2.TPMHandle(0x01C00002) // RSA 2048
	ekCertIndexECC = tpm2.TPMHandle(0x01C0000A) // ECC NIST P-256
)

// maxEKCert bounds the EK certificate read from NV: real ones are 1-2 KiB
// and an NV index holds at most a few KiB.
const maxEKCert = 8 << 10

// cleanupTimeout bounds the flushes done after an operation, which run
// even when the operation's own context has ended: on a TPM without a
// resource manager (swtpm, /dev/tpm0) a handle not flushed stays loaded
// until the TPM restarts.
const cleanupTimeout = 30 * time.Second

// Options configure an Agent. The zero value is a node with an RSA-2048
// EK and no event log unless the TPM is a kernel device.
type Options struct {
	// EKAlgorithm is "rsa" (the default: the TCG RSA-2048 template L-1) or
	// "ecc" (the ECC P-256 template L-2, for TPMs without RSA). The AK
	// follows it: RSA-2048 RSASSA-SHA256 or ECDSA P-256 SHA-256.
	EKAlgorithm string
	// EventLogPath is where EventLog reads the TCG event log from. Empty
	// means the kernel's securityfs file for a TPM opened as a device, and
	// no event log otherwise (simulators and swtpm have no firmware).
	EventLogPath string
}

// Agent is one node's TPM identity and binding key: the EK and AK are
// loaded for its whole life and the X-Wing binding key pair lives only in
// its memory. It is safe for concurrent use; TPM commands are serialized.
type Agent struct {
	mu     sync.Mutex // serializes TPM use and guards closed
	tpm    transport.TPM
	closed bool

	ekAlg    string
	ek       tpm2.NamedHandle
	ekPublic *tpm2.TPMTPublic
	ekPub    []byte // TPM2B_PUBLIC
	ekCert   []byte // DER or nil
	ak       tpm2.NamedHandle
	akPub    []byte // TPM2B_PUBLIC

	eventLogPath string
	eventLogSet  bool // EventLogPath was configured: its absence is an error

	bindingSK *xwing.PrivateKey
	bindingPK []byte
	// sessionKeys are the session release keys derived from the binding
	// key and not yet wiped: Close wipes them with it.
	sessionKeys map[*SessionKey]struct{}
}

// New loads the node's identity from tpm: it creates the EK from the TCG
// default template (the same key on every call, since it derives from the
// endorsement seed), reads the EK certificate from NV when there is one,
// creates the AK as a primary key in the endorsement hierarchy (also
// deterministic) and makes a fresh binding key pair. Close releases the
// TPM handles; the caller keeps ownership of tpm.
//
// Use one Agent per TPM at a time: the EK and AK stay loaded and take two
// of the three transient object slots that many TPMs (swtpm, the
// reference simulator) have; TPM-bound release needs the third.
func New(ctx context.Context, tpm transport.TPM, opts Options) (*Agent, error) {
	if tpm == nil {
		return nil, errors.New("agent: nil TPM")
	}
	a := &Agent{tpm: tpm}
	var ekTemplate, akTemplate tpm2.TPMTPublic
	var certIndex tpm2.TPMHandle
	switch opts.EKAlgorithm {
	case "", "rsa":
		a.ekAlg, ekTemplate, akTemplate, certIndex = "rsa", tpm2.RSAEKTemplate, akTemplateRSA(), ekCertIndexRSA
	case "ecc":
		a.ekAlg, ekTemplate, akTemplate, certIndex = "ecc", tpm2.ECCEKTemplate, akTemplateECC(), ekCertIndexECC
	default:
		return nil, fmt.Errorf("agent: Options.EKAlgorithm %q: want \"rsa\" or \"ecc\"", opts.EKAlgorithm)
	}
	switch dev, ok := tpm.(*deviceTPM); {
	case opts.EventLogPath != "":
		a.eventLogPath, a.eventLogSet = opts.EventLogPath, true
	case ok:
		a.eventLogPath = eventLogPath(dev.path)
	}

	// fail releases whatever was loaded so far: without a resource
	// manager a failed New would otherwise leak the EK.
	fail := func(err error) (*Agent, error) { return nil, errors.Join(err, a.flushAll(ctx)) }
	t := ctxTPM{ctx, tpm}
	ek, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(ekTemplate),
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("agent: creating the EK: %w", err)
	}
	a.ek = tpm2.NamedHandle{Handle: ek.ObjectHandle, Name: ek.Name}
	a.ekPub = tpm2.Marshal(ek.OutPublic)
	if a.ekPublic, err = ek.OutPublic.Contents(); err != nil {
		return fail(fmt.Errorf("agent: EK public area: %w", err))
	}
	if a.ekCert, err = readEKCertificate(t, certIndex); err != nil {
		return fail(err)
	}
	ak, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(akTemplate),
	}.Execute(t)
	if err != nil {
		return fail(fmt.Errorf("agent: creating the AK: %w", err))
	}
	a.ak = tpm2.NamedHandle{Handle: ak.ObjectHandle, Name: ak.Name}
	a.akPub = tpm2.Marshal(ak.OutPublic)

	sk, pk, err := xwing.GenerateKeyPair(rand.Reader)
	if err != nil {
		return fail(fmt.Errorf("agent: binding key: %w", err))
	}
	a.bindingSK = sk
	a.bindingPK = make([]byte, xwing.PublicKeySize)
	pk.Pack(a.bindingPK)
	return a, nil
}

// akTemplateRSA is the AK the verifier accepts: restricted, sign-only,
// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, RSA-2048
// RSASSA-SHA256. Restricted is what makes the quote trustworthy: the TPM
// refuses to sign with it anything that starts like TPMS_ATTEST unless
// the TPM made it.
func akTemplateRSA() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgRSA,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: akAttributes(),
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTRSAScheme{
				Scheme:  tpm2.TPMAlgRSASSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			KeyBits: 2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{}),
	}
}

// akTemplateECC is the ECDSA P-256 variant of the AK for ECC-only TPMs.
func akTemplateECC() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: akAttributes(),
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

func akAttributes() tpm2.TPMAObject {
	return tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		Restricted:          true,
		SignEncrypt:         true,
	}
}

// readEKCertificate reads the EK certificate from its NV index; an index
// that is absent or was never written means the TPM has no certificate.
func readEKCertificate(t transport.TPM, index tpm2.TPMHandle) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(t)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("agent: EK certificate NV index %#x: %w", uint32(index), err)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("agent: EK certificate NV index %#x: %w", uint32(index), err)
	}
	if !nv.Attributes.Written || nv.DataSize == 0 {
		return nil, nil
	}
	if nv.DataSize > maxEKCert {
		return nil, fmt.Errorf("agent: EK certificate NV index %#x holds %d bytes, more than %d", uint32(index), nv.DataSize, maxEKCert)
	}
	chunk := nvBufferMax(t)
	nvh := tpm2.NamedHandle{Handle: index, Name: pub.NVName}
	read := func(auth tpm2.AuthHandle) ([]byte, error) {
		out := make([]byte, 0, nv.DataSize)
		for off := uint16(0); off < nv.DataSize; {
			n := min(chunk, nv.DataSize-off)
			rsp, err := tpm2.NVRead{AuthHandle: auth, NVIndex: nvh, Size: n, Offset: off}.Execute(t)
			if err != nil {
				return nil, err
			}
			if len(rsp.Data.Buffer) != int(n) {
				return nil, fmt.Errorf("TPM returned %d bytes for %d", len(rsp.Data.Buffer), n)
			}
			out = append(out, rsp.Data.Buffer...)
			off += n
		}
		return out, nil
	}
	// The TCG profile sets AUTHREAD with an empty index auth, which works
	// whatever the owner password; OWNERREAD is the fallback for TPMs
	// provisioned otherwise.
	var data []byte
	err = errors.New("NV index allows neither AUTHREAD nor OWNERREAD")
	if nv.Attributes.AuthRead {
		data, err = read(tpm2.AuthHandle{Handle: index, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)})
	}
	if data == nil && nv.Attributes.OwnerRead {
		data, err = read(tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)})
	}
	if err != nil {
		return nil, fmt.Errorf("agent: reading EK certificate NV index %#x: %w", uint32(index), err)
	}
	der, err := trimDER(data)
	if err != nil {
		return nil, fmt.Errorf("agent: EK certificate NV index %#x: %w", uint32(index), err)
	}
	return der, nil
}

// nvBufferMax is the largest NV read the TPM accepts in one command.
func nvBufferMax(t transport.TPM) uint16 {
	const fallback = 512 // every TPM 2.0 accepts this much
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(tpm2.TPMPTNVBufferMax),
		PropertyCount: 1,
	}.Execute(t)
	if err != nil {
		return fallback
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil || len(props.TPMProperty) == 0 || props.TPMProperty[0].Property != tpm2.TPMPTNVBufferMax {
		return fallback
	}
	v := props.TPMProperty[0].Value
	if v < 64 || v > 4096 {
		return fallback
	}
	return uint16(v)
}

// EKCertificate returns the EK certificate (DER) read from the TPM's NV,
// or nil when the TPM has none.
func (a *Agent) EKCertificate() []byte { return clone(a.ekCert) }

// EKPublic returns the EK public area as TPM2B_PUBLIC.
func (a *Agent) EKPublic() []byte { return clone(a.ekPub) }

// AKPublic returns the AK public area as TPM2B_PUBLIC.
func (a *Agent) AKPublic() []byte { return clone(a.akPub) }

// BindingPublicKey returns the raw X-Wing public key that the server
// encapsulates each session's release key to.
func (a *Agent) BindingPublicKey() []byte { return clone(a.bindingPK) }

func clone(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append([]byte(nil), b...)
}

// lock takes the TPM and fails if the Agent is closed.
func (a *Agent) lock() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// cleanup returns the transport for flushes after an operation: not bound
// to the operation's context, which may have ended, but bounded in time.
func (a *Agent) cleanup(ctx context.Context) (transport.TPM, context.CancelFunc) {
	c, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	return ctxTPM{c, a.tpm}, cancel
}

func flush(t transport.TPM, h tpm2.TPMHandle) error {
	_, err := tpm2.FlushContext{FlushHandle: h}.Execute(t)
	return err
}

// endorsementSession starts a policy session satisfying the EK's policy,
// PolicySecret(TPM_RH_ENDORSEMENT). The caller flushes the returned
// handle; a TPM resets a policy session once it authorized a command, so
// each EK use gets its own.
func endorsementSession(t transport.TPM) (tpm2.Session, tpm2.TPMHandle, error) {
	sess, _, err := tpm2.PolicySession(t, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		return nil, 0, fmt.Errorf("starting EK policy session: %w", err)
	}
	if _, err := (tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(),
		NonceTPM:      sess.NonceTPM(),
	}).Execute(t); err != nil {
		return nil, sess.Handle(), fmt.Errorf("PolicySecret(endorsement): %w", err)
	}
	return sess, sess.Handle(), nil
}

// Activate recovers the secret of a credential the server made with
// TPM2_MakeCredential for this AK under this EK. Only this TPM, holding
// both keys, can: that is what binds the AK to the enrolled EK.
// credentialBlob is TPM2B_ID_OBJECT and encryptedSecret is
// TPM2B_ENCRYPTED_SECRET, each with or without its 2-byte size.
func (a *Agent) Activate(ctx context.Context, credentialBlob, encryptedSecret []byte) ([]byte, error) {
	blob, err := unwrapTPM2BBlob(credentialBlob, maxIDObject)
	if err != nil {
		return nil, fmt.Errorf("%w: credential blob: %w", ErrMalformed, err)
	}
	secret, err := unwrapEncryptedSecret(encryptedSecret, a.ekPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: encrypted secret: %w", ErrMalformed, err)
	}
	if err := a.lock(); err != nil {
		return nil, err
	}
	defer a.mu.Unlock()
	ct, cancel := a.cleanup(ctx)
	defer cancel()

	t := ctxTPM{ctx, a.tpm}
	sess, sh, err := endorsementSession(t)
	if sh != 0 {
		defer func() { _ = flush(ct, sh) }()
	}
	if err != nil {
		return nil, fmt.Errorf("agent: activate: %w", err)
	}
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: a.ak.Handle, Name: a.ak.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: a.ek.Handle, Name: a.ek.Name, Auth: sess},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: blob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: secret},
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("agent: activate: %w", err)
	}
	return rsp.CertInfo.Buffer, nil
}

// quoteAttempts: the PCRs are read after the quote; if something extends
// one in between, the values no longer match the quoted digest and the
// quote is taken again.
const quoteAttempts = 3

// Quote quotes the SHA-256 bank PCRs pcrs with the AK, qualifying data
// SHA-256(nonce || binding public key), and reads their values. It returns
// TPMS_ATTEST, TPMT_SIGNATURE and the values, and guarantees that the
// values hash to the quoted digest (it retries when a PCR was extended
// between quote and read).
func (a *Agent) Quote(ctx context.Context, nonce []byte, pcrs []uint32) (quote, sig []byte, values map[uint32][]byte, err error) {
	if len(nonce) < 16 || len(nonce) > 1024 {
		return nil, nil, nil, fmt.Errorf("%w: nonce of %d bytes, want 16 to 1024", ErrMalformed, len(nonce))
	}
	sorted, err := checkPCRs(pcrs)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := a.lock(); err != nil {
		return nil, nil, nil, err
	}
	defer a.mu.Unlock()

	h := sha256.New()
	h.Write(nonce)
	h.Write(a.bindingPK)
	qualifying := h.Sum(nil)
	sel := pcrSelection(sorted)
	t := ctxTPM{ctx, a.tpm}
	for range quoteAttempts {
		rsp, err := tpm2.Quote{
			SignHandle:     tpm2.AuthHandle{Handle: a.ak.Handle, Name: a.ak.Name, Auth: tpm2.PasswordAuth(nil)},
			QualifyingData: tpm2.TPM2BData{Buffer: qualifying},
			InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			PCRSelect:      sel,
		}.Execute(t)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("agent: quote: %w", err)
		}
		attest, err := rsp.Quoted.Contents()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("agent: quote: TPMS_ATTEST: %w", err)
		}
		info, err := attest.Attested.Quote()
		if err != nil || attest.Magic != tpm2.TPMGeneratedValue {
			return nil, nil, nil, fmt.Errorf("agent: quote: the TPM returned something other than a quote")
		}
		quoted, err := pcrsFromSelection(info.PCRSelect)
		if err != nil || !equalPCRs(quoted, sorted) {
			return nil, nil, nil, fmt.Errorf("agent: quote: the TPM quoted PCRs %v, not %v", quoted, sorted)
		}
		vals, err := readPCRs(t, sorted)
		if err != nil {
			return nil, nil, nil, err
		}
		d := sha256.New()
		for _, i := range sorted {
			d.Write(vals[i])
		}
		if string(d.Sum(nil)) != string(info.PCRDigest.Buffer) {
			continue // a PCR moved between quote and read
		}
		return clone(rsp.Quoted.Bytes()), tpm2.Marshal(rsp.Signature), vals, nil
	}
	return nil, nil, nil, ErrPCRChanged
}

// readPCRs reads SHA-256 PCR values in chunks of at most 8, the most a
// TPM returns per TPM2_PCR_Read, checking that each answer covers exactly
// the PCRs asked for.
func readPCRs(t transport.TPM, pcrs []uint32) (map[uint32][]byte, error) {
	vals := make(map[uint32][]byte, len(pcrs))
	for start := 0; start < len(pcrs); start += 8 {
		chunk := pcrs[start:min(start+8, len(pcrs))]
		rsp, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(chunk)}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("agent: PCR_Read: %w", err)
		}
		got, err := pcrsFromSelection(rsp.PCRSelectionOut)
		if err != nil || !equalPCRs(got, chunk) || len(rsp.PCRValues.Digests) != len(chunk) {
			return nil, fmt.Errorf("agent: PCR_Read returned PCRs %v for %v", got, chunk)
		}
		for j, i := range chunk {
			v := rsp.PCRValues.Digests[j].Buffer
			if len(v) != sha256.Size {
				return nil, fmt.Errorf("agent: PCR_Read returned %d bytes for PCR %d", len(v), i)
			}
			vals[i] = v
		}
	}
	return vals, nil
}

// EventLog returns the TCG event log of the machine, or nil when there is
// none to send: the TPM is not a kernel device (and Options.EventLogPath
// is empty), or the kernel exposes no log. A configured EventLogPath that
// cannot be read is an error.
func (a *Agent) EventLog() ([]byte, error) {
	if a.eventLogPath == "" {
		return nil, nil
	}
	b, err := readEventLog(a.eventLogPath)
	if errors.Is(err, fs.ErrNotExist) && !a.eventLogSet {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("agent: event log: %w", err)
	}
	return b, nil
}

// Close flushes the EK and AK from the TPM and wipes the binding private
// key and every session key derived from it (their Open fails with
// ErrClosed from then on). The Agent is unusable afterwards; the TPM
// transport stays open.
func (a *Agent) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	err := a.flushAll(context.Background())
	if a.bindingSK != nil {
		// Overwrites the whole key struct (seed and expanded ML-KEM and
		// X25519 keys). Copies the runtime made earlier are out of reach:
		// best effort, like every zeroization in Go.
		*a.bindingSK = xwing.PrivateKey{}
		a.bindingSK = nil
	}
	for k := range a.sessionKeys {
		k.wipe(ErrClosed)
	}
	clear(a.sessionKeys)
	return err
}

// flushAll flushes the EK and AK, whichever exist.
func (a *Agent) flushAll(ctx context.Context) error {
	t, cancel := a.cleanup(ctx)
	defer cancel()
	var errs []error
	for _, h := range []*tpm2.NamedHandle{&a.ak, &a.ek} {
		if h.Handle != 0 {
			if err := flush(t, h.Handle); err != nil {
				errs = append(errs, fmt.Errorf("agent: flushing %#x: %w", uint32(h.Handle), err))
			}
			h.Handle = 0
		}
	}
	return errors.Join(errs...)
}
