# Coffre — the two commands of the README are `make run` and `make test`.
# Both install what they need on a fresh Debian machine (as root, no prompt).

GO        ?= go
BIN       := bin
DEV_DIR   := var/dev
DEV_ADDR  ?= 127.0.0.1:8443
# The dev node's TPM: the reference TPM simulator with a fixed seed, so its
# EK (and so its enrollment) is the same on every coffre-agent run.
DEV_TPM   ?= simulator:20261122
# Debian packages: SoftHSM2 (the HSM of dev and tests), OpenSC's pkcs11-tool
# (tests read key attributes back with it), protoc (make proto / proto-check).
# libssl-dev: the TPM simulator's cgo; swtpm, swtpm-tools, tpm2-tools: TPM
# integration tests with EK certificates from a local CA.
# rsyslog, rsyslog-gnutls: the audit syslog sink is tested against a real rsyslogd.
APT_PACKAGES := softhsm2 opensc protobuf-compiler gcc libc6-dev libssl-dev swtpm swtpm-tools tpm2-tools rsyslog rsyslog-gnutls

# Linters, pinned; `go run` builds them from the module proxy without
# touching go.mod, so they never reach the binaries.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
GOSEC       := github.com/securego/gosec/v2/cmd/gosec@v2.30.0

PROTOC_GEN_GO      = $(shell $(GO) tool -n protoc-gen-go)
PROTOC_GEN_GO_GRPC = $(shell $(GO) tool -n protoc-gen-go-grpc)
PROTO_FILES        := $(wildcard proto/coffre/v1/*.proto)

.PHONY: all build run test bench deps proto proto-check vet lint fuzz clean help

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

deps: ## install the Debian packages that build, run and tests need (root, no prompt)
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: missing Debian packages:$$missing — run as root (sudo make deps)" >&2; exit 1; fi; \
	  echo "make deps: installing$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

build: ## build coffred, coffrectl and coffre-agent into bin/
	CGO_ENABLED=1 $(GO) build -o $(BIN)/ ./cmd/...

run: deps build ## start coffred on 127.0.0.1 with dev state in var/dev (made on first run, reused after)
	@test -f $(DEV_DIR)/node/ek.pub || $(BIN)/coffre-agent identity --tpm $(DEV_TPM) --out $(DEV_DIR)/node
	$(BIN)/coffred dev --dir $(DEV_DIR) --listen $(DEV_ADDR) --node-tpm $(DEV_TPM)

test: deps proto-check vet lint ## install what the tests need and run them all (SoftHSM included)
	CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 12m ./...

vet: ## go vet and gofmt
	$(GO) vet ./...
	@out=$$(gofmt -l cmd kms hsm attest proto); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

lint: ## staticcheck and gosec (generated code excluded); every #nosec says why
	$(GO) run $(STATICCHECK) ./...
	$(GO) run $(GOSEC) -quiet -exclude-generated ./...

bench: deps ## benchmarks: data keys, releases (in process and over gRPC), audit appends, etcd replication, SoftHSM
	CGO_ENABLED=1 $(GO) test -run '^$$' -bench . -benchmem -count 1 ./kms/ ./kms/audit/ ./kms/server/ ./attest/ ./hsm/...

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	$(GO) test -run '^$$' -fuzz '^FuzzParseEnvelope$$' -fuzztime $${FUZZTIME:-30s} ./kms/
	$(GO) test -run '^$$' -fuzz '^FuzzParseURI$$' -fuzztime $${FUZZTIME:-30s} ./hsm/
	$(GO) test -run '^$$' -fuzz '^FuzzVerifyQuote$$' -fuzztime $${FUZZTIME:-30s} ./attest/
	$(GO) test -run '^$$' -fuzz '^FuzzEventLog$$' -fuzztime $${FUZZTIME:-30s} ./attest/
	$(GO) test -run '^$$' -fuzz '^FuzzParseEKCertificate$$' -fuzztime $${FUZZTIME:-30s} ./attest/
	$(GO) test -run '^$$' -fuzz '^FuzzOpenSessionSealed$$' -fuzztime $${FUZZTIME:-30s} ./attest/agent/
	$(GO) test -run '^$$' -fuzz '^FuzzParseEntry$$' -fuzztime $${FUZZTIME:-30s} ./kms/audit/
	$(GO) test -run '^$$' -fuzz '^FuzzScanEntries$$' -fuzztime $${FUZZTIME:-30s} ./kms/audit/
	$(GO) test -run '^$$' -fuzz '^FuzzParseContent$$' -fuzztime $${FUZZTIME:-30s} ./kms/quorum/
	$(GO) test -run '^$$' -fuzz '^FuzzParsePublicKey$$' -fuzztime $${FUZZTIME:-30s} ./kms/identity/
	$(GO) test -run '^$$' -fuzz '^FuzzVerify$$' -fuzztime $${FUZZTIME:-30s} ./kms/identity/
	$(GO) test -run '^$$' -fuzz '^FuzzParsePublicKey$$' -fuzztime $${FUZZTIME:-30s} ./kms/seal/
	$(GO) test -run '^$$' -fuzz '^FuzzParseShare$$' -fuzztime $${FUZZTIME:-30s} ./kms/ceremony/
	$(GO) test -run '^$$' -fuzz '^FuzzOpenBackup$$' -fuzztime $${FUZZTIME:-30s} ./kms/
	$(GO) test -run '^$$' -fuzz '^FuzzInspectBackup$$' -fuzztime $${FUZZTIME:-30s} ./kms/
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRecord$$' -fuzztime $${FUZZTIME:-30s} ./kms/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $${FUZZTIME:-30s} ./cmd/internal/adminkey/

proto: ## regenerate proto/ with the generators pinned in go.mod
	protoc -I proto \
	  --plugin=protoc-gen-go=$(PROTOC_GEN_GO) --plugin=protoc-gen-go-grpc=$(PROTOC_GEN_GO_GRPC) \
	  --go_out=proto --go_opt=paths=source_relative \
	  --go-grpc_out=proto --go-grpc_opt=paths=source_relative \
	  $(PROTO_FILES)

proto-check: deps ## fail if the committed generated code differs from what make proto makes
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	protoc -I proto \
	  --plugin=protoc-gen-go=$(PROTOC_GEN_GO) --plugin=protoc-gen-go-grpc=$(PROTOC_GEN_GO_GRPC) \
	  --go_out=$$tmp --go_opt=paths=source_relative \
	  --go-grpc_out=$$tmp --go-grpc_opt=paths=source_relative \
	  $(PROTO_FILES) && \
	for f in $$(cd $$tmp && find . -name '*.go'); do \
	  if ! cmp -s $$tmp/$$f proto/$$f; then echo "proto/$$f is stale: run make proto and commit" >&2; diff -u proto/$$f $$tmp/$$f | head -20 >&2; exit 1; fi; \
	done; echo "proto: generated code is up to date"

clean: ## remove build output (dev state in var/ stays)
	rm -rf $(BIN)
