package kms

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"testing"

	"github.com/c2sp/wycheproof"
)

// TestWycheproofAESGCM runs the Wycheproof AES-GCM vectors against the one
// AEAD path the envelopes use (sealAESGCM/openAESGCM). That path takes only
// AES-256 with a 96-bit nonce and a 128-bit tag; vectors for other sizes are
// checked to be refused rather than skipped silently.
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
				TcID    int      `json:"tcId"`
				Comment string   `json:"comment"`
				Key     string   `json:"key"`
				Iv      string   `json:"iv"`
				Aad     string   `json:"aad"`
				Msg     string   `json:"msg"`
				Ct      string   `json:"ct"`
				Tag     string   `json:"tag"`
				Result  string   `json:"result"`
				Flags   []string `json:"flags"`
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
	var ran, refused int
	for _, g := range file.TestGroups {
		for _, tc := range g.Tests {
			key, iv, aad, msg := h(tc.Key), h(tc.Iv), h(tc.Aad), h(tc.Msg)
			ct := append(h(tc.Ct), h(tc.Tag)...)
			supported := g.KeySize == 256 && g.IvSize == 96 && g.TagSize == 128
			if !supported {
				// Our path must refuse these shapes outright.
				if g.KeySize != 256 {
					if _, err := sealAESGCM(key, iv, msg, aad); err == nil {
						t.Errorf("tcId %d: %d-bit key accepted by seal", tc.TcID, g.KeySize)
					}
				}
				if pt, err := openAESGCM(key, iv, ct, aad); err == nil && tc.Result != "valid" {
					t.Errorf("tcId %d (%s): invalid vector opened: %x", tc.TcID, tc.Comment, pt)
				}
				refused++
				continue
			}
			ran++
			pt, err := openAESGCM(key, iv, ct, aad)
			switch tc.Result {
			case "valid", "acceptable":
				if err != nil {
					t.Errorf("tcId %d (%s): open: %v", tc.TcID, tc.Comment, err)
					continue
				}
				if !bytes.Equal(pt, msg) {
					t.Errorf("tcId %d: plaintext mismatch", tc.TcID)
				}
				got, err := sealAESGCM(key, iv, msg, aad)
				if err != nil || !bytes.Equal(got, ct) {
					t.Errorf("tcId %d (%s): seal = %x, %v; want %x", tc.TcID, tc.Comment, got, err, ct)
				}
			case "invalid":
				if err == nil {
					t.Errorf("tcId %d (%s): invalid ciphertext opened", tc.TcID, tc.Comment)
				}
				if pt != nil {
					t.Errorf("tcId %d: partial plaintext returned on failure", tc.TcID)
				}
			default:
				t.Fatalf("tcId %d: unknown result %q", tc.TcID, tc.Result)
			}
		}
	}
	// The file has tens of AES-256/96/128 vectors; a parse that finds none
	// would make this test vacuous.
	if ran < 50 {
		t.Fatalf("ran only %d vectors (%d other shapes refused)", ran, refused)
	}
	t.Logf("ran %d AES-256-GCM vectors; %d vectors of other key/nonce/tag sizes refused", ran, refused)
}
