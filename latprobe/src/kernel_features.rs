//! What the running kernel's BPF can do, asked of the `bpf()` system call
//! directly with the smallest request that tells, and what it counted of a
//! loaded program.
//!
//! A probe must not cost the start time it is part of: a request that makes
//! the kernel allocate a map and free it again can wait for an RCU grace
//! period on the way out (task storage: 70–500 ms measured), so each probe
//! here is built to be refused before anything is allocated.

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_TYPE_TASK_STORAGE: u32 = 29;
const BPF_F_NO_PREALLOC: u32 = 1;

/// `bpf(cmd, attr)` with `attr` written at the start of a zeroed
/// `union bpf_attr`: the kernel's return value, or `-errno`.
fn bpf<A>(cmd: libc::c_long, attr: A) -> i64 {
    let mut union = [0u8; 128];
    const { assert!(size_of::<A>() <= 128) };
    // SAFETY: `union` is larger than `A` (checked above); an unaligned
    // write of plain integers.
    unsafe { std::ptr::write_unaligned(union.as_mut_ptr().cast::<A>(), attr) };
    // SAFETY: every pointer `attr` carries points to memory its caller keeps
    // alive across the call, and `union` holds its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, union.as_mut_ptr(), union.len()) };
    if r < 0 {
        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL))
    } else {
        r
    }
}

/// Whether task-local storage maps exist (Linux 5.11). Asked for one with
/// an oversized value: a kernel that knows the type refuses it with E2BIG
/// in its own checks, before allocating anything; one that does not
/// refuses the unknown type with EINVAL.
pub fn has_task_storage() -> bool {
    // `union bpf_attr`'s map-create member, up to the BTF type ids.
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        map_ifindex: u32,
        btf_fd: u32,
        btf_key_type_id: u32,
        btf_value_type_id: u32,
    }
    let attr = CreateAttr {
        map_type: BPF_MAP_TYPE_TASK_STORAGE,
        key_size: 4,
        value_size: u32::MAX,
        max_entries: 0,
        map_flags: BPF_F_NO_PREALLOC,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: [0; 16],
        map_ifindex: 0,
        btf_fd: u32::MAX,
        btf_key_type_id: 1,
        btf_value_type_id: 1,
    };
    let r = bpf(BPF_MAP_CREATE, attr);
    if r >= 0 {
        // Never expected; do not leak what was made.
        // SAFETY: a descriptor the kernel just gave us, closed once.
        unsafe { libc::close(r as i32) };
        return true;
    }
    r == -i64::from(libc::E2BIG)
}

/// Whether the verifier takes `BPF_ATOMIC | BPF_FETCH` instructions (Linux
/// 5.12), tried on the smallest program holding one.
pub fn has_fetch_atomics() -> bool {
    // One instruction: opcode, dst (low nibble) and src registers, offset, immediate.
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | (u64::from(dst | (src << 4)) << 8)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    };
    let program = [
        insn(0x7a, 10, 0, -8, 0),    // *(u64 *)(r10 - 8) = 0
        insn(0xb7, 0, 0, 0, 0),      // r0 = 0
        insn(0xb7, 1, 0, 0, 1),      // r1 = 1
        insn(0xdb, 10, 1, -8, 0xf1), // r0 = cmpxchg_64(r10 - 8, r0, r1)
        insn(0xb7, 0, 0, 0, 0),      // r0 = 0
        insn(0x95, 0, 0, 0, 0),      // exit
    ];
    let license = c"GPL";
    // `union bpf_attr`'s program-load member, up to `log_buf`.
    #[repr(C)]
    struct LoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
    }
    let attr = LoadAttr {
        prog_type: 1, // BPF_PROG_TYPE_SOCKET_FILTER
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
    };
    let fd = bpf(BPF_PROG_LOAD, attr);
    if fd < 0 {
        return false;
    }
    // SAFETY: a descriptor the kernel just gave us, closed once.
    unsafe { libc::close(fd as i32) };
    true
}

/// How many times the kernel skipped program `fd` because it would have
/// re-entered itself on one CPU (`bpf_prog_info.recursion_misses`, Linux
/// 5.12+; a preempted program on PREEMPT_RT counts too). None if unknown.
pub fn recursion_misses(fd: BorrowedFd<'_>) -> Option<u64> {
    prog_info(fd).map(|info| info.recursion_misses)
}

/// Program `fd`'s runs and their total nanoseconds, as the kernel counted
/// them while `BPF_ENABLE_STATS` was on. Readable through any descriptor
/// of the program, for as long as one is open.
pub fn run_stats(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    prog_info(fd).map(|info| (info.run_cnt, info.run_time_ns))
}

fn prog_info(fd: BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    // SAFETY: bpf_prog_info is plain integers and u64-encoded pointers:
    // all zeros is a valid value, and what the kernel expects unset.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    // `union bpf_attr`'s `info` member: bpf_fd, info_len, info.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<aya_obj::generated::bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // The kernel writes at most info_len bytes into `info`.
    (bpf(BPF_OBJ_GET_INFO_BY_FD, attr) == 0).then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe that allocates nothing agrees with aya's, which creates a
    /// real map (and waits for its release).
    #[test]
    fn task_storage_probe_agrees_with_creating_one() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Unprivileged, the kernel checks the request before the
            // privilege and creates nothing: only root sees both answers.
            eprintln!("SKIPPED task_storage_probe_agrees_with_creating_one: needs root");
            return;
        }
        let created = aya::sys::is_map_supported(aya::maps::MapType::TaskStorage).unwrap_or(false);
        assert_eq!(has_task_storage(), created);
    }
}
