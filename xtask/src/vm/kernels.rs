//! The kernel matrix: which Debian kernel packages latprobe is tested on,
//! resolved to the newest available version and cached after one download.

use std::{
    env,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// One kernel of the matrix.
pub struct Kernel {
    /// Short stable name users type: `6.1`, `6.12`, `6.1-rt`.
    pub name: &'static str,
    /// `apt-cache search --names-only` pattern of its package.
    pattern: &'static str,
    pub description: &'static str,
}

pub const MATRIX: &[Kernel] = &[
    Kernel {
        name: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
        description: "Debian 12 cloud kernel",
    },
    Kernel {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
        description: "Debian 12 backports cloud kernel",
    },
    Kernel {
        name: "6.1-rt",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-rt-amd64-unsigned$",
        description: "Debian 12 PREEMPT_RT kernel",
    },
];

/// Kernels named by `--kernel NAME|all`.
pub fn select(name: &str) -> Result<Vec<&'static Kernel>> {
    if name == "all" {
        return Ok(MATRIX.iter().collect());
    }
    match MATRIX.iter().find(|k| k.name == name) {
        Some(k) => Ok(vec![k]),
        None => {
            let names: Vec<&str> = MATRIX.iter().map(|k| k.name).collect();
            bail!("unknown kernel {name:?}: choose one of {} or all", names.join(", "))
        }
    }
}

/// Where kernels and packages are cached (`LATPROBE_VM_CACHE` or target/vm).
pub fn cache_dir() -> PathBuf {
    env::var_os("LATPROBE_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/vm"))
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

    /// The package it was extracted from, if cached.
    pub fn cached_package(&self) -> Option<String> {
        fs::read_to_string(self.dir().join("package")).ok().map(|s| s.trim().to_string())
    }

    /// Downloads and extracts the kernel unless cached; returns its vmlinuz.
    pub fn fetch(&self) -> Result<PathBuf> {
        if self.vmlinuz().is_file() && self.cached_package().is_some() {
            return Ok(self.vmlinuz());
        }
        let package = self.resolve()?;
        eprintln!("xtask: fetching {package} for kernel {}", self.name);
        let debs = cache_dir().join("debs");
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        if !download(&package, &debs)? {
            run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
            if !download(&package, &debs)? {
                bail!("apt-get download {package} failed: check network access to the Debian mirror");
            }
        }
        let deb = fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}_"))))
            .with_context(|| format!("downloaded {package} but found no .deb in {}", debs.display()))?;
        let extract = cache_dir().join("extract").join(self.name);
        let _ = fs::remove_dir_all(&extract);
        fs::create_dir_all(&extract)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&extract), "dpkg -x")?;
        let boot = extract.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("{} has no boot/ directory", deb.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
            .with_context(|| format!("no vmlinuz in {}", deb.display()))?;
        fs::create_dir_all(self.dir())?;
        fs::copy(&vmlinuz, self.vmlinuz())?;
        fs::write(self.dir().join("package"), &package)?;
        // Modules are not needed (everything latprobe uses is built in) and big.
        let _ = fs::remove_dir_all(&extract);
        let _ = fs::remove_file(&deb);
        Ok(self.vmlinuz())
    }

    /// The newest package matching this kernel's pattern.
    fn resolve(&self) -> Result<String> {
        let search = |update: bool| -> Result<Vec<String>> {
            if update {
                run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
            }
            let out = Command::new("apt-cache")
                .args(["search", "--names-only", self.pattern])
                .output()
                .context("running apt-cache: this needs a Debian system")?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect())
        };
        let mut names = search(false)?;
        if names.is_empty() {
            names = search(true)?;
        }
        names.sort_by_key(|n| version_key(n));
        names.pop().with_context(|| {
            format!("no Debian package matches {} for kernel {}: is bookworm-backports or security enabled?", self.pattern, self.name)
        })
    }
}

/// Numeric chunks of a package name, so 6.1.0-47 sorts after 6.1.0-9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect()
}

fn download(package: &str, dir: &Path) -> Result<bool> {
    let status = Command::new("apt-get")
        .args(["download", "-qq", package])
        .current_dir(dir)
        .status()
        .context("running apt-get download")?;
    Ok(status.success())
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
    fn newest_package_sorts_last() {
        let mut names = vec![
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
            "linux-image-6.1.0-42-cloud-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-47-cloud-amd64-unsigned"));
    }

    #[test]
    fn unknown_kernel_lists_choices() {
        let e = select("5.4").err().unwrap().to_string();
        assert!(e.contains("6.1, 6.12, 6.1-rt"), "{e}");
        assert_eq!(select("all").unwrap().len(), 3);
    }
}
