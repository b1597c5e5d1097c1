package kms

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/kms/store"
)

// Defaults of [Config].
const (
	DefaultCacheSize = 1024
	DefaultCacheTTL  = 10 * time.Minute
	maxCASAttempts   = 16
	// MaxVersions bounds a keyring's KEK versions, all of which live in one
	// stored record (about 250 bytes each, under the store's 1 MiB value
	// limit): weekly rotation for 38 years.
	MaxVersions = 2000
)

// Service is the key hierarchy: keyrings, KEK versions and data-key
// envelopes. It is safe for concurrent use.
type Service struct {
	store store.Store
	// root wraps new KEK versions; previous (by ID) only unwraps versions
	// not yet moved to root by RotateRoot. See rootFor.
	root     hsm.Root
	previous map[string]hsm.Root
	// aliases are other IDs of root (Config.RootAliases).
	aliases map[string]bool
	now     func() time.Time
	keks    *kekCache
	// maxVersions is MaxVersions; tests lower it.
	maxVersions int

	// meta caches decoded keyring records so that the per-request path
	// touches neither the store nor the HSM. It is kept fresh by this
	// service's own writes and by a watch on the store (other nodes).
	mu   sync.RWMutex
	meta map[string]cachedRecord
	ttl  time.Duration
	// gen changes with every keyring event the watch delivers and whenever
	// the watch starts or stops; live says a watch is running. A record
	// read from the store is cached only if gen did not change while it
	// was read, and only while live: otherwise a read that began before a
	// change elsewhere could put the record from before it back.
	gen  uint64
	live bool

	stopWatch context.CancelFunc
	watchDone chan struct{}
	closeOnce sync.Once
}

type cachedRecord struct {
	rec     *keyringRecord
	rev     int64
	expires time.Time
}

