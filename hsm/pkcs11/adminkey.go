package pkcs11

// An admin signing key on a PKCS#11 token (a smartcard or an HSM partition
// of an admin's own): the Ed25519 half of Coffre's hybrid admin signature is
// made by the token with CKM_EDDSA, and the ML-DSA-65 half, which no common
// token offers yet, from a seed that the token keeps encrypted under its own
// AES key and decrypts only for the moment of signing.
//
// This file talks to miekg/pkcs11 directly for the mechanisms and object
// classes that root keys never need (EdDSA key pairs, data objects). It
// returns raw byte slices: hsm/pkcs11 sits below kms and must not import
// kms/identity, which turns them into an identity.PublicKey.

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	p11 "github.com/miekg/pkcs11"

	"github.com/coffre-kms/coffre/hsm"
)

// PKCS#11 3.0 values that miekg/pkcs11 v1.1 does not define; SoftHSM 2.6
// and current smartcard middleware use these.
const (
	ckkECEdwards            = 0x00000040
	ckmECEdwardsKeyPairGen  = 0x00001055
	ckmEdDSA                = 0x00001057
	adminEd25519PointDERLen = 2 + ed25519.PublicKeySize
)

// ed25519Params is CKA_EC_PARAMS for Ed25519: the DER of the OID
// 1.3.101.112 (id-Ed25519, RFC 8410). PKCS#11 3.0 also allows the printable
// string "edwards25519"; the OID is the form every implementation accepts.
var ed25519Params = []byte{0x06, 0x03, 0x2b, 0x65, 0x70}

// Admin key layout on the token. The Ed25519 key pair carries the label
// the URI names, so that other PKCS#11 tools find the signing key by it;
// the seed's AES key and data object carry derived labels, so that a root
// URI naming the admin key by mistake finds no AES key to wrap KEKs with.
const (
	adminKEKSuffix  = "/mldsa-kek"
	adminSeedSuffix = "/mldsa-seed"
	// adminApplication is the CKA_APPLICATION of the seed data object.
	adminApplication = "coffre admin key v1"
	// adminMLDSAContext must equal kms/identity.MLDSAContext (this package
	// may not import kms; adminkey_test checks the two agree).
	adminMLDSAContext = "coffre-admin-v1"
	adminSeedSize     = mldsa65.SeedSize
	adminSealedSize   = 1 + ivSize + adminSeedSize + tagSize
)

// ErrAdminKeyClosed is returned by the methods of an [AdminKey] after Close.
var ErrAdminKeyClosed = errors.New("pkcs11: admin key is closed")

// AdminKey is an admin's hybrid signing key held on a PKCS#11 token. It
// keeps one logged-in session for its lifetime and serialises operations
// on it; it does not reconnect (it serves one coffrectl command).
type AdminKey struct {
	id    string // the URI's KeyID
	label string
	mod   *module

	edPub []byte
	mlPub []byte

	mu     sync.Mutex
	s      session
	priv   objectHandle // Ed25519 private key
	pubObj objectHandle // Ed25519 public key
	kek    objectHandle // AES key sealing the ML-DSA seed
	data   objectHandle // data object holding the sealed seed
	sealed []byte       // 0x01 ‖ IV ‖ ciphertext ‖ tag
	aad    []byte
	closed bool
}

// AdminKeyAttributes are the attributes the token reports for an admin
// key's private Ed25519 key and for the AES key that seals its ML-DSA seed.
type AdminKeyAttributes struct {
	Signing hsm.Attributes
	SeedKEK hsm.Attributes
}

// GenerateAdminKey creates an admin key on the token named by cfg.URI (its
// object attribute is required and becomes the labels): an Ed25519 key pair
// (private key sensitive, never extractable, sign only), an AES-256 key
// (encrypt/decrypt only, sensitive, never extractable) and a private data
// object holding a fresh ML-DSA-65 seed encrypted by that AES key with
// CKM_AES_GCM inside the token. The seed exists in memory only while it is
// encrypted and is then zeroized. The three keys share one CKA_ID (the
// URI's id, or 16 random bytes). PKCS#11 gives data objects no CKA_ID (SoftHSM
// refuses one with CKR_ATTRIBUTE_TYPE_INVALID), so the seed object is found
// by its label and bound to the keys by the associated data of its
// encryption, which holds the label, that CKA_ID and the Ed25519 public key:
// a seed object of any other key does not decrypt.
//
// If any object already carries one of the labels (or the URI's id) it
// returns an error wrapping [hsm.ErrKeyExists] and changes nothing. If the
// token does not apply the templates, what was created is destroyed.
// Config.Sessions and Config.RetryInterval are not used.
func GenerateAdminKey(ctx context.Context, cfg Config) (*AdminKey, error) {
	return openAdminKey(ctx, cfg, true)
}

