package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"

	"github.com/coffre-kms/coffre/hsm"
	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

func ceremonyCommands() []*command {
	var root string
	return []*command{{
		path: "ceremony init", args: "", nargs: 0,
		summary: "Create the root key inside the HSM named by --root (AES-256, sensitive, never extractable).",
		flags: func(fs *flag.FlagSet) {
			fs.StringVar(&root, "root", "", "the root key as a pkcs11: `URI` (RFC 7512) with module-path and pin-source=file:…")
		},
		run: func(ctx context.Context, e *env, _ []string) error {
			if root == "" {
				return fmt.Errorf("%w: --root is required", errUsage)
			}
			if _, err := hsm.ParseURI(root); err != nil {
				return fmt.Errorf("%w: --root: %v", errUsage, err)
			}
			r, err := pkcs11.CreateRoot(ctx, pkcs11.Config{URI: root})
			if errors.Is(err, hsm.ErrKeyExists) {
				return fmt.Errorf("the HSM already holds this root key; nothing was changed (%w)", err)
			}
			if err != nil {
				return err
			}
			defer r.Close()
			attrs, err := r.Attributes(ctx)
			if err != nil {
				return fmt.Errorf("root created, but reading back its attributes failed: %w", err)
			}
			// Check what the HSM reports, not what was asked for.
			if !attrs.Sensitive || attrs.Extractable || !attrs.NeverExtractable || attrs.Wrap || attrs.Unwrap {
				return fmt.Errorf("root %s was created but the HSM reports unsafe attributes %+v: destroy it and check the HSM", r.ID(), attrs)
			}
			if e.g.json {
				return json.NewEncoder(e.stdout).Encode(map[string]any{"root": r.ID(), "attributes": attrs})
			}
			fmt.Fprintf(e.stdout, "created root key %s\n  AES-%d, sensitive, never extractable, encrypt/decrypt only (no wrap/unwrap)\n", r.ID(), attrs.ValueLen*8)
			return nil
		},
	}}
}
