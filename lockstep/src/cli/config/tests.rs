use std::path::PathBuf;

use harness::TempDir;

use super::super::{try_parse, Cli, Command, PrimaryArgs};
use super::{with_config, COMMANDS, CONFIG};
use clap::{ArgAction, CommandFactory};

/// `lockstep ARGS...` as `main` parses it, the error as the one line it prints.
fn parse_line(args: &[&str]) -> Result<Cli, String> {
    let args: Vec<String> = std::iter::once("lockstep")
        .chain(args.iter().copied())
        .map(String::from)
        .collect();
    try_parse(&args).map_err(|e| e.one_line())
}

/// A config file holding `text`, and the path to give `--config`.
fn config_file(dir: &TempDir, text: &str) -> String {
    let path = dir.arg("lockstep.toml");
    std::fs::write(&path, text).expect("write the config file");
    path
}

/// `lockstep COMMAND --config FILE ARGS...` with `text` in FILE.
fn with_file(command: &str, text: &str, args: &[&str]) -> Result<Cli, String> {
    let dir = TempDir::new("config");
    let path = config_file(&dir, text);
    let mut all = vec![command, "--config", &path];
    all.extend_from_slice(args);
    parse_line(&all)
}

fn primary(cli: Cli) -> PrimaryArgs {
    match cli.command {
        Command::Primary(a) => *a,
        other => panic!("not a primary: {other:?}"),
    }
}

/// The one line of a config file that cannot be used: it names `needles` and the file.
fn assert_file_error(command: &str, text: &str, args: &[&str], needles: &[&str]) -> String {
    let dir = TempDir::new("config-error");
    let path = config_file(&dir, text);
    let mut all = vec![command, "--config", &path];
    all.extend_from_slice(args);
    let line = parse_line(&all)
        .map(|cli| format!("parsed: {cli:?}"))
        .expect_err(&format!("{text:?} must be refused"));
    assert!(!line.contains('\n'), "{text:?}: {line:?}");
    assert!(
        line.contains(&format!("config file {path}")),
        "{text:?}: {line}"
    );
    for needle in needles {
        assert!(line.contains(needle), "{text:?}: no {needle:?} in {line}");
    }
    line
}

#[test]
fn the_command_line_with_config_is_well_formed() {
    with_config(Cli::command()).debug_assert();
}

#[test]
fn every_kind_of_value_reaches_the_options() {
    let a = primary(
        with_file(
            "primary",
            r#"
peer = "10.0.0.2:7000"
interval-ms = 50
seconds = 2.5
no-early-checkpoint = true
fence-cmd = "-x fence_ipmilan"
fence-arg = ["ip=10.0.0.9", "username=admin"]
guest = "builtin"
guest-args = "workload=kv port=7000"
console = "none"
mem = "64M"
name = "-pair"
"#,
            &[],
        )
        .expect("parses"),
    );
    assert_eq!(a.peer.as_deref(), Some("10.0.0.2:7000"));
    assert_eq!(a.replication.interval_ms, Some(50));
    assert_eq!(a.seconds, Some(2.5));
    assert!(a.replication.no_early_checkpoint);
    assert_eq!(a.fence.fence_cmd.as_deref(), Some("-x fence_ipmilan"));
    assert_eq!(a.fence.fence_arg, ["ip=10.0.0.9", "username=admin"]);
    assert_eq!(a.guest.guest.as_deref(), Some("builtin"));
    assert_eq!(a.guest.guest_args.as_deref(), Some("workload=kv port=7000"));
    assert_eq!(a.guest.devices.console.as_deref(), Some("none"));
    assert_eq!(a.guest.mem.as_deref(), Some("64M"));
    assert_eq!(a.name.as_deref(), Some("-pair"));
    assert_eq!(
        a.replication.window, None,
        "a key the file does not have stays unset"
    );
}

#[test]
fn a_repeatable_option_takes_one_value_too_and_a_false_flag_is_no_flag() {
    let a = primary(
        with_file(
            "primary",
            "fence-arg = \"ip=10.0.0.9\"\nno-early-checkpoint = false\n",
            &[],
        )
        .expect("parses"),
    );
    assert_eq!(a.fence.fence_arg, ["ip=10.0.0.9"]);
    assert!(!a.replication.no_early_checkpoint);
}

