//! Stacks in the folded format flame-graph tools share: one line per
//! distinct stack, frames root first joined by `;`, then a space and a count.
//! Pure: turning counted stacks into lines, and lines into an SVG title.

use std::collections::BTreeMap;

/// One counted stack, frames innermost first as the kernel returns them.
pub struct Stack<'a> {
    pub comm: &'a str,
    pub user: &'a [String],
    pub kernel: &'a [String],
    pub count: u64,
}

/// Folded lines, sorted, with equal stacks merged: `comm;user…;kernel… n`.
/// Kernel frames get the usual `_[k]` suffix so tools color them apart.
pub fn fold<'a>(stacks: impl IntoIterator<Item = Stack<'a>>) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for s in stacks {
        if s.count == 0 {
            continue;
        }
        let mut frames = vec![sanitize(s.comm)];
        frames.extend(s.user.iter().rev().map(|f| sanitize(f)));
        frames.extend(s.kernel.iter().rev().map(|f| format!("{}_[k]", sanitize(f))));
        *merged.entry(frames.join(";")).or_default() += s.count;
    }
    merged.into_iter().map(|(stack, n)| format!("{stack} {n}")).collect()
}

/// Frame names cannot hold the format's separators.
fn sanitize(frame: &str) -> String {
    let f = frame.replace([';', '\n'], "_").replace(' ', "_");
    if f.is_empty() {
        "[unknown]".into()
    } else {
        f
    }
}

/// Total count of folded lines.
pub fn total(lines: &[String]) -> u64 {
    lines.iter().filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn folds_root_first_and_merges_equal_stacks() {
        let user = frames(&["inner", "main"]);
        let kernel = frames(&["vfs_read", "ksys_read", "do_syscall_64"]);
        let lines = fold([
            Stack { comm: "nginx worker", user: &user, kernel: &kernel, count: 3 },
            Stack { comm: "nginx worker", user: &user, kernel: &kernel, count: 2 },
            Stack { comm: "idle", user: &[], kernel: &frames(&["cpu_idle"]), count: 1 },
            Stack { comm: "none", user: &[], kernel: &[], count: 0 },
        ]);
        let expected = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/folded.expected"));
        let actual = lines.join("\n") + "\n";
        if std::env::var_os("LATPROBE_BLESS").is_some() {
            std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/folded.expected"), &actual).unwrap();
            return;
        }
        assert_eq!(actual, expected.expect("tests/data/folded.expected (LATPROBE_BLESS=1 creates it)"));
        assert_eq!(total(&lines), 6);
    }
}
