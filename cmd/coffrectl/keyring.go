package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

func keyringCommands() []*command {
	var tenant string
	return []*command{
		{
			path: "keyring create", args: "TENANT/NAME", nargs: 1,
			summary: "Create a keyring with its first KEK version, wrapped by the HSM root.",
			run: func(ctx context.Context, e *env, args []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.CreateKeyring(ctx, &coffrev1.CreateKeyringRequest{Id: args[0]})
				})
			},
		},
		{
			path: "keyring get", args: "TENANT/NAME", nargs: 1,
			summary: "Describe a keyring and its KEK versions (never key material).",
			run: func(ctx context.Context, e *env, args []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.GetKeyring(ctx, &coffrev1.GetKeyringRequest{Id: args[0]})
				})
			},
		},
		{
			path: "keyring list", args: "", nargs: 0,
			summary: "List keyrings, of one tenant with --tenant.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&tenant, "tenant", "", "list only this tenant's keyrings")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.ListKeyrings(ctx, &coffrev1.ListKeyringsRequest{Tenant: tenant})
				})
			},
		},
		{
			path: "keyring rotate", args: "TENANT/NAME", nargs: 1,
			summary: "Add a KEK version and make it the primary; older versions keep decrypting.",
			run: func(ctx context.Context, e *env, args []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.RotateKeyring(ctx, &coffrev1.RotateKeyringRequest{Id: args[0]})
				})
			},
		},
	}
}

// adminCall makes one AdminService call with the global deadline and prints
// its answer.
func adminCall(ctx context.Context, e *env, call func(context.Context, coffrev1.AdminServiceClient) (proto.Message, error)) error {
	c, closeConn, err := adminClient(e.g)
	if err != nil {
		return err
	}
	defer closeConn()
	ctx, cancel := context.WithTimeout(ctx, e.g.timeout)
	defer cancel()
	m, err := call(ctx, c)
	if err != nil {
		return rpcError(err)
	}
	return printMessage(e.stdout, m, e.g.json)
}

func printMessage(w io.Writer, m proto.Message, asJSON bool) error {
	if asJSON {
		b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
		if err != nil {
			return err
		}
		// protojson varies its whitespace on purpose; scripts get a stable
		// layout.
		var out bytes.Buffer
		if err := json.Indent(&out, b, "", "  "); err != nil {
			return err
		}
		out.WriteByte('\n')
		_, err = w.Write(out.Bytes())
		return err
	}
	switch m := m.(type) {
	case *coffrev1.Keyring:
		return printKeyring(w, m)
	case *coffrev1.ListKeyringsResponse:
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "KEYRING\tPRIMARY\tVERSIONS\tCREATED")
		for _, k := range m.GetKeyrings() {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", k.GetId(), k.GetPrimaryVersion(), len(k.GetVersions()), stamp(k.GetCreateTime().AsTime()))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	case *coffrev1.EKRoot:
		fmt.Fprintf(w, "EK root  %s\nsubject  %s\nexpires  %s\n", m.GetFingerprint(), m.GetSubject(), stamp(m.GetNotAfter().AsTime()))
	case *coffrev1.ListEKRootsResponse:
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "FINGERPRINT\tSUBJECT\tEXPIRES")
		for _, r := range m.GetRoots() {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", r.GetFingerprint(), r.GetSubject(), stamp(r.GetNotAfter().AsTime()))
		}
		return tw.Flush()
	case *coffrev1.Node:
		printNode(w, m)
	case *coffrev1.ListNodesResponse:
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NODE\tCLASS\tSTATE\tLABELS\tEK")
		for _, n := range m.GetNodes() {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.GetName(), n.GetClass(), nodeState(n.GetState()), mapFlag(n.GetLabels()).String(), n.GetEkFingerprint())
		}
		return tw.Flush()
	case *coffrev1.NodeClass:
		fmt.Fprintf(w, "class     %s\neventlog  %v\n", m.GetName(), m.GetRequireEventLog())
		for _, p := range m.GetPcrs() {
			fmt.Fprintf(w, "pcr %-5d %x\n", p.GetIndex(), p.GetSha256())
		}
	case *coffrev1.KeyringPolicy:
		fmt.Fprintf(w, "keyring        %s\nallow-class    %s\nrequire-label  %s\nrelease        %s\n",
			m.GetKeyring(), strings.Join(m.GetAllowedClasses(), ","), mapFlag(m.GetRequiredLabels()).String(), releaseName(m.GetRelease()))
	case *coffrev1.Proposal:
		return printProposal(w, m, false)
	case *coffrev1.Quorum:
		return printQuorum(w, m)
	case *coffrev1.RootRotation:
		fmt.Fprintf(w, "root       %s\nkeyrings   %d\nrewrapped  %d KEK versions\n", m.GetRootId(), m.GetKeyrings(), m.GetVersionsRewrapped())
	case *coffrev1.DestroyRootResponse:
		fmt.Fprintf(w, "destroyed root %s\n", m.GetRootId())
	default:
		return fmt.Errorf("cannot print %T", m)
	}
	return nil
}

