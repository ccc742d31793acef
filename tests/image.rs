//! The image `make image` builds (image/build), as a user gets it, checked
//! by independent tools: skopeo and umoci read the archive and its layer
//! unpacks to exactly the expected files; Distribution's registry takes a
//! push and gives back the same digest on a pull by digest; runc runs the
//! pulled image from its own config (entrypoint and user from the image)
//! with the chart's securityContext — one-shot in both flavors, and as the
//! agent against the test apiserver with NAT through it; a second build
//! gives the same digest. And the Dockerfile, checked without an engine
//! (none runs here): its build context is exactly what the build stage
//! copies and enough for a locked build, and it declares the same image
//! config and the same root (image/rootfs) as `make image` writes.

#[path = "agent/harness.rs"]
mod harness;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use harness::{annotation, wait_for, Agent, EchoServer, World, NODE, WAIT};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{json, Value};
use support::netns::{Netns, POD_A_IP};
use support::oci::{
    archive, credentials, file_list, push_and_pull, root_mount_options, run, skopeo_inspect,
    temp_dir, Bundle, Layout, BINARY, NAME, VERSION,
};

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

/// The image's root, exactly: what distroless/cc holds for a binary that
/// links glibc and libgcc_s, and nothing more (no shell, no package
/// manager). Modes as image/rootfs fixes them.
const IMAGE_FILES: &[&str] = &[
    "d /etc 0755",
    "f /etc/group 0644",
    "f /etc/nsswitch.conf 0644",
    "f /etc/passwd 0644",
    "d /etc/ssl 0755",
    "d /etc/ssl/certs 0755",
    "f /etc/ssl/certs/ca-certificates.crt 0644",
    "d /lib 0755",
    "d /lib/x86_64-linux-gnu 0755",
    "f /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 0755",
    "f /lib/x86_64-linux-gnu/libc.so.6 0755",
    "f /lib/x86_64-linux-gnu/libgcc_s.so.1 0644",
    "f /lib/x86_64-linux-gnu/libm.so.6 0644",
    "d /lib64 0755",
    "l /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "d /tmp 1777",
    "d /usr 0755",
    "d /usr/local 0755",
    "d /usr/local/bin 0755",
    "f /usr/local/bin/podnat-controller 0755",
    "d /usr/share 0755",
    "d /usr/share/doc 0755",
    "d /usr/share/doc/ca-certificates 0755",
    "f /usr/share/doc/ca-certificates/copyright 0644",
    "d /usr/share/doc/gcc-12-base 0755",
    "f /usr/share/doc/gcc-12-base/copyright 0644",
    "d /usr/share/doc/libc6 0755",
    "f /usr/share/doc/libc6/copyright 0644",
    "d /usr/share/doc/podnat-controller 0755",
    "f /usr/share/doc/podnat-controller/copyright 0644",
];

fn git(args: &[&str]) -> String {
    run(Command::new("git").args(args).current_dir(ROOT))
        .trim()
        .to_string()
}

