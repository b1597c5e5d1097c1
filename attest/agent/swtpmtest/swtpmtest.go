// Package swtpmtest starts a real software TPM (swtpm, TPM 2.0) for tests,
// manufactured the way a hardware TPM is: swtpm_setup creates its EKs and
// writes EK certificates into NV, issued by a throwaway local CA
// (swtpm_localca) whose certificates the test can read. Tests that use it
// need the Debian packages swtpm and swtpm-tools; without them they fail,
// never skip, so that a missing tool cannot pass for a green run.
//
// swtpm has no resource manager: whatever transient handle a test leaves
// loaded stays loaded until the TPM restarts, which makes it the right
// place to test that code flushes what it creates.
package swtpmtest

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/coffre-kms/coffre/attest/agent"
)

// Options choose how the swtpm is made.
type Options struct {
	// ECC also provisions an ECC P-256 EK with a certificate in NV index
	// 0x01C0000A, issued by the same local CA. (swtpm_setup itself makes
	// an RSA-2048 EK certificate at 0x01C00002 and an ECC P-384 one at
	// 0x01C00016, not the P-256 one of the TCG default template.)
	ECC bool
	// Unix serves the TPM on Unix sockets instead of 127.0.0.1 TCP ports.
	Unix bool
}

// SWTPM is a running swtpm with its state, control channel and local CA.
type SWTPM struct {
	opts     Options
	dir      string // temporary directory: state, CA, configuration, logs
	stateDir string
	sockDir  string // Unix sockets (short path: sun_path has 108 bytes)
	addr     string // server: host:port or socket path
	ctrl     string // control channel: host:port or socket path
	caPEM    []byte
	pool     *x509.CertPool

	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// The Debian packages that carry the tools; named in every failure.
const packages = "swtpm swtpm-tools"

// Start provisions a fresh TPM in t.TempDir() and starts swtpm on it. It
// stops at t.Cleanup.
func Start(t testing.TB, opts Options) *SWTPM {
	t.Helper()
	tools := map[string]string{}
	for _, name := range []string{"swtpm", "swtpm_setup", "swtpm_localca"} {
		p, err := exec.LookPath(name)
		if err != nil {
			t.Fatalf("swtpmtest: %s is not installed: install the Debian packages %s", name, packages)
		}
		tools[name] = p
	}
	dir := t.TempDir()
	s := &SWTPM{opts: opts, dir: dir, stateDir: filepath.Join(dir, "state")}
	for _, d := range []string{s.stateDir, filepath.Join(dir, "ca"), filepath.Join(dir, "config")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatalf("swtpmtest: %v", err)
		}
	}
	if opts.Unix {
		sd, err := os.MkdirTemp("", "swtpm")
		if err != nil {
			t.Fatalf("swtpmtest: %v", err)
		}
		s.sockDir = sd
		t.Cleanup(func() { _ = os.RemoveAll(sd) })
	}
	s.manufacture(t, tools)
	t.Cleanup(s.Stop)
	s.start(t, tools["swtpm"])
	if opts.ECC {
		s.provisionECC(t, tools["swtpm_localca"])
	}
	return s
}

// manufacture writes the configuration that points swtpm_localca at a CA in
// the temporary directory (it creates the root and an intermediate there
// on first use) and swtpm_setup at swtpm_localca, runs swtpm_setup, and
// loads the CA certificates.
func (s *SWTPM) manufacture(t testing.TB, tools map[string]string) {
	t.Helper()
	ca := filepath.Join(s.dir, "ca")
	files := map[string]string{
		"swtpm-localca.conf": "statedir = " + ca + "\n" +
			"signingkey = " + filepath.Join(ca, "signkey.pem") + "\n" +
			"issuercert = " + filepath.Join(ca, "issuercert.pem") + "\n" +
			"certserial = " + filepath.Join(ca, "certserial") + "\n",
		"swtpm-localca.options": "--platform-manufacturer Coffre\n--platform-version 2.1\n--platform-model swtpmtest\n",
		"swtpm_setup.conf": "create_certs_tool = " + tools["swtpm_localca"] + "\n" +
			"create_certs_tool_config = " + s.configFile("swtpm-localca.conf") + "\n" +
			"create_certs_tool_options = " + s.configFile("swtpm-localca.options") + "\n" +
			"active_pcr_banks = sha256\n",
	}
	for name, content := range files {
		if err := os.WriteFile(s.configFile(name), []byte(content), 0o600); err != nil {
			t.Fatalf("swtpmtest: %v", err)
		}
	}
	log := filepath.Join(s.dir, "swtpm_setup.log")
	s.run(t, 2*time.Minute, tools["swtpm_setup"],
		"--tpm2", "--tpmstate", s.stateDir,
		"--create-ek-cert", "--create-platform-cert",
		"--pcr-banks", "sha256",
		"--config", s.configFile("swtpm_setup.conf"),
		"--logfile", log)

	issuer := readFile(t, filepath.Join(ca, "issuercert.pem"))
	root := readFile(t, filepath.Join(ca, "swtpm-localca-rootca-cert.pem"))
	s.caPEM = append(append([]byte{}, issuer...), root...)
	s.pool = x509.NewCertPool()
	for rest := s.caPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatalf("swtpmtest: local CA certificate: %v", err)
		}
		s.pool.AddCert(c)
	}
}

