use super::*;

fn parse(args: &[&str]) -> Result<Config, clap::Error> {
    let mut v: Vec<OsString> = vec!["podnat-controller".into()];
    v.extend(args.iter().map(OsString::from));
    Config::parse_from(v, |_| None)
}

#[test]
fn defaults_match_the_spec() {
    let c = parse(&[]).unwrap();
    assert!(!c.dry_run);
    assert_eq!(c.annotation_key, "bln.space/podnat");
    assert_eq!(c.informer_resync_secs, 180);
    assert_eq!(c.restricted_ports, [22, 53, 6443].into_iter().collect());
    assert_eq!(c.http_port, 8484);
    assert_eq!(c.flavor, Flavor::Iptables);
    assert_eq!(c.jump, JumpPositions::default());
    assert!(c.incl_filter_net.is_empty() && c.excl_filter_net.is_empty());
    assert_eq!(c.resource_prefix, "podnat");
    assert_eq!(c.state_flavor, StateFlavor::Configmap);
    assert_eq!(c.state_uri, "http://podnat-state-store:80");
    assert_eq!(c.node_id, None);
    assert_eq!(
        c.http,
        HttpConfig {
            auth: true,
            address: "0.0.0.0".parse().unwrap(),
            tls: TlsSource::SelfSigned
        }
    );
    assert!(c.guard_node_ports);
    assert!(c.namespace_selector.selects_all());
}

#[test]
fn security_flags_in_both_spellings() {
    let a = parse(&["-guardnodeports=false", "-namespaceselector=env=prod"]).unwrap();
    let b = parse(&[
        "--guard-node-ports=false",
        "--namespace-selector",
        "env=prod",
    ])
    .unwrap();
    assert_eq!(a, b);
    assert!(!a.guard_node_ports);
    assert_eq!(a.namespace_selector.to_string(), "env=prod");
    let labels = [("env".to_string(), "prod".to_string())].into();
    assert!(a.namespace_selector.matches(&labels));
    assert!(parse(&["-namespaceSelector=env in (a"]).is_err());
}

#[test]
fn go_spellings_equal_kebab_forms() {
    let pairs: &[(&[&str], &[&str])] = &[
        (&["-dryrun"], &["--dry-run"]),
        (&["-dryRun"], &["--dry-run=true"]),
        (
            &["-dryrun=false", "-httpport=1"],
            &["--dry-run=false", "--http-port=1"],
        ),
        (&["-annotationkey=x/y"], &["--annotation-key", "x/y"]),
        (&["-annotationKey", "x/y"], &["--annotation-key=x/y"]),
        (&["--annotationkey", "x/y"], &["--annotation-key=x/y"]),
        (&["-informerresync=60"], &["--informer-resync", "60"]),
        (&["-informerResync", "60"], &["--informer-resync", "60"]),
        (
            &["-restrictedports=22,25"],
            &["--restricted-ports", "22,25"],
        ),
        (
            &["-restrictedPorts", "22,25"],
            &["--restricted-ports", "22,25"],
        ),
        (&["-httpport=9090"], &["--http-port", "9090"]),
        (&["-httpPort", "9090"], &["--http-port", "9090"]),
        (
            &["-firewallflavor=nftables"],
            &["--firewall-flavor", "nftables"],
        ),
        (
            &["-firewallFlavor", "nftables"],
            &["--firewall-flavor", "nftables"],
        ),
        (&["-iptablesJump=-1,2,-3"], &["--iptables-jump", "-1,2,-3"]),
        (&["-iptablesjump", "-1,2,-3"], &["--iptables-jump=-1,2,-3"]),
        (
            &["-inclfilternet=203.0.113.0/24"],
            &["--incl-filter-net", "203.0.113.0/24"],
        ),
        (
            &["-inclFilterNet", "203.0.113.0/24"],
            &["--incl-filter-net", "203.0.113.0/24"],
        ),
        (
            &["-exclfilternet=192.168.0.0/16"],
            &["--excl-filter-net", "192.168.0.0/16"],
        ),
        (
            &["-excludefilternetworks=192.168.0.0/16"],
            &["--excl-filter-net", "192.168.0.0/16"],
        ),
        (
            &["-exclFilterNet", "192.168.0.0/16"],
            &["--excl-filter-net", "192.168.0.0/16"],
        ),
        (&["-resourceprefix=pn"], &["--resource-prefix", "pn"]),
        (&["-resourcePrefix", "pn"], &["--resource-prefix", "pn"]),
        (&["-stateflavor=webdav"], &["--state-flavor", "webdav"]),
        (&["-stateFlavor", "none"], &["--state-flavor", "none"]),
        (
            &["-stateuri=http://dav:8080/"],
            &["--state-uri", "http://dav:8080"],
        ),
        (
            &["-stateURI", "http://dav:8080"],
            &["--state-uri", "http://dav:8080"],
        ),
        (&["-nodeid=node1"], &["--node-id", "node1"]),
        (&["-nodeID", "node1"], &["--node-id", "node1"]),
        (&["-v=4"], &["--v", "4"]),
        (&["-v", "4"], &["--v=4"]),
        (&["-httpauth=false"], &["--http-auth=false"]),
        (&["-httpAuth=0"], &["--http-auth=false"]),
        (&["-httpaddress=::"], &["--http-address", "::"]),
        (&["-httpAddress", "[::]"], &["--http-address=::"]),
        (&["-httpaddress=10.0.0.1"], &["--http-address", "10.0.0.1"]),
        (
            &["-tls-cert-file=/c", "-tlsPrivateKeyFile", "/k"],
            &["--tls-cert-file", "/c", "--tls-private-key-file=/k"],
        ),
    ];
    for (go, kebab) in pairs {
        let a = parse(go).unwrap_or_else(|e| panic!("{go:?}: {e}"));
        let b = parse(kebab).unwrap_or_else(|e| panic!("{kebab:?}: {e}"));
        assert_eq!(a, b, "{go:?} vs {kebab:?}");
        assert_ne!(a, parse(&[]).unwrap(), "{go:?} changed nothing");
    }
}

