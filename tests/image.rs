//! The Dockerfile, checked without a container engine (none runs here, and
//! base images cannot be pulled): the build context that .dockerignore lets
//! through is exactly what the build stage copies, and it is enough for
//! cargo to parse the manifest (every declared target present) and resolve
//! the locked dependencies, as `cargo build --release --locked` in the image
//! will; the runtime stage holds the binary and nothing else. And the runtime
//! stage's contract, run without an engine (`support::rootfs`): the binary
//! with exactly the libraries `ldd` lists, as uid 0 with only CAP_NET_ADMIN,
//! no-new-privs and a read-only root, applies both flavors one-shot and runs
//! as the agent against the test apiserver with the ConfigMap store, NAT
//! working and nothing written to the root.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use harness::{annotation, wait_for, Agent, EchoServer, World, NODE, WAIT};
use k8s_openapi::api::core::v1::ConfigMap;
use support::netns::{Netns, POD_A_IP};
use support::rootfs::{credentials, root_mount_options, Rootfs};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).expect(name)
}

/// Dockerfile instructions (continuation lines joined), by stage.
fn stages() -> Vec<Vec<String>> {
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut stages: Vec<Vec<String>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("FROM comes first")
            .push(line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    stages
}

/// The paths .dockerignore lets through (`*` then `!path` lines).
fn context_paths() -> Vec<String> {
    let text = read(".dockerignore");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.first(), Some(&"*"), "everything excluded first");
    lines[1..]
        .iter()
        .map(|l| {
            l.strip_prefix('!')
                .unwrap_or_else(|| panic!("only !path lines after *: {l}"))
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

#[test]
fn build_stage_copies_exactly_the_context_and_builds_locked() {
    let stages = stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &stages[0];
    assert!(
        build[0].starts_with("FROM rust:") && build[0].ends_with("-slim-bookworm AS build"),
        "{}",
        build[0]
    );
    let runs = build
        .iter()
        .filter(|l| l.starts_with("RUN "))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(runs.contains("libclang-dev"), "bindgen needs libclang");
    assert!(runs.contains("cargo build --release --locked"), "{runs}");

    let mut copied: Vec<String> = Vec::new();
    for l in build.iter().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = l.split_whitespace().skip(1).collect();
        copied.extend(words[..words.len() - 1].iter().map(|s| s.to_string()));
    }
    let mut context = context_paths();
    copied.sort();
    context.sort();
    assert_eq!(copied, context, "COPY sources vs .dockerignore");

    // The context alone: cargo parses the manifest (every declared target
    // must be there) and resolves exactly Cargo.lock for this platform.
    let dir = std::env::temp_dir().join(format!("podnat-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for p in &context {
        copy_tree(&Path::new(ROOT).join(p), &dir.join(p));
    }
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
    .expect("host triple");
    let out = Command::new(env!("CARGO"))
        .args(["fetch", "--locked", "--target", &host])
        .current_dir(&dir)
        .output()
        .expect("cargo fetch");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the image's build context is incomplete or Cargo.lock is stale:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn runtime_stage_holds_only_the_binary() {
    let stages = stages();
    let runtime = &stages[1];
    assert!(
        runtime[0].starts_with("FROM gcr.io/distroless/cc-debian12"),
        "{}",
        runtime[0]
    );
    assert!(
        !runtime.iter().any(|l| l.starts_with("RUN ")),
        "nothing installed at run time"
    );
    let copies: Vec<&String> = runtime.iter().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(
        copies,
        vec!["COPY --from=build /src/target/release/podnat-controller /usr/local/bin/podnat-controller"]
    );
    assert!(runtime.contains(&r#"ENTRYPOINT ["/usr/local/bin/podnat-controller"]"#.to_string()));
    let all = read("Dockerfile");
    for tool in ["iptables", "nftables"] {
        assert!(
            !all.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains(tool)),
            "{tool} in the image"
        );
    }
}

/// What /proc shows of a process started as the chart starts the agent.
const CHART_CREDENTIALS: [&str; 7] = [
    "Uid: 0 0 0 0",
    "CapInh: 0000000000000000",
    "CapPrm: 0000000000001000",
    "CapEff: 0000000000001000",
    "CapBnd: 0000000000001000",
    "CapAmb: 0000000000000000",
    "NoNewPrivs: 1",
];

#[test]
fn the_runtime_root_applies_both_flavors_one_shot() {
    let pods = Path::new(ROOT).join("tests/fixtures");
    let root = Rootfs::assemble(
        "oneshot",
        Path::new(env!("CARGO_BIN_EXE_podnat-controller")),
        &[(&pods, "/data")],
    );
    let before = root.snapshot();
    let ns = Netns::new("img-once");
    ns.sh("ip link add wan0 type veth peer name wan0p && ip link set wan0p up && ip link set wan0 up && ip addr add 203.0.113.5/24 dev wan0");
    for flavor in ["iptables", "nftables"] {
        let out = root
            .command(
                &ns,
                &[],
                &[
                    &format!("-firewallflavor={flavor}"),
                    "-nodeid=node1",
                    "--pods-file",
                    "/data/mail-pods.json",
                ],
            )
            .stdin(Stdio::null())
            .output()
            .expect("run the agent from the root");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flavor}: {}: {stderr}", out.status);
        assert!(
            stderr.contains("public address detected public_address=203.0.113.5"),
            "{stderr}"
        );
    }
    let ipt = ns.sh("iptables-nft-save -t nat");
    assert_eq!(
        ipt.matches("-d 203.0.113.5/32 -p tcp -m tcp --dport")
            .count(),
        3,
        "{ipt}"
    );
    let nft = ns.sh("nft list map ip podnat dnat_to_pod");
    assert!(nft.contains("203.0.113.5 . tcp . 587"), "{nft}");
    assert_eq!(root.snapshot(), before, "something was written to the root");
}

#[test]
fn the_runtime_root_runs_the_agent_with_the_configmap_store() {
    let w = World::new("img");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // The service account volume as the kubelet mounts it.
    let sa = w.cluster.dir.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), &w.cluster.agent_token).unwrap();
    std::fs::copy(&w.cluster.ca, sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), "podnat-system").unwrap();
    let root = Rootfs::assemble(
        "agent",
        Path::new(env!("CARGO_BIN_EXE_podnat-controller")),
        &[(&sa, "/var/run/secrets/kubernetes.io/serviceaccount")],
    );
    let before = root.snapshot();
    let port = w.cluster.server.rsplit(':').next().unwrap().to_string();
    let log = w.cluster.dir.join("agent-image.log");
    let file = std::fs::File::create(&log).unwrap();
    // In-cluster configuration, the default flavor and store, the address
    // detected: the chart's container with nothing but its env.
    let child = root
        .command(
            &w.sandbox.node,
            &[
                ("NODE_NAME", NODE),
                ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
                ("KUBERNETES_SERVICE_PORT", &port),
                ("RUST_LOG", "info"),
            ],
            &["-logtostderr"],
        )
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start the agent from the root");
    let mut agent = Agent { child, log };
    agent.wait_first_sync();
    let pid = agent.child.id();
    assert_eq!(credentials(pid), CHART_CREDENTIALS, "{}", agent.log());
    let opts = root_mount_options(pid);
    assert!(opts.split(',').any(|o| o == "ro"), "root mounted {opts}");

    w.create_pod("mx-img", NODE, Some(&annotation(&[(25, 2525)])));
    w.set_running("mx-img", POD_A_IP);
    wait_for("TCP through 203.0.113.7:25", WAIT, || w.roundtrip(25));
    let saved = w.sandbox.node.sh("iptables-nft-save -t nat");
    assert!(saved.contains("-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 25 -m comment --comment \"mail:mx-img\" -j DNAT --to-destination 10.1.0.5:2525"), "{saved}");
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(w.admin.clone(), "podnat-system");
    wait_for("the state ConfigMap with the mapping", WAIT, || {
        w.rt.block_on(cms.get_opt("podnat-controller-node1"))
            .ok()
            .flatten()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("state.json").cloned())
            .is_some_and(|j| j.contains("\"203.0.113.7:25\"") && j.contains("mail:mx-img"))
    });
    assert!(agent.terminate().success(), "{}", agent.log());
    assert_eq!(root.snapshot(), before, "something was written to the root");
}
