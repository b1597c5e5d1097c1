package attest

import (
	"crypto"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// ParseAKPublic parses an AK public area sent as a TPM2B_PUBLIC and
// returns it with its TPM name (nameAlg followed by the digest of the
// TPMT_PUBLIC bytes exactly as received). The encoding must be canonical,
// with nothing after it, and the template must pass [CheckAKTemplate]:
// a public area that parses but is no AK is refused here too, so that no
// caller can forget the check. Refusals are *Error with ErrAK.
func ParseAKPublic(b []byte) (*tpm2.TPMTPublic, []byte, error) {
	pub, name, _, err := parseCheckedAK(b)
	if err != nil {
		return nil, nil, err
	}
	return pub, name, nil
}

// CheckAKTemplate refuses (ErrAK) a public area that is not an attestation
// key whose quotes can be trusted:
//
//   - restricted and sign, not decrypt: a restricted signing key signs only
//     digests the TPM itself made, so it cannot sign a forged TPMS_ATTEST
//     (a non-restricted key can sign anything, including a fake quote);
//   - fixedTPM, fixedParent and sensitiveDataOrigin: the private key was
//     made in this TPM and can never leave it;
//   - name algorithm SHA-256;
//   - RSA of 2048 bits or more with RSASSA or RSAPSS over SHA-256, or ECC
//     on P-256 or P-384 with ECDSA over SHA-256 or SHA-384.
func CheckAKTemplate(pub *tpm2.TPMTPublic) error {
	if pub == nil {
		return refuse(ErrAK, "no AK public area")
	}
	if _, err := akKey(pub); err != nil {
		return err
	}
	return nil
}

// akScheme is the signing scheme of a checked AK.
type akScheme struct {
	sig     tpm2.TPMAlgID    // RSASSA, RSAPSS or ECDSA
	hashAlg tpm2.TPMIAlgHash // SHA-256 or SHA-384
	hash    crypto.Hash
}

// akKey checks the AK template and returns its key and signing scheme.
func akKey(pub *tpm2.TPMTPublic) (*akPublicKey, error) {
	if pub.NameAlg != tpm2.TPMAlgSHA256 {
		return nil, refuse(ErrAK, "AK name algorithm is %s; SHA-256 is required", tpmAlgName(pub.NameAlg))
	}
	a := pub.ObjectAttributes
	switch {
	case !a.Restricted:
		return nil, refuse(ErrAK, "AK is not restricted: a non-restricted key can sign a forged quote")
	case !a.SignEncrypt:
		return nil, refuse(ErrAK, "AK is not a signing key")
	case a.Decrypt:
		return nil, refuse(ErrAK, "AK is also a decryption key; an AK must be sign-only")
	case !a.FixedTPM:
		return nil, refuse(ErrAK, "AK is not fixedTPM: it could have been duplicated out of its TPM")
	case !a.FixedParent:
		return nil, refuse(ErrAK, "AK is not fixedParent")
	case !a.SensitiveDataOrigin:
		return nil, refuse(ErrAK, "AK was not generated inside the TPM (sensitiveDataOrigin clear)")
	}
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		k, parms, err := rsaPublic(pub)
		if err != nil {
			return nil, refuse(ErrAK, "AK: %v", err)
		}
		if parms.Symmetric.Algorithm != tpm2.TPMAlgNull {
			return nil, refuse(ErrAK, "AK is a signing key with a symmetric algorithm")
		}
		var hashAlg tpm2.TPMIAlgHash
		switch parms.Scheme.Scheme {
		case tpm2.TPMAlgRSASSA:
			d, err := parms.Scheme.Details.RSASSA()
			if err != nil {
				return nil, refuse(ErrAK, "AK RSASSA scheme without details")
			}
			hashAlg = d.HashAlg
		case tpm2.TPMAlgRSAPSS:
			d, err := parms.Scheme.Details.RSAPSS()
			if err != nil {
				return nil, refuse(ErrAK, "AK RSAPSS scheme without details")
			}
			hashAlg = d.HashAlg
		default:
			return nil, refuse(ErrAK, "AK RSA scheme is %s; RSASSA or RSAPSS is required", tpmAlgName(parms.Scheme.Scheme))
		}
		if hashAlg != tpm2.TPMAlgSHA256 {
			return nil, refuse(ErrAK, "AK %s hash is %s; SHA-256 is required", tpmAlgName(parms.Scheme.Scheme), tpmAlgName(hashAlg))
		}
		return &akPublicKey{key: k, scheme: akScheme{sig: parms.Scheme.Scheme, hashAlg: hashAlg, hash: crypto.SHA256}, size: int(parms.KeyBits) / 8}, nil
	case tpm2.TPMAlgECC:
		k, parms, err := eccPublic(pub)
		if err != nil {
			return nil, refuse(ErrAK, "AK: %v", err)
		}
		if parms.Symmetric.Algorithm != tpm2.TPMAlgNull {
			return nil, refuse(ErrAK, "AK is a signing key with a symmetric algorithm")
		}
		if parms.KDF.Scheme != tpm2.TPMAlgNull {
			return nil, refuse(ErrAK, "AK has a KDF scheme")
		}
		if parms.Scheme.Scheme != tpm2.TPMAlgECDSA {
			return nil, refuse(ErrAK, "AK ECC scheme is %s; ECDSA is required", tpmAlgName(parms.Scheme.Scheme))
		}
		d, err := parms.Scheme.Details.ECDSA()
		if err != nil {
			return nil, refuse(ErrAK, "AK ECDSA scheme without details")
		}
		var h crypto.Hash
		switch d.HashAlg {
		case tpm2.TPMAlgSHA256:
			h = crypto.SHA256
		case tpm2.TPMAlgSHA384:
			h = crypto.SHA384
		default:
			return nil, refuse(ErrAK, "AK ECDSA hash is %s; SHA-256 or SHA-384 is required", tpmAlgName(d.HashAlg))
		}
		return &akPublicKey{key: k, scheme: akScheme{sig: tpm2.TPMAlgECDSA, hashAlg: d.HashAlg, hash: h}, size: (k.Curve.Params().BitSize + 7) / 8}, nil
	}
	return nil, refuse(ErrAK, "AK is a %s key; RSA or ECC is required", tpmAlgName(pub.Type))
}

// akPublicKey is a checked AK: its Go key, its scheme and the byte size of
// its signatures' components (RSA modulus or ECC coordinate).
type akPublicKey struct {
	key    crypto.PublicKey
	scheme akScheme
	size   int
}

// parseCheckedAK parses a TPM2B_PUBLIC AK, computes its name and checks
// its template.
func parseCheckedAK(b []byte) (*tpm2.TPMTPublic, []byte, *akPublicKey, error) {
	if len(b) > maxPublicSize {
		return nil, nil, nil, refuse(ErrAK, "AK public area of %d bytes is too large", len(b))
	}
	pub, inner, err := parseTPM2BPublic(b)
	if err != nil {
		return nil, nil, nil, refuse(ErrAK, "AK public area: %v", err)
	}
	name, err := objectName(pub.NameAlg, inner)
	if err != nil {
		return nil, nil, nil, refuse(ErrAK, "AK public area: %v", err)
	}
	k, err := akKey(pub)
	if err != nil {
		return nil, nil, nil, err
	}
	return pub, name, k, nil
}

func (s akScheme) String() string {
	return fmt.Sprintf("%s-%s", tpmAlgName(s.sig), tpmAlgName(s.hashAlg))
}
