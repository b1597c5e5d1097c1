package agent

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// SessionMetadataKey is the gRPC metadata key that carries the session
// token on KeyService calls.
const SessionMetadataKey = "coffre-session"

// Defaults of ClientOptions.
const (
	DefaultCallTimeout = 30 * time.Second
	// defaultReattestFraction: with no ReattestBefore, a session is
	// renewed when a fifth of its lifetime is left.
	defaultReattestFraction = 5
	maxChallengeID          = 256
	maxSessionToken         = 4096
)

// ClientOptions configure a Client. The zero value is usable.
type ClientOptions struct {
	// CallTimeout bounds each gRPC call (default 30s). TPM work between
	// calls is bounded by the caller's context only: a hardware quote
	// can take a second.
	CallTimeout time.Duration
	// ReattestBefore is how long before its expiry a session is renewed
	// (default a fifth of the session's lifetime). It is capped at half the
	// lifetime, so that a short session cannot make every call attest.
	ReattestBefore time.Duration
}

// Session is an attested session as the server issued it.
type Session struct {
	// Token is sent as metadata "coffre-session"; it is a bearer secret
	// for the session's life: do not log it.
	Token   string
	Node    string
	Class   string
	Labels  map[string]string
	Expires time.Time
}

// session is the Client's record of a Session and what it needs to use it.
type session struct {
	pub       Session
	refreshAt time.Time
	// pcrs are the PCRs of the challenge this session answered: a
	// TPM-bound data key's policy is over the node class's PCRs, which
	// the server asked this node to quote.
	pcrs []uint32
	// key is the session release key, which opens the session's
	// SessionSealed keys.
	key *SessionKey
	// users counts the calls using the session; retired is set once it
	// is replaced or the Client closed. The key is wiped when both say
	// it is done with: a call still in flight on a replaced session can
	// open what the server sealed for it. Guarded by Client.mu.
	users   int
	retired bool
}

// Client is the Coffre client that storage software embeds: it attests
// the node with its Agent, keeps the session fresh, and fetches data keys,
// which it opens locally. It is safe for concurrent use; concurrent calls
// that need a session share one attestation.
type Client struct {
	attest coffrev1.AttestServiceClient
	keys   coffrev1.KeyServiceClient
	agent  *Agent
	opts   ClientOptions
	now    func() time.Time

	attesting chan struct{} // one attestation at a time; a channel so waiting honours ctx
	mu        sync.Mutex    // guards sess, closed and the sessions' users and retired
	sess      *session
	closed    bool
}

// NewClient returns a Client that talks to the Coffre server over conn
// and attests with a (not nil). It does not attest until first needed (or
// Attest). The Client does not close conn or a.
func NewClient(conn grpc.ClientConnInterface, a *Agent, opts ClientOptions) *Client {
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = DefaultCallTimeout
	}
	return &Client{
		attest:    coffrev1.NewAttestServiceClient(conn),
		keys:      coffrev1.NewKeyServiceClient(conn),
		agent:     a,
		opts:      opts,
		now:       time.Now,
		attesting: make(chan struct{}, 1),
	}
}

// Session returns the current session, or nil before the first
// attestation. The result is a copy.
func (c *Client) Session() *Session {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess == nil {
		return nil
	}
	s := c.sess.pub
	s.Labels = maps.Clone(s.Labels)
	return &s
}

// Attest attests the node now and replaces the session: Challenge,
// credential activation, quote over the challenge's PCRs, Complete.
func (c *Client) Attest(ctx context.Context) (*Session, error) {
	if err := c.acquire(ctx); err != nil {
		return nil, err
	}
	defer c.release()
	s, err := c.attestLocked(ctx)
	if err != nil {
		return nil, err
	}
	c.put(s)
	return c.Session(), nil
}

// Close wipes the session release key (at once, or when the calls in
// flight on it have opened their keys) and makes every later call fail
// with ErrClosed. It closes neither the connection nor the Agent (whose
// own Close also wipes every session key derived from it); the server's
// session lives on until it expires.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.sess != nil {
		c.retireLocked(c.sess)
		c.sess = nil
	}
	return nil
}

func (c *Client) acquire(ctx context.Context) error {
	select {
	case c.attesting <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Client) release() { <-c.attesting }

// held returns the current session (nil if none) counted as in use, to
// be given back with put.
func (c *Client) held() (*session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if c.sess != nil {
		c.sess.users++
	}
	return c.sess, nil
}

// put gives back a session taken with held (or returned by ensure, renew
// or attestLocked), wiping its key if it was retired meanwhile.
func (c *Client) put(s *session) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s.users--
	if s.retired && s.users == 0 {
		s.key.Zero()
	}
}

// retireLocked marks s replaced; its key goes when its last user does.
func (c *Client) retireLocked(s *session) {
	s.retired = true
	if s.users == 0 {
		s.key.Zero()
	}
}

