package attest

// Files written by tpm2-tools (https://github.com/tpm2-software/tpm2-tools),
// so that evidence gathered by hand on a node with tpm2_createak and
// tpm2_quote can be verified offline by the same code as the agent's
// evidence. The formats were read from tpm2-tools 5.x (lib/pcr.c
// pcr_fwrite_serialized, lib/tpm2_convert.c tpm2_convert_sig_save and
// tpm2_convert_pubkey_save, tools/tpm2_quote.c write_output_files) and
// checked against files recorded from tpm2-tools 5.4 with
// testdata/make-tpm2-tools-evidence.sh.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// Layout of the "serialized" PCR file of tpm2_quote -o and
// tpm2_pcrread -F serialized -o. It is not a TPM wire encoding but a memory
// dump of the TSS2 C structures TPML_PCR_SELECTION, a UINT32 count and that
// many TPML_DIGEST, every integer little-endian (htole16/htole32), with the
// C compiler's padding and every unused array slot included. The sizes come
// from tss2_tpm2_types.h (TPM2_NUM_PCR_BANKS 16, TPM2_MAX_PCRS 32 so
// TPM2_PCR_SELECT_MAX 4, TPML_DIGEST holding 8 digests, TPMU_HA 64 bytes)
// and match the recorded files: 4+16*8 = 132 bytes of selection, 4 bytes of
// count, 4+8*66 = 532 bytes per digest list.
const (
	tssNumPCRBanks       = 16
	tssPCRSelectMax      = 4
	tssPCRSelectionSize  = 8 // hash(2) sizeofSelect(1) pcrSelect[4] + 1 padding byte
	tssPCRSelectionList  = 4 + tssNumPCRBanks*tssPCRSelectionSize
	tssDigestsPerList    = 8
	tssHashMax           = 64             // sizeof(TPMU_HA): a SHA-512 digest
	tssDigestSize        = 2 + tssHashMax // TPM2B_DIGEST: size(2) buffer[64]
	tssDigestList        = 4 + tssDigestsPerList*tssDigestSize
	tssMaxDigestLists    = 32 // tpm2_pcrs.pcr_values in tpm2-tools' pcr.h
	tssPCRFileHeaderSize = tssPCRSelectionList + 4
)

