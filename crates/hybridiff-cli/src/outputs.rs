//! Every file and folder a command writes, known before it runs and checked together with
//! its inputs (issue 28). The rules, the same for every command and output flag:
//!
//! - No two outputs are one file, and no output is an input: compared by where they resolve
//!   (`./x` and `x`, `..`, links to folders), by inode (hard links), and by name without
//!   case (one file on macOS and Windows); per-strategy and per-prompt names included
//!   (`bench --trace-dir`'s `<strategy>.json`, a batch's `NNNN.png` and `manifest.json`).
//! - An image output (`generate --out`, `denoise --decode`) ends in `.png`, the only format
//!   written; other outputs (JSON, Markdown, safetensors) may not carry an image extension.
//! - `-` is refused: nothing is written to standard output (`./-` is a file named `-`).
//! - Outputs only replace regular files, in folders that exist and take a new file, never
//!   inside the model's folder ([`hybridiff_engine::io::check_output_path`],
//!   [`hybridiff_engine::io::check_outside_folder`]).
//! - An output folder (`generate --prompts --out`, `bench --trace-dir`, `init --out`) is new
//!   or empty, or, with `--force`, holds only what a previous run of the command wrote,
//!   which is removed first ([`OutputFolder`]).
//! - Temporary files a killed run of ours left next to an output (`.hybridiff-*.tmp`) are
//!   removed by the next run that writes there.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use hybridiff_engine::io::{
    check_no_overlap, check_output_path, check_outside_folder, remove_stale_temp_files,
    OutputFolder, Role,
};

/// What an output file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Json,
    Markdown,
    Safetensors,
}

impl Format {
    fn what(self) -> &'static str {
        match self {
            Self::Png => "a PNG image",
            Self::Json => "JSON",
            Self::Markdown => "Markdown",
            Self::Safetensors => "safetensors",
        }
    }
}

/// Extensions of image formats: an image output must be `.png`, and no other output may
/// carry one of these.
const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "jpe", "jfif", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic",
    "heif", "ppm", "pgm", "pbm", "pnm", "exr", "ico", "qoi", "tga", "dds", "hdr",
];

/// Refuses `-` and a name whose extension says another format than `format`.
pub fn check_name(flag: &str, path: &Path, format: Format) -> Result<()> {
    if path.as_os_str() == "-" {
        // `./-` is a file named `-`, which only a format without a required extension takes.
        let named = if format == Format::Png {
            ""
        } else {
            " (./- for a file named `-`)"
        };
        bail!("{flag} -: nothing is written to standard output; give a file name{named}");
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match (format, ext.as_deref()) {
        (Format::Png, Some("png")) => Ok(()),
        (Format::Png, _) => bail!(
            "{flag} {}: hybridiff writes PNG images only; give a name ending in .png",
            path.display()
        ),
        (f, Some(e)) if IMAGE_EXTENSIONS.contains(&e) => bail!(
            "{flag} {}: this output is {}, not an image; give a name that does not end in .{e}",
            path.display(),
            f.what()
        ),
        _ => Ok(()),
    }
}

/// A planned output file: the flag (and what the file is) naming it, its path, its format.
pub type Planned = (String, PathBuf, Format);

/// A command's outputs and inputs, before it runs.
pub struct Plan<'a> {
    files: Vec<Planned>,
    folder: Option<(OutputFolder<'a>, Vec<Planned>)>,
    inputs: Vec<(String, PathBuf)>,
}

/// A checked [`Plan`]: what [`Ready::prepare`] must do just before the command writes.
pub struct Ready<'a> {
    folder: Option<(OutputFolder<'a>, Vec<PathBuf>)>,
    parents: Vec<PathBuf>,
}

impl Default for Plan<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> Plan<'a> {
    pub fn new() -> Self {
        Self {
            files: Vec::new(),
            folder: None,
            inputs: Vec::new(),
        }
    }

    /// An output file named by `flag`.
    pub fn file(&mut self, flag: &str, path: &Path, format: Format) -> &mut Self {
        self.files
            .push((flag.to_string(), path.to_path_buf(), format));
        self
    }

    /// An output folder and the files the run will write in it (`(label, path, format)`,
    /// the label naming the flag and what the file is: `--trace-dir (cfg trace)`).
    pub fn folder(&mut self, folder: OutputFolder<'a>, files: Vec<Planned>) -> &mut Self {
        self.folder = Some((folder, files));
        self
    }

    /// An input file or folder named by `flag`.
    pub fn input(&mut self, flag: &str, path: &Path) -> &mut Self {
        self.inputs.push((flag.to_string(), path.to_path_buf()));
        self
    }

    /// Every check, before anything is computed or written. `spare`: what no output may be
    /// inside of or be (the model's folder or file, its `--config` folder, `--vae`, `--lora`
    /// files: `(flag, path)`).
    pub fn check(self, spare: &[(&str, &Path)]) -> Result<Ready<'a>> {
        // Which outputs and inputs are one file comes first: it is the worst mistake.
        let mut all: Vec<(&str, &Path, Role)> = Vec::new();
        for (flag, p, _) in &self.files {
            all.push((flag, p, Role::Output));
        }
        if let Some((folder, files)) = &self.folder {
            all.push((folder.flag, folder.path, Role::Output));
            for (flag, p, _) in files {
                all.push((flag, p, Role::Output));
            }
        }
        for (flag, p) in &self.inputs {
            all.push((flag, p, Role::Input));
        }
        check_no_overlap(&all)?;
        // Then anything that would land in the model's folder.
        let mut outputs: Vec<(&str, &Path)> = self
            .files
            .iter()
            .map(|(f, p, _)| (f.as_str(), p.as_path()))
            .collect();
        if let Some((f, _)) = &self.folder {
            outputs.push((f.flag, f.path));
        }
        for (what, dir) in spare {
            check_outside_folder(&outputs, dir, what)?;
        }
        for (flag, p, format) in &self.files {
            if p.as_os_str() == "-" {
                check_name(flag, p, *format)?;
            }
            check_output_path(p, flag)?;
            check_name(flag, p, *format)?;
        }
        let folder = match self.folder {
            Some((folder, files)) => {
                for (flag, p, format) in &files {
                    check_name(flag, p, *format)?;
                }
                let previous = folder.check()?;
                // --force never removes an input.
                let removed: Vec<(&str, &Path, Role)> = previous
                    .iter()
                    .map(|p| (folder.flag, p.as_path(), Role::Output))
                    .chain(
                        self.inputs
                            .iter()
                            .map(|(f, p)| (f.as_str(), p.as_path(), Role::Input)),
                    )
                    .collect();
                if let Err(e) = check_no_overlap(&removed) {
                    bail!("{e} (--force would remove it as a previous run's output)");
                }
                Some((folder, previous))
            }
            None => None,
        };
        let parents = self
            .files
            .iter()
            .map(|(_, p, _)| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        Ok(Ready { folder, parents })
    }
}

impl Ready<'_> {
    /// Creates the output folder and empties it of a previous run's files (`--force`), and
    /// removes the temporary files killed runs of ours left next to the outputs. Call it once
    /// the run is known good (model and request checked), just before computing.
    pub fn prepare(&self) -> Result<()> {
        if let Some((folder, previous)) = &self.folder {
            folder.prepare(previous)?;
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.parents {
            if seen.insert(p) {
                remove_stale_temp_files(p);
            }
        }
        Ok(())
    }
}