// OpenAdminKey opens the admin key named by cfg.URI (object required),
// logs in with the PIN from pin-source, checks the key's attributes and
// decrypts the seed once inside the token to derive the ML-DSA-65 public
// key. A missing key yields an error wrapping [hsm.ErrKeyNotFound].
func OpenAdminKey(ctx context.Context, cfg Config) (*AdminKey, error) {
	return openAdminKey(ctx, cfg, false)
}

func openAdminKey(ctx context.Context, cfg Config, create bool) (*AdminKey, error) {
	r, err := newRoot(cfg, create)
	if err != nil {
		return nil, err
	}
	if r.uri.Object == "" {
		return nil, &hsm.URIError{URI: r.uri.String(), Attr: "object", Reason: "required for an admin key: it is the key's CKA_LABEL"}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.mod, err = acquireModule(r.uri.ModulePath)
	if err != nil {
		return nil, err
	}
	k, err := r.adminConnect(ctx, create)
	if err != nil {
		r.mod.release()
		return nil, err
	}
	return k, nil
}

func (r *Root) adminConnect(ctx context.Context, create bool) (*AdminKey, error) {
	s, _, err := r.loginSession(ctx, create)
	if err != nil {
		return nil, err
	}
	k := &AdminKey{id: r.id, label: r.uri.Object, mod: r.mod, s: s}
	if err := ctx.Err(); err != nil {
		s.close()
		return nil, err
	}
	var made []objectHandle
	if create {
		made, err = k.create(r.uri.ID)
	}
	if err == nil {
		err = k.load(r.uri.ID)
		if err != nil && create {
			// A key that cannot be opened right after it was made is no
			// use to anyone; leave the labels free for another try.
			if derr := k.s.destroyAll(made); derr != nil {
				err = fmt.Errorf("%w (and destroying the new objects failed: %v)", err, derr)
			}
		}
	}
	if err != nil {
		s.close()
		return nil, err
	}
	return k, nil
}

// wrapErr wraps an error of a token call, marking it unavailable when the
// session or token is gone.
func (k *AdminKey) wrapErr(what string, err error) error {
	if isGone(err) {
		return fmt.Errorf("%w: admin key %s: %s: %v", hsm.ErrUnavailable, k.id, what, err)
	}
	return fmt.Errorf("pkcs11: admin key %s: %s: %w", k.id, what, err)
}

// create makes the objects described at GenerateAdminKey.
// It returns the objects made; on error it destroys them itself.
func (k *AdminKey) create(uriID []byte) (made []objectHandle, err error) {
	s := k.s
	for _, l := range []string{k.label, k.label + adminKEKSuffix, k.label + adminSeedSuffix} {
		hs, err := s.findObjects(l, nil, false)
		if err != nil {
			return nil, k.wrapErr("searching for existing objects", err)
		}
		if len(hs) > 0 {
			return nil, fmt.Errorf("%w: an object labelled %q is on the token", hsm.ErrKeyExists, l)
		}
	}
	if len(uriID) > 0 {
		hs, err := s.findObjects("", uriID, false)
		if err != nil {
			return nil, k.wrapErr("searching for existing objects", err)
		}
		if len(hs) > 0 {
			return nil, fmt.Errorf("%w: an object with CKA_ID %x is on the token", hsm.ErrKeyExists, uriID)
		}
	}
	id := uriID
	if len(id) == 0 {
		id = make([]byte, rootIDSize)
		if _, err := rand.Read(id); err != nil {
			return nil, err
		}
	}

	defer func() {
		if err == nil {
			return
		}
		if derr := s.destroyAll(made); derr != nil {
			err = fmt.Errorf("%w (and destroying the objects made so far failed: %v)", err, derr)
		}
		made = nil
	}()

	pub, priv, err := s.generateEd25519(k.label, id)
	if err != nil {
		return made, k.wrapErr("generating the Ed25519 key pair (CKM_EC_EDWARDS_KEY_PAIR_GEN)", err)
	}
	made = append(made, pub, priv)
	edPub, err := s.ed25519Point(pub)
	if err != nil {
		return made, k.wrapErr("reading the Ed25519 public key", err)
	}
	kek, err := s.generateRootKey(k.label+adminKEKSuffix, id)
	if err != nil {
		return made, k.wrapErr("generating the seed's AES key", err)
	}
	made = append(made, kek)
	if a, err := s.attributes(kek); err != nil || a != generated {
		if err == nil {
			err = fmt.Errorf("the token did not apply the template: got %+v, want %+v", a, generated)
		}
		return made, k.wrapErr("checking the seed's AES key", err)
	}

	var seed [adminSeedSize]byte
	defer clear(seed[:])
	if _, err := rand.Read(seed[:]); err != nil {
		return made, err
	}
	iv := make([]byte, ivSize)
	if _, err := rand.Read(iv); err != nil {
		return made, err
	}
	aad := adminSeedAAD(k.label, id, edPub)
	ct, usedIV, err := s.encryptGCM(kek, iv, aad, seed[:])
	if err != nil {
		return made, k.wrapErr("encrypting the ML-DSA seed (CKM_AES_GCM)", err)
	}
	if len(usedIV) != ivSize || len(ct) != adminSeedSize+tagSize {
		return made, k.wrapErr("encrypting the ML-DSA seed", fmt.Errorf("token returned %d bytes with a %d-byte IV", len(ct), len(usedIV)))
	}
	sealed := make([]byte, 0, adminSealedSize)
	sealed = append(append(append(sealed, formatV1), usedIV...), ct...)
	data, err := s.createSeedObject(k.label+adminSeedSuffix, sealed)
	if err != nil {
		return made, k.wrapErr("storing the sealed ML-DSA seed", err)
	}
	made = append(made, data)

	a, err := s.boolAttributes(priv)
	if err != nil {
		return made, k.wrapErr("reading back the private key's attributes", err)
	}
	if a != generatedSigning {
		return made, k.wrapErr("checking the private key", fmt.Errorf("the token did not apply the template: got %+v, want %+v", a, generatedSigning))
	}
	return made, nil
}

// destroyAll destroys objects in reverse order of creation, stopping at the
// first failure.
func (s session) destroyAll(hs []objectHandle) error {
	for i := len(hs) - 1; i >= 0; i-- {
		if err := s.destroy(hs[i]); err != nil {
			return err
		}
	}
	return nil
}

// generatedSigning is what a private key made by generateEd25519 must read
// back as.
var generatedSigning = hsm.Attributes{
	Token: true, Private: true, Sensitive: true, AlwaysSensitive: true, NeverExtractable: true, Sign: true,
}

// adminSeedAAD binds the sealed seed to its key: the label, the CKA_ID and
// the Ed25519 public key, so that a seed object moved to another admin key
// (even under the same AES key) does not decrypt.
func adminSeedAAD(label string, id, edPub []byte) []byte {
	var b bytes.Buffer
	b.WriteString(adminApplication)
	for _, f := range [][]byte{[]byte(label), id, edPub} {
		// Labels, ids and keys are far below 64 KiB.
		b.Write(binary.BigEndian.AppendUint16(nil, uint16(min(len(f), 0xffff)))) // #nosec G115 -- bounded by min
		b.Write(f)
	}
	return b.Bytes()
}

// load finds the admin key's objects, checks them and derives the ML-DSA
// public key.
func (k *AdminKey) load(uriID []byte) error {
	s := k.s
	one := func(what string, hs []objectHandle, err error) (objectHandle, error) {
		switch {
		case err != nil:
			return 0, k.wrapErr("searching for the "+what, err)
		case len(hs) == 0:
			return 0, fmt.Errorf("%w: admin key %s: no %s", hsm.ErrKeyNotFound, k.id, what)
		case len(hs) > 1:
			return 0, fmt.Errorf("pkcs11: admin key %s: %d objects match the %s; add id= to the URI", k.id, len(hs), what)
		}
		return hs[0], nil
	}
	var err error
	hs, ferr := s.find(p11.CKO_PRIVATE_KEY, ckkECEdwards, k.label, uriID)
	if k.priv, err = one("Ed25519 private key", hs, ferr); err != nil {
		return err
	}
	id, err := s.keyID(k.priv)
	if err != nil {
		return k.wrapErr("reading CKA_ID", err)
	}
	if len(id) == 0 {
		return fmt.Errorf("pkcs11: admin key %s: the private key has no CKA_ID to tie it to its other objects", k.id)
	}
	hs, ferr = s.find(p11.CKO_PUBLIC_KEY, ckkECEdwards, k.label, id)
	if k.pubObj, err = one("Ed25519 public key", hs, ferr); err != nil {
		return err
	}
	hs, ferr = s.find(p11.CKO_SECRET_KEY, p11.CKK_AES, k.label+adminKEKSuffix, id)
	if k.kek, err = one("seed AES key", hs, ferr); err != nil {
		return err
	}
	// A data object has no CKA_ID to search by (see GenerateAdminKey);
	// withSeed below refuses a seed object not sealed for this label, id
	// and public key.
	hs, ferr = s.find(p11.CKO_DATA, noKeyType, k.label+adminSeedSuffix, nil)
	if k.data, err = one("sealed seed data object", hs, ferr); err != nil {
		return err
	}

	sa, err := s.boolAttributes(k.priv)
	if err != nil {
		return k.wrapErr("reading the private key's attributes", err)
	}
	if p := unsafeSigning(sa); p != "" {
		return fmt.Errorf("pkcs11: admin key %s is not safe to use: %s", k.id, p)
	}
	ka, err := s.attributes(k.kek)
	if err != nil {
		return k.wrapErr("reading the seed AES key's attributes", err)
	}
	if p := unsafeRoot(ka); p != "" {
		return fmt.Errorf("pkcs11: the seed AES key of admin key %s is not safe to use: %s", k.id, p)
	}
	if k.edPub, err = s.ed25519Point(k.pubObj); err != nil {
		return k.wrapErr("reading the Ed25519 public key", err)
	}
	if k.sealed, err = s.dataValue(k.data); err != nil {
		return k.wrapErr("reading the sealed seed", err)
	}
	if len(k.sealed) != adminSealedSize || k.sealed[0] != formatV1 {
		return fmt.Errorf("pkcs11: admin key %s: the sealed seed object holds %d bytes in an unknown format", k.id, len(k.sealed))
	}
	k.aad = adminSeedAAD(k.label, id, k.edPub)
	return k.withSeed(func(sk *mldsa65.PrivateKey) error {
		pub, _ := sk.Public().(*mldsa65.PublicKey)
		k.mlPub = pub.Bytes()
		return nil
	})
}

// unsafeSigning says what makes a private key unfit to be an admin key,
// or "" if nothing.
func unsafeSigning(a hsm.Attributes) string {
	var p []string
	if !a.Private {
		p = append(p, "CKA_PRIVATE is false")
	}
	if !a.Sensitive {
		p = append(p, "CKA_SENSITIVE is false")
	}
	if a.Extractable {
		p = append(p, "CKA_EXTRACTABLE is true")
	}
	if !a.Sign {
		p = append(p, "CKA_SIGN is false")
	}
	if a.Decrypt || a.Unwrap || a.Derive {
		p = append(p, "it may also decrypt, unwrap or derive")
	}
	return strings.Join(p, "; ")
}

// withSeed decrypts the seed inside the token, hands f the ML-DSA key it
// expands to, and zeroizes both. The caller holds k.mu or owns k alone.
func (k *AdminKey) withSeed(f func(*mldsa65.PrivateKey) error) error {
	iv, ct := k.sealed[1:1+ivSize], k.sealed[1+ivSize:]
	pt, err := k.s.decryptGCM(k.kek, iv, k.aad, ct)
	defer clear(pt)
	if err != nil {
		if isGone(err) {
			return k.wrapErr("decrypting the ML-DSA seed", err)
		}
		// Not told apart further: a wrong key, a moved object and a
		// tampered one look the same.
		return fmt.Errorf("pkcs11: admin key %s: the sealed ML-DSA seed does not decrypt under its AES key (%v)", k.id, err)
	}
	if len(pt) != adminSeedSize {
		return fmt.Errorf("pkcs11: admin key %s: the ML-DSA seed is %d bytes", k.id, len(pt))
	}
	var seed [adminSeedSize]byte
	copy(seed[:], pt)
	_, sk := mldsa65.NewKeyFromSeed(&seed)
	clear(seed[:])
	defer func() { *sk = mldsa65.PrivateKey{} }()
	return f(sk)
}

// ID names the key by its URI path (token and object), without the query.
func (k *AdminKey) ID() string { return k.id }

// Label is the key's CKA_LABEL, the URI's object.
func (k *AdminKey) Label() string { return k.label }

// Public returns copies of the raw Ed25519 public key (32 bytes) and the
// ML-DSA-65 public key (1952 bytes).
func (k *AdminKey) Public() (ed25519Key, mldsa65Key []byte) {
	return bytes.Clone(k.edPub), bytes.Clone(k.mlPub)
}

// Sign returns the hybrid admin signature over msg: the token's pure
// Ed25519 signature (CKM_EDDSA) followed by an ML-DSA-65 signature (hedged,
// context "coffre-admin-v1") made in memory from the seed that the token
// decrypts for this call; the seed and its expanded key are zeroized
// before Sign returns.
func (k *AdminKey) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil, ErrAdminKeyClosed
	}
	edSig, err := k.s.signEdDSA(k.priv, msg)
	if err != nil {
		return nil, k.wrapErr("C_Sign (CKM_EDDSA)", err)
	}
	// A token that signed something else (Ed25519ph, another key) must not
	// produce an approval that fails later, far from the cause.
	if len(edSig) != ed25519.SignatureSize || !ed25519.Verify(k.edPub, msg, edSig) {
		return nil, fmt.Errorf("pkcs11: admin key %s: the token's CKM_EDDSA signature does not verify under its public key", k.id)
	}
	sig := make([]byte, ed25519.SignatureSize+mldsa65.SignatureSize)
	copy(sig, edSig)
	err = k.withSeed(func(sk *mldsa65.PrivateKey) error {
		return mldsa65.SignTo(sk, msg, []byte(adminMLDSAContext), true, sig[ed25519.SignatureSize:])
	})
	if err != nil {
		return nil, err
	}
	return sig, nil
}

