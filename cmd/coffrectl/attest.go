package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest"
)

// attestCommands are the offline attestation tools: they read files and
// talk to no server.
func attestCommands() []*command {
	var ak, quote, sig, pcrs, nonce, ekCert string
	return []*command{
		{
			path: "attest verify-quote", args: "", nargs: 0,
			summary: "Verify a TPM quote recorded with tpm2-tools (tpm2_createak, tpm2_quote), offline.",
			flags: func(fs *flag.FlagSet) {
				fs.StringVar(&ak, "ak", "", "AK public key `FILE` from tpm2_createak -u: TPM2B_PUBLIC (-f tss, template checked) or PEM/DER (key only)")
				fs.StringVar(&quote, "quote", "", "quote message `FILE` from tpm2_quote -m (TPMS_ATTEST)")
				fs.StringVar(&sig, "sig", "", "signature `FILE` from tpm2_quote -s (-f tss, or -f plain with a TPM2B_PUBLIC AK)")
				fs.StringVar(&pcrs, "pcrs", "", "PCR `FILE` from tpm2_quote -o (or tpm2_pcrread -F serialized -o); SHA-256 bank only")
				fs.StringVar(&nonce, "nonce", "", "the qualifying data given to tpm2_quote -q, in `HEX`")
				fs.StringVar(&ekCert, "ek-cert", "", "also verify this EK certificate `FILE` (DER or PEM, e.g. tpm2_nvread 0x01c00002) against --ca; "+
					"--ca then names the TPM manufacturer CA bundle (PEM): self-signed certificates in it are the roots, the others intermediates")
			},
			run: func(_ context.Context, e *env, _ []string) error {
				return verifyQuote(e, verifyQuoteArgs{ak: ak, quote: quote, sig: sig, pcrs: pcrs, nonce: nonce, ekCert: ekCert})
			},
		},
	}
}

type verifyQuoteArgs struct {
	ak, quote, sig, pcrs, nonce, ekCert string
}

// quoteReport is what verify-quote prints, as text or JSON.
type quoteReport struct {
	AK struct {
		File            string `json:"file"`
		Type            string `json:"type"`
		TemplateChecked bool   `json:"template_checked"`
		Name            string `json:"name,omitempty"`
	} `json:"ak"`
	Nonce           string     `json:"nonce"`
	QualifiedSigner string     `json:"qualified_signer"`
	FirmwareVersion string     `json:"firmware_version"`
	Clock           uint64     `json:"clock_ms"`
	ResetCount      uint32     `json:"reset_count"`
	RestartCount    uint32     `json:"restart_count"`
	Safe            bool       `json:"safe"`
	PCRDigest       string     `json:"pcr_digest"`
	PCRs            []pcrValue `json:"pcrs_sha256"`
	EK              *ekReport  `json:"ek,omitempty"`
	Warnings        []string   `json:"warnings"`
}

type pcrValue struct {
	Index uint32 `json:"index"`
	Value string `json:"value"`
}

type ekReport struct {
	Fingerprint  string `json:"fingerprint"`
	Subject      string `json:"subject"`
	Issuer       string `json:"issuer"`
	NotAfter     string `json:"not_after"`
	Manufacturer string `json:"tpm_manufacturer,omitempty"`
	Model        string `json:"tpm_model,omitempty"`
	Version      string `json:"tpm_version,omitempty"`
}

// Warnings printed with every result they apply to: they say what the
// verification did not prove.
const (
	warnPEM = "the AK was given as a bare public key (PEM/DER), so its template could not be checked: " +
		"nothing shows it is a restricted TPM key, and the quote is only known to be signed by this key " +
		"(give the TPM2B_PUBLIC from tpm2_createak -u … -f tss to check it)"
	warnEKBinding = "nothing offline binds the AK to this EK: coffred does that with credential activation " +
		"(TPM2_MakeCredential / TPM2_ActivateCredential)"
)

