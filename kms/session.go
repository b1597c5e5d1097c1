package kms

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"time"

	"github.com/coffre-kms/coffre/attest"
)

// Size limits of what a node sends to Challenge, far above real values.
const (
	maxAKPublicSize = 4 << 10
	// sessionTokenSize is the random part of a session token.
	sessionTokenSize = 32
	// rateWindowLen is the window of ReleaseConfig.ChallengesPerEK.
	rateWindowLen = time.Minute
	// maxRateWindows bounds the EK and address pairs counted at once.
	maxRateWindows = 1 << 16
)

// pendingChallenge is a challenge waiting for its evidence.
type pendingChallenge struct {
	ch      *attest.Challenge
	node    string
	expires time.Time
}

type rateWindow struct {
	start time.Time
	n     int
}

// session is an attested node's session. node and class are the cached
// pointers the attestation was checked against: the release path compares
// them with the cache, so any change to the node or its class (a
// revocation, new reference values) ends the session's use at once, even
// before the session itself is ended. rk is the session release key, set
// up once at Complete and wiped when the session ends or is evicted.
type session struct {
	key          [32]byte
	node         *Node
	class        *NodeClass
	ek           *attest.EK
	rk           *releaseKey
	pcrs         map[uint32][]byte // the class's reference values, for TPM-bound release
	evidenceHash [32]byte
	expires      time.Time
	el           *list.Element // in sessList
	ended        string        // why the session was ended, empty while live
}

// Session is an established attestation session, as handed to the node.
type Session struct {
	// Token is the session's bearer token (base64url, no padding): 32
	// random bytes. The server keeps only its SHA-256.
	Token         string
	Node          string
	Class         string
	Labels        map[string]string
	EKFingerprint string
	Expires       time.Time
	// Enc is the HPKE encapsulation of the session release key to the
	// node's binding key (CompleteResponse.session_enc); not secret.
	Enc []byte
}

// String keeps the token out of logs.
func (s *Session) String() string {
	return fmt.Sprintf("session{node %s, class %s, expires %s}", s.Node, s.Class, s.Expires.UTC().Format(time.RFC3339))
}

// refused is a refusal of the attestation protocol that this package,
// not attest.Verify, detects (a replayed challenge, say), in attest's form
// so that callers match it the same way.
func refused(check error, format string, args ...any) error {
	return fmt.Errorf("%w: %w", ErrPermissionDenied, &attest.Error{Check: check, Reason: fmt.Sprintf(format, args...)})
}

