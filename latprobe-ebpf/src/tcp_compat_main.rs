//! latprobe's kernel programs for `tcp`, as `tcp_main.rs`, for kernels
//! before 5.12 (Debian 11's 5.10): no `BPF_CMPXCHG`.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

/// `BPF_CMPXCHG` is Linux 5.12+; older verifiers refuse any object holding one.
const CMPXCHG: bool = false;

mod helpers;
mod runtime;
mod slots;
mod tcp;
