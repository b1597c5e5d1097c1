package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/coffre-kms/coffre/attest/agent"
	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

func TestNewCreatesEKAndAK(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})

	ek := mustPublic(t, a.EKPublic())
	if ek.Type != tpm2.TPMAlgRSA || !bytes.Equal(ek.AuthPolicy.Buffer, tpm2.RSAEKTemplate.AuthPolicy.Buffer) ||
		ek.ObjectAttributes != tpm2.RSAEKTemplate.ObjectAttributes {
		t.Errorf("EK is not the TCG RSA template: %+v", ek.ObjectAttributes)
	}
	if k, ok := ekPublicKey(t, a).(*rsa.PublicKey); !ok || k.N.BitLen() != 2048 {
		t.Errorf("EK is not RSA-2048")
	}
	if a.EKCertificate() != nil {
		t.Errorf("the simulator has no EK certificate, got %d bytes", len(a.EKCertificate()))
	}

	// The AK as the TPM returned it must be what the verifier demands.
	ak := mustPublic(t, a.AKPublic())
	attr := ak.ObjectAttributes
	if !attr.Restricted || !attr.SignEncrypt || attr.Decrypt || !attr.FixedTPM || !attr.FixedParent ||
		!attr.SensitiveDataOrigin || !attr.UserWithAuth {
		t.Errorf("AK attributes %+v: want restricted, sign-only, fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth", attr)
	}
	rsaParms, err := ak.Parameters.RSADetail()
	if err != nil {
		t.Fatal(err)
	}
	sch, err := rsaParms.Scheme.Details.RSASSA()
	if rsaParms.KeyBits != 2048 || rsaParms.Scheme.Scheme != tpm2.TPMAlgRSASSA || err != nil || sch.HashAlg != tpm2.TPMAlgSHA256 {
		t.Errorf("AK is not RSA-2048 RSASSA-SHA256")
	}
	if len(a.BindingPublicKey()) != 1216 {
		t.Errorf("binding key of %d bytes, want an X-Wing public key (1216)", len(a.BindingPublicKey()))
	}
	requireHandles(t, tpm, 2, "New")
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	requireHandles(t, tpm, 0, "Close")
}

func TestECCAgent(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{EKAlgorithm: "ecc"})
	if ek := mustPublic(t, a.EKPublic()); ek.Type != tpm2.TPMAlgECC {
		t.Fatalf("EK type %#x, want ECC", ek.Type)
	}
	if ak := mustPublic(t, a.AKPublic()); ak.Type != tpm2.TPMAlgECC || !ak.ObjectAttributes.Restricted {
		t.Fatalf("AK is not a restricted ECC key")
	}
	blob, enc := makeCredential(t, a, []byte("ecc secret"))
	got, err := a.Activate(context.Background(), blob, enc)
	if err != nil || string(got) != "ecc secret" {
		t.Fatalf("Activate = %q, %v", got, err)
	}
	nonce := bytes.Repeat([]byte{7}, 32)
	pcrs := []uint32{0, 7}
	quote, sig, vals, err := a.Quote(context.Background(), nonce, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	checkQuote(t, a, nonce, quote, sig, pcrs, vals)
	key := bytes.Repeat([]byte{9}, 32)
	out, err := a.OpenTPM(context.Background(), makeDuplicate(t, a.EKPublic(), key, pcrs, vals), pcrs)
	if err != nil || !bytes.Equal(out, key) {
		t.Fatalf("OpenTPM under an ECC EK = %x, %v", out, err)
	}
	requireHandles(t, tpm, 2, "ECC operations")
}

func TestEKAndAKAreStableOnOneTPM(t *testing.T) {
	tpm := openSimulator(t)
	a1 := newAgent(t, tpm, agent.Options{})
	ek, ak, bk := a1.EKPublic(), a1.AKPublic(), a1.BindingPublicKey()
	_ = a1.Close()
	a2 := newAgent(t, tpm, agent.Options{})
	if !bytes.Equal(ek, a2.EKPublic()) || !bytes.Equal(ak, a2.AKPublic()) {
		t.Errorf("EK or AK changed between two Agents on the same TPM")
	}
	if bytes.Equal(bk, a2.BindingPublicKey()) {
		t.Errorf("two Agents share a binding key; it must be fresh")
	}
}

