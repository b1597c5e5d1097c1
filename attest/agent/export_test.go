package agent

import "time"

// SetClock replaces the Client's clock, so that tests can put a session
// inside its renewal window without sleeping.
func SetClock(c *Client, now func() time.Time) { c.now = now }
