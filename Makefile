# podnat-controller — `make test` runs everything CI runs; `make demo` shows it.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build deps image test lint unit integration cluster-build helm-build demo bench clean

all: build

deps:
	scripts/install-deps

build: deps
	$(CARGO) build --release --locked

# The OCI image archive, target/image/podnat-controller-<version>.oci.tar
# (image/build: release binary, root from pinned Debian packages, written by
# umoci, reproducible); prints its digest and size.
image: deps
	image/build

cluster-build:
	tests/cluster/build

# helm, built from helm.sh/helm/v3 (tests/helm) for the chart tests and the
# demo; a cold build takes minutes, then it is a no-op.
helm-build:
	tests/helm/build

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Unit tests, CLI tests and the kernel/cluster integration tests (each kernel
# test runs in network namespaces of its own); tests/image.rs reads, pushes
# and runs the image `make image` built.
test: deps cluster-build helm-build lint image
	$(CARGO) test --locked --lib --bins --tests -- --test-threads=2

bench: deps
	$(CARGO) bench --locked

# The walk-through (scripts/demo): builds what it needs, runs the agent in a
# namespace sandbox against the test apiserver, cleans up. PODNAT_BIN=path
# runs it with another binary (tests/demo.rs passes its debug build).
PODNAT_BIN ?= target/release/podnat-controller
demo: deps cluster-build helm-build
ifeq ($(PODNAT_BIN),target/release/podnat-controller)
	$(CARGO) build --release --locked
endif
	PODNAT_BIN=$(PODNAT_BIN) scripts/demo

clean:
	$(CARGO) clean
	rm -rf tests/cluster/bin tests/helm/bin
