package pkcs11_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

// listLabels returns the labels of the objects on token testToken as
// OpenSC's pkcs11-tool, an independent PKCS#11 client, lists them.
func listLabels(t *testing.T, e *env) []string {
	t.Helper()
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		t.Fatalf("pkcs11-tool is required for this test; install the Debian package opensc: %v", err)
	}
	pin, err := os.ReadFile(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	// SOFTHSM2_CONF is set by hsmtest (t.Setenv), so the tool sees the
	// same token directory.
	// #nosec G204 -- test: fixed tool, arguments from the test's own token
	out, err := exec.Command(tool, "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", testToken,
		"--login", "--pin", strings.TrimSpace(string(pin)), "--list-objects").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	var labels []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "label:" {
			labels = append(labels, f[1])
		}
	}
	return labels
}

func hasLabel(labels []string, l string) bool {
	for _, x := range labels {
		if x == l {
			return true
		}
	}
	return false
}

func TestDestroyRoot(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	keep := create(t, pkcs11.Config{URI: e.s.RootURI(testToken, "keep", e.pin)})
	doomed, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	if err != nil {
		t.Fatal(err)
	}
	defer mustClose(t, doomed)
	key := randBytes(32)
	w := roundTrip(t, doomed, key, []byte("aad"))
	if l := listLabels(t, e); !hasLabel(l, "root") || !hasLabel(l, "keep") {
		t.Fatalf("before DestroyRoot, pkcs11-tool lists %q; want root and keep", l)
	}

	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: e.uri}); err != nil {
		t.Fatalf("DestroyRoot: %v", err)
	}

	if r, err := pkcs11.Open(ctx, pkcs11.Config{URI: e.uri}); !errors.Is(err, hsm.ErrKeyNotFound) {
		if err == nil {
			mustClose(t, r)
		}
		t.Errorf("Open after DestroyRoot: %v; want hsm.ErrKeyNotFound", err)
	}
	labels := listLabels(t, e)
	if hasLabel(labels, "root") {
		t.Errorf("pkcs11-tool still lists the destroyed key: %q", labels)
	}
	if !hasLabel(labels, "keep") {
		t.Errorf("pkcs11-tool no longer lists the other key: %q", labels)
	}
	// The Root that was open on the key can no longer unwrap what it
	// wrapped: the key is gone, not merely forgotten by this process.
	if got, err := doomed.Unwrap(ctx, w, []byte("aad")); !errors.Is(err, hsm.ErrKeyNotFound) || bytes.Equal(got, key) {
		t.Errorf("Unwrap under the destroyed key: %v; want hsm.ErrKeyNotFound", err)
	}
	// Destroying again says the key is not there.
	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: e.uri}); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("second DestroyRoot: %v; want hsm.ErrKeyNotFound", err)
	}
	// The other root on the token is untouched and still logged in.
	roundTrip(t, keep, randBytes(32), nil)
}

func TestDestroyRootRefusals(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: e.s.RootURI(testToken, "never-made", e.pin)}); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("absent key: %v; want hsm.ErrKeyNotFound", err)
	}
	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: e.s.RootURI("no-such-token", "root", e.pin)}); !errors.Is(err, hsm.ErrUnavailable) {
		t.Errorf("absent token: %v; want hsm.ErrUnavailable", err)
	}
	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{}); err == nil {
		t.Error("empty URI accepted")
	}
	// A URI naming no key at all must not destroy "whatever is there".
	if err := pkcs11.DestroyRoot(ctx, pkcs11.Config{URI: "pkcs11:token=" + testToken + "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:" + e.pin}); err == nil {
		t.Error("URI without object or id accepted")
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	create(t, pkcs11.Config{URI: e.uri})
	if err := pkcs11.DestroyRoot(cancelled, pkcs11.Config{URI: e.uri}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled context: %v", err)
	}
	if r, err := pkcs11.Open(ctx, pkcs11.Config{URI: e.uri}); err != nil {
		t.Errorf("key gone after a cancelled DestroyRoot: %v", err)
	} else {
		mustClose(t, r)
	}
}
