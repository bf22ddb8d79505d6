//! Symbolises kernel addresses (drop locations) with /proc/kallsyms.

use std::io::{BufRead, BufReader, Read};

pub struct Kallsyms {
    /// Text symbols sorted by address.
    symbols: Vec<(u64, String)>,
}

impl Kallsyms {
    pub fn load() -> std::io::Result<Self> {
        Ok(Self::parse(std::fs::File::open("/proc/kallsyms")?))
    }

    pub fn parse(source: impl Read) -> Self {
        let mut symbols = Vec::new();
        for line in BufReader::new(source).lines().map_while(Result::ok) {
            let mut fields = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            if let Ok(addr) = u64::from_str_radix(addr, 16)
                && addr != 0
            {
                symbols.push((addr, name.to_owned()));
            }
        }
        symbols.sort_unstable();
        Kallsyms { symbols }
    }

    /// `symbol+0xoffset`, or the bare hex address when it is not in any known symbol (or when
    /// kallsyms hides addresses from this process).
    pub fn symbolize(&self, addr: u64) -> String {
        let index = self.symbols.partition_point(|(a, _)| *a <= addr);
        match index.checked_sub(1).map(|i| &self.symbols[i]) {
            Some((start, name)) => format!("{name}+0x{:x}", addr - start),
            None => format!("0x{addr:x}"),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolizes_to_the_enclosing_function() {
        let table = "ffffffff81000000 T _stext\nffffffff81234000 t nf_hook_slow\nffffffff81234400 T nf_hook_slow_list\nffffffff81300000 D some_data\n";
        let k = Kallsyms::parse(table.as_bytes());
        assert_eq!(k.symbolize(0xffffffff81234123), "nf_hook_slow+0x123");
        assert_eq!(k.symbolize(0xffffffff81234400), "nf_hook_slow_list+0x0");
        assert_eq!(k.symbolize(0x1000), "0x1000");
    }

    #[test]
    fn hidden_addresses_are_skipped() {
        let k = Kallsyms::parse("0000000000000000 T _stext\n".as_bytes());
        assert!(k.is_empty());
    }
}
