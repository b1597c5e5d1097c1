package pkcs11

// This file is the seam between Coffre and github.com/miekg/pkcs11 for root
// keys: everything above it speaks in terms of module, session, tokenInfo
// and objectHandle. Package pkcs11 is the only package in Coffre that
// imports the vendor client; besides this file, import.go (creating a root
// from bytes) and adminkey.go (EdDSA signing and data objects for admin
// keys on smartcards) use it directly.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/coffre-kms/coffre/hsm"
)

// objectHandle is a PKCS#11 object handle, valid for one initialisation of
// the library.
type objectHandle uint

// errStale reports that handles were made before the library was last
// re-initialised by this process. Using them could reach an unrelated
// session or object that happens to have the same number now, so calls
// refuse them instead of sending them to the library.
var errStale = errors.New("pkcs11: handles predate the last library initialisation")

// module is one loaded PKCS#11 library. The library's state is process
// global (dlopen returns the same handle, C_Initialize is once per process),
// so there is one module per path, shared by every Root through registry.
type module struct {
	path string
	ctx  *p11.Ctx

	// mu is held shared by every call into the library and exclusively
	// around C_Initialize/C_Finalize: a C_Finalize while another thread is
	// inside the library is undefined behaviour (SoftHSM frees its state
	// under the caller's feet).
	mu          sync.RWMutex
	initialized bool      // guarded by mu
	gen         uint64    // guarded by mu; bumped whenever this process (re)initialises the library
	lastRescan  time.Time // guarded by mu

	// refs counts open users (Roots, InitToken calls); guarded by
	// registry.mu. The library is initialised when refs goes 0→1 and
	// finalised when it goes 1→0.
	refs int
}

var registry = struct {
	sync.Mutex
	mods map[string]*module
}{mods: map[string]*module{}}

// acquireModule returns the module at path, loading and initialising the
// library if no one in the process uses it yet.
func acquireModule(path string) (*module, error) {
	registry.Lock()
	defer registry.Unlock()
	m := registry.mods[path]
	if m == nil {
		// dlopen gives no reason for a failure through miekg; stat first
		// so the common mistakes (wrong path, no permission) are named.
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("pkcs11: module %s: %w", path, err)
		}
		c := p11.New(path)
		if c == nil {
			return nil, fmt.Errorf("pkcs11: module %s: cannot load it as a PKCS#11 library", path)
		}
		// The library stays loaded for the life of the process: dlclose of
		// a library that registered exit handlers or threads (OpenSSL in
		// SoftHSM, vendor clients) is a known source of crashes, and
		// Finalize+Initialize is enough to reset its state.
		m = &module{path: path, ctx: c}
		registry.mods[path] = m
	}
	if m.refs == 0 {
		m.mu.Lock()
		err := m.initializeLocked()
		m.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	m.refs++
	return m, nil
}

// release drops one reference and finalises the library with the last one,
// so that the next user starts from a clean library (SoftHSM, for one,
// re-reads SOFTHSM2_CONF only in C_Initialize).
func (m *module) release() {
	registry.Lock()
	defer registry.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.initialized {
		_ = m.ctx.Finalize() // nothing useful to do with a failure here
	}
	m.initialized = false
	m.gen++
	m.lastRescan = time.Time{} // no one left to spare
}

func (m *module) initializeLocked() error {
	// CKF_OS_LOCKING_OK: Go calls the library from many OS threads. Without
	// the flag PKCS#11 lets a library assume a single thread, and SoftHSM
	// then disables its internal locking.
	err := m.ctx.Initialize(p11.InitializeWithFlags(p11.CKF_OS_LOCKING_OK))
	if err != nil && !isRV(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return fmt.Errorf("%w: module %s: C_Initialize: %v", hsm.ErrUnavailable, m.path, err)
	}
	m.initialized = true
	m.gen++
	return nil
}

// ensureInitialized initialises the library if it was found finalised, and
// returns the current generation.
func (m *module) ensureInitialized() (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.initialized {
		if err := m.initializeLocked(); err != nil {
			return 0, err
		}
	}
	return m.gen, nil
}

// markUninitialized records that the library was finalised behind our back
// (a call returned CKR_CRYPTOKI_NOT_INITIALIZED with handles of generation
// gen). If someone already re-initialised it since, nothing changes.
func (m *module) markUninitialized(gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gen == gen {
		m.initialized = false
	}
}

// errRescanTooSoon reports that a rescan was refused to spare the other
// users of the module.
var errRescanTooSoon = errors.New("pkcs11: library re-initialised too recently")

