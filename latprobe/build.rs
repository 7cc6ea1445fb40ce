//! Builds the kernel programs (latprobe-ebpf) with the nightly toolchain and
//! bpf-linker, so a plain `cargo build` yields one binary with them embedded.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../latprobe-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "latprobe-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
