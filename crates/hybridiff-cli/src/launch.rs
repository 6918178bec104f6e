//! How this process was started: on its own (ranks are threads), or by an MPI launcher as one
//! rank of a job of several processes (one rank per process).
//!
//! Detection reads the launcher's environment (`OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`), so no flag
//! is needed under `mpirun`, and a build without the `mpi` feature can still say why it cannot
//! take part instead of running the whole job once per process.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use hybridiff_comm::Communicator;

/// The processes of a multi-process job, as seen from this one.
#[derive(Debug, Clone, Copy)]
pub struct Processes {
    pub rank: usize,
    pub size: usize,
    /// Processes of the job on this machine (shares the cores), when the launcher says.
    pub local_size: usize,
}

/// What `main` learned about the launch; lives for the whole process.
pub struct Launch {
    #[cfg(feature = "mpi")]
    mpi: Option<hybridiff_comm::mpi::MpiWorld>,
}

impl Launch {
    /// Joins the MPI job when an MPI launcher started this process (initialising MPI), else
    /// runs alone.
    ///
    /// # Errors
    /// Started by a launcher with more than one process but built without the `mpi` feature
    /// (how to build it is in the message), or MPI could not be initialised.
    pub fn from_env() -> Result<Self> {
        let launched = hybridiff_comm::launcher_world_size();
        #[cfg(feature = "mpi")]
        {
            let mpi = match launched {
                Some(_) => Some(hybridiff_comm::mpi::MpiWorld::init()?),
                None => None,
            };
            Ok(Self { mpi })
        }
        #[cfg(not(feature = "mpi"))]
        {
            match launched {
                Some(n) if n > 1 => anyhow::bail!(
                    "started by an MPI launcher as one of {n} processes, but this hybridiff was \
                     built without MPI, so every process would run the whole job alone. Build it \
                     with `cargo build --release -p hybridiff-cli --features mpi` (needs an MPI \
                     library and libclang: on Debian `apt-get install libopenmpi-dev openmpi-bin \
                     libclang-dev`), or run one process with --world-size N for N ranks as \
                     threads"
                ),
                _ => Ok(Self {}),
            }
        }
    }

