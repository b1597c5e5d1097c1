// Package coffrev1 is Coffre's wire API, version 1: the messages and gRPC
// services generated from coffre.proto beside this file. The generated files
// are committed so that a plain go build needs no generator; `make proto`
// regenerates them with the generator versions pinned in go.mod, and
// `make proto-check` (part of `make test`) fails when they are stale.
package coffrev1
