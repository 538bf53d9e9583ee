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

/// The replication settings `args` (a command line of `primary`, `backup` or `run`) give the
/// process's primary role, or the command's one-line usage error.
fn primary_role(args: &[&str]) -> Result<PrimaryOptions, String> {
    let cli = parse_args(args)?;
    let (r, f, backup) = match &cli.command {
        Command::Primary(a) => (&a.replication, &a.fence, false),
        Command::Backup(a) => (&a.replication, &a.fence, true),
        Command::Run(a) => (&a.replication, &a.fence, false),
        other => panic!("no replication options on {other:?}"),
    };
    replication(r, f, "pair", false, backup)
        .map(|(_, opts)| opts)
        .map_err(|e| e.to_string())
}

#[test]
fn every_role_that_may_run_the_guest_takes_the_replication_options() {
    let stats = std::env::temp_dir().join("lockstep-cli-stats.json");
    let options = [
        "--stats-json",
        stats.to_str().expect("UTF-8 path"),
        "--interval-ms",
        "10",
        "--min-interval-ms",
        "0.25",
        "--no-early-checkpoint",
        "--window",
        "2",
        "--max-epoch-pages",
        "512",
        "--epoch-precopy-pct",
        "50",
        "--on-backup-loss",
        "pause",
        "--connect-timeout-s",
        "3",
        "--heartbeat-timeout-ms",
        "700",
    ];
    for command in [
        &["primary", "--peer", "127.0.0.1:1", "--guest", "builtin"][..],
        &["backup", "--listen", "127.0.0.1:0"][..],
        &["run", "--guest", "builtin"][..],
    ] {
        let args: Vec<&str> = command.iter().chain(options.iter()).copied().collect();
        let o = primary_role(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(o.interval, Duration::from_millis(10), "{command:?}");
        assert_eq!(o.min_interval, Duration::from_micros(250), "{command:?}");
        assert!(!o.early_checkpoint, "{command:?}");
        assert_eq!(o.window, 2, "{command:?}");
        assert_eq!(o.max_epoch_pages, 512, "{command:?}");
        assert_eq!(o.epoch_precopy_pct, 50, "{command:?}");
        assert_eq!(o.on_backup_loss, OnBackupLoss::Pause, "{command:?}");
        assert_eq!(o.connect_timeout, Duration::from_secs(3), "{command:?}");
        assert_eq!(o.backup_timeout, Duration::from_millis(700), "{command:?}");
        assert_eq!(o.name, "pair", "{command:?}");
        assert_eq!(
            o.stats_json.as_deref(),
            Some(stats.as_path()),
            "{command:?}"
        );
        // Without them, the defaults of `lockstep primary`.
        let d = primary_role(command).unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let new = PrimaryOptions::new(String::new(), "pair".into());
        assert_eq!(
            (d.interval, d.window, d.on_backup_loss, d.backup_timeout),
            (
                new.interval,
                new.window,
                new.on_backup_loss,
                new.backup_timeout
            ),
            "{command:?}"
        );
    }
}

#[test]
fn bad_replication_options_are_refused_on_every_role() {
    for command in [
        &["primary", "--peer", "127.0.0.1:1", "--guest", "builtin"][..],
        &["backup", "--listen", "127.0.0.1:0"][..],
        &["run", "--guest", "builtin"][..],
    ] {
        for (bad, needle) in [
            (
                &["--interval-ms", "0"][..],
                "--interval-ms must be at least 1",
            ),
            (
                &["--interval-ms", "99999999999"][..],
                "--interval-ms 99999999999",
            ),
            (&["--window", "0"][..], "--window must be at least 1"),
            (&["--max-epoch-pages", "0"][..], "--max-epoch-pages"),
            (&["--epoch-precopy-pct", "96"][..], "--epoch-precopy-pct 96"),
            (&["--on-backup-loss", "later"][..], "--on-backup-loss later"),
            (
                &["--heartbeat-timeout-ms", "0"][..],
                "--heartbeat-timeout-ms 0",
            ),
            (
                &["--connect-timeout-s", "18446744073709551615"][..],
                "--connect-timeout-s",
            ),
        ] {
            let args: Vec<&str> = command.iter().chain(bad.iter()).copied().collect();
            let e = primary_role(&args).expect_err("refused");
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
    // The backup's agent fences the primary, whatever its primary role does on a loss.
    let fence = ["--fence-cmd", "true", "--on-backup-loss", "continue"];
    let args: Vec<&str> = ["backup", "--listen", "127.0.0.1:0"]
        .iter()
        .chain(fence.iter())
        .copied()
        .collect();
    primary_role(&args).unwrap_or_else(|e| panic!("{e}"));
    let args: Vec<&str> = ["run", "--guest", "builtin"]
        .iter()
        .chain(fence.iter())
        .copied()
        .collect();
    let e = primary_role(&args).expect_err("refused");
    assert!(e.contains("--fence-cmd"), "{e}");
}
