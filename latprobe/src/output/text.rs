//! Names that come from the kernel or from users' processes (task names,
//! symbols, file names) made safe to print: any task can name itself
//! "\n2026-11-23T… fake line" or an escape sequence that drives root's
//! terminal. Control characters are shown escaped, never sent as they are.

use std::borrow::Cow;

/// Longest name printed, in bytes, before the "…" mark.
const MAX_NAME_BYTES: usize = 512;

/// `name` with control characters as `\xNN` escapes, cut at a character
/// boundary after `MAX_NAME_BYTES` and ended with "…". Borrowed when clean.
pub fn printable(name: &str) -> Cow<'_, str> {
    escape(name, false)
}

fn escape(name: &str, folded: bool) -> Cow<'_, str> {
    let clean = name.len() <= MAX_NAME_BYTES && !name.chars().any(|c| c.is_control() || (folded && c == ';'));
    if clean {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len().min(MAX_NAME_BYTES + 3));
    for c in name.chars() {
        let piece = match c {
            ';' if folded => Cow::Borrowed(":"),
            // Control characters are all below U+00A0: two hex digits suffice.
            c if c.is_control() => Cow::Owned(format!("\\x{:02x}", u32::from(c))),
            c => Cow::Owned(c.to_string()),
        };
        if out.len() + piece.len() > MAX_NAME_BYTES {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    Cow::Owned(out)
}

/// A task name (`comm`, up to its first NUL) as printable text. Invalid
/// UTF-8 is shown as U+FFFD.
pub fn comm(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    printable(&String::from_utf8_lossy(&bytes[..len])).into_owned()
}

/// `name` as one frame of a folded stack: printable, and without the `;`
/// that separates frames (a process named "a;b" would add a frame).
pub fn folded_frame(name: &str) -> Cow<'_, str> {
    escape(name, true)
}

/// A process's name as printable text, `?` once it is gone. Bounded: a
/// comm is at most 16 bytes, and /proc files can be anything.
pub fn read_comm(tgid: u32) -> String {
    use std::io::Read;
    let mut raw = Vec::new();
    match std::fs::File::open(format!("/proc/{tgid}/comm")).and_then(|f| f.take(64).read_to_end(&mut raw)) {
        Ok(_) => comm(raw.strip_suffix(b"\n").unwrap_or(&raw)),
        Err(_) => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("nginx"), "nginx");
        assert_eq!(printable("a\nb\x1b[31m"), "a\\x0ab\\x1b[31m");
        assert_eq!(printable("tab\there"), "tab\\x09here");
        assert_eq!(printable("\u{85}"), "\\x85", "C1 controls too");
        assert!(matches!(printable("plain::name"), Cow::Borrowed("plain::name")));
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
    fn long_names_are_cut_at_a_char_boundary() {
        let long = "\u{e9}".repeat(300); // 600 bytes of 2-byte chars
        let out = printable(&long);
        assert_eq!(out.strip_suffix('…'), Some("\u{e9}".repeat(256).as_str()));
        assert_eq!(printable(&"x".repeat(512)), "x".repeat(512));
    }

    #[test]
    fn folded_frames_cannot_add_frames() {
        assert_eq!(folded_frame("a;b\nc"), "a:b\\x0ac");
    }
}