// ParseTPM2ToolsPCRs parses the PCR file written by tpm2_quote -o (whose
// default -F is "serialized") or tpm2_pcrread -F serialized -o, and returns
// the SHA-256 PCR values by index, as [Evidence].PCRs takes them.
//
// Only the SHA-256 bank is accepted: a file selecting any other bank is
// refused, so that a verifier never mixes banks by accident. The "values"
// format (tpm2_pcrread's default for -o: bare digests without the selection)
// is refused too, because nothing in it says which PCR a digest belongs to.
// Unused array slots and padding in the file are ignored: tpm2-tools writes
// whatever its in-memory structures hold there, and those bytes are not
// covered by the quote anyway — the values returned are checked against the
// quote's PCR digest by [VerifyQuote].
//
// Errors are *[Error] with check [ErrPCR].
func ParseTPM2ToolsPCRs(b []byte) (map[uint32][]byte, error) {
	if len(b) < tssPCRFileHeaderSize+tssDigestList || (len(b)-tssPCRFileHeaderSize)%tssDigestList != 0 {
		hint := ""
		if len(b)%32 == 0 && len(b) > 0 && len(b) <= 24*32 {
			hint = " (it looks like tpm2_pcrread's default \"values\" format, which does not say which PCR each value belongs to: record it with tpm2_pcrread -F serialized -o or use tpm2_quote -o)"
		}
		return nil, pcrFileError("a tpm2-tools serialized PCR file is %d+%d·k bytes, this one is %d%s",
			tssPCRFileHeaderSize, tssDigestList, len(b), hint)
	}
	le := binary.LittleEndian
	nsel := le.Uint32(b)
	if nsel == 0 || nsel > tssNumPCRBanks {
		return nil, pcrFileError("PCR selection count is %d, want 1 to %d (is this a tpm2-tools serialized PCR file?)", nsel, tssNumPCRBanks)
	}
	// The order in which the file's digests are listed: bank by bank, PCR
	// by PCR, as tpm2-tools' pcr_fwrite_values walks them.
	var pcrs []uint32
	for i := range nsel {
		s := b[4+i*tssPCRSelectionSize:]
		alg := tpm2.TPMAlgID(le.Uint16(s))
		size := int(s[2])
		if alg != tpm2.TPMAlgSHA256 {
			return nil, pcrFileError("the file selects the %s bank; only the SHA-256 bank is accepted (quote with tpm2_quote -l sha256:…)", algName(alg))
		}
		if size > tssPCRSelectMax {
			return nil, pcrFileError("PCR selection is %d bytes, at most %d", size, tssPCRSelectMax)
		}
		for idx := range uint32(size) * 8 {
			if s[3+idx/8]&(1<<(idx%8)) != 0 {
				pcrs = append(pcrs, idx)
			}
		}
	}
	if len(pcrs) == 0 {
		return nil, pcrFileError("the file selects no PCR")
	}
	nlists := le.Uint32(b[tssPCRSelectionList:])
	if want := (len(b) - tssPCRFileHeaderSize) / tssDigestList; int64(nlists) != int64(want) || nlists > tssMaxDigestLists {
		return nil, pcrFileError("the file says it holds %d digest lists but has room for %d", nlists, want)
	}
	out := make(map[uint32][]byte, len(pcrs))
	next := 0
	for l := range int(nlists) {
		list := b[tssPCRFileHeaderSize+l*tssDigestList:]
		n := le.Uint32(list)
		if n == 0 || n > tssDigestsPerList {
			return nil, pcrFileError("digest list %d holds %d digests, want 1 to %d", l, n, tssDigestsPerList)
		}
		for d := range int(n) {
			dg := list[4+d*tssDigestSize:]
			size := int(le.Uint16(dg))
			if size != 32 {
				return nil, pcrFileError("digest %d is %d bytes, a SHA-256 PCR is 32", next, size)
			}
			if next >= len(pcrs) {
				return nil, pcrFileError("the file holds more digests than the %d PCRs it selects", len(pcrs))
			}
			idx := pcrs[next]
			if _, dup := out[idx]; dup {
				return nil, pcrFileError("PCR %d is selected twice", idx)
			}
			out[idx] = bytes.Clone(dg[2 : 2+size])
			next++
		}
	}
	if next != len(pcrs) {
		return nil, pcrFileError("the file selects %d PCRs but holds %d digests", len(pcrs), next)
	}
	return out, nil
}

func pcrFileError(format string, args ...any) error {
	return &Error{Check: ErrPCR, Reason: "tpm2-tools PCR file: " + fmt.Sprintf(format, args...)}
}

// ParseTPM2ToolsQuote parses the message file of tpm2_quote -m and returns
// the TPMS_ATTEST bytes the TPM signed, as [Evidence].Quote takes them.
//
// tpm2-tools 5.x writes the bare TPMS_ATTEST (files_save_bytes_to_file of
// attestationData); some older tools and scripts keep the TPM2B_ATTEST size
// prefix. Both are accepted: a TPMS_ATTEST starts with TPM_GENERATED_VALUE
// (0xff 'T' 'C' 'G') and a size prefix never does, since a TPM2B_ATTEST is
// far shorter than 0xff00 bytes.
//
// Errors are *[Error] with check [ErrQuote].
func ParseTPM2ToolsQuote(b []byte) ([]byte, error) {
	if len(b) >= 2 && int(binary.BigEndian.Uint16(b)) == len(b)-2 && (len(b) < 4 || binary.BigEndian.Uint32(b) != uint32(tpm2.TPMGeneratedValue)) {
		b = b[2:]
	}
	att, err := unmarshalStrict[tpm2.TPMSAttest](b)
	if err != nil {
		return nil, &Error{Check: ErrQuote, Reason: "tpm2-tools quote message: not a TPMS_ATTEST (" + err.Error() + ")"}
	}
	// go-tpm does not enforce the magic while decoding.
	if err := att.Magic.Check(); err != nil {
		return nil, &Error{Check: ErrQuote, Reason: "tpm2-tools quote message: " + err.Error()}
	}
	if att.Type != tpm2.TPMSTAttestQuote {
		return nil, &Error{Check: ErrQuote, Reason: fmt.Sprintf("tpm2-tools quote message: attestation type is 0x%04x, not a quote (0x%04x)", uint16(att.Type), uint16(tpm2.TPMSTAttestQuote))}
	}
	return bytes.Clone(b), nil
}