// The dev loop relies on this: a node enrolled from a fixed-seed
// simulator is the same node on the next run.
func TestFixedSeedSimulatorIdentity(t *testing.T) {
	identity := func(spec string) (ek, ak []byte) {
		tpm, err := agent.OpenTPM(spec)
		if err != nil {
			t.Fatalf("OpenTPM(%s): %v", spec, err)
		}
		defer func() { _ = tpm.Close() }()
		a, err := agent.New(context.Background(), tpm, agent.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = a.Close() }()
		return a.EKPublic(), a.AKPublic()
	}
	ek1, ak1 := identity("simulator:42")
	ek2, ak2 := identity("simulator:42")
	if !bytes.Equal(ek1, ek2) || !bytes.Equal(ak1, ak2) {
		t.Errorf("simulator:42 gave different EK/AK on two runs")
	}
	ek3, _ := identity("simulator:43")
	if bytes.Equal(ek1, ek3) {
		t.Errorf("simulator:42 and simulator:43 have the same EK")
	}
	ek4, _ := identity("simulator")
	if bytes.Equal(ek1, ek4) {
		t.Errorf("a fresh simulator has the fixed-seed EK")
	}
}

func TestOneSimulatorPerProcess(t *testing.T) {
	openSimulator(t)
	if _, err := agent.OpenTPM("simulator:1"); !errors.Is(err, agent.ErrSimulatorBusy) {
		t.Fatalf("second simulator: %v, want ErrSimulatorBusy", err)
	}
}

func TestOpenTPMSpecs(t *testing.T) {
	for _, spec := range []string{"", "simulatr", "simulator:x", "simulator:", "swtpm://", "swtpm://host",
		"swtpm://127.0.0.1:0", "swtpm://127.0.0.1:99999", "swtpm://:2321", "swtpm://h:1/path", "unix://relative",
		"tpmrm0", "tcp://127.0.0.1:2321"} {
		if _, err := agent.OpenTPM(spec); !errors.Is(err, agent.ErrTPMSpec) {
			t.Errorf("OpenTPM(%q) = %v, want ErrTPMSpec", spec, err)
		}
	}
	if _, err := agent.OpenTPM("/nonexistent/tpmrm0"); err == nil || errors.Is(err, agent.ErrTPMSpec) {
		t.Errorf("missing device: %v, want a transport error", err)
	}
	if _, err := agent.New(context.Background(), nil, agent.Options{}); err == nil {
		t.Errorf("New(nil TPM) succeeded")
	}
}

func TestActivate(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	ctx := context.Background()
	secret := []byte("0123456789abcdef0123456789abcdef")
	blob, enc := makeCredential(t, a, secret)
	got, err := a.Activate(ctx, blob, enc)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Activate = %x, %v", got, err)
	}
	requireHandles(t, tpm, 2, "Activate")

	// The same credential as whole TPM2B structures (what tpm2-tools
	// writes) activates too.
	with := func(b []byte) []byte { return append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...) }
	if got, err := a.Activate(ctx, with(blob), with(enc)); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Activate(TPM2B forms) = %x, %v", got, err)
	}

	// A credential for another key's name does not activate with this AK.
	ek, _ := tpm2.ImportEncapsulationKey(mustPublic(t, a.EKPublic()))
	other := bytes.Repeat([]byte{1}, 34)
	other[0], other[1] = 0, 0x0b // TPM_ALG_SHA256 name
	blob2, enc2, err := tpm2.CreateCredential(rand.Reader, ek, other, secret)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Activate(ctx, blob2, enc2); err == nil {
		t.Errorf("a credential for another name activated")
	}
	requireHandles(t, tpm, 2, "failed Activate")

	if _, err := a.Activate(ctx, []byte{0, 1}, enc); !errors.Is(err, agent.ErrMalformed) {
		t.Errorf("truncated blob: %v, want ErrMalformed", err)
	}
	if _, err := a.Activate(ctx, blob, enc[:100]); !errors.Is(err, agent.ErrMalformed) {
		t.Errorf("short secret: %v, want ErrMalformed", err)
	}
}

