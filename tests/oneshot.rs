//! The one-shot `--pods-file` mode detects the public address as the agent
//! does (one rtnetlink dump, same filters, same skip reasons in the log),
//! unless `--public-address` gives it. Each test runs the binary in a network
//! namespace of its own with veth links (this kernel has no dummy driver).

#[path = "support/netns.rs"]
mod netns;

use std::process::Output;

use netns::Netns;

/// A veth pair `NAME`/`NAMEp`, both ends up (carrier, operational state UP).
fn link(ns: &Netns, name: &str, addr: &str) {
    ns.sh(&format!(
        "ip link add {name} type veth peer name {name}p && ip link set {name}p up && \
         ip link set {name} up && ip addr add {addr} dev {name}"
    ));
}

fn one_shot(ns: &Netns, flavor: &str, extra: &[&str]) -> Output {
    ns.command(env!("CARGO_BIN_EXE_podnat-controller"))
        .env_remove("RUST_LOG")
        .args([&format!("-firewallflavor={flavor}"), "-nodeid=node1"])
        .args(extra)
        .arg("--pods-file")
        .arg(format!(
            "{}/tests/fixtures/mail-pods.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .expect("run podnat-controller")
}

fn text(out: &Output) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stderr}", out.status);
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// The DNAT rules of `<PREFIX>_PRE` (its hairpin marks left out).
fn dnat_lines(ns: &Netns) -> Vec<String> {
    ns.sh("iptables-nft-save -t nat")
        .lines()
        .filter(|l| l.starts_with("-A PODNAT_PRE ") && l.contains("-j DNAT"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_public_address_on_an_up_link_is_used_for_auto_entries() {
    let ns = Netns::new("oneshot-pub");
    link(&ns, "lan0", "10.0.0.2/24");
    link(&ns, "wan0", "203.0.113.5/24");
    // Dry run first: it prints the rules with the detected address.
    let (stdout, stderr) = text(&one_shot(&ns, "iptables", &["-dryrun"]));
    assert!(stderr.contains("public address detected"), "{stderr}");
    assert!(
        stdout.contains("-A PODNAT_PRE -d 203.0.113.5/32 -p tcp -m tcp --dport 25 "),
        "{stdout}"
    );
    let (_, stderr) = text(&one_shot(&ns, "iptables", &[]));
    // The log names the choice and why the other address was passed over.
    for part in [
        "public address detected public_address=203.0.113.5 (skipped: ",
        "10.0.0.2: in 10.0.0.0/8, filtered by default (allow it with -exclfilternet 10.0.0.0/8)",
    ] {
        assert!(stderr.contains(part), "{part:?} not in:\n{stderr}");
    }
    let dnat = dnat_lines(&ns);
    assert_eq!(dnat.len(), 3, "{dnat:?}");
    assert!(
        dnat.iter().all(|l| l.contains("-d 203.0.113.5/32")),
        "{dnat:?}"
    );
    // The native flavor detects the same way.
    text(&one_shot(&ns, "nftables", &[]));
    let nft = ns.sh("nft list map ip podnat dnat_to_pod");
    assert!(nft.contains("203.0.113.5 . tcp . 587"), "{nft}");
}

#[test]
fn only_private_addresses_leave_auto_entries_pending_and_say_why() {
    let ns = Netns::new("oneshot-priv");
    link(&ns, "lan0", "192.168.7.2/24");
    link(&ns, "lan1", "172.20.0.2/16");
    let (stdout, stderr) = text(&one_shot(&ns, "iptables", &["-dryrun"]));
    assert!(!stdout.contains("-j DNAT"), "{stdout}");
    for why in [
        "no public address qualifies; auto entries stay pending",
        "192.168.7.2: in 192.168.0.0/16, filtered by default (allow it with -exclfilternet 192.168.0.0/16)",
        "172.20.0.2: in 172.16.0.0/12, filtered by default",
        "no public address known yet; entry pending",
    ] {
        assert!(stderr.contains(why), "{why:?} not in:\n{stderr}");
    }
    text(&one_shot(&ns, "iptables", &[]));
    assert_eq!(dnat_lines(&ns), Vec::<String>::new());
    // The agent's own filter flags apply: allowed again, it is chosen.
    text(&one_shot(
        &ns,
        "iptables",
        &["-exclfilternet=192.168.0.0/16"],
    ));
    let dnat = dnat_lines(&ns);
    assert_eq!(dnat.len(), 3, "{dnat:?}");
    assert!(
        dnat.iter().all(|l| l.contains("-d 192.168.7.2/32")),
        "{dnat:?}"
    );
}

#[test]
fn public_address_flag_wins_over_detection() {
    let ns = Netns::new("oneshot-flag");
    link(&ns, "wan0", "203.0.113.5/24");
    let (_, stderr) = text(&one_shot(
        &ns,
        "iptables",
        &["--public-address", "198.51.100.9"],
    ));
    assert!(!stderr.contains("public address detected"), "{stderr}");
    let dnat = dnat_lines(&ns);
    assert_eq!(dnat.len(), 3, "{dnat:?}");
    assert!(
        dnat.iter().all(|l| l.contains("-d 198.51.100.9/32")),
        "{dnat:?}"
    );
}
