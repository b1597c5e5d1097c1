package swtpmtest

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func TestStartProvisionsAndStops(t *testing.T) {
	s := Start(t, Options{})
	if _, _, err := net.SplitHostPort(s.Addr()); err != nil || !strings.HasPrefix(s.Spec(), "swtpm://127.0.0.1:") {
		t.Fatalf("Addr %q, Spec %q", s.Addr(), s.Spec())
	}
	// The CA is an issuer and a self-signed root above it.
	var certs []*x509.Certificate
	for rest := s.CACertPEM(); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	if len(certs) != 2 || certs[0].CheckSignatureFrom(certs[1]) != nil || certs[1].CheckSignatureFrom(certs[1]) != nil {
		t.Fatalf("CACertPEM is not issuer then root (%d certificates)", len(certs))
	}

	tpm := s.Open(t)
	// swtpm_setup wrote the RSA EK certificate and persisted the EK.
	if _, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(0x01C00002)}).Execute(tpm); err != nil {
		t.Errorf("RSA EK certificate index: %v", err)
	}
	if _, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(0x01C0000A)}).Execute(tpm); err == nil {
		t.Errorf("ECC P-256 EK certificate present without Options.ECC")
	}
	_ = tpm.Close()
	s.Stop()
	s.Stop() // idempotent
	if c, err := net.Dial("tcp", s.Addr()); err == nil {
		_ = c.Close()
		t.Errorf("swtpm still listening after Stop")
	}
}

func TestStartECC(t *testing.T) {
	s := Start(t, Options{ECC: true, Unix: true})
	tpm := s.Open(t)
	if _, err := (tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(0x01C0000A)}).Execute(tpm); err != nil {
		t.Errorf("ECC P-256 EK certificate index: %v", err)
	}
	if !strings.HasPrefix(s.Spec(), "unix:///") {
		t.Errorf("Spec %q", s.Spec())
	}
}

// fatalRecorder stands in for a testing.TB to observe Start's failure.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (r *fatalRecorder) Helper() {}

func (r *fatalRecorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// Without the tools the test fails, naming the packages to install; it
// never skips.
func TestStartFailsWithoutSWTPM(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	r := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Start(r, Options{})
	}()
	<-done
	if !strings.Contains(r.msg, "swtpm swtpm-tools") {
		t.Fatalf("Start without swtpm: %q, want a failure naming the Debian packages", r.msg)
	}
}
