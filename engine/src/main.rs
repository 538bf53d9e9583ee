//! The `lockstep` command.

fn main() -> std::process::ExitCode {
    engine::cli::main()
}