#[test]
fn klog_flags_are_accepted_and_noted() {
    let c = parse(&[
        "-logtostderr",
        "-alsologtostderr=true",
        "-stderrthreshold",
        "INFO",
        "-vmodule=x=2",
        "-log_dir",
        "/tmp",
        "-log_file=/tmp/x",
        "-skip_headers",
        "-dryrun",
    ])
    .unwrap();
    assert!(c.dry_run);
    assert_eq!(
        c.ignored_flags,
        vec![
            "-logtostderr",
            "-alsologtostderr",
            "-stderrthreshold",
            "-vmodule",
            "-log_dir",
            "-log_file",
            "-skip_headers"
        ]
    );
}

#[test]
fn lists_append_and_split() {
    let c = parse(&[
        "-inclfilternet=203.0.113.0/24,198.51.100.7",
        "--incl-filter-net",
        "100.64.0.0/10",
    ])
    .unwrap();
    assert_eq!(
        c.incl_filter_net,
        vec![
            "203.0.113.0/24".parse::<IpNet>().unwrap(),
            "198.51.100.7/32".parse().unwrap(),
            "100.64.0.0/10".parse().unwrap()
        ]
    );
}

#[test]
fn node_id_falls_back_to_env() {
    let args = || vec![OsString::from("p")];
    let c = Config::parse_from(args(), |k| (k == "HOSTNAME").then(|| "h1".to_string())).unwrap();
    assert_eq!(c.node_id.as_deref(), Some("h1"));
    let c = Config::parse_from(args(), |k| Some(format!("{k}-value"))).unwrap();
    assert_eq!(c.node_id.as_deref(), Some("NODE_NAME-value"));
    let mut a = args();
    a.push("-nodeid=n9".into());
    let c = Config::parse_from(a, |k| Some(format!("{k}-value"))).unwrap();
    assert_eq!(c.node_id.as_deref(), Some("n9"));
}

#[test]
fn node_id_is_exact_only_when_it_can_be() {
    let exact = |args: &[&str], node_name: Option<&str>, host: Option<&str>| {
        let mut v: Vec<OsString> = vec!["p".into()];
        v.extend(args.iter().map(OsString::from));
        let c = Config::parse_from(v, |k| match k {
            "NODE_NAME" => node_name.map(str::to_string),
            "HOSTNAME" => host.map(str::to_string),
            _ => None,
        })
        .unwrap();
        c.node_id_exact
    };
    assert!(
        exact(&[], Some("node1"), Some("h")),
        "NODE_NAME is the exact name"
    );
    assert!(
        exact(&["-nodeid=node1.example.org"], None, None),
        "a full name"
    );
    assert!(
        exact(&["-nodeid=node1"], Some("node1"), None),
        "confirmed by NODE_NAME"
    );
    assert!(!exact(&["-nodeid=node1"], None, None), "a short -nodeid");
    assert!(!exact(&[], None, Some("node1")), "a short HOSTNAME");
    assert!(exact(&[], None, Some("node1.example.org")));
}

