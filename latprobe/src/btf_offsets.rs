//! Struct member offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, and `task_struct` differs between
//! kernels (6.1, 6.12, PREEMPT_RT builds), so the few fields the `rq_`
//! programs read are located here, in /sys/kernel/btf/vmlinux, and passed to
//! them as load-time globals. aya parses BTF but does not expose its types, so
//! this reads the format directly: a `btf_header`, then the type section (one
//! `btf_type` per type, each followed by kind-specific data), then the string
//! section (include/uapi/linux/btf.h).

use std::{fmt, fs, ops::Range};

use anyhow::{Context, Result};

const MAGIC: u16 = 0xeb9f;

// BTF_KIND_* values.
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// Why a BTF blob could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct BtfError(String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

fn err<T>(what: impl Into<String>) -> Result<T, BtfError> {
    Err(BtfError(what.into()))
}

/// Where a member lives in its struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outermost struct.
    pub offset: u32,
    /// Size in bytes of the member's type.
    pub size: u32,
}

/// One type's header: its kind, name, `size_or_type`, count of members
/// (enumerators, parameters), and where its kind-specific data starts.
#[derive(Clone, Copy)]
struct Type {
    kind: u32,
    name_off: u32,
    size_or_type: u32,
    vlen: usize,
    kind_flag: bool,
    /// Offset of the kind-specific data in the type section.
    extra: usize,
}