func TestQuote(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	extendPCR(t, tpm, 16, "before")
	nonce := bytes.Repeat([]byte{0xa5}, 32)
	// More than 8 PCRs, unsorted: PCR_Read must be chunked.
	pcrs := []uint32{23, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16}
	quote, sig, vals, err := a.Quote(context.Background(), nonce, pcrs)
	if err != nil {
		t.Fatal(err)
	}
	sorted := []uint32{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 23}
	if len(vals) != len(sorted) {
		t.Fatalf("%d values for %d PCRs", len(vals), len(sorted))
	}
	checkQuote(t, a, nonce, quote, sig, sorted, vals)
	for p, v := range readPCRs(t, tpm, sorted) {
		if !bytes.Equal(vals[p], v) {
			t.Errorf("PCR %d: Quote says %x, PCR_Read %x", p, vals[p], v)
		}
	}
	requireHandles(t, tpm, 2, "Quote")

	extendPCR(t, tpm, 16, "after")
	_, _, vals2, err := a.Quote(context.Background(), nonce, []uint32{16})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(vals2[16], vals[16]) {
		t.Errorf("PCR 16 value did not change after an extend")
	}

	for _, bad := range [][]uint32{{24}, {1, 1}} {
		if _, _, _, err := a.Quote(context.Background(), nonce, bad); !errors.Is(err, agent.ErrPCRSelection) {
			t.Errorf("Quote(%v): %v, want ErrPCRSelection", bad, err)
		}
	}
	if _, _, _, err := a.Quote(context.Background(), []byte("short"), pcrs); !errors.Is(err, agent.ErrMalformed) {
		t.Errorf("short nonce: %v, want ErrMalformed", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, _, err := a.Quote(ctx, nonce, pcrs); !errors.Is(err, context.Canceled) {
		t.Errorf("Quote with a cancelled context: %v", err)
	}
	requireHandles(t, tpm, 2, "refused Quotes")
}

// TestSessionKey: the node's session key K, derived through the real
// X-Wing from the server's encapsulation, is the server's K, and opens
// exactly what the server sealed under it for that envelope.
func TestSessionKey(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	srv := mustServerSession(t, a.BindingPublicKey())
	if len(srv.enc) != agent.SessionEncSize {
		t.Fatalf("enc of %d bytes, SessionEncSize %d", len(srv.enc), agent.SessionEncSize)
	}
	k, err := a.DeriveSessionKey(srv.enc)
	if err != nil {
		t.Fatal(err)
	}
	if got := agent.SessionKeyBytes(k); !bytes.Equal(got, srv.k) {
		t.Fatalf("node K %x, server K %x", got, srv.k)
	}
	for _, out := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %x %s", k, k, k, k, k)} {
		if strings.Contains(out, fmt.Sprintf("%x", srv.k)) || !strings.Contains(out, "redacted") {
			t.Fatalf("a session key prints as %q", out)
		}
	}

	key := bytes.Repeat([]byte{0x42}, 32)
	envelope := []byte("envelope bytes")
	sealed := srv.seal(key, envelope)
	got, err := k.Open(sealed, envelope)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Open = %x, %v", got, err)
	}
	second := srv.seal(key, envelope)
	if second.Seq == sealed.Seq {
		t.Fatal("two releases with one sequence number")
	}
	if got, err := k.Open(second, envelope); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("second release: %x, %v", got, err)
	}

	tampered := &coffrev1.SessionSealed{Seq: sealed.Seq, Ciphertext: bytes.Clone(sealed.Ciphertext)}
	tampered.Ciphertext[0] ^= 1
	for name, c := range map[string]struct {
		sealed   *coffrev1.SessionSealed
		envelope []byte
	}{
		"another envelope":      {sealed, []byte("another envelope")},
		"envelope prefix":       {sealed, envelope[:len(envelope)-1]},
		"tampered ciphertext":   {tampered, envelope},
		"another seq":           {&coffrev1.SessionSealed{Seq: sealed.Seq + 1, Ciphertext: sealed.Ciphertext}, envelope},
		"seq 0":                 {srv.sealAt(0, key, envelope), envelope},
		"seq past 2^32":         {srv.sealAt(1<<32+1, key, envelope), envelope},
		"short ciphertext":      {&coffrev1.SessionSealed{Seq: 1, Ciphertext: sealed.Ciphertext[:47]}, envelope},
		"a 31-byte key":         {srv.sealAt(9, key[:31], envelope), envelope},
		"nil":                   {nil, envelope},
		"no ciphertext":         {&coffrev1.SessionSealed{Seq: 1}, envelope},
		"another session's key": {mustServerSession(t, a.BindingPublicKey()).seal(key, envelope), envelope},
	} {
		if _, err := k.Open(c.sealed, c.envelope); !errors.Is(err, agent.ErrOpen) {
			t.Errorf("%s: %v, want ErrOpen", name, err)
		}
	}
	// The largest sequence number a server uses still opens.
	if got, err := k.Open(srv.sealAt(1<<32, key, envelope), envelope); err != nil || !bytes.Equal(got, key) {
		t.Errorf("seq 2^32: %x, %v", got, err)
	}
	var none *agent.SessionKey
	if _, err := none.Open(sealed, envelope); !errors.Is(err, agent.ErrOpen) {
		t.Errorf("no session key: %v, want ErrOpen", err)
	}

	// A second session of the same node has another K: what was sealed
	// under the first does not open under the second.
	srv2 := mustServerSession(t, a.BindingPublicKey())
	k2, err := a.DeriveSessionKey(srv2.enc)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(agent.SessionKeyBytes(k2), agent.SessionKeyBytes(k)) {
		t.Fatal("two sessions share a key")
	}
	if _, err := k2.Open(sealed, envelope); !errors.Is(err, agent.ErrOpen) {
		t.Errorf("session 1's key opened under session 2: %v", err)
	}

	for _, enc := range [][]byte{nil, srv.enc[:len(srv.enc)-1], append(bytes.Clone(srv.enc), 0)} {
		if _, err := a.DeriveSessionKey(enc); !errors.Is(err, agent.ErrMalformed) {
			t.Errorf("enc of %d bytes: %v, want ErrMalformed", len(enc), err)
		}
	}

	// Zero wipes one key; Close wipes the rest with the binding key.
	k2.Zero()
	if agent.SessionKeyBytes(k2) != nil {
		t.Error("Zero left the key")
	}
	if _, err := k2.Open(srv2.seal(key, envelope), envelope); !errors.Is(err, agent.ErrOpen) {
		t.Errorf("after Zero: %v, want ErrOpen", err)
	}
	_ = a.Close()
	if agent.SessionKeyBytes(k) != nil {
		t.Error("Close left a session key")
	}
	if _, err := k.Open(sealed, envelope); !errors.Is(err, agent.ErrClosed) {
		t.Errorf("after Close: %v, want ErrClosed", err)
	}
	if _, err := a.DeriveSessionKey(srv.enc); !errors.Is(err, agent.ErrClosed) {
		t.Errorf("DeriveSessionKey after Close: %v, want ErrClosed", err)
	}
	// One Agent per TPM at a time (its EK and AK hold two of the three
	// object slots a TPM may have), so the next one comes after Close.
	// Another binding key decapsulates enc to another K (X-Wing rejects
	// implicitly), which opens nothing.
	other := newAgent(t, tpm, agent.Options{})
	ko, err := other.DeriveSessionKey(srv.enc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ko.Open(sealed, envelope); !errors.Is(err, agent.ErrOpen) {
		t.Errorf("another agent's binding key opened it: %v", err)
	}
}