// ensure returns a session that is not due for renewal, counted as in
// use, attesting if there is none or the current one is within
// ReattestBefore of expiry.
func (c *Client) ensure(ctx context.Context) (*session, error) {
	s, err := c.held()
	if err != nil {
		return nil, err
	}
	if s != nil {
		if c.now().Before(s.refreshAt) {
			return s, nil
		}
		c.put(s)
	}
	return c.renew(ctx, s)
}

// renew replaces stale (the session found due, or refused by the server),
// unless another caller already replaced it while this one waited. The
// session it returns is counted as in use.
func (c *Client) renew(ctx context.Context, stale *session) (*session, error) {
	if err := c.acquire(ctx); err != nil {
		return nil, err
	}
	defer c.release()
	s, err := c.held()
	if err != nil {
		return nil, err
	}
	if s != nil {
		if s != stale && c.now().Before(s.refreshAt) {
			return s, nil
		}
		c.put(s)
	}
	return c.attestLocked(ctx)
}

// attestLocked runs one attestation and returns the new session counted
// as in use; the caller holds c.attesting. A failed attestation also
// drops the current session: the server ends a node's sessions when its
// re-attestation fails, and a client that kept using the old token would
// only learn that one call later.
func (c *Client) attestLocked(ctx context.Context) (*session, error) {
	s, err := c.attestOnce(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		if s != nil {
			s.key.Zero()
		}
		return nil, ErrClosed
	}
	if old := c.sess; old != nil {
		c.retireLocked(old)
	}
	if err != nil {
		c.sess = nil
		return nil, err
	}
	c.sess = s
	s.users++
	return s, nil
}

func (c *Client) attestOnce(ctx context.Context) (*session, error) {
	a := c.agent
	var ch *coffrev1.ChallengeResponse
	err := c.rpc(ctx, "", func(ctx context.Context) (err error) {
		ch, err = c.attest.Challenge(ctx, &coffrev1.ChallengeRequest{
			EkCertificate: a.EKCertificate(),
			EkPublic:      a.EKPublic(),
			AkPublic:      a.AKPublic(),
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: challenge: %w", err)
	}
	if id := ch.GetChallengeId(); id == "" || len(id) > maxChallengeID {
		return nil, fmt.Errorf("coffre: attest: %w: challenge_id of %d bytes", ErrMalformed, len(id))
	}
	pcrs, err := checkPCRs(ch.GetPcrSelection())
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: challenge pcr_selection: %w", err)
	}
	secret, err := a.Activate(ctx, ch.GetCredentialBlob(), ch.GetEncryptedSecret())
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: %w", err)
	}
	defer clear(secret)
	quote, sig, vals, err := a.Quote(ctx, ch.GetNonce(), pcrs)
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: %w", err)
	}
	eventLog, err := a.EventLog()
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: %w", err)
	}
	req := &coffrev1.CompleteRequest{
		ChallengeId:      ch.GetChallengeId(),
		ActivatedSecret:  secret,
		AkPublic:         a.AKPublic(),
		Quote:            quote,
		Signature:        sig,
		EventLog:         eventLog,
		BindingPublicKey: a.BindingPublicKey(),
	}
	for _, i := range pcrs {
		req.Pcrs = append(req.Pcrs, &coffrev1.PCRValue{Index: i, Sha256: vals[i]})
	}
	var done *coffrev1.CompleteResponse
	err = c.rpc(ctx, "", func(ctx context.Context) (err error) {
		done, err = c.attest.Complete(ctx, req)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: complete: %w", err)
	}
	s, err := c.newSession(done, pcrs)
	if err != nil {
		return nil, fmt.Errorf("coffre: attest: %w", err)
	}
	return s, nil
}

// newSession validates the server's CompleteResponse and derives the
// session release key from its session_enc.
func (c *Client) newSession(r *coffrev1.CompleteResponse, pcrs []uint32) (*session, error) {
	tok := r.GetSessionToken()
	if tok == "" || len(tok) > maxSessionToken {
		return nil, fmt.Errorf("%w: session token of %d bytes", ErrNoSession, len(tok))
	}
	ts := r.GetExpireTime()
	if ts == nil || ts.CheckValid() != nil {
		return nil, fmt.Errorf("%w: no valid expire_time", ErrNoSession)
	}
	now := c.now()
	expires := ts.AsTime()
	lifetime := expires.Sub(now)
	if lifetime <= 0 {
		return nil, fmt.Errorf("%w: the session expired at issue (%v)", ErrNoSession, expires)
	}
	before := lifetime / defaultReattestFraction
	if c.opts.ReattestBefore > 0 {
		before = min(c.opts.ReattestBefore, lifetime/2)
	}
	if len(r.GetSessionEnc()) == 0 {
		return nil, fmt.Errorf("%w: no session_enc", ErrNoSession)
	}
	key, err := c.agent.DeriveSessionKey(r.GetSessionEnc())
	if err != nil {
		return nil, err
	}
	return &session{
		pub: Session{
			Token:   tok,
			Node:    r.GetNode(),
			Class:   r.GetNodeClass(),
			Labels:  maps.Clone(r.GetLabels()),
			Expires: expires,
		},
		refreshAt: expires.Add(-before),
		pcrs:      pcrs,
		key:       key,
	}, nil
}

