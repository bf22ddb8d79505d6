use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = netiso::cli::Cli::parse();
    match netiso::cli::main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netiso: {e:#}");
            ExitCode::FAILURE
        }
    }
}
