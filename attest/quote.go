package attest

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"math/big"
	"slices"

	"github.com/google/go-tpm/tpm2"
)

// QualifyingData is the quote's extraData for a challenge: SHA-256(nonce ‖
// bindingKey). Binding the key into the quote is what makes the binding key
// the TPM's: only the TPM that activated the credential and quoted this
// value vouches for it.
func QualifyingData(nonce, bindingKey []byte) []byte {
	h := sha256.New()
	h.Write(nonce)
	h.Write(bindingKey)
	return h.Sum(nil)
}

// QuoteInfo is what a verified quote says.
type QuoteInfo struct {
	// PCRs are the selected PCRs of the SHA-256 bank, in ascending order.
	PCRs []uint32
	// PCRDigest is the quoted digest of their values, in the AK's scheme
	// hash.
	PCRDigest []byte
	// Clock, ResetCount, RestartCount and Safe are the TPM's clock
	// information (TPMS_CLOCK_INFO). They are obfuscated by the TPM for
	// keys outside the endorsement and platform hierarchies.
	Clock        uint64
	ResetCount   uint32
	RestartCount uint32
	Safe         bool
	// FirmwareVersion is the TPM vendor's firmware version number.
	FirmwareVersion uint64
	// QualifiedSigner is the TPM2B_NAME contents of the AK's qualified
	// name.
	QualifiedSigner []byte
}

// VerifyQuote checks a TPM2_Quote: quote is the TPMS_ATTEST (without TPM2B
// size), sig the TPMT_SIGNATURE, pcrs the SHA-256 bank values the quote is
// said to cover and extraData the expected qualifying data. It checks, in
// this order:
//
//   - the AK template (as [CheckAKTemplate]; ErrAK);
//   - the TPMS_ATTEST encoding, strictly (ErrQuote);
//   - the signature, over the SHA-256 or SHA-384 digest of quote, in the
//     AK's scheme only (ErrSignature);
//   - magic TPM_GENERATED_VALUE and type TPM_ST_ATTEST_QUOTE (ErrQuote):
//     a TPM never signs a structure with that magic on outside data, so
//     magic and type prove that the TPM made the structure;
//   - extraData, in constant time (ErrQuote);
//   - the PCR selection: the SHA-256 bank only, every supplied PCR
//     selected and every selected PCR supplied, and the digest of the
//     supplied values in selection order equal to the quoted digest
//     (ErrPCR).
//
// It does not compare PCR values with reference values: [Verify] does.
func VerifyQuote(akPub *tpm2.TPMTPublic, quote, sig []byte, pcrs map[uint32][]byte, extraData []byte) (*QuoteInfo, error) {
	if akPub == nil {
		return nil, refuse(ErrAK, "no AK public area")
	}
	ak, err := akKey(akPub)
	if err != nil {
		return nil, err
	}
	return verifyQuote(ak, quote, sig, pcrs, extraData)
}

func verifyQuote(ak *akPublicKey, quote, sig []byte, pcrs map[uint32][]byte, extraData []byte) (*QuoteInfo, error) {
	if len(extraData) == 0 {
		// A quote checked against no qualifying data proves no freshness.
		return nil, errors.New("attest: no expected qualifying data")
	}
	if len(quote) == 0 || len(quote) > maxQuoteSize {
		return nil, refuse(ErrQuote, "quote of %d bytes", len(quote))
	}
	att, err := unmarshalStrict[tpm2.TPMSAttest](quote)
	if err != nil {
		return nil, refuse(ErrQuote, "quote is not a TPMS_ATTEST: %v", err)
	}
	if err := verifySignature(ak, quote, sig); err != nil {
		return nil, err
	}
	if att.Magic != tpm2.TPMGeneratedValue {
		return nil, refuse(ErrQuote, "quote magic is 0x%08x, not TPM_GENERATED_VALUE", uint32(att.Magic))
	}
	if att.Type != tpm2.TPMSTAttestQuote {
		return nil, refuse(ErrQuote, "attestation type is 0x%04x, not TPM_ST_ATTEST_QUOTE", uint16(att.Type))
	}
	if subtle.ConstantTimeCompare(att.ExtraData.Buffer, extraData) != 1 {
		return nil, refuse(ErrQuote, "quote's qualifying data is not SHA-256(nonce ‖ binding key) of this challenge: replayed, or made for another challenge or binding key")
	}
	qi, err := att.Attested.Quote()
	if err != nil {
		return nil, refuse(ErrQuote, "quote has no TPMS_QUOTE_INFO")
	}
	selected, err := quoteSelection(&qi.PCRSelect)
	if err != nil {
		return nil, err
	}
	for _, i := range sortedKeys(pcrs) {
		if !slices.Contains(selected, i) {
			return nil, refuse(ErrPCR, "PCR %d was supplied but is outside the quote's selection", i)
		}
	}
	d := ak.scheme.hash.New()
	for _, i := range selected {
		v, ok := pcrs[i]
		if !ok {
			return nil, refuse(ErrPCR, "PCR %d is in the quote but its value was not supplied", i)
		}
		if len(v) != sha256.Size {
			return nil, refuse(ErrPCR, "PCR %d value has %d bytes, a SHA-256 PCR has 32", i, len(v))
		}
		d.Write(v)
	}
	if subtle.ConstantTimeCompare(d.Sum(nil), qi.PCRDigest.Buffer) != 1 {
		return nil, refuse(ErrPCR, "the supplied PCR values do not hash to the quoted PCR digest %s", hex.EncodeToString(qi.PCRDigest.Buffer))
	}
	return &QuoteInfo{
		PCRs:            selected,
		PCRDigest:       slices.Clone(qi.PCRDigest.Buffer),
		Clock:           att.ClockInfo.Clock,
		ResetCount:      att.ClockInfo.ResetCount,
		RestartCount:    att.ClockInfo.RestartCount,
		Safe:            att.ClockInfo.Safe,
		FirmwareVersion: att.FirmwareVersion,
		QualifiedSigner: slices.Clone(att.QualifiedSigner.Buffer),
	}, nil
}

