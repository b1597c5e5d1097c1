// Package tpmtest gives tests a real TPM and the node-side TPM operations
// of the attestation protocol, written directly against go-tpm so that the
// verifier's tests do not depend on the agent they check.
//
// [Open] starts the in-process TPM simulator (go-tpm-tools, the Microsoft
// reference TPM) unless the -tpm-device flag names a TPM character device
// such as /dev/tpmrm0. The simulator is one per process: tests that use it
// run serially (no t.Parallel), and a second Open waits until the first
// test has ended. At the end of each test the helper fails the test if
// transient objects or sessions are still loaded, then closes the TPM.
package tpmtest

import (
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpmutil"
)

var device = flag.String("tpm-device", "", "run TPM tests against this TPM device (e.g. /dev/tpmrm0) instead of the simulator; tests that need a fresh or seeded TPM, or that extend PCRs, are skipped")

// simTPM adapts the go-tpm-tools simulator to go-tpm's transport.
type simTPM struct{ rw io.ReadWriteCloser }

func (s *simTPM) Send(cmd []byte) ([]byte, error) { return tpmutil.RunCommandRaw(s.rw, cmd) }

// Open returns a TPM for the test: a freshly manufactured simulator with
// random seeds, or the -tpm-device device.
func Open(t testing.TB) transport.TPM {
	t.Helper()
	if *device != "" {
		tpm, err := linuxtpm.Open(*device)
		if err != nil {
			t.Fatalf("opening %s: %v", *device, err)
		}
		watch(t, tpm, tpm.Close)
		return tpm
	}
	sim, err := simulator.Get()
	if err != nil {
		t.Fatalf("starting the TPM simulator: %v", err)
	}
	tpm := &simTPM{rw: sim}
	watch(t, tpm, sim.Close)
	return tpm
}

// OpenSeeded returns a simulator whose hierarchy seeds derive from seed:
// the same seed is the same TPM (the same EK and primary keys) every
// time, and different seeds are different TPMs. Skipped with -tpm-device.
func OpenSeeded(t testing.TB, seed int64) transport.TPM {
	t.Helper()
	RequireSimulator(t)
	sim, err := simulator.GetWithFixedSeedInsecure(seed)
	if err != nil {
		t.Fatalf("starting the TPM simulator: %v", err)
	}
	tpm := &simTPM{rw: sim}
	watch(t, tpm, sim.Close)
	return tpm
}

// RequireSimulator skips a test that must not run on a real TPM, such as
// one that extends PCRs 0 to 16.
func RequireSimulator(t testing.TB) {
	t.Helper()
	if *device != "" {
		t.Skipf("needs the TPM simulator, not %s", *device)
	}
}

// watch registers the leak check and close. Cleanups registered later (key
// flushes) run before it.
func watch(t testing.TB, tpm transport.TPM, closeTPM func() error) {
	t.Cleanup(func() {
		for _, ht := range []tpm2.TPMHT{tpm2.TPMHTTransient, tpm2.TPMHTLoadedSession, tpm2.TPMHTSavedSession} {
			hs, err := handles(tpm, ht)
			if err != nil {
				t.Errorf("listing handles: %v", err)
				continue
			}
			for _, h := range hs {
				t.Errorf("TPM handle 0x%08x leaked", uint32(h))
				_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tpm)
			}
		}
		if err := closeTPM(); err != nil {
			t.Errorf("closing the TPM: %v", err)
		}
	})
}

func handles(tpm transport.TPM, ht tpm2.TPMHT) ([]tpm2.TPMHandle, error) {
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapHandles,
		Property:      uint32(ht) << 24,
		PropertyCount: 64,
	}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	l, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		return nil, err
	}
	// Asking for TPM_HT_LOADED_SESSION (0x02) lists loaded HMAC and
	// policy sessions alike, the latter with 0x03 handles; asking for
	// 0x03 lists saved sessions.
	return l.Handle, nil
}

// Key is a loaded key.
type Key struct {
	Handle tpm2.TPMHandle
	Name   tpm2.TPM2BName
	Public *tpm2.TPMTPublic
	// PublicBytes is the TPM2B_PUBLIC as the TPM returned it: what an
	// agent sends.
	PublicBytes []byte
}

// CreatePrimary makes a primary key in hierarchy (empty hierarchy auth)
// and flushes it at the end of the test.
func CreatePrimary(t testing.TB, tpm transport.TPM, hierarchy tpm2.TPMHandle, template tpm2.TPMTPublic) *Key {
	t.Helper()
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: hierarchy, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(template),
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("CreatePrimary: %v", err)
	}
	t.Cleanup(func() { Flush(t, tpm, rsp.ObjectHandle) })
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		t.Fatalf("CreatePrimary public: %v", err)
	}
	return &Key{Handle: rsp.ObjectHandle, Name: rsp.Name, Public: pub, PublicBytes: tpm2.Marshal(rsp.OutPublic)}
}

// EK makes the RSA-2048 EK of the TCG default template L-1.
func EK(t testing.TB, tpm transport.TPM) *Key {
	t.Helper()
	return CreatePrimary(t, tpm, tpm2.TPMRHEndorsement, tpm2.RSAEKTemplate)
}

