package agent

// Fuzz targets for every parser of outside input in this package. Each
// asserts only that the parser returns (never panics) and that what it
// accepts is consistent.

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/cloudflare/circl/kem/xwing"
	"github.com/google/go-tpm/tpm2"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

func FuzzParseTPMSpec(f *testing.F) {
	for _, s := range []string{"simulator", "simulator:42", "simulator:-1", "swtpm://127.0.0.1:2321",
		"swtpm://[::1]:2321", "unix:///run/swtpm.sock", "/dev/tpmrm0", "", "swtpm://h:0", "simulator:9223372036854775808"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		loc, err := parseTPMSpec(spec)
		if err != nil {
			if !errors.Is(err, ErrTPMSpec) {
				t.Fatalf("error %v is not ErrTPMSpec", err)
			}
			return
		}
		if loc.kind == tpmSWTPM && loc.addr == "" || (loc.kind == tpmUnix || loc.kind == tpmDevice) && loc.path == "" {
			t.Fatalf("accepted %q as %+v", spec, loc)
		}
	})
}

func FuzzParseResponseHeader(f *testing.F) {
	f.Add([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0})
	f.Add([]byte{0x80, 0x02, 0, 1, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0x00, 0xc4, 0, 0, 0, 10, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, hdr []byte) {
		n, err := parseResponseHeader(hdr)
		if err == nil && (n < tpmHeaderSize || n > maxTPMResponse) {
			t.Fatalf("accepted size %d", n)
		}
		_ = tpmBusy(hdr)
	})
}

func FuzzUnwrapTPM2BBlob(f *testing.F) {
	contents := append(binary.BigEndian.AppendUint16(nil, 32), make([]byte, 32+2+34)...)
	f.Add(contents)
	f.Add(append(binary.BigEndian.AppendUint16(nil, uint16(len(contents))), contents...))
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		out, err := unwrapTPM2BBlob(b, maxPrivate)
		if err != nil {
			return
		}
		if !bytes.HasSuffix(b, out) || len(out) < 2 {
			t.Fatalf("contents %x are not a suffix of %x", out, b)
		}
	})
}

func FuzzUnwrapEncryptedSecret(f *testing.F) {
	rsaEK, eccEK := tpm2.RSAEKTemplate, tpm2.ECCEKTemplate
	rsaEK.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{KeyBits: 2048})
	point := tpm2.Marshal(tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}, Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}})
	f.Add(false, make([]byte, 256))
	f.Add(false, append([]byte{1, 0}, make([]byte, 256)...))
	f.Add(true, point)
	f.Add(true, append(binary.BigEndian.AppendUint16(nil, uint16(len(point))), point...))
	f.Fuzz(func(t *testing.T, ecc bool, b []byte) {
		ek := &rsaEK
		if ecc {
			ek = &eccEK
		}
		out, err := unwrapEncryptedSecret(b, ek)
		if err == nil && !bytes.HasSuffix(b, out) {
			t.Fatalf("contents %x are not a suffix of %x", out, b)
		}
	})
}

func FuzzParseSealedPublic(f *testing.F) {
	pub := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{AdminWithPolicy: true, NoDA: true},
		AuthPolicy:       tpm2.TPM2BDigest{Buffer: make([]byte, 32)},
		Parameters:       tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
		Unique:           tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)}),
	}
	good := tpm2.Marshal(tpm2.New2B(pub))
	if _, err := parseSealedPublic(good); err != nil {
		f.Fatalf("the conventional sealed object is refused: %v", err)
	}
	f.Add(good)
	f.Add(tpm2.Marshal(tpm2.New2B(tpm2.RSAEKTemplate)))
	f.Add(append(bytes.Clone(good), 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := parseSealedPublic(b)
		if err == nil && (p.Type != tpm2.TPMAlgKeyedHash || p.ObjectAttributes.UserWithAuth) {
			t.Fatalf("accepted %+v", p)
		}
	})
}

func FuzzTrimDER(f *testing.F) {
	f.Add([]byte{0x30, 0x03, 1, 2, 3, 0, 0})
	f.Add([]byte{0x30, 0x82, 0x01, 0x00})
	f.Add([]byte{0x30, 0x81})
	f.Fuzz(func(t *testing.T, b []byte) {
		out, err := trimDER(b)
		if err == nil && !bytes.HasPrefix(b, out) {
			t.Fatalf("%x is not a prefix of %x", out, b)
		}
	})
}

