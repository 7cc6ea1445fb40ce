//! latprobe's kernel programs for `tcp`: an object of their own, so that no
//! other command loads their maps, nor they the others'; for kernels with
//! `BPF_CMPXCHG` (5.12). `tcp_compat_main.rs` builds them for older kernels.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

/// `BPF_CMPXCHG` (Linux 5.12+) makes min/max updates atomic.
const CMPXCHG: bool = true;

mod helpers;
mod runtime;
mod slots;
mod tcp;