// rescan finalises and initialises the library again so that it looks for
// tokens afresh, and returns the new generation. Some libraries (SoftHSM
// among them) only discover a token that came back, or a device that was
// reconnected, in C_Initialize. Every other user of the module loses its
// sessions (their next call fails with errStale and they reconnect), so
// when the module is shared this happens at most once per minInterval.
// Nothing is done if the library was re-initialised since generation gen.
func (m *module) rescan(gen uint64, minInterval time.Duration) (uint64, error) {
	alone := m.users() <= 1
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.gen != gen && m.initialized {
		return m.gen, nil
	}
	if !alone && time.Since(m.lastRescan) < minInterval {
		return gen, errRescanTooSoon
	}
	m.lastRescan = time.Now()
	if m.initialized {
		_ = m.ctx.Finalize() // a library that is already finalised says so; either way we initialise next
		m.initialized = false
	}
	if err := m.initializeLocked(); err != nil {
		return 0, err
	}
	return m.gen, nil
}

// users returns how many Roots and other callers share the module.
func (m *module) users() int {
	registry.Lock()
	defer registry.Unlock()
	return m.refs
}

// call runs f with the library, refusing handles of another generation.
func (m *module) call(gen uint64, f func(c *p11.Ctx) error) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.initialized || m.gen != gen {
		return errStale
	}
	return f(m.ctx)
}

// tokenInfo is what Coffre needs from CK_TOKEN_INFO.
type tokenInfo struct {
	slot         uint
	label        string
	manufacturer string
	serial       string
	initialized  bool
}

// tokens lists the slots that hold a token.
func (m *module) tokens(gen uint64) ([]tokenInfo, error) {
	var out []tokenInfo
	err := m.call(gen, func(c *p11.Ctx) error {
		slots, err := c.GetSlotList(true)
		if err != nil {
			return err
		}
		for _, s := range slots {
			ti, err := c.GetTokenInfo(s)
			if err != nil {
				// The token left between the two calls; it is simply not
				// there.
				continue
			}
			out = append(out, tokenInfo{
				slot:         s,
				label:        ti.Label,
				manufacturer: ti.ManufacturerID,
				serial:       ti.SerialNumber,
				initialized:  ti.Flags&p11.CKF_TOKEN_INITIALIZED != 0,
			})
		}
		return nil
	})
	return out, err
}

// initToken runs C_InitToken on slot.
func (m *module) initToken(gen uint64, slot uint, soPIN, label string) error {
	return m.call(gen, func(c *p11.Ctx) error { return c.InitToken(slot, soPIN, label) })
}

// session is one PKCS#11 session. A session is used by one goroutine at a
// time (PKCS#11 sessions hold operation state).
type session struct {
	m   *module
	gen uint64
	h   p11.SessionHandle
}

// openSession opens a session on slot; rw for sessions that create objects.
func (m *module) openSession(gen uint64, slot uint, rw bool) (session, error) {
	flags := uint(p11.CKF_SERIAL_SESSION)
	if rw {
		flags |= p11.CKF_RW_SESSION
	}
	var h p11.SessionHandle
	err := m.call(gen, func(c *p11.Ctx) error {
		var err error
		h, err = c.OpenSession(slot, flags)
		return err
	})
	return session{m: m, gen: gen, h: h}, err
}

// close closes the session. Errors are ignored: a session that is already
// gone is what we wanted.
func (s session) close() {
	_ = s.m.call(s.gen, func(c *p11.Ctx) error { return c.CloseSession(s.h) })
}

// login logs the user in. The login state belongs to the application and
// token, not to the session, so "already logged in" is success.
func (s session) login(pin string) error {
	return s.loginAs(p11.CKU_USER, pin)
}

func (s session) loginSO(pin string) error {
	return s.loginAs(p11.CKU_SO, pin)
}

func (s session) loginAs(user uint, pin string) error {
	err := s.m.call(s.gen, func(c *p11.Ctx) error { return c.Login(s.h, user, pin) })
	if isRV(err, p11.CKR_USER_ALREADY_LOGGED_IN) {
		return nil
	}
	return err
}

func (s session) logout() error {
	return s.m.call(s.gen, func(c *p11.Ctx) error { return c.Logout(s.h) })
}

func (s session) initPIN(pin string) error {
	return s.m.call(s.gen, func(c *p11.Ctx) error { return c.InitPIN(s.h, pin) })
}

// findObjects returns the objects matching label and id (each ignored when
// empty); secretAES restricts the search to AES secret keys.
func (s session) findObjects(label string, id []byte, secretAES bool) ([]objectHandle, error) {
	var tmpl []*p11.Attribute
	if secretAES {
		tmpl = append(tmpl,
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
			p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES))
	}
	if label != "" {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_LABEL, label))
	}
	if len(id) > 0 {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, id))
	}
	return s.findTemplate(tmpl)
}

