// Package devtest starts a real coffred for the command tests: built from
// this module and run as `coffred dev` in a temporary directory (SoftHSM
// token, local CA, bbolt store) on a free loopback port — exactly what an
// operator gets from `make run`.
package devtest

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var listeningRE = regexp.MustCompile(`listening on (\S+)`)

// Server is a running `coffred dev`.
type Server struct {
	// Dir is the dev directory.
	Dir string
	// Env holds the variables of DIR/env: COFFRE_ADDR, COFFRE_CA,
	// COFFRE_CERT, COFFRE_KEY, SOFTHSM2_CONF.
	Env map[string]string

	stop func()
}

// Stop sends SIGTERM and waits for a clean exit (it also runs at cleanup).
func (s *Server) Stop() { s.stop() }

// Start builds coffred, runs `coffred dev --dir TMP --listen 127.0.0.1:0`
// plus extra arguments, waits for its `listening on` line and stops it with
// SIGTERM at cleanup, failing the test if it does not exit cleanly.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	return StartIn(t, filepath.Join(t.TempDir(), "dev"), extra...)
}

// StartIn is Start with the dev directory chosen by the caller (which may
// prepare parts of it first, such as a small file system for the audit log).
func StartIn(t testing.TB, dir string, extra ...string) *Server {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "coffred")
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build coffred for this test: %v", err)
	}
	// #nosec G204 -- the go tool building this module, in a test
	build := exec.Command(gobin, "build", "-o", bin, "github.com/coffre-kms/coffre/cmd/coffred")
	build.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build coffred: %v\n%s", err, out)
	}
	// #nosec G204 -- the coffred just built
	cmd := exec.Command(bin, append([]string{"dev", "--dir", dir, "--listen", "127.0.0.1:0"}, extra...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("coffred dev did not exit cleanly: %v", err)
				}
			case <-time.After(20 * time.Second):
				_ = cmd.Process.Kill()
				t.Error("coffred dev ignored SIGTERM for 20s")
			}
		})
	}
	t.Cleanup(stop)
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if m := listeningRE.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case listening <- m[1]:
				default:
				}
			}
		}
	}()
	select {
	case <-listening:
	case <-time.After(90 * time.Second):
		t.Fatal("coffred dev printed no 'listening on' line within 90s")
	}
	data, err := os.ReadFile(filepath.Join(dir, "env")) // #nosec G304 -- the test's own temp dir
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		for _, f := range strings.Fields(strings.TrimPrefix(line, "export ")) {
			if k, v, ok := strings.Cut(f, "="); ok {
				env[k] = strings.Trim(v, `'"`)
			}
		}
	}
	for _, k := range []string{"COFFRE_ADDR", "COFFRE_CA", "COFFRE_CERT", "COFFRE_KEY"} {
		if env[k] == "" {
			t.Fatalf("%s/env lacks %s:\n%s", dir, k, data)
		}
	}
	return &Server{Dir: dir, Env: env, stop: stop}
}
