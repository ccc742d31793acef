//! A throw-away etcd + kube-apiserver on 127.0.0.1 for integration tests,
//! driven by the scripts in `tests/cluster/` (see `tests/cluster/up`).
//!
//! `TestCluster::up()` builds the binaries if needed (a cold build takes
//! minutes: run `make cluster-build` first), starts a cluster in a fresh
//! directory under `std::env::temp_dir()`, and tears it down on drop, also when
//! the test panics. A watchdog started by `up` also tears it down if the test
//! process exits without dropping it (e.g. a cluster kept in a `static`).
//!
//! What the cluster has: RBAC, token auth for an admin (`system:masters`) and
//! the agent (`system:serviceaccount:podnat-system:podnat-controller`, no
//! permissions until the test grants some), the `default`, `kube-system`,
//! `kube-public` and `kube-node-lease` namespaces. What it lacks: controller-manager,
//! scheduler and kubelet — no default ServiceAccounts, no garbage collection,
//! deleted namespaces stay Terminating, and pods with `spec.nodeName` set are
//! only removed by a delete with `gracePeriodSeconds: 0`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct TestCluster {
    /// State directory (certs, tokens, etcd data, logs); removed on drop.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub server: String,
    /// Kubeconfig of the admin (group `system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of `system:serviceaccount:podnat-system:podnat-controller`.
    pub agent_kubeconfig: PathBuf,
    pub admin_token: String,
    pub agent_token: String,
    /// PEM file to trust for `server` (serving certificate followed by its CA).
    pub ca: PathBuf,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cluster")
        .join(name)
}

fn run(name: &str, dir: &Path) -> Output {
    Command::new(script(name))
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script(name).display()))
}

fn describe(name: &str, out: &Output) -> String {
    format!(
        "tests/cluster/{name} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check(name: &str, dir: &Path) {
    let out = run(name, dir);
    if !out.status.success() {
        panic!("{}", describe(name, &out));
    }
}

impl TestCluster {
    /// Starts a new, independent cluster and waits until it is ready.
    pub fn up() -> TestCluster {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "podnat-cluster-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));

        let out = Command::new(script("up"))
            .arg(&dir)
            .env("CLUSTER_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script("up").display()));
        if !out.status.success() {
            let msg = describe("up", &out);
            let _ = run("down", &dir);
            panic!("{msg}");
        }

        let text = std::fs::read_to_string(dir.join("env"))
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.join("env").display()));
        let env: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| -> String {
            match env.get(k) {
                Some(v) => v.to_string(),
                None => {
                    let _ = run("down", &dir);
                    panic!("{k} missing from {}:\n{text}", dir.join("env").display())
                }
            }
        };
        TestCluster {
            server: get("SERVER"),
            ca: PathBuf::from(get("CA")),
            admin_token: get("ADMIN_TOKEN"),
            agent_token: get("AGENT_TOKEN"),
            admin_kubeconfig: PathBuf::from(get("ADMIN_KUBECONFIG")),
            agent_kubeconfig: PathBuf::from(get("AGENT_KUBECONFIG")),
            dir,
        }
    }

    /// Stops the kube-apiserver (TERM, then KILL) and waits for it to exit;
    /// etcd and all stored objects remain.
    pub fn stop_apiserver(&self) {
        check("apiserver-stop", &self.dir);
    }

    /// Starts the kube-apiserver again on the same port, certificates and
    /// tokens, and waits until it is ready.
    pub fn start_apiserver(&self) {
        check("apiserver-start", &self.dir);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding from a failed test aborts.
        match Command::new(script("down"))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("{}", describe("down", &out)),
            Err(e) => eprintln!("cannot run {}: {e}", script("down").display()),
        }
    }
}
