//! Reading job inputs and writing outputs. Every output is written to a temporary file
//! in the destination folder and renamed into place, so a failed run never leaves a
//! half-written file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hybridiff_models::Conditioning;

use crate::{Error, Result};

/// The tensors of a `--inputs` file: starting latents and the CFG branches' embeddings.
#[derive(Debug, Clone)]
pub struct DenoiseInputs {
    /// `[1, C, h, w]` initial noise.
    pub latents: Tensor,
    pub cond: Conditioning,
    pub uncond: Conditioning,
}

const REQUIRED: [&str; 5] = [
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
];

/// Largest magnitude accepted in an input tensor. Real latents and text embeddings stay
/// within a few hundred; values near f32's range overflow the attention products to NaN.
pub const MAX_INPUT_ABS: f64 = 1e6;

/// What a path that exists but is not a regular file is ("a folder", "a FIFO (named
/// pipe)", "a character device"); `None` for regular files and missing paths. Symbolic
/// links are followed.
pub fn special_file_kind(path: &Path) -> Option<&'static str> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return None;
    }
    if meta.is_dir() {
        return Some("a folder");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some("not a regular file")
}

/// Refuses to replace anything but a regular file: outputs are written to a temporary
/// file and renamed over the target, which would replace a device node or a FIFO
/// (`/dev/null` as root) with our file.
///
/// A symbolic link (to a file, or dangling) is refused too: renaming over it would
/// replace the link and leave its target untouched, and writing through it would not be
/// atomic; the message names the target to give instead.
fn refuse_special_target(path: &Path, flag: &str) -> Result<()> {
    if let Some(kind) = special_file_kind(path) {
        return Err(Error::io(
            path,
            format!(
                "{flag}: is {kind}; outputs only replace regular files (write to a file and copy it there yourself)"
            ),
        ));
    }
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(Error::io(
            path,
            format!(
                "{flag}: is a symbolic link (to {target}); outputs never replace or write through links: give the target's path, or remove the link"
            ),
        ));
    }
    Ok(())
}

/// What identifies a file among a command's outputs and inputs: its folder resolved (links,
/// `.` and `..`, as far as it exists) with its name folded to lower case, and, when it
/// exists, its device and inode. Two paths with equal places, or equal inodes, are one file:
/// `./x` and `x`, `d/../x`, a link to the folder, a hard link, and names that differ only in
/// case (one file on case-insensitive file systems such as macOS's and Windows'; refused
/// everywhere so a folder means the same wherever it is copied).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileKey {
    place: (std::path::PathBuf, String),
    inode: Option<(u64, u64)>,
}

impl FileKey {
    /// The key of `path`; `folders` caches resolved folders (a batch names many files in one).
    pub fn of(
        path: &Path,
        folders: &mut HashMap<std::path::PathBuf, std::path::PathBuf>,
    ) -> FileKey {
        let parent = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let folder = folders
            .entry(parent.to_path_buf())
            .or_insert_with(|| resolve_lossy(parent))
            .clone();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
        };
        #[cfg(not(unix))]
        let inode = None;
        FileKey {
            place: (folder, name),
            inode,
        }
    }
}

/// Whether a path is an output (written) or an input (read) of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Output,
    Input,
}

