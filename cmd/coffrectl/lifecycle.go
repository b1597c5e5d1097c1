package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

func lifecycleCommands() []*command {
	var (
		version   uint
		days      uint
		period    time.Duration
		in, out   string
		to, rooti string
	)
	versionFlag := func(fs *flag.FlagSet) {
		fs.UintVar(&version, "version", 0, "KEK `VERSION`")
	}
	versionCall := func(path, summary string, call func(coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error)) *command {
		return &command{
			path: path, args: "TENANT/NAME", nargs: 1, summary: summary, flags: versionFlag,
			run: func(ctx context.Context, e *env, args []string) error {
				if version == 0 || version > 1<<31 {
					return fmt.Errorf("%w: --version N is required", errUsage)
				}
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return call(c)(ctx, &coffrev1.KeyVersionRequest{Keyring: args[0], Version: uint32(version)}) // #nosec G115 -- checked above
				})
			},
		}
	}
	return []*command{
		versionCall("keyring disable", "Disable a KEK version: it neither encrypts nor decrypts until enabled again.",
			func(c coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
				return func(ctx context.Context, r *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
					return c.DisableKeyVersion(ctx, r)
				}
			}),
		versionCall("keyring enable", "Enable a disabled KEK version again.",
			func(c coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
				return func(ctx context.Context, r *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
					return c.EnableKeyVersion(ctx, r)
				}
			}),
		versionCall("keyring cancel-deletion", "Cancel a scheduled destruction; the version comes back disabled. Use --version 0 for a whole keyring.",
			func(c coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
				return func(ctx context.Context, r *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
					return c.CancelKeyDestruction(ctx, r)
				}
			}),
		versionCall("keyring mark-compromised", "Mark a KEK version compromised: it never encrypts again (a compromised primary is replaced at once); it decrypts only for rewrapping.",
			func(c coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
				return func(ctx context.Context, r *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
					return c.MarkKeyVersionCompromised(ctx, r)
				}
			}),
		versionCall("keyring promote", "Make the staged (pre-active) version the primary; the previous primary keeps decrypting.",
			func(c coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
				return func(ctx context.Context, r *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
					return c.PromoteKeyVersion(ctx, r)
				}
			}),
		{
			path: "keyring add-version", args: "TENANT/NAME", nargs: 1,
			summary: "Stage a new KEK version, pre-active: stored and wrapped, used by nothing until promoted (or the next rotation).",
			run: func(ctx context.Context, e *env, args []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.AddKeyVersion(ctx, &coffrev1.AddKeyVersionRequest{Keyring: args[0]})
				})
			},
		},
		versionCall("keyring min-decryption-version", "Refuse to open envelopes under versions below --version (reversible).",
			func(c coffrev1.AdminServiceClient) func(context.Context, *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
				return func(ctx context.Context, r *coffrev1.KeyVersionRequest) (*coffrev1.Keyring, error) {
					return c.SetMinDecryptionVersion(ctx, r)
				}
			}),
		{
			path: "keyring rotation-period", args: "TENANT/NAME", nargs: 1,
			summary: "Rotate the keyring automatically every --period (0 stops automatic rotation).",
			flags: func(fs *flag.FlagSet) {
				fs.DurationVar(&period, "period", -1, "rotation `PERIOD`, such as 720h (30 days); 0 stops")
			},
			run: func(ctx context.Context, e *env, args []string) error {
				if period < 0 {
					return fmt.Errorf("%w: --period is required", errUsage)
				}
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.SetRotationPeriod(ctx, &coffrev1.SetRotationPeriodRequest{Keyring: args[0], PeriodSeconds: uint64(period / time.Second)}) // #nosec G115 -- non-negative
				})
			},
		},
		{
			path: "keyring schedule-deletion", args: "TENANT/NAME", nargs: 1,
			summary: "Propose destroying a KEK version (or, without --version, the whole keyring) in --days N (7–30): quorum-gated, cancellable until then.",
			flags: func(fs *flag.FlagSet) {
				versionFlag(fs)
				fs.UintVar(&days, "days", 0, "grace period in `DAYS`, 7 to 30")
			},
			run: func(ctx context.Context, e *env, args []string) error {
				if days < 7 || days > 30 {
					return fmt.Errorf("%w: --days %d: a destruction is scheduled 7 to 30 days ahead", errUsage, days)
				}
				if version > 1<<31 {
					return fmt.Errorf("%w: --version %d", errUsage, version)
				}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_ScheduleKeyDestruction{ScheduleKeyDestruction: &coffrev1.ScheduleKeyDestructionRequest{
					Keyring: args[0], Version: uint32(version), Days: uint32(days), // #nosec G115 -- checked above
				}}}, &coffrev1.Keyring{})
			},
		},
		{
			path: "keyring rewrap", args: "", nargs: 0,
			summary: "Move envelopes to their keyring's primary version through the server (the data keys never leave it). Input: JSON lines {\"tenant\",\"envelope\" (base64),\"context\"}.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&in, "in", "", "`FILE` of JSON lines to read (- for stdin)")
				fs.StringVar(&out, "out", "", "`FILE` to write the rewrapped JSON lines to")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if in == "" || out == "" {
					return fmt.Errorf("%w: --in and --out are required", errUsage)
				}
				return rewrap(ctx, e, in, out)
			},
		},
		{
			path: "root rotate", args: "", nargs: 0,
			summary: "Propose rewrapping every KEK version under the server's current HSM root (after a new root's ceremony): quorum-gated.",
			run: func(ctx context.Context, e *env, _ []string) error {
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_RotateRoot{RotateRoot: &coffrev1.RotateRootRequest{}}}, &coffrev1.RootRotation{})
			},
		},
		{
			path: "root destroy", args: "", nargs: 0,
			summary: "Propose destroying a previous HSM root object once no KEK version uses it: quorum-gated.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&rooti, "root-id", "", "the root `ID` as keyring get shows it (pkcs11:token=…;object=…)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if rooti == "" {
					return fmt.Errorf("%w: --root-id is required", errUsage)
				}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_DestroyRoot{DestroyRoot: &coffrev1.DestroyRootRequest{RootId: rooti}}}, &coffrev1.DestroyRootResponse{})
			},
		},
		{
			path: "backup export", args: "", nargs: 0,
			summary: "Propose a signed backup of the store encrypted to a DR site's transfer key (--to): quorum-gated; the server keeps the backup, and the approval that executes it fetches it into --out, checking its size and SHA-256 (backup fetch gets it again, backup delete removes it).",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&to, "to", "", "the DR site's transfer public key, coffre-xwing1:… or a `FILE` holding it")
				fs.StringVar(&out, "out", "", "`FILE` to write the backup to when the proposal executes")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if to == "" || out == "" {
					return fmt.Errorf("%w: --to and --out are required", errUsage)
				}
				key, err := readKeyLine(to, "coffre-xwing1:")
				if err != nil {
					return fmt.Errorf("--to: %w", err)
				}
				if err := refuseExisting("it", out); err != nil {
					return fmt.Errorf("--out: %w", err)
				}
				return withBackupOut(e, out, func(e *env) error {
					return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_ExportBackup{ExportBackup: &coffrev1.ExportBackupRequest{To: key}}}, &coffrev1.ExportBackupResponse{})
				})
			},
		},
	}
}

