package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/term"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/coffre-kms/coffre/cmd/internal/adminkey"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/quorum"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// loadAdminSigner opens the admin signing key named by --admin-key (a file
// or a pkcs11: URI).
func loadAdminSigner(ctx context.Context, e *env) (identity.Signer, func() error, error) {
	if e.g.adminKey == "" {
		return nil, nil, fmt.Errorf("%w: no admin signing key: give --admin-key FILE|pkcs11:URI (or COFFRE_ADMIN_KEY)", errUsage)
	}
	return adminkey.Load(ctx, e.g.adminKey, func() ([]byte, error) {
		return keyfile.ReadPassphrase(e.g.adminPassFile, "passphrase of admin key "+e.g.adminKey+": ", e.stderr)
	})
}

// checkContent recomputes a proposal's hash from the content it carries:
// an admin signs what they were shown, never an id the server chose.
func checkContent(p *coffrev1.Proposal) (quorum.Content, [32]byte, error) {
	h := sha256.Sum256(p.GetContent())
	if hex.EncodeToString(h[:]) != p.GetId() {
		return quorum.Content{}, h, fmt.Errorf("the server's proposal %s does not hash to its id: refusing to sign", p.GetId())
	}
	c, err := quorum.ParseContent(p.GetContent())
	if err != nil {
		return c, h, fmt.Errorf("proposal %s: %w", p.GetId(), err)
	}
	return c, h, nil
}

// decide signs decision on p with the admin key and sends it.
func decide(ctx context.Context, e *env, c coffrev1.AdminServiceClient, p *coffrev1.Proposal, decision string) (*coffrev1.Proposal, error) {
	_, h, err := checkContent(p)
	if err != nil {
		return nil, err
	}
	signer, closeKey, err := loadAdminSigner(ctx, e)
	if err != nil {
		return nil, err
	}
	defer func() { _ = closeKey() }()
	sig, err := signer.Sign(ctx, quorum.ApprovalMessage(h, decision))
	if err != nil {
		return nil, fmt.Errorf("signing with the admin key: %w", err)
	}
	out, err := c.DecideProposal(ctx, &coffrev1.DecideProposalRequest{
		Id: p.GetId(), Decision: decision, PublicKey: signer.Public().String(), Signature: sig,
	})
	return out, rpcError(err)
}

// gatedCall proposes op and, when an admin key is at hand, approves it at
// once as the proposer's own approval. If that reaches the quorum the
// operation has run and its result is printed like the direct call's
// answer (into result); otherwise the pending proposal is shown with the
// command the other officers run. The server's answer is refused, and
// nothing signed, unless it holds op as asked (see checkProposed).
func gatedCall(ctx context.Context, e *env, op *coffrev1.Operation, result proto.Message) error {
	c, closeConn, err := adminClient(e.g)
	if err != nil {
		return err
	}
	defer closeConn()
	req := &coffrev1.ProposeRequest{Operation: op, TtlSeconds: uint32(e.g.proposalTTL / time.Second)} // #nosec G115 -- bounded by the flag check
	// An operation the server's mapping refuses (a malformed policy, say)
	// is still sent, so that the officer reads the server's own refusal;
	// if the server took it anyway, nothing is signed.
	want, wantErr := requestFor(op, e.g.cert, req.GetTtlSeconds())
	parent := ctx // the fetch of an executed backup export times its own calls
	ctx, cancel := context.WithTimeout(ctx, e.g.timeout)
	defer cancel()
	p, err := c.Propose(ctx, req)
	if err != nil {
		return rpcError(err)
	}
	if wantErr != nil {
		return fmt.Errorf("%w; nothing was signed", wantErr)
	}
	if err := checkProposed(p, want); err != nil {
		return err
	}
	if e.g.adminKey != "" {
		if p, err = decide(ctx, e, c, p, quorum.Approve); err != nil {
			return err
		}
	}
	return finish(parent, e, c, p, result)
}