/// One BTF blob, indexed but not unpacked: a type is read from the blob
/// when asked for. vmlinux holds over 100,000 types and latprobe asks for a
/// few dozen, so building each one up front cost more than the rest of
/// latprobe's start.
pub struct Btf {
    data: Vec<u8>,
    type_range: Range<usize>,
    strings: Range<usize>,
    /// Where each type's header starts in `types`, by id (id 0 is `void`
    /// and has none).
    starts: Vec<u32>,
    /// The ids of the named structs, in id order.
    structs: Vec<u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| BtfError(format!("truncated at byte {at}")))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        const PATH: &str = "/sys/kernel/btf/vmlinux";
        let data = fs::read(PATH).with_context(|| format!("reading {PATH}"))?;
        Self::parse(data).with_context(|| format!("parsing {PATH}"))
    }

    /// Parses a little-endian BTF blob (the layout on x86_64 and arm64),
    /// keeping it (megabytes: not copied).
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < 24 {
            return err("too short for a BTF header");
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != MAGIC {
            return err(format!("bad magic {magic:#x} (a big-endian or non-BTF file?)"));
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let (type_off, type_len) = (u32_at(&data, 8)? as usize, u32_at(&data, 12)? as usize);
        let (str_off, str_len) = (u32_at(&data, 16)? as usize, u32_at(&data, 20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            let range = hdr_len + off..hdr_len + off + len;
            match data.get(range.clone()) {
                Some(_) => Ok(range),
                None => err(format!("{what} section out of bounds")),
            }
        };
        let type_range = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?;
        let type_data = &data[type_range.clone()];

        let mut starts = vec![0];
        let mut structs = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let info = u32_at(type_data, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let size = match kind {
                INT | VAR | DECL_TAG => 4,
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                ARRAY => 12,
                STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen,
                ENUM | FUNC_PROTO => 8 * vlen,
                other => return err(format!("unknown BTF kind {other} at type {}", starts.len())),
            };
            if at + 12 + size > type_data.len() {
                return err(format!("type {} truncated", starts.len()));
            }
            if kind == STRUCT && u32_at(type_data, at)? != 0 {
                structs.push(starts.len() as u32);
            }
            starts.push(at as u32);
            at += 12 + size;
        }
        Ok(Self { data, type_range, strings, starts, structs })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.data[self.strings.clone()].get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// A word of the type section (the parse checked every type's bounds).
    fn word(&self, at: usize) -> u32 {
        u32_at(&self.data[self.type_range.clone()], at).unwrap_or(0)
    }

    fn get(&self, id: u32) -> Option<Type> {
        let at = *self.starts.get(id as usize).filter(|_| id != 0)? as usize;
        let info = self.word(at + 4);
        Some(Type {
            kind: (info >> 24) & 0x1f,
            name_off: self.word(at),
            size_or_type: self.word(at + 8),
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 != 0,
            extra: at + 12,
        })
    }

    /// Every type, with its id.
    fn all(&self) -> impl Iterator<Item = (u32, Type)> + '_ {
        (1..self.starts.len() as u32).filter_map(|id| Some((id, self.get(id)?)))
    }

    /// A struct's or union's members as (name offset, type id, bit offset).
    fn members(&self, t: &Type) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let (extra, kind_flag) = (t.extra, t.kind_flag);
        let n = if matches!(t.kind, STRUCT | UNION) { t.vlen } else { 0 };
        (0..n).map(move |m| {
            let base = extra + 12 * m;
            let offset = self.word(base + 8);
            // With kind_flag, the top 8 bits are a bitfield size.
            let bit_offset = if kind_flag { offset & 0xff_ffff } else { offset };
            (self.word(base), self.word(base + 4), bit_offset)
        })
    }

    /// An array's (element type, element count).
    fn array(&self, t: &Type) -> Option<(u32, u32)> {
        (t.kind == ARRAY).then(|| (self.word(t.extra), self.word(t.extra + 8)))
    }

    /// Size in bytes of type `id`, following typedefs and qualifiers.
    fn size_of(&self, id: u32) -> Option<u32> {
        let mut id = id;
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT => return Some(t.size_or_type),
                PTR => return Some(8),
                ARRAY => {
                    let (elem, n) = self.array(&t)?;
                    return self.size_of(elem).map(|s| s * n);
                }
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = t.size_or_type,
                _ => return None,
            }
        }
        None
    }

    /// The id a member's type resolves to, past typedefs and qualifiers.
    fn resolve(&self, id: u32) -> Option<u32> {
        let mut id = id;
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = t.size_or_type,
                _ => return Some(id),
            }
        }
        None
    }

    /// `member` of `struct name`, also inside anonymous structs and unions
    /// (where randomized layouts and `union { … }` groups put fields). The
    /// first struct of that name counts (vmlinux has one).
    pub fn member(&self, name: &str, member: &str) -> Option<Member> {
        let id = *self.structs.iter().find(|&&id| self.get(id).is_some_and(|t| self.name(t.name_off) == name))?;
        self.find_member(id, member, 0, 0)
    }

    /// The enumerators of `enum name`, as (name, value).
    pub fn enum_values(&self, name: &str) -> Vec<(String, u32)> {
        let Some((_, e)) = self.all().find(|(_, t)| t.kind == ENUM && self.name(t.name_off) == name) else {
            return Vec::new();
        };
        (0..e.vlen)
            .map(|m| {
                let base = e.extra + 8 * m;
                (self.name(self.word(base)).to_string(), self.word(base + 4))
            })
            .collect()
    }

    /// How many parameters kernel function `name` takes.
    pub fn function_params(&self, name: &str) -> Option<usize> {
        let (_, func) = self.all().find(|(_, t)| t.kind == FUNC && self.name(t.name_off) == name)?;
        let proto = self.get(func.size_or_type)?;
        (proto.kind == FUNC_PROTO).then_some(proto.vlen)
    }

    fn find_member(&self, id: u32, member: &str, base_bits: u32, depth: u32) -> Option<Member> {
        let t = self.get(id)?;
        if depth > 8 {
            return None;
        }
        for (name_off, type_id, bit_offset) in self.members(&t) {
            let bits = base_bits + bit_offset;
            if name_off == 0 {
                let inner_id = self.resolve(type_id)?;
                if matches!(self.get(inner_id)?.kind, STRUCT | UNION) {
                    if let Some(m) = self.find_member(inner_id, member, bits, depth + 1) {
                        return Some(m);
                    }
                }
                continue;
            }
            if self.name(name_off) == member {
                if !bits.is_multiple_of(8) {
                    return None;
                }
                return Some(Member { offset: bits / 8, size: self.size_of(type_id)? });
            }
        }
        None
    }
}

/// The `task_struct` fields the `rq_` programs read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    pub pid: u32,
    pub tgid: u32,
    pub comm: u32,
    /// `__state`, or `state` before Linux 5.14; only compared with
    /// TASK_RUNNING (0), so reading its low 32 bits suffices either way.
    pub state: u32,
}

impl TaskOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let field = |name: &str, size: u32| -> Result<u32> {
            let m = btf
                .member("task_struct", name)
                .with_context(|| format!("task_struct.{name} is not in the kernel's BTF"))?;
            anyhow::ensure!(m.size == size, "task_struct.{name} is {} bytes, expected {size}", m.size);
            Ok(m.offset)
        };
        // Linux 5.14 renamed `long state` to `unsigned int __state`
        // (commit 2f064a59a11f, "sched: Change task_struct::state").
        let state = match btf.member("task_struct", "__state") {
            Some(m) => m.offset,
            None => field("state", 8)?,
        };
        Ok(Self { pid: field("pid", 4)?, tgid: field("tgid", 4)?, comm: field("comm", 16)?, state })
    }
}