// ParseTPM2ToolsSignature parses the signature file of tpm2_quote -s in
// tpm2-tools' default "tss" format — a marshaled TPMT_SIGNATURE — and
// returns it as [Evidence].Signature takes it. RSASSA, RSAPSS and ECDSA
// signatures are accepted.
//
// A file in the "plain" format (tpm2_quote -f plain: the bare RSA signature,
// or a DER ECDSA-Sig-Value) does not say how it was made; it is refused here
// and can be read with [ParseTPM2ToolsPlainSignature], which takes the AK.
//
// Errors are *[Error] with check [ErrSignature].
func ParseTPM2ToolsSignature(b []byte) ([]byte, error) {
	sig, err := unmarshalStrict[tpm2.TPMTSignature](b)
	if err != nil {
		hint := ""
		if (len(b) > 0 && b[0] == 0x30) || len(b) == 256 || len(b) == 384 || len(b) == 512 {
			hint = `; it looks like tpm2_quote -f plain output, which needs the AK to read (record it with the default -f tss)`
		}
		return nil, &Error{Check: ErrSignature, Reason: "tpm2-tools signature: not a TPMT_SIGNATURE (" + err.Error() + ")" + hint}
	}
	switch sig.SigAlg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS, tpm2.TPMAlgECDSA:
	default:
		return nil, &Error{Check: ErrSignature, Reason: "tpm2-tools signature: algorithm " + algName(sig.SigAlg) + " is not accepted (RSASSA, RSAPSS or ECDSA)"}
	}
	return bytes.Clone(b), nil
}