/// Refuses two outputs that are one file ([`FileKey`]), and an output that is an input: one
/// output would overwrite the other, or the job would destroy what it reads. `paths` are
/// `(flag, path, role)`, the flag naming where the path came from (`--json`, `--trace-dir
/// (cfg trace)`); linear in their number.
pub fn check_no_overlap(paths: &[(&str, &Path, Role)]) -> Result<()> {
    let mut folders = HashMap::new();
    let mut by_place: HashMap<(std::path::PathBuf, String), usize> = HashMap::new();
    let mut by_inode: HashMap<(u64, u64), usize> = HashMap::new();
    let clash = |i: usize, j: usize| -> Error {
        let ((fa, a, ra), (fb, _, rb)) = (paths[i], paths[j]);
        match (ra, rb) {
            (Role::Output, Role::Output) => Error::Options(format!(
                "{fa} and {fb} name the same file ({}); one output would overwrite the other",
                a.display()
            )),
            (Role::Output, Role::Input) | (Role::Input, Role::Output) => {
                let ((fo, o), fi) = if ra == Role::Output {
                    ((fa, a), fb)
                } else {
                    ((fb, paths[j].1), fa)
                };
                Error::Options(format!(
                    "{fo} {} is also {fi}: writing it would destroy the input",
                    o.display()
                ))
            }
            (Role::Input, Role::Input) => unreachable!("inputs may be read twice"),
        }
    };
    for (i, (_, path, role)) in paths.iter().enumerate() {
        let key = FileKey::of(path, &mut folders);
        let mut seen = vec![by_place.get(&key.place).copied()];
        if let Some(ino) = key.inode {
            seen.push(by_inode.get(&ino).copied());
        }
        for j in seen.into_iter().flatten() {
            if *role == Role::Output || paths[j].2 == Role::Output {
                return Err(clash(j, i));
            }
        }
        // An output claims its place; an input only until an output takes it.
        if *role == Role::Output || !by_place.contains_key(&key.place) {
            by_place.insert(key.place.clone(), i);
        }
        if let Some(ino) = key.inode {
            if *role == Role::Output || !by_inode.contains_key(&ino) {
                by_inode.insert(ino, i);
            }
        }
    }
    Ok(())
}

/// Refuses output paths that name the same file twice, or name an input (see
/// [`check_no_overlap`]). `outputs` and `inputs` are `(flag, path)` pairs.
pub fn check_distinct_paths(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    let all: Vec<(&str, &Path, Role)> = outputs
        .iter()
        .map(|(f, p)| (*f, *p, Role::Output))
        .chain(inputs.iter().map(|(f, p)| (*f, *p, Role::Input)))
        .collect();
    check_no_overlap(&all)
}

/// `path` made absolute with symbolic links, `.` and `..` resolved: component by component,
/// each prefix that exists canonicalised (so a link after a `..` still counts), the rest by
/// name (outputs usually do not exist yet).
fn resolve_lossy(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| Path::new(".").to_path_buf())
            .join(path)
    };
    let mut out = std::path::PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => continue,
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
        if let Ok(real) = out.canonicalize() {
            out = real;
        }
    }
    out
}

/// Refuses outputs inside `folder` (a model's folder, named by `what` such as
/// "--model"): writing there would replace the weights or configs the job reads. Both
/// the path (its folder resolved) and, for an existing file or link, its final target
/// are checked.
pub fn check_outside_folder(outputs: &[(&str, &Path)], folder: &Path, what: &str) -> Result<()> {
    let Ok(root) = folder.canonicalize() else {
        return Ok(());
    };
    for (flag, out) in outputs {
        let mut candidates = vec![resolve_lossy(out)];
        if let (Some(parent), Some(name)) = (out.parent(), out.file_name()) {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            candidates.push(resolve_lossy(parent).join(name));
        }
        if root.is_file() && candidates.contains(&root) {
            return Err(Error::Options(format!(
                "{flag} {}: is {what} {}; writing it would destroy that input",
                out.display(),
                folder.display()
            )));
        }
        if candidates.iter().any(|c| c.starts_with(&root)) {
            return Err(Error::Options(format!(
                "{flag} {}: is inside {what} {}; outputs never go into the model's folder (they could replace its weights)",
                out.display(),
                folder.display()
            )));
        }
    }
    Ok(())
}

/// Checks that the folder an output goes to exists and that the output would replace
/// nothing but a regular file, before any compute is spent.
pub fn check_output_path(path: &Path, flag: &str) -> Result<()> {
    if path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Error::io(
            path,
            format!("{flag}: ends with `/`, a folder; expected a file path"),
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            msg: format!(
                "{flag}: the folder {} does not exist; create it first",
                parent.display()
            ),
        });
    }
    if path.is_dir() {
        return Err(Error::io(
            path,
            format!("{flag}: is a folder, expected a file path"),
        ));
    }
    refuse_special_target(path, flag)?;
    check_writable_folder(parent, path, flag)
}

