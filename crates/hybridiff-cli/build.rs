//! Embeds the default model (`models/default/`, a diffusers pipeline folder) into the
//! binary, so `hybridiff generate` works with no download and no `--model`.

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest.join("../../models/default");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &mut files);
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut code = String::from("/// The embedded default model: (path inside the folder, bytes).\npub static FILES: &[(&str, &[u8])] = &[\n");
    for f in &files {
        let rel = f.strip_prefix(&root).expect("under root");
        let rel = rel.to_string_lossy().replace('\\', "/");
        // The model card and training records stay in the repository; the binary needs
        // only the pipeline: model_index.json, hybridiff.json and the component folders.
        if !rel.contains('/') && rel != "model_index.json" && rel != "hybridiff.json" {
            continue;
        }
        let abs = f.canonicalize().expect("readable file");
        code.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            abs.display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("embedded.rs");
    std::fs::write(out, code).expect("write embedded.rs");
}