#[test]
fn bad_values_fail() {
    for bad in [
        &["-restrictedports=22,70000"][..],
        &["-firewallflavor=ebtables"],
        &["-inclfilternet=10.0.0.0/33"],
        &["-iptablesJump=1,2"],
        &["-iptablesJump=a,b,c"],
        &["-httpport=99999"],
        &["-stateuri=ftp://x"],
        &["-dryrun=maybe"],
        &["-nosuchflag"],
        &["-httpauth=maybe"],
        &["-httpaddress=localhost"],
        &["-httpaddress=0.0.0.0:8484"],
        &["--tls-cert-file=/c"],
        &["--tls-private-key-file=/k"],
        &[
            "-httpauth=false",
            "--tls-cert-file=/c",
            "--tls-private-key-file=/k",
        ],
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn cleanup_subcommand_takes_flags_on_either_side() {
    let c = parse(&["cleanup", "-firewallflavor=nftables"]).unwrap();
    assert!(matches!(
        c.command,
        Some(Command::Cleanup {
            for_go_version: false
        })
    ));
    assert_eq!(c.flavor, Flavor::Nftables);
    let c = parse(&["-resourceprefix=pn", "cleanup"]).unwrap();
    assert_eq!(c.resource_prefix, "pn");
    let c = parse(&["cleanup", "--for-go-version", "-iptablesjump=1,1,1"]).unwrap();
    assert!(matches!(
        c.command,
        Some(Command::Cleanup {
            for_go_version: true
        })
    ));
    assert_eq!(c.jump.forward, 1);
}

#[test]
fn short_names() {
    assert_eq!(short_node_name("node1.example.org"), "node1");
    assert_eq!(short_node_name("node1"), "node1");
}

#[test]
fn local_access_and_the_fourth_jump_position() {
    let c = parse(&[]).unwrap();
    assert!(c.local_access, "on by default");
    assert_eq!(c.jump.output, -2);
    for args in [
        &["-localaccess=false"][..],
        &["--local-access=false"],
        &["-localAccess=0"],
    ] {
        assert!(!parse(args).unwrap().local_access, "{args:?}");
    }
    let c = parse(&["-iptablesJump=1,2,3,-4"]).unwrap();
    assert_eq!(
        c.jump,
        JumpPositions {
            forward: 1,
            prerouting: 2,
            postrouting: 3,
            output: -4
        }
    );
    // Three values as before: OUTPUT at its default.
    assert_eq!(parse(&["-iptablesJump=1,2,3"]).unwrap().jump.output, -2);
    assert!(parse(&["-iptablesJump=1,2,3,4,5"]).is_err());
    assert!(parse(&["-localaccess=maybe"]).is_err());
}

#[test]
fn ip_families_in_every_spelling() {
    use crate::model::Families;
    assert_eq!(parse(&[]).unwrap().families, Families::default());
    for args in [
        &["-ipfamilies=ipv4,ipv6"][..],
        &["--ip-families", "ipv6,ipv4"],
        &["-ipFamilies=IPv4,IPv6"],
    ] {
        assert_eq!(parse(args).unwrap().families, Families::DUAL, "{args:?}");
    }
    let v6 = parse(&["-ipfamilies=ipv6"]).unwrap().families;
    assert!(v6.ipv6 && !v6.ipv4);
    let both = ["--public-address", "203.0.113.7,2001:db8::7"];
    let c = parse(&[&both[..], &["-ipfamilies=ipv4,ipv6"]].concat()).unwrap();
    let p = c.public_address.unwrap();
    assert_eq!(p.v4, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(p.v6, Some("2001:db8::7".parse().unwrap()));
    // An address of a family that is not enabled is refused, not ignored.
    let e = parse(&both).unwrap_err().to_string();
    assert!(e.contains("ipv6 is not enabled"), "{e}");
}