// findTemplate returns every object matching tmpl.
func (s session) findTemplate(tmpl []*p11.Attribute) ([]objectHandle, error) {
	var out []objectHandle
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		if err := c.FindObjectsInit(s.h, tmpl); err != nil {
			return err
		}
		var ferr error
		for {
			hs, _, err := c.FindObjects(s.h, 16)
			if err != nil {
				ferr = err
				break
			}
			if len(hs) == 0 {
				break
			}
			for _, h := range hs {
				out = append(out, objectHandle(h))
			}
		}
		if err := c.FindObjectsFinal(s.h); ferr == nil {
			ferr = err
		}
		return ferr
	})
	return out, err
}

// rootKeyTemplate is the template of every root key, generated or
// imported, less how its value is given. Every attribute that matters is
// set explicitly: SoftHSM (and others) default to permissive values
// (extractable, wrap and unwrap allowed) for anything the template leaves
// out. The key can encrypt and decrypt and nothing else; in particular it
// never has WRAP/UNWRAP together with DECRYPT, which would let a caller
// unwrap a key it wrapped and then decrypt it out.
func rootKeyTemplate(label string, id []byte) []*p11.Attribute {
	return []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_MODIFIABLE, false),
		p11.NewAttribute(p11.CKA_ENCRYPT, true),
		p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_WRAP, false),
		p11.NewAttribute(p11.CKA_UNWRAP, false),
		p11.NewAttribute(p11.CKA_SIGN, false),
		p11.NewAttribute(p11.CKA_VERIFY, false),
		p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	}
}

// generateRootKey makes an AES-256 root key on the token (rootKeyTemplate).
func (s session) generateRootKey(label string, id []byte) (objectHandle, error) {
	tmpl := append(rootKeyTemplate(label, id), p11.NewAttribute(p11.CKA_VALUE_LEN, 32))
	mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}
	var h p11.ObjectHandle
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		h, err = c.GenerateKey(s.h, mech, tmpl)
		return err
	})
	return objectHandle(h), err
}

func (s session) destroy(key objectHandle) error {
	return s.m.call(s.gen, func(c *p11.Ctx) error { return c.DestroyObject(s.h, p11.ObjectHandle(key)) })
}

// gcmTagBits is the GCM tag length Coffre uses: the full 128 bits.
const gcmTagBits = 128

// encryptGCM encrypts plaintext under key with AES-GCM inside the token. It
// returns ciphertext‖tag and the IV actually used: some HSMs replace the
// caller's IV with their own, and storing the wrong one would lose the data.
func (s session) encryptGCM(key objectHandle, iv, aad, plaintext []byte) (ct, usedIV []byte, err error) {
	params := p11.NewGCMParams(iv, aad, gcmTagBits)
	defer params.Free()
	mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}
	err = s.m.call(s.gen, func(c *p11.Ctx) error {
		if err := c.EncryptInit(s.h, mech, p11.ObjectHandle(key)); err != nil {
			return err
		}
		var err error
		ct, err = c.Encrypt(s.h, plaintext)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return ct, params.IV(), nil
}

// decryptGCM decrypts ciphertext‖tag under key inside the token.
//
// miekg/pkcs11 receives the plaintext in a C buffer that it frees without
// clearing; the copy returned here belongs to the caller, who zeroizes it.
func (s session) decryptGCM(key objectHandle, iv, aad, ct []byte) ([]byte, error) {
	params := p11.NewGCMParams(iv, aad, gcmTagBits)
	defer params.Free()
	mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}
	var pt []byte
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		if err := c.DecryptInit(s.h, mech, p11.ObjectHandle(key)); err != nil {
			return err
		}
		var err error
		pt, err = c.Decrypt(s.h, ct)
		return err
	})
	return pt, err
}

