//! latprobe's kernel programs for `lock`: an object of their own, so that no
//! other command loads their maps, nor they the others'; for kernels with
//! `BPF_CMPXCHG` (5.12). `lock_compat_main.rs` builds them for older kernels.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

/// `BPF_CMPXCHG` (Linux 5.12+) makes min/max updates atomic.
const CMPXCHG: bool = true;

mod comm;
mod helpers;
mod lock;
mod runtime;
mod slots;
