//! Flavor `nftables`: a table of the agent's own, `ip <prefix>`, whose
//! per-mapping data lives in two maps and a set (see `view::nft` for the text
//! form). The packet path is three lookups whatever the number of mappings,
//! and a change is element adds/deletes, so its cost does not grow with the
//! table.

use rustables::{Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, Table};

use super::families::PerFamily;
use crate::firewall::engine::applier::{Applier, Effect, Flavor, Planned};
use crate::firewall::engine::coexist::OwnForward;
use crate::firewall::engine::monitor::{Interest, TableInterest};
use crate::firewall::names::{self, Names};
use crate::firewall::wire::encode::{
    self, octets, Exprs, BASE_NETWORK, BASE_TRANSPORT, REG32_01, REG32_02, REG_1, TH_DPORT,
};
use crate::firewall::wire::netlink::{
    attr_be32, attr_str, find_attr, parse_attrs, protocol_family, sys, Attrs, Echo, NetlinkError,
    NfSocket, NftBatch, NftMsg, Scope,
};
use crate::firewall::{view, Admission, Changes, FirewallError};
use crate::model::{
    internal_networks, Families, Family, ForwardRule, LocalPod, Mapping, NatKey, PodRef, Proto,
    RuleSet, SnatRule, SourceRule,
};

mod elements;
mod layout;
mod traffic;

use self::elements::*;
use self::layout::*;
pub(crate) use self::traffic::counter_values;
pub use self::traffic::{read_traffic, Traffic};
pub use crate::firewall::Features;

/// What the kernel holds of the agent's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NativeState {
    pub table_exists: bool,
    /// The table carries the agent's mark (`Names::mark`).
    pub marked: bool,
    /// Unmarked, but exactly the agent's layout (with or without local
    /// access): made by an earlier version, adopted at the next apply.
    pub earlier: bool,
    /// Table, sets, chains and rules are exactly the agent's layout.
    pub structure_ok: bool,
    pub rules: RuleSet,
}

impl NativeState {
    /// The agent's table: marked, or an earlier version's.
    pub fn owned(&self) -> bool {
        self.table_exists && (self.marked || self.earlier)
    }

    /// A table with the agent's name that is not the agent's.
    pub fn foreign(&self) -> bool {
        self.table_exists && !self.owned()
    }
}

/// The native flavor for one family: the layout of the table `ip <prefix>`
/// (or `ip6 <prefix>`) and its elements. Pure but for `read`/`teardown`,
/// which dump through the applier's socket.
pub struct Nftables {
    names: Names,
    family: Family,
    /// `-localaccess`: the output chain, the hairpin mark and masquerade,
    /// the set of this node's pods.
    local: bool,
    /// The source allow-lists' (Linux 5.6) and the counters' (5.7) sets and
    /// chains that are part of the layout.
    features: Features,
}

/// Rules with ranges on a kernel without concatenated interval sets: the
/// planner refuses such entries first; if they came, nothing is applied
/// rather than the port opened to every source.
const NO_SOURCE_RANGES: &str = "source allow-lists (sourceRanges) need Linux 5.6 or later (concatenated interval sets); nothing applied";

/// The kernel release `sourceRanges` needs in this flavor: concatenated
/// interval sets (nft_set_pipapo) came with Linux 5.6.
pub const SOURCE_RANGES_KERNEL: (u32, u32) = (5, 6);

/// The kernel release per-mapping traffic counters need: element counters
/// that a lookup updates came with Linux 5.7.
const TRAFFIC_KERNEL: (u32, u32) = (5, 7);

/// Whether this kernel is at least `release` (from
/// /proc/sys/kernel/osrelease, read once; unreadable: assumed, and a
/// refusal of the first batch would then say so).
fn kernel_at_least(release: (u32, u32)) -> bool {
    static OSRELEASE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    OSRELEASE
        .get_or_init(|| std::fs::read_to_string("/proc/sys/kernel/osrelease").ok())
        .as_deref()
        .and_then(|r| release_at_least(r, release))
        .unwrap_or(true)
}

