package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/kms/quorum"
	"github.com/coffre-kms/coffre/kms/server"
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
	kind, args, err := server.OperationContent(op)
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
