package main

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/quorum"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// errNotRequested: the server answered a Propose with a proposal that is
// not the operation asked for. Nothing was signed.
var errNotRequested = errors.New("the server's proposal is not the operation you asked for")

// requested is what a proposal of the operation an officer asked for
// must hold in its content, the bytes their approval signs.
type requested struct {
	kind     string
	args     json.RawMessage // canonical, as quorum.CanonicalArgs writes them
	proposer string          // the subject of the caller's admin certificate
	ttl      time.Duration
}

// requestFor returns what the server must put in a proposal of op made by
// the holder of certFile, waiting ttlSeconds (0: the server's default).
func requestFor(op *coffrev1.Operation, certFile string, ttlSeconds uint32) (requested, error) {
	kind, args, err := operationContent(op)
	if err != nil {
		return requested{}, err
	}
	raw, err := quorum.CanonicalArgs(args)
	if err != nil {
		return requested{}, err
	}
	proposer, err := certSubject(certFile)
	if err != nil {
		return requested{}, err
	}
	ttl := time.Duration(ttlSeconds) * time.Second
	if ttl == 0 {
		ttl = quorum.DefaultTTL
	}
	return requested{kind: kind, args: raw, proposer: proposer, ttl: ttl}, nil
}

// certSubject returns the subject of the first certificate in file, which
// is how coffred names the caller as a proposal's proposer.
func certSubject(file string) (string, error) {
	b, err := os.ReadFile(file) // #nosec G304 -- the admin certificate the operator named
	if err != nil {
		return "", fmt.Errorf("--cert: %w", err)
	}
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return "", fmt.Errorf("--cert: %s holds no PEM certificate", file)
		}
		if block.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return "", fmt.Errorf("--cert: %w", err)
			}
			return c.Subject.String(), nil
		}
	}
}

// checkProposed refuses p, the server's answer to a Propose, unless its
// content is exactly the operation asked for (kind and canonical
// arguments), proposed by the caller, for the time asked, and the fields
// shown beside the content agree with it. The server is not trusted to
// choose what an officer signs: a lying one could answer a routine class
// set with a pending backup export, and collect the proposer's approval.
func checkProposed(p *coffrev1.Proposal, want requested) error {
	c, _, err := checkContent(p)
	if err != nil {
		return err
	}
	var diffs []string
	if c.Kind != want.kind {
		diffs = append(diffs, fmt.Sprintf("it is a %s, you asked for a %s", c.Kind, want.kind))
	} else if !bytes.Equal(c.Args, want.args) {
		diffs = append(diffs, fmt.Sprintf("its arguments are %s, you asked for %s", clip(c.Args), clip(want.args)))
	}
	if c.Proposer != want.proposer {
		diffs = append(diffs, fmt.Sprintf("it is proposed by %q, not by you (%q)", c.Proposer, want.proposer))
	}
	if ttl := c.ExpireTime.Sub(c.CreateTime); ttl != want.ttl {
		diffs = append(diffs, fmt.Sprintf("it waits %v for approvals, you asked for %v", ttl, want.ttl))
	}
	if p.GetKind() != c.Kind || p.GetProposer() != c.Proposer {
		diffs = append(diffs, "the kind or proposer it shows is not the one its content holds")
	}
	if len(diffs) > 0 {
		return fmt.Errorf("%w: proposal %s: %s; nothing was signed", errNotRequested, short(p.GetId()), strings.Join(diffs, "; "))
	}
	return nil
}

// clip shortens JSON for an error message.
func clip(b []byte) string {
	const n = 200
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "…"
}

// The canonical arguments of each kind, as coffred writes them into a
// proposal's content (field names and order matter: they are compared
// byte for byte).
type (
	policyArgs struct {
		Keyring        string            `json:"keyring"`
		AllowedClasses []string          `json:"allowed_classes"`
		RequiredLabels map[string]string `json:"required_labels"`
		Release        string            `json:"release"`
	}
	ekRootArgs struct {
		Certificate []byte `json:"certificate"`
	}
	pcrArg struct {
		Index  uint32 `json:"index"`
		SHA256 string `json:"sha256"`
	}
	classArgs struct {
		Name            string   `json:"name"`
		PCRs            []pcrArg `json:"pcrs"`
		RequireEventLog bool     `json:"require_event_log"`
	}
	enrollArgs struct {
		Name          string            `json:"name"`
		Class         string            `json:"class"`
		Labels        map[string]string `json:"labels"`
		EKCertificate []byte            `json:"ek_certificate,omitempty"`
		EKPublic      []byte            `json:"ek_public,omitempty"`
	}
	revokeArgs struct {
		Name string `json:"name"`
	}
	destroyArgs struct {
		Keyring string `json:"keyring"`
		Version uint32 `json:"version"`
		Days    int    `json:"days"`
	}
	rotateRootArgs  struct{}
	destroyRootArgs struct {
		RootID string `json:"root_id"`
	}
	exportArgs struct {
		To string `json:"to"`
	}
)