/// Creates and removes a temporary file in `folder`, as writing `path` will: a read-only
/// folder, or one under `/proc` or `/sys`, is refused before any compute is spent.
pub fn check_writable_folder(folder: &Path, path: &Path, flag: &str) -> Result<()> {
    tempfile::Builder::new()
        .prefix(".hybridiff-probe-")
        .suffix(TEMP_SUFFIX)
        .tempfile_in(folder)
        .map(drop)
        .map_err(|e| {
            Error::io(
                path,
                format!(
                    "{flag}: cannot write in the folder {}: {e}",
                    folder.display()
                ),
            )
        })
}

/// Names of our temporary files and folders start with this and end with [`TEMP_SUFFIX`]
/// (`.hybridiff-XXXXXX.tmp`, `.hybridiff-probe-XXXXXX.tmp`, `.hybridiff-init-XXXXXX.tmp`).
pub const TEMP_PREFIX: &str = ".hybridiff-";
/// See [`TEMP_PREFIX`].
pub const TEMP_SUFFIX: &str = ".tmp";

/// Whether a folder entry's name is one of our temporary files or folders.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) && name.len() > 15
}

/// Takes an exclusive advisory lock (flock) on `file`, held until it is closed: a write in
/// progress holds one on its temporary file, so [`remove_stale_temp_files`] can tell it from
/// the leftover of a run that was killed. Best effort: where the file system has no locks,
/// the leftover is simply never removed.
pub fn lock_exclusive(file: &std::fs::File) {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own, valid for the call.
        unsafe {
            libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB);
        }
    }
    #[cfg(not(unix))]
    let _ = file;
}

/// Whether no process holds a lock on `path` (taking and dropping one to find out).
fn unlocked(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let Ok(f) = std::fs::File::open(path) else {
            return false;
        };
        // SAFETY: as in `lock_exclusive`; the lock goes with `f`.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// How long an unlocked temporary file of ours must have been left before another run
/// removes it: a writer locks its file the moment it creates it, so this only closes that
/// instant.
pub const STALE_TEMP_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Removes the temporary files and folders of ours ([`is_temp_name`]) that a run which was
/// killed left in `folder`: those no live process holds locked and that are older than
/// [`STALE_TEMP_AFTER`]. Returns the names removed; anything it cannot remove is left.
pub fn remove_stale_temp_files(folder: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(folder) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_temp_name(&name) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= STALE_TEMP_AFTER);
        if !old || !(meta.is_file() || meta.is_dir()) || !unlocked(&e.path()) {
            continue;
        }
        let gone = if meta.is_dir() {
            std::fs::remove_dir_all(e.path())
        } else {
            std::fs::remove_file(e.path())
        };
        if gone.is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    if !removed.is_empty() {
        tracing::info!(
            "{}: removed {} temporary file(s) left by an interrupted run: {}",
            folder.display(),
            removed.len(),
            removed.join(", ")
        );
    }
    removed
}

/// A folder a run writes its files into (a batch's images and manifest, `bench`'s traces, a
/// model folder). A missing or empty folder is used as it is. A non-empty one is refused
/// unless `force`; with `force`, the entries of the kinds the command writes (`ours`) are
/// removed before the run, so the folder never holds files of two runs, and any other entry
/// is refused, never deleted. Temporary files of ours are not counted (a killed run's are
/// removed, [`remove_stale_temp_files`]).
pub struct OutputFolder<'a> {
    /// The flag that names it (`--out`, `--trace-dir`).
    pub flag: &'a str,
    pub path: &'a Path,
    pub force: bool,
    /// Whether an entry (its full path) is of the kinds the command writes.
    pub ours: fn(&Path) -> bool,
    /// Those kinds in words, for messages (`NNNN.png and manifest.json`).
    pub kinds: &'a str,
}

