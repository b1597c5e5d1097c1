package tpmtest

import "github.com/google/go-tpm/tpm2"

// akAttributes are the protocol's AK attributes: restricted, sign-only,
// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth.
var akAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	Restricted:          true,
	SignEncrypt:         true,
}

// RSAAKTemplate is the protocol's default AK: RSA-2048, RSASSA-SHA256.
var RSAAKTemplate = rsaAK(tpm2.TPMAlgRSASSA)

// RSAPSSAKTemplate is an RSA-2048 RSAPSS-SHA256 AK.
var RSAPSSAKTemplate = rsaAK(tpm2.TPMAlgRSAPSS)

// ECCAKTemplate is an ECC P-256 ECDSA-SHA256 AK.
var ECCAKTemplate = eccAK(tpm2.TPMECCNistP256, tpm2.TPMAlgSHA256)

// ECCP384AKTemplate is an ECC P-384 ECDSA-SHA384 AK.
var ECCP384AKTemplate = eccAK(tpm2.TPMECCNistP384, tpm2.TPMAlgSHA384)

// UnrestrictedSigningTemplate is an RSA-2048 RSASSA-SHA256 signing key
// that is not restricted: it signs any digest, so it can sign a forged
// TPMS_ATTEST.
var UnrestrictedSigningTemplate = func() tpm2.TPMTPublic {
	t := rsaAK(tpm2.TPMAlgRSASSA)
	t.ObjectAttributes.Restricted = false
	return t
}()

func rsaAK(scheme tpm2.TPMAlgID) tpm2.TPMTPublic {
	details := tpm2.NewTPMUAsymScheme(scheme, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256})
	if scheme == tpm2.TPMAlgRSAPSS {
		details = tpm2.NewTPMUAsymScheme(scheme, &tpm2.TPMSSigSchemeRSAPSS{HashAlg: tpm2.TPMAlgSHA256})
	}
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgRSA,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: akAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: scheme, Details: details},
			KeyBits:   2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}),
	}
}

func eccAK(curve tpm2.TPMECCCurve, hash tpm2.TPMAlgID) tpm2.TPMTPublic {
	size := 32
	if curve == tpm2.TPMECCNistP384 {
		size = 48
	}
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: akAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: hash}),
			},
			CurveID: curve,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: make([]byte, size)},
			Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, size)},
		}),
	}
}
