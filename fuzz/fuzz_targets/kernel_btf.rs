//! The running kernel's BTF (/sys/kernel/btf/vmlinux): parsed, then asked what the loader asks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netiso::datapath::btf::Btf;
use netiso::datapath::reasons::DropReasons;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else { return };
    for (strukt, member) in [("sk_buff", "dev"), ("net_device", "ifindex"), ("net_device", "nd_net")] {
        let _ = btf.member_offset(strukt, member);
    }
    let _ = btf.tracepoint_args("kfree_skb");
    let _ = btf.enum_values("skb_drop_reason");
    let reasons = DropReasons::from_btf(&btf);
    let _ = reasons.name(u32::from(data.first().copied().unwrap_or(0)));
});