func TestOpenTPM(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	ctx := context.Background()
	pcrs := []uint32{7, 16}
	extendPCR(t, tpm, 16, "boot")
	key := bytes.Repeat([]byte{0x5a}, 32)
	dup := makeDuplicate(t, a.EKPublic(), key, pcrs, readPCRs(t, tpm, pcrs))

	got, err := a.OpenTPM(ctx, dup, pcrs)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("OpenTPM = %x, %v", got, err)
	}
	requireHandles(t, tpm, 2, "OpenTPM")

	extendPCR(t, tpm, 16, "tampered")
	_, err = a.OpenTPM(ctx, dup, pcrs)
	if !errors.Is(err, agent.ErrOpen) || !errors.Is(err, agent.ErrPCRPolicy) || !errors.Is(err, tpm2.TPMRCPolicyFail) {
		t.Fatalf("OpenTPM after a PCR extend: %v, want ErrOpen and ErrPCRPolicy", err)
	}
	requireHandles(t, tpm, 2, "OpenTPM refused by policy")
}

func TestOpenTPMRefusesBadDuplicates(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	ctx := context.Background()
	pcrs := []uint32{7}
	vals := readPCRs(t, tpm, pcrs)
	key := bytes.Repeat([]byte{0x11}, 32)

	// Made for another TPM's EK: the seed does not decrypt here.
	otherKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	otherEK := tpm2.RSAEKTemplate
	otherEK.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: otherKey.N.Bytes()})
	foreign := makeDuplicate(t, tpm2.Marshal(tpm2.New2B(otherEK)), key, pcrs, vals)
	if _, err := a.OpenTPM(ctx, foreign, pcrs); !errors.Is(err, agent.ErrOpen) {
		t.Errorf("duplicate for another EK: %v, want ErrOpen", err)
	}
	requireHandles(t, tpm, 2, "foreign duplicate")

	good := makeDuplicate(t, a.EKPublic(), key, pcrs, vals)
	corrupt := &coffrev1.TPMDuplicate{Duplicate: bytes.Clone(good.Duplicate), InSymSeed: good.InSymSeed, Public: good.Public}
	corrupt.Duplicate[len(corrupt.Duplicate)-1] ^= 1
	if _, err := a.OpenTPM(ctx, corrupt, pcrs); !errors.Is(err, agent.ErrOpen) {
		t.Errorf("corrupted duplicate: %v, want ErrOpen", err)
	}
	requireHandles(t, tpm, 2, "corrupted duplicate")

	// A public area with userWithAuth would let anyone with the empty
	// password unseal: refused before it reaches the TPM.
	pub := mustPublic(t, good.Public)
	pub.ObjectAttributes.UserWithAuth = true
	loose := &coffrev1.TPMDuplicate{Duplicate: good.Duplicate, InSymSeed: good.InSymSeed, Public: tpm2.Marshal(tpm2.New2B(*pub))}
	if _, err := a.OpenTPM(ctx, loose, pcrs); !errors.Is(err, agent.ErrMalformed) {
		t.Errorf("userWithAuth object: %v, want ErrMalformed", err)
	}
	if _, err := a.OpenTPM(ctx, good, nil); !errors.Is(err, agent.ErrPCRSelection) {
		t.Errorf("no PCRs: %v, want ErrPCRSelection", err)
	}
	if _, err := a.OpenTPM(ctx, nil, pcrs); !errors.Is(err, agent.ErrMalformed) {
		t.Errorf("nil duplicate: %v, want ErrMalformed", err)
	}
	// The policy is over PCR 7 only; unsealing with a session over other
	// PCRs does not satisfy it.
	if _, err := a.OpenTPM(ctx, good, []uint32{0, 7}); !errors.Is(err, agent.ErrPCRPolicy) {
		t.Errorf("wrong PCR list: %v, want ErrPCRPolicy", err)
	}
	requireHandles(t, tpm, 2, "refused duplicates")
}

