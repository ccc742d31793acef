//! The image's runtime root filesystem without an engine: assembled the way
//! the Dockerfile's runtime stage (gcr.io/distroless/cc-debian12) provides it,
//! and the agent run from it as the chart's securityContext says — uid 0,
//! only CAP_NET_ADMIN in the bounding set (and so in every set after exec),
//! no-new-privs, the root mounted read-only — in a private mount namespace
//! inside a network namespace of the test's.
//!
//! What distroless/cc gives that is put here: glibc and libgcc_s (exactly the
//! libraries `ldd` lists for the binary), `/etc/passwd` and `/etc/group`
//! (root, nobody, nonroot), `/etc/nsswitch.conf`, the CA bundle, `/tmp`.
//! What a container runtime mounts is mounted too: `/proc`, `/sys` (read
//! only), `/dev`, and the volumes a test asks for (read only).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::netns::Netns;

/// Where the binary lives in the image (the Dockerfile's COPY target).
pub const BINARY: &str = "/usr/local/bin/podnat-controller";

/// The libraries the binary may link against: what distroless/cc ships.
const DISTROLESS_CC_LIBS: [&str; 7] = [
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
];

pub struct Rootfs {
    pub dir: PathBuf,
    /// `(host path, path in the root)`, bind-mounted read-only.
    volumes: Vec<(PathBuf, String)>,
}

/// The shared libraries `ldd` lists for `binary`, as resolved paths.
pub fn ldd(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    assert!(out.status.success(), "ldd {}", binary.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Rootfs {
    /// The runtime root for `binary`, with mount points for `volumes`.
    pub fn assemble(tag: &str, binary: &Path, volumes: &[(&Path, &str)]) -> Rootfs {
        let dir = std::env::temp_dir().join(format!("podnat-rootfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let at = |p: &str| dir.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(at(BINARY).parent().unwrap()).unwrap();
        std::fs::copy(binary, at(BINARY)).expect("copy the binary");
        for lib in ldd(binary) {
            let name = lib.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                DISTROLESS_CC_LIBS.contains(&name.as_str()),
                "{name}: not in distroless/cc"
            );
            let to = at(&lib.to_string_lossy());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            // Copied through the symlink: the library itself at the path
            // the loader looks up.
            std::fs::copy(&lib, &to).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
        }
        write(
            &at("/etc/passwd"),
            "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        );
        write(
            &at("/etc/group"),
            "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n",
        );
        write(&at("/etc/nsswitch.conf"), "hosts: files dns\n");
        let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if bundle.exists() {
            std::fs::create_dir_all(at("/etc/ssl/certs")).unwrap();
            std::fs::copy(bundle, at("/etc/ssl/certs/ca-certificates.crt")).unwrap();
        }
        for d in ["/tmp", "/proc", "/sys", "/dev", "/root", "/home/nonroot"] {
            std::fs::create_dir_all(at(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(at("/tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let volumes = volumes
            .iter()
            .map(|(host, inside)| {
                std::fs::create_dir_all(at(inside)).unwrap();
                (host.to_path_buf(), inside.to_string())
            })
            .collect();
        Rootfs { dir, volumes }
    }

    /// Every path under the root with its type, size, mode and mtime: equal
    /// before and after a run when nothing was written.
    pub fn snapshot(&self) -> Vec<String> {
        fn walk(base: &Path, p: &Path, out: &mut Vec<String>) {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(p).expect("stat");
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            out.push(format!(
                "/{rel} {:o} {} {}",
                m.mode(),
                m.len(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000
            ));
            if m.is_dir() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                    .expect("read_dir")
                    .map(|e| e.expect("entry").path())
                    .collect();
                entries.sort();
                for e in entries {
                    walk(base, &e, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }

    /// The agent from this root in `ns`, with `env` only and `args`: the
    /// mounts in a private mount namespace, then `capsh` chroots, drops every
    /// capability but CAP_NET_ADMIN from the bounding set, sets no-new-privs
    /// and execs the binary (one process from `ip netns exec` on).
    pub fn command(&self, ns: &Netns, env: &[(&str, &str)], args: &[&str]) -> Command {
        let root = self.dir.display().to_string();
        let mut mounts = format!(
            "set -e\nR='{root}'\nmount --bind \"$R\" \"$R\"\nmount -o remount,bind,ro \"$R\"\n\
             mount -t proc proc \"$R/proc\"\nmount --bind /sys \"$R/sys\"\n\
             mount -o remount,bind,ro \"$R/sys\"\nmount --rbind /dev \"$R/dev\"\n"
        );
        for (host, inside) in &self.volumes {
            mounts.push_str(&format!(
                "mount --bind '{}' \"$R{inside}\"\nmount -o remount,bind,ro \"$R{inside}\"\n",
                host.display()
            ));
        }
        mounts.push_str(&format!(
            "exec capsh --chroot=\"$R\" --drop={} --no-new-privs --shell={BINARY} -- \"$@\"\n",
            drop_all_but_net_admin()
        ));
        let mut c = Command::new("ip");
        c.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env.iter().copied())
            .args([
                "netns",
                "exec",
                &ns.name,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &mounts, "sh"])
            .args(args);
        c
    }
}

/// Every capability of this kernel but cap_net_admin, comma-separated.
fn drop_all_but_net_admin() -> String {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("cap_last_cap")
        .trim()
        .parse()
        .expect("a number");
    // capsh takes numbers as well as names; CAP_NET_ADMIN is 12.
    (0..=last)
        .filter(|&c| c != 12)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A process's capability sets, uid and no-new-privs from /proc.
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