/// Whether this kernel has what source allow-lists need (Linux 5.6).
pub fn kernel_supports_source_ranges() -> bool {
    kernel_at_least(SOURCE_RANGES_KERNEL)
}

/// Whether this kernel counts per-mapping traffic (Linux 5.7).
pub fn kernel_counts_traffic() -> bool {
    kernel_at_least(TRAFFIC_KERNEL)
}

impl Features {
    /// What this kernel supports: each feature by its own release, so a
    /// 5.6 kernel keeps the allow-lists the version before enforced there.
    fn of_kernel() -> Features {
        Features {
            sources: kernel_supports_source_ranges(),
            traffic: kernel_counts_traffic(),
        }
    }
}

/// `release` (`6.1.0-13-amd64`, `5.4.0`) is at least `(major, minor)`.
fn release_at_least(release: &str, (major, minor): (u32, u32)) -> Option<bool> {
    let mut parts = release.trim().split(['.', '-']);
    let ma: u32 = parts.next()?.parse().ok()?;
    let mi: u32 = parts.next()?.parse().ok()?;
    Some((ma, mi) >= (major, minor))
}

/// The native flavor, one table per enabled family, with the applier
/// around it.
pub type NftablesBackend = Applier<PerFamily<Nftables>>;

impl NftablesBackend {
    pub fn new(names: Names) -> NftablesBackend {
        Self::for_families(names, Families::default())
    }

    pub fn for_families(names: Names, families: Families) -> NftablesBackend {
        Self::with_options(names, families, false)
    }

    /// `local`: `-localaccess` (node-local DNAT and hairpin).
    pub fn with_options(names: Names, families: Families, local: bool) -> NftablesBackend {
        Self::with_features(names, families, local, Features::of_kernel())
    }

    /// The layout with `features` (an older kernel's, or an earlier
    /// version's in tests of the upgrade).
    pub fn with_features(
        names: Names,
        families: Families,
        local: bool,
        features: Features,
    ) -> NftablesBackend {
        Applier::with_flavor(PerFamily::new(families, |family| Nftables {
            names: names.clone(),
            family,
            local,
            features,
        }))
    }
}

/// One change of the native table.
pub enum NftPlan {
    /// The layout is missing or drifted: (delete it and) create it with
    /// every desired element, in the same batch.
    Rebuild(RuleSet),
    /// Element deletes and adds only.
    Elements(Changes),
}

impl Nftables {
    /// The base chains of this layout.
    fn chains(&self) -> Vec<ChainShape> {
        chains_of(self.local, self.features)
    }

    fn table(&self) -> Table {
        Table::new(protocol_family(self.family)).with_name(self.names.table())
    }

