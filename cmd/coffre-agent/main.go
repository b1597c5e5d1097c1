// Command coffre-agent is the node agent of Coffre: it attests the machine
// with its TPM 2.0 and fetches and opens data keys, as storage software
// embedding the Go client (package attest/agent) would.
//
// Run `coffre-agent help` for the commands.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
