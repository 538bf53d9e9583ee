//! `--config FILE` on the real binary: a file's options run the built-in guest and a
//! replicated pair, the command line overrides the file, the values meet the same checks
//! as typed ones, and every unusable file is one line `lockstep: error: ...` with exit 2.

use std::process::Command;
use std::time::Duration;

use tests::{kvm_required, lockstep, lockstep_bin, read_console, Proc, TempDir};

/// Writes `text` to `dir/name` and returns its path.
fn config(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.arg(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    path
}

#[test]
fn run_takes_its_options_from_the_file() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("config-run");
    let console = dir.arg("console.txt");
    let file = config(
        &dir,
        "run.toml",
        &format!(
            "# the built-in guest, counting to three\n\
             guest = \"builtin\"\n\
             guest-args = \"workload=counter limit=3\"\n\
             mem = \"32M\"\n\
             vcpus = 2\n\
             console = \"{console}\"\n"
        ),
    );
    let run = lockstep(&["run", "--config", &file]);
    run.assert_success();
    assert_eq!(
        run.stdout, "",
        "the console went to the file's path, not stdout"
    );
    assert_eq!(
        read_console(console.as_ref()),
        "count=1\ncount=2\ncount=3\n"
    );
}

#[test]
fn the_command_line_overrides_the_file() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("config-override");
    let file_console = dir.arg("file-console.txt");
    let file = config(
        &dir,
        "run.toml",
        &format!(
            "guest = \"builtin\"\n\
             guest-args = \"workload=counter limit=3\"\n\
             console = \"{file_console}\"\n"
        ),
    );
    // Both before and after --config, the typed option wins; the rest is the file's.
    let run = lockstep(&[
        "run",
        "--console",
        "stdout",
        "--config",
        &file,
        "--guest-args",
        "workload=counter limit=2",
    ]);
    run.assert_success();
    assert_eq!(run.stdout, "count=1\ncount=2\n", "{run:?}");
    assert!(
        !std::path::Path::new(&file_console).exists(),
        "the file's console was used although the command line overrode it"
    );
}

#[test]
fn a_pair_from_two_files() {
    if !kvm_required() {
        return;
    }
    let dir = TempDir::new("config-pair");
    let port = tests::ctl::free_port();
    let backup_file = config(
        &dir,
        "backup.toml",
        &format!(
            "listen = \"127.0.0.1:{port}\"\n\
             name = \"config-pair\"\n\
             console = \"none\"\n\
             heartbeat-timeout-ms = 2000\n"
        ),
    );
    let console = dir.arg("primary-console.txt");
    let primary_file = config(
        &dir,
        "primary.toml",
        &format!(
            "peer = \"127.0.0.1:{port}\"\n\
             name = \"config-pair\"\n\
             connect-timeout-s = 20\n\
             guest = \"builtin\"\n\
             guest-args = \"workload=counter limit=3\"\n\
             mem = \"32M\"\n\
             interval-ms = 20\n\
             on-backup-loss = \"continue\"\n\
             console = \"{console}\"\n"
        ),
    );
    let mut cmd = Command::new(lockstep_bin());
    cmd.args(["backup", "--insecure", "--config", &backup_file]);
    let mut backup = Proc::spawn(cmd, dir.join("backup.out"), dir.join("backup.err"))
        .unwrap_or_else(|e| panic!("{e}"));
    let primary = lockstep(&["primary", "--insecure", "--config", &primary_file]);
    primary.assert_success();
    let status = backup.wait_for(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "backup: {status:?}\n{}",
        backup.log()
    );
    let finals: Vec<String> = [primary.stdout.clone(), backup.out()]
        .iter()
        .map(|out| {
            out.lines()
                .find(|l| l.starts_with("final epoch="))
                .unwrap_or_else(|| panic!("no final line in {out:?}"))
                .to_string()
        })
        .collect();
    assert_eq!(finals[0], finals[1], "both sides end on the same epoch");
    assert_eq!(
        read_console(console.as_ref()),
        "count=1\ncount=2\ncount=3\n"
    );
}

