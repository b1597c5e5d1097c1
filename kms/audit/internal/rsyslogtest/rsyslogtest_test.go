package rsyslogtest

import (
	"crypto/tls"
	"fmt"
	"net"
	"testing"
	"time"
)

func send(t *testing.T, c net.Conn, msgs ...string) {
	t.Helper()
	for _, m := range msgs {
		if _, err := fmt.Fprintf(c, "%d %s", len(m), m); err != nil {
			t.Fatal(err)
		}
	}
}

func waitLines(t *testing.T, r *Rsyslog, n int) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		l := r.Lines()
		if len(l) >= n || time.Now().After(deadline) {
			return l
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestPlainAndRestart(t *testing.T) {
	r := Start(t, Options{})
	t.Logf("rsyslog.conf:\n%s", r.Config())
	c, err := net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	send(t, c, "<110>1 2026-01-01T00:00:00Z h app - id - one", "<110>1 2026-01-01T00:00:00Z h app - id - two")
	_ = c.Close()
	if l := waitLines(t, r, 2); len(l) != 2 || l[1] != "<110>1 2026-01-01T00:00:00Z h app - id - two" {
		t.Fatalf("lines = %q", l)
	}
	r.Kill()
	r.Restart(t)
	c, err = net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	send(t, c, "<110>1 2026-01-01T00:00:00Z h app - id - three")
	_ = c.Close()
	if l := waitLines(t, r, 3); len(l) != 3 {
		t.Fatalf("lines = %q", l)
	}
}

func TestTLS(t *testing.T) {
	r := Start(t, Options{TLS: true})
	t.Logf("rsyslog.conf:\n%s", r.Config())
	c, err := tls.Dial("tcp", r.Addr(), r.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	send(t, c, "<110>1 2026-01-01T00:00:00Z h app - id - tls")
	_ = c.Close()
	if l := waitLines(t, r, 1); len(l) != 1 || l[0] != "<110>1 2026-01-01T00:00:00Z h app - id - tls" {
		t.Fatalf("lines = %q", l)
	}
	// No client certificate: refused.
	cfg := r.ClientTLS()
	cfg.Certificates = nil
	c, err = tls.Dial("tcp", r.Addr(), cfg)
	if err == nil {
		send(t, c, "<110>1 2026-01-01T00:00:00Z h app - id - anon")
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, _ = c.Read(make([]byte, 1))
		_ = c.Close()
	}
	time.Sleep(200 * time.Millisecond)
	if l := r.Lines(); len(l) != 1 {
		t.Fatalf("anonymous client's message stored: %q", l)
	}
}