// AK makes an AK from template as a primary key in the endorsement
// hierarchy, as the agent does.
func AK(t testing.TB, tpm transport.TPM, template tpm2.TPMTPublic) *Key {
	t.Helper()
	return CreatePrimary(t, tpm, tpm2.TPMRHEndorsement, template)
}

// Flush flushes a transient handle.
func Flush(t testing.TB, tpm transport.TPM, h tpm2.TPMHandle) {
	t.Helper()
	if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tpm); err != nil {
		t.Errorf("flushing 0x%08x: %v", uint32(h), err)
	}
}

// EKPolicy satisfies the EK's policy: PolicySecret(TPM_RH_ENDORSEMENT).
func EKPolicy(tpm transport.TPM, handle tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
	_, err := tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: handle,
		NonceTPM:      nonceTPM,
	}.Execute(tpm)
	return err
}

// Activate runs TPM2_ActivateCredential: ak is the credentialed object,
// ek decrypts the credential. It returns the TPM's error as is, so that
// tests can check that activation fails.
func Activate(tpm transport.TPM, ek, ak *Key, blob, encSecret []byte) ([]byte, error) {
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, EKPolicy)},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: blob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encSecret},
	}.Execute(tpm)
	if err != nil {
		return nil, err
	}
	return rsp.CertInfo.Buffer, nil
}

// Selection is the SHA-256 bank selection of pcrs.
func Selection(pcrs ...uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...),
	}}}
}

// Quote quotes the SHA-256 PCRs with qualifying data, in the AK's own
// scheme, and returns the TPMS_ATTEST and TPMT_SIGNATURE bytes.
func Quote(t testing.TB, tpm transport.TPM, ak *Key, pcrs []uint, qualifyingData []byte) (quote, sig []byte) {
	t.Helper()
	rsp, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: qualifyingData},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      Selection(pcrs...),
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("Quote: %v", err)
	}
	return rsp.Quoted.Bytes(), tpm2.Marshal(rsp.Signature)
}

// Sign signs digest with a non-restricted signing key in its own scheme
// and returns the TPMT_SIGNATURE bytes. A restricted key refuses digests
// the TPM did not make; this is how a non-restricted "AK" forges a quote.
func Sign(t testing.TB, tpm transport.TPM, key *Key, digest []byte) []byte {
	t.Helper()
	rsp, err := tpm2.Sign{
		KeyHandle: tpm2.AuthHandle{Handle: key.Handle, Name: key.Name, Auth: tpm2.PasswordAuth(nil)},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme:  tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		Validation: tpm2.TPMTTKHashCheck{
			Tag:       tpm2.TPMSTHashCheck,
			Hierarchy: tpm2.TPMRHNull,
		},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	return tpm2.Marshal(rsp.Signature)
}

// ReadPCRs reads SHA-256 PCR values.
func ReadPCRs(t testing.TB, tpm transport.TPM, pcrs ...uint) map[uint32][]byte {
	t.Helper()
	out := map[uint32][]byte{}
	// TPM2_PCR_Read returns at most 8 digests per call.
	for start := 0; start < len(pcrs); start += 8 {
		chunk := pcrs[start:min(start+8, len(pcrs))]
		rsp, err := tpm2.PCRRead{PCRSelectionIn: Selection(chunk...)}.Execute(tpm)
		if err != nil {
			t.Fatalf("PCRRead: %v", err)
		}
		if len(rsp.PCRValues.Digests) != len(chunk) {
			t.Fatalf("PCRRead returned %d digests for %d PCRs", len(rsp.PCRValues.Digests), len(chunk))
		}
		sorted := slices.Sorted(slices.Values(chunk))
		for i, d := range rsp.PCRValues.Digests {
			out[uint32(sorted[i])] = d.Buffer // #nosec G115 -- PCR index
		}
	}
	return out
}

// Extend extends a SHA-256 digest into a PCR (SHA-256 bank only).
func Extend(t testing.TB, tpm transport.TPM, pcr uint, digest []byte) {
	t.Helper()
	if len(digest) != sha256.Size {
		t.Fatalf("Extend: digest of %d bytes", len(digest))
	}
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)}, // #nosec G115 -- PCR index
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
			HashAlg: tpm2.TPMAlgSHA256,
			Digest:  digest,
		}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("PCRExtend %d: %v", pcr, err)
	}
}

// ExtendData extends SHA-256(data) into a PCR, as a measurement would.
func ExtendData(t testing.TB, tpm transport.TPM, pcr uint, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	Extend(t, tpm, pcr, d[:])
}

// IsTPMError reports whether err is a TPM response code (the command
// reached the TPM and was refused), as opposed to a transport failure.
func IsTPMError(err error) bool {
	var rc tpm2.TPMRC
	var f1 tpm2.TPMFmt1Error
	return errors.As(err, &rc) || errors.As(err, &f1)
}

// String names a key in test messages.
func (k *Key) String() string { return fmt.Sprintf("key 0x%08x", uint32(k.Handle)) }
