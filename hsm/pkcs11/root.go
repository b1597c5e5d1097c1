package pkcs11

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/coffre-kms/coffre/hsm"
)

// Config configures a [Root].
type Config struct {
	// URI names the token, the key, the module and the PIN file; see
	// [hsm.ParseURI]. module-path and pin-source are required.
	URI string
	// Sessions is the size of the session pool: how many operations run
	// on the token at once. 0 means 4; at most 64.
	Sessions int
	// RetryInterval is the minimum time between two reconnect attempts,
	// so that a dead HSM is not hammered. 0 means one second.
	RetryInterval time.Duration
}

const (
	defaultSessions      = 4
	maxSessions          = 64
	defaultRetryInterval = time.Second

	// rescanInterval bounds how often a Root that shares its module with
	// others re-initialises the library to look for its missing token:
	// doing so makes every other user of the module reconnect.
	rescanInterval = 30 * time.Second
)

// Wrapped format (see the package documentation).
const (
	formatV1 = 0x01
	ivSize   = 12
	tagSize  = gcmTagBits / 8
	// rootIDSize is the size of the random CKA_ID given to a new root key
	// when the URI names none.
	rootIDSize = 16
)

// ErrTokenExists is returned by [InitToken] when a token with that label is
// already present.
var ErrTokenExists = errors.New("pkcs11: token already exists")

// ErrClosed is returned by the methods of a [Root] after Close.
var ErrClosed = errors.New("pkcs11: root is closed")

// errNoConn reports that the Root holds no connection at the moment: the
// last one broke and no reconnect succeeded since.
var errNoConn = errors.New("pkcs11: not connected")

var (
	_ hsm.Root            = (*Root)(nil)
	_ hsm.AttributeReader = (*Root)(nil)
)

// Root is a root key on a PKCS#11 token. It is safe for concurrent use.
type Root struct {
	uri *hsm.URI
	id  string
	pin string
	// keyID is the CKA_ID of the key found (or made) at Open. Reconnects
	// look for label and this id, so that a key recreated under the same
	// label in the meantime is not silently taken for the root: blobs
	// wrapped by the old key would no longer unwrap, and new ones would be
	// wrapped by a key nobody vetted.
	keyID []byte
	size  int
	retry time.Duration
	mod   *module

	// slots is the pool semaphore: an operation holds one slot while it
	// uses a session. Holding every slot excludes all operations; reconnect
	// and Close do so, so that no handle of an old connection is in use
	// while new sessions (which may reuse the numbers) are opened.
	slots chan struct{}
	// reconnecting serialises reconnects; a channel so that waiters honour
	// their context. Lock order: reconnecting, then slots, then mu.
	reconnecting chan struct{}

	mu      sync.Mutex
	cur     *conn     // nil when the last connection broke
	idle    []session // sessions of cur not in use
	closed  bool
	lastTry time.Time // last reconnect attempt
	lastErr error     // its failure, returned while reconnects are rate-limited
	fatal   error     // set when the token refused the PIN; never retried
}

// conn is one connection to the token: the library generation, the slot,
// the logged-in state and the key handle that go together.
type conn struct {
	gen  uint64
	slot uint
	key  objectHandle
	// anchor is the session that logged in. It is kept open, and never
	// used for operations, for as long as the connection lives: PKCS#11
	// logs the application out when its last session on a token closes,
	// and pooled sessions come and go.
	anchor session
	// gone is set when the connection broke because its sessions no
	// longer exist; they must then not be closed (the numbers may belong
	// to someone else by now).
	gone bool
}

// Open connects to the root key named by cfg.URI: it loads the module,
// finds the token, logs in with the PIN from pin-source and finds the key by
// its label (object) and/or CKA_ID (id). A missing key yields an error
// wrapping [hsm.ErrKeyNotFound]; a missing token one wrapping
// [hsm.ErrUnavailable].
func Open(ctx context.Context, cfg Config) (*Root, error) {
	return open(ctx, cfg, false)
}

// CreateRoot generates a new root key on the token named by cfg.URI and
// returns it opened. The key is AES-256, generated inside the token, with
// the attributes described in the package documentation; its CKA_LABEL is
// the URI's object (required) and its CKA_ID the URI's id or 16 random
// bytes. If an object with that label or id is already on the token it
// returns an error wrapping [hsm.ErrKeyExists].
func CreateRoot(ctx context.Context, cfg Config) (*Root, error) {
	return open(ctx, cfg, true)
}

