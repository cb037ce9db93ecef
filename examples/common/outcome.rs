//! How the benchmark examples end: success, or one `PROGRAM: error: …` line on stderr and a
//! failing exit status (scripts/bench.sh shows the line).

use std::process::ExitCode;

pub fn exit_code(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
