package identity

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"slices"
	"testing"

	"github.com/c2sp/wycheproof"
	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

func loadVectors(t *testing.T, name string, v any) {
	t.Helper()
	raw, err := fs.ReadFile(wycheproof.TestVectors, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, v); err != nil {
		t.Fatal(err)
	}
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex in vectors: %v", err)
	}
	return b
}

type wycheproofTest struct {
	TcID    int      `json:"tcId"`
	Comment string   `json:"comment"`
	Msg     string   `json:"msg"`
	Mu      string   `json:"mu"`
	Ctx     *string  `json:"ctx"`
	Sig     string   `json:"sig"`
	Result  string   `json:"result"`
	Flags   []string `json:"flags"`
}

// TestWycheproofMLDSA65Verify runs the ML-DSA-65 verification vectors
// through the calls PublicKey makes: the key through PublicKeyFromBytes's
// length check and Unpack, the signature through mldsa65.Verify with a
// context string (the vectors' own, since ours is Coffre-specific).
func TestWycheproofMLDSA65Verify(t *testing.T) {
	var file struct {
		TestGroups []struct {
			PublicKey string           `json:"publicKey"`
			Tests     []wycheproofTest `json:"tests"`
		} `json:"testGroups"`
	}
	loadVectors(t, "mldsa_65_verify_test.json", &file)
	var valid, invalid int
	for _, g := range file.TestGroups {
		pkRaw := unhex(t, g.PublicKey)
		// Through our constructor, with a dummy Ed25519 half.
		pub, perr := NewPublicKey(make([]byte, ed25519.PublicKeySize), pkRaw)
		for _, tc := range g.Tests {
			if perr != nil {
				if tc.Result == "valid" {
					t.Errorf("tc %d (%s): public key refused: %v", tc.TcID, tc.Comment, perr)
				} else if !errors.Is(perr, ErrMalformedKey) {
					t.Errorf("tc %d: refused with %v, want ErrMalformedKey", tc.TcID, perr)
				}
				invalid++
				continue
			}
			var ctx []byte
			if tc.Ctx != nil {
				ctx = unhex(t, *tc.Ctx)
			}
			got := mldsa65.Verify(pub.ml, unhex(t, tc.Msg), ctx, unhex(t, tc.Sig))
			if got != (tc.Result == "valid") {
				t.Errorf("tc %d (%s %v): Verify = %v, want %s", tc.TcID, tc.Comment, tc.Flags, got, tc.Result)
			}
			if got {
				valid++
			} else {
				invalid++
			}
		}
	}
	if valid < 50 || invalid < 50 {
		t.Fatalf("only %d valid and %d invalid vectors ran", valid, invalid)
	}
	t.Logf("%d valid, %d invalid ML-DSA-65 verify vectors", valid, invalid)
}

// TestWycheproofMLDSA65Sign checks that our ML-DSA seed is FIPS 204 ξ:
// each vector's private seed gives its public key, and deterministic
// signing with it gives its signatures.
func TestWycheproofMLDSA65Sign(t *testing.T) {
	var file struct {
		TestGroups []struct {
			PrivateSeed string           `json:"privateSeed"`
			PublicKey   string           `json:"publicKey"`
			Tests       []wycheproofTest `json:"tests"`
		} `json:"testGroups"`
	}
	loadVectors(t, "mldsa_65_sign_seed_test.json", &file)
	var keys, sigs int
	for _, g := range file.TestGroups {
		seed := unhex(t, g.PrivateSeed)
		if len(seed) != SeedSize {
			if _, err := NewPrivateKey(make([]byte, SeedSize), seed); err == nil {
				t.Errorf("NewPrivateKey accepted an ML-DSA seed of %d bytes", len(seed))
			}
			continue
		}
		k, err := NewPrivateKey(make([]byte, SeedSize), seed)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(k.Public().raw[ed25519.PublicKeySize:], unhex(t, g.PublicKey)) {
			t.Errorf("seed %s… does not give the vector's public key", g.PrivateSeed[:16])
			continue
		}
		keys++
		for _, tc := range g.Tests {
			// Internal vectors give only μ (ML-DSA.Sign_internal, which we
			// never call); randomised ones cannot be reproduced.
			if slices.Contains(tc.Flags, "Internal") || slices.Contains(tc.Flags, "Randomized") {
				continue
			}
			var ctx []byte
			if tc.Ctx != nil {
				ctx = unhex(t, *tc.Ctx)
			}
			sig := make([]byte, mldsa65.SignatureSize)
			err := mldsa65.SignTo(k.ml, unhex(t, tc.Msg), ctx, false, sig)
			switch {
			case tc.Result != "valid":
				if err == nil {
					t.Errorf("tc %d (%s): SignTo succeeded", tc.TcID, tc.Comment)
				}
			case err != nil:
				t.Errorf("tc %d (%s): %v", tc.TcID, tc.Comment, err)
			case !bytes.Equal(sig, unhex(t, tc.Sig)):
				t.Errorf("tc %d (%s): signature differs", tc.TcID, tc.Comment)
			default:
				sigs++
			}
		}
	}
	if keys < 10 || sigs < 20 {
		t.Fatalf("only %d keys and %d signatures checked", keys, sigs)
	}
	t.Logf("%d seeds, %d deterministic signatures", keys, sigs)
}

// TestWycheproofEd25519 runs the Ed25519 vectors through PublicKey.Verify
// itself: each vector's Ed25519 key and signature are paired with a valid
// ML-DSA-65 half of our own over the same message, so the hybrid verifies
// exactly when the vector's Ed25519 signature is valid.
func TestWycheproofEd25519(t *testing.T) {
	var file struct {
		TestGroups []struct {
			PublicKey struct {
				PK string `json:"pk"`
			} `json:"publicKey"`
			Tests []wycheproofTest `json:"tests"`
		} `json:"testGroups"`
	}
	loadVectors(t, "ed25519_test.json", &file)
	ml := mustKey(t)
	var valid, invalid int
	for _, g := range file.TestGroups {
		pub, err := NewPublicKey(unhex(t, g.PublicKey.PK), ml.Public().raw[ed25519.PublicKeySize:])
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range g.Tests {
			msg := unhex(t, tc.Msg)
			mlSig := make([]byte, mldsa65.SignatureSize)
			if err := mldsa65.SignTo(ml.ml, msg, []byte(MLDSAContext), true, mlSig); err != nil {
				t.Fatal(err)
			}
			sig := append(unhex(t, tc.Sig), mlSig...)
			err := pub.Verify(msg, sig)
			if (err == nil) != (tc.Result == "valid") {
				t.Errorf("tc %d (%s %v): Verify = %v, want %s", tc.TcID, tc.Comment, tc.Flags, err, tc.Result)
			}
			if err != nil && !errors.Is(err, ErrBadSignature) {
				t.Errorf("tc %d: error %v is not ErrBadSignature", tc.TcID, err)
			}
			if tc.Result == "valid" {
				valid++
			} else {
				invalid++
			}
		}
	}
	if valid < 50 || invalid < 50 {
		t.Fatalf("only %d valid and %d invalid vectors ran", valid, invalid)
	}
	t.Logf("%d valid, %d invalid Ed25519 vectors", valid, invalid)
}
