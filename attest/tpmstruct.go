package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// Size limits on outside input, well above what any TPM produces, so that a
// hostile node cannot make the verifier parse megabytes.
const (
	maxPublicSize    = 4096    // TPM2B_PUBLIC: about 300 to 700 bytes for RSA-4096
	maxQuoteSize     = 4096    // TPMS_ATTEST of a quote: under 200 bytes
	maxSignatureSize = 2048    // TPMT_SIGNATURE: 518 bytes for RSA-4096
	maxCertSize      = 16384   // EK certificates are 1 to 2 KiB
	maxEventLogSize  = 4 << 20 // a UEFI log with Secure Boot databases is 30 to 200 KiB
	maxPCRIndex      = 23      // PC Client TPMs have PCRs 0 to 23
)

// unmarshalStrict parses b as the TPM structure T and refuses any encoding
// that does not marshal back to exactly b. go-tpm's Unmarshal ignores
// trailing bytes and accepts some non-canonical encodings (a boolean byte
// of 2, a zero algorithm where TPM_ALG_NULL belongs); a TPM never produces
// either, and a verifier that accepted them would sign off on bytes that
// are not the structure it checked.
func unmarshalStrict[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](b []byte) (v *T, err error) {
	// go-tpm decodes by reflection and can panic on hostile bytes; these
	// are outside input, so a panic is a parse error.
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("malformed %T", v)
		}
	}()
	v, err = tpm2.Unmarshal[T, P](b)
	if err != nil {
		return nil, err
	}
	again := tpm2.Marshal(*v)
	switch {
	case len(again) < len(b):
		return nil, fmt.Errorf("%w: %d after the structure", errTrailing, len(b)-len(again))
	case !bytes.Equal(again, b):
		return nil, errNotCanonical
	}
	return v, nil
}

// Reasons a TPM structure is refused by unmarshalStrict.
var (
	errTrailing     = errors.New("trailing bytes")
	errNotCanonical = errors.New("not in canonical TPM encoding") // a TPM never writes such bytes
)

// parseTPM2BPublic parses a TPM2B_PUBLIC strictly and returns the public
// area and its exact bytes (the TPMT_PUBLIC the TPM hashes into the name).
func parseTPM2BPublic(b []byte) (*tpm2.TPMTPublic, []byte, error) {
	if len(b) < 2 {
		return nil, nil, errors.New("too short for a TPM2B_PUBLIC")
	}
	size := int(binary.BigEndian.Uint16(b))
	if size != len(b)-2 {
		return nil, nil, fmt.Errorf("TPM2B_PUBLIC size field says %d bytes, %d follow", size, len(b)-2)
	}
	inner := b[2:]
	pub, err := unmarshalStrict[tpm2.TPMTPublic](inner)
	if err != nil {
		return nil, nil, fmt.Errorf("TPMT_PUBLIC: %w", err)
	}
	return pub, inner, nil
}

// objectName is the TPM name of a public area: nameAlg followed by the
// nameAlg digest of the TPMT_PUBLIC bytes. It is computed over the bytes as
// received, never over a re-encoding.
func objectName(nameAlg tpm2.TPMIAlgHash, tpmtPublic []byte) ([]byte, error) {
	h, err := nameAlg.Hash()
	if err != nil || (h != crypto.SHA256 && h != crypto.SHA384) {
		return nil, fmt.Errorf("name algorithm %v is not SHA-256 or SHA-384", nameAlg)
	}
	name := binary.BigEndian.AppendUint16(nil, uint16(nameAlg))
	d := h.New()
	d.Write(tpmtPublic)
	return d.Sum(name), nil
}

// rsaExponent is the only RSA public exponent accepted: every TCG EK and AK
// template asks for the TPM default (exponent field 0), which is 65537.
const rsaExponent = 65537

// rsaPublic converts and checks the RSA key of a public area: 2048, 3072
// or 4096 bits, the modulus exactly KeyBits long, exponent 65537.
func rsaPublic(pub *tpm2.TPMTPublic) (*rsa.PublicKey, *tpm2.TPMSRSAParms, error) {
	parms, err := pub.Parameters.RSADetail()
	if err != nil {
		return nil, nil, errors.New("RSA key without RSA parameters")
	}
	n, err := pub.Unique.RSA()
	if err != nil {
		return nil, nil, errors.New("RSA key without a modulus")
	}
	switch parms.KeyBits {
	case 2048, 3072, 4096:
	default:
		return nil, nil, fmt.Errorf("RSA key of %d bits; 2048, 3072 or 4096 are accepted", parms.KeyBits)
	}
	if len(n.Buffer) != int(parms.KeyBits)/8 || n.Buffer[0]&0x80 == 0 {
		return nil, nil, fmt.Errorf("RSA modulus is not %d bits long", parms.KeyBits)
	}
	if n.Buffer[len(n.Buffer)-1]&1 == 0 {
		return nil, nil, errors.New("RSA modulus is even")
	}
	if parms.Exponent != 0 && parms.Exponent != rsaExponent {
		return nil, nil, fmt.Errorf("RSA exponent %d; only 65537 is accepted", parms.Exponent)
	}
	k, err := tpm2.RSAPub(parms, n)
	if err != nil {
		return nil, nil, err
	}
	return k, parms, nil
}

