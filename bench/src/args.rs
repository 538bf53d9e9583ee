//! Options of a subcommand: `--name value` or `--name=value`, each name from a known list,
//! and flags (`--name`, no value) from another.

use crate::BenchError;

pub struct Args {
    subcommand: &'static str,
    pairs: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    /// Parses `args` for `subcommand`, which accepts the options named in `valued` and the
    /// flags named in `flags`.
    pub fn parse(
        subcommand: &'static str,
        args: &[String],
        valued: &[&str],
        flags: &[&str],
    ) -> Result<Args, BenchError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut set: Vec<String> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(BenchError::Usage(format!(
                    "unexpected argument '{a}' for 'bench {subcommand}'"
                )));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if flags.contains(&name) {
                if value.is_some() {
                    return Err(BenchError::Usage(format!("option --{name} takes no value")));
                }
                if set.iter().any(|n| n == name) {
                    return Err(BenchError::Usage(format!("option --{name} given twice")));
                }
                set.push(name.to_string());
                continue;
            }
            if !valued.contains(&name) {
                let mut all = valued.to_vec();
                all.extend_from_slice(flags);
                return Err(BenchError::Usage(format!(
                    "unknown option --{name} for 'bench {subcommand}' (it takes {})",
                    list(&all)
                )));
            }
            let value = match value {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| BenchError::Usage(format!("option --{name} needs a value")))?,
            };
            if pairs.iter().any(|(n, _)| n == name) {
                return Err(BenchError::Usage(format!("option --{name} given twice")));
            }
            pairs.push((name.to_string(), value));
        }
        Ok(Args {
            subcommand,
            pairs,
            flags: set,
        })
    }

    /// Whether the flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|n| n == name)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A number option, `default` when absent; `min` is the smallest value allowed.
    pub fn number<T>(&self, name: &str, default: T, min: T) -> Result<T, BenchError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        match v.parse::<T>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(BenchError::Usage(format!(
                "--{name} {v}: expected a number of at least {min} for 'bench {}'",
                self.subcommand
            ))),
        }
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        return "no options".to_string();
    }
    names
        .iter()
        .map(|n| format!("--{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_both_forms_and_defaults() {
        let a = Args::parse(
            "pause",
            &strings(&["--samples", "10", "--gap-ms=4"]),
            &["samples", "gap-ms"],
            &[],
        )
        .unwrap();
        assert_eq!(a.number("samples", 500usize, 1).unwrap(), 10);
        assert_eq!(a.number("gap-ms", 3u64, 0).unwrap(), 4);
        let a = Args::parse("pause", &[], &["samples"], &[]).unwrap();
        assert_eq!(a.number("samples", 500usize, 1).unwrap(), 500);
    }

    #[test]
    fn rejects_bad_input() {
        let v = &["samples"];
        let usage = |r: Result<Args, BenchError>| match r {
            Err(BenchError::Usage(m)) => m,
            Err(e) => panic!("not a usage error: {e}"),
            Ok(_) => panic!("accepted"),
        };
        assert!(
            usage(Args::parse("pause", &strings(&["--nope", "1"]), v, &[]))
                .contains("unknown option --nope")
        );
        assert!(
            usage(Args::parse("pause", &strings(&["--samples"]), v, &[])).contains("needs a value")
        );
        assert!(usage(Args::parse("pause", &strings(&["stray"]), v, &[])).contains("'stray'"));
        assert!(usage(Args::parse(
            "pause",
            &strings(&["--samples", "1", "--samples", "2"]),
            v,
            &[]
        ))
        .contains("twice"));
        let a = Args::parse("pause", &strings(&["--samples", "0"]), v, &[]).unwrap();
        assert!(matches!(
            a.number("samples", 500usize, 1),
            Err(BenchError::Usage(_))
        ));
        let a = Args::parse("pause", &strings(&["--samples", "x"]), v, &[]).unwrap();
        assert!(a.number("samples", 500usize, 1).is_err());
    }

    #[test]
    fn flags_take_no_value() {
        let parse = |v: &[&str]| Args::parse("report", &strings(v), &["out"], &["quick"]);
        let a = parse(&["--quick", "--out", "d"]).unwrap();
        assert!(a.flag("quick"));
        assert_eq!(a.get("out"), Some("d"));
        let a = parse(&["--out=d"]).unwrap();
        assert!(!a.flag("quick"));
        let usage = |r: Result<Args, BenchError>| match r {
            Err(BenchError::Usage(m)) => m,
            Err(e) => panic!("not a usage error: {e}"),
            Ok(_) => panic!("accepted"),
        };
        assert!(usage(parse(&["--quick=yes"])).contains("takes no value"));
        assert!(usage(parse(&["--quick", "--quick"])).contains("twice"));
        let m = usage(parse(&["--slow"]));
        assert!(m.contains("--out, --quick"), "{m}");
    }
}
