//! Weights from `.safetensors` files.
//!
//! A model directory holds one of:
//! - `model.safetensors.index.json`, whose `weight_map` names the shard file
//!   of every tensor (large checkpoints);
//! - a single `model.safetensors`;
//! - otherwise, every `*.safetensors` file in the directory (name order).
//!
//! Files are memory-mapped and only their headers are parsed at open, so
//! opening a checkpoint costs no more than reading its headers; tensor bytes
//! are paged in when a driver copies them. `tensor()` is a map lookup that
//! returns a view borrowed from the mapping.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pie_driver::{DType, TensorView, WeightSource};
use safetensors::{SafeTensorError, SafeTensors};

use crate::model_dir::read_json;
use crate::LoadError;

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

/// Where one tensor's bytes are: which mapped file, and the byte range in it.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// One memory-mapped `.safetensors` file.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// The tensors of a safetensors checkpoint, memory-mapped.
pub struct SafetensorsSource {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, Entry>,
}

impl SafetensorsSource {
    /// Opens the checkpoint in `dir` (see the module docs for which files).
    ///
    /// Every header is parsed and checked here, and a sharded checkpoint's
    /// index is checked against the shards, so later `tensor()` calls cannot
    /// fail on a bad file.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::file(dir, "not a directory"));
        }
        let index_path = dir.join(INDEX_FILE);
        let plan = if index_path.exists() {
            Some(ShardIndex::read(dir, &index_path)?)
        } else {
            None
        };
        let paths = match &plan {
            Some(index) => index.shard_paths(),
            None if dir.join(SINGLE_FILE).is_file() => vec![dir.join(SINGLE_FILE)],
            None => all_safetensors_files(dir)?,
        };
        let mut source = SafetensorsSource {
            dir: dir.to_path_buf(),
            files: Vec::with_capacity(paths.len()),
            tensors: HashMap::new(),
        };
        for path in paths {
            source.add_file(path)?;
        }
        if let Some(index) = plan {
            source.check_index(&index)?;
        }
        Ok(source)
    }

    /// Maps `path`, validates its header and records its tensors.
    fn add_file(&mut self, path: PathBuf) -> Result<(), LoadError> {
        let file = std::fs::File::open(&path)
            .map_err(|e| LoadError::file(&path, format!("cannot open: {e}")))?;
        // SAFETY: the mapping is read-only and lives as long as `self`. As
        // with any mmap, a file truncated by another process while we run
        // would fault; model files are not expected to change under a server.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| LoadError::file(&path, format!("cannot memory-map: {e}")))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            LoadError::file(
                &path,
                format!("not a valid safetensors file: {}", describe(&e, &map)),
            )
        })?;
        // `read_metadata` checked that the offsets tile the data section,
        // which starts right after the 8-byte length and the header.
        let data_start = 8 + header_len;
        let file_index = self.files.len();
        for (name, info) in metadata.tensors() {
            if let Some(previous) = self.tensors.get(&name) {
                return Err(LoadError::file(
                    &path,
                    format!(
                        "tensor `{name}` is also in {}; a tensor may appear in only one file",
                        self.files[previous.file].path.display()
                    ),
                ));
            }
            let (start, end) = info.data_offsets;
            let entry = Entry {
                file: file_index,
                dtype: dtype(info.dtype),
                shape: info.shape.clone(),
                bytes: data_start + start..data_start + end,
            };
            self.tensors.insert(name, entry);
        }
        self.files.push(MappedFile { path, map });
        Ok(())
    }

    /// Every tensor the index promises is in the shard it names.
    fn check_index(&self, index: &ShardIndex) -> Result<(), LoadError> {
        for (name, shard) in &index.weight_map {
            let found = self.tensors.get(name).map(|e| &self.files[e.file].path);
            if found.and_then(|p| p.file_name()) == Some(shard.as_ref()) {
                continue;
            }
            let actually = match found {
                Some(p) => format!(" (it is in {})", p.display()),
                None => String::new(),
            };
            return Err(LoadError::file(
                &index.path,
                format!(
                    "weight_map puts tensor `{name}` in `{shard}`, but {} does not contain it{actually}",
                    self.dir.join(shard).display()
                ),
            ));
        }
        Ok(())
    }

    /// Number of tensors across all files.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensor names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The files opened, in load order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The files searched, for error messages: the full path of a single
    /// file; file names and the directory for several.
    fn files_label(&self) -> String {
        let name = |f: &MappedFile| {
            f.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            [first, .., last] if self.files.len() > 3 => format!(
                "{} files ({} … {}) in {}",
                self.files.len(),
                name(first),
                name(last),
                self.dir.display()
            ),
            files => format!(
                "{} in {}",
                files.iter().map(name).collect::<Vec<_>>().join(", "),
                self.dir.display()
            ),
        }
    }

    /// The existing name most likely meant by `name`: a few edits away, or
    /// the same trailing segments under a different prefix (`model.norm.w`
    /// vs `model.language_model.norm.w`), a common mismatch between
    /// checkpoint layouts.
    fn closest_name(&self, name: &str) -> Option<&str> {
        let by_edits = self
            .names()
            .map(|c| (pie_archspec::expr::edit_distance(name, c), c))
            .filter(|&(d, c)| d < name.len() && d <= 2.max(c.len().max(name.len()) / 4))
            .min_by_key(|&(d, c)| (d, c));
        if let Some((_, c)) = by_edits {
            return Some(c);
        }
        let segments = |s: &str| s.split('.').count();
        let shared_tail = |c: &str| {
            name.rsplit('.')
                .zip(c.rsplit('.'))
                .take_while(|(a, b)| a == b)
                .count()
        };
        self.names()
            .map(|c| (shared_tail(c), c))
            .filter(|&(shared, c)| {
                shared >= 2 && segments(name) - shared <= 2 && segments(c) - shared <= 2
            })
            .max_by_key(|&(shared, c)| {
                (shared, std::cmp::Reverse((c.len().abs_diff(name.len()), c)))
            })
            .map(|(_, c)| c)
    }
}