/// The `sock` and `sk_buff` fields the `tcp_` programs read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    pub family: u32,
    /// `skc_num`: the local port, host order.
    pub num: u32,
    /// `skc_dport`: the remote port, network order.
    pub dport: u32,
    pub rcv_saddr: u32,
    pub daddr: u32,
    pub v6_rcv_saddr: u32,
    pub v6_daddr: u32,
    pub state: u32,
    pub protocol: u32,
    /// `sk_buff.cb`, where TCP keeps its `tcp_skb_cb` (seq, end_seq first).
    pub skb_cb: u32,
    pub ack_backlog: u32,
    pub max_ack_backlog: u32,
    /// `sock.sk_drops`, which a listener's drops add to; `None` where the
    /// kernel keeps it otherwise.
    pub drops: Option<u32>,
    /// `tcp_request_sock.snt_synack`.
    pub snt_synack: u32,
    /// `sock.sk_rcvbuf`, bytes.
    pub rcvbuf: u32,
    /// `sk_buff.sk`, `.head`, `.protocol` (network order), and the offsets
    /// from `head` of its network and transport headers.
    pub skb_sk: u32,
    pub skb_head: u32,
    pub skb_protocol: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
}

impl SockOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let field = |strukt: &str, name: &str, size: u32| -> Result<u32> {
            let m = btf.member(strukt, name).with_context(|| format!("{strukt}.{name} is not in the kernel's BTF"))?;
            anyhow::ensure!(m.size == size, "{strukt}.{name} is {} bytes, expected {size}", m.size);
            Ok(m.offset)
        };
        let common = |name: &str, size: u32| field("sock_common", name, size);
        Ok(Self {
            family: common("skc_family", 2)?,
            num: common("skc_num", 2)?,
            dport: common("skc_dport", 2)?,
            rcv_saddr: common("skc_rcv_saddr", 4)?,
            daddr: common("skc_daddr", 4)?,
            v6_rcv_saddr: common("skc_v6_rcv_saddr", 16)?,
            v6_daddr: common("skc_v6_daddr", 16)?,
            state: common("skc_state", 1)?,
            // `struct sock` opens with its `sock_common`: offsets in one are
            // offsets in the other.
            protocol: field("sock", "sk_protocol", 2)?,
            skb_cb: field("sk_buff", "cb", 48)?,
            ack_backlog: field("sock", "sk_ack_backlog", 4)?,
            max_ack_backlog: field("sock", "sk_max_ack_backlog", 4)?,
            drops: field("sock", "sk_drops", 4).ok(),
            snt_synack: field("tcp_request_sock", "snt_synack", 8)?,
            rcvbuf: field("sock", "sk_rcvbuf", 4)?,
            skb_sk: field("sk_buff", "sk", 8)?,
            skb_head: field("sk_buff", "head", 8)?,
            skb_protocol: field("sk_buff", "protocol", 2)?,
            skb_network_header: field("sk_buff", "network_header", 2)?,
            skb_transport_header: field("sk_buff", "transport_header", 2)?,
        })
    }
}

/// Where the kernel keeps the owner of a sleeping lock: the `owner` word of
/// `struct mutex`, `struct rw_semaphore` and `struct rt_mutex_base` (a task
/// pointer with flag bits), `NO_FIELD` for a struct this kernel lacks (a
/// PREEMPT_RT kernel builds its mutex on an rt_mutex_base, and has no
/// `mutex.owner`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockOwnerOffsets {
    pub mutex: u32,
    pub rwsem: u32,
    pub rt_mutex: u32,
}

impl LockOwnerOffsets {
    pub fn from_btf(btf: &Btf) -> Self {
        let owner = |strukt: &str| {
            btf.member(strukt, "owner").filter(|m| m.size == 8).map_or(latprobe_common::lock::NO_FIELD, |m| m.offset)
        };
        Self { mutex: owner("mutex"), rwsem: owner("rw_semaphore"), rt_mutex: owner("rt_mutex_base") }
    }
}