#[test]
fn a_backup_and_a_run_take_replication_options_from_the_file() {
    // The same keys as a primary's, with the same checks: they apply once the process
    // runs the guest protected.
    let dir = TempDir::new("config-replication");
    for (command, first) in [
        ("backup", "listen = \"127.0.0.1:0\"\n"),
        ("run", "guest = \"builtin\"\n"),
    ] {
        let file = config(
            &dir,
            "roles.toml",
            &format!("{first}interval-ms = 10\non-backup-loss = \"later\"\n"),
        );
        let from_file = lockstep(&[command, "--config", &file]);
        assert_eq!(from_file.code(), Some(2), "{command}: {from_file:?}");
        from_file.assert_one_line_error(&["--on-backup-loss later", "expected fence, pause"]);
    }
}

#[test]
fn values_meet_the_command_lines_checks() {
    // The same error, word for word, as the option typed, then which key of which file.
    let dir = TempDir::new("config-checks");
    for (key, value, option) in [
        ("interval-ms", "0", "--interval-ms=0"),
        ("window", "0", "--window=0"),
        ("on-backup-loss", "\"later\"", "--on-backup-loss=later"),
        ("mem", "\"12Q\"", "--mem=12Q"),
        ("vcpus", "0", "--vcpus=0"),
    ] {
        let file = config(
            &dir,
            "primary.toml",
            &format!("guest = \"builtin\"\npeer = \"127.0.0.1:1\"\n{key} = {value}\n"),
        );
        let from_file = lockstep(&["primary", "--insecure", "--config", &file]);
        let typed = lockstep(&[
            "primary",
            "--insecure",
            "--guest",
            "builtin",
            "--peer",
            "127.0.0.1:1",
            option,
        ]);
        assert_eq!(from_file.code(), Some(2), "{from_file:?}");
        let line = from_file.assert_one_line_error(&[&format!("key '{key}'"), "primary.toml"]);
        let typed = typed.assert_one_line_error(&[]);
        assert!(
            line.starts_with(typed.trim_end()),
            "{key} = {value}: {line} / {typed}"
        );
    }
}

#[test]
fn unusable_files_are_one_line_naming_the_file() {
    let dir = TempDir::new("config-errors");
    for (command, text, needles) in [
        (
            "run",
            "guest = \"builtin\"\nfrobnicate = 3\n",
            &["unknown key 'frobnicate'"][..],
        ),
        (
            "primary",
            "heartbeat_timeout_ms = 500\n",
            &[
                "unknown key 'heartbeat_timeout_ms'",
                "'heartbeat-timeout-ms'",
            ][..],
        ),
        (
            "backup",
            "test-withhold-acks-ms = 100\n",
            &["unknown key 'test-withhold-acks-ms'"][..],
        ),
        (
            "primary",
            "interval-ms = [25, 50]\n",
            &["key 'interval-ms'", "an array"][..],
        ),
        (
            "backup",
            "run-after-end = \"yes\"\n",
            &["key 'run-after-end'", "true or false"][..],
        ),
        (
            "restore",
            "[devices]\nconsole = \"none\"\n",
            &["'devices'"][..],
        ),
        ("run", "vcpus = \"two\"\n", &["key 'vcpus'", "'two'"][..]),
        (
            "run",
            "guest = \"builtin\"\nguest-args = \"workload=counter\n",
            &["invalid TOML at line 2"][..],
        ),
    ] {
        let file = config(&dir, "bad.toml", text);
        let mut args = vec![command, "--config", &file];
        if command == "restore" {
            args.push("snap");
        }
        let run = lockstep(&args);
        assert_eq!(run.code(), Some(2), "{text:?}: {run:?}");
        let mut needles = needles.to_vec();
        let named = format!("config file {file}");
        needles.push(&named);
        run.assert_one_line_error(&needles);
        assert_eq!(run.stdout, "", "{text:?}: nothing may run");
    }
    let missing = dir.arg("missing.toml");
    let run = lockstep(&["backup", "--insecure", "--config", &missing]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    run.assert_one_line_error(&["cannot read config file", &missing, "No such file"]);
}

#[test]
fn help_mentions_config_on_each_command_that_runs_a_role() {
    for command in ["run", "restore", "primary", "backup"] {
        let run = lockstep(&[command, "--help"]);
        run.assert_success();
        assert!(run.stdout.contains("--config <FILE>"), "{command}: {run:?}");
    }
    lockstep(&["ctl", "--config", "x.toml"]).assert_one_line_error(&["'--config'"]);
}
