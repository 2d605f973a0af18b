//! Helpers shared by the process tests: the binary under test and child
//! processes that never outlive a test.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};

/// `hypertensor` with its cache in `cache` and short panics.
pub fn hypertensor(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hypertensor"));
    c.env("HYPERTENSOR_CACHE", cache).env("RUST_BACKTRACE", "0");
    c
}

/// Kills the process if the test ends before it does.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGINT (Ctrl-C) to `child`.
pub fn interrupt(child: &Child) {
    // SAFETY: kill(2) on a pid this test spawned; no memory is involved.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
}