func (s *SWTPM) configFile(name string) string { return filepath.Join(s.dir, "config", name) }

// run runs a tool with a timeout and its configuration confined to the
// temporary directory, and fails the test with its output if it fails.
func (s *SWTPM) run(t testing.TB, timeout time.Duration, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...) // #nosec G204 -- test helper running the swtpm tools with arguments it built
	// XDG_CONFIG_HOME keeps per-user swtpm configuration out; explicit
	// --config/--configfile arguments already name ours.
	cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(s.dir, "config"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		extra := ""
		if b, rerr := os.ReadFile(filepath.Join(s.dir, "swtpm_setup.log")); rerr == nil {
			extra = "\n" + string(b)
		}
		t.Fatalf("swtpmtest: %s %v: %v\n%s%s", filepath.Base(name), args, err, out, extra)
	}
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p) // #nosec G304 -- a file this helper created in its temporary directory
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	return b
}

// freePort finds a free 127.0.0.1 TCP port. Another process can take it
// before swtpm binds it; start retries with fresh ports when that happens.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port
}

// start runs swtpm on the existing state and waits until its control
// channel answers.
func (s *SWTPM) start(t testing.TB, swtpm string) {
	t.Helper()
	const attempts = 5
	var lastErr error
	for i := range attempts {
		if s.opts.Unix {
			s.addr = filepath.Join(s.sockDir, "server.sock")
			s.ctrl = filepath.Join(s.sockDir, "ctrl.sock")
			_ = os.Remove(s.addr)
			_ = os.Remove(s.ctrl)
		} else if s.addr == "" || i > 0 {
			s.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
			s.ctrl = net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
		}
		if lastErr = s.spawn(swtpm); lastErr == nil {
			return
		}
	}
	t.Fatalf("swtpmtest: swtpm did not start: %v", lastErr)
}

func (s *SWTPM) spawn(swtpm string) error {
	var server, ctrl string
	if s.opts.Unix {
		server = "type=unixio,path=" + s.addr
		ctrl = "type=unixio,path=" + s.ctrl
	} else {
		_, sp, _ := net.SplitHostPort(s.addr)
		_, cp, _ := net.SplitHostPort(s.ctrl)
		server = "type=tcp,bindaddr=127.0.0.1,port=" + sp
		ctrl = "type=tcp,bindaddr=127.0.0.1,port=" + cp
	}
	logPath := filepath.Join(s.dir, "swtpm.log")
	cmd := exec.Command(swtpm, "socket", "--tpm2", // #nosec G204 -- test helper starting swtpm with arguments it built
		"--tpmstate", "dir="+s.stateDir,
		"--server", server,
		"--ctrl", ctrl,
		// startup-clear: swtpm sends TPM2_Startup itself, so a client
		// needs nothing but the server socket (like a booted machine).
		"--flags", "not-need-init,startup-clear",
		"--log", "file="+logPath)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-done:
			log, _ := os.ReadFile(logPath) // #nosec G304 -- our own log file
			return fmt.Errorf("swtpm exited: %s %s", out.String(), log)
		default:
		}
		if c, err := s.dialCtrl(); err == nil {
			_ = c.Close()
			s.cmd, s.done = cmd, done
			return nil
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-done
			return errors.New("swtpm did not open its control channel within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *SWTPM) dialCtrl() (net.Conn, error) {
	network := "tcp"
	if s.opts.Unix {
		network = "unix"
	}
	return net.DialTimeout(network, s.ctrl, time.Second)
}

// Stop shuts swtpm down through its control channel (CMD_SHUTDOWN, which
// saves its state) and waits for it to exit; it kills it if it does not
// within 10s. Stop is idempotent and runs at t.Cleanup.
func (s *SWTPM) Stop() {
	if s.cmd == nil {
		return
	}
	if c, err := s.dialCtrl(); err == nil {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte{0, 0, 0, 3}); err == nil { // CMD_SHUTDOWN
			var res [4]byte
			_, _ = c.Read(res[:])
		}
		_ = c.Close()
	}
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd, s.done = nil, nil
}

// Restart stops swtpm and starts it again on the same state, like a
// reboot: persistent objects and NV (the EK certificates) remain, PCRs
// and transient objects are reset. The address stays the same unless its
// port was taken meanwhile.
func (s *SWTPM) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	p, err := exec.LookPath("swtpm")
	if err != nil {
		t.Fatalf("swtpmtest: swtpm is not installed: install the Debian packages %s", packages)
	}
	s.start(t, p)
}

