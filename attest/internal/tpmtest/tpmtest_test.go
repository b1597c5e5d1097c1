package tpmtest

import (
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// TestLeakCheckSeesHandles: the leak check lists what is loaded, so a
// test that forgets a flush fails.
func TestLeakCheckSeesHandles(t *testing.T) {
	tpm := Open(t)
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(ECCAKTemplate),
	}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := handles(tpm, tpm2.TPMHTTransient)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 || hs[0] != rsp.ObjectHandle {
		t.Fatalf("transient handles %v, want [%v]", hs, rsp.ObjectHandle)
	}
	_, closeSession, err := tpm2.PolicySession(tpm, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := handles(tpm, tpm2.TPMHTLoadedSession)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || tpm2.TPMHT(uint32(ps[0])>>24) != tpm2.TPMHTPolicySession {
		t.Fatalf("policy sessions %v, want one", ps)
	}
	if err := closeSession(); err != nil {
		t.Fatal(err)
	}
	Flush(t, tpm, rsp.ObjectHandle)
	for _, ht := range []tpm2.TPMHT{tpm2.TPMHTTransient, tpm2.TPMHTLoadedSession, tpm2.TPMHTSavedSession} {
		if hs, _ := handles(tpm, ht); len(hs) != 0 {
			t.Fatalf("handles %v left after flushing", hs)
		}
	}
}

// TestSeedsAreTPMs: the same seed is the same TPM, another seed another.
func TestSeedsAreTPMs(t *testing.T) {
	ek := func(seed int64) []byte {
		var b []byte
		t.Run("", func(t *testing.T) { b = EK(t, OpenSeeded(t, seed)).PublicBytes })
		return b
	}
	a1, b, a2 := ek(1), ek(2), ek(1)
	if string(a1) != string(a2) || string(a1) == string(b) {
		t.Fatal("seeds do not make distinct, stable TPMs")
	}
}
