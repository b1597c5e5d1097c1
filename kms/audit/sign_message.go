package audit

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"strings"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

// ErrMessageSignature is returned by [Verifier.VerifyMessage] when a
// signature is malformed or either of its two halves does not verify.
var ErrMessageSignature = errors.New("audit: message signature does not verify")

// MessageSignatureSize is the size of a signature made by
// [Signer.SignMessage]: an Ed25519 signature followed by an ML-DSA-65 one.
const MessageSignatureSize = ed25519.SignatureSize + mldsa65.SignatureSize

// messagePrefix starts every signed message. 0xFF never occurs in UTF-8,
// and a signed note (a checkpoint, a cosignature) must be valid UTF-8, so
// no message signature can be replayed as a note signature or the reverse.
const messagePrefix = "\xffcoffre signed message v1\x00"

// messageBytes is what both keys sign: the prefix, the purpose, a NUL
// (purposes hold none), then msg. Distinct purposes therefore never sign
// the same bytes.
func messageBytes(purpose string, msg []byte) ([]byte, error) {
	if purpose == "" || strings.IndexByte(purpose, 0) >= 0 {
		return nil, fmt.Errorf("audit: message purpose %q must be non-empty and hold no NUL", purpose)
	}
	b := make([]byte, 0, len(messagePrefix)+len(purpose)+1+len(msg))
	b = append(b, messagePrefix...)
	b = append(b, purpose...)
	b = append(b, 0)
	return append(b, msg...), nil
}

// SignMessage signs msg for purpose (such as "coffre backup v1") with both
// of s's keys and returns the [MessageSignatureSize]-byte hybrid signature.
// It is for signed artefacts other than checkpoints; the signed bytes are
// domain-separated from notes and between purposes.
func (s *Signer) SignMessage(purpose string, msg []byte) ([]byte, error) {
	m, err := messageBytes(purpose, msg)
	if err != nil {
		return nil, err
	}
	sig := make([]byte, MessageSignatureSize)
	copy(sig, ed25519.Sign(s.edPriv, m))
	if err := mldsa65.SignTo(s.mlPriv, m, nil, true, sig[ed25519.SignatureSize:]); err != nil {
		return nil, err
	}
	return sig, nil
}

// VerifyMessage checks a signature made by [Signer.SignMessage] for
// purpose over msg. Both the Ed25519 and the ML-DSA-65 halves must verify:
// breaking one of the two algorithms is not enough to forge a message.
func (v *Verifier) VerifyMessage(purpose string, msg, sig []byte) error {
	m, err := messageBytes(purpose, msg)
	if err != nil {
		return err
	}
	if len(sig) != MessageSignatureSize {
		return fmt.Errorf("%w: signature of %d bytes, want %d", ErrMessageSignature, len(sig), MessageSignatureSize)
	}
	if !ed25519.Verify(v.edPub, m, sig[:ed25519.SignatureSize]) {
		return fmt.Errorf("%w: Ed25519 signature by %s", ErrMessageSignature, v.name)
	}
	if !mldsa65.Verify(v.mlPub, m, nil, sig[ed25519.SignatureSize:]) {
		return fmt.Errorf("%w: ML-DSA-65 signature by %s", ErrMessageSignature, v.name)
	}
	return nil
}
