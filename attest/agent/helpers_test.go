package agent_test

// Test-side stand-ins for the server's half of the conventions (credential
// and duplicate creation, quote checking), written from the TPM 2.0 spec
// with go-tpm, so that the agent is tested against real TPMs and an
// independent implementation of the other side.
//
// The reference simulator is one per process: no test here runs in
// parallel, and each closes what it opens.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"math/big"
	"slices"
	"testing"

	"github.com/cloudflare/circl/hpke"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/coffre-kms/coffre/attest/agent"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// openSimulator opens a fresh simulator, closed at cleanup.
func openSimulator(t *testing.T) transport.TPMCloser {
	t.Helper()
	tpm, err := agent.OpenTPM("simulator")
	if err != nil {
		t.Fatalf("OpenTPM(simulator): %v", err)
	}
	t.Cleanup(func() { _ = tpm.Close() })
	return tpm
}

// newAgent makes an Agent closed at cleanup (Close is idempotent).
func newAgent(t *testing.T, tpm transport.TPM, opts agent.Options) *agent.Agent {
	t.Helper()
	a, err := agent.New(context.Background(), tpm, opts)
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

// countHandles counts the TPM's handles of one type (the top byte of
// first): 0x80 transient objects, 0x02 loaded sessions, 0x03 saved
// sessions.
func countHandles(t *testing.T, tpm transport.TPM, first uint32) int {
	t.Helper()
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: first, PropertyCount: 128}.Execute(tpm)
	if err != nil {
		t.Fatalf("GetCapability(handles %#x): %v", first, err)
	}
	hs, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		t.Fatalf("GetCapability(handles): %v", err)
	}
	n := 0
	for _, h := range hs.Handle {
		if uint32(h)>>24 == first>>24 {
			n++
		}
	}
	return n
}

// requireHandles fails unless the TPM holds exactly objects transient
// objects and no sessions: the Agent's EK and AK (2) while it is open, 0
// after Close.
func requireHandles(t *testing.T, tpm transport.TPM, objects int, after string) {
	t.Helper()
	if n := countHandles(t, tpm, 0x80000000); n != objects {
		t.Errorf("after %s: %d transient objects loaded, want %d", after, n, objects)
	}
	for _, ht := range []uint32{0x02000000, 0x03000000} {
		if n := countHandles(t, tpm, ht); n != 0 {
			t.Errorf("after %s: %d sessions of type %#x left, want 0", after, n, ht>>24)
		}
	}
}

func mustPublic(t *testing.T, pub2b []byte) *tpm2.TPMTPublic {
	t.Helper()
	p, err := tpm2.Unmarshal[tpm2.TPM2BPublic](pub2b)
	if err != nil {
		t.Fatalf("TPM2B_PUBLIC: %v", err)
	}
	c, err := p.Contents()
	if err != nil {
		t.Fatalf("TPMT_PUBLIC: %v", err)
	}
	return c
}

// makeCredential does the server's TPM2_MakeCredential for the AK's name
// under the EK.
func makeCredential(t *testing.T, a *agent.Agent, secret []byte) (blob, encSecret []byte) {
	t.Helper()
	blob, encSecret, err := credentialFor(a.EKPublic(), a.AKPublic(), secret)
	if err != nil {
		t.Fatal(err)
	}
	return blob, encSecret
}

func credentialFor(ekPub, akPub, secret []byte) (blob, encSecret []byte, err error) {
	ekPublic, err := publicArea(ekPub)
	if err != nil {
		return nil, nil, err
	}
	ek, err := tpm2.ImportEncapsulationKey(ekPublic)
	if err != nil {
		return nil, nil, err
	}
	akPublic, err := publicArea(akPub)
	if err != nil {
		return nil, nil, err
	}
	name, err := tpm2.ObjectName(akPublic)
	if err != nil {
		return nil, nil, err
	}
	return tpm2.CreateCredential(rand.Reader, ek, name.Buffer, secret)
}

// selection is the 3-byte SHA-256 bank selection (PC Client minimum) the
// agent and the server both use: the PolicyPCR digest covers the
// selection's bytes, so both sides must encode it the same way.
func selection(pcrs []uint32) tpm2.TPMLPCRSelection {
	u := make([]uint, len(pcrs))
	for i, p := range pcrs {
		u[i] = uint(p)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(u...),
	}}}
}

