//! User-space symbols: which function of which mapped file holds an address
//! of a process, from /proc/PID/maps and the files' ELF symbol tables.
//!
//! This module owns everything that touches other processes' files, which
//! their (possibly hostile) owners control while we run as root:
//! - maps are read once per process (`remember`) and again on request
//!   (`refresh`, after an exec), bounded in size; a process that exits before
//!   the end of a run keeps its last mappings and is still symbolized;
//! - a mapped file is opened through /proc/PID/map_files (the mapped inode
//!   itself), else /proc/PID/root/PATH, and used only if it is a regular file
//!   of bounded size with the inode /proc/PID/maps shows: never by a path a
//!   user can swap for a FIFO, a device or a symlink;
//! - each ELF file is parsed once, through a short-lived mmap, into owned
//!   tables cached by (device, inode), with bounded cache sizes;
//! - names returned are made printable (see `output::text::folded_frame`).

use std::{
    collections::{hash_map::Entry, HashMap},
    ffi::c_void,
    fs::{File, Metadata, OpenOptions},
    io::Read,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    ptr::{self, NonNull},
    time::{Duration, Instant},
};

use object::{Object, ObjectSegment, ObjectSymbol};

use crate::output::text::folded_frame;

/// Largest mapped file we parse: bigger ones print as `[basename]`.
pub const MAX_ELF_BYTES: u64 = 512 << 20;
/// Most processes whose mappings are kept; later ones print `[unknown]`.
pub const MAX_PROCESSES: usize = 4096;
/// Most files kept parsed; later ones print as `[basename]`.
pub const MAX_FILES: usize = 1024;
/// Most bytes of one /proc/PID/maps read: a process with more mappings than
/// that (tens of thousands) loses the ones at high addresses.
const MAX_MAPS_BYTES: u64 = 4 << 20;
/// Total bytes of symbol names kept per file: names in a crafted file can all
/// point at the same long string, so the file size alone does not bound them.
const MAX_NAME_BYTES_PER_FILE: usize = 64 << 20;

const UNKNOWN: &str = "[unknown]";
const DELETED_SUFFIX: &str = " (deleted)";

/// One executable, file-backed mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// Device (major, minor) of the mapped inode, as maps shows it.
    pub dev: (u32, u32),
    pub inode: u64,
    /// Path for display, without the " (deleted)" mark; never trusted to
    /// name the mapped file (see [`open_verified`]).
    pub path: PathBuf,
    pub deleted: bool,
}

impl Mapping {
    /// Offset in the mapped file of `addr`, which lies in this mapping.
    pub fn file_offset_of(&self, addr: u64) -> u64 {
        (addr - self.start).wrapping_add(self.file_offset)
    }

    /// The mapping's entry in /proc/PID/map_files. The kernel names those
    /// entries "%lx-%lx", without the zero padding maps uses below 2^32.
    fn map_files_path(&self, tgid: u32) -> PathBuf {
        PathBuf::from(format!("/proc/{tgid}/map_files/{:x}-{:x}", self.start, self.end))
    }

    /// The mapping's path as seen from the process's root directory.
    fn root_path(&self, tgid: u32) -> PathBuf {
        let relative = self.path.strip_prefix("/").unwrap_or(&self.path);
        Path::new(&format!("/proc/{tgid}/root")).join(relative)
    }

    /// `[basename]` of the mapped file, printable, or `[unknown]`.
    fn bracketed_basename(&self) -> String {
        match self.path.file_name() {
            Some(name) => format!("[{}]", folded_frame(&name.to_string_lossy())),
            None => UNKNOWN.into(),
        }
    }
}

