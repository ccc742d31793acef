# podnat-controller — `make test` runs everything CI runs; `make demo` shows it.
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build deps test lint unit integration cluster-build demo bench clean

all: build

deps:
	scripts/install-deps

build: deps
	$(CARGO) build --release --locked

cluster-build:
	tests/cluster/build

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Unit tests, CLI tests and the kernel/cluster integration tests (each kernel
# test runs in network namespaces of its own).
test: deps cluster-build lint
	$(CARGO) test --locked --lib --bins --tests -- --test-threads=2

bench: deps
	$(CARGO) bench --locked

demo:
	@echo "make demo: coming with the operability issue (a namespace sandbox + test apiserver walk-through)"

clean:
	$(CARGO) clean
	rm -rf tests/cluster/bin