func open(ctx context.Context, cfg Config, create bool) (*Root, error) {
	r, err := newRoot(cfg, create)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.mod, err = acquireModule(r.uri.ModulePath)
	if err != nil {
		return nil, err
	}
	c, err := r.connect(ctx, create)
	if err != nil {
		r.mod.release()
		return nil, err
	}
	r.cur = c
	return r, nil
}

// newRoot validates cfg and reads the PIN.
func newRoot(cfg Config, create bool) (*Root, error) {
	if cfg.URI == "" {
		return nil, errors.New("pkcs11: Config.URI is empty")
	}
	u, err := hsm.ParseURI(cfg.URI)
	if err != nil {
		return nil, err
	}
	if err := u.ValidateKey(); err != nil {
		return nil, err
	}
	if u.ModulePath == "" {
		return nil, &hsm.URIError{URI: u.String(), Attr: "module-path", Reason: "required: the absolute path of the PKCS#11 module"}
	}
	if create && u.Object == "" {
		return nil, &hsm.URIError{URI: u.String(), Attr: "object", Reason: "required to create a root key: it becomes the key's CKA_LABEL"}
	}
	size := cfg.Sessions
	switch {
	case size == 0:
		size = defaultSessions
	case size < 0 || size > maxSessions:
		return nil, fmt.Errorf("pkcs11: Config.Sessions is %d; it must be between 1 and %d (0 for %d)", size, maxSessions, defaultSessions)
	}
	retry := cfg.RetryInterval
	switch {
	case retry == 0:
		retry = defaultRetryInterval
	case retry < 0:
		return nil, fmt.Errorf("pkcs11: Config.RetryInterval is %v; it must not be negative", retry)
	}
	pin, err := u.PIN()
	if err != nil {
		return nil, err
	}
	return &Root{
		uri:          u,
		id:           u.KeyID(),
		pin:          pin,
		size:         size,
		retry:        retry,
		slots:        make(chan struct{}, size),
		reconnecting: make(chan struct{}, 1),
	}, nil
}

// ID returns the root's stable name: its URI's path attributes that identify
// the key, without the query (see [hsm.URI.KeyID]).
func (r *Root) ID() string { return r.id }

// tokenDesc names the token in messages the way the URI does.
func (r *Root) tokenDesc() string {
	switch {
	case r.uri.Token != "":
		return fmt.Sprintf("token %q", r.uri.Token)
	case r.uri.Serial != "":
		return fmt.Sprintf("token with serial %q", r.uri.Serial)
	default:
		return fmt.Sprintf("token in slot %d", *r.uri.SlotID)
	}
}