// ParseTPM2ToolsPlainSignature converts a signature file written by
// tpm2_quote -f plain into a marshaled TPMT_SIGNATURE, taking what the file
// leaves out from the AK: the scheme and hash of an RSA AK (the file holds
// only the raw RSASSA or RSAPSS signature, exactly as long as the modulus),
// or the hash of an ECDSA AK (the file holds a DER ECDSA-Sig-Value).
//
// The AK must name its signing scheme, as tpm2_createak's AKs do; an AK
// read from a PEM file names none, and a plain signature cannot be used with
// it.
//
// Errors are *[Error] with check [ErrSignature].
func ParseTPM2ToolsPlainSignature(b []byte, ak *tpm2.TPMTPublic) ([]byte, error) {
	fail := func(format string, args ...any) error {
		return &Error{Check: ErrSignature, Reason: "tpm2-tools plain signature: " + fmt.Sprintf(format, args...)}
	}
	if ak == nil {
		return nil, fail("no AK given")
	}
	switch ak.Type {
	case tpm2.TPMAlgRSA:
		parms, err := ak.Parameters.RSADetail()
		if err != nil {
			return nil, fail("AK has no RSA parameters")
		}
		n, err := ak.Unique.RSA()
		if err != nil {
			return nil, fail("AK has no RSA modulus")
		}
		if len(b) != len(n.Buffer) {
			return nil, fail("%d bytes, the AK's modulus is %d", len(b), len(n.Buffer))
		}
		var hash tpm2.TPMIAlgHash
		switch parms.Scheme.Scheme {
		case tpm2.TPMAlgRSASSA:
			s, err := parms.Scheme.Details.RSASSA()
			if err != nil {
				return nil, fail("AK scheme has no hash")
			}
			hash = s.HashAlg
		case tpm2.TPMAlgRSAPSS:
			s, err := parms.Scheme.Details.RSAPSS()
			if err != nil {
				return nil, fail("AK scheme has no hash")
			}
			hash = s.HashAlg
		default:
			return nil, fail("the AK names no RSA signing scheme (a PEM AK never does), so a plain signature cannot be read; record the signature with tpm2_quote -f tss")
		}
		return tpm2.Marshal(tpm2.TPMTSignature{
			SigAlg: parms.Scheme.Scheme,
			Signature: tpm2.NewTPMUSignature(parms.Scheme.Scheme, &tpm2.TPMSSignatureRSA{
				Hash: hash,
				Sig:  tpm2.TPM2BPublicKeyRSA{Buffer: bytes.Clone(b)},
			}),
		}), nil
	case tpm2.TPMAlgECC:
		parms, err := ak.Parameters.ECCDetail()
		if err != nil {
			return nil, fail("AK has no ECC parameters")
		}
		if parms.Scheme.Scheme != tpm2.TPMAlgECDSA {
			return nil, fail("the AK names no ECDSA signing scheme (a PEM AK never does), so a plain signature cannot be read; record the signature with tpm2_quote -f tss")
		}
		s, err := parms.Scheme.Details.ECDSA()
		if err != nil {
			return nil, fail("AK scheme has no hash")
		}
		size := curveBytes(parms.CurveID)
		if size == 0 {
			return nil, fail("AK curve 0x%04x is not accepted", uint16(parms.CurveID))
		}
		var es struct{ R, S *big.Int }
		rest, err := asn1.Unmarshal(b, &es)
		if err != nil || len(rest) != 0 {
			return nil, fail("not a DER ECDSA-Sig-Value")
		}
		if es.R.Sign() <= 0 || es.S.Sign() <= 0 || es.R.BitLen() > size*8 || es.S.BitLen() > size*8 {
			return nil, fail("r or s out of range for the AK's curve")
		}
		return tpm2.Marshal(tpm2.TPMTSignature{
			SigAlg: tpm2.TPMAlgECDSA,
			Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
				Hash:       s.HashAlg,
				SignatureR: tpm2.TPM2BECCParameter{Buffer: es.R.FillBytes(make([]byte, size))},
				SignatureS: tpm2.TPM2BECCParameter{Buffer: es.S.FillBytes(make([]byte, size))},
			}),
		}), nil
	}
	return nil, fail("AK type %s is not accepted", algName(ak.Type))
}

// TPM2ToolsAK is an AK public key read from a file written by tpm2_createak
// -u (or tpm2_readpublic -o).
//
// The two kinds of file prove different things. The "tss" format (the
// default) is the TPM2B_PUBLIC the TPM made, template and all: its
// attributes were checked by [CheckAKTemplate] — restricted, sign-only,
// fixedTPM, fixedParent — so that, if the key is a TPM's, a quote it signs
// can only have come from TPM2_Quote. A PEM or DER file (-f pem, -f der)
// holds only the key: nothing shows that it is a restricted TPM key rather
// than a software key that can sign any TPMS_ATTEST-shaped message, so a
// quote verified with it proves only that the holder of that key signed
// it. Callers must say so (coffrectl attest verify-quote warns). Neither
// kind binds the AK to an EK: that takes credential activation.
type TPM2ToolsAK struct {
	// Public is the AK's TPMT_PUBLIC. For a PEM or DER file it is made up
	// from the bare key: name algorithm SHA-256, no object attributes and
	// no signing scheme (TPM_ALG_NULL), so that no template check can pass
	// on it by accident.
	Public *tpm2.TPMTPublic
	// TPM2BPublic is the file's TPM2B_PUBLIC as tpm2_createak wrote it —
	// what [Evidence].AKPublic carries. Nil for PEM and DER.
	TPM2BPublic []byte
	// Name is the AK's name (TPM2B_NAME contents: nameAlg ‖ digest), as
	// tpm2_createak -n writes it and as a quote names its signer. Nil for
	// PEM and DER: a name is a digest of the template, which they lack.
	Name []byte
	// TemplateChecked reports whether the template was checked, which is
	// only possible for the "tss" format.
	TemplateChecked bool
}