/// The commit time as image/build stamps it (SOURCE_DATE_EPOCH).
fn commit_time() -> (i64, String) {
    let epoch: i64 = git(&["log", "-1", "--format=%ct"]).parse().expect("epoch");
    let iso =
        run(Command::new("date").args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"]))
            .trim()
            .to_string();
    (epoch, iso)
}

fn release_binary() -> Vec<u8> {
    std::fs::read(Path::new(ROOT).join("target/release/podnat-controller"))
        .expect("target/release/podnat-controller (make image builds it)")
}

#[test]
fn archive_is_an_oci_layout_that_skopeo_and_umoci_read() {
    let archive = archive();
    let layout = Layout::extract(&archive);
    // The layout's parts, and Docker's manifest.json beside them.
    let mut top: Vec<String> = std::fs::read_dir(&layout.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["blobs", "index.json", "manifest.json", "oci-layout"]);
    assert_eq!(layout.json("oci-layout")["imageLayoutVersion"], "1.0.0");
    let digest = layout.manifest_digest();

    // skopeo reads the archive by its tag and reports the same manifest.
    let inspected = skopeo_inspect(&format!("oci-archive:{}:{VERSION}", archive.display()), &[]);
    assert_eq!(inspected["Digest"], digest.as_str());
    // umoci lists the tag and states the image.
    let tags = run(Command::new("umoci")
        .args(["ls", "--layout"])
        .arg(&layout.dir));
    assert_eq!(tags.trim(), VERSION);
    let stat = run(Command::new("umoci")
        .args(["stat", "--json", "--image"])
        .arg(format!("{}:{VERSION}", layout.dir.display())));
    assert!(stat.contains("\"history\""), "{stat}");

    // The names docker load and ctr import read.
    let index = layout.json("index.json");
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations["org.opencontainers.image.ref.name"], VERSION);
    assert_eq!(
        annotations["io.containerd.image.name"],
        format!("docker.io/library/{NAME}:{VERSION}")
    );
    let manifest = layout.manifest();
    let blob = |d: &Value| format!("blobs/{}", d.as_str().unwrap().replace(':', "/"));
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(&l["digest"]))
        .collect();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    assert_eq!(
        layout.json("manifest.json"),
        json!([{
            "Config": blob(&manifest["config"]["digest"]),
            "Layers": layers,
            "RepoTags": [format!("{NAME}:{VERSION}")],
        }])
    );

    // The config: entrypoint, root (NET_ADMIN works for uid 0 only), the
    // HTTP port, and the OCI labels from the crate and the commit.
    let config = layout.config();
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], json!([BINARY]));
    assert_eq!(c["User"], "0:0");
    assert_eq!(c["ExposedPorts"], json!({"8484/tcp": {}}));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let (epoch, created) = commit_time();
    assert_eq!(config["created"], created.as_str());
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.created"], created.as_str());
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        "GPL-3.0-or-later"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    assert!(
        revision.starts_with(&git(&["rev-parse", "HEAD"])),
        "the archive is of another commit ({revision}): run `make image`"
    );
    assert!(labels["org.opencontainers.image.source"]
        .as_str()
        .unwrap()
        .starts_with("https://"));

    // The layer: sorted entries, owners 0:0, every mtime the commit time.
    let listing = run(Command::new("tar")
        .args(["-tvz", "--full-time", "--numeric-owner", "-f"])
        .arg(layout.dir.join(&layers[0])));
    let stamp =
        run(Command::new("date").args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%d %H:%M:%S"]));
    let mut names = Vec::new();
    for line in listing.lines() {
        assert!(line.contains(" 0/0 "), "owner: {line}");
        assert!(line.contains(stamp.trim()), "mtime: {line}");
        names.push(line.split_whitespace().nth(5).unwrap().to_string());
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "layer entries in sorted order");

    // umoci unpacks exactly the expected files, the binary being the
    // release build's.
    let bundle = layout.unpack(VERSION);
    assert_eq!(file_list(&bundle.rootfs()), IMAGE_FILES);
    assert!(
        std::fs::read(bundle.rootfs().join(BINARY.trim_start_matches('/'))).unwrap()
            == release_binary(),
        "the image holds another binary than target/release: run `make image`"
    );
    let passwd = std::fs::read_to_string(bundle.rootfs().join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    let certs =
        std::fs::read_to_string(bundle.rootfs().join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(
        certs.matches("-----BEGIN CERTIFICATE-----").count() > 100,
        "the CA bundle"
    );
}

#[test]
fn two_builds_of_one_commit_give_the_same_digest() {
    let first = archive();
    let dir = temp_dir("rebuild");
    let out = run(Command::new(Path::new(ROOT).join("image/build"))
        .current_dir(ROOT)
        .env(
            "PODNAT_BIN",
            Path::new(ROOT).join("target/release/podnat-controller"),
        )
        .env("IMAGE_DIR", &dir));
    let second = dir.join(first.file_name().unwrap());
    let digest = |a: &Path| {
        std::fs::read_to_string(a.with_extension("tar.digest"))
            .expect("the digest beside the archive")
            .trim()
            .to_string()
    };
    assert!(
        out.contains(&format!("digest: {}", digest(&second))),
        "{out}"
    );
    assert_eq!(digest(&first), digest(&second), "manifest digests differ");
    assert!(
        std::fs::read(&first).unwrap() == std::fs::read(&second).unwrap(),
        "the archives differ"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `LABEL k="v" k2="v2"` as pairs.
fn label_pairs(line: &str) -> Vec<(String, String)> {
    let mut rest = line.strip_prefix("LABEL ").expect("a LABEL line").trim();
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("key=\"value\"");
        let (value, after) = after.split_once('"').expect("closing quote");
        out.push((key.trim().to_string(), value.to_string()));
        rest = after.trim();
    }
    out
}

#[test]
fn dockerfile_declares_the_image_make_image_builds() {
    let stages = stages();
    let build = &stages[0];
    assert!(
        build.iter().any(|l| l.starts_with("RUN ")
            && l.contains("image/rootfs target/release/podnat-controller /rootfs")),
        "the build stage assembles the root with image/rootfs: {build:?}"
    );
    let runtime = stages.last().unwrap();
    assert_eq!(runtime[0], "FROM scratch");
    assert!(
        !runtime.iter().any(|l| l.starts_with("RUN ")),
        "nothing runs in the runtime stage"
    );
    let copies: Vec<&String> = runtime.iter().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(copies, ["COPY --from=build /rootfs/ /"]);

    let layout = Layout::extract(&archive());
    let config = layout.config();
    let c = &config["config"];
    let find = |word: &str| -> Vec<String> {
        runtime
            .iter()
            .filter_map(|l| l.strip_prefix(word).map(str::to_string))
            .collect()
    };
    let entrypoint: Value = serde_json::from_str(&find("ENTRYPOINT ")[0]).unwrap();
    assert_eq!(entrypoint, c["Entrypoint"]);
    assert_eq!(find("USER "), [c["User"].as_str().unwrap()]);
    let exposed: Vec<String> = c["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(find("EXPOSE "), exposed);
    assert_eq!(
        find("ENV "),
        c["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    );
    // The same labels; the ones a build argument fills carry the commit's
    // values in the archive, the rest the same text.
    let labels = label_pairs(&format!("LABEL {}", find("LABEL ").join(" ")));
    let mut keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    let image_labels = c["Labels"].as_object().unwrap();
    assert_eq!(
        keys,
        image_labels.keys().map(String::as_str).collect::<Vec<_>>()
    );
    for (k, v) in &labels {
        if !v.contains("${") {
            assert_eq!(image_labels[k], v.as_str(), "{k}");
        }
    }
    // The version argument's default is the crate's version.
    assert!(
        runtime.contains(&format!("ARG VERSION={VERSION}")),
        "{runtime:?}"
    );
}

#[test]
fn a_registry_takes_the_archive_and_gives_back_the_same_digest() {
    let built = Layout::extract(&archive());
    let (pulled, pushed) = push_and_pull();
    assert_eq!(pushed, built.manifest_digest(), "the registry's digest");
    assert_eq!(pulled.manifest_digest(), pushed, "pulled by digest");
    assert_eq!(pulled.config(), built.config());
    let bundle = pulled.unpack("pulled");
    assert_eq!(file_list(&bundle.rootfs()), IMAGE_FILES);
}

/// What /proc shows of a process started as the chart starts the agent:
/// uid 0, CAP_NET_ADMIN (bit 12) alone, no-new-privs.
const CHART_CREDENTIALS: [&str; 7] = [
    "Uid: 0 0 0 0",
    "CapInh: 0000000000000000",
    "CapPrm: 0000000000001000",
    "CapEff: 0000000000001000",
    "CapBnd: 0000000000001000",
    "CapAmb: 0000000000000000",
    "NoNewPrivs: 1",
];

/// A bundle of the pulled image, its entrypoint and user as the image
/// config gave them to umoci.
fn image_bundle(pulled: &Layout) -> Bundle {
    let bundle = pulled.unpack("pulled");
    let process = &bundle.config()["process"];
    assert_eq!(
        process["args"],
        json!([BINARY]),
        "entrypoint from the image"
    );
    assert_eq!(process["user"]["uid"], 0, "user from the image");
    bundle
}

#[test]
fn runc_runs_the_pulled_image_one_shot_in_both_flavors() {
    let (pulled, _) = push_and_pull();
    let pods = Path::new(ROOT).join("tests/fixtures");
    let ns = Netns::new("img-once");
    ns.sh("ip link add wan0 type veth peer name wan0p && ip link set wan0p up && ip link set wan0 up && ip addr add 203.0.113.5/24 dev wan0");
    for flavor in ["iptables", "nftables"] {
        // A fresh bundle each run: the image's config, then the chart's.
        let bundle = image_bundle(&pulled);
        bundle.configure_as_the_chart(
            &ns,
            &[],
            &[
                &format!("-firewallflavor={flavor}"),
                "-nodeid=node1",
                "--pods-file",
                "/data/mail-pods.json",
            ],
            &[(&pods, "/data")],
        );
        let (mut cmd, _container) = bundle.runc(&format!("podnat-once-{flavor}"));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("runc run the image");
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
}

#[test]
fn runc_runs_the_pulled_image_as_the_agent_with_the_configmap_store() {
    let w = World::new("img");
    let _echo = EchoServer::start(&w.sandbox.pod_a, 2525);
    // The service account volume as the kubelet mounts it.
    let sa = w.cluster.dir.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), &w.cluster.agent_token).unwrap();
    std::fs::copy(&w.cluster.ca, sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), "podnat-system").unwrap();
    let (pulled, _) = push_and_pull();
    let bundle = image_bundle(&pulled);
    let port = w.cluster.server.rsplit(':').next().unwrap().to_string();
    // In-cluster configuration, the default flavor and store, the address
    // detected: the chart's container with nothing but its env and args.
    bundle.configure_as_the_chart(
        &w.sandbox.node,
        &[
            ("NODE_NAME", NODE),
            ("POD_NAMESPACE", "podnat-system"),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
            ("RUST_LOG", "info"),
        ],
        &["-logtostderr"],
        &[(&sa, "/var/run/secrets/kubernetes.io/serviceaccount")],
    );
    let log = w.cluster.dir.join("agent-image.log");
    let file = std::fs::File::create(&log).unwrap();
    let (mut cmd, container) = bundle.runc("podnat-agent");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("runc run the image");
    let mut agent = Agent { child, log };
    agent.wait_first_sync();
    let pid = container.pid();
    assert_eq!(credentials(pid), CHART_CREDENTIALS, "{}", agent.log());
    let opts = root_mount_options(pid);
    assert!(opts.split(',').any(|o| o == "ro"), "root mounted {opts}");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.starts_with(bundle.rootfs()) || exe == Path::new(BINARY),
        "{}",
        exe.display()
    );

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
    drop(container);
}
