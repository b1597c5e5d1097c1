// Package rsyslogtest runs a real rsyslogd for tests: listening on
// 127.0.0.1 with imtcp, plain or RFC 5425 TLS (gtls, mutual x509
// authentication with a throw-away CA made here), storing each received
// message's raw text, one per line, in a file.
//
// The receiver uses Direct queues, so whatever rsyslogd has processed is in
// the output file even when it is killed with SIGKILL.
//
// With Options.Dedupe the receiver is configured as docs/siem/README.md
// tells a SIEM operator to: the ruleset includes the shipped
// docs/siem/coffre-dedupe.rsyslog, and each start runs the shipped
// docs/siem/coffre-last-seq on the output file and passes its answer to
// rsyslogd as COFFRE_LAST_SEQ.
package rsyslogtest

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/kms/internal/testpki"
)

// Options selects the receiver's transport.
type Options struct {
	// TLS selects RFC 5425: gtls, mode 1, authmode x509/certvalid (the
	// client must present a certificate from the test CA).
	TLS bool
	// Dedupe stores each Coffre sequence number once (one sending node).
	Dedupe bool
}

// Rsyslog is a running rsyslogd.
type Rsyslog struct {
	opts    Options
	dir     string
	conf    string
	out     string
	port    int
	client  *tls.Config
	bin     string
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	runs    int
	logFile string
}

// Start starts rsyslogd and waits until it accepts connections. It stops
// it when the test ends. It fails the test (never skips) if rsyslogd is
// not installed.
func Start(t testing.TB, opts Options) *Rsyslog {
	t.Helper()
	bin, err := exec.LookPath("rsyslogd")
	if err != nil {
		for _, p := range []string{"/usr/sbin/rsyslogd", "/sbin/rsyslogd"} {
			if _, serr := os.Stat(p); serr == nil {
				bin, err = p, nil
				break
			}
		}
	}
	if err != nil {
		t.Fatalf("rsyslogtest: rsyslogd not found (install the Debian packages rsyslog and rsyslog-gnutls): %v", err)
	}
	if opts.TLS {
		if _, err := os.Stat("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so"); err != nil {
			if m, _ := filepath.Glob("/usr/lib/*/rsyslog/lmnsd_gtls.so"); len(m) == 0 {
				t.Fatalf("rsyslogtest: rsyslog gtls driver not found (install the Debian package rsyslog-gnutls)")
			}
		}
	}
	r := &Rsyslog{opts: opts, dir: t.TempDir(), bin: bin}
	r.out = filepath.Join(r.dir, "messages.log")
	r.logFile = filepath.Join(r.dir, "rsyslogd.stderr")
	r.port = freePort(t)
	if opts.TLS {
		r.client = writeCerts(t, r.dir)
	}
	r.conf = filepath.Join(r.dir, "rsyslog.conf")
	if err := os.WriteFile(r.conf, []byte(r.config()), 0o600); err != nil {
		t.Fatal(err)
	}
	r.start(t)
	t.Cleanup(r.Kill)
	return r
}

// Config returns the rsyslog configuration in use.
func (r *Rsyslog) Config() string { return r.config() }

func (r *Rsyslog) config() string {
	var b strings.Builder
	fmt.Fprintf(&b, "global(workDirectory=%q maxMessageSize=\"64k\"", r.dir)
	if r.opts.TLS {
		fmt.Fprintf(&b, "\n  defaultNetstreamDriver=\"gtls\"\n  defaultNetstreamDriverCAFile=%q\n  defaultNetstreamDriverCertFile=%q\n  defaultNetstreamDriverKeyFile=%q",
			filepath.Join(r.dir, "ca.pem"), filepath.Join(r.dir, "server.pem"), filepath.Join(r.dir, "server-key.pem"))
	}
	b.WriteString(")\n")
	b.WriteString("main_queue(queue.type=\"Direct\")\n")
	if r.opts.Dedupe {
		b.WriteString("module(load=\"mmpstrucdata\")\n")
	}
	if r.opts.TLS {
		b.WriteString("module(load=\"imtcp\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"x509/certvalid\")\n")
	} else {
		b.WriteString("module(load=\"imtcp\")\n")
	}
	b.WriteString("template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n")
	b.WriteString("ruleset(name=\"coffre\" queue.type=\"Direct\") {\n")
	if r.opts.Dedupe {
		fmt.Fprintf(&b, "  include(file=%q)\n", siemFile("coffre-dedupe.rsyslog"))
	}
	fmt.Fprintf(&b, "  action(type=\"omfile\" file=%q template=\"raw\" flushOnTXEnd=\"on\" asyncWriting=\"off\" fileCreateMode=\"0600\")\n}\n", r.out)
	fmt.Fprintf(&b, "input(type=\"imtcp\" address=\"127.0.0.1\" port=\"%d\" ruleset=\"coffre\")\n", r.port)
	return b.String()
}

