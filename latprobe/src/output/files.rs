//! Output files (`-o out.svg`, `--folded`), written whole or not at all.
//!
//! The file is opened before any probe is attached, so a bad path fails in
//! the first second, not after a ten-minute capture. It is created unnamed
//! (`O_TMPFILE`) in the target's directory, given a name only once complete,
//! and renamed over the target: a reader never sees half a file, an
//! interrupted run leaves nothing behind (even `kill -9`), and an existing
//! symlink at the target is replaced, never followed — latprobe runs as
//! root. Where the filesystem has no `O_TMPFILE`, a hidden temporary name
//! created with `O_EXCL|O_NOFOLLOW` is removed on every exit but `kill -9`.
//!
//! A character device or a FIFO named as the target (`/dev/null`, a named
//! pipe) is a stream, not a file to replace: it is written in place.
//! Renaming over it would replace the device node itself.
//!
//! Output written as a run goes (`--hdr-log`, through `io::Write`) goes
//! straight into the unnamed file, so memory stays flat however long the
//! run; for a stream it is held (up to [`MAX_STREAM_PENDING`]) and written
//! at commit, so a stalled reader can never block the run.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// An output file being prepared; [`OutputFile::commit`] gives it its name.
pub struct OutputFile {
    /// What the user asked for, for messages.
    path: PathBuf,
    file: File,
    /// Where the finished file is renamed to; None for a stream.
    place: Option<Place>,
    /// What a stream was given before commit.
    pending: Vec<u8>,
}

/// Most bytes held for a stream until commit.
pub const MAX_STREAM_PENDING: usize = 64 << 20;

/// The directory and name a finished file is renamed to.
struct Place {
    dir: OwnedFd,
    name: CString,
    /// The hidden name of the fallback; None for an unnamed file.
    temp_name: Option<CString>,
}

fn cstring(bytes: &[u8], path: &Path) -> Result<CString> {
    CString::new(bytes).with_context(|| format!("{}: a path cannot contain a NUL byte", path.display()))
}

fn last_error(what: impl FnOnce() -> String) -> anyhow::Error {
    anyhow::Error::new(io::Error::last_os_error()).context(what())
}

