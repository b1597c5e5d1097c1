package attest_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/attesttest"
	"github.com/coffre-kms/coffre/attest/internal/tpmtest"
)

// The TPM tests below share the process's one simulator: none of them is
// parallel, and each opens and closes its own (tpmtest.Open).

// TestVerifyGood is the whole happy path: EK and AK primaries, the
// credential made here (TPM2_MakeCredential in software) and activated in
// the TPM, a quote over H(nonce ‖ binding key), and Verify accepting it,
// for every accepted AK scheme and EK form.
func TestVerifyGood(t *testing.T) {
	for _, c := range []struct {
		name       string
		ekTemplate tpm2.TPMTPublic
		akTemplate tpm2.TPMTPublic
		pinPKIX    bool // enroll the EK as a PKIX key only
	}{
		{"RSA EK, RSASSA AK", tpm2.RSAEKTemplate, tpmtest.RSAAKTemplate, false},
		{"RSA EK, RSAPSS AK", tpm2.RSAEKTemplate, tpmtest.RSAPSSAKTemplate, false},
		{"RSA EK, ECDSA P-256 AK", tpm2.RSAEKTemplate, tpmtest.ECCAKTemplate, false},
		{"ECC EK, ECDSA P-384 AK", tpm2.ECCEKTemplate, tpmtest.ECCP384AKTemplate, false},
		{"pinned PKIX RSA EK", tpm2.RSAEKTemplate, tpmtest.RSAAKTemplate, true},
		{"pinned PKIX ECC EK", tpm2.ECCEKTemplate, tpmtest.ECCAKTemplate, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			tpm := tpmtest.Open(t)
			n := newNodeWithEK(t, tpm, c.ekTemplate, c.akTemplate)
			if c.pinPKIX {
				der, err := x509.MarshalPKIXPublicKey(n.ek.PublicKey)
				if err != nil {
					t.Fatal(err)
				}
				pinned, err := attest.ParseEKPublic(der)
				if err != nil {
					t.Fatal(err)
				}
				if pinned.Public != nil || pinned.Fingerprint != n.ek.Fingerprint {
					t.Fatalf("PKIX EK: Public %v, fingerprint %s, want nil and %s", pinned.Public, pinned.Fingerprint, n.ek.Fingerprint)
				}
				n.ek = pinned
			}
			tpmtest.ExtendData(t, tpm, 16, "coffre test workload")
			verifyGood(t, n)
		})
	}

	t.Run("EK certificate", func(t *testing.T) {
		tpm := tpmtest.Open(t)
		n := newNode(t, tpm, tpmtest.RSAAKTemplate)
		ca := attesttest.NewEKCA(t)
		inter := ca.NewIntermediate(t)
		der := inter.IssueEKCert(t, n.ek.PublicKey, now.AddDate(-1, 0, 0), now.AddDate(10, 0, 0))
		ek, err := attest.VerifyEKCertificate(der, ca.Pool(), inter.Pool(), now)
		if err != nil {
			t.Fatalf("VerifyEKCertificate: %v", err)
		}
		if ek.Certificate == nil || ek.Public != nil || ek.Fingerprint != n.ek.Fingerprint {
			t.Fatalf("EK from certificate: %+v", ek)
		}
		if n.ek, err = ek.WithTPMPublic(n.ekKey.PublicBytes); err != nil {
			t.Fatalf("WithTPMPublic: %v", err)
		}
		v := verifyGood(t, n)
		if v.EK.Certificate == nil {
			t.Error("Verified.EK lost its certificate")
		}
	})
}