// quoteSelection returns the PCRs a quote selects, ascending, refusing any
// bank but SHA-256.
func quoteSelection(sel *tpm2.TPMLPCRSelection) ([]uint32, error) {
	if len(sel.PCRSelections) != 1 {
		return nil, refuse(ErrPCR, "quote selects %d PCR banks; exactly one, SHA-256, is accepted", len(sel.PCRSelections))
	}
	s := sel.PCRSelections[0]
	if s.Hash != tpm2.TPMAlgSHA256 {
		return nil, refuse(ErrPCR, "quote selects the %s PCR bank; only SHA-256 is accepted", tpmAlgName(s.Hash))
	}
	var out []uint32
	for byteIdx, b := range s.PCRSelect {
		for bit := range 8 {
			if b&(1<<bit) == 0 {
				continue
			}
			i := uint32(byteIdx*8 + bit) // #nosec G115 -- byteIdx < 256 (sized8 field)
			if i > maxPCRIndex {
				return nil, refuse(ErrPCR, "quote selects PCR %d; PC Client TPMs have PCRs 0 to 23", i)
			}
			out = append(out, i)
		}
	}
	if len(out) == 0 {
		return nil, refuse(ErrPCR, "quote selects no PCR")
	}
	return out, nil
}

// verifySignature checks a TPMT_SIGNATURE over msg with the AK, in the AK's
// own scheme only: accepting another scheme than the key's would let a
// signature made for another purpose pass.
func verifySignature(ak *akPublicKey, msg, sig []byte) error {
	if len(sig) == 0 || len(sig) > maxSignatureSize {
		return refuse(ErrSignature, "signature of %d bytes", len(sig))
	}
	s, err := unmarshalStrict[tpm2.TPMTSignature](sig)
	if err != nil {
		return refuse(ErrSignature, "signature is not a TPMT_SIGNATURE: %v", err)
	}
	if s.SigAlg != ak.scheme.sig {
		return refuse(ErrSignature, "signature is %s but the AK signs with %s", tpmAlgName(s.SigAlg), tpmAlgName(ak.scheme.sig))
	}
	h := ak.scheme.hash.New()
	h.Write(msg)
	digest := h.Sum(nil)
	switch s.SigAlg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		var rs *tpm2.TPMSSignatureRSA
		if s.SigAlg == tpm2.TPMAlgRSASSA {
			rs, err = s.Signature.RSASSA()
		} else {
			rs, err = s.Signature.RSAPSS()
		}
		if err != nil {
			return refuse(ErrSignature, "signature without RSA contents")
		}
		if rs.Hash != ak.scheme.hashAlg {
			return refuse(ErrSignature, "signature hash is %s but the AK signs with %s", tpmAlgName(rs.Hash), tpmAlgName(ak.scheme.hashAlg))
		}
		if len(rs.Sig.Buffer) != ak.size {
			return refuse(ErrSignature, "RSA signature of %d bytes for a %d-byte modulus", len(rs.Sig.Buffer), ak.size)
		}
		pub, ok := ak.key.(*rsa.PublicKey)
		if !ok {
			return refuse(ErrSignature, "RSA signature from a non-RSA AK")
		}
		if s.SigAlg == tpm2.TPMAlgRSASSA {
			err = rsa.VerifyPKCS1v15(pub, ak.scheme.hash, digest, rs.Sig.Buffer)
		} else {
			// TPMs differ in the PSS salt length (the digest size per the
			// TPM specification, the maximum on some older firmware);
			// the salt length does not weaken the signature, so any is
			// accepted.
			err = rsa.VerifyPSS(pub, ak.scheme.hash, digest, rs.Sig.Buffer, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: ak.scheme.hash})
		}
		if err != nil {
			return refuse(ErrSignature, "the quote's %s signature does not verify with the AK", ak.scheme)
		}
	case tpm2.TPMAlgECDSA:
		es, err := s.Signature.ECDSA()
		if err != nil {
			return refuse(ErrSignature, "signature without ECDSA contents")
		}
		if es.Hash != ak.scheme.hashAlg {
			return refuse(ErrSignature, "signature hash is %s but the AK signs with %s", tpmAlgName(es.Hash), tpmAlgName(ak.scheme.hashAlg))
		}
		if len(es.SignatureR.Buffer) > ak.size || len(es.SignatureS.Buffer) > ak.size {
			return refuse(ErrSignature, "ECDSA signature components longer than the curve")
		}
		pub, ok := ak.key.(*ecdsa.PublicKey)
		if !ok {
			return refuse(ErrSignature, "ECDSA signature from a non-ECC AK")
		}
		r := new(big.Int).SetBytes(es.SignatureR.Buffer)
		sv := new(big.Int).SetBytes(es.SignatureS.Buffer)
		if !ecdsa.Verify(pub, digest, r, sv) {
			return refuse(ErrSignature, "the quote's %s signature does not verify with the AK", ak.scheme)
		}
	default:
		return refuse(ErrSignature, "signature algorithm %s", tpmAlgName(s.SigAlg))
	}
	return nil
}

// sortedKeys returns the PCR indexes of m in ascending order, so that
// refusal reasons name the same PCR every time.
func sortedKeys[V any](m map[uint32]V) []uint32 {
	keys := make([]uint32, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