// ParseTPM2ToolsAKPublic reads an AK public key file written by
// tpm2_createak -u or tpm2_readpublic -o, in the "tss" format (TPM2B_PUBLIC,
// parsed by [ParseAKPublic], checked by [CheckAKTemplate]) or as a PEM or DER
// SubjectPublicKeyInfo (RSA 2048 to 4096 bits, ECDSA P-256 or P-384; no
// template to check — see [TPM2ToolsAK]).
//
// Errors are *[Error] with check [ErrAK].
func ParseTPM2ToolsAKPublic(b []byte) (*TPM2ToolsAK, error) {
	trimmed := bytes.TrimSpace(b)
	switch {
	case bytes.HasPrefix(trimmed, []byte("-----BEGIN")):
		block, rest := pem.Decode(trimmed)
		if block == nil {
			return nil, akFileError("malformed PEM")
		}
		if block.Type != "PUBLIC KEY" {
			return nil, akFileError("PEM block is %q, want \"PUBLIC KEY\"", block.Type)
		}
		if len(bytes.TrimSpace(rest)) != 0 {
			return nil, akFileError("data after the PEM block")
		}
		return akFromPKIX(block.Bytes)
	case len(b) > 0 && b[0] == 0x30:
		// A TPM2B_PUBLIC starting with 0x30 would claim 12 KiB or more,
		// far beyond any TPMT_PUBLIC, so this can only be DER.
		return akFromPKIX(b)
	}
	if len(b) < 2 || int(binary.BigEndian.Uint16(b)) != len(b)-2 {
		return nil, akFileError("neither PEM, DER nor a TPM2B_PUBLIC (tpm2_createak -u … -f tss); a bare TPMT_PUBLIC (-f tpmt) is not accepted")
	}
	if _, err := unmarshalStrict[tpm2.TPMTPublic](b[2:]); err != nil {
		return nil, akFileError("not a TPM2B_PUBLIC (%v)", err)
	}
	pub, name, err := ParseAKPublic(b)
	if err == nil {
		err = CheckAKTemplate(pub)
	}
	if err != nil {
		var refusal *Error
		if errors.As(err, &refusal) && refusal.Check == ErrAK {
			return nil, err
		}
		return nil, &Error{Check: ErrAK, Reason: err.Error()}
	}
	return &TPM2ToolsAK{Public: pub, TPM2BPublic: bytes.Clone(b), Name: name, TemplateChecked: true}, nil
}