impl OutputFolder<'_> {
    /// Checks the folder before any compute: a folder (or a missing path whose deepest
    /// existing ancestor is a writable folder), empty, or with `force` holding only entries
    /// of ours. Returns those entries, which [`Self::prepare`] removes.
    ///
    /// # Errors
    /// `-`, a path that is a file, a non-empty folder without `force`, an entry that is not
    /// ours, a folder that cannot be written; each naming the flag and what to do.
    pub fn check(&self) -> Result<Vec<std::path::PathBuf>> {
        let (flag, path) = (self.flag, self.path);
        if path.as_os_str() == "-" {
            return Err(Error::io(
                path,
                format!("{flag}: `-` (standard output) cannot take a folder of files; give a folder path (./- for a folder named `-`)"),
            ));
        }
        if !path.exists() {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(Error::io(
                    path,
                    format!("{flag}: is a symbolic link to a missing folder; give a folder path"),
                ));
            }
            // Made with its missing parents: the deepest existing one must take a new entry.
            let parent = path
                .ancestors()
                .skip(1)
                .map(|a| {
                    if a.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        a
                    }
                })
                .find(|a| a.exists())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(Error::io(
                    path,
                    format!("{flag}: {} is not a folder", parent.display()),
                ));
            }
            check_writable_folder(parent, path, flag)?;
            return Ok(Vec::new());
        }
        if !path.is_dir() {
            let kind = special_file_kind(path).unwrap_or("a file");
            return Err(Error::io(
                path,
                format!("{flag}: is {kind}, not a folder; give a new or empty folder (or, with --force, one a previous run wrote)"),
            ));
        }
        let mut entries = Vec::new();
        for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let e = e.map_err(|e| Error::io(path, e))?;
            if !is_temp_name(&e.file_name().to_string_lossy()) {
                entries.push(e.path());
            }
        }
        entries.sort();
        let names = |v: &[&std::path::PathBuf]| {
            let shown: Vec<String> = v
                .iter()
                .take(3)
                .map(|p| {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let link = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_symlink());
                    match (link, special_file_kind(p)) {
                        (true, _) => format!(
                            "{name} (a symbolic link to {})",
                            std::fs::read_link(p)
                                .map(|t| t.display().to_string())
                                .unwrap_or_else(|_| "?".into())
                        ),
                        (false, Some(kind)) => format!("{name} ({kind})"),
                        (false, None) => name,
                    }
                })
                .collect();
            match v.len() {
                n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
                _ => shown.join(", "),
            }
        };
        if !entries.is_empty() && !self.force {
            let all: Vec<&std::path::PathBuf> = entries.iter().collect();
            return Err(Error::io(
                path,
                format!(
                    "{flag}: the folder is not empty (it holds {}); give a new or empty folder, or pass --force to replace what a previous run wrote there ({})",
                    names(&all),
                    self.kinds
                ),
            ));
        }
        let foreign: Vec<&std::path::PathBuf> =
            entries.iter().filter(|p| !(self.ours)(p)).collect();
        if !foreign.is_empty() {
            return Err(Error::io(
                path,
                format!(
                    "{flag}: the folder holds {}, which this command does not write; --force only replaces what a previous run wrote ({}) and never deletes anything else: move {} away or give another folder",
                    names(&foreign),
                    self.kinds,
                    if foreign.len() == 1 { "it" } else { "them" }
                ),
            ));
        }
        check_writable_folder(path, path, flag)?;
        Ok(entries)
    }

    /// Creates the folder (with its missing parents) and removes `previous` (what
    /// [`Self::check`] returned) and the temporary files a killed run of ours left there.
    /// Call it once the run is known good, just before it writes.
    pub fn prepare(&self, previous: &[std::path::PathBuf]) -> Result<()> {
        let (flag, path) = (self.flag, self.path);
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(path, format!("{flag}: cannot create the folder: {e}")))?;
        for p in previous {
            let meta = std::fs::symlink_metadata(p);
            let gone = match meta {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
                Ok(_) => std::fs::remove_file(p),
                Err(_) => Ok(()),
            };
            gone.map_err(|e| {
                Error::io(
                    p,
                    format!("{flag} --force: cannot remove what a previous run wrote: {e}"),
                )
            })?;
        }
        remove_stale_temp_files(path);
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    stage(path, write)?.commit()
}

/// A finished output in its temporary file next to `path`, not yet in place: [`Staged::commit`]
/// renames it there, dropping it removes it. Lets a caller make the moment an output appears
/// short (a batch lists each image in its manifest right after).
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    path: std::path::PathBuf,
}

