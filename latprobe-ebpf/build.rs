//! Rebuild the kernel object whenever bpf-linker changes: it is the linker, and
//! cargo does not track it by itself.
use which::which;

fn main() {
    let linker = which("bpf-linker").expect("bpf-linker not found: run scripts/setup");
    println!("cargo:rerun-if-changed={}", linker.display());
}
