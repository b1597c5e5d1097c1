package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/coffre-kms/coffre/cmd/internal/devtest"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
)

func TestMain(m *testing.M) {
	// Key files made by the tests use the cheapest Argon2id cost the
	// format accepts: a test-binary-only setting (see kdfParams).
	testKDF = &keyfile.MinParams
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
	env := devtest.Start(t).Env
	// A server of its own for quorum.txtar, which hands the dev quorum
	// over to three officers: the other scripts keep the 1-of-1 dev one.
	qenv := devtest.Start(t).Env

	// A second, empty token for the ceremony script, in its own SoftHSM.
	hs := hsmtest.NewSoftHSM(t)
	pin := hs.NewToken(t, "ceremony")
	root2 := hs.RootURI("ceremony", "root", pin)
	// Two more for the recoverable ceremony: A receives the root at init,
	// B (empty) is where it is restored.
	pinA := hs.NewToken(t, "recover-a")
	pinB := hs.NewToken(t, "recover-b")
	recoverA := hs.RootURI("recover-a", "root", pinA)
	recoverB := hs.RootURI("recover-b", "root", pinB)

	testscript.Run(t, testscript.Params{
		Dir: "testdata",
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			// capture VAR REGEXP: set VAR to the first group of REGEXP in
			// the last command's stdout (a proposal id, say).
			"capture": func(ts *testscript.TestScript, neg bool, args []string) {
				if neg || len(args) != 2 {
					ts.Fatalf("usage: capture VAR REGEXP")
				}
				re, err := regexp.Compile("(?m)" + args[1])
				ts.Check(err)
				m := re.FindStringSubmatch(ts.ReadFile("stdout"))
				if len(m) < 2 {
					ts.Fatalf("capture: %q does not match stdout", args[1])
				}
				ts.Setenv(args[0], m[1])
			},
			// sleep DURATION: wait for something the server does on a
			// timer, such as publishing an audit checkpoint.
			"sleep": func(ts *testscript.TestScript, neg bool, args []string) {
				if neg || len(args) != 1 {
					ts.Fatalf("usage: sleep DURATION")
				}
				d, err := time.ParseDuration(args[0])
				ts.Check(err)
				time.Sleep(d)
			},
		},
		Setup: func(e *testscript.Env) error {
			for k, v := range env {
				e.Setenv(k, v)
			}
			for k, v := range qenv {
				e.Setenv("Q_"+k, v)
			}
			e.Setenv("ADDR", env["COFFRE_ADDR"])
			e.Setenv("ROOT2", root2)
			e.Setenv("RECOVER_A", recoverA)
			e.Setenv("RECOVER_B", recoverB)
			e.Setenv("CEREMONY_SOFTHSM2_CONF", hs.ConfPath)
			// Evidence recorded from tpm2-tools, for verify-quote.txtar.
			tpm2tools, err := filepath.Abs(filepath.Join("..", "..", "testdata", "tpm2-tools"))
			if err != nil {
				return err
			}
			e.Setenv("TPM2TOOLS", tpm2tools)
			return nil
		},
	})
}