/// Writes `path`'s content into a temporary file in its folder with `write` (given the
/// temporary file's path), locked against other runs' clean-up ([`lock_exclusive`]).
pub fn stage(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<Staged> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(|e| {
            Error::io(
                path,
                format!("cannot create a temporary file next to it: {e}"),
            )
        })?;
    // Held until the file is renamed or removed: another run's clean-up leaves it alone.
    lock_exclusive(tmp.as_file());
    write(tmp.path())?;
    // Temporary files are private (0600); a finished output gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(Staged {
        tmp,
        path: path.to_path_buf(),
    })
}

/// [`stage`] of bytes, synced to disk.
pub fn stage_bytes(path: &Path, bytes: &[u8]) -> Result<Staged> {
    stage(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(path, e))
    })
}

impl Staged {
    /// Renames the finished file into place (one rename: readers see the old file or the
    /// new one), refusing a target that became a device, FIFO, folder or link meanwhile.
    pub fn commit(self) -> Result<()> {
        // Checked again here: batch outputs are named inside a folder, and the target may
        // have appeared since the flags were checked.
        refuse_special_target(&self.path, "output")?;
        let path = self.path;
        self.tmp.persist(&path).map_err(|e| {
            Error::io(
                &path,
                format!("cannot move the finished file into place: {e}"),
            )
        })?;
        Ok(())
    }
}

/// Writes bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    stage_bytes(path, bytes)?.commit()
}

/// Writes named tensors as a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|e| Error::io(path, e))
    })
}

/// Encodes an RGB8 image as PNG bytes; `path` (where it will go) names errors.
pub fn encode_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::io(path, "image buffer does not match its size"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Writes an RGB8 image as PNG, atomically.
pub fn save_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<()> {
    write_bytes_atomic(path, &encode_png(path, width, height, rgb)?)
}

/// Loads a safetensors file, with errors that name it: a missing path, a folder, FIFO
/// or device, and a file whose tensors would not fit in memory are refused first.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if let Some(kind) = special_file_kind(path) {
        return Err(Error::io(
            path,
            format!("is {kind}, expected a safetensors file"),
        ));
    }
    if !path.is_file() {
        return Err(Error::io(path, "file not found"));
    }
    // The tensors take about the file's size once loaded (a sparse file can claim more
    // than the disk holds).
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    hybridiff_models::memory::check(&format!("reading {}", path.display()), len as u128)
        .map_err(Error::Memory)?;
    candle_core::safetensors::load(path, device).map_err(|e| {
        Error::io(
            path,
            format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        )
    })
}

/// Loads only the tensors of `wanted` that a safetensors file has, by its header: other
/// tensors are never converted (an unused tensor of a dtype candle cannot read does not
/// block the file), and a wanted tensor of an unsupported dtype (int8, bool, fp8, ...) is
/// refused naming the tensor, the file and the dtype. Returns the tensors found and the
/// names of the file's other tensors, sorted.
pub fn load_safetensors_named(
    path: &Path,
    device: &Device,
    wanted: &[&str],
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    if let Some(kind) = special_file_kind(path) {
        return Err(Error::io(
            path,
            format!("is {kind}, expected a safetensors file"),
        ));
    }
    if !path.is_file() {
        return Err(Error::io(path, "file not found"));
    }
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    hybridiff_models::memory::check(&format!("reading {}", path.display()), len as u128)
        .map_err(Error::Memory)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::io(
            path,
            format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        )
    })?;
    let mut found = HashMap::new();
    let mut others = Vec::new();
    for (name, view) in st.tensors() {
        if !wanted.contains(&name.as_str()) {
            others.push(name);
            continue;
        }
        use safetensors::Dtype as D;
        if !matches!(
            view.dtype(),
            D::F16 | D::BF16 | D::F32 | D::F64 | D::U8 | D::U32 | D::I16 | D::I32 | D::I64
        ) {
            return Err(Error::Input(format!(
                "{}: tensor `{name}` has dtype {:?}, which cannot be read; expected floating point (f32, f16, bf16 or f64)",
                path.display(),
                view.dtype()
            )));
        }
        use candle_core::safetensors::Load;
        let t = view
            .load(device)
            .map_err(|e| Error::io(path, format!("tensor `{name}`: cannot read it ({e})")))?;
        found.insert(name, t);
    }
    others.sort();
    Ok((found, others))
}