// verifyGood runs one honest exchange over PCRs 7 and 16 and checks what
// Verify returns.
func verifyGood(t *testing.T, n *node) *attest.Verified {
	t.Helper()
	ref := tpmtest.ReadPCRs(t, n.tpm, 7, 16)
	ch := n.challenge(t, 7, 16)
	if ch.Expires != now.Add(challengeTTL) || len(ch.Nonce) != 32 || len(ch.Secret) != 32 || ch.ID == "" {
		t.Fatalf("challenge: %+v", ch)
	}
	if !bytes.Equal(ch.AKName, n.ak.Name.Buffer) {
		t.Fatalf("challenge AK name %x, the TPM says %x", ch.AKName, n.ak.Name.Buffer)
	}
	ev := n.answer(t, ch, 7, 16)
	v, err := attest.Verify(ch, ev, policyFor(ref))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !v.Valid() {
		t.Error("Verified from Verify is not Valid")
	}
	if v.EK.Fingerprint != n.ek.Fingerprint || !bytes.Equal(v.AKName, n.ak.Name.Buffer) || !bytes.Equal(v.BindingKey, ev.BindingKey) {
		t.Errorf("Verified names EK %s, AK %x, binding key %x…", v.EK.Fingerprint, v.AKName, v.BindingKey[:8])
	}
	for i, want := range ref {
		if !bytes.Equal(v.PCRs[i], want) {
			t.Errorf("Verified PCR %d = %x, want %x", i, v.PCRs[i], want)
		}
	}
	if !slices.Equal(v.Quote.PCRs, []uint32{7, 16}) || len(v.Quote.QualifiedSigner) == 0 {
		t.Errorf("QuoteInfo: %+v", v.Quote)
	}
	if v.EvidenceHash != attest.EvidenceHash(ev) || v.ChallengeID != ch.ID {
		t.Errorf("EvidenceHash %x / challenge %s", v.EvidenceHash, v.ChallengeID)
	}
	// The evidence hash covers every field.
	ev2 := *ev
	other := sha256.Sum256([]byte("another PCR 16"))
	ev2.PCRs = map[uint32][]byte{7: ev.PCRs[7], 16: other[:]}
	if attest.EvidenceHash(&ev2) == v.EvidenceHash {
		t.Error("EvidenceHash ignores the PCR values")
	}
	// The quote alone, as coffrectl checks it offline.
	akPub, name, err := attest.ParseAKPublic(ev.AKPublic)
	if err != nil || !bytes.Equal(name, ch.AKName) {
		t.Fatalf("ParseAKPublic: %v (name %x)", err, name)
	}
	if _, err := attest.VerifyQuote(akPub, ev.Quote, ev.Signature, ev.PCRs, attest.QualifyingData(ch.Nonce, ev.BindingKey)); err != nil {
		t.Errorf("VerifyQuote: %v", err)
	}
	return v
}

func TestVerifiedZeroValueIsNotValid(t *testing.T) {
	if (&attest.Verified{}).Valid() || (*attest.Verified)(nil).Valid() {
		t.Fatal("a Verified not made by Verify is Valid")
	}
}

// TestReplayedOrForeignNonce: a quote only counts for the challenge and
// binding key it was made for, and a challenge only until it expires.
func TestReplayedOrForeignNonce(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.RSAAKTemplate)
	ref := subset(tpmtest.ReadPCRs(t, tpm, 7), 7)

	ch1 := n.challenge(t, 7)
	ev1 := n.answer(t, ch1, 7)
	if _, err := attest.Verify(ch1, ev1, policyFor(ref)); err != nil {
		t.Fatalf("first exchange: %v", err)
	}

	t.Run("foreign nonce", func(t *testing.T) {
		// The node answers ch2 with a quote made for ch1, and the secret
		// of ch2 (so that only the quote is wrong).
		ch2 := n.challenge(t, 7)
		ev2 := n.answer(t, ch2, 7)
		forged := *ev1
		forged.ActivatedSecret = ev2.ActivatedSecret
		_, err := attest.Verify(ch2, &forged, policyFor(ref))
		wantRefusal(t, err, attest.ErrQuote)
	})
	t.Run("replayed quote", func(t *testing.T) {
		// An eavesdropper replays the whole first evidence against a new
		// challenge: it cannot activate the new credential...
		ch3 := n.challenge(t, 7)
		_, err := attest.Verify(ch3, ev1, policyFor(ref))
		wantRefusal(t, err, attest.ErrSecret)
		// ...and even with the new secret the old quote fails.
		ev3 := n.answer(t, ch3, 7)
		replay := *ev1
		replay.ActivatedSecret = ev3.ActivatedSecret
		_, err = attest.Verify(ch3, &replay, policyFor(ref))
		wantRefusal(t, err, attest.ErrQuote)
	})
	t.Run("binding key swapped", func(t *testing.T) {
		ch := n.challenge(t, 7)
		ev := n.answer(t, ch, 7)
		ev.BindingKey = bindingKey(t)
		_, err := attest.Verify(ch, ev, policyFor(ref))
		wantRefusal(t, err, attest.ErrQuote)
	})
	t.Run("expired", func(t *testing.T) {
		ch := n.challenge(t, 7)
		ev := n.answer(t, ch, 7)
		for _, at := range []time.Time{ch.Expires, ch.Expires.Add(time.Hour)} {
			pol := policyFor(ref)
			pol.Now = at
			_, err := attest.Verify(ch, ev, pol)
			wantRefusal(t, err, attest.ErrNonce)
		}
		if _, err := attest.Verify(ch, ev, policyFor(ref)); err != nil {
			t.Fatalf("the same evidence in time: %v", err)
		}
	})
}

