package attest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// Sizes of the challenge's random values.
const (
	secretSize = 32
	nonceSize  = 32
	idSize     = 16
)

// NewChallenge makes the server's side of a challenge for a node that
// presented ek and the AK public area akPublic (TPM2B_PUBLIC). It refuses
// an AK that fails [CheckAKTemplate] (ErrAK) and an EK it cannot make a
// credential for (ErrEK), then makes:
//
//   - a 32-byte secret, and TPM2_MakeCredential's output for the AK's name
//     under the EK (go-tpm's CreateCredential): only the TPM holding that
//     EK, with that exact AK loaded, can recover the secret;
//   - a 32-byte nonce and a random ID;
//   - Expires = now + ttl.
//
// pcrs is the selection the quote must cover (the class's PCRs; indexes 0
// to 23), kept sorted and without duplicates.
//
// MakeCredential needs the EK's public area (its name algorithm and
// symmetric parameters), so ek.Public is used when set. For an EK pinned
// as a PKIX key alone, the public area of the TCG default EK template with
// that key is assumed: template L-1 for RSA-2048 and L-2 for ECC P-256
// (go-tpm's RSAEKTemplate and ECCEKTemplate). A TPM whose EK came from
// another template cannot activate that credential; enroll its
// TPM2B_PUBLIC instead.
//
// rand is the randomness source (nil means crypto/rand). The server keeps
// the challenge, gives the node only ID, Nonce, CredentialBlob,
// EncryptedSecret, PCRSelection and Expires, and deletes the challenge
// when evidence for it arrives, so that it is answered at most once.
func NewChallenge(rand io.Reader, ek *EK, akPublic []byte, pcrs []uint32, ttl time.Duration, now time.Time) (*Challenge, error) {
	if rand == nil {
		rand = cryptoRand
	}
	if ttl <= 0 {
		return nil, errors.New("attest: challenge lifetime must be positive")
	}
	if now.IsZero() {
		return nil, errors.New("attest: no current time")
	}
	sel := slices.Clone(pcrs)
	slices.Sort(sel)
	sel = slices.Compact(sel)
	for _, i := range sel {
		if i > maxPCRIndex {
			return nil, fmt.Errorf("attest: PCR %d does not exist on a PC Client TPM", i)
		}
	}
	_, name, _, err := parseCheckedAK(akPublic)
	if err != nil {
		return nil, err
	}
	ekPub, err := ekTPMPublic(ek)
	if err != nil {
		return nil, err
	}
	key, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, refuse(ErrEK, "EK cannot protect a credential: %v", err)
	}

	secret, nonce, id := make([]byte, secretSize), make([]byte, nonceSize), make([]byte, idSize)
	for _, b := range [][]byte{secret, nonce, id} {
		if _, err := io.ReadFull(rand, b); err != nil {
			return nil, fmt.Errorf("attest: reading randomness: %w", err)
		}
	}
	blob, encSecret, err := tpm2.CreateCredential(rand, key, name, secret)
	if err != nil {
		// The EK is the outside input here; a key that Go's RSA or ECDH
		// code refuses surfaces at this point.
		return nil, refuse(ErrEK, "EK cannot protect a credential: %v", err)
	}
	return &Challenge{
		ID:              hex.EncodeToString(id),
		Nonce:           nonce,
		EK:              ek,
		AKPublic:        slices.Clone(akPublic),
		AKName:          name,
		Secret:          secret,
		CredentialBlob:  blob,
		EncryptedSecret: encSecret,
		PCRSelection:    sel,
		Expires:         now.Add(ttl),
	}, nil
}

// cryptoRand is the default randomness source.
var cryptoRand io.Reader = rand.Reader
