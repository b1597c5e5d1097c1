package hsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// URI is a parsed RFC 7512 pkcs11: URI naming a token, a key on it, the
// module that reaches it and where its user PIN is kept.
//
// Only the attributes Coffre acts on are accepted; any other attribute is an
// error rather than silently ignored, because a key reference that is not
// what the operator thinks it is must not load.
type URI struct {
	// Path attributes: which token, and which key on it.

	// Token is the token label (CK_TOKEN_INFO.label), at most 32 bytes.
	Token string
	// Manufacturer is the token manufacturer (CK_TOKEN_INFO.manufacturerID).
	Manufacturer string
	// Serial is the token serial number (CK_TOKEN_INFO.serialNumber).
	Serial string
	// Object is the key label (CKA_LABEL).
	Object string
	// SlotID is the PKCS#11 slot identifier, when given.
	SlotID *uint
	// ID is the key identifier (CKA_ID), raw bytes.
	ID []byte

	// Query attributes: how to reach the token.

	// ModulePath is the absolute path of the PKCS#11 module (shared library).
	ModulePath string
	// PINSource is a file: URI naming the file that holds the user PIN.
	PINSource string
}

// URIError reports a pkcs11: URI that Coffre refuses. Callers may obtain it
// with [errors.As]; it never contains a PIN.
type URIError struct {
	// URI is the offending URI with every value that could be a secret
	// (pin-value and any unrecognised attribute) replaced by "REDACTED".
	URI string
	// Attr names the attribute at fault; empty when the fault is not in one
	// attribute.
	Attr string
	// Reason says what is wrong and, where it helps, what to write instead.
	Reason string
	// Err is the underlying error, if any (for instance reading the PIN
	// file); it is reachable through [errors.Unwrap].
	Err error
}

