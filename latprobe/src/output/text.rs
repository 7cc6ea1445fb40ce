//! Names that come from the kernel or from users' processes (task names,
//! symbols, file names) made safe to print: any task can name itself
//! "\n2026-11-23T… fake line" or an escape sequence that drives root's
//! terminal. Control characters are shown escaped, never sent as they are.

use std::fmt::Write;

/// Longest name printed; longer ones end in "…".
const MAX_NAME_BYTES: usize = 512;

/// `name` with control characters as `\xNN`, and cut at `MAX_NAME_BYTES`.
pub fn printable(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_NAME_BYTES));
    for c in name.chars() {
        if out.len() >= MAX_NAME_BYTES {
            out.push('…');
            break;
        }
        if c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "\\x{b:02x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A task name (`comm`, up to its first NUL) as printable text. Invalid
/// UTF-8 is shown as U+FFFD.
pub fn comm(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    printable(&String::from_utf8_lossy(&bytes[..len]))
}

/// `name` as one frame of a folded stack: printable, and without the `;`
/// that separates frames (a process named "a;b" would add a frame).
pub fn folded_frame(name: &str) -> String {
    printable(name).replace(';', ":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("nginx"), "nginx");
        assert_eq!(printable("a\nb\x1b[31m"), "a\\x0ab\\x1b[31m");
        assert_eq!(printable("tab\there"), "tab\\x09here");
        assert_eq!(printable("\u{85}"), "\\xc2\\x85", "C1 controls too");
    }

    #[test]
    fn comm_stops_at_nul_and_survives_bad_utf8() {
        let mut raw = [0u8; 16];
        raw[..5].copy_from_slice(b"ev\nil");
        assert_eq!(comm(&raw), "ev\\x0ail");
        assert_eq!(comm(&[0xff, b'x', 0]), "\u{fffd}x");
        assert_eq!(comm(b"sixteen-bytes-ok"), "sixteen-bytes-ok");
    }

    #[test]
    fn long_names_are_cut() {
        let long = "x".repeat(10_000);
        let p = printable(&long);
        assert!(p.len() <= MAX_NAME_BYTES + '…'.len_utf8());
        assert!(p.ends_with('…'));
    }

    #[test]
    fn folded_frames_cannot_add_frames() {
        assert_eq!(folded_frame("a;b\nc"), "a:b\\x0ac");
    }
}
