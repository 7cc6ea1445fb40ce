//! User-space symbols: which function of which mapped file holds an address
//! of a process, from /proc/PID/maps and the files' ELF symbol tables.
//! Maps are read while the process lives (a process that exits before the
//! end of a run is still symbolized); ELF files are parsed once each.

use std::{collections::HashMap, fs, path::PathBuf};

use object::{Object, ObjectSegment, ObjectSymbol};

/// One executable mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    pub path: PathBuf,
}

/// Executable, file-backed mappings in /proc/PID/maps text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let range = parts.next()?;
            let perms = parts.next()?;
            let offset = parts.next()?;
            let _dev = parts.next()?;
            let _inode = parts.next()?;
            let path = parts.next()?;
            if !perms.contains('x') || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                file_offset: u64::from_str_radix(offset, 16).ok()?,
                path: PathBuf::from(path),
            })
        })
        .collect()
}

/// Function symbols of one ELF file, and how file offsets map to addresses.
struct ElfSymbols {
    /// (address, size, name), sorted.
    symbols: Vec<(u64, u64, String)>,
    /// (file offset, virtual address, size) of loadable segments.
    segments: Vec<(u64, u64, u64)>,
}

impl ElfSymbols {
    fn load(path: &PathBuf) -> Option<Self> {
        let data = fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let mut symbols: Vec<(u64, u64, String)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        symbols.sort_unstable();
        symbols.dedup_by_key(|s| s.0);
        let segments = file
            .segments()
            .map(|seg| (seg.file_range().0, seg.address(), seg.file_range().1))
            .collect();
        Some(Self { symbols, segments })
    }

    fn lookup(&self, file_offset: u64) -> Option<&str> {
        let vaddr = self
            .segments
            .iter()
            .find(|(off, _, size)| (*off..off + size).contains(&file_offset))
            .map(|(off, addr, _)| file_offset - off + addr)?;
        let i = self.symbols.partition_point(|s| s.0 <= vaddr).checked_sub(1)?;
        let (addr, size, name) = &self.symbols[i];
        (*size == 0 || vaddr < addr + size).then_some(name.as_str())
    }
}

/// Symbolizes user addresses of the processes it was told about.
#[derive(Default)]
pub struct UserSymbols {
    maps: HashMap<u32, Vec<Mapping>>,
    files: HashMap<PathBuf, Option<ElfSymbols>>,
}

impl UserSymbols {
    /// Reads a process's mappings now, if not read yet and it still exists.
    pub fn remember(&mut self, tgid: u32) {
        if self.maps.contains_key(&tgid) {
            return;
        }
        if let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/maps")) {
            self.maps.insert(tgid, parse_maps(&text));
        }
    }

    /// `function` for an address of process `tgid`, or `[file]` when the
    /// file has no symbol for it, or `[unknown]`.
    pub fn symbolize(&mut self, tgid: u32, addr: u64) -> String {
        let Some(m) = self.maps.get(&tgid).and_then(|maps| maps.iter().find(|m| (m.start..m.end).contains(&addr))) else {
            return "[unknown]".into();
        };
        let offset = addr - m.start + m.file_offset;
        let path = m.path.clone();
        let elf = self.files.entry(path.clone()).or_insert_with(|| ElfSymbols::load(&path));
        match elf.as_ref().and_then(|e| e.lookup(offset)) {
            Some(name) => name.to_string(),
            None => format!("[{}]", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
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
            vec![Mapping { start: 0x55d0c0001000, end: 0x55d0c0005000, file_offset: 0x1000, path: "/usr/bin/x".into() }]
        );
    }

    #[test]
    fn symbolizes_this_test_binary() {
        let mut syms = UserSymbols::default();
        let me = std::process::id();
        syms.remember(me);
        let addr = symbolizes_this_test_binary as *const () as u64;
        let name = syms.symbolize(me, addr);
        assert!(name.contains("symbolizes_this_test_binary"), "{name}");
        assert_eq!(syms.symbolize(me, 8), "[unknown]");
    }
}
