package pkcs11_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"testing"

	"github.com/c2sp/wycheproof"

	"github.com/coffre-kms/coffre/hsm/pkcs11"
)

// TestWycheproofAESGCM runs the Wycheproof AES-GCM vectors of the shape
// Wrap uses (AES-256, 96-bit IV, 128-bit tag) through the same seam calls as
// Wrap and Unwrap, with each vector's key imported into SoftHSM as a session
// key. It checks that IV, AAD and tag reach the token as GCM expects, and
// that the token rejects every invalid vector.
func TestWycheproofAESGCM(t *testing.T) {
	raw, err := fs.ReadFile(wycheproof.TestVectors, "aes_gcm_test.json")
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		TestGroups []struct {
			KeySize int `json:"keySize"`
			IvSize  int `json:"ivSize"`
			TagSize int `json:"tagSize"`
			Tests   []struct {
				TcID    int    `json:"tcId"`
				Comment string `json:"comment"`
				Key     string `json:"key"`
				Iv      string `json:"iv"`
				Aad     string `json:"aad"`
				Msg     string `json:"msg"`
				Ct      string `json:"ct"`
				Tag     string `json:"tag"`
				Result  string `json:"result"`
			} `json:"tests"`
		} `json:"testGroups"`
	}
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	h := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatalf("bad hex in vectors: %v", err)
		}
		return b
	}
	e := newEnv(t)
	r := create(t, pkcs11.Config{URI: e.uri})
	ctx := context.Background()
	ran := 0
	for _, g := range file.TestGroups {
		if g.KeySize != 256 || g.IvSize != 96 || g.TagSize != 128 {
			continue
		}
		for _, tc := range g.Tests {
			key, iv, aad, msg := h(tc.Key), h(tc.Iv), h(tc.Aad), h(tc.Msg)
			ct := append(h(tc.Ct), h(tc.Tag)...)
			ran++
			pt, err := pkcs11.GCMWithKey(ctx, r, key, iv, aad, ct, true)
			switch tc.Result {
			case "valid", "acceptable":
				if err != nil {
					t.Errorf("tcId %d (%s): decrypt: %v", tc.TcID, tc.Comment, err)
					continue
				}
				if !bytes.Equal(pt, msg) {
					t.Errorf("tcId %d (%s): plaintext %x, want %x", tc.TcID, tc.Comment, pt, msg)
				}
				got, err := pkcs11.GCMWithKey(ctx, r, key, iv, aad, msg, false)
				if err != nil {
					t.Errorf("tcId %d (%s): encrypt: %v", tc.TcID, tc.Comment, err)
				} else if !bytes.Equal(got, ct) {
					t.Errorf("tcId %d (%s): ciphertext %x, want %x", tc.TcID, tc.Comment, got, ct)
				}
			default:
				if err == nil {
					t.Errorf("tcId %d (%s): invalid vector decrypted to %x", tc.TcID, tc.Comment, pt)
				}
			}
		}
	}
	if ran == 0 {
		t.Fatal("no AES-256/96/128 vectors found")
	}
	t.Logf("%d vectors", ran)
	// The root itself is untouched by all that.
	roundTrip(t, r, randBytes(32), nil)
}