// Challenge starts an attestation. ekPublic is the EK's TPM2B_PUBLIC (always
// sent), ekCert its certificate (DER) when the TPM has one, akPublic the
// AK's TPM2B_PUBLIC. The EK must belong to an enrolled node; when the node
// was enrolled by certificate, a certificate for this EK (the one sent, or
// the one on record) must chain to the EK roots now. The challenge asks for
// the PCRs of the node's class, lives ReleaseConfig.ChallengeTTL, and can
// be completed once.
//
// The returned challenge is what goes to the node: its Secret is cleared
// (the server's copy keeps it).
func (r *ReleaseService) Challenge(ctx context.Context, ekCert, ekPublic, akPublic []byte) (*attest.Challenge, error) {
	au := &AuditEvent{Op: AuditChallenge}
	switch {
	case len(ekPublic) == 0:
		return nil, fmt.Errorf("%w: the EK public area is required", ErrInvalidArgument)
	case len(ekPublic) > maxEKPublicSize:
		return nil, fmt.Errorf("%w: EK public area of %d bytes", ErrInvalidArgument, len(ekPublic))
	case len(ekCert) > maxEKCertSize:
		return nil, fmt.Errorf("%w: EK certificate of %d bytes", ErrInvalidArgument, len(ekCert))
	case len(akPublic) == 0:
		return nil, fmt.Errorf("%w: the AK public area is required", ErrInvalidArgument)
	case len(akPublic) > maxAKPublicSize:
		return nil, fmt.Errorf("%w: AK public area of %d bytes", ErrInvalidArgument, len(akPublic))
	}
	ek, err := attest.ParseEKPublic(ekPublic)
	if err != nil {
		return nil, fmt.Errorf("%w: EK public area: %w", ErrInvalidArgument, err)
	}
	if ek.Public == nil {
		return nil, fmt.Errorf("%w: the EK public area must be a TPM2B_PUBLIC", ErrInvalidArgument)
	}
	fp := ek.Fingerprint
	au.EKFingerprint = fp
	now := r.now()

	r.mu.RLock()
	live := r.allLive
	names := r.byEK[fp]
	var node *Node
	var class *NodeClass
	if len(names) == 1 {
		node = r.nodes[names[0]].v
		if node != nil {
			class = r.classes[node.Class].v
		}
	}
	pool := r.pool
	r.mu.RUnlock()
	switch {
	case !live:
		return nil, errNotSynced
	case len(names) > 1:
		return nil, r.deny(ctx, au, fmt.Errorf("%w: EK %s is enrolled under several names (%v); the store is inconsistent", ErrPermissionDenied, fp, names))
	case node == nil:
		return nil, r.deny(ctx, au, fmt.Errorf("%w: EK %s is not enrolled", ErrPermissionDenied, fp))
	}
	au.Node, au.Class = node.Name, node.Class
	if node.State != NodeEnrolled {
		return nil, r.deny(ctx, au, fmt.Errorf("%w: node %s is %s", ErrPermissionDenied, node.Name, node.State))
	}
	if class == nil {
		return nil, r.deny(ctx, au, fmt.Errorf("%w: class %s of node %s does not exist", ErrFailedPrecondition, node.Class, node.Name))
	}
	if !r.allowChallenge(fp, CallerAddress(ctx), now) {
		return nil, r.deny(ctx, au, fmt.Errorf("%w: EK %s asked for more than %d challenges in a minute from %s", ErrResourceExhausted, fp, r.cfg.ChallengesPerEK, orUnknown(CallerAddress(ctx))))
	}
	if len(node.EKCertificate) > 0 {
		der := ekCert
		if len(der) == 0 {
			der = node.EKCertificate
		}
		certEK, err := attest.VerifyEKCertificate(der, pool, nil, now)
		if err != nil {
			return nil, r.deny(ctx, au, fmt.Errorf("%w: %w", ErrPermissionDenied, err))
		}
		// The certificate's key must be the EK sent: WithTPMPublic
		// refuses another (ErrEK).
		if ek, err = certEK.WithTPMPublic(ekPublic); err != nil {
			return nil, r.deny(ctx, au, fmt.Errorf("%w: %w", ErrPermissionDenied, err))
		}
	}
	ch, err := attest.NewChallenge(r.rand, ek, akPublic, class.PCRIndices(), r.cfg.ChallengeTTL, now)
	if err != nil {
		var ae *attest.Error
		if errors.As(err, &ae) {
			return nil, r.deny(ctx, au, fmt.Errorf("%w: %w", ErrPermissionDenied, err))
		}
		return nil, fmt.Errorf("kms: make challenge: %w", err)
	}
	if err := r.putChallenge(&pendingChallenge{ch: ch, node: node.Name, expires: ch.Expires}, now); err != nil {
		return nil, r.deny(ctx, au, err)
	}
	au.Allowed = true
	if err := r.record(ctx, au); err != nil {
		r.takeChallenge(ch.ID, now)
		return nil, fmt.Errorf("%w: audit: %w", ErrUnavailable, err)
	}
	out := *ch
	out.Secret = nil
	return &out, nil
}

// heldTheTPM reports whether a refused attestation came from whoever
// holds the node's TPM: attest.Verify checks the activated secret, which
// only the TPM holding the EK can produce, after the challenge's expiry and
// the EK's validity, and before everything else. Anyone who knows an
// enrolled EK's public key can ask for a challenge and send garbage; such a
// refusal must not end the real node's sessions.
func heldTheTPM(err error) bool {
	return !errors.Is(err, attest.ErrNonce) && !errors.Is(err, attest.ErrEK) && !errors.Is(err, attest.ErrSecret)
}

func orUnknown(addr string) string {
	if addr == "" {
		return "an unknown address"
	}
	return addr
}

// errNotSynced refuses to decide on release state that may be stale.
var errNotSynced = fmt.Errorf("%w: release state is not in sync with the store", ErrUnavailable)

