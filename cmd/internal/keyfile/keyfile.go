// Package keyfile keeps the private keys that people carry — admin signing
// keys, key-custodian keys — in files encrypted under a passphrase, and reads
// that passphrase from a file or the terminal, never from a flag value.
//
// A file is PEM: its type names the kind of key, its headers the KDF and
// its parameters, its body AES-256-GCM under an Argon2id-derived key with
// the headers as associated data, so that changing the kind or weakening
// the parameters makes the file fail to open.
package keyfile

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/crypto/argon2"
	"golang.org/x/term"
)

// ErrPassphrase is returned when a file does not open under the passphrase
// given (a wrong passphrase or an altered file: the two are not told apart).
var ErrPassphrase = errors.New("keyfile: wrong passphrase or altered file")

// Params are the Argon2id cost parameters.
type Params struct {
	Time    uint32 // passes
	Memory  uint32 // KiB
	Threads uint8
}

// DefaultParams are RFC 9106's second recommended option (64 MiB, 3 passes).
var DefaultParams = Params{Time: 3, Memory: 64 * 1024, Threads: 4}

// minimum parameters accepted when opening: a file claiming less was not
// written by Coffre (tests use MinParams to stay fast).
var MinParams = Params{Time: 1, Memory: 8 * 1024, Threads: 1}

const maxMemory = 4 * 1024 * 1024 // 4 GiB: refuse files that would exhaust memory

// Encrypt seals plaintext as a PEM block of the given type ("COFFRE ADMIN
// KEY") under passphrase.
func Encrypt(pemType string, plaintext, passphrase []byte, p Params) ([]byte, error) {
	if len(passphrase) < 8 {
		return nil, errors.New("keyfile: the passphrase must have at least 8 characters")
	}
	if err := p.check(); err != nil {
		return nil, err
	}
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return nil, err
	}
	headers := map[string]string{
		"KDF":    "argon2id",
		"Params": fmt.Sprintf("t=%d,m=%d,p=%d", p.Time, p.Memory, p.Threads),
		"Salt":   base64.RawStdEncoding.EncodeToString(salt),
	}
	aead, err := newAEAD(passphrase, salt, p)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	body := aead.Seal(nonce, nonce, plaintext, aad(pemType, headers))
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Headers: headers, Bytes: body}), nil
}

// Decrypt opens a file written by Encrypt with the given PEM type. The
// caller zeroizes the result.
func Decrypt(pemType string, file, passphrase []byte) ([]byte, error) {
	block, rest := pem.Decode(file)
	if block == nil {
		return nil, fmt.Errorf("keyfile: not a PEM file (want %q)", pemType)
	}
	if block.Type != pemType {
		return nil, fmt.Errorf("keyfile: the file holds %q, want %q", block.Type, pemType)
	}
	if len(strings.TrimSpace(string(rest))) != 0 {
		return nil, errors.New("keyfile: data after the PEM block")
	}
	if block.Headers["KDF"] != "argon2id" {
		return nil, fmt.Errorf("keyfile: KDF %q, want argon2id", block.Headers["KDF"])
	}
	if len(block.Headers) != 3 {
		return nil, errors.New("keyfile: unexpected PEM headers")
	}
	p, err := parseParams(block.Headers["Params"])
	if err != nil {
		return nil, err
	}
	salt, err := base64.RawStdEncoding.DecodeString(block.Headers["Salt"])
	if err != nil || len(salt) < 16 {
		return nil, errors.New("keyfile: bad Salt header")
	}
	aead, err := newAEAD(passphrase, salt, p)
	if err != nil {
		return nil, err
	}
	if len(block.Bytes) < aead.NonceSize()+aead.Overhead() {
		return nil, errors.New("keyfile: body too short")
	}
	nonce, ct := block.Bytes[:aead.NonceSize()], block.Bytes[aead.NonceSize():]
	pt, err := aead.Open(nil, nonce, ct, aad(pemType, block.Headers))
	if err != nil {
		return nil, ErrPassphrase
	}
	return pt, nil
}

func (p Params) check() error {
	if p.Time < MinParams.Time || p.Memory < MinParams.Memory || p.Threads < MinParams.Threads {
		return fmt.Errorf("keyfile: Argon2id parameters %+v are below the minimum %+v", p, MinParams)
	}
	if p.Memory > maxMemory || p.Time > 64 {
		return fmt.Errorf("keyfile: Argon2id parameters %+v are beyond what Coffre will spend", p)
	}
	return nil
}

func parseParams(s string) (Params, error) {
	var p Params
	parts := strings.Split(s, ",")
	if len(parts) != 3 {
		return p, fmt.Errorf("keyfile: bad Params header %q", s)
	}
	vals := make([]uint64, 3)
	for i, want := range []string{"t=", "m=", "p="} {
		v, ok := strings.CutPrefix(parts[i], want)
		if !ok {
			return p, fmt.Errorf("keyfile: bad Params header %q", s)
		}
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return p, fmt.Errorf("keyfile: bad Params header %q", s)
		}
		vals[i] = n
	}
	if vals[2] > 255 {
		return p, fmt.Errorf("keyfile: bad Params header %q", s)
	}
	p = Params{Time: uint32(vals[0]), Memory: uint32(vals[1]), Threads: uint8(vals[2])} // #nosec G115 -- parsed as 32-bit, threads checked
	return p, p.check()
}

func newAEAD(passphrase, salt []byte, p Params) (cipher.AEAD, error) {
	k := argon2.IDKey(passphrase, salt, p.Time, p.Memory, p.Threads, 32)
	defer clear(k)
	b, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func aad(pemType string, h map[string]string) []byte {
	return []byte("coffre keyfile v1\n" + pemType + "\n" + h["KDF"] + "\n" + h["Params"] + "\n" + h["Salt"])
}

// ReadPassphrase returns the passphrase from file when it is set (the first
// line, which must be the file's only content besides a final newline; the
// file must not be readable by group or others), else from the terminal
// after printing prompt on stderr. It never reads a passphrase from the
// environment or the command line.
func ReadPassphrase(file, prompt string, stderr io.Writer) ([]byte, error) {
	if file != "" {
		fi, err := os.Stat(file)
		if err != nil {
			return nil, err
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("passphrase file %s is readable by others (mode %v): chmod 600 it", file, fi.Mode().Perm())
		}
		f, err := os.Open(file) // #nosec G304 -- the operator names the file
		if err != nil {
			return nil, err
		}
		defer f.Close()
		line, err := bufio.NewReader(io.LimitReader(f, 4096)).ReadString('\n')
		if err != nil && err != io.EOF {
			return nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			return nil, fmt.Errorf("passphrase file %s is empty", file)
		}
		return []byte(line), nil
	}
	fd := int(os.Stdin.Fd()) // #nosec G115 -- a file descriptor
	if !term.IsTerminal(fd) {
		return nil, errors.New("no passphrase: give a passphrase file or run on a terminal")
	}
	fmt.Fprint(stderr, prompt)
	b, err := term.ReadPassword(fd)
	fmt.Fprintln(stderr)
	return b, err
}