// readPCRs reads SHA-256 PCRs one at a time, independently of the agent.
func readPCRs(t *testing.T, tpm transport.TPM, pcrs []uint32) map[uint32][]byte {
	t.Helper()
	out := map[uint32][]byte{}
	for _, p := range pcrs {
		rsp, err := tpm2.PCRRead{PCRSelectionIn: selection([]uint32{p})}.Execute(tpm)
		if err != nil {
			t.Fatalf("PCR_Read(%d): %v", p, err)
		}
		out[p] = rsp.PCRValues.Digests[0].Buffer
	}
	return out
}

func extendPCR(t *testing.T, tpm transport.TPM, pcr uint32, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}).Execute(tpm); err != nil {
		t.Fatalf("PCR_Extend(%d): %v", pcr, err)
	}
}

// makeDuplicate does the server's TPM-bound release: a sealed-data object
// holding key, with authPolicy = PolicyPCR over pcrs at values, duplicated
// to the EK whose TPM2B_PUBLIC is ekPub.
func makeDuplicate(t *testing.T, ekPub []byte, key []byte, pcrs []uint32, values map[uint32][]byte) *coffrev1.TPMDuplicate {
	t.Helper()
	d, err := duplicateFor(ekPub, key, pcrs, values)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// duplicateFor is makeDuplicate for code that cannot call t.Fatal (the
// in-test server's handlers).
func duplicateFor(ekPub []byte, key []byte, pcrs []uint32, values map[uint32][]byte) (*coffrev1.TPMDuplicate, error) {
	sorted := slices.Clone(pcrs)
	slices.Sort(sorted)
	h := sha256.New()
	for _, p := range sorted {
		h.Write(values[p])
	}
	pc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)}, Pcrs: selection(sorted)}).Update(pc); err != nil {
		return nil, err
	}
	obfuscation := make([]byte, 32)
	if _, err := rand.Read(obfuscation); err != nil {
		return nil, err
	}
	unique := sha256.Sum256(append(slices.Clone(obfuscation), key...))
	pub := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			AdminWithPolicy: true,
			NoDA:            true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: pc.Hash().Digest},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
	}
	sens := tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: obfuscation},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: key}),
	}
	name, err := tpm2.ObjectName(&pub)
	if err != nil {
		return nil, err
	}
	ekPublic, err := publicArea(ekPub)
	if err != nil {
		return nil, err
	}
	ek, err := tpm2.ImportEncapsulationKey(ekPublic)
	if err != nil {
		return nil, err
	}
	dup, seed, err := tpm2.CreateDuplicate(rand.Reader, ek, name.Buffer, tpm2.Marshal(sens))
	if err != nil {
		return nil, err
	}
	return &coffrev1.TPMDuplicate{Duplicate: dup, InSymSeed: seed, Public: tpm2.Marshal(tpm2.New2B(pub))}, nil
}

func publicArea(pub2b []byte) (*tpm2.TPMTPublic, error) {
	p, err := tpm2.Unmarshal[tpm2.TPM2BPublic](pub2b)
	if err != nil {
		return nil, err
	}
	return p.Contents()
}

// serverSession is the server's half of a session's release key, written
// independently of the agent from the convention (kms/ENVELOPE.md,
// "Release sealing"): HPKE base mode to the binding key, K exported from
// the context, then AES-256-GCM under K per release.
type serverSession struct {
	enc  []byte
	k    []byte
	aead cipher.AEAD
	seq  uint64 // the last sequence number used
}

func newServerSession(bindingPub []byte) (*serverSession, error) {
	pk, err := hpke.KEM_XWING.Scheme().UnmarshalBinaryPublicKey(bindingPub)
	if err != nil {
		return nil, err
	}
	s, err := hpke.NewSuite(hpke.KEM_XWING, hpke.KDF_HKDF_SHA256, hpke.AEAD_AES256GCM).NewSender(pk, []byte("coffre session v1"))
	if err != nil {
		return nil, err
	}
	enc, sealer, err := s.Setup(rand.Reader)
	if err != nil {
		return nil, err
	}
	k := sealer.Export([]byte("coffre release key v1"), 32)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &serverSession{enc: enc, k: k, aead: aead}, nil
}

