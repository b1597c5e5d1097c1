package main

import (
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// listFlag collects a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	if s == "" {
		return fmt.Errorf("empty value")
	}
	*l = append(*l, s)
	return nil
}

// mapFlag collects a repeatable KEY=VALUE flag; a key given twice is an
// error rather than a silent overwrite.
type mapFlag map[string]string

func (m mapFlag) String() string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k+"="+m[k])
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}

func (m mapFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	if _, dup := m[k]; dup {
		return fmt.Errorf("%q given twice", k)
	}
	m[k] = v
	return nil
}

// pcrFlag collects repeatable INDEX=HEX PCR reference values (SHA-256).
type pcrFlag map[uint32][]byte

func (p pcrFlag) String() string {
	idx := make([]uint32, 0, len(p))
	for i := range p {
		idx = append(idx, i)
	}
	slices.Sort(idx)
	var parts []string
	for _, i := range idx {
		parts = append(parts, fmt.Sprintf("%d=%x", i, p[i]))
	}
	return strings.Join(parts, ",")
}

func (p pcrFlag) Set(s string) error {
	is, hs, ok := strings.Cut(s, "=")
	if !ok {
		return fmt.Errorf("want INDEX=HEX, got %q", s)
	}
	i, err := strconv.ParseUint(is, 10, 32)
	if err != nil || i > 23 {
		return fmt.Errorf("PCR index %q: want 0..23", is)
	}
	v, err := hex.DecodeString(strings.TrimPrefix(strings.ToLower(hs), "0x"))
	if err != nil || len(v) != 32 {
		return fmt.Errorf("PCR %d: want 64 hex digits (a SHA-256 value)", i)
	}
	if _, dup := p[uint32(i)]; dup {
		return fmt.Errorf("PCR %d given twice", i)
	}
	p[uint32(i)] = v
	return nil
}