// Attributes reads back the attributes of the private Ed25519 key and of
// the seed's AES key.
func (k *AdminKey) Attributes(ctx context.Context) (AdminKeyAttributes, error) {
	if err := ctx.Err(); err != nil {
		return AdminKeyAttributes{}, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return AdminKeyAttributes{}, ErrAdminKeyClosed
	}
	var a AdminKeyAttributes
	var err error
	if a.Signing, err = k.s.boolAttributes(k.priv); err != nil {
		return a, k.wrapErr("reading the private key's attributes", err)
	}
	if a.SeedKEK, err = k.s.attributes(k.kek); err != nil {
		return a, k.wrapErr("reading the seed AES key's attributes", err)
	}
	return a, nil
}

// Close logs out (by closing the last session) and releases the module. It
// does not touch the key.
func (k *AdminKey) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	k.s.close()
	k.mod.release()
	return nil
}

// noKeyType leaves CKA_KEY_TYPE out of a search (data objects have none).
const noKeyType = ^uint(0)

// find returns the objects of class (and key type, unless noKeyType) with
// label and, when given, id.
func (s session) find(class, keyType uint, label string, id []byte) ([]objectHandle, error) {
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, class),
		p11.NewAttribute(p11.CKA_LABEL, label),
	}
	if keyType != noKeyType {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_KEY_TYPE, keyType))
	}
	if len(id) > 0 {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, id))
	}
	if class == p11.CKO_DATA {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_APPLICATION, adminApplication))
	}
	return s.findTemplate(tmpl)
}