impl WeightSource for SafetensorsSource {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, String> {
        if let Some(e) = self.tensors.get(name) {
            return Ok(TensorView {
                dtype: e.dtype,
                shape: &e.shape,
                data: &self.files[e.file].map[e.bytes.clone()],
            });
        }
        let count = match self.tensors.len() {
            1 => "1 tensor".to_string(),
            n => format!("{n} tensors"),
        };
        let hint = match self.closest_name(name) {
            Some(c) => format!("; did you mean `{c}`?"),
            None => String::new(),
        };
        Err(format!(
            "tensor `{name}` not found in {} ({count}{hint})",
            self.files_label()
        ))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// `model.safetensors.index.json`: which shard file holds each tensor.
struct ShardIndex {
    path: PathBuf,
    dir: PathBuf,
    /// `(tensor, shard file name)`, in the index's order.
    weight_map: Vec<(String, String)>,
}

impl ShardIndex {
    /// Reads the index and checks that every shard it names exists.
    fn read(dir: &Path, path: &Path) -> Result<Self, LoadError> {
        let json = read_json(path)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                LoadError::file(
                    path,
                    "missing key `weight_map` (an object from tensor name to shard file)",
                )
            })?;
        let mut weight_map = Vec::with_capacity(map.len());
        for (name, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                LoadError::file(
                    path,
                    format!("weight_map[\"{name}\"] must be a file name, found {shard}"),
                )
            })?;
            // Shards are plain names in the model directory; anything else
            // could make a downloaded index read files outside it.
            if shard.is_empty() || Path::new(shard).file_name() != Some(shard.as_ref()) {
                return Err(LoadError::file(
                    path,
                    format!("weight_map[\"{name}\"] = `{shard}` must be a file name in the model directory"),
                ));
            }
            weight_map.push((name.clone(), shard.to_string()));
        }
        if weight_map.is_empty() {
            return Err(LoadError::file(path, "weight_map is empty"));
        }
        let index = ShardIndex {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            weight_map,
        };
        for shard in index.shard_paths() {
            if !shard.is_file() {
                let (tensor, _) = index
                    .weight_map
                    .iter()
                    .find(|(_, s)| shard.file_name() == Some(s.as_ref()))
                    .expect("shard paths come from the weight map");
                return Err(LoadError::file(
                    path,
                    format!(
                        "weight_map puts tensor `{tensor}` in {}, which does not exist",
                        shard.display()
                    ),
                ));
            }
        }
        Ok(index)
    }

    /// Each shard named in the index once, sorted by name.
    fn shard_paths(&self) -> Vec<PathBuf> {
        let names: BTreeSet<&str> = self.weight_map.iter().map(|(_, s)| s.as_str()).collect();
        names.into_iter().map(|s| self.dir.join(s)).collect()
    }
}

