//! latprobe's kernel programs, one module per command.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod flame;
mod func;
mod helpers;
mod sched;
mod task_storage;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
