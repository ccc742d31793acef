//! Reading what the agent owns in iptables-nft's tables, and building the
//! batch of a change: the flavor's two ends at the kernel.

use super::*;

impl Iptables {
    /// The chain `table`/`chain` as the kernel reports it, if it exists.
    fn get_chain(
        &self,
        sock: &mut NfSocket,
        table: &str,
        chain: &str,
    ) -> Result<Option<Vec<u8>>, NetlinkError> {
        let mut a = Attrs::new();
        a.str(sys::NFTA_CHAIN_TABLE, table)
            .str(sys::NFTA_CHAIN_NAME, chain);
        sock.get(sys::NFT_MSG_GETCHAIN, self.family.nfproto(), &a)
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
        for (i, table) in TABLES.into_iter().enumerate() {
            let mut a = Attrs::new();
            a.str(sys::NFTA_TABLE_NAME, table);
            let got = sock.get(sys::NFT_MSG_GETTABLE, self.family.nfproto(), &a)?;
            st.table_marked[i] = got
                .as_deref()
                .is_some_and(|t| self.names.marked(find_attr(t, sys::NFTA_TABLE_USERDATA)));
            st.table_present[i] = got.is_some();
        }
        let names = self.names.clone();
        let family = self.family;
        // Each base chain is as iptables-nft (and the agent) makes it.
        let mut made_like = [false; N_PLACES];
        for place in PLACES {
            let i = place.index();
            if !st.table_exists(place.table()) {
                continue;
            }
            let own = place.own(&names);
            let own_chain = self.get_chain(sock, place.table(), own)?;
            st.own_exists[i] = own_chain.is_some();
            st.own_marked[i] = own_chain
                .as_deref()
                .is_some_and(|c| names.marked(find_attr(c, sys::NFTA_CHAIN_USERDATA)));
            // A place not managed matters only while its chain is left over
            // (to retire it): no chain, no jump to it, nothing more to read.
            if !st.manages(i) && !st.own_exists[i] {
                continue;
            }
            let parent = self.get_chain(sock, place.table(), place.parent())?;
            st.parent_exists[i] = parent.is_some();
            st.parent_marked[i] = parent
                .as_deref()
                .is_some_and(|c| names.marked(find_attr(c, sys::NFTA_CHAIN_USERDATA)));
            made_like[i] = parent.as_deref().is_some_and(|c| place.made_like(c));
            if st.parent_exists[i] {
                st.parents[i] = self
                    .dump_chain(sock, place.table(), place.parent())?
                    .into_iter()
                    .map(|(handle, exprs)| {
                        let rule = if jump_target(&exprs) == Some(own) {
                            ParentRule::Jump {
                                exact: decode(&exprs, &names, family) == Some(place.jump(&names)),
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
        // An earlier version's base chain: unmarked, as the agent makes it,
        // holding nothing but the agent's jumps (only where a version that
        // did not mark its objects hooked).
        st.parent_earlier = std::array::from_fn(|i| {
            PLACES[i].unmarked_by_earlier_versions()
                && st.parent_exists[i]
                && !st.parent_marked[i]
                && made_like[i]
                && !st.parents[i].is_empty()
                && st.parents[i]
                    .iter()
                    .all(|s| s.rule == ParentRule::Jump { exact: true })
        });
        st.settled = st.adoption().is_none()
            && st.own_sorted()
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
        for (t, name) in TABLES.into_iter().enumerate() {
            if changes.create_table[t] {
                let marked = Table::new(pf)
                    .with_name(name)
                    .with_userdata(self.names.mark_udata());
                batch.add_table(&marked, MsgType::Add, format!("add table {fam} {name}"));
            }
        }
        for place in PLACES {
            let i = place.index();
            let table = &Table::new(pf).with_name(place.table());
            if changes.create_parent[i] {
                batch.add_chain(
                    &place.base_chain(table, &self.names),
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
                    &Chain::new(table)
                        .with_name(own)
                        .with_userdata(self.names.mark_udata()),
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
            let jump = place.jump(&self.names);
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
        for place in PLACES {
            if changes.delete_parent[place.index()] {
                self.delete_base_chain(batch, place);
            }
        }
        inserted
    }

    /// The deletes that open an adoption (`Adoption`): every jump to the
    /// adopted chains and the adopted base chains' jumps, then the chains.
    pub(super) fn encode_adoption(&self, batch: &mut NftBatch, state: &IptState, a: &Adoption) {
        let mut places: Vec<usize> = a.own.iter().chain(&a.parents).copied().collect();
        places.sort_unstable();
        places.dedup();
        for &i in &places {
            for slot in &state.parents[i] {
                if let (ParentRule::Jump { .. }, Some(h)) = (slot.rule, slot.handle) {
                    self.delete_rule(batch, PLACES[i], PLACES[i].parent(), h);
                }
            }
        }
        for &i in &a.own {
            self.flush_chain(batch, PLACES[i]);
        }
        for &i in &a.own {
            self.delete_chain(batch, PLACES[i]);
        }
        for &i in &a.parents {
            self.delete_base_chain(batch, PLACES[i]);
        }
    }

    /// Deletes the (empty) base chain of `place`.
    pub(super) fn delete_base_chain(&self, batch: &mut NftBatch, place: Place) {
        let mut a = Attrs::new();
        a.str(sys::NFTA_CHAIN_TABLE, place.table())
            .str(sys::NFTA_CHAIN_NAME, place.parent());
        batch.add(
            NftMsg::new(sys::NFT_MSG_DELCHAIN, 0, a).in_family(self.family),
            format!(
                "delete base chain {} in table {} {}",
                place.parent(),
                view::nft_family(self.family),
                place.table()
            ),
        );
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
            counting: self.counters.then(|| self.names.count.clone()),
            ..IptState::default()
        }
    }
}
