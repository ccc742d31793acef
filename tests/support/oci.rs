//! The image as a user gets it: the archive `make image` writes
//! (target/image/podnat-controller-<version>.oci.tar), read by skopeo and
//! umoci, pushed to and pulled from a real registry (Distribution, Debian's
//! `docker-registry`) on 127.0.0.1, unpacked into an OCI runtime bundle by
//! umoci and run by runc in a network namespace of the test's, with the
//! securityContext the chart sets. Every tool is a real one, installed by
//! scripts/install-deps; nothing here writes outside its temporary folders
//! and the test's namespaces.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::netns::Netns;

pub const NAME: &str = "podnat-controller";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the binary lives in the image.
pub const BINARY: &str = "/usr/local/bin/podnat-controller";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty temporary folder of this test process.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "podnat-oci-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Runs a command to completion; its stdout, or a panic with everything it
/// printed.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The archive `make image` built (`make test` builds it first).
pub fn archive() -> PathBuf {
    let path = Path::new(ROOT).join(format!("target/image/{NAME}-{VERSION}.oci.tar"));
    assert!(
        path.exists(),
        "{}: no image archive; `make image` builds it (`make test` runs it first)",
        path.display()
    );
    path
}

/// `skopeo inspect` of a transport reference, as JSON.
pub fn skopeo_inspect(reference: &str, extra: &[&str]) -> Value {
    let out = run(Command::new("skopeo")
        .arg("inspect")
        .args(extra)
        .arg(reference));
    serde_json::from_str(&out).expect("skopeo inspect prints JSON")
}

/// An OCI image layout on disk.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    /// The archive's layout, unpacked with tar as any tool would read it.
    pub fn extract(archive: &Path) -> Layout {
        let dir = temp_dir("layout");
        run(Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&dir));
        Layout { dir }
    }

    pub fn json(&self, file: &str) -> Value {
        let text = std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", self.dir.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    pub fn blob(&self, digest: &str) -> Value {
        let (algo, hex) = digest.split_once(':').expect("algo:hex");
        self.json(&format!("blobs/{algo}/{hex}"))
    }

    /// The digest of the one manifest index.json lists.
    pub fn manifest_digest(&self) -> String {
        let index = self.json("index.json");
        let manifests = index["manifests"].as_array().expect("manifests");
        assert_eq!(manifests.len(), 1, "{index}");
        manifests[0]["digest"].as_str().expect("digest").to_string()
    }

    pub fn manifest(&self) -> Value {
        self.blob(&self.manifest_digest())
    }

    pub fn config(&self) -> Value {
        self.blob(
            self.manifest()["config"]["digest"]
                .as_str()
                .expect("config"),
        )
    }

    /// `umoci unpack` of `tag` into a new runtime bundle.
    pub fn unpack(&self, tag: &str) -> Bundle {
        let dir = temp_dir("bundle");
        std::fs::remove_dir(&dir).expect("umoci makes the bundle folder");
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", self.dir.display()))
            .arg(&dir));
        Bundle { dir }
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Distribution's registry (`docker-registry serve`) on 127.0.0.1, storing
/// into a folder of its own; stopped when dropped.
pub struct Registry {
    child: Child,
    dir: PathBuf,
    pub addr: String,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = temp_dir("registry");
        // A port the kernel hands out, given back for the registry to bind.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry (scripts/install-deps installs it)");
        let registry = Registry { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on {}:\n{}",
                registry.addr,
                std::fs::read_to_string(registry.dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `docker://127.0.0.1:PORT/<name>` + `suffix` (`:tag` or `@digest`).
    pub fn reference(&self, suffix: &str) -> String {
        format!("docker://{}/{NAME}{suffix}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The archive pushed to a fresh registry with skopeo and pulled back by
/// digest into a fresh layout: what a node pulls. Returns the layout and
/// the digest the registry reported for the pushed tag.
pub fn push_and_pull() -> (Layout, String) {
    let registry = Registry::start();
    let source = format!("oci-archive:{}:{VERSION}", archive().display());
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &source,
        &registry.reference(&format!(":{VERSION}")),
    ]));
    let pushed = skopeo_inspect(
        &registry.reference(&format!(":{VERSION}")),
        &["--tls-verify=false"],
    )["Digest"]
        .as_str()
        .expect("Digest")
        .to_string();
    let pulled = Layout {
        dir: temp_dir("pulled"),
    };
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &registry.reference(&format!("@{pushed}")),
        &format!("oci:{}:pulled", pulled.dir.display()),
    ]));
    (pulled, pushed)
}

