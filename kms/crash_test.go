package kms

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coffre-kms/coffre/hsm/hsmtest"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
	"github.com/coffre-kms/coffre/kms/store"
)

// The crash tests run a child process (this test binary again, running
// TestCrashChild) that changes keyrings in a loop and reports on stdout
// what it has done, and kill it with SIGKILL at a random moment, again and
// again. After each kill a fresh service checks every stored keyring:
// it decodes (no half-written record), its versions are numbered 1..n,
// exactly one is active (none when the whole keyring is being destroyed),
// every version that is not destroyed still unwraps in the HSM, every
// envelope made before decrypts exactly when its version's state allows,
// and a destroyed version holds no wrapped bytes.
//
// Child protocol, one line each: "ready"; "rotated K V"; "made K V ENV KEY"
// (an envelope under K vV and its data key, hex); "scheduled K V" (0: the
// whole keyring); "destroyed K V".

// crashKills is the number of kills per crash test.
const crashKills = 50

type crashEnvelope struct{ env, key []byte }

// crashHarness is what the parent side of a crash test keeps between kills.
type crashHarness struct {
	t    *testing.T
	db   string
	uri  string
	root *pkcs11.Root
	envs map[KeyringID]map[uint32]crashEnvelope
}

func newCrashHarness(t *testing.T) *crashHarness {
	hs := hsmtest.NewSoftHSM(t)
	pin := hs.NewToken(t, "crash")
	uri := hs.RootURI("crash", "root", pin)
	root, err := pkcs11.CreateRoot(ctxT(t), pkcs11.Config{URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	return &crashHarness{
		t: t, db: filepath.Join(t.TempDir(), "coffre.db"), uri: uri, root: root,
		envs: make(map[KeyringID]map[uint32]crashEnvelope),
	}
}

func (h *crashHarness) addEnvelope(id KeyringID, v uint32, env, key []byte) {
	if h.envs[id] == nil {
		h.envs[id] = make(map[uint32]crashEnvelope)
	}
	h.envs[id][v] = crashEnvelope{env: env, key: key}
}

// makeEnvelope makes an envelope under keyring id's primary and keeps it.
func (h *crashHarness) makeEnvelope(ctx context.Context, svc *Service, id KeyringID) {
	dk, err := svc.GenerateDataKey(ctx, id, map[string]string{"crash": "test"})
	if err != nil {
		h.t.Fatal(err)
	}
	h.addEnvelope(id, dk.KeyVersion, dk.Envelope, bytes.Clone(dk.Plaintext.Expose()))
}

// crashChild is one running child process.
type crashChild struct {
	cmd   *exec.Cmd
	lines *bufio.Scanner
}

func (h *crashHarness) start(mode, keyring string) *crashChild {
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$")
	cmd.Env = append(os.Environ(), "COFFRE_CRASH_DB="+h.db, "COFFRE_CRASH_ROOT="+h.uri,
		"COFFRE_CRASH_MODE="+mode, "COFFRE_CRASH_KEYRING="+keyring)
	out, err := cmd.StdoutPipe()
	if err != nil {
		h.t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	c := &crashChild{cmd: cmd, lines: bufio.NewScanner(out)}
	if !c.lines.Scan() || c.lines.Text() != "ready" {
		h.t.Fatalf("child did not start: %q", c.lines.Text())
	}
	return c
}

// next reads one report of the child, recording envelopes; it returns the
// report's kind ("" once the child is gone) with its keyring and version.
func (h *crashHarness) next(c *crashChild) (kind string, id KeyringID, v uint32) {
	if !c.lines.Scan() {
		return "", KeyringID{}, 0
	}
	f := strings.Fields(c.lines.Text())
	bad := func() { h.t.Fatalf("child said %q", c.lines.Text()) }
	if len(f) < 3 {
		bad()
	}
	id, err := ParseKeyringID(f[1])
	if err != nil {
		bad()
	}
	if _, err := fmt.Sscan(f[2], &v); err != nil {
		bad()
	}
	switch f[0] {
	case "made":
		if len(f) != 5 {
			bad()
		}
		env, err1 := hex.DecodeString(f[3])
		key, err2 := hex.DecodeString(f[4])
		if err1 != nil || err2 != nil {
			bad()
		}
		h.addEnvelope(id, v, env, key)
	case "rotated", "scheduled", "destroyed":
	default:
		bad()
	}
	return f[0], id, v
}

// kill lets the child report want reports of kind, waits a random moment
// (usually landing in the middle of the next change) and kills it; it
// returns every report the child made, those that landed before the kill
// included.
func (h *crashHarness) kill(c *crashChild, kind string, want int) (reports []string) {
	for n := 0; n < want; {
		k, id, v := h.next(c)
		if k == "" {
			h.t.Fatal("child ended before it was killed")
		}
		reports = append(reports, fmt.Sprintf("%s %s %d", k, id, v))
		if k == kind {
			n++
		}
	}
	time.Sleep(time.Duration(rand.IntN(15_000)) * time.Microsecond)
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		h.t.Fatal(err)
	}
	for {
		k, id, v := h.next(c)
		if k == "" {
			break
		}
		reports = append(reports, fmt.Sprintf("%s %s %d", k, id, v))
	}
	_ = c.cmd.Wait() // killed: the error is the signal
	return reports
}

// check opens the store afresh and checks every keyring (see the top of
// the file); it returns them by id.
func (h *crashHarness) check(round int) map[KeyringID]*Keyring {
	t := h.t
	out := make(map[KeyringID]*Keyring)
	withService(t, h.db, h.root, func(svc *Service) {
		ctx := ctxT(t)
		all, err := svc.ListKeyrings(ctx, "") // decodes every stored record
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for _, k := range all {
			out[k.ID] = k
			active := 0
			for i, v := range k.Versions {
				if v.Version != uint32(i+1) {
					t.Fatalf("round %d: %s versions %+v", round, k.ID, k.Versions)
				}
				if v.State == StateActive {
					active++
				}
			}
			wantActive := 1
			if st := k.Versions[k.Primary-1].State; st == StateDestroyScheduled || st == StateDestroyed {
				wantActive = 0
			}
			if active != wantActive {
				t.Fatalf("round %d: %s has %d active versions, want %d: %+v", round, k.ID, active, wantActive, k.Versions)
			}
			rec, _, err := svc.read(ctx, k.ID)
			if err != nil {
				t.Fatal(err)
			}
			for i := range rec.Versions {
				v := &rec.Versions[i]
				if v.state() == StateDestroyed {
					if v.Wrapped != nil {
						t.Fatalf("round %d: %s v%d destroyed with wrapped bytes", round, k.ID, v.Version)
					}
					continue
				}
				if err := svc.withKEK(ctx, rec, v, func([]byte) error { return nil }); err != nil {
					t.Fatalf("round %d: %s v%d does not unwrap: %v", round, k.ID, v.Version, err)
				}
			}
			for ver, e := range h.envs[k.ID] {
				got, err := svc.Decrypt(ctx, k.ID.Tenant, e.env, map[string]string{"crash": "test"})
				switch {
				case rec.decrypts(rec.version(ver)):
					if err != nil || !bytes.Equal(got.Expose(), e.key) {
						t.Fatalf("round %d: %s v%d (%s): envelope does not decrypt: %v", round, k.ID, ver, rec.version(ver).State, err)
					}
				case err != ErrDecrypt:
					t.Fatalf("round %d: %s v%d (%s): decrypt %v, want ErrDecrypt", round, k.ID, ver, rec.version(ver).State, err)
				}
			}
		}
	})
	return out
}

// TestRotationCrash kills a process with SIGKILL in the middle of KEK
// rotations, manual and scheduled (RotateDue), 50 times, and checks after
// each kill the keyrings as above and that every acknowledged rotation
// survived.
func TestRotationCrash(t *testing.T) {
	h := newCrashHarness(t)
	ctx := ctxT(t)
	id := mustID(t, "acme/disks")
	withService(t, h.db, h.root, func(svc *Service) {
		if _, err := svc.CreateKeyring(ctx, id); err != nil {
			t.Fatal(err)
		}
		if _, err := svc.SetRotationPeriod(ctx, id, MinRotationPeriod); err != nil {
			t.Fatal(err)
		}
		h.makeEnvelope(ctx, svc, id)
	})
	acked := uint32(1)
	for round := range crashKills {
		c := h.start("rotate", id.String())
		for _, r := range h.kill(c, "rotated", 1+rand.IntN(3)) {
			var v uint32
			if _, err := fmt.Sscanf(r, "rotated acme/disks %d", &v); err == nil {
				acked = v
			}
		}
		k := h.check(round)[id]
		if k.Primary < acked || k.Primary > acked+1 {
			t.Fatalf("round %d: primary %d, acknowledged %d", round, k.Primary, acked)
		}
		acked = k.Primary
	}
	t.Logf("%d kills; keyring at version %d, %d envelopes checked", crashKills, acked, len(h.envs[id]))
}

// TestDestroyCrash kills a process with SIGKILL in the middle of KEK
// destruction 50 times: mostly of single versions (rotate, schedule the
// previous primary, let the clock pass, DestroyDue), and every fifth time of
// a whole keyring; after each kill it checks the keyrings as above, and that
// a keyring destroyed as a whole is destroyed all at once.
func TestDestroyCrash(t *testing.T) {
	h := newCrashHarness(t)
	ctx := ctxT(t)
	shred := mustID(t, "acme/shred")
	withService(t, h.db, h.root, func(svc *Service) {
		if _, err := svc.CreateKeyring(ctx, shred); err != nil {
			t.Fatal(err)
		}
		h.makeEnvelope(ctx, svc, shred)
	})
	destroyed := 0
	wholes := make(map[KeyringID]bool) // reported destroyed as a whole
	for round := range crashKills {
		var c *crashChild
		var reports []string
		if round%5 == 4 {
			whole := KeyringID{Tenant: "acme", Name: fmt.Sprintf("whole-%d", round)}
			withService(t, h.db, h.root, func(svc *Service) {
				if _, err := svc.CreateKeyring(ctx, whole); err != nil {
					t.Fatal(err)
				}
				h.makeEnvelope(ctx, svc, whole)
				if _, err := svc.RotateKeyring(ctx, whole); err != nil {
					t.Fatal(err)
				}
				h.makeEnvelope(ctx, svc, whole)
			})
			c = h.start("whole", whole.String())
			reports = h.kill(c, "scheduled", rand.IntN(2))
			n := 0
			for _, r := range reports {
				if strings.HasPrefix(r, "destroyed "+whole.String()+" ") {
					n++
				}
			}
			if n == 2 {
				wholes[whole] = true
			}
		} else {
			c = h.start("shred", shred.String())
			reports = h.kill(c, "destroyed", 1+rand.IntN(2))
		}
		for _, r := range reports {
			if strings.HasPrefix(r, "destroyed ") {
				destroyed++
			}
		}
		keyrings := h.check(round)
		for id, k := range keyrings {
			if id == shred {
				continue
			}
			// A whole keyring: untouched, or every version scheduled, or
			// every version destroyed — one compare-and-swap each.
			states := make(map[KeyState]int)
			for _, v := range k.Versions {
				states[v.State]++
			}
			untouched := states[StateActive] == 1 && states[StateDeactivated] == 1
			if len(states) != 1 && !untouched {
				t.Fatalf("round %d: keyring %s half destroyed: %+v", round, id, k.Versions)
			}
			if wholes[id] && states[StateDestroyed] != 2 {
				t.Fatalf("round %d: keyring %s reported destroyed is %+v", round, id, k.Versions)
			}
		}
		for id := range wholes {
			if _, ok := keyrings[id]; !ok {
				t.Fatalf("round %d: keyring %s vanished", round, id)
			}
		}
	}
	t.Logf("%d kills; %d versions destroyed, %d whole keyrings", crashKills, destroyed, len(wholes))
}

func withService(t *testing.T, db string, root *pkcs11.Root, f func(*Service)) {
	t.Helper()
	st, err := store.OpenBolt(db, store.BoltOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	svc, err := New(Config{Store: st, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	f(svc)
}

// TestCrashChild is the process the crash tests kill; COFFRE_CRASH_MODE
// says what it does, in a loop, until it is killed:
//
//   - rotate: rotate the keyring, by turns by hand and by RotateDue with
//     the clock one rotation period further, and make an envelope;
//   - shred: rotate and make an envelope, schedule the previous primary
//     for destruction, move the clock past it and run DestroyDue;
//   - whole: schedule the whole keyring for destruction, move the clock
//     past it, run DestroyDue, then wait.
func TestCrashChild(t *testing.T) {
	db, uri := os.Getenv("COFFRE_CRASH_DB"), os.Getenv("COFFRE_CRASH_ROOT")
	if db == "" {
		t.Skip("helper process of the crash tests, run only by them")
	}
	ctx := context.Background()
	root, err := pkcs11.Open(ctx, pkcs11.Config{URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.OpenBolt(db, store.BoltOptions{LockTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// The clock starts past every time stored by the children before, so
	// that whatever they left scheduled comes due.
	clock := newTestClock()
	svc, err := New(Config{Store: st, Root: root, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	id, err := ParseKeyringID(os.Getenv("COFFRE_CRASH_KEYRING"))
	if err != nil {
		t.Fatal(err)
	}
	all, err := svc.ListKeyrings(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	latest := clock.Now()
	for _, k := range all {
		if k.NextRotationTime.After(latest) {
			latest = k.NextRotationTime
		}
		for _, v := range k.Versions {
			if v.DestroyTime.After(latest) {
				latest = v.DestroyTime
			}
		}
	}
	clock.Advance(latest.Sub(clock.Now()))

	w := bufio.NewWriter(os.Stdout)
	say := func(format string, args ...any) {
		fmt.Fprintf(w, format+"\n", args...)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	ec := map[string]string{"crash": "test"}
	made := func() {
		dk, err := svc.GenerateDataKey(ctx, id, ec)
		if err != nil {
			t.Fatal(err)
		}
		say("made %s %d %x %x", id, dk.KeyVersion, dk.Envelope, dk.Plaintext.Expose())
	}
	destroyDue := func() {
		clock.Advance(MinDestroyDays*24*time.Hour + time.Hour)
		done, err := svc.DestroyDue(ctx, func(DestroyEvent) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range done {
			say("destroyed %s %d", ev.Keyring, ev.Version)
		}
	}
	say("ready")
	switch mode := os.Getenv("COFFRE_CRASH_MODE"); mode {
	case "rotate":
		for i := 0; ; i++ {
			var v uint32
			if i%2 == 0 {
				k, err := svc.RotateKeyring(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				v = k.Primary
			} else {
				clock.Advance(MinRotationPeriod)
				done, err := svc.RotateDue(ctx, func(RotateEvent) error { return nil })
				if err != nil || len(done) != 1 {
					t.Fatalf("RotateDue: %v, %v", done, err)
				}
				v = done[0].Version
			}
			say("rotated %s %d", id, v)
			made()
		}
	case "shred":
		for {
			k, err := svc.RotateKeyring(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			say("rotated %s %d", id, k.Primary)
			made()
			if _, err := svc.ScheduleDestroy(ctx, id, k.Primary-1, MinDestroyDays); err != nil {
				t.Fatal(err)
			}
			say("scheduled %s %d", id, k.Primary-1)
			destroyDue()
		}
	case "whole":
		if _, err := svc.ScheduleDestroy(ctx, id, 0, MinDestroyDays); err != nil {
			t.Fatal(err)
		}
		say("scheduled %s 0", id)
		destroyDue()
		time.Sleep(time.Minute) // the kill comes long before
		t.Fatal("not killed")
	default:
		t.Fatalf("COFFRE_CRASH_MODE %q", mode)
	}
}