// VerifyTPM2ToolsQuote verifies a quote recorded with tpm2_quote, as
// [VerifyQuote] does, with the nonce given to tpm2_quote -q as the expected
// qualifying data: hand-made evidence carries the nonce itself, not
// SHA-256(nonce ‖ binding key) as the agent's does.
//
// With an AK from a "tss" file the AK's own template is used. An AK from a
// PEM or DER file has no template; it is then assumed to be an AK of the
// required shape whose signing scheme is the one the signature names, and
// only the key and the signature are really checked. That assumption is
// made here, for this one call, and is never written into ak.Public; the
// caller must report that the template was not checked
// (ak.TemplateChecked is false).
//
// Refusals are *[Error] with the check that failed.
func VerifyTPM2ToolsQuote(ak *TPM2ToolsAK, quote, sig []byte, pcrs map[uint32][]byte, nonce []byte) (*QuoteInfo, error) {
	if ak == nil || ak.Public == nil {
		return nil, &Error{Check: ErrAK, Reason: "no AK"}
	}
	if len(nonce) == 0 {
		return nil, &Error{Check: ErrNonce, Reason: "no nonce: a quote checked against no qualifying data proves no freshness"}
	}
	pub := ak.Public
	if !ak.TemplateChecked {
		var err error
		if pub, err = assumedAKTemplate(pub, sig); err != nil {
			return nil, err
		}
	}
	info, err := VerifyQuote(pub, quote, sig, pcrs, nonce)
	if errors.Is(err, ErrQuote) {
		// VerifyQuote words a qualifying-data mismatch for the agent's
		// SHA-256(nonce ‖ binding key); here the nonce was given as is.
		// It checks the signature first, so the extraData read here is
		// the TPM's.
		if att, perr := unmarshalStrict[tpm2.TPMSAttest](quote); perr == nil && !bytes.Equal(att.ExtraData.Buffer, nonce) {
			return nil, &Error{Check: ErrQuote, Reason: fmt.Sprintf("the quote's qualifying data (tpm2_quote -q) is %x, not the nonce given: replayed, or made for another nonce", att.ExtraData.Buffer)}
		}
	}
	return info, err
}

// assumedAKTemplate returns a copy of a template-less public key dressed
// as an AK — restricted, sign-only, fixedTPM, fixedParent,
// sensitiveDataOrigin — signing with the scheme the signature names, so
// that VerifyQuote checks the key and the signature.
func assumedAKTemplate(pub *tpm2.TPMTPublic, sig []byte) (*tpm2.TPMTPublic, error) {
	s, err := unmarshalStrict[tpm2.TPMTSignature](sig)
	if err != nil {
		return nil, &Error{Check: ErrSignature, Reason: "signature is not a TPMT_SIGNATURE: " + err.Error()}
	}
	var hash tpm2.TPMIAlgHash
	switch s.SigAlg {
	case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
		var rs *tpm2.TPMSSignatureRSA
		if s.SigAlg == tpm2.TPMAlgRSASSA {
			rs, err = s.Signature.RSASSA()
		} else {
			rs, err = s.Signature.RSAPSS()
		}
		if err != nil {
			return nil, &Error{Check: ErrSignature, Reason: "signature without RSA contents"}
		}
		hash = rs.Hash
	case tpm2.TPMAlgECDSA:
		es, err := s.Signature.ECDSA()
		if err != nil {
			return nil, &Error{Check: ErrSignature, Reason: "signature without ECDSA contents"}
		}
		hash = es.Hash
	default:
		return nil, &Error{Check: ErrSignature, Reason: "signature algorithm " + algName(s.SigAlg) + " is not accepted (RSASSA, RSAPSS or ECDSA)"}
	}
	out := &tpm2.TPMTPublic{
		Type:    pub.Type,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			Restricted:          true,
			SignEncrypt:         true,
		},
		Unique: pub.Unique,
	}
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		if s.SigAlg == tpm2.TPMAlgECDSA {
			return nil, &Error{Check: ErrSignature, Reason: "ECDSA signature for an RSA AK"}
		}
		p, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, &Error{Check: ErrAK, Reason: "AK has no RSA parameters"}
		}
		scheme := tpm2.TPMTRSAScheme{Scheme: s.SigAlg}
		if s.SigAlg == tpm2.TPMAlgRSASSA {
			scheme.Details = tpm2.NewTPMUAsymScheme(s.SigAlg, &tpm2.TPMSSigSchemeRSASSA{HashAlg: hash})
		} else {
			scheme.Details = tpm2.NewTPMUAsymScheme(s.SigAlg, &tpm2.TPMSSigSchemeRSAPSS{HashAlg: hash})
		}
		out.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    scheme,
			KeyBits:   p.KeyBits,
			Exponent:  p.Exponent,
		})
	case tpm2.TPMAlgECC:
		if s.SigAlg != tpm2.TPMAlgECDSA {
			return nil, &Error{Check: ErrSignature, Reason: algName(s.SigAlg) + " signature for an ECC AK"}
		}
		p, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, &Error{Check: ErrAK, Reason: "AK has no ECC parameters"}
		}
		out.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: hash}),
			},
			CurveID: p.CurveID,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		})
	default:
		return nil, &Error{Check: ErrAK, Reason: "AK type " + algName(pub.Type) + " is not accepted"}
	}
	return out, nil
}