func TestEventLog(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	if log, err := a.EventLog(); log != nil || err != nil {
		t.Errorf("simulator EventLog = %d bytes, %v; want none", len(log), err)
	}
	_ = a.Close()

	p := filepath.Join(t.TempDir(), "binary_bios_measurements")
	if err := os.WriteFile(p, []byte("log"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := newAgent(t, tpm, agent.Options{EventLogPath: p})
	if log, err := b.EventLog(); string(log) != "log" || err != nil {
		t.Errorf("EventLog = %q, %v", log, err)
	}
	_ = b.Close()
	c := newAgent(t, tpm, agent.Options{EventLogPath: p + ".missing"})
	if _, err := c.EventLog(); err == nil {
		t.Errorf("a configured event log that does not exist is not an error")
	}
}

func TestClosedAgent(t *testing.T) {
	tpm := openSimulator(t)
	a := newAgent(t, tpm, agent.Options{})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, _, _, err := a.Quote(context.Background(), make([]byte, 32), []uint32{0}); !errors.Is(err, agent.ErrClosed) {
		t.Errorf("Quote after Close: %v", err)
	}
	requireHandles(t, tpm, 0, "Close")
	if _, err := agent.New(context.Background(), tpm, agent.Options{EKAlgorithm: "dsa"}); err == nil {
		t.Errorf("EKAlgorithm dsa accepted")
	}
}
