//! How the binary reacts to being started by an MPI launcher when built without MPI.

/// A build without the `mpi` feature, started as one of several processes, must refuse to run
/// the whole job once per process and say how to build with MPI.
#[cfg(not(feature = "mpi"))]
#[test]
fn launched_by_mpirun_without_the_mpi_feature_says_how_to_build_it() {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.png");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(["generate", "--prompt", "a red circle", "--out"])
            .arg(&out)
            .env(var, "2")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{var}: ran anyway");
        assert!(err.contains("built without MPI"), "{var}: {err}");
        assert!(err.contains("--features mpi"), "{var}: {err}");
        assert!(!out.exists());
    }
}

/// One process under a launcher (`mpirun -np 1`) is an ordinary run.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_single_launched_process_runs_normally() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .args([
            "generate",
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--out",
        ])
        .arg(&out)
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
}
