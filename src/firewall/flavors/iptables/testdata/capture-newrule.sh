#!/bin/sh
# Regenerates iptables-nft-1.8.9-newrule.txt: the NEWRULE attributes
# iptables-nft sends for each rulespec below (the Go version's rulespecs
# where it has the rule), captured with strace in a throw-away network
# namespace. Needs root, iptables-nft, strace, python3.
#   sh capture-newrule.sh > iptables-nft-1.8.9-newrule.txt
set -e
if [ "$1" != "--inside" ]; then
    exec unshare -n sh "$0" --inside
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One rulespec: the NEWRULE messages of its batch as "NAME flags=0x.. HEX".
capture() {
    name=$1; table=$2; shift 2
    strace -f -e trace=sendmsg -e write=all -o "$tmp/$name" iptables-nft -t "$table" "$@"
    python3 - "$name" "$tmp/$name" <<'PY'
import re, struct, sys
name, path = sys.argv[1], sys.argv[2]
bufs, cur = [], None
for line in open(path):
    m = re.match(r'^\s*\| ([0-9a-f]{5})  (.{48})', line)
    if m:
        if m.group(1) == '00000':
            cur = bytearray()
            bufs.append(cur)
        cur += bytes.fromhex(''.join(m.group(2).split()))
for b in bufs:
    off = 0
    while off + 16 <= len(b):
        ln, ty, fl = struct.unpack_from('<IHH', b, off)
        if ln < 16:
            break
        if ty == 0x0a06:  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE
            print(f"{name} flags=0x{fl:x} {b[off + 20:off + ln].hex()}")
        off += (ln + 3) & ~3
PY
}
iptables-nft -t nat -N PODNAT_PRE
iptables-nft -t nat -N PODNAT_POST
iptables-nft -t filter -N PODNAT_FORWARD
# Base chains exist before the captured jumps (created with their first rule).
iptables-nft -t nat -A PREROUTING -j ACCEPT
iptables-nft -t filter -A FORWARD -j ACCEPT
capture jump_pre nat -A PREROUTING -m comment --comment "podnat[jump_to_chain]" -j PODNAT_PRE
capture jump_fwd filter -A FORWARD -m comment --comment "podnat[jump_to_chain]" -j PODNAT_FORWARD
capture dnat_tcp nat -A PODNAT_PRE -d 203.0.113.7/32 -p tcp -m tcp --dport 25 -m comment --comment mail:mx-0 -j DNAT --to-destination 10.1.0.5:25
capture dnat_udp nat -A PODNAT_PRE -d 203.0.113.7/32 -p udp -m udp --dport 5353 -m comment --comment dns:resolver-1 -j DNAT --to-destination 10.1.1.5:53
capture snat_tcp nat -A PODNAT_POST -s 10.1.0.5/32 -p tcp -m comment --comment mail:mx-0 -j SNAT --to-source 203.0.113.7
capture snat_udp nat -A PODNAT_POST -s 10.1.1.5/32 -p udp -m comment --comment dns:resolver-1 -j SNAT --to-source 198.51.100.9
capture fwd_tcp filter -A PODNAT_FORWARD -d 10.1.0.5/32 -p tcp -m conntrack --ctstate NEW -m tcp --dport 25 -m comment --comment mail:mx-0 -j ACCEPT
capture fwd_udp filter -A PODNAT_FORWARD -d 10.1.1.5/32 -p udp -m conntrack --ctstate NEW -m udp --dport 53 -m comment --comment dns:resolver-1 -j ACCEPT
# A port range with one offset (srcPortEnd).
capture dnat_range nat -A PODNAT_PRE -d 203.0.113.7/32 -p udp -m udp --dport 10000:10099 -m comment --comment voip:rtp-0 -j DNAT --to-destination 10.1.2.5:20000-20099/10000
capture fwd_range filter -A PODNAT_FORWARD -d 10.1.2.5/32 -p udp -m conntrack --ctstate NEW -m udp --dport 20000:20099 -m comment --comment voip:rtp-0 -j ACCEPT
# Per-mapping counters (-iptablescounters): mangle's counting chain.
iptables-nft -t mangle -N PODNAT_COUNT
capture count_jump mangle -A POSTROUTING -m conntrack --ctstate DNAT -m comment --comment "podnat[jump_to_chain]" -j PODNAT_COUNT
# As iptables-nft-save prints them (a bare address: all 16 mask bytes set,
# where `/32` sets 4), so that a save restores the very rules.
capture count_tcp mangle -A PODNAT_COUNT -m conntrack --ctproto 6 --ctorigdst 203.0.113.7 --ctorigdstport 25 -m comment --comment mail:mx-0 -j RETURN
capture count_range mangle -A PODNAT_COUNT -m conntrack --ctproto 17 --ctorigdst 203.0.113.7 --ctorigdstport 10000:10099 -m comment --comment voip:rtp-0 -j RETURN
for net in 172.16.0.0/12 192.168.0.0/16 10.0.0.0/8 127.0.0.0/8; do
    capture "ret_${net%%.*}" nat -A PODNAT_POST -d "$net" -m comment --comment "podnat[no_snat_for_internal]" -j RETURN
done
