package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/kms/identity"
)

// TestAdminKeyToken runs admin keygen and admin pubkey against a SoftHSM
// token (the golden script covers key files; it has no token URI to give).
func TestAdminKeyToken(t *testing.T) {
	s := hsmtest.NewSoftHSM(t)
	pin := s.NewToken(t, "card")
	ctx := context.Background()
	coffrectl := func(want int, args ...string) (stdout, stderr string) {
		t.Helper()
		var o, e bytes.Buffer
		if got := run(ctx, args, &o, &e); got != want {
			t.Fatalf("coffrectl %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), got, want, o.String(), e.String())
		}
		return o.String(), e.String()
	}

	alice := s.RootURI("card", "alice", pin)
	out, errOut := coffrectl(exitOK, "admin", "keygen", "--name", "alice", "--token", alice)
	pub, err := identity.ParsePublicKey(strings.TrimSuffix(out, "\n"))
	if err != nil {
		t.Fatalf("keygen printed %q: %v", out, err)
	}
	if !strings.Contains(errOut, "admin alice, fingerprint "+pub.Fingerprint()+", token pkcs11:token=card;object=alice") {
		t.Errorf("keygen stderr %q", errOut)
	}
	if strings.Contains(out+errOut, pin) {
		t.Error("output names the PIN file")
	}
	out, _ = coffrectl(exitOK, "admin", "pubkey", "--admin-key", alice)
	if out != pub.String()+"\n" {
		t.Errorf("pubkey printed %q, want the keygen line", out)
	}

	// Never over an existing key.
	_, errOut = coffrectl(exitError, "admin", "keygen", "--name", "alice", "--token", alice)
	if !strings.Contains(errOut, "already holds a key named \"alice\"; nothing was changed") {
		t.Errorf("second keygen: %q", errOut)
	}
	out, _ = coffrectl(exitOK, "admin", "pubkey", "--admin-key", alice)
	if out != pub.String()+"\n" {
		t.Error("the key changed after a refused keygen")
	}

	// A token URI without object takes --name as the label.
	noObject := (&hsm.URI{Token: "card", ModulePath: hsmtest.Module, PINSource: "file:" + pin}).String()
	out, _ = coffrectl(exitOK, "admin", "keygen", "--name", "bob", "--token", noObject, "--json")
	if !strings.Contains(out, `"name":"bob"`) || !strings.Contains(out, `"token":"pkcs11:token=card;object=bob"`) {
		t.Errorf("keygen --json: %s", out)
	}
	bobOut, _ := coffrectl(exitOK, "admin", "pubkey", "--admin-key", s.RootURI("card", "bob", pin))
	if bobOut == pub.String()+"\n" {
		t.Error("bob has alice's key")
	}

	_, errOut = coffrectl(exitUsage, "admin", "keygen", "--name", "carol", "--token", alice)
	if !strings.Contains(errOut, `names object "alice" but --name is "carol"`) {
		t.Errorf("mismatched name: %q", errOut)
	}
	_, errOut = coffrectl(exitError, "admin", "pubkey", "--admin-key", s.RootURI("card", "nobody", pin))
	if !strings.Contains(errOut, "key not found") {
		t.Errorf("pubkey of a missing key: %q", errOut)
	}
}
