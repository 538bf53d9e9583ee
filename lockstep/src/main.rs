//! The `lockstep` command: a thin command line over the engine's VMM and replication
//! roles. [`api`] is the control socket (`--api-sock`) and its client (`ctl`); [`cli`] parses the command line into the engine's options types and runs the
//! role; [`demo`] is the failover demo, built on the shared harness; [`metrics`] serves
//! `--metrics` (Prometheus).

mod api;
mod cli;
mod demo;
mod metrics;

fn main() -> std::process::ExitCode {
    cli::main()
}
