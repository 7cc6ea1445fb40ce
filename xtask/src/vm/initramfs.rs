//! Builds the VM's initramfs: busybox, the files to run (with the shared
//! libraries a dynamically linked one needs), and an /init that mounts what
//! latprobe needs, runs one command and powers off.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// A newc cpio archive being assembled in memory.
#[derive(Default)]
pub struct Archive {
    /// Path inside the VM → (mode, contents or symlink target).
    entries: BTreeMap<String, (u32, Vec<u8>)>,
}

const DIR: u32 = 0o040755;
const FILE_EXEC: u32 = 0o100755;
const SYMLINK: u32 = 0o120777;

impl Archive {
    fn dir(&mut self, path: &str) {
        let mut prefix = String::new();
        for part in path.trim_matches('/').split('/') {
            prefix = format!("{prefix}/{part}");
            self.entries.entry(prefix.clone()).or_insert((DIR, Vec::new()));
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !parent.is_empty() {
                self.dir(parent);
            }
        }
        self.entries.insert(path.to_string(), (mode, data));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.file(path, SYMLINK, target.as_bytes().to_vec());
    }

    /// Adds a host file at `inside`, following symlinks.
    pub fn host_file(&mut self, host: &Path, inside: &str) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.file(inside, FILE_EXEC, data);
        Ok(())
    }

    /// Adds an executable under /bin plus, when it is dynamically linked,
    /// the libraries and loader `ldd` names, at their host paths.
    pub fn executable(&mut self, host: &Path) -> Result<()> {
        let name = host.file_name().and_then(|n| n.to_str()).context("executable without a name")?;
        self.host_file(host, &format!("/bin/{name}"))?;
        for lib in shared_libraries(host)? {
            let inside = lib.display().to_string();
            self.host_file(&lib, &inside)?;
        }
        Ok(())
    }

    /// The archive in newc format.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, (mode, data))) in self.entries.iter().enumerate() {
            write_entry(&mut out, ino as u32 + 1, path.trim_start_matches('/'), *mode, data);
        }
        write_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
        out
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let nlink = if mode & 0o170000 == DIR & 0o170000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Libraries (and the dynamic loader) a host executable loads; empty for a
/// static one.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Busybox from Debian's busybox-static.
fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = PathBuf::from(p);
        if path.is_file() && shared_libraries(&path)?.is_empty() {
            return Ok(path);
        }
    }
    bail!("a static busybox was not found: run scripts/setup (or apt-get install busybox-static)")
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `name` can be `export`ed by a POSIX shell.
pub fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Marks the console lines that carry the run's progress to the host.
pub const START_MARKER: &str = "LATPROBE_VM_START";
pub const EXIT_MARKER: &str = "LATPROBE_VM_EXIT=";

/// The /init script: mount, run `command` with its stdout on ttyS1 and stderr
/// on ttyS2 (kernel messages stay on the console, ttyS0), report its status,
/// power off.
fn init_script(command: &[String], env: &[(String, String)]) -> Result<String> {
    let mut exports = String::new();
    for (k, v) in env {
        if !is_shell_name(k) {
            bail!("environment variable name {k:?} cannot be exported inside the VM");
        }
        exports += &format!("export {k}={}\n", shell_quote(v));
    }
    let command: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    Ok(format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
# raw: no CR added before LF, no byte rewritten, so the output is the
# command's own bytes.
stty -F /dev/ttyS1 raw -echo 2>/dev/null
stty -F /dev/ttyS2 raw -echo 2>/dev/null
echo 'root:x:0:0:root:/tmp:/bin/sh' > /etc/passwd
echo 'nobody:x:65534:65534:nobody:/tmp:/bin/sh' >> /etc/passwd
echo 'root:x:0:' > /etc/group
echo 'nogroup:x:65534:' >> /etc/group
# Progress goes to the console twice: written straight to the port, and as
# one kernel message, which printk never splits (a direct write can be cut by
# a kernel message printed meanwhile; a printk is lost if the command lowers
# the console log level). The host takes whichever arrives whole.
report() {{ echo "$1" 2>/dev/null >/dev/ttyS0; echo "<0>$1" 2>/dev/null >/dev/kmsg; }}
{exports}cd /tmp
report "{START_MARKER} $(cut -d' ' -f1 /proc/uptime)"
{command} >/dev/ttyS1 2>/dev/ttyS2 </dev/null
report "{EXIT_MARKER}$?"
sync
poweroff -f
"#,
        command = command.join(" ")
    ))
}

/// Writes the gzip-compressed initramfs for one run to `path`.
pub fn build(path: &Path, adds: &[PathBuf], command: &[String], env: &[(String, String)]) -> Result<()> {
    let mut archive = Archive::default();
    for d in ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/proc", "/sys", "/dev", "/tmp", "/etc", "/root"] {
        archive.dir(d);
    }
    archive.host_file(&busybox()?, "/bin/busybox")?;
    archive.symlink("/bin/sh", "busybox");
    archive.file("/init", FILE_EXEC, init_script(command, env)?.into_bytes());
    let mut names = BTreeMap::new();
    for add in adds {
        let name = add.file_name().with_context(|| format!("--add {}: not a file", add.display()))?;
        if let Some(other) = names.insert(name.to_owned(), add) {
            bail!(
                "--add {} and --add {} would both be /bin/{}",
                other.display(),
                add.display(),
                name.to_string_lossy()
            );
        }
        archive.executable(add).with_context(|| format!("adding {} to the VM", add.display()))?;
    }
    let cpio = archive.to_cpio();
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(std::process::Stdio::piped())
        .stdout(fs::File::create(path).with_context(|| format!("creating {}", path.display()))?)
        .spawn()
        .context("running gzip")?;
    gzip.stdin.take().context("gzip stdin")?.write_all(&cpio).context("writing to gzip")?;
    let status = gzip.wait()?;
    if !status.success() {
        bail!("gzip failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut a = Archive::default();
        a.file("/bin/x", FILE_EXEC, b"abc".to_vec());
        let cpio = a.to_cpio();
        assert_eq!(cpio.len() % 4, 0);
        assert!(cpio.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("TRAILER!!!"));
        // "/bin" directory created implicitly, before the file.
        assert!(text.find("bin\0").unwrap() < text.find("bin/x\0").unwrap());
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn env_names_are_checked() {
        assert!(is_shell_name("LATPROBE_X1"));
        assert!(!is_shell_name("LATPROBE-X"));
        assert!(!is_shell_name("1X"));
        assert!(init_script(&["true".into()], &[("A B".into(), "v".into())]).is_err());
        let s = init_script(&["echo".into(), "a'b".into()], &[("LATPROBE_Q".into(), "x'y z".into())]).unwrap();
        assert!(s.contains(r"export LATPROBE_Q='x'\''y z'"), "{s}");
        assert!(s.contains(r"'echo' 'a'\''b' >/dev/ttyS1"), "{s}");
    }
}
