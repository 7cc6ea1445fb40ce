//! Kernel symbols from /proc/kallsyms: does a function exist, what are the
//! close names when it does not, and which function holds an address.

use std::{
    fs, io,
    sync::{Mutex, OnceLock},
    thread::JoinHandle,
};

/// kallsyms' kinds of functions (local, global, weak).
const TEXT_KINDS: &[&str] = &["t", "T", "w", "W"];
/// kallsyms' kinds of data: initialized and zeroed, local and global.
const DATA_KINDS: &[&str] = &["d", "D", "b", "B"];

/// (address, kind, name) of each well-formed line of /proc/kallsyms.
fn symbol_lines(text: &str) -> impl Iterator<Item = (u64, &str, &str)> {
    text.lines().filter_map(|line| {
        let mut parts = line.split_whitespace();
        let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
        Some((addr, parts.next()?, parts.next()?))
    })
}

/// Larger than any kernel function; see [`KernelSymbols::symbolize`].
const MAX_FUNCTION_SIZE: u64 = 64 * 1024;

/// Symbol prefixes of the tracer itself: latprobe's programs and the kernel
/// glue that ran them (trampolines, tracepoint and perf callbacks).
const TRACER_FRAMES: [&str; 6] =
    ["bpf_prog_", "bpf_trampoline_", "bpf_trace_run", "__bpf_trace_", "__traceiter_", "perf_trace_"];

/// Whether a frame (`name` or `name+0xoff`) is the tracer, not the traced code.
pub fn is_tracer_frame(symbol: &str) -> bool {
    TRACER_FRAMES.iter().any(|p| symbol.starts_with(p))
}

/// A kernel stack captured inside one of latprobe's programs, innermost
/// first, without the tracer's own frames on top (unsymbolized ones there
/// are trampolines). A stack with nothing but such frames is kept whole:
/// with addresses hidden, every frame is unsymbolized.
pub fn trim_tracer_frames(stack: Vec<(u64, Option<String>)>) -> Vec<(u64, Option<String>)> {
    let skip = stack.iter().take_while(|(_, s)| s.as_deref().is_none_or(is_tracer_frame)).count();
    if skip == stack.len() {
        return stack;
    }
    stack.into_iter().skip(skip).collect()
}

/// Text symbols to print stacks with, and data symbols to name what an
/// address points into (where a static lock such as `rtnl_mutex` lives;
/// kernels built without CONFIG_KALLSYMS_ALL list none), read from
/// /proc/kallsyms on a thread of their own. Reading that file is tens of
/// milliseconds of the kernel's own formatting, so it starts once the
/// probes are attached, not before, and the first use waits for it.
pub struct SymbolsLater {
    reading: Mutex<Option<JoinHandle<Option<TextAndData>>>>,
    read: OnceLock<Option<TextAndData>>,
}

/// Text symbols, then data symbols.
type TextAndData = (KernelSymbols, KernelSymbols);

impl SymbolsLater {
    /// Text symbols, and data symbols too when `data` is set.
    pub fn start(data: bool) -> Self {
        let reading = std::thread::spawn(move || {
            let text = fs::read_to_string("/proc/kallsyms").ok()?;
            Some(KernelSymbols::parse_text_and_data(&text, if data { DATA_KINDS } else { &[] }))
        });
        Self { reading: Mutex::new(Some(reading)), read: OnceLock::new() }
    }

    fn get(&self) -> Option<&TextAndData> {
        self.read
            .get_or_init(|| {
                let reading = self.reading.lock().unwrap_or_else(|e| e.into_inner()).take();
                let read = reading.and_then(|r| r.join().ok()).flatten();
                say_if_hidden(read.as_ref().map(|(text, _)| text));
                read
            })
            .as_ref()
    }

    pub fn text(&self) -> Option<&KernelSymbols> {
        self.get().map(|(text, _)| text)
    }

