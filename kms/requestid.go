package kms

import "context"

type requestIDKey struct{}

// WithRequestID returns ctx carrying the id the server gave the call, so
// that the audit entries the call makes name it (and a SIEM can match them
// with the server's log line and the client's error).
func WithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

// RequestID returns the id set by WithRequestID, or "".
func RequestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

type callerAddressKey struct{}

// WithCallerAddress returns ctx carrying the network address (the IP,
// without the port) the call came from. Challenges are counted per EK and
// address: whoever knows an EK's public key, which is no secret, cannot use
// up the budget of the node that holds it from another address.
func WithCallerAddress(ctx context.Context, addr string) context.Context {
	return context.WithValue(ctx, callerAddressKey{}, addr)
}

// CallerAddress returns the address set by WithCallerAddress, or "".
func CallerAddress(ctx context.Context) string {
	a, _ := ctx.Value(callerAddressKey{}).(string)
	return a
}