/// Executable, file-backed mappings in /proc/PID/maps text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// One maps line, if it is an executable mapping of a file. The line is
/// "START-END PERMS OFFSET MAJOR:MINOR INODE", spaces, then the path to the
/// end of the line: paths may hold spaces, so it is not split further.
fn parse_maps_line(line: &str) -> Option<Mapping> {
    let (range, rest) = next_field(line)?;
    let (perms, rest) = next_field(rest)?;
    let (offset, rest) = next_field(rest)?;
    let (dev, rest) = next_field(rest)?;
    let (inode, rest) = next_field(rest)?;
    let path = rest.trim_start_matches(' ');
    if !perms.contains('x') || !path.starts_with('/') {
        return None;
    }
    let (path, deleted) = match path.strip_suffix(DELETED_SUFFIX) {
        Some(path) => (path, true),
        None => (path, false),
    };
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
        inode: inode.parse().ok()?,
        path: PathBuf::from(path),
        deleted,
    })
}

/// The first space-separated field of `s` and what follows it.
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    let end = s.find(' ').unwrap_or(s.len());
    (end > 0).then(|| s.split_at(end))
}

/// The executable mappings of a live process, or None if it is gone.
fn read_maps(tgid: u32) -> Option<Vec<Mapping>> {
    let file = File::open(format!("/proc/{tgid}/maps")).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_MAPS_BYTES).read_to_end(&mut bytes).ok()?;
    // A read cut by the bound ends mid-line: drop that partial line.
    if bytes.len() as u64 == MAX_MAPS_BYTES {
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(complete);
    }
    // Non-UTF-8 path bytes only affect display and the by-path fallback.
    Some(parse_maps(&String::from_utf8_lossy(&bytes)))
}

/// Opens the file of a mapping of process `tgid` for reading, if it passes
/// [`open_verified`]. /proc/PID/map_files gives the mapped inode itself
/// (deleted, or in another mount namespace) but needs CAP_SYS_ADMIN; without
/// it, the path under the process's root is tried for files not deleted,
/// device included.
fn open_mapped_file(tgid: u32, mapping: &Mapping) -> Option<File> {
    let map_file = mapping.map_files_path(tgid);
    if open_path_only(&map_file).is_ok() {
        // The entry is the mapped inode: no device check, because stat's
        // st_dev differs from the maps device on btrfs subvolumes (maps shows
        // the superblock's), the same mismatch CRIU works around.
        return open_verified(&map_file, mapping.inode, None);
    }
    // A deleted file's path now names another file or none: not worth opening.
    if mapping.deleted {
        return None;
    }
    open_verified(&mapping.root_path(tgid), mapping.inode, Some(mapping.dev))
}

/// Opens `path` for reading only if it is a regular file of at most
/// [`MAX_ELF_BYTES`] with inode `expected_ino` (and device `expected_dev`,
/// as (major, minor), when given). Anything else (FIFO, device, directory,
/// another file put at the path) gives None, without blocking and without
/// opening it for reading: the path is first opened with O_PATH, which runs
/// no driver code (a FIFO would block, some devices act on open), checked
/// with fstat, and only then reopened through /proc/self/fd.
pub fn open_verified(path: &Path, expected_ino: u64, expected_dev: Option<(u32, u32)>) -> Option<File> {
    let handle = open_path_only(path).ok()?;
    let checked = handle.metadata().ok()?;
    if !is_expected_file(&checked, expected_ino, expected_dev) {
        return None;
    }
    let file = reopen_for_reading(&handle)?;
    let opened = file.metadata().ok()?;
    let same = opened.dev() == checked.dev() && opened.ino() == checked.ino();
    (same && is_expected_file(&opened, expected_ino, expected_dev)).then_some(file)
}

/// An O_PATH handle: names the inode `path` leads to, without opening it.
fn open_path_only(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_CLOEXEC).open(path)
}

/// Opens the inode behind an O_PATH handle for reading. Non-blocking and
/// no controlling terminal, in case it is not the regular file fstat showed.
fn reopen_for_reading(handle: &File) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .ok()
}

/// Whether fstat shows the regular, bounded file a maps line describes.
fn is_expected_file(meta: &Metadata, expected_ino: u64, expected_dev: Option<(u32, u32)>) -> bool {
    let dev_matches = expected_dev.is_none_or(|dev| dev == (libc::major(meta.dev()), libc::minor(meta.dev())));
    meta.file_type().is_file() && meta.ino() == expected_ino && dev_matches && meta.len() <= MAX_ELF_BYTES
}