// Addr is the server socket: HOST:PORT for OpenTPM("swtpm://"+Addr()), or
// the socket path with Options.Unix.
func (s *SWTPM) Addr() string { return s.addr }

// Spec is the agent.OpenTPM location of this TPM.
func (s *SWTPM) Spec() string {
	if s.opts.Unix {
		return "unix://" + s.addr
	}
	return "swtpm://" + s.addr
}

// Dir is the temporary directory holding the TPM state, the local CA and
// the logs.
func (s *SWTPM) Dir() string { return s.dir }

// CACertPEM returns the local CA that issued the EK certificates: the
// issuing (intermediate) certificate followed by the root, PEM.
func (s *SWTPM) CACertPEM() []byte { return append([]byte{}, s.caPEM...) }

// CAPool returns the local CA's certificates (issuer and root) as a pool
// of trust anchors for EK certificate verification.
func (s *SWTPM) CAPool() *x509.CertPool { return s.pool.Clone() }

// Open connects to the TPM; the connection is closed at t.Cleanup. swtpm
// serves one connection at a time, so close one before opening the next.
func (s *SWTPM) Open(t testing.TB) transport.TPMCloser {
	t.Helper()
	tpm, err := agent.OpenTPM(s.Spec())
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	t.Cleanup(func() { _ = tpm.Close() })
	return tpm
}

// ECC EK certificate index and the identification swtpm_setup gives its
// own certificates.
const (
	eccEKCertIndex = tpm2.TPMHandle(0x01C0000A)
	nvChunk        = 512
)

// provisionECC creates the ECC P-256 EK (TCG template L-2), has the local
// CA certify it and writes the certificate into NV under platform
// authorization, with the attributes the TCG EK Credential Profile gives
// EK certificate indices.
func (s *SWTPM) provisionECC(t testing.TB, localca string) {
	t.Helper()
	tpm, err := agent.OpenTPM(s.Spec())
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	defer func() { _ = tpm.Close() }()
	ek, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(tpm2.ECCEKTemplate),
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("swtpmtest: creating the ECC EK: %v", err)
	}
	if _, err := (tpm2.FlushContext{FlushHandle: ek.ObjectHandle}).Execute(tpm); err != nil {
		t.Fatalf("swtpmtest: flushing the ECC EK: %v", err)
	}
	pub, err := ek.OutPublic.Contents()
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	pt, err := pub.Unique.ECC()
	if err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	out := filepath.Join(s.dir, "ecc")
	if err := os.MkdirAll(out, 0o700); err != nil {
		t.Fatalf("swtpmtest: %v", err)
	}
	s.run(t, time.Minute, localca,
		"--type", "ek",
		"--ek", "x="+hex.EncodeToString(pt.X.Buffer)+",y="+hex.EncodeToString(pt.Y.Buffer)+",id=secp256r1",
		"--dir", out,
		"--tpm-spec-family", "2.0", "--tpm-spec-level", "0", "--tpm-spec-revision", "164",
		"--tpm-manufacturer", "id:00001014", "--tpm-model", "swtpm", "--tpm-version", "id:20191023",
		"--tpm2",
		"--configfile", s.configFile("swtpm-localca.conf"),
		"--optsfile", s.configFile("swtpm-localca.options"))
	cert := readFile(t, filepath.Join(out, "ek.cert"))
	if err := writeNV(tpm, eccEKCertIndex, cert); err != nil {
		t.Fatalf("swtpmtest: writing the ECC EK certificate: %v", err)
	}
}

func writeNV(tpm transport.TPM, index tpm2.TPMHandle, data []byte) error {
	nvPub := tpm2.TPMSNVPublic{
		NVIndex: index,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			PPWrite:        true,
			PPRead:         true,
			OwnerRead:      true,
			AuthRead:       true,
			NoDA:           true,
			PlatformCreate: true,
			NT:             tpm2.TPMNTOrdinary,
		},
		DataSize: uint16(len(data)), // #nosec G115 -- an EK certificate is about 1 KiB
	}
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHPlatform,
		PublicInfo: tpm2.New2B(nvPub),
	}).Execute(tpm); err != nil {
		return fmt.Errorf("NV_DefineSpace: %w", err)
	}
	// Writing sets TPMA_NV_WRITTEN, so the name changes after the first
	// chunk: read it back each time.
	for off := 0; off < len(data); off += nvChunk {
		rp, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("NV_ReadPublic: %w", err)
		}
		end := min(off+nvChunk, len(data))
		if _, err := (tpm2.NVWrite{
			AuthHandle: tpm2.TPMRHPlatform,
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: rp.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data[off:end]},
			Offset:     uint16(off), // #nosec G115 -- bounded by DataSize above
		}).Execute(tpm); err != nil {
			return fmt.Errorf("NV_Write at %d: %w", off, err)
		}
	}
	return nil
}