// unavailable wraps an HSM-gone error for callers.
func (r *Root) unavailable(err error) error {
	if errors.Is(err, hsm.ErrUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %s: %v", hsm.ErrUnavailable, r.tokenDesc(), err)
}

// loginSession initialises the library, finds the token and returns a
// session on it (read-write if rw) logged in with the user PIN, and the
// token's slot. The caller closes the session; closing it is enough, as
// C_Logout would log out every other session this process has on the
// token, including live Roots'. A refused PIN is not retried, so as not to
// lock the token; anything else unreachable wraps [hsm.ErrUnavailable].
func (r *Root) loginSession(ctx context.Context, rw bool) (session, uint, error) {
	gen, err := r.mod.ensureInitialized()
	if err != nil {
		return session{}, 0, err
	}
	slot, gen, err := r.findToken(gen)
	if err != nil {
		return session{}, 0, err
	}
	if err := ctx.Err(); err != nil {
		return session{}, 0, err
	}
	s, err := r.mod.openSession(gen, slot, rw)
	if err != nil {
		return session{}, 0, r.unavailable(fmt.Errorf("C_OpenSession: %w", err))
	}
	if err := s.login(r.pin); err != nil {
		s.close()
		if pinRefused(err) {
			return session{}, 0, fmt.Errorf("pkcs11: %s refused the user PIN from %s; not retrying, so as not to lock the token: %w", r.tokenDesc(), r.uri.PINSource, err)
		}
		return session{}, 0, r.unavailable(fmt.Errorf("C_Login: %w", err))
	}
	return s, slot, nil
}

// connect makes a new connection: library initialised, token found, a
// logged-in session, the key found (or created) and checked.
func (r *Root) connect(ctx context.Context, create bool) (*conn, error) {
	s, slot, err := r.loginSession(ctx, false)
	if err != nil {
		return nil, err
	}
	c := &conn{gen: s.gen, slot: slot, anchor: s}
	fail := func(err error) (*conn, error) {
		s.close()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if create {
		c.key, err = r.create(s, slot)
	} else {
		c.key, err = r.findKey(s)
	}
	if err != nil {
		return fail(err)
	}
	a, err := s.attributes(c.key)
	if err != nil {
		return fail(r.keyErr("reading the attributes of", err))
	}
	if problem := unsafeRoot(a); problem != "" {
		return fail(fmt.Errorf("pkcs11: root key %s is not safe to use: %s", r.id, problem))
	}
	if r.keyID == nil {
		// First connection (Open runs it alone; reconnects only follow).
		id, err := s.keyID(c.key)
		if err != nil {
			return fail(r.keyErr("reading the CKA_ID of", err))
		}
		r.keyID = append([]byte{}, id...)
	}
	return c, nil
}

// keyErr wraps an error from an operation on the key found by connect.
func (r *Root) keyErr(what string, err error) error {
	if isGone(err) {
		return r.unavailable(fmt.Errorf("%s %s: %w", what, r.id, err))
	}
	return fmt.Errorf("pkcs11: %s %s: %w", what, r.id, err)
}

// findToken returns the slot holding the token the URI names. If it is not
// there, the library is asked to look again (see module.rescan).
func (r *Root) findToken(gen uint64) (uint, uint64, error) {
	match := func(gen uint64) ([]uint, error) {
		ts, err := r.mod.tokens(gen)
		if err != nil {
			return nil, r.unavailable(fmt.Errorf("listing slots: %w", err))
		}
		var slots []uint
		for _, t := range ts {
			if !t.initialized ||
				(r.uri.Token != "" && t.label != r.uri.Token) ||
				(r.uri.Serial != "" && t.serial != r.uri.Serial) ||
				(r.uri.Manufacturer != "" && t.manufacturer != r.uri.Manufacturer) ||
				(r.uri.SlotID != nil && t.slot != *r.uri.SlotID) {
				continue
			}
			slots = append(slots, t.slot)
		}
		return slots, nil
	}
	slots, err := match(gen)
	if err != nil {
		return 0, gen, err
	}
	if len(slots) == 0 {
		g, err := r.mod.rescan(gen, rescanInterval)
		switch {
		case err == nil:
			gen = g
			if slots, err = match(gen); err != nil {
				return 0, gen, err
			}
		case !errors.Is(err, errRescanTooSoon):
			return 0, gen, err
		}
	}
	switch len(slots) {
	case 0:
		return 0, gen, fmt.Errorf("%w: %s not present (module %s)", hsm.ErrUnavailable, r.tokenDesc(), r.uri.ModulePath)
	case 1:
		return slots[0], gen, nil
	default:
		return 0, gen, fmt.Errorf("pkcs11: %d tokens match %s; add serial= to the URI", len(slots), r.tokenDesc())
	}
}

// findKey finds the root key on the token.
func (r *Root) findKey(s session) (objectHandle, error) {
	id := r.uri.ID
	if len(id) == 0 {
		id = r.keyID // nil until the first connection
	}
	hs, err := s.findObjects(r.uri.Object, id, true)
	if err != nil {
		return 0, r.keyErr("searching for", err)
	}
	switch {
	case len(hs) == 0 && len(r.uri.ID) == 0 && len(id) > 0:
		return 0, fmt.Errorf("%w: %s with the CKA_ID %x it had when opened", hsm.ErrKeyNotFound, r.id, id)
	case len(hs) == 0:
		return 0, fmt.Errorf("%w: %s", hsm.ErrKeyNotFound, r.id)
	case len(hs) == 1:
		return hs[0], nil
	default:
		return 0, fmt.Errorf("pkcs11: %d AES keys match %s; add id= to the URI", len(hs), r.id)
	}
}

// create generates the root key, refusing to shadow any existing object,
// and checks that the token applied the template.
func (r *Root) create(s session, slot uint) (objectHandle, error) {
	h, _, err := r.createKey(s, slot, "new", "generating", generated, func(rw session, id []byte) (objectHandle, error) {
		return rw.generateRootKey(r.uri.Object, id)
	})
	return h, err
}

// createKey makes the root key with newKey on a read-write session of its
// own, under the URI's object and its id (or 16 random bytes), refusing to
// shadow any existing object, and checks that its attributes read back as
// want; if not, the key is destroyed. It returns the key and its CKA_ID.
// what ("new", "imported") and verb ("generating", "importing") name the
// key and the step in errors.
func (r *Root) createKey(s session, slot uint, what, verb string, want hsm.Attributes, newKey func(rw session, id []byte) (objectHandle, error)) (objectHandle, []byte, error) {
	// Any object, not only AES keys: two objects under one label make the
	// URI ambiguous for every tool an operator might use.
	hs, err := s.findObjects(r.uri.Object, nil, false)
	if err == nil && len(hs) == 0 && len(r.uri.ID) > 0 {
		hs, err = s.findObjects("", r.uri.ID, false)
	}
	if err != nil {
		return 0, nil, r.keyErr("searching for", err)
	}
	if len(hs) > 0 {
		return 0, nil, fmt.Errorf("%w: %s", hsm.ErrKeyExists, r.id)
	}
	id := r.uri.ID
	if len(id) == 0 {
		id = make([]byte, rootIDSize)
		if _, err := rand.Read(id); err != nil {
			return 0, nil, err
		}
	}
	rw, err := r.mod.openSession(s.gen, slot, true)
	if err != nil {
		return 0, nil, r.keyErr("opening a read-write session for", err)
	}
	defer rw.close()
	key, err := newKey(rw, id)
	if err != nil {
		return 0, nil, r.keyErr(verb, err)
	}
	a, err := s.attributes(key)
	if err == nil && a != want {
		err = fmt.Errorf("the token did not apply the template: got %+v, want %+v", a, want)
	}
	if err != nil {
		if derr := rw.destroy(key); derr != nil {
			return 0, nil, fmt.Errorf("pkcs11: %s root key %s is unusable (%v) and could not be destroyed: %w", what, r.id, err, derr)
		}
		return 0, nil, fmt.Errorf("pkcs11: %s root key %s destroyed: %w", what, r.id, err)
	}
	return key, id, nil
}

// generated is what a key made by generateRootKey must read back as.
var generated = hsm.Attributes{
	Token: true, Private: true, Modifiable: false, Sensitive: true, AlwaysSensitive: true, NeverExtractable: true,
	Encrypt: true, Decrypt: true, ValueLen: 32,
}

// unsafeRoot says what makes a key unfit to be a root, or "" if nothing.
// It applies to every key Open finds, whoever made it (vendor tools
// included), and again at every reconnect.
func unsafeRoot(a hsm.Attributes) string {
	var p []string
	if !a.Token {
		// A session object vanishes with its session: not a root anyone
		// can rely on, and not one made in a ceremony.
		p = append(p, "CKA_TOKEN is false")
	}
	if !a.Private {
		// A public key is usable from a session that never logged in:
		// any local process could then C_Decrypt wrapped KEKs without
		// the PIN.
		p = append(p, "CKA_PRIVATE is false")
	}
	if a.Modifiable {
		// Whoever holds the PIN could turn on CKA_WRAP, CKA_UNWRAP or
		// CKA_DERIVE after these checks, between two reconnects.
		p = append(p, "CKA_MODIFIABLE is true")
	}
	if !a.Sensitive {
		p = append(p, "CKA_SENSITIVE is false")
	}
	if a.Extractable {
		p = append(p, "CKA_EXTRACTABLE is true")
	}
	if a.ValueLen != 32 {
		p = append(p, fmt.Sprintf("CKA_VALUE_LEN is %d, not 32 (AES-256)", a.ValueLen))
	}
	if !a.Encrypt || !a.Decrypt {
		p = append(p, "it cannot both encrypt and decrypt")
	}
	if a.Wrap || a.Unwrap {
		p = append(p, "CKA_WRAP or CKA_UNWRAP is true (with CKA_DECRYPT, a wrapped key can be decrypted out)")
	}
	if a.Derive {
		p = append(p, "CKA_DERIVE is true")
	}
	return strings.Join(p, "; ")
}