// Error says which URI (redacted), which attribute and what is wrong.
func (e *URIError) Error() string {
	var b strings.Builder
	b.WriteString("hsm: pkcs11 URI")
	if e.URI != "" {
		fmt.Fprintf(&b, " %q", e.URI)
	}
	if e.Attr != "" {
		fmt.Fprintf(&b, ": attribute %q", e.Attr)
	}
	b.WriteString(": ")
	b.WriteString(e.Reason)
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the underlying error, if any.
func (e *URIError) Unwrap() error { return e.Err }

const scheme = "pkcs11:"

// Limits from the PKCS#11 CK_TOKEN_INFO structure: a value longer than the
// field can never match, so it is a configuration mistake worth reporting.
const (
	maxTokenLabel   = 32
	maxManufacturer = 32
	maxSerial       = 16
	// maxPINFile bounds what PIN reads; PINs are short and a huge file is
	// a mistake, not a PIN.
	maxPINFile = 4096
)

// Attributes defined by RFC 7512 that Coffre does not act on. They are
// refused with a specific reason rather than as unknown.
var unsupportedAttrs = map[string]string{
	"model":                "token model is not used to select a token; use token, serial or slot-id",
	"library-manufacturer": "library attributes are not supported; module-path names the library",
	"library-description":  "library attributes are not supported; module-path names the library",
	"library-version":      "library attributes are not supported; module-path names the library",
	"slot-description":     "slot attributes other than slot-id are not supported",
	"slot-manufacturer":    "slot attributes other than slot-id are not supported",
	"type":                 "a root key is always a secret key; remove type",
	"module-name":          "module lookup by name is not supported; give module-path as an absolute path",
}

// ParseURI parses an RFC 7512 pkcs11: URI. It accepts partial URIs (for
// example one naming only a token); use [URI.ValidateKey] before using the
// result as a key reference.
//
// Beyond RFC 7512 it refuses, with a [*URIError]: unknown or unsupported
// attributes, duplicate attributes, empty values, text values that are not
// UTF-8 or hold control characters, a relative module-path, a non-decimal
// slot-id, a pin-source that is not a file: URI of an absolute path, and any
// pin-value (a PIN written into configuration leaks).
func ParseURI(s string) (*URI, error) {
	fail := func(attr, reason string) (*URI, error) {
		return nil, &URIError{URI: redact(s), Attr: attr, Reason: reason}
	}
	if len(s) < len(scheme) || !strings.EqualFold(s[:len(scheme)], scheme) {
		// Not echoed: a string that is not a pkcs11: URI may be anything,
		// including a secret pasted into the wrong field.
		return nil, &URIError{Reason: `not a pkcs11 URI (must start with "pkcs11:")`}
	}
	rest := s[len(scheme):]
	path, query, hasQuery := strings.Cut(rest, "?")
	u := &URI{}
	seen := map[string]bool{}

	if path != "" {
		for _, comp := range strings.Split(path, ";") {
			name, raw, ok := strings.Cut(comp, "=")
			if !ok {
				return fail("", "path component without \"=\"")
			}
			if name == "" {
				return fail("", "attribute with an empty name")
			}
			if name == "pin-value" {
				return fail(name, pinValueReason)
			}
			if seen[name] {
				return fail(name, "duplicate attribute")
			}
			seen[name] = true
			if !pathAttr[name] {
				switch {
				case name == "pin-source" || name == "module-path":
					return fail(name, "is a query attribute; write it after \"?\"")
				case unsupportedAttrs[name] != "":
					return fail(name, unsupportedAttrs[name])
				default:
					return fail(name, "unknown path attribute")
				}
			}
			v, err := unescape(raw, false)
			if err != nil {
				return fail(name, err.Error())
			}
			if len(v) == 0 {
				return fail(name, "empty value")
			}
			switch name {
			case "token":
				if u.Token, err = text(v, maxTokenLabel); err != nil {
					return fail(name, err.Error())
				}
			case "manufacturer":
				if u.Manufacturer, err = text(v, maxManufacturer); err != nil {
					return fail(name, err.Error())
				}
			case "serial":
				if u.Serial, err = text(v, maxSerial); err != nil {
					return fail(name, err.Error())
				}
			case "object":
				if u.Object, err = text(v, 0); err != nil {
					return fail(name, err.Error())
				}
			case "id":
				u.ID = v
			case "slot-id":
				id, err := parseSlotID(string(v))
				if err != nil {
					return fail(name, err.Error())
				}
				u.SlotID = &id
			}
		}
	}

	if hasQuery {
		if query == "" {
			return fail("", "empty query after \"?\"")
		}
		for _, comp := range strings.Split(query, "&") {
			name, raw, ok := strings.Cut(comp, "=")
			if !ok {
				return fail("", "query component without \"=\"")
			}
			if name == "" {
				return fail("", "attribute with an empty name")
			}
			if name == "pin-value" {
				return fail(name, pinValueReason)
			}
			if seen[name] {
				return fail(name, "duplicate attribute")
			}
			seen[name] = true
			if name != "module-path" && name != "pin-source" {
				switch {
				case pathAttr[name]:
					return fail(name, "is a path attribute; write it before \"?\"")
				case unsupportedAttrs[name] != "":
					return fail(name, unsupportedAttrs[name])
				default:
					return fail(name, "unknown query attribute")
				}
			}
			v, err := unescape(raw, true)
			if err != nil {
				return fail(name, err.Error())
			}
			if len(v) == 0 {
				return fail(name, "empty value")
			}
			switch name {
			case "module-path":
				p, err := text(v, 0)
				if err != nil {
					return fail(name, err.Error())
				}
				if !filepath.IsAbs(p) {
					return fail(name, "must be an absolute path")
				}
				u.ModulePath = p
			case "pin-source":
				p, err := text(v, 0)
				if err != nil {
					return fail(name, err.Error())
				}
				if _, err := pinFilePath(p); err != nil {
					return fail(name, err.Error())
				}
				u.PINSource = p
			}
		}
	}
	return u, nil
}

// pinValueReason explains why pin-value is refused wherever it appears.
const pinValueReason = "refused: a PIN in configuration leaks through files, backups and process " +
	"listings; keep it in a file readable only by Coffre and write pin-source=file:/path/to/pin"

// pathAttr lists the path attributes Coffre accepts.
var pathAttr = map[string]bool{"token": true, "manufacturer": true, "serial": true, "slot-id": true, "object": true, "id": true}

// ValidateKey reports whether u names one key unambiguously enough to use
// as a root: a token (token, serial or slot-id) and a key on it (object or
// id).
func (u *URI) ValidateKey() error {
	if u.Token == "" && u.Serial == "" && u.SlotID == nil {
		return &URIError{URI: u.String(), Reason: "a key URI must name its token with token, serial or slot-id"}
	}
	if u.Object == "" && len(u.ID) == 0 {
		return &URIError{URI: u.String(), Reason: "a key URI must name its key with object or id"}
	}
	return nil
}

// String returns u in canonical form: path attributes in the order token,
// manufacturer, serial, slot-id, object, id, then the query attributes
// module-path and pin-source. ParseURI(u.String()) yields a URI equal to u.
func (u *URI) String() string {
	var b strings.Builder
	u.writePath(&b, true)
	sep := byte('?')
	q := func(name, v string) {
		if v == "" {
			return
		}
		b.WriteByte(sep)
		sep = '&'
		b.WriteString(name)
		b.WriteByte('=')
		escapeText(&b, v, true)
	}
	q("module-path", u.ModulePath)
	q("pin-source", u.PINSource)
	return b.String()
}

// KeyID returns the pkcs11: URI with only the path attributes that identify
// the key (token, serial, slot-id, object, id) and no query, so that it
// stays the same when the module moves or the PIN file is renamed. It is
// used as the root's stable [Root.ID].
func (u *URI) KeyID() string {
	var b strings.Builder
	u.writePath(&b, false)
	return b.String()
}

func (u *URI) writePath(b *strings.Builder, withManufacturer bool) {
	b.WriteString(scheme)
	first := true
	attr := func(name string) {
		if !first {
			b.WriteByte(';')
		}
		first = false
		b.WriteString(name)
		b.WriteByte('=')
	}
	if u.Token != "" {
		attr("token")
		escapeText(b, u.Token, false)
	}
	if withManufacturer && u.Manufacturer != "" {
		attr("manufacturer")
		escapeText(b, u.Manufacturer, false)
	}
	if u.Serial != "" {
		attr("serial")
		escapeText(b, u.Serial, false)
	}
	if u.SlotID != nil {
		attr("slot-id")
		b.WriteString(strconv.FormatUint(uint64(*u.SlotID), 10))
	}
	if u.Object != "" {
		attr("object")
		escapeText(b, u.Object, false)
	}
	if len(u.ID) > 0 {
		attr("id")
		// Every byte encoded: the id is binary and a mixed form is hard
		// to compare by eye.
		for _, c := range u.ID {
			b.WriteByte('%')
			b.WriteByte(upperhex[c>>4])
			b.WriteByte(upperhex[c&15])
		}
	}
}

// PIN reads the user PIN from the file named by pin-source. The file must
// not be accessible to group or others (mode & 0o077 == 0): a PIN anyone on
// the host can read protects nothing. One trailing newline is removed; an
// empty PIN is refused.
func (u *URI) PIN() (string, error) {
	fail := func(reason string, err error) (string, error) {
		return "", &URIError{URI: u.String(), Attr: "pin-source", Reason: reason, Err: err}
	}
	if u.PINSource == "" {
		return fail("missing; the PIN must come from pin-source=file:/path/to/pin", nil)
	}
	p, err := pinFilePath(u.PINSource)
	if err != nil {
		return fail(err.Error(), nil)
	}
	// #nosec G304 -- the operator's configuration names this file on purpose.
	f, err := os.Open(p)
	if err != nil {
		return fail("cannot open PIN file", err)
	}
	defer f.Close()
	// Stat the opened file, not the path, so the checked file is the read one.
	fi, err := f.Stat()
	if err != nil {
		return fail("cannot stat PIN file", err)
	}
	if !fi.Mode().IsRegular() {
		return fail(fmt.Sprintf("PIN file %s is not a regular file", p), nil)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fail(fmt.Sprintf("PIN file %s has mode %04o; it must not be accessible to group or others (chmod 600)", p, perm), nil)
	}
	buf, err := io.ReadAll(io.LimitReader(f, maxPINFile+1))
	if err != nil {
		return fail("cannot read PIN file", err)
	}
	defer clear(buf)
	if len(buf) > maxPINFile {
		return fail(fmt.Sprintf("PIN file %s is larger than %d bytes", p, maxPINFile), nil)
	}
	pin := buf
	if bytes.HasSuffix(pin, []byte("\r\n")) {
		pin = pin[:len(pin)-2]
	} else if bytes.HasSuffix(pin, []byte("\n")) {
		pin = pin[:len(pin)-1]
	}
	if len(pin) == 0 {
		return fail(fmt.Sprintf("PIN file %s is empty", p), nil)
	}
	if bytes.IndexByte(pin, 0) >= 0 || bytes.ContainsAny(pin, "\r\n") {
		return fail(fmt.Sprintf("PIN file %s holds more than one line or a NUL byte", p), nil)
	}
	return string(pin), nil
}

// pinFilePath returns the absolute path named by a pin-source file: URI
// (file:/path or file:///path).
func pinFilePath(src string) (string, error) {
	rest, ok := strings.CutPrefix(src, "file:")
	if !ok {
		return "", errors.New("must be a file: URI (file:/path/to/pin); other PIN sources are not supported")
	}
	if strings.HasPrefix(rest, "//") {
		// file://host/path: only the empty host (file:///path) is local.
		rest = rest[2:]
		if !strings.HasPrefix(rest, "/") {
			return "", errors.New("file: URI must not name a host; write file:/path or file:///path")
		}
	}
	// The path is taken literally: it was percent-decoded once already as
	// part of the pkcs11: URI, and decoding twice would make "%" in a file
	// name mean two different things.
	path := rest
	if !filepath.IsAbs(path) {
		return "", errors.New("file: URI must name an absolute path")
	}
	return path, nil
}

func parseSlotID(s string) (uint, error) {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("must be a decimal number")
		}
	}
	n, err := strconv.ParseUint(s, 10, bits.UintSize)
	if err != nil {
		return 0, errors.New("out of range")
	}
	return uint(n), nil
}