/// Refuses a tensor read from `path` that holds NaN, an infinity or a value beyond
/// [`MAX_INPUT_ABS`], naming the tensor, the file and the first offending index.
pub fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` holds a non-finite value ({}) at flat index {i}",
            path.display(),
            v[i]
        )));
    }
    if let Some(i) = v.iter().position(|x| x.abs() > MAX_INPUT_ABS) {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` holds {:.3e} at flat index {i}; values beyond ±{MAX_INPUT_ABS:e} overflow the attention to NaN (real latents and embeddings stay within a few hundred)",
            path.display(),
            v[i]
        )));
    }
    Ok(())
}

/// A tensor read from `path` as f32: floating dtypes are converted, integer and boolean
/// ones refused (the samplers would run in integer arithmetic), naming tensor and file.
pub fn float_tensor(path: &Path, name: &str, t: &Tensor) -> Result<Tensor> {
    if !t.dtype().is_float() {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` has dtype {:?}; expected floating point (f32, f16, bf16 or f64)",
            path.display(),
            t.dtype()
        )));
    }
    Ok(t.to_dtype(DType::F32)?)
}

impl DenoiseInputs {
    /// The same inputs on `device` (no copy for tensors already there).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let cond = |c: &Conditioning| -> Result<Conditioning> {
            let opt = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                Ok(match t {
                    Some(t) => Some(t.to_device(device)?),
                    None => None,
                })
            };
            Ok(Conditioning {
                prompt_embeds: c.prompt_embeds.to_device(device)?,
                pooled: opt(&c.pooled)?,
                time_ids: opt(&c.time_ids)?,
            })
        };
        Ok(Self {
            latents: self.latents.to_device(device)?,
            cond: cond(&self.cond)?,
            uncond: cond(&self.uncond)?,
        })
    }

    /// Loads and validates an inputs file against the denoiser's expectations:
    /// `latent_channels` channels, `context_dim`-wide embeddings and `pooled_dim` pooled
    /// embeddings (when the model takes them). `time_ids`, when the file has none, are
    /// `[H, W, 0, 0, H, W]` in pixels (`vae_factor` times the latent size).
    pub fn load(path: &Path, spec: &InputSpec, device: &Device) -> Result<Self> {
        let wanted: Vec<&str> = REQUIRED.iter().copied().chain(["time_ids"]).collect();
        let (mut t, others) = load_safetensors_named(path, device, &wanted)?;
        for name in &others {
            let hint = if name == "add_time_ids" {
                " (diffusers' name; rename it `time_ids` to use it)"
            } else {
                ""
            };
            tracing::warn!(
                "{}: ignoring tensor `{name}`, which denoising does not use{hint}; it reads {wanted:?}",
                path.display()
            );
        }
        for name in REQUIRED {
            if !t.contains_key(name) {
                let have: Vec<&String> = t.keys().collect();
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` is missing (the file has {have:?}); expected {REQUIRED:?}",
                    path.display()
                )));
            }
        }
        for (name, tensor) in t.iter_mut() {
            if REQUIRED.contains(&name.as_str()) || name == "time_ids" {
                *tensor = float_tensor(path, name, tensor)?;
            }
        }
        let shape_err = |name: &str, got: &[usize], want: String| {
            Error::Input(format!(
                "{}: tensor `{name}` has shape {got:?}, expected {want}",
                path.display()
            ))
        };
        let latents = t.remove("latents").expect("checked");
        let ld = latents.dims().to_vec();
        if ld.len() != 4 || ld[0] != 1 || ld[1] != spec.latent_channels {
            return Err(shape_err(
                "latents",
                &ld,
                format!("[1, {}, h, w]", spec.latent_channels),
            ));
        }
        let f = spec.latent_multiple;
        if ld[2] % f != 0 || ld[3] % f != 0 || ld[2] == 0 || ld[3] == 0 {
            return Err(shape_err(
                "latents",
                &ld,
                format!("height and width divisible by {f}"),
            ));
        }
        let mut embeds = HashMap::new();
        for name in ["prompt_embeds", "negative_prompt_embeds"] {
            let e = t.remove(name).expect("checked");
            let d = e.dims();
            if d.len() != 3 || d[0] != 1 || d[2] != spec.context_dim {
                return Err(shape_err(name, d, format!("[1, L, {}]", spec.context_dim)));
            }
            embeds.insert(name, e);
        }
        let (pl, nl) = (
            embeds["prompt_embeds"].dim(1)?,
            embeds["negative_prompt_embeds"].dim(1)?,
        );
        if pl != nl {
            return Err(Error::Input(format!(
                "{}: `prompt_embeds` has {pl} tokens but `negative_prompt_embeds` {nl}; both branches need the same length",
                path.display()
            )));
        }
        for name in ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"] {
            let e = t.remove(name).expect("checked");
            let d = e.dims();
            if let Some(p) = spec.pooled_dim {
                if d != [1, p] {
                    return Err(shape_err(name, d, format!("[1, {p}]")));
                }
            }
            embeds.insert(name, e);
        }
        for (name, e) in embeds.iter() {
            check_finite(path, name, e)?;
        }
        check_finite(path, "latents", &latents)?;
        let time_ids = if spec.time_ids {
            Some(match t.remove("time_ids") {
                Some(ti) => {
                    if ti.elem_count() != 6 {
                        return Err(shape_err("time_ids", ti.dims(), "[1, 6]".into()));
                    }
                    check_finite(path, "time_ids", &ti)?;
                    ti.reshape((1, 6))?.to_dtype(DType::F32)?
                }
                None => {
                    let (h, w) = (
                        (ld[2] * spec.vae_factor) as f32,
                        (ld[3] * spec.vae_factor) as f32,
                    );
                    Tensor::new(&[[h, w, 0.0, 0.0, h, w]], device)?
                }
            })
        } else {
            None
        };
        let cond = Conditioning {
            prompt_embeds: embeds["prompt_embeds"].clone(),
            pooled: Some(embeds["pooled_prompt_embeds"].clone()),
            time_ids: time_ids.clone(),
        };
        let uncond = Conditioning {
            prompt_embeds: embeds["negative_prompt_embeds"].clone(),
            pooled: Some(embeds["negative_pooled_prompt_embeds"].clone()),
            time_ids,
        };
        Ok(Self {
            latents,
            cond,
            uncond,
        })
    }
}