/// Every `*.safetensors` file in `dir`, sorted by name.
fn all_safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::file(dir, format!("cannot list directory: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    if paths.is_empty() {
        return Err(LoadError::file(
            dir,
            format!(
                "no weights found: expected {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files"
            ),
        ));
    }
    paths.sort();
    Ok(paths)
}

/// A user-facing reason for a header the `safetensors` crate rejected (its
/// own messages are variant names).
fn describe(err: &SafeTensorError, bytes: &[u8]) -> String {
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let file_len = bytes.len();
    match err {
        SafeTensorError::HeaderTooSmall => {
            format!("the file is {file_len} bytes, too short to hold a header")
        }
        SafeTensorError::HeaderTooLarge => format!(
            "the header length field says {} bytes, more than the 100 MB a header may have",
            header_len.unwrap_or_default()
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "the header length field says {} bytes but the file has only {file_len} (truncated?)",
            header_len.unwrap_or_default()
        ),
        SafeTensorError::InvalidHeader => "the header is not UTF-8 text".to_string(),
        SafeTensorError::InvalidHeaderStart | SafeTensorError::InvalidHeaderDeserialization => {
            // Parse again to recover serde's message with its position.
            let header = header_len.and_then(|n| bytes.get(8..8usize.checked_add(n as usize)?));
            match header.map(serde_json::from_slice::<safetensors::tensor::Metadata>) {
                Some(Err(e)) => format!("the header is not valid safetensors JSON: {e}"),
                _ => "the header is not valid safetensors JSON".to_string(),
            }
        }
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor `{name}` has data offsets that overlap or leave a gap in the data section"
        ),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte range does not match its dtype and shape".to_string()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape is too large".to_string(),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the header's tensors do not end where the file ends ({file_len} bytes): the file is truncated or has trailing bytes"
        ),
        other => format!("{other:?}"),
    }
}