func printKeyring(w io.Writer, k *coffrev1.Keyring) error {
	fmt.Fprintf(w, "keyring  %s\ncreated  %s\nprimary  %d\n\n", k.GetId(), stamp(k.GetCreateTime().AsTime()), k.GetPrimaryVersion())
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tSTATE\tCREATED\tROOT")
	for _, v := range k.GetVersions() {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s", v.GetVersion(), stateName(v.GetState()), stamp(v.GetCreateTime().AsTime()), v.GetRootId())
		switch v.GetState() {
		case coffrev1.KeyState_KEY_STATE_DESTROY_SCHEDULED:
			fmt.Fprintf(tw, "\tdestroyed at %s", stamp(v.GetDestroyTime().AsTime()))
		case coffrev1.KeyState_KEY_STATE_DESTROYED:
			fmt.Fprintf(tw, "\tdestroyed %s", stamp(v.GetDestroyTime().AsTime()))
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if p := k.GetRotationPeriodSeconds(); p > 0 {
		fmt.Fprintf(w, "\nrotation every %s, next at %s\n", time.Duration(min(p, 1<<32))*time.Second, stamp(k.GetNextRotationTime().AsTime())) // #nosec G115 -- bounded
	}
	if m := k.GetMinDecryptionVersion(); m > 1 {
		fmt.Fprintf(w, "min-decryption-version %d\n", m)
	}
	return nil
}

func printNode(w io.Writer, n *coffrev1.Node) {
	fmt.Fprintf(w, "node      %s\nclass     %s\nstate     %s\nlabels    %s\nek        %s\nenrolled  %s\n",
		n.GetName(), n.GetClass(), nodeState(n.GetState()), mapFlag(n.GetLabels()).String(), n.GetEkFingerprint(), stamp(n.GetEnrollTime().AsTime()))
	if n.GetRevokeTime() != nil {
		fmt.Fprintf(w, "revoked   %s\n", stamp(n.GetRevokeTime().AsTime()))
	}
}

func nodeState(s coffrev1.NodeState) string {
	switch s {
	case coffrev1.NodeState_NODE_STATE_ENROLLED:
		return "enrolled"
	case coffrev1.NodeState_NODE_STATE_REVOKED:
		return "revoked"
	}
	return s.String()
}

func releaseName(r coffrev1.Release) string {
	switch r {
	case coffrev1.Release_RELEASE_HPKE:
		return "hpke"
	case coffrev1.Release_RELEASE_TPM:
		return "tpm"
	}
	return r.String()
}

func stateName(s coffrev1.KeyState) string {
	switch s {
	case coffrev1.KeyState_KEY_STATE_ACTIVE:
		return "active"
	case coffrev1.KeyState_KEY_STATE_DEACTIVATED:
		return "deactivated"
	case coffrev1.KeyState_KEY_STATE_DISABLED:
		return "disabled"
	case coffrev1.KeyState_KEY_STATE_DESTROY_SCHEDULED:
		return "destroy-scheduled"
	case coffrev1.KeyState_KEY_STATE_DESTROYED:
		return "destroyed"
	case coffrev1.KeyState_KEY_STATE_COMPROMISED:
		return "compromised"
	case coffrev1.KeyState_KEY_STATE_PRE_ACTIVE:
		return "pre-active"
	}
	return s.String()
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }
