// Command coffrectl is Coffre's key-ceremony and administration CLI.
//
// It talks to coffred's AdminService over mutual TLS with an admin client
// certificate, and, for ceremonies, to the HSM directly through PKCS#11.
// Run `coffrectl help` for the commands.
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
