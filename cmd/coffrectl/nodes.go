package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"

	"google.golang.org/protobuf/proto"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// maxInputFile bounds certificates and keys read from disk.
const maxInputFile = 64 << 10

func readInput(flagName, path string) ([]byte, error) {
	fi, err := os.Stat(path) // #nosec G703 -- the operator names this file on purpose
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxInputFile {
		return nil, fmt.Errorf("%s: %s is not a regular file of at most %d bytes", flagName, path, maxInputFile)
	}
	return os.ReadFile(path) // #nosec G304 G703 -- the operator names this file
}

func enrollmentCommands() []*command {
	var (
		name, class, ekCert, ekPub string
		labels                     = mapFlag{}
		pcrs                       = pcrFlag{}
		eventLog                   bool
		allowClasses               listFlag
		requireLabels              = mapFlag{}
		release                    string
	)
	return []*command{
		{
			path: "ca add-ek-root", args: "FILE", nargs: 1,
			summary: "Add a TPM manufacturer CA certificate (PEM or DER) that EK certificates must chain to.",
			run: func(ctx context.Context, e *env, args []string) error {
				cert, err := readInput("FILE", args[0])
				if err != nil {
					return err
				}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_AddEkRoot{AddEkRoot: &coffrev1.AddEKRootRequest{Certificate: cert}}}, &coffrev1.EKRoot{})
			},
		},
		{
			path: "ca list", args: "", nargs: 0,
			summary: "List the EK root CAs.",
			run: func(ctx context.Context, e *env, _ []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.ListEKRoots(ctx, &coffrev1.ListEKRootsRequest{})
				})
			},
		},
		{
			path: "node enroll", args: "", nargs: 0,
			summary: "Enroll a machine by its EK certificate (--ek-cert) or pinned EK public key (--ek-pub), with its class and labels.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&name, "name", "", "node `NAME` (like a keyring name part)")
				fs.StringVar(&class, "class", "", "node `CLASS` naming its reference values")
				fs.StringVar(&ekCert, "ek-cert", "", "EK certificate `FILE` (PEM or DER); must chain to an EK root")
				fs.StringVar(&ekPub, "ek-pub", "", "pinned EK public key `FILE` (TPM2B_PUBLIC, TPMT_PUBLIC or PEM) for TPMs without a certificate")
				fs.Var(labels, "label", "`KEY=VALUE` label such as site=qc-1 or jurisdiction=ca-qc (repeatable)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				if name == "" || class == "" {
					return fmt.Errorf("%w: --name and --class are required", errUsage)
				}
				req := &coffrev1.EnrollNodeRequest{Name: name, Class: class, Labels: labels}
				switch {
				case (ekCert == "") == (ekPub == ""):
					return fmt.Errorf("%w: give exactly one of --ek-cert and --ek-pub", errUsage)
				case ekCert != "":
					b, err := readInput("--ek-cert", ekCert)
					if err != nil {
						return err
					}
					req.Ek = &coffrev1.EnrollNodeRequest_EkCertificate{EkCertificate: b}
				default:
					b, err := readInput("--ek-pub", ekPub)
					if err != nil {
						return err
					}
					req.Ek = &coffrev1.EnrollNodeRequest_EkPublic{EkPublic: b}
				}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_EnrollNode{EnrollNode: req}}, &coffrev1.Node{})
			},
		},
		{
			path: "node revoke", args: "NAME", nargs: 1,
			summary: "Revoke a node: its sessions end at once and its EK is refused from now on.",
			run: func(ctx context.Context, e *env, args []string) error {
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_RevokeNode{RevokeNode: &coffrev1.RevokeNodeRequest{Name: args[0]}}}, &coffrev1.Node{})
			},
		},
		{
			path: "node list", args: "", nargs: 0,
			summary: "List enrolled and revoked nodes.",
			run: func(ctx context.Context, e *env, _ []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.ListNodes(ctx, &coffrev1.ListNodesRequest{})
				})
			},
		},
		{
			path: "class set", args: "CLASS", nargs: 1,
			summary: "Create or replace a node class: the SHA-256 PCR values its nodes must quote (--pcr 7=HEX …).",
			flags: func(fs *flag.FlagSet) {
				fs.Var(pcrs, "pcr", "`INDEX=HEX` reference value of a SHA-256 PCR (repeatable)")
				fs.BoolVar(&eventLog, "eventlog", false, "require a TCG event log that replays to the quoted PCRs")
			},
			run: func(ctx context.Context, e *env, args []string) error {
				if len(pcrs) == 0 {
					return fmt.Errorf("%w: at least one --pcr is required: a class without reference values would admit any boot state", errUsage)
				}
				nc := &coffrev1.NodeClass{Name: args[0], RequireEventLog: eventLog}
				idx := make([]int, 0, len(pcrs))
				for i := range pcrs {
					idx = append(idx, int(i))
				}
				sort.Ints(idx)
				for _, i := range idx {
					nc.Pcrs = append(nc.Pcrs, &coffrev1.PCRReference{Index: uint32(i), Sha256: pcrs[uint32(i)]}) // #nosec G115 -- 0..23
				}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_SetNodeClass{SetNodeClass: &coffrev1.SetNodeClassRequest{Class: nc}}}, &coffrev1.NodeClass{})
			},
		},
		{
			path: "keyring policy", args: "TENANT/NAME", nargs: 1,
			summary: "Set which attested nodes may receive the keyring's data keys, and how (--release hpke|tpm).",
			flags: func(fs *flag.FlagSet) {
				fs.Var(&allowClasses, "allow-class", "node `CLASS` allowed (repeatable)")
				fs.Var(requireLabels, "require-label", "`KEY=VALUE` the node must carry, e.g. jurisdiction=ca-qc (repeatable)")
				fs.StringVar(&release, "release", "hpke", "`hpke` (sealed under the session key only the attested node's binding key can derive) or tpm (TPM duplicate blob bound to the class PCRs)")
			},
			run: func(ctx context.Context, e *env, args []string) error {
				var r coffrev1.Release
				switch release {
				case "hpke":
					r = coffrev1.Release_RELEASE_HPKE
				case "tpm":
					r = coffrev1.Release_RELEASE_TPM
				default:
					return fmt.Errorf("%w: --release %q: want hpke or tpm", errUsage, release)
				}
				if len(allowClasses) == 0 {
					return fmt.Errorf("%w: at least one --allow-class is required", errUsage)
				}
				p := &coffrev1.KeyringPolicy{Keyring: args[0], AllowedClasses: allowClasses, RequiredLabels: requireLabels, Release: r}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_SetKeyringPolicy{SetKeyringPolicy: &coffrev1.SetKeyringPolicyRequest{Policy: p}}}, &coffrev1.KeyringPolicy{})
			},
		},
	}
}