/// A read-only private mapping of a whole file, unmapped on drop.
///
/// Reading a mapped file that someone truncates meanwhile raises SIGBUS,
/// which kills us: accepted for regular files, kept as short as possible by
/// mapping only while parsing. Someone writing the file meanwhile can change
/// bytes under the parser, which treats them as untrusted anyway.
struct ReadOnlyMap {
    ptr: NonNull<c_void>,
    len: usize,
}

impl ReadOnlyMap {
    /// Maps the first `len` bytes of `file`; None if empty or mmap fails.
    fn new(file: &File, len: u64) -> Option<Self> {
        let len = usize::try_from(len).ok().filter(|&len| len > 0)?;
        // SAFETY: a new mapping at an address the kernel picks (null hint,
        // no MAP_FIXED) overlaps no existing Rust object; the fd is open for
        // the duration of the call; failure is checked below.
        let ptr = unsafe { libc::mmap(ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(ptr).map(|ptr| Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable until drop, which the
        // borrow of self outlives; we never write to it (see the type's doc
        // for what other writers and truncation can do).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for ReadOnlyMap {
    fn drop(&mut self) {
        // SAFETY: ptr and len are exactly what mmap returned and took, and
        // no borrow of the bytes outlives self.
        unsafe {
            libc::munmap(self.ptr.as_ptr(), self.len);
        }
    }
}

/// Function symbols of one ELF file, and how file offsets map to addresses.
struct ElfSymbols {
    /// (address, size, printable name), sorted by address.
    symbols: Vec<(u64, u64, String)>,
    /// (file offset, virtual address, size) of loadable segments.
    segments: Vec<(u64, u64, u64)>,
}

impl ElfSymbols {
    /// Parses the first `len` bytes of `file`, mapped only meanwhile.
    fn from_file(file: &File, len: u64) -> Option<Self> {
        let map = ReadOnlyMap::new(file, len)?;
        Self::parse(map.bytes())
    }

    fn parse(data: &[u8]) -> Option<Self> {
        let file = object::File::parse(data).ok()?;
        let mut name_budget = MAX_NAME_BYTES_PER_FILE;
        let mut symbols: Vec<(u64, u64, String)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = folded_frame(&String::from_utf8_lossy(s.name_bytes().ok()?)).into_owned();
                name_budget = name_budget.checked_sub(name.len())?;
                Some((s.address(), s.size(), name))
            })
            .collect();
        symbols.sort_unstable();
        symbols.dedup_by_key(|s| s.0);
        let segments = file.segments().map(|seg| (seg.file_range().0, seg.address(), seg.file_range().1)).collect();
        Some(Self { symbols, segments })
    }

    fn lookup(&self, file_offset: u64) -> Option<&str> {
        let vaddr = self
            .segments
            .iter()
            .find(|(off, _, size)| file_offset.checked_sub(*off).is_some_and(|delta| delta < *size))
            .map(|(off, addr, _)| (file_offset - off).wrapping_add(*addr))?;
        let i = self.symbols.partition_point(|s| s.0 <= vaddr).checked_sub(1)?;
        let (addr, size, name) = &self.symbols[i];
        (*size == 0 || vaddr - addr < *size).then_some(name.as_str())
    }
}

/// Identity of a parsed file: (st_dev, st_ino) from fstat.
type FileKey = (u64, u64);

/// A parsed file (None: not ELF), with what tells a reused inode from it.
struct CachedFile {
    /// (size, mtime seconds, mtime nanoseconds) when parsed.
    stamp: (u64, i64, i64),
    symbols: Option<ElfSymbols>,
}

impl CachedFile {
    fn parse(file: &File, meta: &Metadata) -> Self {
        Self { stamp: stamp_of(meta), symbols: ElfSymbols::from_file(file, meta.len()) }
    }
}

fn stamp_of(meta: &Metadata) -> (u64, i64, i64) {
    (meta.len(), meta.mtime(), meta.mtime_nsec())
}

/// Parsed files, at most [`MAX_FILES`].
#[derive(Default)]
struct FileCache {
    files: HashMap<FileKey, CachedFile>,
}

impl FileCache {
    /// Opens and (unless cached) parses the file of a mapping; None if it
    /// cannot be opened safely or the cache is full.
    fn load(&mut self, tgid: u32, mapping: &Mapping) -> Option<FileKey> {
        let file = open_mapped_file(tgid, mapping)?;
        let meta = file.metadata().ok()?;
        let key = (meta.dev(), meta.ino());
        let full = self.files.len() >= MAX_FILES;
        match self.files.entry(key) {
            Entry::Occupied(mut cached) if cached.get().stamp != stamp_of(&meta) => {
                cached.insert(CachedFile::parse(&file, &meta));
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(_) if full => return None,
            Entry::Vacant(slot) => {
                slot.insert(CachedFile::parse(&file, &meta));
            }
        }
        Some(key)
    }

    fn lookup(&self, key: FileKey, file_offset: u64) -> Option<&str> {
        self.files.get(&key)?.symbols.as_ref()?.lookup(file_offset)
    }
}

/// What we know of a mapping's file: not opened yet, unusable, or cached.
#[derive(Clone, Copy)]
enum FileState {
    Unopened,
    Unusable,
    Cached(FileKey),
}

/// The executable mappings of one process, each with its file's state.
struct Process {
    mappings: Vec<(Mapping, FileState)>,
    /// When the mappings were last read (or found unchanged).
    read_at: Instant,
}

impl Process {
    fn new(mappings: Vec<Mapping>) -> Self {
        Self { mappings: mappings.into_iter().map(|m| (m, FileState::Unopened)).collect(), read_at: Instant::now() }
    }

    fn has_mappings(&self, mappings: &[Mapping]) -> bool {
        self.mappings.len() == mappings.len() && self.mappings.iter().zip(mappings).all(|((a, _), b)| a == b)
    }
}

/// How often a known process's mappings may be read again by `recheck`.
const RECHECK_EVERY: Duration = Duration::from_millis(50);

/// Symbolizes user addresses of the processes it was told about.
#[derive(Default)]
pub struct UserSymbols {
    processes: HashMap<u32, Process>,
    files: FileCache,
}

impl UserSymbols {
    /// Re-reads a process's mappings, e.g. after it exec'd. If it is gone,
    /// the mappings already read are kept, so its samples still resolve.
    /// Beyond [`MAX_PROCESSES`] known processes, new ones are not added.
    pub fn refresh(&mut self, tgid: u32) {
        if !self.processes.contains_key(&tgid) && self.processes.len() >= MAX_PROCESSES {
            return;
        }
        // No executable mapping means gone, exiting, a zombie or mid-exec
        // (or a kernel thread): keep what we had, and let `recheck` retry.
        if let Some(mappings) = read_maps(tgid).filter(|m| !m.is_empty()) {
            self.install(tgid, mappings);
        }
    }

    /// Reads a process's mappings again if they may have changed since:
    /// libraries are mapped after a process's first samples (the dynamic
    /// loader maps libc after exec, `dlopen` later still), and a frame in
    /// one missing from what was read would stay `[unknown]` once the
    /// process is gone. At most every [`RECHECK_EVERY`] per process; files
    /// are opened again only when the mappings did change.
    pub fn recheck(&mut self, tgid: u32) {
        let Some(process) = self.processes.get_mut(&tgid) else {
            return self.refresh(tgid);
        };
        if process.read_at.elapsed() < RECHECK_EVERY {
            return;
        }
        process.read_at = Instant::now();
        match read_maps(tgid).filter(|m| !m.is_empty()) {
            Some(mappings) if !process.has_mappings(&mappings) => self.install(tgid, mappings),
            _ => {}
        }
    }

    fn install(&mut self, tgid: u32, mappings: Vec<Mapping>) {
        let mut process = Process::new(mappings);
        // The files are opened now, through /proc/PID/map_files: when the
        // samples are symbolized the process may be gone, and its map_files
        // with it (parsed files are cached, so this is cheap for libraries
        // already seen).
        for (mapping, state) in &mut process.mappings {
            *state = self.files.load(tgid, mapping).map_or(FileState::Unusable, FileState::Cached);
        }
        self.processes.insert(tgid, process);
    }

    /// Drops a process's mappings (parsed files stay cached), e.g. when it
    /// exits, to make room under [`MAX_PROCESSES`].
    #[cfg_attr(not(test), expect(dead_code, reason = "no caller tracks exits yet"))]
    pub fn forget(&mut self, tgid: u32) {
        self.processes.remove(&tgid);
    }

    /// `function` for an address of process `tgid`, or `[file]` when the
    /// file has no symbol for it or cannot be read safely, or `[unknown]`.
    /// Names are printable (`output::text::folded_frame`).
    pub fn symbolize(&mut self, tgid: u32, addr: u64) -> String {
        let Some(process) = self.processes.get_mut(&tgid) else {
            return UNKNOWN.into();
        };
        let Some((mapping, state)) = process.mappings.iter_mut().find(|(m, _)| (m.start..m.end).contains(&addr)) else {
            return UNKNOWN.into();
        };
        if let FileState::Unopened = state {
            *state = self.files.load(tgid, mapping).map_or(FileState::Unusable, FileState::Cached);
        }
        let name = match *state {
            FileState::Cached(key) => self.files.lookup(key, mapping.file_offset_of(addr)),
            FileState::Unopened | FileState::Unusable => None,
        };
        name.map_or_else(|| mapping.bracketed_basename(), str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CString,
        os::unix::ffi::OsStrExt,
        sync::mpsc,
        thread,
        time::{Duration, Instant, SystemTime, UNIX_EPOCH},
    };

    use super::*;

    #[test]
    fn keeps_only_executable_file_mappings() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 08:01 123 /usr/bin/x
55d0c0001000-55d0c0005000 r-xp 00001000 08:01 123 /usr/bin/x
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]
";
        assert_eq!(
            parse_maps(maps),
            vec![Mapping {
                start: 0x55d0c0001000,
                end: 0x55d0c0005000,
                file_offset: 0x1000,
                dev: (8, 1),
                inode: 123,
                path: "/usr/bin/x".into(),
                deleted: false,
            }]
        );
    }

    #[test]
    fn parses_paths_with_spaces_and_deleted_mark() {
        let maps = "7f1c2a400000-7f1c2a5c1000 r-xp 00028000 fd:0a 1234567                    /tmp/my libs/lib x.so (deleted)\n";
        let mappings = parse_maps(maps);
        assert_eq!(mappings.len(), 1);
        let m = &mappings[0];
        assert_eq!(m.path, Path::new("/tmp/my libs/lib x.so"));
        assert!(m.deleted);
        assert_eq!((m.dev, m.inode), ((0xfd, 0x0a), 1234567));
        assert_eq!((m.start, m.end, m.file_offset), (0x7f1c2a400000, 0x7f1c2a5c1000, 0x28000));
        assert_eq!(m.bracketed_basename(), "[lib x.so]");
    }

    #[test]
    fn map_files_name_has_no_zero_padding() {
        let m = parse_maps("00400000-00452000 r-xp 00000000 08:01 9 /bin/x\n").remove(0);
        assert_eq!(m.map_files_path(7), Path::new("/proc/7/map_files/400000-452000"));
        assert_eq!(m.root_path(7), Path::new("/proc/7/root/bin/x"));
    }

    #[test]
    fn symbolizes_this_test_binary() {
        let mut syms = UserSymbols::default();
        let me = std::process::id();
        syms.refresh(me);
        let addr = symbolizes_this_test_binary as *const () as u64;
        let name = syms.symbolize(me, addr);
        assert!(name.contains("symbolizes_this_test_binary"), "{name}");
        assert_eq!(syms.symbolize(me, 8), "[unknown]");
    }

    /// A unique path in the temp directory, removed on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(tag: &str) -> Self {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            Self(std::env::temp_dir().join(format!("latprobe-usyms-{}-{tag}-{nanos}", std::process::id())))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn mkfifo(path: &Path) {
        let c_path = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
        // SAFETY: c_path is a valid NUL-terminated string for the call.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
    }

    fn inode_of(path: &Path) -> (u64, (u32, u32)) {
        let meta = std::fs::metadata(path).expect("stat");
        (meta.ino(), (libc::major(meta.dev()), libc::minor(meta.dev())))
    }

    #[test]
    fn open_verified_accepts_only_the_expected_regular_file() {
        let regular = TempPath::new("regular");
        std::fs::write(&regular.0, b"not elf").expect("write");
        let (ino, dev) = inode_of(&regular.0);
        assert!(open_verified(&regular.0, ino, Some(dev)).is_some());
        assert!(open_verified(&regular.0, ino, None).is_some());
        assert!(open_verified(&regular.0, ino + 1, Some(dev)).is_none(), "wrong inode");
        assert!(open_verified(&regular.0, ino, Some((dev.0, dev.1 + 1))).is_none(), "wrong device");

        let (zero_ino, zero_dev) = inode_of(Path::new("/dev/zero"));
        assert!(open_verified(Path::new("/dev/zero"), zero_ino, Some(zero_dev)).is_none());
        let link = TempPath::new("zero-link");
        std::os::unix::fs::symlink("/dev/zero", &link.0).expect("symlink");
        assert!(open_verified(&link.0, zero_ino, None).is_none(), "symlink to /dev/zero");

        let fifo = TempPath::new("fifo");
        mkfifo(&fifo.0);
        let (fifo_ino, fifo_dev) = inode_of(&fifo.0);
        let started = Instant::now();
        assert!(open_verified(&fifo.0, fifo_ino, Some(fifo_dev)).is_none());
        assert!(started.elapsed() < Duration::from_secs(1));

        let huge = TempPath::new("huge");
        File::create(&huge.0).and_then(|f| f.set_len(MAX_ELF_BYTES + 1)).expect("sparse file");
        let (huge_ino, huge_dev) = inode_of(&huge.0);
        assert!(open_verified(&huge.0, huge_ino, Some(huge_dev)).is_none(), "over MAX_ELF_BYTES");
    }

    /// An executable mapping of a whole file in this process, unmapped on drop.
    struct ExecMapping {
        base: *mut c_void,
        len: usize,
    }

    impl ExecMapping {
        fn of(path: &Path) -> Self {
            let file = File::open(path).expect("open copy");
            let len = usize::try_from(file.metadata().expect("stat").len()).expect("size");
            // SAFETY: a new mapping at a kernel-chosen address overlaps no
            // Rust object; nothing here calls into it, it is only symbolized.
            let base = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            Self { base, len }
        }
    }

    impl Drop for ExecMapping {
        fn drop(&mut self) {
            // SAFETY: base and len are what mmap returned and took.
            unsafe {
                libc::munmap(self.base, self.len);
            }
        }
    }

    /// Maps a copy of this test binary; returns it and the address, in the
    /// copy, of the code at `addr` in the running binary.
    fn map_copy_of_self(copy: &TempPath, addr: u64) -> (ExecMapping, u64) {
        std::fs::copy("/proc/self/exe", &copy.0).expect("copy test binary");
        let me = std::process::id();
        let own = read_maps(me)
            .and_then(|maps| maps.into_iter().find(|m| (m.start..m.end).contains(&addr)))
            .expect("own mapping of the test binary");
        let mapping = ExecMapping::of(&copy.0);
        let in_copy = mapping.base as u64 + own.file_offset_of(addr);
        (mapping, in_copy)
    }

    fn can_open_own_map_files(mapping: &ExecMapping) -> bool {
        let me = std::process::id();
        let base = mapping.base as u64;
        read_maps(me)
            .and_then(|maps| maps.into_iter().find(|m| m.start == base))
            .is_some_and(|m| File::open(m.map_files_path(me)).is_ok())
    }

    #[test]
    fn fifo_at_deleted_path_does_not_hang() {
        let copy = TempPath::new("deleted-elf");
        let marker = fifo_at_deleted_path_does_not_hang as *const () as u64;
        let (mapping, addr) = map_copy_of_self(&copy, marker);
        std::fs::remove_file(&copy.0).expect("delete copy");
        mkfifo(&copy.0);

        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let me = std::process::id();
            let mut syms = UserSymbols::default();
            syms.refresh(me);
            let _ = tx.send(syms.symbolize(me, addr));
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).expect("symbolize hung on a FIFO");
        if can_open_own_map_files(&mapping) {
            assert!(name.contains("fifo_at_deleted_path_does_not_hang"), "{name}");
        }
    }

