package attest

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"maps"
	"slices"
	"time"

	"github.com/cloudflare/circl/hpke"
)

// Verify checks the evidence a node sent for the challenge ch against the
// policy of the node's class, and is the only way to obtain a [Verified].
// The checks, in order, each refusing with the sentinel named:
//
//  1. the challenge has not expired at pol.Now (ErrNonce). Single use is
//     the server's part: it deletes the challenge before calling Verify;
//  2. the EK certificate is still valid and the EK is not revoked in
//     pol.RevokedFingerprints / pol.RevokedSerials (ErrEK);
//  3. the activated secret equals the credential secret, compared in
//     constant time (ErrSecret): the AK is in the TPM that holds the EK;
//  4. the evidence's AK public area is byte for byte the challenged one
//     (ErrAK). The quote must be checked with the AK that was activated,
//     or a node could activate one AK and quote with another (Keylime
//     CVE-2022-1053);
//  5. the AK template, again (ErrAK);
//  6. the binding key is an X-Wing public key (ErrBindingKey);
//  7. the quote, by [VerifyQuote], with qualifying data
//     [QualifyingData](ch.Nonce, ev.BindingKey) (ErrQuote, ErrSignature,
//     ErrPCR);
//  8. the quote selects every PCR of the policy and of ch.PCRSelection,
//     and each policy PCR equals its reference value (ErrPCR);
//  9. when pol.RequireEventLog, the event log replays to the quoted PCRs
//     ([ReplayEventLog]; ErrEventLog). A log sent when the class does not
//     require one is not judged, only hashed into EvidenceHash.
//
// Errors that are not refusals (no time in the policy, a malformed
// challenge or policy) are plain errors: they are the server's bugs.
func Verify(ch *Challenge, ev *Evidence, pol Policy) (*Verified, error) {
	if ch == nil || ev == nil {
		return nil, errors.New("attest: Verify needs a challenge and evidence")
	}
	if pol.Now.IsZero() {
		return nil, errors.New("attest: Policy.Now is not set")
	}
	if len(ch.Secret) != secretSize || len(ch.Nonce) != nonceSize || ch.EK == nil {
		return nil, errors.New("attest: malformed challenge")
	}
	for i, ref := range pol.PCRs {
		if i > maxPCRIndex || len(ref) != sha256.Size {
			return nil, errors.New("attest: policy reference values must be SHA-256 PCRs 0 to 23")
		}
	}

	if !pol.Now.Before(ch.Expires) {
		return nil, refuse(ErrNonce, "challenge %s expired at %s", ch.ID, ch.Expires.UTC().Format(time.RFC3339))
	}
	if c := ch.EK.Certificate; c != nil && pol.Now.After(c.NotAfter) {
		return nil, refuse(ErrEK, "EK certificate expired on %s", c.NotAfter.UTC().Format(time.RFC3339))
	}
	if err := CheckRevoked(ch.EK, pol.RevokedFingerprints, pol.RevokedSerials); err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(ev.ActivatedSecret, ch.Secret) != 1 {
		return nil, refuse(ErrSecret, "the activated secret does not match: the AK is not in the TPM that holds the EK, or the credential was not activated")
	}
	if !bytes.Equal(ev.AKPublic, ch.AKPublic) {
		return nil, refuse(ErrAK, "the evidence's AK is not the AK that was challenged and activated")
	}
	_, name, ak, err := parseCheckedAK(ch.AKPublic)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(name, ch.AKName) {
		return nil, errors.New("attest: malformed challenge: AK name does not match its public area")
	}
	if err := CheckBindingKey(ev.BindingKey); err != nil {
		return nil, err
	}
	qi, err := verifyQuote(ak, ev.Quote, ev.Signature, ev.PCRs, QualifyingData(ch.Nonce, ev.BindingKey))
	if err != nil {
		return nil, err
	}
	for _, i := range sortedKeys(pol.PCRs) {
		if !slices.Contains(qi.PCRs, i) {
			return nil, refuse(ErrPCR, "PCR %d required by the class is not in the quote", i)
		}
	}
	for _, i := range ch.PCRSelection {
		if !slices.Contains(qi.PCRs, i) {
			return nil, refuse(ErrPCR, "PCR %d requested by the challenge is not in the quote", i)
		}
	}
	for _, i := range sortedKeys(pol.PCRs) {
		if got, want := ev.PCRs[i], pol.PCRs[i]; !bytes.Equal(got, want) {
			return nil, refuse(ErrPCR, "PCR %d is %x, the class expects %x", i, got, want)
		}
	}
	quirks := slices.Clone(ch.EK.Quirks)
	if pol.RequireEventLog {
		if len(ev.EventLog) == 0 {
			return nil, refuse(ErrEventLog, "the class requires an event log and none was sent")
		}
		q, err := replayEventLog(ev.EventLog, ev.PCRs)
		if err != nil {
			return nil, err
		}
		quirks = append(quirks, q...)
	}

	pcrs := make(map[uint32][]byte, len(ev.PCRs))
	for i, v := range ev.PCRs {
		pcrs[i] = slices.Clone(v)
	}
	return &Verified{
		EK:           ch.EK,
		AKName:       slices.Clone(ch.AKName),
		BindingKey:   slices.Clone(ev.BindingKey),
		PCRs:         pcrs,
		EvidenceHash: EvidenceHash(ev),
		ChallengeID:  ch.ID,
		Quote:        qi,
		Quirks:       quirks,
		verified:     true,
	}, nil
}