impl OutputFile {
    /// Opens the directory of `path` and an unnamed file in it. Fails with
    /// one line when the directory is missing or not writable, or `path` is
    /// a directory.
    pub fn create(path: &Path) -> Result<Self> {
        let Some(name) = path.file_name() else {
            bail!("{}: not a file name", path.display());
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if path.is_dir() {
            bail!("{}: is a directory; name a file, e.g. {}", path.display(), path.join("out.svg").display());
        }
        if let Some(file) = open_stream(path)? {
            return Ok(Self { path: path.to_path_buf(), file, place: None, pending: Vec::new() });
        }
        let dir_c = cstring(parent.as_os_str().as_bytes(), path)?;
        // SAFETY: a NUL-terminated path; the returned fd is checked below.
        let dir = unsafe { libc::open(dir_c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if dir < 0 {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::ENOENT) {
                format!("directory {} does not exist: create it first, or write elsewhere", parent.display())
            } else {
                format!("cannot use directory {}: {e}", parent.display())
            };
            bail!("{}: {hint}", path.display());
        }
        // SAFETY: open just returned this fd; we own it.
        let dir = unsafe { OwnedFd::from_raw_fd(dir) };
        let name = cstring(name.as_bytes(), path)?;
        let (file, temp_name) = open_unnamed(&dir, path).or_else(|_| open_hidden(&dir, path, &name))?;
        give_to_invoking_user(&file);
        Ok(Self { path: path.to_path_buf(), file, place: Some(Place { dir, name, temp_name }), pending: Vec::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes`, makes them durable, and renames the file into place.
    pub fn commit(mut self, bytes: &[u8]) -> Result<()> {
        let path = self.path.clone();
        let pending = std::mem::take(&mut self.pending);
        self.file.write_all(&pending).with_context(|| format!("writing {}", path.display()))?;
        self.file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
        let Some(place) = self.place.as_mut() else {
            return Ok(());
        };
        self.file.sync_all().with_context(|| format!("writing {}", path.display()))?;
        let temp = match place.temp_name.take() {
            Some(t) => t,
            None => place.link_unnamed(&self.file, &path)?,
        };
        // SAFETY: both names are NUL-terminated and relative to our dir fd.
        let renamed =
            unsafe { libc::renameat(place.dir.as_raw_fd(), temp.as_ptr(), place.dir.as_raw_fd(), place.name.as_ptr()) };
        if renamed != 0 {
            let e = last_error(|| format!("renaming the finished file to {}", path.display()));
            // SAFETY: as above; the temporary name is ours to remove.
            unsafe { libc::unlinkat(place.dir.as_raw_fd(), temp.as_ptr(), 0) };
            return Err(e);
        }
        Ok(())
    }
}

/// Writes before commit: into the unnamed file, or held for a stream.
impl Write for OutputFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.place.is_some() {
            return self.file.write(bytes);
        }
        if self.pending.len() + bytes.len() > MAX_STREAM_PENDING {
            return Err(io::Error::other(format!("over {} MiB held for a stream", MAX_STREAM_PENDING >> 20)));
        }
        self.pending.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Place {
    /// Gives the unnamed `file` a hidden temporary name next to the target.
    fn link_unnamed(&self, file: &File, path: &Path) -> Result<CString> {
        let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL in a number");
        for attempt in 0..100u32 {
            let temp = hidden_name(&self.name, attempt);
            // SAFETY: NUL-terminated names; linkat follows the /proc magic link
            // to our unnamed inode.
            let linked = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    source.as_ptr(),
                    self.dir.as_raw_fd(),
                    temp.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if linked == 0 {
                return Ok(temp);
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(last_error(|| format!("naming the finished file {}", path.display())));
            }
        }
        bail!("naming the finished file {}: no free temporary name", path.display())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(temp) = &self.temp_name {
            // SAFETY: a NUL-terminated name relative to our dir fd, created by us.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), temp.as_ptr(), 0) };
        }
    }
}

/// The target itself when it is a character device or a FIFO (not through
/// a symlink): opened now, without blocking on a FIFO with no reader.
fn open_stream(path: &Path) -> Result<Option<File>> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(None) };
    let kind = meta.file_type();
    if !kind.is_char_device() && !kind.is_fifo() {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .with_context(|| {
            let why = if kind.is_fifo() { " (a FIFO needs its reader started first)" } else { "" };
            format!("cannot open {}{why}", path.display())
        })?;
    // Written whole at the end: blocking writes from here on.
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(Some(file))
}

/// `.NAME.latprobe-PID-N`: hidden, and unique to this run.
fn hidden_name(name: &CString, attempt: u32) -> CString {
    let mut bytes = b".".to_vec();
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(format!(".latprobe-{}-{attempt}", std::process::id()).as_bytes());
    CString::new(bytes).expect("built from NUL-free parts")
}

fn open_unnamed(dir: &OwnedFd, path: &Path) -> Result<(File, Option<CString>)> {
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: a NUL-terminated name relative to a directory fd we own.
    let fd = unsafe {
        libc::openat(dir.as_raw_fd(), dot.as_ptr(), libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC, 0o644)
    };
    if fd < 0 {
        return Err(last_error(|| format!("creating {}", path.display())));
    }
    // SAFETY: openat just returned this fd; we own it.
    Ok((unsafe { File::from_raw_fd(fd) }, None))
}

fn open_hidden(dir: &OwnedFd, path: &Path, name: &CString) -> Result<(File, Option<CString>)> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    for attempt in 0..100u32 {
        let temp = hidden_name(name, attempt);
        // SAFETY: a NUL-terminated name relative to a directory fd we own.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), temp.as_ptr(), flags, 0o644) };
        if fd >= 0 {
            // SAFETY: openat just returned this fd; we own it.
            return Ok((unsafe { File::from_raw_fd(fd) }, Some(temp)));
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(last_error(|| format!("cannot create {}", path.display())));
        }
    }
    bail!("cannot create {}: no free temporary name", path.display())
}

/// Under sudo, the file belongs to the user who ran sudo, so they can
/// move or delete it without root (best effort).
fn give_to_invoking_user(file: &File) {
    if let Some((uid, gid)) = crate::run::child::invoking_user() {
        // SAFETY: fchown on an fd we own.
        unsafe { libc::fchown(file.as_raw_fd(), uid, gid) };
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsStr, fs, os::unix::fs::symlink};

    use super::*;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("latprobe-files-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn file_appears_only_when_committed() {
        let dir = scratch("commit");
        let path = dir.join("out.svg");
        let file = OutputFile::create(&path).unwrap();
        assert!(!path.exists(), "nothing is visible before commit");
        file.commit(b"<svg/>").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"<svg/>");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left behind");
    }

    #[test]
    fn written_as_it_goes_appears_whole_at_commit() {
        let dir = scratch("append");
        let path = dir.join("run.hlog");
        let mut file = OutputFile::create(&path).unwrap();
        file.write_all(b"first\n").unwrap();
        file.write_all(b"second\n").unwrap();
        assert!(!path.exists(), "nothing is visible before commit");
        file.commit(b"last\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first\nsecond\nlast\n");
        let mut null = OutputFile::create(Path::new("/dev/null")).unwrap();
        null.write_all(b"held").unwrap();
        assert!(null.write_all(&vec![0; MAX_STREAM_PENDING]).is_err(), "a stream holds a bounded amount");
        null.commit(b"").unwrap();
    }

    #[test]
    fn dropped_without_commit_leaves_nothing() {
        let dir = scratch("drop");
        let path = dir.join("out.svg");
        fs::write(&path, b"old").unwrap();
        drop(OutputFile::create(&path).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"old", "an interrupted run keeps the old file whole");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_fails_at_once_with_the_fix() {
        let e = OutputFile::create(Path::new("/nonexistent/dir/out.svg")).err().unwrap();
        let text = format!("{e:#}");
        assert!(text.contains("directory /nonexistent/dir does not exist"), "{text}");
        let e = OutputFile::create(&std::env::temp_dir()).err().unwrap();
        assert!(format!("{e:#}").contains("is a directory"), "{e:#}");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = scratch("symlink");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let path = dir.join("out.svg");
        symlink(&victim, &path).unwrap();
        OutputFile::create(&path).unwrap().commit(b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "the symlink's target is untouched");
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_device_is_written_in_place_never_replaced() {
        use std::os::unix::fs::FileTypeExt;
        OutputFile::create(Path::new("/dev/null")).unwrap().commit(b"gone").unwrap();
        assert!(fs::symlink_metadata("/dev/null").unwrap().file_type().is_char_device(), "/dev/null is still a device");
        let dir = scratch("fifo");
        let fifo = dir.join("pipe");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = OutputFile::create(&fifo).err().expect("no reader: fails at once, does not block");
        assert!(format!("{e:#}").contains("needs its reader"), "{e:#}");
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is left as it was");
    }

    #[test]
    fn hidden_fallback_is_removed_on_drop() {
        let dir = scratch("hidden");
        let path = dir.join("out.folded");
        let dir_fd = File::open(&dir).unwrap();
        let name = CString::new("out.folded").unwrap();
        let (_, temp) = open_hidden(&OwnedFd::from(dir_fd.try_clone().unwrap()), &path, &name).unwrap();
        let temp = temp.unwrap();
        assert!(dir.join(OsStr::from_bytes(temp.as_bytes())).exists());
        drop(Place { dir: OwnedFd::from(dir_fd), name, temp_name: Some(temp) });
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }
}
