//! `make demo` as a test: the walk-through (scripts/demo) with this build's
//! binary must exit 0, show what it promises (events, entries, rule views
//! equal to the kernel's listings, traffic both ways through the NAT, for
//! both flavors) and leave no network namespace, process or directory
//! behind.

use std::collections::BTreeSet;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn netns_list() -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// (pid, command line) of every process.
fn processes() -> BTreeSet<(u32, String)> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out.insert((pid, cmd.trim().to_string()));
        }
    }
    out
}

#[test]
fn make_demo_exits_0_and_leaves_nothing_behind() {
    // Every namespace, path and process of the demo carries this id.
    let id = format!("pndemo{}", std::process::id());
    let ns_before = netns_list();
    let procs_before = processes();

    let out = Command::new("make")
        .args([
            "--no-print-directory",
            "demo",
            concat!("PODNAT_BIN=", env!("CARGO_BIN_EXE_podnat-controller")),
        ])
        .env("DEMO_ID", &id)
        .current_dir(ROOT)
        .output()
        .expect("run make demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "make demo failed ({}):\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );

    for promise in [
        "NATApplied         pod/web   203.0.113.7:80/tcp → 10.1.0.5:8080",
        "InvalidAnnotation  pod/typo",
        "\"state\": \"applied\"",
        "\"state\": \"invalid\"",
        "-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 80",
        "elements = { 203.0.113.7 . tcp . 80 comment \"demo:web\" : 10.1.0.5 . 8080 }",
        "hello from pod demo/web; I see you as 203.0.113.1:",
        "client 203.0.113.1 here; I see you as 203.0.113.7:",
        "the node reached the pod through its own public address",
        // Dual-stack: the same mapping on the node's IPv6 address.
        "hello from pod demo/web; I see you as [2001:db8::1]:",
        "the client reached the pod through the public IPv6 address",
        // Hairpin: a pod of the node reaching its neighbour's published port.
        "neighbour$ socat - TCP:203.0.113.7:80",
        "a pod of the node reached its neighbour's published address",
        "podnat_rules_owned{family=\"ipv4\",kind=\"dnat\"} 1",
        "namespaces, processes, the cluster and",
    ] {
        assert!(
            stdout.contains(promise),
            "missing {promise:?} in:\n{stdout}"
        );
    }
    // No stray error lines (a relay's broken pipe, a client's write).
    for out in [&stdout, &stderr] {
        assert!(
            !out.lines()
                .any(|l| l.contains(" socat[") || l.contains("Broken pipe")),
            "stray error lines:\n{out}"
        );
    }
    assert_eq!(
        stdout
            .matches("identical: the endpoint shows what the kernel holds")
            .count(),
        2,
        "one rule view per flavor:\n{stdout}"
    );

    // Nothing left: namespaces, processes, the work directory.
    let ns_after = netns_list();
    let new_ns: Vec<&String> = ns_after.difference(&ns_before).collect();
    assert!(
        !ns_after.iter().any(|n| n.starts_with(&id)),
        "demo namespaces left: {ns_after:?}"
    );
    assert!(
        new_ns.iter().all(|n| n.starts_with("pn-")),
        "namespaces appeared during the demo (other than concurrent tests' pn-*): {new_ns:?}"
    );
    let leftover: Vec<(u32, String)> = processes()
        .difference(&procs_before)
        .filter(|(_, cmd)| cmd.contains(&id))
        .cloned()
        .collect();
    assert!(leftover.is_empty(), "processes left behind: {leftover:?}");
    assert!(
        !std::path::Path::new(&format!("/tmp/{id}")).exists(),
        "/tmp/{id} left behind"
    );
}