// New returns a Service over cfg.Store and cfg.Root.
func New(cfg Config) (*Service, error) {
	if cfg.Store == nil || cfg.Root == nil {
		return nil, errors.New("kms: Config.Store and Config.Root are required")
	}
	if cfg.CacheSize < 0 || cfg.CacheTTL < 0 {
		return nil, errors.New("kms: Config.CacheSize and Config.CacheTTL must not be negative")
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = DefaultCacheTTL
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	previous, err := previousRoots(cfg.Root, cfg.PreviousRoots)
	if err != nil {
		return nil, err
	}
	aliases, err := rootAliases(cfg.Root, previous, cfg.RootAliases)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{
		store:       cfg.Store,
		root:        cfg.Root,
		previous:    previous,
		aliases:     aliases,
		now:         cfg.Now,
		keks:        newKEKCache(cfg.CacheSize, cfg.CacheTTL, cfg.Now),
		maxVersions: MaxVersions,
		meta:        make(map[string]cachedRecord),
		ttl:         cfg.CacheTTL,
		stopWatch:   cancel,
		watchDone:   make(chan struct{}),
	}
	go s.watch(ctx)
	return s, nil
}

// Close stops the service and zeroizes every cached KEK. It closes neither
// the store nor the root, which the caller owns.
func (s *Service) Close() error {
	s.closeOnce.Do(func() {
		s.stopWatch()
		<-s.watchDone
		s.keks.close()
		s.mu.Lock()
		s.meta = make(map[string]cachedRecord)
		s.mu.Unlock()
	})
	return nil
}

// watch follows changes to keyrings made elsewhere (another Coffre node on
// a shared store, or an operator tool) and drops what they make stale.
// While no watch runs, nothing is cached and every use reads the store.
func (s *Service) watch(ctx context.Context) {
	defer close(s.watchDone)
	lost := false
	for ctx.Err() == nil {
		events, err := s.store.Watch(ctx, keyringPrefix)
		if err == nil {
			// Anything cached before the watch started may have missed an
			// event: start clean.
			s.setLive(true)
			if lost {
				s.purgeAfterGap(ctx)
			}
			for ev := range events {
				s.observe(ev)
			}
			s.setLive(false)
			lost = true
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// setLive empties the record cache and says whether a watch keeps it
// fresh from now on.
func (s *Service) setLive(live bool) {
	s.mu.Lock()
	s.meta = make(map[string]cachedRecord)
	s.gen++
	s.live = live
	s.mu.Unlock()
}

// purgeAfterGap drops the cached KEKs that changes missed while the watch
// was down made unusable: retired versions, and keyrings gone from the
// store. They could not be used meanwhile (records were read from the
// store on every use), but they must not stay in memory.
func (s *Service) purgeAfterGap(ctx context.Context) {
	kvs, err := s.store.List(ctx, keyringPrefix)
	if err != nil {
		s.keks.purgeAll() // the HSM unwraps them again on next use
		return
	}
	uids := make(map[string]bool, len(kvs))
	for _, kv := range kvs {
		rec, err := decodeRecord(kv.Key, kv.Value)
		if err != nil {
			continue
		}
		uids[string(rec.UID)] = true
		s.purgeRetired(rec)
	}
	s.keks.retain(func(uid string) bool { return uids[uid] })
}

func (s *Service) observe(ev store.Event) {
	s.mu.Lock()
	s.gen++
	c, ok := s.meta[ev.KV.Key]
	if ok && c.rev < ev.KV.Revision {
		delete(s.meta, ev.KV.Key)
	}
	s.mu.Unlock()
	if ok && ev.Type == store.EventDelete {
		s.keks.purge(string(c.rec.UID))
	}
	if ev.Type == store.EventPut {
		// A version disabled, scheduled for destruction or destroyed on
		// another node leaves this node's KEK cache at once, not at the
		// next use or TTL.
		if rec, err := decodeRecord(ev.KV.Key, ev.KV.Value); err == nil {
			s.purgeRetired(rec)
		}
	}
}

// cacheGen returns the generation to pass to remember: take it before the
// store call whose result is to be cached.
func (s *Service) cacheGen() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.gen
}

// remember caches rec at rev, read or written in the store after
// cacheGen returned gen, unless a newer revision is cached already or the
// cache changed since (see Service.gen); in that case an older cached
// revision is dropped, so that this node reads its own writes.
func (s *Service) remember(key string, rec *keyringRecord, rev int64, gen uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.meta[key]
	if ok && c.rev > rev {
		return
	}
	if !s.live || s.gen != gen {
		if ok && c.rev < rev {
			delete(s.meta, key) // older than what this node just read or wrote
		}
		return
	}
	s.meta[key] = cachedRecord{rec: rec, rev: rev, expires: s.now().Add(s.ttl)}
}

// load returns the keyring record, from the meta cache when it is fresh.
// The returned record is shared and must not be modified.
func (s *Service) load(ctx context.Context, id KeyringID) (*keyringRecord, int64, error) {
	key := keyringKey(id)
	s.mu.RLock()
	c, ok := s.meta[key]
	s.mu.RUnlock()
	if ok && s.now().Before(c.expires) {
		return c.rec, c.rev, nil
	}
	return s.read(ctx, id)
}

// read reads the keyring record from the store, bypassing the cache.
func (s *Service) read(ctx context.Context, id KeyringID) (*keyringRecord, int64, error) {
	key := keyringKey(id)
	gen := s.cacheGen()
	kv, err := s.store.Get(ctx, key)
	if errors.Is(err, store.ErrNotFound) {
		return nil, 0, fmt.Errorf("%w: keyring %s", ErrNotFound, id)
	}
	if err != nil {
		return nil, 0, storeErr(err)
	}
	rec, err := decodeRecord(key, kv.Value)
	if err != nil {
		return nil, 0, err
	}
	s.remember(key, rec, kv.Revision, gen)
	return rec, kv.Revision, nil
}

func storeErr(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: store: %w", ErrUnavailable, err)
}

func hsmErr(err error) error {
	if errors.Is(err, hsm.ErrUnavailable) {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// newVersion makes a random KEK, wraps it in the HSM for version v of rec
// and zeroizes the plaintext.
func (s *Service) newVersion(ctx context.Context, rec *keyringRecord, v uint32) (versionRecord, error) {
	kek := make([]byte, 32)
	defer clear(kek)
	if _, err := rand.Read(kek); err != nil {
		return versionRecord{}, err
	}
	wrapped, err := s.root.Wrap(ctx, kek, kekAAD(rec, v))
	if err != nil {
		return versionRecord{}, fmt.Errorf("kms: wrap KEK %s v%d: %w", rec.id(), v, hsmErr(err))
	}
	return versionRecord{
		Version:    v,
		State:      StateActive.String(),
		CreateTime: s.now().UTC(),
		RootID:     s.root.ID(),
		Wrapped:    wrapped,
	}, nil
}

// CreateKeyring creates keyring id with its first KEK version.
func (s *Service) CreateKeyring(ctx context.Context, id KeyringID) (*Keyring, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	rec := &keyringRecord{
		Format:     recordFormat,
		Tenant:     id.Tenant,
		Name:       id.Name,
		UID:        make([]byte, 16),
		CreateTime: s.now().UTC(),
		Primary:    1,
	}
	if _, err := rand.Read(rec.UID); err != nil {
		return nil, err
	}
	v, err := s.newVersion(ctx, rec, 1)
	if err != nil {
		return nil, err
	}
	rec.Versions = []versionRecord{v}
	key := keyringKey(id)
	gen := s.cacheGen()
	rev, err := s.store.CompareAndSwap(ctx, key, 0, rec.encode())
	if errors.Is(err, store.ErrConflict) {
		return nil, fmt.Errorf("%w: keyring %s", ErrExists, id)
	}
	if err != nil {
		return nil, storeErr(err)
	}
	s.remember(key, rec, rev, gen)
	return rec.public(), nil
}

// GetKeyring describes keyring id.
func (s *Service) GetKeyring(ctx context.Context, id KeyringID) (*Keyring, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	rec, _, err := s.read(ctx, id)
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// ListKeyrings lists the keyrings of tenant, or of every tenant when tenant
// is empty, ordered by id.
func (s *Service) ListKeyrings(ctx context.Context, tenant string) ([]*Keyring, error) {
	prefix := keyringPrefix
	if tenant != "" {
		if err := ValidateTenant(tenant); err != nil {
			return nil, err
		}
		prefix += tenant + "/"
	}
	kvs, err := s.store.List(ctx, prefix)
	if err != nil {
		return nil, storeErr(err)
	}
	out := make([]*Keyring, 0, len(kvs))
	for _, kv := range kvs {
		rec, err := decodeRecord(kv.Key, kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, rec.public())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID.String() < out[j].ID.String() })
	return out, nil
}

// RotateKeyring adds a KEK version to keyring id and makes it the primary;
// the previous primary is deactivated and keeps decrypting. The change is
// one compare-and-swap of the keyring record, retried on a concurrent
// write, so every caller's rotation happens exactly once. It also moves the
// next automatic rotation one period from now. A keyring scheduled for
// destruction or destroyed is not rotated (ErrFailedPrecondition).
func (s *Service) RotateKeyring(ctx context.Context, id KeyringID) (*Keyring, error) {
	rec, err := s.update(ctx, id, "rotation", func(next *keyringRecord) (bool, error) {
		return true, s.rotate(ctx, next)
	})
	if err != nil {
		return nil, err
	}
	return rec.public(), nil
}

// withKEK runs f with the plaintext KEK of version v of rec, unwrapping it
// in the HSM on a cache miss.
func (s *Service) withKEK(ctx context.Context, rec *keyringRecord, v *versionRecord, f func(kek []byte) error) error {
	ref := kekRef{uid: string(rec.UID), version: v.Version}
	return s.keks.use(ref, func() (*Secret, error) {
		root := s.rootFor(v.RootID)
		if root == nil {
			return nil, fmt.Errorf("%w: KEK %s v%d is wrapped by root %s; this server holds %s",
				ErrFailedPrecondition, rec.id(), v.Version, v.RootID, s.rootNames())
		}
		kek, err := root.Unwrap(ctx, v.Wrapped, kekAAD(rec, v.Version))
		if errors.Is(err, hsm.ErrUnwrap) {
			// The store is not trusted: this is where tampering with a
			// wrapped KEK or its keyring identity shows.
			slog.Error("kms: wrapped KEK failed authentication in the HSM", "keyring", rec.id().String(), "version", v.Version)
			return nil, fmt.Errorf("kms: KEK %s v%d does not unwrap under root %s: the stored keyring was altered", rec.id(), v.Version, root.ID())
		}
		if err != nil {
			return nil, fmt.Errorf("kms: unwrap KEK %s v%d: %w", rec.id(), v.Version, hsmErr(err))
		}
		if len(kek) != 32 {
			clear(kek)
			return nil, fmt.Errorf("kms: KEK %s v%d unwrapped to %d bytes", rec.id(), v.Version, len(kek))
		}
		return NewSecret(kek), nil
	}, f)
}

// GenerateDataKey makes a random AES-256 data key and its envelope under the
// primary KEK of keyring id, bound to ec.
func (s *Service) GenerateDataKey(ctx context.Context, id KeyringID, ec map[string]string) (*DataKey, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	cec, err := canonicalContext(ec)
	if err != nil {
		return nil, err
	}
	rec, _, err := s.load(ctx, id)
	if err != nil {
		return nil, err
	}
	dk := make([]byte, dataKeySize)
	env, err := s.seal(ctx, rec, id.Tenant, dk, cec, true)
	if err != nil {
		clear(dk)
		return nil, err
	}
	return &DataKey{Plaintext: NewSecret(dk), Envelope: env, KeyringID: id, KeyVersion: rec.Primary}, nil
}

// seal encrypts dk (filled with random bytes first when fresh) under the
// primary KEK of rec and returns the envelope.
func (s *Service) seal(ctx context.Context, rec *keyringRecord, tenant string, dk, cec []byte, fresh bool) ([]byte, error) {
	v := rec.version(rec.Primary)
	if v == nil || v.State != StateActive.String() {
		// The primary is disabled or scheduled for destruction (or
		// destroyed) with the whole keyring.
		return nil, fmt.Errorf("%w: keyring %s has no active version", ErrFailedPrecondition, rec.id())
	}
	var nonce [nonceSize]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, err
	}
	if fresh {
		if _, err := rand.Read(dk); err != nil {
			return nil, err
		}
	}
	env := appendHeader(make([]byte, 0, MaxEnvelopeSize), rec.id(), v.Version, nonce[:])
	aad := envelopeAAD(env, tenant, rec.id(), cec)
	err := s.withKEK(ctx, rec, v, func(kek []byte) error {
		ek := envelopeKey(kek, nonce[:])
		defer clear(ek)
		// #nosec G407 -- ek is used for this one encryption only (ENVELOPE.md).
		ct, err := sealAESGCM(ek, zeroNonce, dk, aad)
		if err != nil {
			return err
		}
		env = append(env, ct...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return env, nil
}

// Decrypt opens envelope for tenant with encryption context ec and returns
// the data key. Every failure to open — another tenant, keyring or context,
// a flipped bit, an unknown version — is ErrDecrypt; only an envelope that
// does not even parse gets a more precise ErrInvalidArgument.
func (s *Service) Decrypt(ctx context.Context, tenant string, envelope []byte, ec map[string]string) (*Secret, error) {
	if err := ValidateTenant(tenant); err != nil {
		return nil, err
	}
	cec, err := canonicalContext(ec)
	if err != nil {
		return nil, err
	}
	e, err := parseEnvelope(envelope)
	if err != nil {
		return nil, err
	}
	dk, err := s.open(ctx, tenant, e, cec)
	if err != nil {
		return nil, err
	}
	return NewSecret(dk), nil
}

func (s *Service) open(ctx context.Context, tenant string, e *envelope, cec []byte) ([]byte, error) {
	if e.keyring.Tenant != tenant {
		return nil, ErrDecrypt
	}
	rec, _, err := s.load(ctx, e.keyring)
	if errors.Is(err, ErrNotFound) {
		return nil, ErrDecrypt
	}
	if err != nil {
		return nil, err
	}
	v := rec.version(e.version)
	if v == nil {
		// The cached record may predate a rotation made on another node.
		if rec, _, err = s.read(ctx, e.keyring); err != nil {
			return nil, decryptErr(err)
		}
		if v = rec.version(e.version); v == nil {
			return nil, ErrDecrypt
		}
	}
	if !rec.decrypts(v) {
		// Disabled, scheduled for destruction, destroyed or below the
		// minimum — perhaps by another node: its KEK must not linger here.
		s.dropKEK(rec, v.Version)
		return nil, ErrDecrypt
	}
	aad := envelopeAAD(e.header, tenant, e.keyring, cec)
	var dk []byte
	err = s.withKEK(ctx, rec, v, func(kek []byte) error {
		ek := envelopeKey(kek, e.nonce)
		defer clear(ek)
		var err error
		dk, err = openAESGCM(ek, zeroNonce, e.ciphertext, aad)
		return err
	})
	if err != nil {
		return nil, err
	}
	return dk, nil
}

func decryptErr(err error) error {
	if errors.Is(err, ErrNotFound) {
		return ErrDecrypt
	}
	return err
}

// ReEncrypt opens envelope for tenant and seals the same data key under the
// primary KEK of dest (the envelope's own keyring when dest is zero), bound
// to destEC (ec when destEC is nil). The data key never leaves the service.
func (s *Service) ReEncrypt(ctx context.Context, tenant string, envelope []byte, ec map[string]string, dest KeyringID, destEC map[string]string) ([]byte, error) {
	if err := ValidateTenant(tenant); err != nil {
		return nil, err
	}
	cec, err := canonicalContext(ec)
	if err != nil {
		return nil, err
	}
	dcec := cec
	if destEC != nil {
		if dcec, err = canonicalContext(destEC); err != nil {
			return nil, err
		}
	}
	e, err := parseEnvelope(envelope)
	if err != nil {
		return nil, err
	}
	if dest.IsZero() {
		dest = e.keyring
	}
	if err := dest.Validate(); err != nil {
		return nil, err
	}
	if dest.Tenant != tenant {
		return nil, fmt.Errorf("%w: destination keyring %s belongs to another tenant", ErrInvalidArgument, dest)
	}
	dk, err := s.open(ctx, tenant, e, cec)
	if err != nil {
		return nil, err
	}
	defer clear(dk)
	rec, _, err := s.load(ctx, dest)
	if err != nil {
		return nil, err
	}
	return s.seal(ctx, rec, tenant, dk, dcec, false)
}

// EnvelopeInfo is what an envelope says about itself, readable without any
// key: which keyring and KEK version made it.
type EnvelopeInfo struct {
	Keyring    KeyringID
	KeyVersion uint32
}

// ParseEnvelopeInfo reads the header of an envelope of format v1. It
// authenticates nothing.
func ParseEnvelopeInfo(envelope []byte) (EnvelopeInfo, error) {
	e, err := parseEnvelope(envelope)
	if err != nil {
		return EnvelopeInfo{}, err
	}
	return EnvelopeInfo{Keyring: e.keyring, KeyVersion: e.version}, nil
}
