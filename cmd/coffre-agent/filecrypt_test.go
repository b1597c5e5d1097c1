package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"testing"
)

func TestFileRoundTrip(t *testing.T) {
	key := make([]byte, 32)
	rand.Read(key)
	env := []byte("CFE\x01fake-envelope")
	ec := map[string]string{"path": "/vol/1", "a": "b"}
	for _, size := range []int{0, 1, chunkSize - 1, chunkSize, chunkSize + 1, 3*chunkSize + 17} {
		pt := make([]byte, size)
		rand.Read(pt)
		var ct bytes.Buffer
		if err := encryptStream(&ct, bytes.NewReader(pt), key, env, ec); err != nil {
			t.Fatal(err)
		}
		r := bytes.NewReader(ct.Bytes())
		gotEnv, gotEC, header, err := readFileHeader(r)
		if err != nil || !bytes.Equal(gotEnv, env) || gotEC["path"] != "/vol/1" {
			t.Fatalf("size %d: header: %v", size, err)
		}
		var out bytes.Buffer
		if err := decryptStream(&out, r, key, header); err != nil || !bytes.Equal(out.Bytes(), pt) {
			t.Fatalf("size %d: decrypt: %v", size, err)
		}
		// Truncation at any chunk boundary, and by one byte, is refused.
		full := ct.Bytes()
		for _, cut := range []int{len(full) - 1, len(header), len(header) + chunkSize + 16} {
			if cut >= len(full) || cut < len(header) {
				continue
			}
			r := bytes.NewReader(full[:cut])
			_, _, h, _ := readFileHeader(r)
			if err := decryptStream(&bytes.Buffer{}, r, key, h); !errors.Is(err, errFileFormat) {
				t.Fatalf("size %d cut at %d: %v", size, cut, err)
			}
		}
		// A flipped bit anywhere is refused.
		b := bytes.Clone(full)
		b[len(b)/2] ^= 1
		r = bytes.NewReader(b)
		if _, _, h, err := readFileHeader(r); err == nil {
			if err := decryptStream(&bytes.Buffer{}, r, key, h); err == nil {
				t.Fatalf("size %d: flipped bit accepted", size)
			}
		}
	}
}

func FuzzReadFileHeader(f *testing.F) {
	h, _ := fileHeader([]byte("env"), map[string]string{"k": "v"})
	f.Add(h)
	f.Add([]byte("CFF\x01\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		env, ec, header, err := readFileHeader(bytes.NewReader(b))
		if err != nil {
			return
		}
		again, err := fileHeader(env, ec)
		if err != nil || !bytes.Equal(again, header) {
			t.Fatalf("header does not re-encode: %x vs %x", again, header)
		}
	})
}
