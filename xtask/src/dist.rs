//! `xtask dist`: what a release ships, in `target/dist/`: the static
//! binary (musl, the kernel programs inside), its shell completions and man
//! pages generated from its own clap definitions (`latprobe generate`), and a
//! SHA256SUMS over all of it that `sha256sum -c` checks.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, ensure, Context, Result};

use crate::vm::kernels::workspace_root;

const TARGET: &str = "x86_64-unknown-linux-musl";

pub fn run() -> Result<ExitCode> {
    let root = workspace_root();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--target", TARGET, "-p", "latprobe", "--bin", "latprobe"])
        .current_dir(&root)
        .status()
        .context("running cargo")?;
    ensure!(status.success(), "building latprobe for {TARGET} failed");
    let built = root.join("target").join(TARGET).join("release").join("latprobe");
    ensure!(
        is_static(&fs::read(&built).with_context(|| format!("reading {}", built.display()))?),
        "{} is not static",
        built.display()
    );

    let dist = root.join("target").join("dist");
    if dist.exists() {
        fs::remove_dir_all(&dist).with_context(|| format!("clearing {}", dist.display()))?;
    }
    for dir in ["completions", "man"] {
        fs::create_dir_all(dist.join(dir)).with_context(|| format!("creating {}", dist.join(dir).display()))?;
    }
    let binary = dist.join("latprobe");
    fs::copy(&built, &binary).with_context(|| format!("copying {}", built.display()))?;
    let mut files = vec![PathBuf::from("latprobe")];
    for (what, file) in
        [("bash", "completions/latprobe.bash"), ("zsh", "completions/_latprobe"), ("fish", "completions/latprobe.fish")]
    {
        write(&dist, file, &generate(&binary, &[what])?)?;
        files.push(file.into());
    }
    write(&dist, "man/latprobe.1", &generate(&binary, &["man"])?)?;
    files.push("man/latprobe.1".into());
    let commands = String::from_utf8(generate(&binary, &["commands"])?).context("subcommand names")?;
    for name in commands.lines().filter(|l| !l.is_empty()) {
        let file = format!("man/latprobe-{name}.1");
        write(&dist, &file, &generate(&binary, &["man", "--command", name])?)?;
        files.push(file.into());
    }

    let sums = Command::new("sha256sum").args(&files).current_dir(&dist).output().context("running sha256sum")?;
    ensure!(sums.status.success(), "sha256sum failed: {}", String::from_utf8_lossy(&sums.stderr));
    write(&dist, "SHA256SUMS", &sums.stdout)?;
    print!("{}", String::from_utf8_lossy(&sums.stdout));
    println!(
        "xtask: {} files in {} (check: cd {} && sha256sum -c SHA256SUMS)",
        files.len() + 1,
        dist.display(),
        dist.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What `latprobe generate ARGS` prints; it must not be empty.
fn generate(binary: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(binary).arg("generate").args(args).output().context("running latprobe generate")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("latprobe generate {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn write(dist: &Path, file: &str, bytes: &[u8]) -> Result<()> {
    fs::write(dist.join(file), bytes).with_context(|| format!("writing {file}"))
}

/// A 64-bit ELF with no program interpreter (PT_INTERP): nothing to load
/// at run time, so it runs on any x86-64 Linux.
fn is_static(elf: &[u8]) -> bool {
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| elf.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| elf.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return false };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|kind| kind != 3)
    })
}

#[cfg(test)]
mod tests {
    use super::is_static;

    #[test]
    fn a_dynamic_executable_is_not_static() {
        // This test's own executable is linked against the system's libc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static(&me));
        assert!(!is_static(b"not an elf"));
    }
}
