use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = netiso::cli::Cli::parse();
    match netiso::cli::main(cli) {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "netiso: {e:#}");
            ExitCode::FAILURE
        }
    }
}
