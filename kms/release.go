package kms

import (
	"container/list"
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/coffre-kms/coffre/kms/store"
)

// Defaults of [ReleaseConfig].
const (
	DefaultSessionTTL         = 10 * time.Minute
	DefaultMaxSessions        = 10000
	DefaultMaxSessionsPerNode = 8
	DefaultChallengeTTL       = 60 * time.Second
	DefaultMaxChallenges      = 10000
	DefaultChallengesPerEK    = 30
)

// ReleaseConfig configures a [ReleaseService]. Every limit has a default
// chosen on purpose; zero means the default, a negative value is refused.
type ReleaseConfig struct {
	// SessionTTL is how long a session lasts after attestation (default
	// 10m). A node re-attests before it ends.
	SessionTTL time.Duration
	// MaxSessions bounds the sessions held in memory (default 10,000;
	// each holds its release key with its AES-GCM key schedule, about a
	// kilobyte in all); MaxSessionsPerNode bounds one node's (default 8;
	// the oldest gives way).
	MaxSessions        int
	MaxSessionsPerNode int
	// ChallengeTTL is how long a challenge may wait for its evidence
	// (default 60s); MaxChallenges bounds those outstanding (default
	// 10,000): beyond it Challenge fails with ErrUnavailable.
	ChallengeTTL  time.Duration
	MaxChallenges int
	// ChallengesPerEK bounds the challenges one EK may ask for per minute
	// (default 30): beyond it Challenge fails with ErrResourceExhausted.
	ChallengesPerEK int
	// Auditor receives every decision; nil means none (until the audit
	// log lands).
	Auditor Auditor
	// Logger receives store records refused on read; nil means
	// slog.Default().
	Logger *slog.Logger
	// Rand is the randomness of challenges, tokens, session keys and TPM
	// seals, and must be safe for concurrent use; nil means crypto/rand.
	Rand io.Reader
	// Now is the clock; nil means the Service's.
	Now func() time.Time
}

// Auditor is the hook for the audit log, which lands later: the release
// service calls Record for every decision it makes — each challenge,
// attestation and release, allowed or denied — before it answers. For an
// allowed release, an error from Record refuses the release (invariant 3:
// no key leaves before its audit entry is durable); for a denial it is
// logged and the denial stands.
type Auditor interface {
	Record(ctx context.Context, e *AuditEvent) error
}

// AuditEvent is one decision. It never holds key material or a session
// token.
type AuditEvent struct {
	Time    time.Time
	Op      string // "attest.challenge", "attest.complete", "key.generate_data_key", "key.decrypt", "key.re_encrypt"
	Allowed bool
	// Reason is the refusal, empty when allowed.
	Reason        string
	Node          string
	Class         string
	EKFingerprint string
	Keyring       KeyringID
	KeyVersion    uint32
	// EvidenceHash is the attestation's evidence hash (attest.complete, and
	// every release on the session it made).
	EvidenceHash [32]byte
}

// Audit operations.
const (
	AuditChallenge       = "attest.challenge"
	AuditComplete        = "attest.complete"
	AuditGenerateDataKey = "key.generate_data_key"
	AuditDecrypt         = "key.decrypt"
	AuditReEncrypt       = "key.re_encrypt"
)

type noAudit struct{}

func (noAudit) Record(context.Context, *AuditEvent) error { return nil }