fn dtype(d: safetensors::Dtype) -> DType {
    use safetensors::Dtype as S;
    match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        S::F8_E4M3 => DType::Other("f8_e4m3"),
        S::F8_E5M2 => DType::Other("f8_e5m2"),
        S::U16 => DType::Other("u16"),
        S::U32 => DType::Other("u32"),
        S::U64 => DType::Other("u64"),
        _ => DType::Other("unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView as StView};

    /// Loaded once and shared by request threads in a server.
    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SafetensorsSource>();
    }

    /// `(name, dtype, shape, bytes)` of a tensor to write.
    type Raw = (&'static str, Dtype, Vec<usize>, Vec<u8>);

    fn f32s(name: &'static str, shape: Vec<usize>, values: &[f32]) -> Raw {
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        (name, Dtype::F32, shape, bytes)
    }

    fn write(path: &Path, tensors: &[Raw]) {
        let views: Vec<(&str, StView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, StView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    fn write_index(dir: &Path, map: serde_json::Value) {
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }

    fn open_err(dir: &Path) -> String {
        match SafetensorsSource::open(dir) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn single_file_views_have_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bf16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let f16: Vec<u8> = [0.25f32, 3.0, 7.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        write(
            &dir.path().join(SINGLE_FILE),
            &[
                f32s("a.weight", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]),
                ("b.weight", Dtype::BF16, vec![2], bf16.clone()),
                ("c.weight", Dtype::F16, vec![3, 1], f16.clone()),
                ("d.empty", Dtype::F32, vec![0, 4], vec![]),
            ],
        );
        let src = SafetensorsSource::open(dir.path()).unwrap();
        assert_eq!(src.len(), 4);

        let a = src.tensor("a.weight").unwrap();
        assert_eq!((a.dtype, a.shape), (DType::F32, &[2usize, 2][..]));
        let values: Vec<f32> = a
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0]);

        let b = src.tensor("b.weight").unwrap();
        assert_eq!(
            (b.dtype, b.shape, b.data),
            (DType::BF16, &[2usize][..], &bf16[..])
        );
        let c = src.tensor("c.weight").unwrap();
        assert_eq!(
            (c.dtype, c.shape, c.data),
            (DType::F16, &[3usize, 1][..], &f16[..])
        );
        let d = src.tensor("d.empty").unwrap();
        assert_eq!((d.shape, d.data.len()), (&[0usize, 4][..], 0));
    }

    #[test]
    fn missing_tensor_names_the_file_and_suggests() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SINGLE_FILE);
        write(
            &file,
            &[
                f32s("model.layers.0.mlp.up_proj.weight", vec![1], &[1.0]),
                f32s("model.language_model.norm.weight", vec![1], &[1.0]),
            ],
        );
        let src = SafetensorsSource::open(dir.path()).unwrap();
        assert!(!src.contains("model.layers.0.mlp.up_prj.weight"));

        let err = src.tensor("model.layers.0.mlp.up_prj.weight").unwrap_err();
        assert_eq!(
            err,
            format!(
                "tensor `model.layers.0.mlp.up_prj.weight` not found in {} (2 tensors; did you mean `model.layers.0.mlp.up_proj.weight`?)",
                file.display()
            )
        );
        let err = src.tensor("model.norm.weight").unwrap_err();
        assert!(
            err.ends_with("did you mean `model.language_model.norm.weight`?)"),
            "{err}"
        );
        let err = src.tensor("lm_head.weight").unwrap_err();
        assert!(err.ends_with("(2 tensors)"), "{err}");
    }

    #[test]
    fn sharded_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("s1.safetensors"), &[f32s("a", vec![1], &[1.0])]);
        write(
            &d.join("s2.safetensors"),
            &[f32s("b", vec![2], &[2.0, 3.0]), f32s("c", vec![1], &[4.0])],
        );
        // A stray file the index does not name is not opened.
        std::fs::write(d.join("junk.safetensors"), b"junk").unwrap();
        write_index(
            d,
            serde_json::json!({"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}),
        );
        let src = SafetensorsSource::open(d).unwrap();
        assert_eq!(src.len(), 3);
        assert_eq!(src.paths().count(), 2);
        assert_eq!(
            src.tensor("b").unwrap().data,
            &[2.0f32.to_le_bytes(), 3.0f32.to_le_bytes()].concat()[..]
        );
        let err = src.tensor("x").unwrap_err();
        assert!(
            err.contains(&format!(
                "not found in s1.safetensors, s2.safetensors in {} (3 tensors)",
                d.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn index_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("s1.safetensors"), &[f32s("a", vec![1], &[1.0])]);
        write(&d.join("s2.safetensors"), &[f32s("b", vec![1], &[2.0])]);
        let index = d.join(INDEX_FILE).display().to_string();

        write_index(
            d,
            serde_json::json!({"a": "s1.safetensors", "c": "s3.safetensors"}),
        );
        let err = open_err(d);
        assert!(err.starts_with(&format!("{index}: ")), "{err}");
        assert!(
            err.contains(&format!(
                "puts tensor `c` in {}, which does not exist",
                d.join("s3.safetensors").display()
            )),
            "{err}"
        );

        write_index(
            d,
            serde_json::json!({"a": "s1.safetensors", "z": "s2.safetensors"}),
        );
        let err = open_err(d);
        assert!(
            err.contains("weight_map puts tensor `z` in `s2.safetensors`, but")
                && err.ends_with("s2.safetensors does not contain it"),
            "{err}"
        );

        write_index(
            d,
            serde_json::json!({"a": "s2.safetensors", "b": "s1.safetensors"}),
        );
        let err = open_err(d);
        assert!(err.contains("tensor `a` in `s2.safetensors`"), "{err}");
        assert!(
            err.ends_with(&format!(
                "(it is in {})",
                d.join("s1.safetensors").display()
            )),
            "{err}"
        );

        write_index(d, serde_json::json!({"a": "../s1.safetensors"}));
        assert!(open_err(d).contains("must be a file name in the model directory"));
        write_index(d, serde_json::json!({"a": 3}));
        assert!(open_err(d).contains("weight_map[\"a\"] must be a file name, found 3"));

        std::fs::write(d.join(INDEX_FILE), r#"{"metadata": {}}"#).unwrap();
        assert!(open_err(d).contains("missing key `weight_map`"));
        std::fs::write(d.join(INDEX_FILE), "{\"weight_map\": {\n  \"a\": }").unwrap();
        let err = open_err(d);
        assert!(
            err.starts_with(&format!("{index}: invalid JSON at line 2")),
            "{err}"
        );
    }

    #[test]
    fn duplicate_tensors_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("a.safetensors"), &[f32s("w", vec![1], &[1.0])]);
        write(&d.join("b.safetensors"), &[f32s("w", vec![1], &[2.0])]);
        let err = open_err(d);
        assert!(
            err.starts_with(&d.join("b.safetensors").display().to_string())
                && err.contains(&format!(
                    "tensor `w` is also in {}",
                    d.join("a.safetensors").display()
                )),
            "{err}"
        );
    }

    #[test]
    fn no_weights() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = open_err(dir.path());
        assert!(
            err.starts_with(&format!("{}: no weights found", dir.path().display())),
            "{err}"
        );
        assert!(open_err(&dir.path().join("absent")).contains("not a directory"));
    }

    /// A valid file's bytes, to corrupt.
    fn valid_file_bytes() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write(
            &path,
            &[f32s("a", vec![4], &[1.0; 4]), f32s("b", vec![2], &[2.0; 2])],
        );
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let good = valid_file_bytes();
        let with_len = |n: u64| [&n.to_le_bytes()[..], &good[8..]].concat();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "the file is 0 bytes, too short"),
            (vec![1, 2, 3], "the file is 3 bytes, too short"),
            (good[..good.len() - 3].to_vec(), "the file is truncated"),
            ([&good[..], &[0u8; 5][..]].concat(), "has trailing bytes"),
            (good[..12].to_vec(), "but the file has only 12 (truncated?)"),
            (with_len(good.len() as u64 * 2), "but the file has only"),
            (with_len(u64::MAX), "more than the 100 MB"),
            (
                [&good[..8], b"x", &good[9..]].concat(),
                "not valid safetensors JSON: expected value at line 1 column 1",
            ),
            (
                [&16u64.to_le_bytes()[..], &[0xff; 16][..]].concat(),
                "not UTF-8",
            ),
            (
                [&2u64.to_le_bytes()[..], b"[]"].concat(),
                "not valid safetensors JSON",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        for (bytes, why) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let err = open_err(dir.path());
            assert!(
                err.starts_with(&format!(
                    "{}: not a valid safetensors file: ",
                    path.display()
                )) && err.contains(why),
                "expected `{why}`: {err}"
            );
        }
    }

    #[test]
    fn bad_offsets_and_shapes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let file_with = |header: &str, data: usize| {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend(header.as_bytes());
            b.extend(std::iter::repeat_n(0u8, data));
            b
        };
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "tensor `a` has data offsets",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
                "does not match its dtype and shape",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                8,
                "shape is too large",
            ),
            (
                r#"{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                "not valid safetensors JSON",
            ),
        ];
        for (header, data, why) in cases {
            std::fs::write(&path, file_with(header, data)).unwrap();
            let err = open_err(dir.path());
            assert!(err.contains(why), "expected `{why}`: {err}");
        }
    }

    /// Random files, and valid files with random bytes overwritten or cut
    /// off, are rejected or accepted but never panic; accepted views stay in
    /// bounds.
    #[test]
    fn fuzz_open_never_panics() {
        let good = valid_file_bytes();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..600 {
            let bytes: Vec<u8> = match round % 3 {
                0 => (0..next() % 200).map(|_| next() as u8).collect(),
                1 => {
                    let mut b = good.clone();
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % b.len();
                        b[i] = next() as u8;
                    }
                    b
                }
                _ => good[..(next() as usize) % good.len()].to_vec(),
            };
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(src) = SafetensorsSource::open(dir.path()) {
                for name in src.names() {
                    let v = src.tensor(name).unwrap();
                    assert!(v.data.len() <= bytes.len());
                }
            }
        }
    }
}
