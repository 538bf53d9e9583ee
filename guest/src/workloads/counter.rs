//! `workload=counter limit=N`: vCPU 0 prints `count=1` to `count=N`, one per line, and
//! exits 0. The other vCPUs idle. The smallest end-to-end check of serial and exit.

use crate::args::{self, ArgError};
use crate::boot::Boot;
use crate::ports::{exit, idle_forever};
use crate::println;

pub const NAME: &str = "counter";

pub struct Config {
    limit: u64,
}

impl Config {
    pub fn parse(cmdline: &str) -> Result<Self, ArgError<'_>> {
        let mut limit = None;
        args::parse_keys(cmdline, NAME, &["limit"], |key, value| {
            limit = Some(args::parse_u64(key, value)?);
            Ok(())
        })?;
        let limit = limit.ok_or(ArgError::Missing {
            workload: NAME,
            key: "limit",
            placeholder: "N",
        })?;
        Ok(Config { limit })
    }
}

pub fn run(boot: &Boot, config: &Config) -> ! {
    if !boot.is_leader() {
        idle_forever();
    }
    for count in 1..=config.limit {
        println!("count={count}");
    }
    exit(0)
}