// generateEd25519 makes an Ed25519 key pair on the token, every security
// attribute set explicitly: the private key signs and does nothing else,
// and never leaves the token.
func (s session) generateEd25519(label string, id []byte) (pub, priv objectHandle, err error) {
	pubTmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, ckkECEdwards),
		p11.NewAttribute(p11.CKA_EC_PARAMS, ed25519Params),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, false),
		p11.NewAttribute(p11.CKA_MODIFIABLE, false),
		p11.NewAttribute(p11.CKA_VERIFY, true),
		p11.NewAttribute(p11.CKA_ENCRYPT, false),
		p11.NewAttribute(p11.CKA_WRAP, false),
		p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	}
	privTmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, ckkECEdwards),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_MODIFIABLE, false),
		p11.NewAttribute(p11.CKA_SIGN, true),
		p11.NewAttribute(p11.CKA_DECRYPT, false),
		p11.NewAttribute(p11.CKA_UNWRAP, false),
		p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	}
	mech := []*p11.Mechanism{p11.NewMechanism(ckmECEdwardsKeyPairGen, nil)}
	var ph, sh p11.ObjectHandle
	err = s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		ph, sh, err = c.GenerateKeyPair(s.h, mech, pubTmpl, privTmpl)
		return err
	})
	return objectHandle(ph), objectHandle(sh), err
}