/// Every path under `root`, sorted, as `d /etc`, `f /etc/passwd 0644`,
/// `l /lib64/ld-linux-x86-64.so.2 -> /lib/...`.
pub fn file_list(root: &Path) -> Vec<String> {
    fn walk(base: &Path, p: &Path, out: &mut Vec<String>) {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::symlink_metadata(p).expect("stat");
        let rel = format!(
            "/{}",
            p.strip_prefix(base).expect("under the root").display()
        );
        let mode = m.permissions().mode() & 0o7777;
        if m.file_type().is_symlink() {
            let to = std::fs::read_link(p).expect("readlink");
            out.push(format!("l {rel} -> {}", to.display()));
        } else if m.is_dir() {
            if rel != "/" {
                out.push(format!("d {rel} {mode:04o}"));
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .expect("read_dir")
                .map(|e| e.expect("entry").path())
                .collect();
            entries.sort();
            for e in entries {
                walk(base, &e, out);
            }
        } else {
            out.push(format!("f {rel} {mode:04o}"));
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// An OCI runtime bundle (config.json + rootfs/) as umoci unpacked it.
pub struct Bundle {
    pub dir: PathBuf,
}

impl Bundle {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn config(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("config.json")).expect("config.json");
        serde_json::from_str(&text).expect("config.json is JSON")
    }

    /// Edits the bundle's own config.json (umoci derived it from the image
    /// config: entrypoint, user, env, cwd) as a container runtime does for
    /// the chart's pod: the container's args and env appended, the
    /// securityContext (every capability dropped but NET_ADMIN, no new
    /// privileges, read-only root), the node's network namespace
    /// (hostNetwork: here the test's `ns`), and volumes bind-mounted read-only.
    pub fn configure_as_the_chart(
        &self,
        ns: &Netns,
        env: &[(&str, &str)],
        args: &[&str],
        volumes: &[(&Path, &str)],
    ) {
        let mut c = self.config();
        let process = &mut c["process"];
        process["terminal"] = json!(false);
        let argv = process["args"].as_array_mut().expect("args from the image");
        argv.extend(args.iter().map(|a| json!(a)));
        let envs = process["env"].as_array_mut().expect("env from the image");
        envs.extend(env.iter().map(|(k, v)| json!(format!("{k}={v}"))));
        // What containerd sets for drop: [ALL], add: [NET_ADMIN].
        let caps = json!(["CAP_NET_ADMIN"]);
        process["capabilities"] = json!({
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": [], "ambient": [],
        });
        process["noNewPrivileges"] = json!(true);
        c["root"]["readonly"] = json!(true);
        for n in c["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces")
            .iter_mut()
        {
            if n["type"] == "network" {
                n["path"] = json!(format!("/run/netns/{}", ns.name));
            }
        }
        let mounts = c["mounts"].as_array_mut().expect("mounts");
        for (host, inside) in volumes {
            mounts.push(json!({
                "destination": inside, "type": "bind",
                "source": host, "options": ["rbind", "ro"],
            }));
        }
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_string_pretty(&c).expect("JSON"),
        )
        .expect("write config.json");
    }

    /// `runc run` of this bundle in the foreground (runc forwards signals
    /// to the container and exits with its status); the container is
    /// removed when the returned guard is dropped.
    pub fn runc(&self, id: &str) -> (Command, Runc) {
        let state = temp_dir("runc");
        let mut c = Command::new("runc");
        c.arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(id);
        (
            c,
            Runc {
                state,
                id: id.to_string(),
            },
        )
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A runc container by id; force-deleted (killed) when dropped.
pub struct Runc {
    state: PathBuf,
    pub id: String,
}

impl Runc {
    /// The container's init process, as the host sees it.
    pub fn pid(&self) -> u32 {
        let out = run(Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["state", &self.id]));
        let state: Value = serde_json::from_str(&out).expect("runc state JSON");
        state["pid"].as_u64().expect("pid") as u32
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A process's uid, capability sets and no-new-privs from /proc.
pub fn credentials(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .filter(|l| {
            [
                "Uid:",
                "CapInh:",
                "CapPrm:",
                "CapEff:",
                "CapBnd:",
                "CapAmb:",
                "NoNewPrivs:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The mount options of a process's root (`/` as it sees it).
pub fn root_mount_options(pid: u32) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    info.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[4] == "/")
        .map(|f| f[5].to_string())
        .unwrap_or_default()
}
