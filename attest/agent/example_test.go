package agent_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/coffre-kms/coffre/attest/agent"
)

// How storage software embeds the client: open the TPM, make the Agent,
// dial Coffre over TLS, and ask for data keys.
func ExampleNewClient() {
	ctx := context.Background()
	tpm, err := agent.OpenTPM("/dev/tpmrm0")
	if err != nil {
		log.Fatal(err)
	}
	defer func() { _ = tpm.Close() }()
	a, err := agent.New(ctx, tpm, agent.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer func() { _ = a.Close() }()

	caPEM, err := os.ReadFile("/etc/coffre/ca.pem")
	if err != nil {
		log.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	conn, err := grpc.NewClient("coffre.example:8443", grpc.WithTransportCredentials(
		credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13})))
	if err != nil {
		log.Fatal(err)
	}
	defer func() { _ = conn.Close() }()

	c := agent.NewClient(conn, a, agent.ClientOptions{})
	defer func() { _ = c.Close() }()
	key, envelope, err := c.GenerateDataKey(ctx, "tenant/volumes", map[string]string{"volume": "v-17"})
	if err != nil {
		log.Fatal(err)
	}
	// Encrypt with key (AES-256-GCM), store envelope beside the
	// ciphertext, and forget key. To read the data back later:
	// key, err = c.Decrypt(ctx, envelope, map[string]string{"volume": "v-17"})
	_, _ = key, envelope
}
