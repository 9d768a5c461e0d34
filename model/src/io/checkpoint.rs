//! An HF checkpoint directory: `config.json` plus safetensors weights, single-file or sharded
//! with `model.safetensors.index.json`. Tensors are read one at a time, converted to f32 on the
//! host and handed to the caller, which puts them on the device and drops the host copy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::{Dtype, SafetensorsFile, TensorInfo, is_float};

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const MAX_INDEX_BYTES: u64 = 16 << 20;

pub struct Checkpoint {
    dir: PathBuf,
    config: PhiConfig,
    shards: Vec<SafetensorsFile>,
    /// tensor name -> index into `shards`
    location: BTreeMap<String, usize>,
}

/// The shard file names an index refers to (validated: plain file names, no paths).
pub fn index_shards(index_path: &Path) -> Result<Vec<String>> {
    Ok(read_index(index_path)?
        .into_values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect())
}

fn read_index(index_path: &Path) -> Result<BTreeMap<String, String>> {
    let text = crate::io::read_small_file(index_path, MAX_INDEX_BYTES)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(index_path, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(index_path, "no \"weight_map\" object"))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::checkpoint(index_path, format!("weight_map.{name} is not a string"))
        })?;
        let plain = Path::new(file)
            .file_name()
            .map(|f| f == file)
            .unwrap_or(false);
        if !plain || !file.ends_with(".safetensors") {
            return Err(Error::checkpoint(
                index_path,
                format!(
                    "weight_map.{name} = \"{file}\" is not a .safetensors file name in this directory"
                ),
            ));
        }
        out.insert(name.clone(), file.to_string());
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens a checkpoint directory: parses the config, validates every shard's header, and
    /// checks that the tensors present are exactly the ones the config calls for, with the
    /// right shapes. No tensor data is read yet.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::checkpoint(
                dir,
                "no config.json in the model directory",
            ));
        }
        let config = PhiConfig::from_file(&config_path)?;
        let index_path = dir.join(INDEX);
        let (shards, location) = if index_path.is_file() {
            let map = read_index(&index_path)?;
            let files: Vec<String> = map
                .values()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut shards = Vec::new();
            for f in &files {
                let p = dir.join(f);
                if !p.is_file() {
                    return Err(Error::checkpoint(
                        &index_path,
                        format!("refers to missing shard {f}"),
                    ));
                }
                shards.push(SafetensorsFile::open(&p)?);
            }
            let mut location = BTreeMap::new();
            for (name, file) in &map {
                let i = files.iter().position(|f| f == file).unwrap();
                if shards[i].info(name).is_none() {
                    return Err(Error::checkpoint(
                        shards[i].path(),
                        format!("tensor {name} is listed in {INDEX} but missing from this shard"),
                    ));
                }
                location.insert(name.clone(), i);
            }
            (shards, location)
        } else if dir.join(SINGLE).is_file() {
            let f = SafetensorsFile::open(&dir.join(SINGLE))?;
            let location = f.tensors().keys().map(|k| (k.clone(), 0)).collect();
            (vec![f], location)
        } else if [
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.pt",
            "model.bin",
        ]
        .iter()
        .any(|f| dir.join(f).exists())
        {
            return Err(Error::checkpoint(
                dir,
                "holds only PyTorch pickle weights (pytorch_model.bin); phitune reads safetensors only, \
                 because unpickling can run arbitrary code. Convert once in Python with \
                 `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`",
            ));
        } else {
            return Err(Error::checkpoint(
                dir,
                format!("no {SINGLE} or {INDEX} in the model directory"),
            ));
        };
        let ckpt = Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            location,
        };
        ckpt.check_tensors()?;
        Ok(ckpt)
    }

    fn check_tensors(&self) -> Result<()> {
        let expected = self.config.expected_tensors();
        let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, shape) in &expected {
            let Some(&i) = self.location.get(name) else {
                return Err(Error::checkpoint(
                    &self.dir,
                    format!("tensor {name} is missing (required by config.json)"),
                ));
            };
            let info = self.shards[i].info(name).unwrap();
            if &info.shape != shape {
                return Err(Error::checkpoint(
                    self.shards[i].path(),
                    format!(
                        "tensor {name} has shape {:?}, config.json implies {shape:?}",
                        info.shape
                    ),
                ));
            }
            if !is_float(info.dtype) {
                return Err(Error::checkpoint(
                    self.shards[i].path(),
                    format!(
                        "tensor {name} has dtype {}, expected F16, BF16 or F32",
                        info.dtype
                    ),
                ));
            }
        }
        // Buffers some exporters write (rotary caches) are harmless; anything else is a mismatch.
        for (name, &i) in &self.location {
            if !expected_names.contains(name.as_str()) && !name.ends_with("rotary_emb.inv_freq") {
                return Err(Error::checkpoint(
                    self.shards[i].path(),
                    format!(
                        "unexpected tensor {name} (not part of a Phi model with this config.json)"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> &PhiConfig {
        &self.config
    }

    pub fn info(&self, name: &str) -> Option<(&Path, &TensorInfo)> {
        let &i = self.location.get(name)?;
        Some((self.shards[i].path(), self.shards[i].info(name)?))
    }

    /// The dtype most of the weights are stored in.
    pub fn storage_dtype(&self) -> Dtype {
        self.info("model.embed_tokens.weight")
            .map(|(_, t)| t.dtype)
            .unwrap_or(Dtype::F32)
    }

    /// The stored bytes of one tensor, unconverted.
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.dir, format!("tensor {name} is missing")))?;
        self.shards[i].read_bytes(name)
    }

    /// Reads one tensor as f32 values with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let &i = self
            .location
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.dir, format!("tensor {name} is missing")))?;
        self.shards[i].read_f32(name)
    }
}
