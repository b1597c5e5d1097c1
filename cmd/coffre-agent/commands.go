package main

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"github.com/coffre-kms/coffre/cmd/internal/atomicfile"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/coffre-kms/coffre/attest/agent"
)

// contextFlag is the repeatable --context K=V.
type contextFlag map[string]string

func (c contextFlag) String() string {
	var p []string
	for k, v := range c {
		p = append(p, k+"="+v)
	}
	sort.Strings(p)
	return strings.Join(p, ",")
}

func (c contextFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	if _, dup := c[k]; dup {
		return fmt.Errorf("%q given twice", k)
	}
	c[k] = v
	return nil
}

func commands() []*command {
	var (
		keyring, outWrapped, outPlain, inWrapped, in, out, outDir string
		pcrList                                                   string
		ec                                                        = contextFlag{}
	)
	needFlags := func(pairs ...string) error {
		var missing []string
		for i := 0; i < len(pairs); i += 2 {
			if pairs[i+1] == "" {
				missing = append(missing, "--"+pairs[i])
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("%w: %s required", errUsage, strings.Join(missing, ", "))
		}
		return nil
	}
	return []*command{
		{
			name: "attest", summary: "Attest with the TPM and print the session: node, class, labels and expiry.",
			run: func(ctx context.Context, e *env) error {
				c, _, done, err := connect(ctx, e.g)
				if err != nil {
					return err
				}
				defer done()
				s, err := c.Attest(ctx)
				if err != nil {
					return rpcError(err)
				}
				if e.g.json {
					return json.NewEncoder(e.stdout).Encode(map[string]any{
						"node": s.Node, "class": s.Class, "labels": s.Labels, "expires": s.Expires.UTC().Format(time.RFC3339),
					})
				}
				fmt.Fprintf(e.stdout, "node     %s\nclass    %s\nlabels   %s\nexpires  %s\n",
					s.Node, s.Class, contextFlag(s.Labels).String(), s.Expires.UTC().Format(time.RFC3339))
				return nil
			},
		},
		{
			name: "datakey", summary: "Get a fresh data key for a keyring; write its envelope (and, if asked, the plaintext key).",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&keyring, "keyring", "", "`TENANT/NAME`")
				fs.Var(ec, "context", "encryption context `K=V` bound to the key (repeatable)")
				fs.StringVar(&outWrapped, "out-wrapped", "", "`FILE` for the wrapped key (envelope and context; no secret)")
				fs.StringVar(&outPlain, "out-plain", "", "`FILE` for the plaintext data key (mode 0600); omit to keep it off disk")
			},
			run: func(ctx context.Context, e *env) error {
				if err := needFlags("keyring", keyring, "out-wrapped", outWrapped); err != nil {
					return err
				}
				c, _, done, err := connect(ctx, e.g)
				if err != nil {
					return err
				}
				defer done()
				key, envelope, err := c.GenerateDataKey(ctx, keyring, ec)
				if err != nil {
					return rpcError(err)
				}
				defer clear(key)
				w := wrappedKey{Format: wrappedFormat, Keyring: keyring, Envelope: base64.StdEncoding.EncodeToString(envelope), Context: ec}
				b, _ := json.MarshalIndent(w, "", "  ")
				if err := atomicfile.WriteFile(outWrapped, append(b, '\n'), 0o644); err != nil {
					return err
				}
				if outPlain != "" {
					if err := atomicfile.WriteFile(outPlain, key, 0o600); err != nil {
						return err
					}
				}
				fmt.Fprintf(e.stdout, "data key for %s: wrapped key in %s (key sha256 %s…)\n", keyring, outWrapped, fingerprint(key))
				return nil
			},
		},
		{
			name: "decrypt", summary: "Open a wrapped key file and write the plaintext data key.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&inWrapped, "in-wrapped", "", "wrapped key `FILE` written by datakey")
				fs.StringVar(&outPlain, "out-plain", "", "`FILE` for the plaintext data key (mode 0600)")
			},
			run: func(ctx context.Context, e *env) error {
				if err := needFlags("in-wrapped", inWrapped, "out-plain", outPlain); err != nil {
					return err
				}
				w, envelope, err := readWrapped(inWrapped)
				if err != nil {
					return err
				}
				c, _, done, err := connect(ctx, e.g)
				if err != nil {
					return err
				}
				defer done()
				key, err := c.Decrypt(ctx, envelope, w.Context)
				if err != nil {
					return rpcError(err)
				}
				defer clear(key)
				if err := atomicfile.WriteFile(outPlain, key, 0o600); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "data key of %s written to %s (key sha256 %s…)\n", w.Keyring, outPlain, fingerprint(key))
				return nil
			},
		},
		{
			name: "encrypt-file", summary: "Encrypt a file under a fresh data key of a keyring, as a storage node would.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&keyring, "keyring", "", "`TENANT/NAME`")
				fs.Var(ec, "context", "encryption context `K=V` (repeatable)")
				fs.StringVar(&in, "in", "", "plaintext `FILE`")
				fs.StringVar(&out, "out", "", "encrypted `FILE` to write")
			},
			run: func(ctx context.Context, e *env) error {
				if err := needFlags("keyring", keyring, "in", in, "out", out); err != nil {
					return err
				}
				src, err := os.Open(in) // #nosec G304 -- the operator names this file
				if err != nil {
					return err
				}
				defer src.Close()
				c, _, done, err := connect(ctx, e.g)
				if err != nil {
					return err
				}
				defer done()
				key, envelope, err := c.GenerateDataKey(ctx, keyring, ec)
				if err != nil {
					return rpcError(err)
				}
				defer clear(key)
				if err := atomicfile.Write(out, 0o644, func(w io.Writer) error {
					return encryptStream(w, src, key, envelope, ec)
				}); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "encrypted %s to %s under %s\n", in, out, keyring)
				return nil
			},
		},
		{
			name: "decrypt-file", summary: "Decrypt a file written by encrypt-file (the output appears only if all of it authenticates).",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&in, "in", "", "encrypted `FILE`")
				fs.StringVar(&out, "out", "", "plaintext `FILE` to write (mode 0600)")
			},
			run: func(ctx context.Context, e *env) error {
				if err := needFlags("in", in, "out", out); err != nil {
					return err
				}
				src, err := os.Open(in) // #nosec G304 -- the operator names this file
				if err != nil {
					return err
				}
				defer src.Close()
				envelope, fileEC, header, err := readFileHeader(src)
				if err != nil {
					return fmt.Errorf("%s: %w", in, err)
				}
				c, _, done, err := connect(ctx, e.g)
				if err != nil {
					return err
				}
				defer done()
				key, err := c.Decrypt(ctx, envelope, fileEC)
				if err != nil {
					return rpcError(err)
				}
				defer clear(key)
				if err := atomicfile.Write(out, 0o600, func(w io.Writer) error {
					return decryptStream(w, src, key, header)
				}); err != nil {
					return fmt.Errorf("%s: %w", in, err)
				}
				fmt.Fprintf(e.stdout, "decrypted %s to %s\n", in, out)
				return nil
			},
		},
		{
			name: "identity", summary: "Write this TPM's EK (certificate if any, public key) and current PCR values, for enrollment.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&outDir, "out", "", "`DIR` to write ek.pub (TPM2B_PUBLIC), ek-cert.pem (if the TPM has one) and pcrs.json")
				fs.StringVar(&pcrList, "pcrs", "0,1,2,3,4,5,6,7,16", "comma-separated PCR `INDEXES` to read (SHA-256 bank)")
			},
			run: func(ctx context.Context, e *env) error {
				if err := needFlags("out", outDir); err != nil {
					return err
				}
				pcrs, err := parsePCRList(pcrList)
				if err != nil {
					return err
				}
				t, err := agent.OpenTPM(e.g.tpm)
				if err != nil {
					return fmt.Errorf("--tpm %s: %w", e.g.tpm, err)
				}
				defer t.Close()
				a, err := agent.New(ctx, t, agent.Options{})
				if err != nil {
					return err
				}
				defer a.Close()
				_, _, values, err := a.Quote(ctx, make([]byte, 32), pcrs)
				if err != nil {
					return err
				}
				if err := os.MkdirAll(outDir, 0o755); err != nil { // #nosec G301 -- public material only
					return err
				}
				if err := atomicfile.WriteFile(filepath.Join(outDir, "ek.pub"), a.EKPublic(), 0o644); err != nil {
					return err
				}
				if cert := a.EKCertificate(); cert != nil {
					p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert})
					if err := atomicfile.WriteFile(filepath.Join(outDir, "ek-cert.pem"), p, 0o644); err != nil {
						return err
					}
				}
				hexv := map[string]string{}
				for i, v := range values {
					hexv[fmt.Sprint(i)] = hex.EncodeToString(v)
				}
				b, _ := json.MarshalIndent(hexv, "", "  ")
				if err := atomicfile.WriteFile(filepath.Join(outDir, "pcrs.json"), append(b, '\n'), 0o644); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "wrote ek.pub%s and pcrs.json to %s\n", map[bool]string{true: ", ek-cert.pem", false: ""}[a.EKCertificate() != nil], outDir)
				return nil
			},
		},
	}
}

func parsePCRList(s string) ([]uint32, error) {
	var out []uint32
	for _, f := range strings.Split(s, ",") {
		var i uint32
		if _, err := fmt.Sscanf(strings.TrimSpace(f), "%d", &i); err != nil || i > 23 {
			return nil, fmt.Errorf("%w: --pcrs: %q is not a PCR index 0..23", errUsage, f)
		}
		out = append(out, i)
	}
	return out, nil
}

// fingerprint shows enough of a key's hash to compare two runs by eye,
// and nothing of the key.
func fingerprint(key []byte) string {
	h := sha256.Sum256(key)
	return hex.EncodeToString(h[:4])
}
