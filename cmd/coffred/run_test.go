package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// asMainEnv makes the test binary behave as coffred, so that a test can
// run the real program as a child process and send it real signals.
const asMainEnv = "COFFRED_TEST_AS_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(asMainEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// output collects what coffred writes, for a test to wait on.
type output struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.Write(p)
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}

// waitFor waits until re matches the output and returns the submatches.
func (o *output) waitFor(t *testing.T, re *regexp.Regexp, stderr *output, exited <-chan struct{}) []string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(o.String()); m != nil {
			return m
		}
		select {
		case <-exited:
			t.Fatalf("coffred exited before printing %q\nstdout:\n%s\nstderr:\n%s", re, o, stderr)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("coffred did not print %q\nstdout:\n%s\nstderr:\n%s", re, o, stderr)
	return nil
}

var listeningRE = regexp.MustCompile(`listening on (\S+)`)

func requireSoftHSM(t *testing.T) {
	t.Helper()
	// Not a skip: a SoftHSM test that skips would let CI pass untested.
	if _, err := os.Stat(defaultSoftHSMModule); err != nil {
		t.Fatalf("SoftHSM2 is required (apt-get install softhsm2): %v", err)
	}
}

// readEnv parses DIR/env into its variables.
func readEnv(t *testing.T, path string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "export ")
		if !ok {
			continue
		}
		for _, f := range strings.Fields(line) {
			k, v, _ := strings.Cut(f, "=")
			vars[k] = strings.Trim(v, "'")
		}
	}
	return vars
}

// adminConn connects as the admin with the files DIR/env names.
func adminConn(t *testing.T, env map[string]string, withCert bool) *grpc.ClientConn {
	t.Helper()
	caPEM, err := os.ReadFile(env["COFFRE_CA"])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("COFFRE_CA holds no certificate")
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool}
	if withCert {
		cert, err := tls.LoadX509KeyPair(env["COFFRE_CERT"], env["COFFRE_KEY"])
		if err != nil {
			t.Fatal(err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(env["COFFRE_ADDR"], grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestDevEndToEnd runs "coffred dev" twice on one directory: first as a
// child process stopped by SIGTERM, then in process stopped by cancelling
// its context, and checks that the second run reuses what the first made.
func TestDevEndToEnd(t *testing.T) {
	requireSoftHSM(t)
	dir := filepath.Join(t.TempDir(), "dev")

	// First run: a real process, a real signal.
	cmd := exec.Command(os.Args[0], "dev", "--dir", dir, "--listen", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), asMainEnv+"=1")
	stdout, stderr := &output{}, &output{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
	})

	addr := stdout.waitFor(t, listeningRE, stderr, exited)[1]
	out := stdout.String()
	for _, want := range []string{"created SoftHSM token", "ran the root-key ceremony", "created a local CA", "try: . " + dir + "/env && "} {
		if !strings.Contains(out, want) {
			t.Errorf("first run's output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "keyring create acme/disks") {
		t.Errorf("no coffrectl command to try:\n%s", out)
	}
	env := readEnv(t, filepath.Join(dir, "env"))
	if env["COFFRE_ADDR"] != addr {
		t.Fatalf("env COFFRE_ADDR = %q, listening on %q", env["COFFRE_ADDR"], addr)
	}
	for _, k := range []string{"COFFRE_CA", "COFFRE_CERT", "COFFRE_KEY", "SOFTHSM2_CONF"} {
		if !filepath.IsAbs(env[k]) {
			t.Errorf("env %s = %q, want an absolute path", k, env[k])
		} else if _, err := os.Stat(env[k]); err != nil {
			t.Errorf("env %s: %v", k, err)
		}
	}
	for _, name := range []string{"pin", "so-pin", "ca-key.pem", "server-key.pem", "admin-key.pem"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %04o, want 0600", name, fi.Mode().Perm())
		}
	}

	conn := adminConn(t, env, true)
	admin := coffrev1.NewAdminServiceClient(conn)
	k, err := admin.CreateKeyring(callCtx(t), &coffrev1.CreateKeyringRequest{Id: "acme/disks"})
	if err != nil {
		t.Fatalf("CreateKeyring: %v\nstderr:\n%s", err, stderr)
	}
	if k.GetPrimaryVersion() != 1 {
		t.Fatalf("created %v", k)
	}
	// The limits of the configuration are in force.
	_, err = admin.CreateKeyring(callCtx(t), &coffrev1.CreateKeyringRequest{Id: "acme/" + strings.Repeat("a", 2<<20)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("oversized request: got %v, want ResourceExhausted", err)
	}
	_, err = admin.ListKeyrings(context.Background(), &coffrev1.ListKeyringsRequest{})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("call without deadline: got %v, want InvalidArgument", err)
	}
	// Health needs no client certificate; AdminService does.
	anon := adminConn(t, env, false)
	hr, err := healthpb.NewHealthClient(anon).Check(callCtx(t), &healthpb.HealthCheckRequest{Service: "coffre.v1.AdminService"})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v, %v", hr, err)
	}
	if _, err := coffrev1.NewAdminServiceClient(anon).ListKeyrings(callCtx(t), &coffrev1.ListKeyringsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("admin call without client certificate: got %v, want Unauthenticated", err)
	}
	// Headers are bounded too, before any certificate is asked for.
	big := metadata.AppendToOutgoingContext(callCtx(t), "coffre-session", strings.Repeat("a", 64<<10))
	if _, err := healthpb.NewHealthClient(anon).Check(big, &healthpb.HealthCheckRequest{}); err == nil {
		t.Fatal("a call with 64 KiB of headers was served")
	}
	if _, err := healthpb.NewHealthClient(anon).Check(callCtx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health after the refused headers: %v", err)
	}
	conn.Close()
	anon.Close()

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("coffred did not stop within 30s of SIGTERM\nstderr:\n%s", stderr)
	}
	if waitErr != nil {
		t.Fatalf("coffred exited with %v after SIGTERM; want status 0\nstderr:\n%s", waitErr, stderr)
	}
	for _, want := range []string{"shutting down", "stopped: KEK cache zeroized", "admin=", "CN=dev-admin"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, stderr)
		}
	}
	caBefore, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	serverBefore, err := os.ReadFile(filepath.Join(dir, "server.pem"))
	if err != nil {
		t.Fatal(err)
	}

	// Second run: in process, on the same directory.
	t.Setenv("SOFTHSM2_CONF", "") // restored after the test; run sets it
	os.Unsetenv("SOFTHSM2_CONF")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stdout2, stderr2 := &output{}, &output{}
	done := make(chan int, 1)
	exited2 := make(chan struct{})
	go func() {
		done <- run(ctx, []string{"dev", "--dir", dir, "--listen", "127.0.0.1:0"}, stdout2, stderr2)
		close(exited2)
	}()
	stdout2.waitFor(t, listeningRE, stderr2, exited2)
	out2 := stdout2.String()
	for _, unwanted := range []string{"created", "ceremony", "issued", "wrote"} {
		if strings.Contains(out2, unwanted) {
			t.Errorf("second run made something (%q) instead of reusing it:\n%s", unwanted, out2)
		}
	}
	if caAfter, _ := os.ReadFile(filepath.Join(dir, "ca.pem")); !bytes.Equal(caBefore, caAfter) {
		t.Error("second run replaced the CA")
	}
	if serverAfter, _ := os.ReadFile(filepath.Join(dir, "server.pem")); !bytes.Equal(serverBefore, serverAfter) {
		t.Error("second run replaced the server certificate")
	}
	env2 := readEnv(t, filepath.Join(dir, "env"))
	admin2 := coffrev1.NewAdminServiceClient(adminConn(t, env2, true))
	got, err := admin2.GetKeyring(callCtx(t), &coffrev1.GetKeyringRequest{Id: "acme/disks"})
	if err != nil {
		t.Fatalf("the keyring made by the first run: %v\nstderr:\n%s", err, stderr2)
	}
	if !got.GetVersions()[0].GetCreateTime().AsTime().Equal(k.GetVersions()[0].GetCreateTime().AsTime()) {
		t.Fatalf("keyring differs: %v vs %v", got, k)
	}
	// The KEK made under the first run's root still unwraps: rotate needs
	// the root, and the same root key.
	if _, err := admin2.RotateKeyring(callCtx(t), &coffrev1.RotateKeyringRequest{Id: "acme/disks"}); err != nil {
		t.Fatalf("rotate after restart: %v", err)
	}

	// A health watcher sees the server turn NOT_SERVING when it stops, and
	// its stream, which never ends by itself, holds the graceful stop only
	// until shutdown_grace (5s in the dev configuration) is over.
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	watch, err := healthpb.NewHealthClient(adminConn(t, env2, false)).Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v, %v; want SERVING", r, err)
	}

	stopAt := time.Now()
	cancel()
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("watch after stop: %v, %v; want NOT_SERVING", r, err)
	}
	select {
	case code := <-done:
		if code != exitOK {
			t.Fatalf("run returned %d after cancel\nstderr:\n%s", code, stderr2)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("run did not return within 30s of cancel\nstderr:\n%s", stderr2)
	}
	if took := time.Since(stopAt); took < 4*time.Second || took > 15*time.Second {
		t.Errorf("stop took %v; want about the 5s shutdown grace", took)
	}
	for _, want := range []string{"shutdown grace over", "stopped: KEK cache zeroized"} {
		if !strings.Contains(stderr2.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, stderr2)
		}
	}
}

