//go:build tools

// Package tools pins the programs this module builds, so that `go mod tidy`
// keeps their dependencies. Build them with `./build` (or go build <pkg>).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