// operationContent returns the kind and arguments coffred puts in a
// proposal of op. It follows the server's own mapping (operationArgs in
// kms/server), which coffrectl cannot import without the server;
// TestProposedContentMatchesServer holds the two together for every kind.
// An operation it does not know is an error: coffrectl signs nothing it
// cannot check.
func operationContent(op *coffrev1.Operation) (string, any, error) {
	switch o := op.GetOp().(type) {
	case *coffrev1.Operation_SetKeyringPolicy:
		p := o.SetKeyringPolicy.GetPolicy()
		var release string
		switch p.GetRelease() {
		case coffrev1.Release_RELEASE_HPKE:
			release = "hpke"
		case coffrev1.Release_RELEASE_TPM:
			release = "tpm"
		default:
			return "", nil, fmt.Errorf("release %v: want RELEASE_HPKE or RELEASE_TPM", p.GetRelease())
		}
		return "keyring.set_policy", policyArgs{Keyring: p.GetKeyring(), AllowedClasses: nonNil(p.GetAllowedClasses()),
			RequiredLabels: nonNilMap(p.GetRequiredLabels()), Release: release}, nil
	case *coffrev1.Operation_AddEkRoot:
		return "ekroot.add", ekRootArgs{Certificate: o.AddEkRoot.GetCertificate()}, nil
	case *coffrev1.Operation_SetNodeClass:
		c := o.SetNodeClass.GetClass()
		a := classArgs{Name: c.GetName(), RequireEventLog: c.GetRequireEventLog(), PCRs: []pcrArg{}}
		for _, p := range c.GetPcrs() {
			a.PCRs = append(a.PCRs, pcrArg{Index: p.GetIndex(), SHA256: hex.EncodeToString(p.GetSha256())})
		}
		return "class.set", a, nil
	case *coffrev1.Operation_EnrollNode:
		r := o.EnrollNode
		return "node.enroll", enrollArgs{Name: r.GetName(), Class: r.GetClass(), Labels: nonNilMap(r.GetLabels()),
			EKCertificate: r.GetEkCertificate(), EKPublic: r.GetEkPublic()}, nil
	case *coffrev1.Operation_RevokeNode:
		return "node.revoke", revokeArgs{Name: o.RevokeNode.GetName()}, nil
	case *coffrev1.Operation_SetQuorum:
		a := quorum.SetQuorumArgs{Threshold: int(o.SetQuorum.GetThreshold()), Admins: []quorum.AdminSpec{}}
		for _, ad := range o.SetQuorum.GetAdmins() {
			a.Admins = append(a.Admins, quorum.AdminSpec{Name: ad.GetName(), PublicKey: ad.GetPublicKey()})
		}
		return quorum.KindSetQuorum, a, nil
	case *coffrev1.Operation_ScheduleKeyDestruction:
		r := o.ScheduleKeyDestruction
		return "keyring.schedule_destruction", destroyArgs{Keyring: r.GetKeyring(), Version: r.GetVersion(), Days: int(min(r.GetDays(), 1000))}, nil
	case *coffrev1.Operation_RotateRoot:
		return "root.rotate", rotateRootArgs{}, nil
	case *coffrev1.Operation_DestroyRoot:
		return "root.destroy", destroyRootArgs{RootID: o.DestroyRoot.GetRootId()}, nil
	case *coffrev1.Operation_ExportBackup:
		return "backup.export", exportArgs{To: o.ExportBackup.GetTo()}, nil
	default:
		return "", nil, fmt.Errorf("coffrectl cannot check a proposal of this operation (%T), so it does not propose it", op.GetOp())
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func nonNilMap(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}