// ed25519Point reads an Ed25519 public key's CKA_EC_POINT: PKCS#11 3.0 says
// a DER OCTET STRING of the 32 bytes, some tokens give the bare 32.
func (s session) ed25519Point(h objectHandle) ([]byte, error) {
	v, err := s.attribute(h, p11.CKA_EC_POINT)
	if err != nil {
		return nil, err
	}
	switch {
	case len(v) == adminEd25519PointDERLen && v[0] == 0x04 && v[1] == ed25519.PublicKeySize:
		return v[2:], nil
	case len(v) == ed25519.PublicKeySize:
		return v, nil
	}
	return nil, fmt.Errorf("CKA_EC_POINT of %d bytes is not an Ed25519 public key", len(v))
}

// dataValue reads a data object's CKA_VALUE.
func (s session) dataValue(h objectHandle) ([]byte, error) { return s.attribute(h, p11.CKA_VALUE) }

func (s session) attribute(h objectHandle, typ uint) ([]byte, error) {
	var got []*p11.Attribute
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		got, err = c.GetAttributeValue(s.h, p11.ObjectHandle(h), []*p11.Attribute{p11.NewAttribute(typ, nil)})
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(got) != 1 {
		return nil, fmt.Errorf("C_GetAttributeValue returned %d attributes", len(got))
	}
	return got[0].Value, nil
}

