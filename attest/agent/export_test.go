package agent

import (
	"bytes"
	"time"
)

// SetClock replaces the Client's clock, so that tests can put a session
// inside its renewal window without sleeping.
func SetClock(c *Client, now func() time.Time) { c.now = now }

// SessionKeyBytes returns a copy of K, nil once the key is wiped, so that
// tests can compare it with the server's.
func SessionKeyBytes(k *SessionKey) []byte {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return bytes.Clone(k.k)
}

// CurrentSessionKey returns the session key of the Client's current
// session, or nil.
func CurrentSessionKey(c *Client) *SessionKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess == nil {
		return nil
	}
	return c.sess.key
}
