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

/// `--comm nccl` in a build without NCCL stops before any work, naming the flag and the build
/// that has it; so does `nccl-check`.
#[cfg(not(feature = "nccl"))]
#[test]
fn comm_nccl_without_the_nccl_feature_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
            .join("tiny-sdxl");
    let out = dir.path().join("out.safetensors");
    let png = dir.path().join("x.png");
    let runs: [Vec<std::ffi::OsString>; 2] = [
        vec![
            "denoise".into(),
            "--model".into(),
            fixture.clone().into(),
            "--inputs".into(),
            fixture.join("inputs.safetensors").into(),
            "--out".into(),
            out.clone().into(),
            "--strategy".into(),
            "cfg".into(),
            "--comm".into(),
            "nccl".into(),
        ],
        vec![
            "generate".into(),
            "--prompt".into(),
            "a red circle".into(),
            "--steps".into(),
            "2".into(),
            "--comm".into(),
            "nccl".into(),
            "--out".into(),
            png.clone().into(),
        ],
    ];
    for args in runs {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: ran anyway");
        assert!(err.contains("--comm nccl: "), "{args:?}: {err}");
        assert!(err.contains("built without NCCL"), "{args:?}: {err}");
        assert!(err.contains("--features cuda,nccl,mpi"), "{args:?}: {err}");
        assert!(err.contains("tools/cuda-toolchain.sh"), "{args:?}: {err}");
    }
    assert!(!out.exists() && !png.exists());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .arg("nccl-check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("nccl-check: this hybridiff was built without NCCL"),
        "{err}"
    );
    assert!(err.contains("--features cuda,nccl,mpi"), "{err}");
}
