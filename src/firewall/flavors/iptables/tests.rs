//! Pure tests of the iptables flavor's plans and dry run.
use super::*;
use crate::model::{ForwardRule, Mapping, NatKey, PodRef, Proto, SnatRule};
use std::net::{IpAddr, Ipv4Addr};

fn mail() -> RuleSet {
    let owner = PodRef::new("mail", "mx-0");
    let public_ip: IpAddr = Ipv4Addr::new(203, 0, 113, 7).into();
    let pod_ip: IpAddr = Ipv4Addr::new(10, 1, 0, 5).into();
    let mut r = RuleSet::default();
    for port in [25, 587] {
        r.dnat.push(Mapping {
            key: NatKey {
                public_ip,
                public_port: port,
                proto: Proto::Tcp,
            },
            pod_ip,
            pod_port: port,
            owner: owner.clone(),
        });
        r.forward.push(ForwardRule {
            pod_ip,
            proto: Proto::Tcp,
            pod_port: port,
            owner: owner.clone(),
        });
    }
    r.snat.push(SnatRule {
        pod_ip,
        proto: Proto::Tcp,
        public_ip,
        owner,
    });
    r.normalize();
    r
}

#[test]
fn dry_run_on_an_empty_kernel_creates_everything() {
    let names = Names::new("podnat");
    let flavor = Iptables {
        names,
        jumps: JumpPositions::default(),
        family: Family::Ipv4,
        local: false,
    };
    let state = flavor.empty();
    let changes = Changes::plan(&state, &mail(), &flavor.jumps);
    let got = flavor.render(&state, &changes);
    let want = r#"*nat
-N PODNAT_PRE
-N PODNAT_POST
-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 25 -m comment --comment "mail:mx-0" -j DNAT --to-destination 10.1.0.5:25
-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 587 -m comment --comment "mail:mx-0" -j DNAT --to-destination 10.1.0.5:587
-A PODNAT_POST -d 172.16.0.0/12 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -d 192.168.0.0/16 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -d 10.0.0.0/8 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -d 127.0.0.0/8 -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
-A PODNAT_POST -s 10.1.0.5/32 -p tcp -m comment --comment "mail:mx-0" -j SNAT --to-source 203.0.113.7
-A PREROUTING -m comment --comment "podnat[jump_to_chain]" -j PODNAT_PRE
-A POSTROUTING -m comment --comment "podnat[jump_to_chain]" -j PODNAT_POST
COMMIT
*filter
-N PODNAT_FORWARD
-A PODNAT_FORWARD -d 10.1.0.5/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 25 -m comment --comment "mail:mx-0" -j ACCEPT
-A PODNAT_FORWARD -d 10.1.0.5/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 587 -m comment --comment "mail:mx-0" -j ACCEPT
-A FORWARD -m comment --comment "podnat[jump_to_chain]" -j PODNAT_FORWARD
COMMIT
"#;
    assert_eq!(got, want);
    assert!(changes.creates());
}

#[test]
fn the_state_after_a_plan_plans_nothing() {
    let jumps = JumpPositions::default();
    let state = IptState::default();
    let changes = Changes::plan(&state, &mail(), &jumps);
    let after = changes.after(state, &HashMap::new());
    assert_eq!(after.rules(), mail());
    let again = Changes::plan(&after, &mail(), &jumps);
    assert!(again.is_empty());
    // Removing the first mapping needs its handle, which is unknown.
    let mut less = mail();
    less.dnat.remove(0);
    let c = Changes::plan(&after, &less, &jumps);
    assert!(!c.handles_known(&after));
}

/// Rule messages go without a description (it costs more than the
/// encoding); a refused one is described from the plan, as the dry run
/// writes it.
#[test]
fn a_refused_rule_is_described_as_the_dry_run_writes_it() {
    let flavor = Iptables {
        names: Names::new("podnat"),
        jumps: JumpPositions::default(),
        family: Family::Ipv4,
        local: false,
    };
    let state = flavor.empty();
    let changes = Changes::plan(&state, &mail(), &flavor.jumps);
    let mut batch = NftBatch::new();
    let sent = flavor.encode(&mut batch, &state, &changes);
    assert_eq!(sent.len(), 12, "9 own rules and 3 jumps");
    let dry_run = flavor.render(&state, &changes);
    let final_batch = batch.finalize(None);
    for (seq, _) in &sent {
        assert_eq!(final_batch.what[*seq as usize], "", "undescribed");
        let what = flavor.describe(&changes, &sent, *seq).unwrap();
        let line = what.strip_prefix("add rule ").unwrap();
        assert!(dry_run.lines().any(|l| l == line), "{what}");
    }
    // A message that is not a rule insert (the tables and chains carry their
    // description in the batch).
    assert_eq!(flavor.describe(&changes, &sent, 1), None);
    assert!(final_batch.what[1].starts_with("add table"));
}
