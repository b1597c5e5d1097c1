package pkcs11_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

// The recovery tests break the HSM behind the Root's back, then check that
// calls fail only with hsm.ErrUnavailable and that the Root comes back by
// itself with the same key: data wrapped before the outage still unwraps.

const testRetry = 20 * time.Millisecond

// awaitRecovery calls Unwrap of w until it succeeds, requiring every failure
// to wrap hsm.ErrUnavailable; it returns the number of failed calls.
func awaitRecovery(t *testing.T, r hsm.Root, w, key []byte) int {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for failures := 0; ; failures++ {
		got, err := r.Unwrap(ctx, w, nil)
		if err == nil {
			if !bytes.Equal(got, key) {
				t.Fatalf("after recovery Unwrap = %x, want %x", got, key)
			}
			return failures
		}
		if !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("call %d during the outage: %v; want an error wrapping hsm.ErrUnavailable", failures+1, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after %d calls: %v", failures+1, err)
		}
		time.Sleep(testRetry / 2)
	}
}

// tokenDir returns the directory SoftHSM keeps the token in.
func tokenDir(t *testing.T, e *env) string {
	t.Helper()
	ents, err := os.ReadDir(e.s.TokenDir)
	if err != nil || len(ents) != 1 {
		t.Fatalf("want one token directory in %s: %v %v", e.s.TokenDir, ents, err)
	}
	return filepath.Join(e.s.TokenDir, ents[0].Name())
}

// TestRecoverFinalize: the library is finalised behind the Root's back
// (another component calls C_Finalize on its own handle).
func TestRecoverFinalize(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	key := randBytes(32)
	w := roundTrip(t, r, key, nil)

	for round := 0; round < 3; round++ {
		if err := foreign(t).Finalize(); err != nil {
			t.Fatalf("foreign Finalize: %v", err)
		}
		failures := awaitRecovery(t, r, w, key)
		t.Logf("round %d: recovered after %d failed calls", round, failures)
		// Spaced out so that each round may reconnect at once.
		time.Sleep(2 * testRetry)
	}
	roundTrip(t, r, randBytes(32), []byte("after"))
}

// TestRecoverFinalizeTransparent: one finalisation costs the caller nothing;
// the call reconnects and retries by itself.
func TestRecoverFinalizeTransparent(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: time.Hour})
	key := randBytes(32)
	w := roundTrip(t, r, key, nil)
	if err := foreign(t).Finalize(); err != nil {
		t.Fatal(err)
	}
	got, err := r.Unwrap(context.Background(), w, nil)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("first call after C_Finalize: %x, %v; want a transparent reconnect", got, err)
	}
}

// TestRecoverReinitialize: finalised and initialised again behind the
// Root's back; its session and object handles are void.
func TestRecoverReinitialize(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	key := randBytes(32)
	w := roundTrip(t, r, key, nil)
	c := foreign(t)
	if err := c.Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := c.Initialize(p11.InitializeWithFlags(p11.CKF_OS_LOCKING_OK)); err != nil {
		t.Fatal(err)
	}
	t.Logf("recovered after %d failed calls", awaitRecovery(t, r, w, key))
}

