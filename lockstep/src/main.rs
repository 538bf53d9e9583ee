//! The `lockstep` command: a thin command line over the engine's VMM and replication
//! roles. [`api`] is the control socket (`--api-sock`) and its client (`ctl`); [`cli`] parses the command line into the engine's options types and runs the
//! role; [`demo`] is the failover demo, built on the shared harness.

mod api;
mod cli;
mod demo;

fn main() -> std::process::ExitCode {
    cli::main()
}