// eccPublic converts and checks the ECC key of a public area: NIST P-256 or
// P-384, a point on the curve.
func eccPublic(pub *tpm2.TPMTPublic) (*ecdsa.PublicKey, *tpm2.TPMSECCParms, error) {
	parms, err := pub.Parameters.ECCDetail()
	if err != nil {
		return nil, nil, errors.New("ECC key without ECC parameters")
	}
	pt, err := pub.Unique.ECC()
	if err != nil {
		return nil, nil, errors.New("ECC key without a point")
	}
	var curve elliptic.Curve
	switch parms.CurveID {
	case tpm2.TPMECCNistP256:
		curve = elliptic.P256()
	case tpm2.TPMECCNistP384:
		curve = elliptic.P384()
	default:
		return nil, nil, fmt.Errorf("ECC curve %v; NIST P-256 or P-384 are accepted", parms.CurveID)
	}
	size := (curve.Params().BitSize + 7) / 8
	if len(pt.X.Buffer) > size || len(pt.Y.Buffer) > size {
		return nil, nil, errors.New("ECC point coordinates longer than the curve")
	}
	// TPMs may drop leading zero bytes of a coordinate: pad them back.
	raw := make([]byte, 1+2*size)
	raw[0] = 4
	copy(raw[1+size-len(pt.X.Buffer):1+size], pt.X.Buffer)
	copy(raw[1+2*size-len(pt.Y.Buffer):], pt.Y.Buffer)
	k, err := ecdsa.ParseUncompressedPublicKey(curve, raw)
	if err != nil {
		return nil, nil, errors.New("ECC point is not on the curve")
	}
	return k, parms, nil
}

// checkRSAKey applies the key rules to a PKIX RSA key.
func checkRSAKey(k *rsa.PublicKey) error {
	switch k.N.BitLen() {
	case 2048, 3072, 4096:
	default:
		return fmt.Errorf("RSA key of %d bits; 2048, 3072 or 4096 are accepted", k.N.BitLen())
	}
	if k.E != rsaExponent {
		return fmt.Errorf("RSA exponent %d; only 65537 is accepted", k.E)
	}
	if k.N.Bit(0) == 0 {
		return errors.New("RSA modulus is even")
	}
	return nil
}

// checkECDSAKey applies the key rules to an ECDSA key: P-256 or P-384 and
// a valid point (ECDH conversion checks that the point is on the curve).
func checkECDSAKey(k *ecdsa.PublicKey) error {
	if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
		return errors.New("ECC curve is not NIST P-256 or P-384")
	}
	if _, err := k.ECDH(); err != nil {
		return errors.New("ECC point is not on the curve")
	}
	return nil
}

// fingerprint is the node identity convention: lowercase hex SHA-256 of the
// PKIX DER of the public key.
func fingerprint(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// tpmAlgName names a TPM algorithm for refusal reasons.
func tpmAlgName(a tpm2.TPMAlgID) string {
	switch a {
	case tpm2.TPMAlgRSA:
		return "RSA"
	case tpm2.TPMAlgECC:
		return "ECC"
	case tpm2.TPMAlgKeyedHash:
		return "KEYEDHASH"
	case tpm2.TPMAlgSymCipher:
		return "SYMCIPHER"
	case tpm2.TPMAlgRSASSA:
		return "RSASSA"
	case tpm2.TPMAlgRSAPSS:
		return "RSAPSS"
	case tpm2.TPMAlgECDSA:
		return "ECDSA"
	case tpm2.TPMAlgNull:
		return "NULL"
	case tpm2.TPMAlgSHA1:
		return "SHA-1"
	case tpm2.TPMAlgSHA256:
		return "SHA-256"
	case tpm2.TPMAlgSHA384:
		return "SHA-384"
	case tpm2.TPMAlgSHA512:
		return "SHA-512"
	}
	return fmt.Sprintf("algorithm 0x%04x", uint16(a))
}