func TestUsage(t *testing.T) {
	f := newTestFiles(t)
	cfgPath := filepath.Join(f.dir, "coffred.json")
	if err := os.WriteFile(cfgPath, mustJSON(t, f.valid()), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(f.dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"listen": "127.0.0.1:1", "limits": {"max_message_bytes": 1}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		args     []string
		code     int
		out, err string
	}{
		{"no arguments", nil, exitUsage, "", "--config is required"},
		{"help", []string{"--help"}, exitOK, "", "usage: coffred --config FILE"},
		{"unknown flag", []string{"--nope"}, exitUsage, "", "flag provided but not defined"},
		{"stray argument", []string{"--config", cfgPath, "serve"}, exitUsage, "", `unexpected argument "serve"`},
		{"missing file", []string{"--config", filepath.Join(f.dir, "none.json")}, exitError, "", "config: file"},
		{"bad file", []string{"--config", bad}, exitError, "", "config: limits.max_message_bytes: must be between 4096 and 67108864"},
		{"check", []string{"--config", cfgPath, "--check"}, exitOK, "is valid", ""},
		{"dev without dir", []string{"dev"}, exitUsage, "", "--dir is required"},
		{"dev help", []string{"dev", "--help"}, exitOK, "", "usage: coffred dev --dir DIR"},
		{"dev bad listen", []string{"dev", "--dir", f.dir, "--listen", "nowhere"}, exitUsage, "", "--listen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, &stdout, &stderr)
			}
			if !strings.Contains(stdout.String(), tc.out) {
				t.Errorf("stdout lacks %q:\n%s", tc.out, &stdout)
			}
			if !strings.Contains(stderr.String(), tc.err) {
				t.Errorf("stderr lacks %q:\n%s", tc.err, &stderr)
			}
		})
	}
}
