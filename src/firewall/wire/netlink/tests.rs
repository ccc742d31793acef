use super::*;
use rustables::{MsgType, ProtocolFamily};

#[test]
fn attrs_round_trip_with_nesting_and_padding() {
    let mut a = Attrs::new();
    a.str(1, "podnat").be32(2, 7).nest(3, |n| {
        n.bytes(1, &[1, 2, 3]);
    });
    let got: Vec<(u16, Vec<u8>)> = parse_attrs(a.as_bytes())
        .map(|(t, p)| (t, p.to_vec()))
        .collect();
    assert_eq!(got[0], (1, b"podnat\0".to_vec()));
    assert_eq!(got[1], (2, vec![0, 0, 0, 7]));
    assert_eq!(got[2].0, 3);
    let inner: Vec<(u16, Vec<u8>)> = parse_attrs(&got[2].1)
        .map(|(t, p)| (t, p.to_vec()))
        .collect();
    assert_eq!(inner, vec![(1, vec![1, 2, 3])]);
    assert_eq!(a.len() % 4, 0);
    assert_eq!(attr_str(a.as_bytes(), 1).as_deref(), Some("podnat"));
    assert_eq!(attr_be32(a.as_bytes(), 2), Some(7));
}

#[test]
fn batch_begin_carries_the_generation() {
    let mut b = NftBatch::new();
    let mut a = Attrs::new();
    a.str(sys::NFTA_TABLE_NAME, "t");
    b.add(
        NftMsg::new(sys::NFT_MSG_NEWTABLE, libc::NLM_F_CREATE as u32, a),
        "table t",
    );
    let chain = rustables::Chain::new(&rustables::Table::new(ProtocolFamily::Ipv4).with_name("t"))
        .with_name("c");
    b.add_chain(&chain, MsgType::Add, "chain c");
    let fin = b.finalize(Some(0x01020304));
    let begin = parse_msg(&fin.bytes).unwrap();
    assert_eq!(begin.msg_type, libc::NFNL_MSG_BATCH_BEGIN as u16);
    assert_eq!(
        attr_be32(begin.attrs, libc::NFNL_BATCH_GENID as u16),
        Some(0x01020304)
    );
    // res_id = NFNL_SUBSYS_NFTABLES, big endian.
    assert_eq!(&fin.bytes[18..20], &[0, 10]);
    let second = parse_msg(&fin.bytes[align4(begin.total_len)..]).unwrap();
    assert_eq!(
        second.msg_type,
        ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | sys::NFT_MSG_NEWTABLE as u16
    );
    assert_eq!(second.seq, 1);
    let third =
        parse_msg(&fin.bytes[align4(begin.total_len) + align4(second.total_len)..]).unwrap();
    assert_eq!(third.seq, 2);
    assert_eq!(third.msg_type & 0xff, sys::NFT_MSG_NEWCHAIN as u16);
    assert_eq!(
        attr_str(third.attrs, sys::NFTA_CHAIN_NAME).as_deref(),
        Some("c")
    );
    assert_eq!(fin.what.len(), 3);
}

#[test]
fn a_message_written_in_place_is_the_message_built_apart() {
    let build = |in_place: bool| {
        let mut b = NftBatch::new();
        let write = |a: &mut Attrs| {
            a.str(sys::NFTA_SET_ELEM_LIST_TABLE, "podnat")
                .str(sys::NFTA_SET_ELEM_LIST_SET, "dnat")
                .nest(sys::NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
                    l.nest(sys::NFTA_LIST_ELEM, |e| {
                        e.bytes(sys::NFTA_SET_ELEM_USERDATA, b"\0\x02x\0");
                    });
                });
        };
        let flags = libc::NLM_F_CREATE as u32;
        if in_place {
            b.add_with(
                sys::NFT_MSG_NEWSETELEM,
                flags,
                crate::model::Family::Ipv6,
                write,
            );
        } else {
            let mut a = Attrs::new();
            write(&mut a);
            let msg = NftMsg::new(sys::NFT_MSG_NEWSETELEM, flags, a)
                .in_family(crate::model::Family::Ipv6);
            b.add_undescribed(msg);
        }
        assert_eq!(b.len(), 1);
        b
    };
    let (a, b) = (build(true), build(false));
    assert_eq!(a.byte_len(), b.byte_len());
    for genid in [Some(7), None] {
        let (fa, fb) = (build(true).finalize(genid), build(false).finalize(genid));
        assert_eq!(fa.bytes, fb.bytes);
        // Without a generation the begin message is the bare header.
        let begin = parse_msg(&fa.bytes).unwrap();
        assert_eq!(begin.msg_type, libc::NFNL_MSG_BATCH_BEGIN as u16);
        assert_eq!(begin.total_len, if genid.is_some() { 28 } else { 20 });
        assert_eq!(attr_be32(begin.attrs, libc::NFNL_BATCH_GENID as u16), genid);
        let msg = parse_msg(&fa.bytes[begin.total_len..]).unwrap();
        assert_eq!(msg.seq, 1);
        assert_eq!(msg.family, libc::AF_INET6 as u8);
        let end = parse_msg(&fa.bytes[begin.total_len + align4(msg.total_len)..]).unwrap();
        assert_eq!(end.msg_type, libc::NFNL_MSG_BATCH_END as u16);
        assert_eq!(end.seq, 2);
        assert_eq!(
            begin.total_len + align4(msg.total_len) + end.total_len,
            fa.bytes.len()
        );
    }
}
