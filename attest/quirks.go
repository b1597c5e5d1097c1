package attest

import (
	"encoding/asn1"

	"github.com/google/go-eventlog/tcg"
)

// quirk is one known way in which real TPMs or their firmware depart from
// the TCG specifications and that we accept anyway. Every departure the
// verifier tolerates is listed in firmwareQuirks, and nowhere else, so that a
// reviewer can see the whole list at once. A quirk is only ever tried after
// the strict reading failed, and the names of the quirks that were needed
// are reported in EK.Quirks and Verified.Quirks for the audit log.
type quirk struct {
	// name says what the departure is, in the words an auditor reads.
	name string
	// ekCert, when set, rewrites an EK certificate that failed to parse
	// strictly; ok is false when the quirk does not apply to der.
	ekCert func(der []byte) (fixed []byte, ok bool)
	// eventLog, when set, are the go-eventlog parse options that let a
	// log with this departure parse.
	eventLog *tcg.ParseOpts
}

// firmwareQuirks is the table of every tolerated departure.
//
// Not listed here because go-eventlog applies them itself during replay,
// and only when the strict replay of PCR 5 failed: the missing "Exit Boot
// Services Invocation/Returned" events of some UEFI firmware
// (tcg.EventlogWorkarounds).
var firmwareQuirks = []quirk{
	{
		// Some TPMs store the EK certificate in an NV index larger than
		// the certificate and fill the rest with 0x00 or 0xFF; agents that
		// read the whole index send the padding along.
		name:   "EK certificate padded after its DER encoding",
		ekCert: trimDERPadding,
	},
	{
		// Firmware that hands over the whole reserved ACPI log area
		// (TCG2 table LAML) leaves 0xFF padding after the last event.
		name:     "event log padded with 0xFF after its last event",
		eventLog: &tcg.ParseOpts{AllowPadding: true},
	},
}

// trimDERPadding removes padding after a DER SEQUENCE when the padding is
// all 0x00 or all 0xFF bytes; anything else after the SEQUENCE is not a
// quirk we know and stays an error.
func trimDERPadding(der []byte) ([]byte, bool) {
	var raw asn1.RawValue
	rest, err := asn1.Unmarshal(der, &raw)
	if err != nil || len(rest) == 0 {
		return nil, false
	}
	if !allBytes(rest, 0x00) && !allBytes(rest, 0xFF) {
		return nil, false
	}
	return der[:len(der)-len(rest)], true
}

func allBytes(b []byte, v byte) bool {
	for _, c := range b {
		if c != v {
			return false
		}
	}
	return true
}
