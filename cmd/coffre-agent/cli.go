package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/coffre-kms/coffre/attest/agent"
)

const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

var errUsage = errors.New("usage")

// globals are the flags of every command; each defaults from the
// environment variable beside it, and a flag always wins.
type globals struct {
	server, ca, tpm string
	timeout         time.Duration
	json            bool
}

func (g *globals) register(fs *flag.FlagSet) {
	fs.StringVar(&g.server, "server", os.Getenv("COFFRE_ADDR"), "coffred address `HOST:PORT` (env COFFRE_ADDR)")
	fs.StringVar(&g.ca, "ca", os.Getenv("COFFRE_CA"), "`FILE` with the CA certificate(s) of coffred's TLS certificate (env COFFRE_CA)")
	fs.StringVar(&g.tpm, "tpm", envOr("COFFRE_TPM", "/dev/tpmrm0"), "the TPM: /dev/tpmrm0, swtpm://HOST:PORT, unix:///PATH, simulator or simulator:SEED (env COFFRE_TPM)")
	fs.DurationVar(&g.timeout, "timeout", 60*time.Second, "deadline for the whole command")
	fs.BoolVar(&g.json, "json", false, "print results as JSON")
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// command is one command of the agent.
type command struct {
	name, args, summary string
	flags               func(fs *flag.FlagSet)
	run                 func(ctx context.Context, e *env) error
}

type env struct {
	g      globals
	stdout io.Writer
	stderr io.Writer
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cs := commands()
	if len(args) == 0 || isHelp(args[0]) {
		if len(args) > 1 {
			return run(ctx, []string{args[1], "--help"}, stdout, stderr)
		}
		usage(stdout, cs)
		return exitOK
	}
	var cmd *command
	for _, c := range cs {
		if c.name == args[0] {
			cmd = c
		}
	}
	if cmd == nil {
		fmt.Fprintf(stderr, "coffre-agent: unknown command %q\n\n", args[0])
		usage(stderr, cs)
		return exitUsage
	}
	e := &env{stdout: stdout, stderr: stderr}
	fs := flag.NewFlagSet("coffre-agent "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stdout)
	e.g.register(fs)
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: coffre-agent %s [flags]%s\n\n%s\n\nFlags:\n", cmd.name, cmd.args, cmd.summary)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		fmt.Fprintf(stderr, "coffre-agent %s: %v\n", cmd.name, err)
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "coffre-agent %s: unexpected argument %q (see --help)\n", cmd.name, fs.Arg(0))
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(ctx, e.g.timeout)
	defer cancel()
	if err := cmd.run(ctx, e); err != nil {
		fmt.Fprintf(stderr, "coffre-agent %s: %v\n", cmd.name, err)
		if errors.Is(err, errUsage) {
			return exitUsage
		}
		return exitError
	}
	return exitOK
}

func isHelp(s string) bool { return s == "-h" || s == "--help" || s == "-help" || s == "help" }

func usage(w io.Writer, cs []*command) {
	fmt.Fprintln(w, "Usage: coffre-agent COMMAND [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commands:")
	for _, c := range cs {
		fmt.Fprintf(w, "  %-14s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Every command takes --help. --server, --ca and --tpm default to COFFRE_ADDR, COFFRE_CA and")
	fmt.Fprintln(w, "COFFRE_TPM (. var/dev/env sets them for the dev server); flags override them.")
}

// maxCallMessage bounds what the agent accepts from coffred.
const maxCallMessage = 4 << 20

// connect opens the TPM, makes the agent and dials coffred. The returned
// function releases all three.
func connect(ctx context.Context, g globals) (*agent.Client, *agent.Agent, func(), error) {
	if g.server == "" || g.ca == "" {
		return nil, nil, nil, fmt.Errorf("%w: --server (or COFFRE_ADDR) and --ca (or COFFRE_CA) are required; for the dev server run: . var/dev/env", errUsage)
	}
	caPEM, err := os.ReadFile(g.ca)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, nil, nil, fmt.Errorf("--ca: %s holds no PEM certificate", g.ca)
	}
	t, err := agent.OpenTPM(g.tpm)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--tpm %s: %w", g.tpm, err)
	}
	a, err := agent.New(ctx, t, agent.Options{})
	if err != nil {
		_ = t.Close() // already failing; err says why
		return nil, nil, nil, fmt.Errorf("TPM %s: %w", g.tpm, err)
	}
	conn, err := grpc.NewClient(g.server,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool})),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxCallMessage)),
	)
	if err != nil {
		_ = a.Close() // already failing; err says why
		_ = t.Close()
		return nil, nil, nil, err
	}
	release := func() {
		_ = conn.Close()
		_ = a.Close()
		_ = t.Close()
	}
	return agent.NewClient(conn, a, agent.ClientOptions{}), a, release, nil
}

// rpcError turns a gRPC status into a plain error.
func rpcError(err error) error {
	if s, ok := status.FromError(err); ok {
		return errors.New(s.Code().String() + ": " + s.Message())
	}
	return err
}

// wrappedKey is the file `datakey --out-wrapped` writes and `decrypt
// --in-wrapped` reads: the envelope and the context it is bound to. It holds
// no secret.
type wrappedKey struct {
	Format     string            `json:"format"`
	Keyring    string            `json:"keyring"`
	KeyVersion uint32            `json:"key_version,omitempty"`
	Envelope   string            `json:"envelope"` // base64
	Context    map[string]string `json:"context,omitempty"`
}

const wrappedFormat = "coffre-wrapped-key-v1"

func readWrapped(path string) (*wrappedKey, []byte, error) {
	b, err := readSmall(path, 64<<10)
	if err != nil {
		return nil, nil, err
	}
	var w wrappedKey
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return nil, nil, fmt.Errorf("%s: not a wrapped key file: %v", path, err)
	}
	if w.Format != wrappedFormat {
		return nil, nil, fmt.Errorf("%s: format %q, want %q", path, w.Format, wrappedFormat)
	}
	env, err := base64.StdEncoding.DecodeString(w.Envelope)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: envelope: %v", path, err)
	}
	return &w, env, nil
}

func readSmall(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path) // #nosec G304 -- the operator names this file
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, limit)
	}
	return b, nil
}
