package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/coffre-kms/coffre/cmd/internal/adminkey"
	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"github.com/coffre-kms/coffre/cmd/internal/keyfile"
	"github.com/coffre-kms/coffre/kms/identity"
	"github.com/coffre-kms/coffre/kms/quorum"
)

// devAdminName is the one security officer of the dev environment.
const devAdminName = "dev-admin"

// ensureAdminKey makes the dev admin's signing key (DIR/admin-sign.key,
// passphrase in DIR/admin-sign.pass, public key in DIR/admin-sign.pub) if
// it is missing.
func (e *devEnv) ensureAdminKey(say func(string, ...any)) error {
	if fileExists(e.adminSignKey) && fileExists(e.adminSignPub) && fileExists(e.adminSignPass) {
		return nil
	}
	pass := make([]byte, 24)
	if _, err := rand.Read(pass); err != nil {
		return err
	}
	passText := []byte(base64.RawURLEncoding.EncodeToString(pass))
	file, pub, err := adminkey.Generate(devAdminName, passText, keyfile.DefaultParams)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(e.adminSignPass, append(passText, '\n'), 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(e.adminSignKey, file, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(e.adminSignPub, []byte(pub.String()+"\n"), 0o644); err != nil {
		return err
	}
	say("made the dev admin signing key %s (%s)", e.adminSignKey, pub.Fingerprint())
	return nil
}

// devQuorumSetup installs a 1-of-1 quorum of the dev admin when the store
// has none. Production starts with `coffrectl admin init` and M ≥ 2.
func devQuorumSetup(e *devEnv, stdout io.Writer) func(context.Context, *services) error {
	return func(ctx context.Context, sv *services) error {
		if _, err := sv.quorum.Rule(ctx); err == nil {
			return nil
		} else if !errors.Is(err, quorum.ErrNoQuorum) {
			return err
		}
		b, err := readLimited(e.adminSignPub, 1<<16)
		if err != nil {
			return err
		}
		pub, err := identity.ParsePublicKey(strings.TrimSpace(string(b)))
		if err != nil {
			return fmt.Errorf("%s: %w", e.adminSignPub, err)
		}
		if _, err := sv.quorum.Init(ctx, quorum.SetQuorumArgs{Threshold: 1, Admins: []quorum.AdminSpec{{Name: devAdminName, PublicKey: pub.String()}}}, "coffred dev"); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "coffred dev: quorum is 1 of 1 (%s): development only; production starts with coffrectl admin init and at least 2 of N\n", devAdminName)
		return nil
	}
}