    #[test]
    fn refresh_rereads_maps() {
        let me = std::process::id();
        let mut syms = UserSymbols::default();
        syms.refresh(me);
        let copy = TempPath::new("later-elf");
        let marker = refresh_rereads_maps as *const () as u64;
        let (_mapping, addr) = map_copy_of_self(&copy, marker);
        // Compared by name, not with "[unknown]": a mapping another test
        // thread dropped meanwhile may have left its stale entry there.
        let named = |s: String| s.contains("refresh_rereads_maps");
        syms.refresh(me);
        assert!(named(syms.symbolize(me, addr)), "refresh missed a new mapping: {}", syms.symbolize(me, addr));
    }

    /// A library mapped after a process was first seen is named once a
    /// later sample makes latprobe look again (not more often than
    /// RECHECK_EVERY).
    #[test]
    fn recheck_picks_up_a_mapping_added_later() {
        let me = std::process::id();
        let mut syms = UserSymbols::default();
        syms.recheck(me);
        let copy = TempPath::new("recheck-elf");
        let marker = recheck_picks_up_a_mapping_added_later as *const () as u64;
        let (_mapping, addr) = map_copy_of_self(&copy, marker);
        let named = |s: String| s.contains("recheck_picks_up_a_mapping_added_later");
        std::thread::sleep(RECHECK_EVERY);
        syms.recheck(me);
        assert!(named(syms.symbolize(me, addr)), "recheck missed a new mapping: {}", syms.symbolize(me, addr));
    }

