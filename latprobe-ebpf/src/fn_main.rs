//! latprobe's kernel programs for `fn` and `flame` (whose `--during` runs on
//! `fn`'s programs), one module per command, for kernels with task-local
//! storage (5.11) and `BPF_CMPXCHG` (5.12). `fn_compat_main.rs` builds the
//! same programs for older kernels.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

/// `BPF_CMPXCHG` (Linux 5.12+) makes min/max updates atomic.
const CMPXCHG: bool = true;

#[macro_use]
mod task_storage;

mod flame;
mod func;
mod helpers;
mod runtime;
