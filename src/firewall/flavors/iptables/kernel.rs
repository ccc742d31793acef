//! Reading what the agent owns in iptables-nft's tables, and building the
//! batch of a change: the flavor's two ends at the kernel.

use super::*;

impl Iptables {
    fn exists(&self, sock: &mut NfSocket, msg: u32, attrs: &Attrs) -> Result<bool, NetlinkError> {
        Ok(sock.get(msg, self.family.nfproto(), attrs)?.is_some())
    }

    fn chain_exists(
        &self,
        sock: &mut NfSocket,
        table: &str,
        chain: &str,
    ) -> Result<bool, NetlinkError> {
        let mut a = Attrs::new();
        a.str(sys::NFTA_CHAIN_TABLE, table)
            .str(sys::NFTA_CHAIN_NAME, chain);
        self.exists(sock, sys::NFT_MSG_GETCHAIN, &a)
    }

    /// The rules of one chain, in order: (handle, expressions).
    fn dump_chain(
        &self,
        sock: &mut NfSocket,
        table: &str,
        chain: &str,
    ) -> Result<Vec<(u64, Vec<rules::Expr>)>, NetlinkError> {
        let scope = Scope::object(self.family.nfproto(), table, chain);
        let msgs = sock.dump_scoped(sys::NFT_MSG_GETRULE, &scope)?;
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let handle = attr_be64(&m, sys::NFTA_RULE_HANDLE).ok_or_else(|| {
                NetlinkError::Malformed(format!("rule in {chain} without handle"))
            })?;
            let exprs = parse_exprs(find_attr(&m, sys::NFTA_RULE_EXPRESSIONS).unwrap_or(&[]));
            out.push((handle, exprs));
        }
        Ok(out)
    }

    /// Reads the agent's chains and the parent chains back from the kernel.
    pub(super) fn read_state(&self, sock: &mut NfSocket) -> Result<IptState, NetlinkError> {
        let mut st = self.empty_state();
        for (table, exists) in [(NAT, &mut st.nat_exists), (FILTER, &mut st.filter_exists)] {
            let mut a = Attrs::new();
            a.str(sys::NFTA_TABLE_NAME, table);
            *exists = self.exists(sock, sys::NFT_MSG_GETTABLE, &a)?;
        }
        let names = self.names.clone();
        let family = self.family;
        for place in PLACES {
            let i = place.index();
            if !st.table_exists(place.table()) {
                continue;
            }
            let own = place.own(&names);
            st.own_exists[i] = self.chain_exists(sock, place.table(), own)?;
            // A place not managed matters only while its chain is left over
            // (to retire it): no chain, no jump to it, nothing more to read.
            if !st.manages(i) && !st.own_exists[i] {
                continue;
            }
            st.parent_exists[i] = self.chain_exists(sock, place.table(), place.parent())?;
            if st.parent_exists[i] {
                st.parents[i] = self
                    .dump_chain(sock, place.table(), place.parent())?
                    .into_iter()
                    .map(|(handle, exprs)| {
                        let rule = if jump_target(&exprs) == Some(own) {
                            ParentRule::Jump {
                                exact: decode(&exprs, &names, family)
                                    == Some(AgentRule::Jump(own.to_string())),
                            }
                        } else {
                            ParentRule::Foreign
                        };
                        Slot {
                            handle: Some(handle),
                            rule,
                        }
                    })
                    .collect();
            }
            if st.own_exists[i] {
                st.own[i] = self
                    .dump_chain(sock, place.table(), own)?
                    .into_iter()
                    .map(|(handle, exprs)| Slot {
                        handle: Some(handle),
                        rule: decode(&exprs, &names, family),
                    })
                    .collect();
            }
        }
        st.settled = st.own_sorted()
            && st.places().iter().all(|p| {
                let i = p.index();
                let current: Vec<ParentRule> = st.parents[i].iter().map(|s| s.rule).collect();
                plan_jump(&current, p.requested(&self.jumps)).is_empty()
            });
        Ok(st)
    }

    /// Adds a NEWRULE; returns its sequence number in the batch.
    fn add_rule(
        &self,
        batch: &mut NftBatch,
        place: Place,
        chain: &str,
        rule: &AgentRule,
        anchor: Option<u64>,
        echo: bool,
    ) -> u32 {
        let mut flags = if anchor.is_some() {
            libc::NLM_F_CREATE
        } else {
            libc::NLM_F_CREATE | libc::NLM_F_APPEND
        };
        if echo {
            flags |= libc::NLM_F_ECHO;
        }
        let a = rule_attrs(place.table(), chain, anchor, rule, &self.names, self.family);
        // Sequence numbers count the messages; the batch begin is 0.
        let seq = batch.len() as u32 + 1;
        // Described only if refused (`Flavor::describe`): the text of every
        // rule would cost more than its encoding.
        batch.add_undescribed(
            NftMsg::new(sys::NFT_MSG_NEWRULE, flags as u32, a).in_family(self.family),
        );
        seq
    }

    fn delete_rule(&self, batch: &mut NftBatch, place: Place, chain: &str, handle: u64) {
        let mut a = Attrs::new();
        a.str(sys::NFTA_RULE_TABLE, place.table())
            .str(sys::NFTA_RULE_CHAIN, chain)
            .be64(sys::NFTA_RULE_HANDLE, handle);
        batch.add(
            NftMsg::new(sys::NFT_MSG_DELRULE, 0, a).in_family(self.family),
            format!(
                "delete rule handle {handle} in chain {chain} of table {} {}",
                view::nft_family(self.family),
                place.table()
            ),
        );
    }

    /// Encodes `changes` (whose handles are all known) into one batch:
    /// tables and chains first, then each chain's deletes and inserts, the
    /// jumps last (they need the agent's chains). New rules ask for an echo
    /// (which carries their handles) unless there are too many of them; the
    /// sequence number of each is returned by the insert it belongs to.
    pub(super) fn build(
        &self,
        batch: &mut NftBatch,
        state: &IptState,
        changes: &Changes,
    ) -> Vec<(u32, Inserted)> {
        let mut inserted = Vec::new();
        let echo = changes.inserts() <= MAX_ECHOED_RULES;
        let pf = protocol_family(self.family);
        let fam = view::nft_family(self.family);
        let nat = Table::new(pf).with_name(NAT);
        let filter = Table::new(pf).with_name(FILTER);
        for (create, table, name) in [
            (changes.create_nat, &nat, NAT),
            (changes.create_filter, &filter, FILTER),
        ] {
            if create {
                batch.add_table(table, MsgType::Add, format!("add table {fam} {name}"));
            }
        }
        for place in PLACES {
            let i = place.index();
            let table = if place.table() == NAT { &nat } else { &filter };
            if changes.create_parent[i] {
                batch.add_chain(
                    &place.base_chain(table),
                    MsgType::Add,
                    format!(
                        "add chain {} to table {fam} {}",
                        place.parent(),
                        place.table()
                    ),
                );
            }
            let own = place.own(&self.names);
            if changes.create_own[i] {
                batch.add_chain(
                    &Chain::new(table).with_name(own),
                    MsgType::Add,
                    format!("add chain {own} to table {fam} {}", place.table()),
                );
            }
        }
        for place in PLACES {
            let i = place.index();
            let own = place.own(&self.names);
            let plan = &changes.own[i];
            let handle = |j: usize| state.own[i][j].handle.expect("handles checked");
            for &j in &plan.delete {
                self.delete_rule(batch, place, own, handle(j));
            }
            for (k, (rule, anchor)) in plan.insert.iter().enumerate() {
                let pos = match anchor {
                    Anchor::Before(j) => Some(handle(*j)),
                    Anchor::Append => None,
                };
                let seq = self.add_rule(batch, place, own, rule, pos, echo);
                inserted.push((seq, Inserted::Own(i, k)));
            }
        }
        for place in PLACES {
            let i = place.index();
            let plan = &changes.jumps[i];
            let handle = |j: usize| state.parents[i][j].handle.expect("handles checked");
            for &j in &plan.delete {
                self.delete_rule(batch, place, place.parent(), handle(j));
            }
            let jump = AgentRule::Jump(place.own(&self.names).to_string());
            for (k, (_, anchor)) in plan.insert.iter().enumerate() {
                let pos = match anchor {
                    Anchor::Before(j) => Some(handle(*j)),
                    Anchor::Append => None,
                };
                let seq = self.add_rule(batch, place, place.parent(), &jump, pos, echo);
                inserted.push((seq, Inserted::Jump(i, k)));
            }
        }
        // Chains retired last: their rules and every jump to them are gone.
        for place in PLACES {
            if changes.delete_own[place.index()] {
                self.delete_chain(batch, place);
            }
        }
        inserted
    }

    /// Empties the agent's chain of `place` (one DELRULE without a handle).
    pub(super) fn flush_chain(&self, batch: &mut NftBatch, place: Place) {
        let own = place.own(&self.names);
        let mut a = Attrs::new();
        a.str(sys::NFTA_RULE_TABLE, place.table())
            .str(sys::NFTA_RULE_CHAIN, own);
        batch.add(
            NftMsg::new(sys::NFT_MSG_DELRULE, 0, a).in_family(self.family),
            format!(
                "flush chain {own} in table {} {}",
                view::nft_family(self.family),
                place.table()
            ),
        );
    }

    /// Deletes the agent's (empty, unreferenced) chain of `place`.
    pub(super) fn delete_chain(&self, batch: &mut NftBatch, place: Place) {
        let own = place.own(&self.names);
        let mut a = Attrs::new();
        a.str(sys::NFTA_CHAIN_TABLE, place.table())
            .str(sys::NFTA_CHAIN_NAME, own);
        batch.add(
            NftMsg::new(sys::NFT_MSG_DELCHAIN, 0, a).in_family(self.family),
            format!(
                "delete chain {own} in table {} {}",
                view::nft_family(self.family),
                place.table()
            ),
        );
    }

    pub(super) fn empty_state(&self) -> IptState {
        IptState {
            family: self.family,
            local: self.local.then(|| self.names.pre.clone()),
            ..IptState::default()
        }
    }
}