// finish prints the outcome of a proposal the caller just made or decided.
// An executed backup export is fetched into backupOut, each call of the
// fetch with its own --timeout.
func finish(ctx context.Context, e *env, c coffrev1.AdminServiceClient, p *coffrev1.Proposal, result proto.Message) error {
	switch p.GetState() {
	case quorum.StateExecuted:
		fmt.Fprintf(e.stderr, "proposal %s executed (%s approvals)\n", short(p.GetId()), approvalCount(p))
		if result == nil || len(p.GetResult()) == 0 {
			return printProposal(e.stdout, p, e.g.json)
		}
		if err := protojson.Unmarshal(p.GetResult(), result); err != nil {
			return fmt.Errorf("proposal %s executed, but its result does not parse: %w", short(p.GetId()), err)
		}
		if b, ok := result.(*coffrev1.ExportBackupResponse); ok {
			return finishExport(ctx, e, c, p, b)
		}
		return printMessage(e.stdout, result, e.g.json)
	case quorum.StateFailed:
		return fmt.Errorf("proposal %s was approved but the operation failed: %s", short(p.GetId()), p.GetError())
	default:
		if err := printProposal(e.stdout, p, e.g.json); err != nil {
			return err
		}
		if p.GetState() == quorum.StatePending {
			more := ""
			if p.GetKind() == kindExportBackup {
				more = " --out FILE"
			}
			fmt.Fprintf(e.stderr, "proposal %s has %s approvals; each other officer runs: coffrectl proposal approve %s%s\n",
				short(p.GetId()), approvalCount(p), short(p.GetId()), more)
		}
		return nil
	}
}

func short(id string) string {
	if len(id) > 16 {
		return id[:16]
	}
	return id
}

func approvalCount(p *coffrev1.Proposal) string {
	n := 0
	for _, d := range p.GetDecisions() {
		if d.GetDecision() == quorum.Approve {
			n++
		}
	}
	return fmt.Sprintf("%d of %d", n, p.GetThreshold())
}

func printProposal(w io.Writer, p *coffrev1.Proposal, asJSON bool) error {
	if asJSON {
		return printMessage(w, p, true)
	}
	fmt.Fprintf(w, "proposal   %s\nkind       %s\nstate      %s\napprovals  %s\nproposer   %s\ncreated    %s\nexpires    %s\n",
		p.GetId(), p.GetKind(), p.GetState(), approvalCount(p), p.GetProposer(),
		stamp(p.GetCreateTime().AsTime()), stamp(p.GetExpireTime().AsTime()))
	for _, d := range p.GetDecisions() {
		fmt.Fprintf(w, "%-10s %s (%s) at %s\n", d.GetDecision(), d.GetAdminName(), d.GetAdminId(), stamp(d.GetTime().AsTime()))
	}
	if c, err := quorum.ParseContent(p.GetContent()); err == nil {
		var args bytes.Buffer
		if json.Indent(&args, c.Args, "           ", "  ") == nil {
			fmt.Fprintf(w, "arguments  %s\n", args.String())
		}
	}
	if p.GetError() != "" {
		fmt.Fprintf(w, "error      %s\n", p.GetError())
	}
	if len(p.GetResult()) > 0 {
		var res bytes.Buffer
		if json.Indent(&res, p.GetResult(), "           ", "  ") == nil {
			fmt.Fprintf(w, "result     %s\n", res.String())
		}
	}
	return nil
}

