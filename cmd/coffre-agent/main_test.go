package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestNotYet: until attestation lands the agent refuses every command, so
// no script can mistake it for a working release path.
func TestNotYet(t *testing.T) {
	for _, cmd := range []string{"attest", "datakey", "decrypt", "encrypt-file", "decrypt-file"} {
		var out, errOut bytes.Buffer
		if code := run([]string{cmd}, &out, &errOut); code == 0 || !strings.Contains(errOut.String(), "not available yet") {
			t.Errorf("%s: exit %d, stderr %q", cmd, code, errOut.String())
		}
	}
	var out bytes.Buffer
	if code := run([]string{"--help"}, &out, &out); code != 0 || !strings.Contains(out.String(), "Usage") {
		t.Errorf("--help: exit %d, %q", code, out.String())
	}
}