func verifyQuote(e *env, a verifyQuoteArgs) error {
	var missing []string
	for _, f := range []struct{ name, v string }{{"--ak", a.ak}, {"--quote", a.quote}, {"--sig", a.sig}, {"--pcrs", a.pcrs}, {"--nonce", a.nonce}} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: missing %s", errUsage, strings.Join(missing, ", "))
	}
	nonce, err := hex.DecodeString(strings.TrimPrefix(strings.TrimSpace(a.nonce), "0x"))
	if err != nil || len(nonce) == 0 || len(nonce) > 64 {
		return fmt.Errorf("%w: --nonce: want 1 to 64 bytes in hex, as given to tpm2_quote -q", errUsage)
	}
	// --ca is a global flag that defaults to COFFRE_CA, coffred's own CA;
	// only an explicit --ca names the TPM manufacturer CA here.
	caSet := false
	e.fs.Visit(func(f *flag.Flag) { caSet = caSet || f.Name == "ca" })
	switch {
	case a.ekCert != "" && !caSet:
		return fmt.Errorf("%w: --ek-cert needs --ca with the TPM manufacturer CA bundle (COFFRE_CA, coffred's CA, is not used here)", errUsage)
	case a.ekCert == "" && caSet:
		return fmt.Errorf("%w: --ca is only used with --ek-cert", errUsage)
	}

	akFile, err := readInput("--ak", a.ak)
	if err != nil {
		return err
	}
	quoteFile, err := readInput("--quote", a.quote)
	if err != nil {
		return err
	}
	sigFile, err := readInput("--sig", a.sig)
	if err != nil {
		return err
	}
	pcrFile, err := readInput("--pcrs", a.pcrs)
	if err != nil {
		return err
	}

	akPub, err := attest.ParseTPM2ToolsAKPublic(akFile)
	if err != nil {
		return err
	}
	msg, err := attest.ParseTPM2ToolsQuote(quoteFile)
	if err != nil {
		return err
	}
	signature, err := attest.ParseTPM2ToolsSignature(sigFile)
	if err != nil && akPub.TemplateChecked {
		// Perhaps tpm2_quote -f plain: the AK's template says how to read it.
		if s, plainErr := attest.ParseTPM2ToolsPlainSignature(sigFile, akPub.Public); plainErr == nil {
			signature, err = s, nil
		}
	}
	if err != nil {
		return err
	}
	values, err := attest.ParseTPM2ToolsPCRs(pcrFile)
	if err != nil {
		return err
	}
	info, err := attest.VerifyTPM2ToolsQuote(akPub, msg, signature, values, nonce)
	if err != nil {
		return err
	}

	r := &quoteReport{
		Nonce:           hex.EncodeToString(nonce),
		QualifiedSigner: hex.EncodeToString(info.QualifiedSigner),
		FirmwareVersion: fmt.Sprintf("0x%016x", info.FirmwareVersion),
		Clock:           info.Clock,
		ResetCount:      info.ResetCount,
		RestartCount:    info.RestartCount,
		Safe:            info.Safe,
		PCRDigest:       hex.EncodeToString(info.PCRDigest),
		Warnings:        []string{},
	}
	r.AK.File = a.ak
	r.AK.Type = keyType(akPub.Public)
	r.AK.TemplateChecked = akPub.TemplateChecked
	r.AK.Name = hex.EncodeToString(akPub.Name)
	for _, i := range info.PCRs {
		r.PCRs = append(r.PCRs, pcrValue{i, hex.EncodeToString(values[i])})
	}
	if !akPub.TemplateChecked {
		r.Warnings = append(r.Warnings, warnPEM)
	}

	if a.ekCert != "" {
		ek, err := verifyEK(a.ekCert, e.g.ca)
		if err != nil {
			return err
		}
		r.EK = ek
		r.Warnings = append(r.Warnings, warnEKBinding)
	}

	for _, w := range r.Warnings {
		fmt.Fprintf(e.stderr, "coffrectl attest verify-quote: warning: %s\n", w)
	}
	if e.g.json {
		b, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			return err
		}
		_, err = e.stdout.Write(append(b, '\n'))
		return err
	}
	return r.print(e.stdout)
}

