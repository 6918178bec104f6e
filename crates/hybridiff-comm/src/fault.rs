//! Test-only fault injection for the failure tests of multi-process runs.
//!
//! `HYBRIDIFF_TEST_FAULT=RANK:SEND:MODE` makes rank `RANK` fail at its `SEND`-th call of
//! [`Communicator::send`] (1-based), in one of these ways, so that the tests can check that the
//! other ranks stop, with an error naming `RANK`, within the timeout:
//!
//! - `error`: the send returns an error;
//! - `panic`: the send panics;
//! - `exit`: the process exits with status 3 at once, as a crashing rank would;
//! - `exit0`: the process exits with status 0 at once, as a rank with a bug might;
//! - `kill`: the process sends itself SIGKILL;
//! - `hang`: the send never returns, as a stuck rank would.
//!
//! Nothing else reads this variable; it exists for `crates/hybridiff-cli/tests/mpi.rs`.

use std::cell::Cell;
use std::time::Duration;

use candle_core::Tensor;

use crate::error::{Error, Op, Result};
use crate::{Communicator, Group};

/// The variable read by [`Fault::from_env`].
pub const VAR: &str = "HYBRIDIFF_TEST_FAULT";

/// How an injected fault fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Error,
    Panic,
    Exit,
    Exit0,
    Kill,
    Hang,
}

/// Where and how to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    /// 1-based index of the failing `send` call.
    pub send: u64,
    pub mode: Mode,
}

impl Fault {
    /// Reads [`VAR`]; `Ok(None)` when it is unset.
    ///
    /// # Errors
    /// A message naming the variable when it is set but malformed.
    pub fn from_env() -> std::result::Result<Option<Self>, String> {
        let Ok(v) = std::env::var(VAR) else {
            return Ok(None);
        };
        let bad =
            || format!("{VAR}={v}: expected RANK:SEND:MODE, MODE error|panic|exit|exit0|kill|hang");
        let parts: Vec<&str> = v.split(':').collect();
        let [rank, send, mode] = parts[..] else {
            return Err(bad());
        };
        let mode = match mode {
            "error" => Mode::Error,
            "panic" => Mode::Panic,
            "exit" => Mode::Exit,
            "exit0" => Mode::Exit0,
            "kill" => Mode::Kill,
            "hang" => Mode::Hang,
            _ => return Err(bad()),
        };
        Ok(Some(Self {
            rank: rank.parse().map_err(|_| bad())?,
            send: send.parse().map_err(|_| bad())?,
            mode,
        }))
    }
}

/// A communicator that fails as `fault` says and otherwise forwards to `inner`.
pub struct Faulty<C> {
    inner: C,
    fault: Fault,
    sends: Cell<u64>,
}

impl<C: Communicator> Faulty<C> {
    pub fn new(inner: C, fault: Fault) -> Self {
        Self {
            inner,
            fault,
            sends: Cell::new(0),
        }
    }

    fn maybe_fail(&self) -> Result<()> {
        if self.inner.rank() != self.fault.rank {
            return Ok(());
        }
        self.sends.set(self.sends.get() + 1);
        if self.sends.get() != self.fault.send {
            return Ok(());
        }
        let rank = self.fault.rank;
        match self.fault.mode {
            Mode::Error => Err(Error::BadArgument {
                rank,
                op: Op::Send,
                what: format!("{VAR}: injected error"),
            }),
            Mode::Panic => panic!("{VAR}: injected panic on rank {rank}"),
            // Silent, as a crash is: whatever names the rank must come from elsewhere.
            Mode::Exit => std::process::exit(3),
            Mode::Exit0 => std::process::exit(0),
            Mode::Kill => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &std::process::id().to_string()])
                    .status();
                hang()
            }
            Mode::Hang => {
                eprintln!("{VAR}: rank {rank} hangs");
                hang()
            }
        }
    }
}

fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

impl<C: Communicator> Communicator for Faulty<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.maybe_fail()?;
        self.inner.send(tensor, dst)
    }
    fn recv(&self, src: usize) -> Result<Tensor> {
        self.inner.recv(src)
    }
    fn broadcast_in(&self, group: &Group, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        self.inner.broadcast_in(group, tensor, root)
    }
    fn all_gather_in(&self, group: &Group, tensor: &Tensor) -> Result<Vec<Tensor>> {
        self.inner.all_gather_in(group, tensor)
    }
    fn barrier_in(&self, group: &Group) -> Result<()> {
        self.inner.barrier_in(group)
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}
