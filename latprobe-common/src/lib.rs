//! Types and limits shared by latprobe's kernel programs and its userspace.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel object and
//! the binary must agree on every byte. One module per command.
#![no_std]

pub mod flame;
pub mod floor;
pub mod func;
pub mod hdr;
pub mod lock;
pub mod sched;
pub mod tcp;

/// The map in each per-key object (sched, tcp, lock) whose entries claim
/// histogram slots on kernels before 5.12; sized to the slot limit there.
pub const SLOT_OWNERS: &str = "SLOT_OWNERS";

/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;
