//! latprobe's kernel programs for `lock`: an object of their own, so that no
//! other command loads their maps, nor they the others'.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod comm;
mod helpers;
mod lock;
mod runtime;
