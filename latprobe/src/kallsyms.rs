//! Kernel symbols from /proc/kallsyms: does a function exist, what are the
//! close names when it does not, and which function holds an address.

use std::{fs, io};

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

/// Kernel symbols to print stacks with; says once, on stderr, when the
/// kernel hides its addresses.
pub fn for_stacks() -> Option<KernelSymbols> {
    let symbols = KernelSymbols::load().ok();
    if !symbols.as_ref().is_some_and(KernelSymbols::addresses_visible) {
        crate::output::say(
            "kernel addresses are hidden (/proc/sys/kernel/kptr_restrict), so stacks print as raw \
             addresses: run as root, or set kptr_restrict to 0",
        );
    }
    symbols
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
        Self::parse_kinds(text, &["t", "T", "w", "W"])
    }

    /// Data symbols (initialized and zeroed: `d`, `D`, `b`, `B`): where a
    /// static lock such as `rtnl_mutex` lives. Kernels built without
    /// CONFIG_KALLSYMS_ALL list none.
    pub fn load_data() -> io::Result<Self> {
        Ok(Self::parse_kinds(&fs::read_to_string("/proc/kallsyms")?, &["d", "D", "b", "B"]))
    }

    fn parse_kinds(text: &str, kinds: &[&str]) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                kinds.contains(&kind).then(|| (addr, name.to_string()))
            })
            .collect();
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
