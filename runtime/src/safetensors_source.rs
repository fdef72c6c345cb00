//! Weights from `.safetensors` files: a single `model.safetensors`, a
//! sharded checkpoint with `model.safetensors.index.json`, or every
//! `*.safetensors` in the directory. Files are memory-mapped; `tensor()` is a
//! lookup returning a borrowed view.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pie_driver::{DType, TensorView, WeightSource};
use safetensors::SafeTensors;

use crate::model_dir::read_json;
use crate::LoadError;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let index = dir.join("model.safetensors.index.json");
        let (paths, index_map) = if index.exists() {
            let (paths, map) = shards_from_index(dir, &index)?;
            (paths, Some(map))
        } else if dir.join("model.safetensors").exists() {
            (vec![dir.join("model.safetensors")], None)
        } else {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| LoadError::file(dir, format!("cannot list: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            paths.sort();
            if paths.is_empty() {
                return Err(LoadError::file(dir, "no weights: expected model.safetensors, model.safetensors.index.json or *.safetensors"));
            }
            (paths, None)
        };
        let mut source = SafetensorsSource {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in paths {
            source.add_file(path)?;
        }
        if let Some(map) = index_map {
            for (name, shard) in map {
                if !source.tensors.contains_key(&name) {
                    return Err(LoadError::file(&index, format!("tensor `{name}` is listed in shard `{shard}` but that file does not contain it")));
                }
            }
        }
        Ok(source)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<(), LoadError> {
        let file = std::fs::File::open(&path)
            .map_err(|e| LoadError::file(&path, format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only; a model file changing under a running
        // server is outside what we can defend against, as with any mmap.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| LoadError::file(&path, format!("cannot map: {e}")))?;
        let index = self.files.len();
        {
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                LoadError::file(&path, format!("not a valid safetensors file: {e}"))
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    file: index,
                    dtype: dtype(view.dtype()),
                    shape: view.shape().to_vec(),
                    range: start..start + view.data().len(),
                };
                if self.tensors.insert(name.clone(), entry).is_some() {
                    return Err(LoadError::file(
                        &path,
                        format!("tensor `{name}` also appears in another shard"),
                    ));
                }
            }
        }
        self.files.push((path, mmap));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn files_label(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        names.join(", ")
    }
}

/// Shard files to open, and `(tensor, shard)` pairs the index promises.
type ShardPlan = (Vec<PathBuf>, Vec<(String, String)>);

fn shards_from_index(dir: &Path, index: &Path) -> Result<ShardPlan, LoadError> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::file(index, "missing object `weight_map`"))?;
    let mut shards: Vec<String> = Vec::new();
    let mut pairs = Vec::new();
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            LoadError::file(index, format!("weight_map[`{name}`] must be a file name"))
        })?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(LoadError::file(
                index,
                format!("weight_map[`{name}`] = `{shard}` must be a file in the model directory"),
            ));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
        pairs.push((name.clone(), shard.to_string()));
    }
    shards.sort();
    let paths = shards.iter().map(|s| dir.join(s)).collect::<Vec<_>>();
    for p in &paths {
        if !p.exists() {
            return Err(LoadError::file(
                index,
                format!(
                    "shard `{}` is missing",
                    p.file_name().unwrap_or_default().to_string_lossy()
                ),
            ));
        }
    }
    Ok((paths, pairs))
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
        _ => DType::Other("other"),
    }
}

impl WeightSource for SafetensorsSource {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, String> {
        match self.tensors.get(name) {
            Some(e) => Ok(TensorView {
                dtype: e.dtype,
                shape: &e.shape,
                data: &self.files[e.file].1[e.range.clone()],
            }),
            None => {
                let hint =
                    pie_archspec::expr::did_you_mean(name, self.tensors.keys().map(String::as_str));
                Err(format!(
                    "tensor `{name}` not found in {} ({} tensors){hint}",
                    self.files_label(),
                    self.tensors.len()
                ))
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView as StView};

    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(&str, StView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, s, _), b)| (*n, StView::new(Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    #[test]
    fn single_file_views_have_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model.safetensors"),
            &[("a.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])],
        );
        let src = SafetensorsSource::open(dir.path()).unwrap();
        let v = src.tensor("a.weight").unwrap();
        assert_eq!((v.dtype, v.shape), (DType::F32, &[2usize, 2][..]));
        assert_eq!(&v.data[4..8], &2.0f32.to_le_bytes());
        let err = src.tensor("a.weihgt").unwrap_err();
        assert!(err.contains("tensor `a.weihgt` not found in model.safetensors (1 tensors) (did you mean `a.weight`?)"), "{err}");
    }

    #[test]
    fn sharded_with_index() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("s1.safetensors"),
            &[("a", vec![1], vec![1.0])],
        );
        write(
            &dir.path().join("s2.safetensors"),
            &[("b", vec![1], vec![2.0])],
        );
        let index =
            serde_json::json!({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let src = SafetensorsSource::open(dir.path()).unwrap();
        assert_eq!(src.len(), 2);
        assert!(src.contains("b"));

        let index =
            serde_json::json!({"weight_map": {"a": "s1.safetensors", "c": "s3.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let err = SafetensorsSource::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("shard `s3.safetensors` is missing"), "{err}");

        let index =
            serde_json::json!({"weight_map": {"a": "s1.safetensors", "z": "s2.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let err = SafetensorsSource::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tensor `z` is listed in shard `s2.safetensors`"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut good = Vec::new();
        write(&path, &[("a", vec![4], vec![1.0; 4])]);
        good.extend(std::fs::read(&path).unwrap());
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1, 2, 3],
            u64::MAX.to_le_bytes().to_vec(),
            good[..good.len() - 3].to_vec(),
            good[..12].to_vec(),
        ];
        for bytes in cases {
            std::fs::write(&path, &bytes).unwrap();
            let err = SafetensorsSource::open(dir.path())
                .err()
                .expect("corrupt file rejected")
                .to_string();
            assert!(
                err.contains("model.safetensors: not a valid safetensors file"),
                "{err}"
            );
        }
        // Random headers never panic.
        let mut s = 7u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (s >> 56) as u8
                })
                .collect();
            std::fs::write(&path, &bytes).unwrap();
            let _ = SafetensorsSource::open(dir.path());
        }
    }

    #[test]
    fn empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = SafetensorsSource::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no weights"), "{err}");
    }
}
