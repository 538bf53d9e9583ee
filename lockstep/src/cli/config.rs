//! `--config FILE`: a TOML file of a command's options, for the commands that run a role.
//!
//! Each key is an option's long name exactly as on the command line (`interval-ms`, not
//! `interval_ms`); a value option takes a string or a number, a repeatable option a list
//! (or one value), a flag `true` or `false`. The file's options become `--key=value`
//! arguments placed before the user's own, so they go through clap and the commands'
//! checks exactly as typed ones do. An option given on the command line wins over the
//! file's: a repeatable one given there replaces the file's list rather than extending it.
//! The keys are checked against the command's own arguments (clap's `Command`), so the
//! file's vocabulary is the command line's; hidden options cannot be set from a file.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// The commands that run a role, and so take `--config FILE`.
pub const COMMANDS: &[&str] = &["run", "restore", "primary", "backup"];

/// The option's id and long name.
const CONFIG: &str = "config";

/// `cmd` with `--config FILE` on each of [`COMMANDS`].
pub fn with_config(cmd: Command) -> Command {
    COMMANDS.iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |sub| {
            sub.arg(
                Arg::new(CONFIG)
                    .long(CONFIG)
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    // Among the command's own options, not under the heading of the last
                    // group flattened into it.
                    .help_heading(None::<&str>)
                    .help(
                        "options from a TOML file, keys named as the long options \
                         (`interval-ms = 50`); the command line wins (README.md)",
                    ),
            )
        })
    })
}

/// `args` with the options of the `--config FILE` it names (if any) inserted after the
/// command's name, as `--key=value`; the error is one line naming the file (and the key).
///
/// A command line that does not parse by itself is returned as it is: parsing it again
/// reports its own mistake, as without `--config`.
pub fn expand(cmd: &Command, args: &[String]) -> Result<Vec<String>, String> {
    let Ok(matches) = cmd.clone().try_get_matches_from(args) else {
        return Ok(args.to_vec());
    };
    let Some((name, given)) = matches.subcommand() else {
        return Ok(args.to_vec());
    };
    let Some(path) = given.try_get_one::<PathBuf>(CONFIG).ok().flatten() else {
        return Ok(args.to_vec());
    };
    // The top level has no options but help and version (they end the parse above): the
    // command is the first argument.
    let (Some(sub), Some(command)) = (cmd.find_subcommand(name), args.get(1)) else {
        return Ok(args.to_vec());
    };
    if command != name {
        return Ok(args.to_vec());
    }
    let from_file = file_args(sub, given, path)?;
    let mut out = Vec::with_capacity(args.len() + from_file.len());
    out.extend_from_slice(&args[..2]);
    out.extend(from_file);
    out.extend_from_slice(&args[2..]);
    Ok(out)
}

/// The `--key=value` arguments of the file at `path` for the command `sub`, less those the
/// command line gave (`given`). Every key is checked, also those the command line
/// overrides: a broken file is an error whatever the command line says.
fn file_args(sub: &Command, given: &ArgMatches, path: &Path) -> Result<Vec<String>, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {file}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("config file {file}: {}", toml_error(&text, &e)))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = option(sub, key)
            .ok_or_else(|| format!("config file {file}: {}", unknown_key(sub, key)))?;
        let args = to_args(arg, key, value)
            .map_err(|what| format!("config file {file}: key '{key}': {what}"))?;
        // The same parse as the command line's, key by key so that the error names it.
        if let Err(e) = sub.clone().no_binary_name(true).try_get_matches_from(&args) {
            return Err(format!(
                "config file {file}: key '{key}': {}",
                super::one_line(&e)
            ));
        }
        if given.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            remember(path, key, &args);
            out.extend(args);
        }
    }
    Ok(out)
}

/// The option `--key` of `sub` that a file may set: a value, a list or a flag, not hidden,
/// not `--config` itself (nor help).
fn option<'a>(sub: &'a Command, key: &str) -> Option<&'a Arg> {
    sub.get_arguments().find(|a| {
        a.get_long() == Some(key)
            && key != CONFIG
            && !a.is_hide_set()
            && matches!(
                a.get_action(),
                ArgAction::Set | ArgAction::Append | ArgAction::SetTrue
            )
    })
}