func (r *Rsyslog) start(t testing.TB) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.runs++
	pid := filepath.Join(r.dir, "rsyslogd."+strconv.Itoa(r.runs)+".pid")
	// #nosec G204 -- the test's own rsyslogd and files.
	cmd := exec.Command(r.bin, "-n", "-f", r.conf, "-i", pid)
	if r.opts.Dedupe {
		// #nosec G204 -- the shipped script, on the test's own file.
		seed, err := exec.Command("sh", siemFile("coffre-last-seq"), r.out).Output()
		if err != nil {
			t.Fatalf("rsyslogtest: coffre-last-seq: %v", err)
		}
		cmd.Env = append(os.Environ(), "COFFRE_LAST_SEQ="+strings.TrimSpace(string(seed)))
	}
	logf, err := os.OpenFile(r.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		t.Fatalf("rsyslogtest: starting rsyslogd: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); _ = logf.Close(); close(done) }()
	r.cmd, r.done = cmd, done
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", r.Addr(), time.Second)
		if err == nil {
			_ = c.Close()
			return
		}
		select {
		case <-done:
			t.Fatalf("rsyslogtest: rsyslogd exited: %s\nconfig:\n%s", r.stderr(), r.config())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("rsyslogtest: rsyslogd not listening on %s: %v\n%s", r.Addr(), err, r.stderr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *Rsyslog) stderr() string {
	b, _ := os.ReadFile(r.logFile)
	return string(b)
}

// Addr is the receiver's host:port.
func (r *Rsyslog) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)) }

// ClientTLS returns a client configuration (certificate from the test CA,
// the CA as root) for a TLS receiver; nil for a plain one.
func (r *Rsyslog) ClientTLS() *tls.Config {
	if r.client == nil {
		return nil
	}
	return r.client.Clone()
}

// Output is the path of the file holding the received messages.
func (r *Rsyslog) Output() string { return r.out }

// Lines returns the messages stored so far, one per element.
func (r *Rsyslog) Lines() []string {
	b, err := os.ReadFile(r.out)
	if err != nil {
		return nil
	}
	// rsyslogd may be writing as we read: a last line without its newline
	// is not stored yet.
	i := bytes.LastIndexByte(b, '\n')
	if i < 0 {
		return nil
	}
	return strings.Split(string(b[:i]), "\n")
}

// Kill sends SIGKILL to rsyslogd and waits for it to exit.
func (r *Rsyslog) Kill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.cmd = nil
}

// Restart starts rsyslogd again (after Kill) on the same port, appending
// to the same output file.
func (r *Rsyslog) Restart(t testing.TB) {
	t.Helper()
	r.Kill()
	r.start(t)
}

// siemFile is the path of a file shipped in docs/siem.
func siemFile(name string) string {
	_, here, _, ok := runtime.Caller(0)
	if !ok {
		panic("rsyslogtest: no caller information")
	}
	return filepath.Join(filepath.Dir(here), "..", "..", "..", "..", "docs", "siem", name)
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port
}

// writeCerts makes a CA, a server certificate for 127.0.0.1 and a client
// certificate in dir (ca.pem, server.pem and server-key.pem are what
// rsyslogd reads) and returns the client configuration.
func writeCerts(t testing.TB, dir string) *tls.Config {
	t.Helper()
	p, err := testpki.New(dir, "rsyslogtest")
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{RootCAs: p.Pool, MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{p.Client}}
}
