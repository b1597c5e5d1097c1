package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/audit"
	"github.com/coffre-kms/coffre/kms/server"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// Helpers of TestHA: a local PKI, and coffred nodes run as child processes
// (this test binary re-executed as coffred) that the test can SIGKILL and
// start again on the same directories and address.

// haPKI is one local CA with a server certificate (127.0.0.1) that every
// node uses and an admin client certificate.
type haPKI struct {
	ca, serverCert, serverKey, adminCert, adminKey string
	pool                                           *x509.CertPool
	admin                                          tls.Certificate
}

func newHAPKI(t *testing.T) *haPKI {
	t.Helper()
	dir := t.TempDir()
	p := &haPKI{
		ca:         filepath.Join(dir, "ca.pem"),
		serverCert: filepath.Join(dir, "server.pem"),
		serverKey:  filepath.Join(dir, "server-key.pem"),
		adminCert:  filepath.Join(dir, "admin.pem"),
		adminKey:   filepath.Join(dir, "admin-key.pem"),
	}
	now := time.Now()
	ca, _, err := ensureCA(p.ca, filepath.Join(dir, "ca-key.pem"), now)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ensureLeaf(leafSpec{certFile: p.serverCert, keyFile: p.serverKey, commonName: "coffred ha",
		usage: x509.ExtKeyUsageServerAuth, ips: []net.IP{net.IPv4(127, 0, 0, 1).To4()}}, now); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ensureLeaf(leafSpec{certFile: p.adminCert, keyFile: p.adminKey, commonName: "ha-admin",
		usage: x509.ExtKeyUsageClientAuth}, now); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(p.ca)
	if err != nil {
		t.Fatal(err)
	}
	p.pool = x509.NewCertPool()
	if !p.pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("the test CA file holds no certificate")
	}
	if p.admin, err = tls.LoadX509KeyPair(p.adminCert, p.adminKey); err != nil {
		t.Fatal(err)
	}
	return p
}

// conn dials addr over TLS 1.3, as the admin when admin is set, recording
// request ids for haWithRequestID. Reconnection
// backs off to at most half a second, so that a restarted node is reached
// again promptly (gRPC's default backoff grows to two minutes).
func (p *haPKI) conn(t *testing.T, addr string, admin bool) *grpc.ClientConn {
	t.Helper()
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: p.pool}
	if admin {
		tc.Certificates = []tls.Certificate{p.admin}
	}
	c, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithChainUnaryInterceptor(haRecordRequestID),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
			MinConnectTimeout: 2 * time.Second,
		}))
	if err != nil {
		t.Fatal(err)
	}
	haCloseAtEnd(t, "connection to "+addr, c)
	return c
}

// haCloseAtEnd closes c when the test ends, failing it if that fails.
func haCloseAtEnd(t *testing.T, what string, c interface{ Close() error }) {
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close %s: %v", what, err)
		}
	})
}

// haFreeAddr returns a 127.0.0.1 address whose port was free a moment ago:
// a node keeps it across restarts, so that its clients' connections
// reconnect to the new process. The port is below the kernel's ephemeral
// range where it can: a port from that range (what listening on port 0
// gives) may become the local port of any outgoing connection — this
// test's make many — between this check and the node's bind, or while a
// killed node is down, and the node then fails to start with "address
// already in use".
func haFreeAddr(t *testing.T) string {
	t.Helper()
	const lowest = 10000
	ephemeral := 32768 // Linux's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				ephemeral = n
			}
		}
	}
	for try := 0; ephemeral-lowest >= 1000 && try < 100; try++ {
		port := lowest + mathrand.IntN(ephemeral-lowest) // #nosec G404 -- a port number, not a secret
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue // in use
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		return l.Addr().String()
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return l.Addr().String()
}

// haNode is one coffred node: its own SoftHSM instance (a token holding the
// shared root key), audit directory, audit node id and signer, on the
// shared etcd cluster; run as a child process.
type haNode struct {
	name     string // the audit node id
	addr     string
	cfgPath  string
	auditDir string
	hsmConf  string // its SOFTHSM2_CONF
	verifier *audit.Verifier

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	logs    []*output // stderr of every process, for the failure report
	starts  int
}

