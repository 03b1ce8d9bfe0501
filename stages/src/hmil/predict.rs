//! `hmil-flow predict`: a checkpoint applied to feature files outside any workflow.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array};
use tch::{Device, Kind, Tensor, nn};

use super::infer::argmax;
use super::model::{Batch, Dims};
use super::train::{Classes, build_model};
use crate::error::{Error, Result};
use crate::features::{self, Format};
use crate::index::feature_files;
use crate::table;

/// The class counts a checkpoint was trained for, read from its attention layers' shapes.
fn dims(checkpoint: &Path, input: i64) -> Result<Dims> {
    let bad = |message: String| Error::BadFile { path: checkpoint.into(), message };
    let tensors = Tensor::read_safetensors(checkpoint).map_err(|e| bad(e.to_string()))?;
    let rows = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.size()[0])
            .ok_or_else(|| bad(format!("no tensor {name}: not an HMIL checkpoint")))
    };
    let d = tensors.iter().find(|(n, _)| n == "feature_extractor.0.weight").map(|(_, t)| t.size()[1]);
    if d != Some(input) {
        return Err(bad(format!("trained on features of dimension {d:?}, these have {input}")));
    }
    Ok(Dims {
        input,
        n_coarse: rows("coarse_attention.0.attention_c.weight")?,
        n_fine: rows("fine_attention.0.attention_c.weight")?,
    })
}

/// Predicts every feature file at `features` (a file or a directory) and writes `out`; returns
/// the number of slides. Without `classes` (from a workflow), classes are named by index and the
/// coarse-from-fine columns stay empty.
pub fn predict(
    checkpoint: &Path,
    features: &Path,
    classes: Option<Classes>,
    out: &Path,
    device: Device,
) -> Result<usize> {
    let files = if features.is_dir() {
        feature_files(features)?
    } else {
        let format = Format::of(features).ok_or_else(|| Error::BadFile {
            path: features.into(),
            message: "unknown feature file extension".into(),
        })?;
        let slide = features.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        vec![(slide, features.to_path_buf(), format)]
    };
    let mut model = None;
    let mut rows: Vec<(String, String, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut vs = nn::VarStore::new(device);
    let _guard = tch::no_grad_guard();
    for (slide, path, format) in &files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let arrays =
            features::parse(*format, &bytes).map_err(|message| Error::BadFile { path: path.clone(), message })?;
        let (n, d) = (arrays.features.rows as i64, arrays.features.cols as i64);
        if model.is_none() {
            let net = build_model(&vs, dims(checkpoint, d)?, 0.0, 0);
            vs.load(checkpoint).map_err(|e| Error::BadFile { path: checkpoint.into(), message: e.to_string() })?;
            model = Some(net);
        }
        let net = model.as_ref().expect("built above");
        let x = Tensor::from_slice(&arrays.features.to_f32()).view([n, d]).to(device);
        let out = net.forward(&Batch::new(x, vec![n]), false);
        let probs = |t: &Tensor| -> Vec<f64> {
            Vec::try_from(t.softmax(-1, Kind::Double).view([-1]).to(Device::Cpu)).expect("double tensor")
        };
        rows.push((
            slide.clone(),
            path.to_string_lossy().into_owned(),
            probs(&out.fine_logits),
            probs(&out.coarse_logits),
        ));
    }
    let Some(net) = model else { return Ok(0) };
    let classes = classes.unwrap_or_else(|| Classes {
        fine: (0..net.dims.n_fine).map(|i| format!("fine{i}")).collect(),
        coarse: (0..net.dims.n_coarse).map(|i| format!("coarse{i}")).collect(),
        fine_to_coarse: Vec::new(),
    });
    if classes.fine.len() as i64 != net.dims.n_fine || classes.coarse.len() as i64 != net.dims.n_coarse {
        return Err(Error::BadFile {
            path: checkpoint.into(),
            message: format!(
                "has {} fine and {} coarse classes; the workflow declares {} and {}",
                net.dims.n_fine,
                net.dims.n_coarse,
                classes.fine.len(),
                classes.coarse.len()
            ),
        });
    }
    let from_fine: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            let mut c = vec![0.0; classes.coarse.len()];
            for (f, &k) in classes.fine_to_coarse.iter().enumerate() {
                c[k] += r.2[f];
            }
            c
        })
        .collect();
    let mut cols: Vec<ArrayRef> = vec![
        table::string_col(rows.iter().map(|r| r.0.as_str())),
        table::string_col(rows.iter().map(|r| r.1.as_str())),
        table::string_col(rows.iter().map(|r| classes.fine[argmax(&r.2)].as_str())),
        table::string_col(rows.iter().map(|r| classes.coarse[argmax(&r.3)].as_str())),
        table::string_col(
            from_fine
                .iter()
                .map(|p| if classes.fine_to_coarse.is_empty() { "" } else { classes.coarse[argmax(p)].as_str() }),
        ),
    ];
    for k in 0..classes.fine.len() {
        cols.push(Arc::new(rows.iter().map(|r| r.2[k]).collect::<Float64Array>()));
    }
    for k in 0..classes.coarse.len() {
        cols.push(Arc::new(rows.iter().map(|r| r.3[k]).collect::<Float64Array>()));
    }
    for k in 0..classes.coarse.len() {
        cols.push(Arc::new(from_fine.iter().map(|p| p[k]).collect::<Float64Array>()));
    }
    let fine: Vec<&str> = classes.fine.iter().map(String::as_str).collect();
    let coarse: Vec<&str> = classes.coarse.iter().map(String::as_str).collect();
    table::write(out, schemas::tables::new_predictions(&fine, &coarse), cols)?;
    Ok(rows.len())
}