#[test]
fn the_command_line_wins_and_replaces_a_list() {
    let file = r#"
interval-ms = 50
name = "from-file"
fence-arg = ["a=1", "b=2"]
no-early-checkpoint = true
guest-args = "workload=counter limit=3"
"#;
    let a = primary(
        with_file(
            "primary",
            file,
            &[
                "--interval-ms",
                "10",
                "--fence-arg",
                "c=3",
                "--no-early-checkpoint",
                "--guest-args=workload=hash",
            ],
        )
        .expect("parses"),
    );
    assert_eq!(a.replication.interval_ms, Some(10));
    assert_eq!(
        a.fence.fence_arg,
        ["c=3"],
        "the command line's list replaces"
    );
    assert!(a.replication.no_early_checkpoint);
    assert_eq!(a.guest.guest_args.as_deref(), Some("workload=hash"));
    assert_eq!(
        a.name.as_deref(),
        Some("from-file"),
        "the rest is the file's"
    );
    // Wherever --config stands on the command line.
    let dir = TempDir::new("config-order");
    let path = config_file(&dir, file);
    let a = primary(
        parse_line(&[
            "primary",
            "--interval-ms=10",
            "--config",
            &path,
            "--window",
            "2",
        ])
        .expect("parses"),
    );
    assert_eq!(
        (
            a.replication.interval_ms,
            a.replication.window,
            a.name.as_deref()
        ),
        (Some(10), Some(2), Some("from-file"))
    );
}

#[test]
fn a_command_line_mistake_is_still_the_command_lines() {
    // Typed twice is a mistake with or without a file.
    let line =
        with_file("run", "mem = \"64M\"\n", &["--mem", "1G", "--mem", "2G"]).expect_err("refused");
    assert!(
        line.contains("--mem") && !line.contains("config file"),
        "{line}"
    );
    let line = with_file("run", "mem = \"64M\"\n", &["--frobnicate"]).expect_err("refused");
    assert!(line.contains("'--frobnicate'"), "{line}");
}

#[test]
fn restore_keeps_its_directory_argument() {
    for args in [&["snap", "--config"][..], &["--config"][..]] {
        let dir = TempDir::new("config-restore");
        let path = config_file(&dir, "console = \"none\"\n");
        let mut all = vec!["restore"];
        all.extend_from_slice(args);
        all.push(&path);
        if args.len() == 1 {
            all.push("snap");
        }
        let cli = parse_line(&all).expect("parses");
        let Command::Restore(r) = cli.command else {
            panic!("not a restore");
        };
        assert_eq!(r.dir, Some(PathBuf::from("snap")), "{all:?}");
        assert_eq!(r.devices.console.as_deref(), Some("none"), "{all:?}");
    }
}

#[test]
fn backup_flags_and_values() {
    let cli = with_file(
        "backup",
        "listen = \"0.0.0.0:7000\"\nrun-after-end = true\nfence = \"none\"\nnet = \"tap=tap0\"\n",
        &[],
    )
    .expect("parses");
    let Command::Backup(b) = cli.command else {
        panic!("not a backup");
    };
    assert_eq!(b.listen.as_deref(), Some("0.0.0.0:7000"));
    assert!(b.run_after_end);
    assert_eq!(b.fence.fence.as_deref(), Some("none"));
    assert_eq!(b.devices.net.as_deref(), Some("tap=tap0"));
}

#[test]
fn every_visible_option_of_each_command_can_be_set_from_a_file() {
    let cmd = with_config(Cli::command());
    for name in COMMANDS {
        let sub = cmd.find_subcommand(name).expect("a command");
        let mut keys = 0;
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_hide_set() || long == CONFIG || long == "help" {
                continue;
            }
            let value = match arg.get_action() {
                ArgAction::SetTrue => "true",
                ArgAction::Append => "[\"1\"]",
                _ => "\"1\"",
            };
            with_file(name, &format!("{long} = {value}\n"), &[])
                .unwrap_or_else(|e| panic!("{name}: {long} = {value}: {e}"));
            keys += 1;
        }
        assert!(keys >= 2, "{name} has only {keys} options");
    }
}

#[test]
fn help_mentions_config_on_each_command_and_only_there() {
    let mut cmd = with_config(Cli::command());
    for name in COMMANDS {
        let help = cmd
            .find_subcommand_mut(name)
            .expect("a command")
            .render_help()
            .to_string();
        assert!(help.contains("--config <FILE>"), "{name}: {help}");
    }
    for name in ["demo", "ctl"] {
        let line = parse_line(&[name, "--config", "x.toml"]).expect_err("refused");
        assert!(line.contains("'--config'"), "{name}: {line}");
    }
}

