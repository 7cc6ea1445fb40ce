//! latprobe's kernel programs for `fn` and `flame`, as `fn_main.rs`, for
//! kernels before 5.12 (Debian 11's 5.10): no task-storage map in the object
//! (per-task values in the preallocated hashes by tid) and no `BPF_CMPXCHG`.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

/// `BPF_CMPXCHG` is Linux 5.12+; older verifiers refuse any object holding one.
const CMPXCHG: bool = false;

#[macro_use]
#[path = "no_task_storage.rs"]
mod task_storage;

mod flame;
mod func;
mod helpers;
mod runtime;
