package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1 // the operation failed
	exitUsage = 2 // the command line is wrong
)

// errUsage marks errors in the command line itself.
var errUsage = errors.New("usage")

// globals are the flags every command accepts. Each defaults from the
// environment variable named beside it; a flag on the command line always
// wins over the environment.
type globals struct {
	server, ca, cert, key string
	timeout               time.Duration
	json                  bool
	// The admin's signing key for quorum approvals, and the file holding
	// its passphrase (never the passphrase itself).
	adminKey, adminPassFile string
	proposalTTL             time.Duration
}

func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.server, "server", os.Getenv("COFFRE_ADDR"), "coffred address `HOST:PORT` (env COFFRE_ADDR)")
	fs.StringVar(&g.ca, "ca", os.Getenv("COFFRE_CA"), "`FILE` with the CA certificate(s) that sign coffred's certificate (env COFFRE_CA)")
	fs.StringVar(&g.cert, "cert", os.Getenv("COFFRE_CERT"), "admin client certificate `FILE` (env COFFRE_CERT)")
	fs.StringVar(&g.key, "key", os.Getenv("COFFRE_KEY"), "admin client private key `FILE` (env COFFRE_KEY)")
	fs.DurationVar(&g.timeout, "timeout", 30*time.Second, "deadline of each call to the server")
	fs.BoolVar(&g.json, "json", false, "print results as JSON")
	fs.StringVar(&g.adminKey, "admin-key", os.Getenv("COFFRE_ADMIN_KEY"), "your admin signing key, a `FILE` or pkcs11: URI, to approve quorum proposals (env COFFRE_ADMIN_KEY)")
	fs.StringVar(&g.adminPassFile, "admin-passphrase-file", os.Getenv("COFFRE_ADMIN_PASSPHRASE_FILE"), "`FILE` holding the admin key's passphrase; without it, it is asked on the terminal (env COFFRE_ADMIN_PASSPHRASE_FILE)")
	fs.DurationVar(&g.proposalTTL, "proposal-ttl", 24*time.Hour, "how long a new proposal waits for approvals (5m to 168h)")
}

// command is one leaf of the command tree.
type command struct {
	path    string // "keyring create"
	args    string // synopsis of the positional arguments
	summary string
	flags   func(fs *flag.FlagSet) // extra flags, may be nil
	run     func(ctx context.Context, e *env, args []string) error
	nargs   int // exact number of positional arguments, -1 for any
}

// env is what a running command has at hand.
type env struct {
	g      globals
	fs     *flag.FlagSet
	stdout io.Writer
	stderr io.Writer
}

