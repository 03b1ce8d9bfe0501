//! Checkpoints: a network's parameters under its reference implementation's names, as
//! safetensors, carrying in the file's metadata what is needed to use them alone: the model,
//! class names, the fine→coarse hierarchy, the input dimension and the model's configuration.
//! PyTorch's `load_file` and `VarStore::load` ignore the metadata;
//! `safe_open(f).metadata()["hmil_flow"]` reads it.

use std::collections::HashMap;
use std::path::Path;

use models::MilModel;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use schemas::workflow::ModelKind;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::train::{Classes, model_config};
use crate::error::{Error, Result};

/// The metadata key holding [`Info`] as JSON (one key, so the file's bytes are reproducible).
const KEY: &str = "hmil_flow";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// `hmil-flow/1`.
    pub format: String,
    /// `hmil`, `abmil` or `meanpool`.
    pub model: ModelKind,
    pub classes: Classes,
    /// Instance feature dimension.
    pub input_dim: i64,
    /// HMIL's hidden sizes: the feature extractor and coarse attention, and the fine attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_attention_hidden: Option<i64>,
    /// Dropout while training.
    pub dropout: f64,
}

impl Info {
    /// The metadata of a `model` network with these classes, input dimension and dropout.
    pub fn new(model: ModelKind, classes: &Classes, input_dim: i64, dropout: f64) -> Info {
        let (hidden, fine_attention_hidden) = match model {
            ModelKind::Hmil => (Some(models::hmil::HIDDEN_SIZES.0), Some(models::hmil::HIDDEN_SIZES.1)),
            _ => (None, None),
        };
        Info {
            format: "hmil-flow/1".into(),
            model,
            classes: classes.clone(),
            input_dim,
            hidden,
            fine_attention_hidden,
            dropout,
        }
    }
}

/// A network loaded from a checkpoint. The variable store holds the weights and must outlive
/// the network.
pub struct Loaded {
    pub vs: nn::VarStore,
    pub net: Box<dyn MilModel>,
    pub model: ModelKind,
}

/// The network of the checkpoint at `path` (an HMIL one when the file does not say), for
/// `classes` over `dim`-wide features, on `device`.
pub fn load(path: &Path, classes: &Classes, dim: i64, device: Device) -> Result<Loaded> {
    let bad = |message: String| Error::BadFile { path: path.into(), message };
    let model = read_info(path)?.map_or(ModelKind::Hmil, |info| info.model);
    let tensors = Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?;
    let rows = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.size())
            .ok_or_else(|| bad(format!("no tensor {name}: not the parameters of a {} network", model.name())))
    };
    let (input, coarse, fine) = match model {
        ModelKind::Hmil => (
            "feature_extractor.0.weight",
            Some("coarse_attention.0.attention_c.weight"),
            "fine_attention.0.attention_c.weight",
        ),
        ModelKind::Abmil => ("attention_net.0.weight", None, "classifiers.weight"),
        ModelKind::Meanpool => ("fc.0.weight", None, "classifier.weight"),
        ModelKind::Transmil => ("_fc1.0.weight", None, "_fc2.weight"),
    };
    let d = rows(input)?[1];
    if d != dim {
        return Err(bad(format!("trained on features of dimension {d}, these have {dim}")));
    }
    let n_fine = rows(fine)?[0];
    let n_coarse = coarse.map(|name| rows(name).map(|r| r[0])).transpose()?.unwrap_or(classes.coarse.len() as i64);
    if (n_fine, n_coarse) != (classes.fine.len() as i64, classes.coarse.len() as i64) {
        return Err(bad(format!(
            "has {n_fine} fine and {n_coarse} coarse classes; the workflow declares {} and {}",
            classes.fine.len(),
            classes.coarse.len()
        )));
    }
    let mut vs = nn::VarStore::new(device);
    let net = models::build(&vs.root(), &model_config(model, classes, dim));
    vs.load(path).map_err(|e| bad(format!("cannot load its parameters: {e}")))?;
    // Loading takes each parameter's type from the file: a float16 checkpoint runs in float32.
    vs.float();
    Ok(Loaded { vs, net, model })
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
    use crate::hmil::train::build_model;

    #[test]
    fn info_round_trips_and_the_weights_load_by_name() {
        let classes = Classes {
            coarse: vec!["benign".into(), "malignant".into()],
            fine: vec!["N".into(), "PB".into(), "IC".into()],
            fine_to_coarse: vec![0, 0, 1],
        };
        let vs = nn::VarStore::new(Device::Cpu);
        build_model(&vs, &model_config(ModelKind::Hmil, &classes, 8), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let info = Info::new(ModelKind::Hmil, &classes, 8, 0.25);
        save(&vs, &info, &path).unwrap();
        assert_eq!(read_info(&path).unwrap(), Some(info.clone()));
        let mut other = nn::VarStore::new(Device::Cpu);
        build_model(&other, &model_config(ModelKind::Hmil, &classes, 8), 2);
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
