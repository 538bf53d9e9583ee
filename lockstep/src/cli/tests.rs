use clap::CommandFactory;

use super::*;

fn parse_args(args: &[&str]) -> Result<Cli, String> {
    Cli::try_parse_from(std::iter::once("lockstep").chain(args.iter().copied()))
        .map_err(|e| one_line(&e))
}

#[test]
fn the_command_line_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn clap_errors_become_one_line_naming_the_problem() {
    for (args, needle) in [
        (&["run", "--frobnicate"][..], "'--frobnicate'"),
        (&["frobnicate"][..], "'frobnicate'"),
        (&["run", "--mem"][..], "--mem"),
        (&["run", "--mem", "1G", "--mem", "2G"][..], "--mem"),
        (&["run", "--vcpus", "x"][..], "--vcpus"),
        (&["primary", "--interval", "5"][..], "--interval-ms"),
        (&["restore", "a", "b"][..], "'b'"),
        (&[][..], "no command given"),
    ] {
        let line = parse_args(args).expect_err("an error");
        assert!(!line.contains('\n'), "{args:?}: {line:?}");
        assert!(!line.starts_with("error:"), "{args:?}: {line:?}");
        assert!(line.contains(needle), "{args:?}: {line:?}");
    }
}

#[test]
fn fence_arg_repeats_and_values_may_start_with_a_dash() {
    let cli = parse_args(&[
        "backup",
        "--fence-arg",
        "a=1",
        "--fence-arg=b=2",
        "--fence-cmd",
        "-x",
    ])
    .expect("parses");
    let Command::Backup(b) = cli.command else {
        panic!("not a backup");
    };
    assert_eq!(b.fence.fence_arg, ["a=1", "b=2"]);
    assert_eq!(b.fence.fence_cmd.as_deref(), Some("-x"));
}
