//! What every kernel object needs once: a panic handler and a license.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

/// GPL: the helpers the programs call (`bpf_probe_read_kernel`,
/// `bpf_get_stack`, …) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
