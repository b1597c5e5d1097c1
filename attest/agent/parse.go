package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
)

// This file holds the parsers of outside input: what the server sends
// (credentials, sealed keys, PCR selections) and what the TPM's NV holds.
// Each rejects bad input with an error and never panics; each has a fuzz
// target in fuzz_test.go.

// Size bounds for blobs from the server. TPM 2.0 structures are small:
// a TPM2B_ID_OBJECT or TPM2B_PRIVATE carries an HMAC and one encrypted
// sensitive area; an encrypted secret is at most an RSA-4096 ciphertext.
const (
	maxIDObject        = 1024
	maxPrivate         = 2048
	maxEncryptedSecret = 1024
	maxSealedPublic    = 1024
	numPCRs            = 24 // the PC Client profile's SHA-256 bank
)

// checkPCRs validates a PCR list from the server and returns it sorted.
func checkPCRs(pcrs []uint32) ([]uint32, error) {
	if len(pcrs) > numPCRs {
		return nil, fmt.Errorf("%w: %d PCRs", ErrPCRSelection, len(pcrs))
	}
	sorted := slices.Clone(pcrs)
	slices.Sort(sorted)
	for i, p := range sorted {
		if p >= numPCRs {
			return nil, fmt.Errorf("%w: PCR %d is outside 0..%d", ErrPCRSelection, p, numPCRs-1)
		}
		if i > 0 && sorted[i-1] == p {
			return nil, fmt.Errorf("%w: PCR %d is listed twice", ErrPCRSelection, p)
		}
	}
	return sorted, nil
}

// pcrSelection is the SHA-256 bank selection of the given (valid) PCRs.
func pcrSelection(pcrs []uint32) tpm2.TPMLPCRSelection {
	bits := make([]byte, numPCRs/8)
	for _, p := range pcrs {
		bits[p/8] |= 1 << (p % 8)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: bits}}}
}

// pcrsFromSelection decodes a selection that must cover the SHA-256 bank
// only (an empty list selects nothing) and returns its PCRs in ascending
// order.
func pcrsFromSelection(sel tpm2.TPMLPCRSelection) ([]uint32, error) {
	var out []uint32
	for i, s := range sel.PCRSelections {
		if i > 0 || s.Hash != tpm2.TPMAlgSHA256 {
			return nil, errors.New("selection covers a bank other than SHA-256")
		}
		if len(s.PCRSelect) > 32 {
			return nil, errors.New("selection bitmap too long")
		}
		for byteIdx, b := range s.PCRSelect {
			for bit := range 8 {
				if b&(1<<bit) != 0 {
					out = append(out, uint32(byteIdx*8+bit))
				}
			}
		}
	}
	return out, nil
}

func equalPCRs(a, b []uint32) bool { return slices.Equal(a, b) }

// unwrapTPM2BBlob accepts a TPM2B_ID_OBJECT or TPM2B_PRIVATE either with
// its 2-byte size or as bare contents (go-tpm's CreateCredential and
// CreateDuplicate return the contents; TPM tools write the whole TPM2B),
// and returns the contents. The two forms cannot be confused: the contents
// start with the 2-byte size of an HMAC (20 to 64 bytes) followed by more
// data, so their first two bytes never equal the remaining length.
func unwrapTPM2BBlob(b []byte, limit int) ([]byte, error) {
	if len(b) > limit {
		return nil, fmt.Errorf("%d bytes, more than %d", len(b), limit)
	}
	if len(b) >= 2 && int(binary.BigEndian.Uint16(b)) == len(b)-2 {
		b = b[2:]
	}
	if len(b) < 2 {
		return nil, errors.New("too short")
	}
	hmacLen := int(binary.BigEndian.Uint16(b))
	if hmacLen < 20 || hmacLen > 64 || len(b) <= 2+hmacLen {
		return nil, fmt.Errorf("integrity HMAC of %d bytes in %d", hmacLen, len(b))
	}
	return b, nil
}

