//! Builds the kernel programs (latprobe-ebpf) with the nightly toolchain and
//! bpf-linker, so a plain `cargo build` yields one binary with them embedded.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../latprobe-ebpf");
    // aya-build watches the kernel crate only; the layouts it shares with
    // userspace live in latprobe-common, and a change there must rebuild both
    // sides, or the object and the binary disagree on map value sizes.
    println!("cargo:rerun-if-changed={}", concat!(env!("CARGO_MANIFEST_DIR"), "/../latprobe-common"));
    aya_build::build_ebpf(
        [aya_build::Package { name: "latprobe-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