func proposalCommands() []*command {
	var (
		state     string
		threshold int
		admins    = mapFlag{}
		out       string
		yes       bool
		limit     uint
	)
	decideCmd := func(decision string) *command {
		return &command{
			path: "proposal " + decision, args: "ID", nargs: 1,
			summary: "Sign and send your " + decision + " of a proposal (ID or a unique prefix), after checking that its content hashes to its id.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&out, "out", "", "`FILE` to write the backup to, if this approval executes a backup export (required to approve one; must not exist)")
				fs.BoolVar(&yes, "yes", false, "do not ask for confirmation on a terminal (the content is still printed)")
			},
			run: func(ctx context.Context, e *env, args []string) error {
				backupOut = out
				defer func() { backupOut = "" }()
				c, closeConn, err := adminClient(e.g)
				if err != nil {
					return err
				}
				defer closeConn()
				cctx, cancel := context.WithTimeout(ctx, e.g.timeout)
				defer cancel()
				p, err := c.GetProposal(cctx, &coffrev1.GetProposalRequest{Id: args[0]})
				if err != nil {
					return rpcError(err)
				}
				// Any approval may turn out to be the one that executes an
				// export (others may approve meanwhile): where its backup
				// goes is settled before anything is signed.
				if c, _, err := checkContent(p); err == nil && decision == quorum.Approve && c.Kind == kindExportBackup {
					if out == "" {
						return fmt.Errorf("%w: approving a backup export needs --out FILE, where the approval that executes it writes the backup; nothing was signed", errUsage)
					}
					if err := refuseExisting("it", out); err != nil {
						return fmt.Errorf("--out: %w; nothing was signed", err)
					}
				}
				if err := confirm(e, p, decision, yes); err != nil {
					return err
				}
				p, err = decide(cctx, e, c, p, decision)
				if err != nil {
					return err
				}
				return finish(ctx, e, c, p, resultFor(p.GetKind()))
			},
		}
	}
	adminSpecs := func() (*coffrev1.SetQuorumRequest, error) {
		if threshold <= 0 || len(admins) == 0 {
			return nil, fmt.Errorf("%w: --threshold M and at least one --admin NAME=PUBKEY|FILE are required", errUsage)
		}
		req := &coffrev1.SetQuorumRequest{Threshold: uint32(threshold)} // #nosec G115 -- checked positive, bounded by the server
		for _, name := range sortedKeys(admins) {
			pub, err := readKeyLine(admins[name], "coffre-admin1:")
			if err != nil {
				return nil, fmt.Errorf("--admin %s: %w", name, err)
			}
			req.Admins = append(req.Admins, &coffrev1.QuorumAdmin{Name: name, PublicKey: pub})
		}
		return req, nil
	}
	quorumFlags := func(fs *flag.FlagSet) {
		fs.IntVar(&threshold, "threshold", 0, "`M`: approvals needed")
		fs.Var(admins, "admin", "`NAME=PUBKEY` an admin and their public key (coffre-admin1:… or a file holding it); repeat for each")
	}
	return []*command{
		{
			path: "proposal list", args: "", nargs: 0,
			summary: "List proposals, newest first.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&state, "state", "", "only proposals in `STATE` (pending, executed, failed, rejected, expired, executing)")
				fs.UintVar(&limit, "limit", 100, "at most `N` proposals, newest first (up to 1000)")
			},
			run: func(ctx context.Context, e *env, _ []string) error {
				c, closeConn, err := adminClient(e.g)
				if err != nil {
					return err
				}
				defer closeConn()
				ctx, cancel := context.WithTimeout(ctx, e.g.timeout)
				defer cancel()
				if limit == 0 || limit > 1000 {
					return fmt.Errorf("%w: --limit %d: 1 to 1000", errUsage, limit)
				}
				resp, err := c.ListProposals(ctx, &coffrev1.ListProposalsRequest{State: state, Limit: uint32(limit)}) // #nosec G115 -- checked above
				if err != nil {
					return rpcError(err)
				}
				if e.g.json {
					return printMessage(e.stdout, resp, true)
				}
				tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tKIND\tSTATE\tAPPROVALS\tEXPIRES\tPROPOSER")
				for _, p := range resp.GetProposals() {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", short(p.GetId()), p.GetKind(), p.GetState(),
						approvalCount(p), stamp(p.GetExpireTime().AsTime()), p.GetProposer())
				}
				return tw.Flush()
			},
		},
		{
			path: "proposal show", args: "ID", nargs: 1,
			summary: "Show a proposal: its canonical content, decisions and result.",
			run: func(ctx context.Context, e *env, args []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					p, err := c.GetProposal(ctx, &coffrev1.GetProposalRequest{Id: args[0]})
					if err != nil {
						return nil, err
					}
					if _, _, err := checkContent(p); err != nil {
						return nil, err
					}
					return p, nil
				})
			},
		},
		decideCmd(quorum.Approve),
		decideCmd(quorum.Reject),
		{
			path: "admin init", args: "", nargs: 0,
			summary: "Install the first admin set and threshold (once; later changes are quorum proposals: admin set-quorum).",
			flags:   quorumFlags,
			run: func(ctx context.Context, e *env, _ []string) error {
				req, err := adminSpecs()
				if err != nil {
					return err
				}
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.InitQuorum(ctx, req)
				})
			},
		},
		{
			path: "admin set-quorum", args: "", nargs: 0,
			summary: "Propose a new admin set and threshold (admins left out are revoked for good).",
			flags:   quorumFlags,
			run: func(ctx context.Context, e *env, _ []string) error {
				req, err := adminSpecs()
				if err != nil {
					return err
				}
				return gatedCall(ctx, e, &coffrev1.Operation{Op: &coffrev1.Operation_SetQuorum{SetQuorum: req}}, nil)
			},
		},
		{
			path: "admin list", args: "", nargs: 0,
			summary: "Show the admin set and the threshold.",
			run: func(ctx context.Context, e *env, _ []string) error {
				return adminCall(ctx, e, func(ctx context.Context, c coffrev1.AdminServiceClient) (proto.Message, error) {
					return c.GetQuorum(ctx, &coffrev1.GetQuorumRequest{})
				})
			},
		},
	}
}