// TestPCR7Mismatch: a node whose PCR 7 (Secure Boot policy) differs from
// the class's reference is refused with both values in the reason.
func TestPCR7Mismatch(t *testing.T) {
	tpm := tpmtest.Open(t)
	tpmtest.RequireSimulator(t)
	n := newNode(t, tpm, tpmtest.RSAAKTemplate)
	ref := subset(tpmtest.ReadPCRs(t, tpm, 7), 7)
	tpmtest.ExtendData(t, tpm, 7, "db: a certificate the class does not trust")

	ch := n.challenge(t, 7)
	ev := n.answer(t, ch, 7, 16)
	_, err := attest.Verify(ch, ev, policyFor(ref))
	e := wantRefusal(t, err, attest.ErrPCR)
	wantReason(t, e, "PCR 7 is "+hex.EncodeToString(ev.PCRs[7]), "the class expects "+hex.EncodeToString(ref[7]))
}

// TestPCROutsideSelection: PCR values the quote does not cover prove
// nothing and are refused; so are selected PCRs without a value.
func TestPCROutsideSelection(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.RSAAKTemplate)
	all := tpmtest.ReadPCRs(t, tpm, 7, 16)
	ref := subset(all, 7)

	t.Run("value outside the selection", func(t *testing.T) {
		ch := n.challenge(t, 7)
		ev := n.answer(t, ch, 7)
		ev.PCRs[16] = all[16]
		_, err := attest.Verify(ch, ev, policyFor(ref))
		wantReason(t, wantRefusal(t, err, attest.ErrPCR), "PCR 16")
	})
	t.Run("selected PCR without a value", func(t *testing.T) {
		ch := n.challenge(t, 7)
		ev := n.answer(t, ch, 7, 16)
		delete(ev.PCRs, 16)
		_, err := attest.Verify(ch, ev, policyFor(ref))
		wantReason(t, wantRefusal(t, err, attest.ErrPCR), "PCR 16")
	})
}

// TestRequiredPCRMissing: a quote that leaves out a PCR the class or the
// challenge requires is refused, naming the PCR.
func TestRequiredPCRMissing(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.RSAAKTemplate)
	all := tpmtest.ReadPCRs(t, tpm, 7, 16)

	t.Run("required by the class", func(t *testing.T) {
		ch := n.challenge(t, 7)
		ev := n.answer(t, ch, 7)
		_, err := attest.Verify(ch, ev, policyFor(all))
		wantReason(t, wantRefusal(t, err, attest.ErrPCR), "PCR 16 required by the class is not in the quote")
	})
	t.Run("requested by the challenge", func(t *testing.T) {
		ch := n.challenge(t, 7, 16)
		ev := n.answer(t, ch, 7)
		_, err := attest.Verify(ch, ev, policyFor(subset(all, 7)))
		wantReason(t, wantRefusal(t, err, attest.ErrPCR), "PCR 16 requested by the challenge")
	})
}