// createSeedObject stores the sealed seed as a private, unmodifiable data
// object on the token. It carries no CKA_ID: PKCS#11 defines none for data
// objects (adminSeedAAD ties it to its key instead).
func (s session) createSeedObject(label string, value []byte) (objectHandle, error) {
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_DATA),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_MODIFIABLE, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_APPLICATION, adminApplication),
		p11.NewAttribute(p11.CKA_VALUE, value),
	}
	var h p11.ObjectHandle
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		h, err = c.CreateObject(s.h, tmpl)
		return err
	})
	return objectHandle(h), err
}

// signEdDSA signs msg with CKM_EDDSA and no parameters: pure Ed25519.
func (s session) signEdDSA(key objectHandle, msg []byte) ([]byte, error) {
	mech := []*p11.Mechanism{p11.NewMechanism(ckmEdDSA, nil)}
	var sig []byte
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		if err := c.SignInit(s.h, mech, p11.ObjectHandle(key)); err != nil {
			return err
		}
		var err error
		sig, err = c.Sign(s.h, msg)
		return err
	})
	return sig, err
}

// boolAttributes reads the CK_BBOOL security attributes of a private key
// (attributes() also asks for CKA_VALUE_LEN, which EC keys do not have).
func (s session) boolAttributes(key objectHandle) (hsm.Attributes, error) {
	types := []uint{
		p11.CKA_TOKEN, p11.CKA_PRIVATE, p11.CKA_MODIFIABLE, p11.CKA_SENSITIVE, p11.CKA_EXTRACTABLE,
		p11.CKA_ALWAYS_SENSITIVE, p11.CKA_NEVER_EXTRACTABLE, p11.CKA_DECRYPT,
		p11.CKA_UNWRAP, p11.CKA_SIGN, p11.CKA_DERIVE,
	}
	var a hsm.Attributes
	for _, t := range types {
		v, err := s.attribute(key, t)
		if err != nil {
			return hsm.Attributes{}, fmt.Errorf("attribute 0x%x: %w", t, err)
		}
		if len(v) != 1 {
			return hsm.Attributes{}, fmt.Errorf("attribute 0x%x: %d bytes for a CK_BBOOL", t, len(v))
		}
		b := v[0] != 0
		switch t {
		case p11.CKA_TOKEN:
			a.Token = b
		case p11.CKA_PRIVATE:
			a.Private = b
		case p11.CKA_MODIFIABLE:
			a.Modifiable = b
		case p11.CKA_SENSITIVE:
			a.Sensitive = b
		case p11.CKA_EXTRACTABLE:
			a.Extractable = b
		case p11.CKA_ALWAYS_SENSITIVE:
			a.AlwaysSensitive = b
		case p11.CKA_NEVER_EXTRACTABLE:
			a.NeverExtractable = b
		case p11.CKA_DECRYPT:
			a.Decrypt = b
		case p11.CKA_UNWRAP:
			a.Unwrap = b
		case p11.CKA_SIGN:
			a.Sign = b
		case p11.CKA_DERIVE:
			a.Derive = b
		}
	}
	return a, nil
}