// allowChallenge counts one challenge for EK fp asked from address addr
// in a fixed one-minute window. The address is part of the key because a
// challenge is asked before any proof that the caller holds the TPM: a
// caller elsewhere that knows the EK's public key must not use up the
// node's own budget. Only enrolled EKs get here; stale windows are dropped
// as the map grows.
func (r *ReleaseService) allowChallenge(fp, addr string, now time.Time) bool {
	r.chMu.Lock()
	defer r.chMu.Unlock()
	fp = fp + " " + addr
	w := r.rate[fp]
	if w == nil || now.Sub(w.start) >= rateWindowLen || now.Before(w.start) {
		// Stale windows go as the map grows, in one sweep a second at
		// most: a flood of new pairs must not cost a sweep each.
		if w == nil && len(r.rate) >= 1024 && (now.Sub(r.rateSwept) >= time.Second || now.Before(r.rateSwept)) {
			r.rateSwept = now
			for k, v := range r.rate {
				if now.Sub(v.start) >= rateWindowLen {
					delete(r.rate, k)
				}
			}
		}
		if w == nil && len(r.rate) >= maxRateWindows {
			return false // that many EK and address pairs in one minute: a flood
		}
		w = &rateWindow{start: now}
		r.rate[fp] = w
	}
	w.n++
	return w.n <= r.cfg.ChallengesPerEK
}

func (r *ReleaseService) putChallenge(p *pendingChallenge, now time.Time) error {
	r.chMu.Lock()
	defer r.chMu.Unlock()
	for el := r.chOrder.Front(); el != nil; el = r.chOrder.Front() {
		q := el.Value.(*pendingChallenge)
		if now.Before(q.expires) {
			break
		}
		r.chOrder.Remove(el)
		delete(r.challenges, q.ch.ID)
	}
	if len(r.challenges) >= r.cfg.MaxChallenges {
		return fmt.Errorf("%w: %d challenges are outstanding, the most this server holds; retry shortly", ErrUnavailable, len(r.challenges))
	}
	if _, dup := r.challenges[p.ch.ID]; dup {
		return fmt.Errorf("kms: challenge id %s issued twice", p.ch.ID)
	}
	r.challenges[p.ch.ID] = r.chOrder.PushBack(p)
	return nil
}

// takeChallenge removes and returns challenge id if it is outstanding and
// unexpired: a challenge is used once, whatever the outcome.
func (r *ReleaseService) takeChallenge(id string, now time.Time) *pendingChallenge {
	r.chMu.Lock()
	defer r.chMu.Unlock()
	el, ok := r.challenges[id]
	if !ok {
		return nil
	}
	r.chOrder.Remove(el)
	delete(r.challenges, id)
	p := el.Value.(*pendingChallenge)
	if !now.Before(p.expires) {
		return nil
	}
	return p
}