// readKeyLine takes a public key inline (it starts with prefix) or from the
// first such line of a file.
func readKeyLine(v, prefix string) (string, error) {
	if strings.HasPrefix(v, prefix) {
		return v, nil
	}
	b, err := readInput("key file", v)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); strings.HasPrefix(line, prefix) {
			return line, nil
		}
	}
	return "", fmt.Errorf("%s holds no %s key line", v, prefix)
}

// backupOut is where an executed backup.export is fetched to (--out of
// backup export, or of the proposal approve that executes it).
var backupOut string

func withBackupOut(e *env, path string, f func(*env) error) error {
	backupOut = path
	defer func() { backupOut = "" }()
	return f(e)
}

// rewrapLine is one envelope of keyring rewrap's input and output.
type rewrapLine struct {
	Tenant   string            `json:"tenant"`
	Envelope string            `json:"envelope"` // base64
	Context  map[string]string `json:"context,omitempty"`
}

// maxRewrapLine bounds one input line (an envelope is under 1 KiB).
const maxRewrapLine = 64 << 10

func rewrap(ctx context.Context, e *env, in, out string) error {
	var r io.Reader = os.Stdin
	if in != "-" {
		f, err := os.Open(in) // #nosec G304 -- the operator names the file
		if err != nil {
			return err
		}
		defer f.Close()
		r = f
	}
	var lines []rewrapLine
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxRewrapLine)
	for n := 1; sc.Scan(); n++ {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var l rewrapLine
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&l); err != nil {
			return fmt.Errorf("%s line %d: %v", in, n, err)
		}
		if _, err := base64.StdEncoding.DecodeString(l.Envelope); err != nil {
			return fmt.Errorf("%s line %d: envelope: %v", in, n, err)
		}
		lines = append(lines, l)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	c, closeConn, err := adminClient(e.g)
	if err != nil {
		return err
	}
	defer closeConn()
	changed := 0
	start := time.Now()
	// Everything is read and checked first, and the output is written
	// only once every envelope is rewrapped: a failure leaves no half file.
	for i := range lines {
		env, _ := base64.StdEncoding.DecodeString(lines[i].Envelope)
		cctx, cancel := context.WithTimeout(ctx, e.g.timeout)
		resp, err := c.RewrapEnvelope(cctx, &coffrev1.RewrapEnvelopeRequest{Tenant: lines[i].Tenant, Envelope: env, Context: lines[i].Context})
		cancel()
		if err != nil {
			fmt.Fprintln(e.stderr)
			return fmt.Errorf("envelope %d of %d: %w (nothing written)", i+1, len(lines), rpcError(err))
		}
		if resp.GetChanged() {
			changed++
		}
		lines[i].Envelope = base64.StdEncoding.EncodeToString(resp.GetEnvelope())
		progressBar(e.stderr, i+1, len(lines), start)
	}
	if err := atomicfile.Write(out, 0o600, func(w io.Writer) error {
		enc := json.NewEncoder(w)
		for _, l := range lines {
			if err := enc.Encode(l); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "rewrapped  %d of %d envelopes (%d already under the primary version)\nwritten    %s\n", changed, len(lines), len(lines)-changed, out)
	return nil
}

// progressBar draws a one-line progress bar on w (stderr).
func progressBar(w io.Writer, done, total int, start time.Time) {
	const width = 30
	if total == 0 {
		return
	}
	filled := done * width / total
	rate := float64(done) / max(time.Since(start).Seconds(), 1e-3)
	fmt.Fprintf(w, "\r[%s%s] %d/%d %s/s", strings.Repeat("#", filled), strings.Repeat(".", width-filled), done, total, strconv.FormatFloat(rate, 'f', 0, 64))
	if done == total {
		fmt.Fprintln(w)
	}
}
