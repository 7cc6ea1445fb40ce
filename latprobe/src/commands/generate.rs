//! `latprobe generate`: shell completions and man pages, generated from the
//! same clap definitions as `--help`, so they never drift from it. Hidden:
//! it is for packagers, and `cargo xtask dist` runs it.

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::{
    cli::{Cli, GenerateArgs, Generated},
    output::{self, text},
};

pub fn run(args: &GenerateArgs) -> Result<()> {
    let mut command = Cli::command();
    let mut out = Vec::new();
    let shell = |shell: Shell, command: &mut clap::Command, out: &mut Vec<u8>| {
        clap_complete::generate(shell, command, "latprobe", out);
    };
    match args.what {
        Generated::Bash => shell(Shell::Bash, &mut command, &mut out),
        Generated::Zsh => shell(Shell::Zsh, &mut command, &mut out),
        Generated::Fish => shell(Shell::Fish, &mut command, &mut out),
        Generated::Commands => {
            for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
                out.extend_from_slice(format!("{}\n", sub.get_name()).as_bytes());
            }
        }
        Generated::Man => {
            let page = match &args.command {
                None => command,
                Some(name) => {
                    let Some(sub) = command.find_subcommand(name).filter(|s| !s.is_hide_set()) else {
                        bail!("no subcommand {} (`latprobe generate commands` lists them)", text::printable(name));
                    };
                    let full = format!("latprobe-{}", sub.get_name());
                    sub.clone().name(full.clone()).bin_name(full)
                }
            };
            clap_mangen::Man::new(page).render(&mut out).context("rendering the man page")?;
        }
    }
    output::report(String::from_utf8(out).context("the generated text is not UTF-8")?);
    Ok(())
}