    fn is_zombie(pid: u32) -> bool {
        // The state follows the ")" closing the command name.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
    }

    #[test]
    fn refresh_keeps_mappings_of_a_gone_process() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let pid = child.id();
        let mut syms = UserSymbols::default();
        // Until the child has exec'd, its maps are ours or, mid-exec, empty.
        let own_exe = std::env::current_exe().expect("own exe");
        let deadline = Instant::now() + Duration::from_secs(5);
        let before = loop {
            syms.refresh(pid);
            let mappings = syms.processes.get(&pid).map_or(0, |p| p.mappings.len());
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
            if mappings > 0 && exe.is_ok_and(|exe| exe != own_exe) || Instant::now() > deadline {
                break mappings;
            }
            thread::sleep(Duration::from_millis(10));
        };
        assert!(before > 0, "no mappings read for sleep");
        child.kill().expect("kill");
        // A zombie's maps read as empty: not a reason to drop its mappings.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_zombie(pid) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        syms.refresh(pid);
        assert_eq!(syms.processes.get(&pid).map(|p| p.mappings.len()), Some(before), "zombie");
        child.wait().expect("wait");
        syms.refresh(pid);
        assert_eq!(syms.processes.get(&pid).map(|p| p.mappings.len()), Some(before), "reaped");
        syms.forget(pid);
        assert!(!syms.processes.contains_key(&pid));
    }

    #[test]
    fn stops_adding_processes_at_the_bound() {
        let mut syms = UserSymbols::default();
        for fake in (0..=u32::MAX).rev().take(MAX_PROCESSES) {
            syms.processes.insert(fake, Process::new(Vec::new()));
        }
        let me = std::process::id();
        syms.refresh(me);
        assert!(!syms.processes.contains_key(&me));
        syms.forget(u32::MAX);
        syms.refresh(me);
        assert!(syms.processes.contains_key(&me));
    }
}
