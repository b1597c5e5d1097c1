package attest_test

import (
	"crypto/rand"
	"testing"

	"github.com/coffre-kms/coffre/attest"
	"github.com/coffre-kms/coffre/attest/internal/tpmtest"
)

// The server's CPU for one attestation session is NewChallenge plus
// Verify (the budget: 5 ms). The evidence comes from the
// simulator once; Verify is pure, so the same pair is verified again and
// again.

func BenchmarkNewChallenge(b *testing.B) {
	tpm := tpmtest.Open(b)
	ek := tpmtest.EK(b, tpm)
	ak := tpmtest.AK(b, tpm, tpmtest.RSAAKTemplate)
	parsed, err := attest.ParseEKPublic(ek.PublicBytes)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := attest.NewChallenge(rand.Reader, parsed, ak.PublicBytes, []uint32{7, 16}, challengeTTL, now); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerify(b *testing.B) {
	for _, c := range []struct {
		name     string
		eventLog bool
	}{{"RSASSA AK", false}, {"RSASSA AK with event log", true}} {
		b.Run(c.name, func(b *testing.B) {
			tpm := tpmtest.Open(b)
			ekKey := tpmtest.EK(b, tpm)
			ek, err := attest.ParseEKPublic(ekKey.PublicBytes)
			if err != nil {
				b.Fatal(err)
			}
			n := &node{tpm: tpm, ekKey: ekKey, ak: tpmtest.AK(b, tpm, tpmtest.RSAAKTemplate), ek: ek}
			pcrs := []uint{7, 16}
			var log []byte
			if c.eventLog {
				log = readEventLog(b, "arch-linux-workstation.bin")
				extendLog(b, tpm, log)
				pcrs = []uint{0, 1, 2, 3, 4, 5, 6, 7, 8}
			}
			ch, err := attest.NewChallenge(rand.Reader, n.ek, n.ak.PublicBytes, []uint32{7}, challengeTTL, now)
			if err != nil {
				b.Fatal(err)
			}
			ev := n.answer(b, ch, pcrs...)
			ev.EventLog = log
			pol := policyFor(subset(ev.PCRs, 7))
			pol.RequireEventLog = c.eventLog
			b.ResetTimer()
			for b.Loop() {
				if _, err := attest.Verify(ch, ev, pol); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
