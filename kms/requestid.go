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