/// Whether task-local storage can allocate under the run-queue lock. Since
/// "bpf: Use bpf_mem_cache_alloc/free in bpf_local_storage_elem" (2023),
/// storage elements come from BPF's own allocator, which is safe in any
/// context; before it, creating an element meant kmalloc(GFP_ATOMIC) inside
/// `sched_wakeup`/`sched_switch`, which can try to wake kswapd while this
/// CPU's run-queue lock is held, and on PREEMPT_RT takes sleeping locks. The
/// allocator left its mark in BTF: `bpf_local_storage_map.selem_ma`. A kernel
/// without task storage at all (before 5.11) has no such member either, so
/// there the hashes by tid are chosen too.
pub fn task_storage_safe_in_scheduler(btf: &Btf) -> bool {
    btf.member("bpf_local_storage_map", "selem_ma").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob type by type, as the kernel lays it out.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self { types: Vec::new(), strings: vec![0], count: 0 }
        }
        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn ty(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size_or_type: u32, extra: &[u32]) -> u32 {
            let name = self.str(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            for w in [name, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.count += 1;
            self.count
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.ty(name, INT, 0, false, size, &[size * 8])
        }
        fn strukt(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let mut extra = Vec::new();
            for &(n, t, bits) in members {
                extra.extend([self.str(n), t, bits]);
            }
            self.ty(name, kind, members.len() as u32, false, size, &extra)
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            for w in [
                u32::from(MAGIC) | (1 << 16),
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A task_struct shaped like the kernel's: a typedef'd pid, a volatile
    /// state, comm as char[16], and tgid inside an anonymous struct in an
    /// anonymous union, after kinds the parser must skip.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let uint = b.int("unsigned int", 4);
        let ch = b.int("char", 1);
        let pid_t = b.ty("pid_t", TYPEDEF, 0, false, int, &[]);
        let vol = b.ty("", VOLATILE, 0, false, uint, &[]);
        let comm = b.ty("", ARRAY, 0, false, 0, &[ch, int, 16]);
        b.ty("e", ENUM, 2, false, 4, &[0, 0, 0, 1]);
        b.ty("f", FUNC_PROTO, 1, false, int, &[0, int]);
        let inner = b.strukt(STRUCT, "", 8, &[("pad", int, 0), ("tgid", pid_t, 32)]);
        let anon = b.strukt(UNION, "", 8, &[("", inner, 0)]);
        b.strukt(
            STRUCT,
            "task_struct",
            64,
            &[("__state", vol, 64), ("pid", pid_t, 128), ("", anon, 192), ("comm", comm, 320)],
        );
        b.build()
    }

    #[test]
    fn finds_members_through_typedefs_and_anonymous_unions() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.member("task_struct", "pid"), Some(Member { offset: 16, size: 4 }));
        assert_eq!(btf.member("task_struct", "tgid"), Some(Member { offset: 28, size: 4 }));
        assert_eq!(btf.member("task_struct", "comm"), Some(Member { offset: 40, size: 16 }));
        assert_eq!(btf.member("task_struct", "nope"), None);
        assert_eq!(btf.member("no_struct", "pid"), None);
        let t = TaskOffsets::from_btf(&btf).unwrap();
        assert_eq!(t, TaskOffsets { pid: 16, tgid: 28, comm: 40, state: 8 });
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"short".to_vec()).is_err());
        let mut data = sample();
        data[0] = 0;
        assert!(Btf::parse(data).err().unwrap().0.contains("bad magic"));
        let data = sample();
        assert!(Btf::parse(data[..data.len() - 10].to_vec()).is_err(), "truncated sections are refused");
    }

    #[test]
    fn missing_fields_are_named() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.strukt(STRUCT, "task_struct", 8, &[("pid", int, 0)]);
        let btf = Btf::parse(b.build()).unwrap();
        let e = format!("{:#}", TaskOffsets::from_btf(&btf).unwrap_err());
        assert!(e.contains("task_struct.state"), "{e}");
    }

    #[test]
    fn reads_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("SKIPPED reads_the_running_kernel: no /sys/kernel/btf/vmlinux");
            return;
        };
        let t = TaskOffsets::from_btf(&btf).unwrap();
        assert!(t.pid > 0 && t.tgid == t.pid + 4, "pid and tgid are adjacent: {t:?}");
        assert!(t.comm > t.tgid, "{t:?}");
        assert_eq!(btf.member("task_struct", "comm").map(|m| m.size), Some(16));
    }
}
