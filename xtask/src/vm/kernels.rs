//! The kernel matrix: which Debian kernel packages latprobe is tested on,
//! resolved to the newest available version at fetch time, downloaded with
//! apt and cached (vmlinuz, its config and the package name) after one fetch.
//! Kernels of another Debian release than the machine's are looked up in an
//! apt configuration of their own under the cache, so fetching them never
//! changes what the rest of the machine installs.

use std::{
    cmp::Ordering,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// One kernel of the matrix.
pub struct Kernel {
    /// Short stable name users type: `6.1`, `6.12`, `6.1-rt`.
    pub name: &'static str,
    /// `apt-cache search --names-only` pattern of its package (a regex).
    pattern: &'static str,
    /// The Debian suite its package comes from, when it is not one the
    /// machine's own apt sources list (those are searched with plain apt).
    suite: Option<&'static str>,
    /// Whether `--kernel all` (and so CI) includes it; a kernel still being
    /// brought up is run by name only.
    in_all: bool,
    pub description: &'static str,
}

/// Versions are never written here: Debian removes old kernel ABIs from its
/// mirrors, so a pinned name stops downloading within months.
pub const MATRIX: &[Kernel] = &[
    Kernel {
        name: "6.1",
        // The signed and unsigned packages hold the same kernel; either boots.
        pattern: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64(-unsigned)?$",
        suite: None,
        in_all: true,
        description: "Debian 12 cloud kernel",
    },
    Kernel {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
        suite: None,
        in_all: true,
        description: "Debian 12 backports cloud kernel",
    },
    Kernel {
        name: "6.1-rt",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-rt-amd64-unsigned$",
        suite: None,
        in_all: true,
        description: "Debian 12 PREEMPT_RT kernel",
    },
    Kernel {
        // Debian 11's kernel, still much of the fleet: no task-local storage
        // (5.11), no bpf_get_func_ip (5.15), no lock contention tracepoints
        // (5.19); the oldest kernel latprobe supports.
        name: "5.10",
        pattern: r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64-unsigned$",
        suite: Some("bullseye"),
        in_all: true,
        description: "Debian 11 cloud kernel",
    },
];

/// Kernels named by `--kernel NAME|all`.
pub fn select(name: &str) -> Result<Vec<&'static Kernel>> {
    if name == "all" {
        return Ok(MATRIX.iter().filter(|k| k.in_all).collect());
    }
    match MATRIX.iter().find(|k| k.name == name) {
        Some(k) => Ok(vec![k]),
        None => {
            let names: Vec<&str> = MATRIX.iter().map(|k| k.name).collect();
            bail!("unknown kernel {name:?}: choose one of {} or all (see --list)", names.join(", "))
        }
    }
}

/// Where kernels and packages are cached (`LATPROBE_VM_CACHE` or target/vm).
pub fn cache_dir() -> PathBuf {
    env::var_os("LATPROBE_VM_CACHE").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target/vm"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is inside the workspace").to_path_buf()
}

impl Kernel {
    fn dir(&self) -> PathBuf {
        cache_dir().join("kernels").join(self.name)
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.dir().join("vmlinuz")
    }

    /// The kernel's build configuration (`boot/config-*` of the package), for
    /// checking which options are built in; absent in caches made before it
    /// was kept.
    pub fn config(&self) -> PathBuf {
        self.dir().join("config")
    }

    /// The kernel's text symbols as it listed them in /proc/kallsyms when
    /// booted with `nokaslr` (Debian's System.map is a placeholder), for
    /// naming where a hung guest's CPUs are.
    pub fn kallsyms(&self) -> PathBuf {
        self.dir().join("kallsyms")
    }

    /// The package it was extracted from, if cached.
    pub fn cached_package(&self) -> Option<String> {
        if !self.vmlinuz().is_file() {
            return None;
        }
        fs::read_to_string(self.dir().join("package")).ok().map(|s| s.trim().to_string())
    }

