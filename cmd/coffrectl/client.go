package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	coffrev1 "github.com/coffre-kms/coffre/proto/coffre/v1"
)

// maxMessageBytes bounds what coffrectl accepts from the server; admin
// answers are small.
const maxMessageBytes = 4 << 20

// dial connects to coffred with TLS 1.3, verifying the server against --ca
// and presenting the admin certificate.
func dial(g globals) (*grpc.ClientConn, error) {
	var missing []string
	for _, f := range []struct{ name, env, val string }{
		{"--server", "COFFRE_ADDR", g.server}, {"--ca", "COFFRE_CA", g.ca},
		{"--cert", "COFFRE_CERT", g.cert}, {"--key", "COFFRE_KEY", g.key},
	} {
		if f.val == "" {
			missing = append(missing, fmt.Sprintf("%s (or %s)", f.name, f.env))
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: missing %v; for the dev server run: . var/dev/env", errUsage, missing)
	}
	caPEM, err := os.ReadFile(g.ca)
	if err != nil {
		return nil, fmt.Errorf("--ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--ca: %s holds no PEM certificate", g.ca)
	}
	cert, err := tls.LoadX509KeyPair(g.cert, g.key)
	if err != nil {
		return nil, fmt.Errorf("--cert/--key: %w", err)
	}
	creds := credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS13,
		RootCAs:      pool,
		Certificates: []tls.Certificate{cert},
	})
	return grpc.NewClient(g.server,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes)),
	)
}

func adminClient(g globals) (coffrev1.AdminServiceClient, func(), error) {
	conn, err := dial(g)
	if err != nil {
		return nil, nil, err
	}
	return coffrev1.NewAdminServiceClient(conn), func() { _ = conn.Close() }, nil
}

// rpcError turns a gRPC status into a plain error for the operator.
func rpcError(err error) error {
	if err == nil {
		return nil
	}
	if s, ok := status.FromError(err); ok {
		return errors.New(s.Code().String() + ": " + s.Message())
	}
	return err
}