// TestRecoverTokenRemoved: the token disappears (SoftHSM: the library is
// finalised and the token directory moved away), then comes back.
func TestRecoverTokenRemoved(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	key := randBytes(32)
	w := roundTrip(t, r, key, []byte("before"))
	w2 := roundTrip(t, r, key, nil)

	dir := tokenDir(t, e)
	away := filepath.Join(e.s.Dir, "token-away") // outside the token directory: SoftHSM loads any subdirectory there
	if err := foreign(t).Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, away); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		_, err := r.Wrap(ctx, key, nil)
		if !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("Wrap with the token gone: %v; want hsm.ErrUnavailable", err)
		}
		if !strings.Contains(err.Error(), `token "coffre-test" not present`) {
			t.Errorf("error %q does not name the missing token", err)
		}
		if i == 0 {
			t.Logf("token gone: %v", err)
		}
		if _, err := r.Unwrap(ctx, w2, nil); !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("Unwrap with the token gone: %v; want hsm.ErrUnavailable, not a verdict on the data", err)
		}
		if _, err := r.Attributes(ctx); !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("Attributes with the token gone: %v", err)
		}
		time.Sleep(testRetry)
	}

	if err := os.Rename(away, dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("token back: recovered after %d failed calls", awaitRecovery(t, r, w2, key))
	got, err := r.Unwrap(ctx, w, []byte("before"))
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("blob wrapped before the outage: %x, %v", got, err)
	}
	roundTrip(t, r, randBytes(32), nil)
}

// TestReconnectRateLimited: while the last reconnect attempt is more recent
// than RetryInterval, calls fail at once without touching the HSM, even if
// it is back.
func TestReconnectRateLimited(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: time.Hour})
	key := randBytes(32)
	w := roundTrip(t, r, key, nil)

	dir := tokenDir(t, e)
	away := filepath.Join(e.s.Dir, "token-away")
	if err := foreign(t).Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, away); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := r.Unwrap(ctx, w, nil); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Unwrap with the token gone: %v", err)
	}
	if err := os.Rename(away, dir); err != nil {
		t.Fatal(err)
	}
	// The token is back, but the next attempt is an hour away.
	for i := 0; i < 10; i++ {
		if _, err := r.Unwrap(ctx, w, nil); !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("call %d within the retry interval: %v; want hsm.ErrUnavailable without a reconnect", i, err)
		}
	}
	// (TestRecoverTokenRemoved shows the same sequence recovering with a
	// short interval.)
}

// TestRecoverSessionsClosed: someone closes all sessions on the slot.
func TestRecoverSessionsClosed(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry, Sessions: 4})
	key := randBytes(32)
	w := roundTrip(t, r, key, nil)
	c := foreign(t)
	slot := slotOf(t, c, testToken)
	for round := 0; round < 3; round++ {
		if err := c.CloseAllSessions(slot); err != nil {
			t.Fatalf("CloseAllSessions: %v", err)
		}
		t.Logf("round %d: recovered after %d failed calls", round, awaitRecovery(t, r, w, key))
		roundTrip(t, r, randBytes(32), nil)
		time.Sleep(2 * testRetry)
	}
}

