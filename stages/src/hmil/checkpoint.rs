//! Checkpoints: the network's parameters under their published names, as safetensors, carrying
//! in the file's metadata what is needed to use them alone: class names, the fine→coarse
//! hierarchy, the input dimension and the model's configuration. PyTorch's `load_file` and
//! `VarStore::load` ignore the metadata; `safe_open(f).metadata()["hmil_flow"]` reads it.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, nn};

use super::train::Classes;
use crate::error::{Error, Result};

/// The metadata key holding [`Info`] as JSON (one key, so the file's bytes are reproducible).
const KEY: &str = "hmil_flow";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// `hmil-flow/1`.
    pub format: String,
    /// `hmil`.
    pub model: String,
    pub classes: Classes,
    /// Instance feature dimension.
    pub input_dim: i64,
    /// Hidden sizes: the feature extractor and coarse attention, and the fine attention.
    pub hidden: i64,
    pub fine_attention_hidden: i64,
    /// Dropout after the attention gates while training.
    pub dropout: f64,
}

impl Info {
    /// The metadata of an HMIL network with these classes, input dimension and dropout.
    pub fn hmil(classes: &Classes, input_dim: i64, dropout: f64) -> Info {
        let (hidden, fine_attention_hidden) = super::model::HIDDEN_SIZES;
        Info {
            format: "hmil-flow/1".into(),
            model: "hmil".into(),
            classes: classes.clone(),
            input_dim,
            hidden,
            fine_attention_hidden,
            dropout,
        }
    }
}

/// Writes the parameters of `vs` (float32, on the CPU, sorted by name) and `info` to `path`.
pub fn save(vs: &nn::VarStore, info: &Info, path: &Path) -> Result<()> {
    let bad = |message: String| Error::BadFile { path: path.into(), message };
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| {
            let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let shape = t.size().iter().map(|&d| d as usize).collect();
            let values = Vec::<f32>::try_from(t.view([-1])).expect("float tensor");
            (name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views = named
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string(info).expect("checkpoint info serialises");
    let metadata = Some(HashMap::from([(KEY.to_owned(), json)]));
    safetensors::tensor::serialize_to_file(views, &metadata, path).map_err(|e| bad(e.to_string()))
}

/// The metadata of the checkpoint at `path`; `None` for a checkpoint without it (from PyTorch,
/// or from an older hmil-flow).
pub fn read_info(path: &Path) -> Result<Option<Info>> {
    let bad = |message: String| Error::BadFile { path: path.into(), message };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let Some(json) = header.metadata().as_ref().and_then(|m| m.get(KEY)) else { return Ok(None) };
    serde_json::from_str(json).map(Some).map_err(|e| bad(format!("unreadable `{KEY}` metadata: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hmil::model::Dims;
    use crate::hmil::train::build_model;

    #[test]
    fn info_round_trips_and_the_weights_load_by_name() {
        let classes = Classes {
            coarse: vec!["benign".into(), "malignant".into()],
            fine: vec!["N".into(), "PB".into(), "IC".into()],
            fine_to_coarse: vec![0, 0, 1],
        };
        let vs = nn::VarStore::new(Device::Cpu);
        build_model(&vs, Dims { input: 8, n_coarse: 2, n_fine: 3 }, 0.0, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let info = Info::hmil(&classes, 8, 0.25);
        save(&vs, &info, &path).unwrap();
        assert_eq!(read_info(&path).unwrap(), Some(info.clone()));
        let mut other = nn::VarStore::new(Device::Cpu);
        build_model(&other, Dims { input: 8, n_coarse: 2, n_fine: 3 }, 0.0, 2);
        other.load(&path).unwrap();
        let (a, b) = (vs.variables(), other.variables());
        assert!(a.iter().all(|(name, t)| t.equal(&b[name])), "the same weights come back");
        let first = std::fs::read(&path).unwrap();
        save(&vs, &info, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first, "the same bytes every time");

        // A checkpoint without the metadata (as tch or PyTorch writes it) has none.
        let plain = dir.path().join("plain.safetensors");
        vs.save(&plain).unwrap();
        assert_eq!(read_info(&plain).unwrap(), None);
    }
}