    /// `ip` or `ip6`, as nft names the table's family.
    fn fam(&self) -> &'static str {
        view::nft_family(self.family)
    }

    /// Reads the table back from the kernel.
    fn read_state(&self, sock: &mut NfSocket) -> Result<NativeState, NetlinkError> {
        let tname = self.names.table().to_string();
        let mut a = Attrs::new();
        a.str(sys::NFTA_TABLE_NAME, &tname);
        let af = self.family.nfproto();
        let Some(table) = sock.get(sys::NFT_MSG_GETTABLE, af, &a)? else {
            return Ok(NativeState::default());
        };
        let marked = self
            .names
            .marked(find_attr(&table, sys::NFTA_TABLE_USERDATA));

        // Only what is in our table: chains of every table come back from the
        // kernel's chain dump, and a crowded node has many.
        let scope = Scope::table(af, &tname);
        let dumps = TableDump {
            sets: sock.dump_scoped(sys::NFT_MSG_GETSET, &scope)?,
            chains: sock.dump_scoped(sys::NFT_MSG_GETCHAIN, &scope)?,
            rules: sock.dump_scoped(sys::NFT_MSG_GETRULE, &scope)?,
        };
        // This layout, or one an earlier version made with fewer objects
        // (its elements are read, and the next apply rebuilds the table with
        // them and the new sets and chains).
        let ok = dumps.is_layout(self.family, self.local, self.features);
        let older = (!ok)
            .then(|| {
                self.features
                    .older()
                    .find(|f| dumps.is_layout(self.family, self.local, *f))
            })
            .flatten();
        // An unmarked table (an earlier version's) is the agent's only if it
        // is exactly its layout, with or without local access, with any of
        // the features.
        let earlier = !marked
            && (ok
                || [true, false].iter().any(|&l| {
                    [Features::ALL, Features::SOURCES_ONLY, Features::NONE]
                        .iter()
                        .any(|f| dumps.is_layout(self.family, l, *f))
                }));
        let mut state = NativeState {
            table_exists: true,
            marked,
            earlier,
            structure_ok: ok,
            rules: RuleSet::default(),
        };
        let Some(read_as) = (if ok { Some(self.features) } else { older }) else {
            return Ok(state);
        };
        // A set's element dump is no snapshot: the kernel resumes each part
        // by skipping as many elements as it sent before, and a rehash of
        // the set's hash table in between (a deferred worker grows or
        // shrinks it after adds and deletes) reorders them, so a part can
        // skip some elements and repeat others — without NLM_F_DUMP_INTR,
        // which only flags commits. Seen here: 79 to 236 of 1,000 missing
        // right after a change, the next full apply then refused (EEXIST).
        // Dump until two dumps agree.
        let read = until_two_agree(MAX_ELEMENT_DUMPS, |decode| {
            let mut rules = decode.then(RuleSet::default);
            let (fingerprint, decoded) = read_elements(
                sock,
                self.family,
                self.local,
                read_as,
                &tname,
                rules.as_mut(),
            )?;
            Ok::<_, NetlinkError>((fingerprint, rules.map(|r| (r, decoded))))
        })?;
        let Some((rules, decoded)) = read else {
            return Err(NetlinkError::DumpInterrupted(MAX_ELEMENT_DUMPS));
        };
        state.rules = rules;
        state.structure_ok = ok && decoded;
        Ok(state)
    }

    /// Encodes the whole layout (after deleting a broken table) plus every
    /// element of `desired`.
    fn encode_rebuild(
        &self,
        batch: &mut NftBatch,
        state: &NativeState,
        desired: &RuleSet,
    ) -> Vec<ElementMsg> {
        let tname = self.names.table();
        let table = self.table();
        let fam = self.fam();
        if state.table_exists {
            batch.add_table(
                &table,
                MsgType::Del,
                format!("delete table {fam} {tname} (layout drifted)"),
            );
        }
        batch.add_table(
            &self.table().with_userdata(self.names.mark_udata()),
            MsgType::Add,
            format!("add table {fam} {tname}"),
        );
        for (i, shape) in sets_of(self.family, self.local, self.features)
            .iter()
            .enumerate()
        {
            let mut a = Attrs::new();
            a.str(sys::NFTA_SET_TABLE, tname)
                .str(sys::NFTA_SET_NAME, shape.name)
                .be32(sys::NFTA_SET_FLAGS, shape.flags())
                .be32(sys::NFTA_SET_KEY_TYPE, shape.key_type)
                .be32(sys::NFTA_SET_KEY_LEN, shape.key_len);
            if let Some((t, l)) = shape.data {
                a.be32(sys::NFTA_SET_DATA_TYPE, t)
                    .be32(sys::NFTA_SET_DATA_LEN, l);
            }
            a.be32(sys::NFTA_SET_ID, i as u32 + 1);
            if let Some(fields) = shape.intervals {
                a.nest(sys::NFTA_SET_DESC, |d| {
                    d.nest(sys::NFTA_SET_DESC_CONCAT, |c| {
                        for len in fields {
                            c.nest(sys::NFTA_LIST_ELEM, |e| {
                                e.be32(sys::NFTA_SET_FIELD_LEN, *len);
                            });
                        }
                    });
                });
            }
            if shape.counter {
                a.nest(sys::NFTA_SET_EXPR, |e| {
                    e.str(sys::NFTA_EXPR_NAME, "counter")
                        .nest(sys::NFTA_EXPR_DATA, |_| {});
                });
            }
            batch.add(
                NftMsg::new(sys::NFT_MSG_NEWSET, libc::NLM_F_CREATE as u32, a)
                    .in_family(self.family),
                format!("add set {} to table {fam} {tname}", shape.name),
            );
        }
        for shape in self.chains() {
            let chain = Chain::new(&table)
                .with_name(shape.name)
                .with_userdata(self.names.mark_udata())
                .with_hook(Hook::new(shape.hook, shape.priority))
                .with_policy(ChainPolicy::Accept)
                .with_type(if shape.nat {
                    ChainType::Nat
                } else {
                    ChainType::Filter
                });
            batch.add_chain(
                &chain,
                MsgType::Add,
                format!("add chain {} to table {fam} {tname}", shape.name),
            );
        }
        for shape in self.chains() {
            let rules = chain_rules(shape.name, self.family, self.local);
            for (i, rule) in rules.iter().enumerate() {
                let mut a = Attrs::new();
                a.str(sys::NFTA_RULE_TABLE, tname)
                    .str(sys::NFTA_RULE_CHAIN, shape.name)
                    .nest_attrs(sys::NFTA_RULE_EXPRESSIONS, rule.attrs());
                batch.add(
                    NftMsg::new(
                        sys::NFT_MSG_NEWRULE,
                        libc::NLM_F_CREATE as u32 | libc::NLM_F_APPEND as u32,
                        a,
                    )
                    .in_family(self.family),
                    format!("add rule {} to chain {}", i + 1, shape.name),
                );
            }
        }
        // Every element, straight from the desired lists (no copy of them).
        let mut w = ElementWriter::new(batch, self.family, tname, self.features.traffic);
        w.write_all(desired, &source_restricted_ports(&desired.allow), false);
        w.sent
    }

    /// `rules` without the hairpin sources when local access is off (the
    /// planner lists them only when it is on; a mismatch must not churn).
    fn scoped<'a>(&self, rules: &'a RuleSet) -> std::borrow::Cow<'a, RuleSet> {
        if self.local || rules.local.is_empty() {
            std::borrow::Cow::Borrowed(rules)
        } else {
            std::borrow::Cow::Owned(RuleSet {
                local: Vec::new(),
                ..rules.clone()
            })
        }
    }
}