// TestRecoverLoggedOut: someone logs the process out of the token.
func TestRecoverLoggedOut(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	key := randBytes(32)
	w := roundTrip(t, r, key, nil)
	c := foreign(t)
	sh, err := c.OpenSession(slotOf(t, c, testToken), p11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Logout(sh); err != nil {
		t.Fatalf("Logout: %v", err)
	}
	t.Logf("recovered after %d failed calls", awaitRecovery(t, r, w, key))
	c.CloseSession(sh)
}

// TestRecoverSharedModule: two Roots on one module (two tokens) both come
// back after the library is finalised behind their backs, and the one that
// re-initialises first does not break the other for good.
func TestRecoverSharedModule(t *testing.T) {
	e := newEnv(t)
	pin2 := e.s.NewToken(t, "coffre-second")
	r1 := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	r2 := create(t, pkcs11.Config{URI: e.s.RootURI("coffre-second", "root", pin2), RetryInterval: testRetry})
	k1, k2 := randBytes(32), randBytes(32)
	w1, w2 := roundTrip(t, r1, k1, nil), roundTrip(t, r2, k2, nil)
	if err := foreign(t).Finalize(); err != nil {
		t.Fatal(err)
	}
	t.Logf("r1 recovered after %d failed calls", awaitRecovery(t, r1, w1, k1))
	t.Logf("r2 recovered after %d failed calls", awaitRecovery(t, r2, w2, k2))
	awaitRecovery(t, r1, w1, k1)
}

// TestCloseDuringOutage: a Root whose HSM is gone still closes.
func TestCloseDuringOutage(t *testing.T) {
	e := newEnv(t)
	r, err := pkcs11.CreateRoot(context.Background(), pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	if err != nil {
		t.Fatal(err)
	}
	if err := foreign(t).Finalize(); err != nil {
		t.Fatal(err)
	}
	mustClose(t, r)
	if _, err := r.Wrap(context.Background(), randBytes(32), nil); !errors.Is(err, pkcs11.ErrClosed) {
		t.Errorf("Wrap after Close: %v", err)
	}
}

// TestKeyDestroyedBehindBack: the key is destroyed on the token; calls
// report hsm.ErrKeyNotFound rather than an outage.
func TestKeyDestroyedBehindBack(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry})
	w := roundTrip(t, r, randBytes(32), nil)
	c := foreign(t)
	sh, err := c.OpenSession(slotOf(t, c, testToken), p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseSession(sh)
	if err := c.FindObjectsInit(sh, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, "root")}); err != nil {
		t.Fatal(err)
	}
	hs, _, err := c.FindObjects(sh, 2)
	c.FindObjectsFinal(sh)
	if err != nil || len(hs) != 1 {
		t.Fatalf("FindObjects: %v %v", hs, err)
	}
	if err := c.DestroyObject(sh, hs[0]); err != nil {
		t.Fatal(err)
	}
	_, err = r.Unwrap(context.Background(), w, nil)
	if !errors.Is(err, hsm.ErrKeyNotFound) || !strings.Contains(err.Error(), r.ID()) {
		t.Errorf("Unwrap after the key was destroyed: %v; want hsm.ErrKeyNotFound naming %s", err, r.ID())
	}

	// A new key under the same label is not taken for the root.
	if _, err := c.GenerateKey(sh, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY), p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_VALUE_LEN, 32), p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true), p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_ENCRYPT, true), p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_WRAP, false), p11.NewAttribute(p11.CKA_UNWRAP, false), p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_LABEL, "root"), p11.NewAttribute(p11.CKA_ID, []byte("impostor")),
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * testRetry)
	if _, err = r.Wrap(context.Background(), randBytes(32), nil); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("Wrap with another key under the root's label: %v; want hsm.ErrKeyNotFound", err)
	}
	t.Logf("replaced key: %v", err)
}

// TestRescanUnderLoad: while one Root is busy on several goroutines, an
// Open of a token that is not there makes this package re-initialise the
// shared library to look for it. The busy Root's handles become stale; its
// callers must not notice (each call reconnects and retries), and no stale
// handle may reach the library (run with -race).
func TestRescanUnderLoad(t *testing.T) {
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri, RetryInterval: testRetry, Sessions: 4})
	ctx := context.Background()
	stop := make(chan struct{})
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	var ops atomic.Int64
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				key := randBytes(32)
				w, err := r.Wrap(ctx, key, nil)
				if err == nil {
					var got []byte
					got, err = r.Unwrap(ctx, w, nil)
					if err == nil && !bytes.Equal(got, key) {
						err = errors.New("round trip mismatch")
					}
				}
				if err != nil {
					errs <- err
					return
				}
				ops.Add(1)
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	gen := pkcs11.ModuleGeneration(hsmtest.Module)
	_, err := pkcs11.Open(ctx, pkcs11.Config{URI: e.s.RootURI("absent", "root", e.pin)})
	if !errors.Is(err, hsm.ErrUnavailable) {
		t.Errorf("Open of an absent token: %v", err)
	}
	if got := pkcs11.ModuleGeneration(hsmtest.Module); got != gen+1 {
		t.Errorf("library initialised %d times during the Open, want 1 (a rescan)", got-gen)
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("busy Root failed during the rescan: %v", err)
	}
	t.Logf("%d round trips", ops.Load())
}