// TestPCRDigestMismatch: supplied values that do not hash to the quoted
// digest are refused, even for a PCR the policy does not judge.
func TestPCRDigestMismatch(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.ECCAKTemplate)
	ref := subset(tpmtest.ReadPCRs(t, tpm, 7), 7)
	ch := n.challenge(t, 7)
	ev := n.answer(t, ch, 7, 16)
	lie := sha256.Sum256([]byte("a PCR 16 the TPM never had"))
	ev.PCRs[16] = lie[:]
	_, err := attest.Verify(ch, ev, policyFor(ref))
	wantReason(t, wantRefusal(t, err, attest.ErrPCR), "do not hash to the quoted PCR digest")

	ev.PCRs[16] = lie[:20]
	_, err = attest.Verify(ch, ev, policyFor(ref))
	wantReason(t, wantRefusal(t, err, attest.ErrPCR), "PCR 16")
}

// TestNonRestrictedKeyQuote: a non-restricted signing key can activate a
// credential (TPM2_ActivateCredential accepts any object) and can sign a
// forged TPMS_ATTEST claiming golden PCR values. The template check is what
// stops it, at challenge and at completion.
func TestNonRestrictedKeyQuote(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.UnrestrictedSigningTemplate)

	_, err := attest.NewChallenge(rand.Reader, n.ek, n.ak.PublicBytes, []uint32{7}, challengeTTL, now)
	wantReason(t, wantRefusal(t, err, attest.ErrAK), "not restricted")

	// A server without the check would have made this challenge.
	ekPub, err := tpm2.ImportEncapsulationKey(n.ek.Public)
	if err != nil {
		t.Fatal(err)
	}
	secret := bytes.Repeat([]byte{0x5a}, 32)
	blob, encSecret, err := tpm2.CreateCredential(rand.Reader, ekPub, n.ak.Name.Buffer, secret)
	if err != nil {
		t.Fatal(err)
	}
	ch := &attest.Challenge{
		ID: "forged", Nonce: bytes.Repeat([]byte{1}, 32), EK: n.ek,
		AKPublic: n.ak.PublicBytes, AKName: n.ak.Name.Buffer, Secret: secret,
		CredentialBlob: blob, EncryptedSecret: encSecret, PCRSelection: []uint32{7},
		Expires: now.Add(challengeTTL),
	}
	activated, err := tpmtest.Activate(tpm, n.ekKey, n.ak, blob, encSecret)
	if err != nil || !bytes.Equal(activated, secret) {
		t.Fatalf("the non-restricted key should activate: %v", err)
	}

	// The forged quote: golden PCR 7, signed with TPM2_Sign.
	golden := sha256.Sum256([]byte("the golden PCR 7"))
	bk := bindingKey(t)
	digest := sha256.Sum256(golden[:])
	att := tpm2.TPMSAttest{
		Magic:           tpm2.TPMGeneratedValue,
		Type:            tpm2.TPMSTAttestQuote,
		QualifiedSigner: n.ak.Name,
		ExtraData:       tpm2.TPM2BData{Buffer: attest.QualifyingData(ch.Nonce, bk)},
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
			PCRSelect: tpmtest.Selection(7),
			PCRDigest: tpm2.TPM2BDigest{Buffer: digest[:]},
		}),
	}
	quote := tpm2.Marshal(att)
	qd := sha256.Sum256(quote)
	sig := tpmtest.Sign(t, tpm, n.ak, qd[:])
	ev := &attest.Evidence{
		ActivatedSecret: activated, AKPublic: n.ak.PublicBytes, Quote: quote, Signature: sig,
		PCRs: map[uint32][]byte{7: golden[:]}, BindingKey: bk,
	}
	_, err = attest.Verify(ch, ev, policyFor(map[uint32][]byte{7: golden[:]}))
	wantReason(t, wantRefusal(t, err, attest.ErrAK), "not restricted")
	_, err = attest.VerifyQuote(n.ak.Public, quote, sig, ev.PCRs, attest.QualifyingData(ch.Nonce, bk))
	wantRefusal(t, err, attest.ErrAK)

	// A restricted AK cannot be made to sign the same forgery.
	ak := tpmtest.AK(t, tpm, tpmtest.RSAAKTemplate)
	_, err = tpm2.Sign{
		KeyHandle:  tpm2.AuthHandle{Handle: ak.Handle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		Digest:     tpm2.TPM2BDigest{Buffer: qd[:]},
		InScheme:   tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(tpm)
	if err == nil {
		t.Fatal("a restricted AK signed an outside digest")
	}
}

// TestAKFromOtherTPM: the AK of TPM B presented with the EK of TPM A. The
// credential made for A's EK cannot be activated in B, nor in A (whose
// AK with the same template has another name); a guessed secret is
// refused. Two simulators with different fixed seeds are two TPMs; they
// run one after the other, as the process has one simulator.
func TestAKFromOtherTPM(t *testing.T) {
	tpmtest.RequireSimulator(t)
	const seedA, seedB = 0xA, 0xB
	var ekA *attest.EK
	var ch *attest.Challenge
	var nameB []byte

	t.Run("TPM A", func(t *testing.T) {
		a := newNode(t, tpmtest.OpenSeeded(t, seedA), tpmtest.RSAAKTemplate)
		ekA = a.ek
	})
	t.Run("TPM B", func(t *testing.T) {
		b := newNode(t, tpmtest.OpenSeeded(t, seedB), tpmtest.RSAAKTemplate)
		if b.ek.Fingerprint == ekA.Fingerprint {
			t.Fatal("two seeds gave the same EK")
		}
		var err error
		ch, err = attest.NewChallenge(rand.Reader, ekA, b.ak.PublicBytes, []uint32{7}, challengeTTL, now)
		if err != nil {
			t.Fatal(err)
		}
		nameB = b.ak.Name.Buffer
		if _, err := tpmtest.Activate(b.tpm, b.ekKey, b.ak, ch.CredentialBlob, ch.EncryptedSecret); !tpmtest.IsTPMError(err) {
			t.Fatalf("TPM B activated a credential made for TPM A's EK: %v", err)
		}
		// B quotes honestly but cannot know the secret.
		bk := bindingKey(t)
		quote, sig := tpmtest.Quote(t, b.tpm, b.ak, []uint{7}, attest.QualifyingData(ch.Nonce, bk))
		ev := &attest.Evidence{
			ActivatedSecret: make([]byte, 32), AKPublic: b.ak.PublicBytes, Quote: quote, Signature: sig,
			PCRs: tpmtest.ReadPCRs(t, b.tpm, 7), BindingKey: bk,
		}
		_, err = attest.Verify(ch, ev, policyFor(nil))
		wantRefusal(t, err, attest.ErrSecret)
		ev.ActivatedSecret = nil
		_, err = attest.Verify(ch, ev, policyFor(nil))
		wantRefusal(t, err, attest.ErrSecret)
	})
	t.Run("TPM A again", func(t *testing.T) {
		a := newNode(t, tpmtest.OpenSeeded(t, seedA), tpmtest.RSAAKTemplate)
		if a.ek.Fingerprint != ekA.Fingerprint {
			t.Fatal("the same seed gave another EK")
		}
		if bytes.Equal(a.ak.Name.Buffer, nameB) {
			t.Fatal("TPM A and TPM B made the same AK")
		}
		if _, err := tpmtest.Activate(a.tpm, a.ekKey, a.ak, ch.CredentialBlob, ch.EncryptedSecret); !tpmtest.IsTPMError(err) {
			t.Fatalf("TPM A activated a credential made for TPM B's AK: %v", err)
		}
	})
}

// TestAKSwap is Keylime's CVE-2022-1053: the node activates the credential
// with AK1 and then sends a quote made with AK2. The evidence must carry
// the AK that was challenged, and the quote must verify with that AK.
func TestAKSwap(t *testing.T) {
	tpm := tpmtest.Open(t)
	n := newNode(t, tpm, tpmtest.RSAAKTemplate)
	ak2 := tpmtest.AK(t, tpm, tpmtest.ECCAKTemplate)
	ref := subset(tpmtest.ReadPCRs(t, tpm, 7), 7)

	ch := n.challenge(t, 7)
	secret, err := tpmtest.Activate(tpm, n.ekKey, n.ak, ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	bk := bindingKey(t)
	quote, sig := tpmtest.Quote(t, tpm, ak2, []uint{7}, attest.QualifyingData(ch.Nonce, bk))
	ev := &attest.Evidence{
		ActivatedSecret: secret, AKPublic: ak2.PublicBytes, Quote: quote, Signature: sig,
		PCRs: tpmtest.ReadPCRs(t, tpm, 7), BindingKey: bk,
	}
	_, err = attest.Verify(ch, ev, policyFor(ref))
	wantReason(t, wantRefusal(t, err, attest.ErrAK), "not the AK that was challenged")

	// The challenged AK's public area with AK2's quote: the signature
	// fails.
	ev.AKPublic = n.ak.PublicBytes
	_, err = attest.Verify(ch, ev, policyFor(ref))
	wantRefusal(t, err, attest.ErrSignature)
}

// TestSealToTPM: a secret sealed by SealToTPM to the simulator's EK and
// its PCR 16 imports under the EK, loads and unseals in a PolicyPCR
// session, and stops unsealing once PCR 16 is extended.
func TestSealToTPM(t *testing.T) {
	tpm := tpmtest.Open(t)
	tpmtest.RequireSimulator(t)
	ekKey := tpmtest.EK(t, tpm)
	ek, err := attest.ParseEKPublic(ekKey.PublicBytes)
	if err != nil {
		t.Fatal(err)
	}
	tpmtest.ExtendData(t, tpm, 16, "coffre test workload")
	pcrs := tpmtest.ReadPCRs(t, tpm, 16)
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}

	public, duplicate, seed, err := attest.SealToTPM(rand.Reader, ek, pcrs, secret)
	if err != nil {
		t.Fatalf("SealToTPM: %v", err)
	}
	pub2B, err := tpm2.Unmarshal[tpm2.TPM2BPublic](public)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := pub2B.Contents()
	if err != nil {
		t.Fatal(err)
	}
	a := pub.ObjectAttributes
	if pub.Type != tpm2.TPMAlgKeyedHash || pub.NameAlg != tpm2.TPMAlgSHA256 || a.FixedTPM || a.FixedParent ||
		a.UserWithAuth || a.SensitiveDataOrigin || !a.AdminWithPolicy || !a.NoDA {
		t.Errorf("sealed object public area: %+v", pub)
	}
	if want, _ := attest.SealPolicy(pcrs); !bytes.Equal(pub.AuthPolicy.Buffer, want) {
		t.Errorf("authPolicy %x, want %x", pub.AuthPolicy.Buffer, want)
	}
	if bytes.Contains(public, secret) || bytes.Contains(duplicate, secret) || bytes.Contains(seed, secret) {
		t.Fatal("the secret is in the clear in the blob")
	}

	ekAuth := tpm2.AuthHandle{Handle: ekKey.Handle, Name: ekKey.Name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, tpmtest.EKPolicy)}
	imp, err := tpm2.Import{
		ParentHandle: ekAuth,
		ObjectPublic: *pub2B,
		Duplicate:    tpm2.TPM2BPrivate{Buffer: duplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: seed},
		Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("Import: %v", err)
	}
	load, err := tpm2.Load{ParentHandle: ekAuth, InPrivate: imp.OutPrivate, InPublic: *pub2B}.Execute(tpm)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	defer tpmtest.Flush(t, tpm, load.ObjectHandle)

	unseal := func() ([]byte, error) {
		rsp, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{
			Handle: load.ObjectHandle, Name: load.Name,
			Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tpm transport.TPM, s tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
				_, err := tpm2.PolicyPCR{PolicySession: s, Pcrs: tpmtest.Selection(16)}.Execute(tpm)
				return err
			}),
		}}.Execute(tpm)
		if err != nil {
			return nil, err
		}
		return rsp.OutData.Buffer, nil
	}
	got, err := unseal()
	if err != nil {
		t.Fatalf("Unseal: %v", err)
	}
	if !bytes.Equal(got, secret) {
		t.Fatalf("unsealed %x, sealed %x", got, secret)
	}

	tpmtest.ExtendData(t, tpm, 16, "something else ran")
	if _, err := unseal(); !errors.Is(err, tpm2.TPMRCPolicyFail) {
		t.Fatalf("Unseal after a PCR 16 extend: %v, want TPM_RC_POLICY_FAIL", err)
	}
}