// Complete verifies the evidence for challenge id against the class of the
// challenged node and issues a session. The challenge is consumed whatever
// the outcome: a replay is refused with attest.ErrNonce. A failed
// attestation by whoever holds the node's TPM (past the activated-secret
// check) ends that node's sessions at once.
func (r *ReleaseService) Complete(ctx context.Context, id string, ev *attest.Evidence) (*Session, error) {
	au := &AuditEvent{Op: AuditComplete}
	if ev == nil {
		return nil, fmt.Errorf("%w: evidence is missing", ErrInvalidArgument)
	}
	now := r.now()
	p := r.takeChallenge(id, now)
	if p == nil {
		return nil, r.deny(ctx, au, refused(attest.ErrNonce, "challenge %.64q is unknown, expired or already used; ask for a new one", id))
	}
	au.Node, au.EKFingerprint = p.node, p.ch.EK.Fingerprint

	r.mu.RLock()
	live := r.allLive
	node := r.nodes[p.node].v
	var class *NodeClass
	if node != nil {
		class = r.classes[node.Class].v
	}
	r.mu.RUnlock()
	switch {
	case !live:
		return nil, errNotSynced
	case node == nil || node.EKFingerprint != p.ch.EK.Fingerprint:
		return nil, r.deny(ctx, au, fmt.Errorf("%w: node %s is no longer enrolled", ErrPermissionDenied, p.node))
	case node.State != NodeEnrolled:
		return nil, r.deny(ctx, au, fmt.Errorf("%w: node %s is %s", ErrPermissionDenied, node.Name, node.State))
	case class == nil:
		return nil, r.deny(ctx, au, fmt.Errorf("%w: class %s of node %s does not exist", ErrFailedPrecondition, node.Class, node.Name))
	}
	au.Class = class.Name

	v, err := attest.Verify(p.ch, ev, attest.Policy{PCRs: class.PCRs, RequireEventLog: class.RequireEventLog, Now: now})
	var refusal *attest.Error
	switch {
	case errors.As(err, &refusal):
		if heldTheTPM(err) {
			r.endNodeSessions(node.Name, fmt.Sprintf("an attestation of node %s failed", node.Name))
		}
		return nil, r.deny(ctx, au, fmt.Errorf("%w: %w", ErrPermissionDenied, err))
	case err != nil:
		// Not a refusal of the evidence: a bug on this side. The node's
		// sessions stand.
		return nil, fmt.Errorf("kms: verify: %w", err)
	case !v.Valid():
		return nil, errors.New("kms: attest.Verify returned unverified state")
	}
	au.EvidenceHash = v.EvidenceHash
	binding, err := sessionSuiteKEM.UnmarshalBinaryPublicKey(v.BindingKey)
	if err != nil {
		return nil, r.deny(ctx, au, refused(attest.ErrBindingKey, "not an X-Wing public key: %v", err))
	}
	// The session's one public-key operation: every release on it is an
	// AES-GCM seal under K.
	enc, rk, err := newReleaseKey(r.rand, binding)
	if err != nil {
		return nil, err
	}

	raw := make([]byte, sessionTokenSize)
	if _, err := io.ReadFull(r.rand, raw); err != nil {
		rk.zero()
		return nil, fmt.Errorf("kms: session token: %w", err)
	}
	s := &session{
		key:          sha256.Sum256(raw),
		node:         node,
		class:        class,
		ek:           v.EK,
		rk:           rk,
		pcrs:         class.PCRs,
		evidenceHash: v.EvidenceHash,
		expires:      now.Add(r.cfg.SessionTTL),
	}
	if s.ek == nil || s.ek.Public == nil {
		s.ek = p.ch.EK
	}
	if err := r.putSession(s, now); err != nil {
		rk.zero()
		return nil, r.deny(ctx, au, err)
	}
	au.Allowed = true
	if err := r.record(ctx, au); err != nil {
		r.dropSession(s)
		return nil, fmt.Errorf("%w: audit: %w", ErrUnavailable, err)
	}
	return &Session{
		Token:         base64.RawURLEncoding.EncodeToString(raw),
		Node:          node.Name,
		Class:         class.Name,
		Labels:        maps.Clone(node.Labels),
		EKFingerprint: node.EKFingerprint,
		Expires:       s.expires,
		Enc:           enc,
	}, nil
}

// putSession inserts s, unless the node or class it attested against
// changed meanwhile (checked under sessMu, which a session ending also
// takes, so no session outlives a revocation that raced with it).
func (r *ReleaseService) putSession(s *session, now time.Time) error {
	r.sessMu.Lock()
	defer r.sessMu.Unlock()
	r.mu.RLock()
	same := r.allLive && r.nodes[s.node.Name].v == s.node && r.classes[s.class.Name].v == s.class
	r.mu.RUnlock()
	if !same {
		return fmt.Errorf("%w: node %s or its class changed during attestation; attest again", ErrPermissionDenied, s.node.Name)
	}
	r.pruneSessionsLocked(now)
	if len(r.sessions) >= r.cfg.MaxSessions {
		return fmt.Errorf("%w: %d sessions are open, the most this server holds", ErrUnavailable, len(r.sessions))
	}
	name := s.node.Name
	if live := r.byNode[name]; len(live) >= r.cfg.MaxSessionsPerNode {
		r.endLocked(live[0], fmt.Sprintf("node %s opened more than %d sessions; the oldest ended", name, r.cfg.MaxSessionsPerNode))
	}
	r.sessions[s.key] = s
	s.el = r.sessList.PushBack(s)
	r.byNode[name] = append(r.byNode[name], s)
	return nil
}

func (r *ReleaseService) dropSession(s *session) {
	r.sessMu.Lock()
	defer r.sessMu.Unlock()
	r.removeLocked(s)
}