// mustServerSession is newServerSession for tests.
func mustServerSession(t *testing.T, bindingPub []byte) *serverSession {
	t.Helper()
	s, err := newServerSession(bindingPub)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// seal is the server's release of key for envelope, with the next
// sequence number.
func (s *serverSession) seal(key, envelope []byte) *coffrev1.SessionSealed {
	s.seq++
	return s.sealAt(s.seq, key, envelope)
}

// sealAt seals with sequence number seq (tests of the agent's checks).
func (s *serverSession) sealAt(seq uint64, key, envelope []byte) *coffrev1.SessionSealed {
	nonce := make([]byte, 12)
	binary.BigEndian.PutUint64(nonce[4:], seq)
	aad := []byte("coffre release v1")
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(envelope)))
	aad = append(aad, envelope...)
	return &coffrev1.SessionSealed{Seq: seq, Ciphertext: s.aead.Seal(nil, nonce, key, aad)}
}

// checkQuote checks a quote the way the verifier does: structure, nonce
// binding, signature by the AK, and the PCR digest over the values.
func checkQuote(t *testing.T, a *agent.Agent, nonce, quote, sig []byte, pcrs []uint32, values map[uint32][]byte) {
	t.Helper()
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](quote)
	if err != nil {
		t.Fatalf("TPMS_ATTEST: %v", err)
	}
	if att.Magic != tpm2.TPMGeneratedValue || att.Type != tpm2.TPMSTAttestQuote {
		t.Fatalf("quote magic %#x type %#x", att.Magic, att.Type)
	}
	want := sha256.Sum256(append(slices.Clone(nonce), a.BindingPublicKey()...))
	if !bytes.Equal(att.ExtraData.Buffer, want[:]) {
		t.Errorf("qualifying data is not SHA-256(nonce || binding key)")
	}
	info, err := att.Attested.Quote()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for _, p := range pcrs { // ascending: the TPM's order
		h.Write(values[p])
	}
	if !bytes.Equal(info.PCRDigest.Buffer, h.Sum(nil)) {
		t.Errorf("PCR values do not hash to the quoted digest")
	}
	if got := tpm2.Marshal(info.PCRSelect); !bytes.Equal(got, tpm2.Marshal(selection(pcrs))) {
		t.Errorf("quoted selection %x, want %x", got, tpm2.Marshal(selection(pcrs)))
	}

	akPub, err := tpm2.Pub(*mustPublic(t, a.AKPublic()))
	if err != nil {
		t.Fatal(err)
	}
	s, err := tpm2.Unmarshal[tpm2.TPMTSignature](sig)
	if err != nil {
		t.Fatalf("TPMT_SIGNATURE: %v", err)
	}
	digest := sha256.Sum256(quote)
	switch k := akPub.(type) {
	case *rsa.PublicKey:
		rs, err := s.Signature.RSASSA()
		if err != nil {
			t.Fatal(err)
		}
		if err := rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], rs.Sig.Buffer); err != nil {
			t.Errorf("quote signature: %v", err)
		}
	case *ecdsa.PublicKey:
		es, err := s.Signature.ECDSA()
		if err != nil {
			t.Fatal(err)
		}
		r := new(big.Int).SetBytes(es.SignatureR.Buffer)
		ss := new(big.Int).SetBytes(es.SignatureS.Buffer)
		if !ecdsa.Verify(k, digest[:], r, ss) {
			t.Errorf("quote signature does not verify")
		}
	default:
		t.Fatalf("AK key type %T", akPub)
	}
}

// oidSAN is subjectAltName. TPM EK certificates carry it critical with
// only a TCG directoryName (manufacturer, model, version), which Go's
// x509 leaves "unhandled" and Verify then rejects.
var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// parseEKCert parses an EK certificate, accepting its critical TCG SAN
// after checking it is there and is a directoryName.
func parseEKCert(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("EK certificate: %v", err)
	}
	var kept []asn1.ObjectIdentifier
	for _, oid := range c.UnhandledCriticalExtensions {
		if !oid.Equal(oidSAN) {
			kept = append(kept, oid)
			continue
		}
		var ok bool
		for _, e := range c.Extensions {
			if e.Id.Equal(oidSAN) {
				var names []asn1.RawValue
				if _, err := asn1.Unmarshal(e.Value, &names); err == nil && len(names) > 0 {
					ok = names[0].Class == asn1.ClassContextSpecific && names[0].Tag == 4 // directoryName
				}
			}
		}
		if !ok {
			t.Fatalf("EK certificate: critical SAN is not a TCG directoryName")
		}
	}
	c.UnhandledCriticalExtensions = kept
	return c
}

// ekPublicKey is the EK's public key as a crypto key.
func ekPublicKey(t *testing.T, a *agent.Agent) crypto.PublicKey {
	t.Helper()
	k, err := tpm2.Pub(*mustPublic(t, a.EKPublic()))
	if err != nil {
		t.Fatal(err)
	}
	return k
}
