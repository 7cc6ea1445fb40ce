//! Where a hung guest's CPUs are. A kernel spinning with interrupts off on
//! every CPU prints nothing, so before a VM that ran past its timeout is
//! killed, QEMU's monitor is asked for each CPU's instruction pointer and
//! the kernel-text addresses on its stack, named from the kernel's symbols
//! recorded at an earlier boot (the guest boots with `nokaslr`, so they are
//! where they were then).

use std::{
    fmt::Write as _,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

/// What one sample of the CPUs shows.
const STACK_WORDS: usize = 96;
const FRAMES_SHOWN: usize = 14;
const SAMPLES: usize = 3;

/// A report of where each CPU was, over a few samples; never fails (it says
/// what it could not do instead).
pub fn where_cpus_are(socket: &Path, kallsyms: &Path) -> String {
    // Without symbols, raw addresses still say a lot.
    let (symbols, note) = match Symbols::load(kallsyms) {
        Ok(s) => (s, String::new()),
        Err(why) => (Symbols { text: Vec::new() }, format!("(addresses not named: {why})\n")),
    };
    let mut monitor = match Monitor::connect(socket) {
        Ok(m) => m,
        Err(why) => return format!("(CPUs not sampled: QEMU monitor at {}: {why})", socket.display()),
    };
    let mut out = note;
    for sample in 0..SAMPLES {
        let Some(cpus) = monitor.cpu_count() else { break };
        for cpu in 0..cpus {
            let _ = monitor.command(&format!("cpu {cpu}"));
            let regs = monitor.command("info registers").unwrap_or_default();
            let (Some(rip), Some(rsp)) = (register(&regs, "RIP"), register(&regs, "RSP")) else { continue };
            let words = monitor.command(&format!("x/{STACK_WORDS}gx {rsp:#x}")).unwrap_or_default();
            let frames: Vec<String> = stack_words(&words)
                .filter_map(|w| symbols.name(w).or_else(|| symbols.text.is_empty().then(|| kernel_hex(w)).flatten()))
                .take(FRAMES_SHOWN)
                .collect();
            let _ = writeln!(
                out,
                "sample {sample}, CPU {cpu}: at {}; on its stack: {}",
                symbols.name(rip).unwrap_or_else(|| format!("{rip:#x}")),
                if frames.is_empty() { "-".to_string() } else { frames.join(" < ") }
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    out
}

/// The value of `name` (e.g. "RIP") in `info registers` output.
fn register(regs: &str, name: &str) -> Option<u64> {
    let at = regs.find(&format!("{name}="))? + name.len() + 1;
    let hex: String = regs[at..].chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).ok()
}

/// The 64-bit words of an `x/Ngx` dump ("ffffc900000b7e48: 0x... 0x...").
fn stack_words(dump: &str) -> impl Iterator<Item = u64> + '_ {
    dump.lines()
        .filter_map(|l| l.split_once(": ").map(|(_, words)| words))
        .flat_map(str::split_whitespace)
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
}

/// An address in the kernel's text mapping (x86-64: the top 2 GiB), in hex.
fn kernel_hex(word: u64) -> Option<String> {
    (word >= 0xffff_ffff_8000_0000).then(|| format!("{word:#x}"))
}

/// Kernel text symbols, sorted by address.
struct Symbols {
    text: Vec<(u64, String)>,
}

impl Symbols {
    fn load(path: &Path) -> Result<Symbols, String> {
        let map = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut text: Vec<(u64, String)> = map
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (addr, kind, name) = (f.next()?, f.next()?, f.next()?);
                matches!(kind, "t" | "T").then(|| Some((u64::from_str_radix(addr, 16).ok()?, name.to_string())))?
            })
            .collect();
        text.sort_unstable();
        if text.is_empty() {
            return Err(format!("no text symbols in {}", path.display()));
        }
        Ok(Symbols { text })
    }

    /// "function+0xoff" for an address inside kernel text.
    fn name(&self, addr: u64) -> Option<String> {
        let (first, last) = (self.text.first()?.0, self.text.last()?.0);
        if addr < first || addr > last {
            return None;
        }
        let i = self.text.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (start, name) = &self.text[i];
        Some(format!("{name}+{:#x}", addr - start))
    }
}

/// QEMU's human monitor over a Unix socket.
struct Monitor {
    stream: UnixStream,
}

const PROMPT: &str = "(qemu) ";

impl Monitor {
    fn connect(socket: &Path) -> Result<Monitor, String> {
        let stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
        let mut m = Monitor { stream };
        m.read_to_prompt().ok_or("no prompt")?;
        Ok(m)
    }

    fn command(&mut self, line: &str) -> Option<String> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        self.read_to_prompt()
    }

    fn cpu_count(&mut self) -> Option<usize> {
        let cpus = self.command("info cpus")?;
        Some(cpus.lines().filter(|l| l.contains("CPU #")).count())
    }

    /// What the monitor said up to its next prompt (at most 5 s).
    fn read_to_prompt(&mut self) -> Option<String> {
        let until = Instant::now() + Duration::from_secs(5);
        let mut said = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => said.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if said.ends_with(PROMPT.as_bytes()) {
                return Some(String::from_utf8_lossy(&said).into_owned());
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_registers_and_stack_words() {
        let regs =
            "RAX=0000000000000000 RBX=ffff888003c1a000\nRSP=ffffc900000b7e48 RBP=0\nRIP=ffffffff81a0c1d2 RFL=00000046";
        assert_eq!(register(regs, "RIP"), Some(0xffffffff81a0c1d2));
        assert_eq!(register(regs, "RSP"), Some(0xffffc900000b7e48));
        let dump = "x/4gx 0xffffc900000b7e48\r\nffffc900000b7e48: 0xffffffff81000010 0x0000000000000001\r\n";
        assert_eq!(stack_words(dump).collect::<Vec<_>>(), vec![0xffffffff81000010, 1]);
    }

    #[test]
    fn names_addresses_inside_text_only() {
        let symbols = Symbols { text: vec![(0x1000, "a".into()), (0x1100, "b".into()), (0x2000, "_etext".into())] };
        assert_eq!(symbols.name(0x1010).as_deref(), Some("a+0x10"));
        assert_eq!(symbols.name(0x1100).as_deref(), Some("b+0x0"));
        assert_eq!(symbols.name(0x10), None);
        assert_eq!(symbols.name(0x3000), None);
    }
}