// text validates a decoded text value: UTF-8 (PKCS#11 labels are
// CK_UTF8CHAR), no control characters (they would reach C strings, where a
// NUL truncates, and logs), and at most max bytes when max > 0.
func text(v []byte, max int) (string, error) {
	if !utf8.Valid(v) {
		return "", errors.New("not valid UTF-8")
	}
	s := string(v)
	for _, r := range s {
		if unicode.IsControl(r) {
			return "", errors.New("contains a control character")
		}
	}
	if max > 0 && len(v) > max {
		return "", fmt.Errorf("longer than %d bytes", max)
	}
	return s, nil
}

const upperhex = "0123456789ABCDEF"

// allowed reports whether c may appear unencoded in a value (RFC 7512
// pk11-pchar for the path, pk11-qchar for the query).
func allowed(c byte, query bool) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '-', '.', '_', '~', // unreserved
		':', '[', ']', '@', '!', '$', '\'', '(', ')', '*', '+', ',', '=': // pk11-res-avail
		return true
	case '&': // pk11-path-res-avail
		return !query
	case '/', '?', '|': // pk11-query-res-avail
		return query
	}
	return false
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// unescape percent-decodes a value, refusing characters RFC 7512 does not
// allow unencoded in that part of the URI.
func unescape(s string, query bool) ([]byte, error) {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '%' {
			if i+2 >= len(s) {
				return nil, errors.New("truncated percent-encoding")
			}
			hi, ok1 := unhex(s[i+1])
			lo, ok2 := unhex(s[i+2])
			if !ok1 || !ok2 {
				return nil, errors.New("invalid percent-encoding")
			}
			out = append(out, hi<<4|lo)
			i += 2
			continue
		}
		if !allowed(c, query) {
			if c >= 0x21 && c < 0x7f {
				return nil, fmt.Errorf("character %q must be percent-encoded", c)
			}
			return nil, fmt.Errorf("byte 0x%02x must be percent-encoded", c)
		}
		out = append(out, c)
	}
	return out, nil
}