// newHANode prepares a node's directory: a SoftHSM token "coffre" into
// which the shared root key value is imported as object "root" (so every
// node's root has the same ID, pkcs11:token=coffre;object=root, and unwraps
// the same KEKs), an audit signer, and the configuration file.
// mods, if any, edit the configuration before it is written.
func newHANode(t *testing.T, name string, pki *haPKI, endpoints []string, prefix string, rootKey []byte, mods ...func(cfg map[string]any)) *haNode {
	t.Helper()
	dir := t.TempDir()
	// hsmtest points this process's SOFTHSM2_CONF at the new instance; the
	// import finishes (and the module is finalised) before the next node's.
	s := hsmtest.NewSoftHSM(t)
	pin := s.NewToken(t, "coffre")
	uri := s.RootURI("coffre", "root", pin)
	root, err := pkcs11.ImportRoot(context.Background(), pkcs11.Config{URI: uri, Sessions: 1}, rootKey)
	if err != nil {
		t.Fatalf("node %s: import the root key into SoftHSM: %v", name, err)
	}
	if err := root.Close(); err != nil {
		t.Fatal(err)
	}

	signer, err := audit.GenerateSigner("coffre-ha-" + name)
	if err != nil {
		t.Fatal(err)
	}
	sk, err := signer.MarshalPrivate()
	if err != nil {
		t.Fatal(err)
	}
	signerFile := filepath.Join(dir, "audit-signer.key")
	if err := os.WriteFile(signerFile, sk, 0o600); err != nil {
		t.Fatal(err)
	}
	n := &haNode{
		name:     name,
		addr:     haFreeAddr(t),
		cfgPath:  filepath.Join(dir, "coffred.json"),
		auditDir: filepath.Join(dir, "audit"),
		hsmConf:  s.ConfPath,
		verifier: signer.Verifier(),
	}
	cfg := map[string]any{
		"listen": n.addr,
		"tls": map[string]any{
			"cert_file":            pki.serverCert,
			"key_file":             pki.serverKey,
			"admin_client_ca_file": pki.ca,
		},
		"hsm": map[string]any{"root_key": uri, "sessions": 2},
		"store": map[string]any{
			"engine":    "etcd",
			"endpoints": endpoints,
			"prefix":    prefix,
		},
		"limits": map[string]any{"shutdown_grace": "1s"},
		// The test's one TPM re-attests whenever a node restarts or its
		// watches break: do not let the per-EK rate limit be what fails.
		"attestation": map[string]any{"challenges_per_ek_per_minute": 6000},
		"audit": map[string]any{
			"dir":                 n.auditDir,
			"signer_key_file":     signerFile,
			"node_id":             name,
			"origin":              "coffre-ha/" + name,
			"checkpoint_interval": "200ms",
		},
		"log": map[string]any{"level": "info"},
	}
	for _, m := range mods {
		m(cfg)
	}
	if err := os.WriteFile(n.cfgPath, mustJSON(t, cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The exit status matters only where the test stops the node
		// itself; here it may be a killed node's or a failing test's.
		_ = n.stop()
		if t.Failed() {
			n.mu.Lock()
			defer n.mu.Unlock()
			for i, l := range n.logs {
				t.Logf("node %s, process %d, stderr without its successful calls (last 8000 bytes):\n%s", n.name, i+1, haTail(haQuiet(l.String()), 8000))
			}
		}
	})
	return n
}

