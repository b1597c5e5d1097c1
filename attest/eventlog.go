package attest

import (
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-eventlog/register"
	"github.com/google/go-eventlog/tcg"
)

// ReplayEventLog parses a TCG PC Client event log in the crypto-agile
// format (TCG PC Client Platform Firmware Profile §10; the binary
// /sys/kernel/security/tpm0/binary_bios_measurements) with go-eventlog,
// and replays its SHA-256 digests against pcrs, the quoted values of the
// SHA-256 bank. It refuses (ErrEventLog):
//
//   - a log that does not parse, or has no SHA-256 digests (TPM 1.2
//     SHA-1-only logs);
//   - a quoted PCR for which the log has events that do not replay to the
//     quoted value (the reason names the lowest such PCR);
//   - a quoted firmware PCR (0 to 7) that is not at its reset value while
//     the log has no event for it: firmware measures every PCR 0–7 event
//     into the log, so the log was cut.
//
// PCRs the log has no events for and that are outside 0–7 are not judged
// (PCR 10, for instance, belongs to the IMA log, not this one). Only
// digests are replayed: event data is not trusted, and the reference
// values the class compares are PCR values, which the quote proves.
func ReplayEventLog(eventLog []byte, pcrs map[uint32][]byte) error {
	_, err := replayEventLog(eventLog, pcrs)
	return err
}

// replayEventLog is ReplayEventLog, also returning the names of the
// firmware quirks the log needed.
func replayEventLog(eventLog []byte, pcrs map[uint32][]byte) ([]string, error) {
	if len(eventLog) == 0 {
		return nil, refuse(ErrEventLog, "the event log is empty")
	}
	if len(eventLog) > maxEventLogSize {
		return nil, refuse(ErrEventLog, "the event log has %d bytes, more than the %d accepted", len(eventLog), maxEventLogSize)
	}
	if len(pcrs) == 0 {
		return nil, refuse(ErrEventLog, "no quoted PCR to replay the event log against")
	}
	mrs := make([]register.MR, 0, len(pcrs))
	for _, i := range sortedKeys(pcrs) {
		if i > maxPCRIndex || len(pcrs[i]) != sha256.Size {
			return nil, refuse(ErrEventLog, "PCR %d is not a SHA-256 PCR of a PC Client TPM", i)
		}
		mrs = append(mrs, register.PCR{Index: int(i), Digest: pcrs[i], DigestAlg: crypto.SHA256})
	}

	el, quirks, err := parseEventLog(eventLog)
	if err != nil {
		return nil, err
	}
	if !slices.Contains(el.Algs, register.HashSHA256) {
		return nil, refuse(ErrEventLog, "the event log has no SHA-256 digests (not a crypto-agile log with a SHA-256 bank)")
	}
	if _, err := el.Verify(mrs); err != nil {
		var re tcg.ReplayError
		if errors.As(err, &re) && len(re.InvalidMRs) > 0 {
			first := slices.Min(re.InvalidMRs)
			return nil, refuse(ErrEventLog, "the event log does not replay to the quoted value of PCR %d (%x)", first, pcrs[uint32(first)]) // #nosec G115 -- first is one of our indexes, 0 to 23
		}
		return nil, refuse(ErrEventLog, "the event log does not replay: %s", clip(err.Error()))
	}

	covered := map[int]bool{}
	for _, e := range el.Events(register.HashSHA256) {
		if e.Type != tcg.NoAction && len(e.Digest) > 0 {
			covered[e.Index] = true
		}
	}
	for _, i := range sortedKeys(pcrs) {
		if i <= 7 && !covered[int(i)] && !allBytes(pcrs[i], 0) {
			return nil, refuse(ErrEventLog, "the event log has no events for PCR %d, whose quoted value %x is not its reset value", i, pcrs[i])
		}
	}
	return quirks, nil
}

// parseEventLog parses strictly, then with each event-log entry of the
// quirks table in turn.
func parseEventLog(eventLog []byte) (*tcg.EventLog, []string, error) {
	el, err := tcg.ParseEventLog(eventLog, tcg.ParseOpts{})
	if err == nil {
		return el, nil, nil
	}
	for _, q := range firmwareQuirks {
		if q.eventLog == nil {
			continue
		}
		if el2, err2 := tcg.ParseEventLog(eventLog, *q.eventLog); err2 == nil {
			return el2, []string{q.name}, nil
		}
	}
	return nil, nil, refuse(ErrEventLog, "the event log does not parse: %s", clip(err.Error()))
}

// clip shortens a parser's message for a refusal reason: go-eventlog puts
// whole event bodies in some of its errors.
func clip(s string) string {
	const max = 160
	if len(s) <= max {
		return s
	}
	return fmt.Sprintf("%s… (%d more bytes)", strings.ToValidUTF8(s[:max], ""), len(s)-max)
}