impl Flavor for Nftables {
    type State = NativeState;
    type Plan = NftPlan;
    /// The element messages, described only if refused.
    type Sent = Vec<ElementMsg>;

    fn name(&self) -> &'static str {
        "nftables"
    }

    fn read(&self, sock: &mut NfSocket) -> Result<NativeState, NetlinkError> {
        self.read_state(sock)
    }

    fn empty(&self) -> NativeState {
        NativeState::default()
    }

    fn rules(&self, state: &NativeState) -> RuleSet {
        state.rules.clone()
    }

    fn plan(&self, state: &NativeState, desired: &RuleSet) -> Planned<NftPlan> {
        if !self.features.sources && !desired.allow.is_empty() {
            return Planned::Refused(FirewallError::Unsupported(NO_SOURCE_RANGES.to_string()));
        }
        let desired = self.scoped(desired);
        if state.foreign() {
            return Planned::Refused(FirewallError::NotOurs(format!(
                "table {} {} exists and is not the agent's: it has no \"{}\" comment and is \
                 not the agent's layout; remove it or choose another -resourceprefix",
                self.fam(),
                self.names.table(),
                self.names.mark()
            )));
        }
        // Drifted, or an earlier version's without the mark (which the
        // kernel takes only with a new table): made anew in the same batch.
        if !state.structure_ok || !state.marked {
            return Planned::Change(NftPlan::Rebuild(desired.into_owned()));
        }
        let changes = Changes::between(&state.rules, &desired);
        if changes.is_empty() {
            Planned::Nothing
        } else {
            Planned::Change(NftPlan::Elements(changes))
        }
    }

    fn plan_changes(&self, state: &NativeState, mut changes: Changes) -> Option<Planned<NftPlan>> {
        if !self.features.sources && !changes.add.allow.is_empty() {
            return Some(Planned::Refused(FirewallError::Unsupported(
                NO_SOURCE_RANGES.to_string(),
            )));
        }
        if !state.structure_ok || !state.marked {
            return None;
        }
        // As `scoped`: no hairpin sources without local access.
        if !self.local {
            changes.add.local.clear();
            changes.del.local.clear();
        }
        // The deletes must name exactly what is there (the kernel deletes an
        // element by its key alone). The adds are the kernel's to check:
        // every element goes with NLM_F_EXCL, an existing key refuses the
        // batch (EEXIST) and the applier falls back to the whole table —
        // three binary searches in cold lists of 5,000 saved on every add.
        if !changes.deletes_fit(&state.rules) {
            return None;
        }
        Some(if changes.is_empty() {
            Planned::Nothing
        } else {
            Planned::Change(NftPlan::Elements(changes))
        })
    }

    fn encode(&self, batch: &mut NftBatch, state: &NativeState, plan: &NftPlan) -> Vec<ElementMsg> {
        match plan {
            NftPlan::Rebuild(desired) => self.encode_rebuild(batch, state, desired),
            NftPlan::Elements(ch) => encode_changes(
                batch,
                self.family,
                self.names.table(),
                self.features.traffic,
                &state.rules.allow,
                ch,
            ),
        }
    }

    fn describe(&self, _plan: &NftPlan, sent: &Vec<ElementMsg>, seq: u32) -> Option<String> {
        ElementMsg::describe(sent, seq, self.family, self.names.table())
    }

    fn after(
        &self,
        mut state: NativeState,
        plan: NftPlan,
        _sent: Vec<ElementMsg>,
        _echoes: &[Echo],
    ) -> NativeState {
        match plan {
            NftPlan::Rebuild(desired) => NativeState {
                table_exists: true,
                marked: true,
                earlier: false,
                structure_ok: true,
                rules: desired,
            },
            NftPlan::Elements(ch) => {
                ch.move_into(&mut state.rules);
                state
            }
        }
    }

    fn effect(&self, state: &NativeState, plan: &NftPlan) -> Effect {
        match plan {
            NftPlan::Rebuild(desired) => {
                // Only the DNAT mappings are reported (SNAT and FORWARD
                // follow from them).
                let (added_dnat, removed_dnat) =
                    crate::firewall::diff(&state.rules.dnat, &desired.dnat);
                Effect {
                    rebuilt: true,
                    added_dnat,
                    removed_dnat,
                    admission: Admission::between(&state.rules, desired),
                }
            }
            NftPlan::Elements(ch) => Effect {
                rebuilt: false,
                added_dnat: ch.add.dnat.clone(),
                removed_dnat: ch.del.dnat.clone(),
                admission: Admission::by_change(&state.rules, ch),
            },
        }
    }

    fn render(&self, state: &NativeState, plan: &NftPlan) -> String {
        let t = self.names.table();
        let ch = match plan {
            NftPlan::Rebuild(desired) => {
                let mut out = String::new();
                if state.table_exists {
                    out.push_str(&format!("delete table {} {t}\n", self.fam()));
                }
                out.push_str(&view::nft_layout(
                    desired,
                    &self.names,
                    self.family,
                    self.local,
                    self.features,
                ));
                return out;
            }
            NftPlan::Elements(ch) => ch,
        };
        let mut out = String::new();
        let fam = self.fam();
        let mut line = |verb: &str, set: &str, element: String| {
            out.push_str(&format!("{verb} element {fam} {t} {set} {{ {element} }}\n"));
        };
        for m in &ch.del.dnat {
            for key in view::nft_dnat_keys(m) {
                if self.features.traffic {
                    line("delete", names::NFT_TRAFFIC_SET, key.clone());
                }
                line("delete", names::NFT_DNAT_MAP, key);
            }
        }
        for s in &ch.del.snat {
            line("delete", names::NFT_SNAT_MAP, view::nft_snat_key(s));
        }
        for f in &ch.del.forward {
            for key in view::nft_forward_keys(f) {
                line("delete", names::NFT_FORWARD_SET, key);
            }
        }
        for l in &ch.del.local {
            line("delete", names::NFT_LOCAL_SET, l.pod_ip.to_string());
        }
        for m in &ch.add.dnat {
            for e in view::nft_dnat_elements(m) {
                line("add", names::NFT_DNAT_MAP, e);
            }
            if self.features.traffic {
                // The set's own counter comes with the element.
                let comment = view::nft_element_comment(&m.owner, m.key.public_port, m.span);
                for key in view::nft_dnat_keys(m) {
                    line(
                        "add",
                        names::NFT_TRAFFIC_SET,
                        format!("{key} comment \"{comment}\""),
                    );
                }
            }
        }
        for s in &ch.add.snat {
            line("add", names::NFT_SNAT_MAP, view::nft_snat_element(s));
        }
        for f in &ch.add.forward {
            for e in view::nft_forward_elements(f) {
                line("add", names::NFT_FORWARD_SET, e);
            }
        }
        for l in &ch.add.local {
            line("add", names::NFT_LOCAL_SET, view::nft_local_element(l));
        }
        // The allow-lists' elements: ranges and freed keys out, then in.
        let (restrict, free) = restricted_changes(&state.rules.allow, ch);
        for a in &ch.del.allow {
            line("delete", names::NFT_SOURCES_SET, view::nft_source_key(a));
        }
        for k in &free {
            line("delete", names::NFT_RESTRICTED_SET, view::nft_key(k));
        }
        for a in &ch.add.allow {
            line("add", names::NFT_SOURCES_SET, view::nft_source_element(a));
        }
        for k in &restrict {
            line("add", names::NFT_RESTRICTED_SET, view::nft_key(k));
        }
        out
    }

    fn teardown(
        &self,
        _sock: &mut NfSocket,
        state: &NativeState,
        batch: &mut NftBatch,
    ) -> Result<Vec<String>, NetlinkError> {
        // A table named like the agent's that is not its own stays.
        if !state.owned() {
            return Ok(Vec::new());
        }
        let (fam, t) = (self.fam(), self.names.table());
        batch.add_table(
            &self.table(),
            MsgType::Del,
            format!("delete table {fam} {t}"),
        );
        Ok(vec![format!("{fam} nftables: table {t}")])
    }

    fn interest(&self) -> Interest {
        Interest {
            tables: vec![TableInterest {
                family: self.family.nfproto(),
                table: self.names.table().to_string(),
                whole: true,
                chains: Vec::new(),
                parents: Vec::new(),
            }],
        }
    }

    fn own_forward(&self) -> Vec<OwnForward<'_>> {
        vec![OwnForward {
            family: self.family.nfproto(),
            table: self.names.table(),
            chain: names::NFT_FORWARD_CHAIN,
        }]
    }

    fn view(&self, rules: &RuleSet) -> String {
        view::nft_layout(rules, &self.names, self.family, self.local, self.features)
    }
}

#[cfg(test)]
mod release_tests {
    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        use super::release_at_least as at;
        assert_eq!(at("6.1.0-13-amd64\n", (5, 6)), Some(true));
        assert_eq!(at("5.6.0", (5, 6)), Some(true));
        assert_eq!(at("5.4.0-150-generic", (5, 6)), Some(false));
        assert_eq!(at("4.19.0-26-amd64", (5, 6)), Some(false));
        assert_eq!(at("6.18.44-fc-v1300", (5, 6)), Some(true));
        assert_eq!(at("garbage", (5, 6)), None);
    }
}