// ReleaseService is attested data-key release over a [Service]: the EK
// roots, node classes, enrolled nodes and keyring policies (admin
// operations, kept in the Store); TPM attestation (Challenge, Complete)
// that yields sessions; and the release operations (GenerateDataKey,
// Decrypt, ReEncrypt) that return data keys sealed to an attested node.
//
// The release path touches neither the store nor the HSM (on a KEK cache
// hit): classes, nodes, policies and EK roots are held in memory and kept
// fresh by this service's own writes and by watches on the store, so that a
// change made on another Coffre node — a revocation above all — applies
// here within about a second. While a watch is down, attestation and
// release fail with ErrUnavailable rather than decide on stale state.
//
// Challenges and sessions live in memory only, bounded in number and time:
// a restart ends every session and nodes attest again.
type ReleaseService struct {
	svc   *Service
	store store.Store
	now   func() time.Time
	rand  io.Reader
	log   *slog.Logger
	audit Auditor
	cfg   ReleaseConfig

	// mu guards the cached state. Lock order: sessMu, then mu.
	mu       sync.RWMutex
	roots    map[string]item[*EKRoot] // by fingerprint
	pool     *x509.CertPool           // of roots; rebuilt on change
	classes  map[string]item[*NodeClass]
	nodes    map[string]item[*Node]
	byEK     map[string][]string // EK fingerprint → node names (one, unless the store lies)
	policies map[KeyringID]item[*KeyringPolicy]
	live     map[string]bool // prefix → watch running with the state loaded
	allLive  bool

	chMu       sync.Mutex
	challenges map[string]*list.Element // of *pendingChallenge, by ID
	chOrder    *list.List               // oldest first: challenges share one TTL
	rate       map[string]*rateWindow   // by EK fingerprint and caller address
	rateSwept  time.Time                // when rate was last swept of stale windows

	sessMu   sync.RWMutex
	sessions map[[32]byte]*session // by SHA-256 of the token
	sessList *list.List            // oldest first: sessions share one TTL
	byNode   map[string][]*session // live (not ended) sessions per node, oldest first

	stop      context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// item is one cached record with the store revision it was read at.
type item[T any] struct {
	v   T
	rev int64
}

var releasePrefixes = []string{ekRootPrefix, classPrefix, nodePrefix, policyPrefix}

// NewReleaseService returns the release service over svc, sharing its
// store and clock. It loads the release state from the store and watches it
// until Close.
func NewReleaseService(svc *Service, cfg ReleaseConfig) (*ReleaseService, error) {
	if svc == nil {
		return nil, errors.New("kms: NewReleaseService needs a Service")
	}
	if cfg.SessionTTL < 0 || cfg.MaxSessions < 0 || cfg.MaxSessionsPerNode < 0 || cfg.ChallengeTTL < 0 ||
		cfg.MaxChallenges < 0 || cfg.ChallengesPerEK < 0 {
		return nil, errors.New("kms: ReleaseConfig limits must not be negative")
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defD := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	defD(&cfg.SessionTTL, DefaultSessionTTL)
	defD(&cfg.ChallengeTTL, DefaultChallengeTTL)
	def(&cfg.MaxSessions, DefaultMaxSessions)
	def(&cfg.MaxSessionsPerNode, DefaultMaxSessionsPerNode)
	def(&cfg.MaxChallenges, DefaultMaxChallenges)
	def(&cfg.ChallengesPerEK, DefaultChallengesPerEK)
	if cfg.Auditor == nil {
		cfg.Auditor = noAudit{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Now == nil {
		cfg.Now = svc.now
	}
	r := &ReleaseService{
		svc:        svc,
		store:      svc.store,
		now:        cfg.Now,
		rand:       cfg.Rand,
		log:        cfg.Logger,
		audit:      cfg.Auditor,
		cfg:        cfg,
		roots:      map[string]item[*EKRoot]{},
		pool:       x509.NewCertPool(),
		classes:    map[string]item[*NodeClass]{},
		nodes:      map[string]item[*Node]{},
		byEK:       map[string][]string{},
		policies:   map[KeyringID]item[*KeyringPolicy]{},
		live:       map[string]bool{},
		challenges: map[string]*list.Element{},
		chOrder:    list.New(),
		rate:       map[string]*rateWindow{},
		sessions:   map[[32]byte]*session{},
		sessList:   list.New(),
		byNode:     map[string][]*session{},
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.stop = cancel
	// The first load happens here, so that a service that returns is ready:
	// for each prefix the watch starts before the list, so nothing written
	// in between is missed.
	for _, prefix := range releasePrefixes {
		wctx, wcancel := context.WithCancel(ctx)
		events, err := r.store.Watch(wctx, prefix)
		if err == nil {
			err = r.load(wctx, prefix)
		}
		if err != nil {
			wcancel()
			cancel()
			r.wg.Wait()
			return nil, storeErr(err)
		}
		r.wg.Add(1)
		go r.follow(ctx, prefix, events, wcancel)
	}
	return r, nil
}

// Close stops the watches and ends every session and challenge. It closes
// neither the Service nor the store.
func (r *ReleaseService) Close() error {
	r.closeOnce.Do(func() {
		r.stop()
		r.wg.Wait()
		r.mu.Lock()
		r.allLive = false
		clear(r.live)
		r.mu.Unlock()
		r.chMu.Lock()
		clear(r.challenges)
		r.chOrder.Init()
		r.chMu.Unlock()
		r.sessMu.Lock()
		for _, s := range r.sessions {
			if s.rk != nil {
				s.rk.zero()
				s.rk = nil
			}
		}
		clear(r.sessions)
		r.sessList.Init()
		clear(r.byNode)
		r.sessMu.Unlock()
	})
	return nil
}

// follow applies the events of one prefix, and when the watch breaks (the
// store closed it, or it fell behind) marks the state stale, watches and
// loads again.
func (r *ReleaseService) follow(ctx context.Context, prefix string, events <-chan store.Event, cancel context.CancelFunc) {
	defer r.wg.Done()
	for {
		for ev := range events {
			r.observe(ev)
		}
		cancel()
		r.setLive(prefix, false)
		if ctx.Err() != nil {
			return
		}
		for {
			wctx, wcancel := context.WithCancel(ctx)
			ch, err := r.store.Watch(wctx, prefix)
			if err == nil {
				if err = r.load(wctx, prefix); err == nil {
					events, cancel = ch, wcancel
					break
				}
			}
			wcancel()
			r.log.Warn("kms: release state watch failed; attestation and release are unavailable until it is back", "prefix", prefix, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
	}
}

func (r *ReleaseService) setLive(prefix string, live bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.live[prefix] = live
	r.allLive = true
	for _, p := range releasePrefixes {
		r.allLive = r.allLive && r.live[p]
	}
}

// decoded is one store record decoded for the cache; v is nil when the key
// was deleted or its record is refused.
type decoded struct {
	key, name string
	prefix    string
	v         any
	rev       int64
}

func (r *ReleaseService) decode(kv store.KV, deleted bool) decoded {
	d := decoded{key: kv.Key, rev: kv.Revision}
	for _, p := range releasePrefixes {
		if strings.HasPrefix(kv.Key, p) {
			d.prefix, d.name = p, strings.TrimPrefix(kv.Key, p)
		}
	}
	if d.prefix == "" || deleted {
		return d
	}
	var err error
	switch d.prefix {
	case ekRootPrefix:
		d.v, err = decodeEKRoot(kv.Key, kv.Value)
	case classPrefix:
		d.v, err = decodeClass(kv.Key, kv.Value)
	case nodePrefix:
		d.v, err = decodeNode(kv.Key, kv.Value)
	case policyPrefix:
		d.v, err = decodePolicy(kv.Key, kv.Value)
	}
	if err != nil {
		// Fail closed: a record this server cannot trust counts as absent
		// (no node, no class, no policy, no root).
		r.log.Error("kms: refused a stored release record; it is ignored", "key", kv.Key, "err", err)
		d.v = nil
	}
	return d
}

// observe applies one store event to the cache.
func (r *ReleaseService) observe(ev store.Event) {
	d := r.decode(ev.KV, ev.Type == store.EventDelete)
	if d.prefix == "" {
		return
	}
	var ended []endSessions
	r.mu.Lock()
	r.applyLocked(d, &ended)
	r.finishLocked(d.prefix)
	r.mu.Unlock()
	r.end(ended)
}

// observeLocal applies this service's own write at once, ahead of the
// watch event that confirms it.
func (r *ReleaseService) observeLocal(key string, val []byte, rev int64) {
	r.observe(store.Event{Type: store.EventPut, KV: store.KV{Key: key, Value: val, Revision: rev}})
}

// load lists prefix and replaces its cached state, then marks it live.
func (r *ReleaseService) load(ctx context.Context, prefix string) error {
	kvs, err := r.store.List(ctx, prefix)
	if err != nil {
		return err
	}
	ds := make([]decoded, 0, len(kvs))
	seen := make(map[string]bool, len(kvs))
	for _, kv := range kvs {
		d := r.decode(kv, false)
		ds = append(ds, d)
		seen[d.name] = true
	}
	var ended []endSessions
	r.mu.Lock()
	// Whatever is cached and no longer listed was deleted while no watch
	// ran.
	var gone []string
	switch prefix {
	case ekRootPrefix:
		gone = missing(r.roots, seen)
	case classPrefix:
		gone = missing(r.classes, seen)
	case nodePrefix:
		gone = missing(r.nodes, seen)
	case policyPrefix:
		for id := range r.policies {
			if !seen[id.Tenant+"/"+id.Name] {
				gone = append(gone, id.Tenant+"/"+id.Name)
			}
		}
	}
	for _, name := range gone {
		r.applyLocked(decoded{key: prefix + name, name: name, prefix: prefix, rev: -1}, &ended)
	}
	for _, d := range ds {
		r.applyLocked(d, &ended)
	}
	r.finishLocked(prefix)
	r.mu.Unlock()
	r.end(ended)
	r.setLive(prefix, true)
	return nil
}

func missing[T any](m map[string]item[T], seen map[string]bool) []string {
	var out []string
	for k := range m {
		if !seen[k] {
			out = append(out, k)
		}
	}
	return out
}

// endSessions is a session ending decided under mu and carried out after.
type endSessions struct {
	node, class string // one of them
	reason      string
}

// applyLocked applies d unless the cache holds a newer revision. rev -1
// forces a deletion (load). A record whose content did not change keeps its
// cached pointer: sessions compare pointers to know that what they
// attested against still holds.
func (r *ReleaseService) applyLocked(d decoded, ended *[]endSessions) {
	switch d.prefix {
	case ekRootPrefix:
		v, _ := d.v.(*EKRoot)
		if _, _, ok := applyItem(r.roots, d.name, v, d.rev, func(a, b *EKRoot) bool { return a.Fingerprint == b.Fingerprint }); ok {
			r.pool = nil // rebuilt by finishLocked
		}
	case classPrefix:
		v, _ := d.v.(*NodeClass)
		if old, had, ok := applyItem(r.classes, d.name, v, d.rev, sameClass); ok && had && old != nil {
			*ended = append(*ended, endSessions{class: d.name, reason: "the reference values of class " + d.name + " changed"})
		}
	case nodePrefix:
		v, _ := d.v.(*Node)
		old, had, ok := applyItem(r.nodes, d.name, v, d.rev, sameNode)
		if ok && had && old != nil {
			reason := "node " + d.name + " changed"
			switch {
			case v == nil:
				reason = "node " + d.name + " was removed"
			case v.State == NodeRevoked:
				reason = "node " + d.name + " was revoked"
			}
			*ended = append(*ended, endSessions{node: d.name, reason: reason})
		}
		if ok {
			r.byEK = nil // rebuilt by finishLocked
		}
	case policyPrefix:
		v, _ := d.v.(*KeyringPolicy)
		tenant, name, _ := strings.Cut(d.name, "/")
		id := KeyringID{Tenant: tenant, Name: name}
		old, had := r.policies[id]
		if had && d.rev >= 0 && old.rev >= d.rev {
			return
		}
		if v == nil {
			delete(r.policies, id)
		} else {
			r.policies[id] = item[*KeyringPolicy]{v: v, rev: d.rev}
		}
	}
}

// applyItem sets (v non-nil) or deletes name at rev in m unless m holds a
// newer revision; an equal value keeps the cached pointer. It reports the
// old value and whether the value changed.
func applyItem[T comparable](m map[string]item[T], name string, v T, rev int64, same func(a, b T) bool) (old T, had, changed bool) {
	var zero T
	cur, had := m[name]
	if had && rev >= 0 && cur.rev >= rev {
		return cur.v, had, false
	}
	if v == zero {
		delete(m, name)
		return cur.v, had, had
	}
	if had && same(cur.v, v) {
		m[name] = item[T]{v: cur.v, rev: max(rev, cur.rev)}
		return cur.v, had, false
	}
	m[name] = item[T]{v: v, rev: rev}
	return cur.v, had, true
}

func sameNode(a, b *Node) bool {
	return a.Name == b.Name && a.Class == b.Class && a.State == b.State && a.EKFingerprint == b.EKFingerprint &&
		maps.Equal(a.Labels, b.Labels)
}

// finishLocked rebuilds the indexes that applyLocked invalidated.
func (r *ReleaseService) finishLocked(prefix string) {
	switch prefix {
	case ekRootPrefix:
		if r.pool == nil {
			r.pool = x509.NewCertPool()
			for _, it := range r.roots {
				r.pool.AddCert(it.v.Certificate)
			}
		}
	case nodePrefix:
		if r.byEK == nil {
			r.byEK = make(map[string][]string, len(r.nodes))
			for name, it := range r.nodes {
				r.byEK[it.v.EKFingerprint] = append(r.byEK[it.v.EKFingerprint], name)
			}
		}
	}
}

// record hands e to the auditor. For a denial the auditor's failure is
// logged and nil returned: the denial stands either way.
func (r *ReleaseService) record(ctx context.Context, e *AuditEvent) error {
	e.Time = r.now().UTC()
	err := r.audit.Record(ctx, e)
	if err != nil && !e.Allowed {
		r.log.ErrorContext(ctx, "kms: audit of a denial failed", "op", e.Op, "node", e.Node, "err", err)
		return nil
	}
	return err
}

// deny records a refusal and returns err.
func (r *ReleaseService) deny(ctx context.Context, e *AuditEvent, err error) error {
	e.Allowed, e.Reason = false, err.Error()
	_ = r.record(ctx, e) // #nosec G104 -- record logs its own failure on a denial
	return err
}