func commands() []*command {
	cs := append(keyringCommands(), ceremonyCommands()...)
	cs = append(cs, custodianCommands()...)
	cs = append(cs, attestCommands()...)
	cs = append(cs, enrollmentCommands()...)
	cs = append(cs, auditCommands()...)
	cs = append(cs, storeCommands()...)
	cs = append(cs, backupCommands()...)
	cs = append(cs, proposalCommands()...)
	cs = append(cs, lifecycleCommands()...)
	cs = append(cs, adminKeyCommands()...)
	sort.Slice(cs, func(i, j int) bool { return cs[i].path < cs[j].path })
	return cs
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cs := commands()
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		if len(args) > 1 {
			return run(ctx, append(args[1:], "--help"), stdout, stderr)
		}
		usage(stdout, cs, "")
		return exitOK
	}
	// Find the longest command path that the leading words name.
	var cmd *command
	words := 0
	for _, c := range cs {
		p := strings.Fields(c.path)
		if len(p) <= len(args) && strings.Join(args[:len(p)], " ") == c.path && len(p) > words {
			cmd, words = c, len(p)
		}
	}
	if cmd == nil {
		prefix := args[0]
		if !hasPrefix(cs, prefix) {
			fmt.Fprintf(stderr, "coffrectl: unknown command %q\n\n", prefix)
			usage(stderr, cs, "")
			return exitUsage
		}
		if len(args) > 1 && !strings.HasPrefix(args[1], "-") {
			fmt.Fprintf(stderr, "coffrectl: unknown command %q\n\n", prefix+" "+args[1])
			usage(stderr, cs, prefix)
			return exitUsage
		}
		// "coffrectl keyring" or "coffrectl keyring --help": list its subcommands.
		w := stderr
		code := exitUsage
		if len(args) > 1 && isHelp(args[1]) {
			w, code = stdout, exitOK
		}
		usage(w, cs, prefix)
		return code
	}
	e := &env{stdout: stdout, stderr: stderr}
	fs := flag.NewFlagSet("coffrectl "+cmd.path, flag.ContinueOnError)
	fs.SetOutput(stdout)
	e.g.register(fs)
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	e.fs = fs
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: coffrectl %s [flags] %s\n\n%s\n\nFlags:\n", cmd.path, cmd.args, cmd.summary)
		fs.PrintDefaults()
	}
	pos, err := parseInterleaved(fs, args[words:])
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "coffrectl %s: %v (see coffrectl %s --help)\n", cmd.path, err, cmd.path)
		return exitUsage
	}
	if err := e.g.check(); err != nil {
		fmt.Fprintf(stderr, "coffrectl %s: %v (see coffrectl %s --help)\n", cmd.path, err, cmd.path)
		return exitUsage
	}
	if cmd.nargs >= 0 && len(pos) != cmd.nargs {
		fmt.Fprintf(stderr, "coffrectl %s: want %s, got %d argument(s) (see coffrectl %s --help)\n", cmd.path, cmd.args, len(pos), cmd.path)
		return exitUsage
	}
	if err := cmd.run(ctx, e, pos); err != nil {
		fmt.Fprintf(stderr, "coffrectl %s: %v\n", cmd.path, err)
		if errors.Is(err, errUsage) {
			return exitUsage
		}
		return exitError
	}
	return exitOK
}

// check refuses global flag values out of their documented range, before
// any command runs: a proposal TTL the server would refuse, or one that
// does not fit the request's seconds, is an error here, not a surprise
// after the officer has typed the operation.
func (g *globals) check() error {
	if g.proposalTTL < 5*time.Minute || g.proposalTTL > 168*time.Hour {
		return fmt.Errorf("--proposal-ttl %s: want 5m to 168h", g.proposalTTL)
	}
	if g.timeout <= 0 {
		return fmt.Errorf("--timeout %s: want a positive duration", g.timeout)
	}
	return nil
}

func isHelp(s string) bool {
	return s == "-h" || s == "--help" || s == "-help" || s == "help"
}

func hasPrefix(cs []*command, word string) bool {
	for _, c := range cs {
		if strings.HasPrefix(c.path, word+" ") || c.path == word {
			return true
		}
	}
	return false
}

// parseInterleaved parses flags that may come before, between or after the
// positional arguments ("keyring create acme/disks --json"); "--" ends the
// flags.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if len(args) > 0 && len(rest) < len(args) && args[len(args)-len(rest)-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

func usage(w io.Writer, cs []*command, prefix string) {
	fmt.Fprintln(w, "Usage: coffrectl COMMAND [flags] [arguments]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	width := 0
	for _, c := range cs {
		width = max(width, len(c.path+" "+c.args))
	}
	for _, c := range cs {
		if prefix != "" && !strings.HasPrefix(c.path, prefix+" ") {
			continue
		}
		fmt.Fprintf(w, "  %-*s %s\n", width, c.path+" "+c.args, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Quorum approvals are signed with --admin-key (COFFRE_ADMIN_KEY), its passphrase read from")
	fmt.Fprint(w, "--admin-passphrase-file (COFFRE_ADMIN_PASSPHRASE_FILE) or the terminal.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Every command takes --help. Server commands read COFFRE_ADDR, COFFRE_CA, COFFRE_CERT")
	fmt.Fprintln(w, "and COFFRE_KEY (. var/dev/env sets them for the dev server); flags override them.")
}

// refuseExisting returns an error naming the first of paths that exists
// ("P exists; refusing to overwrite WHAT"), or the error of one that cannot
// be checked: coffrectl never replaces a key, share or backup it writes.
// Lstat, so that a link there is refused too.
func refuseExisting(what string, paths ...string) error {
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s exists; refusing to overwrite %s", p, what)
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}