// attributes reads back the security-relevant attributes of key.
func (s session) attributes(key objectHandle) (hsm.Attributes, error) {
	types := []uint{
		p11.CKA_TOKEN, p11.CKA_PRIVATE, p11.CKA_MODIFIABLE, p11.CKA_SENSITIVE, p11.CKA_EXTRACTABLE,
		p11.CKA_ALWAYS_SENSITIVE, p11.CKA_NEVER_EXTRACTABLE, p11.CKA_ENCRYPT, p11.CKA_DECRYPT,
		p11.CKA_WRAP, p11.CKA_UNWRAP, p11.CKA_SIGN, p11.CKA_VERIFY, p11.CKA_DERIVE, p11.CKA_VALUE_LEN,
	}
	tmpl := make([]*p11.Attribute, len(types))
	for i, t := range types {
		tmpl[i] = p11.NewAttribute(t, nil)
	}
	var got []*p11.Attribute
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		got, err = c.GetAttributeValue(s.h, p11.ObjectHandle(key), tmpl)
		return err
	})
	if err != nil {
		return hsm.Attributes{}, err
	}
	var a hsm.Attributes
	for _, at := range got {
		if at.Type == p11.CKA_VALUE_LEN {
			n, err := ulong(at.Value)
			if err != nil {
				return hsm.Attributes{}, err
			}
			a.ValueLen = n
			continue
		}
		if len(at.Value) != 1 {
			return hsm.Attributes{}, fmt.Errorf("pkcs11: attribute 0x%x: %d bytes for a CK_BBOOL", at.Type, len(at.Value))
		}
		v := at.Value[0] != 0
		switch at.Type {
		case p11.CKA_TOKEN:
			a.Token = v
		case p11.CKA_PRIVATE:
			a.Private = v
		case p11.CKA_MODIFIABLE:
			a.Modifiable = v
		case p11.CKA_SENSITIVE:
			a.Sensitive = v
		case p11.CKA_EXTRACTABLE:
			a.Extractable = v
		case p11.CKA_ALWAYS_SENSITIVE:
			a.AlwaysSensitive = v
		case p11.CKA_NEVER_EXTRACTABLE:
			a.NeverExtractable = v
		case p11.CKA_ENCRYPT:
			a.Encrypt = v
		case p11.CKA_DECRYPT:
			a.Decrypt = v
		case p11.CKA_WRAP:
			a.Wrap = v
		case p11.CKA_UNWRAP:
			a.Unwrap = v
		case p11.CKA_SIGN:
			a.Sign = v
		case p11.CKA_VERIFY:
			a.Verify = v
		case p11.CKA_DERIVE:
			a.Derive = v
		}
	}
	return a, nil
}

// keyID reads the CKA_ID of key.
func (s session) keyID(key objectHandle) ([]byte, error) {
	var got []*p11.Attribute
	err := s.m.call(s.gen, func(c *p11.Ctx) error {
		var err error
		got, err = c.GetAttributeValue(s.h, p11.ObjectHandle(key), []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(got) != 1 {
		return nil, fmt.Errorf("pkcs11: C_GetAttributeValue returned %d attributes for CKA_ID", len(got))
	}
	return got[0].Value, nil
}

// ulong decodes a CK_ULONG attribute value (native size and byte order).
func ulong(b []byte) (int, error) {
	switch len(b) {
	case 4:
		return int(binary.NativeEndian.Uint32(b)), nil
	case 8:
		v := binary.NativeEndian.Uint64(b)
		if v > 1<<31 {
			return 0, fmt.Errorf("pkcs11: CK_ULONG %d out of range", v)
		}
		return int(v), nil
	}
	return 0, fmt.Errorf("pkcs11: CK_ULONG of %d bytes", len(b))
}

// isRV reports whether err is the PKCS#11 return value rv.
func isRV(err error, rv uint) bool {
	var e p11.Error
	return errors.As(err, &e) && uint(e) == rv
}

// isGone reports whether err means the library, the token, the session, the
// login or the key handle is gone, so that reconnecting may help.
func isGone(err error) bool {
	if errors.Is(err, errStale) {
		return true
	}
	var e p11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch uint(e) {
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED,
		p11.CKR_DEVICE_REMOVED, p11.CKR_TOKEN_NOT_PRESENT, p11.CKR_TOKEN_NOT_RECOGNIZED,
		p11.CKR_CRYPTOKI_NOT_INITIALIZED, p11.CKR_USER_NOT_LOGGED_IN,
		p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_KEY_HANDLE_INVALID,
		p11.CKR_SLOT_ID_INVALID, p11.CKR_DEVICE_ERROR:
		return true
	}
	return false
}

// sessionsGone reports whether err means our session handles no longer
// exist in the library. Closing them then would at best fail and at worst
// close a session that reused the number.
func sessionsGone(err error) bool {
	if errors.Is(err, errStale) {
		return true
	}
	var e p11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch uint(e) {
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED, p11.CKR_DEVICE_REMOVED,
		p11.CKR_TOKEN_NOT_PRESENT, p11.CKR_CRYPTOKI_NOT_INITIALIZED, p11.CKR_SLOT_ID_INVALID:
		return true
	}
	return false
}

// notInitialized reports CKR_CRYPTOKI_NOT_INITIALIZED: someone finalised
// the library behind our back.
func notInitialized(err error) bool {
	return isRV(err, p11.CKR_CRYPTOKI_NOT_INITIALIZED)
}

// pinRefused reports a login refused because of the PIN itself; retrying
// with the same PIN would only count towards locking the token.
func pinRefused(err error) bool {
	var e p11.Error
	if !errors.As(err, &e) {
		return false
	}
	switch uint(e) {
	case p11.CKR_PIN_INCORRECT, p11.CKR_PIN_INVALID, p11.CKR_PIN_LEN_RANGE,
		p11.CKR_PIN_EXPIRED, p11.CKR_PIN_LOCKED, p11.CKR_USER_PIN_NOT_INITIALIZED:
		return true
	}
	return false
}
