// Command coffred is the Coffre server: it serves Coffre's gRPC API over
// TLS 1.3, with the root key in an HSM and keyrings in a store.
//
// Usage:
//
//	coffred --config FILE [--check]
//	coffred dev --dir DIR [--listen HOST:PORT] [--module PATH]
//
// With --config it serves as the configuration file says (the format is
// documented on [Config]; coffred.example.json is an example); --check
// validates the file and exits. "coffred dev" creates, or reuses, a complete
// development environment in DIR (a SoftHSM token, a local CA, server and
// admin certificates, a configuration file) and then serves exactly as
// --config DIR/coffred.json would; "make run" uses it.
//
// When it serves, coffred prints a line containing "listening on ADDR" to
// standard output; its log goes to standard error. SIGINT or SIGTERM stops
// it gracefully: the health service turns NOT_SERVING, calls in flight get
// limits.shutdown_grace to finish, then the KEK cache is zeroized and the
// HSM and the store are closed, and coffred exits 0. A second signal kills
// it at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	go func() {
		// After the first signal, give the default behaviour back so that a
		// second one ends a shutdown that hangs.
		<-ctx.Done()
		stop()
	}()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage: coffred --config FILE [--check]
       coffred dev --dir DIR [--listen HOST:PORT] [--module PATH]

coffred serves Coffre's gRPC API. It stops gracefully on SIGINT or SIGTERM.
`

// run is coffred without the process around it: tests drive it in process,
// stopping it by cancelling ctx as a signal would.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "dev" {
		return runDev(ctx, args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("coffred", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage, "\nflags:\n")
		fs.PrintDefaults()
	}
	configPath := fs.String("config", "", "the configuration `file` (JSON; see coffred.example.json)")
	check := fs.Bool("check", false, "validate the configuration and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "coffred: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return exitUsage
	}
	if *configPath == "" {
		fmt.Fprintln(stderr, "coffred: --config is required")
		fs.Usage()
		return exitUsage
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitError
	}
	if *check {
		fmt.Fprintf(stdout, "coffred: %s is valid\n", *configPath)
		return exitOK
	}
	log := newLogger(stderr, cfg.Log.Level)
	if err := serve(ctx, cfg, log, nil, announce(stdout)); err != nil {
		log.Error("coffred stopped", "err", err)
		return exitError
	}
	return exitOK
}

func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// announce returns the default listening hook: the one line that scripts
// and tests wait for.
func announce(stdout io.Writer) func(addr string) error {
	return func(addr string) error {
		_, err := fmt.Fprintf(stdout, "coffred: listening on %s\n", addr)
		return err
	}
}