// haQuiet drops the log lines of calls that succeeded, which are most of
// a node's log under load.
func haQuiet(log string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(log, "\n") {
		if strings.Contains(line, " msg=call ") && strings.Contains(line, " code=OK ") {
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}

func haTail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// start runs the node as a child process and waits for it to listen.
func (n *haNode) start(t *testing.T) {
	t.Helper()
	// #nosec G204 G702 -- this test binary, re-executed as coffred
	cmd := exec.Command(os.Args[0], "--config", n.cfgPath)
	// The child's own SoftHSM; os/exec keeps the last of duplicate keys.
	cmd.Env = append(os.Environ(), asMainEnv+"=1", "SOFTHSM2_CONF="+n.hsmConf)
	stdout, stderr := &output{}, &output{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	n.mu.Lock()
	n.cmd, n.exited = cmd, exited
	n.logs = append(n.logs, stderr)
	n.starts++
	n.mu.Unlock()
	go func() {
		err := cmd.Wait()
		n.mu.Lock()
		n.waitErr = err
		n.mu.Unlock()
		close(exited)
	}()
	m := stdout.waitFor(t, listeningRE, stderr, exited)
	if m[1] != n.addr {
		t.Fatalf("node %s listens on %s, configured %s", n.name, m[1], n.addr)
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (n *haNode) kill(t *testing.T) {
	t.Helper()
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.mu.Unlock()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("node %s still runs 10s after SIGKILL", n.name)
	}
}

// stop sends SIGTERM and waits for the exit; it returns the process's exit
// error (nil: status 0). It does nothing to a process already gone.
func (n *haNode) stop() error {
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-exited:
	default:
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("node %s ignored SIGTERM for 20s", n.name)
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.waitErr
}

// haRandomKey returns n random bytes.
func haRandomKey(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// haEnvelopeVersion reads the KEK version from an envelope of format v1
// (kms/ENVELOPE.md: "CFE", format 1, id length, id, 4-byte version, …).
func haEnvelopeVersion(env []byte) (keyring string, version uint32, err error) {
	if len(env) < 5 || string(env[:3]) != "CFE" || env[3] != 1 {
		return "", 0, fmt.Errorf("not an envelope of format v1")
	}
	idLen := int(env[4])
	if len(env) < 5+idLen+4 {
		return "", 0, fmt.Errorf("truncated envelope")
	}
	return string(env[5 : 5+idLen]), binary.BigEndian.Uint32(env[5+idLen:]), nil
}

// haWant is an acknowledged call whose own audit entry must be in its
// node's log.
type haWant struct {
	what    string // "release", "decryption", "rotation": for messages
	id      string // the coffre-request-id header it was answered with
	op      string // the entry's operation
	version uint32 // the entry's key version; 0: any
}

// haCheckAudited fails the test for each of wants that has no allow entry
// of its operation (and key version) under its request id among node's
// replicated entries raws. where says, in messages, when raws were read.
func haCheckAudited(t *testing.T, node, where string, raws [][]byte, wants []haWant) {
	t.Helper()
	byID := map[string][]*audit.Entry{}
	for i, raw := range raws {
		e, err := audit.ParseEntry(raw)
		if err != nil {
			t.Fatalf("node %s: replicated entry %d: %v", node, i, err)
		}
		if e.Node != node {
			t.Fatalf("node %s: replicated entry %d is of node %q", node, i, e.Node)
		}
		byID[e.RequestID] = append(byID[e.RequestID], e)
	}
	const shown = 10
	missing := 0
	for _, w := range wants {
		if w.id == "" {
			missing++
			if missing <= shown {
				t.Errorf("node %s answered a %s without a %s header", node, w.what, server.RequestIDMetadataKey)
			}
			continue
		}
		found := false
		for _, e := range byID[w.id] {
			if e.Operation == w.op && e.Decision == audit.Allow && (w.version == 0 || e.KeyVersion == w.version) {
				found = true
				break
			}
		}
		if !found {
			missing++
			if missing <= shown {
				t.Errorf("node %s acknowledged a %s (request %s, key version %d); its replicated log%s has no allow entry %s for it (entries under that id: %d)",
					node, w.what, w.id, w.version, where, w.op, len(byID[w.id]))
			}
		}
	}
	if missing > shown {
		t.Errorf("node %s: %d acknowledged calls of %d missing from its replicated log%s in all", node, missing, len(wants), where)
	}
}

// haIDKey is the context key under which haWithRequestID leaves where
// haRecordRequestID writes a call's request id.
type haIDKey struct{}

// haWithRequestID returns ctx and where the coffre-request-id header of
// the release or decryption made with it will be once it succeeds (the
// agent Client's attestation calls under the same ctx do not count).
func haWithRequestID(ctx context.Context) (context.Context, *string) {
	id := new(string)
	return context.WithValue(ctx, haIDKey{}, id), id
}

// haRecordRequestID is the unary client interceptor of haWithRequestID.
func haRecordRequestID(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	id, _ := ctx.Value(haIDKey{}).(*string)
	if id == nil || (method != coffrev1.KeyService_GenerateDataKey_FullMethodName && method != coffrev1.KeyService_Decrypt_FullMethodName) {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	var md metadata.MD
	err := invoker(ctx, method, req, reply, cc, append(opts, grpc.Header(&md))...)
	if err == nil {
		*id = haRequestID(md)
	}
	return err
}

// haRequestID returns the request id of response header md, or "" unless
// it has exactly one.
func haRequestID(md metadata.MD) string {
	if v := md.Get(server.RequestIDMetadataKey); len(v) == 1 {
		return v[0]
	}
	return ""
}

// haCodeCounts counts failed calls by their gRPC code, safely for concurrent
// use.
type haCodeCounts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *haCodeCounts) add(code string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[code]++
}

func (c *haCodeCounts) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	total := 0
	for k, v := range c.m {
		parts = append(parts, fmt.Sprintf("%s=%d", k, v))
		total += v
	}
	if total == 0 {
		return "none"
	}
	return fmt.Sprintf("%d (%s)", total, strings.Join(parts, " "))
}

func (c *haCodeCounts) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.m {
		n += v
	}
	return n
}
