package attest

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/google/go-tpm/tpm2"
)

// maxSealedData is MAX_SYM_DATA, the most a TPM sealed-data object holds.
const maxSealedData = 128

// SealPolicy returns the authPolicy of objects sealed to pcrs: the
// TPM2_PolicyPCR digest (SHA-256 session) over the SHA-256 bank selection
// of the PCRs, as a 3-byte PC Client selection bitmap, and the SHA-256 of
// their values concatenated in ascending index order. The node satisfies it
// with TPM2_PolicyPCR over the same selection.
func SealPolicy(pcrs map[uint32][]byte) ([]byte, error) {
	if len(pcrs) == 0 {
		return nil, errors.New("attest: sealing needs at least one PCR")
	}
	idx := sortedKeys(pcrs)
	sel := make([]uint, 0, len(idx))
	values := sha256.New()
	for _, i := range idx {
		if i > maxPCRIndex || len(pcrs[i]) != sha256.Size {
			return nil, fmt.Errorf("attest: PCR %d is not a SHA-256 PCR of a PC Client TPM", i)
		}
		sel = append(sel, uint(i))
		values.Write(pcrs[i])
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	cmd := tpm2.PolicyPCR{
		PcrDigest: tpm2.TPM2BDigest{Buffer: values.Sum(nil)},
		Pcrs: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash:      tpm2.TPMAlgSHA256,
			PCRSelect: tpm2.PCClientCompatible.PCRs(sel...),
		}}},
	}
	if err := cmd.Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

// SealToTPM makes a TPM duplicate blob holding secret (normally a 32-byte
// data key) that only the TPM holding ek can import, and only while its
// SHA-256 PCRs hold the values in pcrs can unseal. It is the TPM-bound
// release of the protocol:
//
//   - the object is a KEYEDHASH sealed-data object, name algorithm
//     SHA-256, with fixedTPM, fixedParent, userWithAuth and
//     sensitiveDataOrigin clear, adminWithPolicy and noDA set, and
//     authPolicy = [SealPolicy](pcrs): no password opens it, only the PCR
//     state does;
//   - it is wrapped for the EK with go-tpm's CreateDuplicate (outer wrapper
//     only: symmetricAlg TPM_ALG_NULL, no inner wrapper), the EK public
//     area chosen as in [NewChallenge].
//
// public is the marshaled TPM2B_PUBLIC of the sealed object, duplicate the
// TPM2B_PRIVATE buffer and inSymSeed the TPM2B_ENCRYPTED_SECRET buffer
// (both without size fields): the TPMDuplicate message's fields. The node
// imports under its EK (PolicySecret(TPM_RH_ENDORSEMENT) session), loads,
// and unseals in a PolicyPCR session. rand nil means crypto/rand.
func SealToTPM(rand io.Reader, ek *EK, pcrs map[uint32][]byte, secret []byte) (public, duplicate, inSymSeed []byte, err error) {
	if rand == nil {
		rand = cryptoRand
	}
	if len(secret) == 0 || len(secret) > maxSealedData {
		return nil, nil, nil, fmt.Errorf("attest: a sealed secret has 1 to %d bytes, not %d", maxSealedData, len(secret))
	}
	policy, err := SealPolicy(pcrs)
	if err != nil {
		return nil, nil, nil, err
	}
	ekPub, err := ekTPMPublic(ek)
	if err != nil {
		return nil, nil, nil, err
	}
	key, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, nil, nil, refuse(ErrEK, "EK cannot protect a duplicate: %v", err)
	}

	// The obfuscation value (seedValue) keeps the public unique field,
	// H(seedValue ‖ secret), from revealing anything about the secret.
	seed := make([]byte, sha256.Size)
	if _, err := io.ReadFull(rand, seed); err != nil {
		return nil, nil, nil, fmt.Errorf("attest: reading randomness: %w", err)
	}
	unique := sha256.New()
	unique.Write(seed)
	unique.Write(secret)
	pub := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            false,
			FixedParent:         false,
			SensitiveDataOrigin: false,
			UserWithAuth:        false,
			AdminWithPolicy:     true,
			NoDA:                true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique.Sum(nil)}),
	}
	name, err := tpm2.ObjectName(&pub)
	if err != nil {
		return nil, nil, nil, err
	}
	sensitive := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: seed},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: secret}),
	})
	duplicate, inSymSeed, err = tpm2.CreateDuplicate(rand, key, name.Buffer, sensitive)
	if err != nil {
		return nil, nil, nil, refuse(ErrEK, "EK cannot protect a duplicate: %v", err)
	}
	return tpm2.Marshal(tpm2.New2B(pub)), duplicate, inSymSeed, nil
}