func (r *quoteReport) print(w io.Writer) error {
	var b bytes.Buffer
	tmpl := "checked (restricted, sign-only, fixedTPM, fixedParent)"
	if !r.AK.TemplateChecked {
		tmpl = "NOT checked (bare public key)"
	}
	fmt.Fprintf(&b, "quote verified\n")
	fmt.Fprintf(&b, "  AK                %s (%s)\n", r.AK.File, r.AK.Type)
	fmt.Fprintf(&b, "  AK template       %s\n", tmpl)
	if r.AK.Name != "" {
		fmt.Fprintf(&b, "  AK name           %s\n", r.AK.Name)
	}
	fmt.Fprintf(&b, "  qualified signer  %s\n", r.QualifiedSigner)
	fmt.Fprintf(&b, "  nonce             %s\n", r.Nonce)
	fmt.Fprintf(&b, "  firmware version  %s\n", r.FirmwareVersion)
	fmt.Fprintf(&b, "  clock             %d ms, reset count %d, restart count %d, safe %t\n", r.Clock, r.ResetCount, r.RestartCount, r.Safe)
	fmt.Fprintf(&b, "  PCR digest        %s\n", r.PCRDigest)
	fmt.Fprintf(&b, "  PCRs (SHA-256)\n")
	for _, p := range r.PCRs {
		fmt.Fprintf(&b, "    %-2d  %s\n", p.Index, p.Value)
	}
	if r.EK != nil {
		fmt.Fprintf(&b, "EK certificate verified\n")
		fmt.Fprintf(&b, "  fingerprint       %s\n", r.EK.Fingerprint)
		fmt.Fprintf(&b, "  subject           %s\n", r.EK.Subject)
		fmt.Fprintf(&b, "  issuer            %s\n", r.EK.Issuer)
		fmt.Fprintf(&b, "  not after         %s\n", r.EK.NotAfter)
		if r.EK.Manufacturer != "" {
			fmt.Fprintf(&b, "  TPM               manufacturer %s, model %s, version %s\n", r.EK.Manufacturer, r.EK.Model, r.EK.Version)
		}
	}
	_, err := w.Write(b.Bytes())
	return err
}

// verifyEK checks an EK certificate against a CA bundle file.
func verifyEK(certPath, caPath string) (*ekReport, error) {
	der, err := readInput("--ek-cert", certPath)
	if err != nil {
		return nil, err
	}
	if block, _ := pem.Decode(der); block != nil {
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("--ek-cert: PEM block is %q, want CERTIFICATE", block.Type)
		}
		der = block.Bytes
	}
	bundle, err := readInput("--ca", caPath)
	if err != nil {
		return nil, err
	}
	roots, intermediates, err := caPools(bundle)
	if err != nil {
		return nil, fmt.Errorf("--ca %s: %w", caPath, err)
	}
	ek, err := attest.VerifyEKCertificate(der, roots, intermediates, time.Now())
	if err != nil {
		return nil, err
	}
	r := &ekReport{
		Fingerprint: ek.Fingerprint,
		Subject:     ek.Certificate.Subject.String(),
		Issuer:      ek.Certificate.Issuer.String(),
		NotAfter:    ek.Certificate.NotAfter.UTC().Format(time.RFC3339),
	}
	if info, err := attest.EKCertTPMInfo(ek.Certificate); err == nil {
		r.Manufacturer, r.Model, r.Version = info.Manufacturer, info.Model, info.Version
	}
	return r, nil
}

// caPools splits a CA bundle (PEM, or one DER certificate) into roots and
// intermediates: the self-signed certificates are the roots. A bundle with
// no self-signed certificate is taken as roots throughout — the operator
// chose to trust those CAs directly.
func caPools(b []byte) (roots, intermediates *x509.CertPool, err error) {
	var certs []*x509.Certificate
	if bytes.Contains(b, []byte("-----BEGIN")) {
		for {
			var block *pem.Block
			block, b = pem.Decode(b)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				continue
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, nil, err
			}
			certs = append(certs, c)
		}
	} else {
		c, err := x509.ParseCertificate(b)
		if err != nil {
			return nil, nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, nil, errors.New("no certificate in the file")
	}
	roots, intermediates = x509.NewCertPool(), x509.NewCertPool()
	var selfSigned, others []*x509.Certificate
	for _, c := range certs {
		if bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil {
			selfSigned = append(selfSigned, c)
		} else {
			others = append(others, c)
		}
	}
	if len(selfSigned) == 0 {
		selfSigned, others = others, nil
	}
	for _, c := range selfSigned {
		roots.AddCert(c)
	}
	for _, c := range others {
		intermediates.AddCert(c)
	}
	return roots, intermediates, nil
}

func keyType(pub *tpm2.TPMTPublic) string {
	k, err := tpm2.Pub(*pub)
	if err != nil {
		return "unknown"
	}
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		if rk, ok := k.(interface{ Size() int }); ok {
			return fmt.Sprintf("RSA-%d", rk.Size()*8)
		}
	case tpm2.TPMAlgECC:
		if p, err := pub.Parameters.ECCDetail(); err == nil {
			switch p.CurveID {
			case tpm2.TPMECCNistP256:
				return "ECC P-256"
			case tpm2.TPMECCNistP384:
				return "ECC P-384"
			}
		}
	}
	return "unknown"
}