func FuzzPCRSelection(f *testing.F) {
	f.Add(tpm2.Marshal(pcrSelection([]uint32{0, 7, 23})))
	f.Add([]byte{0, 0, 0, 2, 0, 0x0b, 3, 1, 2, 3, 0, 4, 1, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		sel, err := safeUnmarshal[tpm2.TPMLPCRSelection](b)
		if err != nil {
			return
		}
		pcrs, err := pcrsFromSelection(*sel)
		if err != nil {
			return
		}
		if sorted, err := checkPCRs(pcrs); err == nil && !equalPCRs(sorted, pcrs) {
			t.Fatalf("decoded PCRs %v are not ascending", pcrs)
		}
	})
}

func FuzzCheckPCRs(f *testing.F) {
	f.Add([]byte{0, 0, 0, 7})
	f.Fuzz(func(t *testing.T, b []byte) {
		var pcrs []uint32
		for len(b) >= 4 {
			pcrs = append(pcrs, binary.BigEndian.Uint32(b))
			b = b[4:]
		}
		sorted, err := checkPCRs(pcrs)
		if err != nil {
			return
		}
		got, err := pcrsFromSelection(pcrSelection(sorted))
		if err != nil || !equalPCRs(got, sorted) {
			t.Fatalf("selection of %v decodes to %v", sorted, got)
		}
	})
}

// FuzzOpenSessionSealed feeds arbitrary sealed keys (sequence number,
// ciphertext, envelope) to a session key: every failure must be ErrOpen,
// and only the one real release may open, to its data key.
func FuzzOpenSessionSealed(f *testing.F) {
	k := make([]byte, releaseKeySize)
	if _, err := rand.Read(k); err != nil {
		f.Fatal(err)
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		f.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		f.Fatal(err)
	}
	sk, err := newSessionKey(bytes.Clone(k))
	if err != nil {
		f.Fatal(err)
	}
	// The real release, sealed independently of releaseAAD.
	const seq = 7
	dataKey, envelope := bytes.Repeat([]byte{0x5c}, DataKeySize), []byte("CFE\x01envelope")
	nonce := make([]byte, 12)
	binary.BigEndian.PutUint64(nonce[4:], seq)
	aad := append([]byte("coffre release v1\x00\x00\x00"), byte(len(envelope)))
	ct := aead.Seal(nil, nonce, dataKey, append(aad, envelope...))

	f.Add(uint64(seq), ct, envelope)
	f.Add(uint64(seq+1), ct, envelope)
	f.Add(uint64(0), make([]byte, DataKeySize+gcmTagSize), []byte{})
	f.Add(uint64(1<<32+seq), ct, envelope)
	f.Add(uint64(seq), ct[:len(ct)-1], envelope)
	f.Fuzz(func(t *testing.T, s uint64, c, env []byte) {
		key, err := sk.Open(&coffrev1.SessionSealed{Seq: s, Ciphertext: c}, env)
		if err != nil {
			if !errors.Is(err, ErrOpen) {
				t.Fatalf("error %v is not ErrOpen", err)
			}
			return
		}
		if s != seq || !bytes.Equal(c, ct) || !bytes.Equal(env, envelope) {
			t.Fatalf("seq %d, ciphertext %x, envelope %q opened: only the real release may", s, c, env)
		}
		if !bytes.Equal(key, dataKey) {
			t.Fatalf("opened to %x, want %x", key, dataKey)
		}
	})
}

// FuzzDeriveSessionKey feeds arbitrary session_enc values to the
// derivation (no TPM is needed for it): it refuses what is not an X-Wing
// ciphertext with ErrMalformed and derives a 32-byte key from the rest.
func FuzzDeriveSessionKey(f *testing.F) {
	sk, pk, err := xwing.GenerateKeyPair(rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	a := &Agent{bindingSK: sk, bindingPK: make([]byte, xwing.PublicKeySize)}
	pk.Pack(a.bindingPK)
	f.Add(make([]byte, xwing.CiphertextSize))
	f.Add([]byte{})
	f.Add(make([]byte, xwing.CiphertextSize+1))
	f.Fuzz(func(t *testing.T, enc []byte) {
		k, err := a.DeriveSessionKey(enc)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
			return
		}
		defer k.Zero()
		if len(enc) != SessionEncSize || len(k.k) != releaseKeySize {
			t.Fatalf("a %d-byte key from a %d-byte enc", len(k.k), len(enc))
		}
	})
}