    /// The job's processes, when an MPI launcher started this one (even as the only one).
    pub fn processes(&self) -> Option<Processes> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.mpi {
            return Some(Processes {
                rank: w.rank(),
                size: w.size(),
                local_size: hybridiff_comm::launcher_local_size()
                    .unwrap_or(w.size())
                    .max(1),
            });
        }
        None
    }

    /// True on the process that writes outputs and prints: rank 0, or the only process.
    pub fn is_root(&self) -> bool {
        self.processes().is_none_or(|p| p.rank == 0)
    }

    /// A communicator over the job's processes whose waits last at most `timeout`, or `None`
    /// when this process runs alone. Honours the test-only `HYBRIDIFF_TEST_FAULT`.
    pub fn communicator(&self, timeout: Duration) -> Result<Option<Box<dyn Communicator>>> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.mpi {
            let comm = w.communicator(timeout);
            return Ok(Some(
                match hybridiff_comm::fault::Fault::from_env().map_err(anyhow::Error::msg)? {
                    Some(f) => Box::new(hybridiff_comm::fault::Faulty::new(comm, f)),
                    None => Box::new(comm),
                },
            ));
        }
        let _ = timeout;
        Ok(None)
    }

    /// [`communicator`](Self::communicator), over NCCL when `nccl` (`--comm nccl`, checked by
    /// [`check_nccl`]): the MPI communicator then only passes NCCL's ids and abort notices, and
    /// tensors move between the ranks' GPUs (`device`, this process's).
    pub fn communicator_for(
        &self,
        timeout: Duration,
        nccl: bool,
        device: &candle_core::Device,
    ) -> Result<Option<Box<dyn Communicator>>> {
        if !nccl {
            return self.communicator(timeout);
        }
        #[cfg(all(feature = "nccl", feature = "mpi"))]
        if let Some(w) = &self.mpi {
            use hybridiff_comm::nccl::{Control, NcclComm};
            let comm = NcclComm::new(Control::Mpi(w.communicator(timeout)), device, timeout)?;
            return Ok(Some(
                match hybridiff_comm::fault::Fault::from_env().map_err(anyhow::Error::msg)? {
                    Some(f) => Box::new(hybridiff_comm::fault::Faulty::new(comm, f)),
                    None => Box::new(comm),
                },
            ));
        }
        let _ = device;
        // `check_nccl` refused this before any work.
        anyhow::bail!("--comm nccl: {}", nccl_unavailable())
    }

    /// Rejects commands that do not run as one rank per process when there are several.
    pub fn only_one_process(&self, command: &str) -> Result<()> {
        match self.processes() {
            Some(p) if p.size > 1 => anyhow::bail!(
                "`hybridiff {command}` runs in one process; only denoise, generate and bench \
                 run as one rank per process (this is process {} of {})",
                p.rank,
                p.size
            ),
            _ => Ok(()),
        }
    }

    /// Reports `result` and ends the process. A failed rank of a multi-process job ends the
    /// whole job (`MPI_Abort`) so that no other process waits for it; a rank that only saw
    /// another rank's abort first leaves that rank a moment to report the cause.
    pub fn finish(self, result: Result<()>) -> ExitCode {
        let Err(e) = result else {
            return ExitCode::SUCCESS; // dropping `self` finalises MPI
        };
        if let Some(i) = e.downcast_ref::<crate::interrupt::Interrupted>() {
            eprintln!("hybridiff: {i}");
            return ExitCode::from(crate::interrupt::EXIT_STATUS);
        }
        match self.processes() {
            Some(p) if p.size > 1 => {
                eprintln!("hybridiff: rank {} of {}: error: {e:#}", p.rank, p.size);
                #[cfg(feature = "mpi")]
                if let Some(w) = &self.mpi {
                    if is_abort_echo(&e) {
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    w.abort(1);
                }
                ExitCode::FAILURE
            }
            _ => {
                eprintln!("hybridiff: error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// How to get a hybridiff that runs `--comm nccl` and `hybridiff nccl-check`.
pub const NCCL_BUILD: &str = "build one with `bash tools/cuda-toolchain.sh && source \
     ~/.cache/hybridiff-cuda-13.0/env.sh && cargo build --release -p hybridiff-cli --features \
     cuda,nccl,mpi` (the toolchain script installs CUDA 13.0 and NCCL 2.30 from PyPI; mpi needs \
     libopenmpi-dev openmpi-bin libclang-dev)";

/// Why `--comm nccl` cannot run in this build, or in this launch.
fn nccl_unavailable() -> String {
    if cfg!(not(feature = "nccl")) {
        format!("this hybridiff was built without NCCL; {NCCL_BUILD}")
    } else if cfg!(not(feature = "mpi")) {
        format!(
            "NCCL moves tensors between processes started by mpirun (one per GPU), and this \
             hybridiff was built without MPI; {NCCL_BUILD}"
        )
    } else {
        "NCCL moves tensors between processes started by mpirun, one per GPU \
         (`mpirun -np N hybridiff denoise ... --comm nccl --device cuda`); ranks that are \
         threads of one process use the in-process channel (leave --comm at host). \
         `hybridiff nccl-check` tests this machine's NCCL on one GPU"
            .to_string()
    }
}

/// `--comm nccl`: fails unless this build has NCCL (and MPI) and this process is one of
/// several started by an MPI launcher; the message says what to do instead.
pub fn check_nccl(processes: Option<Processes>) -> Result<()> {
    let usable =
        cfg!(all(feature = "nccl", feature = "mpi")) && processes.is_some_and(|p| p.size > 1);
    if !usable {
        anyhow::bail!("--comm nccl: {}", nccl_unavailable());
    }
    Ok(())
}

/// True when `e` is only the echo of another rank's abort.
#[cfg(feature = "mpi")]
fn is_abort_echo(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<hybridiff_engine::Error>(), Some(hybridiff_engine::Error::Comm(ce)) if ce.is_aborted())
            || c.downcast_ref::<hybridiff_comm::Error>().is_some_and(|ce| ce.is_aborted())
    })
}