/// What a model expects of an inputs file.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub latent_channels: usize,
    /// Latent height and width must be multiples of this.
    pub latent_multiple: usize,
    pub context_dim: usize,
    pub pooled_dim: Option<usize>,
    /// Whether the model takes SDXL `time_ids`.
    pub time_ids: bool,
    /// Pixels per latent pixel.
    pub vae_factor: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_named_and_regular_ones_pass() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(special_file_kind(&file), None);
        assert_eq!(special_file_kind(&dir.path().join("missing")), None);
        assert_eq!(special_file_kind(dir.path()), Some("a folder"));
        #[cfg(unix)]
        {
            let null = dir.path().join("null");
            std::os::unix::fs::symlink("/dev/null", &null).unwrap();
            assert_eq!(special_file_kind(&null), Some("a character device"));
            let e = check_output_path(&null, "--out").unwrap_err().to_string();
            assert!(e.contains("only replace regular files"), "{e}");
            // Written through the atomic writer too: refused, and /dev/null untouched.
            let e = write_bytes_atomic(&null, b"x").unwrap_err().to_string();
            assert!(e.contains("character device"), "{e}");
            assert!(std::fs::symlink_metadata(&null)
                .unwrap()
                .file_type()
                .is_symlink());
        }
    }

    #[test]
    fn outputs_must_differ_from_each_other_and_from_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        assert!(check_distinct_paths(&[("--out", &a), ("--trace", &b)], &[]).is_ok());
        // Not yet existing: compared by folder and name, whatever the spelling.
        let a2 = dir.path().join(".").join("a");
        let e = check_distinct_paths(&[("--out", &a), ("--decode", &a2)], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out and --decode"), "{e}");
        // Existing: the same file under another name.
        std::fs::write(&a, "in").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&a, &b).unwrap();
            let e = check_distinct_paths(&[("--out", &b)], &[("--inputs", &a)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--inputs"), "{e}");
        }
    }
}