// escapeText writes v percent-encoded, leaving readable the characters that
// are unambiguous in that part of the URI (so paths stay legible).
func escapeText(b *strings.Builder, v string, query bool) {
	for i := 0; i < len(v); i++ {
		c := v[i]
		keep := allowed(c, query) && c != '=' && c != '&' && c != '?' && c != '|' && c != '[' && c != ']'
		if keep {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(upperhex[c>>4])
		b.WriteByte(upperhex[c&15])
	}
}

// maxEcho bounds how much of a bad URI an error repeats.
const maxEcho = 256

// nonSecret lists the attributes whose values may be echoed in an error.
var nonSecret = map[string]bool{
	"token": true, "manufacturer": true, "serial": true, "slot-id": true, "object": true, "id": true,
	"model": true, "type": true, "library-manufacturer": true, "library-description": true,
	"library-version": true, "slot-description": true, "slot-manufacturer": true,
	"module-path": true, "module-name": true, "pin-source": true,
}

// redact returns s with the value of every attribute that is not known to be
// harmless replaced by REDACTED: pin-value obviously, but also anything
// unrecognised, since a misspelt attribute may carry a secret.
func redact(s string) string {
	rest := s[len(scheme):]
	path, query, hasQuery := strings.Cut(rest, "?")
	red := func(part, sep string) string {
		comps := strings.Split(part, sep)
		for i, c := range comps {
			name, _, ok := strings.Cut(c, "=")
			switch {
			case c == "":
			case !ok:
				if !nonSecret[c] {
					comps[i] = "REDACTED"
				}
			case !nonSecret[name]:
				comps[i] = name + "=REDACTED"
			}
		}
		return strings.Join(comps, sep)
	}
	out := s[:len(scheme)] + red(path, ";")
	if hasQuery {
		out += "?" + red(query, "&")
	}
	if len(out) > maxEcho {
		cut := maxEcho
		for cut > 0 && !utf8.RuneStart(out[cut]) {
			cut--
		}
		out = out[:cut] + "…"
	}
	return out
}