    /// Downloads and extracts the kernel unless cached; returns its vmlinuz.
    pub fn fetch(&self) -> Result<PathBuf> {
        if self.cached_package().is_some() {
            return Ok(self.vmlinuz());
        }
        // Parallel runs (tests, several terminals) share the cache: one fetches,
        // the others wait and then find it cached.
        let cache = cache_dir();
        fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        let lock_path = cache.join("fetch.lock");
        let lock = fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
        if self.cached_package().is_some() {
            return Ok(self.vmlinuz());
        }

        let debs = cache.join("debs");
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        let apt = self.apt()?;
        let mut package = self.resolve(&apt)?;
        eprintln!("xtask: fetching {package} for kernel {}", self.name);
        if !apt.download(&package, &debs)? {
            // Stale package lists: the name may have left the mirror, so look
            // it up again after the update.
            eprintln!("xtask: apt-get download failed; running apt-get update and retrying");
            apt.update()?;
            package = self.resolve(&apt)?;
            if !apt.download(&package, &debs)? {
                bail!("apt-get download {package} failed: check access to the Debian mirror (apt-get update)");
            }
        }
        let deb = find_entry(&debs, &format!("{package}_"), ".deb")
            .with_context(|| format!("apt-get downloaded {package} but no {package}_*.deb is in {}", debs.display()))?;

        let extract = cache.join("extract").join(self.name);
        let _ = fs::remove_dir_all(&extract);
        fs::create_dir_all(&extract).with_context(|| format!("creating {}", extract.display()))?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extract), "dpkg -x")?;
        let boot = extract.join("boot");
        let vmlinuz =
            find_entry(&boot, "vmlinuz-", "").with_context(|| format!("no boot/vmlinuz-* in {}", deb.display()))?;

        // Written under temporary names and renamed, `package` last: an
        // interrupted fetch never looks cached.
        let dir = self.dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let _ = fs::remove_file(dir.join("package"));
        install(&vmlinuz, &self.vmlinuz())?;
        if let Some(config) = find_entry(&boot, "config-", "") {
            install(&config, &self.config())?;
        }
        fs::write(dir.join("package.new"), format!("{package}\n"))?;
        fs::rename(dir.join("package.new"), dir.join("package"))?;
        // lib/modules is the bulk of the package and nothing needs it: the
        // cloud and rt kernels build in BPF, kprobes, ftrace, BTF and the
        // serial ports the VM talks through.
        let _ = fs::remove_dir_all(&extract);
        let _ = fs::remove_file(&deb);
        Ok(self.vmlinuz())
    }

    /// The newest package matching this kernel's pattern, updating the apt
    /// lists once if none matches.
    fn resolve(&self, apt: &Apt) -> Result<String> {
        if let Some(p) = self.newest_known()? {
            return Ok(p);
        }
        apt.update()?;
        self.newest_known()?.with_context(|| match self.suite {
            Some(suite) => format!(
                "no Debian package matches {} for kernel {} in suite {suite} of {}: check access to that mirror",
                self.pattern, self.name, apt.archive
            ),
            None => format!(
                "no Debian package matches {} for kernel {}: is bookworm-backports enabled in /etc/apt/sources.list?",
                self.pattern, self.name
            ),
        })
    }

    /// How apt is called for this kernel's package: the machine's own
    /// configuration, or one of its own for a foreign suite.
    fn apt(&self) -> Result<Apt> {
        match self.suite {
            None => Ok(Apt::machine()),
            Some(suite) => Apt::for_suite(suite),
        }
    }

    /// How to get this kernel's package into the apt lists.
    pub fn update_hint(&self) -> &'static str {
        match self.suite {
            // Its own lists, downloaded by the fetch itself.
            Some(_) => "--fetch",
            None => "apt-get update",
        }
    }

    /// The newest matching package in the current apt lists (no update).
    pub fn newest_known(&self) -> Result<Option<String>> {
        let apt = self.apt()?;
        let out = Command::new("apt-cache")
            .args(&apt.options)
            .args(["search", "--names-only", self.pattern])
            .output()
            .context("running apt-cache: fetching kernels needs a Debian system with apt")?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        // Newest version last; of a signed/unsigned pair, the unsigned one.
        names.sort_by(|a, b| {
            let base = |n: &str| n.trim_end_matches("-unsigned").to_string();
            version_cmp(&base(a), &base(b)).then(a.ends_with("-unsigned").cmp(&b.ends_with("-unsigned")))
        });
        Ok(names.pop())
    }
}

