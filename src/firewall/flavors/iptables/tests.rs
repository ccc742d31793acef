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
            span: 0,
        });
        r.forward.push(ForwardRule {
            pod_ip,
            proto: Proto::Tcp,
            pod_port: port,
            owner: owner.clone(),
            span: 0,
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
        counters: false,
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
        counters: false,
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

/// A kernel after an apply of `rules` (every chain and jump made, marked
/// as `marked` says), as `read_state` would see it.
fn applied(flavor: &Iptables, rules: &RuleSet, marked: bool) -> IptState {
    let empty = flavor.empty();
    let changes = Changes::plan(&empty, rules, &flavor.jumps);
    let mut handle = 100;
    let mut handles = HashMap::new();
    for i in 0..PLACES.len() {
        for k in 0..changes.own[i].insert.len() {
            handle += 1;
            handles.insert(Inserted::Own(i, k), handle);
        }
        for k in 0..changes.jumps[i].insert.len() {
            handle += 1;
            handles.insert(Inserted::Jump(i, k), handle);
        }
    }
    let mut st = changes.after(empty, &handles);
    if !marked {
        st.table_marked = [false; 3];
        st.own_marked = [false; N_PLACES];
        st.parent_marked = [false; N_PLACES];
        for i in 0..PLACES.len() {
            st.parent_earlier[i] = st.parent_exists[i] && !st.parents[i].is_empty();
        }
    }
    st
}

fn flavor(local: bool) -> Iptables {
    Iptables {
        names: Names::new("podnat"),
        jumps: JumpPositions::default(),
        family: Family::Ipv4,
        local,
        counters: false,
    }
}

#[test]
fn marked_chains_need_nothing_unmarked_ones_are_adopted_in_one_plan() {
    let f = flavor(true);
    let marked = applied(&f, &mail(), true);
    assert!(marked.adoption().is_none());
    assert!(matches!(f.plan(&marked, &mail()), Planned::Nothing));

    let earlier = applied(&f, &mail(), false);
    let a = earlier.adoption().expect("an earlier version's chains");
    assert_eq!(a.own, vec![0, 1, 2, 3], "every chain of the agent's");
    assert_eq!(
        a.parents,
        vec![0, 1, 2, 3],
        "base chains holding only its jumps"
    );
    let Planned::Change(plan) = f.plan(&earlier, &mail()) else {
        panic!("no adoption planned");
    };
    assert!(plan.creates() && plan.added_dnat.is_empty() && plan.removed_dnat.is_empty());
    // Once committed, everything is marked and settled: nothing more to do.
    let after = f.after(earlier, plan, Vec::new(), &[]);
    // The managed places (the counting ones are not, without the flag).
    assert!((0..4).all(|i| after.own_marked[i] && after.parent_marked[i]));
    assert!(after.adoption().is_none());

    // The Go version published port 25 open; adopted into a restricted
    // table, its other sources' connections are flushed too.
    let earlier = applied(&f, &mail(), false);
    let restricted = mail_restricted(&["198.51.100.0/24"], "mx-0", "10.1.0.5");
    let Planned::Change(plan) = f.plan(&earlier, &restricted) else {
        panic!("no adoption planned");
    };
    assert!(plan.adopt.is_some());
    assert_eq!(
        plan.admission,
        crate::firewall::Admission::between(&mail(), &restricted)
    );
    assert_eq!(plan.admission.len(), 1);
}

#[test]
fn a_chain_with_the_agents_name_and_a_foreign_rule_is_refused_and_never_retired() {
    let f = flavor(true);
    let mut st = applied(&f, &mail(), false);
    // Someone else's rule in an unmarked PODNAT_POST.
    st.own[1].push(Slot {
        handle: Some(999),
        rule: None,
    });
    assert!(st.own_foreign(1) && !st.own_owned(1));
    let Planned::Refused(crate::firewall::FirewallError::NotOurs(why)) = f.plan(&st, &mail())
    else {
        panic!("a foreign chain was planned over");
    };
    assert!(
        why.contains("PODNAT_POST") && why.contains("table ip nat"),
        "{why}"
    );

    // Without local access, a foreign PODNAT_OUTPUT is not retired.
    let g = flavor(false);
    let mut st = applied(&f, &mail(), true);
    st.local = None;
    st.own_marked[3] = false;
    st.own[3].push(Slot {
        handle: Some(998),
        rule: None,
    });
    let plan = Changes::plan(&st, &mail(), &g.jumps);
    assert!(!plan.delete_own[3] && plan.own[3].is_empty() && plan.jumps[3].is_empty());
}

/// `mail()` with port 25 restricted to `ranges` (none: open), owned by
/// `pod` at `pod_ip`.
fn mail_restricted(ranges: &[&str], pod: &str, pod_ip: &str) -> RuleSet {
    let mut r = mail();
    let owner = PodRef::new("mail", pod);
    let pod_ip: IpAddr = pod_ip.parse().unwrap();
    let key = r.dnat[0].key;
    r.dnat[0].owner = owner.clone();
    r.dnat[0].pod_ip = pod_ip;
    r.allow = ranges
        .iter()
        .map(|s| crate::model::SourceRule {
            key,
            span: 0,
            source: s.parse().unwrap(),
            owner: owner.clone(),
        })
        .collect();
    r.normalize();
    r
}

/// A change of a key's ranges or mapping, planned by `delta` on a settled
/// state, rewrites exactly that key's DNAT rules (one per range, `-s`) and
/// reaches what a full plan reaches, with the same keys narrowed.
#[test]
fn a_change_of_ranges_is_planned_per_key_as_the_full_plan_would() {
    for local in [false, true] {
        ranges_delta_steps(local);
    }
}

/// `a_change_of_ranges_…` with or without local access (the hairpin MARK
/// rules sort before the DNAT rules in `<PREFIX>_PRE`).
fn ranges_delta_steps(local: bool) {
    let f = flavor(local);
    let with_pods = |mut r: RuleSet| {
        if local && !r.dnat.is_empty() {
            for (ip, pod) in [("10.1.0.5", "mx-0"), ("10.1.0.9", "web-0")] {
                r.local.push(crate::model::LocalPod {
                    pod_ip: ip.parse().unwrap(),
                    owner: PodRef::new("mail", pod),
                });
            }
            r.normalize();
        }
        r
    };
    let steps = [
        mail_restricted(&[], "mx-0", "10.1.0.5"),
        mail_restricted(&["198.51.100.0/24"], "mx-0", "10.1.0.5"),
        mail_restricted(&["198.51.100.0/24", "192.0.2.0/25"], "mx-0", "10.1.0.5"),
        mail_restricted(&["192.0.2.0/25"], "mx-0", "10.1.0.5"),
        mail_restricted(&["192.0.2.0/25"], "mx-1", "10.1.0.6"),
        mail_restricted(&["192.0.2.0/25"], "mx-1", "10.1.0.7"),
        mail_restricted(&[], "mx-1", "10.1.0.7"),
        RuleSet::default(),
    ]
    .map(with_pods);
    let mut state = applied(&f, &steps[0], true);
    assert!(state.settled);
    for pair in steps.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        let ch = crate::firewall::Changes::between(from, to);
        let delta = Changes::delta(&state, &ch).expect("settled state, fitting change");
        let full = Changes::plan(&state, to, &f.jumps);
        assert_eq!(delta.admission, full.admission, "{to:?}");
        assert_eq!(
            delta.admission,
            crate::firewall::Admission::between(from, to),
            "{to:?}"
        );
        // Only port 25's DNAT rules move (and 587's when everything goes).
        let pre = Place::Pre.index();
        let is_dnat = |r: &AgentRule| matches!(r, AgentRule::Dnat(..));
        let moved = delta.own[pre]
            .delete
            .iter()
            .filter(|&&j| state.own[pre][j].rule.as_ref().is_some_and(is_dnat))
            .count()
            + delta.own[pre]
                .insert
                .iter()
                .filter(|(r, _)| is_dnat(r))
                .count();
        assert!(moved <= 3, "{moved} DNAT rules for one key");
        let mut handle = 1000;
        let handles = (0..delta.own.len())
            .flat_map(|i| (0..delta.own[i].insert.len()).map(move |k| Inserted::Own(i, k)))
            .map(|ins| {
                handle += 1;
                (ins, handle)
            })
            .collect();
        state = delta.after(state, &handles);
        assert!(state.settled);
        assert_eq!(state.rules(), *to);
        assert!(Changes::plan(&state, to, &f.jumps).is_empty());
    }
    if local {
        return;
    }
    // The view lists a restricted key's rules as iptables-nft-save would.
    let two = &steps[2];
    let save = crate::firewall::view::iptables_save(two, &f.names, Family::Ipv4);
    let dnat: Vec<&str> = save.lines().filter(|l| l.contains("-j DNAT")).collect();
    assert_eq!(
        dnat,
        [
            "-A PODNAT_PRE -s 192.0.2.0/25 -d 203.0.113.7/32 -p tcp -m tcp --dport 25 -m comment --comment \"mail:mx-0\" -j DNAT --to-destination 10.1.0.5:25",
            "-A PODNAT_PRE -s 198.51.100.0/24 -d 203.0.113.7/32 -p tcp -m tcp --dport 25 -m comment --comment \"mail:mx-0\" -j DNAT --to-destination 10.1.0.5:25",
            "-A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 587 -m comment --comment \"mail:mx-0\" -j DNAT --to-destination 10.1.0.5:587",
        ]
    );
}
