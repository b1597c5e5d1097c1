package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Associated-data prefixes of the two layers of a dual root. Each layer
// authenticates its own prefix followed by the caller's associated data, so
// that a blob wrapped by a single root under some aad cannot be passed off
// as either layer of a dual wrap (and the reverse), and the inner layer
// cannot be presented as the outer one.
const (
	dualInnerAAD = "coffre dual inner v1\x00"
	dualOuterAAD = "coffre dual outer v1\x00"
)

// NewDual returns a [Root] that needs both a and b, meant to be root keys in
// HSMs of two different vendors, so that no single supplier can release a
// KEK:
//
//	Wrap(key, aad)   = b.Wrap(a.Wrap(key, "coffre dual inner v1" 0x00 ‖ aad), "coffre dual outer v1" 0x00 ‖ aad)
//	Unwrap(w, aad)   = a.Unwrap(b.Unwrap(w, outer ‖ aad), inner ‖ aad)
//
// Its ID is
//
//	"dual(" + esc(a.ID()) + "," + esc(b.ID()) + ")"
//
// where esc percent-encodes '%', ',', '(' and ')' (ordinary pkcs11: key ids
// contain none of them, so they read unchanged). The mapping from (a, b) to
// the ID is one-to-one and the ID is recorded with every KEK it wraps, so
// it must not change: the order of a and b matters, and Dual(b, a) is a
// different root that cannot unwrap what Dual(a, b) wrapped.
//
// Unwrap fails with [ErrUnwrap] alone when either layer does not
// authenticate, and with an error wrapping the failing layer's error
// (typically [ErrUnavailable]) when one of the HSMs cannot be reached. Close
// closes both roots. a and b must be distinct keys; a dual root over one
// key twice protects nothing more than that key alone (the server's
// configuration refuses it).
func NewDual(a, b Root) Root {
	if a == nil || b == nil {
		panic("hsm: NewDual needs two roots")
	}
	return &dual{a: a, b: b, id: "dual(" + escapeDualID(a.ID()) + "," + escapeDualID(b.ID()) + ")"}
}

type dual struct {
	a, b Root
	id   string
}

var dualIDEscaper = strings.NewReplacer("%", "%25", ",", "%2C", "(", "%28", ")", "%29")

func escapeDualID(id string) string { return dualIDEscaper.Replace(id) }

func (d *dual) ID() string { return d.id }

func layerAAD(prefix string, aad []byte) []byte {
	out := make([]byte, 0, len(prefix)+len(aad))
	out = append(out, prefix...)
	return append(out, aad...)
}

func (d *dual) Wrap(ctx context.Context, key, aad []byte) ([]byte, error) {
	inner, err := d.a.Wrap(ctx, key, layerAAD(dualInnerAAD, aad))
	if err != nil {
		return nil, fmt.Errorf("hsm: dual root, inner layer %s: %w", d.a.ID(), err)
	}
	outer, err := d.b.Wrap(ctx, inner, layerAAD(dualOuterAAD, aad))
	if err != nil {
		return nil, fmt.Errorf("hsm: dual root, outer layer %s: %w", d.b.ID(), err)
	}
	return outer, nil
}

func (d *dual) Unwrap(ctx context.Context, wrapped, aad []byte) ([]byte, error) {
	// The middle value is the inner layer: ciphertext under a, not a
	// secret, so it needs no zeroizing.
	inner, err := d.b.Unwrap(ctx, wrapped, layerAAD(dualOuterAAD, aad))
	if err != nil {
		return nil, d.unwrapErr("outer", d.b, err)
	}
	key, err := d.a.Unwrap(ctx, inner, layerAAD(dualInnerAAD, aad))
	if err != nil {
		return nil, d.unwrapErr("inner", d.a, err)
	}
	return key, nil
}

// unwrapErr keeps the ErrUnwrap contract (no detail on which layer or why
// authentication failed) and names the layer for anything else.
func (d *dual) unwrapErr(layer string, r Root, err error) error {
	if errors.Is(err, ErrUnwrap) {
		return ErrUnwrap
	}
	return fmt.Errorf("hsm: dual root, %s layer %s: %w", layer, r.ID(), err)
}

// Close closes both roots, reporting the failures of either.
func (d *dual) Close() error {
	errA := d.a.Close()
	errB := d.b.Close()
	return errors.Join(errA, errB)
}
