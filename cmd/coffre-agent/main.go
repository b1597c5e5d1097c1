// Command coffre-agent is the node agent of Coffre: it attests the machine
// with its TPM 2.0 and fetches and opens data keys for storage software.
//
// Attested release is not built yet; until it is, the agent says so and
// exits non-zero, because coffred releases no data key to an unattested
// caller.
package main

import (
	"fmt"
	"io"
	"os"
)

const notYet = "attested release is not available yet: coffred serves no KeyService until TPM attestation lands, so no data key is released to an unattested caller"

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintf(stdout, "Usage: coffre-agent COMMAND [flags]\n\nCommands (not yet available): attest, datakey, decrypt, encrypt-file, decrypt-file\n\n%s.\n", notYet)
		return 0
	}
	fmt.Fprintf(stderr, "coffre-agent %s: %s\n", args[0], notYet)
	return 1
}