// unwrapEncryptedSecret accepts a TPM2B_ENCRYPTED_SECRET with or without
// its size, for an encryption key ek. For RSA the length decides (an RSA
// ciphertext is exactly the modulus size, and its first bytes are random,
// so they cannot be trusted to tell the forms apart); for ECC the contents
// are a TPMS_ECC_POINT whose first size field is far smaller than its
// total length.
func unwrapEncryptedSecret(b []byte, ek *tpm2.TPMTPublic) ([]byte, error) {
	if len(b) > maxEncryptedSecret {
		return nil, fmt.Errorf("%d bytes, more than %d", len(b), maxEncryptedSecret)
	}
	if ek == nil {
		return nil, errors.New("no EK")
	}
	switch ek.Type {
	case tpm2.TPMAlgRSA:
		rsaParms, err := ek.Parameters.RSADetail()
		if err != nil {
			return nil, err
		}
		n := int(rsaParms.KeyBits) / 8
		switch {
		case len(b) == n:
			return b, nil
		case len(b) == n+2 && int(binary.BigEndian.Uint16(b)) == n:
			return b[2:], nil
		}
		return nil, fmt.Errorf("%d bytes, want an RSA-%d ciphertext", len(b), n*8)
	case tpm2.TPMAlgECC:
		if len(b) >= 2 && int(binary.BigEndian.Uint16(b)) == len(b)-2 {
			b = b[2:]
		}
		p, err := safeUnmarshal[tpm2.TPMSECCPoint](b)
		if err != nil {
			return nil, fmt.Errorf("not an ECC point: %w", err)
		}
		if len(p.X.Buffer) == 0 || len(p.X.Buffer) > 66 || len(p.Y.Buffer) == 0 || len(p.Y.Buffer) > 66 {
			return nil, errors.New("ECC point coordinates of the wrong size")
		}
		return b, nil
	default:
		return nil, fmt.Errorf("EK of type %#x", uint16(ek.Type))
	}
}

// safeUnmarshal parses a TPM structure that must use up all of b. go-tpm's
// reflective decoder is not written for hostile input, so a panic in it is
// turned into an error: a malformed blob must never take the agent down.
// Canonical form is checked by re-encoding, which also rejects trailing
// bytes.
func safeUnmarshal[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](b []byte) (v *T, err error) {
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("undecodable TPM structure")
		}
	}()
	v, err = tpm2.Unmarshal[T, P](b)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(tpm2.Marshal(*v), b) {
		return nil, errors.New("not in canonical form or trailing bytes")
	}
	return v, nil
}

// parseSealedPublic parses the TPM2B_PUBLIC of a TPM-bound data key and
// checks it is what the release convention says: a SHA-256 KEYEDHASH
// sealed-data object, duplicable (fixedTPM and fixedParent clear), usable
// only through its policy (userWithAuth clear, adminWithPolicy set), with
// a SHA-256 authPolicy. Anything else is refused before it reaches the
// TPM, so that the TPM never imports an object the server did not mean to
// send.
func parseSealedPublic(b []byte) (*tpm2.TPMTPublic, error) {
	if len(b) > maxSealedPublic {
		return nil, fmt.Errorf("%d bytes, more than %d", len(b), maxSealedPublic)
	}
	pub2b, err := safeUnmarshal[tpm2.TPM2BPublic](b)
	if err != nil {
		return nil, err
	}
	pub, err := safeUnmarshal[tpm2.TPMTPublic](pub2b.Bytes())
	if err != nil {
		return nil, err
	}
	a := pub.ObjectAttributes
	switch {
	case pub.Type != tpm2.TPMAlgKeyedHash:
		return nil, fmt.Errorf("object type %#x, want KEYEDHASH", uint16(pub.Type))
	case pub.NameAlg != tpm2.TPMAlgSHA256:
		return nil, fmt.Errorf("name algorithm %#x, want SHA-256", uint16(pub.NameAlg))
	case a.FixedTPM || a.FixedParent || a.UserWithAuth || !a.AdminWithPolicy || a.SensitiveDataOrigin:
		return nil, errors.New("attributes are not those of a duplicable, policy-only sealed object")
	case a.SignEncrypt || a.Decrypt || a.Restricted:
		return nil, errors.New("a sealed-data object cannot sign or decrypt")
	case len(pub.AuthPolicy.Buffer) != 32:
		return nil, errors.New("authPolicy is not a SHA-256 digest")
	}
	parms, err := pub.Parameters.KeyedHashDetail()
	if err != nil || parms.Scheme.Scheme != tpm2.TPMAlgNull {
		return nil, errors.New("keyed-hash scheme must be NULL for sealed data")
	}
	return pub, nil
}

// trimDER returns the single DER element at the start of b. NV indices are
// often larger than the certificate they hold and some vendors pad them;
// what follows the certificate is not part of it.
func trimDER(b []byte) ([]byte, error) {
	if len(b) < 2 || b[0] != 0x30 {
		return nil, errors.New("not a DER SEQUENCE")
	}
	var n, hdr int
	switch l := b[1]; {
	case l < 0x80:
		n, hdr = int(l), 2
	case l == 0x81 || l == 0x82 || l == 0x83:
		k := int(l & 0x7f)
		if len(b) < 2+k {
			return nil, errors.New("truncated DER length")
		}
		for _, c := range b[2 : 2+k] {
			n = n<<8 | int(c)
		}
		hdr = 2 + k
	default:
		return nil, errors.New("unsupported DER length")
	}
	if n > len(b)-hdr {
		return nil, fmt.Errorf("DER element of %d bytes in %d", n, len(b)-hdr)
	}
	return b[:hdr+n], nil
}