/// Why `key` is not an option of `sub`, with the right name when it is only spelled
/// differently (`interval_ms`).
fn unknown_key(sub: &Command, key: &str) -> String {
    let command = sub.get_name();
    if key == CONFIG {
        return format!("key '{key}': a config file cannot name another");
    }
    let mut line = format!("unknown key '{key}' (lockstep {command} has no option --{key})");
    let dashed = key.replace('_', "-");
    if dashed != key && option(sub, &dashed).is_some() {
        line = format!("unknown key '{key}' (the key is '{dashed}', as --{dashed})");
    }
    line
}

/// The command-line arguments of `key = value` for `arg`, or what is wrong with its type.
fn to_args(arg: &Arg, key: &str, value: &toml::Value) -> Result<Vec<String>, String> {
    let kind = a(value);
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{key}")]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            _ => Err(format!(
                "--{key} is a flag: expected true or false, not {kind}"
            )),
        },
        ArgAction::Append => match value {
            toml::Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    scalar(item).map(|v| format!("--{key}={v}")).ok_or_else(|| {
                        format!(
                            "expected a list of strings, but item {} is {}",
                            i + 1,
                            a(item)
                        )
                    })
                })
                .collect(),
            _ => scalar(value)
                .map(|v| vec![format!("--{key}={v}")])
                .ok_or_else(|| format!("expected a list of strings (or one), not {kind}")),
        },
        _ => scalar(value)
            .map(|v| vec![format!("--{key}={v}")])
            .ok_or_else(|| {
                format!("--{key} takes one value: expected a string or a number, not {kind}")
            }),
    }
}

/// The value's TOML type with its article: "an array", "a table".
fn a(value: &toml::Value) -> String {
    let kind = value.type_str();
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

/// A string or a number as it would be typed; `None` for the other types.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// A TOML syntax error in one line, with where it is.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("invalid TOML at line {line}, column {column}: {message}")
        }
        None => format!("invalid TOML: {message}"),
    }
}

#[cfg(test)]
mod tests;

/// The options a config file set (file, key, the `--key=value` arguments), for
/// [`attribute`].
static FROM_FILE: std::sync::Mutex<Vec<(PathBuf, String, Vec<String>)>> =
    std::sync::Mutex::new(Vec::new());

fn remember(path: &Path, key: &str, args: &[String]) {
    if let Ok(mut v) = FROM_FILE.lock() {
        v.push((path.to_path_buf(), key.to_string(), args.to_vec()));
    }
}

/// Where an error about an option the file set came from: ` (key 'K' in config file F)`
/// when `msg` names the option (`--K`) or quotes the value the file gave it, else empty.
/// The commands check values as they come from the command line; this says which file
/// line to fix.
pub fn attribute(msg: &str) -> String {
    let Ok(v) = FROM_FILE.lock() else {
        return String::new();
    };
    for (path, key, args) in v.iter() {
        let named = msg.contains(&format!("--{key}"));
        let quoted = args.iter().any(|a| {
            a.split_once('=')
                .is_some_and(|(_, value)| mentions(msg, value))
        });
        if named || quoted {
            return format!(" (key '{key}' in config file {})", path.display());
        }
    }
    String::new()
}

/// Whether `msg` quotes `value`, or holds it as a word of its own (three characters at
/// least, so that a number such as `1` never matches by chance).
fn mentions(msg: &str, value: &str) -> bool {
    if value.is_empty() {
        return false;
    }
    if msg.contains(&format!("'{value}'")) {
        return true;
    }
    value.len() >= 3
        && msg.match_indices(value).any(|(i, _)| {
            let before = msg[..i].chars().next_back();
            let after = msg[i + value.len()..].chars().next();
            let apart =
                |c: Option<char>| c.is_none_or(|c| c.is_whitespace() || ",:;()".contains(c));
            apart(before) && apart(after)
        })
}
