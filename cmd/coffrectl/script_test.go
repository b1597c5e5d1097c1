package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"coffrectl": func() {
			os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
		},
	})
}

// TestScripts runs the golden CLI files in testdata/ against a real coffred
// started the way `make run` starts it (`coffred dev`: SoftHSM token, local
// CA, bbolt), with the variables of its env file — exactly what an operator
// has after `. var/dev/env`.
func TestScripts(t *testing.T) {
	env := startDevServer(t)

	// A second, empty token for the ceremony script, in its own SoftHSM.
	hs := hsmtest.NewSoftHSM(t)
	pin := hs.NewToken(t, "ceremony")
	root2 := hs.RootURI("ceremony", "root", pin)

	testscript.Run(t, testscript.Params{
		Dir: "testdata",
		Setup: func(e *testscript.Env) error {
			for k, v := range env {
				e.Setenv(k, v)
			}
			e.Setenv("ADDR", env["COFFRE_ADDR"])
			e.Setenv("ROOT2", root2)
			e.Setenv("CEREMONY_SOFTHSM2_CONF", hs.ConfPath)
			return nil
		},
	})
}

var listeningRE = regexp.MustCompile(`listening on (\S+)`)

// startDevServer builds coffred, runs `coffred dev` in a temporary directory
// on a free port and returns the variables of the env file it writes.
func startDevServer(t *testing.T) map[string]string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "coffred")
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build coffred for this test: %v", err)
	}
	build := exec.Command(gobin, "build", "-o", bin, "../coffred")
	build.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build coffred: %v\n%s", err, out)
	}
	dir := filepath.Join(t.TempDir(), "dev")
	cmd := exec.Command(bin, "dev", "--dir", dir, "--listen", "127.0.0.1:0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("coffred dev did not exit cleanly: %v", err)
			}
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			t.Error("coffred dev ignored SIGTERM for 20s")
		}
	})
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
	case <-time.After(60 * time.Second):
		t.Fatal("coffred dev printed no 'listening on' line within 60s")
	}
	data, err := os.ReadFile(filepath.Join(dir, "env"))
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		for _, f := range strings.Fields(strings.TrimPrefix(line, "export ")) {
			if k, v, ok := strings.Cut(f, "="); ok {
				env[k] = strings.Trim(v, `'"`)
			}
		}
	}
	for _, k := range []string{"COFFRE_ADDR", "COFFRE_CA", "COFFRE_CERT", "COFFRE_KEY"} {
		if env[k] == "" {
			t.Fatalf("env file lacks %s:\n%s", k, data)
		}
	}
	return env
}
