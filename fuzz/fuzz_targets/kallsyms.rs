//! /proc/kallsyms: parsed, then used to name drop locations.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netiso::datapath::kallsyms::Kallsyms;

fuzz_target!(|data: &[u8]| {
    let symbols = Kallsyms::parse(data);
    for address in [0, 1, 0xffff_ffff_8100_0000, u64::MAX] {
        let _ = symbols.symbolize(address);
    }
    if let Some(word) = data.get(..8) {
        let _ = symbols.symbolize(u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
});
