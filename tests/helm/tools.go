//go:build tools

// Package tools pins the program this module builds (the helm CLI), so that
// `go mod tidy` keeps its dependencies. Build it with `./build`.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