// CheckBindingKey refuses (ErrBindingKey) anything but a raw X-Wing public
// key (HPKE KEM_XWING, circl's encoding), canonically encoded: the release
// path seals data keys to it, so it must parse there too.
func CheckBindingKey(b []byte) error {
	if len(b) == 0 {
		return refuse(ErrBindingKey, "no binding key")
	}
	scheme := hpke.KEM_XWING.Scheme()
	if len(b) != scheme.PublicKeySize() {
		return refuse(ErrBindingKey, "binding key has %d bytes; an X-Wing public key has %d", len(b), scheme.PublicKeySize())
	}
	pk, err := scheme.UnmarshalBinaryPublicKey(b)
	if err != nil {
		return refuse(ErrBindingKey, "binding key is not an X-Wing public key: %v", err)
	}
	again, err := pk.MarshalBinary()
	if err != nil || !bytes.Equal(again, b) {
		return refuse(ErrBindingKey, "binding key is not canonically encoded")
	}
	return nil
}

// evidenceHashLabel separates EvidenceHash from any other SHA-256 use.
const evidenceHashLabel = "coffre evidence v1"

// EvidenceHash is SHA-256 over an unambiguous encoding of every field of
// ev, for audit entries: the label "coffre evidence v1", then
// ActivatedSecret, AKPublic, Quote, Signature, the PCRs, EventLog and
// BindingKey, each byte string preceded by its length as a big-endian
// uint64, the PCRs as their count followed by index (uint32) and value
// for each, in ascending index order. The activated secret is single-use
// and random, so its hash reveals nothing.
func EvidenceHash(ev *Evidence) [32]byte {
	h := sha256.New()
	field := func(b []byte) {
		h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(b))))
		h.Write(b)
	}
	field([]byte(evidenceHashLabel))
	if ev == nil {
		ev = &Evidence{}
	}
	field(ev.ActivatedSecret)
	field(ev.AKPublic)
	field(ev.Quote)
	field(ev.Signature)
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(ev.PCRs))))
	for _, i := range slices.Sorted(maps.Keys(ev.PCRs)) {
		h.Write(binary.BigEndian.AppendUint32(nil, i))
		field(ev.PCRs[i])
	}
	field(ev.EventLog)
	field(ev.BindingKey)
	var out [32]byte
	h.Sum(out[:0])
	return out
}
