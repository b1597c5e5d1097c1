package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
)

// Encrypted file format, version 1 (what `coffre-agent encrypt-file`
// writes, as a storage node would):
//
//	header:  "CFF" 0x01 ‖ u16 len(envelope) ‖ envelope ‖ u16 len(context) ‖ context
//	chunks:  AES-256-GCM(data key, nonce, plaintext chunk, aad = SHA-256(header))
//
// context is the encryption context as canonical JSON (sorted keys); it is
// needed again to open the envelope, so it travels with the file, and it is
// authenticated twice: by the envelope and, through the header hash, by
// every chunk. The data key is fresh per file, so nonces need only be
// unique within the file: nonce = 11-byte big-endian chunk counter ‖ one
// byte that is 1 on the last chunk and 0 otherwise (the STREAM construction
// of Hoang, Reyhanitabar, Rogaway and Vizár, as in age). Truncating the
// file, reordering, dropping or appending chunks all fail to open. Chunks
// hold chunkSize bytes of plaintext except the last, which holds 0 to
// chunkSize bytes.
const (
	fileMagic     = "CFF\x01"
	chunkSize     = 64 << 10
	maxHeaderPart = 4 << 10
)

var errFileFormat = errors.New("not a Coffre encrypted file, or damaged")

func canonicalContextJSON(ec map[string]string) []byte {
	keys := make([]string, 0, len(ec))
	for k := range ec {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kj, _ := json.Marshal(k)
		vj, _ := json.Marshal(ec[k])
		b.Write(kj)
		b.WriteByte(':')
		b.Write(vj)
	}
	b.WriteByte('}')
	return b.Bytes()
}

func fileHeader(envelope []byte, ec map[string]string) ([]byte, error) {
	ctx := canonicalContextJSON(ec)
	if len(envelope) > maxHeaderPart || len(ctx) > maxHeaderPart {
		return nil, fmt.Errorf("envelope or context longer than %d bytes", maxHeaderPart)
	}
	h := []byte(fileMagic)
	h = binary.BigEndian.AppendUint16(h, uint16(len(envelope))) // #nosec G115 -- bounded above
	h = append(h, envelope...)
	h = binary.BigEndian.AppendUint16(h, uint16(len(ctx))) // #nosec G115 -- bounded above
	return append(h, ctx...), nil
}

// readFileHeader reads and parses the header; it returns the envelope, the
// context and the raw header bytes.
func readFileHeader(r io.Reader) (envelope []byte, ec map[string]string, header []byte, err error) {
	part := func() ([]byte, error) {
		var l [2]byte
		if _, err := io.ReadFull(r, l[:]); err != nil {
			return nil, errFileFormat
		}
		n := int(binary.BigEndian.Uint16(l[:]))
		if n > maxHeaderPart {
			return nil, errFileFormat
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, errFileFormat
		}
		header = append(append(header, l[:]...), b...)
		return b, nil
	}
	magic := make([]byte, len(fileMagic))
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != fileMagic {
		return nil, nil, nil, errFileFormat
	}
	header = magic
	if envelope, err = part(); err != nil {
		return nil, nil, nil, err
	}
	ctxJSON, err := part()
	if err != nil {
		return nil, nil, nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(ctxJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ec); err != nil || dec.More() || !bytes.Equal(canonicalContextJSON(ec), ctxJSON) {
		return nil, nil, nil, errFileFormat
	}
	return envelope, ec, header, nil
}

func chunkNonce(counter uint64, last bool) []byte {
	n := make([]byte, 12)
	binary.BigEndian.PutUint64(n[3:11], counter)
	if last {
		n[11] = 1
	}
	return n
}

func newFileAEAD(key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("data key of %d bytes, want 32", len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// encryptStream writes header and the encrypted chunks of src to dst.
func encryptStream(dst io.Writer, src io.Reader, key, envelope []byte, ec map[string]string) error {
	aead, err := newFileAEAD(key)
	if err != nil {
		return err
	}
	header, err := fileHeader(envelope, ec)
	if err != nil {
		return err
	}
	if _, err := dst.Write(header); err != nil {
		return err
	}
	aad := sha256.Sum256(header)
	// Read one chunk ahead to know which chunk is the last.
	cur := make([]byte, chunkSize)
	next := make([]byte, chunkSize)
	n, err := io.ReadFull(src, cur)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return err
	}
	for counter := uint64(0); ; counter++ {
		m := 0
		if n == chunkSize {
			m, err = io.ReadFull(src, next)
			if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
				return err
			}
		}
		last := m == 0
		if _, err := dst.Write(aead.Seal(nil, chunkNonce(counter, last), cur[:n], aad[:])); err != nil {
			return err
		}
		if last {
			return nil
		}
		cur, next, n = next, cur, m
	}
}

// decryptStream reads encrypted chunks from src (after the header) and
// writes plaintext to dst. Plaintext of a chunk is written only once that
// chunk authenticated; a file that fails later has had its earlier chunks
// written, so callers write to a temporary file and rename on success.
func decryptStream(dst io.Writer, src io.Reader, key, header []byte) error {
	aead, err := newFileAEAD(key)
	if err != nil {
		return err
	}
	aad := sha256.Sum256(header)
	sealed := chunkSize + aead.Overhead()
	cur := make([]byte, sealed)
	next := make([]byte, sealed)
	n, err := io.ReadFull(src, cur)
	if err != nil && err != io.ErrUnexpectedEOF {
		return errFileFormat // not even one chunk: truncated
	}
	for counter := uint64(0); ; counter++ {
		m := 0
		if n == sealed {
			m, err = io.ReadFull(src, next)
			if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
				return err
			}
		}
		last := m == 0
		pt, err := aead.Open(cur[:0:0], chunkNonce(counter, last), cur[:n], aad[:])
		if err != nil {
			return errFileFormat
		}
		if !last && len(pt) != chunkSize {
			return errFileFormat
		}
		if _, err := dst.Write(pt); err != nil {
			return err
		}
		if last {
			return nil
		}
		cur, next, n = next, cur, m
	}
}
