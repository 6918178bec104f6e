//! The default model compiled into the binary (`models/default/`), unpacked on first use
//! into a cache folder named by its content hash.

use std::hash::Hasher;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HYBRIDIFF_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("hybridiff");
    }
    if let Some(p) = std::env::var_os("HOME") {
        return PathBuf::from(p).join(".cache").join("hybridiff");
    }
    std::env::temp_dir().join("hybridiff-cache")
}

fn content_hash() -> u64 {
    // FNV-1a over names and bytes: stable across builds and Rust versions.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= *b as u64;
                self.0 = self.0.wrapping_mul(0x100000001b3);
            }
        }
    }
    let mut h = Fnv(0xcbf29ce484222325);
    for (name, bytes) in embedded::FILES {
        h.write(name.as_bytes());
        h.write(bytes);
    }
    h.finish()
}

/// An unpack takes well under a second; a temporary folder this old was left by a run
/// that was killed (Ctrl-C during the first unpack) and nobody will finish it.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes `.default-*` temporary folders older than [`STALE_AFTER`] from the cache.
/// Younger ones may belong to a process unpacking right now and are left alone.
fn remove_stale_unpacks(cache: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(".default-") {
            continue;
        }
        let stale = e
            .metadata()
            .ok()
            .filter(|m| m.is_dir())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if stale {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::debug!("removed the stale unpack {}", e.path().display()),
                Err(err) => tracing::warn!(
                    "cannot remove the stale unpack {}: {err}",
                    e.path().display()
                ),
            }
        }
    }
}

/// The folder of the embedded default model, unpacked if needed.
/// Whether every embedded file is in `dir` with the same length and bytes (a few MB,
/// read on each use; cheap next to loading the model).
fn unpacked_intact(dir: &std::path::Path) -> bool {
    embedded::FILES.iter().all(|(name, bytes)| {
        let path = dir.join(name);
        std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
            && std::fs::read(&path).is_ok_and(|b| b == *bytes)
    })
}

pub fn dir() -> Result<PathBuf> {
    if embedded::FILES.is_empty() {
        bail!("this binary was built without an embedded default model (models/default/ was missing at build time); pass --model DIR");
    }
    let target = cache_root().join(format!("default-{:016x}", content_hash()));
    if target.exists() {
        if target.join("model_index.json").is_file() && unpacked_intact(&target) {
            return Ok(target);
        }
        // A damaged copy (truncated, edited) would break every later run: move it aside
        // and unpack again.
        tracing::warn!(
            "the cached default model in {} differs from the embedded one; unpacking it again",
            target.display()
        );
        let aside = target.with_extension(format!("damaged-{}", std::process::id()));
        if std::fs::rename(&target, &aside).is_ok() {
            let _ = std::fs::remove_dir_all(&aside);
        }
    }
    let parent = target.parent().expect("has a parent");
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the cache folder {}", parent.display()))?;
    remove_stale_unpacks(parent);
    // Unpack into a temporary folder and rename it into place, so an interrupted unpack
    // never looks complete.
    let tmp = tempfile::Builder::new()
        .prefix(".default-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a folder in {}", parent.display()))?;
    for (name, bytes) in embedded::FILES {
        let path = tmp.path().join(name);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, &target).is_err() {
        // Another process unpacked it first; theirs is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        if !target.join("model_index.json").is_file() {
            bail!("cannot unpack the default model into {}", target.display());
        }
    }
    Ok(target)
}