// rpc runs one gRPC call with the call timeout and, when token is not
// empty, the session token in the metadata.
func (c *Client) rpc(ctx context.Context, token string, call func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, c.opts.CallTimeout)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, SessionMetadataKey, token)
	}
	return call(ctx)
}

// keyCall runs a KeyService call with a fresh session. If the server says
// Unauthenticated (session expired, unknown, exhausted, or ended by a
// restart), it attests again and retries once; PermissionDenied (policy
// refusal, revoked node) is final and never retried. On success the
// session the answer came on is returned counted as in use: the caller
// opens the answer's key under it, then gives it back with put.
func keyCall[T any](ctx context.Context, c *Client, call func(context.Context) (T, error)) (T, *session, error) {
	var zero T
	s, err := c.ensure(ctx)
	if err != nil {
		return zero, nil, err
	}
	var out T
	run := func(s *session) error {
		return c.rpc(ctx, s.pub.Token, func(ctx context.Context) (err error) {
			out, err = call(ctx)
			return err
		})
	}
	err = run(s)
	if status.Code(err) == codes.Unauthenticated {
		c.put(s)
		if s, err = c.renew(ctx, s); err != nil {
			return zero, nil, err
		}
		err = run(s)
	}
	if err != nil {
		c.put(s)
		return zero, nil, err
	}
	return out, s, nil
}

// open opens a sealed data key released under session s.
func (c *Client) open(ctx context.Context, s *session, k *coffrev1.SealedKey, envelope []byte) ([]byte, error) {
	switch seal := k.GetSeal().(type) {
	case *coffrev1.SealedKey_Session:
		if s.key == nil {
			return nil, ErrOpen
		}
		return s.key.Open(seal.Session, envelope)
	case *coffrev1.SealedKey_Tpm:
		return c.agent.OpenTPM(ctx, seal.Tpm, s.pcrs)
	default:
		return nil, fmt.Errorf("%w: the response carries no sealed key", ErrMalformed)
	}
}

// GenerateDataKey asks for a fresh data key of keyring ("tenant/name")
// bound to the encryption context ec. It returns the plaintext key, opened
// locally, and the envelope to store next to the data. Discard the
// plaintext as soon as it has been used.
func (c *Client) GenerateDataKey(ctx context.Context, keyring string, ec map[string]string) (plaintext, envelope []byte, err error) {
	rsp, s, err := keyCall(ctx, c, func(ctx context.Context) (*coffrev1.GenerateDataKeyResponse, error) {
		return c.keys.GenerateDataKey(ctx, &coffrev1.GenerateDataKeyRequest{Keyring: keyring, Context: ec})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("coffre: GenerateDataKey %s: %w", keyring, err)
	}
	defer c.put(s)
	if len(rsp.GetEnvelope()) == 0 {
		return nil, nil, fmt.Errorf("coffre: GenerateDataKey %s: %w: empty envelope", keyring, ErrMalformed)
	}
	key, err := c.open(ctx, s, rsp.GetKey(), rsp.GetEnvelope())
	if err != nil {
		return nil, nil, fmt.Errorf("coffre: GenerateDataKey %s: %w", keyring, err)
	}
	return key, rsp.GetEnvelope(), nil
}

// Decrypt returns the data key of envelope, which must be presented with
// the encryption context it was made with.
func (c *Client) Decrypt(ctx context.Context, envelope []byte, ec map[string]string) ([]byte, error) {
	rsp, s, err := keyCall(ctx, c, func(ctx context.Context) (*coffrev1.DecryptResponse, error) {
		return c.keys.Decrypt(ctx, &coffrev1.DecryptRequest{Envelope: envelope, Context: ec})
	})
	if err != nil {
		return nil, fmt.Errorf("coffre: Decrypt: %w", err)
	}
	defer c.put(s)
	key, err := c.open(ctx, s, rsp.GetKey(), envelope)
	if err != nil {
		return nil, fmt.Errorf("coffre: Decrypt: %w", err)
	}
	return key, nil
}

// ReEncrypt moves envelope to the newest KEK version of destKeyring (""
// keeps its keyring) and context destEC (nil keeps ec), without the data
// key reaching this node.
func (c *Client) ReEncrypt(ctx context.Context, envelope []byte, ec map[string]string, destKeyring string, destEC map[string]string) ([]byte, error) {
	rsp, s, err := keyCall(ctx, c, func(ctx context.Context) (*coffrev1.ReEncryptResponse, error) {
		return c.keys.ReEncrypt(ctx, &coffrev1.ReEncryptRequest{
			Envelope:           envelope,
			Context:            ec,
			DestinationKeyring: destKeyring,
			DestinationContext: destEC,
		})
	})
	if err != nil {
		return nil, fmt.Errorf("coffre: ReEncrypt: %w", err)
	}
	c.put(s)
	if len(rsp.GetEnvelope()) == 0 {
		return nil, fmt.Errorf("coffre: ReEncrypt: %w: empty envelope", ErrMalformed)
	}
	return rsp.GetEnvelope(), nil
}