// removeLocked forgets s entirely.
func (r *ReleaseService) removeLocked(s *session) {
	if r.sessions[s.key] != s {
		return
	}
	r.endLocked(s, "removed")
	delete(r.sessions, s.key)
	r.sessList.Remove(s.el)
}

// endLocked ends s but keeps it until it expires, so that its holder
// learns why (PermissionDenied with the reason) rather than being told the
// session is unknown. Its release key is wiped now: an ended session
// releases nothing more. (A release that read the session before it ended
// may still finish with its own reference to the AEAD.)
func (r *ReleaseService) endLocked(s *session, reason string) {
	if s.ended != "" {
		return
	}
	s.ended = reason
	if s.rk != nil {
		s.rk.zero()
	}
	s.rk, s.ek = nil, nil
	name := s.node.Name
	live := r.byNode[name]
	for i, t := range live {
		if t == s {
			live = append(live[:i:i], live[i+1:]...)
			break
		}
	}
	if len(live) == 0 {
		delete(r.byNode, name)
	} else {
		r.byNode[name] = live
	}
}

func (r *ReleaseService) pruneSessionsLocked(now time.Time) {
	for el := r.sessList.Front(); el != nil; el = r.sessList.Front() {
		s := el.Value.(*session)
		if now.Before(s.expires) {
			return
		}
		r.removeLocked(s)
	}
}

// endNodeSessions ends every session of node name at once.
func (r *ReleaseService) endNodeSessions(name, reason string) {
	r.sessMu.Lock()
	defer r.sessMu.Unlock()
	for _, s := range append([]*session(nil), r.byNode[name]...) {
		r.endLocked(s, reason)
	}
}

// end carries out session endings decided while the cache was updated.
func (r *ReleaseService) end(ended []endSessions) {
	if len(ended) == 0 {
		return
	}
	r.sessMu.Lock()
	defer r.sessMu.Unlock()
	for _, e := range ended {
		if e.node != "" {
			for _, s := range append([]*session(nil), r.byNode[e.node]...) {
				r.endLocked(s, e.reason)
			}
			continue
		}
		for el := r.sessList.Front(); el != nil; el = el.Next() {
			if s := el.Value.(*session); s.class.Name == e.class {
				r.endLocked(s, e.reason)
			}
		}
	}
}

// sessionView is what the release path needs of a session, copied under
// the lock.
type sessionView struct {
	node         *Node
	class        *NodeClass
	ek           *attest.EK
	rk           *releaseKey
	pcrs         map[uint32][]byte
	evidenceHash [32]byte
}

// lookup finds the live session of token.
func (r *ReleaseService) lookup(token string, now time.Time) (sessionView, error) {
	var raw [sessionTokenSize]byte
	if base64.RawURLEncoding.DecodedLen(len(token)) != sessionTokenSize {
		return sessionView{}, fmt.Errorf("%w: malformed session token; attest first", ErrUnauthenticated)
	}
	if n, err := base64.RawURLEncoding.Decode(raw[:], []byte(token)); err != nil || n != sessionTokenSize {
		return sessionView{}, fmt.Errorf("%w: malformed session token; attest first", ErrUnauthenticated)
	}
	key := sha256.Sum256(raw[:])
	r.sessMu.RLock()
	s := r.sessions[key]
	var v sessionView
	var ended string
	var expires time.Time
	if s != nil {
		v = sessionView{node: s.node, class: s.class, ek: s.ek, rk: s.rk, pcrs: s.pcrs, evidenceHash: s.evidenceHash}
		ended, expires = s.ended, s.expires
	}
	r.sessMu.RUnlock()
	switch {
	case s == nil:
		return sessionView{}, fmt.Errorf("%w: unknown session; attest first", ErrUnauthenticated)
	case !now.Before(expires):
		return sessionView{}, fmt.Errorf("%w: session expired at %s; attest again", ErrUnauthenticated, expires.UTC().Format(time.RFC3339))
	case ended != "":
		return sessionView{}, fmt.Errorf("%w: session ended: %s", ErrPermissionDenied, ended)
	}
	return v, nil
}

// sessionCount reports the live and ended sessions held (for tests).
func (r *ReleaseService) sessionCount() int {
	r.sessMu.RLock()
	defer r.sessMu.RUnlock()
	return len(r.sessions)
}
