//! A minimal reader of the kernel's BTF (/sys/kernel/btf/vmlinux): just enough to find struct
//! member offsets (descending into anonymous unions and structs, as `sk_buff`'s header fields
//! sit inside a `struct_group`), enum values and how many arguments a BTF-typed tracepoint
//! passes. aya does not expose these.

use std::collections::HashMap;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("BTF data is malformed: {0}")]
    Malformed(&'static str),
    #[error("BTF has no {kind} named `{name}`")]
    MissingType { kind: &'static str, name: String },
    #[error("BTF struct `{strukt}` has no member `{member}`")]
    MissingMember { strukt: String, member: String },
    #[error("BTF member `{strukt}.{member}` is a bitfield; netiso reads whole bytes only")]
    Bitfield { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

const MAX_ANONYMOUS_NESTING: u32 = 16;

struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

enum Type {
    Composite {
        name: u32,
        members: Vec<Member>,
    },
    Enum {
        name: u32,
        values: Vec<(u32, i64)>,
    },
    /// typedef (named), const, volatile, restrict, type tag: resolve through `target`.
    Alias {
        name: u32,
        target: u32,
    },
    Pointer {
        target: u32,
    },
    FuncProto {
        params: usize,
    },
    Other,
}

pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Parses raw BTF (little-endian, as on every bpfel host).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let type_data =
            data.get(types_start..types_start + type_len).ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        // Type id 0 is `void`.
        let mut types = vec![Type::Other];
        let mut at = 0;
        while at < type_data.len() {
            let name = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        let (bit_offset, bitfield) =
                            if kind_flag { (offset & 0xff_ffff, offset >> 24 != 0) } else { (offset, false) };
                        members.push(Member {
                            name: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            bit_offset,
                            bitfield,
                        });
                    }
                    at += vlen * 12;
                    Type::Composite { name, members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = at + i * 8;
                        let raw = u32_at(type_data, v + 4)?;
                        let value = if kind_flag { raw as i32 as i64 } else { raw as i64 };
                        values.push((u32_at(type_data, v)?, value));
                    }
                    at += vlen * 8;
                    Type::Enum { name, values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let v = at + i * 12;
                        let lo = u32_at(type_data, v + 4)? as u64;
                        let hi = u32_at(type_data, v + 8)? as u64;
                        values.push((u32_at(type_data, v)?, (hi << 32 | lo) as i64));
                    }
                    at += vlen * 12;
                    Type::Enum { name, values }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias { name: if kind == KIND_TYPEDEF { name } else { 0 }, target: size_or_type }
                }
                KIND_PTR => Type::Pointer { target: size_or_type },
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_FUNC_PROTO => {
                    at += vlen * 8;
                    Type::FuncProto { params: vlen }
                }
                KIND_DATASEC => {
                    at += vlen * 12;
                    Type::Other
                }
                KIND_FWD | KIND_FUNC | KIND_FLOAT => Type::Other,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(ty);
        }
        let mut btf = Btf { types, strings, by_name: HashMap::new() };
        for (id, ty) in btf.types.iter().enumerate() {
            let (kind, name) = match ty {
                Type::Composite { name, .. } => (KIND_STRUCT, *name),
                Type::Enum { name, .. } => (KIND_ENUM, *name),
                Type::Alias { name, .. } => (KIND_TYPEDEF, *name),
                _ => continue,
            };
            if name != 0 {
                let key = (kind, btf.string(name).to_owned());
                // Keep the first definition; later ones are duplicates from other units.
                btf.by_name.entry(key).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        // Alias chains are short; the bound guards against a malformed cycle.
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias { target, .. } => id = *target,
                ty => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `member` in struct or union `strukt` (or a typedef of one, such as
    /// `possible_net_t`), looking through anonymous members.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::MissingType { kind: "struct", name: strukt.to_owned() };
        let id = self
            .by_name
            .get(&(KIND_STRUCT, strukt.to_owned()))
            .or_else(|| self.by_name.get(&(KIND_TYPEDEF, strukt.to_owned())))
            .ok_or_else(missing)?;
        let Some(Type::Composite { members, .. }) = self.resolve(*id) else {
            return Err(missing());
        };
        match self.find_member(members, member, 0, 0) {
            Some((_, true)) => Err(BtfError::Bitfield { strukt: strukt.into(), member: member.into() }),
            Some((bits, false)) if bits % 8 == 0 => Ok(bits / 8),
            Some(_) => Err(BtfError::Bitfield { strukt: strukt.into(), member: member.into() }),
            None => Err(BtfError::MissingMember { strukt: strukt.into(), member: member.into() }),
        }
    }

    fn find_member(&self, members: &[Member], wanted: &str, base_bits: u32, depth: u32) -> Option<(u32, bool)> {
        for m in members {
            let bits = base_bits.checked_add(m.bit_offset)?;
            if m.name == 0 {
                // Real kernels nest anonymous members a few levels deep; the bound stops a
                // malformed struct that contains itself from recursing until the stack overflows.
                if depth < MAX_ANONYMOUS_NESTING
                    && let Some(Type::Composite { members: inner, .. }) = self.resolve(m.type_id)
                    && let Some(found) = self.find_member(inner, wanted, bits, depth + 1)
                {
                    return Some(found);
                }
            } else if self.string(m.name) == wanted {
                return Some((bits, m.bitfield));
            }
        }
        None
    }

    /// How many arguments the BTF-typed tracepoint `name` passes to a program: its probe's
    /// parameters (`btf_trace_NAME` is a pointer to the probe's prototype) without the leading
    /// `void *` the kernel passes internally.
    pub fn tracepoint_args(&self, name: &str) -> Result<usize, BtfError> {
        let typedef = format!("btf_trace_{name}");
        let missing = || BtfError::MissingType { kind: "typedef", name: typedef.clone() };
        let id = self.by_name.get(&(KIND_TYPEDEF, typedef.clone())).ok_or_else(missing)?;
        let Some(Type::Pointer { target }) = self.resolve(*id) else {
            return Err(BtfError::Malformed("a btf_trace_ typedef that is not a function pointer"));
        };
        match self.resolve(*target) {
            Some(Type::FuncProto { params }) if *params > 0 => Ok(params - 1),
            _ => Err(BtfError::Malformed("a btf_trace_ typedef that is not a function pointer")),
        }
    }

    /// The values of enum `name`, as (enumerator name, value).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let id = self
            .by_name
            .get(&(KIND_ENUM, name.to_owned()))
            .ok_or_else(|| BtfError::MissingType { kind: "enum", name: name.to_owned() })?;
        let Some(Type::Enum { values, .. }) = self.types.get(*id as usize) else {
            return Err(BtfError::MissingType { kind: "enum", name: name.to_owned() });
        };
        Ok(values.iter().map(|(n, v)| (self.string(*n).to_owned(), *v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: `struct outer { int a; union { int b; struct { int c; }; }; }`
    /// with `b` at byte 8 and `c` at byte 12, `enum e { X = 3 }`, and
    /// `typedef void (*btf_trace_tp)(void *, int, int)`.
    fn sample() -> Vec<u8> {
        let strings = b"\0outer\0a\0b\0c\0int\0e\0X\0btf_trace_tp\0";
        let s = |name: &str| -> u32 {
            let hay = std::str::from_utf8(strings).unwrap();
            hay.find(&format!("\0{name}\0")).unwrap() as u32 + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        // 1: int
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: anonymous struct { int c @ 32 bits }
        push(&[0, KIND_STRUCT << 24 | 1, 8, s("c"), 1, 32]);
        // 3: anonymous union { int b @ 0; struct(2) @ 0 }
        push(&[0, KIND_UNION << 24 | 2, 8, s("b"), 1, 0, 0, 2, 0]);
        // 4: struct outer { int a @ 0; union(3) @ 64 }
        push(&[s("outer"), KIND_STRUCT << 24 | 2, 16, s("a"), 1, 0, 0, 3, 64]);
        // 5: enum e { X = 3 }
        push(&[s("e"), KIND_ENUM << 24 | 1, 4, s("X"), 3]);
        // 6: void (void *, int, int); 7: pointer to 6; 8: typedef btf_trace_tp = 7
        push(&[0, KIND_FUNC_PROTO << 24 | 3, 0, 0, 0, 0, 1, 0, 1]);
        push(&[0, KIND_PTR << 24, 6]);
        push(&[s("btf_trace_tp"), KIND_TYPEDEF << 24, 7]);
        blob(&types, strings)
    }

    /// A BTF header followed by the type and string sections.
    fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut blob = Vec::new();
        blob.extend_from_slice(&MAGIC.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_structs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 12);
        assert!(matches!(btf.member_offset("outer", "d"), Err(BtfError::MissingMember { .. })));
        assert!(matches!(btf.member_offset("inner", "a"), Err(BtfError::MissingType { .. })));
        assert_eq!(btf.enum_values("e").unwrap(), vec![("X".to_owned(), 3)]);
        assert_eq!(btf.tracepoint_args("tp").unwrap(), 2);
        assert!(matches!(btf.tracepoint_args("other"), Err(BtfError::MissingType { .. })));
    }

    #[test]
    fn a_struct_that_contains_itself_anonymously_is_a_missing_member_not_a_stack_overflow() {
        let strings = b"\0loop\0";
        let mut types = Vec::new();
        // 1: struct loop { <anonymous> struct loop @ 0 }
        for w in [1u32, KIND_STRUCT << 24 | 1, 8, 0, 1, 0] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        let btf = Btf::parse(&blob(&types, strings)).unwrap();
        assert!(matches!(btf.member_offset("loop", "x"), Err(BtfError::MissingMember { .. })));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, definitely not").is_err());
        let mut truncated = sample();
        truncated.truncate(40);
        assert!(Btf::parse(&truncated).is_err());
    }

    #[test]
    fn reads_the_running_kernels_sk_buff() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            panic!("/sys/kernel/btf/vmlinux is required (a kernel built with CONFIG_DEBUG_INFO_BTF)");
        };
        let btf = Btf::parse(&data).unwrap();
        let head = btf.member_offset("sk_buff", "head").unwrap();
        assert_eq!(btf.member_offset("possible_net_t", "net").unwrap(), 0);
        assert!(btf.member_offset("ns_common", "inum").unwrap() > 0);
        let network = btf.member_offset("sk_buff", "network_header").unwrap();
        assert!(head > 0 && network > 0 && head != network);
        let reasons = btf.enum_values("skb_drop_reason").unwrap();
        assert!(reasons.iter().any(|(n, _)| n == "SKB_DROP_REASON_NETFILTER_DROP"));
        // skb and location; the reason since 5.17, which brought the enum; rx_sk since 6.11.
        assert!((3..=4).contains(&btf.tracepoint_args("kfree_skb").unwrap()));
    }
}