/// Compares like `sort -V`: runs of digits by value, everything else by byte.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The first entry of `dir` named `prefix…suffix`.
fn find_entry(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix)))
}

/// Copies `from` to `to` through a temporary name so `to` is whole or absent.
pub fn install(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("new");
    fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(())
}

/// The archive a foreign suite is fetched from when the machine's sources
/// name none.
const DEFAULT_ARCHIVE: &str = "http://deb.debian.org/debian";
/// The machine's deb822 sources, whose Debian archive foreign suites share.
const MACHINE_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
/// The key Debian signs every release's archive with.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// An apt configuration: the `-o` options that select it, empty for the
/// machine's own.
struct Apt {
    options: Vec<String>,
    /// The archive a foreign suite comes from (for error messages).
    archive: String,
}

impl Apt {
    fn machine() -> Self {
        Apt { options: Vec::new(), archive: String::new() }
    }

    /// A configuration listing only `suite` (component main) of the machine's
    /// Debian archive, with its own source list, package lists and cache under
    /// the kernel cache: nothing of the machine's apt state is read or changed.
    fn for_suite(suite: &str) -> Result<Self> {
        let archive = machine_archive().unwrap_or_else(|| DEFAULT_ARCHIVE.to_string());
        let dir = cache_dir().join("apt").join(suite);
        let (lists, cache) = (dir.join("lists"), dir.join("cache"));
        for d in [lists.join("partial"), cache.join("archives/partial")] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let list = dir.join("sources.list");
        let line = format!("deb [signed-by={DEBIAN_KEYRING}] {archive} {suite} main\n");
        if fs::read_to_string(&list).ok().as_deref() != Some(line.as_str()) {
            fs::write(&list, &line).with_context(|| format!("writing {}", list.display()))?;
        }
        let options = [
            format!("Dir::Etc::sourcelist={}", list.display()),
            // No sources.list.d: only the one list above.
            "Dir::Etc::sourceparts=-".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(Apt { options, archive })
    }

    fn update(&self) -> Result<()> {
        eprintln!("xtask: apt-get update");
        run(
            Command::new("apt-get").args(&self.options).args(["update", "-qq", "-o", "APT::Sandbox::User=root"]),
            "apt-get update (run xtask as root, or run apt-get update yourself)",
        )
    }

    fn download(&self, package: &str, dir: &Path) -> Result<bool> {
        let status = Command::new("apt-get")
            .args(&self.options)
            // As root, apt would otherwise fetch as the `_apt` user and warn that
            // it cannot write to our cache directory.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", package])
            .current_dir(dir)
            .status()
            .context("running apt-get download")?;
        Ok(status.success())
    }
}

/// The Debian archive of the machine's deb822 sources (the first `URIs:`
/// ending in `/debian`), if it has one.
fn machine_archive() -> Option<String> {
    let text = fs::read_to_string(MACHINE_SOURCES).ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .map(|u| u.trim_end_matches('/').to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_sort_v() {
        assert_eq!(version_cmp("linux-image-6.1.0-9-cloud-amd64", "linux-image-6.1.0-47-cloud-amd64"), Ordering::Less);
        assert_eq!(version_cmp("linux-image-6.12.117+deb12-x", "linux-image-6.12.99+deb12-x"), Ordering::Greater);
        assert_eq!(version_cmp("a-1.0", "a-1.0"), Ordering::Equal);
        assert_eq!(version_cmp("a-1.0", "a-1.0.1"), Ordering::Less);
    }

    #[test]
    fn unknown_kernel_lists_choices() {
        let e = select("5.4").err().unwrap().to_string();
        assert!(e.contains("6.1, 6.12, 6.1-rt, 5.10"), "{e}");
        assert_eq!(select("all").unwrap().len(), MATRIX.iter().filter(|k| k.in_all).count());
        assert_eq!(select("5.10").unwrap()[0].name, "5.10");
    }
}
