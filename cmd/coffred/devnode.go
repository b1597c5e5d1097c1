package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"

	"github.com/coffre-kms/coffre/kms"
)

// The simulated node of the dev environment. `make run` writes the identity
// of a fixed-seed TPM simulator to DIR/node (coffre-agent identity: ek.pub and
// pcrs.json); coffred dev enrolls it here, in process, before serving, so the
// README's one-line `coffre-agent … datakey` works against the dev server.
// The simulator's seed is fixed, so its EK — and with it the enrollment —
// is the same on every agent run.
const (
	devNodeName    = "dev-node"
	devNodeClass   = "dev"
	devNodeKeyring = "dev/demo"
)

var devNodeLabels = map[string]string{"site": "dev", "jurisdiction": "dev"}

// devNodeSetup returns the setup step for serve: it makes, each only if
// missing, the class "dev" with the simulator's PCR values, the node
// "dev-node" pinned by its EK public key, and the keyring "dev/demo" with a
// policy admitting that class.
func devNodeSetup(identityDir string, stdout io.Writer) func(context.Context, *services) error {
	return func(ctx context.Context, sv *services) error {
		svc, rel := sv.svc, sv.rel
		ekPub, err := readLimited(filepath.Join(identityDir, "ek.pub"), 4096)
		if err != nil {
			return fmt.Errorf("dev node: %w (run: coffre-agent --tpm SPEC identity --out %s)", err, identityDir)
		}
		pcrJSON, err := readLimited(filepath.Join(identityDir, "pcrs.json"), 1<<16)
		if err != nil {
			return fmt.Errorf("dev node: %w", err)
		}
		var raw map[string]string
		if err := json.Unmarshal(pcrJSON, &raw); err != nil {
			return fmt.Errorf("dev node: %s: %w", filepath.Join(identityDir, "pcrs.json"), err)
		}
		pcrs := map[uint32][]byte{}
		for k, v := range raw {
			i, err := strconv.ParseUint(k, 10, 32)
			if err != nil {
				return fmt.Errorf("dev node: pcrs.json: PCR %q", k)
			}
			if pcrs[uint32(i)], err = hex.DecodeString(v); err != nil {
				return fmt.Errorf("dev node: pcrs.json: PCR %d: %w", i, err)
			}
		}

		if _, err := rel.GetNodeClass(ctx, devNodeClass); errors.Is(err, kms.ErrNotFound) {
			if _, err := rel.SetNodeClass(ctx, &kms.NodeClass{Name: devNodeClass, PCRs: pcrs}); err != nil {
				return fmt.Errorf("dev node: class %s: %w", devNodeClass, err)
			}
			fmt.Fprintf(stdout, "coffred dev: created node class %q with the simulator's PCR values\n", devNodeClass)
		} else if err != nil {
			return err
		}
		if _, err := rel.GetNode(ctx, devNodeName); errors.Is(err, kms.ErrNotFound) {
			if _, err := rel.EnrollNode(ctx, &kms.Enrollment{Name: devNodeName, Class: devNodeClass, Labels: devNodeLabels, EKPublic: ekPub}); err != nil {
				return fmt.Errorf("dev node: enroll: %w", err)
			}
			fmt.Fprintf(stdout, "coffred dev: enrolled the simulated TPM as node %q (class %s)\n", devNodeName, devNodeClass)
		} else if err != nil {
			return err
		}
		id, _ := kms.ParseKeyringID(devNodeKeyring)
		if _, err := svc.GetKeyring(ctx, id); errors.Is(err, kms.ErrNotFound) {
			if _, err := svc.CreateKeyring(ctx, id); err != nil {
				return err
			}
		} else if err != nil {
			return err
		}
		if _, err := rel.GetKeyringPolicy(ctx, id); errors.Is(err, kms.ErrNotFound) {
			if _, err := rel.SetKeyringPolicy(ctx, &kms.KeyringPolicy{
				Keyring: id, AllowedClasses: []string{devNodeClass},
				RequiredLabels: map[string]string{"jurisdiction": "dev"}, Release: kms.ReleaseHPKE,
			}); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "coffred dev: keyring %s releases to class %s (jurisdiction=dev)\n", devNodeKeyring, devNodeClass)
		} else if err != nil {
			return err
		}
		return nil
	}
}