// kindExportBackup is the kind of a backup export proposal.
const kindExportBackup = "backup.export"

// resultFor returns an empty message of the type a kind's result holds.
func resultFor(kind string) proto.Message {
	switch kind {
	case "keyring.set_policy":
		return &coffrev1.KeyringPolicy{}
	case "ekroot.add":
		return &coffrev1.EKRoot{}
	case "class.set":
		return &coffrev1.NodeClass{}
	case "node.enroll", "node.revoke":
		return &coffrev1.Node{}
	case "keyring.schedule_destruction":
		return &coffrev1.Keyring{}
	case "root.rotate":
		return &coffrev1.RootRotation{}
	case "root.destroy":
		return &coffrev1.DestroyRootResponse{}
	case kindExportBackup:
		return &coffrev1.ExportBackupResponse{}
	}
	return nil
}

func printQuorum(w io.Writer, q *coffrev1.Quorum) error {
	fmt.Fprintf(w, "quorum     %d of %d (version %d)\n", q.GetThreshold(), len(q.GetAdmins()), q.GetVersion())
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ADMIN\tID\tSTATE")
	for _, a := range q.GetAdmins() {
		fmt.Fprintf(tw, "%s\t%s\tactive\n", a.GetName(), a.GetId())
	}
	for _, a := range q.GetRevoked() {
		fmt.Fprintf(tw, "%s\t%s\trevoked\n", a.GetName(), a.GetId())
	}
	return tw.Flush()
}

// confirm shows the officer what they are about to sign — the operation
// as the hash covers it — and, on a terminal, asks them to type the start
// of the proposal id back.
func confirm(e *env, p *coffrev1.Proposal, decision string, yes bool) error {
	c, _, err := checkContent(p)
	if err != nil {
		return err
	}
	var args bytes.Buffer
	if err := json.Indent(&args, c.Args, "  ", "  "); err != nil {
		return fmt.Errorf("proposal %s: arguments: %w", short(p.GetId()), err)
	}
	fmt.Fprintf(e.stderr, "You are about to %s proposal %s (%s), proposed by %s, expiring %s:\n  %s\n",
		decision, p.GetId(), c.Kind, c.Proposer, stamp(c.ExpireTime), args.String())
	if yes || !term.IsTerminal(int(os.Stdin.Fd())) { // #nosec G115 -- a file descriptor
		return nil
	}
	fmt.Fprintf(e.stderr, "Type the first 8 characters of the proposal id to sign: ")
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if strings.TrimSpace(line) != p.GetId()[:8] {
		return errors.New("not confirmed: nothing was signed")
	}
	return nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