#[test]
fn unknown_keys_name_the_key_and_the_file() {
    assert_file_error(
        "run",
        "frobnicate = 1\n",
        &[],
        &["unknown key 'frobnicate'"],
    );
    // The command line's spelling, and only it.
    assert_file_error(
        "primary",
        "interval_ms = 5\n",
        &[],
        &["unknown key 'interval_ms'", "'interval-ms'"],
    );
    // Another command's option.
    assert_file_error("backup", "peer = \"x\"\n", &[], &["unknown key 'peer'"]);
    // A hidden, test-only option is not the file's to set.
    assert_file_error(
        "backup",
        "test-withhold-acks-ms = 5\n",
        &[],
        &["unknown key 'test-withhold-acks-ms'"],
    );
    // Nor are restore's directory (an argument, not an option), help or another file.
    assert_file_error(
        "restore",
        "dir = \"snap\"\n",
        &["snap"],
        &["unknown key 'dir'"],
    );
    assert_file_error("run", "help = true\n", &[], &["unknown key 'help'"]);
    assert_file_error("run", "config = \"x.toml\"\n", &[], &["key 'config'"]);
    // A table is no section: the file is one command's.
    assert_file_error(
        "backup",
        "[backup]\nlisten = \"x\"\n",
        &[],
        &["unknown key 'backup'"],
    );
}

#[test]
fn values_of_the_wrong_type_name_the_key_and_the_file() {
    for (command, text, needles) in [
        (
            "primary",
            "interval-ms = [5]\n",
            &["key 'interval-ms'", "an array"][..],
        ),
        (
            "primary",
            "interval-ms = true\n",
            &["key 'interval-ms'", "a boolean"][..],
        ),
        (
            "run",
            "guest = { path = \"x\" }\n",
            &["key 'guest'", "a table"][..],
        ),
        (
            "run",
            "guest.path = \"x\"\n",
            &["key 'guest'", "a table"][..],
        ),
        (
            "run",
            "name = 1979-05-27\n",
            &["key 'name'", "a datetime"][..],
        ),
        (
            "primary",
            "no-early-checkpoint = \"yes\"\n",
            &["key 'no-early-checkpoint'", "true or false", "a string"][..],
        ),
        (
            "backup",
            "run-after-end = 1\n",
            &["key 'run-after-end'", "an integer"][..],
        ),
        (
            "backup",
            "fence-arg = [\"a=1\", [\"b=2\"]]\n",
            &["key 'fence-arg'", "item 2 is an array"][..],
        ),
        (
            "backup",
            "fence-arg = { a = 1 }\n",
            &["key 'fence-arg'", "a table"][..],
        ),
        // The command line's parse of the value, naming the key.
        (
            "run",
            "vcpus = \"two\"\n",
            &["key 'vcpus'", "invalid value 'two'", "--vcpus"][..],
        ),
        (
            "primary",
            "interval-ms = -5\n",
            &["key 'interval-ms'", "'-5'"][..],
        ),
        ("run", "pid-file = \"\"\n", &["key 'pid-file'"][..]),
    ] {
        assert_file_error(command, text, &[], needles);
    }
    // A broken file is refused even where the command line overrides the key.
    assert_file_error(
        "primary",
        "interval-ms = [5]\n",
        &["--interval-ms", "5"],
        &["key 'interval-ms'"],
    );
}

#[test]
fn unreadable_files_and_broken_toml_are_one_line() {
    let line = parse_line(&["run", "--config", "/nonexistent/lockstep.toml"]).expect_err("refused");
    assert_eq!(
        line,
        "cannot read config file /nonexistent/lockstep.toml: No such file or directory (os error 2)"
    );
    let dir = TempDir::new("config-dir");
    let line =
        parse_line(&["run", "--config", dir.path().to_str().expect("UTF-8")]).expect_err("refused");
    assert!(
        line.starts_with("cannot read config file") && !line.contains('\n'),
        "{line}"
    );
    for (text, needles) in [
        ("guest = \n", &["invalid TOML at line 1, column 9"][..]),
        (
            "guest = \"builtin\"\nguest = \"x\"\n",
            &["line 2", "duplicate key"][..],
        ),
        ("guest = \"builtin\n", &["invalid TOML at line 1"][..]),
        ("[run\n", &["invalid TOML at line 1"][..]),
        ("\u{0}", &["invalid TOML"][..]),
    ] {
        assert_file_error("run", text, &[], needles);
    }
}

#[test]
fn an_empty_file_changes_nothing() {
    let a = primary(with_file("primary", "# nothing here\n", &["--window", "3"]).expect("parses"));
    assert_eq!((a.replication.window, a.peer), (Some(3), None));
}
