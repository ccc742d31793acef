//! The binary as a user runs it: flag errors, the cluster-less dry run.

use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_podnat-controller"));
    c.env_remove("NODE_NAME")
        .env_remove("HOSTNAME")
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run podnat-controller")
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn bad_flag_values_stop_with_status_2_and_one_line() {
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["-restrictedports=22,70000"],
            "--restricted-ports",
            "70000",
        ),
        (
            &["-firewallflavor=ebtables"],
            "--firewall-flavor",
            "ebtables",
        ),
        (&["--firewall-flavor", "pf"], "--firewall-flavor", "pf"),
        (
            &["-inclfilternet=10.0.0.0/33"],
            "--incl-filter-net",
            "10.0.0.0/33",
        ),
        (&["-exclfilternet", "bogus"], "--excl-filter-net", "bogus"),
        (&["-iptablesJump=1,2"], "--iptables-jump", "1,2"),
        (&["-iptablesJump=x,2,3"], "--iptables-jump", "x,2,3"),
        (&["-httpport=70000"], "--http-port", "70000"),
        (&["-stateuri=ftp://dav"], "--state-uri", "ftp://dav"),
        (&["-ipfamilies=ipv5"], "--ip-families", "ipv5"),
        (&["--ip-families", "ipv4,"], "--ip-families", "ipv4,"),
        (
            &["--public-address", "203.0.113.7,198.51.100.7"],
            "--public-address",
            "two ipv4 addresses",
        ),
        (
            &["--public-address", "2001:db8::7"],
            "--public-address",
            "ipv6 is not enabled",
        ),
        (
            &["-inclfilternet=2001:db8::/129"],
            "--incl-filter-net",
            "2001:db8::/129",
        ),
        (
            &["-namespaceselector=tier in mail"],
            "--namespace-selector",
            "parentheses",
        ),
        (
            &["--namespace-selector", "a=b,"],
            "--namespace-selector",
            "empty requirement",
        ),
        (&["-guardnodeports=maybe"], "--guard-node-ports", "maybe"),
        (&["-httpauth=maybe"], "--http-auth", "maybe"),
        (&["-httpaddress=localhost"], "--http-address", "localhost"),
        (
            &["--tls-cert-file=/etc/tls.crt"],
            "--tls-cert-file",
            "--tls-private-key-file",
        ),
        (
            &[
                "-httpauth=false",
                "-tlscertfile=/c",
                "-tlsprivatekeyfile=/k",
            ],
            "--tls-cert-file",
            "-httpauth=false",
        ),
    ];
    for (args, flag, value) in cases {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr:?}"
        );
        assert!(
            stderr.contains(flag) && stderr.contains(value),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn unknown_flag_fails_with_a_suggestion() {
    let out = run(&["-dryrunn"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--dry-run"), "{stderr}");
}

#[test]
fn go_chart_flags_are_accepted() {
    // What the old chart passed: klog flags plus Go spellings.
    let out = run(&[
        "-logtostderr",
        "-v=2",
        "-dryrun",
        "-nodeID=node1",
        "-iptablesJump",
        "-1,-1,-1",
        "--pods-file",
        &fixture("mail-pods.json"),
        "--public-address",
        "203.0.113.7",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("klog flags of the Go version accepted"),
        "{stderr}"
    );
}

#[test]
fn dry_run_prints_the_rule_view_for_a_pods_file() {
    let out = run(&[
        "-dryrun",
        "-nodeid=node1",
        "--pods-file",
        &fixture("mail-pods.json"),
        "--public-address",
        "203.0.113.7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let dnat: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("-A PODNAT_PRE ") && l.contains("-j DNAT"))
        .collect();
    assert_eq!(dnat.len(), 3, "{stdout}");
    assert!(stdout.contains(
        "-A PODNAT_POST -s 10.1.0.5/32 -p tcp -m comment --comment \"mail:mx-0\" -j SNAT --to-source 203.0.113.7"
    ));
    // Local access (the default): every pod of node1 is a hairpin source,
    // annotated or not, valid or not; the pod on node2 is not.
    let marks: Vec<&str> = stdout.lines().filter(|l| l.contains("-j MARK")).collect();
    assert_eq!(marks.len(), 2, "{stdout}");
    assert!(marks[0].starts_with("-A PODNAT_PRE -s 10.1.0.5/32 -m addrtype --dst-type LOCAL"));
    assert!(stdout.contains("-N PODNAT_OUTPUT\n"), "{stdout}");
    // The broken pod is reported and skipped; the pod on node2 is ignored.
    assert!(
        stderr.contains("web:broken") && stderr.contains("entries[0].dstPort: port 0 is reserved"),
        "{stderr}"
    );
    assert!(!stdout.contains("-j DNAT --to-destination 10.1.0.6") && !stdout.contains("10.2.0.6"));

    let out = run(&[
        "--dry-run",
        "--firewall-flavor=nftables",
        "--node-id=node1",
        "--pods-file",
        &fixture("mail-pods.json"),
        "--public-address=203.0.113.7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.starts_with("table ip podnat {\n"), "{stdout}");
    assert!(stdout.contains("203.0.113.7 . tcp . 587 comment \"mail:mx-0\" : 10.1.0.5 . 587"));
}

/// The mail pod of the fixture with an IPv6 address too, as a dual-stack
/// kubelet reports it.
fn dual_stack_pods_file() -> std::path::PathBuf {
    let text = std::fs::read_to_string(fixture("mail-pods.json")).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    for pod in doc["items"].as_array_mut().unwrap() {
        if pod["metadata"]["name"] == "mx-0" {
            pod["status"]["podIPs"] = serde_json::json!([{"ip": "10.1.0.5"}, {"ip": "fd00:1::5"}]);
        }
    }
    let path = std::env::temp_dir().join(format!("podnat-dual-pods-{}.json", std::process::id()));
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

#[test]
fn dry_run_covers_both_families_when_ipv6_is_enabled() {
    let path = dual_stack_pods_file();
    let pods = path.to_str().unwrap();
    let args = [
        "-dryrun",
        "-nodeid=node1",
        "-ipfamilies=ipv4,ipv6",
        "--pods-file",
        pods,
        "--public-address",
        "203.0.113.7,2001:db8::7",
    ];
    let out = run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (v4, v6) = stdout.split_once("# ipv6\n").expect("an IPv6 part");
    assert!(v4.starts_with("# ipv4\n"), "{stdout}");
    assert!(
        v4.contains("-d 203.0.113.7/32 -p tcp -m tcp --dport 25 "),
        "{stdout}"
    );
    assert!(v6.contains(
        "-A PODNAT_PRE -d 2001:db8::7/128 -p tcp -m tcp --dport 25 -m comment --comment \"mail:mx-0\" -j DNAT --to-destination [fd00:1::5]:25"
    ), "{stdout}");
    assert!(
        v6.contains("-A PODNAT_POST -d fc00::/7 -m comment"),
        "{stdout}"
    );

    let mut nft = args.to_vec();
    nft.push("-firewallflavor=nftables");
    let out = run(&nft);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("table ip podnat {") && stdout.contains("table ip6 podnat {"));
    assert!(
        stdout.contains("2001:db8::7 . tcp . 587 comment \"mail:mx-0\" : fd00:1::5 . 587"),
        "{stdout}"
    );

    // The default ipv4 ignores the pod's IPv6 address.
    let v4_only: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !a.starts_with("-ipfamilies"))
        .map(|a| {
            if a.contains("2001:db8") {
                "203.0.113.7"
            } else {
                a
            }
        })
        .collect();
    let out = run(&v4_only);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("-d 203.0.113.7/32"), "{stdout}");
    assert!(
        !stdout.contains("2001:db8") && !stdout.contains("fd00"),
        "{stdout}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn without_cluster_or_pods_file_says_what_is_missing() {
    let out = run(&["-nodeid=node1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--pods-file"), "{stderr}");
}

#[test]
fn missing_node_id_is_reported() {
    let out = run(&["-dryrun", "--pods-file", &fixture("mail-pods.json")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node id"));
}

#[test]
fn unreadable_pods_file_names_the_path() {
    let out = run(&[
        "-dryrun",
        "-nodeid=n",
        "--pods-file",
        "/nonexistent/pods.json",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pods.json"));
}
