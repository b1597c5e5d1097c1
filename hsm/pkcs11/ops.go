package pkcs11

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/coffre-kms/coffre/hsm"
)

// Wrap encrypts key under the root with AES-GCM inside the token,
// authenticating aad. The result is 0x01 ‖ IV ‖ ciphertext ‖ tag.
func (r *Root) Wrap(ctx context.Context, key, aad []byte) ([]byte, error) {
	if len(key) == 0 {
		return nil, errors.New("pkcs11: Wrap: empty key")
	}
	var out []byte
	err := r.do(ctx, func(s session, k objectHandle) error {
		// A fresh IV for each attempt: a retried call must not depend on
		// whether the failed attempt reached the token.
		iv := make([]byte, ivSize)
		if _, err := rand.Read(iv); err != nil {
			return err
		}
		ct, used, err := s.encryptGCM(k, iv, aad, key)
		if err != nil {
			return fmt.Errorf("pkcs11: C_Encrypt under %s: %w", r.id, err)
		}
		if len(used) != ivSize || len(ct) != len(key)+tagSize {
			return fmt.Errorf("pkcs11: C_Encrypt under %s: token returned %d bytes with a %d-byte IV for %d bytes of input",
				r.id, len(ct), len(used), len(key))
		}
		out = make([]byte, 0, 1+ivSize+len(ct))
		out = append(out, formatV1)
		out = append(out, used...)
		out = append(out, ct...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Unwrap decrypts the output of [Root.Wrap] inside the token. Any mismatch
// of wrapped or aad, whatever its cause, yields [hsm.ErrUnwrap] alone, so
// that failures tell an attacker nothing. The caller owns the result and
// zeroizes it.
func (r *Root) Unwrap(ctx context.Context, wrapped, aad []byte) ([]byte, error) {
	if len(wrapped) < 1+ivSize+tagSize || wrapped[0] != formatV1 {
		return nil, hsm.ErrUnwrap
	}
	iv, ct := wrapped[1:1+ivSize], wrapped[1+ivSize:]
	var pt []byte
	err := r.do(ctx, func(s session, k objectHandle) error {
		p, err := s.decryptGCM(k, iv, aad, ct)
		if err != nil {
			if isGone(err) {
				return err
			}
			return hsm.ErrUnwrap
		}
		pt = p
		return nil
	})
	if err != nil {
		return nil, err
	}
	return pt, nil
}

// Attributes reads the root key's attributes back from the token.
func (r *Root) Attributes(ctx context.Context) (hsm.Attributes, error) {
	var a hsm.Attributes
	err := r.do(ctx, func(s session, k objectHandle) error {
		var err error
		a, err = s.attributes(k)
		if err != nil {
			return fmt.Errorf("pkcs11: C_GetAttributeValue on %s: %w", r.id, err)
		}
		return nil
	})
	return a, err
}

// Close closes the root's sessions after the operations in flight, and
// finalises the library if no other Root uses it. It does not touch the key.
func (r *Root) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()

	// Same lock order as reconnect: wait for a reconnect, then for every
	// operation in flight.
	r.reconnecting <- struct{}{}
	for i := 0; i < r.size; i++ {
		r.slots <- struct{}{}
	}
	r.mu.Lock()
	c, idle := r.cur, r.idle
	r.cur, r.idle = nil, nil
	r.mu.Unlock()
	if c != nil && !c.gone {
		for _, s := range idle {
			s.close()
		}
		c.anchor.close()
	}
	r.mod.release()
	// Let waiters through: they find the root closed.
	for i := 0; i < r.size; i++ {
		<-r.slots
	}
	<-r.reconnecting
	return nil
}

// do runs fn with a pooled session and the key handle. If the HSM turns
// out to be gone it reconnects (subject to the retry interval) and runs fn
// once more; fn must therefore be safe to repeat.
func (r *Root) do(ctx context.Context, fn func(s session, key objectHandle) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		gone, err := r.attempt(ctx, fn)
		if !gone {
			return err
		}
		if attempt == 1 {
			return r.unavailableNow(err)
		}
		if err := r.reconnect(ctx); err != nil {
			return err
		}
	}
}

// attempt runs fn once; gone reports a failure that reconnecting may cure.
func (r *Root) attempt(ctx context.Context, fn func(s session, key objectHandle) error) (gone bool, err error) {
	select {
	case r.slots <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	defer func() { <-r.slots }()

	c, s, err := r.checkout()
	if err != nil {
		if c != nil && isGone(err) {
			r.invalidate(c, err)
		}
		return isGone(err) || errors.Is(err, errNoConn), err
	}
	err = fn(s, c.key)
	switch {
	case err == nil:
		r.checkin(c, s)
		return false, nil
	case isGone(err):
		r.invalidate(c, err)
		r.discard(c, s, err)
		return true, err
	default:
		// The operation may have left state in the session (PKCS#11 ends
		// most failed operations, not all); a fresh session is cheap.
		r.discard(c, s, err)
		return false, err
	}
}

// checkout returns the current connection and a session on it.
func (r *Root) checkout() (*conn, session, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, session{}, fmt.Errorf("%w: %s", ErrClosed, r.id)
	}
	c := r.cur
	if c == nil {
		r.mu.Unlock()
		return nil, session{}, errNoConn
	}
	if n := len(r.idle); n > 0 {
		s := r.idle[n-1]
		r.idle = r.idle[:n-1]
		r.mu.Unlock()
		return c, s, nil
	}
	r.mu.Unlock()
	// Sessions of one application on a token share its login, so a new
	// session is logged in already.
	s, err := r.mod.openSession(c.gen, c.slot, false)
	if err != nil {
		return c, session{}, fmt.Errorf("pkcs11: C_OpenSession: %w", err)
	}
	return c, s, nil
}

// checkin returns a healthy session to the pool, or closes it if its
// connection has been replaced meanwhile.
func (r *Root) checkin(c *conn, s session) {
	r.mu.Lock()
	if r.cur == c && !r.closed {
		r.idle = append(r.idle, s)
		r.mu.Unlock()
		return
	}
	gone := c.gone
	r.mu.Unlock()
	if !gone {
		s.close()
	}
}

// discard drops a session after a failure, closing it if it still exists.
func (r *Root) discard(c *conn, s session, err error) {
	r.mu.Lock()
	gone := c.gone
	r.mu.Unlock()
	if !gone && !sessionsGone(err) {
		s.close()
	}
}

// invalidate retires connection c after err showed the HSM gone. The
// caller that retires it closes its idle sessions and its anchor, unless
// the sessions are known to be gone already.
func (r *Root) invalidate(c *conn, err error) {
	r.mu.Lock()
	if sessionsGone(err) {
		c.gone = true
	}
	retire := r.cur == c
	var idle []session
	if retire {
		r.cur, idle, r.idle = nil, r.idle, nil
	}
	gone := c.gone
	r.mu.Unlock()
	if notInitialized(err) {
		r.mod.markUninitialized(c.gen)
	}
	if retire && !gone {
		for _, s := range idle {
			s.close()
		}
		c.anchor.close()
	}
}

// reconnect makes a new connection unless one was made meanwhile or the
// last attempt is more recent than the retry interval.
func (r *Root) reconnect(ctx context.Context) error {
	select {
	case r.reconnecting <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-r.reconnecting }()

	r.mu.Lock()
	switch {
	case r.closed:
		r.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrClosed, r.id)
	case r.fatal != nil:
		err := r.fatal
		r.mu.Unlock()
		return err
	case r.cur != nil:
		r.mu.Unlock()
		return nil // another caller reconnected while we waited
	case !r.lastTry.IsZero() && time.Since(r.lastTry) < r.retry:
		err := r.lastErr
		r.mu.Unlock()
		if err == nil {
			err = fmt.Errorf("%w: %s: connection lost again less than %v after reconnecting", hsm.ErrUnavailable, r.tokenDesc(), r.retry)
		}
		return err
	}
	r.mu.Unlock()

	// Exclude every operation: none may still use a handle of the broken
	// connection once new sessions, which can reuse the numbers, exist.
	held := 0
	defer func() {
		for ; held > 0; held-- {
			<-r.slots
		}
	}()
	for ; held < r.size; held++ {
		select {
		case r.slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
	}

	r.mu.Lock()
	r.lastTry = time.Now()
	r.mu.Unlock()
	c, err := r.connect(ctx, false)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil && errors.Is(err, ctxErr) {
			// Our caller gave up; that says nothing about the HSM.
			r.lastTry = time.Time{}
			return err
		}
		r.lastErr = err
		if pinRefused(err) {
			// Retrying the same PIN can only count towards locking the
			// token.
			r.fatal = err
		}
		return err
	}
	r.cur = c
	r.idle = r.idle[:0]
	r.lastErr = nil
	return nil
}

// unavailableNow turns the error of a failed attempt into what callers see:
// HSM-gone failures wrap hsm.ErrUnavailable, others pass through.
func (r *Root) unavailableNow(err error) error {
	if errors.Is(err, errNoConn) {
		r.mu.Lock()
		last := r.lastErr
		r.mu.Unlock()
		if last != nil {
			return last
		}
		return r.unavailable(err)
	}
	if isGone(err) {
		return r.unavailable(err)
	}
	return err
}
