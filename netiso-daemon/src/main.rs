use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = netiso::cli::parse();
    match netiso::cli::main(cli) {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "netiso: {e:#}");
            ExitCode::FAILURE
        }
    }
}