    pub fn data(&self) -> Option<&KernelSymbols> {
        self.get().map(|(_, data)| data)
    }
}

fn say_if_hidden(symbols: Option<&KernelSymbols>) {
    if !symbols.is_some_and(KernelSymbols::addresses_visible) {
        crate::output::say(
            "kernel addresses are hidden (/proc/sys/kernel/kptr_restrict), so stacks print as raw \
             addresses: run as root, or set kptr_restrict to 0",
        );
    }
}

/// `stack` (innermost first) symbolized with `symbols` and trimmed of the
/// tracer's frames.
pub fn symbolize_stack(stack: &[u64], symbols: Option<&KernelSymbols>) -> Vec<(u64, Option<String>)> {
    trim_tracer_frames(stack.iter().map(|&addr| (addr, symbols.and_then(|s| s.symbolize(addr)))).collect())
}

/// Whether the running kernel has a text symbol `name`, reading
/// /proc/kallsyms line by line rather than keeping its ~150k names.
/// `None` when the file cannot be read.
pub fn kernel_has_function(name: &str) -> Option<bool> {
    use std::io::BufRead;
    let file = fs::File::open("/proc/kallsyms").ok()?;
    let found = io::BufReader::new(file).lines().map_while(Result::ok).any(|line| {
        let mut parts = line.split_whitespace();
        let (_, kind, sym) = (parts.next(), parts.next(), parts.next());
        matches!(kind, Some("t" | "T" | "w" | "W")) && sym == Some(name)
    });
    Some(found)
}

/// Text symbols of the running kernel (and its modules), sorted by address.
pub struct KernelSymbols {
    /// (address, name); addresses are all zero when kptr_restrict hides them.
    symbols: Vec<(u64, String)>,
    addresses_visible: bool,
}

impl KernelSymbols {
    pub fn load() -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(text: &str) -> Self {
        Self::parse_text_and_data(text, &[]).0
    }

    /// Text symbols and symbols of `data_kinds`, in one pass over the file.
    fn parse_text_and_data(text: &str, data_kinds: &[&str]) -> (Self, Self) {
        let (mut code, mut data) = (Vec::new(), Vec::new());
        for (addr, kind, name) in symbol_lines(text) {
            if TEXT_KINDS.contains(&kind) {
                code.push((addr, name));
            } else if data_kinds.contains(&kind) {
                data.push((addr, name));
            }
        }
        (Self::from_unsorted(code), Self::from_unsorted(data))
    }

