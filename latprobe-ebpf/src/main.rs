//! latprobe's kernel programs for `fn`, `runqlat`, `runqslower` and `flame`,
//! one module per command.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod comm;
mod flame;
mod func;
mod helpers;
mod runtime;
mod sched;
mod task_storage;