func akFileError(format string, args ...any) error {
	return &Error{Check: ErrAK, Reason: "tpm2-tools AK file: " + fmt.Sprintf(format, args...)}
}

// akFromPKIX makes up a TPMT_PUBLIC around a bare key, with no attributes
// and no scheme (see TPM2ToolsAK.Public).
func akFromPKIX(der []byte) (*TPM2ToolsAK, error) {
	key, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, akFileError("not a SubjectPublicKeyInfo: %v", err)
	}
	pub := &tpm2.TPMTPublic{NameAlg: tpm2.TPMAlgSHA256}
	switch k := key.(type) {
	case *rsa.PublicKey:
		bits := k.N.BitLen()
		if bits < 2048 || bits > 4096 || bits%8 != 0 {
			return nil, akFileError("RSA key of %d bits; want 2048 to 4096", bits)
		}
		if k.E < 3 || k.E > 1<<31-1 {
			return nil, akFileError("RSA exponent out of range")
		}
		exp := uint32(k.E) // #nosec G115 -- bounded just above
		if exp == 65537 {
			exp = 0 // the TPM's encoding of the default exponent
		}
		pub.Type = tpm2.TPMAlgRSA
		pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits:   tpm2.TPMKeyBits(bits), // #nosec G115 -- at most 4096
			Exponent:  exp,
		})
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	case *ecdsa.PublicKey:
		var curve tpm2.TPMECCCurve
		switch k.Curve {
		case elliptic.P256():
			curve = tpm2.TPMECCNistP256
		case elliptic.P384():
			curve = tpm2.TPMECCNistP384
		default:
			return nil, akFileError("ECDSA curve %s is not accepted (P-256 or P-384)", k.Curve.Params().Name)
		}
		raw, err := k.Bytes() // 0x04 ‖ X ‖ Y
		if err != nil {
			return nil, akFileError("bad ECDSA key: %v", err)
		}
		size := (len(raw) - 1) / 2
		pub.Type = tpm2.TPMAlgECC
		pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   curve,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		})
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: raw[1 : 1+size]},
			Y: tpm2.TPM2BECCParameter{Buffer: raw[1+size:]},
		})
	default:
		return nil, akFileError("key type %T is not accepted (RSA or ECDSA)", key)
	}
	return &TPM2ToolsAK{Public: pub}, nil
}

func curveBytes(c tpm2.TPMECCCurve) int {
	switch c {
	case tpm2.TPMECCNistP256:
		return 32
	case tpm2.TPMECCNistP384:
		return 48
	}
	return 0
}

func algName(a tpm2.TPMAlgID) string {
	switch a {
	case tpm2.TPMAlgSHA1:
		return "SHA-1"
	case tpm2.TPMAlgSHA256:
		return "SHA-256"
	case tpm2.TPMAlgSHA384:
		return "SHA-384"
	case tpm2.TPMAlgSHA512:
		return "SHA-512"
	case tpm2.TPMAlgSM3256:
		return "SM3-256"
	case tpm2.TPMAlgRSASSA:
		return "RSASSA"
	case tpm2.TPMAlgRSAPSS:
		return "RSAPSS"
	case tpm2.TPMAlgECDSA:
		return "ECDSA"
	case tpm2.TPMAlgHMAC:
		return "HMAC"
	case tpm2.TPMAlgNull:
		return "NULL"
	case tpm2.TPMAlgRSA:
		return "RSA"
	case tpm2.TPMAlgECC:
		return "ECC"
	}
	return fmt.Sprintf("0x%04x", uint16(a))
}