    fn from_unsorted<'a>(symbols: impl IntoIterator<Item = (u64, &'a str)>) -> Self {
        let mut symbols: Vec<(u64, String)> = symbols.into_iter().map(|(a, n)| (a, n.to_string())).collect();
        symbols.sort_unstable();
        let addresses_visible = symbols.iter().any(|(a, _)| *a != 0);
        Self { symbols, addresses_visible }
    }

    /// The data symbol `addr` is in, as `name` or `name+0xoff`, if it is
    /// within `max_offset` bytes of one (kallsyms has no sizes).
    pub fn data_at(&self, addr: u64, max_offset: u64) -> Option<String> {
        if !self.addresses_visible {
            return None;
        }
        let i = self.symbols.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.symbols[i];
        match addr - base {
            0 => Some(name.clone()),
            off if off <= max_offset => Some(format!("{name}+{off:#x}")),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn contains(&self, name: &str) -> bool {
        self.symbols.iter().any(|(_, n)| n == name)
    }

    pub fn addresses_visible(&self) -> bool {
        self.addresses_visible
    }

    /// `function+0xoffset` for a kernel text address.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        if !self.addresses_visible {
            return None;
        }
        let i = self.symbols.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.symbols[i];
        // kallsyms has no sizes: an address far past the nearest symbol is in
        // code it does not list (the last symbol of a region would claim it).
        if addr - base > MAX_FUNCTION_SIZE {
            return None;
        }
        Some(format!("{name}+{:#x}", addr - base))
    }

    /// Up to `limit` function names close to `name`: same prefix or substring
    /// first, then by edit distance.
    pub fn suggest(&self, name: &str, limit: usize) -> Vec<String> {
        let mut scored: Vec<(usize, &str)> = self
            .symbols
            .iter()
            .map(|(_, n)| n.as_str())
            .filter(|n| !n.starts_with("__pfx_"))
            .filter_map(|n| {
                let score = if n.contains(name) || name.contains(n) && n.len() > 3 {
                    n.len().abs_diff(name.len())
                } else {
                    let d = edit_distance(name, n);
                    if d > name.len() / 3 + 1 {
                        return None;
                    }
                    100 + d
                };
                Some((score, n))
            })
            .collect();
        scored.sort_unstable();
        scored.dedup_by(|a, b| a.1 == b.1);
        scored.into_iter().take(limit).map(|(_, n)| n.to_string()).collect()
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == cb { prev } else { 1 + prev.min(cur).min(row[j]) };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81a00000 T net_rx_action
ffffffff81a00400 t tcp_collapse
ffffffff81a00800 T tcp_v4_rcv
ffffffff81a00c00 D some_data
ffffffff81a01000 T tcp_v6_rcv [ipv6]
";

    #[test]
    fn finds_functions_and_not_data() {
        let k = KernelSymbols::parse(SAMPLE);
        assert!(k.contains("tcp_collapse"));
        assert!(k.contains("tcp_v6_rcv"));
        assert!(!k.contains("some_data"));
    }

    #[test]
    fn one_pass_gives_data_symbols_apart() {
        let (text, data) = KernelSymbols::parse_text_and_data(SAMPLE, DATA_KINDS);
        assert!(text.contains("tcp_v4_rcv") && !text.contains("some_data"));
        assert!(data.contains("some_data") && !data.contains("tcp_v4_rcv"));
        assert_eq!(data.data_at(0xffffffff81a00c10, 64).as_deref(), Some("some_data+0x10"));
        assert_eq!(data.data_at(0xffffffff81a00c10, 8), None, "too far past the symbol");
    }

    #[test]
    fn symbolizes_with_offset() {
        let k = KernelSymbols::parse(SAMPLE);
        assert_eq!(k.symbolize(0xffffffff81a00410).as_deref(), Some("tcp_collapse+0x10"));
        assert_eq!(k.symbolize(0x10), None);
        assert_eq!(k.symbolize(0xffffffff81a01000 + 0x20_0000), None, "far past the last symbol");
    }

    #[test]
    fn hidden_addresses_are_not_symbolized() {
        let k = KernelSymbols::parse("0000000000000000 T net_rx_action\n");
        assert!(!k.addresses_visible());
        assert!(k.contains("net_rx_action"));
        assert_eq!(k.symbolize(0), None);
    }

    #[test]
    fn tracer_frames_are_trimmed() {
        let f = |s: &str| (1u64, Some(s.to_string()));
        let stack = vec![
            f("bpf_prog_855200e89585c265_rq_switch+0x859"),
            (7, None),
            f("bpf_trace_run4+0x10d"),
            f("__schedule+0x628"),
            f("schedule+0x23"),
        ];
        let trimmed = trim_tracer_frames(stack);
        assert_eq!(trimmed[0].1.as_deref(), Some("__schedule+0x628"));
        assert_eq!(trimmed.len(), 2);
        assert_eq!(trim_tracer_frames(vec![(5, None), (6, None)]).len(), 2, "hidden addresses: all kept");
    }

    #[test]
    fn suggests_close_names() {
        let k = KernelSymbols::parse(SAMPLE);
        assert_eq!(k.suggest("net_rx_acton", 3), vec!["net_rx_action"]);
        assert_eq!(k.suggest("tcp_v4_rc", 1), vec!["tcp_v4_rcv"]);
        assert!(k.suggest("zzzzzzzzzz", 3).is_empty());
    }
}
